"""Memory benchmark at the paper's shapes: MoR against the vanilla model of the same unrolled depth, and the
activations each tensor-parallel rank keeps with and without sequence parallelism.

``mor-bench memory`` measures, for each MoR preset (default the paper's N_r = 2 models at 135M and 360M, seq
2048, batch 1, fp32), the preset and its vanilla baseline **one model per process** (so a 360M pair needs the
host memory of one model, not of both): peak training memory = resident tensors (weights, AdamW state,
batch) + the in-step peak above them (activations, gradients, temporaries), with the method of
:mod:`mor_megatron.bench.train_compare` (CUDA's allocator statistics on GPU, ``torch.profiler`` memory events on
CPU), and the bytes of activations saved for backward per token (``saved_tensors_hooks`` during one forward,
distinct storages, parameters excluded). It prints the MoR/vanilla ratio beside the paper's 0.75 (25% less
peak memory for MoR N_r = 2 at 360M).

With ``--tensor-parallel N`` it also launches N processes (torchrun, gloo on CPU) that build ``--tp-preset``
(default the 730M MoR N_r = 2: the 135M and 360M shapes have 9 and 15 heads, which TP=2 cannot split; at
``--tp-seq-length``, default 512, for host memory) and its baseline at TP=N without and with ``parallel.sequence_parallel`` and report, per rank, the saved activation
bytes per token: sequence parallelism keeps 1/N of the norm, residual and dropout activations.
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from mor_megatron.bench.worker_results import emit, run_for_results

PAPER_MEMORY_RATIO = 0.75
"""Peak training memory of MoR (N_r = 2) / vanilla at 360M in the paper (25% less)."""
MIB = 2**20
_RESULT_PREFIX = "MOR_BENCH_MEMORY "


@dataclass(frozen=True)
class ModelMemory:
    """One model's memory in a training step."""

    name: str
    parameters: int
    resident_bytes: int
    step_peak_bytes: int
    saved_bytes_per_token: float

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.step_peak_bytes


def saved_activation_bytes(model: torch.nn.Module, batch: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward after one forward on ``batch``."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(tokens, positions, None, labels=labels).mean()
    del loss  # frees the graph without a backward
    return sum(saved.values())


def _measure_worker(args: argparse.Namespace) -> None:
    """One model in this fresh process (``--baseline``: the preset's vanilla model): its :class:`ModelMemory`."""
    from mor_megatron.bench.model_step import DTYPES, bench_model_config, build_bench_model, vanilla_of_same_depth
    from mor_megatron.bench.train_compare import BenchModel, measure_step_memory, text_batches
    from mor_megatron.config import ParallelConfig
    from mor_megatron.runtime import destroy_distributed, init_distributed

    (preset_name,) = args.presets
    model_cfg, recursion = bench_model_config(preset_name, hidden_size=None, seq_length=args.seq_length)
    name = preset_name
    if args.baseline:
        model_cfg, recursion = vanilla_of_same_depth(model_cfg, recursion)
        name = f"vanilla ({model_cfg.num_layers} layers)"
    ctx = init_distributed(ParallelConfig(), seed=0)
    try:
        batches = [b.to(ctx.device) for b in text_batches(3, batch_size=args.batch_size, seq_length=args.seq_length)]
        trainee = BenchModel(build_bench_model(model_cfg, recursion, pg_collection=ctx.pg_collection,
                                               device=ctx.device, dtype=DTYPES[args.dtype]), lr=3e-4)
        resident, step_peak = measure_step_memory(trainee, (batches[0], batches[1]), ctx.device)
        saved = saved_activation_bytes(trainee.model, batches[2])
        result = ModelMemory(name, sum(p.numel() for p in trainee.model.parameters()), resident, step_peak,
                             saved / (args.batch_size * args.seq_length))
    finally:
        destroy_distributed()
    emit(_RESULT_PREFIX, asdict(result))


def measure(args: argparse.Namespace, preset_name: str) -> list[ModelMemory]:
    """The preset and its vanilla baseline, each in a process of its own: memory freed by one model is not
    always returned to the system (the C allocator keeps it), so two 360M models in one process would need
    the memory of both."""
    results = []
    for baseline in (False, True):
        command = [sys.executable, "-m", "mor_megatron.bench.memory_compare", "--measure-one", "--presets",
                   preset_name, f"--seq-length={args.seq_length}", f"--batch-size={args.batch_size}",
                   f"--dtype={args.dtype}", *(["--baseline"] if baseline else [])]
        (line,) = _run(command, args.timeout_s, f"measuring {preset_name}")
        results.append(ModelMemory(**line))
    return results


def _run(command: list[str], timeout_s: float, what: str) -> list[dict]:
    # glibc serves blocks below its (growing) mmap threshold from heaps that keep freed memory: at 360M the
    # process would hold ~2x its peak of live tensors. A fixed 1 MiB threshold maps large tensors and returns
    # them on free, so the host memory tracks the tensors measured (measurements are of tensors either way).
    threshold = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(2**20))}
    return run_for_results(command, _RESULT_PREFIX, timeout_s=timeout_s, what=what, env=threshold)


