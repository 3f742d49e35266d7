"""Training checkpoints of the Megatron backend: ``torch_dist`` through ``dist_checkpointing``.

Every rank writes its shards into ``.tmp_step_<N>/``, then rank 0 publishes it
(:mod:`~mor_megatron.checkpoint.layout`); a step is complete once dist_checkpointing wrote its ``metadata.json``.
Before publishing, ``checksums.json`` records the size and checksum of every file (see
:mod:`~mor_megatron.checkpoint.integrity`); a load verifies them first. A damaged or incomplete step is an error
naming the folder and the file, or, with ``checkpoint.fallback_to_previous``, a logged fallback to the newest
intact earlier step. A resume also compares the stored config with the job's
(:mod:`~mor_megatron.checkpoint.resume_config`).

Tensors are stored as global tensors, so a checkpoint saved at one TP (or DP, or distributed-optimizer)
layout loads at another. RNG states are per rank, stored as tensors (no pickle), and restored only when the
layout is unchanged. A weights-only checkpoint (also what ``mor-convert`` writes) stores the LR schedule's step
instead of its state, so training from it continues the schedule where the loop continues.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from mor_megatron.checkpoint import layout
from mor_megatron.checkpoint.errors import CHECKPOINT_READ_ERRORS, CheckpointError
from mor_megatron.checkpoint.integrity import (CheckpointDamaged, damage_message, damage_report,
                                               select_intact_step, write_manifest)
from mor_megatron.checkpoint.loop_state import LoopState
from mor_megatron.checkpoint.resume_config import check_resume_config
from mor_megatron.checkpoint.rng_state import restore_rng_state, rng_state_tensors
from mor_megatron.runtime import DistributedContext

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "metadata.json"


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
             config_dict: dict[str, Any], source: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint of ``step`` and publish it (see the module docstring).

        ``optimizer`` None: weights only. ``source``: where converted weights came from (``mor-convert``); a
        conversion stores no RNG state, which would be the converting process's rather than the training job's.
        """
        if self.save_root is None:
            raise CheckpointError("checkpoint.save_dir is not set")
        is_writer = dist.get_rank() == 0
        if is_writer:
            layout.fresh_tmp_dir(self.save_root, step)
        dist.barrier()
        rng = rng_state_tensors() if source is None else None
        state = self._sharded_state(model_chunks, optimizer, is_loading=False, rng=rng)
        state["rng_keys"] = sorted(rng or ())
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        state["loop"] = dict(loop.__dict__)
        state["layout"] = self._layout()
        state["config"] = config_dict
        state["weights_only"] = optimizer is None
        if optimizer is None:  # both backends step the LR schedule once per optimizer step, i.e. once per loop step
            state["scheduler_step"] = loop.step
        if source is not None:
            state["source"] = source
        tmp = self.save_root / layout.tmp_dir_name(step)
        dist_checkpointing.save(state, str(tmp))
        dist.barrier()
        write_manifest(tmp)  # every rank's files are on disk now; the manifest is part of the commit
        if is_writer:
            layout.publish(self.save_root, step, marker=COMPLETE_MARKER, keep_last=self.keep_last,
                           pointer=f"{step}\n")
        dist.barrier()
        return self.save_root / layout.step_dir_name(step)

    # -- load --------------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest step a resume would try (not yet verified), or None when there is nothing to resume from."""
        candidates = [] if self.load_root is None else layout.resume_candidates(self.load_root)
        return candidates[0] if candidates else None

    def _step_dir_to_load(self, step: int | None) -> Path:
        """``step``'s folder, verified; default the newest intact step (with the configured fallback)."""
        if self.load_root is None:
            raise CheckpointError("neither checkpoint.load_dir nor checkpoint.save_dir is set")
        if step is None:
            step = select_intact_step(self.load_root, marker=COMPLETE_MARKER,
                                      fallback_to_previous=self.fallback_to_previous)
            if step is None:
                raise CheckpointError(f"no checkpoint under {self.load_root}")
            return self.load_root / layout.step_dir_name(step)
        path = self.load_root / layout.step_dir_name(step)
        problems = damage_report(path, marker=COMPLETE_MARKER)
        if problems:
            raise CheckpointDamaged(damage_message(path, problems, has_previous=False))
        return path

    def load(self, *, model_chunks: list, optimizer, scheduler, step: int | None = None,
             current_config: dict[str, Any] | None = None) -> LoopState:
        """Load ``step`` (default: latest) into the model, optimizer and scheduler; return the loop state.

        ``optimizer``/``scheduler`` may be None to load weights only (evaluation, conversion). A weights-only
        checkpoint leaves the optimizer fresh and sets ``scheduler`` to its stored step.
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
        if common.get("weights_only"):  # e.g. `mor-convert` output
            logger.info("checkpoint %s holds model weights only: the optimizer starts fresh, the LR schedule at "
                        "step %d", path, common.get("scheduler_step", 0))
            optimizer = None
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
        if scheduler is not None:  # weights only: the job's own schedule at the stored step (0 if none stored)
            scheduler.load_state_dict(loaded.get("scheduler") or {**scheduler.state_dict(),
                                                                   "num_steps": loaded.get("scheduler_step", 0)})
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
        if not stored:  # also converted checkpoints
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
