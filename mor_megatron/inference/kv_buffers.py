"""Paged KV cache of the serving engine: fixed-size blocks handed out as the tokens of each depth arrive.

Layout. One :class:`BlockPool` serves every layer site of the model (a *site* is a unique layer at one place
of the unrolled stack): two tensors ``[num_blocks, block_size, kv_heads, head_dim]`` (keys after RoPE, and
values) and a free list. One pool for all sites, rather than one per site, lets the depths that routing fills
(depth 0 of every token) take the blocks the deep ones leave unused, and gives the engine one size knob
(``kv_blocks``). Every site is a :class:`PagedKV`: block tables ``[slots, depths, max_blocks]`` and lengths
``[slots, depths]``, where a *stream* ``(slot, depth)`` holds, in order, the K/V of that sequence's tokens
that ran that depth:

* prefix and suffix layers: ``depths = 1`` (every token passes them once);
* shared-block position ``j`` (the j-th layer of a recursion): ``depths = R`` under recursion-wise caching,
  depth ``r`` holding the tokens that reached recursion ``r``; ``depths = 1`` under KV sharing, where only the
  first recursion stores K/V and later recursions read it.

A stream takes a block from the pool when its length crosses a multiple of ``block_size`` (prefills take
all theirs at once), and :meth:`KVBuffers.clear` returns a finished sequence's blocks. Bytes in use are
therefore those of ``ceil(tokens / block_size)`` blocks per stream: proportional to the tokens each depth
really caches, which is what recursion-wise caching saves (the paper's ``(R + 1) / (2R)`` of the vanilla
recursion block at capacities ``1, (R-1)/R, ..., 1/R``).

A pool that runs out raises :class:`KVPoolExhausted`, naming the engine's ``kv_blocks``; the engine does not
defer admissions, because a MoR sequence's need is only known as its tokens are routed. The default pool is
the worst case (every stream of every slot full to ``max_len``), which never runs out.

Static shapes: the pool, the tables and the lengths are tensors of fixed shape allocated once, so the decode
step's reads and writes (:meth:`PagedKV.append`, :meth:`PagedKV.gather`) are gathers and scatters of fixed
rank; for CUDA graphs the free list (a Python list here, read only when a stream crosses a block boundary)
would become a device-side stack. :meth:`PagedKV.gather` copies a batch's blocks out of the pool for
``scaled_dot_product_attention``; on a GPU a paged-attention kernel would read them in place through the
block table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mor_megatron.inference.stack import ModelStack


class KVPoolExhausted(RuntimeError):
    """Every block of the KV pool is in use and a stream needs another one."""


class BlockPool:
    """Keys and values of ``num_blocks`` blocks of ``block_size`` tokens, and which blocks are free."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device, worst_case: int):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.worst_case = worst_case
        """Blocks that all streams full to ``max_len`` would take (named in the exhaustion error)."""
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids go out first
        self.peak_blocks = 0

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[0]

    @property
    def block_size(self) -> int:
        return self.keys.shape[1]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block, keys and values."""
        return 2 * self.keys[0].numel() * self.keys.element_size()

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks; KVPoolExhausted if fewer are free (then none is taken)."""
        if count > len(self._free):
            raise KVPoolExhausted(
                f"KV block pool exhausted: {count} more block(s) of {self.block_size} tokens needed, "
                f"{len(self._free)} of {self.num_blocks} free; build the engine with a larger kv_blocks "
                f"(the worst case for its num_slots and max_len is {self.worst_case})")
        ids = [self._free.pop() for _ in range(count)]
        self.peak_blocks = max(self.peak_blocks, self.used_blocks)
        return ids

    def release(self, ids: list[int]) -> None:
        self._free.extend(reversed(ids))

    def reset_peak(self) -> None:
        """Start a new peak measurement from the blocks in use now."""
        self.peak_blocks = self.used_blocks

    def nbytes(self) -> int:
        """Bytes reserved for keys and values (every block, used or free)."""
        return self.num_blocks * self.block_bytes


