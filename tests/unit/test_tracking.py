"""Tracking sinks and metric helpers: key rules, JSONL content, fan-out, MLflow on a local sqlite store,
and an unreachable server that must cost one warning and nothing else."""

from __future__ import annotations

import json
import logging
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mor_megatron.config import TrackingConfig
from mor_megatron.tracking import metrics as m
from mor_megatron.tracking.mlflow import MlflowSink, TrackingOutage
from mor_megatron.tracking.run_info import flatten_params
from mor_megatron.tracking.sinks import FanOutSink, JsonlSink, MetricSink, NullSink, check_metric_key
from mor_megatron.tracking.start import resolve_tracking_uri, start_tracking

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
               "MLFLOW_SYSTEM_METRICS_NODE_ID", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
_CONFIG = {"model": {"hidden_size": 64, "num_layers": 4}, "recursion": {"capacities": [1.0, 0.5]},
           "checkpoint": {"save_dir": None}, "output_dir": "runs/x"}


@pytest.fixture(autouse=True)
def _isolated_mlflow_env(monkeypatch):
    """The sinks set MLflow's HTTP variables in os.environ; monkeypatch restores the originals afterwards."""
    for name in _MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in ("LOCAL_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    """One sqlite store for the module: creating its tables takes a second or two."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _closed_port_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens: connection refused


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class _Recorder(NullSink):
    def __init__(self, name, events):
        self.name, self.events = name, events

    def log_metrics(self, metrics, step):
        self.events.append((self.name, "metrics", dict(metrics), step))

    def log_params(self, params):
        self.events.append((self.name, "params", dict(params)))

    def log_artifact_text(self, name, text):
        self.events.append((self.name, "artifact", name, text))

    def close(self, *, status="FINISHED", reason=None):
        self.events.append((self.name, "close", status, reason))


# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [*m.STATIC_KEYS, m.node_key(m.MEM_PEAK_RSS_GIB, 3),
                                 m.job_max_key(m.MEM_PEAK_RESERVED_GIB), "router/active_frac/r2",
                                 "system/node1/cpu_utilization_percentage", "a b-c_d.e/f"])
def test_emitted_keys_are_mlflow_legal(key):
    assert check_metric_key(key) == key


@pytest.mark.parametrize("key", ["mem/peak (GiB)", "a//b", "/a", "a/", "a:b", "", "x" * 251, "a/./b",
                                 "a/../b", ".", "..a", "überall"])
def test_illegal_keys_are_refused(key):
    with pytest.raises(ValueError, match="not MLflow-legal"):
        check_metric_key(key)


def test_memory_and_node_key_helpers():
    assert m.node_key(m.MEM_PEAK_ALLOCATED_GIB, 1) == "mem/node1/peak_allocated_gib"
    assert m.job_max_key(m.MEM_PEAK_RSS_GIB) == "mem/job_max_peak_rss_gib"
    local = m.peak_memory_gib(torch.device("cpu"))
    assert set(local) == {m.MEM_PEAK_RSS_GIB} and 0 < local[m.MEM_PEAK_RSS_GIB] < 1024
    out = m.memory_metrics(local, node_rank=0, num_nodes=1)
    rss = local[m.MEM_PEAK_RSS_GIB]
    assert out[m.job_max_key(m.MEM_PEAK_RSS_GIB)] == out[m.node_key(m.MEM_PEAK_RSS_GIB, 0)] == rss
    assert m.reduce_max_over({"a": 2.0}) == {"a": 2.0}
    with pytest.raises(ValueError, match="node_rank"):
        m.memory_metrics(local, node_rank=2, num_nodes=2)


def test_throughput_mfu_and_validation_metrics():
    peak = m.peak_flops_per_device("NVIDIA H100 80GB HBM3")
    out = m.throughput_metrics(step_time_s=2.0, tokens_per_step=8192, num_devices=4,
                               training_flops_per_token=6e9, peak_flops=peak)
    assert out[m.PERF_TOKENS_PER_S] == 4096 and out[m.PERF_TOKENS_PER_S_PER_DEVICE] == 1024
    assert out[m.PERF_TFLOPS_PER_DEVICE] == pytest.approx(6e9 * 1024 / 1e12)
    assert out[m.PERF_MFU] == pytest.approx(6e9 * 1024 / 989.4e12)
    cpu = m.throughput_metrics(step_time_s=1.0, tokens_per_step=10, num_devices=1,
                               training_flops_per_token=1.0, peak_flops=m.peak_flops_per_device(None))
    assert m.PERF_MFU not in cpu and m.PERF_TFLOPS_PER_DEVICE in cpu
    assert m.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert m.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert m.peak_flops_per_device("Intel Xeon") is None
    val = m.validation_metrics(loss=math.log(20.0), loss_causal=2000.0)
    assert val[m.VAL_PPL] == pytest.approx(20.0) and val[m.VAL_PPL_CAUSAL] == math.inf
    with pytest.raises(ValueError, match="seconds"):
        m.tokens_per_second(10, 0.0)


