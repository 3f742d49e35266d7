"""DeepSpeed ZeRO-1/2/3 vs the Megatron path: step time and peak memory of the same training step, as ratios.

    python -m mor_megatron.bench.deepspeed_compare [--preset tiny-mor-e-r3] [--hidden-size 256] [--steps 6] [--json]

Each variant (``megatron``, ``zero1``, ``zero2``, ``zero3``) trains the same model on the same synthetic batches
in *fresh* processes (``--world-size`` ranks, data parallel, gloo on CPU or NCCL on GPUs), through the engines the
trainer uses (:class:`~mor_megatron.training.megatron_engine.MegatronEngine`,
:class:`~mor_megatron.training.deepspeed_engine.DeepSpeedEngine`): AdamW, fp32 on CPU, the project's schedule,
``--num-microbatches`` micro-batches per rank and step. It is a benchmark, not a test: it asserts nothing.

* Step time: median over the timed steps (after ``--warmup-steps``) of the slowest rank's ``train_step``.
* Training state, per rank, maximum over ranks: the bytes of every distinct tensor storage alive after the last
  step (found through the garbage collector): parameters, gradients, fp32 master copies, Adam moments and the
  backends' flat buffers. This is what ZeRO partitions (stage 1: optimizer state, 2: + gradients, 3: +
  parameters), so its ratios show ZeRO's effect directly. It includes communication buckets that DeepSpeed
  allocates up front (``reduce_bucket_size`` elements for ZeRO-3): real memory on GPU, possibly never touched
  (not resident) on CPU. The ZeRO variants use the repository's ``configs/deepspeed/zero<N>.json``.
* Peak memory, per rank, maximum over ranks. GPU: ``torch.cuda.max_memory_allocated``. CPU: the process's
  peak resident set (``ru_maxrss``) minus its resident set just before the engine is built, after every library
  (megatron-core *and* DeepSpeed, for every variant) is imported and the process group exists; so it counts
  training state, communication buffers, activations and what DeepSpeed's initialisation itself allocates (it
  imports more modules, e.g. torch's compiler stack), not the interpreter. glibc may keep freed pages, so it is
  an upper bound. On small models DeepSpeed's fixed costs dominate this figure; the state column scales.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

VARIANTS = ("megatron", "zero1", "zero2", "zero3")
MIB = 2**20


@dataclass(frozen=True)
class VariantResult:
    """One variant's measurements (slowest / largest rank).

    Attributes:
        step_s: median seconds of a timed optimizer step.
        state_bytes: tensor storage alive after the last step on the largest rank (the training state).
        peak_bytes: peak memory of training on the largest rank (see the module docstring for the method).
        final_loss: LM loss of the last timed step.
    """

    step_s: float
    state_bytes: int
    peak_bytes: int
    final_loss: float


def _job_config(args: argparse.Namespace, variant: str, output_dir: str):
    from mor_megatron.config import config_from_dict, preset

    model, _ = preset(args.preset)
    model_values = {"max_seq_length": max(args.seq_length, model.max_seq_length)}
    if args.hidden_size is not None:
        heads = max(1, args.hidden_size // 64)
        model_values.update(hidden_size=args.hidden_size, num_attention_heads=heads, num_query_groups=heads,
                            ffn_hidden_size=args.hidden_size * 8 // 3 // 8 * 8)
    values = {
        "preset": args.preset, "model": model_values,
        "train": {"seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
                  "global_batch_size": args.micro_batch_size * args.num_microbatches * args.world_size,
                  "train_steps": args.warmup_steps + args.steps, "precision": "fp32"},
        "optim": {"warmup_steps": 0},
        "tracking": {"enabled": False}, "output_dir": output_dir,
    }
    if variant != "megatron":
        stage = int(variant[-1])
        json_path = Path(args.deepspeed_configs) / f"zero{stage}.json" if args.deepspeed_configs else None
        values["deepspeed"] = {"zero_stage": stage, "config": str(json_path) if json_path else None}
    return config_from_dict(values)


def _batches(config, seed: int):
    """Endless synthetic micro-batches ``[micro_batch_size, seq_length]`` of uniform token ids (fixed seed)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (config.train.micro_batch_size, config.seq_length)
    positions = torch.arange(config.seq_length).expand(shape).contiguous()
    while True:
        tokens = torch.randint(0, config.model.vocab_size, (shape[0], shape[1] + 1), generator=generator)
        yield {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
               "loss_mask": torch.ones(shape), "position_ids": positions}


