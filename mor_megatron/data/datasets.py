"""megatron-core GPT datasets from ``data.blend``, checks that run before any worker, and a resumable loader.

``check_data`` is cheap (no torch, no megatron-core import): run it with the config before starting
workers. ``build_gpt_datasets`` goes through megatron-core's ``BlendedMegatronDatasetBuilder``, which is
distributed-aware when a process group exists (rank 0 writes the index caches first) and builds plainly
when none does. ``build_data_loader`` walks global sample indices from ``consumed_samples`` on, sharded
by data-parallel rank, so a resumed run sees exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mor_megatron.config import ConfigError, DataConfig, TrainConfig
from mor_megatron.data.index_cache import stale_cache_entries
from mor_megatron.data.index_check import (DamagedDataFile, IndexedDatasetSummary, check_indexed_dataset,
                                           read_num_documents)
from mor_megatron.data.preprocess import read_meta
from mor_megatron.data.tokenizer import resolve_tokenizer, tokenizer_vocab_size

if TYPE_CHECKING:
    import torch.utils.data


def parse_blend(blend: Sequence[str], field: str = "data.blend") -> tuple[list[str], list[float] | None]:
    """A blend (``field`` of the config) -> (prefixes, weights or None), as megatron-core's ``GPTDatasetConfig``
    wants it.

    Either all prefixes (``["a", "b"]``: weighted by size) or weight/prefix pairs
    (``["0.7", "a", "0.3", "b"]``); raises ``ConfigError`` for a mix, odd pairs or non-positive weights.
    """
    items = [str(item) for item in blend]
    if not items:
        return [], None
    if not _is_number(items[0]):
        numeric = [item for item in items if _is_number(item)]
        if numeric:
            raise ConfigError(f"{field} mixes prefixes and weights ({numeric} look like weights); use "
                              "either prefixes only or weight/prefix pairs like ['0.7', 'a', '0.3', 'b']")
        return items, None
    if len(items) % 2:
        raise ConfigError(f"{field}={items} has an odd number of entries; weighted blends are "
                          "weight/prefix pairs like ['0.7', 'a', '0.3', 'b']")
    weights, prefixes = items[0::2], items[1::2]
    for weight, prefix in zip(weights, prefixes):
        if not _is_number(weight) or float(weight) <= 0:
            raise ConfigError(f"{field} weight {weight!r} (for prefix {prefix!r}) must be a number > 0")
        if _is_number(prefix):
            raise ConfigError(f"{field} entry {prefix!r} sits where a prefix belongs; weighted blends "
                              "are weight/prefix pairs like ['0.7', 'a', '0.3', 'b']")
    return prefixes, [float(w) for w in weights]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_document_counts(num_documents: int, split: str) -> list[int | None]:
    """Documents of a prefix that land in (train, valid, test) under ``split``; None for a weight-0 split.

    Mirrors megatron-core (``parse_and_normalize_split``, ``convert_split_vector_to_split_matrix`` and
    the rounding in ``BlendedMegatronDatasetBuilder._build_megatron_dataset_splits``) without importing it.
    """
    weights = [float(part) for part in re.findall(r"[.0-9]+", split)]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds = [0.0]
    for weight in weights:
        bounds.append(bounds[-1] + weight / total)
    return [None if end <= begin else int(round(end * num_documents)) - int(round(begin * num_documents))
            for begin, end in zip(bounds[:-1], bounds[1:])]


def _check_split_documents(prefix: str, split: str) -> None:
    """Raise if a split with weight > 0 gets no document: megatron-core's GPTDataset loops forever on it."""
    num_documents = read_num_documents(prefix + ".idx")  # one sequence per document
    for name, count in zip(("train", "valid", "test"), split_document_counts(num_documents, split)):
        if count == 0:
            raise ConfigError(f"data.split={split!r} gives the {name} split 0 of the {num_documents} "
                              f"documents in {prefix!r}; give it a weight of 0 (e.g. '98,2,0'), a larger "
                              "share, or use more documents")


