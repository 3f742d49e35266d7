"""``mor-convert``: Megatron checkpoints <-> Hugging Face folders.

    mor-convert to-hf runs/demo/checkpoints hf/demo              # newest complete checkpoint of a save_dir
    mor-convert to-hf runs/demo/checkpoints/step_00000300 hf/demo --dtype bfloat16
    mor-convert from-hf path/to/llama ckpt/up --preset 360m-mor-e-r3 --init stepwise recursion.kv_mode=shared

``to-hf`` writes safetensors, config.json, generation_config.json, the tokenizer and, for MoR models, the
modeling code (load with ``trust_remote_code=True``); vanilla models become a plain ``LlamaForCausalLM``.
``from-hf`` writes a weights-only MoR checkpoint (``step_00000000`` + ``latest``) and ``config.yaml``.
Each subcommand prints one JSON summary line; exit status 2 on bad input. ``--help`` imports neither torch
nor megatron-core.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mor_megatron.cli.quiet import silence_known_warnings
from mor_megatron.cli.summary import print_summary


def _to_hf(args: argparse.Namespace) -> dict[str, Any]:
    from mor_megatron.convert.to_hf import to_hf

    summary = to_hf(args.checkpoint, args.output, tokenizer=args.tokenizer,
                    include_tokenizer=not args.no_tokenizer, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    return dataclasses.asdict(summary)


def _from_hf(args: argparse.Namespace) -> dict[str, Any]:
    from mor_megatron.convert.from_hf import from_hf

    summary = from_hf(args.llama_dir, args.output, preset=args.preset, init=args.init,
                      overrides=args.overrides, seed=args.seed)
    return dataclasses.asdict(summary)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-convert", description="Convert Megatron MoR checkpoints to "
                                     "Hugging Face folders and Llama models to MoR checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    to_hf = commands.add_parser("to-hf", help="Megatron torch_dist checkpoint -> Hugging Face folder",
                                description="Export a training checkpoint (any TP/PP layout) as a Hugging "
                                "Face folder; vanilla models become LlamaForCausalLM, MoR models carry their "
                                "code.")
    to_hf.add_argument("checkpoint", metavar="CKPT", help="a step_XXXXXXXX folder, or a checkpoint.save_dir "
                       "(its 'latest' step is used)")
    to_hf.add_argument("output", metavar="OUT", help="folder to write (must be empty or new)")
    to_hf.add_argument("--tokenizer", metavar="PATH", help="SentencePiece model (or its folder) or Hugging Face "
                       "tokenizer folder (default: the data.tokenizer stored in the checkpoint's config)")
    to_hf.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="weight dtype (default: the checkpoint's)")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors file, e.g. 2GB (default 5GB)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    to_hf.set_defaults(run=_to_hf)

    commands.add_parser("from-deepspeed", help="DeepSpeed ZeRO checkpoint (any stage) -> Megatron checkpoint "
                        "(see `mor-convert from-deepspeed --help`)")
    from_hf = commands.add_parser("from-hf", help="Llama Hugging Face model -> MoR checkpoint (up-training)",
                                  description="Initialise a MoR model from a Llama-architecture model with "
                                  "Relaxed Recursive Transformers initialisation; writes a weights-only "
                                  "checkpoint.")
    from_hf.add_argument("llama_dir", metavar="LLAMA_DIR", help="Hugging Face folder with config.json and "
                         "safetensors")
    from_hf.add_argument("output", metavar="OUT", help="checkpoint folder to write (must be empty or new)")
    from_hf.add_argument("--preset", required=True, help="preset whose recursion section to use, e.g. "
                         "360m-mor-e-r3 (model shape comes from the Llama config)")
    from_hf.add_argument("--init", choices=("stepwise", "average", "lower", "upper"), default="stepwise",
                         help="shared-block initialisation (default stepwise)")
    from_hf.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    from_hf.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="dotted config overrides, e.g. recursion.kv_mode=shared data.tokenizer=...")
    from_hf.set_defaults(run=_from_hf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mor-convert``; returns the exit status (0, or 2 on bad input)."""
    silence_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "from-deepspeed":  # its own command line: DS_CKPT OUT_DIR
        from mor_megatron.convert.deepspeed_to_megatron import main as from_deepspeed

        return from_deepspeed(argv[1:])
    parser = _parser()
    # KEY=VALUE overrides may come before or after --preset/--init: argparse leaves those after an option as
    # unknown arguments of a nargs="*" positional, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "from-hf" or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    run: Callable[[argparse.Namespace], dict[str, Any]] = args.run
    return print_summary(f"mor-convert {args.command}", lambda: run(args),
                         bad_input=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
