"""MLflow side of tracking: an async run sink, per-node system metrics, and creating or resuming the run.

A dead or missing tracking server never stops training: every MLflow call runs in a background thread with
short HTTP timeouts and one retry (:func:`configure_mlflow_http`); the first failure is reported once
(``logging`` WARNING) naming the tracking URI and where the data still is (the JSONL copy); later calls are
dropped until ``retry_after_s`` has passed, then tried again, so a restarted server picks the run up again.
MLflow itself (the library: imports are absolute) is imported inside the functions, so importing this
module is cheap. It builds on :mod:`.sinks`, which never imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mor_megatron.tracking.sinks import (
    MAX_PARAM_VALUE_LENGTH,
    JsonlSink,
    NullSink,
    RunStatus,
    check_artifact_name,
    check_metric_key,
)

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput
    from mlflow.tracking import MlflowClient

    from mor_megatron.config import TrackingConfig

_log = logging.getLogger(__name__)

# MLflow 3.17 request limits (mlflow/utils/validation.py).
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
TAG_CHARS = 5000  # the shortest tag-value limit of the supported MLflow versions

FAILURE_TAG = "mor.failure"
"""Run tag holding the error that ended a FAILED run (its type and message)."""

_SINK_THREAD = "mor-mlflow-sink"
_SYSTEM_THREAD = "mor-system-metrics"


def configure_mlflow_http(timeout_s: float) -> None:
    """Make a dead server cost seconds, not minutes (MLflow's defaults: 120 s timeout, 7 retries, ~4 min).

    Sets ``MLFLOW_HTTP_REQUEST_TIMEOUT`` from ``tracking.timeout_s`` (MLflow reads it as whole seconds), and,
    unless already set in the environment, one retry with a 1 s backoff factor. MLflow reads these on every
    request, so calling this before the first request is enough.
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")


def _tracking_errors() -> tuple[type[BaseException], ...]:
    # What an unreachable, slow or refusing backend raises: MLflow wraps HTTP and SQL errors in
    # MlflowException; artifact uploads and local stores can raise requests/OS errors directly.
    import requests
    from mlflow.exceptions import MlflowException
    return (MlflowException, requests.RequestException, OSError)


def _shorten(text: str, limit: int = 400) -> str:
    # Keep both ends: MLflow puts the URL first and the cause ("Connection refused") last.
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


_QUIET = threading.local()


def _drop_retry_chatter(record: logging.LogRecord) -> bool:
    """Log filter: drops urllib3's per-attempt "Retrying ..." warnings in tracking calls (we report once)."""
    return not getattr(_QUIET, "active", False)


@contextlib.contextmanager
def _quiet_http_retries() -> Iterator[None]:
    logging.getLogger("urllib3.connectionpool").addFilter(_drop_retry_chatter)  # adds it once only
    previous = getattr(_QUIET, "active", False)
    _QUIET.active = True
    try:
        yield
    finally:
        _QUIET.active = previous


class TrackingOutage:
    """Reports the first MLflow failure of a process as one WARNING; later ones go to DEBUG.

    ``fallback`` says where the data still is, e.g. "every metric is still in /run/metrics.jsonl".
    One instance is shared by the sinks of a process, so rank 0 warns once for the run and its system metrics.
    """

    def __init__(self, tracking_uri: str, fallback: str, *, retry_after_s: float = 60.0) -> None:
        self.tracking_uri = tracking_uri
        self.fallback = fallback
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self.reported = False

    def report(self, action: str, error: BaseException | str) -> None:
        """Record a failure while doing ``action`` (e.g. "logging metrics at step 10")."""
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {_shorten((str(error).splitlines() or [''])[0])}"
        with self._lock:
            first, self.reported = not self.reported, True
        if first:
            _log.warning(
                "MLflow tracking at %s failed while %s (%s). Training continues: %s. MLflow calls are "
                "skipped and retried every %g s; this warning is not repeated.",
                self.tracking_uri, action, error, self.fallback, self.retry_after_s)
        else:
            _log.debug("MLflow tracking at %s failed again while %s (%s)", self.tracking_uri, action, error)


@dataclass(frozen=True)
class _Call:
    what: str
    run: Callable[[], None]


@dataclass(frozen=True)
class _Finish:
    status: str
    reason: str | None


@dataclass(frozen=True)
class LoggedSteps:
    """What a resumed run already holds, so that no (key, step) is logged twice (MLflow cannot delete one).

    ``latest_step`` maps a key to the highest step the server has for it (read when the run was resumed);
    a step at or below it is skipped. ``unknown_through`` bounds keys the server could not be asked about
    (it was down at resume): steps up to it may be on the server already, so they are skipped too and
    ``mor-track replay`` fills whatever was really missing from the JSONL copy.
    """

    latest_step: Mapping[str, int]
    unknown_through: int | None

    def is_new(self, key: str, step: int) -> bool:
        """Whether ``key`` at ``step`` may be logged without duplicating a point of the run."""
        bound = self.latest_step.get(key, self.unknown_through)
        return bound is None or step > bound


@dataclass(frozen=True)
class RunSpec:
    """What the logging rank puts on a run it opens: name and tags (new runs only), params, config YAML,
    files uploaded when it closes (local path, artifact folder or None), the JSONL's ``superseded_step``."""

    name: str
    tags: Mapping[str, str]
    params: Mapping[str, str]
    config_yaml: str
    upload_at_close: Sequence[tuple[Path, str | None]]
    superseded_step: int | None


class MlflowSink:
    """Logs to one existing MLflow run from a background thread, so the training loop never waits on HTTP.

    Calls are queued (at most ``queue_size``; when full, calls are dropped and reported once). On a tracking
    error the sink reports once through ``outage`` and drops calls for ``outage.retry_after_s`` seconds, then
    tries again: cheaper than retrying each call against a dead server, and unlike giving up for good it picks
    a restarted server up again; the JSONL copy has everything in between. Metric timestamps are taken when
    :meth:`log_metrics` is called, not when the queue is drained; points that ``logged`` says a resumed run
    already holds are not sent. ``close`` uploads the ``upload_at_close`` files (local path, artifact folder
    or None for the root), waits at most ``close_timeout_s`` and, when ``end_run`` is set, ends the run with
    the status it is given (FINISHED, FAILED or KILLED).
    """

    def __init__(self, tracking_uri: str, run_id: str, *, outage: TrackingOutage, timeout_s: float = 5.0,
                 queue_size: int = 10_000, close_timeout_s: float = 30.0, end_run: bool = True,
                 logged: LoggedSteps | None = None,
                 upload_at_close: Sequence[tuple[Path, str | None]] = ()) -> None:
        configure_mlflow_http(timeout_s)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric_cls, self._param_cls = Metric, Param
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri)
        self._outage = outage
        self._errors = _tracking_errors()
        self._close_timeout_s = close_timeout_s
        self._end_run = end_run
        self._logged = logged or LoggedSteps({}, None)
        self._upload_at_close = tuple(upload_at_close)
        self._queue: queue.Queue[_Call | _Finish] = queue.Queue(maxsize=queue_size)
        self._paused_until = 0.0
        self._dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=_SINK_THREAD, daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; never blocks."""
        timestamp_ms = int(time.time() * 1000)
        entries = [self._metric_cls(check_metric_key(key), float(value), timestamp_ms, int(step))
                   for key, value in metrics.items() if self._logged.is_new(key, int(step))]
        for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
            chunk = entries[start:start + MAX_METRICS_PER_BATCH]
            self._submit(_Call(f"logging metrics at step {step}",
                               lambda chunk=chunk: self._client.log_batch(self.run_id, metrics=chunk)))

    def log_params(self, params: Mapping[str, str]) -> None:
        """Queue params (values cut to MLflow's 6000 characters, 100 per request)."""
        entries = [self._param_cls(check_metric_key(key), str(value)[:MAX_PARAM_VALUE_LENGTH])
                   for key, value in params.items()]
        for start in range(0, len(entries), MAX_PARAMS_PER_BATCH):
            chunk = entries[start:start + MAX_PARAMS_PER_BATCH]
            self._submit(_Call("logging params",
                               lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk)))

    def log_artifact_text(self, name: str, text: str) -> None:
        name = check_artifact_name(name)
        self._submit(_Call(f"uploading artifact {name}",
                           lambda: self._client.log_text(self.run_id, text, name)))

    def log_artifact_bytes(self, name: str, data: bytes) -> None:
        name = check_artifact_name(name)
        self._submit(_Call(f"uploading artifact {name}", lambda: self._upload_bytes(name, data)))

    def log_dataset_inputs(self, datasets: Sequence[DatasetInput]) -> None:
        """Queue dataset inputs (what the run trained on; MLflow keeps one per name and digest)."""
        if datasets:
            self._submit(_Call("logging dataset inputs",
                               lambda: self._client.log_inputs(self.run_id, datasets=list(datasets))))

    def _upload_bytes(self, name: str, data: bytes) -> None:
        # MLflow uploads files by their own name: write one named like the artifact into a scratch folder.
        folder, _, filename = name.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="mor-artifact-") as scratch:
            path = Path(scratch) / filename
            path.write_bytes(data)
            self._client.log_artifact(self.run_id, str(path), folder or None)

    def close(self, *, status: RunStatus = "FINISHED", reason: str | None = None) -> None:
        """Send what is queued (bounded by ``close_timeout_s``), then end the run with ``status`` if this sink
        owns it, with ``reason`` as the tag :data:`FAILURE_TAG`."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._close_timeout_s
        # A full queue means the worker is stuck behind it; the join below gives up at the deadline.
        with contextlib.suppress(queue.Full):
            self._queue.put(_Finish(status, reason), timeout=self._close_timeout_s)
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._outage.report("closing", f"{self._queue.qsize()} queued calls were not sent within "
                                           f"{self._close_timeout_s:g} s")

    def _submit(self, call: _Call) -> None:
        if self._closed:
            raise RuntimeError("MlflowSink is closed; log before calling close()")
        try:
            self._queue.put_nowait(call)
        except queue.Full:
            self._outage.report(call.what, f"the queue of {self._queue.maxsize} calls is full: the server is "
                                           "slower than training")

    def _work(self) -> None:
        with _quiet_http_retries():
            while True:
                item = self._queue.get()
                if isinstance(item, _Finish):
                    self._upload_files()
                    if self._end_run:
                        status = item.status
                        if item.reason is not None:
                            tag = _Call("tagging the failure", lambda: self._client.set_tag(
                                self.run_id, FAILURE_TAG, item.reason[:TAG_CHARS]))
                            self._send(tag, force=True)
                        # Tried even while paused: it is one call, and it keeps a run from staying RUNNING.
                        end = _Call("ending the run",
                                    lambda: self._client.set_terminated(self.run_id, status))
                        self._send(end, force=True)
                    return
                self._send(item)

    def _upload_files(self) -> None:
        for path, folder in self._upload_at_close:
            if path.is_file():
                self._send(_Call(f"uploading {path}", lambda path=path, folder=folder:
                                 self._client.log_artifact(self.run_id, str(path), folder)))

    def _send(self, call: _Call, *, force: bool = False) -> None:
        if not force and time.monotonic() < self._paused_until:
            self._dropped += 1
            return
        try:
            call.run()
        except self._errors as err:
            if getattr(err, "error_code", None) == "INVALID_PARAMETER_VALUE":
                # The server is fine; this call was wrong (e.g. a param changed value). Skip only it.
                _log.warning("MLflow refused %s: %s", call.what, _shorten((str(err).splitlines() or [""])[0]))
                return
            self._outage.report(call.what, err)
            self._paused_until = time.monotonic() + self._outage.retry_after_s
            self._dropped += 1
            return
        except Exception as err:  # noqa: BLE001
            # Anything else is an MLflow or client bug. It must not kill this thread: the queue would fill
            # and close() would wait out its timeout. Report it like an outage, without pausing.
            self._outage.report(f"{call.what} (unexpected error)", err)
            return
        if self._dropped:
            _log.info("MLflow at %s answers again; %d calls made while it failed were skipped (%s)",
                      self._outage.tracking_uri, self._dropped, self._outage.fallback)
            self._dropped = 0


class SystemMetricsSink(NullSink):
    """Samples this node's CPU, memory, disk, network (and NVIDIA GPUs when pynvml is installed) into a run.

    Keys are MLflow's ``system/<node_id>/<name>``, e.g. ``system/node1/cpu_utilization_percentage``. Training
    metrics sent to this sink are discarded (it runs on node leaders, not on the logging rank). Uses MLflow's
    ``SystemMetricsMonitor`` for sampling, aggregation and the ``system/<node_id>/`` prefix, but drives it
    from our own thread: MLflow's loop asks the server for the run before every sample, stops for good at the
    first error with its own warning, and its ``finish()`` joins without a time limit. Here an error is
    reported once through ``outage``, publishing pauses for ``outage.retry_after_s``, and ``close`` is
    bounded. Every sample is also appended to ``jsonl_path`` (a :class:`JsonlSink` file of this node, with a
    ``run`` record naming ``run_id``) at the step it has in MLflow, also while MLflow is unreachable; steps
    continue after the highest one in that file or on the server, so a resumed job never reuses one.
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``/``_SAMPLES_BEFORE_LOGGING``/``_NODE_ID`` override the
    arguments, as in MLflow.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, node_id: str, outage: TrackingOutage,
                 jsonl_path: Path, interval_s: float = 10.0, resume: bool = False, timeout_s: float = 5.0,
                 close_timeout_s: float = 10.0) -> None:
        configure_mlflow_http(timeout_s)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._outage = outage
        self._errors = _tracking_errors()
        self._close_timeout_s = close_timeout_s
        self._paused_until = 0.0
        self._stop = threading.Event()
        with _quiet_http_retries():
            # resume_logging asks the server for the last system-metrics step, so steps continue on resume.
            self._monitor = SystemMetricsMonitor(
                run_id, sampling_interval=interval_s, samples_before_logging=1, resume_logging=resume,
                node_id=node_id, tracking_uri=tracking_uri)
        self.node_id = self._monitor.node_id
        self._jsonl = JsonlSink(jsonl_path)
        last_copied = self._jsonl.last_step()
        if last_copied is not None:
            # The server may have missed the last samples (or was down when asked): the copy decides too.
            self._monitor._logging_step = max(self._monitor._logging_step, last_copied + 1)
        self._jsonl.log_run(run_id=run_id, run_name=None, experiment=None, tracking_uri=tracking_uri,
                            start_step=self._monitor._logging_step)
        self._thread = threading.Thread(target=self._sample_loop, name=_SYSTEM_THREAD, daemon=True)
        self._thread.start()

    def close(self, *, status: RunStatus = "FINISHED", reason: str | None = None) -> None:
        """Publish the last partial sample and stop sampling, waiting at most ``close_timeout_s``."""
        self._stop.set()
        self._thread.join(timeout=self._close_timeout_s)
        self._jsonl.close(status=status, reason=reason)

    def _sample_loop(self) -> None:
        with _quiet_http_retries():
            samples = 0
            while True:
                try:
                    self._monitor.collect_metrics()
                except Exception as err:  # noqa: BLE001
                    # psutil, pynvml and the ROCm library raise their own error types with no common base;
                    # a sampler that breaks ends sampling on this node, never the training process.
                    self._outage.report(f"sampling system metrics of node {self.node_id}", err)
                    return
                samples += 1
                stopping = self._stop.wait(self._monitor.sampling_interval)
                if stopping or samples >= self._monitor.samples_before_logging:
                    self._publish()
                    samples = 0
                if stopping:
                    return

    def _publish(self) -> None:
        metrics = self._monitor.aggregate_metrics()
        step = self._monitor._logging_step
        prefix = f"system/{self.node_id}/" if self.node_id else "system/"  # as MLflow's publish_metrics
        self._jsonl.log_metrics({prefix + key: value for key, value in metrics.items()}, step)
        if time.monotonic() >= self._paused_until:
            try:
                self._monitor.publish_metrics(metrics)
                # record_metrics batches by a time heuristic; flush so nothing waits for the next sample.
                self._monitor.mlflow_logger.flush()
                return
            except self._errors as err:
                self._outage.report(f"logging system metrics of node {self.node_id}", err)
                self._paused_until = time.monotonic() + self._outage.retry_after_s
        # The JSONL copy has this step; the next sample must not reuse it (publish_metrics did not advance).
        self._monitor._logging_step = step + 1
        # Dropped (paused or failed): clear the samples and the batch so they do not pile up while down.
        self._monitor.mlflow_logger.data = []
        for monitor in self._monitor.monitors:
            monitor.clear_metrics()