def test_jsonl_sink_writes_one_flushed_object_per_line_and_appends(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log_params({"model.hidden_size": "64"})
    sink.log_metrics({m.TRAIN_LM_LOSS: 3.5, m.PERF_STEP_TIME_S: 0.25}, step=1)
    # Flushed already, before close.
    assert _read_jsonl(path)[-1]["metrics"] == {m.TRAIN_LM_LOSS: 3.5, m.PERF_STEP_TIME_S: 0.25}
    sink.log_metrics({m.TRAIN_LM_LOSS: float("nan")}, step=2)
    sink.log_artifact_text("config.yaml", "model: {}\n")
    with pytest.raises(ValueError, match="not MLflow-legal"):
        sink.log_metrics({"mem/peak (GiB)": 1.0}, step=3)
    sink.close(status="FAILED", reason="RuntimeError: Timed out waiting 60000ms for recv")
    JsonlSink(path).close()  # a resumed job appends
    JsonlSink(path).close(status="KILLED")  # stopped early (SIGTERM, train.exit_interval), to be resumed
    lines = _read_jsonl(path)
    assert [line["kind"] for line in lines] == ["params", "metrics", "metrics", "end", "end", "end"]
    assert lines[1]["step"] == 1 and isinstance(lines[1]["time"], float)
    assert math.isnan(lines[2]["metrics"][m.TRAIN_LM_LOSS])
    assert [line["status"] for line in lines[3:]] == ["FAILED", "FINISHED", "KILLED"]
    assert [line.get("reason") for line in lines[3:]] == ["RuntimeError: Timed out waiting 60000ms for recv",
                                                          None, None]
    assert (tmp_path / "run" / "artifacts" / "config.yaml").read_text() == "model: {}\n"
    with pytest.raises(ValueError, match="relative path"):
        JsonlSink(tmp_path / "other.jsonl").log_artifact_text("../escape.txt", "x")


def test_fan_out_forwards_in_order_and_closes_in_reverse():
    events: list = []
    sink = FanOutSink([_Recorder("a", events), _Recorder("b", events)])
    assert isinstance(sink, MetricSink)
    sink.log_metrics({"x": 1.0}, 5)
    sink.log_params({"p": "1"})
    sink.log_artifact_text("f.txt", "t")
    sink.close(status="FAILED", reason="why")
    assert [(e[0], e[1]) for e in events] == [
        ("a", "metrics"), ("b", "metrics"), ("a", "params"), ("b", "params"),
        ("a", "artifact"), ("b", "artifact"), ("b", "close"), ("a", "close")]
    assert events[-1] == ("a", "close", "FAILED", "why")


@pytest.mark.parametrize(("module", "forbidden"), [
    ("sinks", ("mlflow", "mor_megatron.tracking.mlflow")),
    ("metrics", ("mlflow", "mor_megatron.tracking.mlflow")),
    ("start", ("mlflow",)),  # the backend imports the library lazily: tracking off needs no MLflow
])
def test_tracking_imports_run_one_way(module, forbidden):
    """``tracking.mlflow`` builds on the sinks and the key table, never the reverse (a fresh interpreter)."""
    code = (f"import sys, mor_megatron.tracking.{module}; "
            f"loaded = set({forbidden!r}) & set(sys.modules); assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tracking_uri_precedence_and_params_flattening(tmp_path, monkeypatch):
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:////x.db"), tmp_path) == "sqlite:////x.db"
    assert resolve_tracking_uri(TrackingConfig(enabled=False, tracking_uri="sqlite:////x.db"), tmp_path) is None
    params = flatten_params({**_CONFIG, "long": "y" * 7000})
    assert params["model.hidden_size"] == "64" and params["recursion.capacities"] == "[1.0, 0.5]"
    assert params["checkpoint.save_dir"] == "null" and params["output_dir"] == "runs/x"
    assert len(params["long"]) == 6000


def test_disabled_tracking_keeps_jsonl_on_the_logging_rank_only(tmp_path):
    cfg = TrackingConfig(enabled=False)
    sink, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=_CONFIG, resume_run_id=None,
                                  is_logging_rank=True)
    assert run_id is None and isinstance(sink, JsonlSink)
    sink.log_metrics({m.TRAIN_LM_LOSS: 1.0}, 1)
    sink.close()
    run, params, metrics, end = _read_jsonl(tmp_path / "metrics.jsonl")
    assert run["kind"] == "run" and run["run_id"] is None and run["start_step"] == 0
    assert params["params"]["model.hidden_size"] == "64" and "runtime.torch" in params["params"]
    assert params["params"]["runtime.git_dirty"] in ("true", "false", "unknown")
    assert metrics["metrics"] == {m.TRAIN_LM_LOSS: 1.0} and end["kind"] == "end"
    assert "hidden_size: 64" in (tmp_path / "artifacts" / "config.yaml").read_text()
    other, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=_CONFIG, resume_run_id="abc",
                                   is_logging_rank=False)
    assert type(other) is NullSink and run_id == "abc"  # the checkpoint keeps pointing at its run


