"""The exported Hugging Face MoR model: generation with the recursion-wise KV cache, cache size, padding.

Models here are built directly from a small ``MoRConfig`` with random weights (std 0.2 so the greedy choices
vary, router rows std 1 so the routing does); conversion from Megatron checkpoints is in
``tests/dist/test_convert.py``.
"""

from __future__ import annotations

import ast

import pytest
import torch

from mor_megatron.inference.hf import MODELING_FILES
from mor_megatron.inference.hf.configuration_mor import MoRConfig
from mor_megatron.inference.hf.modeling_mor import MoRCache, MoRForCausalLM, output_cache

VOCAB = 128
PAD = 3


def _model(routing: str = "expert_choice", kv_mode: str = "recursion_wise", num_recursions: int = 2,
           seed: int = 0, **extra) -> MoRForCausalLM:
    config = MoRConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, num_prefix_layers=1, num_shared_layers=2, num_suffix_layers=1,
                       num_recursions=num_recursions, routing=routing, kv_mode=kv_mode,
                       max_position_embeddings=64, initializer_range=0.2, pad_token_id=PAD, eos_token_id=None,
                       **extra)
    torch.manual_seed(seed)
    model = MoRForCausalLM(config).eval()
    if model.model.router is not None:
        with torch.no_grad():
            model.model.router.weight.normal_(0.0, 1.0)
    return model


def _left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of the given lengths, left-padded: ids and attention mask ``[b, max(lengths)]``."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(4, VOCAB, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


def _generate(model, ids, mask, *, use_cache: bool, new_tokens: int = 10):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              use_cache=use_cache, return_dict_in_generate=True, pad_token_id=PAD)


VARIANTS = [("expert_choice", "recursion_wise"), ("expert_choice", "shared"),
            ("token_choice", "recursion_wise")]


@pytest.mark.parametrize("routing,kv_mode", VARIANTS, ids=["mor_e_cache", "mor_e_kvshare", "mor_t_cache"])
def test_cached_generation_matches_recomputation(routing, kv_mode):
    model = _model(routing, kv_mode, num_recursions=3)
    ids, mask = _left_padded([5, 9, 2])
    cached = _generate(model, ids, mask, use_cache=True)
    recomputed = _generate(model, ids, mask, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert isinstance(output_cache(cached), MoRCache)
    new = cached.sequences[:, ids.shape[1]:]
    assert len(set(new.flatten().tolist())) > 3, "degenerate generations would make the comparison vacuous"
    # Each prompt alone (no padding) continues exactly as in the padded batch.
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()][None]
        alone = _generate(model, real, torch.ones_like(real), use_cache=True)
        assert torch.equal(alone.sequences[0, real.shape[1]:], new[row])
    # The routing really varies: some token skips a later recursion, some token runs it.
    with torch.no_grad():
        out = model(cached.sequences, output_recursion_masks=True)
    later = torch.stack(out.recursion_masks[1:])
    assert later.any() and not later.all()


def _expected_cache_bytes(model: MoRForCausalLM, sequences: torch.Tensor, mask: torch.Tensor) -> int:
    """K/V bytes the routing decisions of a full recomputation imply: tokens per slot x per-token K/V size."""
    cfg = model.config
    with torch.no_grad():
        masks = model(sequences, attention_mask=mask, output_recursion_masks=True).recursion_masks
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(model.dtype).bits // 8
    real = int(mask.sum())
    tokens = (cfg.num_prefix_layers + cfg.num_suffix_layers) * real
    stored = masks[:1] if cfg.kv_mode == "shared" else masks
    tokens += cfg.num_shared_layers * sum(int(m.sum()) for m in stored)
    return tokens * per_token


@pytest.mark.parametrize("routing,kv_mode", VARIANTS, ids=["mor_e_cache", "mor_e_kvshare", "mor_t_cache"])
def test_cache_bytes_match_routing_decisions(routing, kv_mode):
    model = _model(routing, kv_mode, num_recursions=3, seed=2)
    ids, mask = _left_padded([7, 3, 11], seed=3)
    out = _generate(model, ids, mask, use_cache=True, new_tokens=6)
    cache = output_cache(out)
    # The last generated token was never fed back, so the cache covers all but the last position.
    seen = out.sequences[:, :-1]
    generated = torch.ones(mask.shape[0], seen.shape[1] - mask.shape[1], dtype=mask.dtype)
    seen_mask = torch.cat([mask, generated], dim=1)
    stored = [t for slot in cache.slots.values() for t in (*slot.keys, *slot.values)]
    measured = sum(t.numel() * t.element_size() for t in stored)
    assert measured == cache.nbytes() == _expected_cache_bytes(model, seen, seen_mask)


