"""Recursive KV sharing (MoR's `shared` KV mode): the first recursion's keys and values, reused by the others.

Every token passes the first recursion, whose shared layers record their keys and values; later recursions
compute queries only for their active tokens and attend over the recorded keys and values of the whole
sequence (paper section 2.2.2). :class:`KVShareSession` is what one attention module sees during a call
(``MoRSelfAttention`` records into it or reads from it); :class:`SharedKV` keeps the recorded tensors between
the recursions of a micro-batch.

Under pipeline parallelism each recursion is its own forward call (a virtual stage), and megatron's interleaved
schedule runs the first recursion of later micro-batches before the last recursion of earlier ones, so the
recordings form a queue that every later recursion reads in micro-batch order. The schedule also runs each
stage's backward on its own graph: a later recursion reads a detached copy, and the gradient it leaves there is
handed to the recording's graph during the first recursion's backward (:class:`_ReturnKVGrad`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mor_megatron.model.recursion import ActiveTokens


@dataclass
class KVShareSession:
    """State of one attention module under KV sharing, for one forward call.

    ``mode`` is `record` during the first recursion (store K/V of all tokens, before RoPE) and `reuse`
    afterwards (replace K/V by ``key``/``value``). Keys are stored un-rotated so RoPE is applied at attention
    time with the full sequence's positions. ``queries`` are the active tokens of a `reuse` recursion that runs
    on compacted tokens (None when every token takes part).
    """

    mode: Literal["record", "reuse"] = "record"
    key: Tensor | None = None
    value: Tensor | None = None
    queries: ActiveTokens | None = None


@dataclass
class _Recording:
    originals: dict[int, tuple[Tensor, Tensor]]
    readable: dict[int, tuple[Tensor, Tensor]]
    reads: int = 0


class SharedKV:
    """First-recursion K/V per shared layer for the micro-batches in flight on this rank.

    Args:
        num_readers: recursions that reuse a recording (``num_recursions - 1``); it is dropped after the last.
        detach: hand readers detached copies (a separate autograd graph per pipeline stage call).
    """

    def __init__(self, num_readers: int, *, detach: bool):
        self.num_readers = num_readers
        self.detach = detach
        self._queue: deque[_Recording] = deque()
        self._dropped = 0
        self._next: dict[int, int] = {}

    def clear(self) -> None:
        """Forget every recording (a forward that failed half-way must not feed the next one)."""
        self._queue.clear()
        self._dropped = 0
        self._next.clear()

    def record(self, sessions: dict[int, KVShareSession]) -> _Recording:
        """Store what ``sessions`` recorded in the first recursion of the next micro-batch."""
        originals = {idx: (s.key, s.value) for idx, s in sessions.items()}
        readable = originals
        if self.detach:
            readable = {idx: tuple(t.detach().requires_grad_(t.requires_grad) for t in kv)
                        for idx, kv in originals.items()}
        recording = _Recording(originals, readable)
        self._queue.append(recording)
        return recording

    def read(self, recursion_idx: int, sessions: dict[int, KVShareSession]) -> None:
        """Give ``sessions`` the recording of the micro-batch that recursion ``recursion_idx`` runs next."""
        position = self._next.get(recursion_idx, self._dropped)
        if position - self._dropped >= len(self._queue):
            raise RuntimeError(f"KV sharing: recursion {recursion_idx} has no first-recursion K/V to reuse")
        recording = self._queue[position - self._dropped]
        self._next[recursion_idx] = position + 1
        for idx, session in sessions.items():
            session.key, session.value = recording.readable[idx]
        recording.reads += 1
        while self._queue and self._queue[0].reads == self.num_readers:
            self._queue.popleft()
            self._dropped += 1

    @staticmethod
    def return_grads(output: Tensor, recording: _Recording) -> Tensor:
        """``output`` of the recording stage call, with the readers' K/V gradients joining its backward."""
        pairs = [(orig, copy) for idx in recording.originals
                 for orig, copy in zip(recording.originals[idx], recording.readable[idx], strict=True)
                 if orig.requires_grad]
        if not pairs or not torch.is_grad_enabled():
            return output
        originals, copies = zip(*pairs, strict=True)
        return _ReturnKVGrad.apply(output, copies, *originals)


class _ReturnKVGrad(torch.autograd.Function):
    """``y = output``; backward also gives each recorded K/V the gradient its detached copy has collected.

    The schedule runs a micro-batch's later recursions' backward before its first recursion's, so by then the
    copies hold every reader's gradient.
    """

    @staticmethod
    def forward(ctx, output: Tensor, copies: tuple[Tensor, ...], *originals: Tensor) -> Tensor:  # noqa: D102
        ctx.copies = copies
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # noqa: D102
        grads = [torch.zeros_like(copy) if copy.grad is None else copy.grad for copy in ctx.copies]
        ctx.copies = None
        return (grad_output, None, *grads)
