"""Experiment tracking: metric sinks (a JSONL file always, MLflow when enabled) and one MLflow run per job.

Contract with the training loop:

* Call :func:`start_tracking` once on **every** rank, after ``torch.distributed`` is initialised (it is a
  collective). It returns ``(sink, run_id)``. Store ``run_id`` with the checkpoint and pass it back as
  ``resume_run_id`` when the job resumes, so the resumed job continues the same MLflow run.
* Only the logging rank (one per job, e.g. the last pipeline stage) gets a sink that records training
  metrics: every call is appended to a JSONL file, then queued for MLflow. Each node's local rank 0 also
  samples system metrics into the same run as ``system/<node_id>/<name>``. Other ranks get a
  :class:`NullSink`.
* ``close(status=...)`` the sink in a ``finally`` (:data:`RunStatus`); it waits a bounded time for queued MLflow
  calls.

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
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch.distributed as dist
import yaml

from mor_megatron.runtime import LaunchEnv

if TYPE_CHECKING:
    from mor_megatron.config import TrackingConfig
    from mor_megatron.training.tracking_mlflow import TrackingOutage

_log = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
"""How a job ended, as MLflow names it: trained to the end, raised, or stopped early to be resumed."""

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

    def close(self, *, status: RunStatus = "FINISHED") -> None:
        """Flush within a bounded time and release resources; ``status`` says how the job ended."""


class NullSink:
    """Discards everything: the sink of ranks that neither log training metrics nor sample system metrics."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Discard."""

    def log_params(self, params: Mapping[str, str]) -> None:
        """Discard."""

    def log_artifact_text(self, name: str, text: str) -> None:
        """Discard."""

    def close(self, *, status: RunStatus = "FINISHED") -> None:
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

    def close(self, *, status: RunStatus = "FINISHED") -> None:
        """Close every sink, the last one first."""
        for sink in reversed(self.sinks):
            sink.close(status=status)


