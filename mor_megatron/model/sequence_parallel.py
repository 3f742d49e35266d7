"""Sequence parallelism around the recursions: where MoR gathers whole sequences and where it splits them again.

Under megatron's sequence parallelism (SP) the residual stream between layers holds ``1/tp`` of the sequence per
tensor-parallel rank. Routing needs whole sequences (expert-choice takes the top-k of each sequence, and the
compacted tokens of a recursion come from all of it), so a routed MoR block

* gathers the stream once after the prefix layers (:func:`gather_sequence`); routing, gates, compaction and
  the combine then run on the whole sequence, identically on every TP rank (the *replicated region*);
* splits each recursion's compacted tokens across the TP ranks, padded at the end to a multiple of tp
  (:func:`~mor_megatron.model.recursion_state.pad_rows`, :func:`split_sequence`), so the shared layers run in
  megatron's SP mode, and gathers their output back (:func:`gather_sequence`, padding dropped);
* splits the stream again before the suffix layers (:func:`split_sequence`).

Gradients: a gather whose output feeds the replicated region gets every rank's identical full gradient, so its
backward takes this rank's slice; a split's backward all-gathers the slices. Parameters used in the replicated
region (the routers) thus get the full gradient on every rank, like under TP without SP. Padding rows come
last, so causal attention over the compacted tokens never lets a real token see one; they are dropped on the
way back. Routing `none` keeps the stream split throughout (every token runs every layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region


def gather_sequence(x: Tensor, group) -> Tensor:
    """``[s/tp, ...]`` on each rank -> ``[s, ...]`` on every rank, for replicated computation."""
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)


def split_sequence(x: Tensor, group) -> Tensor:
    """``[s, ...]`` (the same on every rank) -> this rank's ``[s/tp, ...]``."""
    return scatter_to_sequence_parallel_region(x, group=group)


def pad_attention_mask(mask: Tensor, rows: int) -> Tensor:
    """A ``[b, 1, k, k]`` bool mask (True = masked) for ``rows >= k`` compacted slots: real queries never see a
    padding key; a padding query sees only itself (a row with no key would make the softmax NaN)."""
    k = mask.shape[-1]
    if k == rows:
        return mask
    padded = mask.new_ones(*mask.shape[:2], rows, rows)
    padded[..., :k, :k] = mask
    extra = torch.arange(k, rows, device=mask.device)
    padded[..., extra, extra] = False
    return padded
