"""A small in-process training job on a fixed synthetic batch stream, for layout-equivalence tests.

Builds :class:`MegatronEngine` from a config with a fixed initial checkpoint, runs a few optimizer steps on
deterministic batches and returns the loss and grad norm per step; used to show that pipeline and tensor
parallel layouts train exactly like the single-rank model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mor_megatron.bench.synthetic import synthetic_batches
from mor_megatron.config import JobConfig, config_from_dict, config_to_dict


def job_config(preset: str, *, tp: int, pp: int, overrides: dict | None = None, save_dir: str | None = None) -> JobConfig:
    values = {
        "preset": preset,
        "model": {"vocab_size": 256, "max_seq_length": 32, **(overrides or {}).get("model", {})},
        "recursion": (overrides or {}).get("recursion", {}),
        "train": {"seq_length": 32, "micro_batch_size": 2, "global_batch_size": 8, "train_steps": 5},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "parallel": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp,
                     "use_distributed_optimizer": True, **(overrides or {}).get("parallel", {})},
        "checkpoint": {"save_dir": save_dir, "keep_last": 1},
        "tracking": {"enabled": False},
    }
    return config_from_dict(values)


def run_variant(ctx_kwargs: dict, *, preset: str, tp: int, pp: int, init_dir: str, steps: int,
                overrides: dict | None = None, save_dir: str | None = None, load_dir: str | None = None) -> dict:
    """Train ``steps`` steps at (tp, pp) from the weights in ``init_dir`` (written first if absent).

    With ``load_dir``, the full training state is resumed from there instead and nothing is trained; with
    ``save_dir``, the state is saved after training (or, after a resume, saved again at this layout). Returns
    per-step metrics, the eval loss after training, the unique layers and parameter count of this rank (also
    as the engine's ``held_parameters``).
    """
    from megatron.core import dist_checkpointing

    from mor_megatron.model.builder import virtual_pipeline_size
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.checkpoint.loop_state import LoopState
    from mor_megatron.training.megatron_engine import MegatronEngine

    config = job_config(preset, tp=tp, pp=pp, overrides=overrides, save_dir=save_dir)
    if load_dir is not None:
        config.checkpoint.load_dir = load_dir
    ctx = init_distributed(config.parallel, seed=5,
                           virtual_pipeline_size=virtual_pipeline_size(config.recursion, config.parallel))
    engine = None
    try:
        engine = MegatronEngine(config, ctx)
        model = engine.model
        history = []
        if load_dir is not None:
            loop = engine.resume()
            if loop is None:
                raise FileNotFoundError(f"no checkpoint to resume in {load_dir}")
            if save_dir is not None:
                engine.save(loop.step, loop, config_to_dict(config))
        else:
            init = Path(init_dir)
            if not (init / "metadata.json").is_file():
                if model.decoder.router is not None:
                    with torch.no_grad():
                        model.decoder.router.weight.normal_(0, 0.5)  # routing that varies across tokens
                init.mkdir(parents=True, exist_ok=True)
                dist_checkpointing.save(model.sharded_state_dict(), str(init))
            torch.distributed.barrier()
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(init)))
            engine.optimizer.reload_model_params()
            batches = synthetic_batches(config, ctx.dp_rank, ctx.dims.dp, steps)
            history = [engine.train_step(batches) for _ in range(steps)]
            if save_dir is not None:
                engine.save(steps, LoopState(step=steps), config_to_dict(config))
        eval_batches = synthetic_batches(config, ctx.dp_rank, ctx.dims.dp, 1)
        eval_loss = engine.eval_loss(eval_batches, num_batches=1, routing_mode="topk")
        return {"history": history, "eval_loss": eval_loss, "layers": list(model.decoder.layer_ids),
                "num_params": sum(p.numel() for p in model.parameters()),
                "held_params": engine.held_parameters(), "pp_rank": ctx.pp_rank,
                "tp_rank": ctx.tp_rank}
    finally:
        if engine is not None:
            engine.close()
        destroy_distributed(keep_process_group=True)


def run_variants(rank: int, world_size: int, *, variants: dict, **kwargs) -> dict:
    """:func:`run_variant` for each named variant, in one set of processes (spawning is the slow part)."""
    return {name: run_variant({}, **spec, **kwargs) for name, spec in variants.items()}
