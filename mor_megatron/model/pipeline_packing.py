"""The tensor that carries MoR routing state between pipeline stages.

megatron-core's schedules send exactly one tensor of shape ``[rows, b, h]`` across every stage boundary. When a
recursion is cut across pipeline ranks, more than the residual stream must travel: which tokens are active, their
gates and the partial block output of the active tokens (and, for token-choice, the first hidden state and each
token's depth). All of it is stacked along the first axis in a fixed layout, so the shape is the same at every
boundary and the whole state is differentiable where it must be (hidden states, gates):

=========  ======  =====================================================================
field      rows    meaning
=========  ======  =====================================================================
hidden     s       residual stream H of every token (what a recursion starts from)
work       s       inside a recursion: the block's partial output at the active tokens
mask       m       1.0 where a token is active in the current recursion (else 0.0)
gate       m       gate of each token (expert: current recursion; token-choice: its depth)
first      s       token-choice only: H after the first unique layer (exit combine)
depth      m       token-choice only: the 0-based last recursion of each token
=========  ======  =====================================================================

Per-token scalars ``[b, s]`` are laid out as ``m = ceil(s / h)`` rows of width ``h``; 0/1 masks and small integer
depths are exact in bf16. Plain recursion (routing `none`) sends the residual stream alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_SEQUENCE_FIELDS = ("hidden", "work", "first")


@dataclass(frozen=True)
class PipelinePacking:
    """Layout of the stage-boundary tensor for ``seq_length`` tokens of width ``hidden_size``."""

    seq_length: int
    hidden_size: int
    routing: str

    @property
    def fields(self) -> tuple[str, ...]:
        if self.routing == "none":
            return ("hidden",)
        if self.routing == "token_choice":
            return ("hidden", "work", "mask", "gate", "first", "depth")
        return ("hidden", "work", "mask", "gate")

    def _rows(self, name: str) -> int:
        return self.seq_length if name in _SEQUENCE_FIELDS else math.ceil(self.seq_length / self.hidden_size)

    @property
    def rows(self) -> int:
        """First-axis length of the packed tensor: the ``seq_length`` to give megatron's schedules."""
        return sum(self._rows(name) for name in self.fields)

    def pack(self, values: dict[str, Tensor]) -> Tensor:
        """Stack the fields (``[s, b, h]`` tensors or ``[b, s]`` per-token scalars) into ``[rows, b, h]``."""
        parts = []
        for name in self.fields:
            value = values[name]
            parts.append(value if name in _SEQUENCE_FIELDS else self._scalar_rows(value))
        dtype = values["hidden"].dtype
        return torch.cat([p.to(dtype) for p in parts], dim=0)

    def unpack(self, packed: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`pack`: sequence fields as ``[s, b, h]`` views, scalars as ``[b, s]``."""
        out, start = {}, 0
        for name in self.fields:
            rows = self._rows(name)
            chunk = packed[start : start + rows]
            start += rows
            out[name] = chunk if name in _SEQUENCE_FIELDS else self._from_rows(chunk)
        return out

    def _scalar_rows(self, value: Tensor) -> Tensor:
        batch = value.shape[0]
        rows = self._rows("mask")
        padded = value.new_zeros(batch, rows * self.hidden_size)
        padded[:, : self.seq_length] = value
        return padded.view(batch, rows, self.hidden_size).transpose(0, 1)

    def _from_rows(self, chunk: Tensor) -> Tensor:
        batch = chunk.shape[1]
        return chunk.transpose(0, 1).reshape(batch, -1)[:, : self.seq_length]
