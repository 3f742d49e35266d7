"""Microbenchmark: forward+backward time of a MoR model vs the vanilla model of the same unrolled depth.

Both models are built in one process and timed alternately on the same batch, so machine noise hits both; the
printed figures are ratios (MoR / vanilla) of medians, with the FLOPs ratio of the accounting model beside
them. It is a benchmark, not a test: it asserts nothing.

Precision (both benchmarks, :func:`build_bench_model`): `float32`, or `bfloat16` as megatron's training path
holds the model (bf16 parameters and activations inside ``Float16Module``; router logits and the routing
decision in fp32, fp32 loss). On GPU the clock is read after ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from megatron.core.transformer.module import Float16Module

from mor_megatron.config import CoreAttention, ModelConfig, ParallelConfig, RecursionConfig, layer_layout, preset
from mor_megatron.model.builder import build_model, transformer_config
from mor_megatron.model.flops import flops_per_token

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def time_step(model, tokens: torch.Tensor, positions: torch.Tensor, device: torch.device) -> float:
    """Seconds of one forward+backward of the mean LM loss."""
    start = time.perf_counter()
    model(tokens, positions, None, labels=tokens).mean().backward()
    synchronize(device)
    return time.perf_counter() - start


def bench_model_config(preset_name: str, *, hidden_size: int | None, seq_length: int,
                       core_attention: CoreAttention = "sdpa") -> tuple[ModelConfig, RecursionConfig]:
    """The preset's model, optionally at another width, with ``max_seq_length >= seq_length``.

    A width override keeps head dim 64 (plain multi-head attention) and a SwiGLU of ~8/3 x hidden. Raises
    ConfigError (a ValueError) for an unknown preset or a width the model config rejects.
    """
    model, recursion = preset(preset_name)
    fields = dict(model.__dict__)
    if hidden_size is not None:
        heads = max(1, hidden_size // 64)
        fields.update(hidden_size=hidden_size, num_attention_heads=heads, num_query_groups=heads,
                      ffn_hidden_size=hidden_size * 8 // 3 // 8 * 8)
    fields["max_seq_length"] = max(seq_length, model.max_seq_length)
    fields["core_attention"] = core_attention
    return ModelConfig(**fields), recursion


def build_bench_model(model: ModelConfig, recursion: RecursionConfig, *, pg_collection, device: torch.device,
                      dtype: torch.dtype, seed: int = 0, parallel: ParallelConfig | None = None) -> torch.nn.Module:
    """One benchmarked model on ``device``: seeded init, local layers, bf16 wrapped in ``Float16Module``; one
    rank's part of it under ``parallel`` (tensor and sequence parallelism; default: a single rank)."""
    torch.manual_seed(seed)
    config = transformer_config(model, recursion, parallel or ParallelConfig(), params_dtype=dtype)
    built = build_model(model, recursion, config, pg_collection=pg_collection, provider="local")
    if dtype == torch.bfloat16:
        built = Float16Module(config, built)
    return built.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously; CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(mor_preset: str, *, pg_collection, device: torch.device, dtype: torch.dtype, hidden_size: int | None,
            seq_length: int, batch_size: int, repeats: int, warmup: int = 2) -> StepTiming:
    """Build the MoR preset and its vanilla counterpart, time them alternately, return medians and ratios."""
    model_cfg, recursion = bench_model_config(mor_preset, hidden_size=hidden_size, seq_length=seq_length)
    base_cfg, base_recursion = vanilla_of_same_depth(model_cfg, recursion)
    models = {name: build_bench_model(m, r, pg_collection=pg_collection, device=device, dtype=dtype)
              for name, (m, r) in {"mor": (model_cfg, recursion), "vanilla": (base_cfg, base_recursion)}.items()}
    tokens = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_length), device=device)
    positions = torch.arange(seq_length, device=device).expand(batch_size, -1)
    times: dict[str, list[float]] = {"mor": [], "vanilla": []}
    for i in range(warmup + repeats):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            synchronize(device)
            elapsed = time_step(model, tokens, positions, device)
            if i >= warmup:
                times[name].append(elapsed)
    flops_ratio = (flops_per_token(model_cfg, recursion, seq_length).training_flops_per_token_with_lm_head
                   / flops_per_token(base_cfg, base_recursion, seq_length).training_flops_per_token_with_lm_head)
    return StepTiming(mor_s=statistics.median(times["mor"]), vanilla_s=statistics.median(times["vanilla"]),
                      flops_ratio=flops_ratio)


def report(timing: StepTiming, *, mor_preset: str, device: str, dtype: str, as_json: bool) -> str:
    """Human-readable or JSON summary of a comparison."""
    values = {"mor_preset": mor_preset, "device": device, "dtype": dtype, "mor_step_s": timing.mor_s,
              "vanilla_step_s": timing.vanilla_s, "time_ratio": timing.time_ratio, "flops_ratio": timing.flops_ratio}
    if as_json:
        return json.dumps(values)
    return (f"fwd+bwd on {device} in {dtype}  {mor_preset}: {timing.mor_s * 1e3:.1f} ms   vanilla (same unrolled "
            f"depth): {timing.vanilla_s * 1e3:.1f} ms\n"
            f"ratio MoR/vanilla: time {timing.time_ratio:.3f}   training FLOPs {timing.flops_ratio:.3f}")
