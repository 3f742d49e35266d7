"""Benchmark: a MoR model trained at PP=2 (recursions as virtual stages) vs PP=1, on CPU processes.

``mor-bench pipeline`` launches two torchrun jobs of this module's worker with the same model, batches and
step count (one process at PP=1, P processes at PP=P) and prints, side by side: median step time, each
rank's peak RSS and parameter count, the step-time ratio, and the measured pipeline overhead next to the
interleaved schedule's theoretical bubble fraction ``(P - 1) / (v * m + P - 1)`` (v virtual stages per rank,
m micro-batches).

The measured overhead is ``1 - (T_pp1 / P) / T_ppP``: the share of the pipelined step not explained by a
perfect P-way split of the single-rank step. It includes the bubble *and* stage-boundary communication and
imbalance (the first/last ranks also hold embedding, head and unique layers), so on CPU it is an upper bound
on the bubble.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from mor_megatron.bench.worker_results import emit, run_for_results

_RESULT_PREFIX = "MOR_BENCH_PIPELINE "


def _worker(args: argparse.Namespace) -> None:
    import torch

    from mor_megatron.bench.synthetic import synthetic_batches
    from mor_megatron.config import config_from_dict
    from mor_megatron.model.builder import virtual_pipeline_size
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.megatron_engine import MegatronEngine

    config = config_from_dict({
        "preset": args.preset,
        "model": {"hidden_size": args.hidden_size, "num_attention_heads": args.hidden_size // 64,
                  "num_query_groups": args.hidden_size // 64, "ffn_hidden_size": args.hidden_size * 8 // 3 // 8 * 8,
                  "max_seq_length": args.seq_length, "num_layers": args.num_layers},
        "train": {"seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
                  "global_batch_size": args.global_batch_size, "train_steps": args.steps},
        "optim": {"schedule": "constant"},
        "parallel": {"pipeline_parallel_size": args.pp},
        "tracking": {"enabled": False},
    })
    ctx = init_distributed(config.parallel, seed=0,
                           virtual_pipeline_size=virtual_pipeline_size(config.recursion, config.parallel))
    try:
        engine = MegatronEngine(config, ctx)
        batches = synthetic_batches(config, ctx.dp_rank, ctx.dims.dp, args.steps + args.warmup)
        times = []
        for step in range(args.warmup + args.steps):
            torch.distributed.barrier()
            start = time.perf_counter()
            engine.train_step(batches)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        result = {"pp": args.pp, "pp_rank": ctx.pp_rank, "step_s": statistics.median(times),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "params": sum(p.numel() for p in engine.model.parameters()),
                  "num_microbatches": engine.num_microbatches,
                  "virtual_stages": virtual_pipeline_size(config.recursion, config.parallel) or 1}
        emit(_RESULT_PREFIX, result)
    finally:
        destroy_distributed()


def _launch(args: argparse.Namespace, pp: int, port: int) -> list[dict]:
    worker_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("preset", "hidden_size", "num_layers", "seq_length", "micro_batch_size",
                            "global_batch_size", "steps", "warmup")]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={pp}", "--master-addr=127.0.0.1",
               f"--master-port={port}", "-m", "mor_megatron.bench.pipeline_compare", "--worker", f"--pp={pp}",
               *worker_args]
    results = run_for_results(command, _RESULT_PREFIX, timeout_s=args.timeout_s,
                              what=f"pipeline benchmark at PP={pp}")
    return sorted(results, key=lambda r: r["pp_rank"])


def compare(args: argparse.Namespace) -> dict:
    """Run PP=1 and PP=``args.pp`` and return both results and the ratios."""
    single = _launch(args, 1, args.port)
    piped = _launch(args, args.pp, args.port + 1)
    t1, tp = single[0]["step_s"], max(r["step_s"] for r in piped)
    v, m = piped[0]["virtual_stages"], piped[0]["num_microbatches"]
    return {
        "pp1": single, f"pp{args.pp}": piped,
        "step_time_ratio": tp / t1,
        "peak_rss_ratio_max_rank": max(r["peak_rss_mib"] for r in piped) / single[0]["peak_rss_mib"],
        "params_ratio_max_rank": max(r["params"] for r in piped) / single[0]["params"],
        "measured_overhead": 1.0 - (t1 / args.pp) / tp,
        "theoretical_bubble": (args.pp - 1) / (v * m + args.pp - 1),
    }


def format_report(result: dict, pp: int) -> str:
    lines = [f"{'layout':10s} {'rank':>4s} {'step (ms)':>10s} {'peak RSS (MiB)':>15s} {'params':>12s}"]
    for key in ("pp1", f"pp{pp}"):
        for r in result[key]:
            lines.append(f"{key:10s} {r['pp_rank']:4d} {r['step_s'] * 1e3:10.1f} {r['peak_rss_mib']:15.0f} "
                         f"{r['params']:12d}")
    lines.append(f"ratios PP={pp}/PP=1: step time {result['step_time_ratio']:.3f}  "
                 f"peak RSS (largest rank) {result['peak_rss_ratio_max_rank']:.3f}  "
                 f"params (largest rank) {result['params_ratio_max_rank']:.3f}")
    lines.append(f"pipeline overhead measured {result['measured_overhead']:.3f}  "
                 f"theoretical bubble {result['theoretical_bubble']:.3f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``mor-bench pipeline`` and the worker."""
    parser.add_argument("--preset", default="tiny-mor-e-r3")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mor-bench pipeline", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    result = compare(args)
    print(json.dumps(result) if args.json else format_report(result, args.pp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
