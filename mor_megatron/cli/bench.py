"""``mor-bench``: benchmarks that print MoR/vanilla ratios measured side by side in one run.

    mor-bench model [--preset tiny-mor-e-r3] [--hidden-size 256] [--seq-length 512] [--dtype float32] [--json]
    mor-bench train [--preset tiny-mor-e-r2] [--steps 10] [--hidden-size 256] [--seq-length 512] [--json]

    mor-bench pipeline [--pp 2] [--preset tiny-mor-e-r3] [--json]       (launches torchrun jobs)
    mor-bench infer [--preset tiny-mor-e-r3] [--num-requests 32] [--json]
    mor-bench deepspeed [...]                                           (ZeRO-1/2/3 vs the Megatron path)
    mor-bench isoflop [--budgets 2e12 5e12] [--seeds 1 2]                 (trains models to equal FLOPs)
    mor-bench memory [--presets 135m-mor-e-r2 360m-mor-e-r2] [--tensor-parallel 2]   (paper shapes, seq 2048)

``model`` times one forward+backward; ``train`` trains both models with AdamW on the same batches and also
measures peak memory (method: :mod:`mor_megatron.bench.train_compare`). Both run as one process (a 1-rank
job; GPU when CUDA is available, else CPU). Subcommands import their libraries lazily, so ``--help`` is
instant. Exit status 2 on a bad preset or size.
"""

from __future__ import annotations

import argparse
import os
import sys

from mor_megatron.cli.quiet import silence_known_warnings
from mor_megatron.config import ParallelConfig, preset


def _model(args: argparse.Namespace) -> str:
    from mor_megatron.bench.model_step import DTYPES, compare, report
    from mor_megatron.runtime import destroy_distributed, init_distributed

    ctx = init_distributed(ParallelConfig(), seed=0)
    try:
        timing = compare(args.preset, pg_collection=ctx.pg_collection, device=ctx.device,
                         dtype=DTYPES[args.dtype], hidden_size=args.hidden_size, seq_length=args.seq_length,
                         batch_size=args.batch_size, repeats=args.repeats)
    finally:
        destroy_distributed()
    return report(timing, mor_preset=args.preset, device=ctx.device.type, dtype=args.dtype, as_json=args.json)


def _train(args: argparse.Namespace) -> str:
    from mor_megatron.bench.model_step import DTYPES
    from mor_megatron.bench.train_compare import compare_training, report
    from mor_megatron.runtime import destroy_distributed, init_distributed

    ctx = init_distributed(ParallelConfig(), seed=0)
    try:
        comparison = compare_training(args.preset, pg_collection=ctx.pg_collection, device=ctx.device,
                                      hidden_size=args.hidden_size, seq_length=args.seq_length,
                                      batch_size=args.batch_size, steps=args.steps,
                                      warmup_steps=args.warmup_steps, lr=args.lr,
                                      core_attention=args.core_attention, dtype=DTYPES[args.dtype])
    finally:
        destroy_distributed()
    return report(comparison, as_json=args.json)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _add_size_args(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset, help=f"MoR preset (default {default_preset}); "
                        "the baseline is the vanilla model of the same unrolled depth")
    parser.add_argument("--hidden-size", type=_positive_int, default=256,
                        help="override the preset's width (CPU-sized default 256; head dim 64)")
    parser.add_argument("--seq-length", type=_positive_int, default=512)
    parser.add_argument("--batch-size", type=_positive_int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="model precision (bfloat16: megatron's Float16Module, routing in fp32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _DELEGATED.items():  # listed for --help; main() hands them their own arguments
        sub.add_parser(name, help=f"see `mor-bench {name} --help` ({module})")
    model = sub.add_parser("model", help="forward+backward time of a MoR preset vs the vanilla model of the "
                                         "same unrolled depth, with the FLOPs ratio")
    _add_size_args(model, "tiny-mor-e-r3")
    model.add_argument("--repeats", type=_positive_int, default=5)
    model.set_defaults(run=_model)
    train = sub.add_parser("train", help="train a MoR preset and the vanilla model of the same unrolled "
                                         "depth on the same tokens: step time, tokens/s, peak memory, loss, "
                                         "ratios")
    _add_size_args(train, "tiny-mor-e-r2")
    train.add_argument("--steps", type=_positive_int, default=10, help="timed AdamW steps per model")
    train.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before the measurements")
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--core-attention", choices=["sdpa", "megatron"], default="sdpa",
                       help="attention kernel of both models (model.core_attention)")
    train.set_defaults(run=_train)
    return parser


# Benchmarks with their own command line (they launch processes or load models themselves): module paths.
_DELEGATED = {
    "pipeline": "mor_megatron.bench.pipeline_compare",
    "infer": "mor_megatron.bench.infer_compare",
    "deepspeed": "mor_megatron.bench.deepspeed_compare",
    "memory": "mor_megatron.bench.memory_compare",
    "isoflop": "mor_megatron.bench.isoflop",
}


def main(argv: list[str] | None = None) -> int:
    """Run ``mor-bench``; returns the exit status (0, or 2 on a bad preset or size)."""
    silence_known_warnings()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:
        import importlib

        return importlib.import_module(_DELEGATED[argv[0]]).main(argv[1:])
    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1))))
    try:
        preset(args.preset)  # a bad name fails here, before torch and megatron-core are imported
        print(args.run(args))
    except ValueError as err:  # ConfigError is a ValueError: unknown preset, width the model rejects
        print(f"mor-bench {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
