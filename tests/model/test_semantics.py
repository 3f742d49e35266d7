"""MoR semantics: capacities and hierarchy, active-token attention, causal routing, KV sharing, gradients."""

from __future__ import annotations

import pytest
import torch

from mor_megatron.model.recursion import ActiveTokens
from mor_megatron.model.attention import MoRSelfAttention
from mor_megatron.model.recursion_state import RecursionState
from mor_megatron.model.routing import ExpertChoiceRouter

from tests.model.helpers import batch, make_model, tiny


def _layer_input_lengths(model, run):
    """Sequence length seen by the first shared layer at each call (one call per recursion)."""
    layer = model.decoder.layers[model.decoder.layout.num_prefix]
    lengths = []
    handle = layer.register_forward_pre_hook(lambda _m, _a, kw: lengths.append(kw["hidden_states"].shape[0]),
                                             with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return lengths


def test_expert_choice_capacities_and_hierarchy():
    torch.manual_seed(0)
    capacities = (1.0, 0.6, 0.3)
    router = ExpertChoiceRouter(hidden_size=16, capacities=capacities, alpha=0.1, temperature=1.0,
                                aux_loss_coeff=0.001, z_loss_coeff=0.0, init_std=0.5, params_dtype=torch.float32)
    seq_length, batch_size = 20, 3
    candidates = None
    previous = torch.ones(batch_size, seq_length, dtype=torch.bool)
    for r, capacity in enumerate(capacities):
        hidden = torch.randn(seq_length, batch_size, 16)  # new states each recursion, as after the block
        decision = router.route(r, hidden, candidates, seq_length, "topk")
        active = decision.active.mask()
        assert (active.sum(dim=1) == max(1, int(capacity * seq_length))).all()
        assert not (active & ~previous).any(), "tokens at r+1 must be a subset of those at r"
        assert (decision.active.index.diff(dim=1) > 0).all(), "kept in causal order"
        assert decision.gate.shape == (active.sum(dim=1)[0], batch_size)
        assert ((decision.gate > 0) & (decision.gate < 0.1)).all(), "alpha * sigmoid"
        previous, candidates = active, decision.active


def test_block_computes_only_active_tokens(pg_collection):
    model_cfg, recursion = tiny("tiny-mor-e-r3")
    model = make_model(model_cfg, recursion, pg_collection)
    tokens, positions = batch(model_cfg.vocab_size, seq_length=30)
    lengths = _layer_input_lengths(model, lambda: model(tokens, positions, None, labels=tokens))
    assert lengths == [30, 20, 10]  # k_r = int((R - r + 1) / R * s)


def test_inactive_token_cannot_change_active_output(pg_collection):
    model_cfg, recursion = tiny("tiny-mor-e-r3")
    model = make_model(model_cfg, recursion, pg_collection)
    model.eval()
    block = model.decoder
    seq_length, batch_size, width = 12, 2, model_cfg.hidden_size
    active_mask = torch.zeros(batch_size, seq_length, dtype=torch.bool)
    active_mask[0, [1, 4, 5, 9]] = True
    active_mask[1, [0, 2, 3, 11]] = True
    active = ActiveTokens.from_mask(active_mask)
    gate = torch.full((4, batch_size), 0.05)
    rope = model.rotary_pos_emb(seq_length)
    hidden = torch.randn(seq_length, batch_size, width)

    def run(h):
        state = RecursionState(hidden=h, active=active, work=active.gather(h), gate=gate)
        with torch.no_grad():
            block._apply_shared(1, state, None, rope, None)
            block._combine(1, state)
        return state.hidden

    out = run(hidden)
    perturbed = hidden.clone()
    perturbed[7, 0] += 10.0  # inactive in row 0, and before position 9 which is active
    perturbed[1, 1] += 10.0  # inactive in row 1
    out_perturbed = run(perturbed)
    assert torch.equal(out[active_mask.t()], out_perturbed[active_mask.t()])
    # Inactive tokens pass through untouched.
    assert torch.equal(out[~active_mask.t()], hidden[~active_mask.t()])
    # Sanity: an *active* earlier token does change a later active one.
    perturbed[4, 0] += 10.0
    assert not torch.equal(run(perturbed)[9, 0], out[9, 0])


@pytest.mark.parametrize("name", ["tiny-mor-e-r3", "tiny-mor-t-r3", "tiny-mor-e-r3-kvshare", "tiny-recursive-r3"])
def test_causal_routing_ignores_future_tokens(pg_collection, name):
    model_cfg, recursion = tiny(name)
    model = make_model(model_cfg, recursion, pg_collection, seed=11)
    # Larger router weights so threshold decisions vary across tokens.
    if model.decoder.router is not None:
        with torch.no_grad():
            model.decoder.router.weight.normal_(0, 2.0)
    model.eval()
    tokens, positions = batch(model_cfg.vocab_size, seq_length=24)
    changed = tokens.clone()
    changed[:, 16:] = (changed[:, 16:] + 7) % model_cfg.vocab_size
    with torch.no_grad():
        before = model(tokens, positions, None, routing_mode="causal")
        after = model(changed, positions, None, routing_mode="causal")
    assert torch.allclose(before[:, :16], after[:, :16], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 16:], after[:, 16:])


