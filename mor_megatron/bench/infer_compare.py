"""``mor-bench infer``: generation throughput of a MoR model vs the vanilla model of the same unrolled depth.

    mor-bench infer [--preset tiny-mor-e-r3] [--hidden-size 256] [--num-requests 32] [--batch-size 8]
                    [--mor-slots N] [--gen-mean 64] [--gen-std 16] [--repeats 3] [--json]
    mor-bench infer --mor-dir hf/mor --vanilla-dir hf/vanilla ...

Models. By default both are built with random weights (seed 0) from a preset (``mor_megatron.config``), the
MoR one as a Hugging Face ``MoRForCausalLM`` and the baseline as a ``LlamaForCausalLM`` with the MoR model's
unrolled depth and the same width, heads and vocabulary (what ``mor-convert to-hf`` exports for vanilla runs).
``--mor-dir``/``--vanilla-dir`` load exported folders instead. A random router keeps about half the tokens at
each recursion of capacity < 1 (the sign of a random projection), so the printed mean recursions per token
may differ from a trained model's; the training capacities' value is printed beside it.

Workload (the paper's App. C setup, scaled to a CPU): ``--num-requests`` prompts of random token ids, prompt
lengths uniform in ``[--prompt-min, --prompt-max]``, generation lengths drawn from Normal(``--gen-mean``,
``--gen-std``), rounded and clipped to ``[1, 2 * gen-mean]``, all from ``--seed``. No EOS ends a sequence, so
both models generate exactly the same number of tokens. Greedy decoding.

Engines (:mod:`mor_megatron.inference.engine`): the MoR model runs continuous depth-wise batching with at most
``--batch-size`` tokens per pass through the shared block and ``--mor-slots`` resident sequences (default
``2 * batch-size``, so passes stay full while tokens exit early); the vanilla model runs continuous
sequence-wise batching with ``--batch-size`` resident sequences, all decoded every step. Both refill freed
slots from the queue at once and keep K/V in static buffers.

Measurement. One untimed warm-up run of each engine on the first requests, then ``--repeats`` timed runs of
the whole workload per engine, alternating which goes first, in one process: reported are the medians of
generated tokens per second of a whole run (prefills included), of decoding alone (generated tokens after each
prompt's first / time outside prefills), and of tokens per CPU second (``time.process_time``, all threads:
steadier than wall time on a shared machine), and MoR/vanilla ratios of each. It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from mor_megatron.inference.engine import DepthWiseEngine, EngineResult, Request, SequenceWiseEngine


@dataclass(frozen=True)
class EngineMeasure:
    """Medians over the timed runs of one engine."""

    tokens_per_s: float
    decode_tokens_per_s: float
    cpu_tokens_per_s: float
    kv_buffer_mib: float
    mean_recursions: float
    """Recursions run per generated token fed back (vanilla: 1, its whole stack counts as one pass)."""
    mixed_depth_fraction: float
    """Depth-wise: share of shared-block passes holding tokens at more than one depth."""
    mean_pass_tokens: float
    """Tokens per pass through the shared block (depth-wise) or per decode step (sequence-wise)."""


@dataclass(frozen=True)
class InferComparison:
    """Both engines on the same requests."""

    setup: dict[str, object]
    mor: EngineMeasure
    vanilla: EngineMeasure

    def ratios(self) -> dict[str, float]:
        """MoR / vanilla of each throughput."""
        return {name: getattr(self.mor, name) / getattr(self.vanilla, name)
                for name in ("tokens_per_s", "decode_tokens_per_s", "cpu_tokens_per_s")}


def random_models(preset_name: str, *, hidden_size: int | None, max_len: int, seed: int):
    """``(MoRForCausalLM, LlamaForCausalLM)`` of a preset (optionally at another width, head dim 64), random
    weights, eval mode. Raises ConfigError (a ValueError) for an unknown preset or a rejected width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mor_megatron.config import ModelConfig, layer_layout, preset
    from mor_megatron.inference.hf.configuration_mor import MoRConfig
    from mor_megatron.inference.hf.modeling_mor import MoRForCausalLM

    model, recursion = preset(preset_name)
    if hidden_size is not None:
        heads = max(1, hidden_size // 64)
        model = ModelConfig(**{**model.__dict__, "hidden_size": hidden_size, "num_attention_heads": heads,
                               "num_query_groups": heads, "ffn_hidden_size": hidden_size * 8 // 3 // 8 * 8})
    layout = layer_layout(model, recursion)
    common = dict(vocab_size=model.vocab_size, hidden_size=model.hidden_size,
                  intermediate_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
                  num_key_value_heads=model.num_query_groups, head_dim=model.head_dim,
                  rms_norm_eps=model.norm_epsilon, max_position_embeddings=max(max_len, model.max_seq_length),
                  initializer_range=model.init_method_std, tie_word_embeddings=model.tie_embeddings,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
    mor_config = MoRConfig(rope_theta=model.rotary_base, num_prefix_layers=layout.num_prefix,
                           num_shared_layers=layout.num_shared, num_suffix_layers=layout.num_suffix,
                           num_recursions=recursion.num_recursions, sharing=recursion.sharing,
                           routing=recursion.routing, kv_mode=recursion.kv_mode,
                           capacities=(list(recursion.effective_capacities)
                                       if recursion.routing == "expert_choice" else None),
                           router_alpha=recursion.effective_alpha,
                           router_temperature=recursion.router_temperature,
                           token_balancing=recursion.token_balancing, **common)
    vanilla_config = LlamaConfig(num_hidden_layers=layout.num_unrolled_layers, hidden_act="silu",
                                 rope_parameters={"rope_type": "default", "rope_theta": model.rotary_base},
                                 **common)
    torch.manual_seed(seed)
    mor = MoRForCausalLM(mor_config).eval()
    torch.manual_seed(seed)
    vanilla = LlamaForCausalLM(vanilla_config).eval()
    return mor, vanilla


def load_models(mor_dir: str, vanilla_dir: str, dtype: torch.dtype):
    """Exported Hugging Face folders (``mor-convert to-hf``), eval mode."""
    from transformers import AutoModelForCausalLM

    mor = AutoModelForCausalLM.from_pretrained(mor_dir, trust_remote_code=True, dtype=dtype).eval()
    vanilla = AutoModelForCausalLM.from_pretrained(vanilla_dir, dtype=dtype).eval()
    return mor, vanilla


def make_requests(num_requests: int, *, vocab_size: int, prompt_min: int, prompt_max: int, gen_mean: int,
                  gen_std: float, seed: int) -> list[Request]:
    """Seeded prompts of random ids (4 .. vocab-1, past the special ids) and Normal generation lengths."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt_min, prompt_max + 1, (num_requests,), generator=generator).tolist()
    gen = (torch.randn(num_requests, generator=generator) * gen_std + gen_mean).round().clamp(1, 2 * gen_mean)
    return [Request(prompt=tuple(torch.randint(4, vocab_size, (n,), generator=generator).tolist()),
                    max_new_tokens=int(g)) for n, g in zip(lengths, gen.tolist())]


def _timed(engine, requests: list[Request]) -> tuple[EngineResult, float]:
    cpu = time.process_time()
    result = engine.run(requests)
    return result, time.process_time() - cpu


def _measure(engine, runs: list[tuple[EngineResult, float]]) -> EngineMeasure:
    stats = [r.stats for r, _ in runs]
    result = runs[-1][0]
    fed = [d for c in result.completions for d in c.token_depths[len(c.prompt):]]
    return EngineMeasure(
        tokens_per_s=statistics.median(s.tokens_per_s for s in stats),
        decode_tokens_per_s=statistics.median(s.decode_tokens_per_s for s in stats),
        cpu_tokens_per_s=statistics.median(s.generated_tokens / cpu for s, (_, cpu) in zip(stats, runs)),
        kv_buffer_mib=engine.buffers.nbytes() / 2**20,
        mean_recursions=sum(fed) / max(1, len(fed)),
        mixed_depth_fraction=stats[-1].mixed_depth_steps / max(1, stats[-1].decode_steps),
        mean_pass_tokens=stats[-1].decode_step_tokens / max(1, stats[-1].decode_steps))


def compare_inference(mor_model, vanilla_model, requests: list[Request], *, batch_size: int, mor_slots: int,
                      repeats: int, warmup_requests: int = 4) -> tuple[EngineMeasure, EngineMeasure]:
    """Run both engines on ``requests`` (module docstring); returns ``(mor, vanilla)`` measures."""
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    engines = {"mor": DepthWiseEngine(mor_model, num_slots=mor_slots, max_batch=batch_size, max_len=max_len,
                                      eos_token_id=None),
               "vanilla": SequenceWiseEngine(vanilla_model, num_slots=batch_size, max_len=max_len,
                                             eos_token_id=None)}
    for engine in engines.values():
        engine.run(requests[:warmup_requests])
    runs: dict[str, list] = {"mor": [], "vanilla": []}
    for repeat in range(repeats):
        order = ("mor", "vanilla") if repeat % 2 == 0 else ("vanilla", "mor")
        for name in order:
            runs[name].append(_timed(engines[name], requests))
    return _measure(engines["mor"], runs["mor"]), _measure(engines["vanilla"], runs["vanilla"])


def report(comparison: InferComparison, *, as_json: bool) -> str:
    """One JSON object (flat keys) or a short table."""
    c, ratios = comparison, comparison.ratios()
    values: dict[str, object] = dict(c.setup)
    for name, m in (("mor", c.mor), ("vanilla", c.vanilla)):
        values.update({f"{name}_{key}": value for key, value in m.__dict__.items()})
    values.update({f"ratio_{key}": value for key, value in ratios.items()})
    if as_json:
        return json.dumps(values)
    s = c.setup
    rows = [f"{'engine':<34}{'tokens/s':>10}{'decode/s':>10}{'tok/CPU-s':>11}{'recursions':>11}{'pass':>7}"
            f"{'KV MiB':>9}"]
    for label, m in ((f"MoR {s['model']} depth-wise", c.mor), ("vanilla sequence-wise", c.vanilla)):
        rows.append(f"{label:<34}{m.tokens_per_s:>10.1f}{m.decode_tokens_per_s:>10.1f}"
                    f"{m.cpu_tokens_per_s:>11.1f}{m.mean_recursions:>11.2f}{m.mean_pass_tokens:>7.1f}"
                    f"{m.kv_buffer_mib:>9.2f}")
    return "\n".join([
        f"greedy generation on {s['device']}: {s['num_requests']} requests, {s['generated_tokens']} tokens "
        f"(prompt {s['mean_prompt_len']:.1f}, generation {s['mean_gen_len']:.1f} tokens on average), "
        f"{s['num_layers']} unrolled layers, hidden {s['hidden_size']}; batch {s['batch_size']}, MoR slots "
        f"{s['mor_slots']}; medians of {s['repeats']} runs",
        *rows,
        f"MoR mixed-depth passes {c.mor.mixed_depth_fraction:.0%}; recursions per token under the training "
        f"capacities: {s['capacity_recursions']}",
        f"ratio MoR/vanilla: tokens/s {ratios['tokens_per_s']:.3f}   decode tokens/s "
        f"{ratios['decode_tokens_per_s']:.3f}   tokens per CPU second {ratios['cpu_tokens_per_s']:.3f}"])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-bench infer", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-mor-e-r3", help="MoR preset of the random models")
    parser.add_argument("--hidden-size", type=_positive_int, default=256, help="width override (head dim 64)")
    parser.add_argument("--mor-dir", help="exported MoR folder (with --vanilla-dir) instead of random models")
    parser.add_argument("--vanilla-dir", help="exported vanilla Llama folder (with --mor-dir)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--num-requests", type=_positive_int, default=32)
    parser.add_argument("--prompt-min", type=_positive_int, default=4)
    parser.add_argument("--prompt-max", type=_positive_int, default=16)
    parser.add_argument("--gen-mean", type=_positive_int, default=64)
    parser.add_argument("--gen-std", type=float, default=16.0)
    parser.add_argument("--batch-size", type=_positive_int, default=8,
                        help="vanilla: sequences per step; MoR: tokens per shared-block pass")
    parser.add_argument("--mor-slots", type=_positive_int, help="MoR resident sequences (default 2 x batch)")
    parser.add_argument("--repeats", type=_positive_int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _run(args: argparse.Namespace) -> str:
    if (args.mor_dir is None) != (args.vanilla_dir is None):
        raise ValueError("pass both --mor-dir and --vanilla-dir, or neither (random models from --preset)")
    if args.prompt_min > args.prompt_max:
        raise ValueError(f"--prompt-min {args.prompt_min} exceeds --prompt-max {args.prompt_max}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here; use --device cpu")
    dtype = getattr(torch, args.dtype)
    max_len = args.prompt_max + 2 * args.gen_mean
    if args.mor_dir is None:
        mor, vanilla = random_models(args.preset, hidden_size=args.hidden_size, max_len=max_len,
                                     seed=args.seed)
        model_name = args.preset
    else:
        mor, vanilla = load_models(args.mor_dir, args.vanilla_dir, dtype)
        model_name = args.mor_dir
    mor, vanilla = mor.to(device=device, dtype=dtype), vanilla.to(device=device, dtype=dtype)
    requests = make_requests(args.num_requests, vocab_size=mor.config.vocab_size, prompt_min=args.prompt_min,
                             prompt_max=args.prompt_max, gen_mean=args.gen_mean, gen_std=args.gen_std,
                             seed=args.seed)
    mor_slots = args.mor_slots or 2 * args.batch_size
    mor_measure, vanilla_measure = compare_inference(mor, vanilla, requests, batch_size=args.batch_size,
                                                     mor_slots=mor_slots, repeats=args.repeats)
    config = mor.config
    caps = config.capacities if config.routing == "expert_choice" else None
    setup = {"model": model_name, "device": str(device), "dtype": args.dtype,
             "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers,
             "num_recursions": config.num_recursions,
             "routing": config.routing, "kv_mode": config.kv_mode, "num_requests": len(requests),
             "generated_tokens": sum(r.max_new_tokens for r in requests),
             "mean_prompt_len": statistics.mean(len(r.prompt) for r in requests),
             "mean_gen_len": statistics.mean(r.max_new_tokens for r in requests),
             "batch_size": args.batch_size, "mor_slots": mor_slots, "repeats": args.repeats,
             "capacity_recursions": round(sum(caps), 3) if caps else None}
    return report(InferComparison(setup=setup, mor=mor_measure, vanilla=vanilla_measure), as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    """Run ``mor-bench infer``; returns the exit status (0, or 2 on bad arguments or an unknown preset)."""
    args = _parser().parse_args(argv)
    try:
        print(_run(args))
    except ValueError as err:  # ConfigError is a ValueError: unknown preset, width the model rejects
        print(f"mor-bench infer: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
