"""Forward-step and loss functions for megatron-core's pipeline schedules.

``forward_step(data_iterator, model)`` returns the model output and a loss function, which is the contract
of ``get_forward_backward_func()``; the schedules divide the returned loss by the number of micro-batches and
run backward. Loss is the mean over the tokens of the micro-batch whose ``loss_mask`` is set.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch
from torch import Tensor

from mor_megatron.model.routing import RoutingMode

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def move_batch(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The tensors the model needs, on ``device``."""
    return {key: batch[key].to(device, non_blocking=True) for key in BATCH_KEYS}


def masked_mean_loss(loss_mask: Tensor, per_token_loss: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss function for the schedules: masked mean of ``per_token_loss`` ``[b, s]``.

    Returns the loss and a dict with a detached *copy* (the schedules divide the loss in place).
    """
    mask = loss_mask.to(per_token_loss.dtype)
    loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)
    # Non-finite losses are detected after the step, on every rank at once (Trainer.train_step), so that no
    # rank raises alone while the others wait in a collective.
    return loss, {"lm_loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[dict[str, Tensor]] | None, model, *, device: torch.device,
                 routing_mode: RoutingMode = "topk") -> tuple[Tensor, Callable]:
    """One micro-batch through ``model``; see the module docstring for the contract.

    ``data_iterator`` is None for pipeline chunks that need no data (neither the first nor the last stage):
    their input arrives from the previous stage.
    """
    if data_iterator is None:
        return model(None, None, None, routing_mode=routing_mode), _no_loss
    batch = move_batch(next(data_iterator), device)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   routing_mode=routing_mode)
    return output, functools.partial(masked_mean_loss, batch["loss_mask"])


def _no_loss(output: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    raise RuntimeError("a pipeline chunk without data reached the loss; the data iterators are miswired")
