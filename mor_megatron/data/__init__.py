"""Data pipeline: embedded corpus -> SentencePiece tokenizer -> Megatron .bin/.idx -> GPT datasets -> loader.

Importing this package loads neither torch nor megatron-core; the functions that need them import lazily.

- :mod:`~mor_megatron.data.corpus`: the interpreter's standard library as a deterministic jsonl corpus.
- :mod:`~mor_megatron.data.tokenizer`: train SentencePiece BPE, load megatron-core's tokenizer.
- :mod:`~mor_megatron.data.preprocess`: jsonl / parquet / text -> ``<prefix>.bin/.idx`` with N workers.
- :mod:`~mor_megatron.data.datasets`: ``check_data``, ``build_gpt_datasets``, the resumable loader.
- :mod:`~mor_megatron.data.index_check`: a ``.bin/.idx`` pair checked against itself and the vocabulary.
- :mod:`~mor_megatron.data.index_cache`: megatron-core's cached indices of a prefix (found, judged, removed).
"""

from mor_megatron.data.corpus import write_stdlib_corpus
from mor_megatron.data.datasets import (PretrainingSampler, build_data_loader, build_gpt_datasets, check_data,
                                        num_samples_for, parse_blend)
from mor_megatron.data.preprocess import preprocess
from mor_megatron.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "PretrainingSampler", "build_data_loader", "build_gpt_datasets", "check_data", "load_tokenizer",
    "num_samples_for", "parse_blend", "preprocess", "train_tokenizer", "write_stdlib_corpus",
]
