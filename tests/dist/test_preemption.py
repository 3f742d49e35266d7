"""Stopping real torchrun jobs early (2 CPU workers, ``-m mor_megatron.pretrain``) and resuming them.

* SIGTERM sent to the workers mid-run, as Slurm sends it to its tasks: every worker stops after the same step,
  saves a checkpoint there, ends the run as KILLED (JSONL end record and MLflow status) and exits 0. Rerunning
  the command resumes and logs, with dropout 0.1 on, the values of a run that was never stopped, bit for bit.
* A torchrun agent killed with SIGKILL: its workers notice that their launcher is gone, stop after a step with
  a checkpoint and exit, instead of training on with nobody to collect them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.dist.mlflow_server import free_port
from tests.dist.pretrain_job import jsonl_metrics, pretrain_command, torchrun_agents, wait_all

pytestmark = [pytest.mark.dist, pytest.mark.timeout(420)]

STEPS = 12
"""Long enough that a signal sent after step 1 lands well before the end."""
# Startup (imports, data, model) dominates a job: ~10 s idle, a few times that on a loaded machine.
_JOB_TIMEOUT_S = 150
# Logged values that must not depend on the stop; perf/, mem/ and time/ keys measure the machine.
_EXACT_PREFIXES = ("train/", "optim/", "router/", "val/")


def _overrides(tiny_data, output_dir: Path, *extra: str) -> list[str]:
    """A tiny fp32 MoR-E job with dropout, every step logged, saving only when it stops or ends."""
    return [*tiny_data.overrides(), "train.seq_length=64", "train.global_batch_size=8", "train.micro_batch_size=2",
            "train.precision=fp32", f"train.train_steps={STEPS}", "train.log_interval=1",
            f"train.eval_interval={STEPS}", "train.eval_steps=1", "optim.warmup_steps=2",
            "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "checkpoint.save_interval=null",
            f"checkpoint.save_dir={output_dir / 'ckpt'}", "tracking.system_metrics=false",
            f"output_dir={output_dir}", *extra]


def _records(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_step(output_dir: Path, agent, step: int, timeout_s: float) -> None:
    """Poll the job's JSONL until ``step`` is logged (the agent must still run)."""
    deadline = time.monotonic() + timeout_s
    while not any(r["kind"] == "metrics" and r["step"] >= step for r in _records(output_dir)):
        assert agent.proc.poll() is None, agent.report()
        assert time.monotonic() < deadline, f"step {step} not logged within {timeout_s:g} s\n{agent.report()}"
        time.sleep(0.05)


def _workers(agent) -> list[psutil.Process]:
    return psutil.Process(agent.proc.pid).children()


def _run(tiny_data, output_dir: Path, tmp_path: Path, *extra: str) -> None:
    command = pretrain_command(master_port=free_port(), nproc_per_node=2,
                               overrides=_overrides(tiny_data, output_dir, *extra))
    with torchrun_agents([command], tmp_path / f"logs_{output_dir.name}") as agents:
        assert wait_all(agents, _JOB_TIMEOUT_S) == [0], agents[0].report()


def _mlflow_statuses(output_dir: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{output_dir / 'mlflow.db'}")
    return [run.info.status for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id])]


def test_sigterm_saves_the_agreed_step_exits_0_and_resumes_exactly_with_dropout(tiny_data, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _run(tiny_data, straight, tmp_path, "tracking.enabled=false", "checkpoint.save_dir=null")

    command = pretrain_command(master_port=free_port(), nproc_per_node=2, overrides=_overrides(tiny_data, stopped))
    with torchrun_agents([command], tmp_path / "logs_sigterm") as agents:
        _wait_for_step(stopped, agents[0], 1, _JOB_TIMEOUT_S)
        workers = _workers(agents[0])
        assert len(workers) == 2
        for worker in workers:  # what Slurm does to its tasks on preemption
            worker.send_signal(signal.SIGTERM)
        assert wait_all(agents, 60) == [0], agents[0].report()
    records = _records(stopped)
    stop_step = max(r["step"] for r in records if r["kind"] == "metrics")
    assert 1 <= stop_step < STEPS, agents[0].report()
    assert (stopped / "ckpt" / "latest").read_text().strip() == str(stop_step)
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "KILLED", records[-1]
    assert _mlflow_statuses(stopped) == ["KILLED"]

    _run(tiny_data, stopped, tmp_path)  # the same command again: resumes
    assert _mlflow_statuses(stopped) == ["FINISHED"]
    expected, resumed = jsonl_metrics(straight), jsonl_metrics(stopped)
    assert sorted(resumed) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        want = {k: v for k, v in expected[step].items() if k.startswith(_EXACT_PREFIXES)}
        got = {k: v for k, v in resumed[step].items() if k.startswith(_EXACT_PREFIXES)}
        assert got == want, f"step {step} (stopped after {stop_step})"


def test_workers_of_a_killed_launcher_stop_with_a_checkpoint(tiny_data, tmp_path):
    output_dir = tmp_path / "orphaned"
    command = pretrain_command(master_port=free_port(), nproc_per_node=2,
                               overrides=_overrides(tiny_data, output_dir, "train.train_steps=5000",
                                                    "tracking.enabled=false"))
    with torchrun_agents([command], tmp_path / "logs") as agents:
        _wait_for_step(output_dir, agents[0], 1, _JOB_TIMEOUT_S)
        workers = _workers(agents[0])
        assert len(workers) == 2
        os.kill(agents[0].proc.pid, signal.SIGKILL)  # the agent only: its workers live in their own sessions
        _, alive = psutil.wait_procs(workers, timeout=60)
        for worker in alive:  # in their own sessions: killing the agent's process group would not reach them
            worker.kill()
        assert not alive, f"workers {[p.pid for p in alive]} still trained 60 s later\n{agents[0].report()}"
    records = _records(output_dir)
    stop_step = max(r["step"] for r in records if r["kind"] == "metrics")
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "KILLED", agents[0].report()
    assert (output_dir / "ckpt" / "latest").read_text().strip() == str(stop_step)
