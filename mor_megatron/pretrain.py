"""Megatron pretraining entry point: ``torchrun ... -m mor_megatron.pretrain --config C.yaml [key=value ...]``.

Also ``mor-pretrain`` and ``pretrain/pretrain_mor.py``. Works under torchrun and srun (rank and world size
from their environment). The config is loaded and validated, data checked, before any process group exists,
so bad input fails in seconds with a message naming the field; ``--check`` stops right there and
``--print-config`` prints the resolved config instead. Megatron-LM flags (``--micro-batch-size 4``) are
aliases of config fields (:mod:`mor_megatron.cli.megatron_flags`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from mor_megatron.cli.megatron_flags import add_megatron_flags, megatron_flag_overrides
from mor_megatron.config import ConfigError, JobConfig, dump_config, load_config, validate
from mor_megatron.cli.quiet import silence_known_warnings

if TYPE_CHECKING:
    from mor_megatron.training.trainer import EngineFactory


def build_parser(prog: str, description: str, check_help: str) -> argparse.ArgumentParser:
    """The command line both pretraining entry points share: ``--config``, ``--check``, ``--print-config``,
    dotted overrides and Megatron-LM flag aliases (read them with :func:`parse_command_line`)."""
    # No abbreviations: --save must never be read as a prefix of --save-interval or the other way round.
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--check", action="store_true", help=check_help)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file, flags, overrides, defaults) as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.train_steps=200")
    add_megatron_flags(parser)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; overrides may stand before, between or after the flags."""
    return parser.parse_intermixed_args(argv)


def launcher_world_size() -> int:
    """World size from torchrun / the DeepSpeed launcher / srun, read without importing torch."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def check_then_run(prog: str, args: argparse.Namespace, checked: str, engine_factory: Callable[[], EngineFactory],
                   extra_check: Callable[[JobConfig], None] | None = None) -> int:
    """What both entry points do: the config from the command line, validated (and ``extra_check``-ed) with its
    data before any process group exists (exit 2 with one line on an error), ``--print-config`` / ``--check``,
    else the job on ``engine_factory()``'s engine (imported only then: the checks stay light)."""
    try:
        # The config file, then the Megatron-LM flags, then the dotted overrides (the last word wins).
        config = load_config(args.config, megatron_flag_overrides(args) + args.overrides)
        if args.print_config:  # after the rules that hold at any world size
            validate(config)
            print(dump_config(config), end="")
            return 0
        validate(config, world_size=launcher_world_size())
        if extra_check is not None:
            extra_check(config)
        from mor_megatron.data.datasets import check_data

        data_summaries = check_data(config.data, config.model.vocab_size)
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    if args.check:  # one line, then one per dataset prefix (sizes, token ids checked or sampled)
        print(f"{prog}: {checked} OK")
        for summary in data_summaries:
            print(f"  {summary.describe()}")
        return 0
    return run_job(prog, config, engine_factory())


def run_job(prog: str, config: JobConfig, engine_factory: EngineFactory) -> int:
    """One job on this rank: process groups, the training loop on ``engine_factory``'s engine, teardown of all
    three. Exit status 2 with one line (rank 0) when the checkpoint refuses the resume (locked save_dir, damaged
    checkpoint, changed model config), which only a person can resolve."""
    from mor_megatron.checkpoint.errors import CheckpointError
    from mor_megatron.checkpoint.resume_config import ConfigChangedOnResume
    from mor_megatron.model.builder import virtual_pipeline_size
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.trainer import Trainer

    ctx = init_distributed(config.parallel, seed=config.train.seed,
                           virtual_pipeline_size=virtual_pipeline_size(config.recursion, config.parallel),
                           timeout_s=config.parallel.collective_timeout_s)
    try:
        trainer = Trainer(config, ctx, engine_factory)
        try:
            trainer.build()
            trainer.train()
        except BaseException as err:  # a collective timeout, a dead peer, Ctrl-C: the run says why it ended
            trainer.close(failure=err)
            raise
        trainer.close()
    except (CheckpointError, ConfigChangedOnResume) as err:
        if ctx.rank == 0:
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    silence_known_warnings()
    parser = build_parser("mor-pretrain", __doc__.splitlines()[0], "validate the config and data, then exit")
    return check_then_run("mor-pretrain", parse_command_line(parser, argv), "config and data", _megatron_engine)


def _megatron_engine() -> EngineFactory:
    from mor_megatron.training.megatron_engine import MegatronEngine

    return MegatronEngine


if __name__ == "__main__":
    sys.exit(main())
