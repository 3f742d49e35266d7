"""Static, preallocated KV buffers of the serving engine (recursion-wise caching).

Every layer *site* (a unique layer at one place of the unrolled stack) owns one :class:`StaticKV` of shape
``[slots, depths, max_len, kv_heads, head_dim]`` for keys and for values, plus ``lengths``
``[slots, depths]``:

* prefix and suffix layers: ``depths = 1`` (every token passes them once);
* shared-block position ``j`` (the j-th layer of a recursion): ``depths = R`` under recursion-wise caching,
  where depth ``r`` of a slot holds, in order, the K/V of that sequence's tokens that ran recursion ``r``, so
  its length is the number of tokens that reached depth ``r``; ``depths = 1`` under KV sharing, where only the
  first recursion stores K/V and later recursions read it.

Buffers are allocated once and written in place (no concatenation); a finished sequence's slot is reset by
zeroing its lengths. ``max_len`` bounds the cached tokens of one sequence: prompt + generated - 1 (the last
sampled token is never fed back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mor_megatron.inference.stack import ModelStack


class StaticKV:
    """Keys and values of one layer site: ``[slots, depths, max_len, kv_heads, head_dim]`` each.

    Keys are stored after RoPE. ``lengths[s, d]`` entries of slot ``s`` at depth ``d`` are valid.
    """

    def __init__(self, num_slots: int, num_depths: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_slots, num_depths, max_len, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots, num_depths, dtype=torch.long, device=device)

    @property
    def max_len(self) -> int:
        """Entries one (slot, depth) can hold."""
        return self.keys.shape[2]

    def load(self, slot: int, depth: int, keys: Tensor, values: Tensor) -> None:
        """Set ``(slot, depth)``'s entries to ``keys``/``values`` ``[n, kv_heads, head_dim]`` (prefill)."""
        count = keys.shape[0]
        if count > self.max_len:
            raise ValueError(f"{count} K/V entries do not fit the engine's max_len={self.max_len}; "
                             "build the engine with a larger max_len")
        self.keys[slot, depth, :count] = keys
        self.values[slot, depth, :count] = values
        self.lengths[slot, depth] = count

    def append(self, slots: Tensor, depths: Tensor, keys: Tensor, values: Tensor) -> None:
        """Append one entry to each ``(slots[i], depths[i])``; the pairs must be distinct.

        Args:
            slots, depths: ``[m]`` int64.
            keys, values: ``[m, kv_heads, head_dim]``.
        """
        index = self.lengths[slots, depths]
        self.keys[slots, depths, index] = keys
        self.values[slots, depths, index] = values
        self.lengths[slots, depths] = index + 1

    def gather(self, slots: Tensor, depths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Entries of ``(slots[i], depths[i])`` for a batch, cut at the longest one.

        Returns ``keys, values`` ``[n, L, kv_heads, head_dim]`` and ``valid`` ``[n, L]`` (bool), ``L`` the
        longest length among the pairs.
        """
        lengths = self.lengths[slots, depths]
        longest = int(lengths.max())
        keys = self.keys[slots, depths, :longest]
        values = self.values[slots, depths, :longest]
        valid = torch.arange(longest, device=lengths.device)[None, :] < lengths[:, None]
        return keys, values, valid

    def clear(self, slot: int) -> None:
        """Forget every entry of ``slot`` (its sequence finished)."""
        self.lengths[slot] = 0

    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return 2 * self.keys.numel() * self.keys.element_size()


class KVBuffers:
    """All layer sites of a model: ``prefix[i]``, ``shared[j]``, ``suffix[i]`` (see the module docstring)."""

    def __init__(self, stack: ModelStack, *, num_slots: int, max_len: int):
        def site(depths: int) -> StaticKV:
            return StaticKV(num_slots, depths, max_len, stack.num_kv_heads, stack.head_dim,
                            dtype=stack.dtype, device=stack.device)

        shared_depths = 1 if stack.kv_mode == "shared" else stack.num_recursions
        self.stack = stack
        self.prefix = [site(1) for _ in range(stack.num_prefix)]
        self.shared = [site(shared_depths) for _ in range(stack.num_shared)]
        self.suffix = [site(1) for _ in range(stack.num_suffix)]

    def all_sites(self) -> list[StaticKV]:
        """Every site, prefix first."""
        return [*self.prefix, *self.shared, *self.suffix]

    def clear(self, slot: int) -> None:
        """Free ``slot`` in every site."""
        for kv in self.all_sites():
            kv.clear(slot)

    def depth_lengths(self, slot: int) -> tuple[int, ...]:
        """Entries of ``slot`` per depth in the shared block's sites (one value per stored depth)."""
        return tuple(self.shared[0].lengths[slot].tolist()) if self.shared else ()

    def nbytes(self) -> int:
        """Bytes allocated for all keys and values."""
        return sum(kv.nbytes() for kv in self.all_sites())

    def load_mor_cache(self, slot: int, cache) -> None:
        """Copy a one-row ``MoRCache`` (a prefill of one prompt) into ``slot``.

        Cache slot ids are unrolled positions: prefix ``i`` -> ``i``; shared ``j`` at recursion ``r`` ->
        ``P + r * B + j``; suffix ``i`` -> ``P + R * B + i`` (``modeling_mor.MoRCache``). A position no token
        reached (absent, or empty) leaves the depth empty.
        """
        stack = self.stack
        num_prefix, width = stack.num_prefix, stack.num_shared
        first_suffix = num_prefix + stack.num_recursions * width
        self.clear(slot)
        for slot_id, stored in cache.slots.items():
            if not stored.keys:
                continue
            if slot_id < num_prefix:
                kv, depth = self.prefix[slot_id], 0
            elif slot_id < first_suffix:
                depth, position = divmod(slot_id - num_prefix, width)
                kv = self.shared[position]
            else:
                kv, depth = self.suffix[slot_id - first_suffix], 0
            kv.load(slot, depth, stored.keys[0].transpose(0, 1), stored.values[0].transpose(0, 1))

    def load_dynamic_cache(self, slot: int, cache) -> None:
        """Copy a one-row transformers ``DynamicCache`` of a vanilla Llama model into ``slot``.

        Llama layer ``i`` is shared-block position ``i`` at depth 0 (see :class:`ModelStack`); its K/V are
        ``cache.layers[i].keys`` ``[1, kv_heads, n, head_dim]``.
        """
        self.clear(slot)
        for kv, layer in zip(self.shared, cache.layers, strict=True):
            kv.load(slot, 0, layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1))