def num_samples_for(train: TrainConfig) -> tuple[int, int, int]:
    """(train, valid, test) sample counts for a run, as Megatron-LM sizes them.

    train: every step's global batch; valid: ``eval_steps`` global batches at each of the
    ``train_steps // eval_interval + 1`` evaluations (``train.eval_mode`` `fixed`: one evaluation's, so the
    shuffled validation set does not depend on ``train_steps``); test: one evaluation.
    """
    global_batch = train.global_batch_size
    evals = 1 if train.eval_mode == "fixed" else train.train_steps // train.eval_interval + 1
    return (train.train_steps * global_batch, evals * train.eval_steps * global_batch,
            train.eval_steps * global_batch)


def check_data(data: DataConfig, vocab_size: int) -> list[IndexedDatasetSummary]:
    """Validate the data section against the model's ``vocab_size``; raises ``ConfigError`` naming the fix.

    Checks: a tokenizer (SentencePiece or Hugging Face) is set, exists and has at most ``vocab_size`` ids;
    ``data.blend`` (and ``valid_blend`` / ``test_blend``) parse and ``data.blend`` names at least one prefix;
    each prefix has its ``.bin`` and ``.idx``, the two agree with each other and
    every token id lies below the tokenizer's size (:mod:`~mor_megatron.data.index_check`); a prefix
    tokenized by ``mor-data preprocess`` was tokenized with this same tokenizer (SHA-256 in
    ``<prefix>.meta.json``); no megatron index cache predates its prefix. Returns one summary per prefix.
    """
    if data.tokenizer is None:
        raise ConfigError("data.tokenizer is not set; train one with `mor-data tokenizer --input CORPUS "
                          "--output-dir DIR --vocab-size N` and set data.tokenizer=DIR/tokenizer.model")
    try:
        source = resolve_tokenizer(data.tokenizer)
        tokenizer_vocab = tokenizer_vocab_size(source.path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={data.tokenizer!r}: {err}") from err
    if tokenizer_vocab > vocab_size:
        raise ConfigError(f"data.tokenizer={data.tokenizer!r} has {tokenizer_vocab} pieces but "
                          f"model.vocab_size={vocab_size}; set model.vocab_size >= {tokenizer_vocab} or "
                          f"train a tokenizer with `mor-data tokenizer --vocab-size {vocab_size}` (then "
                          "re-run preprocess)")
    blends = _blends(data)
    if not blends["data.blend"][0]:
        raise ConfigError("data.blend is empty; make a dataset with `mor-data preprocess --input FILES "
                          f"--tokenizer {source.path} --output-prefix PREFIX` and set data.blend=[PREFIX]")
    per_split = _per_split(data)
    if not per_split and sum(float(part) for part in data.split.split(",")) <= 0:
        raise ConfigError(f"data.split={data.split!r} gives every split weight 0; use e.g. '969,30,1'")
    tokenizer = _TokenizerFacts(source.path, source.sha256(), tokenizer_vocab)
    summaries, seen = [], set()
    for field, (prefixes, _) in blends.items():
        for prefix in prefixes:
            if prefix in seen:
                continue
            seen.add(prefix)
            summaries.append(_check_prefix(prefix, tokenizer, field))
            if not per_split:
                _check_split_documents(prefix, data.split)
            _check_no_stale_cache(prefix, data.cache_dir, tokenizer, field)
    return summaries


def _per_split(data: DataConfig) -> bool:
    """Own validation/test data (Megatron-LM's per-split paths): ``data.blend`` is then all training data."""
    return bool(data.valid_blend or data.test_blend)


def _blends(data: DataConfig) -> dict[str, tuple[list[str], list[float] | None]]:
    """The configured blends by config field, parsed (``data.blend`` always, the per-split ones when set)."""
    fields = {"data.blend": data.blend, "data.valid_blend": data.valid_blend, "data.test_blend": data.test_blend}
    return {field: parse_blend(blend, field) for field, blend in fields.items() if blend or field == "data.blend"}


@dataclass(frozen=True)
class _TokenizerFacts:
    """The configured tokenizer as the prefix checks compare with it."""

    path: Path
    sha256: str
    vocab_size: int

    def remake(self, prefix: str, *, overwrite: bool, cache_dir: str | None = None) -> str:
        """The command that (re)writes ``prefix`` with this tokenizer, for error messages."""
        options = (" --overwrite" if overwrite else "") + (f" --cache-dir {cache_dir}" if cache_dir else "")
        return (f"`mor-data preprocess --input FILES --tokenizer {self.path} --output-prefix {prefix}"
                f"{options}`")


def _check_prefix(prefix: str, tokenizer: _TokenizerFacts, field: str) -> IndexedDatasetSummary:
    missing = [path for path in (prefix + ".bin", prefix + ".idx") if not Path(path).is_file()]
    if missing:
        exists = len(missing) == 1
        raise ConfigError(f"{field} prefix {prefix!r}: {' and '.join(missing)} not found; make them with "
                          f"{tokenizer.remake(prefix, overwrite=exists)}")
    remake = f"re-make them with {tokenizer.remake(prefix, overwrite=True)}"
    try:
        meta = read_meta(prefix)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field} prefix {prefix!r}: unreadable {prefix}.meta.json ({err}); "
                          f"{remake}") from err
    if meta is not None and meta.get("tokenizer_sha256") != tokenizer.sha256:
        raise ConfigError(f"{field} prefix {prefix!r} was tokenized with {meta.get('tokenizer')!r} "
                          f"({meta.get('vocab_size')} pieces), not data.tokenizer="
                          f"{str(tokenizer.path)!r}; point data.tokenizer at that model, or {remake}")
    try:
        return check_indexed_dataset(prefix, vocab_size=tokenizer.vocab_size,
                                     vocab_source=f"data.tokenizer has {tokenizer.vocab_size} pieces")
    except DamagedDataFile as err:
        raise ConfigError(f"{field} prefix {prefix!r}: {err}; {remake}") from None


