"""The shared recursion rules (``mor_megatron.model.recursion``) against independent formulations."""

from __future__ import annotations

import torch

from mor_megatron.model.recursion import (
    ActiveTokens,
    threshold_decision,
    token_choice_depth,
    top_k_counts,
    top_k_decision,
)


def test_top_k_counts_equal_python_integer_arithmetic():
    lengths = torch.arange(1, 200)
    for capacity in (1 / 3, 2 / 3, 0.25, 0.5, 0.75, 1.0, 0.1):
        counts = top_k_counts(capacity, lengths, lengths)
        expected = [min(max(1, int(capacity * n)), n) for n in lengths.tolist()]
        assert counts.tolist() == expected, capacity


def test_top_k_decision_picks_torch_topk_among_candidates():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 32, generator=generator)
    candidates = torch.rand(4, 32, generator=generator) < 0.6
    counts = top_k_counts(0.5, torch.full((4,), 32), candidates.sum(dim=1))
    chosen = top_k_decision(logits, candidates, counts)
    for row in range(4):
        cand = candidates[row].nonzero().squeeze(-1)
        expected = set(cand[torch.topk(logits[row, cand], int(counts[row])).indices].tolist())
        assert set(chosen[row].nonzero().squeeze(-1).tolist()) == expected


def test_threshold_keeps_everything_at_full_capacity_and_non_negative_logits_otherwise():
    logits = torch.tensor([[-1.0, 0.0, 2.0]])
    assert threshold_decision(logits, 1.0).all()
    assert threshold_decision(logits, 0.5).tolist() == [[False, True, True]]
    assert threshold_decision(logits, torch.tensor([[0.5, 1.0, 0.5]])).tolist() == [[False, True, True]]


def test_token_choice_depth_adds_the_bias_to_the_choice_not_the_gate():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    depth, gate, _ = token_choice_depth(logits, 0.5, None, torch.float32)
    assert depth.tolist() == [0] and torch.allclose(gate, torch.tensor([0.25]))
    depth, gate, _ = token_choice_depth(logits, 0.5, torch.tensor([0.0, 0.3, 0.0]), torch.float32)
    assert depth.tolist() == [1] and torch.allclose(gate, torch.tensor([0.15]))


def test_active_tokens_batch_first_scatter_inverts_gather():
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]]).bool()
    tokens = ActiveTokens.from_mask(mask, min_slots=0)
    assert tokens.counts().tolist() == [3, 1]
    values = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    written = tokens.scatter_rows(torch.zeros_like(values), tokens.gather_rows(values))
    assert torch.equal(written, values * mask[..., None])
    assert ActiveTokens.from_mask(torch.zeros(2, 4, dtype=torch.bool), min_slots=0).num_slots == 0
