"""The recursion semantics of Mixture-of-Recursions, written once: which tokens run a recursion, with which
gate, how their block output is combined, and how they are compacted and scattered back.

Torch only (no megatron-core, no transformers): the training block and routers (``mor_megatron.model``), the
Hugging Face modeling code that every export carries (this file is copied beside ``modeling_mor.py``) and the
serving engine all call these functions, so training, export and serving cannot drift apart.

* Expert-choice (paper eq. 1): gate ``g = alpha * sigmoid(z)``; training keeps the top ``k`` candidates of each
  sequence (:func:`top_k_decision`, ``k`` from :func:`top_k_counts`), inference keeps a candidate iff its
  recursion keeps every token or ``sigmoid(z) >= 0.5`` (:func:`threshold_decision`); chosen tokens get
  ``h <- h + g * f(h)`` (:func:`expert_choice_update`).
* Token-choice (paper eq. 2): a depth per token from ``softmax(z)`` (+ the loss-free bias)
  (:func:`token_choice_depth`); a token exiting at recursion r gets ``H1 + g * f(H^r)``, the others carry
  ``f(H^r)`` on (:func:`token_choice_update`, the official code's semantics).
* Compaction (:class:`ActiveTokens`): a recursion runs on its active tokens only, gathered per sequence in their
  original order (so causal attention over the compacted sequence is "causal among the active tokens"), with
  RoPE at their original positions (:func:`rotary_cos_sin`, :func:`apply_rotary`), then scattered back.

Rows may hold different numbers of active tokens (token-choice routing, threshold routing at inference). They
are padded at the end to the longest row: a padded slot gathers an arbitrary real position, is masked as a key,
and is scattered into a dummy row that is dropped, so padding can never change a real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


# ------------------------------------------------------------------------------------------------------------
# Routing decisions, gates and combine rules
# ------------------------------------------------------------------------------------------------------------

def expert_gate(logits: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """Expert-choice gate ``alpha * sigmoid(z)`` of fp32 router logits, in the activations' ``dtype``."""
    return (alpha * torch.sigmoid(logits)).to(dtype)


def threshold_decision(logits: Tensor, capacity: float | Tensor) -> Tensor:
    """Causal (inference) routing: continue iff the recursion keeps every token (``capacity >= 1``) or
    ``sigmoid(z) >= 0.5``, i.e. ``z >= 0``. ``capacity`` is a float or broadcasts against ``logits``."""
    return (logits >= 0.0) | (torch.as_tensor(capacity, device=logits.device) >= 1.0)


def top_k_counts(capacity: float, lengths: Tensor, available: Tensor) -> Tensor:
    """Tokens each row keeps in training routing: ``min(max(1, int(capacity * length)), available)``.

    ``lengths`` ``[b]``: the row's full length (real tokens); ``available`` ``[b]``: its candidates. In float64,
    as Python computes ``int(capacity * length)`` (float32 rounds ``(1/3) * 3`` up to 1.0000001).
    """
    wanted = (lengths.to(torch.float64) * capacity).floor().to(torch.long).clamp(min=1)
    return torch.minimum(wanted, available.to(torch.long))


def top_k_decision(logits: Tensor, candidates: Tensor | None, counts: Tensor) -> Tensor:
    """Training (expert-choice) routing: per row the ``counts[i]`` candidates with the largest logits.

    ``logits`` ``[b, c]`` fp32, ``candidates`` ``[b, c]`` bool or None (all), ``counts`` ``[b]`` (at most the
    row's candidates). Returns ``[b, c]`` bool; hierarchical filtering is the caller passing the tokens chosen
    at the previous recursion as ``candidates``.
    """
    if candidates is not None:
        logits = logits.masked_fill(~candidates, float("-inf"))
    order = torch.argsort(logits, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order).contiguous())
    return rank < counts[:, None]


