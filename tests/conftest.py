"""Shared pytest setup: one compute thread per process (CI shares two cores), a clean default dtype per test.

Markers (dist, slow, gpu) are registered in pyproject.toml. Multi-rank tests start their own processes through
``tests/dist/launch.py``; the pytest process itself never joins a process group.
"""

import os
from dataclasses import dataclass
from pathlib import Path

# Before torch is imported, so that OpenMP sizes its pool from it; children spawned by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    """CPU tests stay CPU tests on a GPU machine: unless GPU tests are selected (``-m gpu``), CUDA is hidden from
    this process and from every rank, job and server the tests start (they inherit the environment)."""
    expression = config.option.markexpr or ""
    if "gpu" not in expression or "not gpu" in expression:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True)
def _reset_default_dtype():
    """Restore torch's default dtype after each test, so a test that changes it cannot leak into the next."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


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
