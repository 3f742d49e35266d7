"""``mor-bench``: benchmarks that print MoR/vanilla ratios measured side by side in one run.

    mor-bench model [--preset tiny-mor-e-r3] [--hidden-size 256] [--seq-length 512] [--json]

Subcommands import their libraries lazily, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys


def _model(args: argparse.Namespace) -> str:
    from mor_megatron.bench.model_step import compare, report
    from mor_megatron.config import ParallelConfig
    from mor_megatron.runtime import destroy_distributed, init_distributed

    ctx = init_distributed(ParallelConfig(), seed=0)
    try:
        timing = compare(args.preset, pg_collection=ctx.pg_collection, hidden_size=args.hidden_size,
                         seq_length=args.seq_length, batch_size=args.batch_size, repeats=args.repeats)
    finally:
        destroy_distributed()
    return report(timing, mor_preset=args.preset, as_json=args.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="forward+backward time of a MoR preset vs the vanilla model of the "
                                         "same unrolled depth, with the FLOPs ratio")
    model.add_argument("--preset", default="tiny-mor-e-r3")
    model.add_argument("--hidden-size", type=int, default=256, help="override the preset's width (CPU-sized)")
    model.add_argument("--seq-length", type=int, default=512)
    model.add_argument("--batch-size", type=int, default=4)
    model.add_argument("--repeats", type=int, default=5)
    model.add_argument("--json", action="store_true")
    model.set_defaults(run=_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1))))
    print(args.run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
