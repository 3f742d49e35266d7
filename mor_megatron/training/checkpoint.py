"""Training checkpoints: megatron ``torch_dist`` through ``dist_checkpointing``, published atomically.

Layout under ``checkpoint.save_dir``::

    step_00000100/      one complete checkpoint (model, optimizer, scheduler, RNG, loop state)
    step_00000200/
    latest              text: the step of the newest complete checkpoint, written last

Every rank writes its shards into ``.tmp_step_<N>/``; after a barrier rank 0 renames it to ``step_<N>/`` (an
atomic rename on one filesystem), then replaces ``latest``, then deletes checkpoints beyond ``keep_last``. A
crash at any point leaves the previous ``latest`` valid. A step folder counts only if its ``metadata.json``
(written by dist_checkpointing at the end of a save) exists, so a half-written folder is never loaded.

Before the rename, ``checksums.json`` records the size and checksum of every file (see
:mod:`~mor_megatron.training.checkpoint_integrity`); a load verifies them first. A damaged or incomplete step is
an error naming the folder and the file, or, with ``checkpoint.fallback_to_previous``, a logged fallback to the
newest intact earlier step. A resume also compares the stored config with the job's
(:mod:`~mor_megatron.training.resume_config`).

Tensors are stored as global tensors, so a checkpoint saved at one TP (or DP, or distributed-optimizer)
layout loads at another. RNG states are per rank, stored as tensors (no pickle), and restored only when the
layout is unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from mor_megatron.runtime import DistributedContext
from mor_megatron.training.checkpoint_integrity import damage_report, write_manifest
from mor_megatron.training.resume_config import check_resume_config
from mor_megatron.training.rng_state import restore_rng_state, rng_state_tensors

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST_FILE = "latest"
COMPLETE_MARKER = "metadata.json"

CHECKPOINT_READ_ERRORS = (Exception, CheckpointException)
"""What reading a checkpoint raises. torch's ``CheckpointException`` derives from ``BaseException``, so a plain
``except Exception`` let it past the project's own error message."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says which and why."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint step is incomplete or its files fail their checksums; the message names the files."""


@dataclass
class LoopState:
    """Training-loop state that a resume must restore exactly."""

    step: int = 0
    consumed_samples: int = 0
    train_time_s: float = 0.0
    mlflow_run_id: str | None = None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_steps(root: Path, marker: str = "metadata.json") -> list[int]:
    """Steps with a complete checkpoint under ``root`` (ascending): ``step_<N>`` folders holding ``marker``.

    ``marker`` is the file a backend writes last (dist_checkpointing's ``metadata.json`` by default)."""
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / marker).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_latest_step(root: Path, marker: str = "metadata.json") -> int | None:
    """Step named by ``latest`` if that checkpoint is complete, else the newest complete one, else None."""
    complete = complete_steps(root, marker)
    step = _step_named_by_latest(root)
    if step in complete:
        return step
    if step is not None:
        logger.warning("checkpoint pointer %s names step %d, which is not a complete checkpoint; using the "
                       "newest complete one instead", root / LATEST_FILE, step)
    return complete[-1] if complete else None


def _step_named_by_latest(root: Path) -> int | None:
    """The step in ``root/latest``: a step number, or a ``step_<N>`` folder name (DeepSpeed's tag format)."""
    latest = root / LATEST_FILE
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    match = _STEP_DIR.match(text)
    return int(match.group(1)) if match else (int(text) if text.isdigit() else None)


def resume_candidates(root: Path) -> list[int]:
    """Steps a resume may load, newest first, whether complete or not.

    First the step ``latest`` names (or, without a pointer, the newest ``step_<N>`` folder), then every older
    ``step_<N>`` folder. Incomplete folders stay in the list, so that a damaged newest step is reported instead
    of being passed over in silence (a crash mid-save leaves ``.tmp_step_<N>``, which is never a candidate).
    """
    published = sorted(int(match.group(1)) for child in root.iterdir()
                       if (match := _STEP_DIR.match(child.name))) if root.is_dir() else []
    newest = _step_named_by_latest(root)
    if newest is None:
        newest = published[-1] if published else None
    if newest is None:
        return []
    return [newest, *(step for step in reversed(published) if step < newest)]


