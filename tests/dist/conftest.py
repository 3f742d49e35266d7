"""Fixtures shared by the multi-process tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TinyData:
    """A small real corpus (Python stdlib text) tokenized for training tests."""

    prefix: Path
    tokenizer: Path

    def overrides(self) -> list[str]:
        """Dotted overrides pointing a config at this data (split with no test documents)."""
        return [f"data.blend=[{self.prefix}]", f"data.tokenizer={self.tokenizer}", "data.split=90,10,0"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    """Corpus -> 512-piece SentencePiece -> .bin/.idx, built once per test session (~10 s)."""
    from mor_megatron.data.corpus import write_stdlib_corpus
    from mor_megatron.data.preprocess import preprocess
    from mor_megatron.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "corpus.jsonl"
    write_stdlib_corpus(corpus, max_mb=1.0)
    model = train_tokenizer([corpus], root / "tokenizer", vocab_size=512)
    preprocess([corpus], root / "stdlib", tokenizer=model, workers=1, progress=False)
    return TinyData(prefix=root / "stdlib", tokenizer=model)
