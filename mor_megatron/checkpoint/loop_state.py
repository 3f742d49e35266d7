"""The training loop's own state, stored in every checkpoint of either backend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoopState:
    """Training-loop state that a resume must restore exactly."""

    step: int = 0
    consumed_samples: int = 0
    train_time_s: float = 0.0
    mlflow_run_id: str | None = None