def _check_no_stale_cache(prefix: str, cache_dir: str | None, tokenizer: _TokenizerFacts, field: str) -> None:
    """Refuse megatron index caches older than the prefix: they index the data it held before."""
    stale = stale_cache_entries(prefix, cache_dir)
    if stale:
        rewrite = tokenizer.remake(prefix, overwrite=True, cache_dir=cache_dir)
        raise ConfigError(f"{field} prefix {prefix!r} was rewritten after megatron-core cached indices "
                          f"of it ({len(stale)} stale, e.g. {stale[0].pattern}), which would index past the "
                          f"new data; delete them with `rm {' '.join(entry.pattern for entry in stale)}`, or "
                          f"rewrite the prefix with {rewrite}")


def build_gpt_datasets(data: DataConfig, *, seq_length: int, num_samples: tuple[int, int, int],
                       tokenizer: Any, is_built_on_rank: Callable[[], bool] | None = None
                       ) -> tuple[Any, Any, Any]:
    """(train, valid, test) megatron-core datasets for ``data.blend`` split by ``data.split``, or, with
    ``data.valid_blend`` / ``data.test_blend``, ``data.blend`` as the training data and those as the others.

    ``tokenizer``: megatron-core's tokenizer (:func:`mor_megatron.data.tokenizer.load_tokenizer`); its
    ``eod`` ends documents and its ``pad`` pads. ``num_samples``: minimum samples per split (see
    :func:`num_samples_for`). ``is_built_on_rank``: with a process group, which ranks build datasets (the
    others get None; it must hold on global rank 0); ignored without one. Index caches go to
    ``data.cache_dir`` (megatron-core's default: ``<prefix>/cache/``). A split with weight 0 (or no blend of
    its own) is None.

    Each sample is a dict of ``tokens`` [s] int64, ``labels`` [s] int64, ``loss_mask`` [s] float,
    ``position_ids`` [s] int64 (restarting after each EOD with ``data.reset_position_ids``), + ``attention_mask``
    [1, s, s] bool, True = masked, with ``data.reset_attention_mask`` (document masking; plain causal training
    needs none). ``data.eod_mask_loss`` zeroes the loss where the input token is EOD. Blends add ``dataset_id``.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blends = _blends(data)
    if not blends["data.blend"][0]:
        raise ConfigError("data.blend is empty; set it to the prefixes written by `mor-data preprocess`")
    if len(num_samples) != 3 or any(not isinstance(n, int) or n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three integers >= 0 (train, valid, test), got {num_samples!r}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if _per_split(data):
        splits = [blends.get(field) for field in ("data.blend", "data.valid_blend", "data.test_blend")]
        sources = dict(blend=None, split=None, blend_per_split=splits)
    else:
        for prefix in blends["data.blend"][0]:
            _check_split_documents(prefix, data.split)
        sources = dict(blend=blends["data.blend"], split=data.split)
    config = GPTDatasetConfig(
        random_seed=data.seed, sequence_length=seq_length, **sources, tokenizer=tokenizer,
        path_to_cache=data.cache_dir, reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask, eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=data.reset_attention_mask)
    builder = _builder_class()(GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), config)
    train, valid, test = builder.build()
    return train, valid, test


def _builder_class() -> type:
    """megatron-core's builder, patched so weighted blends build without a process group.

    megatron-core 0.16.1 ``BlendedDataset._build_indices`` calls ``torch.distributed.get_rank()`` on a
    cache miss whenever ``path_to_cache`` is set, which raises without a process group (``GPTDataset``
    checks ``is_initialized()`` first). Without one, the blend's own (cheap) indices are simply not cached.
    """
    import torch.distributed
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    class _Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls: Any, is_built_on_rank: Callable[[], bool], synchronize_ranks: bool,
                                  *args: Any) -> Any:
            """megatron-core's ``build_generic_dataset``; no blend cache without a process group."""
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                *head, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                args = (*head, config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args)

    return _Builder


