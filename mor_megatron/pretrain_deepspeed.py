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
import sys

from mor_megatron.cli.quiet import silence_known_warnings
from mor_megatron.config import ConfigError, validate
from mor_megatron.pretrain import (build_parser, config_from_command_line, launcher_world_size, parse_command_line,
                                   print_check_report, print_config, run_job)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser("mor-pretrain-deepspeed", __doc__.splitlines()[0],
                          "validate the config, DeepSpeed JSON and data, then exit")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment (LOCAL_RANK) instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parse_command_line(parser, argv)


def main(argv: list[str] | None = None) -> int:
    silence_known_warnings()
    args = parse_args(argv)
    try:
        config = config_from_command_line(args)
        if args.print_config:
            print_config(config)
            return 0
        validate(config, world_size=launcher_world_size())
        import torch

        from mor_megatron.data.datasets import check_data
        from mor_megatron.training.deepspeed_config import check_deepspeed_job

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        check_deepspeed_job(config, world_size=launcher_world_size(), device_type=device_type)
        data_summaries = check_data(config.data, config.model.vocab_size)
    except ConfigError as err:
        print(f"mor-pretrain-deepspeed: config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print_check_report("mor-pretrain-deepspeed", "config, DeepSpeed JSON and data", data_summaries)
        return 0

    from mor_megatron.training.deepspeed_engine import DeepSpeedEngine

    return run_job("mor-pretrain-deepspeed", config, DeepSpeedEngine)


if __name__ == "__main__":
    sys.exit(main())
