"""Experiment tracking: metric sinks (a JSONL file always, MLflow when enabled) and one MLflow run per job.

Contract with the training loop:

* Call :func:`start_tracking` once on **every** rank, after ``torch.distributed`` is initialised (it is a
  collective). It returns ``(sink, run_id)``. Store ``run_id`` with the checkpoint and pass it back as
  ``resume_run_id`` when the job resumes, so the resumed job continues the same MLflow run.
* Only the logging rank (one per job, e.g. the last pipeline stage) gets a sink that records training
  metrics: every call is appended to a JSONL file, then queued for MLflow. Each node's local rank 0 also
  samples system metrics into the same run as ``system/<node_id>/<name>``. Other ranks get a
  :class:`NullSink`.
* ``close(failed=...)`` the sink in a ``finally``; it waits a bounded time for queued MLflow calls.

A dead or missing tracking server never stops training (see :mod:`mor_megatron.training.tracking_mlflow`):
background threads, short HTTP timeouts, one warning naming the tracking URI and the JSONL file that still
has every metric. Sinks raise only for a bad metric key or artifact name, which is a bug in the caller.
This module imports MLflow only when tracking is enabled, and only on ranks that talk to it.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import posixpath
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch.distributed as dist
import yaml

from mor_megatron.runtime import LaunchEnv

if TYPE_CHECKING:
    from mor_megatron.config import TrackingConfig

_log = logging.getLogger(__name__)

# MLflow 3.17 limits (mlflow/utils/validation.py).
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
# ASCII subset of what MLflow accepts on every OS (colons are refused on Windows and by older servers).
_KEY_CHARS = re.compile(r"[A-Za-z0-9_\-. /]+")


def check_metric_key(key: str) -> str:
    """Return ``key`` if MLflow accepts it as a metric or param key, else raise ValueError.

    Legal: letters, digits, ``_ - . /`` and spaces, at most 250 characters, and unchanged by
    ``posixpath.normpath`` (so no ``//``, no leading or trailing ``/``, no ``.`` or ``..`` segments), as
    MLflow's own ``path_not_unique`` check demands.
    """
    if (not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY_CHARS.fullmatch(key)
            or posixpath.normpath(key) != key or key == "." or key.startswith(("..", "/"))):
        raise ValueError(
            f"metric key {key!r} is not MLflow-legal: use letters, digits, '_', '-', '.', '/' and spaces, "
            f"at most {MAX_KEY_LENGTH} characters, no '//', no '.' or '..' segments and no leading or "
            "trailing '/' (e.g. 'perf/step_time_s')")
    return key


def check_artifact_name(name: str) -> str:
    """Return ``name`` if it is a relative artifact path that stays inside the run, else raise ValueError."""
    if not name or posixpath.isabs(name) or posixpath.normpath(name) != name or name.startswith(".."):
        raise ValueError(f"artifact name {name!r} must be a relative path without '.' or '..' parts, "
                         "e.g. 'config.yaml' or 'config/resume.yaml'")
    return name


@runtime_checkable
class MetricSink(Protocol):
    """Where training metrics go. Implementations must not raise for tracking-backend failures."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` (keys checked by :func:`check_metric_key`) at optimizer ``step``."""

    def log_params(self, params: Mapping[str, str]) -> None:
        """Record run parameters (string values)."""

    def log_artifact_text(self, name: str, text: str) -> None:
        """Store ``text`` as a file ``name`` (a relative path) with the run."""

    def close(self, *, failed: bool = False) -> None:
        """Flush within a bounded time and release resources; ``failed`` marks the run as failed."""


class NullSink:
    """Discards everything: the sink of ranks that neither log training metrics nor sample system metrics."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Discard."""

    def log_params(self, params: Mapping[str, str]) -> None:
        """Discard."""

    def log_artifact_text(self, name: str, text: str) -> None:
        """Discard."""

    def close(self, *, failed: bool = False) -> None:
        """Nothing to release."""


class FanOutSink:
    """Forwards every call to several sinks in order; closes them in reverse order (last opened first)."""

    def __init__(self, sinks: Sequence[MetricSink]) -> None:
        self.sinks = tuple(sinks)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Forward to every sink."""
        for sink in self.sinks:
            sink.log_metrics(metrics, step)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Forward to every sink."""
        for sink in self.sinks:
            sink.log_params(params)

    def log_artifact_text(self, name: str, text: str) -> None:
        """Forward to every sink."""
        for sink in self.sinks:
            sink.log_artifact_text(name, text)

    def close(self, *, failed: bool = False) -> None:
        """Close every sink, the last one first."""
        for sink in reversed(self.sinks):
            sink.close(failed=failed)


class JsonlSink:
    """Appends one JSON object per line and flushes after each, so a crash or a dead server loses nothing.

    Lines: ``{"kind": "metrics", "step": int, "time": unix_s, "metrics": {key: float}}``,
    ``{"kind": "params", "time", "params": {key: str}}`` and, on close, ``{"kind": "end", "time", "status"}``
    with status ``FINISHED`` or ``FAILED``. A resumed job appends to the same file. Non-finite values are
    written as ``NaN``/``Infinity``, which Python's ``json`` reads back. Text artifacts go to
    ``<dir of the file>/artifacts/<name>``. A write error (disk full) is warned once and stops this sink.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            _log.warning("metrics JSONL %s stopped: %s: %s; training continues without it",
                         self.path, type(err).__name__, err)
            self._file = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one ``metrics`` line."""
        values = {check_metric_key(key): float(value) for key, value in metrics.items()}
        self._write({"kind": "metrics", "step": int(step), "time": time.time(), "metrics": values})

    def log_params(self, params: Mapping[str, str]) -> None:
        """Append one ``params`` line."""
        values = {str(key): str(value) for key, value in params.items()}
        self._write({"kind": "params", "time": time.time(), "params": values})

    def log_artifact_text(self, name: str, text: str) -> None:
        """Write ``text`` to ``artifacts/<name>`` beside the JSONL file."""
        target = self.path.parent / "artifacts" / check_artifact_name(name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        except OSError as err:
            _log.warning("could not write artifact %s: %s: %s", target, type(err).__name__, err)

    def close(self, *, failed: bool = False) -> None:
        """Append the ``end`` line and close the file."""
        self._write({"kind": "end", "time": time.time(), "status": "FAILED" if failed else "FINISHED"})
        if self._file is not None:
            self._file.close()
            self._file = None


# ----------------------------------------------------------------------------------------------------------
# One run per job.
# ----------------------------------------------------------------------------------------------------------

def resolve_tracking_uri(configured: str | None, run_dir: str | Path) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs run_dir>/mlflow.db``.

    The embedded default keeps the job self-contained and never touches ``./mlruns`` (a file store, which
    MLflow 3.17 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``).
    """
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config mapping -> ``{"model.hidden_size": "512", ...}``; non-string values JSON-encoded.

    Values longer than MLflow's 6000-character limit are cut (the YAML artifact keeps the full config).
    """
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[check_metric_key(name)] = text[:MAX_PARAM_VALUE_LENGTH]
    return out


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def runtime_params() -> dict[str, str]:
    """Job facts that are not in the config: world size, node count, library versions, git commit."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    try:
        num_nodes = str(LaunchEnv.from_environ().num_nodes)
    except RuntimeError:  # a launcher variable that is not an integer; not worth failing the job over
        num_nodes = "unknown"
    return {
        "runtime.world_size": str(world_size),
        "runtime.num_nodes": num_nodes,
        "runtime.git_commit": _git_commit(),
        "runtime.python": sys.version.split()[0],
        "runtime.torch": _version("torch"),
        "runtime.megatron_core": _version("megatron-core"),
        "runtime.deepspeed": _version("deepspeed"),
        "runtime.mlflow": _version("mlflow"),
    }


def _share_run_id(run_id: str | None, is_logging_rank: bool, group: dist.ProcessGroup | None) -> str | None:
    """Give every rank the logging rank's run id (one all-gather, which also finds the logging rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return run_id
    # The logging rank may be the last pipeline stage rather than rank 0, so the source of a broadcast
    # is not known everywhere; gathering (flag, id) from all ranks finds it and checks there is exactly one.
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (bool(is_logging_rank), run_id), group=group)
    loggers = [rank for rank, (flag, _) in enumerate(gathered) if flag]
    if len(loggers) != 1:
        raise ValueError(f"is_logging_rank must be True on exactly one rank of the group; it is True on "
                         f"group ranks {loggers}")
    return gathered[loggers[0]][1]


def start_tracking(tracking_cfg: TrackingConfig, *, run_dir: str | Path, config_dict: Mapping[str, Any],
                   resume_run_id: str | None, is_logging_rank: bool, group: dist.ProcessGroup | None = None,
                   local_rank: int | None = None, node_id: str | None = None,
                   system_metrics_interval_s: float = 10.0, retry_after_s: float = 60.0,
                   close_timeout_s: float = 30.0) -> tuple[MetricSink, str | None]:
    """Open the job's tracking on this rank; returns ``(sink, run_id)``. Collective when distributed.

    * Logging rank (``is_logging_rank``, exactly one in ``group``): a :class:`JsonlSink` at
      ``tracking.jsonl_path`` (default ``<run_dir>/metrics.jsonl``) and, if ``tracking.enabled``, an MLflow
      run at :func:`resolve_tracking_uri`: created in ``tracking.experiment``, or continued when
      ``resume_run_id`` (stored with the checkpoint) is given. The flattened ``config_dict`` (the resolved
      config) and :func:`runtime_params` become params and its YAML an artifact (``config.yaml``;
      ``config_resume_<utc>.yaml`` on resume), in MLflow and in the JSONL copy.
    * Every rank learns the run id through one all-gather over ``group`` (when ``torch.distributed`` is
      initialised). It is None when the server was unreachable at a fresh start; with tracking off it is
      ``resume_run_id`` unchanged.
    * Each node leader (``local_rank`` 0) samples system metrics into the run every
      ``system_metrics_interval_s`` as ``system/<node_id>/...`` when ``tracking.system_metrics`` is on.
      ``local_rank`` and ``node_id`` (``node<node_rank>``) default to the launcher environment
      (:class:`mor_megatron.runtime.LaunchEnv`).
    * Everyone else gets a :class:`NullSink`.

    MLflow failures are reported once per process and retried every ``retry_after_s``; ``close`` waits at
    most ``close_timeout_s`` for queued calls.
    """
    run_dir = Path(run_dir)
    tracking_uri = resolve_tracking_uri(tracking_cfg.tracking_uri, run_dir) if tracking_cfg.enabled else None
    sinks: list[MetricSink] = []
    # Tracking off: the id from the checkpoint passes through, so a later job can still continue that run.
    run_id: str | None = resume_run_id
    outage = None
    if is_logging_rank:
        jsonl_path = Path(tracking_cfg.jsonl_path) if tracking_cfg.jsonl_path else run_dir / "metrics.jsonl"
        jsonl = JsonlSink(jsonl_path)
        sinks.append(jsonl)
        params = {**flatten_params(config_dict), **runtime_params()}
        config_yaml = yaml.safe_dump(dict(config_dict), sort_keys=False)
        jsonl.log_params(params)
        jsonl.log_artifact_text("config.yaml", config_yaml)
        if tracking_uri is not None:
            from mor_megatron.training import tracking_mlflow

            outage = tracking_mlflow.TrackingOutage(
                tracking_uri, f"every metric is still written to {jsonl_path}", retry_after_s=retry_after_s)
            mlflow_sink, run_id = tracking_mlflow.open_run(
                tracking_cfg, tracking_uri=tracking_uri, run_dir=run_dir, params=params,
                config_yaml=config_yaml, resume_run_id=resume_run_id, outage=outage,
                close_timeout_s=close_timeout_s)
            if mlflow_sink is not None:
                sinks.append(mlflow_sink)
    run_id = _share_run_id(run_id, is_logging_rank, group)
    if local_rank is None or node_id is None:
        launch = LaunchEnv.from_environ()
        local_rank = launch.local_rank if local_rank is None else local_rank
        node_id = node_id or f"node{launch.node_rank}"
    is_node_leader = local_rank == 0
    if tracking_uri is not None and run_id is not None and tracking_cfg.system_metrics and is_node_leader:
        from mor_megatron.training import tracking_mlflow

        if outage is None:
            outage = tracking_mlflow.TrackingOutage(
                tracking_uri, "training metrics go through the logging rank, which keeps a JSONL copy",
                retry_after_s=retry_after_s)
        sinks.append(tracking_mlflow.SystemMetricsSink(
            tracking_uri, run_id, node_id=node_id, outage=outage,
            interval_s=system_metrics_interval_s, resume=resume_run_id is not None,
            timeout_s=tracking_cfg.timeout_s, close_timeout_s=min(close_timeout_s, 10.0)))
    if not sinks:
        return NullSink(), run_id
    return (sinks[0] if len(sinks) == 1 else FanOutSink(sinks)), run_id
