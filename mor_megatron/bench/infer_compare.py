"""``mor-bench infer``: generation throughput of a MoR model vs the vanilla model of the same unrolled depth.

    mor-bench infer [--preset tiny-mor-e-r3] [--hidden-size 256] [--num-requests 32] [--batch-size 8]
                    [--mor-slots N] [--block-size 16] [--gen-mean 64] [--gen-std 16] [--repeats 3] [--json]
    mor-bench infer --mor-dir hf/mor --vanilla-dir hf/vanilla ...

Models. By default both are built with random weights (seed 0) from a preset (``mor_megatron.config``), the
MoR one as a Hugging Face ``MoRForCausalLM`` and the baseline as a ``LlamaForCausalLM`` with the MoR model's
unrolled depth and the same width, heads and vocabulary (what ``mor-convert to-hf`` exports for vanilla runs).
``--mor-dir``/``--vanilla-dir`` load exported folders instead. A random expert-choice router would keep about
half the tokens at each recursion of capacity < 1 (the sign of a random projection), so the random model's
router rows are calibrated (:func:`calibrate_router`) to keep about the training capacities' share of the
tokens at each recursion (1, 2/3, 1/3 for R = 3), the depth distribution a trained router is taught; the
recursions per token the capacities imply are printed beside the measured ones.

Workload (the paper's App. C setup, scaled to a CPU): ``--num-requests`` prompts of random token ids, prompt
lengths uniform in ``[--prompt-min, --prompt-max]``, generation lengths drawn from Normal(``--gen-mean``,
``--gen-std``), rounded and clipped to ``[1, 2 * gen-mean]``, all from ``--seed``. No EOS ends a sequence, so
both models generate exactly the same number of tokens. Greedy decoding.

Engines (:mod:`mor_megatron.inference.engine`): the MoR model runs continuous depth-wise batching with at most
``--batch-size`` tokens per pass through the shared block and ``--mor-slots`` resident sequences (default
``2 * batch-size``, so passes stay full while tokens exit early); the vanilla model runs continuous
sequence-wise batching with ``--batch-size`` resident sequences, all decoded every step. Both refill freed
slots from the queue at once and keep K/V in a paged cache of ``--block-size``-token blocks, one pool for all
layers sized for the worst case (:mod:`mor_megatron.inference.kv_buffers`).

Measurement. One untimed warm-up run of each engine on the first requests, then ``--repeats`` timed runs of
the whole workload per engine, alternating which goes first, in one process: reported are the medians of
generated tokens per second of a whole run (prefills included), of decoding alone (generated tokens after each
prompt's first / time outside prefills), and of tokens per CPU second (``time.process_time``, all threads:
steadier than wall time on a shared machine), and MoR/vanilla ratios of each. KV memory is the bytes of the
KV blocks in use: per request (the blocks a sequence holds when it finishes, its largest footprint, averaged
over the requests; independent of how many sequences are resident) for the whole model and for the recursion
block (the shared block's sites, against the vanilla layers at the same unrolled positions; the paper's
``(R + 1) / (2R)`` quantity), and the peak over a run, which also scales with the resident sequences
(``--mor-slots`` vs ``--batch-size``). It asserts nothing.
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
    kv_request_kib: float
    """KV bytes in use per request (its blocks when it finished, mean over the requests), all layers."""
    kv_recursion_kib: float
    """The part of ``kv_request_kib`` in the recursion block (vanilla: its layers at the same positions)."""
    kv_peak_mib: float
    """Most KV bytes in use at once in the last run."""
    kv_reserved_mib: float
    """The KV block pool (worst case for the engine's slots and max_len)."""
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
        """MoR / vanilla of each throughput and KV measure."""
        return {name: getattr(self.mor, name) / getattr(self.vanilla, name)
                for name in ("tokens_per_s", "decode_tokens_per_s", "cpu_tokens_per_s", "kv_request_kib",
                             "kv_recursion_kib", "kv_peak_mib")}


PAPER_THROUGHPUT_RATIO = 2.06
"""The paper's headline serving speed-up: MoR-E N_r=4 vs vanilla, continuous depth-wise batching at max batch (§3.3)."""

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


def calibrate_router(model, sequences: list[list[int]], *, steps: int = 16) -> list[float]:
    """Shift an expert-choice router so that about ``capacities[r]`` of the tokens run recursion ``r``.

    Random router rows keep a token at recursion ``r`` when a random projection of its hidden state is
    positive, about half of the candidates. The router has no bias, but the hidden states share a mean
    direction ``m``, so row ``r`` gets ``beta_r * m / |m|`` added, ``beta_r`` found by bisection on the
    share of the tokens of ``sequences`` (one left-padded batch, causal routing) that run recursion ``r``;
    recursions of capacity >= 1 keep every token anyway. Returns the shares reached per recursion.
    """
    config = model.config
    if config.routing != "expert_choice":
        raise ValueError(f"calibrate_router: expert-choice routing only, got {config.routing!r}")
    longest = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), longest), config.pad_token_id or 0, dtype=torch.long,
                     device=model.device)
    real = torch.zeros_like(ids, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, longest - len(sequence):] = torch.tensor(sequence)
        real[row, longest - len(sequence):] = True
    router = model.model.router
    seen: list[torch.Tensor] = []
    logits = router.logits

    def capture(hidden, recursion_idx=None):
        seen.append(hidden.detach().reshape(-1, hidden.shape[-1]).float())
        return logits(hidden, recursion_idx)

    def shares() -> list[float]:
        with torch.no_grad():
            masks = model(ids, attention_mask=real.long(), output_recursion_masks=True).recursion_masks
        return [float((mask & real).sum() / real.sum()) for mask in masks]

    router.logits = capture  # an instance attribute, removed below: the class method comes back
    try:
        with torch.no_grad():
            for sequence in sequences:  # unpadded, so that padding does not shift the mean
                model(torch.tensor([sequence], device=model.device))
    finally:
        del router.logits
    mean = torch.cat(seen).mean(dim=0)
    direction = (mean / mean.norm()).to(router.weight.dtype)
    with torch.no_grad():
        for r, capacity in enumerate(config.capacities):
            if capacity >= 1.0:
                continue
            row = router.weight[r].clone()
            low, high = -1.0, 1.0
            for _ in range(20):  # widen until the target share lies between the two ends
                router.weight[r] = row + low * direction
                below = shares()[r] <= capacity
                router.weight[r] = row + high * direction
                if below and shares()[r] >= capacity:
                    break
                low, high = 2 * low, 2 * high
            for _ in range(steps):
                middle = (low + high) / 2
                router.weight[r] = row + middle * direction
                low, high = (middle, high) if shares()[r] < capacity else (low, middle)
            router.weight[r] = row + (low + high) / 2 * direction
    return shares()


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


