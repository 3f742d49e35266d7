"""Core attention on torch's ``scaled_dot_product_attention``: the local spec's fast path for compacted tokens.

megatron-core's local ``DotProductAttention`` materialises the scores ``[b, np, sq, sk]`` and a dense mask.
MoR runs attention on the compacted tokens of each recursion, so that cost is paid at every depth; this module
hands the same inputs to ``torch.nn.functional.scaled_dot_product_attention`` instead, which dispatches to the
flash or memory-efficient kernels on GPU (the causal case never builds a mask) and to torch's CPU kernels
elsewhere, so CPU tests run the same code as GPU training.

The masks it receives (``mor_megatron.model.recursion.ActiveTokens``): None for causal attention among the compacted
tokens (padding of shorter rows sits after every real token, so causality alone keeps it out of real queries);
a ``[b, 1, sq, sk]`` bool mask (True = masked) for KV sharing (compacted queries over all keys) and for
document masks. Grouped-query attention is native (``enable_gqa``); nothing is repeated in memory.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward) on torch's SDPA.

    Shapes: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` (this TP rank's heads and groups), output
    ``[sq, b, np * hn]``. Supports what MoR's layers use: causal or explicit boolean masks, GQA, attention
    dropout (drawn in megatron's TP RNG stream), query-key layer scaling; not packed sequences, attention bias,
    sliding windows or non-vanilla softmax, which raise at construction or call.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the Transformer Engine spec")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention does not support sliding-window attention (config.window_size)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type='vanilla' only, not {config.softmax_type!r}")
        self.attn_mask_type = attn_mask_type
        # Heads and query groups split evenly over TP ranks, so a rank holds grouped queries iff the model does;
        # SDPA reads this rank's head counts from the tensors (pg_collection is accepted for the signature).
        self.grouped_query = config.num_attention_heads != config.num_query_groups
        head_dim = config.kv_channels
        # No layer_number factor for apply_query_key_layer_scaling: megatron divides the scores by it and
        # multiplies it back inside its fp32 softmax, which SDPA's kernels compute in fp32 anyway.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        """Attention of ``query`` over ``key``/``value``; ``attention_mask`` None means causal."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, batch = query.shape[:2]
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(f"causal attention needs as many keys as queries, got {k.shape[2]} and {q.shape[2]}")
        allowed = None if attention_mask is None else ~attention_mask
        dropout_p = self.dropout_p if self.training else 0.0
        attend = dict(attn_mask=allowed, dropout_p=dropout_p, is_causal=causal, scale=self.softmax_scale,
                      enable_gqa=self.grouped_query)
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, **attend)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **attend)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, -1)
