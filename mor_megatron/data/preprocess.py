"""Tokenize jsonl / parquet / plain-text files into a Megatron ``<prefix>.bin`` / ``<prefix>.idx`` pair.

The equivalent of Megatron-LM's ``tools/preprocess_data.py`` (not shipped in the megatron-core wheel):
documents are tokenized by a pool of worker processes, an end-of-document token is appended to each, and
the parent writes them in input order with megatron-core's ``IndexedDatasetBuilder``, so the output is
identical for any worker count. Beside the pair goes ``<prefix>.meta.json``: which tokenizer (path and
SHA-256) made the ids, so training can refuse a dataset built with another tokenizer.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mor_megatron.data.index_cache import remove_cache_entries
from mor_megatron.data.readers import InputFile, TextUnit, count_records, iter_documents, resolve_inputs
from mor_megatron.data.tokenizer import load_tokenizer, resolve_tokenizer

META_SUFFIX = ".meta.json"
_BATCH_DOCS = 32
"""Documents per worker task: big enough to amortize pickling, small enough to keep the bar moving."""
_WINDOW_PER_WORKER = 4
"""Tasks in flight per worker; bounds memory (Pool.imap would read the whole input ahead)."""

_worker_tokenizer: Any = None
_worker_dtype: Any = None


@dataclass(frozen=True)
class PreprocessStats:
    """What :func:`preprocess` wrote. ``num_tokens`` includes one EOD token per document."""

    prefix: str
    num_documents: int
    num_tokens: int
    num_empty_skipped: int
    seconds: float


def meta_path(prefix: str | Path) -> Path:
    """``<prefix>.meta.json``: the tokenizer record written beside a dataset."""
    return Path(str(prefix) + META_SUFFIX)


def _encode(tokenizer: Any, dtype: Any, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text with the tokenizer's EOD id appended."""
    eod = tokenizer.eod
    return [np.asarray(tokenizer.tokenize(text) + [eod], dtype=dtype) for text in texts]


def _init_worker(tokenizer_path: str, dtype: Any) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = load_tokenizer(tokenizer_path)
    _worker_dtype = dtype


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _encode(_worker_tokenizer, _worker_dtype, texts)


