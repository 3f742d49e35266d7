"""Compacting the tokens that take part in a recursion into a shorter sequence, and scattering them back.

MoR computes a recursion only on its active tokens (design section 3): they are gathered per sequence into a
``[k, b, h]`` tensor, kept in their original order so that causal attention over the compacted sequence is
exactly "causal among the active tokens", run through the shared block with RoPE at their original positions,
and scattered back into the full ``[s, b, h]`` residual stream.

Rows may hold different numbers of active tokens (token-choice routing, threshold routing at inference). They
are padded at the end to the longest row: a padded slot gathers an arbitrary real position, is masked as a key,
and is scattered into a dummy row that is dropped, so padding can never change a real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
    def from_mask(cls, mask: Tensor) -> "ActiveTokens":
        """Compact a boolean ``[b, s]`` mask (True = active) into ascending positions padded at the end."""
        batch, seq_length = mask.shape
        counts = mask.sum(dim=1)
        # At least one slot: a recursion always runs (on a padded slot if need be), so every shared weight is
        # used the same number of times per step, which megatron's overlapped grad reduce counts on.
        k = max(1, int(counts.max().item())) if batch else 1
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
        """RoPE frequencies ``[s, 1, 1, d]`` -> ``[k, b, 1, d]`` at each active token's original position."""
        freqs = rotary_pos_emb[:, 0, 0, :]
        return freqs[self.index].transpose(0, 1).unsqueeze(2)

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
        """Out-of-place write of per-slot values ``update`` ``[b, k]`` into ``base`` ``[b, s]``."""
        padded = torch.cat([base, base.new_zeros(base.shape[0], 1)], dim=1)
        return padded.scatter(1, self._scatter_index(), update.to(base.dtype))[:, : self.seq_length]

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
