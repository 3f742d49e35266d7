"""Real torchrun jobs on one save_dir: a second job refuses to start, and kill -9 during a save leaves no process.

Job A (one worker) trains a tiny model and checkpoints after every step. While it runs, job B is started with
the same ``checkpoint.save_dir``: it must stop at startup, naming A's worker (host, pid, start time). Then A's
worker is killed with SIGKILL during a save: with megatron-core 0.16, while its forked checkpoint writers run
(they are stopped first, so that they cannot finish on their own); with 0.19, whose writers are threads, once
the spawned manager server of their results queue exists. Every child of the worker must be gone within
seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from tests.dist.mlflow_server import free_port
from tests.dist.pretrain_job import pretrain_command, torchrun_agents, wait_all

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

_STARTUP_S = 90
_GONE_WITHIN_S = 15


def _overrides(tiny_data, save_dir: Path, output_dir: Path) -> list[str]:
    # Width 512: checkpoints of ~80 MB keep megatron's forked writers alive ~0.1 s, long enough to be caught; the
    # tiny default's writers finish in ~10 ms on an idle machine.
    return [*tiny_data.overrides(), "model.hidden_size=512", "train.train_steps=100000", "train.seq_length=64",
            "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_steps=0", "train.log_interval=1",
            "optim.warmup_steps=1", "tracking.enabled=false", "checkpoint.save_interval=1", "checkpoint.keep_last=1",
            f"checkpoint.save_dir={save_dir}", f"output_dir={output_dir}"]


def _wait_for(condition, timeout_s: float, what: str, agent):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if agent.proc.poll() is not None:
            raise AssertionError(f"job ended while waiting for {what}:\n{agent.report()}")
        time.sleep(0.01)
    raise AssertionError(f"no {what} after {timeout_s} s:\n{agent.report()}")


def _worker(agent) -> psutil.Process | None:
    """The agent's training worker (torchrun starts it as a child running mor_megatron.pretrain)."""
    for child in psutil.Process(agent.proc.pid).children():
        try:
            if "mor_megatron.pretrain" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _forked_writers(worker: psutil.Process) -> list[psutil.Process]:
    """Children of the worker that are forks of it (megatron's checkpoint writers), not helper programs."""
    try:
        command = worker.cmdline()
        return [child for child in worker.children() if child.cmdline() == command]
    except psutil.NoSuchProcess:
        return []


def _writers_past_their_start(worker: psutil.Process) -> list[psutil.Process]:
    """Writers still running a moment after they were seen: by then each has run its fork hooks, which run in
    the child right after the fork (a writer stopped before them would test the stop, not the hooks)."""
    writers = _forked_writers(worker)
    if not writers:
        return []
    time.sleep(0.02)
    return [writer for writer in writers if _alive(writer)]


def _spawned_helpers(worker: psutil.Process) -> list[psutil.Process]:
    """Children of the worker that are not forks of it: megatron's results-queue manager server. Not
    multiprocessing's resource tracker, which exits by itself once the processes holding its pipe are gone
    (stopped, it never could)."""
    try:
        command = worker.cmdline()
        return [child for child in worker.children()
                if child.cmdline() != command and not any("resource_tracker" in part for part in child.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _megatron_forks_writers() -> bool:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return hasattr(filesystem_async.FileSystemWriterAsync, "write_preloaded_data_multiproc")


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def scenario(tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("save_dir_jobs")
    save_dir = root / "ckpt"
    job_a = pretrain_command(master_port=free_port(), overrides=_overrides(tiny_data, save_dir, root / "a"))
    job_b = pretrain_command(master_port=free_port(), overrides=_overrides(tiny_data, save_dir, root / "b"))
    result = {}
    with torchrun_agents([job_a], root / "logs_a") as (agent_a,):
        worker = _wait_for(lambda: _worker(agent_a), _STARTUP_S, "training worker", agent_a)
        _wait_for(lambda: (save_dir / ".save_dir.lock").is_file(), _STARTUP_S, "save_dir lock", agent_a)
        result["worker_pid"] = worker.pid
        with torchrun_agents([job_b], root / "logs_b") as (agent_b,):
            result["b_exit_codes"] = wait_all([agent_b], timeout_s=_STARTUP_S)
            result["b_stdout"] = agent_b.stdout.read_text(errors="replace")
            result["b_stderr"] = agent_b.stderr.read_text(errors="replace")
            result["b_report"] = agent_b.report()

        if _megatron_forks_writers():
            writers = _wait_for(lambda: _writers_past_their_start(worker), _STARTUP_S, "checkpoint writer",
                                agent_a)
        else:
            writers = _wait_for(lambda: _spawned_helpers(worker), _STARTUP_S, "checkpoint manager server", agent_a)
        for writer in writers:
            os.kill(writer.pid, signal.SIGSTOP)
        children = worker.children()
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + _GONE_WITHIN_S
        while any(_alive(child) for child in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        result["writers"] = [writer.pid for writer in writers]
        result["left_alive"] = [child.pid for child in children if _alive(child)]
        for child in children:  # never leave a stopped writer behind, even when the test fails
            if _alive(child):
                os.kill(child.pid, signal.SIGKILL)
        result["a_report"] = agent_a.report()
    return result


def test_a_second_job_on_the_same_save_dir_refuses_naming_the_holder(scenario):
    # The worker exits 2 with one line; torchrun then reports the failed worker (exitcode 2) and exits 1.
    assert scenario["b_exit_codes"] != [0] and "exitcode  : 2" in scenario["b_stderr"], scenario["b_report"]
    expected = (f"is in use by another job (host {socket.gethostname()}, pid {scenario['worker_pid']}, "
                "started ")
    (line,) = [line for line in scenario["b_stderr"].splitlines() if line.startswith("mor-pretrain: error: ")]
    worker_output = scenario["b_stderr"].split("failed (exitcode")[0]  # before torchrun's own report
    assert expected in line and "Traceback" not in worker_output, scenario["b_report"]
    assert " iteration " not in scenario["b_stdout"], scenario["b_report"]  # refused before it trained


def test_kill_9_during_a_save_leaves_no_writer_process(scenario):
    assert scenario["writers"], scenario["a_report"]
    assert scenario["left_alive"] == [], scenario["a_report"]
