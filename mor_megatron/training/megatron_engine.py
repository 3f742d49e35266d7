"""The Megatron-core training backend: DDP (+ distributed optimizer), megatron schedules, dist checkpoints."""

from __future__ import annotations

import functools
from typing import Any

import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from mor_megatron.config import JobConfig, config_to_dict
from mor_megatron.model.builder import build_model, transformer_config, virtual_pipeline_size
from mor_megatron.model.gpt import MoRGPTModel
from mor_megatron.runtime import DistributedContext, stop_checkpoint_helpers
from mor_megatron.tracking import metrics as M
from mor_megatron.checkpoint.loop_state import LoopState
from mor_megatron.checkpoint.megatron import Checkpointer
from mor_megatron.training.engine import Batches
from mor_megatron.training.optimizer import build_optimizer, build_scheduler
from mor_megatron.training.step import (forward_step, mean_over_world, num_microbatches, resolve_params_dtype,
                                       step_metrics)


class RecursionChunk(torch.nn.Module):
    """One virtual pipeline stage (a recursion) of this rank, as megatron's schedules see a model chunk.

    Every chunk runs the same DDP-wrapped stage model (the rank's slice of the shared block is one set of
    weights), with its recursion index. Gradient sync is the wrapped model's, done once: only chunk 0 forwards
    ``finish_grad_sync``.
    """

    def __init__(self, ddp: DistributedDataParallel, index: int, num_chunks: int):
        super().__init__()
        self.module = ddp
        self.index = index
        self.num_chunks = num_chunks

    def forward(self, *args, **kwargs):  # noqa: D102
        return self.module(*args, recursion_chunk=self.index, **kwargs)

    def set_input_tensor(self, input_tensor) -> None:
        """Called by the schedules before this chunk's forward with the tensor received from the previous stage."""
        model = self.module.module
        (model.module if isinstance(model, Float16Module) else model).set_input_tensor(input_tensor)

    def __getattr__(self, name: str):
        # Anything else megatron asks a model chunk for (ddp_config, ...) is the wrapped DDP's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def finish_grad_sync(self, *args, **kwargs) -> None:
        """Sync the shared DDP buffers once per step (finalize_model_grads calls every chunk)."""
        if self.index == 0:
            self.module.finish_grad_sync(*args, **kwargs)