def _parse(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file, skipping lines that do not parse (a write cut off by a crash)."""
    with Path(path).open(encoding="utf-8") as lines:
        return [record for record in map(_parse, lines) if record]


def _drop_cut_off_line(path: Path) -> None:
    # A process killed mid-write leaves a line without its newline; appending to it would garble the next
    # record too, so it is cut off (it never parsed anyway).
    with path.open("rb+") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return
        file.seek(0)
        data = file.read()
        file.truncate(data.rfind(b"\n") + 1)


def _drop_steps_after(path: Path, resume_step: int) -> int | None:
    """Rewrite ``path`` without the metric records past ``resume_step`` of the run being resumed.

    The run being resumed starts at the last ``run`` record with ``start_step`` 0 (the whole file when there
    is none); records of earlier runs in the same file are kept. Dropped lines are appended to
    ``<name>.superseded`` beside the file, not lost. Returns the highest dropped step, or None.
    """
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = [_parse(line) for line in lines]
    chain_start = max((i for i, r in enumerate(records)
                       if r.get("kind") == "run" and r.get("start_step") == 0), default=0)
    dropped = [i for i, r in enumerate(records) if i >= chain_start and r.get("kind") == "metrics"
               and isinstance(r.get("step"), int) and r["step"] > resume_step]
    if not dropped:
        return None
    drop = set(dropped)
    with path.with_name(path.name + ".superseded").open("a", encoding="utf-8") as superseded:
        superseded.writelines(lines[i] for i in dropped)
    # Write a copy and rename it over the original: a crash leaves either the old or the new file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line for i, line in enumerate(lines) if i not in drop), encoding="utf-8")
    os.replace(tmp, path)
    return max(records[i]["step"] for i in dropped)


class JsonlSink:
    """Appends one JSON object per line and flushes after each, so a crash or a dead server loses nothing.

    Lines: ``{"kind": "run", "time", "run_id", "run_name", "experiment", "tracking_uri", "start_step"}`` when
    a job starts (``run_id`` null when MLflow is off or was unreachable), then
    ``{"kind": "params", "time", "params": {key: str}}``,
    ``{"kind": "metrics", "step": int, "time": unix_s, "metrics": {key: float}}`` and, on close,
    ``{"kind": "end", "time", "status"}`` with status ``FINISHED``, ``FAILED`` or ``KILLED``. Records belong to
    the run of the ``run`` record before them, which is what ``mor-track replay`` uploads.

    A resumed job (``resume_step`` given) appends to the same file after dropping the metric records past
    ``resume_step`` that the interrupted attempt wrote (see :func:`_drop_steps_after`), so every step is in
    the file once, with the values of the training that continues from the checkpoint; ``superseded_step``
    is the highest dropped step. Non-finite values are written as ``NaN``/``Infinity``, which Python's
    ``json`` reads back. Text artifacts go to ``<dir of the file>/artifacts/<name>``. A write error (disk
    full) is warned once and stops this sink.
    """

    def __init__(self, path: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.superseded_step: int | None = None
        if self.path.exists():
            _drop_cut_off_line(self.path)
            if resume_step is not None:
                self.superseded_step = _drop_steps_after(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")

    def last_step(self) -> int | None:
        """Highest step of the metric records in the file, or None (reads the file)."""
        steps = [r["step"] for r in read_jsonl(self.path) if r.get("kind") == "metrics"]
        return max(steps, default=None)

    def log_run(self, *, run_id: str | None, run_name: str | None, experiment: str | None,
                tracking_uri: str | None, start_step: int) -> None:
        """Append the ``run`` record that the following records belong to."""
        self._write({"kind": "run", "time": time.time(), "run_id": run_id, "run_name": run_name,
                     "experiment": experiment, "tracking_uri": tracking_uri, "start_step": int(start_step)})

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

    def close(self, *, status: RunStatus = "FINISHED") -> None:
        """Append the ``end`` line with ``status`` and close the file."""
        self._write({"kind": "end", "time": time.time(), "status": status})
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


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state() -> tuple[str, str]:
    """(commit, dirty) of the checkout this package runs from; dirty is "true", "false" or "unknown".

    Dirty means tracked files differ from the commit (untracked files are ignored: run folders, data)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return "unknown", "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, "unknown" if status is None else str(bool(status)).lower()


def default_run_name(config_dict: Mapping[str, Any]) -> str:
    """``<preset or output folder>-<UTC time>-<6 hex digits>``, e.g. ``360m-mor-e-r3-20260107-101500-3fa2c1``.

    The suffix comes from ``secrets`` (the OS), not from ``random``: the trainer seeds ``random`` with
    ``train.seed``, which made every run draw the same name from MLflow's generator.
    """
    stem = config_dict.get("preset") or Path(str(config_dict.get("output_dir") or "run")).name or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def source_tags(commit: str, dirty: str) -> dict[str, str]:
    """MLflow's source tags (shown in the UI's run header) plus whether the checkout had local changes."""
    return {"mlflow.source.name": sys.argv[0] or "python", "mlflow.source.type": "JOB",
            "mlflow.source.git.commit": commit, "mor.git_dirty": dirty}


def runtime_params(commit: str, dirty: str) -> dict[str, str]:
    """Job facts that are not in the config: world size, nodes, library versions, git commit and state."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    try:
        num_nodes = str(LaunchEnv.from_environ().num_nodes)
    except RuntimeError:  # a launcher variable that is not an integer; not worth failing the job over
        num_nodes = "unknown"
    return {
        "runtime.world_size": str(world_size),
        "runtime.num_nodes": num_nodes,
        "runtime.git_commit": commit,
        "runtime.git_dirty": dirty,
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


def metrics_jsonl_path(tracking_cfg: TrackingConfig, run_dir: str | Path) -> Path:
    """``tracking.jsonl_path``, else ``<run_dir>/metrics.jsonl``."""
    return Path(tracking_cfg.jsonl_path) if tracking_cfg.jsonl_path else Path(run_dir) / "metrics.jsonl"


SYSTEM_METRICS_DIR = "system_metrics"
"""Folder beside the metrics JSONL with one system-metrics copy per node."""


def system_metrics_jsonl_path(metrics_jsonl: Path, node_id: str) -> Path:
    """Where a node leader copies its system metrics: one file per node, so no two processes share a file."""
    return metrics_jsonl.parent / SYSTEM_METRICS_DIR / f"{node_id}.jsonl"


def _files_uploaded_at_close(metrics_jsonl: Path) -> list[tuple[Path, str | None]]:
    # (local file, artifact folder). MOR_STDOUT_LOG names the console log a launcher tees into, if any.
    files: list[tuple[Path, str | None]] = [(metrics_jsonl, None)]
    if os.environ.get("MOR_STDOUT_LOG"):
        files.append((Path(os.environ["MOR_STDOUT_LOG"]), "logs"))
    return files


def _open_logging_rank(tracking_cfg: TrackingConfig, *, tracking_uri: str | None, run_dir: Path,
                       config_dict: Mapping[str, Any], resume_run_id: str | None, resume_step: int,
                       retry_after_s: float,
                       close_timeout_s: float) -> tuple[list[MetricSink], str | None, TrackingOutage | None]:
    """The logging rank's sinks (MLflow first, so that closing in reverse writes the JSONL end record before
    the MLflow sink uploads the file), the run id and the outage reporter (None when MLflow is off)."""
    jsonl_path = metrics_jsonl_path(tracking_cfg, run_dir)
    jsonl = JsonlSink(jsonl_path, resume_step=resume_step if resume_step > 0 else None)
    commit, dirty = git_state()
    params = {**flatten_params(config_dict), **runtime_params(commit, dirty)}
    config_yaml = yaml.safe_dump(dict(config_dict), sort_keys=False)
    sinks: list[MetricSink] = []
    # Tracking off: the id from the checkpoint passes through, so a later job can still continue that run.
    run_id, run_name, outage = resume_run_id, tracking_cfg.run_name, None
    if tracking_uri is not None:
        from mor_megatron.training import tracking_mlflow

        outage = tracking_mlflow.TrackingOutage(
            tracking_uri, f"every metric is still written to {jsonl_path} (mor-track replay uploads it)",
            retry_after_s=retry_after_s)
        run_name = run_name or default_run_name(config_dict)
        spec = tracking_mlflow.RunSpec(name=run_name, tags=source_tags(commit, dirty), params=params,
                                       config_yaml=config_yaml,
                                       upload_at_close=_files_uploaded_at_close(jsonl_path),
                                       superseded_step=jsonl.superseded_step)
        mlflow_sink, run_id = tracking_mlflow.open_run(
            tracking_cfg, tracking_uri=tracking_uri, run_dir=run_dir, spec=spec, resume_run_id=resume_run_id,
            outage=outage, close_timeout_s=close_timeout_s)
        if mlflow_sink is not None:
            sinks.append(mlflow_sink)
    jsonl.log_run(run_id=run_id, run_name=run_name, experiment=tracking_cfg.experiment,
                  tracking_uri=tracking_uri, start_step=resume_step)
    jsonl.log_params(params)
    jsonl.log_artifact_text("config.yaml", config_yaml)
    sinks.append(jsonl)
    return sinks, run_id, outage


def start_tracking(tracking_cfg: TrackingConfig, *, run_dir: str | Path, config_dict: Mapping[str, Any],
                   resume_run_id: str | None, is_logging_rank: bool, resume_step: int = 0,
                   group: dist.ProcessGroup | None = None, local_rank: int | None = None,
                   node_id: str | None = None, system_metrics_interval_s: float = 10.0,
                   retry_after_s: float = 60.0,
                   close_timeout_s: float = 30.0) -> tuple[MetricSink, str | None]:
    """Open the job's tracking on this rank; returns ``(sink, run_id)``. Collective when distributed.

    * Logging rank (``is_logging_rank``, exactly one in ``group``): a :class:`JsonlSink` at
      :func:`metrics_jsonl_path` and, if ``tracking.enabled``, an MLflow run at :func:`resolve_tracking_uri`:
      created in ``tracking.experiment`` under ``tracking.run_name`` (default :func:`default_run_name`) with
      :func:`source_tags`, or continued when ``resume_run_id`` (stored with the checkpoint) is given. The
      flattened ``config_dict`` (the resolved config) and :func:`runtime_params` become params and its YAML
      an artifact (``config.yaml``; ``config_resume_<utc>.yaml`` on resume), in MLflow and in the JSONL
      copy; the JSONL file itself is uploaded at close.
    * ``resume_step`` (the checkpoint's step, 0 for a fresh start) keeps every step logged once: the JSONL
      drops what the interrupted attempt logged past it, and the MLflow sink skips the points the run
      already holds (:class:`~mor_megatron.training.tracking_mlflow.MlflowSink`).
    * Every rank learns the run id through one all-gather over ``group`` (when ``torch.distributed`` is
      initialised). It is None when the server was unreachable at a fresh start; with tracking off it is
      ``resume_run_id`` unchanged.
    * Each node leader (``local_rank`` 0) samples system metrics into the run every
      ``system_metrics_interval_s`` as ``system/<node_id>/...`` when ``tracking.system_metrics`` is on, and
      copies them to :func:`system_metrics_jsonl_path`. ``local_rank`` and ``node_id`` (``node<node_rank>``)
      default to the launcher environment (:class:`mor_megatron.runtime.LaunchEnv`).
    * Everyone else gets a :class:`NullSink`.

    MLflow failures are reported once per process and retried every ``retry_after_s``; ``close`` waits at
    most ``close_timeout_s`` for queued calls.
    """
    run_dir = Path(run_dir)
    tracking_uri = resolve_tracking_uri(tracking_cfg.tracking_uri, run_dir) if tracking_cfg.enabled else None
    sinks: list[MetricSink] = []
    run_id: str | None = resume_run_id
    outage = None
    if is_logging_rank:
        sinks, run_id, outage = _open_logging_rank(
            tracking_cfg, tracking_uri=tracking_uri, run_dir=run_dir, config_dict=config_dict,
            resume_run_id=resume_run_id, resume_step=resume_step, retry_after_s=retry_after_s,
            close_timeout_s=close_timeout_s)
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
            jsonl_path=system_metrics_jsonl_path(metrics_jsonl_path(tracking_cfg, run_dir), node_id),
            interval_s=system_metrics_interval_s, resume=resume_run_id is not None,
            timeout_s=tracking_cfg.timeout_s, close_timeout_s=min(close_timeout_s, 10.0)))
    if not sinks:
        return NullSink(), run_id
    return (sinks[0] if len(sinks) == 1 else FanOutSink(sinks)), run_id
