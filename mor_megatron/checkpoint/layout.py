"""Step folders under a ``checkpoint.save_dir``, the same for every backend and for ``mor-convert``::

    step_00000100/      one checkpoint; complete once it holds its backend's marker file (written last)
    step_00000200/
    latest              the newest published step: its number (Megatron) or its folder name (DeepSpeed's tag)

A step is written into ``.tmp_step_<N>/`` and published by :func:`publish`: renamed to ``step_<N>/`` (atomic on
one filesystem), then ``latest`` is replaced (write + rename), then steps beyond ``keep_last`` are deleted. A
crash at any point leaves the previous ``latest`` valid, and a folder without its marker is never loaded.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST_FILE = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir_name(step: int) -> str:
    """Folder that a step is written into before it is published."""
    return f".tmp_{step_dir_name(step)}"


def fresh_tmp_dir(root: Path, step: int) -> Path:
    """An empty ``.tmp_step_<N>`` under ``root`` (the leftovers of a crashed save of that step removed)."""
    tmp = root / tmp_dir_name(step)
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def published_steps(root: Path) -> list[int]:
    """Steps with a ``step_<N>`` folder under ``root``, complete or not, ascending."""
    if not root.is_dir():
        return []
    return sorted(int(match.group(1)) for child in root.iterdir() if (match := _STEP_DIR.match(child.name)))


def complete_steps(root: Path, marker: str) -> list[int]:
    """Published steps whose folder holds ``marker``, the file its backend writes last, ascending."""
    return [step for step in published_steps(root) if (root / step_dir_name(step) / marker).is_file()]


def step_named_by_latest(root: Path) -> int | None:
    """The step in ``root/latest``: a step number, or a ``step_<N>`` folder name (DeepSpeed's tag format)."""
    latest = root / LATEST_FILE
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    match = _STEP_DIR.match(text)
    return int(match.group(1)) if match else (int(text) if text.isdigit() else None)


def find_latest_step(root: Path, marker: str) -> int | None:
    """Step named by ``latest`` if that checkpoint is complete, else the newest complete one, else None."""
    complete = complete_steps(root, marker)
    step = step_named_by_latest(root)
    if step in complete:
        return step
    if step is not None:
        logger.warning("checkpoint pointer %s names step %d, which is not a complete checkpoint; using the "
                       "newest complete one instead", root / LATEST_FILE, step)
    return complete[-1] if complete else None


def resume_candidates(root: Path) -> list[int]:
    """Steps a resume may load, newest first, whether complete or not.

    First the step ``latest`` names (or, without a pointer, the newest ``step_<N>`` folder), then every older
    ``step_<N>`` folder. Incomplete folders stay in the list, so that a damaged newest step is reported instead
    of being passed over in silence (a crash mid-save leaves ``.tmp_step_<N>``, which is never a candidate).
    """
    published = published_steps(root)
    newest = step_named_by_latest(root)
    if newest is None:
        newest = published[-1] if published else None
    if newest is None:
        return []
    return [newest, *(step for step in reversed(published) if step < newest)]


def publish(root: Path, step: int, *, marker: str, keep_last: int, pointer: str) -> Path:
    """One process, after every rank finished ``tmp_dir_name(step)`` and its ``marker``: rename it to
    ``step_<N>``, write ``pointer`` (what ``latest`` holds in the backend's format), purge beyond ``keep_last``."""
    final = root / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(root / tmp_dir_name(step), final)
    tmp_pointer = root / f".{LATEST_FILE}.tmp"
    tmp_pointer.write_text(pointer)
    os.replace(tmp_pointer, root / LATEST_FILE)
    for old in complete_steps(root, marker)[:-keep_last]:
        try:
            shutil.rmtree(root / step_dir_name(old))
        except OSError as err:  # a failed purge costs disk space, not the run
            logger.warning("could not delete old checkpoint step %d: %s", old, err)
    return final
