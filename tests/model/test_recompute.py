"""Activation recomputation: `full` (whole layers) and `selective` (core attention), for every recursion or only
chosen ones, gives the loss and gradients of the model without recomputation, dropout included, and
recomputes exactly what it says (counted by forward hooks)."""

from __future__ import annotations

import pytest
import torch

from mor_megatron.config import ModelConfig, ParallelConfig, layer_layout
from mor_megatron.model.builder import build_model, transformer_config
from tests.model.helpers import batch, tiny

CASES = [  # (recompute, recompute_recursions)
    ("full", ()),
    ("full", (1,)),
    ("selective", ()),
    ("selective", (2, 3)),
]


def _model(name: str, pg_collection, recompute: str, recursions: tuple[int, ...]):
    model_cfg, recursion = tiny(name)
    model_cfg = ModelConfig(**{**model_cfg.__dict__, "hidden_dropout": 0.1, "attention_dropout": 0.1})
    torch.manual_seed(0)
    config = transformer_config(model_cfg, recursion, ParallelConfig(), recompute=recompute)
    model = build_model(model_cfg, recursion, config, pg_collection=pg_collection, provider="local",
                        recompute_recursions=recursions)
    return model.train(), layer_layout(model_cfg, recursion), recursion.num_recursions


def _loss_and_grads(model, vocab_size: int) -> tuple[float, dict[str, torch.Tensor]]:
    from megatron.core import tensor_parallel

    tokens, positions = batch(vocab_size, batch_size=2, seq_length=24)
    torch.manual_seed(5)  # the dropout masks: the default generator and megatron's model-parallel RNG
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _count_calls(modules) -> list[int]:
    counts = [0]

    def count(*_):
        counts[0] += 1

    for module in modules:
        module.register_forward_hook(count)
    return counts


@pytest.mark.parametrize("name", ["tiny-recursive-r3", "tiny-mor-e-r3", "tiny-mor-t-r3"])
@pytest.mark.parametrize(("recompute", "recursions"), CASES, ids=[f"{m}-{r or 'all'}" for m, r in CASES])
def test_recompute_keeps_loss_and_gradients_and_recomputes_what_it_says(name, recompute, recursions,
                                                                        pg_collection):
    reference, layout, num_recursions = _model(name, pg_collection, "none", ())
    ref_loss, ref_grads = _loss_and_grads(reference, 256)

    model, _, _ = _model(name, pg_collection, recompute, recursions)
    model.load_state_dict(reference.state_dict())
    shared = [model.decoder._layer(idx) for idx in layout.recursion_layers(0)]
    watched = shared if recompute == "full" else [layer.self_attention.core_attention for layer in shared]
    calls = _count_calls(watched)
    loss, grads = _loss_and_grads(model, 256)

    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], rtol=0, atol=1e-6, msg=key)
    # Each shared layer runs once per recursion, and again in backward for each recursion that recomputes.
    recomputing = len(recursions) if recursions else num_recursions
    assert calls[0] == len(shared) * (num_recursions + recomputing)


def test_recompute_recursions_are_checked(pg_collection):
    from mor_megatron.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=r"train.recompute_recursions=\[4\]: recursions are counted 1..3"):
        validate(load_config(None, ["preset=tiny-mor-e-r3", "train.recompute=full", "train.recompute_recursions=[4]"]))
    with pytest.raises(ConfigError, match="needs train.recompute 'selective' or 'full'"):
        load_config(None, ["preset=tiny-mor-e-r3", "train.recompute_recursions=[1]"])
    with pytest.raises(ConfigError, match="not supported with recursion.kv_mode='shared'"):
        validate(load_config(None, ["preset=tiny-mor-e-r3-kvshare", "train.recompute=selective"]))
