"""The serving engine's view of a Hugging Face model, and one decoder layer applied to one token per slot.

:class:`ModelStack` reads the modules and layout of an exported model, either a ``MoRForCausalLM``
(``model_type: mor``; any routing, both KV modes) or a vanilla ``LlamaForCausalLM`` (``model_type:
llama``, the format ``mor-convert to-hf`` writes for one-recursion models). A Llama model is seen as a MoR
model with no prefix or suffix, its ``L`` layers as the shared block and one recursion without routing, so
both go through the same layer code. Models are recognised by ``config.model_type``, not by class, because a
folder loaded with ``trust_remote_code=True`` carries its own copy of the MoR classes.

:func:`apply_layer` runs a Llama decoder layer (pre-norm attention + SwiGLU, both residuals) on ``n`` tokens
that each belong to a different slot, reading and writing their K/V in the paged cache
(:class:`mor_megatron.inference.kv_buffers.PagedKV`). The arithmetic is that of ``MoRAttention`` /
``MoRDecoderLayer`` (and of transformers' Llama layer): RoPE in the halves layout, grouped-query heads
repeated, softmax attention scaled by ``head_dim ** -0.5``; the layer's own submodules (norms, projections,
MLP) do the rest, so no weight is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor_megatron.inference.kv_buffers import PagedKV
from mor_megatron.model.recursion import apply_rotary, rotary_cos_sin


@dataclass(frozen=True)
class ModelStack:
    """Modules and layout of a MoR (or vanilla Llama) causal LM, as the engines use them.

    Unique layers are ``layers[0:num_prefix]`` (prefix), ``layers[num_prefix:num_prefix + num_shared]``
    (shared block) and the ``num_suffix`` after them; the shared block runs ``num_recursions`` times.
    ``recursion_layers[r]`` lists the unique layers applied, in order, at 0-based recursion ``r`` (the same
    block every time for cycle sharing).
    """

    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    router: nn.Module | None
    """``MoRRouter`` (``logits(hidden [n, h])`` -> fp32 ``[n, R]``); None for routing none."""
    num_prefix: int
    num_shared: int
    num_suffix: int
    num_recursions: int
    recursion_layers: tuple[tuple[int, ...], ...]
    routing: str
    """`none`, `expert_choice` or `token_choice` (MoRConfig.routing)."""
    kv_mode: str
    """`recursion_wise` or `shared` (MoRConfig.kv_mode)."""
    capacities: tuple[float, ...] | None
    router_alpha: float
    token_balancing: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelStack:
        """View of a loaded ``MoRForCausalLM`` or ``LlamaForCausalLM``; ValueError for anything else."""
        c = model.config
        model_type = getattr(c, "model_type", None)
        if model_type not in ("mor", "llama"):
            raise ValueError("the serving engine runs MoR models (config.model_type 'mor') and vanilla Llama "
                             f"models ('llama'), got config.model_type={model_type!r}")
        common = dict(embed=model.model.embed_tokens, layers=model.model.layers, norm=model.model.norm,
                      lm_head=model.lm_head, num_heads=c.num_attention_heads,
                      num_kv_heads=c.num_key_value_heads)
        if model_type == "mor":
            return cls(router=model.model.router, num_prefix=c.num_prefix_layers,
                       num_shared=c.num_shared_layers, num_suffix=c.num_suffix_layers,
                       num_recursions=c.num_recursions,
                       recursion_layers=tuple(tuple(c.recursion_layers(r)) for r in range(c.num_recursions)),
                       routing=c.routing, kv_mode=c.kv_mode,
                       capacities=tuple(c.capacities) if c.capacities is not None else None,
                       router_alpha=float(c.router_alpha), token_balancing=c.token_balancing,
                       head_dim=c.head_dim, rope_theta=float(c.rope_theta), **common)
        rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"LlamaConfig.rope_parameters={rope}: the engine implements only rope_type "
                             "'default'")
        if c.hidden_act != "silu" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            raise ValueError("the engine runs Llama layers with SwiGLU ('silu') and no biases, got "
                             f"hidden_act={c.hidden_act!r}, attention_bias={c.attention_bias}, "
                             f"mlp_bias={c.mlp_bias}")
        depth = c.num_hidden_layers
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(router=None, num_prefix=0, num_shared=depth, num_suffix=0, num_recursions=1,
                   recursion_layers=(tuple(range(depth)),), routing="none", kv_mode="recursion_wise",
                   capacities=None, router_alpha=1.0, token_balancing="loss", head_dim=head_dim,
                   rope_theta=float(rope["rope_theta"]), **common)

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (that of the embedding)."""
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device holding the weights."""
        return self.embed.weight.device

    @property
    def is_cycled(self) -> bool:
        """Every recursion applies the same unique layers (cycle sharing), so tokens at different depths can
        share one pass through each layer."""
        return all(layers == self.recursion_layers[0] for layers in self.recursion_layers)

    @property
    def suffix_layers(self) -> range:
        """Unique-layer indices of the suffix."""
        first = self.num_prefix + self.num_shared
        return range(first, first + self.num_suffix)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE tables ``cos, sin`` ``[n, 1, head_dim]`` for integer ``positions`` ``[n]``."""
        return rotary_cos_sin(positions[:, None], self.head_dim, self.rope_theta, self.dtype)


