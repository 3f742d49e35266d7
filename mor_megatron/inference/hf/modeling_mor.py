"""Hugging Face modeling code of an exported Mixture-of-Recursions (MoR) model, recursion-wise KV caching.

Copied into every exported MoR folder, beside ``recursion.py`` (``mor_megatron.model.recursion``: the routing,
combine and compaction rules training uses), and loaded with ``trust_remote_code=True``; it imports only torch,
transformers and those two files. It computes exactly what ``mor_megatron.model.MoRGPTModel`` computes with
``routing_mode="causal"`` (and, for a prefill, with ``routing_mode="topk"``):

* Llama layers (RMSNorm, SwiGLU, RoPE, grouped-query attention); a shared layer is one module applied R times.
* Expert-choice routing: recursion r has its own router row; the candidates are the tokens selected at r - 1
  (every real token at r = 0); a recursion with capacity >= 1.0 keeps every candidate, otherwise a candidate
  continues iff its router logit ``z >= 0`` (sigmoid(z) >= 0.5). Kept tokens get ``h <- h + g * f(h)``,
  ``g = alpha * sigmoid(z)``, where ``f`` is the shared block (its layers include their own residuals).
* Token-choice routing: one router reads the hidden state after the prefix layers; a token's depth is the
  argmax of ``softmax(z)`` (plus the loss-free ``depth_bias`` when trained that way); a token exiting at
  recursion r gets ``H1 + g * f(H^r)``, the others carry ``f(H^r)`` on (official-code semantics).
* Routing `none`: every token runs every recursion.

KV cache (:class:`MoRCache`): one slot per unrolled layer position. Only the tokens that take part in a
layer application are stored in its slot, so at depth r a token attends causally to the tokens that reached
depth r (recursion-wise caching). With ``kv_mode="shared"`` the K/V recorded at the first recursion are reused
by the same layer at every later recursion, whose queries are the active tokens only. Padding tokens
(``attention_mask == 0``) are never stored. The full-sequence forward runs the same code with a throw-away
cache, so a cached generation and a recomputation make identical routing decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mor import MoRConfig

try:  # an exported folder carries recursion.py beside this file
    from .recursion import (ActiveTokens, apply_rotary, expert_choice_update, expert_gate, rotary_cos_sin,
                            threshold_decision, token_choice_depth, token_choice_update, top_k_counts,
                            top_k_decision)
except ImportError:  # inside the mor_megatron package
    from mor_megatron.model.recursion import (ActiveTokens, apply_rotary, expert_choice_update, expert_gate,
                                              rotary_cos_sin, threshold_decision, token_choice_depth,
                                              token_choice_update, top_k_counts, top_k_decision)

RoutingMode = Literal["causal", "topk"]

CACHE_FIELD: str = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""Name of the KV cache in forward arguments and model outputs: transformers 5.24 renamed ``past_key_values``
to ``cache``, and ``generate()`` passes and reads it under the installed release's name."""


def output_cache(output: CausalLMOutputWithPast) -> Cache | None:
    """The KV cache a causal-LM forward returned (this model's or a stock one's), under either release's name."""
    return output.get(CACHE_FIELD)


def _given_cache(cache: MoRCache | None, past_key_values: MoRCache | None) -> MoRCache | None:
    """The cache a caller passed as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# ------------------------------------------------------------------------------------------------------------
# The recursion-wise KV cache
# ------------------------------------------------------------------------------------------------------------

class KVSlot:
    """Keys and values of one unrolled layer position, stored per batch row without padding.

    ``keys[i]`` / ``values[i]``: ``[num_key_value_heads, n_i, head_dim]`` (keys after RoPE) for the ``n_i``
    tokens of row ``i`` that took part in this layer application so far, in order.
    """

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def lengths(self, batch_size: int, device: torch.device) -> Tensor:
        """``[b]`` stored tokens per row (zeros before the first append)."""
        if not self.keys:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        return torch.tensor([k.shape[1] for k in self.keys], dtype=torch.long, device=device)

    def append(self, keys: Tensor, values: Tensor, counts: Tensor) -> None:
        """Append the first ``counts[i]`` of ``keys``/``values`` ``[b, kv_heads, k, head_dim]`` to row i."""
        if not self.keys:
            rows = range(keys.shape[0])
            self.keys = [keys.new_empty(keys.shape[1], 0, keys.shape[3]) for _ in rows]
            self.values = [values.new_empty(values.shape[1], 0, values.shape[3]) for _ in rows]
        for row, count in enumerate(counts.tolist()):
            if count:
                self.keys[row] = torch.cat([self.keys[row], keys[row, :, :count]], dim=1)
                self.values[row] = torch.cat([self.values[row], values[row, :, :count]], dim=1)

    def padded(self) -> tuple[Tensor, Tensor]:
        """Keys and values zero-padded to the longest row: ``[b, kv_heads, L, head_dim]`` each."""
        longest = max(k.shape[1] for k in self.keys)
        keys = torch.stack([F.pad(k, (0, 0, 0, longest - k.shape[1])) for k in self.keys])
        values = torch.stack([F.pad(v, (0, 0, 0, longest - v.shape[1])) for v in self.values])
        return keys, values

    def nbytes(self) -> int:
        """Bytes held by the stored key and value tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def select_rows(self, rows: list[int]) -> None:
        """Keep (and reorder or repeat) batch rows: row ``i`` becomes old row ``rows[i]``."""
        self.keys = [self.keys[r] for r in rows] if self.keys else []
        self.values = [self.values[r] for r in rows] if self.values else []


