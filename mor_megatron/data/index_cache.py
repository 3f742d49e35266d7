"""megatron-core's on-disk index caches of a dataset prefix: where they live, which are stale, removing them.

``GPTDataset`` caches its document, sample and shuffle indices in ``path_to_cache`` (our ``data.cache_dir``)
or, when that is unset, in ``<prefix>/cache/GPTDataset_indices/`` (megatron-core 0.16
``gpt_dataset.GPTDataset._build_document_sample_shuffle_indices``); ``BlendedDataset`` caches its blend
indices only in ``path_to_cache``. An entry is a few files ``<md5>-<class>-<split>-<name>``, one of them
``...-description.txt``, the JSON the md5 is taken of: the prefix path, sample count, seed, sequence length,
split and tokenizer, but nothing of the data itself. A prefix rewritten in place therefore keeps hitting its
old entries, whose document indices point past the new data (IndexError in the workers).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ENTRY_FILE = re.compile(r"^(?P<key>[0-9a-f]{32}-\w+Dataset-\w+)-description\.txt$")


@dataclass(frozen=True)
class CacheEntry:
    """One cached index: the files ``folder/<key>-*``."""

    folder: Path
    key: str

    @property
    def description(self) -> Path:
        return self.folder / f"{self.key}-description.txt"

    @property
    def pattern(self) -> str:
        """Shell glob of the entry's files, for messages."""
        return str(self.folder / f"{self.key}-*")

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.key}-*"))


def default_cache_dir(prefix: str | Path) -> Path:
    """Where ``GPTDataset`` caches the indices of ``prefix`` when ``data.cache_dir`` is unset."""
    return Path(prefix) / "cache" / "GPTDataset_indices"


def cache_entries(prefix: str | Path, cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """Cached indices built from ``prefix``: those in its default folder and those in ``cache_dir``.

    The default folder belongs to the prefix alone; in a shared ``cache_dir`` an entry counts when its
    description names the prefix (relative paths are taken from the current directory).
    """
    entries = list(_entries_in(default_cache_dir(prefix)))
    if cache_dir is not None:
        target = os.path.realpath(prefix)
        entries += [entry for entry in _entries_in(Path(cache_dir))
                    if target in {os.path.realpath(path) for path in _dataset_paths(entry.description)}]
    return entries


def stale_cache_entries(prefix: str | Path, cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """Entries of ``prefix`` written before its ``.idx`` was (re)written: they index older data."""
    written = Path(f"{prefix}.idx").stat().st_mtime
    return [entry for entry in cache_entries(prefix, cache_dir) if entry.description.stat().st_mtime < written]


def remove_cache_entries(prefix: str | Path, cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """Delete every cached index built from ``prefix``; returns what was removed."""
    entries = cache_entries(prefix, cache_dir)
    for entry in entries:
        for path in entry.files():
            path.unlink(missing_ok=True)
    return entries


def _entries_in(folder: Path) -> Iterator[CacheEntry]:
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        match = _ENTRY_FILE.match(path.name)
        if match:
            yield CacheEntry(folder=folder, key=match["key"])


def _dataset_paths(description: Path) -> set[str]:
    """Every ``dataset_path`` in a description (a blend nests one per dataset); empty if unreadable."""
    try:
        tree = json.loads(description.read_text())
    except (OSError, ValueError):
        return set()
    return set(_values_of("dataset_path", tree))


def _values_of(key: str, tree: Any) -> Iterator[str]:
    if isinstance(tree, dict):
        for name, value in tree.items():
            if name == key and isinstance(value, str):
                yield value
            else:
                yield from _values_of(key, value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _values_of(key, value)
