"""The recursion block: unique prefix layers, a shared block applied R times with routing, unique suffix layers.

``MoRBlock`` is a megatron-core ``TransformerBlock`` whose ``layers`` hold each *unique* layer once (a shared
layer is one module applied R times, never R modules with tied tensors). The execution plan comes from
:class:`mor_megatron.config.LayerLayout`. For R = 1 and routing `none` the block is exactly megatron's
``TransformerBlock`` (same modules, same state-dict keys ``layers.<i>.*``), which is what makes the vanilla
baseline come out of the same code.

The forward is one loop over recursions on a typed :class:`RecursionState`; a pipeline layout runs one
recursion (a virtual stage) per call on its slice of the shared block, with the state packed only at the
stage boundaries. The recursion rules themselves (selection, gates, combine, compaction) are
:mod:`mor_megatron.model.recursion`, shared with the Hugging Face export and the serving engine.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import WrappedTensor, get_pg_rank, get_pg_size, make_viewless_tensor

from mor_megatron.config import LayerLayout, RecursionConfig
from mor_megatron.model.attention import MoRSelfAttention
from mor_megatron.model.aux_loss import attach_aux_loss
from mor_megatron.model.kv_share import KVShareSession, SharedKV
from mor_megatron.model.recursion import ActiveTokens, expert_choice_update, token_choice_update
from mor_megatron.model.recursion_state import PipelinePacking, RecursionState, pad_rows, padded_length
from mor_megatron.model.router_stats import RouterStats
from mor_megatron.model.routing import ExpertChoiceRouter, RoutingMode, TokenChoiceRouter
from mor_megatron.model.sequence_parallel import gather_sequence, pad_attention_mask, split_sequence


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
        self.shared_kv = (SharedKV(recursion.num_recursions - 1, detach=self.pp_size > 1)
                          if recursion.kv_mode == "shared" else None)
        """First-recursion K/V between the recursions of a micro-batch (kv_mode `shared`)."""
        self._active_masks: list[Tensor] | None = None
        """While :meth:`recording_active_masks` is open: each recursion's ``[b, s]`` active-token mask."""
        self.recompute_recursions: frozenset[int] | None = None
        """0-based recursions of the shared block that recompute (``config.recompute_granularity``); None: all.
        Set by the builder."""
        self.gathers_sequence = config.sequence_parallel and recursion.routing != "none"
        """Sequence parallelism with routing: the recursion loop runs on whole sequences (sequence_parallel.py)."""

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

    def _run_layer(self, global_idx: int, hidden: Tensor, recursion_idx: int | None, *,
                   attention_mask: Tensor | None, rotary_pos_emb) -> Tensor:
        """One layer's output, recomputed in backward as ``config.recompute_granularity`` says for this call:
        unique layers (``recursion_idx`` None) always, shared ones in ``recompute_recursions``."""
        layer = self._layer(global_idx)
        granularity = self.config.recompute_granularity
        recomputes = granularity is not None and (recursion_idx is None or self.recompute_recursions is None
                                                  or recursion_idx in self.recompute_recursions)
        if granularity == "selective":  # megatron reads the flag at each forward
            layer.self_attention.checkpoint_core_attention = recomputes
        elif recomputes and self.training and torch.is_grad_enabled():
            def run(hidden: Tensor, attention_mask: Tensor | None, rotary_pos_emb) -> Tensor:
                return layer(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)[0]

            return tensor_parallel.checkpoint(run, False, hidden, attention_mask, rotary_pos_emb)
        return layer(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)[0]

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
                position_ids: Tensor | None = None, inference_params=None) -> Tensor:
        """Run the decoder on ``hidden_states`` ``[s, b, h]`` and return ``[s, b, h]``.

        The forward is the loop over recursions; without pipeline parallelism it runs every recursion in one
        call, with it one recursion (a virtual pipeline stage) on this rank's slice of the shared block, the
        loop state entering and leaving packed (:class:`PipelinePacking`). The first rank decides each
        recursion's tokens (and runs the prefix layers and token-choice depth assignment), every rank runs its
        slice on the active tokens, the last rank gates and combines and, after the last recursion, runs the
        suffix layers and the final norm.

        Args:
            attention_mask: None for causal attention, or a ``[b, 1, s, s]`` bool mask (True = masked),
                e.g. for document masking; it is restricted to the active tokens at each recursion.
            rotary_pos_emb: RoPE frequencies ``[s, 1, 1, d]`` from GPTModel.
            position_ids: ``[b, s]`` positions to rotate at instead of ``0..s-1`` (packed documents that
                restart at 0, ``data.reset_position_ids``); megatron's GPTModel does not apply them to RoPE.
            routing_mode: `topk` (training routing) or `causal` (threshold routing, what serving runs).
            recursion_chunk: with pipeline parallelism, the recursion to run on this rank's slice.
        """
        if inference_context is not None or inference_params is not None or packed_seq_params is not None:
            raise NotImplementedError("MoRBlock runs full sequences; for KV-cached generation use "
                                      "mor_megatron.inference (recursion-wise KV cache)")
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        if position_ids is not None and rotary_pos_emb is not None:
            rotary_pos_emb = rotary_pos_emb[position_ids.t()].squeeze(2)  # [s, b, 1, d]
        if self.pp_size > 1:
            if recursion_chunk is None:
                raise ValueError("with pipeline parallelism, MoRBlock runs one recursion chunk per call")
            if self.packing is None:
                raise RuntimeError("MoRBlock.packing is not set; build the model with pipeline_seq_length")
            chunks = [recursion_chunk]
        else:
            chunks = list(range(self.recursion.num_recursions))
            if self.shared_kv is not None:
                self.shared_kv.clear()

        aux_losses: list[Tensor] = []
        if self.pre_process and chunks[0] == 0:
            state = self._start(hidden_states, attention_mask, rotary_pos_emb, aux_losses)
        else:
            received = self.input_tensor
            state = self.packing.unpack(gather_sequence(received, self.tp_group) if self.gathers_sequence
                                        else received)
        recording = None
        with self._kv_share_sessions() as sessions:
            for r in chunks:
                if self.pp_rank == 0:
                    self._choose_tokens(r, state, routing_mode, aux_losses)
                recording = self._apply_shared(r, state, attention_mask, rotary_pos_emb, sessions) or recording
                if self.pp_rank == self.pp_size - 1:
                    self._combine(r, state)

        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        if self.post_process and chunks[-1] == self.recursion.num_recursions - 1:
            hidden = split_sequence(state.hidden, self.tp_group) if self.gathers_sequence else state.hidden
            first_suffix = self.layout.num_prefix + self.layout.num_shared
            for idx in range(first_suffix, first_suffix + self.layout.num_suffix):
                hidden = self._run_layer(idx, hidden, None, attention_mask=attention_mask,
                                         rotary_pos_emb=rotary_pos_emb)
            output = attach_aux_loss(hidden, aux_loss, self.aux_loss_scale)
            if self.final_layernorm is not None:
                output = self.final_layernorm(output)
        else:
            packed = self.packing.pack(state)
            packed = split_sequence(packed, self.tp_group) if self.gathers_sequence else packed
            output = attach_aux_loss(packed, aux_loss, self.aux_loss_scale)
            if recording is not None:
                output = SharedKV.return_grads(output, recording)
        return make_viewless_tensor(inp=output, requires_grad=True, keep_graph=True)

    def _start(self, embedded: Tensor, attention_mask: Tensor | None, rotary_pos_emb: Tensor | None,
               aux_losses: list[Tensor]) -> RecursionState:
        """Prefix layers, then token-choice depth assignment: the state the first recursion starts from."""
        hidden = make_viewless_tensor(inp=embedded, requires_grad=True, keep_graph=True)
        for idx in range(self.layout.num_prefix):
            hidden = self._run_layer(idx, hidden, None, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        if self.gathers_sequence:
            hidden = gather_sequence(hidden, self.tp_group)
        state = RecursionState(hidden=hidden)
        if isinstance(self.router, TokenChoiceRouter):
            state.depth, state.token_gate, aux, stats = self.router.assign(hidden)
            state.first = hidden
            self.router_stats.add_all(stats)
            if aux is not None:
                aux_losses.append(aux)
        return state

    def _choose_tokens(self, r: int, state: RecursionState, routing_mode: RoutingMode,
                       aux_losses: list[Tensor]) -> None:
        """First rank: the tokens (and gates) of recursion ``r``, and their block input."""
        hidden = state.hidden
        seq_length, batch = hidden.shape[0], hidden.shape[1]
        if isinstance(self.router, ExpertChoiceRouter):
            # Hierarchical: only the tokens of recursion r - 1 are candidates at r.
            decision = self.router.route(r, hidden, state.active if r > 0 else None, seq_length, routing_mode)
            state.active, state.gate = decision.active, decision.gate
            self.router_stats.add_all(decision.stats, recursion_idx=r)
            if decision.aux_loss is not None:
                aux_losses.append(decision.aux_loss)
        elif state.depth is not None:
            state.active = ActiveTokens.from_mask(state.depth >= r)
        if self._active_masks is not None:
            self._active_masks.append(hidden.new_ones(batch, seq_length, dtype=torch.bool) if state.active is None
                                      else state.active.mask())
        if state.active is None:
            self.router_stats.add("active_frac", hidden.new_ones(()), r)
            return
        self.router_stats.add("active_frac", state.active.count().float() / (seq_length * batch), r)
        state.work = state.gather(hidden)

    def _apply_shared(self, r: int, state: RecursionState, attention_mask: Tensor | None,
                      rotary_pos_emb: Tensor | None, sessions: dict[int, KVShareSession] | None):
        """This rank's layers of recursion ``r`` on the active tokens (``state.work``).

        Returns the KV-share recording made here (first recursion under KV sharing), else None.
        """
        full = state.every_token_active
        reuse_kv = sessions is not None and r > 0
        if reuse_kv:
            self.shared_kv.read(r, sessions)
            # Queries are spread to full length around the core attention, so the caller's mask applies as is.
            q_rope = rotary_pos_emb if full or rotary_pos_emb is None else state.active.gather_rotary(rotary_pos_emb)
            kwargs = dict(attention_mask=attention_mask,
                          rotary_pos_emb=None if rotary_pos_emb is None else (q_rope, rotary_pos_emb))
        elif full:
            kwargs = dict(attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        else:
            kwargs = dict(attention_mask=state.active.attention_mask(attention_mask),
                          rotary_pos_emb=None if rotary_pos_emb is None else state.active.gather_rotary(rotary_pos_emb))
        for session in (sessions or {}).values():
            session.mode = "reuse" if reuse_kv else "record"
            session.queries = state.active if reuse_kv and not full else None

        x = state.hidden if state.active is None else state.work
        if self.gathers_sequence:
            x, kwargs = self._split_compacted(x, kwargs)
        for idx in self.layout.recursion_layers(r):
            if idx in self._local_index:
                x = self._run_layer(idx, x, r, **kwargs)
        if state.active is None:
            state.hidden = x  # plain recursion: the block output is the stream
        else:
            state.work = gather_sequence(x, self.tp_group)[: state.work.shape[0]] if self.gathers_sequence else x
        return self.shared_kv.record(sessions) if sessions is not None and r == 0 else None

    def _split_compacted(self, work: Tensor, kwargs: dict) -> tuple[Tensor, dict]:
        """Sequence parallelism: this rank's slice of the compacted tokens (padded to a multiple of tp), with
        the per-token RoPE frequencies and mask padded alike."""
        rows = padded_length(work.shape[0], self.tp_group.size())
        rope, mask = kwargs["rotary_pos_emb"], kwargs["attention_mask"]
        if isinstance(rope, tuple):  # KV reuse: (the queries' frequencies, the whole sequence's)
            rope = (pad_rows(rope[0], rows), rope[1])
        elif rope is not None:
            rope = pad_rows(rope, rows)
        # Under KV reuse the queries are spread to full length, so the caller's [b, 1, s, s] mask stays.
        if mask is not None and mask.shape[-1] == work.shape[0]:
            mask = pad_attention_mask(mask, rows)
        return split_sequence(pad_rows(work, rows), self.tp_group), dict(rotary_pos_emb=rope, attention_mask=mask)

    def _combine(self, r: int, state: RecursionState) -> None:
        """Last rank: gate the active tokens' block output and write it into the residual stream."""
        if state.active is None:
            return
        if state.depth is not None:
            new = token_choice_update(state.work, exits=(state.active.gather_rows(state.depth) == r).t(),
                                      first_hidden=state.gather(state.first),
                                      gate=state.active.gather_rows(state.token_gate).t())
        else:
            new = expert_choice_update(state.gather(state.hidden), state.gate, state.work)
        state.hidden = state.scatter(state.hidden, new)

    @contextmanager
    def recording_active_masks(self) -> Iterator[list[Tensor]]:
        """Collect, for the forwards run inside, each recursion's ``[b, s]`` bool mask of the tokens that ran it.

        The masks are the routing's own decisions (``state.active``), so a depth map reads what the model did
        rather than re-deriving it. They are taken on the first pipeline stage, where the routing happens.
        """
        if self.pp_rank != 0:
            raise RuntimeError("recursion masks are recorded on the first pipeline stage, where routing runs")
        masks: list[Tensor] = []
        self._active_masks = masks
        try:
            yield masks
        finally:
            self._active_masks = None

    @contextmanager
    def _kv_share_sessions(self) -> Iterator[dict[int, KVShareSession] | None]:
        """Attach KV-share sessions to this rank's shared attention modules for one call (kv_mode `shared`)."""
        if self.shared_kv is None:
            yield None
            return
        attentions = {idx: self._layer(idx).self_attention
                      for idx in self.layout.recursion_layers(0) if idx in self._local_index}
        sessions = {idx: KVShareSession() for idx in attentions}
        for idx, attention in attentions.items():
            if not isinstance(attention, MoRSelfAttention):
                raise TypeError("kv_mode 'shared' needs MoRSelfAttention in the layer spec")
            attention.kv_share_session = sessions[idx]
        try:
            yield sessions
        finally:
            for attention in attentions.values():
                attention.kv_share_session = None
