"""Document masking (``data.reset_attention_mask`` + ``data.reset_position_ids``): packed documents stay apart.

A document packed after another one, with the block-diagonal causal mask and positions restarting at 0, must give
exactly the logits it gets alone, at every recursion (its tokens are compacted among the other document's at each
depth, and under KV sharing reuse keys recorded over the whole packed sequence). Per-token routing makes that exact:
causal (threshold) routing for expert-choice, token-choice in either mode. Dropping the mask, or positions that RoPE
ignores, must change the result, so the test cannot pass without them. (The restart itself comes from megatron's dataset:
tests/unit/test_data.py.)
"""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import make_model, tiny

FIRST, SECOND = 11, 13


def _packed_inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at the second document, and the ``[b, 1, s, s]`` mask (True = masked)."""
    batch, length = tokens.shape
    document = (torch.arange(length) >= FIRST).long()
    positions = torch.cat([torch.arange(FIRST), torch.arange(SECOND)]).expand(batch, -1)
    visible = (document[:, None] == document[None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    return positions, (~visible).expand(batch, 1, -1, -1)


@pytest.mark.parametrize("name, routing_mode", [("tiny-mor-e-r3", "causal"), ("tiny-mor-t-r3", "topk"),
                                                ("tiny-mor-e-r3-kvshare", "causal")])
def test_a_packed_document_gives_its_own_logits(pg_collection, name, routing_mode):
    model_cfg, recursion = tiny(name)
    model = make_model(model_cfg, recursion, pg_collection, seed=4)
    with torch.no_grad():
        # Routers that keep about half the tokens at each depth, so compaction really mixes the documents.
        model.decoder.router.weight.normal_(0, 1.0)
    model.eval()
    generator = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, FIRST + SECOND), generator=generator)
    positions, mask = _packed_inputs(tokens)
    arange = torch.arange(FIRST + SECOND).expand(2, -1)

    depths = []
    original = type(model.decoder)._choose_tokens

    def record(block, r, state, *args, **kwargs):
        original(block, r, state, *args, **kwargs)
        depths.append(state.active.mask()[:, FIRST:].float().mean().item())

    with torch.no_grad():
        alone = model(tokens[:, FIRST:], positions[:, FIRST:], None, routing_mode=routing_mode)
        type(model.decoder)._choose_tokens = record
        try:
            packed = model(tokens, positions, mask, routing_mode=routing_mode)[:, FIRST:]
        finally:
            type(model.decoder)._choose_tokens = original
        no_mask = model(tokens, positions, None, routing_mode=routing_mode)[:, FIRST:]
        # RoPE is relative, so with the mask a shift of a whole document changes nothing; across documents
        # (no mask) the restarted positions must show, i.e. the model rotates at position_ids.
        no_mask_arange = model(tokens, arange, None, routing_mode=routing_mode)[:, FIRST:]

    assert 0.0 < min(depths[1:]) and max(depths[1:]) < 1.0, f"routing must compact the second document: {depths}"
    assert (packed - alone).abs().max().item() <= 1e-5
    assert (no_mask - alone).abs().max().item() > 1e-3, "without the mask the first document leaks in"
    assert (no_mask_arange - no_mask).abs().max().item() > 1e-3, "RoPE must use position_ids"