def _measure(runs: list[tuple[EngineResult, float]], recursion_share: float | None) -> EngineMeasure:
    """Medians of ``runs`` (result and CPU seconds of each); ``recursion_share``: the share of the recursion
    block in the bytes a vanilla sequence holds (vanilla layers all cache the same tokens), None for MoR
    (measured)."""
    stats = [r.stats for r, _ in runs]
    result = runs[-1][0]
    fed = [d for c in result.completions for d in c.token_depths[len(c.prompt):]]
    requests = len(result.completions)
    kv_request = sum(c.kv_bytes for c in result.completions) / requests
    kv_recursion = (sum(c.kv_recursion_bytes for c in result.completions) / requests
                    if recursion_share is None else kv_request * recursion_share)
    return EngineMeasure(
        tokens_per_s=statistics.median(s.tokens_per_s for s in stats),
        decode_tokens_per_s=statistics.median(s.decode_tokens_per_s for s in stats),
        cpu_tokens_per_s=statistics.median(s.generated_tokens / cpu for s, (_, cpu) in zip(stats, runs)),
        kv_request_kib=kv_request / 2**10, kv_recursion_kib=kv_recursion / 2**10,
        kv_peak_mib=stats[-1].kv_peak_bytes / 2**20, kv_reserved_mib=stats[-1].kv_reserved_bytes / 2**20,
        mean_recursions=sum(fed) / max(1, len(fed)),
        mixed_depth_fraction=stats[-1].mixed_depth_steps / max(1, stats[-1].decode_steps),
        mean_pass_tokens=stats[-1].decode_step_tokens / max(1, stats[-1].decode_steps))


