"""Deterministic synthetic token batches, shaped like the data loader's, for benchmarks and layout tests."""

from __future__ import annotations

from typing import Iterator

import torch

from mor_megatron.config import JobConfig


def synthetic_batches(config: JobConfig, dp_rank: int, dp_size: int, num_steps: int,
                      seed: int = 1234) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches for ``num_steps`` optimizer steps.

    The global stream depends only on the config and seed, so every parallel layout sees the same tokens.
    """
    train, seq = config.train, config.seq_length
    per_step = train.global_batch_size
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.model.vocab_size, (num_steps * per_step, seq + 1), generator=generator)
    for step in range(num_steps):
        window = tokens[step * per_step:(step + 1) * per_step]
        for start in range(dp_rank * train.micro_batch_size, per_step, dp_size * train.micro_batch_size):
            sample = window[start:start + train.micro_batch_size]
            yield {"tokens": sample[:, :-1], "labels": sample[:, 1:],
                   "loss_mask": torch.ones(sample.shape[0], seq),
                   "position_ids": torch.arange(seq).expand(sample.shape[0], -1)}