class PretrainingSampler:
    """Batch sampler: this data-parallel rank's micro-batches of global sample indices, from a resume point.

    Global indices ``consumed_samples, consumed_samples + 1, ...`` are cut into windows of
    ``micro_batch_size * data_parallel_size``; rank ``r`` takes slice ``[r * mbs, (r + 1) * mbs)`` of each
    window (Megatron-LM's ``MegatronPretrainingSampler``, which megatron-core does not ship). A trailing
    partial window is dropped, so every rank yields the same number of micro-batches. ``consumed_samples``
    counts samples over all ranks (global batches x steps), which makes it the whole resume state.
    """

    def __init__(self, *, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be > 0 (an empty dataset?), got {total_samples}")
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                             f"({data_parallel_size}) must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} is outside [0, {data_parallel_size})")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} is outside the dataset's "
                             f"[0, {total_samples}) samples; the datasets were built for fewer samples than "
                             "the run has consumed (raise train.train_steps, or resume with the config the "
                             "checkpoint was made with)")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    @property
    def _window(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank still yields."""
        return (self.total_samples - self.consumed_samples) // self._window

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for window in range(len(self)):
            first = start + window * self._window
            yield list(range(first, first + self.micro_batch_size))


def build_data_loader(dataset: Any, *, micro_batch_size: int, data_parallel_rank: int,
                      data_parallel_size: int, consumed_samples: int = 0, num_workers: int = 0,
                      pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` yielding this rank's micro-batches from ``consumed_samples`` on.

    Batches are dicts of stacked tensors (``tokens`` [b, s], ...). Resume: rebuild the datasets with the
    same config (same seed, same ``num_samples``), then pass the checkpoint's ``consumed_samples``.
    ``num_workers`` (``data.num_workers``) > 0 loads in background processes.
    """
    import torch.utils.data

    sampler = PretrainingSampler(total_samples=len(dataset), consumed_samples=consumed_samples,
                                 micro_batch_size=micro_batch_size, data_parallel_rank=data_parallel_rank,
                                 data_parallel_size=data_parallel_size)
    # Every iter() of a DataLoader draws its workers' base seed from its generator, by default the global torch
    # RNG. A resumed job builds its loader after the checkpoint's RNG state is restored, so that draw would
    # shift every later dropout mask by one; the samples themselves do not depend on the seed.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(0))
