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

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import WrappedTensor, get_pg_rank, get_pg_size, make_viewless_tensor

from mor_megatron.config import LayerLayout, RecursionConfig
from mor_megatron.model.recursion import ActiveTokens, expert_choice_update, token_choice_update
from mor_megatron.model.attention import KVShareSession, MoRSelfAttention
from mor_megatron.model.aux_loss import attach_aux_loss
from mor_megatron.model.pipeline_packing import PipelinePacking
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
                 recursion: RecursionConfig, pre_process: bool, post_process: bool, pg_collection):
        if len(spec.layer_specs) != layout.num_unique_layers:
            raise ValueError(f"MoRBlock needs {layout.num_unique_layers} layer specs, got {len(spec.layer_specs)}")
        # Read by _build_layers, which the parent constructor calls.
        self.layout = layout
        self.recursion = recursion
        super().__init__(config=config, spec=spec, pre_process=pre_process, post_process=post_process,
                         pg_collection=pg_collection)
        self.aux_loss_scale = 1.0
        """Backward scale of the router losses; the trainer sets 1 / num_microbatches."""
        self.packing: PipelinePacking | None = None
        """Stage-boundary layout; set by the builder when the model is pipeline-parallel."""
        self.router_stats = RouterStats()

    def _build_layers(self) -> None:
        """Build the unique layers this pipeline rank holds (all of them without pipeline parallelism)."""
        self.pp_rank = get_pg_rank(self.pg_collection.pp)
        self.pp_size = get_pg_size(self.pg_collection.pp)
        self.layer_ids = self.layout.stage_layers(self.pp_rank, self.pp_size)
        self._local_index = {global_idx: i for i, global_idx in enumerate(self.layer_ids)}
        self.layers = torch.nn.ModuleList([self._build_layer(idx) for idx in self.layer_ids])
        self.final_layernorm = (build_module(self.submodules.layer_norm, config=self.config,
                                             hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
                                if self.post_process and self.submodules.layer_norm else None)
        rec = self.recursion
        common = dict(hidden_size=self.config.hidden_size, alpha=rec.effective_alpha,
                      temperature=rec.router_temperature, aux_loss_coeff=rec.effective_aux_loss_coeff,
                      z_loss_coeff=rec.z_loss_coeff, init_std=self.config.init_method_std,
                      params_dtype=self.config.params_dtype)
        self.router: ExpertChoiceRouter | TokenChoiceRouter | None = None
        if self.pp_rank == 0 and rec.routing == "expert_choice":  # routing decisions happen on the first stage
            self.router = ExpertChoiceRouter(capacities=rec.effective_capacities, **common)
        elif self.pp_rank == 0 and rec.routing == "token_choice":
            self.router = TokenChoiceRouter(num_recursions=rec.num_recursions, balancing=rec.token_balancing,
                                            **common)

    def _build_layer(self, global_idx: int):
        layer = build_module(self.submodules.layer_specs[global_idx], config=self.config,
                             layer_number=global_idx + 1, pg_collection=self.pg_collection,
                             vp_stage=0 if self.config.virtual_pipeline_model_parallel_size else None)
        # TransformerLayer adds megatron's pipeline offset (computed for a plain stack of config.num_layers);
        # here the global number of a unique layer is its index in the layout, on whichever rank holds it.
        for module in layer.modules():
            if hasattr(module, "layer_number"):
                module.layer_number = global_idx + 1
        return layer

    def _layer(self, global_idx: int):
        return self.layers[self._local_index[global_idx]]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Checkpoint keys ``layers.<global unique index>.*`` (never stacked along depth).

        The parent stacks homogeneous layers into one ``[config.num_layers, ...]`` tensor; here
        ``config.num_layers`` is the unrolled depth while only the unique layers exist, and each pipeline rank
        holds a slice of them. Keying by the global unique index makes a checkpoint loadable at any PP/TP.
        """
        out = {}
        for local_idx, global_idx in enumerate(self.layer_ids):
            local_prefix = f"{prefix}layers.{local_idx}."
            layer_state = self.layers[local_idx].sharded_state_dict(local_prefix, (), metadata)
            replace_prefix_for_sharding(layer_state, local_prefix, f"{prefix}layers.{global_idx}.")
            out.update(layer_state)
        for name, module in self.named_children():
            if module is not self.layers:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
        return out

    # ----------------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor | WrappedTensor, attention_mask: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                rotary_pos_emb: Tensor | None = None, rotary_pos_cos: Tensor | None = None,
                rotary_pos_sin: Tensor | None = None, rotary_pos_cos_sin: Tensor | None = None,
                attention_bias: Tensor | None = None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, padding_mask: Tensor | None = None, *,
                routing_mode: RoutingMode = "topk", recursion_chunk: int | None = None,
                inference_params=None) -> Tensor:
        """Run the decoder on ``hidden_states`` ``[s, b, h]`` and return ``[s, b, h]``.

        Args:
            attention_mask: None for causal attention, or a ``[b, 1, s, s]`` bool mask (True = masked),
                e.g. for document masking; it is restricted to the active tokens at each recursion.
            rotary_pos_emb: RoPE frequencies ``[s, 1, 1, d]`` from GPTModel.
            routing_mode: `topk` (training routing) or `causal` (threshold routing, what serving runs).
            recursion_chunk: with pipeline parallelism, the recursion (virtual pipeline stage) to run on this
                rank's slice; the input and output are then packed stage tensors (:class:`PipelinePacking`).
        """
        if inference_context is not None or inference_params is not None or packed_seq_params is not None:
            raise NotImplementedError("MoRBlock runs full sequences; for KV-cached generation use "
                                      "mor_megatron.inference (recursion-wise KV cache)")
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        if self.pp_size > 1:
            if recursion_chunk is None:
                raise ValueError("with pipeline parallelism, MoRBlock runs one recursion chunk per call")
            first_chunk = self.pre_process and recursion_chunk == 0
            stage_input = hidden_states if first_chunk else self.input_tensor
            return self._forward_chunk(recursion_chunk, stage_input, attention_mask, rotary_pos_emb, routing_mode)
        if not self.pre_process:
            hidden_states = self.input_tensor
        hidden = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        full = dict(attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)

        for idx in range(self.layout.num_prefix):
            hidden, _ = self._layer(idx)(hidden_states=hidden, **full)

        hidden, aux_loss = self._run_recursions(hidden, attention_mask, rotary_pos_emb, routing_mode)

        first_suffix = self.layout.num_prefix + self.layout.num_shared
        for idx in range(first_suffix, first_suffix + self.layout.num_suffix):
            hidden, _ = self._layer(idx)(hidden_states=hidden, **full)

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
            # Queries are spread to full length around the core attention, so the caller's mask applies as is.
            kwargs = dict(attention_mask=attention_mask,
                          rotary_pos_emb=None if rotary_pos_emb is None else (q_rope, rotary_pos_emb))
        elif is_full:
            kwargs = dict(attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        else:
            kwargs = dict(attention_mask=active.attention_mask(attention_mask),
                          rotary_pos_emb=None if rotary_pos_emb is None else active.gather_rotary(rotary_pos_emb))
        if sessions is not None:
            for session in sessions.values():
                session.mode = "reuse" if reuse_kv else "record"
                session.queries = active if reuse_kv and not is_full else None

        y = x
        for idx in self.layout.recursion_layers(recursion_idx):
            y, _ = self._layer(idx)(hidden_states=y, **kwargs)

        if token_choice is not None:
            first_hidden, depth, token_gate = token_choice
            y = token_choice_update(y, exits=(active.gather_rows(depth) == recursion_idx).t(),
                                    first_hidden=first_hidden if is_full else active.gather(first_hidden),
                                    gate=active.gather_rows(token_gate).t())
        elif gate is not None:
            y = expert_choice_update(x, gate, y)
        return y if is_full else active.scatter(hidden, y)

    # ---------------------------------------------------------------------------------------- pipeline chunks
    def _forward_chunk(self, recursion_idx: int, stage_input: Tensor, attention_mask: Tensor | None,
                       rotary_pos_emb: Tensor | None, routing_mode: RoutingMode) -> Tensor:
        """Recursion ``recursion_idx`` on this pipeline rank's slice of the shared block.

        The first rank decides the recursion's tokens (and, in chunk 0, runs the prefix layers and token-choice
        depth assignment); every rank runs its slice on the active tokens; the last rank gates and combines, and
        in the last chunk runs the suffix and final norm. Between ranks the state travels packed
        (:class:`~mor_megatron.model.pipeline_packing.PipelinePacking`). The arithmetic is that of
        :meth:`_run_recursion`, so pipeline and non-pipeline runs agree to rounding.
        """
        if self.packing is None:
            raise RuntimeError("MoRBlock.packing is not set; build the model with pipeline_seq_length")
        routing, r = self.recursion.routing, recursion_idx
        aux_losses: list[Tensor] = []
        if self.pre_process and r == 0:
            state = self._start_stream(stage_input, attention_mask, rotary_pos_emb, aux_losses)
        else:
            state = self.packing.unpack(stage_input)
        if self.pp_rank == 0:
            self._begin_recursion(r, state, routing_mode, aux_losses)

        slice_layers = [idx for idx in self.layout.recursion_layers(r) if idx in self._local_index]
        if routing == "none":
            hidden = state["hidden"]
            for idx in slice_layers:
                hidden, _ = self._layer(idx)(hidden_states=hidden, attention_mask=attention_mask,
                                             rotary_pos_emb=rotary_pos_emb)
            state["hidden"] = hidden
        else:
            active = ActiveTokens.from_mask(state["mask"] > 0.5)
            x = active.gather(state["work"])
            kwargs = dict(attention_mask=active.attention_mask(attention_mask),
                          rotary_pos_emb=None if rotary_pos_emb is None else active.gather_rotary(rotary_pos_emb))
            for idx in slice_layers:
                x, _ = self._layer(idx)(hidden_states=x, **kwargs)
            state["work"] = active.scatter(state["work"], x)
            if self.pp_rank == self.pp_size - 1:
                self._end_recursion(r, state, active)

        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        if self.post_process and r == self.recursion.num_recursions - 1:
            hidden = state["hidden"]
            first_suffix = self.layout.num_prefix + self.layout.num_shared
            for idx in range(first_suffix, first_suffix + self.layout.num_suffix):
                hidden, _ = self._layer(idx)(hidden_states=hidden, attention_mask=attention_mask,
                                             rotary_pos_emb=rotary_pos_emb)
            hidden = attach_aux_loss(hidden, aux_loss, self.aux_loss_scale)
            hidden = self.final_layernorm(hidden) if self.final_layernorm is not None else hidden
            return make_viewless_tensor(inp=hidden, requires_grad=True, keep_graph=True)
        packed = attach_aux_loss(self.packing.pack(state), aux_loss, self.aux_loss_scale)
        return make_viewless_tensor(inp=packed, requires_grad=True, keep_graph=True)

    def _start_stream(self, embedded: Tensor, attention_mask: Tensor | None, rotary_pos_emb: Tensor | None,
                      aux_losses: list[Tensor]) -> dict[str, Tensor]:
        """Chunk 0 on the first rank: prefix layers, then the initial routing state."""
        hidden = make_viewless_tensor(inp=embedded, requires_grad=True, keep_graph=True)
        for idx in range(self.layout.num_prefix):
            hidden, _ = self._layer(idx)(hidden_states=hidden, attention_mask=attention_mask,
                                         rotary_pos_emb=rotary_pos_emb)
        state = {"hidden": hidden}
        if self.recursion.routing == "none":
            return state
        batch, seq_length = hidden.shape[1], hidden.shape[0]
        state.update(work=hidden, mask=hidden.new_ones(batch, seq_length), gate=hidden.new_zeros(batch, seq_length))
        if isinstance(self.router, TokenChoiceRouter):
            depth, gate, aux, stats = self.router.assign(hidden)
            state.update(first=hidden, depth=depth.to(hidden.dtype), gate=gate)
            self.router_stats.add_all(stats)
            if aux is not None:
                aux_losses.append(aux)
        return state

    def _begin_recursion(self, r: int, state: dict[str, Tensor], routing_mode: RoutingMode,
                         aux_losses: list[Tensor]) -> None:
        """First rank: choose the tokens of recursion ``r`` (mask, gates) and reset the work stream."""
        hidden = state["hidden"]
        seq_length, batch = hidden.shape[0], hidden.shape[1]
        if isinstance(self.router, ExpertChoiceRouter):
            candidates = None if r == 0 else ActiveTokens.from_mask(state["mask"] > 0.5)
            decision = self.router.route(r, hidden, candidates, seq_length, routing_mode)
            state["gate"] = decision.active.scatter_rows(hidden.new_zeros(batch, seq_length), decision.gate.t())
            state["mask"] = decision.active.mask().to(hidden.dtype)
            self.router_stats.add_all(decision.stats, recursion_idx=r)
            if decision.aux_loss is not None:
                aux_losses.append(decision.aux_loss)
        elif isinstance(self.router, TokenChoiceRouter):
            state["mask"] = (state["depth"] >= r).to(hidden.dtype)
        if "mask" in state:
            state["work"] = hidden
            self.router_stats.add("active_frac", state["mask"].sum() / (seq_length * batch), r)
        else:
            self.router_stats.add("active_frac", hidden.new_ones(()), r)

    def _end_recursion(self, r: int, state: dict[str, Tensor], active: ActiveTokens) -> None:
        """Last rank: gate the block output of the active tokens and write them into the residual stream."""
        y = active.gather(state["work"])
        gate = active.gather_rows(state["gate"]).t()
        if self.recursion.routing == "token_choice":
            new = token_choice_update(y, exits=(active.gather_rows(state["depth"]) == r).t(),
                                      first_hidden=active.gather(state["first"]), gate=gate)
        else:
            new = expert_choice_update(active.gather(state["hidden"]), gate, y)
        state["hidden"] = active.scatter(state["hidden"], new)

    @contextmanager
    def _kv_share_sessions(self) -> Iterator[dict[int, KVShareSession] | None]:
        """Attach KV-share sessions to the shared layers' attention for one forward (kv_mode `shared`)."""
        if self.recursion.kv_mode != "shared":
            yield None
            return
        shared = self.layout.recursion_layers(0)
        sessions = {idx: KVShareSession() for idx in shared}
        attentions = {idx: self._layer(idx).self_attention for idx in shared}
        for idx, attention in attentions.items():
            if not isinstance(attention, MoRSelfAttention):
                raise TypeError("kv_mode 'shared' needs MoRSelfAttention in the layer spec")
            attention.kv_share_session = sessions[idx]
        try:
            yield sessions
        finally:
            for attention in attentions.values():
                attention.kv_share_session = None
