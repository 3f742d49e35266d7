"""The embedded default corpus: the running interpreter's own standard library, as jsonl.

Every machine that can run mor_megatron has it, offline, so the demo trains on real text (English
docstrings and comments plus Python code) instead of random tokens. One document per ``.py`` file: its
source text, which carries the module, class and function docstrings.

The output is deterministic for a given interpreter: files are ordered by a hash of their path relative
to the stdlib root (a fixed order that, unlike alphabetical order, mixes packages, so a small size cap
still samples the whole library), and the same size cap always selects the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SKIPPED_DIRS = frozenset({
    "test", "tests", "idle_test",            # test suites: repetitive fixtures, not library text
    "site-packages", "dist-packages",        # third-party code differs between machines
    "__pycache__", "lib-dynload",            # bytecode and extension modules
    "encodings",                             # codec tables: hundreds of lines of hex literals per file
})
"""Directory names never entered; ``config-*`` (build files) is skipped too."""

SKIPPED_FILE_PREFIXES = ("_sysconfigdata",)
"""Build-configuration dumps: machine-specific, not prose or code."""


@dataclass(frozen=True)
class CorpusStats:
    """What :func:`write_stdlib_corpus` wrote."""

    path: Path
    num_documents: int
    num_bytes: int
    """UTF-8 size of the document texts (the jsonl file is larger: JSON escaping)."""


def stdlib_root() -> Path:
    """The standard-library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """Candidate ``.py`` files under ``root`` (default: :func:`stdlib_root`), relative, in corpus order."""
    root = stdlib_root() if root is None else root
    found: list[Path] = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("config-"))
        for name in filenames:
            if name.endswith(".py") and not name.startswith(SKIPPED_FILE_PREFIXES):
                found.append(Path(directory, name).relative_to(root))
    return sorted(found, key=lambda rel: (hashlib.sha256(rel.as_posix().encode()).hexdigest(),
                                          rel.as_posix()))


def _read_text(path: Path, max_file_bytes: int) -> str | None:
    """The file's text, or None for a file larger than ``max_file_bytes``, binary, not UTF-8 or blank."""
    if path.stat().st_size > max_file_bytes:
        return None
    raw = path.read_bytes()
    if b"\0" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def write_stdlib_corpus(output: str | Path, *, max_mb: float = 8.0, max_file_kb: float = 256.0,
                        root: Path | None = None) -> CorpusStats:
    """Write the stdlib corpus to ``output`` (jsonl, one ``{"text", "path"}`` object per document).

    ``max_mb`` caps the total UTF-8 text size (MiB): files are taken in corpus order and a file that
    would overflow the cap is passed over for later, smaller ones. ``max_file_kb`` skips huge files
    (e.g. ``pydoc_data/topics.py``, one 740 KiB dict literal). The file is written atomically.
    The default 8 MiB gives about 500 documents on CPython 3.11: a 0.1 % test split (the default
    ``data.split='969,30,1'``) needs at least 500 documents to get one.
    """
    if max_mb <= 0:
        raise ValueError(f"max_mb must be > 0, got {max_mb}")
    root = stdlib_root() if root is None else root
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library directory {str(root)!r} does not exist")
    budget = int(max_mb * 2**20)
    max_file_bytes = int(max_file_kb * 1024)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    num_documents = num_bytes = 0
    with tmp.open("w", encoding="utf-8") as stream:
        for rel in stdlib_source_files(root):
            # On-disk size == UTF-8 size of the decoded text, so the stat check enforces the budget exactly.
            text = _read_text(root / rel, min(max_file_bytes, budget - num_bytes))
            if text is None:
                continue
            stream.write(json.dumps({"text": text, "path": rel.as_posix()}, ensure_ascii=False) + "\n")
            num_documents += 1
            num_bytes += len(text.encode("utf-8"))
    os.replace(tmp, output)
    return CorpusStats(path=output, num_documents=num_documents, num_bytes=num_bytes)
