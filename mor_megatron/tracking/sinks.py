"""Metric sinks (JSONL copy, fan-out, null), where JSONL copies live, MLflow's key rules; no backend here."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from mor_megatron.config import TrackingConfig

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

    def log_artifact_bytes(self, name: str, data: bytes) -> None:
        """Store ``data`` as a file ``name`` (a relative path) with the run (images: depth-map PNGs)."""

    def close(self, *, status: RunStatus = "FINISHED", reason: str | None = None) -> None:
        """Flush within a bounded time and release resources; ``status`` says how the job ended and ``reason``
        why it failed (the error), if it did."""


class NullSink:
    """Discards everything: the sink of ranks that neither log training metrics nor sample system metrics."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Discard."""

    def log_params(self, params: Mapping[str, str]) -> None:
        """Discard."""

    def log_artifact_text(self, name: str, text: str) -> None:
        """Discard."""

    def log_artifact_bytes(self, name: str, data: bytes) -> None:
        """Discard."""

    def close(self, *, status: RunStatus = "FINISHED", reason: str | None = None) -> None:
        """Nothing to release."""


class FanOutSink:
    """Forwards every call to several sinks in order; closes them in reverse order (last opened first)."""

    def __init__(self, sinks: Sequence[MetricSink]) -> None:
        self.sinks = tuple(sinks)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, step)

    def log_params(self, params: Mapping[str, str]) -> None:
        for sink in self.sinks:
            sink.log_params(params)

    def log_artifact_text(self, name: str, text: str) -> None:
        for sink in self.sinks:
            sink.log_artifact_text(name, text)

    def log_artifact_bytes(self, name: str, data: bytes) -> None:
        for sink in self.sinks:
            sink.log_artifact_bytes(name, data)

    def close(self, *, status: RunStatus = "FINISHED", reason: str | None = None) -> None:
        for sink in reversed(self.sinks):
            sink.close(status=status, reason=reason)


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
    ``{"kind": "end", "time", "status"}`` with status ``FINISHED``, ``FAILED`` or ``KILLED`` (and the error as
    ``"reason"`` when it failed). Records belong to
    the run of the ``run`` record before them, which is what ``mor-track replay`` uploads.

    A resumed job (``resume_step`` given) appends to the same file after dropping the metric records past
    ``resume_step`` that the interrupted attempt wrote (see :func:`_drop_steps_after`), so every step is in
    the file once, with the values of the training that continues from the checkpoint; ``superseded_step``
    is the highest dropped step. Non-finite values are written as ``NaN``/``Infinity``, which Python's
    ``json`` reads back. Artifacts go to ``<dir of the file>/artifacts/<name>``. A write error (disk
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
        values = {check_metric_key(key): float(value) for key, value in metrics.items()}
        self._write({"kind": "metrics", "step": int(step), "time": time.time(), "metrics": values})

    def log_params(self, params: Mapping[str, str]) -> None:
        values = {str(key): str(value) for key, value in params.items()}
        self._write({"kind": "params", "time": time.time(), "params": values})

    def log_artifact_text(self, name: str, text: str) -> None:
        self.log_artifact_bytes(name, text.encode("utf-8"))

    def log_artifact_bytes(self, name: str, data: bytes) -> None:
        target = self.path.parent / "artifacts" / check_artifact_name(name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError as err:
            _log.warning("could not write artifact %s: %s: %s", target, type(err).__name__, err)

    def close(self, *, status: RunStatus = "FINISHED", reason: str | None = None) -> None:
        end = {"kind": "end", "time": time.time(), "status": status}
        self._write(end if reason is None else {**end, "reason": reason})
        if self._file is not None:
            self._file.close()
            self._file = None


def metrics_jsonl_path(tracking_cfg: TrackingConfig, run_dir: str | Path) -> Path:
    """``tracking.jsonl_path``, else ``<run_dir>/metrics.jsonl``."""
    return Path(tracking_cfg.jsonl_path) if tracking_cfg.jsonl_path else Path(run_dir) / "metrics.jsonl"


SYSTEM_METRICS_DIR = "system_metrics"
"""Folder beside the metrics JSONL with one system-metrics copy per node."""


def system_metrics_jsonl_path(metrics_jsonl: Path, node_id: str) -> Path:
    """Where a node leader copies its system metrics: one file per node, so no two processes share a file."""
    return metrics_jsonl.parent / SYSTEM_METRICS_DIR / f"{node_id}.jsonl"
