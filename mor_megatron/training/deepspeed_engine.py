"""The DeepSpeed ZeRO training backend: the MoR model in ``deepspeed.initialize``, ZeRO stages 1-3, TP through an mpu.

Same model, data, loss, optimizer grouping and LR schedule as :class:`~mor_megatron.training.megatron_engine.
MegatronEngine`, so that the two backends give the same losses from the same initial weights:

* model: built exactly like the Megatron path (same config, same seed, CPU initialisation on CPU), so both start
  from the same weights. ZeRO-3 partitions the built module in ``deepspeed.initialize`` (no ``zero.Init``):
  parameters reused R times per forward (the shared recursion block) are gathered on every use and released
  after it, and the router weights, read through methods rather than module calls, are registered by DeepSpeed
  as external parameters of the decoder on first use.
* optimizer: AdamW over megatron-core's own parameter groups (no weight decay on 1-D parameters and biases), built
  by DeepSpeed from the ``optimizer`` section that :mod:`~mor_megatron.training.deepspeed_config` writes.
* schedule: megatron-core's ``OptimizerParamScheduler`` on the ZeRO optimizer's param groups, stepped once per
  optimizer step after it, exactly as on the Megatron path (DeepSpeed never sees it).
* loss: the masked mean per micro-batch; ``engine.backward`` divides it by the gradient-accumulation steps and
  the router losses get ``1 / num_microbatches`` in backward, as megatron's schedules do.
* tensor parallelism: :class:`MegatronMpu` gives DeepSpeed megatron-core's TP and DP groups (gradient
  all-reduce and ZeRO partitions over DP, the grad norm over TP). Pipeline parallelism is refused.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mor_megatron.config import JobConfig, config_to_dict
from mor_megatron.model.builder import build_model, transformer_config
from mor_megatron.model.gpt import MoRGPTModel
from mor_megatron.runtime import DistributedContext
from mor_megatron.tracking import metrics as M
from mor_megatron.checkpoint import deepspeed as ds_ckpt, layout
from mor_megatron.checkpoint.errors import CHECKPOINT_READ_ERRORS, CheckpointError
from mor_megatron.checkpoint.integrity import select_intact_step, write_manifest
from mor_megatron.checkpoint.loop_state import LoopState
from mor_megatron.checkpoint.resume_config import check_resume_config
from mor_megatron.checkpoint.rng_state import restore_rng_state, rng_state_tensors
from mor_megatron.training.deepspeed_config import build_deepspeed_config, write_deepspeed_config
from mor_megatron.training.engine import Batches
from mor_megatron.training.optimizer import build_scheduler
from mor_megatron.training.step import (masked_mean_loss, mean_over_world, move_batch, num_microbatches,
                                       resolve_params_dtype, step_metrics)

logger = logging.getLogger(__name__)


class MegatronMpu:
    """The ``mpu`` that DeepSpeed expects, over megatron-core's process groups (legacy "model parallel" = TP).

    DeepSpeed 0.19 calls ``get_model_parallel_{rank,world_size,group}`` (which megatron-core 0.16 no longer has,
    and whose megatron-core ``get_model_parallel_group`` would be TP x PP), the data-parallel and tensor-parallel
    getters, and the pipeline getters for checkpoint names. With PP = 1 model parallel means tensor parallel.
    """

    def __init__(self, pg_collection):
        self._tp, self._dp, self._pp = pg_collection.tp, pg_collection.dp, pg_collection.pp

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self._tp)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._tp)

    def get_model_parallel_group(self):
        return self._tp

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group."""
        return dist.get_global_rank(self._tp, 0)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._dp)

    def get_pipeline_model_parallel_rank(self) -> int:
        return dist.get_rank(self._pp)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._pp)

    def get_pipeline_model_parallel_group(self):
        return self._pp


