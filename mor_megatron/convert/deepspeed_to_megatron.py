"""DeepSpeed checkpoint (ZeRO stage 1-3, any TP x DP layout) -> the Megatron path's ``torch_dist`` checkpoint.

    python -m mor_megatron.convert.deepspeed_to_megatron DS_CKPT OUT_DIR
    # DS_CKPT: a DeepSpeed save_dir (its ``latest``) or one step_XXXXXXXX folder of it

What comes out: ``OUT_DIR/step_<N>/`` + ``OUT_DIR/latest``, a weights-only checkpoint written by
:class:`mor_megatron.checkpoint.megatron.Checkpointer` itself (the same step, loop state and job config; model
weights in fp32; no optimizer state; the LR schedule's step). Its tensors are global, so it loads at any TP/PP
layout: for evaluation and sampling, for the Hugging Face exporter, and to continue training on the Megatron
path, with a fresh optimizer and the LR schedule going on from step N.

How the weights are recovered. Per tensor-parallel rank ``t`` the fp32 master weights are rebuilt from the
ZeRO partitions of all data-parallel ranks with DeepSpeed's own ``zero_to_fp32`` functions (pure torch, no extra
packages): that API handles one model-parallel rank per folder, so the files of rank ``t`` are linked into a
scratch folder first. TP shards are then put back
together by megatron-core itself: the converter runs one process per TP rank (spawned here, gloo on CPU),
each builds the model at the checkpoint's TP size, loads its shard's state dict (``strict``) and all of them
save together through ``dist_checkpointing`` (SwiGLU and QKV shard layouts are megatron's business).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch

from mor_megatron.convert import ConversionError
from mor_megatron.convert.output_guard import refuse_output_overlapping_checkpoint
from mor_megatron.checkpoint.deepspeed import read_meta, resolve_step_dir
from mor_megatron.checkpoint.errors import CheckpointError
from mor_megatron.checkpoint.layout import step_dir_name

_BF16_WRAPPER_PREFIX = "module."  # Float16Module around the model when the job trained in bf16


def load_fp32_state_dict(step_dir: Path, *, tp_rank: int) -> dict[str, torch.Tensor]:
    """The full (all DP partitions) fp32 weights of tensor-parallel rank ``tp_rank`` in a DeepSpeed step folder.

    Keys are the MoR model's ``state_dict`` keys (a bf16 job's ``module.`` wrapper prefix removed).

    Raises:
        FileNotFoundError: the folder lacks the files of that rank.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's accelerator probe would warn on stdout
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mp = f"mp_rank_{tp_rank:02d}"
    files = sorted(p for p in step_dir.iterdir() if f"{mp}_" in p.name and p.name.endswith("_states.pt"))
    if not files:
        raise FileNotFoundError(f"no DeepSpeed files of tensor-parallel rank {tp_rank} ({mp}) in {step_dir}")
    with tempfile.TemporaryDirectory(prefix="ds2mcore_") as scratch:
        tag_dir = Path(scratch) / "tag"
        tag_dir.mkdir()
        for file in files:
            # zero_to_fp32 expects the files of model-parallel rank 00 only; link this rank's files under that name.
            (tag_dir / file.name.replace(mp, "mp_rank_00")).symlink_to(file.resolve())
        state = get_fp32_state_dict_from_zero_checkpoint(scratch, tag="tag")
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    if state and all(key.startswith(_BF16_WRAPPER_PREFIX) for key in state):
        state = {key[len(_BF16_WRAPPER_PREFIX):]: value for key, value in state.items()}
    return state


def _convert_rank(rank: int, world_size: int, step_dir: str, out_dir: str, rendezvous: str | None) -> None:
    """One TP rank of the conversion: rebuild the model at the checkpoint's TP size, load, save together."""
    import torch.distributed as dist

    from mor_megatron.config import config_from_dict
    from mor_megatron.model.builder import build_model, transformer_config
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.checkpoint.loop_state import LoopState
    from mor_megatron.checkpoint.megatron import Checkpointer

    meta = read_meta(Path(step_dir))
    config = config_from_dict(meta["config"])
    if rendezvous is not None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=10))
    ctx = init_distributed(config.parallel, seed=config.train.seed, backend="gloo")
    try:
        mcore = transformer_config(config.model, config.recursion, config.parallel, params_dtype=torch.float32,
                                   use_cpu_initialization=True)
        model = build_model(config.model, config.recursion, mcore, pg_collection=ctx.pg_collection)
        state = load_fp32_state_dict(Path(step_dir), tp_rank=ctx.tp_rank)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Transformer Engine layers carry `_extra_state` (FP8 metadata), which ZeRO's weight files do not hold.
        missing = [key for key in missing if not key.endswith("._extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{step_dir} does not fit the model its config describes: missing {missing}, "
                                  f"unexpected {unexpected}")
        # keep_last: never purge other checkpoints that OUT_DIR may already hold.
        checkpointer = Checkpointer(save_dir=out_dir, load_dir=None, keep_last=sys.maxsize, ctx=ctx)
        checkpointer.save(meta["step"], model_chunks=[model], optimizer=None, scheduler=None,
                          loop=LoopState(**meta["loop"]), config_dict=meta["config"],
                          source={"deepspeed_checkpoint": str(Path(step_dir).resolve())})
    finally:
        destroy_distributed()


def convert(ds_checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Convert a DeepSpeed checkpoint (save_dir or step folder) into ``out_dir``; returns the new step folder.

    Runs one process per TP rank of the checkpoint (this process when TP = 1). Call it from a process that is
    not part of a distributed job.

    Raises:
        CheckpointError: ``ds_checkpoint`` holds no complete DeepSpeed checkpoint of mor_megatron.
        ConversionError: ``out_dir`` is, contains or lies inside the DeepSpeed checkpoint or its save_dir, or
            is or contains its run folder.
        RuntimeError: a conversion process failed.
    """
    step_dir = resolve_step_dir(ds_checkpoint)
    refuse_output_overlapping_checkpoint(out_dir, step_dir)
    meta = read_meta(step_dir)
    tp = meta["layout"]["tp"]
    out_dir = Path(out_dir)
    if tp == 1:
        _convert_rank(0, 1, str(step_dir), str(out_dir), None)
    else:
        _spawn(tp, str(step_dir), str(out_dir))
    return out_dir / step_dir_name(meta["step"])


def _spawn(world_size: int, step_dir: str, out_dir: str) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ds2mcore_rdzv_") as scratch:
        rendezvous = f"file://{scratch}/rdzv"
        procs = [ctx.Process(target=_convert_rank, args=(rank, world_size, step_dir, out_dir, rendezvous))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    failed = [rank for rank, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"conversion processes of TP ranks {failed} failed (exit codes "
                           f"{[procs[r].exitcode for r in failed]}); their tracebacks are above")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``DS_CKPT OUT_DIR``; prints the new step folder. Exit status 2 on a bad checkpoint."""
    parser = argparse.ArgumentParser(prog="deepspeed-to-megatron", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", metavar="DS_CKPT",
                        help="DeepSpeed checkpoint.save_dir (its latest step) or one step_XXXXXXXX folder")
    parser.add_argument("output", metavar="OUT_DIR", help="Megatron checkpoint.save_dir to write the step into")
    args = parser.parse_args(argv)
    try:
        path = convert(args.checkpoint, args.output)
    except (CheckpointError, ConversionError) as err:
        print(f"deepspeed-to-megatron: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
