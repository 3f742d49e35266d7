"""DeepSpeed checkpoints of the ZeRO path: layout on disk, atomic publish, ``latest`` and keep-last.

Layout under ``checkpoint.save_dir``::

    step_00000100/          one complete checkpoint: DeepSpeed's own files, written by engine.save_checkpoint
        mp_rank_<tp>_model_states.pt                (stage 1-2; per TP rank)   module + client_state
        zero_pp_rank_<dp>_mp_rank_<tp>_model_states.pt    (stage 3; per rank)
        *zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt   (per rank) fp32 master partitions + Adam state
        rng_state_<rank>.pt                         per-rank RNG state as tensors (loaded weights-only)
        checksums.json                              size and checksum of every file above
        meta.json                                   step, layout, loop state, the job's config: written last
    step_00000200/
    latest                  text: the tag (``step_00000200``) of the newest complete checkpoint, DeepSpeed's format
    zero_to_fp32.py         DeepSpeed's recovery script (copied by DeepSpeed)

DeepSpeed writes ``latest`` on rank 0 *before* its final barrier, i.e. possibly while other ranks still write
their partitions, and into the final folder directly. Here every rank saves into ``.tmp_step_<N>/`` with
``save_latest=False``; after a barrier rank 0 writes ``meta.json``, renames the folder to ``step_<N>/`` (atomic
on one filesystem), replaces ``latest`` (write + rename) and deletes checkpoints beyond ``keep_last``. A folder
counts as complete only with its ``meta.json``, so a crash at any point leaves the previous ``latest`` valid.
Before ``meta.json``, ``checksums.json`` records every file (all ranks hash a share); a resume verifies them
and stops at a damaged step unless ``checkpoint.fallback_to_previous`` (as on the Megatron path).
``save_dir`` must be one filesystem that every node sees (as on the Megatron path).

The ``client_state`` stored by DeepSpeed holds the loop state (:class:`~mor_megatron.training.checkpoint.LoopState`)
and the LR scheduler's state dict; ``latest`` keeps DeepSpeed's meaning, so DeepSpeed's own tools
(``zero_to_fp32.py``, ``load_checkpoint(tag=None)``) work on these folders unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mor_megatron.training import checkpoint
from mor_megatron.training.checkpoint import LATEST_FILE, CheckpointError, step_dir_name

logger = logging.getLogger(__name__)

META_FILE = "meta.json"


def tmp_tag(step: int) -> str:
    """Folder name that a checkpoint is written under before it is published."""
    return f".tmp_{step_dir_name(step)}"


def complete_steps(root: Path) -> list[int]:
    """Steps with a complete DeepSpeed checkpoint (a ``step_<N>`` folder holding ``meta.json``), ascending."""
    return checkpoint.complete_steps(root, META_FILE)


def find_latest_step(root: Path) -> int | None:
    """Step named by ``latest`` if that checkpoint is complete, else the newest complete one, else None."""
    return checkpoint.find_latest_step(root, META_FILE)


def select_intact_step(root: Path, *, fallback_to_previous: bool) -> int | None:
    """The step a resume loads: newest complete one that passes its checksums (collective; see
    :func:`mor_megatron.training.checkpoint.select_intact_step`)."""
    return checkpoint.select_intact_step(root, marker=META_FILE, fallback_to_previous=fallback_to_previous)


def read_meta(step_dir: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder: ``step``, ``layout``, ``loop``, ``config``.

    Raises:
        CheckpointError: the folder is not a complete checkpoint of the DeepSpeed path.
    """
    path = step_dir / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{step_dir} is not a complete DeepSpeed checkpoint of mor_megatron (no {META_FILE}); "
                              "pass the folder of one step, e.g. <save_dir>/step_00000100, or <save_dir> for its "
                              "latest")
    return json.loads(path.read_text())


def resolve_step_dir(path: str | Path) -> Path:
    """A checkpoint folder from either a ``save_dir`` (its latest complete step) or one ``step_<N>`` folder.

    Raises:
        CheckpointError: no complete checkpoint there.
    """
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    step = find_latest_step(path)
    if step is None:
        raise CheckpointError(f"no complete DeepSpeed checkpoint under {path} (looked for step_<N>/{META_FILE})")
    return path / step_dir_name(step)


def publish(root: Path, step: int, meta: dict[str, Any], *, keep_last: int) -> Path:
    """Rank 0, after every rank finished writing ``tmp_tag(step)``: mark complete, rename, point ``latest``, purge."""
    tmp = root / tmp_tag(step)
    final = root / step_dir_name(step)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST_FILE}.tmp"
    pointer.write_text(step_dir_name(step))
    os.replace(pointer, root / LATEST_FILE)
    for old in complete_steps(root)[:-keep_last]:
        try:
            shutil.rmtree(root / step_dir_name(old))
        except OSError as err:  # a failed purge costs disk space, not the run
            logger.warning("could not delete old checkpoint step %d: %s", old, err)
    return final
