"""Training checkpoints: megatron ``torch_dist`` through ``dist_checkpointing``, published atomically.

Layout under ``checkpoint.save_dir``::

    step_00000100/      one complete checkpoint (model, optimizer, scheduler, RNG, loop state)
    step_00000200/
    latest              text: the step of the newest complete checkpoint, written last

Every rank writes its shards into ``.tmp_step_<N>/``; after a barrier rank 0 renames it to ``step_<N>/`` (an
atomic rename on one filesystem), then replaces ``latest``, then deletes checkpoints beyond ``keep_last``. A
crash at any point leaves the previous ``latest`` valid. A step folder counts only if its ``metadata.json``
(written by dist_checkpointing at the end of a save) exists, so a half-written folder is never loaded.

Tensors are stored as global tensors, so a checkpoint saved at one TP (or DP, or distributed-optimizer)
layout loads at another. RNG states are per rank and are restored only when the layout is unchanged.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from mor_megatron.runtime import DistributedContext

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says which and why."""


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
    """Step named by ``latest`` if that checkpoint is complete, else the newest complete one, else None.

    ``latest`` holds a step number, or a ``step_<N>`` folder name (DeepSpeed's tag format)."""
    latest = root / LATEST_FILE
    complete = complete_steps(root, marker)
    if latest.is_file():
        text = latest.read_text().strip()
        match = _STEP_DIR.match(text)
        step = int(match.group(1)) if match else (int(text) if text.isdigit() else None)
        if step in complete:
            return step
        logger.warning("checkpoint pointer %s names %r, which is not a complete checkpoint; using the newest "
                       "complete one instead", latest, text)
    return complete[-1] if complete else None


class Checkpointer:
    """Saves and loads the whole training state of one job (all ranks call every method)."""

    def __init__(self, *, save_dir: str | None, load_dir: str | None, keep_last: int, ctx: DistributedContext):
        self.save_root = Path(save_dir) if save_dir else None
        self.load_root = Path(load_dir) if load_dir else self.save_root
        self.keep_last = keep_last
        self.ctx = ctx

    # -- sharded state -----------------------------------------------------------------------------------------
    def _layout(self) -> dict[str, int]:
        dims = self.ctx.dims
        return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}

    def _sharded_state(self, model_chunks: list, optimizer, is_loading: bool, with_rng: bool) -> dict[str, Any]:
        model_state = {}
        for i, chunk in enumerate(model_chunks):
            module = chunk.module if hasattr(chunk, "module") else chunk
            model_state["model" if len(model_chunks) == 1 else f"model{i}"] = module.sharded_state_dict()
        state: dict[str, Any] = dict(model_state)
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(
                model_state, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        if with_rng:
            dims, ctx = self.ctx.dims, self.ctx
            state["rng_state"] = ShardedObject(
                "rng_state", _rng_state(), global_shape=(dims.pp, dims.tp, dims.dp),
                global_offset=(ctx.pp_rank, ctx.tp_rank, ctx.dp_rank), replica_id=0)
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
        state = self._sharded_state(model_chunks, optimizer, is_loading=False, with_rng=True)
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        state["loop"] = dict(loop.__dict__)
        state["layout"] = self._layout()
        state["config"] = config_dict
        state["weights_only"] = optimizer is None
        dist_checkpointing.save(state, str(tmp))
        dist.barrier()
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
        """The step a resume would load, or None when there is nothing to resume from."""
        return None if self.load_root is None else find_latest_step(self.load_root)

    def load(self, *, model_chunks: list, optimizer, scheduler, step: int | None = None) -> LoopState:
        """Load ``step`` (default: latest) into the model, optimizer and scheduler; return the loop state.

        ``optimizer``/``scheduler`` may be None to load weights only (evaluation, conversion).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {self.load_root}")
        path = self.load_root / step_dir_name(step)
        if not (path / "metadata.json").is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete (no metadata.json)")
        common = dist_checkpointing.load_common_state_dict(str(path))
        if common.get("weights_only"):  # e.g. `mor-convert from-hf` output: an up-training start
            logger.info("checkpoint %s holds model weights only: optimizer and LR schedule start fresh", path)
            optimizer = scheduler = None
        same_layout = common.get("layout") == self._layout()
        if optimizer is not None:
            _materialize_optimizer_state(optimizer)
        state = self._sharded_state(model_chunks, optimizer, is_loading=True, with_rng=same_layout)
        try:
            loaded = dist_checkpointing.load(state, str(path))
        except Exception as err:  # dist_checkpointing raises several types; name the checkpoint in all cases
            raise CheckpointError(f"checkpoint {path} does not fit this model or optimizer: {err}") from err
        for i, chunk in enumerate(model_chunks):
            module = chunk.module if hasattr(chunk, "module") else chunk
            module.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
            _unshare_adam_steps(optimizer)
        if scheduler is not None and loaded.get("scheduler") is not None:
            scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        else:
            logger.warning("checkpoint %s was saved with layout %s, this job runs %s: RNG states not restored",
                           path, common.get("layout"), self._layout())
        return LoopState(**loaded["loop"])


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


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
