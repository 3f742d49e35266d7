"""Token choice shared by mor-sample and the engines: greedy, seeded temperature/top-k/top-p draws, stops."""

from __future__ import annotations

import pytest
import torch

from mor_megatron.inference.sampling import SamplingParams, matched_stop, next_token

LOGITS = torch.tensor([0.5, 3.0, -1.0, 2.5, 0.0])


def _draws(n: int = 300, **fields) -> list[int]:
    params = SamplingParams(**fields)
    generator = params.generator(torch.device("cpu"))
    return [next_token(LOGITS, params, generator) for _ in range(n)]


def test_greedy_and_top_1_are_the_argmax():
    assert next_token(LOGITS, SamplingParams(), None) == 1
    assert set(_draws(temperature=1.0, top_k=1)) == {1}


def test_top_k_and_top_p_limit_the_support_and_a_seed_repeats_the_draws():
    assert set(_draws(temperature=1.0, top_k=2, seed=3)) == {1, 3}
    assert _draws(temperature=1.0, top_k=2, seed=3) == _draws(temperature=1.0, top_k=2, seed=3)
    assert _draws(temperature=1.0, seed=3) != _draws(temperature=1.0, seed=4)
    # probabilities ~ [.05, .57, .01, .35, .03]: 0.57 < 0.8 needs the second token, 0.92 >= 0.8 stops there
    assert set(_draws(temperature=1.0, top_p=0.8)) == {1, 3}
    assert set(_draws(temperature=1.0, top_p=0.5)) == {1}  # the most likely token always stays
    assert set(_draws(temperature=3.0)) == {0, 1, 2, 3, 4}  # a flat draw reaches every token


def test_stop_sequences_match_the_end_only():
    params = SamplingParams(stop=((7, 8), (9,)))
    assert matched_stop([1, 7, 8], params) == (7, 8)
    assert matched_stop([9], params) == (9,)
    assert matched_stop([7, 8, 1], params) is None


@pytest.mark.parametrize("fields", [{"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"stop": ((),)}])
def test_bad_parameters_are_refused(fields):
    with pytest.raises(ValueError):
        SamplingParams(**fields)