def test_mlflow_sink_on_sqlite_is_readable_through_the_client(sqlite_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri)
    experiment_id = client.create_experiment("sink-test", artifact_location=tmp_path.as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    sink = MlflowSink(sqlite_uri, run_id, outage=TrackingOutage(sqlite_uri, "unused"))
    sink.log_params({"model.hidden_size": "64"})
    for step in (1, 2, 3):
        sink.log_metrics({m.TRAIN_LM_LOSS: 4.0 - step, m.TIME_TRAIN_S: float(step)}, step)
    sink.log_artifact_text("notes/hello.txt", "hello")
    sink.log_artifact_bytes("notes/depth.png", b"\x89PNG\x00\xff")
    sink.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.hidden_size": "64"}
    history = client.get_metric_history(run_id, m.TRAIN_LM_LOSS)
    assert [(h.step, h.value) for h in history] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/depth.png", "notes/hello.txt"]
    png = Path(client.download_artifacts(run_id, "notes/depth.png", str(tmp_path)))
    assert png.read_bytes() == b"\x89PNG\x00\xff"


def test_a_failed_run_carries_its_reason(sqlite_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from mor_megatron.tracking.mlflow import FAILURE_TAG

    client = MlflowClient(sqlite_uri)
    run_id = client.create_run(client.create_experiment("failed", artifact_location=tmp_path.as_uri())).info.run_id
    sink = MlflowSink(sqlite_uri, run_id, outage=TrackingOutage(sqlite_uri, "unused"))
    sink.close(status="FAILED", reason="RuntimeError: Connection reset by peer" + "!" * 9000)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[FAILURE_TAG] == ("RuntimeError: Connection reset by peer" + "!" * 9000)[:5000]


def test_start_tracking_logs_the_training_blend_as_a_dataset_input(tmp_path, sqlite_uri, caplog):
    from mlflow.tracking import MlflowClient

    prefix = tmp_path / "corpus_text_document"
    for suffix, size in ((".bin", 40), (".idx", 12)):
        Path(f"{prefix}{suffix}").write_bytes(b"x" * size)
    Path(f"{prefix}.meta.json").write_text(json.dumps({"tokenizer_sha256": "ab12", "num_documents": 3,
                                                       "num_tokens": 20}))
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="dataset-test", system_metrics=False)
    config = {**_CONFIG, "data": {"blend": ["1.0", str(prefix)], "split": "98,2,0"}}
    sink, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=config, resume_run_id=None,
                                  is_logging_rank=True)
    sink.close()
    (logged,) = MlflowClient(sqlite_uri).get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == "corpus_text_document" and len(logged.dataset.digest) == 16
    assert [(tag.key, tag.value) for tag in logged.tags] == [("mlflow.data.context", "training")]
    profile = json.loads(logged.dataset.profile)
    assert profile["num_tokens"] == 20 and profile["split"] == "98,2,0"
    assert profile["prefixes"] == [{"prefix": str(prefix.resolve()), "bin_bytes": 40, "idx_bytes": 12,
                                    "tokenizer_sha256": "ab12", "num_documents": 3, "num_tokens": 20,
                                    "weight": 1.0}]

    # A blend that cannot be described is a warning, not a failed start.
    bad = {**_CONFIG, "data": {"blend": ["0.5"]}}
    with caplog.at_level(logging.WARNING):
        sink, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=bad, resume_run_id=None,
                                      is_logging_rank=True)
        sink.close()
    assert MlflowClient(sqlite_uri).get_run(run_id).inputs.dataset_inputs == []
    assert "dataset inputs are not logged" in caplog.text


