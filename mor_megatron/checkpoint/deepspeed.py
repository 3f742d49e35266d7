"""DeepSpeed checkpoints of the ZeRO path: what a step folder holds, its ``meta.json``, publishing it.

Folders, ``latest``, atomic publish and keep-last follow :mod:`~mor_megatron.checkpoint.layout`::

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
``save_latest=False``; after a barrier rank 0 writes ``meta.json`` (the completion marker) and publishes.
Before ``meta.json``, ``checksums.json`` records every file (all ranks hash a share); a resume verifies them
and stops at a damaged step unless ``checkpoint.fallback_to_previous`` (as on the Megatron path).
``save_dir`` must be one filesystem that every node sees (as on the Megatron path).

The ``client_state`` stored by DeepSpeed holds the loop state
(:class:`~mor_megatron.checkpoint.loop_state.LoopState`) and the LR scheduler's state dict; ``latest`` keeps
DeepSpeed's meaning, so DeepSpeed's own tools (``zero_to_fp32.py``, ``load_checkpoint(tag=None)``) work on these
folders unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mor_megatron.checkpoint import layout
from mor_megatron.checkpoint.errors import CheckpointError

META_FILE = "meta.json"


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
    step = layout.find_latest_step(path, META_FILE)
    if step is None:
        raise CheckpointError(f"no complete DeepSpeed checkpoint under {path} (looked for step_<N>/{META_FILE})")
    return path / layout.step_dir_name(step)


def publish(root: Path, step: int, meta: dict[str, Any], *, keep_last: int) -> Path:
    """Rank 0, after every rank finished writing ``layout.tmp_dir_name(step)``: write ``meta``, publish."""
    (root / layout.tmp_dir_name(step) / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    # `latest` holds the tag, DeepSpeed's format, so that its own tools find the step.
    return layout.publish(root, step, marker=META_FILE, keep_last=keep_last, pointer=layout.step_dir_name(step))