def apply_layer(stack: ModelStack, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, kv: PagedKV,
                slots: Tensor, depths: Tensor, write_rows: Tensor | None) -> Tensor:
    """One decoder layer on ``n`` tokens of ``n`` distinct slots; ``x`` ``[n, h]`` -> ``[n, h]``.

    Args:
        cos, sin: ``[n, 1, head_dim]`` RoPE tables at the tokens' positions (:meth:`ModelStack.rope`).
        kv: the layer site's paged cache; token ``i`` attends to ``kv``'s entries of ``(slots[i], depths[i])``
            (gathered out of the block pool; a paged-attention kernel would read them in place on a GPU).
        slots, depths: ``[n]`` int64.
        write_rows: which tokens first append their own K/V at ``(slot, depth)``: None for all of them,
            else an int64 index ``[m]`` into the batch (KV sharing: only depth-0 tokens write; deeper ones
            read depth 0).
            A token always sees its own K/V: it was appended now, or at depth 0 earlier in the same step.
    """
    n = x.shape[0]
    attn = layer.self_attn
    normed = layer.input_layernorm(x)
    query = apply_rotary(attn.q_proj(normed).view(n, 1, stack.num_heads, stack.head_dim).transpose(1, 2), cos, sin)
    if write_rows is None:
        writer, w_cos, w_sin, w_slots, w_depths = normed, cos, sin, slots, depths
    else:
        writer, w_cos, w_sin = normed[write_rows], cos[write_rows], sin[write_rows]
        w_slots, w_depths = slots[write_rows], depths[write_rows]
    if writer.shape[0]:
        m = writer.shape[0]
        key = attn.k_proj(writer).view(m, 1, stack.num_kv_heads, stack.head_dim).transpose(1, 2)
        value = attn.v_proj(writer).view(m, stack.num_kv_heads, stack.head_dim)
        kv.append(w_slots, w_depths, apply_rotary(key, w_cos, w_sin)[:, :, 0], value)
    keys, values, valid = kv.gather(slots, depths)  # [n, L, kv_heads, d], [n, L]
    repeat = stack.num_heads // stack.num_kv_heads
    keys = keys.transpose(1, 2).repeat_interleave(repeat, dim=1)
    values = values.transpose(1, 2).repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=valid[:, None, None, :])
    x = x + attn.o_proj(out.reshape(n, stack.num_heads * stack.head_dim))
    return x + layer.mlp(layer.post_attention_layernorm(x))
