"""``mor-sample``'s token choice: greedy at temperature 0, seeded draws restricted to the top k otherwise."""

from __future__ import annotations

import torch

from mor_megatron.inference.sample import next_token

LOGITS = torch.tensor([0.5, 3.0, -1.0, 2.5, 0.0])


def _draws(seed: int, **kwargs) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [next_token(LOGITS, generator=generator, **kwargs) for _ in range(200)]


def test_temperature_zero_and_top_1_are_greedy():
    assert next_token(LOGITS, temperature=0.0, top_k=None, generator=None) == 1
    assert set(_draws(0, temperature=1.0, top_k=1)) == {1}


def test_top_k_limits_the_support_and_a_seed_repeats_the_draws():
    draws = _draws(3, temperature=1.0, top_k=2)
    assert set(draws) == {1, 3}  # both of the two most likely tokens occur, nothing else
    assert draws == _draws(3, temperature=1.0, top_k=2)
    assert set(_draws(3, temperature=3.0, top_k=None)) == {0, 1, 2, 3, 4}  # a flat draw reaches every token