def _sequence_parallel_worker(args: argparse.Namespace) -> None:
    """One TP rank: saved activation bytes per token of the preset and its baseline, SP off and on."""
    from mor_megatron.bench.model_step import DTYPES, bench_model_config, build_bench_model, vanilla_of_same_depth
    from mor_megatron.bench.train_compare import text_batches
    from mor_megatron.config import ParallelConfig
    from mor_megatron.runtime import destroy_distributed, init_distributed

    model_cfg, recursion = bench_model_config(args.tp_preset, hidden_size=None, seq_length=args.tp_seq_length)
    base_cfg, base_recursion = vanilla_of_same_depth(model_cfg, recursion)
    (batch,) = text_batches(1, batch_size=args.batch_size, seq_length=args.tp_seq_length)
    tokens = args.batch_size * args.tp_seq_length
    result = {}
    for sequence_parallel in (False, True):
        parallel = ParallelConfig(tensor_parallel_size=args.tensor_parallel, sequence_parallel=sequence_parallel)
        ctx = init_distributed(parallel, seed=0)
        try:
            for name, (m, r) in (("mor", (model_cfg, recursion)), ("vanilla", (base_cfg, base_recursion))):
                model = build_bench_model(m, r, pg_collection=ctx.pg_collection, device=ctx.device,
                                          dtype=DTYPES[args.dtype], parallel=parallel)
                result[f"{name}_sp{int(sequence_parallel)}"] = saved_activation_bytes(model, batch.to(ctx.device)) / tokens
                del model
                gc.collect()
        finally:
            destroy_distributed(keep_process_group=True)
    emit(_RESULT_PREFIX, {"rank": torch.distributed.get_rank(), **result})
    torch.distributed.destroy_process_group()


def sequence_parallel_activations(args: argparse.Namespace) -> list[dict]:
    """Launch the TP workers with torchrun; their per-rank results."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.tensor_parallel}",
               "--master-addr=127.0.0.1", f"--master-port={args.port}", "-m", "mor_megatron.bench.memory_compare",
               "--tp-worker", f"--tensor-parallel={args.tensor_parallel}", f"--tp-seq-length={args.tp_seq_length}",
               f"--batch-size={args.batch_size}", f"--dtype={args.dtype}", f"--tp-preset={args.tp_preset}"]
    return sorted(_run(command, args.timeout_s, f"the TP={args.tensor_parallel} workers"), key=lambda r: r["rank"])


def format_pairs(args: argparse.Namespace, pairs: dict[str, list[ModelMemory]]) -> str:
    lines = [f"peak training memory, seq {args.seq_length} x batch {args.batch_size}, {args.dtype}, one model at a "
             "time (resident = weights + AdamW state + batch; in-step = activations, grads, temporaries)",
             f"{'model':<24}{'params':>14}{'resident MiB':>14}{'in-step MiB':>13}{'peak MiB':>10}"
             f"{'saved KiB/token':>17}"]
    for preset_name, (mor, vanilla) in pairs.items():
        for m in (mor, vanilla):
            lines.append(f"{m.name:<24}{m.parameters:>14,}{m.resident_bytes / MIB:>14.1f}"
                         f"{m.step_peak_bytes / MIB:>13.1f}{m.peak_bytes / MIB:>10.1f}"
                         f"{m.saved_bytes_per_token / 1024:>17.1f}")
        lines.append(f"ratio {preset_name}/vanilla: peak memory {mor.peak_bytes / vanilla.peak_bytes:.3f} (paper, "
                     f"MoR N_r=2 at 360M: {PAPER_MEMORY_RATIO})   saved activations "
                     f"{mor.saved_bytes_per_token / vanilla.saved_bytes_per_token:.3f}")
    return "\n".join(lines)


def format_ranks(args: argparse.Namespace, ranks: list[dict]) -> str:
    lines = [f"activations saved for backward per token and rank, {args.tp_preset} and its baseline at "
             f"TP={args.tensor_parallel}, seq {args.tp_seq_length} x batch {args.batch_size} (KiB; largest rank)"]
    for name in ("mor", "vanilla"):
        off, on = (max(r[f"{name}_sp{sp}"] for r in ranks) / 1024 for sp in (0, 1))
        lines.append(f"  {name:<8} sequence parallel off {off:8.1f}   on {on:8.1f}   ratio {on / off:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mor-bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=["135m-mor-e-r2", "360m-mor-e-r2"],
                        help="MoR presets compared with their vanilla baselines (none: only --tensor-parallel)")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tensor-parallel", type=int, default=0,
                        help="also measure activations per rank at this TP size, without and with sequence "
                             "parallelism (0: skip)")
    parser.add_argument("--tp-preset", default="730m-mor-e-r2",
                        help="the MoR preset of the --tensor-parallel measurement (its heads must divide by N)")
    parser.add_argument("--tp-seq-length", type=int, default=512,
                        help="sequence length of the --tensor-parallel measurement (two 730M ranks at 2048 tokens "
                             "exceed 24 GiB; activations per token barely depend on it with O(s) attention)")
    parser.add_argument("--port", type=int, default=29561)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tp_worker:
        _sequence_parallel_worker(args)
        return 0
    if args.measure_one:
        _measure_worker(args)
        return 0
    from mor_megatron.config import ConfigError, preset

    try:
        for name in args.presets:
            preset(name)
        if args.tensor_parallel > 1:
            model, _ = preset(args.tp_preset)
            for field in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
                if getattr(model, field) % args.tensor_parallel:
                    raise ConfigError(f"--tp-preset {args.tp_preset}: model.{field}={getattr(model, field)} is not "
                                      f"divisible by --tensor-parallel {args.tensor_parallel}")
    except ConfigError as err:
        print(f"mor-bench memory: error: {err}", file=sys.stderr)
        return 2
    pairs = {name: measure(args, name) for name in args.presets}
    if pairs and not args.json:
        print(format_pairs(args, pairs), flush=True)
    ranks = sequence_parallel_activations(args) if args.tensor_parallel > 1 else []
    if args.json:
        print(json.dumps({"pairs": {k: [asdict(m) for m in v] for k, v in pairs.items()}, "tp_ranks": ranks,
                          "paper_memory_ratio": PAPER_MEMORY_RATIO}))
    elif ranks:
        print(format_ranks(args, ranks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
