"""Opening a job's tracking: :func:`start_tracking` gives each rank its sinks and opens the MLflow run.

The one module that picks backends, so that :mod:`.sinks` never needs to import :mod:`.mlflow`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import yaml

from mor_megatron.runtime import LaunchEnv
from mor_megatron.tracking import datasets, run_info, sinks
from mor_megatron.tracking.mlflow import RunSpec, SystemMetricsSink, TrackingOutage, open_run

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

    from mor_megatron.config import TrackingConfig

_log = logging.getLogger(__name__)


def resolve_tracking_uri(tracking_cfg: TrackingConfig, run_dir: str | Path) -> str | None:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs run_dir>/mlflow.db``;
    None when tracking is off.

    The embedded default keeps the job self-contained and never touches ``./mlruns`` (a file store, which
    MLflow 3.17 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``).
    """
    if not tracking_cfg.enabled:
        return None
    return (tracking_cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}")


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


def _files_uploaded_at_close(metrics_jsonl: Path) -> list[tuple[Path, str | None]]:
    # (local file, artifact folder). MOR_STDOUT_LOG names the console log a launcher tees into, if any.
    files: list[tuple[Path, str | None]] = [(metrics_jsonl, None)]
    if os.environ.get("MOR_STDOUT_LOG"):
        files.append((Path(os.environ["MOR_STDOUT_LOG"]), "logs"))
    return files


def _dataset_inputs(data: Mapping[str, Any]) -> list[DatasetInput]:
    # Describing the data is a nicety of the run page: a blend it cannot read is warned about, not fatal.
    try:
        return datasets.dataset_inputs(data)
    except (OSError, ValueError) as err:
        _log.warning("the run's dataset inputs are not logged: %s: %s", type(err).__name__, err)
        return []


def _open_logging_rank(tracking_cfg: TrackingConfig, *, outage: TrackingOutage | None, jsonl_path: Path,
                       run_dir: Path, config_dict: Mapping[str, Any], resume_run_id: str | None,
                       resume_step: int) -> tuple[list[sinks.MetricSink], str | None]:
    """The logging rank's sinks (MLflow first, so that closing in reverse writes the JSONL end record before
    the MLflow sink uploads the file) and the run id; MLflow is off when ``outage`` is None."""
    jsonl = sinks.JsonlSink(jsonl_path, resume_step=resume_step if resume_step > 0 else None)
    commit, dirty = run_info.git_state()
    params = {**run_info.flatten_params(config_dict), **run_info.runtime_params(commit, dirty)}
    config_yaml = yaml.safe_dump(dict(config_dict), sort_keys=False)
    opened: list[sinks.MetricSink] = []
    # Tracking off: the id from the checkpoint passes through, so a later job can still continue that run.
    run_id, run_name, tracking_uri = resume_run_id, tracking_cfg.run_name, None
    if outage is not None:
        tracking_uri = outage.tracking_uri
        run_name = run_name or run_info.default_run_name(config_dict)
        spec = RunSpec(name=run_name, tags=run_info.source_tags(commit, dirty), params=params,
                       config_yaml=config_yaml, upload_at_close=_files_uploaded_at_close(jsonl_path),
                       superseded_step=jsonl.superseded_step)
        mlflow_sink, run_id = open_run(tracking_cfg, tracking_uri=tracking_uri, run_dir=run_dir, spec=spec,
                                       resume_run_id=resume_run_id, outage=outage)
        if mlflow_sink is not None:
            mlflow_sink.log_dataset_inputs(_dataset_inputs(config_dict.get("data") or {}))
            opened.append(mlflow_sink)
    jsonl.log_run(run_id=run_id, run_name=run_name, experiment=tracking_cfg.experiment,
                  tracking_uri=tracking_uri, start_step=resume_step)
    jsonl.log_params(params)
    jsonl.log_artifact_text("config.yaml", config_yaml)
    opened.append(jsonl)
    return opened, run_id


