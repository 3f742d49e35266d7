"""One training step, shared by both engines: micro-batch count, loss, forward step, the step's result.

``forward_step(data_iterator, model)`` returns the model output and a loss function, which is the contract
of megatron-core's ``get_forward_backward_func()``; the schedules divide the returned loss by the number of
micro-batches and run backward. Loss is the mean over the tokens of the micro-batch whose ``loss_mask`` is set.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from mor_megatron.config import JobConfig
from mor_megatron.model.routing import RoutingMode
from mor_megatron.tracking import metrics as M

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
OPTIONAL_BATCH_KEYS = ("attention_mask",)
"""Present when the data asks for it: the ``[b, 1, s, s]`` document mask of ``data.reset_attention_mask``."""


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


def resolve_params_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and this is where tests run)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def num_microbatches(config: JobConfig, data_parallel_size: int) -> int:
    return config.train.global_batch_size // (config.train.micro_batch_size * data_parallel_size)


def mean_over_world(values: list[float], device: torch.device) -> float:
    """Mean of the values held by the ranks that hold any (e.g. the last pipeline stage), same on all ranks."""
    local = torch.tensor([sum(values), float(len(values))], dtype=torch.float64, device=device)
    dist.all_reduce(local)  # TP/DP replicas of a loss each count once in both sums, so the ratio is the mean
    return float(local[0] / local[1]) if local[1] > 0 else math.nan


def step_metrics(losses: list[float], grad_norm: float | None, lr: float, config: JobConfig,
                 device: torch.device) -> dict[str, float]:
    """An engine's ``train_step`` result from this rank's micro-batch losses (collective); raises
    :class:`TrainingDiverged` on every rank at once when the mean loss or the grad norm is not finite."""
    loss = mean_over_world(losses, device)
    grad_norm = float(grad_norm) if grad_norm is not None else math.nan
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        raise TrainingDiverged(
            f"lm loss {loss} / grad norm {grad_norm} is not finite; lower optim.lr (now {config.optim.lr}) "
            f"or resume from the last checkpoint in {config.checkpoint.save_dir}")
    return {M.TRAIN_LM_LOSS: loss, M.OPTIM_GRAD_NORM: grad_norm, M.OPTIM_LR: lr}


def move_batch(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The tensors the model needs, on ``device``."""
    keys = BATCH_KEYS + tuple(key for key in OPTIONAL_BATCH_KEYS if key in batch)
    return {key: batch[key].to(device, non_blocking=True) for key in keys}


def masked_mean_loss(loss_mask: Tensor, per_token_loss: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss function for the schedules: masked mean of ``per_token_loss`` ``[b, s]``.

    Returns the loss and a dict with a detached *copy* (the schedules divide the loss in place).
    """
    mask = loss_mask.to(per_token_loss.dtype)
    loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)
    # Non-finite losses are detected after the step, on every rank at once (step_metrics), so that no
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
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   routing_mode=routing_mode)
    return output, functools.partial(masked_mean_loss, batch["loss_mask"])


def _no_loss(output: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    raise RuntimeError("a pipeline chunk without data reached the loss; the data iterators are miswired")