class MoRCache(Cache):
    """Recursion-wise KV cache of a MoR model: one :class:`KVSlot` per unrolled layer position.

    Slot ids are unrolled positions: prefix layer ``i`` -> ``i``; layer ``j`` of the shared block at 0-based
    recursion ``r`` -> ``num_prefix_layers + r * num_shared_layers + j``; suffix layer ``i`` ->
    ``num_prefix_layers + num_recursions * num_shared_layers + i``. Under KV sharing only recursion 0's slots
    of the shared block are filled. ``get_seq_length`` counts input positions seen (padding included), which
    is what ``generate`` uses to slice new tokens.
    """

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.slots: dict[int, KVSlot] = {}
        self.seen_tokens = 0

    @property
    def is_compileable(self) -> bool:
        """Ragged per-row storage cannot be captured by torch.compile."""
        return False

    @property
    def is_croppable(self) -> bool:
        """Which tokens of a step were stored in which slot is not tracked, so the cache cannot be cropped."""
        return False

    def slot(self, slot_id: int) -> KVSlot:
        """The slot of unrolled layer position ``slot_id`` (created empty on first use)."""
        return self.slots.setdefault(slot_id, KVSlot())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input positions processed so far (padding included)."""
        return self.seen_tokens

    def nbytes(self, slot_ids: list[int] | None = None) -> int:
        """Bytes of the stored K/V tensors, over all slots or over ``slot_ids``."""
        ids = self.slots if slot_ids is None else [s for s in slot_ids if s in self.slots]
        return sum(self.slots[s].nbytes() for s in ids)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place."""
        for slot in self.slots.values():
            slot.select_rows([r for r in range(len(slot.keys)) for _ in range(repeats)])

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the batch rows ``indices``, in that order (beam search reorders rows with it too)."""
        for slot in self.slots.values():
            slot.select_rows(indices.tolist())

    reorder_cache = batch_select_indices


# ------------------------------------------------------------------------------------------------------------
# Llama layers
# ------------------------------------------------------------------------------------------------------------

class MoRRMSNorm(nn.Module):
    """RMSNorm with a learned scale (Llama's, computed in fp32)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden: Tensor) -> Tensor:
        """``[..., h]`` -> ``[..., h]``."""
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden.to(dtype)


class MoRAttention(nn.Module):
    """Grouped-query self-attention over the K/V stored in one cache slot."""

    def __init__(self, config: MoRConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, slot: KVSlot, key_limit: Tensor,
                append_counts: Tensor | None) -> Tensor:
        """Attend from ``x`` ``[b, k, h]`` to the keys of ``slot``.

        Args:
            cos, sin: RoPE tables ``[b, k, head_dim]`` at the tokens' positions.
            key_limit: ``[b, k]`` index of the last stored key each query may see (causal limit).
            append_counts: ``[b]``: store this many of the new K/V per row before attending; None reuses the
                slot as it is (KV sharing: only queries are computed).
        """
        batch, k, _ = x.shape
        query = self.q_proj(x).view(batch, k, self.num_heads, self.head_dim).transpose(1, 2)
        query = apply_rotary(query, cos, sin)
        if append_counts is not None:
            key = self.k_proj(x).view(batch, k, self.num_kv_heads, self.head_dim).transpose(1, 2)
            value = self.v_proj(x).view(batch, k, self.num_kv_heads, self.head_dim).transpose(1, 2)
            slot.append(apply_rotary(key, cos, sin), value, append_counts)
        keys, values = slot.padded()
        repeat = self.num_heads // self.num_kv_heads
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
        visible = torch.arange(keys.shape[2], device=x.device)[None, None, :] <= key_limit[:, :, None]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(batch, k, self.num_heads * self.head_dim))


class MoRMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: MoRConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., h]`` -> ``[..., h]``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoRDecoderLayer(nn.Module):
    """Pre-norm Llama layer; its output includes both residual connections."""

    def __init__(self, config: MoRConfig):
        super().__init__()
        self.input_layernorm = MoRRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MoRAttention(config)
        self.post_attention_layernorm = MoRRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoRMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, slot: KVSlot, key_limit: Tensor,
                append_counts: Tensor | None) -> Tensor:
        """``[b, k, h]`` -> ``[b, k, h]`` (see :meth:`MoRAttention.forward` for the other arguments)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slot, key_limit, append_counts)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoRRouter(nn.Module):
    """Router weights ``[R, h]``: a row per recursion (expert-choice) or an output per depth (token-choice).

    Token-choice models trained with loss-free balancing also carry ``depth_bias`` ``[R]``, added to the
    probabilities for the depth choice only.
    """

    def __init__(self, config: MoRConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_recursions, config.hidden_size))
        if config.routing == "token_choice":
            self.register_buffer("depth_bias", torch.zeros(config.num_recursions, dtype=torch.float32))
        self.temperature = config.router_temperature

    def logits(self, hidden: Tensor, recursion_idx: int | None = None) -> Tensor:
        """fp32 logits: ``[b, s]`` for one recursion's row, or ``[b, s, R]`` for all rows."""
        weight = self.weight if recursion_idx is None else self.weight[recursion_idx:recursion_idx + 1]
        # fp32 products, as in training (mor_megatron.model.routing): bf16 logits tie and flip routing decisions.
        logits = F.linear(hidden.float() / self.temperature, weight.float())
        return logits if recursion_idx is None else logits.squeeze(-1)


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------

@dataclass
class MoRModelOutput(CausalLMOutputWithPast):
    """Causal-LM output plus, when asked for, which tokens took part in each recursion.

    Attributes:
        last_hidden_state: ``[b, s, h]`` after the final norm (base model only).
        recursion_masks: one ``[b, s]`` bool tensor per recursion (True = the token ran that recursion).
    """

    last_hidden_state: Tensor | None = None
    recursion_masks: tuple[Tensor, ...] | None = None


@dataclass
class _Chunk:
    """What every layer application of one forward needs to know about the input chunk."""

    cache: MoRCache
    positions: Tensor
    """``[b, s]`` RoPE positions of the chunk's tokens."""
    real: Tensor
    """``[b, s]`` bool: not padding."""
    real_rank: Tensor
    """``[b, s]`` rank of each token among the chunk's real tokens of its row (KV-sharing causal limits)."""


