"""The declarative Hugging Face <-> Megatron parameter-name map of Llama-style (MoR) models.

Names on the Megatron side are the ``dist_checkpointing`` keys of :class:`mor_megatron.model.MoRGPTModel`
(the same for megatron-core's local and Transformer Engine layers: the local layer saves its norms under
the TE names ``...linear_qkv.layer_norm_weight`` and ``...linear_fc1.layer_norm_weight``). Names on the HF
side are ``LlamaForCausalLM``'s, which the MoR serving model reuses; ``{layer}`` is the index of a *unique*
layer (for a vanilla model, the layer index). Fused Megatron tensors are split:

* ``linear_qkv.weight`` ``[groups * (heads_per_group + 2) * head_dim, h]`` is laid out per query group as
  ``[q (heads_per_group heads), k, v]``; HF keeps ``q_proj`` ``[heads * head_dim, h]``, ``k_proj``/``v_proj``
  ``[groups * head_dim, h]`` with query head ``i`` in group ``i // heads_per_group`` on both sides.
* ``linear_fc1.weight`` ``[2 * ffn, h]`` is ``[gate; up]`` (megatron's SwiGLU applies silu to the first half).

A key that no entry matches raises :class:`UnmappedKeyError` naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from mor_megatron.convert import ConversionError

LAYER = "{layer}"


class UnmappedKeyError(ConversionError):
    """A tensor name has no entry in the map; the message names it."""


@dataclass(frozen=True)
class Direct:
    """One Megatron tensor is one HF tensor."""

    megatron: str
    hf: str


@dataclass(frozen=True)
class FusedQKV:
    """Megatron's per-group fused QKV weight <-> HF q/k/v projections."""

    megatron: str
    q: str
    k: str
    v: str


@dataclass(frozen=True)
class FusedGateUp:
    """Megatron's SwiGLU fc1 ``[gate; up]`` <-> HF gate/up projections."""

    megatron: str
    gate: str
    up: str


Mapping = Direct | FusedQKV | FusedGateUp

_MEG_LAYER = "decoder.layers.{layer}."
_HF_LAYER = "model.layers.{layer}."

MODEL_MAP: tuple[Mapping, ...] = (
    Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    Direct("decoder.final_layernorm.weight", "model.norm.weight"),
    Direct("output_layer.weight", "lm_head.weight"),
    Direct("decoder.router.weight", "model.router.weight"),
    Direct("decoder.router.depth_bias", "model.router.depth_bias"),
)
"""Tensors outside the layers. The router entries exist for routed MoR models only; ``output_layer`` only
when the embeddings are not tied."""

LAYER_MAP: tuple[Mapping, ...] = (
    Direct(_MEG_LAYER + "self_attention.linear_qkv.layer_norm_weight", _HF_LAYER + "input_layernorm.weight"),
    FusedQKV(_MEG_LAYER + "self_attention.linear_qkv.weight", q=_HF_LAYER + "self_attn.q_proj.weight",
             k=_HF_LAYER + "self_attn.k_proj.weight", v=_HF_LAYER + "self_attn.v_proj.weight"),
    Direct(_MEG_LAYER + "self_attention.linear_proj.weight", _HF_LAYER + "self_attn.o_proj.weight"),
    Direct(_MEG_LAYER + "mlp.linear_fc1.layer_norm_weight", _HF_LAYER + "post_attention_layernorm.weight"),
    FusedGateUp(_MEG_LAYER + "mlp.linear_fc1.weight", gate=_HF_LAYER + "mlp.gate_proj.weight",
                up=_HF_LAYER + "mlp.up_proj.weight"),
    Direct(_MEG_LAYER + "mlp.linear_fc2.weight", _HF_LAYER + "mlp.down_proj.weight"),
)
"""Tensors of each unique layer; ``{layer}`` is the unique-layer index."""


@dataclass(frozen=True)
class AttentionShape:
    """Head layout needed to split or fuse QKV."""

    num_heads: int
    num_query_groups: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape(LAYER), r"(?P<layer>\d+)") + "$")


def _hf_names(mapping: Mapping) -> tuple[str, ...]:
    if isinstance(mapping, Direct):
        return (mapping.hf,)
    if isinstance(mapping, FusedQKV):
        return (mapping.q, mapping.k, mapping.v)
    return (mapping.gate, mapping.up)


_MEGATRON_INDEX = [(_pattern(m.megatron), m) for m in MODEL_MAP + LAYER_MAP]
_HF_INDEX = [(_pattern(name), m) for m in MODEL_MAP + LAYER_MAP for name in _hf_names(m)]


