"""Upload to MLflow what a job's JSONL copy has and the server lacks (``mor-track replay``).

The logging rank writes every metric to ``metrics.jsonl`` before MLflow sees it, and each node leader copies
its system metrics to ``system_metrics/<node>.jsonl`` beside it (:mod:`mor_megatron.tracking.sinks`). A
``run`` record names the MLflow run the following records belong to. After a tracking outage the server
misses the points logged while it was down; replay reads the copies, asks the server which (key, step)
points each run holds, uploads only the others, adds params the run lacks and sets the run's status from the
last attempt's ``end`` record. A (key, step) the server already has is never sent again, so running replay
twice adds nothing, and a resumed run keeps the one point per step it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mor_megatron.tracking.mlflow import (
    FAILURE_TAG,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    TAG_CHARS,
    configure_mlflow_http,
)
from mor_megatron.tracking.sinks import MAX_PARAM_VALUE_LENGTH, SYSTEM_METRICS_DIR, read_jsonl


@dataclass
class RunCopy:
    """One MLflow run as the JSONL copies hold it."""

    run_id: str
    tracking_uri: str | None
    points: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)
    """(key, step) -> (value, unix time when logged); a later record of the same point wins."""
    params: dict[str, str] = field(default_factory=dict)
    status: str | None = None
    """The status of the run's last attempt (FINISHED, FAILED, KILLED); None if it left no ``end`` record."""
    end_time: float | None = None
    failure: str | None = None
    """Why the last attempt failed (the ``end`` record's ``reason``)."""


def collect_runs(records: Iterable[Mapping[str, Any]], runs: dict[str, RunCopy], *,
                 with_status: bool) -> int:
    """Add the records of one JSONL file to ``runs`` (by run id); returns how many metric records belong to no
    known run (written before any ``run`` record, or while the server was down at a fresh start).

    ``with_status``: take params and ``end`` records into account (the training file, not a node's file).
    """
    current: RunCopy | None = None
    orphans = 0
    for record in records:
        kind = record.get("kind")
        if kind == "run":
            run_id = record.get("run_id")
            current = runs.setdefault(run_id, RunCopy(run_id, record.get("tracking_uri"))) if run_id else None
            if current is not None and with_status:
                current.status = current.end_time = current.failure = None  # a new attempt: its own end counts
        elif kind == "metrics" and isinstance(record.get("step"), int):
            if current is None:
                orphans += 1
                continue
            for key, value in record.get("metrics", {}).items():
                current.points[(key, record["step"])] = (float(value), float(record.get("time", 0.0)))
        elif current is not None and with_status and kind == "params":
            current.params.update(record.get("params", {}))
        elif current is not None and with_status and kind == "end":
            current.status, current.end_time = record.get("status"), record.get("time")
            current.failure = record.get("reason")
    return orphans


def read_run_copies(metrics_jsonl: Path) -> tuple[dict[str, RunCopy], int]:
    """The runs in ``metrics_jsonl`` and in the node files beside it, and the count of orphan records."""
    if not metrics_jsonl.is_file():
        raise FileNotFoundError(f"no metrics JSONL at {metrics_jsonl}; pass the job's output_dir, or --jsonl "
                                "when tracking.jsonl_path put it elsewhere")
    runs: dict[str, RunCopy] = {}
    orphans = collect_runs(read_jsonl(metrics_jsonl), runs, with_status=True)
    for node_file in sorted((metrics_jsonl.parent / SYSTEM_METRICS_DIR).glob("*.jsonl")):
        orphans += collect_runs(read_jsonl(node_file), runs, with_status=False)
    return runs, orphans


def replay_run(client, run: RunCopy) -> dict[str, Any]:
    """Upload the points and params of ``run`` that the server lacks and set its final status.

    Returns a summary: points in the copy, points uploaded, params uploaded, and the status set (None when
    the server already had it or the copy has none)."""
    from mlflow.entities import Metric, Param

    on_server = {(key, metric.step) for key in {key for key, _ in run.points}
                 for metric in client.get_metric_history(run.run_id, key)}
    missing = sorted((point for point in run.points if point not in on_server), key=lambda p: (p[1], p[0]))
    metrics = [Metric(key, run.points[(key, step)][0], int(run.points[(key, step)][1] * 1000), step)
               for key, step in missing]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run.run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])
    server_run = client.get_run(run.run_id)
    params = [Param(key, value[:MAX_PARAM_VALUE_LENGTH]) for key, value in sorted(run.params.items())
              if key not in server_run.data.params]
    for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run.run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])
    status_set = None
    if run.status is not None and server_run.info.status != run.status:
        end_ms = int(run.end_time * 1000) if run.end_time is not None else None
        if run.failure is not None:
            client.set_tag(run.run_id, FAILURE_TAG, run.failure[:TAG_CHARS])
        client.set_terminated(run.run_id, run.status, end_time=end_ms)
        status_set = run.status
    return {"run_id": run.run_id, "points_in_copy": len(run.points), "points_uploaded": len(metrics),
            "params_uploaded": len(params), "status_set": status_set, "status_in_copy": run.status}


def replay(metrics_jsonl: Path, *, tracking_uri: str | None = None,
           timeout_s: float = 30.0) -> dict[str, Any]:
    """Replay every run of ``metrics_jsonl`` (and its node files) to its tracking server.

    ``tracking_uri`` overrides the URI each ``run`` record names (e.g. the server moved). Raises
    FileNotFoundError without a JSONL, ValueError when no record names a run, and MLflow's errors when
    the server refuses or cannot be reached.
    """
    from mlflow.tracking import MlflowClient

    runs, orphans = read_run_copies(metrics_jsonl)
    if not runs:
        raise ValueError(f"{metrics_jsonl} names no MLflow run (tracking was off, or the server was down "
                         "when the job started, so no run was created); there is nothing to replay into")
    configure_mlflow_http(timeout_s)
    summaries = []
    for run in runs.values():
        uri = tracking_uri or run.tracking_uri
        if uri is None:
            raise ValueError(f"run {run.run_id} in {metrics_jsonl} has no tracking URI; pass --tracking-uri")
        summaries.append({**replay_run(MlflowClient(uri), run), "tracking_uri": uri})
    return {"jsonl": str(metrics_jsonl), "runs": summaries, "records_without_run": orphans}
