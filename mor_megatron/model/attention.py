"""Self-attention with recursive KV sharing (MoR's `shared` KV mode, :mod:`mor_megatron.model.kv_share`).

Everything else is megatron-core's ``SelfAttention`` unchanged: with no share session attached, this module
behaves exactly like its parent.

The compacted queries of a reused recursion attend over all keys with ``key_pos <= query_pos``. Instead of a
dense ``[b, 1, k, s]`` mask, they are spread back to their original positions (zeros elsewhere) around the core
attention, which then runs plain causal attention over the full length and is read at the active rows: the
flash kernels apply (torch's SDPA and Transformer Engine alike, with the spec's own causal mask type), and the
memory is O(s) instead of O(k * s).

The recursion block attaches a :class:`KVShareSession` to each shared layer's attention for the duration of a
forward call; megatron's ``TransformerLayer.forward`` signature has no slot for it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from mor_megatron.model.kv_share import KVShareSession
from mor_megatron.model.recursion import ActiveTokens
from mor_megatron.model.recursion_state import pad_rows


class MoRSelfAttention(SelfAttention):
    """megatron-core ``SelfAttention`` that can record and reuse first-recursion keys/values.

    An explicit ``attention_mask`` (document masks) is handed to the core attention as an `arbitrary` mask:
    Transformer Engine's attention applies only the mask type it is told, so under the spec's `causal` type it
    would build its own causal mask and ignore this one. The local kernels use the mask either way.
    """

    kv_share_session: KVShareSession | None = None
    _query_rows = 0
    """Rows of the compacted queries that entered the core attention (with sequence-parallel padding)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Hooks rather than a wrapper module: the core attention keeps its place in the state dict (TE's holds
        # an `_extra_state`), and megatron calls it the same way in every version.
        self.core_attention.register_forward_pre_hook(self._spread_shared_queries, with_kwargs=True)
        self.core_attention.register_forward_hook(self._read_shared_queries)

    def _reused_queries(self) -> ActiveTokens | None:
        session = self.kv_share_session
        return session.queries if session is not None and session.mode == "reuse" else None

    def _spread_shared_queries(self, module, args: tuple, kwargs: dict):
        """Before the core attention: compacted queries ``[k, b, np, hn]`` -> ``[s, b, np, hn]``.

        Under sequence parallelism the compacted tokens arrive padded to a multiple of tp; the padding rows
        are dropped here and come back as zeros after the core attention."""
        queries = self._reused_queries()
        if queries is None:
            return None
        query, *rest = args
        self._query_rows = query.shape[0]
        query = query[: queries.num_slots]
        k, batch = query.shape[:2]
        full = query.new_zeros(queries.seq_length, batch, query.shape[2] * query.shape[3])
        spread = queries.scatter(full, query.reshape(k, batch, -1)).view(-1, *query.shape[1:])
        return (spread, *rest), kwargs

    def _read_shared_queries(self, module, args: tuple, output: Tensor) -> Tensor | None:
        """After the core attention: ``[s, b, np * hn]`` -> the active rows ``[k, b, np * hn]``."""
        queries = self._reused_queries()
        return None if queries is None else pad_rows(queries.gather(output), self._query_rows)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None, *args: Any, **kwargs: Any):
        """As the parent; with a mask, the core attention sees ``AttnMaskType.arbitrary`` for this call."""
        if attention_mask is None or self.attn_mask_type != AttnMaskType.causal:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        # megatron's forward reads the mask type from the module, so it is switched for the call only.
        self.attn_mask_type = AttnMaskType.arbitrary
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self.attn_mask_type = AttnMaskType.causal

    def get_query_key_value_tensors(self, hidden_states: Tensor, key_value_states: Tensor | None = None,
                                    output_gate: bool = False, split_qkv: bool = True):
        """As the parent; under a KV-share session, record or substitute the key and value tensors.

        Shapes: query ``[sq, b, np, hn]``; key/value ``[sk, b, ng, hn]`` (sk = full sequence when reused).
        In `reuse` mode the key/value projections of the active tokens are still computed by the fused QKV
        GEMM and dropped: splitting the fused weight per query group is not worth it for their ~1/3 share of
        one GEMM.
        """
        outputs = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                      output_gate=output_gate, split_qkv=split_qkv)
        session = self.kv_share_session
        if session is None:
            return outputs
        if not split_qkv:
            raise RuntimeError("KV sharing needs split q/k/v tensors; disable fused_single_qkv_rope")
        query, key, value, *rest = outputs
        if session.mode == "record":
            session.key, session.value = key, value
            return outputs
        if session.key is None:
            raise RuntimeError("KV sharing: no keys were recorded at the first recursion for this layer")
        return (query, session.key, session.value, *rest)
