"""Tracking against a real ``mlflow server`` (started by tools/mlflow_server.sh) from 2 gloo ranks.

Each rank plays one node: it leads its node's system metrics with its own node id, and rank 0 is the
logging rank. The first test reads the one run back through ``MlflowClient``; the second kills the server
mid-run and checks that training still ends cleanly with every metric in the JSONL copy; the third then
restarts the server and checks that ``mor-track replay`` completes the run: every JSONL point once, status
FINISHED, and a second replay adds nothing.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist.launch import run_ranks
from tests.dist.mlflow_server import MlflowServer, mlflow_server

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

_STEPS = 6
_CONFIG = {"model": {"hidden_size": 64, "num_layers": 4}, "train": {"train_steps": _STEPS}}


@pytest.fixture
def server(tmp_path):
    """A fresh ``mlflow server`` on a free loopback port; always stopped afterwards."""
    with mlflow_server(tmp_path / "server") as running:
        yield running


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _simulate_training(rank: int, world_size: int, *, tracking_uri: str, run_dir: str,
                       kill_server: MlflowServer | None = None, kill_after_step: int | None = None) -> dict:
    """A few fake training steps that go through the real tracking API; rank 0 logs, each rank is a node."""
    import torch
    import torch.distributed as dist

    from mor_megatron.config import TrackingConfig
    from mor_megatron.tracking import metrics as m
    from mor_megatron.tracking.start import start_tracking

    collect = _Collect()
    for name in ("", "mlflow"):  # the mlflow logger does not propagate to the root logger
        logging.getLogger(name).addHandler(collect)
    cfg = TrackingConfig(tracking_uri=tracking_uri, experiment="dist-tracking", timeout_s=2.0,
                         system_metrics_interval_s=0.25, close_timeout_s=10.0)
    sink, run_id = start_tracking(cfg, run_dir=run_dir, config_dict=_CONFIG, resume_run_id=None,
                                  is_logging_rank=rank == 0, local_rank=0, node_id=f"node{rank}")
    logged: dict[int, list[str]] = {}
    train_s = 0.0
    for step in range(1, _STEPS + 1):
        start = time.perf_counter()
        time.sleep(0.15)  # the step's work
        loss = torch.tensor([4.0 / step + rank])
        dist.all_reduce(loss)
        # The slowest rank sets the pace: the job's step time is the max over ranks.
        local_step_time = time.perf_counter() - start
        step_time = m.reduce_max_over({m.PERF_STEP_TIME_S: local_step_time})[m.PERF_STEP_TIME_S]
        assert step_time >= local_step_time
        train_s += step_time
        local_peaks = m.peak_memory_gib(torch.device("cpu"))
        memory = m.memory_metrics(local_peaks, node_rank=rank, num_nodes=world_size)
        if rank == 0:
            metrics = {m.TRAIN_LM_LOSS: loss.item() / world_size, m.OPTIM_LR: 1e-3, m.OPTIM_GRAD_NORM: 0.5,
                       m.TIME_TRAIN_S: train_s, "router/active_frac/r1": 1.0, **memory,
                       **m.throughput_metrics(step_time_s=step_time, tokens_per_step=1024,
                                              num_devices=world_size, training_flops_per_token=1e6)}
            if step % 2 == 0:
                metrics.update(m.validation_metrics(loss=3.0 / step, loss_causal=3.1 / step))
            sink.log_metrics(metrics, step)
            logged[step] = sorted(metrics)
        if rank == 0 and step == kill_after_step:
            kill_server.kill()
    close_start = time.monotonic()
    sink.close()
    return {"run_id": run_id, "warnings": collect.messages, "logged": logged,
            "close_s": time.monotonic() - close_start}


def _metric_lines(path: Path) -> dict[int, dict[str, float]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {line["step"]: line["metrics"] for line in lines if line["kind"] == "metrics"}


def test_one_run_with_metrics_and_system_metrics_per_node(server, tmp_path):
    from mlflow.tracking import MlflowClient

    from mor_megatron.tracking import metrics as m

    uri = server.uri
    results = run_ranks(_simulate_training, 2, tmp_path / "ranks", timeout_s=120, tracking_uri=uri,
                        run_dir=str(tmp_path / "run"))
    run_id = results[0]["run_id"]
    assert run_id is not None and results[1]["run_id"] == run_id
    assert results[0]["warnings"] == [] and results[1]["warnings"] == []

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dist-tracking")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == "64" and run.data.params["runtime.world_size"] == "2"
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]

    def steps(key):
        return [metric.step for metric in client.get_metric_history(run_id, key)]

    every = list(range(1, _STEPS + 1))
    for key in (m.TIME_TRAIN_S, m.PERF_STEP_TIME_S, m.PERF_TFLOPS_PER_DEVICE, m.MEM_PEAK_RSS_GIB,
                m.job_max_key(m.MEM_PEAK_RSS_GIB), m.node_key(m.MEM_PEAK_RSS_GIB, 0),
                m.node_key(m.MEM_PEAK_RSS_GIB, 1), m.TRAIN_LM_LOSS):
        assert steps(key) == every, key
    assert steps(m.VAL_LOSS) == steps(m.VAL_PPL_CAUSAL) == [2, 4, 6]
    for node in ("node0", "node1"):
        assert steps(f"system/{node}/cpu_utilization_percentage"), node
        assert f"system/{node}/system_memory_usage_megabytes" in run.data.metrics
    assert _metric_lines(tmp_path / "run" / "metrics.jsonl").keys() == set(every)


def test_server_killed_mid_run_training_finishes_with_jsonl_complete(server, tmp_path):
    uri = server.uri
    results = run_ranks(_simulate_training, 2, tmp_path / "ranks", timeout_s=120, tracking_uri=uri,
                        run_dir=str(tmp_path / "run"), kill_server=server,
                        kill_after_step=2)
    # run_ranks raises unless every rank exited with code 0.
    logged = results[0]["logged"]
    written = _metric_lines(tmp_path / "run" / "metrics.jsonl")
    assert sorted(written) == sorted(logged) == list(range(1, _STEPS + 1))
    assert all(sorted(written[step]) == logged[step] for step in logged)
    warnings = results[0]["warnings"]
    assert len(warnings) == 1, warnings
    assert uri in warnings[0] and str(tmp_path / "run" / "metrics.jsonl") in warnings[0]
    assert len(results[1]["warnings"]) <= 1  # the other node's system metrics: at most one warning
    assert results[0]["close_s"] < 10 and results[1]["close_s"] < 10


def _jsonl_points(run_dir: Path) -> dict[tuple[str, int], float]:
    """Every (key, step) -> value in the job's JSONL copies: the logging rank's and each node's system file."""
    files = [run_dir / "metrics.jsonl", *sorted((run_dir / "system_metrics").glob("*.jsonl"))]
    points = {}
    for path in files:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == "metrics":
                points.update({(key, record["step"]): value for key, value in record["metrics"].items()})
    return points


