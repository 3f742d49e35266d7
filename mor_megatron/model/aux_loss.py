"""Carry router auxiliary losses into the backward pass through the activations.

The router losses are produced inside the decoder, possibly on a pipeline stage that never sees the LM loss.
Like megatron-core's ``MoEAuxLossAutoScaler``, :class:`AttachAuxLoss` returns the activation unchanged and, in
backward, hands the auxiliary loss a gradient of ``scale``: the loss is optimised exactly as if it were added to
the LM loss. ``scale`` is passed explicitly (the trainer sets ``1 / num_microbatches``, matching how megatron's
schedules divide the LM loss) instead of living in class-level global state.
"""

from __future__ import annotations

import torch
from torch import Tensor


class AttachAuxLoss(torch.autograd.Function):
    """``y = x``; backward gives ``aux_loss`` the gradient ``scale``."""

    @staticmethod
    def forward(ctx, activation: Tensor, aux_loss: Tensor, scale: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return activation

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # noqa: D102
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(activation: Tensor, aux_loss: Tensor | None, scale: float) -> Tensor:
    """Return ``activation`` with ``aux_loss`` attached for backward (no-op when there is nothing to attach)."""
    if aux_loss is None or not aux_loss.requires_grad or not torch.is_grad_enabled():
        return activation
    return AttachAuxLoss.apply(activation, aux_loss, scale)
