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
from typing import TYPE_CHECKING

from mor_megatron.cli.quiet import silence_known_warnings
from mor_megatron.config import JobConfig
from mor_megatron.pretrain import build_parser, check_then_run, launcher_world_size, parse_command_line

if TYPE_CHECKING:
    from mor_megatron.training.trainer import EngineFactory


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser("mor-pretrain-deepspeed", __doc__.splitlines()[0],
                          "validate the config, DeepSpeed JSON and data, then exit")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment (LOCAL_RANK) instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parse_command_line(parser, argv)


def main(argv: list[str] | None = None) -> int:
    silence_known_warnings()
    return check_then_run("mor-pretrain-deepspeed", parse_args(argv), "config, DeepSpeed JSON and data",
                          _deepspeed_engine, extra_check=_check_deepspeed)


def _check_deepspeed(config: JobConfig) -> None:
    import torch

    from mor_megatron.training.deepspeed_config import check_deepspeed_job

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    check_deepspeed_job(config, world_size=launcher_world_size(), device_type=device_type)


def _deepspeed_engine() -> EngineFactory:
    from mor_megatron.training.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine


if __name__ == "__main__":
    sys.exit(main())
