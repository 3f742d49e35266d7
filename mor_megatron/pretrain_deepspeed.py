r"""DeepSpeed ZeRO pretraining entry point: the Megatron path's loop, data, schedule and tracking on DeepSpeed.

    deepspeed --num_gpus 8 --module mor_megatron.pretrain_deepspeed --config C.yaml \
        deepspeed.config=configs/deepspeed/zero3.json
    torchrun --nproc-per-node 8 -m mor_megatron.pretrain_deepspeed --config C.yaml deepspeed.zero_stage=2

Also ``mor-pretrain-deepspeed`` and ``pretrain/pretrain_mor_deepspeed.py``; multi-node: tools/launch_deepspeed.sh
and docs/deepspeed.md. The config (with its ``deepspeed`` section and the DeepSpeed JSON it names) is loaded
and checked before any process group exists; ``--check`` stops there. Exit status 2 on a config error.
"""

from __future__ import annotations

import argparse
import os
import sys

from mor_megatron.config import ConfigError, load_config, validate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mor-pretrain-deepspeed", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--check", action="store_true", help="validate the config, DeepSpeed JSON and data, then exit")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment (LOCAL_RANK) instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. deepspeed.zero_stage=3")
    return parser.parse_args(argv)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        validate(config, world_size=_world_size())
        import torch

        from mor_megatron.data.datasets import check_data
        from mor_megatron.training.deepspeed_config import check_deepspeed_job

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        check_deepspeed_job(config, world_size=_world_size(), device_type=device_type)
        check_data(config.data, config.model.vocab_size)
    except ConfigError as err:
        print(f"mor-pretrain-deepspeed: config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print("mor-pretrain-deepspeed: config, DeepSpeed JSON and data OK")
        return 0

    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.deepspeed_engine import DeepSpeedEngine
    from mor_megatron.training.trainer import Trainer

    ctx = init_distributed(config.parallel, seed=config.train.seed)
    trainer = Trainer(config, ctx, DeepSpeedEngine)
    failed = True
    try:
        trainer.build()
        trainer.train()
        failed = False
    finally:
        trainer.close(failed=failed)
        engine = getattr(trainer, "engine", None)
        if engine is not None:
            engine.destroy()  # ZeRO-3 hooks left in place can abort the process at exit
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