def test_topk_routing_is_not_causal(pg_collection):
    """The counterpart of the causal test: training top-k looks at the future (why causal mode exists)."""
    model_cfg, recursion = tiny("tiny-mor-e-r3")
    model = make_model(model_cfg, recursion, pg_collection, seed=11)
    with torch.no_grad():
        model.decoder.router.weight.normal_(0, 2.0)
    model.eval()
    tokens, positions = batch(model_cfg.vocab_size, seq_length=24)
    differs = False
    for shift in range(1, 6):
        changed = tokens.clone()
        changed[:, 12:] = (changed[:, 12:] + shift) % model_cfg.vocab_size
        with torch.no_grad():
            before = model(tokens, positions, None)
            after = model(changed, positions, None)
        differs |= not torch.allclose(before[:, :12], after[:, :12], atol=1e-6, rtol=0)
    assert differs


def test_kv_sharing_reuses_first_recursion_kv(pg_collection, monkeypatch):
    model_cfg, recursion = tiny("tiny-mor-e-r3-kvshare")
    model = make_model(model_cfg, recursion, pg_collection)
    seen = []
    original = MoRSelfAttention.get_query_key_value_tensors

    def spy(self, *args, **kwargs):
        query, key, value, *rest = original(self, *args, **kwargs)
        session = self.kv_share_session
        seen.append((self.layer_number, None if session is None else session.mode, query.shape[0],
                     key.data_ptr(), value.data_ptr(), key.shape[0]))
        return (query, key, value, *rest)

    monkeypatch.setattr(MoRSelfAttention, "get_query_key_value_tensors", spy)
    tokens, positions = batch(model_cfg.vocab_size, seq_length=30)
    model(tokens, positions, None, labels=tokens)
    shared = [entry for entry in seen if entry[1] is not None]
    layers = sorted({entry[0] for entry in shared})
    assert len(layers) == model.decoder.layout.num_shared
    for layer_number in layers:
        calls = [entry for entry in shared if entry[0] == layer_number]
        assert [c[1] for c in calls] == ["record", "reuse", "reuse"]
        assert [c[2] for c in calls] == [30, 20, 10]  # queries shrink to the active tokens
        record = calls[0]
        for reuse in calls[1:]:
            assert reuse[3:5] == record[3:5], "the first recursion's K/V tensors are reused"
            assert reuse[5] == 30, "keys cover the whole sequence"
    # Sessions are detached after the forward, so the module is plain SelfAttention again.
    assert all(model.decoder.layers[i].self_attention.kv_share_session is None for i in range(4))


