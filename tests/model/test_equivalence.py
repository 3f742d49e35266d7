"""The MoR model reduces to megatron-core's GPTModel: R = 1 is vanilla, recursion = repeated shared layers."""

from __future__ import annotations

import pytest
import torch

from mor_megatron.config import layer_layout

from tests.model.helpers import batch, make_model, make_stock_gpt, tiny


def _logits(model, tokens, positions):
    model.eval()
    with torch.no_grad():
        return model(tokens, positions, None)


def test_r1_none_equals_stock_gpt_model(pg_collection):
    model_cfg, recursion = tiny("tiny-vanilla")
    mor = make_model(model_cfg, recursion, pg_collection, seed=3)
    stock = make_stock_gpt(model_cfg, model_cfg.num_layers, pg_collection)
    # Same module tree, same keys: the vanilla baseline is megatron's own GPT.
    missing, unexpected = stock.load_state_dict(mor.state_dict(), strict=True)
    assert not missing and not unexpected
    tokens, positions = batch(model_cfg.vocab_size)
    diff = (_logits(mor, tokens, positions) - _logits(stock, tokens, positions)).abs().max()
    assert diff <= 1e-5


@pytest.mark.parametrize("sharing", ["middle_cycle", "cycle", "sequence", "middle_sequence"])
def test_recursive_equals_vanilla_with_repeated_layers(pg_collection, sharing):
    model_cfg, recursion = tiny("tiny-recursive-r2", sharing=sharing)
    layout = layer_layout(model_cfg, recursion)
    mor = make_model(model_cfg, recursion, pg_collection, seed=5)
    stock = make_stock_gpt(model_cfg, layout.num_unrolled_layers, pg_collection)

    order = list(range(layout.num_prefix))
    for r in range(layout.num_recursions):
        order += layout.recursion_layers(r)
    order += list(range(layout.num_prefix + layout.num_shared, layout.num_unique_layers))
    assert len(order) == layout.num_unrolled_layers

    mor_state = mor.state_dict()
    state = {key: value for key, value in mor_state.items() if ".layers." not in key}
    for unrolled_idx, unique_idx in enumerate(order):
        prefix = f"decoder.layers.{unique_idx}."
        for key, value in mor_state.items():
            if key.startswith(prefix):
                state[f"decoder.layers.{unrolled_idx}." + key[len(prefix):]] = value
    stock.load_state_dict(state, strict=True)

    tokens, positions = batch(model_cfg.vocab_size)
    diff = (_logits(mor, tokens, positions) - _logits(stock, tokens, positions)).abs().max()
    assert diff <= 1e-5


def test_shared_layer_is_one_module(pg_collection):
    model_cfg, recursion = tiny("tiny-mor-e-r3")
    mor = make_model(model_cfg, recursion, pg_collection)
    layout = layer_layout(model_cfg, recursion)
    assert len(mor.decoder.layers) == layout.num_unique_layers
    unique_params = sum(p.numel() for p in mor.parameters())
    distinct = {p.data_ptr() for p in mor.parameters()}
    assert len(distinct) == len(list(mor.parameters()))
    # Unrolled depth = 1 + 2 x 3 + 1 but only 4 layers of parameters exist.
    assert layout.num_unrolled_layers == 8 and layout.num_unique_layers == 4
    assert unique_params < sum(p.numel() for p in make_stock_gpt(model_cfg, 8, pg_collection).parameters())
