"""What one recursion hands to the next, and its wire format between pipeline stages.

:class:`RecursionState` is the typed state of the recursion loop in :class:`~mor_megatron.model.block.MoRBlock`.
Without pipeline parallelism it stays a Python object for the whole forward; with it, megatron-core's schedules
send exactly one tensor of shape ``[rows, b, h]`` across every stage boundary, so :class:`PipelinePacking` stacks
the state along the first axis in a fixed layout (the same shape at every boundary, differentiable where it must
be: hidden states, gates):

=========  ======  =====================================================================
field      rows    meaning
=========  ======  =====================================================================
hidden     s       residual stream H of every token (what a recursion starts from)
work       s       inside a recursion: the block's partial output at the active tokens (zero elsewhere)
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

from mor_megatron.model.recursion import ActiveTokens

_SEQUENCE_FIELDS = ("hidden", "work", "first")


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with zero rows appended along the first axis up to ``rows``."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])], dim=0)


@dataclass
class RecursionState:
    """The recursion loop's state for one micro-batch.

    Attributes:
        hidden: ``[s, b, h]`` residual stream of every token.
        active: the tokens of the current (or, between recursions, the last) recursion; None under routing
            `none`, where every token runs every recursion and ``hidden`` is the block's stream itself.
        work: ``[k, b, h]`` the active tokens' block input, then (partial) block output.
        gate: expert-choice: ``[k, b]`` gates of the active tokens.
        token_gate: token-choice: ``[b, s]`` each token's gate at its exit recursion.
        first: token-choice: ``[s, b, h]`` H after the first unique layer.
        depth: token-choice: ``[b, s]`` int64, 0-based last recursion of each token.
    """

    hidden: Tensor
    active: ActiveTokens | None = None
    work: Tensor | None = None
    gate: Tensor | None = None
    token_gate: Tensor | None = None
    first: Tensor | None = None
    depth: Tensor | None = None

    @property
    def every_token_active(self) -> bool:
        """True when the current recursion runs on the whole sequence (no gather/scatter needed)."""
        active = self.active
        return active is None or (active.valid is None and active.num_slots == active.seq_length)

    def gather(self, full: Tensor) -> Tensor:
        """``[s, b, ...]`` -> the active tokens' rows (the tensor itself when every token is active)."""
        return full if self.every_token_active else self.active.gather(full)

    def scatter(self, full: Tensor, update: Tensor) -> Tensor:
        """Write the active tokens' rows ``update`` into ``full`` (``update`` itself when every token is active)."""
        return update if self.every_token_active else self.active.scatter(full, update)


@dataclass(frozen=True)
class PipelinePacking:
    """Layout of the stage-boundary tensor for ``seq_length`` tokens of width ``hidden_size``."""

    seq_length: int
    hidden_size: int
    routing: str
    row_multiple: int = 1
    """The packed rows are padded (zeros at the end) to a multiple of this (tp under sequence parallelism)."""

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
        return padded_length(sum(self._rows(name) for name in self.fields), self.row_multiple)

    def pack(self, state: RecursionState) -> Tensor:
        """Stack ``state`` into ``[rows, b, h]`` in the hidden states' dtype."""
        hidden = state.hidden
        if self.routing == "none":
            return hidden
        batch = hidden.shape[1]
        active = state.active
        values = {"hidden": hidden, "work": active.scatter(torch.zeros_like(hidden), state.work),
                  "mask": active.mask()}
        if self.routing == "token_choice":
            values.update(gate=state.token_gate, first=state.first, depth=state.depth)
        else:
            values["gate"] = active.scatter_rows(hidden.new_zeros(batch, self.seq_length), state.gate.t())
        parts = [values[name] if name in _SEQUENCE_FIELDS else self._scalar_rows(values[name].to(hidden.dtype))
                 for name in self.fields]
        return pad_rows(torch.cat(parts, dim=0), self.rows)

    def unpack(self, packed: Tensor) -> RecursionState:
        """Inverse of :meth:`pack`."""
        if self.routing == "none":
            return RecursionState(hidden=packed)
        values, start = {}, 0
        for name in self.fields:
            rows = self._rows(name)
            chunk = packed[start : start + rows]
            start += rows
            values[name] = chunk if name in _SEQUENCE_FIELDS else self._from_rows(chunk)
        active = ActiveTokens.from_mask(values["mask"] > 0.5)
        state = RecursionState(hidden=values["hidden"], active=active, work=active.gather(values["work"]))
        if self.routing == "token_choice":
            state.token_gate, state.first = values["gate"], values["first"]
            state.depth = values["depth"].round().long()
        else:
            state.gate = active.gather_rows(values["gate"]).t()
        return state

    def _scalar_rows(self, value: Tensor) -> Tensor:
        batch = value.shape[0]
        rows = self._rows("mask")
        padded = value.new_zeros(batch, rows * self.hidden_size)
        padded[:, : self.seq_length] = value
        return padded.view(batch, rows, self.hidden_size).transpose(0, 1)

    def _from_rows(self, chunk: Tensor) -> Tensor:
        batch = chunk.shape[1]
        return chunk.transpose(0, 1).reshape(batch, -1)[:, : self.seq_length]