def compare_inference(mor_model, vanilla_model, requests: list[Request], *, batch_size: int, mor_slots: int,
                      repeats: int, block_size: int = 16,
                      warmup_requests: int = 4) -> tuple[EngineMeasure, EngineMeasure]:
    """Run both engines on ``requests`` (module docstring); returns ``(mor, vanilla)`` measures."""
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    engines = {"mor": DepthWiseEngine(mor_model, num_slots=mor_slots, max_batch=batch_size, max_len=max_len,
                                      eos_token_id=None, block_size=block_size),
               "vanilla": SequenceWiseEngine(vanilla_model, num_slots=batch_size, max_len=max_len,
                                             eos_token_id=None, block_size=block_size)}
    mor_stack, vanilla_stack = engines["mor"].stack, engines["vanilla"].stack
    recursion_layers = mor_stack.num_shared * mor_stack.num_recursions
    if vanilla_stack.num_shared != mor_stack.num_prefix + recursion_layers + mor_stack.num_suffix:
        raise ValueError(f"the vanilla model has {vanilla_stack.num_shared} layers, the MoR model "
                         f"{mor_stack.num_prefix + recursion_layers + mor_stack.num_suffix} unrolled ones; "
                         "compare models of the same unrolled depth")
    for engine in engines.values():
        engine.run(requests[:warmup_requests])
    runs: dict[str, list] = {"mor": [], "vanilla": []}
    for repeat in range(repeats):
        order = ("mor", "vanilla") if repeat % 2 == 0 else ("vanilla", "mor")
        for name in order:
            cpu = time.process_time()
            result = engines[name].run(requests)
            runs[name].append((result, time.process_time() - cpu))
    return _measure(runs["mor"], None), _measure(runs["vanilla"], recursion_layers / vanilla_stack.num_shared)


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
            f"{'KV KiB/req':>11}{'rec. block':>11}{'peak MiB':>9}{'pool MiB':>9}"]
    for label, m in ((f"MoR {s['model']} depth-wise", c.mor), ("vanilla sequence-wise", c.vanilla)):
        rows.append(f"{label:<34}{m.tokens_per_s:>10.1f}{m.decode_tokens_per_s:>10.1f}"
                    f"{m.cpu_tokens_per_s:>11.1f}{m.mean_recursions:>11.2f}{m.mean_pass_tokens:>7.1f}"
                    f"{m.kv_request_kib:>11.1f}{m.kv_recursion_kib:>11.1f}{m.kv_peak_mib:>9.2f}"
                    f"{m.kv_reserved_mib:>9.2f}")
    return "\n".join([
        f"greedy generation on {s['device']}: {s['num_requests']} requests, {s['generated_tokens']} tokens "
        f"(prompt {s['mean_prompt_len']:.1f}, generation {s['mean_gen_len']:.1f} tokens on average), "
        f"{s['num_layers']} unrolled layers, hidden {s['hidden_size']}; batch {s['batch_size']}, MoR slots "
        f"{s['mor_slots']}; KV blocks of {s['block_size']} tokens; medians of {s['repeats']} runs",
        *rows,
        f"MoR mixed-depth passes {c.mor.mixed_depth_fraction:.0%}; recursions per token under the training "
        f"capacities: {s['capacity_recursions']}",
        f"ratio MoR/vanilla: tokens/s {ratios['tokens_per_s']:.3f} (paper, MoR-E N_r=4 at max batch on a GPU: "
        f"{PAPER_THROUGHPUT_RATIO}x)   decode tokens/s "
        f"{ratios['decode_tokens_per_s']:.3f}   tokens per CPU second {ratios['cpu_tokens_per_s']:.3f}",
        f"KV bytes in use MoR/vanilla: per request {ratios['kv_request_kib']:.3f}   recursion block "
        f"{ratios['kv_recursion_kib']:.3f} (paper (R+1)/(2R) = {s['paper_kv_ratio']})   peak "
        f"{ratios['kv_peak_mib']:.3f} ({s['mor_slots']} vs {s['batch_size']} resident sequences)"])


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
    parser.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV block")
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
    if args.mor_dir is None and mor.config.routing == "expert_choice":
        # Generated tokens' hidden states differ from random prompts': calibrate on the prompts, then again on
        # the sequences the calibrated model generates (prompt + continuation).
        calibrate_router(mor, [list(r.prompt) for r in requests])
        probe = DepthWiseEngine(mor, num_slots=args.batch_size, max_batch=args.batch_size, max_len=max_len,
                                eos_token_id=None).run(requests[:args.batch_size])
        calibrate_router(mor, [c.prompt + c.tokens for c in probe.completions])
    mor_slots = args.mor_slots or 2 * args.batch_size
    mor_measure, vanilla_measure = compare_inference(mor, vanilla, requests, batch_size=args.batch_size,
                                                     mor_slots=mor_slots, repeats=args.repeats,
                                                     block_size=args.block_size)
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
             "block_size": args.block_size,
             "paper_kv_ratio": round((config.num_recursions + 1) / (2 * config.num_recursions), 3),
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
