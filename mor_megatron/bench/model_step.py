"""Microbenchmark: forward+backward time of a MoR model vs the vanilla model of the same unrolled depth.

Both models are built in one process and timed alternately on the same batch, so machine noise hits both; the
printed figures are ratios (MoR / vanilla) of medians, with the FLOPs ratio of the accounting model beside
them. It is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from mor_megatron.config import ModelConfig, ParallelConfig, RecursionConfig, layer_layout, preset
from mor_megatron.model.builder import build_model, transformer_config
from mor_megatron.model.flops import flops_per_token


@dataclass(frozen=True)
class StepTiming:
    """Median forward+backward seconds of each model and the ratios."""

    mor_s: float
    vanilla_s: float
    flops_ratio: float

    @property
    def time_ratio(self) -> float:
        return self.mor_s / self.vanilla_s


def vanilla_of_same_depth(model: ModelConfig, recursion: RecursionConfig) -> tuple[ModelConfig, RecursionConfig]:
    """The R = 1 baseline: same shape and unrolled depth, every layer unique, no routing."""
    depth = layer_layout(model, recursion).num_unrolled_layers
    return ModelConfig(**{**model.__dict__, "num_layers": depth}), RecursionConfig(num_recursions=1)


def time_step(model, tokens: torch.Tensor, positions: torch.Tensor) -> float:
    """Seconds of one forward+backward of the mean LM loss."""
    start = time.perf_counter()
    model(tokens, positions, None, labels=tokens).mean().backward()
    return time.perf_counter() - start


def compare(mor_preset: str, *, pg_collection, hidden_size: int | None, seq_length: int, batch_size: int,
            repeats: int, warmup: int = 2) -> StepTiming:
    """Build the MoR preset and its vanilla counterpart, time them alternately, return medians and ratios."""
    model_cfg, recursion = preset(mor_preset)
    if hidden_size is not None:
        heads = max(1, hidden_size // 64)
        model_cfg = ModelConfig(**{**model_cfg.__dict__, "hidden_size": hidden_size, "num_attention_heads": heads,
                                   "num_query_groups": heads, "ffn_hidden_size": hidden_size * 8 // 3 // 8 * 8})
    model_cfg = ModelConfig(**{**model_cfg.__dict__, "max_seq_length": max(seq_length, model_cfg.max_seq_length)})
    base_cfg, base_recursion = vanilla_of_same_depth(model_cfg, recursion)
    models = {}
    for name, (m, r) in {"mor": (model_cfg, recursion), "vanilla": (base_cfg, base_recursion)}.items():
        torch.manual_seed(0)
        models[name] = build_model(m, r, transformer_config(m, r, ParallelConfig()), pg_collection=pg_collection,
                                   provider="local")
    tokens = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_length))
    positions = torch.arange(seq_length).expand(batch_size, -1)
    times: dict[str, list[float]] = {"mor": [], "vanilla": []}
    for i in range(warmup + repeats):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            elapsed = time_step(model, tokens, positions)
            if i >= warmup:
                times[name].append(elapsed)
    flops_ratio = (flops_per_token(model_cfg, recursion, seq_length).training_flops_per_token_with_lm_head
                   / flops_per_token(base_cfg, base_recursion, seq_length).training_flops_per_token_with_lm_head)
    return StepTiming(mor_s=statistics.median(times["mor"]), vanilla_s=statistics.median(times["vanilla"]),
                      flops_ratio=flops_ratio)


def report(timing: StepTiming, *, mor_preset: str, as_json: bool) -> str:
    """Human-readable or JSON summary of a comparison."""
    values = {"mor_preset": mor_preset, "mor_step_s": timing.mor_s, "vanilla_step_s": timing.vanilla_s,
              "time_ratio": timing.time_ratio, "flops_ratio": timing.flops_ratio}
    if as_json:
        return json.dumps(values)
    return (f"fwd+bwd  {mor_preset}: {timing.mor_s * 1e3:.1f} ms   vanilla (same unrolled depth): "
            f"{timing.vanilla_s * 1e3:.1f} ms\n"
            f"ratio MoR/vanilla: time {timing.time_ratio:.3f}   training FLOPs {timing.flops_ratio:.3f}")