def _lookup(name: str, index: list[tuple[re.Pattern[str], Mapping]], side: str) -> tuple[Mapping, str | None]:
    for pattern, mapping in index:
        match = pattern.match(name)
        if match:
            return mapping, match.groupdict().get("layer")
    raise UnmappedKeyError(f"{side} tensor {name!r} has no entry in mor_megatron.convert.hf_keys (a layout "
                           "this converter does not know, e.g. biases, q/k norms or MoE layers)")


def _fill(template: str, layer: str | None) -> str:
    return template if layer is None else template.replace(LAYER, layer)


def megatron_to_hf(tensors: dict[str, Tensor], shape: AttentionShape) -> dict[str, Tensor]:
    """Rename (and split the fused) Megatron tensors to HF names; raises :class:`UnmappedKeyError`."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        mapping, layer = _lookup(name, _MEGATRON_INDEX, "Megatron")
        if isinstance(mapping, Direct):
            out[_fill(mapping.hf, layer)] = tensor
        elif isinstance(mapping, FusedQKV):
            q, k, v = split_qkv(tensor, shape)
            out.update({_fill(mapping.q, layer): q, _fill(mapping.k, layer): k, _fill(mapping.v, layer): v})
        else:
            gate, up = tensor.chunk(2, dim=0)
            out.update({_fill(mapping.gate, layer): gate.contiguous(),
                        _fill(mapping.up, layer): up.contiguous()})
    return out


def hf_to_megatron(tensors: dict[str, Tensor], shape: AttentionShape) -> dict[str, Tensor]:
    """Rename (and fuse) HF tensors to Megatron names; a fused tensor needs all its parts.

    Raises:
        UnmappedKeyError: an HF name has no entry.
        ConversionError: one part of a fused tensor (e.g. ``k_proj``) is missing.
    """
    out: dict[str, Tensor] = {}
    pending: dict[tuple[Mapping, str | None], None] = {}
    for name, tensor in tensors.items():
        mapping, layer = _lookup(name, _HF_INDEX, "Hugging Face")
        if isinstance(mapping, Direct):
            out[_fill(mapping.megatron, layer)] = tensor
        else:
            pending[(mapping, layer)] = None
    for mapping, layer in pending:
        parts = [_fill(part, layer) for part in _hf_names(mapping)]
        missing = [part for part in parts if part not in tensors]
        if missing:
            raise ConversionError(f"Hugging Face tensors {missing} are missing; "
                                  f"{_fill(mapping.megatron, layer)!r} needs all of {parts}")
        values = [tensors[part] for part in parts]
        fused = fuse_qkv(*values, shape) if isinstance(mapping, FusedQKV) else torch.cat(values, dim=0)
        out[_fill(mapping.megatron, layer)] = fused
    return out


def split_qkv(qkv: Tensor, shape: AttentionShape) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron fused QKV ``[groups * (hpg + 2) * d, h]`` -> q ``[heads * d, h]``, k/v ``[groups * d, h]``."""
    groups, hpg, dim = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    expected = groups * (hpg + 2) * dim
    if qkv.shape[0] != expected:
        raise ConversionError(f"fused QKV weight has {qkv.shape[0]} rows, but {shape.num_heads} heads in "
                              f"{groups} query groups of head_dim {dim} need {expected}")
    grouped = qkv.reshape(groups, hpg + 2, dim, qkv.shape[-1])
    q = grouped[:, :hpg].reshape(groups * hpg * dim, -1).contiguous()
    k = grouped[:, hpg].reshape(groups * dim, -1).contiguous()
    v = grouped[:, hpg + 1].reshape(groups * dim, -1).contiguous()
    return q, k, v


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape) -> Tensor:
    """Inverse of :func:`split_qkv`."""
    groups, hpg, dim = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    width = q.shape[-1]
    for name, tensor, rows in (("q_proj", q, groups * hpg * dim), ("k_proj", k, groups * dim),
                               ("v_proj", v, groups * dim)):
        if tensor.shape[0] != rows:
            raise ConversionError(f"{name} has {tensor.shape[0]} rows, but {shape.num_heads} heads in "
                                  f"{groups} query groups of head_dim {dim} need {rows}")
    fused = torch.cat([q.reshape(groups, hpg, dim, width), k.reshape(groups, 1, dim, width),
                       v.reshape(groups, 1, dim, width)], dim=1)
    return fused.reshape(groups * (hpg + 2) * dim, width)