def token_choice_depth(logits: Tensor, alpha: float, depth_bias: Tensor | None,
                       dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Token-choice depth from fp32 router logits ``[..., R]``.

    Returns ``depth`` (int64, 0-based index of the last recursion a token runs: argmax of the probabilities
    plus ``depth_bias`` when trained with loss-free balancing), its gate ``alpha * p_depth`` (un-biased, in
    ``dtype``) and the probabilities ``[..., R]``.
    """
    probs = torch.softmax(logits, dim=-1)
    depth = torch.argmax(probs if depth_bias is None else probs + depth_bias, dim=-1)
    gate = (alpha * torch.gather(probs, -1, depth[..., None]).squeeze(-1)).to(dtype)
    return depth, gate, probs


def expert_choice_update(hidden: Tensor, gate: Tensor, block_out: Tensor) -> Tensor:
    """``h + g * f(h)`` for the chosen tokens; ``gate`` has ``hidden``'s shape without the feature dim."""
    return hidden + gate[..., None] * block_out


def token_choice_update(block_out: Tensor, *, exits: Tensor, first_hidden: Tensor, gate: Tensor) -> Tensor:
    """Token-choice combine: exiting tokens (``exits``) get ``H1 + g * f(H^r)``, the others carry ``f(H^r)``.

    ``exits`` and ``gate`` have ``block_out``'s shape without the feature dim."""
    return torch.where(exits[..., None], first_hidden + gate[..., None] * block_out, block_out)


# ------------------------------------------------------------------------------------------------------------
# RoPE at original positions (the Hugging Face layout: rotate halves)
# ------------------------------------------------------------------------------------------------------------

def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE tables ``cos, sin`` ``[*positions.shape, head_dim]`` for integer ``positions``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` ``[b, heads, k, d]`` rotated by ``cos/sin`` ``[b, k, d]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# ------------------------------------------------------------------------------------------------------------
# Compaction
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ActiveTokens:
    """Positions of the active tokens of one recursion, per sequence.

    Attributes:
        index: ``[b, k]`` int64 positions into the full sequence, ascending within each row; padded slots
            (see ``valid``) hold position 0.
        valid: ``[b, k]`` bool, False on padded slots; None when every slot is real.
        seq_length: ``s``, the full sequence length.
    """

    index: Tensor
    valid: Tensor | None
    seq_length: int

    @classmethod
    def from_mask(cls, mask: Tensor, *, min_slots: int = 1) -> "ActiveTokens":
        """Compact a boolean ``[b, s]`` mask (True = active) into ascending positions padded at the end.

        Training keeps ``min_slots=1``: a recursion always runs (on a padded slot if need be), so every shared
        weight is used the same number of times per step, which megatron's overlapped grad reduce counts on.
        Inference passes 0 and skips a recursion nobody runs.
        """
        batch, seq_length = mask.shape
        counts = mask.sum(dim=1)
        k = max(min_slots, int(counts.max().item())) if batch else min_slots
        # Sorting active positions first (stable) keeps their original order; inactive ones fall behind.
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :k]
        valid = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
        index = torch.where(valid, order, torch.zeros_like(order))
        return cls(index=index, valid=None if bool(valid.all()) else valid, seq_length=seq_length)

    @property
    def num_slots(self) -> int:
        """``k``: the compacted length (longest row)."""
        return self.index.shape[1]

    def count(self) -> Tensor:
        """Number of real active tokens in the whole batch (0-dim tensor)."""
        if self.valid is None:
            return torch.tensor(self.index.numel(), device=self.index.device)
        return self.valid.sum()

    def counts(self) -> Tensor:
        """``[b]`` real active tokens per row."""
        if self.valid is None:
            return torch.full((self.index.shape[0],), self.num_slots, device=self.index.device)
        return self.valid.sum(dim=1)

    def mask(self) -> Tensor:
        """``[b, s]`` bool mask of the active positions."""
        full = torch.zeros(self.index.shape[0], self.seq_length + 1, dtype=torch.bool, device=self.index.device)
        full.scatter_(1, self._scatter_index(), True)
        return full[:, : self.seq_length]

    def gather(self, hidden: Tensor) -> Tensor:
        """``[s, b, ...]`` -> ``[k, b, ...]`` at the active positions."""
        batch_first = hidden.transpose(0, 1)
        index = self.index.view(*self.index.shape, *([1] * (hidden.dim() - 2)))
        gathered = torch.gather(batch_first, 1, index.expand(-1, -1, *batch_first.shape[2:]))
        return gathered.transpose(0, 1)

    def gather_rows(self, values: Tensor) -> Tensor:
        """``[b, s, ...]`` -> ``[b, k, ...]`` (for batch-first per-token tensors such as router logits)."""
        index = self.index.view(*self.index.shape, *([1] * (values.dim() - 2)))
        return torch.gather(values, 1, index.expand(-1, -1, *values.shape[2:]))

    def gather_rotary(self, rotary_pos_emb: Tensor) -> Tensor:
        """RoPE frequencies ``[s, 1 | b, 1, d]`` -> ``[k, b, 1, d]`` at each active token's original position."""
        return self.gather(rotary_pos_emb.expand(-1, self.index.shape[0], -1, -1))

    def scatter(self, hidden: Tensor, update: Tensor) -> Tensor:
        """Out-of-place write of ``update`` ``[k, b, h]`` into ``hidden`` ``[s, b, h]`` at the active positions.

        Padded slots go to an extra row ``s`` that is cut off, so they never overwrite a real position.
        """
        seq_length, batch, width = hidden.shape
        padded = torch.cat([hidden, hidden.new_zeros(1, batch, width)], dim=0).transpose(0, 1)
        index = self._scatter_index()[:, :, None].expand(-1, -1, width)
        written = padded.scatter(1, index, update.transpose(0, 1).to(hidden.dtype))
        return written.transpose(0, 1)[:seq_length]

    def scatter_rows(self, base: Tensor, update: Tensor) -> Tensor:
        """Out-of-place write of ``update`` ``[b, k, ...]`` into ``base`` ``[b, s, ...]`` (batch-first)."""
        padded = torch.cat([base, base.new_zeros(base.shape[0], 1, *base.shape[2:])], dim=1)
        index = self._scatter_index().view(*self.index.shape, *([1] * (base.dim() - 2)))
        written = padded.scatter(1, index.expand(-1, -1, *base.shape[2:]), update.to(base.dtype))
        return written[:, : self.seq_length]

    def attention_mask(self, input_mask: Tensor | None) -> Tensor | None:
        """Boolean mask ``[b, 1, k, k]`` (True = masked) for attention among the compacted tokens.

        None (plain causal attention: the fast kernels, no mask in memory) when there is no input mask, padded
        rows included: a row's padded slots come after all its real ones, so causality already hides them
        from every real query, and what padded queries compute is never scattered back. With the caller's
        ``[b, 1, s, s]`` mask (e.g. document masking): causal in compacted order plus that mask restricted to
        the active rows and columns.
        """
        if input_mask is None:
            return None
        k = self.num_slots
        device = self.index.device
        causal = torch.triu(torch.ones(k, k, dtype=torch.bool, device=device), diagonal=1)[None, None]
        rows = self._active_rows(input_mask)
        return causal | torch.gather(rows, 2, self.index[:, None, :].expand(-1, k, -1))[:, None]

    def _active_rows(self, input_mask: Tensor) -> Tensor:
        """The rows of the caller's ``[b | 1, 1, s, s]`` mask at the active positions: ``[b, k, s]``."""
        batch = self.index.shape[0]
        return torch.gather(input_mask.expand(batch, -1, -1, -1)[:, 0], 1,
                            self.index[:, :, None].expand(-1, -1, input_mask.shape[-1]))

    def _scatter_index(self) -> Tensor:
        if self.valid is None:
            return self.index
        return torch.where(self.valid, self.index, torch.full_like(self.index, self.seq_length))