class MoRPreTrainedModel(PreTrainedModel):
    """Weight initialisation and Hugging Face plumbing shared by the MoR model classes."""

    config_class = MoRConfig
    config: MoRConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoRDecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        """Llama defaults, plus normal(0, initializer_range) router rows and a zero depth bias."""
        super()._init_weights(module)
        if isinstance(module, MoRRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if hasattr(module, "depth_bias"):
                init.zeros_(module.depth_bias)


class MoRModel(MoRPreTrainedModel):
    """Embedding, unique layers (prefix, shared block, suffix), router and final norm."""

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MoRDecoderLayer(config) for _ in range(config.num_unique_layers)])
        self.router = MoRRouter(config) if config.routing != "none" else None
        self.norm = MoRRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: MoRCache | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                routing_mode: RoutingMode = "causal", past_key_values: MoRCache | None = None,
                **kwargs) -> MoRModelOutput:
        """Run the new tokens ``input_ids`` ``[b, s]`` against the cache.

        Args:
            attention_mask: ``[b, past + s]`` (1 = real token, 0 = padding) or None (all real).
            position_ids: ``[b, s]`` RoPE positions; default from the mask (left padding) or the cache length.
            cache: a :class:`MoRCache` to extend; None starts one (kept only if ``use_cache``). Also accepted as
                ``past_key_values``, its name before transformers 5.24.
            routing_mode: `causal` (threshold routing, what serving runs) or `topk` (training routing with the
                configured capacities; only for a prefill into an empty cache, since top-k sees the future).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = _given_cache(cache, past_key_values)
        if cache is not None and not isinstance(cache, MoRCache):
            raise TypeError(f"MoR models need a MoRCache, got {type(cache).__name__}; pass no cache to start one")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq_length = hidden.shape[:2]
        cache = cache if cache is not None else MoRCache()
        if routing_mode not in ("causal", "topk"):
            raise ValueError(f"routing_mode={routing_mode!r} is not one of ['causal', 'topk']")
        if routing_mode == "topk" and cache.seen_tokens:
            raise ValueError("routing_mode='topk' needs the whole sequence: use it only for a prefill into "
                             "an empty cache")
        chunk = self._chunk(cache, attention_mask, position_ids, batch, seq_length, hidden.device)
        hidden = self._run_unique(range(self.config.num_prefix_layers), 0, hidden, chunk)
        hidden, masks = self._run_recursions(hidden, chunk, routing_mode)
        cfg = self.config
        first_suffix = cfg.num_prefix_layers + cfg.num_shared_layers
        suffix_slot = cfg.num_prefix_layers + cfg.num_recursions * cfg.num_shared_layers
        suffix = range(first_suffix, first_suffix + cfg.num_suffix_layers)
        hidden = self._run_unique(suffix, suffix_slot, hidden, chunk)
        cache.seen_tokens += seq_length
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return MoRModelOutput(last_hidden_state=self.norm(hidden), recursion_masks=tuple(masks),
                              **{CACHE_FIELD: cache if use_cache else None})

    @staticmethod
    def _chunk(cache: MoRCache, attention_mask: Tensor | None, position_ids: Tensor | None, batch: int,
               seq_length: int, device: torch.device) -> _Chunk:
        if attention_mask is not None:
            real = attention_mask[:, -seq_length:].bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_length:]
        else:
            real = torch.ones(batch, seq_length, dtype=torch.bool, device=device)
            if position_ids is None:
                start = cache.seen_tokens
                position_ids = torch.arange(start, start + seq_length, device=device)[None].expand(batch, -1)
        return _Chunk(cache=cache, positions=position_ids.expand(batch, -1), real=real,
                      real_rank=real.long().cumsum(dim=1) - 1)

    def _run_unique(self, layer_ids: range, first_slot: int, hidden: Tensor, chunk: _Chunk) -> Tensor:
        """Run prefix or suffix layers on every real token; ``[b, s, h]`` -> ``[b, s, h]``."""
        if not len(layer_ids):
            return hidden
        tokens = ActiveTokens.from_mask(chunk.real, min_slots=0)
        slots = [first_slot + i for i in range(len(layer_ids))]
        return tokens.scatter_rows(hidden, self._run_layers(list(layer_ids), slots, tokens.gather_rows(hidden),
                                                            tokens, chunk, reuse_kv=False))

    def _run_layers(self, layer_ids: list[int], slot_ids: list[int], x: Tensor, tokens: ActiveTokens,
                    chunk: _Chunk, reuse_kv: bool) -> Tensor:
        """Apply unique layers ``layer_ids`` to the compacted tokens ``x`` ``[b, k, h]``, slot by slot.

        A token at compacted slot q sees the keys stored before this chunk plus, among this chunk's, those up
        to itself: with its own K/V (``reuse_kv`` False) the new keys are the set's tokens in order; when
        reusing the first recursion's slot (KV sharing) they are the chunk's real tokens, ranked by
        ``chunk.real_rank``.
        """
        cfg = self.config
        cos, sin = rotary_cos_sin(tokens.gather_rows(chunk.positions), cfg.head_dim, cfg.rope_theta, x.dtype)
        batch, k = tokens.index.shape
        for idx, slot_id in zip(layer_ids, slot_ids):
            slot = chunk.cache.slot(slot_id)
            stored = slot.lengths(batch, x.device)
            if reuse_kv:
                limit = (stored - chunk.real.sum(dim=1))[:, None] + tokens.gather_rows(chunk.real_rank)
                x = self.layers[idx](x, cos, sin, slot, limit, None)
            else:
                limit = stored[:, None] + torch.arange(k, device=x.device)[None, :]
                x = self.layers[idx](x, cos, sin, slot, limit, tokens.counts())
        return x

    def _run_recursions(self, hidden: Tensor, chunk: _Chunk, routing_mode: RoutingMode
                        ) -> tuple[Tensor, list[Tensor]]:
        """Apply the shared block R times with the configured routing; returns hidden and the masks."""
        cfg = self.config
        depth = token_gate = first_hidden = None
        if cfg.routing == "token_choice":
            bias = self.router.depth_bias if cfg.token_balancing == "loss_free" else None
            depth, token_gate, _ = token_choice_depth(self.router.logits(hidden), cfg.router_alpha, bias, hidden.dtype)
            first_hidden = hidden
        selected, masks = chunk.real, []
        for r in range(cfg.num_recursions):
            gate = None
            if cfg.routing == "expert_choice":
                logits = self.router.logits(hidden, r)
                selected = _select(logits, selected, chunk.real, cfg.capacities[r], routing_mode)
                gate = expert_gate(logits, cfg.router_alpha, hidden.dtype)
            elif cfg.routing == "token_choice":
                selected = chunk.real & (depth >= r)
            masks.append(selected)
            tokens = ActiveTokens.from_mask(selected, min_slots=0)
            if tokens.num_slots == 0:
                continue
            x = tokens.gather_rows(hidden)
            reuse_kv = cfg.kv_mode == "shared" and r > 0
            first_slot = cfg.num_prefix_layers + (0 if reuse_kv else r * cfg.num_shared_layers)
            slots = [first_slot + j for j in range(cfg.num_shared_layers)]
            y = self._run_layers(cfg.recursion_layers(r), slots, x, tokens, chunk, reuse_kv)
            if gate is not None:
                y = expert_choice_update(x, tokens.gather_rows(gate), y)
            elif depth is not None:
                y = token_choice_update(y, exits=tokens.gather_rows(depth == r),
                                        first_hidden=tokens.gather_rows(first_hidden),
                                        gate=tokens.gather_rows(token_gate))
            hidden = tokens.scatter_rows(hidden, y)
        return hidden, masks


def _select(logits: Tensor, candidates: Tensor, real: Tensor, capacity: float, mode: RoutingMode) -> Tensor:
    """Expert-choice selection ``[b, s]`` among ``candidates`` from router logits ``[b, s]``.

    `causal`: :func:`threshold_decision`. `topk`: training routing, per row the top
    ``min(max(1, int(capacity * n)), #candidates)`` candidates, ``n`` the row's real tokens.
    """
    if mode == "causal":
        return candidates & threshold_decision(logits, capacity)
    counts = top_k_counts(capacity, real.sum(dim=1), candidates.sum(dim=1))
    return candidates & top_k_decision(logits, candidates, counts)


class MoRForCausalLM(MoRPreTrainedModel, GenerationMixin):
    """MoR language model with a (tied) LM head; ``generate()`` uses the recursion-wise :class:`MoRCache`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        self.model = MoRModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No DynamicCache: the forward creates its own :class:`MoRCache` when ``use_cache`` is on."""
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def token_depths(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                     routing_mode: RoutingMode = "causal") -> Tensor:
        """``[b, s]`` int64: how many recursions each token ran (0 for padding), summed from the forward's own
        recursion masks so that it shows the routing this code runs (what serving runs with `causal`)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         routing_mode=routing_mode)
        return torch.stack(out.recursion_masks).sum(dim=0)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: MoRCache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None,
                logits_to_keep: int = 0, routing_mode: RoutingMode = "causal",
                output_recursion_masks: bool = False, return_dict: bool | None = None,
                past_key_values: MoRCache | None = None, **kwargs) -> MoRModelOutput | tuple:
        """Logits ``[b, s, V]`` (the last ``logits_to_keep`` positions when > 0) and the shifted LM loss.

        See :meth:`MoRModel.forward` for the arguments; ``labels`` ``[b, s]`` use -100 for ignored positions;
        ``output_recursion_masks`` returns which tokens ran each recursion.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=_given_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                         use_cache=use_cache, routing_mode=routing_mode)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        result = MoRModelOutput(loss=loss, logits=logits, **{CACHE_FIELD: output_cache(out)},
                                recursion_masks=out.recursion_masks if output_recursion_masks else None)
        return result if return_dict is not False else result.to_tuple()


__all__ = ["CACHE_FIELD", "MoRCache", "MoRForCausalLM", "MoRModel", "MoRPreTrainedModel", "output_cache"]
