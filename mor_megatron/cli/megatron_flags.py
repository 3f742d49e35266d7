"""Megatron-LM's command-line flags on the pretraining entry points, mapped onto the config tree.

``--micro-batch-size 4`` becomes the dotted override ``train.micro_batch_size=4``, so a Megatron-LM launch
script ports by changing its entry point. The aliases are applied before the dotted overrides on the same
command line, which therefore win. A Megatron-LM flag with no counterpart here is refused with a hint
(never ignored: a silently dropped ``--fp16`` would train in another precision than asked). The table is
documented in docs/usage.md, section 3.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from mor_megatron.config import ConfigError


@dataclass(frozen=True)
class FlagAlias:
    """A Megatron-LM flag and the config fields it sets.

    ``value_type`` parses its argument; ``constant`` makes it a switch that sets that value; ``many`` takes
    one or more arguments as a list (``--data-path 0.7 a 0.3 b``).
    """

    flag: str
    keys: tuple[str, ...]
    value_type: Callable[[str], Any] = str
    constant: Any = None
    many: bool = False


def _minutes_in_seconds(minutes: str) -> float:
    return float(minutes) * 60


MEGATRON_FLAG_ALIASES: tuple[FlagAlias, ...] = (
    FlagAlias("--tensor-model-parallel-size", ("parallel.tensor_parallel_size",), int),
    FlagAlias("--pipeline-model-parallel-size", ("parallel.pipeline_parallel_size",), int),
    FlagAlias("--use-distributed-optimizer", ("parallel.use_distributed_optimizer",), constant=True),
    FlagAlias("--sequence-parallel", ("parallel.sequence_parallel",), constant=True),
    FlagAlias("--overlap-grad-reduce", ("parallel.overlap_grad_reduce",), constant=True),
    FlagAlias("--overlap-param-gather", ("parallel.overlap_param_gather",), constant=True),
    FlagAlias("--distributed-timeout-minutes", ("parallel.collective_timeout_s",), _minutes_in_seconds),
    FlagAlias("--micro-batch-size", ("train.micro_batch_size",), int),
    FlagAlias("--global-batch-size", ("train.global_batch_size",), int),
    FlagAlias("--train-iters", ("train.train_steps",), int),
    FlagAlias("--seq-length", ("train.seq_length",), int),
    FlagAlias("--eval-interval", ("train.eval_interval",), int),
    FlagAlias("--eval-iters", ("train.eval_steps",), int),
    FlagAlias("--log-interval", ("train.log_interval",), int),
    FlagAlias("--exit-interval", ("train.exit_interval",), int),
    FlagAlias("--exit-duration-in-mins", ("train.exit_duration_mins",), float),
    FlagAlias("--bf16", ("train.precision",), constant="bf16"),
    FlagAlias("--recompute-granularity", ("train.recompute",)),
    # Megatron-LM's --seed seeds both the model and the dataset shuffles (GPTDatasetConfig.random_seed).
    FlagAlias("--seed", ("train.seed", "data.seed"), int),
    FlagAlias("--lr", ("optim.lr",), float),
    FlagAlias("--min-lr", ("optim.min_lr",), float),
    FlagAlias("--lr-warmup-iters", ("optim.warmup_steps",), int),
    FlagAlias("--lr-decay-style", ("optim.schedule",), str.lower),  # Megatron-LM spells it WSD
    FlagAlias("--weight-decay", ("optim.weight_decay",), float),
    FlagAlias("--clip-grad", ("optim.clip_grad",), float),
    FlagAlias("--adam-beta1", ("optim.adam_beta1",), float),
    FlagAlias("--adam-beta2", ("optim.adam_beta2",), float),
    FlagAlias("--adam-eps", ("optim.adam_eps",), float),
    FlagAlias("--save", ("checkpoint.save_dir",)),
    FlagAlias("--load", ("checkpoint.load_dir",)),
    FlagAlias("--save-interval", ("checkpoint.save_interval",), int),
    FlagAlias("--data-path", ("data.blend",), many=True),
    FlagAlias("--train-data-path", ("data.blend",), many=True),
    FlagAlias("--valid-data-path", ("data.valid_blend",), many=True),
    FlagAlias("--test-data-path", ("data.test_blend",), many=True),
    FlagAlias("--split", ("data.split",)),
    FlagAlias("--tokenizer-model", ("data.tokenizer",)),
    FlagAlias("--data-cache-path", ("data.cache_dir",)),
    FlagAlias("--num-workers", ("data.num_workers",), int),
    FlagAlias("--reset-attention-mask", ("data.reset_attention_mask",), constant=True),
    FlagAlias("--reset-position-ids", ("data.reset_position_ids",), constant=True),
    FlagAlias("--eod-mask-loss", ("data.eod_mask_loss",), constant=True),
    FlagAlias("--num-layers", ("model.num_layers",), int),
    FlagAlias("--hidden-size", ("model.hidden_size",), int),
    FlagAlias("--ffn-hidden-size", ("model.ffn_hidden_size",), int),
    FlagAlias("--num-attention-heads", ("model.num_attention_heads",), int),
    FlagAlias("--num-query-groups", ("model.num_query_groups",), int),
    FlagAlias("--max-position-embeddings", ("model.max_seq_length",), int),
    FlagAlias("--rotary-base", ("model.rotary_base",), float),
    FlagAlias("--norm-epsilon", ("model.norm_epsilon",), float),
    FlagAlias("--init-method-std", ("model.init_method_std",), float),
    FlagAlias("--hidden-dropout", ("model.hidden_dropout",), float),
    FlagAlias("--attention-dropout", ("model.attention_dropout",), float),
    FlagAlias("--untie-embeddings-and-output-weights", ("model.tie_embeddings",), constant=False),
)

_DOTTED_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")

UNSUPPORTED_MEGATRON_FLAGS: dict[str, str] = {
    "--fp16": "fp16 training is not supported; use --bf16 (train.precision=bf16)",
    "--context-parallel-size": "context parallelism is not supported; use tensor or pipeline parallelism",
    "--expert-model-parallel-size": "MoR has no experts to shard; its recursions share one block",
    "--virtual-pipeline-model-parallel-size": "the virtual stages are the recursions (recursion.num_recursions), "
                                              "not a setting; see docs/pipeline.md",
    "--num-layers-per-virtual-pipeline-stage": "the virtual stages are the recursions "
                                               "(recursion.num_recursions), not a setting; see docs/pipeline.md",
    "--train-samples": "set the length in steps: --train-iters (train.train_steps)",
    "--lr-decay-iters": "the decay ends at train.train_steps; set its share with optim.decay_fraction (WSD)",
    "--lr-warmup-fraction": "set --lr-warmup-iters (optim.warmup_steps)",
    "--tokenizer-type": "the kind follows from --tokenizer-model (data.tokenizer): a SentencePiece model or a "
                        "Hugging Face tokenizer folder",
    "--vocab-file": "point --tokenizer-model (data.tokenizer) at a Hugging Face tokenizer folder (tokenizer.json)",
    "--merge-file": "point --tokenizer-model (data.tokenizer) at a Hugging Face tokenizer folder (tokenizer.json)",
    "--vocab-size": "set model.vocab_size (the embedding rows, at least the tokenizer's pieces)",
    "--group-query-attention": "grouped-query attention follows from --num-query-groups (model.num_query_groups)",
    "--ckpt-format": "checkpoints are always megatron-core torch_dist",
}
"""Megatron-LM flags without a counterpart, each with what to do instead."""


def add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    """Register every alias and every refused Megatron-LM flag on ``parser`` (in its own help group)."""
    group = parser.add_argument_group("Megatron-LM flags", "aliases of config fields; docs/usage.md lists them")
    parser.set_defaults(megatron_flags=[])
    for alias in MEGATRON_FLAG_ALIASES:
        keys = ", ".join(alias.keys)
        if alias.constant is not None:
            group.add_argument(alias.flag, action=_Collect, nargs=0, const=alias, help=f"{keys}={alias.constant}")
        else:
            group.add_argument(alias.flag, action=_Collect, nargs="+" if alias.many else None, const=alias,
                               metavar=alias.flag.removeprefix("--").upper().replace("-", "_"), help=keys)
    for flag in UNSUPPORTED_MEGATRON_FLAGS:
        # nargs="?" swallows a value such flags may carry; the launch is refused either way.
        parser.add_argument(flag, action=_Collect, nargs="?", const=None, help=argparse.SUPPRESS)


def megatron_flag_overrides(args: argparse.Namespace) -> list[str]:
    """Dotted overrides for the Megatron-LM flags in ``args``, in command-line order.

    Raises ``ConfigError`` for a flag without a counterpart, or a value its type refuses.
    """
    overrides = []
    for flag, alias, values in args.megatron_flags:
        if alias is None:
            hint = UNSUPPORTED_MEGATRON_FLAGS[flag]
            raise ConfigError(f"Megatron-LM flag {flag} has no equivalent here: {hint}")
        value = _parse_value(flag, alias, values)
        overrides += [f"{key}={_as_yaml(value)}" for key in alias.keys]
    return overrides


def _as_yaml(value: Any) -> str:
    """``value`` as a one-line YAML value that overrides parse back to the same value and type.

    Not ``json.dumps``: PyYAML reads JSON's ``1e-08`` as a string (its floats need a dot, ``1.0e-08``).
    """
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("...\n").strip()


def _parse_value(flag: str, alias: FlagAlias, values: Any) -> Any:
    if alias.constant is not None:
        return alias.constant
    if alias.many:
        # argparse hands a list flag every following word, so an override after it would become a data prefix.
        swallowed = [value for value in values if _DOTTED_OVERRIDE.match(value)]
        if swallowed:
            raise ConfigError(f"{flag} took the override {swallowed[0]!r} as a value; put dotted overrides "
                              f"before {flag}, or end its list with --")
    try:
        return [alias.value_type(v) for v in values] if alias.many else alias.value_type(values)
    except ValueError as err:
        expected = getattr(alias.value_type, "__name__", "value")
        raise ConfigError(f"{flag} expects {expected} values, got {values!r}; it sets "
                          f"{', '.join(alias.keys)}") from err


class _Collect(argparse.Action):
    """Record (flag, alias, values) in ``namespace.megatron_flags``; translated after parsing."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        # A new list each time: the parser's default list must stay empty for the next parse.
        namespace.megatron_flags = [*namespace.megatron_flags, (option_string, self.const, values)]
