"""A preempted training job for resume tests: the engine stops the loop right after a checkpoint."""

from __future__ import annotations


class Preempted(Exception):
    """Raised where a preempted job would have been killed."""


class PreemptedAfter:
    """Engine whose job is killed right after its step-``steps`` checkpoint, before the next step starts."""

    def __init__(self, engine, steps: int):
        self._engine = engine
        self._steps_left = steps

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def train_step(self, batches):
        """The wrapped engine's step, or :class:`Preempted` once ``steps`` steps are done."""
        if self._steps_left == 0:
            raise Preempted
        self._steps_left -= 1
        return self._engine.train_step(batches)