def test_start_tracking_creates_then_resumes_one_run_with_node_system_metrics(tmp_path, sqlite_uri):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="start-test", run_name="unit",
                         system_metrics_interval_s=0.2)
    sink, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=_CONFIG, resume_run_id=None,
                                  is_logging_rank=True)
    sink.log_metrics({m.TRAIN_LM_LOSS: 2.0}, 1)
    time.sleep(0.5)
    sink.close(status="KILLED")  # preempted: the run waits for its resume
    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.run_name == "unit"
    assert run.data.params["model.hidden_size"] == "64" and run.data.params["runtime.world_size"] == "1"
    assert "system/node0/cpu_utilization_percentage" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml", "metrics.jsonl"]
    assert run.data.tags["mlflow.source.type"] == "JOB" and run.data.tags["mor.git_dirty"] in ("true", "false")

    changed = {**_CONFIG, "output_dir": "runs/y"}
    sink, resumed_id = start_tracking(cfg, run_dir=tmp_path, config_dict=changed, resume_run_id=run_id,
                                      is_logging_rank=True)
    assert resumed_id == run_id and client.get_run(run_id).info.status == "RUNNING"
    sink.log_metrics({m.TRAIN_LM_LOSS: 1.5}, 2)
    sink.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["output_dir"] == "runs/x"  # params are immutable
    assert [h.step for h in client.get_metric_history(run_id, m.TRAIN_LM_LOSS)] == [1, 2]
    assert any(a.path.startswith("config_resume_") for a in client.list_artifacts(run_id))
    assert len(client.search_runs([run.info.experiment_id])) == 1
    steps = [line["step"] for line in _read_jsonl(tmp_path / "metrics.jsonl") if line["kind"] == "metrics"]
    assert steps == [1, 2]


def test_unreachable_server_warns_once_and_never_blocks(tmp_path, caplog):
    uri = _closed_port_uri()
    jsonl = tmp_path / "metrics.jsonl"
    sink = MlflowSink(uri, "0" * 32, outage=TrackingOutage(uri, f"every metric is still written to {jsonl}"),
                      close_timeout_s=5.0)
    with caplog.at_level(logging.WARNING):
        start = time.monotonic()
        for step in range(200):
            sink.log_metrics({m.TRAIN_LM_LOSS: 1.0, m.PERF_STEP_TIME_S: 0.1}, step)
        assert time.monotonic() - start < 1.0  # queued, never waits on the network
        sink.close()
        assert time.monotonic() - start < 6.0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert uri in warnings[0].getMessage() and str(jsonl) in warnings[0].getMessage()


def test_start_tracking_with_unreachable_server_trains_on_jsonl(tmp_path, caplog):
    cfg = TrackingConfig(tracking_uri=_closed_port_uri(), timeout_s=1.0, system_metrics_interval_s=0.1,
                         close_timeout_s=5.0)
    with caplog.at_level(logging.WARNING):
        start = time.monotonic()
        sink, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=_CONFIG, resume_run_id=None,
                                      is_logging_rank=True)
        assert run_id is None
        sink.log_metrics({m.TRAIN_LM_LOSS: 1.0}, 1)
        sink.close()
        # A resumed job keeps its run id so the next checkpoint still points at the run.
        sink, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=_CONFIG, resume_run_id="abc123",
                                      is_logging_rank=True)
        assert run_id == "abc123"
        sink.log_metrics({m.TRAIN_LM_LOSS: 0.5}, 2)
        sink.close()
        assert time.monotonic() - start < 15.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all(cfg.tracking_uri in w for w in warnings), warnings  # one per start
    steps = [line["step"] for line in _read_jsonl(tmp_path / "metrics.jsonl") if line["kind"] == "metrics"]
    assert steps == [1, 2]


def test_mlflow_sink_pauses_after_a_failure_then_picks_the_server_up_again(sqlite_uri, tmp_path, monkeypatch,
                                                                             caplog):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri)
    experiment_id = client.create_experiment("flaky", artifact_location=tmp_path.as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    real_log_batch = MlflowClient.log_batch
    failures = iter([True])

    def flaky_log_batch(self, *args, **kwargs):
        if next(failures, False):
            raise MlflowException("API request failed: Connection refused")
        return real_log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky_log_batch)
    outage = TrackingOutage(sqlite_uri, "the JSONL has it", retry_after_s=0.5)
    sink = MlflowSink(sqlite_uri, run_id, outage=outage)
    with caplog.at_level(logging.INFO, logger="mor_megatron"):
        sink.log_metrics({"x": 1.0}, 1)  # fails: reported, MLflow paused for 0.5 s
        sink.log_metrics({"x": 2.0}, 2)  # skipped while paused
        time.sleep(1.0)
        sink.log_metrics({"x": 3.0}, 3)  # the server is back
        sink.log_params({"p": "1"})
        sink.log_params({"p": "2"})  # refused by MLflow (params are immutable): skipped alone, no pause
        sink.log_metrics({"x": 4.0}, 4)
        sink.close()
    assert [h.step for h in client.get_metric_history(run_id, "x")] == [3, 4]
    assert client.get_run(run_id).data.params == {"p": "1"}
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("mor_megatron")]
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO, logging.WARNING], messages
    assert "Connection refused" in messages[0][1] and "2 calls" in messages[1][1]
    assert messages[2][1].startswith("MLflow refused logging params")