class PagedKV:
    """Block tables and lengths of one layer site: ``lengths[s, d]`` entries of stream ``(s, d)`` are valid,
    entry ``i`` at offset ``i % block_size`` of block ``tables[s, d, i // block_size]`` of the pool."""

    def __init__(self, pool: BlockPool, num_slots: int, num_depths: int, max_len: int):
        self.pool = pool
        self.max_len = max_len
        max_blocks = -(-max_len // pool.block_size)
        device = pool.keys.device
        self.tables = torch.zeros(num_slots, num_depths, max_blocks, dtype=torch.long, device=device)
        self.lengths = torch.zeros(num_slots, num_depths, dtype=torch.long, device=device)

    def _rows(self, blocks: Tensor, offsets: Tensor) -> Tensor:
        """Row indices into the pool flattened to ``[num_blocks * block_size, kv_heads, head_dim]``."""
        return blocks * self.pool.block_size + offsets

    def _write(self, rows: Tensor, keys: Tensor, values: Tensor) -> None:
        heads, dim = keys.shape[1:]
        self.pool.keys.view(-1, heads, dim)[rows] = keys
        self.pool.values.view(-1, heads, dim)[rows] = values

    def load(self, slot: int, depth: int, keys: Tensor, values: Tensor) -> None:
        """Fill the empty stream ``(slot, depth)`` with ``keys``/``values`` ``[n, kv_heads, head_dim]``
        (prefill)."""
        count = keys.shape[0]
        if count > self.max_len:
            raise ValueError(f"{count} K/V entries do not fit the engine's max_len={self.max_len}; "
                             "build the engine with a larger max_len")
        size = self.pool.block_size
        ids = torch.tensor(self.pool.allocate(-(-count // size)), dtype=torch.long, device=keys.device)
        self.tables[slot, depth, :ids.numel()] = ids
        position = torch.arange(count, device=keys.device)
        self._write(self._rows(ids[position // size], position % size), keys, values)
        self.lengths[slot, depth] = count

    def append(self, slots: Tensor, depths: Tensor, keys: Tensor, values: Tensor) -> None:
        """Append one entry to each stream ``(slots[i], depths[i])``; the pairs must be distinct.

        Args:
            slots, depths: ``[m]`` int64.
            keys, values: ``[m, kv_heads, head_dim]``.
        """
        size = self.pool.block_size
        index = self.lengths[slots, depths]
        fresh = (index % size == 0).nonzero().squeeze(-1)  # streams whose last block is full (or absent)
        if fresh.numel():
            ids = self.pool.allocate(fresh.numel())
            self.tables[slots[fresh], depths[fresh], index[fresh] // size] = torch.tensor(
                ids, dtype=torch.long, device=index.device)
        self._write(self._rows(self.tables[slots, depths, index // size], index % size), keys, values)
        self.lengths[slots, depths] = index + 1

    def gather(self, slots: Tensor, depths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Entries of streams ``(slots[i], depths[i])`` for a batch, cut at the longest one.

        Returns ``keys, values`` ``[n, L, kv_heads, head_dim]`` and ``valid`` ``[n, L]`` (bool), ``L`` the
        longest length among the pairs. Table entries past a stream's blocks point at arbitrary (finite)
        blocks; ``valid`` masks them.
        """
        lengths = self.lengths[slots, depths]
        longest = int(lengths.max())
        blocks = self.tables[slots, depths, :-(-longest // self.pool.block_size)]  # [n, blocks]
        keys = self.pool.keys[blocks].flatten(1, 2)[:, :longest]
        values = self.pool.values[blocks].flatten(1, 2)[:, :longest]
        valid = torch.arange(longest, device=lengths.device)[None, :] < lengths[:, None]
        return keys, values, valid

    def blocks(self, slot: int) -> int:
        """Blocks ``slot`` holds at this site, all depths."""
        return int(((self.lengths[slot] + self.pool.block_size - 1) // self.pool.block_size).sum())

    def clear(self, slot: int) -> None:
        """Return ``slot``'s blocks to the pool (its sequence finished)."""
        counts = ((self.lengths[slot] + self.pool.block_size - 1) // self.pool.block_size).tolist()
        for depth, count in enumerate(counts):
            if count:
                self.pool.release(self.tables[slot, depth, :count].tolist())
        self.lengths[slot] = 0


class KVBuffers:
    """All layer sites of a model, ``prefix[i]``, ``shared[j]``, ``suffix[i]``, on one block pool (see the
    module docstring).

    Args:
        num_blocks: blocks in the pool; None: the worst case, ``num_slots * ceil(max_len / block_size)`` per
            stored depth of every site.
    """

    def __init__(self, stack: ModelStack, *, num_slots: int, max_len: int, block_size: int,
                 num_blocks: int | None):
        shared_depths = 1 if stack.kv_mode == "shared" else stack.num_recursions
        streams = stack.num_prefix + stack.num_suffix + stack.num_shared * shared_depths
        worst_case = num_slots * streams * -(-max_len // block_size)
        self.stack = stack
        self.pool = BlockPool(worst_case if num_blocks is None else num_blocks, block_size,
                              stack.num_kv_heads, stack.head_dim, dtype=stack.dtype, device=stack.device,
                              worst_case=worst_case)

        def site(depths: int) -> PagedKV:
            return PagedKV(self.pool, num_slots, depths, max_len)

        self.prefix = [site(1) for _ in range(stack.num_prefix)]
        self.shared = [site(shared_depths) for _ in range(stack.num_shared)]
        self.suffix = [site(1) for _ in range(stack.num_suffix)]

    def all_sites(self) -> list[PagedKV]:
        """Every site, prefix first."""
        return [*self.prefix, *self.shared, *self.suffix]

    def clear(self, slot: int) -> None:
        """Free ``slot`` in every site."""
        for kv in self.all_sites():
            kv.clear(slot)

    def depth_lengths(self, slot: int) -> tuple[int, ...]:
        """Entries of ``slot`` per depth in the shared block's sites (one value per stored depth)."""
        return tuple(self.shared[0].lengths[slot].tolist()) if self.shared else ()

    def slot_bytes(self, slot: int) -> tuple[int, int]:
        """Bytes of the blocks ``slot`` holds: in all sites, and in the shared block's sites."""
        shared = sum(kv.blocks(slot) for kv in self.shared)
        edges = sum(kv.blocks(slot) for kv in (*self.prefix, *self.suffix))
        return (shared + edges) * self.pool.block_bytes, shared * self.pool.block_bytes

    def load_mor_cache(self, slot: int, cache) -> None:
        """Copy a one-row ``MoRCache`` (a prefill of one prompt) into the empty ``slot``.

        Cache slot ids are unrolled positions: prefix ``i`` -> ``i``; shared ``j`` at recursion ``r`` ->
        ``P + r * B + j``; suffix ``i`` -> ``P + R * B + i`` (``modeling_mor.MoRCache``). A position no token
        reached (absent, or empty) leaves the depth empty.
        """
        stack = self.stack
        num_prefix, width = stack.num_prefix, stack.num_shared
        first_suffix = num_prefix + stack.num_recursions * width
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
        """Copy a one-row transformers ``DynamicCache`` of a vanilla Llama model into the empty ``slot``.

        Llama layer ``i`` is shared-block position ``i`` at depth 0 (see :class:`ModelStack`); its K/V are
        ``cache.layers[i].keys`` ``[1, kv_heads, n, head_dim]``.
        """
        for kv, layer in zip(self.shared, cache.layers, strict=True):
            kv.load(slot, 0, layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1))
