"""Megatron pretraining entry point: ``torchrun ... -m mor_megatron.pretrain --config C.yaml [key=value ...]``.

Also ``mor-pretrain`` and ``pretrain/pretrain_mor.py``. Works under torchrun and srun (rank and world size
from their environment). The config is loaded and validated, data checked, before any process group exists,
so bad input fails in seconds with a message naming the field; ``--check`` stops right there.
"""

from __future__ import annotations

import argparse
import os
import sys

from mor_megatron.config import ConfigError, load_config, validate


def build_parser(prog: str, description: str, check_help: str) -> argparse.ArgumentParser:
    """The command line both pretraining entry points share: ``--config``, ``--check``, dotted overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--check", action="store_true", help=check_help)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.train_steps=200")
    return parser


def launcher_world_size() -> int:
    """World size from torchrun / the DeepSpeed launcher / srun, read without importing torch."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def run_training(config, ctx, engine_factory) -> None:
    """Build and run the shared training loop with ``engine_factory``; always close tracking and the engine."""
    from mor_megatron.training.trainer import Trainer

    trainer = Trainer(config, ctx, engine_factory)
    failed = True
    try:
        trainer.build()
        trainer.train()
        failed = False
    finally:
        trainer.close(failed=failed)
        # Engines that hold process-wide state (DeepSpeed's ZeRO-3 hooks) release it here.
        release = getattr(getattr(trainer, "engine", None), "destroy", None)
        if release is not None:
            release()


def main(argv: list[str] | None = None) -> int:
    args = build_parser("mor-pretrain", __doc__.splitlines()[0], "validate the config and data, then exit").parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        validate(config, world_size=launcher_world_size())
        from mor_megatron.data.datasets import check_data

        check_data(config.data, config.model.vocab_size)
    except ConfigError as err:
        print(f"mor-pretrain: config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print("mor-pretrain: config and data OK")
        return 0

    from mor_megatron.model.builder import virtual_pipeline_size
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.megatron_engine import MegatronEngine

    ctx = init_distributed(config.parallel, seed=config.train.seed,
                           virtual_pipeline_size=virtual_pipeline_size(config.recursion, config.parallel))
    try:
        run_training(config, ctx, MegatronEngine)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
