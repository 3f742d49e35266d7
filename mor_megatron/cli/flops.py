"""``mor-flops``: parameters and training FLOPs of a preset or config (paper App. D convention).

    mor-flops --model 360m-mor-e-r3
    mor-flops --model 360m-vanilla --flops-budget 16.5e18 --json
    mor-flops --config my.yaml recursion.num_recursions=4 model.num_layers=34 --tokens 20e9

``--json`` prints one JSON object; otherwise a short table. Exit status 2 on a bad preset, config or argument.
The accounting and how it differs from the paper's budgets: :mod:`mor_megatron.model.flops`, docs/flops.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mor_megatron.config import ConfigError, JobConfig, config_from_dict, load_config, parse_overrides
from mor_megatron.model.flops import (count_parameters, flops_per_token, paper_budget_flops_per_token,
                                      paper_budget_tokens, tokens_for_budget)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mor-flops", description="Unique non-embedding / embedding parameters and training FLOPs "
        "(forward x 3, paper App. D convention) of a MoR preset or config.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PRESET",
                        help="paper preset, e.g. 360m-mor-e-r3 (see config.PRESET_NAMES)")
    source.add_argument("--config", metavar="YAML", help="job config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. recursion.kv_mode=shared")
    parser.add_argument("--seq-length", type=int, help="training sequence length (default: the config's)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=float, help="token budget, e.g. 20e9: report its training FLOPs")
    budget.add_argument("--flops-budget", type=float, help="FLOPs budget, e.g. 16.5e18: report its tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _load(args: argparse.Namespace) -> JobConfig:
    if args.model is None:
        return load_config(args.config, args.overrides)
    values = parse_overrides(args.overrides)
    if "preset" in values:
        raise ConfigError("give the preset either as --model or as a preset=... override, not both")
    values["preset"] = args.model
    return config_from_dict(values)


def report(config: JobConfig, seq_length: int | None = None, tokens: float | None = None,
           flops_budget: float | None = None) -> dict[str, Any]:
    """The ``--json`` object for ``config``; ``tokens`` or ``flops_budget`` adds the budget fields."""
    model, recursion = config.model, config.recursion
    seq_length = seq_length if seq_length is not None else config.seq_length
    params = count_parameters(model, recursion)
    flops = flops_per_token(model, recursion, seq_length)
    paper_per_token = paper_budget_flops_per_token(model, recursion, seq_length)
    out: dict[str, Any] = {
        "preset": config.preset,
        "seq_length": seq_length,
        "unique_layers": params.unique_layers,
        "unrolled_layers": params.unrolled_layers,
        "unique_non_embedding_params": params.non_embedding,
        "embedding_params": params.embedding,
        "router_params": params.router,
        "total_params": params.total,
        "params": {"attention": params.attention, "mlp": params.mlp, "norms": params.norms,
                   "router": params.router, "word_embeddings": params.word_embeddings,
                   "output_layer": params.output_layer},
        "forward_flops_per_token": flops.forward,
        "training_flops_per_token": flops.training_flops_per_token,
        "forward_flops_per_token_breakdown": {"dense_linear": flops.dense_linear,
                                              "attention": flops.attention, "router": flops.router},
        "lm_head_flops_per_token": flops.lm_head,
        "training_flops_per_token_with_lm_head": flops.training_flops_per_token_with_lm_head,
        "paper_budget_flops_per_token": paper_per_token,
        "tokens_per_recursion": list(flops.tokens_per_recursion),
    }
    if tokens is not None:
        out["tokens"] = int(tokens)
    elif flops_budget is not None:
        out["flops_budget"] = flops_budget
        out["tokens"] = tokens_for_budget(model, recursion, seq_length, flops_budget)
        out["paper_budget_tokens"] = paper_budget_tokens(model, recursion, seq_length, flops_budget)
    if "tokens" in out:
        out["training_flops"] = out["tokens"] * flops.training_flops_per_token
        out["training_flops_with_lm_head"] = out["tokens"] * flops.training_flops_per_token_with_lm_head
        out["paper_budget_flops"] = out["tokens"] * paper_per_token
    return out


def _units(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:g}"


def format_table(out: dict[str, Any]) -> str:
    """Human-readable table of a :func:`report` object (counts in K/M/B/T, totals in e-notation)."""
    parts = out["forward_flops_per_token_breakdown"]
    rows = [
        ("preset", str(out["preset"])),
        ("seq length", str(out["seq_length"])),
        ("layers unique / unrolled", f"{out['unique_layers']} / {out['unrolled_layers']}"),
        ("unique non-embedding params", _units(out["unique_non_embedding_params"])),
        ("  of which routers", _units(out["router_params"])),
        ("embedding params", _units(out["embedding_params"])),
        ("total params", _units(out["total_params"])),
        ("active tokens per recursion", " / ".join(str(t) for t in out["tokens_per_recursion"])),
        ("forward FLOPs/token", _units(out["forward_flops_per_token"])),
        ("  dense linear", _units(parts["dense_linear"])),
        ("  attention", _units(parts["attention"])),
        ("  router", _units(parts["router"])),
        ("training FLOPs/token (3x fwd)", _units(out["training_flops_per_token"])),
        ("LM head FLOPs/token (not above)", _units(out["lm_head_flops_per_token"])),
        ("training FLOPs/token + LM head", _units(out["training_flops_per_token_with_lm_head"])),
        ("paper-budget FLOPs/token", _units(out["paper_budget_flops_per_token"])),
    ]
    if "flops_budget" in out:
        rows.append(("FLOPs budget", f"{out['flops_budget']:.3g}"))
    if "tokens" in out:
        rows += [("tokens", _units(out["tokens"])),
                 ("training FLOPs", f"{out['training_flops']:.3g}"),
                 ("training FLOPs + LM head", f"{out['training_flops_with_lm_head']:.3g}"),
                 ("paper-budget FLOPs (fwd only)", f"{out['paper_budget_flops']:.3g}")]
    if "paper_budget_tokens" in out:
        rows.append(("paper-budget tokens", _units(out["paper_budget_tokens"])))
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mor-flops``; returns the exit status (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        config = _load(args)
        for name in ("seq_length", "tokens", "flops_budget"):
            value = getattr(args, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        out = report(config, args.seq_length, args.tokens, args.flops_budget)
    except ValueError as err:  # ConfigError is a ValueError; load_config turns YAML errors into one
        print(f"mor-flops: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out) if args.json else format_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
