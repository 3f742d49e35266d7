"""The recursion block: unique prefix layers, a shared block applied R times with routing, unique suffix layers.

``MoRBlock`` is a megatron-core ``TransformerBlock`` whose ``layers`` hold each *unique* layer once (a shared
layer is one module applied R times, never R modules with tied tensors). The execution plan comes from
:class:`mor_megatron.config.LayerLayout`. For R = 1 and routing `none` the block is exactly megatron's
``TransformerBlock`` (same modules, same state-dict keys ``layers.<i>.*``), which is what makes the vanilla
baseline come out of the same code.

The forward keeps per-recursion work in :meth:`MoRBlock._run_recursion` so that a pipeline layout can run
recursion r (a virtual stage) on its own; everything a later stage needs (the residual stream, which tokens
are active, their gates) is in the loop state.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import WrappedTensor, make_viewless_tensor

from mor_megatron.config import LayerLayout, RecursionConfig
from mor_megatron.model.active_tokens import ActiveTokens
from mor_megatron.model.attention import KVShareSession, MoRSelfAttention
from mor_megatron.model.aux_loss import attach_aux_loss
from mor_megatron.model.router_stats import RouterStats
from mor_megatron.model.routing import ExpertChoiceRouter, RoutingMode, TokenChoiceRouter


class MoRBlock(TransformerBlock):
    """Decoder of a Mixture-of-Recursions model (see module docstring).

    Args:
        config: megatron TransformerConfig of one layer (``num_layers`` is the unrolled depth).
        spec: one ``TransformerBlockSubmodules`` entry per unique layer, plus the final norm.
        layout: which unique layer runs where.
        recursion: routing, KV mode and router hyper-parameters.
    """

    def __init__(self, config: TransformerConfig, spec: TransformerBlockSubmodules, *, layout: LayerLayout,
                 recursion: RecursionConfig, pre_process: bool, post_process: bool, pg_collection, vp_stage=None):
        if len(spec.layer_specs) != layout.num_unique_layers:
            raise ValueError(f"MoRBlock needs {layout.num_unique_layers} layer specs, got {len(spec.layer_specs)}")
        # Read by _build_layers, which the parent constructor calls.
        self.layout = layout
        self.recursion = recursion
        super().__init__(config=config, spec=spec, pre_process=pre_process, post_process=post_process,
                         pg_collection=pg_collection, vp_stage=vp_stage)
        self.aux_loss_scale = 1.0
        """Backward scale of the router losses; the trainer sets 1 / num_microbatches."""
        self.router_stats = RouterStats()

    def _build_layers(self) -> None:
        super()._build_layers()
        rec = self.recursion
        common = dict(hidden_size=self.config.hidden_size, alpha=rec.effective_alpha,
                      temperature=rec.router_temperature, aux_loss_coeff=rec.effective_aux_loss_coeff,
                      z_loss_coeff=rec.z_loss_coeff, init_std=self.config.init_method_std,
                      params_dtype=self.config.params_dtype)
        self.router: ExpertChoiceRouter | TokenChoiceRouter | None
        if rec.routing == "expert_choice":
            self.router = ExpertChoiceRouter(capacities=rec.effective_capacities, **common)
        elif rec.routing == "token_choice":
            self.router = TokenChoiceRouter(num_recursions=rec.num_recursions, balancing=rec.token_balancing,
                                            **common)
        else:
            self.router = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Checkpoint keys ``layers.<i>.*`` per unique layer (never stacked along depth).

        The parent stacks homogeneous layers into one ``[config.num_layers, ...]`` tensor; here
        ``config.num_layers`` is the unrolled depth while only the unique layers exist, so the stacked tensor
        would have holes. Per-layer keys also keep the index of each unique layer stable under resharding.
        """
        return super().sharded_state_dict(prefix, sharded_offsets,
                                          {**(metadata or {}), "non_homogeneous_layers": True})

    # ----------------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor | WrappedTensor, attention_mask: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                rotary_pos_emb: Tensor | None = None, rotary_pos_cos: Tensor | None = None,
                rotary_pos_sin: Tensor | None = None, rotary_pos_cos_sin: Tensor | None = None,
                attention_bias: Tensor | None = None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, padding_mask: Tensor | None = None, *,
                routing_mode: RoutingMode = "topk", inference_params=None) -> Tensor:
        """Run the decoder on ``hidden_states`` ``[s, b, h]`` and return ``[s, b, h]``.

        Args:
            attention_mask: None for causal attention, or a ``[b, 1, s, s]`` bool mask (True = masked),
                e.g. for document masking; it is restricted to the active tokens at each recursion.
            rotary_pos_emb: RoPE frequencies ``[s, 1, 1, d]`` from GPTModel.
            routing_mode: `topk` (training routing) or `causal` (threshold routing, what serving runs).
        """
        if inference_context is not None or inference_params is not None or packed_seq_params is not None:
            raise NotImplementedError("MoRBlock runs full sequences; for KV-cached generation use "
                                      "mor_megatron.inference (recursion-wise KV cache)")
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        if not self.pre_process:
            hidden_states = self.input_tensor
        hidden = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        full = dict(attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)

        for idx in range(self.layout.num_prefix):
            hidden, _ = self.layers[idx](hidden_states=hidden, **full)

        hidden, aux_loss = self._run_recursions(hidden, attention_mask, rotary_pos_emb, routing_mode)

        first_suffix = self.layout.num_prefix + self.layout.num_shared
        for idx in range(first_suffix, first_suffix + self.layout.num_suffix):
            hidden, _ = self.layers[idx](hidden_states=hidden, **full)

        hidden = attach_aux_loss(hidden, aux_loss, self.aux_loss_scale)
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return make_viewless_tensor(inp=hidden, requires_grad=True, keep_graph=True)

    def _run_recursions(self, hidden: Tensor, attention_mask: Tensor | None, rotary_pos_emb: Tensor | None,
                        routing_mode: RoutingMode) -> tuple[Tensor, Tensor | None]:
        """Apply the shared block R times according to the routing; returns (hidden, summed aux loss)."""
        rec = self.recursion
        seq_length, batch = hidden.shape[0], hidden.shape[1]
        aux_losses: list[Tensor] = []
        every_token = ActiveTokens(index=torch.arange(seq_length, device=hidden.device).expand(batch, -1),
                                   valid=None, seq_length=seq_length)
        token_choice = None
        if isinstance(self.router, TokenChoiceRouter):
            depth, gate, aux, stats = self.router.assign(hidden)
            token_choice = (hidden, depth, gate)
            self.router_stats.add_all(stats)
            if aux is not None:
                aux_losses.append(aux)

        candidates: ActiveTokens | None = None
        with self._kv_share_sessions() as sessions:
            for r in range(rec.num_recursions):
                if isinstance(self.router, ExpertChoiceRouter):
                    decision = self.router.route(r, hidden, candidates, seq_length, routing_mode)
                    active, gate_k = decision.active, decision.gate
                    self.router_stats.add_all(decision.stats, recursion_idx=r)
                    if decision.aux_loss is not None:
                        aux_losses.append(decision.aux_loss)
                elif token_choice is not None:
                    _, depth, _ = token_choice
                    active = every_token if r == 0 else ActiveTokens.from_mask(depth >= r)
                    gate_k = None
                else:
                    active, gate_k = every_token, None
                self.router_stats.add("active_frac", active.count().float() / (seq_length * batch), r)
                if active.num_slots == 0:
                    break  # hierarchical: no token can come back at a later recursion
                hidden = self._run_recursion(r, hidden, active, gate_k, token_choice, attention_mask,
                                             rotary_pos_emb, sessions)
                candidates = active
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        return hidden, aux_loss

    def _run_recursion(self, recursion_idx: int, hidden: Tensor, active: ActiveTokens, gate: Tensor | None,
                       token_choice: tuple[Tensor, Tensor, Tensor] | None, attention_mask: Tensor | None,
                       rotary_pos_emb: Tensor | None, sessions: dict[int, KVShareSession] | None) -> Tensor:
        """One recursion on the active tokens only: gather, shared layers, gate/combine, scatter back."""
        is_full = active.valid is None and active.num_slots == active.seq_length
        x = hidden if is_full else active.gather(hidden)
        reuse_kv = sessions is not None and recursion_idx > 0
        if reuse_kv:
            q_rope = rotary_pos_emb if is_full or rotary_pos_emb is None else active.gather_rotary(rotary_pos_emb)
            kwargs = dict(attention_mask=active.cross_attention_mask(attention_mask),
                          rotary_pos_emb=None if rotary_pos_emb is None else (q_rope, rotary_pos_emb))
        elif is_full:
            kwargs = dict(attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        else:
            kwargs = dict(attention_mask=active.attention_mask(attention_mask),
                          rotary_pos_emb=None if rotary_pos_emb is None else active.gather_rotary(rotary_pos_emb))
        if sessions is not None:
            for session in sessions.values():
                session.mode = "reuse" if reuse_kv else "record"

        y = x
        for idx in self.layout.recursion_layers(recursion_idx):
            y, _ = self.layers[idx](hidden_states=y, **kwargs)

        if token_choice is not None:
            first_hidden, depth, token_gate = token_choice
            exits_here = (active.gather_rows(depth) == recursion_idx).t()[..., None]  # [k, b, 1]
            gate_k = active.gather_rows(token_gate).t()[..., None]
            start = first_hidden if is_full else active.gather(first_hidden)
            # Official-code semantics: an exiting token gets H^1 + g * f(H^r); others carry f(H^r) on.
            y = torch.where(exits_here, start + gate_k * y, y)
        elif gate is not None:
            y = x + gate[..., None] * y
        return y if is_full else active.scatter(hidden, y)

    @contextmanager
    def _kv_share_sessions(self) -> Iterator[dict[int, KVShareSession] | None]:
        """Attach KV-share sessions to the shared layers' attention for one forward (kv_mode `shared`)."""
        if self.recursion.kv_mode != "shared":
            yield None
            return
        shared = self.layout.recursion_layers(0)
        sessions = {idx: KVShareSession() for idx in shared}
        attentions = {idx: self.layers[idx].self_attention for idx in shared}
        for idx, attention in attentions.items():
            if not isinstance(attention, MoRSelfAttention):
                raise TypeError("kv_mode 'shared' needs MoRSelfAttention in the layer spec")
            attention.kv_share_session = sessions[idx]
        try:
            yield sessions
        finally:
            for attention in attentions.values():
                attention.kv_share_session = None