def _replay(run_dir: Path, uri: str) -> dict:
    """``mor-track replay`` as a user runs it: its own process, one JSON line on stdout."""
    command = [sys.executable, "-m", "mor_megatron.cli.track", "replay", str(run_dir), "--tracking-uri", uri]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["runs"][0]


# Two server starts, two gloo ranks and two replay processes: ~40 s idle; a loaded 2-core machine takes longer.
@pytest.mark.timeout(360)
def test_replay_after_an_outage_completes_the_run_once(server, tmp_path):
    from mlflow.tracking import MlflowClient

    from mor_megatron.tracking.replay import replay

    run_dir = tmp_path / "run"
    results = run_ranks(_simulate_training, 2, tmp_path / "ranks", timeout_s=120, tracking_uri=server.uri,
                        run_dir=str(run_dir), kill_server=server, kill_after_step=2)
    run_id = results[0]["run_id"]
    expected = _jsonl_points(run_dir)
    # The server comes back (same store, another port) holding only what arrived before it died.
    with mlflow_server(server.state_dir, keep_store=True) as restarted:
        client = MlflowClient(restarted.uri)

        def on_server() -> dict[tuple[str, int], list[float]]:
            held: dict[tuple[str, int], list[float]] = {}
            for key in {key for key, _ in expected}:
                for metric in client.get_metric_history(run_id, key):
                    held.setdefault((key, metric.step), []).append(metric.value)
            return held

        before = on_server()
        assert len(before) < len(expected) and client.get_run(run_id).info.status == "RUNNING"
        first = _replay(run_dir, restarted.uri)
        assert first["points_uploaded"] == len(expected) - len(before) and first["status_set"] == "FINISHED"
        after = on_server()
        assert after == {point: [value] for point, value in expected.items()}  # all of them, once each
        assert client.get_run(run_id).info.status == "FINISHED"
        (second,) = replay(run_dir / "metrics.jsonl", tracking_uri=restarted.uri)["runs"]
        assert second["points_uploaded"] == 0 and second["status_set"] is None
        assert on_server() == after