def _batches(documents: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    """Non-empty documents in batches, each with the number of records it consumed (empty ones included)."""
    batch: list[str] = []
    consumed = 0
    for text in documents:
        consumed += 1
        if text.strip():
            batch.append(text)
        if len(batch) == _BATCH_DOCS:
            yield batch, consumed
            batch, consumed = [], 0
    if consumed:
        yield batch, consumed


Encoder = Callable[[Iterator[tuple[list[str], int]]], Iterator[tuple[list[np.ndarray], int]]]


@contextmanager
def _encoder(tokenizer_path: str, dtype: Any, workers: int) -> Iterator[Encoder]:
    """A function mapping document batches to encoded batches in input order.

    With ``workers > 1`` a process pool, started here (before any progress-bar thread exists, since
    forking copies only the calling thread), keeps a bounded window of batches in flight.
    """
    if workers == 1:
        tokenizer = load_tokenizer(tokenizer_path)
        yield lambda batches: ((_encode(tokenizer, dtype, texts), consumed) for texts, consumed in batches)
        return
    # fork (Linux) shares the already-imported tokenizer libraries instead of re-importing torch per worker.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                  initargs=(tokenizer_path, dtype)) as pool:
        def encode(batches: Iterator[tuple[list[str], int]]) -> Iterator[tuple[list[np.ndarray], int]]:
            pending: deque[tuple[Any, int]] = deque()
            for texts, consumed in batches:
                pending.append((pool.apply_async(_encode_in_worker, (texts,)), consumed))
                if len(pending) >= workers * _WINDOW_PER_WORKER:
                    result, done = pending.popleft()
                    yield result.get(), done
            while pending:
                result, done = pending.popleft()
                yield result.get(), done

        yield encode


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path, *, tokenizer: str | Path,
               workers: int = 1, json_key: str = "text", text_unit: TextUnit = "file",
               progress: bool = True, overwrite: bool = False, cache_dir: str | Path | None = None
               ) -> PreprocessStats:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (+ ``.meta.json``) with ``workers`` processes.

    Inputs, the tokenizer, the worker count and the output prefix are checked before any worker starts:
    an existing dataset at ``output_prefix`` raises ``FileExistsError`` unless ``overwrite``. Writing the
    prefix also deletes megatron-core's index caches of earlier data there (its default cache folder, and
    entries naming it in ``cache_dir``, the training config's ``data.cache_dir``): they would index the old
    data, and a run would fail with IndexError. Empty documents are skipped; every other document gets the
    tokenizer's EOD id appended. Token ids are stored as uint16 when the vocabulary fits, else int32
    (megatron's ``DType.optimal_dtype``). The files appear atomically: an interrupted run leaves the
    previous ``<prefix>.bin/.idx`` (or none). A tqdm bar on stderr counts documents.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    prefix = str(output_prefix)
    _refuse_existing_output(prefix, overwrite)
    files = resolve_inputs(inputs, json_key=json_key)
    source = resolve_tokenizer(tokenizer)
    # Imported after the checks above, so bad arguments are refused without loading megatron-core (seconds).
    from megatron.core.datasets.indexed_dataset import DType

    vocab_size = load_tokenizer(source.path).vocab_size
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix + ".tmp"
    tmp_paths = [tmp_prefix + ".bin", tmp_prefix + ".idx", str(meta_path(tmp_prefix))]

    start = time.perf_counter()
    try:
        num_records, num_documents, num_tokens = _write_dataset(
            files, tmp_prefix, tokenizer_path=str(source.path), dtype=DType.optimal_dtype(vocab_size),
            workers=workers, json_key=json_key, text_unit=text_unit,
            progress=f"preprocess {Path(prefix).name}" if progress else None)
        if num_documents == 0:
            raise ValueError(f"inputs {[str(f.path) for f in files]} hold no non-empty documents "
                             f"(text field/column {json_key!r}, text unit {text_unit!r})")
        record = {"tokenizer": str(source.path.resolve()), "tokenizer_sha256": source.sha256(),
                  "vocab_size": vocab_size, "num_documents": num_documents, "num_tokens": num_tokens,
                  "inputs": [str(f.path) for f in files]}
        Path(tmp_paths[2]).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        for path in tmp_paths:
            Path(path).unlink(missing_ok=True)
        raise
    remove_cache_entries(prefix, cache_dir)
    for tmp, final in zip(tmp_paths, (prefix + ".bin", prefix + ".idx", str(meta_path(prefix)))):
        os.replace(tmp, final)
    return PreprocessStats(prefix=prefix, num_documents=num_documents, num_tokens=num_tokens,
                           num_empty_skipped=num_records - num_documents, seconds=time.perf_counter() - start)


def _refuse_existing_output(prefix: str, overwrite: bool) -> None:
    outputs = (prefix + ".bin", prefix + ".idx", str(meta_path(prefix)))
    existing = [path for path in outputs if Path(path).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"output prefix {prefix!r} already holds {', '.join(existing)}; pass --overwrite "
                              "(overwrite=True) to replace them (megatron-core's index caches of that prefix "
                              "are deleted too), or choose another --output-prefix")


def _write_dataset(files: Sequence[InputFile], prefix: str, *, tokenizer_path: str, dtype: Any, workers: int,
                   json_key: str, text_unit: TextUnit, progress: str | None) -> tuple[int, int, int]:
    """Write ``prefix.bin/.idx``; returns (records read, documents written, tokens written).

    ``progress``: the progress bar's label, or None for no bar.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    num_records = num_documents = num_tokens = 0
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    batches = _batches(iter_documents(files, json_key=json_key, text_unit=text_unit))
    try:
        with (_encoder(tokenizer_path, dtype, workers) as encode,
              tqdm(total=count_records(files, text_unit=text_unit), unit="doc", file=sys.stderr,
                   disable=progress is None, desc=progress, dynamic_ncols=True) as bar):
            for arrays, consumed in encode(batches):
                for ids in arrays:
                    builder.add_document(ids, [ids.size])
                    num_tokens += ids.size
                num_documents += len(arrays)
                num_records += consumed
                bar.update(consumed)
                bar.set_postfix(tokens=num_tokens, refresh=False)
            bar.total = bar.n  # the total was an upper bound (newline count)
            bar.refresh()
    except BaseException:
        builder.data_file.close()
        raise
    builder.finalize(prefix + ".idx")
    return num_records, num_documents, num_tokens


def read_meta(prefix: str | Path) -> dict[str, Any] | None:
    """The ``<prefix>.meta.json`` record, or None for a dataset made by another tool."""
    path = meta_path(prefix)
    return json.loads(path.read_text()) if path.is_file() else None
