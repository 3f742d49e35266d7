"""Pre-flight check of a megatron-core ``<prefix>.bin`` / ``<prefix>.idx`` pair, in seconds, without megatron-core.

megatron-core reads these files only inside the workers, through asserts and memory maps, so a truncated
``.bin`` or a damaged ``.idx`` used to fail 10-25 s after launch with errors naming no file. This module
reads the layout megatron-core writes (``megatron.core.datasets.indexed_dataset._IndexWriter``) and names
the broken file::

    header  magic "MMIDIDX\\0\\0" (9 bytes) | version u64 = 1 | dtype code u8 | sequences S u64 | entries D u64
    body    sequence lengths int32[S] | sequence byte offsets int64[S] | document boundaries int64[D]

The ``.bin`` holds the token ids of every sequence back to back, so its size follows from the lengths.
Token ids are compared with the vocabulary: all of them up to :data:`FULL_SCAN_MAX_BYTES` of ``.bin``,
evenly spaced windows beyond it (reading a multi-terabyte corpus would take longer than the job's start).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
"""Magic (9) + version (8) + dtype code (1) + sequence count (8) + document-boundary count (8)."""
_TOKEN_DTYPES: dict[int, Any] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
"""megatron-core's ``DType`` codes of the integer types (6 and 7 are float64 and float32: no token ids)."""
FULL_SCAN_MAX_BYTES = 1 << 28
"""A ``.bin`` up to 256 MiB has every token id checked (well under a second from the page cache)."""
SAMPLE_WINDOWS = 64
SAMPLE_WINDOW_BYTES = 1 << 20
"""Larger files: 64 windows of 1 MiB, first and last included, so a foreign tail or head is still caught."""
_CHUNK_ITEMS = 1 << 22
"""Index entries or token ids per numpy pass: bounds memory for indices of any size."""


@dataclass(frozen=True)
class IndexedDatasetSummary:
    """What the check found in one prefix; ``num_tokens_checked < num_tokens`` when ids were sampled."""

    prefix: str
    num_documents: int
    num_tokens: int
    num_tokens_checked: int

    def describe(self) -> str:
        """One line for ``--check``: sizes and how much of the token id range check ran."""
        coverage = ("every token id checked" if self.num_tokens_checked == self.num_tokens
                    else f"token ids sampled: {self.num_tokens_checked:,} of {self.num_tokens:,} checked")
        return f"{self.prefix}: {self.num_documents:,} documents, {self.num_tokens:,} tokens, {coverage}"


class DamagedDataFile(ValueError):
    """A ``.bin`` or ``.idx`` file is not what megatron-core will read; the message names the file."""


@dataclass(frozen=True)
class _Header:
    dtype: Any
    num_sequences: int
    num_boundaries: int

    @property
    def index_bytes(self) -> int:
        return HEADER_BYTES + self.num_sequences * (4 + 8) + self.num_boundaries * 8