@pytest.mark.parametrize("name", ["tiny-mor-e-r3", "tiny-mor-t-r3"])
def test_lm_gradients_reach_routers(pg_collection, name):
    model_cfg, recursion = tiny(name, aux_loss_coeff=0.0)
    model = make_model(model_cfg, recursion, pg_collection)
    tokens, positions = batch(model_cfg.vocab_size)
    model(tokens, positions, None, labels=tokens).mean().backward()
    grad = model.decoder.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_aux_loss_reaches_backward(pg_collection):
    """With the LM path cut off from the router, only the attached BCE loss can produce router gradients."""
    model_cfg, recursion = tiny("tiny-mor-e-r3", router_alpha=0.0)
    model = make_model(model_cfg, recursion, pg_collection)
    tokens, positions = batch(model_cfg.vocab_size)
    model(tokens, positions, None, labels=tokens).mean().backward()
    grad = model.decoder.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    stats = model.pop_router_stats()
    assert {"router/bce_loss/r1", "router/active_frac/r3"} <= stats.keys()
    assert stats["router/active_frac/r3"] == pytest.approx(int(32 / 3) / 32)  # k_3 = int(s / 3)


def test_token_choice_loss_free_bias_moves_toward_balance(pg_collection):
    model_cfg, recursion = tiny("tiny-mor-t-r3", token_balancing="loss_free", bias_update_rate=0.05)
    model = make_model(model_cfg, recursion, pg_collection)
    with torch.no_grad():
        model.decoder.router.weight.zero_()
        model.decoder.router.weight[0].fill_(1.0)  # every token prefers depth 1 at first
    tokens, positions = batch(model_cfg.vocab_size)
    model(tokens, positions, None, labels=tokens).mean().backward()
    counts = model.decoder.router.local_tokens_per_depth.clone()
    model.update_router_bias(recursion.bias_update_rate)
    bias = model.decoder.router.depth_bias
    assert counts.sum() == tokens.numel()
    # Over-loaded depths are pushed down, under-loaded ones up.
    assert torch.equal(torch.sign(bias), torch.sign(counts.mean() - counts))
    assert model.decoder.router.local_tokens_per_depth.sum() == 0


@pytest.mark.parametrize("name", ["tiny-mor-e-r3", "tiny-mor-t-r3"])
def test_tiny_model_overfits_a_batch(pg_collection, name):
    model_cfg, recursion = tiny(name)
    model = make_model(model_cfg, recursion, pg_collection)
    tokens, positions = batch(model_cfg.vocab_size, batch_size=4, seq_length=32)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(80):
        optimizer.zero_grad()
        loss = model(inputs, positions[:, :-1], None, labels=labels).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_bf16_routing_decides_as_fp32_on_the_same_values():
    """Router logits, top-k, gates and the token-choice argmax are computed in fp32 from bf16 weights and states,
    so a bf16 model routes exactly like an fp32 model holding the same (bf16-representable) values."""
    from mor_megatron.model.routing import TokenChoiceRouter

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, 2, 256, generator=generator).bfloat16()  # many tokens: bf16 logits would tie
    expert = {dtype: ExpertChoiceRouter(hidden_size=256, capacities=(1.0, 0.5), alpha=0.1, temperature=1.0,
                                        aux_loss_coeff=0.001, z_loss_coeff=0.0, init_std=0.02, params_dtype=dtype)
              for dtype in (torch.bfloat16, torch.float32)}
    token = {dtype: TokenChoiceRouter(hidden_size=256, num_recursions=3, alpha=1.0, temperature=1.0,
                                      balancing="loss", aux_loss_coeff=0.1, z_loss_coeff=0.0, init_std=0.02,
                                      params_dtype=dtype)
             for dtype in (torch.bfloat16, torch.float32)}
    with torch.no_grad():
        expert[torch.float32].weight.copy_(expert[torch.bfloat16].weight.float())
        token[torch.float32].weight.copy_(token[torch.bfloat16].weight.float())
    decisions = {dtype: expert[dtype].route(1, hidden.to(dtype), None, 512, "topk") for dtype in expert}
    low, full = decisions[torch.bfloat16], decisions[torch.float32]
    assert torch.equal(low.active.index, full.active.index)
    assert torch.equal(low.gate.float(), full.gate.to(torch.bfloat16).float())
    assert low.aux_loss.dtype == torch.float32 and torch.equal(low.aux_loss, full.aux_loss)
    depths = {dtype: token[dtype].assign(hidden.to(dtype))[0] for dtype in token}
    assert torch.equal(depths[torch.bfloat16], depths[torch.float32])
