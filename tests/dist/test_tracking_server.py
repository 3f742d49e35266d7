"""Tracking against a real ``mlflow server`` (started by tools/mlflow_server.sh) from 2 gloo ranks.

Each rank plays one node: it leads its node's system metrics with its own node id, and rank 0 is the
logging rank. The first test reads the one run back through ``MlflowClient``; the second kills the server
mid-run and checks that training still ends cleanly with every metric in the JSONL copy.
"""

from __future__ import annotations

import json
import logging
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
    from mor_megatron.training import metrics as m
    from mor_megatron.training.tracking import start_tracking

    collect = _Collect()
    for name in ("", "mlflow"):  # the mlflow logger does not propagate to the root logger
        logging.getLogger(name).addHandler(collect)
    cfg = TrackingConfig(tracking_uri=tracking_uri, experiment="dist-tracking", timeout_s=2.0)
    sink, run_id = start_tracking(cfg, run_dir=run_dir, config_dict=_CONFIG, resume_run_id=None,
                                  is_logging_rank=rank == 0, local_rank=0, node_id=f"node{rank}",
                                  system_metrics_interval_s=0.25, close_timeout_s=10.0)
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

    from mor_megatron.training import metrics as m

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