def check_indexed_dataset(prefix: str, *, vocab_size: int, vocab_source: str) -> IndexedDatasetSummary:
    """Check ``prefix.idx`` and ``prefix.bin`` against each other and every token id against ``vocab_size``.

    ``vocab_source`` says where the vocabulary size comes from, for the message (``"data.tokenizer has 512
    pieces"``). Raises :class:`DamagedDataFile` naming the file and what is wrong with it.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    header = _read_header(idx_path)
    index = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(index, dtype=np.int32, count=header.num_sequences, offset=HEADER_BYTES)
    offsets = np.frombuffer(index, dtype=np.int64, count=header.num_sequences,
                            offset=HEADER_BYTES + lengths.nbytes)
    boundaries = np.frombuffer(index, dtype=np.int64, count=header.num_boundaries,
                               offset=HEADER_BYTES + lengths.nbytes + offsets.nbytes)
    itemsize = np.dtype(header.dtype).itemsize
    bin_bytes = _check_offsets(idx_path, lengths, offsets, itemsize)
    _check_boundaries(idx_path, boundaries, header.num_sequences)
    actual_bin_bytes = Path(bin_path).stat().st_size
    if actual_bin_bytes != bin_bytes:
        raise DamagedDataFile(
            f"{bin_path} has {actual_bin_bytes:,} bytes but {idx_path} describes {bin_bytes // itemsize:,} "
            f"{np.dtype(header.dtype).name} tokens = {bin_bytes:,} bytes: the .bin is "
            f"{'truncated' if actual_bin_bytes < bin_bytes else 'longer than its index'} or belongs to "
            "another .idx")
    num_tokens = bin_bytes // itemsize
    if num_tokens == 0:
        raise DamagedDataFile(f"{bin_path} holds no tokens: its documents are all empty")
    checked = _check_token_ids(bin_path, header.dtype, num_tokens, vocab_size, vocab_source)
    return IndexedDatasetSummary(prefix=prefix, num_documents=header.num_sequences, num_tokens=num_tokens,
                                 num_tokens_checked=checked)


def read_num_documents(idx_path: str) -> int:
    """Sequences in a checked ``.idx`` (``mor-data preprocess`` writes one per document)."""
    return _read_header(idx_path).num_sequences


def _read_header(idx_path: str) -> _Header:
    size = Path(idx_path).stat().st_size
    with open(idx_path, "rb") as stream:
        raw = stream.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise DamagedDataFile(f"{idx_path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte "
                              "header of a megatron-core index")
    if not raw.startswith(INDEX_MAGIC):
        raise DamagedDataFile(f"{idx_path} is not a megatron-core index (it does not start with MMIDIDX)")
    version, code, num_sequences, num_boundaries = struct.unpack("<QBQQ", raw[len(INDEX_MAGIC):])
    if version != 1:
        raise DamagedDataFile(f"{idx_path} has index version {version}; megatron-core reads version 1")
    if code not in _TOKEN_DTYPES:
        raise DamagedDataFile(f"{idx_path} names dtype code {code}, not one of megatron-core's integer token "
                              f"types {sorted(_TOKEN_DTYPES)}")
    header = _Header(dtype=_TOKEN_DTYPES[code], num_sequences=num_sequences, num_boundaries=num_boundaries)
    if size < header.index_bytes:
        raise DamagedDataFile(f"{idx_path} is truncated: {size:,} bytes, but its header's {num_sequences:,} "
                              f"sequences and {num_boundaries:,} document boundaries need {header.index_bytes:,}")
    if size > header.index_bytes:
        raise DamagedDataFile(f"{idx_path} has {size - header.index_bytes:,} bytes more than its header's "
                              f"{num_sequences:,} sequences and {num_boundaries:,} document boundaries need "
                              "(corrupted, or a multimodal index, which GPT training does not read)")
    if num_sequences == 0:
        raise DamagedDataFile(f"{idx_path} holds no documents")
    return header


def _chunks(count: int) -> Iterator[slice]:
    for start in range(0, count, _CHUNK_ITEMS):
        yield slice(start, min(start + _CHUNK_ITEMS, count))


def _check_offsets(idx_path: str, lengths: np.ndarray, offsets: np.ndarray, itemsize: int) -> int:
    """Each sequence must start where the previous one ends; returns the ``.bin`` size the index implies."""
    end = 0
    for part in _chunks(len(lengths)):
        part_lengths = lengths[part].astype(np.int64)
        if (part_lengths < 0).any():
            first = part.start + int(np.argmax(part_lengths < 0))
            raise DamagedDataFile(f"{idx_path} is corrupted: sequence {first} has length {int(lengths[first])}")
        starts = end + np.concatenate(([0], np.cumsum(part_lengths[:-1]))) * itemsize
        wrong = np.flatnonzero(offsets[part] != starts)
        if wrong.size:
            first = part.start + int(wrong[0])
            raise DamagedDataFile(f"{idx_path} is corrupted: sequence {first} starts at byte "
                                  f"{int(offsets[first])}, but the sequences before it end at byte "
                                  f"{int(starts[wrong[0]])}")
        end = int(starts[-1] + part_lengths[-1] * itemsize)
    return end


def _check_boundaries(idx_path: str, boundaries: np.ndarray, num_sequences: int) -> None:
    """Document boundaries run from 0 to the sequence count without going back (megatron-core's layout)."""
    if len(boundaries) < 2 or boundaries[0] != 0 or boundaries[-1] != num_sequences:
        raise DamagedDataFile(f"{idx_path} is corrupted: its document boundaries must run from 0 to the "
                              f"{num_sequences:,} sequences")
    previous = 0
    for part in _chunks(len(boundaries)):
        values = boundaries[part]
        if (np.diff(values, prepend=previous) < 0).any():
            raise DamagedDataFile(f"{idx_path} is corrupted: its document boundaries decrease near entry "
                                  f"{part.start}")
        previous = int(values[-1])


def _token_windows(num_tokens: int, itemsize: int) -> Iterator[slice]:
    """Every token of a small ``.bin``; :data:`SAMPLE_WINDOWS` evenly spaced windows of a large one."""
    if num_tokens * itemsize <= FULL_SCAN_MAX_BYTES:
        yield from _chunks(num_tokens)
        return
    window = SAMPLE_WINDOW_BYTES // itemsize
    for start in np.linspace(0, num_tokens - window, SAMPLE_WINDOWS).astype(np.int64):
        yield slice(int(start), int(start) + window)


def _check_token_ids(bin_path: str, dtype: Any, num_tokens: int, vocab_size: int, vocab_source: str) -> int:
    """Raise on an id outside [0, vocab_size); returns how many ids were checked."""
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))
    windows = list(_token_windows(num_tokens, np.dtype(dtype).itemsize))
    checked = sum(part.stop - part.start for part in windows)
    coverage = ("every token checked" if checked == num_tokens
                else f"found in a sample of {checked:,} of {num_tokens:,} tokens")
    for part in windows:
        values = tokens[part]
        if int(values.max()) >= vocab_size or int(values.min()) < 0:
            outside = np.flatnonzero((values.astype(np.int64) >= vocab_size) | (values < 0))[0]
            raise DamagedDataFile(f"{bin_path} holds token id {int(values[outside])} at token "
                                  f"{part.start + int(outside):,}, but {vocab_source} ({coverage}): it was "
                                  "tokenized with another vocabulary")
    return checked
