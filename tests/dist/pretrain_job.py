"""The real entry point under torchrun agents for end-to-end tests: ``torchrun -m mor_megatron.pretrain``.

:func:`pretrain_command` builds one agent's command line (static rendezvous on 127.0.0.1, so several agents
with ``nnodes > 1`` form one job on this machine); :func:`torchrun_agents` starts agents in their own process
groups with stdout/stderr in files and kills whatever is still running on exit, always.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def pretrain_command(*, master_port: int, overrides: Sequence[str], nproc_per_node: int = 1, nnodes: int = 1,
                     node_rank: int = 0, config: Path = DEMO_CONFIG) -> list[str]:
    """One torchrun agent running ``mor_megatron.pretrain --config config overrides...``."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--nproc-per-node", str(nproc_per_node), "--master-addr", "127.0.0.1",
            "--master-port", str(master_port),
            "-m", "mor_megatron.pretrain", "--config", str(config), *overrides]


def tiny_job_overrides(data_overrides: Sequence[str], *, output_dir: Path, tracking_uri: str,
                       train_steps: int, eval_interval: int, experiment: str) -> list[str]:
    """Overrides that shrink ``configs/demo.yaml`` to a seconds-long job on the tiny test corpus.

    Global batch 8 of 64-token sequences (one micro-batch of 4 per rank at 2 data-parallel ranks), logs every
    step, evaluates one batch every ``eval_interval`` steps, checkpoints at the end into ``output_dir/ckpt``
    and samples system metrics every second.
    """
    return [*data_overrides, f"train.train_steps={train_steps}", f"train.eval_interval={eval_interval}",
            "train.eval_steps=1", "train.log_interval=1", "train.seq_length=64", "train.global_batch_size=8",
            "optim.warmup_steps=2",
            f"tracking.tracking_uri={tracking_uri}", f"tracking.experiment={experiment}",
            "tracking.system_metrics_interval_s=1", f"output_dir={output_dir}",
            f"checkpoint.save_dir={output_dir / 'ckpt'}"]


@dataclass(frozen=True)
class Agent:
    """One started torchrun agent (the leader of its own process group) and its output files."""

    name: str
    proc: subprocess.Popen
    stdout: Path
    stderr: Path

    def kill(self) -> None:
        """SIGKILL the agent and its workers (one process group); workers left by a dead agent too."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def report(self, tail_chars: int = 6000) -> str:
        """Exit code plus the tails of stdout and stderr, for assertion messages."""
        out = self.stdout.read_text(errors="replace")[-tail_chars:]
        err = self.stderr.read_text(errors="replace")[-tail_chars:]
        return f"--- {self.name}: exit code {self.proc.poll()}\n--- stdout:\n{out}\n--- stderr:\n{err}"


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


@contextlib.contextmanager
def torchrun_agents(commands: Sequence[Sequence[str]], log_dir: Path) -> Iterator[list[Agent]]:
    """Start one agent per command (cwd = repo root, one compute thread, no inherited ``MLFLOW_*`` settings).

    Output goes to ``log_dir/agent<i>.out``/``.err``. Agents still running when the block exits are killed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    agents: list[Agent] = []
    try:
        for index, command in enumerate(commands):
            stdout, stderr = log_dir / f"agent{index}.out", log_dir / f"agent{index}.err"
            with stdout.open("wb") as out, stderr.open("wb") as err:
                proc = subprocess.Popen(list(command), cwd=REPO, env=_environment(), stdout=out, stderr=err,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            agents.append(Agent(f"agent{index}", proc, stdout, stderr))
        yield agents
    finally:
        for agent in agents:
            agent.kill()


def wait_all(agents: Sequence[Agent], timeout_s: float) -> list[int]:
    """Exit codes of all agents; raises AssertionError with their output if one runs past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for agent in agents:
        try:
            agent.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in agents:
                other.kill()
            raise AssertionError(f"pretraining still running after {timeout_s:g} s:\n"
                                 + "\n".join(a.report() for a in agents)) from None
    return [agent.proc.returncode for agent in agents]


def jsonl_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """The metric records of ``output_dir/metrics.jsonl`` (every run that wrote there) merged per step."""
    merged: dict[int, dict[str, float]] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "metrics":
            merged.setdefault(record["step"], {}).update(record["metrics"])
    return merged
