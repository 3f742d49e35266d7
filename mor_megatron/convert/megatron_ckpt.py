"""Reading and writing mor_megatron ``torch_dist`` checkpoints without building a model (conversion side).

Reading: a checkpoint's tensors are global (un-sharded) in ``dist_checkpointing``'s storage, which is torch's
distributed-checkpoint format, so one process loads any TP/PP/DP layout as plain tensors with torch alone.
Only the model's tensors are read (optimizer state is skipped), and the job config comes from the common
state the trainer writes. Conversions write with the trainer's own
:class:`~mor_megatron.checkpoint.megatron.Checkpointer` (weights only) in :func:`lone_process_group`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mor_megatron.config import ConfigError, JobConfig, ParallelConfig, config_from_dict
from mor_megatron.convert import ConversionError
from mor_megatron.checkpoint.errors import CHECKPOINT_READ_ERRORS
from mor_megatron.checkpoint.integrity import verify_manifest
from mor_megatron.checkpoint.layout import find_latest_step, step_dir_name
from mor_megatron.checkpoint.megatron import COMPLETE_MARKER

_MODEL_ROOTS = ("embedding", "decoder", "output_layer")
_ANCHOR = "embedding.word_embeddings.weight"


@dataclass
class MegatronCheckpoint:
    """Model tensors and metadata of one checkpoint step.

    Attributes:
        path: the step folder.
        config: the job config stored with the checkpoint.
        tensors: global model tensors keyed by GPTModel name (``decoder.layers.0....``).
        step: the training step (loop state).
    """

    path: Path
    config: JobConfig
    tensors: dict[str, torch.Tensor]
    step: int


@contextmanager
def lone_process_group() -> Iterator[Any]:
    """A 1-rank job with megatron-core model-parallel state; yields its ``DistributedContext``.

    Reuses a 1-rank default process group when one exists (e.g. a test launcher's) and leaves it in place;
    otherwise creates a lone gloo group and destroys it on exit.

    Raises:
        ConversionError: more than one rank, or megatron model-parallel state already set up by the caller.
    """
    from mor_megatron.runtime import destroy_distributed, init_distributed

    world_size = dist.get_world_size() if dist.is_initialized() else int(
        os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world_size != 1:
        raise ConversionError(f"conversion runs in one process, but this job has {world_size} ranks; run it "
                              "outside torchrun/srun")
    owns_group = not dist.is_initialized()
    try:
        ctx = init_distributed(ParallelConfig(), seed=0, backend="gloo")
    except RuntimeError as err:
        raise ConversionError(f"cannot set up the conversion process: {err}") from err
    try:
        yield ctx
    finally:
        destroy_distributed(keep_process_group=not owns_group)


def resolve_step_dir(path: str | Path) -> Path:
    """A step folder as given, or the newest complete step of a ``checkpoint.save_dir`` (``latest``).

    Raises:
        ConversionError: no such folder, an incomplete step folder, or a save_dir without a complete step.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"checkpoint {str(path)!r} does not exist or is not a folder")
    if (path / COMPLETE_MARKER).is_file():
        return path
    if path.name.startswith("step_") or path.name.startswith(".tmp_step_"):
        raise ConversionError(f"checkpoint {str(path)!r} is incomplete: no metadata.json (the save did not "
                              "finish); use an earlier step, or the save_dir: its 'latest' names a complete "
                              "one")
    step = find_latest_step(path, COMPLETE_MARKER)
    if step is None:
        raise ConversionError(f"{str(path)!r} is neither a checkpoint step folder (with metadata.json) nor a "
                              "checkpoint.save_dir holding a complete step_XXXXXXXX folder")
    return path / step_dir_name(step)


