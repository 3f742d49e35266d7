"""AdamW through megatron-core's optimizer (plain or distributed) and its LR/WD scheduler (WSD, cosine)."""

from __future__ import annotations

import torch

from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mor_megatron.config import OptimConfig, ParallelConfig, wsd_decay_steps


def build_optimizer(optim: OptimConfig, parallel: ParallelConfig, model_chunks: list, *, pg_collection,
                    params_dtype: torch.dtype) -> MegatronOptimizer:
    """megatron-core AdamW over the DDP-wrapped ``model_chunks``; no weight decay on norms (megatron's rule)."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    # The collection carries every group the optimizer needs; megatron refuses extra gloo groups beside it.
    optimizer = get_megatron_optimizer(config, model_chunks, use_gloo_process_groups=False,
                                       pg_collection=pg_collection)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer):
            _restore_without_step(inner)
    return optimizer


def _restore_without_step(optimizer: DistributedOptimizer) -> None:
    """Work around megatron-core 0.16.1 restoring torch-Adam state from a ``fully_reshardable`` checkpoint.

    With torch's AdamW (no apex/TE) every parameter's state holds a 0-dim ``step``; the checkpoint does not store
    it per parameter (it is restored from the param groups), yet ``_set_main_param_and_optimizer_states`` copies
    every key of the live state and fails with ``KeyError: 'step'``. Hide ``step`` during that copy.
    """
    original = optimizer._set_main_param_and_optimizer_states

    def restore(model_param, tensors):
        group_index, group_order = optimizer.model_param_group_index_map[model_param]
        main_param = optimizer.optimizer.param_groups[group_index]["params"][group_order]
        state = optimizer.optimizer.state[main_param]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    optimizer._set_main_param_and_optimizer_states = restore


def build_scheduler(optim: OptimConfig, optimizer: MegatronOptimizer, *, train_steps: int) -> OptimizerParamScheduler:
    """Linear warmup, then WSD (stable, then linear decay over the last ``decay_fraction``), cosine or constant.

    WSD is the paper's schedule for its main runs; cosine its schedule for the 10B-token ablations.
    """
    style = {"wsd": "WSD", "cosine": "cosine", "constant": "constant"}[optim.schedule]
    wsd_steps = wsd_decay_steps(optim.decay_fraction, train_steps) if optim.schedule == "wsd" else None
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=train_steps,
        lr_decay_style=style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=train_steps,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style="linear" if wsd_steps else None,
        # On resume the job's config wins over the checkpoint's schedule (megatron's default keeps the old
        # values silently): a lowered optim.lr or a longer train.train_steps takes effect; the step count is
        # still restored from the checkpoint.
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