def select_intact_step(root: Path, *, marker: str = COMPLETE_MARKER, fallback_to_previous: bool) -> int | None:
    """The step a resume loads: the newest candidate that is complete and passes its checksums.

    Collective when a process group exists (every rank checks a share of the files). A damaged newest step is
    an error unless ``fallback_to_previous``; then each damaged step is logged and the next older one tried.

    Returns:
        The step, or None when ``root`` holds no step folder at all.

    Raises:
        CheckpointDamaged: the newest step is damaged (and no fallback), or every step is.
    """
    candidates = resume_candidates(root)
    for index, step in enumerate(candidates):
        step_dir = root / step_dir_name(step)
        problems = damage_report(step_dir, marker=marker)
        if not problems:
            return step
        if not fallback_to_previous:
            raise CheckpointDamaged(_damage_message(step_dir, problems, has_previous=index + 1 < len(candidates)))
        logger.warning("checkpoint %s is damaged (%s); checkpoint.fallback_to_previous=true: trying the previous "
                       "step", step_dir, "; ".join(problems))
    if candidates:
        raise CheckpointDamaged(f"no intact checkpoint under {root}: steps {candidates} are all damaged or "
                                "incomplete (see the warnings above); start a new checkpoint.save_dir")
    return None


def _damage_message(step_dir: Path, problems: list[str], *, has_previous: bool) -> str:
    fix = ("set checkpoint.fallback_to_previous=true to resume from the newest intact earlier step, or restore "
           "the folder from a copy" if has_previous else "restore the folder from a copy, or start a new "
           "checkpoint.save_dir")
    return f"checkpoint {step_dir} is damaged or incomplete: {'; '.join(problems)}. To go on, {fix}"


