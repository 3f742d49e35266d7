"""The small protocol between the training loop and a training backend (Megatron-core or DeepSpeed).

The loop (:mod:`mor_megatron.training.trainer`) owns the cadence: data position, logging, evaluation,
checkpoint intervals, tracking. An engine owns everything that differs between backends: how the model is
wrapped, how one optimizer step over a global batch runs, how a forward-only pass runs, how the whole state
is saved and restored, and what it holds until :meth:`Engine.close`.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch

from mor_megatron.model.gpt import MoRGPTModel
from mor_megatron.checkpoint.loop_state import LoopState

Batches = Iterator[dict[str, torch.Tensor]]


class Engine(Protocol):
    """A built training backend on this rank (model, optimizer and schedule already constructed)."""

    @property
    def model(self) -> MoRGPTModel:
        """The unwrapped MoR model (router statistics, aux-loss scale, loss-free bias updates)."""

    @property
    def is_logging_rank(self) -> bool:
        """Exactly one rank of the job: the one that holds the loss and writes metrics."""

    def held_parameters(self) -> tuple[int, int]:
        """``tracking.metrics.held_parameters`` of this rank's model slice, full sizes however it is partitioned."""

    @property
    def model_runs_alone(self) -> bool:
        """Whether ``model`` can run a forward by itself (ZeRO-3's partitioned parameters cannot)."""

    def run_artifacts(self) -> dict[str, str]:
        """Text files the backend adds to the run's artifacts (name -> content), e.g. its resolved config."""

    def train_step(self, batches: Batches) -> dict[str, float]:
        """One optimizer step over a global batch drawn from ``batches``.

        Returns ``train/lm_loss`` (mean over micro-batches and data-parallel ranks), ``optim/grad_norm`` and
        ``optim/lr``, identical on every rank.
        """

    def eval_loss(self, batches: Batches, *, num_batches: int, routing_mode: str) -> float:
        """Mean LM loss over ``num_batches`` global batches, forward only, identical on every rank."""

    def save(self, step: int, loop: LoopState, config_dict: dict[str, Any]) -> str:
        """Write and publish the checkpoint of ``step``; returns its path."""

    def resume(self) -> LoopState | None:
        """Load the latest checkpoint if there is one; its loop state, else None."""

    def close(self) -> None:
        """Release what the backend holds beyond its Python objects (hooks, helper processes); called once."""