def _tensor_state_bytes() -> int:
    """Bytes of the distinct storages of every live tensor of this process."""
    import gc

    import torch

    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch aliases (reduce_op) warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _measure(rank: int, world_size: int, args: argparse.Namespace, variant: str, output_dir: str) -> dict:
    """One rank of one variant (runs in a fresh process with the process group set up)."""
    import resource

    import psutil
    import torch
    import torch.distributed as dist

    from mor_megatron.runtime import init_distributed

    config = _job_config(args, variant, output_dir)
    ctx = init_distributed(config.parallel, seed=config.train.seed)
    from mor_megatron.training.deepspeed_engine import DeepSpeedEngine, import_deepspeed
    from mor_megatron.training.megatron_engine import MegatronEngine

    import_deepspeed(ctx.device, ctx.local_rank)  # every variant pays DeepSpeed's import before the baseline
    cuda = ctx.device.type == "cuda"
    baseline = 0 if cuda else psutil.Process().memory_info().rss
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    engine = (MegatronEngine if variant == "megatron" else DeepSpeedEngine)(config, ctx)
    batches = _batches(config, seed=1000 + ctx.dp_rank)
    times, loss = [], float("nan")
    for step in range(args.warmup_steps + args.steps):
        dist.barrier()
        start = time.perf_counter()
        loss = engine.train_step(batches)["train/lm_loss"]
        if cuda:
            torch.cuda.synchronize(ctx.device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= args.warmup_steps:
            times.append(float(elapsed))
    if cuda:
        peak = torch.cuda.max_memory_allocated(ctx.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # ru_maxrss: KiB on Linux
    memory = torch.tensor([float(_tensor_state_bytes()), float(peak)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    engine.close()
    return asdict(VariantResult(step_s=statistics.median(times), state_bytes=int(memory[0]),
                                peak_bytes=int(memory[1]), final_loss=loss))


def _rank_main(rank: int, world_size: int, workdir: str, payload: bytes) -> None:
    """Body of one spawned rank: launcher environment, process group, then :func:`_measure`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    import torch
    import torch.distributed as dist

    from mor_megatron.runtime import destroy_distributed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{workdir}/rdzv", rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=10))
    try:
        args, variant = pickle.loads(payload)
        result = _measure(rank, world_size, args, variant, workdir)
        if rank == 0:
            Path(workdir, "result.pkl").write_bytes(pickle.dumps(result))
    finally:
        destroy_distributed()


def run_variant(args: argparse.Namespace, variant: str) -> VariantResult:
    """Measure ``variant`` in ``args.world_size`` fresh processes.

    Raises:
        RuntimeError: a rank failed or ran past ``args.timeout``.
    """
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix=f"mor_bench_{variant}_") as workdir:
        payload = pickle.dumps((args, variant))
        procs = [context.Process(target=_rank_main, args=(rank, args.world_size, workdir, payload))
                 for rank in range(args.world_size)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + args.timeout
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        codes = [proc.exitcode for proc in procs]
        if any(code != 0 for code in codes) or not Path(workdir, "result.pkl").is_file():
            raise RuntimeError(f"variant {variant}: ranks exited with {codes} (killed after {args.timeout:g} s "
                               "if still running); their tracebacks are above")
        return VariantResult(**pickle.loads(Path(workdir, "result.pkl").read_bytes()))


def report(results: dict[str, VariantResult], args: argparse.Namespace, *, as_json: bool) -> str:
    """A table (or one JSON object) of the results with ratios to the Megatron path."""
    base = results.get("megatron")

    def ratio(value: float, reference: float | None) -> float | None:
        return value / reference if reference else None

    rows = {name: {**asdict(result), "step_ratio": ratio(result.step_s, base and base.step_s),
                   "state_ratio": ratio(result.state_bytes, base and base.state_bytes),
                   "peak_ratio": ratio(result.peak_bytes, base and base.peak_bytes)}
            for name, result in results.items()}
    setup = {"preset": args.preset, "hidden_size": args.hidden_size, "seq_length": args.seq_length,
             "world_size": args.world_size, "micro_batch_size": args.micro_batch_size,
             "num_microbatches": args.num_microbatches, "steps": args.steps}
    if as_json:
        return json.dumps({"setup": setup, "results": rows})
    lines = [f"DeepSpeed vs Megatron: {args.preset} (hidden {args.hidden_size or 'preset'}), {args.world_size} "
             f"ranks, seq {args.seq_length}, {args.num_microbatches} x {args.micro_batch_size} samples per rank "
             f"and step, median of {args.steps} steps",
             f"{'variant':<10}{'step s':>9}{'x mcore':>9}{'state MiB':>11}{'x mcore':>9}{'peak MiB':>10}"
             f"{'x mcore':>9}{'loss':>9}"]

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for name, row in rows.items():
        lines.append(f"{name:<10}{row['step_s']:>9.3f}{show(row['step_ratio']):>9}{row['state_bytes'] / MIB:>11.1f}"
                     f"{show(row['state_ratio']):>9}{row['peak_bytes'] / MIB:>10.1f}{show(row['peak_ratio']):>9}"
                     f"{row['final_loss']:>9.4f}")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mor-bench deepspeed", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-mor-e-r3", help="model preset (default tiny-mor-e-r3)")
    parser.add_argument("--hidden-size", type=_positive_int, default=256,
                        help="override the preset's width (head dim 64); default 256")
    parser.add_argument("--seq-length", type=_positive_int, default=256)
    parser.add_argument("--micro-batch-size", type=_positive_int, default=2)
    parser.add_argument("--num-microbatches", type=_positive_int, default=2, help="per rank and step")
    parser.add_argument("--world-size", type=_positive_int, default=2, help="data-parallel ranks (processes)")
    parser.add_argument("--steps", type=_positive_int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    shipped = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
    parser.add_argument("--deepspeed-configs", default=str(shipped) if shipped.is_dir() else None,
                        help="folder with zero1.json, zero2.json, zero3.json (default: the repository's "
                             "configs/deepspeed); empty: DeepSpeed's defaults")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per variant before its ranks are killed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring). Exit status 2 on bad arguments or a bad preset."""
    args = parse_args(argv)
    from mor_megatron.config import ConfigError

    try:
        _job_config(args, "megatron", "unused")
    except ConfigError as err:
        print(f"mor-bench deepspeed: {err}", file=sys.stderr)
        return 2
    results = {variant: run_variant(args, variant) for variant in args.variants.split(",")}
    print(report(results, args, as_json=args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
