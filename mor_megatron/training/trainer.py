"""The Megatron training loop: wires data, model, optimizer, schedule, checkpoints and tracking.

Components are built by their own modules (``mor_megatron.data``, ``mor_megatron.model``, ``optimizer``,
``checkpoint``, ``tracking``, ``metrics``); this module only connects them and runs
megatron-core's forward/backward schedule once per optimizer step. Loop state that a resume needs is
:class:`~mor_megatron.training.checkpoint.LoopState` (step, consumed samples, training time, MLflow run id).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from mor_megatron.config import JobConfig, config_to_dict, dump_config
from mor_megatron.data.datasets import build_data_loader, build_gpt_datasets, num_samples_for
from mor_megatron.data.tokenizer import load_tokenizer
from mor_megatron.model.builder import build_model, transformer_config
from mor_megatron.model.flops import flops_per_token
from mor_megatron.model.gpt import MoRGPTModel
from mor_megatron.runtime import DistributedContext
from mor_megatron.training import metrics as M
from mor_megatron.training.checkpoint import Checkpointer, LoopState
from mor_megatron.training.optimizer import build_optimizer, build_scheduler
from mor_megatron.training.step import forward_step
from mor_megatron.training.tracking import MetricSink, start_tracking

logger = logging.getLogger("mor_megatron.train")


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


def resolve_params_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and this is where tests run)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


class Trainer:
    """One pretraining job on this rank. Build with :meth:`build`, run with :meth:`train`, end with :meth:`close`."""

    def __init__(self, config: JobConfig, ctx: DistributedContext):
        self.config = config
        self.ctx = ctx
        self.run_dir = Path(config.output_dir)
        self.params_dtype = resolve_params_dtype(config.train.precision, ctx.device)
        self.loop = LoopState()
        self.sink: MetricSink | None = None
        dp = ctx.dims.dp
        self.num_microbatches = config.train.global_batch_size // (config.train.micro_batch_size * dp)
        self.is_logging_rank = (parallel_state.is_pipeline_last_stage() and ctx.dp_rank == 0 and ctx.tp_rank == 0)

    # ---------------------------------------------------------------------------------------------- building
    def build(self) -> None:
        """Data, model (DDP-wrapped), optimizer, schedule, checkpoint resume, tracking: in that order."""
        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.train_ds, self.valid_ds, _ = build_gpt_datasets(
            cfg.data, seq_length=cfg.seq_length, num_samples=num_samples_for(cfg.train), tokenizer=self.tokenizer)
        self.model_chunks, self.mcore_config = self._build_model()
        self.optimizer = build_optimizer(cfg.optim, cfg.parallel, self.model_chunks,
                                         pg_collection=self.ctx.pg_collection, params_dtype=self.params_dtype)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, train_steps=cfg.train.train_steps)
        self._wire_schedule_hooks()
        ckpt = cfg.checkpoint
        self.checkpointer = Checkpointer(save_dir=ckpt.save_dir, load_dir=ckpt.load_dir, keep_last=ckpt.keep_last,
                                         ctx=self.ctx)
        if self.checkpointer.latest_step() is not None:
            self.loop = self.checkpointer.load(model_chunks=self.model_chunks, optimizer=self.optimizer,
                                               scheduler=self.scheduler)
            self._log_rank0(f"resumed from step {self.loop.step} ({self.loop.consumed_samples} samples consumed)")
        self.sink, run_id = start_tracking(cfg.tracking, run_dir=self.run_dir, config_dict=config_to_dict(cfg),
                                           resume_run_id=self.loop.mlflow_run_id,
                                           is_logging_rank=self.is_logging_rank, local_rank=self.ctx.local_rank,
                                           node_id=f"node{self.ctx.node_rank}",
                                           system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
                                           retry_after_s=cfg.tracking.retry_after_s,
                                           close_timeout_s=cfg.tracking.close_timeout_s)
        self.loop.mlflow_run_id = run_id
        self.flops_per_token = flops_per_token(cfg.model, cfg.recursion,
                                               cfg.seq_length).training_flops_per_token_with_lm_head
        if self.is_logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))

    def _build_model(self):
        cfg = self.config
        mcore_config = transformer_config(cfg.model, cfg.recursion, cfg.parallel, params_dtype=self.params_dtype,
                                          use_cpu_initialization=self.ctx.device.type == "cpu",
                                          recompute=cfg.train.recompute)
        model = build_model(cfg.model, cfg.recursion, mcore_config, pg_collection=self.ctx.pg_collection)
        model.set_aux_loss_scale(1.0 / self.num_microbatches)
        model.to(self.ctx.device)
        if self.params_dtype == torch.bfloat16:
            model = Float16Module(mcore_config, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, check_for_nan_in_grad=True)
        ddp = DistributedDataParallel(mcore_config, ddp_config, model, pg_collection=self.ctx.pg_collection)
        return [ddp], mcore_config

    def _wire_schedule_hooks(self) -> None:
        """What megatron's schedules call back into: grad finalisation, no_sync, overlapped grad/param sync."""
        chunks, config = self.model_chunks, self.mcore_config
        config.finalize_model_grads_func = functools.partial(finalize_model_grads,
                                                             pg_collection=self.ctx.pg_collection)
        config.no_sync_func = chunks[0].no_sync
        config.grad_scale_func = self.optimizer.scale_loss
        if self.config.parallel.overlap_grad_reduce:
            config.grad_sync_func = chunks[0].start_grad_sync
        if self.config.parallel.overlap_param_gather:
            config.param_sync_func = chunks[0].start_param_sync

    @property
    def mor_model(self) -> MoRGPTModel:
        module = self.model_chunks[0].module
        return module.module if isinstance(module, Float16Module) else module

    # ---------------------------------------------------------------------------------------------- loop
    def _data_iterator(self, dataset, consumed_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        return iter(build_data_loader(dataset, micro_batch_size=self.config.train.micro_batch_size,
                                      data_parallel_rank=self.ctx.dp_rank, data_parallel_size=self.ctx.dims.dp,
                                      consumed_samples=consumed_samples, num_workers=self.config.data.num_workers))

    def _forward_backward(self, data_iterator, *, forward_only: bool, routing_mode: str) -> list[dict]:
        return get_forward_backward_func()(
            forward_step_func=functools.partial(forward_step, device=self.ctx.device, routing_mode=routing_mode),
            data_iterator=data_iterator, model=self.model_chunks, num_microbatches=self.num_microbatches,
            seq_length=self.config.seq_length, micro_batch_size=self.config.train.micro_batch_size,
            forward_only=forward_only)

    def train_step(self, data_iterator) -> dict[str, float]:
        """One optimizer step over a global batch; returns DP-averaged loss, grad norm and lr."""
        for chunk in self.model_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._forward_backward(data_iterator, forward_only=False, routing_mode="topk")
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.mor_model.update_router_bias(self.config.recursion.bias_update_rate,
                                          parallel_state.get_data_parallel_group())
        loss = self._mean_over_dp(losses)
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"step {self.loop.step + 1}: lm loss {loss} / grad norm {grad_norm} is not finite; lower optim.lr "
                f"(now {self.config.optim.lr}) or resume from the last checkpoint in {self.config.checkpoint.save_dir}")
        return {M.TRAIN_LM_LOSS: loss, M.OPTIM_GRAD_NORM: grad_norm,
                M.OPTIM_LR: self.optimizer.param_groups[0]["lr"]}

    def _mean_over_dp(self, losses: list[dict]) -> float:
        """Mean micro-batch LM loss, averaged over data-parallel ranks; identical on every rank."""
        local = torch.tensor([sum(float(d["lm_loss"]) for d in losses), float(len(losses))], dtype=torch.float64,
                             device=self.ctx.device)
        # Only the last pipeline stage holds losses; summing over the whole world counts each DP replica once.
        dist.all_reduce(local)
        return float(local[0] / local[1]) if local[1] > 0 else math.nan

    def evaluate(self) -> dict[str, float]:
        """Validation loss with training (top-k) routing and with causal routing, over ``train.eval_steps``."""
        routing = self.config.recursion.routing
        modes = ["topk", "causal"] if routing == "expert_choice" else ["topk"]
        results = {}
        for chunk in self.model_chunks:
            chunk.eval()
        with torch.no_grad():
            for mode in modes:
                iterator = self._data_iterator(self.valid_ds, 0)
                losses = []
                for _ in range(self.config.train.eval_steps):
                    losses += self._forward_backward(iterator, forward_only=True, routing_mode=mode)
                results[mode] = self._mean_over_dp(losses)
        self.mor_model.pop_router_stats()  # evaluation must not leak into the training router statistics
        return M.validation_metrics(loss=results["topk"], loss_causal=results.get("causal", results["topk"]))

    def train(self) -> LoopState:
        """Run until ``train.train_steps``; evaluates, logs and checkpoints on their intervals."""
        cfg, tcfg = self.config, self.config.train
        iterator = self._data_iterator(self.train_ds, self.loop.consumed_samples)
        tokens_per_step = tcfg.global_batch_size * cfg.seq_length
        first_val = None
        while self.loop.step < tcfg.train_steps:
            start = time.perf_counter()
            step_metrics = self.train_step(iterator)
            elapsed = _max_over_world(time.perf_counter() - start, self.ctx.device)  # one step time for the whole job
            self.loop.step += 1
            self.loop.consumed_samples += tcfg.global_batch_size
            self.loop.train_time_s += elapsed
            step = self.loop.step
            if step % tcfg.log_interval == 0 or step == tcfg.train_steps:
                self._log_step(step_metrics, elapsed, tokens_per_step)
            if tcfg.eval_steps and (step % tcfg.eval_interval == 0 or step == tcfg.train_steps):
                val = self.evaluate()
                first_val = first_val if first_val is not None else val[M.VAL_LOSS]
                self._emit(val, step)
                self._log_rank0(f" validation at step {step} | lm loss {val[M.VAL_LOSS]:.4f} | causal-routing "
                                f"loss {val[M.VAL_LOSS_CAUSAL]:.4f} | ppl {val[M.VAL_PPL]:.2f}")
            save_interval = cfg.checkpoint.save_interval
            if cfg.checkpoint.save_dir and ((save_interval and step % save_interval == 0)
                                             or step == tcfg.train_steps):
                path = self.checkpointer.save(step, model_chunks=self.model_chunks, optimizer=self.optimizer,
                                              scheduler=self.scheduler, loop=self.loop,
                                              config_dict=config_to_dict(cfg))
                self._log_rank0(f" saved checkpoint {path}")
        return self.loop

    def _log_step(self, step_metrics: dict[str, float], elapsed: float, tokens_per_step: int) -> None:
        cfg = self.config
        values = dict(step_metrics)
        values.update(M.throughput_metrics(step_time_s=elapsed, tokens_per_step=tokens_per_step,
                                           num_devices=dist.get_world_size(),
                                           training_flops_per_token=self.flops_per_token,
                                           peak_flops=self._peak_flops()))
        values.update(M.memory_metrics(M.peak_memory_gib(self.ctx.device), node_rank=self.ctx.node_rank,
                                       num_nodes=self.ctx.num_nodes))
        values.update(self._router_stats())
        values[M.TIME_TRAIN_S] = self.loop.train_time_s
        self._emit(values, self.loop.step)
        self._log_rank0(
            f" iteration {self.loop.step:8d}/{cfg.train.train_steps:8d} | consumed samples: "
            f"{self.loop.consumed_samples:10d} | elapsed time per iteration (ms): {elapsed * 1e3:.1f} | "
            f"learning rate: {values[M.OPTIM_LR]:.3E} | global batch size: {cfg.train.global_batch_size:5d} | "
            f"lm loss: {values[M.TRAIN_LM_LOSS]:.6E} | grad norm: {values[M.OPTIM_GRAD_NORM]:.3f} | "
            f"tokens/s: {values[M.PERF_TOKENS_PER_S]:.0f}")

    def _peak_flops(self) -> float | None:
        configured = self.config.tracking.peak_tflops
        return configured * 1e12 if configured else M.peak_flops_per_device(_device_name(self.ctx.device))

    def _router_stats(self) -> dict[str, float]:
        """Router statistics averaged over data-parallel ranks (collective over the DP group)."""
        stats = self.mor_model.pop_router_stats()
        if not stats:
            return {}
        keys = sorted(stats)
        tensor = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.ctx.device)
        group = parallel_state.get_data_parallel_group()
        dist.all_reduce(tensor, group=group)
        tensor /= dist.get_world_size(group)
        return dict(zip(keys, tensor.tolist()))

    def _emit(self, values: dict[str, float], step: int) -> None:
        if self.sink is not None:
            self.sink.log_metrics(values, step)

    def _log_rank0(self, message: str) -> None:
        if dist.get_rank() == 0:
            print(message, flush=True)

    def close(self, *, failed: bool = False) -> None:
        """Flush and close tracking (bounded wait)."""
        if self.sink is not None:
            self.sink.close(failed=failed)
            self.sink = None


def _max_over_world(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor[0])


def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None
