"""Stopping a training job before ``train.train_steps`` so that rerunning the same command resumes it.

Megatron-LM's exit semantics (``--exit-signal-handler``, ``--exit-interval``, ``--exit-duration-in-mins``): a
job stops after a step when

* a rank received SIGTERM (what Slurm sends on preemption, cancellation and at the time limit) or SIGUSR1 (the
  early warning of ``sbatch --signal``): the handler only records the signal, the loop reads it after the step;
* the launcher that started this worker (torchrun's agent, the DeepSpeed launcher) is gone, e.g. killed with
  SIGKILL: its workers would otherwise train on with nobody to collect them;
* the step is a multiple of ``train.exit_interval``;
* the job has run longer than ``train.exit_duration_mins``.

Signals, a dead launcher and the wall time are seen by some ranks only, so every rank contributes its flags to
one all-reduce (MAX) after each step and all ranks stop after the same step. The trainer then saves a
checkpoint at that step, ends tracking with status KILLED and returns normally (exit status 0).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType

import torch
import torch.distributed as dist

from mor_megatron.config import TrainConfig

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that stop training at the end of the current step instead of killing the process."""


class ExitSignals:
    """Records :data:`STOP_SIGNALS` instead of dying; :meth:`restore` puts the previous handlers back.

    The handler only sets a flag: a signal can arrive inside a collective or a checkpoint write, where
    anything more than that would leave the ranks disagreeing about what was done.
    """

    def __init__(self, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        # signal.signal only works in the main thread, which is where every entry point runs the loop.
        self._previous = {sig: signal.signal(sig, self._record) for sig in signals}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def restore(self) -> None:
        """Reinstall the handlers that were there before (idempotent)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class LauncherWatch:
    """Tells whether the launcher process that started this worker has exited.

    torchrun and the DeepSpeed launcher start their workers as children and set ``LOCAL_RANK``; when such a
    launcher dies (SIGKILL, OOM killer), its workers are re-parented and :meth:`launcher_exited` turns true. A
    process started without a launcher (a lone ``python -m``, an ``srun`` task) is not watched: it may outlive
    its shell on purpose (``nohup``).
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.launcher_pid = os.getppid() if "LOCAL_RANK" in environ else None

    def launcher_exited(self) -> bool:
        """True once this process has a parent other than its launcher (one cheap system call)."""
        return self.launcher_pid is not None and os.getppid() != self.launcher_pid


AgreeMax = Callable[[list[float]], list[float]]
"""Element-wise maximum of a list of values (stop flags, step times) over every rank of the job (a collective)."""


def world_max(device: torch.device) -> AgreeMax:
    """:data:`AgreeMax` over the default process group, as one all-reduce on ``device``."""

    def agree(flags: list[float]) -> list[float]:
        # float64: the trainer also agrees on step times with it, which float32 would round
        tensor = torch.tensor(flags, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    return agree


class StopConditions:
    """Decides after each step, identically on every rank, whether the job stops early and why.

    Args:
        train: ``exit_interval`` and ``exit_duration_mins`` come from here.
        agree_max: the all-reduce that makes every rank see the flags of all (:func:`world_max`).
        signals: where stop signals are recorded.
        launcher: watches the launcher of this worker.
        started_s: ``time.monotonic()`` when the job started; the wall-time limit counts from it.
    """

    def __init__(self, train: TrainConfig, *, agree_max: AgreeMax, signals: ExitSignals, launcher: LauncherWatch,
                 started_s: float) -> None:
        self.exit_interval = train.exit_interval
        self.exit_duration_s = None if train.exit_duration_mins is None else train.exit_duration_mins * 60.0
        self.agree_max = agree_max
        self.signals = signals
        self.launcher = launcher
        self.started_s = started_s

    def check(self, step: int) -> str | None:
        """Why the job stops after ``step`` (the same text on every rank), or None to go on. Collective."""
        over_time = self.exit_duration_s is not None and time.monotonic() - self.started_s > self.exit_duration_s
        local = [float(self.signals.received is not None), float(self.launcher.launcher_exited()), float(over_time)]
        signalled, orphaned, timed_out = (flag > 0 for flag in self.agree_max(local))
        if signalled:
            return "a rank received SIGTERM or SIGUSR1"
        if orphaned:
            return "the launcher of a rank exited"
        if timed_out:
            return f"the job ran longer than train.exit_duration_mins={self.exit_duration_s / 60:g}"
        if self.exit_interval is not None and step % self.exit_interval == 0:
            return f"step {step} is a multiple of train.exit_interval={self.exit_interval}"
        return None