def _recursion_slot_bytes(model: MoRForCausalLM, ids: torch.Tensor, routing_mode: str) -> int:
    cfg = model.config
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True, routing_mode=routing_mode))
    first = cfg.num_prefix_layers
    return cache.nbytes(list(range(first, first + cfg.num_recursions * cfg.num_shared_layers)))


@pytest.mark.parametrize("num_recursions", [2, 3])
def test_topk_prefill_cache_holds_paper_fraction(num_recursions):
    ids = torch.randint(4, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    vanilla = _recursion_slot_bytes(_model("none", num_recursions=num_recursions), ids, "causal")
    cached = _recursion_slot_bytes(_model("expert_choice", "recursion_wise", num_recursions), ids, "topk")
    shared = _recursion_slot_bytes(_model("expert_choice", "shared", num_recursions), ids, "topk")
    assert cached * 2 * num_recursions == vanilla * (num_recursions + 1)  # (R + 1) / (2R) of vanilla
    assert shared * num_recursions == vanilla  # 1 / R


def test_left_padding_does_not_change_logits():
    model = _model("expert_choice", num_recursions=3, seed=4)
    ids, mask = _left_padded([4, 10])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, -4:]).logits
    assert (batched[0, -4:] - alone[0]).abs().max() <= 1e-5


def test_cache_is_accepted_under_either_name():
    """transformers 5.24 renamed the cache argument; the model takes both names and returns the installed one's."""
    model = _model(seed=5)
    ids = torch.randint(4, VOCAB, (1, 7))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = output_cache(model(ids[:, :-1], use_cache=True))
            step = model(ids[:, -1:], use_cache=True, **{name: cache})
            assert (step.logits[:, -1] - full).abs().max() <= 1e-5, name
            assert output_cache(step) is cache and cache.get_seq_length() == ids.shape[1]
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, -1:], cache=cache, past_key_values=cache)


def test_topk_routing_refuses_a_non_empty_cache():
    model = _model()
    ids = torch.randint(4, VOCAB, (1, 6))
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
        with pytest.raises(ValueError, match="routing_mode='topk'"):
            model(ids[:, :1], cache=cache, routing_mode="topk")


@pytest.mark.parametrize("fields,match", [
    (dict(routing="expert_choice", capacities=[1.0]), "capacities"),
    (dict(routing="token_choice", sharing="sequence"), "sharing"),
    (dict(kv_mode="shared", num_recursions=1), "kv_mode"),
    (dict(num_hidden_layers=5), "num_hidden_layers"),
    (dict(routing="mixture"), "routing"),
])
def test_config_rejects_inconsistent_fields(fields, match):
    base = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_shared_layers=2,
                num_recursions=2)
    with pytest.raises(ValueError, match=match):
        MoRConfig(**{**base, **fields})


def _imports(node: ast.AST, roots: set[str], relative: set[str]) -> None:
    """Collect the imports an exported folder runs: a ``try`` block's body (its ``except`` is the fallback
    inside the mor_megatron package, which transformers' remote-code check skips as well)."""
    if isinstance(node, ast.Try):
        for child in node.body:
            _imports(child, roots, relative)
        return
    if isinstance(node, ast.Import):
        roots.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        (relative.add(node.module) if node.level else roots.add(node.module.split(".")[0]))
    for child in ast.iter_child_nodes(node):
        _imports(child, roots, relative)


@pytest.mark.parametrize("name", list(MODELING_FILES))
def test_exported_code_imports_only_torch_transformers_and_its_own_files(name):
    roots: set[str] = set()
    relative: set[str] = set()
    _imports(ast.parse(MODELING_FILES[name].read_text()), roots, relative)
    assert roots <= {"__future__", "dataclasses", "typing", "torch", "transformers"}, roots
    assert {f"{module}.py" for module in relative} <= set(MODELING_FILES), relative


def test_beam_search_with_cache_matches_recomputation():
    model = _model("expert_choice", num_recursions=3, seed=5)
    ids, mask = _left_padded([6, 3], seed=6)
    with torch.no_grad():
        runs = [model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                               use_cache=use_cache, pad_token_id=PAD) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_cache_rows_can_be_selected_repeated_and_reordered():
    model = _model("expert_choice", num_recursions=2)
    ids, mask = _left_padded([5, 2], seed=7)
    with torch.no_grad():
        cache = output_cache(model(ids, attention_mask=mask, use_cache=True))
    slot = cache.slots[0]
    assert [k.shape[1] for k in slot.keys] == [5, 2]
    first_row = slot.values[0]
    cache.batch_repeat_interleave(2)
    assert [k.shape[1] for k in slot.keys] == [5, 5, 2, 2]
    cache.reorder_cache(torch.tensor([3, 0, 1, 2]))
    assert [k.shape[1] for k in slot.keys] == [2, 5, 5, 2]
    cache.batch_select_indices(torch.tensor([1]))
    assert [k.shape[1] for k in slot.keys] == [5] and torch.equal(slot.values[0], first_row)