def check_shard_files(step_dir: Path) -> None:
    """Every shard file the checkpoint's ``.metadata`` refers to exists and is long enough.

    Raises:
        ConversionError: ``.metadata`` is missing or unreadable, or a shard file is missing or truncated
            (the message names the file, its size and the size the metadata needs).
    """
    from torch.distributed.checkpoint import FileSystemReader

    if not (step_dir / ".metadata").is_file():
        raise ConversionError(f"checkpoint {str(step_dir)!r} has no .metadata file: it is not a torch_dist "
                              "checkpoint or it was copied incompletely")
    try:
        storage = FileSystemReader(str(step_dir)).read_metadata().storage_data
    except CHECKPOINT_READ_ERRORS as err:  # torch raises several types for a corrupt metadata file
        raise ConversionError(f"cannot read {str(step_dir / '.metadata')!r}: {err}") from err
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = step_dir / name
        if not shard.is_file():
            raise ConversionError(f"checkpoint {str(step_dir)!r} is missing shard file {name!r} (one of "
                                  f"{len(needed)} listed in .metadata); copy the complete folder")
        actual = shard.stat().st_size
        if actual < size:
            raise ConversionError(f"checkpoint shard {str(shard)!r} is truncated: {actual} bytes, but "
                                  f".metadata needs at least {size}; copy the complete folder")


def _model_key_prefix(keys: list[str], step_dir: Path) -> str:
    """The prefix under which GPTModel's keys are stored ('' for mor_megatron's Checkpointer)."""
    anchors = sorted((k for k in keys if k.endswith(_ANCHOR)), key=len)
    if not anchors:
        raise ConversionError(f"checkpoint {str(step_dir)!r} holds no {_ANCHOR!r}: it is not a GPT model "
                              "checkpoint (or it holds only a pipeline stage without the embedding)")
    return anchors[0][: -len(_ANCHOR)]


def read_checkpoint(path: str | Path) -> MegatronCheckpoint:
    """Load the model tensors and job config of a checkpoint (``path``: step folder or save_dir).

    Reads the tensors with torch's own ``torch.distributed.checkpoint`` and the common state with megatron's
    reader, in this process alone: no process group and no CPU runtime, so a conversion leaves the process as
    it found it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    step_dir = resolve_step_dir(path)
    check_shard_files(step_dir)
    _, problems = verify_manifest(step_dir)  # a checkpoint from before checksums has none to verify
    if problems:
        raise ConversionError(f"checkpoint {str(step_dir)!r} is damaged: {'; '.join(problems)}; convert an "
                              "earlier step or restore the folder from a copy")
    common = _read_common_state(step_dir)
    if not isinstance(common, dict) or "config" not in common:
        raise ConversionError(f"checkpoint {str(step_dir)!r} has no job config in its common state; only "
                              "checkpoints written by mor_megatron's trainer or mor-convert from-hf convert")
    try:
        config = config_from_dict(common["config"])
    except ConfigError as err:
        raise ConversionError(f"the job config stored in {str(step_dir)!r} is invalid: {err}") from err
    metadata = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    tensor_keys = [key for key, meta in metadata.items() if isinstance(meta, TensorStorageMetadata)]
    prefix = _model_key_prefix(tensor_keys, step_dir)
    wanted = {key: torch.empty(metadata[key].size, dtype=metadata[key].properties.dtype)
              for key in tensor_keys
              if key.startswith(prefix) and key[len(prefix):].split(".")[0] in _MODEL_ROOTS}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(wanted, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
    except CHECKPOINT_READ_ERRORS as err:
        raise ConversionError(f"cannot read the model tensors of {str(step_dir)!r}: {err}") from err
    tensors = {key[len(prefix):]: tensor for key, tensor in wanted.items()}
    loop = common.get("loop") or {}
    return MegatronCheckpoint(path=step_dir, config=config, tensors=tensors, step=int(loop.get("step", 0)))


def _read_common_state(step_dir: Path) -> Any:
    """The non-sharded state the trainer saved (a ``common.pt`` file up to megatron-core 0.18, an object inside
    the torch_dist files from 0.19); read by megatron's own reader, which needs no process group."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(str(step_dir))
    except CHECKPOINT_READ_ERRORS as err:  # several types for a missing or corrupt common state
        raise ConversionError(f"cannot read the common state (job config, loop state) of {str(step_dir)!r}: "
                              f"{err}") from err