class MegatronEngine:
    """Model chunks in megatron DDP, megatron-core AdamW + LR schedule, megatron's forward/backward schedules."""

    def __init__(self, config: JobConfig, ctx: DistributedContext):
        self.config = config
        self.ctx = ctx
        self.params_dtype = resolve_params_dtype(config.train.precision, ctx.device)
        self.num_microbatches = num_microbatches(config, ctx.dims.dp)
        self.model_chunks, self.mcore_config = self._build_model()
        self.optimizer = build_optimizer(config.optim, config.parallel, [self.ddp],
                                         pg_collection=ctx.pg_collection, params_dtype=self.params_dtype)
        self.scheduler = build_scheduler(config.optim, self.optimizer, train_steps=config.train.train_steps)
        self._wire_schedule_hooks()
        ckpt = config.checkpoint
        self.checkpointer = Checkpointer(save_dir=ckpt.save_dir, load_dir=ckpt.load_dir, keep_last=ckpt.keep_last,
                                         ctx=ctx, fallback_to_previous=ckpt.fallback_to_previous,
                                         allow_config_change=ckpt.allow_config_change)

    def _build_model(self):
        cfg = self.config
        mcore_config = transformer_config(cfg.model, cfg.recursion, cfg.parallel, params_dtype=self.params_dtype,
                                          use_cpu_initialization=self.ctx.device.type == "cpu",
                                          recompute=cfg.train.recompute)
        pipelined = self.ctx.dims.pp > 1
        model = build_model(cfg.model, cfg.recursion, mcore_config, pg_collection=self.ctx.pg_collection,
                            pipeline_seq_length=cfg.seq_length if pipelined else None,
                            recompute_recursions=cfg.train.recompute_recursions)
        model.set_aux_loss_scale(1.0 / self.num_microbatches)
        model.to(self.ctx.device)
        if self.params_dtype == torch.bfloat16:
            model = Float16Module(mcore_config, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, check_for_nan_in_grad=True)
        self.ddp = DistributedDataParallel(mcore_config, ddp_config, model, pg_collection=self.ctx.pg_collection)
        if not pipelined:
            return [self.ddp], mcore_config
        num_chunks = virtual_pipeline_size(cfg.recursion, cfg.parallel) or 1
        return [RecursionChunk(self.ddp, index, num_chunks) for index in range(num_chunks)], mcore_config

    def _wire_schedule_hooks(self) -> None:
        """What megatron's schedules call back into: grad finalisation, no_sync, overlapped grad/param sync."""
        config = self.mcore_config
        config.finalize_model_grads_func = functools.partial(finalize_model_grads,
                                                             pg_collection=self.ctx.pg_collection)
        config.no_sync_func = self.ddp.no_sync
        config.grad_scale_func = self.optimizer.scale_loss
        # No grad_sync_func/param_sync_func: the shared block's weights serve every recursion chunk, so a
        # per-chunk sync would start too early. megatron DDP's own hooks count each weight's uses per step and
        # start the (overlapped) reduce after the last one.

    # -- Engine protocol ---------------------------------------------------------------------------------------
    @property
    def model(self) -> MoRGPTModel:
        module = self.ddp.module
        return module.module if isinstance(module, Float16Module) else module

    @property
    def is_logging_rank(self) -> bool:
        return self.ctx.is_last_stage and self.ctx.dp_rank == 0 and self.ctx.tp_rank == 0

    def held_parameters(self) -> tuple[int, int]:
        return M.held_parameters(self.model.parameters())

    model_runs_alone = True

    def run_artifacts(self) -> dict[str, str]:
        return {}

    def _data_iterators(self, batches: Batches):
        """Per-chunk data: only chunk 0 on the first stage and the last chunk on the last stage read batches."""
        if self.ctx.dims.pp == 1:
            return batches
        first, last = self.ctx.is_first_stage, self.ctx.is_last_stage
        num_chunks = len(self.model_chunks)
        if num_chunks == 1:
            return batches if (first or last) else None
        return [batches if (first and i == 0) or (last and i == num_chunks - 1) else None
                for i in range(num_chunks)]

    def _forward_backward(self, batches: Batches, *, forward_only: bool, routing_mode: str) -> list[float]:
        packing = self.model.decoder.packing
        outputs = get_forward_backward_func()(
            forward_step_func=functools.partial(forward_step, device=self.ctx.device, routing_mode=routing_mode),
            data_iterator=self._data_iterators(batches), model=self.model_chunks,
            num_microbatches=self.num_microbatches,
            seq_length=packing.rows if packing is not None else self.config.seq_length,
            micro_batch_size=self.config.train.micro_batch_size, forward_only=forward_only)
        return [float(out["lm_loss"]) for out in outputs]

    def train_step(self, batches: Batches) -> dict[str, float]:
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._forward_backward(batches, forward_only=False, routing_mode="topk")
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.model.update_router_bias(self.config.recursion.bias_update_rate, self.ctx.pg_collection.dp)
        return step_metrics(losses, grad_norm, self.optimizer.param_groups[0]["lr"], self.config, self.ctx.device)

    def eval_loss(self, batches: Batches, *, num_batches: int, routing_mode: str) -> float:
        self.ddp.eval()
        losses: list[float] = []
        with torch.no_grad():
            for _ in range(num_batches):
                losses += self._forward_backward(batches, forward_only=True, routing_mode=routing_mode)
        return mean_over_world(losses, self.ctx.device)

    def save(self, step: int, loop: LoopState, config_dict: dict[str, Any]) -> str:
        return str(self.checkpointer.save(step, model_chunks=[self.ddp], optimizer=self.optimizer,
                                          scheduler=self.scheduler, loop=loop, config_dict=config_dict))

    def resume(self) -> LoopState | None:
        if self.checkpointer.latest_step() is None:
            return None
        return self.checkpointer.load(model_chunks=[self.ddp], optimizer=self.optimizer,
                                      scheduler=self.scheduler, current_config=config_to_dict(self.config))

    def close(self) -> None:
        """End the checkpoint writers' manager server (a spawned interpreter, ~350 MiB) that saves started."""
        stop_checkpoint_helpers()
