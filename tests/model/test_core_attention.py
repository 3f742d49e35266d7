"""The SDPA core attention equals megatron's masked DotProductAttention path (fp32, <= 1e-5).

Models differ only in ``model.core_attention`` (neither kernel has parameters, so one seed gives the same
weights). Covered: expert-choice top-k (no padding), token-choice and causal routing (rows padded to the longest
one, no mask: causal order hides the padding), KV sharing (compacted queries spread to full length over all keys), and
document masks (an explicit ``[b, 1, s, s]`` mask restricted to the active tokens).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mor_megatron.model.recursion import ActiveTokens
from mor_megatron.model.kv_share import KVShareSession
from mor_megatron.model.core_attention import SDPAttention

from tests.model.helpers import batch, make_model, tiny

TOL = 1e-5
CASES = {  # id -> (preset, routing mode, document mask)
    "mor_e_topk": ("tiny-mor-e-r3", "topk", False),
    "mor_e_causal_padded": ("tiny-mor-e-r3", "causal", False),
    "mor_t_padded": ("tiny-mor-t-r3", "topk", False),
    "mor_e_kvshare": ("tiny-mor-e-r3-kvshare", "topk", False),
    "mor_e_kvshare_causal": ("tiny-mor-e-r3-kvshare", "causal", False),
    "mor_e_documents": ("tiny-mor-e-r3", "topk", True),
    "mor_t_documents": ("tiny-mor-t-r3", "topk", True),
}


def _document_mask(seq_length: int, batch_size: int) -> torch.Tensor:
    """``[b, 1, s, s]`` True = masked: causal within documents whose boundaries differ per row."""
    doc = torch.zeros(batch_size, seq_length, dtype=torch.long)
    doc[0, 11:], doc[0, 23:] = 1, 2
    doc[1, 5:] = 1
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    return ~(same & causal)[:, None]


def _run(pg_collection, preset: str, core_attention: str, routing_mode: str, documents: bool):
    model_cfg, recursion = tiny(preset)
    model = make_model(replace(model_cfg, core_attention=core_attention), recursion, pg_collection, seed=7)
    if model.decoder.router is not None:  # routing that varies, so rows get different numbers of tokens
        with torch.no_grad():
            model.decoder.router.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(3))
    tokens, positions = batch(model_cfg.vocab_size, seq_length=32)
    mask = _document_mask(32, tokens.shape[0]) if documents else None
    loss = model(tokens, positions, mask, labels=tokens, routing_mode=routing_mode).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_equals_megatron_attention(pg_collection, case):
    preset, routing_mode, documents = CASES[case]
    loss_sdpa, grads_sdpa = _run(pg_collection, preset, "sdpa", routing_mode, documents)
    loss_ref, grads_ref = _run(pg_collection, preset, "megatron", routing_mode, documents)
    assert abs(loss_sdpa.item() - loss_ref.item()) <= TOL
    assert grads_sdpa.keys() == grads_ref.keys()
    worst = max((grads_sdpa[k] - grads_ref[k]).abs().max().item() for k in grads_ref)
    assert worst <= TOL, worst


def test_padded_rows_need_no_mask(pg_collection):
    """Plain causal attention over padded compacted rows equals the dense mask that also hides padded keys."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    model_cfg, recursion = tiny("tiny-mor-t-r3")
    model = make_model(model_cfg, recursion, pg_collection)
    config = model.config
    active = ActiveTokens.from_mask(torch.tensor([[1, 0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 0, 0, 0]]).bool())
    assert active.valid is not None and active.attention_mask(None) is None
    k, heads, groups, dim = active.num_slots, config.num_attention_heads, config.num_query_groups, config.kv_channels
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(k, 2, heads, dim, generator=generator)
    key, value = (torch.randn(k, 2, groups, dim, generator=generator) for _ in range(2))
    causal = torch.ones(k, k, dtype=torch.bool).triu(1)[None, None]
    dense = causal | ~active.valid[:, None, None, :]  # the dense mask the masked path used to build
    reference = DotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pg_collection)
    sdpa = SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pg_collection)
    expected = reference(query, key, value, dense).view(k, 2, heads, dim)
    actual = sdpa(query, key, value, None).view(k, 2, heads, dim)
    real = active.valid.t()  # [k, b]
    assert (actual[real] - expected[real]).abs().max().item() <= TOL


@pytest.mark.parametrize("core_attention", ["sdpa", "megatron"])
def test_kv_sharing_spread_queries_equal_the_cross_mask(pg_collection, core_attention):
    """Reused K/V: compacted queries spread to full length under causal attention equal the dense ``[b, 1, k, s]``
    mask (key j visible to the query at original position p iff j <= p), padded rows included."""
    model_cfg, recursion = tiny("tiny-mor-e-r3-kvshare")
    model = make_model(replace(model_cfg, core_attention=core_attention), recursion, pg_collection)
    attention = model.decoder._layer(0).self_attention
    seq_length, batch_size = 12, 2
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(seq_length, batch_size, model_cfg.hidden_size, generator=generator)
    rope = model.rotary_pos_emb(seq_length)
    active = ActiveTokens.from_mask(torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1],
                                                  [0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0]]).bool())
    assert active.valid is not None  # rows of different lengths
    compacted = active.gather(torch.randn(seq_length, batch_size, model_cfg.hidden_size, generator=generator))
    reused_rope = (active.gather_rotary(rope), rope)
    session = KVShareSession()
    attention.kv_share_session = session
    with torch.no_grad():
        attention(hidden, None, rotary_pos_emb=rope)  # records K/V of every token
        session.mode, session.queries = "reuse", active
        spread, _ = attention(compacted, None, rotary_pos_emb=reused_rope)
        session.queries = None  # the reference: compacted queries, dense cross mask
        cross = torch.arange(seq_length)[None, None, None, :] > active.index[:, None, :, None]
        dense, _ = attention(compacted, cross, rotary_pos_emb=reused_rope)
    attention.kv_share_session = None
    assert spread.shape == dense.shape == compacted.shape
    real = active.valid.t()
    assert (spread[real] - dense[real]).abs().max().item() <= TOL