class Checkpointer:
    """Saves and loads the whole training state of one job (all ranks call every method)."""

    def __init__(self, *, save_dir: str | None, load_dir: str | None, keep_last: int, ctx: DistributedContext,
                 fallback_to_previous: bool = False, allow_config_change: bool = False):
        self.save_root = Path(save_dir) if save_dir else None
        self.load_root = Path(load_dir) if load_dir else self.save_root
        self.keep_last = keep_last
        self.ctx = ctx
        self.fallback_to_previous = fallback_to_previous
        self.allow_config_change = allow_config_change

    # -- sharded state -----------------------------------------------------------------------------------------
    def _layout(self) -> dict[str, int]:
        dims = self.ctx.dims
        return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}

    def _sharded_state(self, model_chunks: list, optimizer, is_loading: bool,
                       rng: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Model chunks, optimizer and this rank's ``rng`` tensors (None: no RNG) as dist_checkpointing state."""
        model_state = {}
        for i, chunk in enumerate(model_chunks):
            module = chunk.module if hasattr(chunk, "module") else chunk
            model_state["model" if len(model_chunks) == 1 else f"model{i}"] = module.sharded_state_dict()
        state: dict[str, Any] = dict(model_state)
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(
                model_state, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        if rng is not None:
            # One slice per rank of a (pp, tp, dp, ...) tensor: plain tensors, so the load unpickles nothing.
            dims, ctx = self.ctx.dims, self.ctx
            state["rng"] = {key: ShardedTensor.from_rank_offsets(
                f"rng_state.{key}", tensor, (0, ctx.pp_rank, dims.pp), (1, ctx.tp_rank, dims.tp),
                (2, ctx.dp_rank, dims.dp), replica_id=0, prepend_axis_num=3) for key, tensor in rng.items()}
        return state

    # -- save --------------------------------------------------------------------------------------------------
    def save(self, step: int, *, model_chunks: list, optimizer, scheduler, loop: LoopState,
             config_dict: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` and publish it (see the module docstring)."""
        if self.save_root is None:
            raise CheckpointError("checkpoint.save_dir is not set")
        is_writer = dist.get_rank() == 0
        tmp = self.save_root / f".tmp_{step_dir_name(step)}"
        final = self.save_root / step_dir_name(step)
        if is_writer:
            self.save_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        rng = rng_state_tensors()
        state = self._sharded_state(model_chunks, optimizer, is_loading=False, rng=rng)
        state["rng_keys"] = sorted(rng)
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        state["loop"] = dict(loop.__dict__)
        state["layout"] = self._layout()
        state["config"] = config_dict
        state["weights_only"] = optimizer is None
        dist_checkpointing.save(state, str(tmp))
        dist.barrier()
        write_manifest(tmp)  # every rank's files are on disk now; the manifest is part of the commit
        if is_writer:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.save_root / f".{LATEST_FILE}.tmp"
            pointer.write_text(f"{step}\n")
            os.replace(pointer, self.save_root / LATEST_FILE)
            self._purge()
        dist.barrier()
        return final

    def _purge(self) -> None:
        for old in complete_steps(self.save_root)[: -self.keep_last]:
            try:
                shutil.rmtree(self.save_root / step_dir_name(old))
            except OSError as err:  # a failed purge costs disk space, not the run
                logger.warning("could not delete old checkpoint step %d: %s", old, err)

    # -- load --------------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest step a resume would try (not yet verified), or None when there is nothing to resume from."""
        candidates = [] if self.load_root is None else resume_candidates(self.load_root)
        return candidates[0] if candidates else None

    def _step_dir_to_load(self, step: int | None) -> Path:
        """``step``'s folder, verified; default the newest intact step (with the configured fallback)."""
        if self.load_root is None:
            raise CheckpointError("neither checkpoint.load_dir nor checkpoint.save_dir is set")
        if step is None:
            step = select_intact_step(self.load_root, fallback_to_previous=self.fallback_to_previous)
            if step is None:
                raise CheckpointError(f"no checkpoint under {self.load_root}")
            return self.load_root / step_dir_name(step)
        path = self.load_root / step_dir_name(step)
        problems = damage_report(path, marker=COMPLETE_MARKER)
        if problems:
            raise CheckpointDamaged(_damage_message(path, problems, has_previous=False))
        return path

    def load(self, *, model_chunks: list, optimizer, scheduler, step: int | None = None,
             current_config: dict[str, Any] | None = None) -> LoopState:
        """Load ``step`` (default: latest) into the model, optimizer and scheduler; return the loop state.

        ``optimizer``/``scheduler`` may be None to load weights only (evaluation, conversion).
        ``current_config``: the resuming job's config, compared with the stored one (see ``resume_config``).

        Raises:
            CheckpointDamaged: the step is incomplete or fails its checksums (names the files).
            ConfigChangedOnResume: model or routing fields differ from ``current_config``.
            CheckpointError: no checkpoint, or one that does not fit the model or optimizer.
        """
        path = self._step_dir_to_load(step)
        try:
            common = dist_checkpointing.load_common_state_dict(str(path))
        except CHECKPOINT_READ_ERRORS as err:
            raise CheckpointError(f"cannot read the common state (config, loop state) of checkpoint {path}: "
                                  f"{err}") from err
        if current_config is not None:
            check_resume_config(common.get("config") or {}, current_config, checkpoint=str(path),
                                step=common["loop"]["step"], allow_change=self.allow_config_change)
        if common.get("weights_only"):  # e.g. `mor-convert from-hf` output: an up-training start
            logger.info("checkpoint %s holds model weights only: optimizer and LR schedule start fresh", path)
            optimizer = scheduler = None
        rng = self._rng_to_restore(common, path)
        if optimizer is not None:
            _materialize_optimizer_state(optimizer)
        state = self._sharded_state(model_chunks, optimizer, is_loading=True, rng=rng)
        try:
            loaded = dist_checkpointing.load(state, str(path))
        except CHECKPOINT_READ_ERRORS as err:  # several types; name the checkpoint in all cases
            raise CheckpointError(f"checkpoint {path} does not fit this model or optimizer: {err}") from err
        for i, chunk in enumerate(model_chunks):
            module = chunk.module if hasattr(chunk, "module") else chunk
            module.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
            _unshare_adam_steps(optimizer)
        if scheduler is not None and loaded.get("scheduler") is not None:
            scheduler.load_state_dict(loaded["scheduler"])
        if rng is not None:
            restore_rng_state(loaded["rng"])
        return LoopState(**loaded["loop"])

    def _rng_to_restore(self, common: dict[str, Any], path: Path) -> dict[str, torch.Tensor] | None:
        """Load targets for the stored RNG tensors of this rank, or None when they cannot be restored."""
        if common.get("layout") != self._layout():
            logger.warning("checkpoint %s was saved with layout %s, this job runs %s: RNG states not restored",
                           path, common.get("layout"), self._layout())
            return None
        stored = set(common.get("rng_keys") or ())
        if not stored:  # also weights-only checkpoints
            logger.warning("checkpoint %s holds no RNG state tensors: RNG states not restored", path)
            return None
        return {key: tensor for key, tensor in rng_state_tensors().items() if key in stored}


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam state so that its sharded state dict can be built for loading.

    megatron's DistributedOptimizer reads the Adam ``step`` of every parameter to describe its state (and asserts
    there is exactly one); a never-stepped torch AdamW has none. The zeros are overwritten by the load. (megatron's
    own ``_init_optimizer_states_with_dummy_values`` takes a real step instead, which applies weight decay.)
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor after a load.

    Without Apex or Transformer Engine, megatron-core 0.16.1 ``DistributedOptimizer.load_state_dict`` puts one
    ``step`` tensor into the state of every parameter, and torch's AdamW increments each parameter's step in
    place, so the shared counter advanced once per parameter per optimizer step (4 -> 10 after one step on a
    tiny model): bias correction went wrong and a resumed run left the uninterrupted one from its second step.
    """
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in part.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
