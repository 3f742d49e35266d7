"""Shared helpers for model tests: build tiny MoR models and stock megatron GPT models from the same config."""

from __future__ import annotations

import torch

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel

from mor_megatron.config import ModelConfig, ParallelConfig, RecursionConfig, preset
from mor_megatron.model.builder import build_model, transformer_config


def tiny(name: str, **recursion_overrides) -> tuple[ModelConfig, RecursionConfig]:
    """A ``tiny-*`` preset with a small vocabulary, optionally with recursion fields replaced."""
    model, recursion = preset(name)
    model = ModelConfig(**{**model.__dict__, "vocab_size": 256, "max_seq_length": 64})
    if recursion_overrides:
        recursion = RecursionConfig(**{**recursion.__dict__, **recursion_overrides})
    return model, recursion


def make_model(model: ModelConfig, recursion: RecursionConfig, pg_collection, *, tp: int = 1, seed: int = 0,
               provider: str = "local", sequence_parallel: bool = False):
    """Build a MoRGPTModel in fp32 with a fixed seed (local layers unless ``provider`` says otherwise)."""
    torch.manual_seed(seed)
    config = transformer_config(model, recursion, ParallelConfig(tensor_parallel_size=tp,
                                                                 sequence_parallel=sequence_parallel))
    return build_model(model, recursion, config, pg_collection=pg_collection, provider=provider)


def make_stock_gpt(model: ModelConfig, num_layers: int, pg_collection) -> GPTModel:
    """megatron-core's own GPTModel with the local Llama-style spec and ``num_layers`` layers."""
    recursion = RecursionConfig(num_recursions=1, sharing="cycle")
    config = transformer_config(ModelConfig(**{**model.__dict__, "num_layers": num_layers}), recursion,
                                ParallelConfig())
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=model.vocab_size, max_sequence_length=model.max_seq_length,
                    share_embeddings_and_output_weights=model.tie_embeddings, position_embedding_type="rope",
                    rotary_base=int(model.rotary_base), pg_collection=pg_collection)


def batch(vocab_size: int, batch_size: int = 2, seq_length: int = 32, seed: int = 1):
    """Random token ids ``[b, s]`` and position ids."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_length), generator=generator)
    positions = torch.arange(seq_length).expand(batch_size, -1)
    return tokens, positions
