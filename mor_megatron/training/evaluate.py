"""Validation metrics of a saved checkpoint, at whatever parallel layout this job runs; the depth maps of the
trainer's evaluations.

Checkpoints hold global tensors, so one saved at TP=2 evaluates at TP=1 (or any layout the model fits) to the
trainer's ``val/*`` numbers for the same config, up to float rounding. That is how resharding is checked, and
how a checkpoint is scored without training: build the job's model, load the weights, run the batches the
trainer's evaluation reads.
"""

from __future__ import annotations

from typing import Any

import torch

from mor_megatron.config import ConfigError, JobConfig
from mor_megatron.data.datasets import build_data_loader, build_gpt_datasets, num_samples_for
from mor_megatron.data.tokenizer import load_tokenizer
from mor_megatron.model.gpt import MoRGPTModel
from mor_megatron.model.router_stats import RouterStats
from mor_megatron.runtime import DistributedContext
from mor_megatron.tracking import metrics as M
from mor_megatron.training.engine import Engine
from mor_megatron.training.megatron_engine import MegatronEngine
from mor_megatron.viz.depth import DepthMap


def validation_metrics(engine: Engine, valid_ds: Any, config: JobConfig, ctx: DistributedContext, *,
                       split: str = "val") -> dict[str, float]:
    """``val/loss``, ``val/ppl``, ``val/loss_causal``, ``val/ppl_causal`` over the start of ``valid_ds``
    (``test/*`` with ``split="test"`` and the test dataset).

    Reads the first ``train.eval_steps`` global batches (this rank's data-parallel share of each) with top-k
    routing and, for expert-choice routing, causal routing too; token-choice and plain recursion are causal by
    construction, so their causal keys repeat the top-k loss. Collective: every rank calls it. Router
    statistics gathered on the way are dropped, so they never mix into the training ones.
    """
    modes = ["topk", "causal"] if config.recursion.routing == "expert_choice" else ["topk"]
    losses = {}
    for mode in modes:
        batches = iter(build_data_loader(valid_ds, micro_batch_size=config.train.micro_batch_size,
                                         data_parallel_rank=ctx.dp_rank, data_parallel_size=ctx.dims.dp,
                                         num_workers=config.data.num_workers))
        losses[mode] = engine.eval_loss(batches, num_batches=config.train.eval_steps, routing_mode=mode)
    engine.model.pop_router_stats()
    return M.validation_metrics(loss=losses["topk"], loss_causal=losses.get("causal", losses["topk"]), split=split)


def eval_depth_maps(model: MoRGPTModel, ids: list[int], pieces: list[str], *, config: JobConfig, step: int,
                    device: torch.device, name: str) -> list[DepthMap]:
    """Depth maps of the tokens ``ids`` (text ``pieces``) at ``step``: training routing, then, under
    expert-choice, causal routing (other routings are causal by construction: one map).

    Leaves training as it was: forward only in eval mode, the random generators forked (an eval-mode
    forward draws nothing; forking keeps it so), and the router statistics of these forwards kept apart, so
    the training's router metrics do not change. Needs the whole routing in this process (no pipeline
    parallelism: ``token_depths`` refuses). Collective over the tensor-parallel group: each of its ranks
    calls it.
    """
    modes = ["topk", "causal"] if config.recursion.routing == "expert_choice" else ["causal"]
    decoder, was_training = model.decoder, model.training
    training_stats, decoder.router_stats = decoder.router_stats, RouterStats()
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            tokens = torch.tensor([ids], dtype=torch.long, device=device)
            positions = torch.arange(len(ids), device=device)[None]
            depths = {mode: model.token_depths(tokens, positions, routing_mode=mode)[0].tolist()
                      for mode in modes}
    finally:
        decoder.router_stats = training_stats
        model.train(was_training)
    return [DepthMap(pieces=pieces, depths=depths[mode], num_recursions=config.recursion.num_recursions,
                     routing=config.recursion.routing, routing_mode=mode, model=name, step=step)
            for mode in modes]


def evaluate_checkpoint(config: JobConfig, ctx: DistributedContext, *,
                        step: int | None = None) -> dict[str, float]:
    """Load the model weights of checkpoint ``step`` (default: the latest) and return its validation metrics.

    Reads ``checkpoint.load_dir`` (default ``checkpoint.save_dir``); weights only, not the optimizer.
    ``config`` is the training job's config, with any ``parallel`` section: the validation samples depend on
    ``data.*``, ``train.train_steps``, ``train.eval_interval``, ``train.eval_steps`` and the batch sizes
    exactly as in training. Collective: every rank calls it after
    :func:`mor_megatron.runtime.init_distributed`.

    Raises:
        ConfigError: nothing to evaluate (``train.eval_steps`` is 0 or ``data.split`` gives no validation).
        CheckpointError: no complete checkpoint, or one that does not fit the model.
    """
    if config.train.eval_steps < 1:
        raise ConfigError("train.eval_steps=0 evaluates nothing; set train.eval_steps >= 1")
    tokenizer = load_tokenizer(config.data.tokenizer)
    # The training job's sample counts: they fix how megatron shuffles the validation split.
    _, valid_ds, _ = build_gpt_datasets(config.data, seq_length=config.seq_length,
                                        num_samples=num_samples_for(config.train), tokenizer=tokenizer)
    if valid_ds is None:
        raise ConfigError(f"data.split={config.data.split!r} has no validation part; give it a weight, "
                          "e.g. '98,2,0'")
    engine = MegatronEngine(config, ctx)
    try:
        engine.checkpointer.load(model_chunks=[engine.ddp], optimizer=None, scheduler=None, step=step)
        return validation_metrics(engine, valid_ds, config, ctx)
    finally:
        engine.close()