def import_deepspeed(device: torch.device, local_rank: int):
    """Import DeepSpeed for ``device`` and join the existing process group; returns the ``deepspeed`` module.

    DeepSpeed insists on ``LOCAL_RANK`` in the environment, which a single process or ``srun`` without torchrun
    does not set; it is set from the launcher environment that :mod:`mor_megatron.runtime` already read.

    On CPU: ``DS_ACCELERATOR=cpu`` (unless set), and DeepSpeed's shared-memory communication op is not built.
    DeepSpeed compiles that C++ op (about a minute on two cores) every time its communication backend starts on
    CPU, and it serves only ``inference_all_reduce`` (AutoTP inference), which training never calls; without a
    compiler the build would even fail the job. The optimizer ops are avoided too (torch AdamW, see
    :mod:`~mor_megatron.training.deepspeed_config`); only ``deepspeed.offload`` builds ``cpu_adam`` once, into
    ``TORCH_EXTENSIONS_DIR`` (tools/launch_deepspeed.sh points it at the repository's ``.cache/``).
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    import deepspeed

    if device.type == "cpu":
        # `import deepspeed.comm.torch as m` would bind the torch package (deepspeed.comm re-exports it).
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    return deepspeed


def megatron_param_groups(model: torch.nn.Module, config: JobConfig) -> list[dict[str, Any]]:
    """megatron-core's optimizer parameter groups for ``model`` (the Megatron path's grouping, by construction).

    Keys besides ``params``: ``wd_mult`` (0 for 1-D parameters and biases), ``lr_mult``, ``max_lr``,
    ``min_lr``, which megatron's ``OptimizerParamScheduler`` reads. Collective (megatron aligns the groups
    across ranks).
    """
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups, get_standard_config_overrides

    optim = config.optim
    mcore = OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps)
    # What get_megatron_optimizer does (megatron-core 0.16.1 to 0.19; _get_param_groups is private). The standard
    # overrides (no weight decay on biases and 1-D parameters) are passed explicitly: from 0.19 on,
    # _get_param_groups no longer applies them for `None`.
    return _get_param_groups([model], mcore, get_standard_config_overrides(mcore))


class DeepSpeedEngine:
    """The MoR model in a DeepSpeed engine (ZeRO stage from the config), satisfying the Engine protocol.

    Args:
        config: the job's config (``deepspeed`` section: JSON, stage override, offload).
        ctx: from :func:`mor_megatron.runtime.init_distributed` (process group and megatron groups exist).

    Raises:
        ConfigError: the DeepSpeed JSON conflicts with the config (see ``deepspeed_config``).
    """

    def __init__(self, config: JobConfig, ctx: DistributedContext):
        self.config = config
        self.ctx = ctx
        self.params_dtype = resolve_params_dtype(config.train.precision, ctx.device)
        self.num_microbatches = num_microbatches(config, ctx.dims.dp)
        self.ds_config = build_deepspeed_config(config, data_parallel_size=ctx.dims.dp, device_type=ctx.device.type)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        deepspeed = import_deepspeed(ctx.device, ctx.local_rank)
        module = self._build_model()
        self.ds, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=megatron_param_groups(module, config), mpu=MegatronMpu(ctx.pg_collection),
            config=self.ds_config, dist_init_required=False)
        self.scheduler = build_scheduler(config.optim, self.ds.optimizer, train_steps=config.train.train_steps)
        ckpt = config.checkpoint
        self.save_root = Path(ckpt.save_dir) if ckpt.save_dir else None
        self.load_root = Path(ckpt.load_dir) if ckpt.load_dir else self.save_root
        if self.is_logging_rank:
            write_deepspeed_config(self.ds_config, Path(config.output_dir) / "deepspeed_config.json")

    def _build_model(self) -> torch.nn.Module:
        """The MoR model as on the Megatron path (same seed state, same init), Float16Module-wrapped for bf16."""
        from megatron.core.transformer.module import Float16Module

        cfg = self.config
        mcore_config = transformer_config(cfg.model, cfg.recursion, cfg.parallel, params_dtype=self.params_dtype,
                                          use_cpu_initialization=self.ctx.device.type == "cpu",
                                          recompute=cfg.train.recompute)
        model = build_model(cfg.model, cfg.recursion, mcore_config, pg_collection=self.ctx.pg_collection,
                            recompute_recursions=cfg.train.recompute_recursions)
        model.set_aux_loss_scale(1.0 / self.num_microbatches)
        model.to(self.ctx.device)
        return Float16Module(mcore_config, model) if self.params_dtype == torch.bfloat16 else model

    # -- Engine protocol ---------------------------------------------------------------------------------------
    @property
    def model(self) -> MoRGPTModel:
        """The MoR model inside the DeepSpeed engine (under ZeRO-3 its parameters are partitions)."""
        module = self.ds.module
        return module if isinstance(module, MoRGPTModel) else module.module  # bf16: inside Float16Module

    @property
    def is_logging_rank(self) -> bool:
        """Data-parallel and tensor-parallel rank 0 (there is no pipeline on this path)."""
        return self.ctx.dp_rank == 0 and self.ctx.tp_rank == 0

    def held_parameters(self) -> tuple[int, int]:
        """Full parameter sizes also under ZeRO-3, whose parameters hold only their partition (``ds_numel``)."""
        return M.held_parameters(self.model.parameters(), lambda param: getattr(param, "ds_numel", param.numel()))

    @property
    def model_runs_alone(self) -> bool:
        """ZeRO-3 gathers parameters through the DeepSpeed engine's own forward; stages 1-2 hold them whole."""
        return self.zero_stage != 3

    def run_artifacts(self) -> dict[str, str]:
        """The JSON DeepSpeed actually ran with (batch sizes and precision filled in)."""
        return {"deepspeed_config.json": json.dumps(self.ds_config, indent=2)}

    def _micro_batch_loss(self, batch: dict[str, torch.Tensor], routing_mode: str) -> torch.Tensor:
        batch = move_batch(batch, self.ctx.device)
        per_token = self.ds(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                            labels=batch["labels"], routing_mode=routing_mode)
        loss, _ = masked_mean_loss(batch["loss_mask"], per_token)
        return loss

    def train_step(self, batches: Batches) -> dict[str, float]:
        """One optimizer step over ``num_microbatches`` micro-batches per rank (see the Engine protocol)."""
        self.ds.train()
        losses = []
        for _ in range(self.num_microbatches):
            loss = self._micro_batch_loss(next(batches), "topk")
            self.ds.backward(loss)
            self.ds.step()  # an optimizer step only at the gradient-accumulation boundary (the last micro-batch)
            losses.append(float(loss.detach()))
        grad_norm = self.ds.get_global_grad_norm()
        self.scheduler.step(increment=1)
        self.model.update_router_bias(self.config.recursion.bias_update_rate, self.ctx.pg_collection.dp)
        return step_metrics(losses, grad_norm, self.ds.optimizer.param_groups[0]["lr"], self.config,
                            self.ctx.device)

    def eval_loss(self, batches: Batches, *, num_batches: int, routing_mode: str) -> float:
        """Mean LM loss over ``num_batches`` global batches, forward only (see the Engine protocol)."""
        self.ds.eval()
        with torch.no_grad():
            losses = [float(self._micro_batch_loss(next(batches), routing_mode))
                      for _ in range(num_batches * self.num_microbatches)]
        if self.zero_stage == 3:
            # ZeRO-3 keeps parameters that its (training) trace expects back in a backward pass gathered after
            # their forward; evaluation never runs that backward, so they would stay gathered until training
            # resumes. Release them now (the trace itself stays valid).
            self.ds.empty_partition_cache()
        return mean_over_world(losses, self.ctx.device)

    def _layout(self) -> dict[str, int]:
        dims = self.ctx.dims
        return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero_stage": self.zero_stage}

    def save(self, step: int, loop: LoopState, config_dict: dict[str, Any]) -> str:
        """DeepSpeed checkpoint of ``step`` (see :mod:`~mor_megatron.checkpoint.deepspeed`)."""
        if self.save_root is None:
            raise CheckpointError("checkpoint.save_dir is not set")
        tag = layout.tmp_dir_name(step)
        is_writer = dist.get_rank() == 0
        if is_writer:
            layout.fresh_tmp_dir(self.save_root, step)
        dist.barrier()
        loop_state = dict(loop.__dict__)
        self.ds.save_checkpoint(str(self.save_root), tag=tag, save_latest=False,
                                client_state={"loop": loop_state, "scheduler": self.scheduler.state_dict()})
        torch.save(rng_state_tensors(), self.save_root / tag / f"rng_state_{dist.get_rank():05d}.pt")
        dist.barrier()
        write_manifest(self.save_root / tag)  # every rank's files are on disk; meta.json, written next, is the marker
        final = self.save_root / layout.step_dir_name(step)
        if is_writer:
            meta = {"step": step, "layout": self._layout(), "loop": loop_state, "config": config_dict}
            ds_ckpt.publish(self.save_root, step, meta, keep_last=self.config.checkpoint.keep_last)
        dist.barrier()
        return str(final)

    def resume(self) -> LoopState | None:
        """Load the latest intact checkpoint under ``checkpoint.load_dir`` (default ``save_dir``).

        Raises:
            CheckpointDamaged: the newest step fails its checksums or is incomplete (see
                ``checkpoint.fallback_to_previous``).
            ConfigChangedOnResume: model or routing fields differ from the stored config.
            CheckpointError: it was saved with another TP/DP layout or across the ZeRO-3 boundary (ZeRO
                partitions are tied to both); convert it with ``mor_megatron.convert.deepspeed_to_megatron``.
        """
        step = None if self.load_root is None else select_intact_step(
            self.load_root, marker=ds_ckpt.META_FILE, fallback_to_previous=self.config.checkpoint.fallback_to_previous)
        if step is None:
            return None
        step_dir = self.load_root / layout.step_dir_name(step)
        meta = ds_ckpt.read_meta(step_dir)
        check_resume_config(meta.get("config") or {}, config_to_dict(self.config), checkpoint=str(step_dir),
                            step=step, allow_change=self.config.checkpoint.allow_config_change)
        saved = meta["layout"]
        now = self._layout()
        if (saved["tp"], saved["dp"], saved["zero_stage"] == 3) != (now["tp"], now["dp"], now["zero_stage"] == 3):
            raise CheckpointError(
                f"checkpoint {step_dir} was saved with tp={saved['tp']}, dp={saved['dp']}, ZeRO stage "
                f"{saved['zero_stage']}; this job runs tp={now['tp']}, dp={now['dp']}, ZeRO stage {now['zero_stage']}. "
                "DeepSpeed's partitions only load into the same layout: relaunch with it, or convert the checkpoint "
                "(python -m mor_megatron.convert.deepspeed_to_megatron) and continue on the Megatron path")
        try:
            _, client_state = self.ds.load_checkpoint(str(self.load_root), tag=layout.step_dir_name(step),
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
        except CHECKPOINT_READ_ERRORS as err:  # several types; name the checkpoint in all cases
            raise CheckpointError(f"DeepSpeed could not load checkpoint {step_dir}: {err}") from err
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {step_dir}")
        self.scheduler.load_state_dict(client_state["scheduler"])
        self._restore_rng(step_dir / f"rng_state_{dist.get_rank():05d}.pt")
        return LoopState(**client_state["loop"])

    @staticmethod
    def _restore_rng(rng_file: Path) -> None:
        """RNG tensors of this rank, read weights-only (a checkpoint file never runs code on load)."""
        try:
            state = torch.load(rng_file, weights_only=True)
        except CHECKPOINT_READ_ERRORS as err:  # e.g. a pickled state from before RNG tensors
            logger.warning("cannot read %s weights-only (%s): RNG states not restored", rng_file, err)
            return
        restore_rng_state(state)

    def close(self) -> None:
        """Remove DeepSpeed's hooks and buffers (ZeRO-3 workers can abort at interpreter exit without it)."""
        self.ds.destroy()