def start_tracking(tracking_cfg: TrackingConfig, *, run_dir: str | Path, config_dict: Mapping[str, Any],
                   resume_run_id: str | None, is_logging_rank: bool, resume_step: int = 0,
                   group: dist.ProcessGroup | None = None, local_rank: int | None = None,
                   node_id: str | None = None) -> tuple[sinks.MetricSink, str | None]:
    """Open the job's tracking on this rank; returns ``(sink, run_id)``. Collective when distributed.

    * Logging rank (``is_logging_rank``, exactly one in ``group``): a :class:`~.sinks.JsonlSink` at
      :func:`~.sinks.metrics_jsonl_path` and, if ``tracking.enabled``, an MLflow run at
      :func:`resolve_tracking_uri`: created in ``tracking.experiment`` under ``tracking.run_name`` (default
      :func:`~.run_info.default_run_name`) with :func:`~.run_info.source_tags`, or continued when
      ``resume_run_id`` (stored with the checkpoint) is given. The flattened ``config_dict`` (the resolved
      config) and :func:`~.run_info.runtime_params` become params and its YAML
      an artifact (``config.yaml``; ``config_resume_<utc>.yaml`` on resume), in MLflow and in the JSONL
      copy; the JSONL file itself is uploaded at close.
    * ``resume_step`` (the checkpoint's step, 0 for a fresh start) keeps every step logged once: the JSONL
      drops what the interrupted attempt logged past it, and the MLflow sink skips the points the run
      already holds (:class:`~mor_megatron.tracking.mlflow.MlflowSink`).
    * Every rank learns the run id through one all-gather over ``group`` (when ``torch.distributed`` is
      initialised). It is None when the server was unreachable at a fresh start; with tracking off it is
      ``resume_run_id`` unchanged.
    * Each node leader (``local_rank`` 0) samples system metrics into the run every
      ``tracking.system_metrics_interval_s`` as ``system/<node_id>/...`` when ``tracking.system_metrics`` is
      on, and copies them to :func:`~.sinks.system_metrics_jsonl_path`. ``local_rank`` and ``node_id``
      (``node<k>``) default to the launcher environment (:class:`mor_megatron.runtime.LaunchEnv`).
    * Everyone else gets a :class:`~.sinks.NullSink`.

    MLflow failures are reported once per process and retried every ``tracking.retry_after_s``; ``close``
    waits at most ``tracking.close_timeout_s`` for queued calls.
    """
    run_dir = Path(run_dir)
    tracking_uri = resolve_tracking_uri(tracking_cfg, run_dir)
    jsonl_path = sinks.metrics_jsonl_path(tracking_cfg, run_dir)
    # One reporter per process: the logging rank warns once for its run and its node's system metrics.
    fallback = (f"every metric is still written to {jsonl_path} (mor-track replay uploads it)"
                if is_logging_rank else "training metrics go to the logging rank, which keeps a JSONL copy")
    outage = (None if tracking_uri is None
              else TrackingOutage(tracking_uri, fallback, retry_after_s=tracking_cfg.retry_after_s))
    opened: list[sinks.MetricSink] = []
    run_id: str | None = resume_run_id
    if is_logging_rank:
        opened, run_id = _open_logging_rank(
            tracking_cfg, outage=outage, jsonl_path=jsonl_path, run_dir=run_dir, config_dict=config_dict,
            resume_run_id=resume_run_id, resume_step=resume_step)
    run_id = _share_run_id(run_id, is_logging_rank, group)
    if local_rank is None or node_id is None:
        launch = LaunchEnv.from_environ()
        local_rank = launch.local_rank if local_rank is None else local_rank
        node_id = node_id or f"node{launch.node_rank}"
    is_node_leader = local_rank == 0
    if outage is not None and run_id is not None and tracking_cfg.system_metrics and is_node_leader:
        opened.append(SystemMetricsSink(
            outage.tracking_uri, run_id, node_id=node_id, outage=outage,
            jsonl_path=sinks.system_metrics_jsonl_path(jsonl_path, node_id),
            interval_s=tracking_cfg.system_metrics_interval_s, resume=resume_run_id is not None,
            timeout_s=tracking_cfg.timeout_s, close_timeout_s=min(tracking_cfg.close_timeout_s, 10.0)))
    if not opened:
        return sinks.NullSink(), run_id
    return (opened[0] if len(opened) == 1 else sinks.FanOutSink(opened)), run_id
