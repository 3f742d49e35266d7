"""Early stops (mor_megatron/training/stopping.py): signals only set a flag, every rank's flags are combined,
and exit interval / wall-time limit / dead launcher each name themselves. No process group: the all-reduce is
replaced by a function that plays the other ranks."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mor_megatron.config import ConfigError, TrainConfig
from mor_megatron.training.stopping import ExitSignals, LauncherWatch, StopConditions


def _conditions(train: TrainConfig, *, other_ranks: list[float] | None = None, signals: ExitSignals | None = None,
                launcher: LauncherWatch | None = None, started_s: float | None = None) -> StopConditions:
    """StopConditions whose all-reduce takes the maximum with ``other_ranks``' flags (default: all 0)."""
    others = other_ranks or [0.0, 0.0, 0.0]
    return StopConditions(train, agree_max=lambda flags: [max(a, b) for a, b in zip(flags, others)],
                          signals=signals or ExitSignals(signals=()), launcher=launcher or LauncherWatch({}),
                          started_s=time.monotonic() if started_s is None else started_s)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_is_recorded_not_fatal_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    signals = ExitSignals()
    try:
        os.kill(os.getpid(), sig)  # would end the process without the handler
        assert signals.received == sig
        assert _conditions(TrainConfig(), signals=signals).check(step=3) == "a rank received SIGTERM or SIGUSR1"
    finally:
        signals.restore()
    assert signal.getsignal(sig) == before


def test_a_flag_raised_on_another_rank_stops_this_one_too():
    assert _conditions(TrainConfig()).check(step=7) is None
    assert _conditions(TrainConfig(), other_ranks=[1.0, 0.0, 0.0]).check(step=7) == \
        "a rank received SIGTERM or SIGUSR1"
    assert _conditions(TrainConfig(), other_ranks=[0.0, 1.0, 0.0]).check(step=7) == "the launcher of a rank exited"


def test_exit_interval_stops_at_its_multiples_only():
    conditions = _conditions(TrainConfig(exit_interval=5))
    assert [step for step in range(1, 16) if conditions.check(step)] == [5, 10, 15]
    assert conditions.check(10) == "step 10 is a multiple of train.exit_interval=5"


def test_exit_duration_counts_wall_time_from_the_job_start():
    train = TrainConfig(exit_duration_mins=1.0)
    assert _conditions(train, started_s=time.monotonic() - 59).check(step=1) is None
    assert _conditions(train, started_s=time.monotonic() - 61).check(step=1) == \
        "the job ran longer than train.exit_duration_mins=1"


def test_only_workers_of_a_launcher_watch_their_parent():
    assert LauncherWatch({}).launcher_pid is None and not LauncherWatch({}).launcher_exited()
    watch = LauncherWatch({"LOCAL_RANK": "0"})
    assert watch.launcher_pid == os.getppid() and not watch.launcher_exited()
    watch.launcher_pid = os.getppid() + 1  # as if this process had been re-parented after its launcher died
    assert watch.launcher_exited()


@pytest.mark.parametrize("field,value,message", [
    ("exit_interval", 0, "train.exit_interval must be an integer >= 1"),
    ("exit_duration_mins", 0.0, "train.exit_duration_mins must be > 0"),
])
def test_exit_settings_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})