# ----------------------------------------------------------------------------------------------------------
# Creating or resuming the run (logging rank only).
# ----------------------------------------------------------------------------------------------------------

def _experiment_id(client: MlflowClient, name: str, tracking_uri: str, run_dir: Path) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local DB would put artifacts in ./mlruns under the CWD; keep them with the run instead. A server
    # chooses its own artifact store.
    remote = tracking_uri.startswith(("http://", "https://", "databricks"))
    location = None if remote else (run_dir / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it just now
            raise
        return client.get_experiment_by_name(name).experiment_id


@dataclass(frozen=True)
class _OpenedRun:
    run_id: str
    params: dict[str, str] | None
    """Params already on a resumed run; None for a new run."""
    latest_step: dict[str, int]
    """Highest step per metric key already on a resumed run; empty for a new run."""


def _create_or_resume(client: MlflowClient, cfg: TrackingConfig, *, tracking_uri: str, run_dir: Path,
                      spec: RunSpec, resume_run_id: str | None) -> _OpenedRun:
    """Create the run (named and tagged from ``spec``) or resume it by id; the run is left RUNNING."""
    from mlflow.exceptions import MlflowException

    tags = {**spec.tags, "mor.run_dir": str(run_dir.resolve())}
    if resume_run_id is not None:
        try:
            run = client.get_run(resume_run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            _log.warning("MLflow run %s from the checkpoint does not exist at %s; starting a new run",
                         resume_run_id, tracking_uri)
            tags["mor.resumed_from_missing_run"] = resume_run_id
        else:
            client.update_run(resume_run_id, status="RUNNING")
            # The run's latest value per key carries its step: one request, where reading every metric's
            # history would fetch the whole run. MLflow's own SystemMetricsMonitor reads it the same way.
            latest = {metric.key: metric.step for metric in run.data._metric_objs}
            return _OpenedRun(resume_run_id, dict(run.data.params), latest)
    experiment_id = _experiment_id(client, cfg.experiment, tracking_uri, run_dir)
    # An explicit name: MLflow's generated names come from `random`, which training seeds identically.
    run = client.create_run(experiment_id, run_name=spec.name, tags=tags)
    return _OpenedRun(run.info.run_id, None, {})


def open_run(cfg: TrackingConfig, *, tracking_uri: str, run_dir: Path, spec: RunSpec,
             resume_run_id: str | None, outage: TrackingOutage) -> tuple[MlflowSink | None, str | None]:
    """Logging rank: create (or resume by id) the run and queue ``spec.params`` and the config YAML artifact.

    Returns the sink and the run id. Unreachable at a fresh start: reported through ``outage``, (None, None).
    Unreachable at resume: the sink keeps ``resume_run_id`` and retries later, so the id survives into the
    next checkpoint; it skips steps up to ``spec.superseded_step`` (:class:`LoggedSteps`). A resume id
    unknown to the server starts a new run, tagged ``mor.resumed_from_missing_run``.
    """
    configure_mlflow_http(cfg.timeout_s)
    from mlflow.tracking import MlflowClient

    opened: _OpenedRun | None = None
    try:
        with _quiet_http_retries():
            opened = _create_or_resume(MlflowClient(tracking_uri), cfg, tracking_uri=tracking_uri,
                                       run_dir=run_dir, spec=spec, resume_run_id=resume_run_id)
    except _tracking_errors() as err:
        outage.report("starting the run", err)
        if resume_run_id is None:
            return None, None
    # Unreachable at resume: keep the id, so the next checkpoint still points at the run; retried later.
    run_id = opened.run_id if opened is not None else resume_run_id
    logged = (LoggedSteps(opened.latest_step, None) if opened is not None
              else LoggedSteps({}, spec.superseded_step))
    sink = MlflowSink(tracking_uri, run_id, outage=outage, timeout_s=cfg.timeout_s, logged=logged,
                      close_timeout_s=cfg.close_timeout_s, upload_at_close=spec.upload_at_close)
    if resume_run_id is None or run_id != resume_run_id:
        sink.log_params(spec.params)
        sink.log_artifact_text("config.yaml", spec.config_yaml)
        return sink, run_id
    # MLflow params are immutable: a resumed run keeps its values; new keys are added and the config this
    # job actually ran with is stored beside the original.
    if opened is not None:
        existing = opened.params or {}
        sink.log_params({k: v for k, v in spec.params.items() if k not in existing})
        changed = sorted(k for k, v in spec.params.items() if k in existing and existing[k] != v)
        if changed:
            _log.info("resumed MLflow run %s keeps its original params; changed on resume: %s", run_id,
                      ", ".join(changed))
    sink.log_artifact_text(f"config_resume_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.yaml",
                           spec.config_yaml)
    return sink, run_id


# ----------------------------------------------------------------------------------------------------------
# Linking a Hugging Face export to the run that trained it (mor-convert to-hf).
# ----------------------------------------------------------------------------------------------------------

EXPORT_TAG = "mor.hf_export"
"""Run tag naming the folder of the run's latest Hugging Face export (absolute path)."""


def link_export(tracking_uri: str, run_id: str, *, export_dir: Path, record: Mapping[str, object],
                timeout_s: float = 5.0) -> str | None:
    """Tag run ``run_id`` with :data:`EXPORT_TAG` = ``export_dir`` and upload ``record`` as
    ``exports/<folder name>.json``. Best effort, waits at most about ``3 * timeout_s``: returns None once
    linked, else why not (the export itself is done either way)."""
    configure_mlflow_http(timeout_s)
    from mlflow.tracking import MlflowClient

    errors = _tracking_errors()
    outcome: list[str | None] = []

    def link() -> None:
        try:
            with _quiet_http_retries():
                client = MlflowClient(tracking_uri)
                client.set_tag(run_id, EXPORT_TAG, str(export_dir))
                client.log_text(run_id, json.dumps(dict(record), indent=1) + "\n",
                                f"exports/{export_dir.name}.json")
            outcome.append(None)
        except errors as err:
            outcome.append(f"{type(err).__name__}: {_shorten((str(err).splitlines() or [''])[0])}")

    # A thread, so that a server that accepts connections and never answers cannot hold the export.
    thread = threading.Thread(target=link, name="mor-export-link", daemon=True)
    thread.start()
    thread.join(timeout=3 * timeout_s)
    return outcome[0] if outcome else f"no answer from {tracking_uri} within {3 * timeout_s:g} s"
