"""megatron-core module specs for MoR models: one layer spec, repeated per unique layer, plus the final norm.

The local provider (megatron-core's own column/row-parallel linears, with torch's SDPA as core attention by
default, :mod:`mor_megatron.model.core_attention`) runs anywhere, CPU included; the Transformer Engine
provider is used when TE is importable and CUDA is present. In both the self-attention module is
:class:`MoRSelfAttention`, which adds KV sharing and is otherwise the stock one.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Literal

import torch

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from mor_megatron.config import CoreAttention, LayerLayout, TransformerImpl
from mor_megatron.model.attention import MoRSelfAttention
from mor_megatron.model.core_attention import SDPAttention

SpecProvider = Literal["local", "transformer_engine"]


def resolve_provider(requested: TransformerImpl, *, cuda_available: bool) -> SpecProvider:
    """`auto` -> Transformer Engine when it is installed and CUDA is present, else local."""
    has_te = importlib.util.find_spec("transformer_engine") is not None
    if requested == "auto":
        return "transformer_engine" if (has_te and cuda_available) else "local"
    if requested == "transformer_engine" and not (has_te and cuda_available):
        raise ValueError("model.transformer_impl='transformer_engine' needs transformer_engine installed and a CUDA "
                         "device; use 'local' or 'auto'")
    return requested


class LocalNorm:
    """megatron's torch norm (``WrappedTorchNorm``), usable under sequence parallelism too.

    Each rank then normalises its own slice of the sequence, so the weights' gradients are partial sums:
    marked ``sequence_parallel``, megatron's ``finalize_model_grads`` all-reduces them across the TP group
    (what apex's and Transformer Engine's norms do; megatron's torch wrapper refuses sequence parallelism).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs) -> torch.nn.Module:
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} is not supported with sequence parallelism")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def mor_layer_spec(provider: SpecProvider, *, core_attention: CoreAttention = "sdpa") -> ModuleSpec:
    """Llama-style layer (RMSNorm, SwiGLU via the config, RoPE) whose attention is :class:`MoRSelfAttention`.

    ``core_attention`` picks the local layers' kernel (:class:`SDPAttention` or megatron's
    ``DotProductAttention``); the Transformer Engine layers keep TE's.
    """
    if provider == "transformer_engine":
        base = get_gpt_layer_with_transformer_engine_spec()
    else:
        base = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec = copy.deepcopy(base)
    spec.submodules.self_attention.module = MoRSelfAttention
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(spec.submodules, name) is WrappedTorchNorm:  # megatron's choice when apex is missing
            setattr(spec.submodules, name, LocalNorm)
    if provider == "local" and core_attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def mor_block_spec(layout: LayerLayout, provider: SpecProvider, *,
                   core_attention: CoreAttention = "sdpa") -> TransformerBlockSubmodules:
    """One layer spec per unique layer and the final norm, in the order :class:`MoRBlock` indexes them."""
    if provider == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = LocalNorm
    layer = mor_layer_spec(provider, core_attention=core_attention)
    return TransformerBlockSubmodules(layer_specs=[layer] * layout.num_unique_layers, layer_norm=final_norm)


def default_provider(requested: TransformerImpl) -> SpecProvider:
    """:func:`resolve_provider` for the device this process runs on."""
    return resolve_provider(requested, cuda_available=torch.cuda.is_available())
