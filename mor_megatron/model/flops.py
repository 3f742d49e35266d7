"""Parameter and FLOPs accounting for vanilla, recursive and Mixture-of-Recursions models (pure Python).

Parameters are those of the megatron-core local spec (Llama style, no biases); "non-embedding" means the
unique transformer layers + the final norm + the routers, as in the paper's tables; the word embeddings and,
when untied, the output layer are "embedding" parameters (the paper, after Kaplan et al., leaves both out
of N).

FLOPs follow the paper's convention (App. D, after Kaplan et al.): a linear layer costs 2 x its weights per
token it processes, attention counts QK^T and AV over the causal (query, key) pairs only, norms,
nonlinearities, RoPE and softmax are free, and training = 3 x forward (backward = 2 x forward). MoR's shared
block runs at recursion r (0-based) on the k_r active tokens: ``max(1, int(capacity_r * seq_length))`` for
expert-choice (as the router code does), the same perfectly balanced counts for token-choice, all tokens with
routing `none`. Attention at recursion r: recursion-wise KV -> causal among the k_r tokens (~k_r^2 / 2 pairs);
shared KV -> k_r queries over the k_0 keys recorded at the first recursion (~k_r * k_0 / 2 pairs).

Where these numbers differ from the paper's budgets (details and the per-variant table in docs/flops.md):

* The paper's budgets (2e18, 5e18, 16.5e18) are *forward* FLOPs: its App. D "solely focuses on forward pass
  FLOPs", and its step counts only fit without the x3. :attr:`FlopsBreakdown.training_flops_per_token` is 3 x
  forward, so a 16.5e18 budget here buys about a third of the paper's tokens.
* The paper's budget arithmetic sizes the K and V projections as if every model had full multi-head attention
  (K/V width = hidden size), ignoring the GQA of the 135M/360M/730M shapes; we count the real
  ``num_query_groups * head_dim`` width.
* The paper leaves out the LM head and the routers; we report both as separate lines. ``forward`` excludes the
  LM head (paper scope); ``*_with_lm_head`` includes it and is what the hardware executes (use it for MFU).
* Under KV sharing the paper skips the K/V projections of the later recursions; our model still computes them
  in the fused QKV GEMM and drops them (``mor_megatron/model/attention.py``), so we count them.
* We count causal pairs as n (n + 1) / 2 (diagonal included) and integer k_r; the paper's arithmetic uses
  n^2 / 2 and fractional k_r. Both are below 0.1% at 2048 tokens.

:func:`paper_budget_flops_per_token` reproduces the paper's own arithmetic; with it the 360M step counts of
the official configs (16.5e18 / (steps x 1024 x 2048)) come out within one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mor_megatron.config import ModelConfig, RecursionConfig, layer_layout

TRAINING_FLOPS_MULTIPLIER = 3
"""Training FLOPs = 3 x forward FLOPs: the backward pass costs twice the forward (paper App. D, Kaplan)."""

_Convention = Literal["exact", "paper"]


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a model as built (unique weights, each shared weight counted once)."""

    attention: int
    """``linear_qkv`` + ``linear_proj`` weights of the unique layers."""
    mlp: int
    """``linear_fc1`` (SwiGLU gate + up, fused) + ``linear_fc2`` weights of the unique layers."""
    norms: int
    """Two RMSNorm weights per unique layer plus the final RMSNorm."""
    router: int
    """Expert-choice: one hidden->1 linear per recursion; token-choice: one hidden->R linear; none: 0."""
    word_embeddings: int
    output_layer: int
    """0 when ``model.tie_embeddings`` (the LM head reuses the word embeddings)."""
    unique_layers: int
    unrolled_layers: int

    @property
    def non_embedding(self) -> int:
        """Unique non-embedding parameters (the paper's "N-Emb" column): layers, final norm, routers."""
        return self.attention + self.mlp + self.norms + self.router

    @property
    def embedding(self) -> int:
        """Word embeddings plus an untied output layer (the paper's "Emb params")."""
        return self.word_embeddings + self.output_layer

    @property
    def total(self) -> int:
        return self.non_embedding + self.embedding


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs per token of the training sequence, averaged over its ``seq_length`` tokens."""

    seq_length: int
    dense_linear: float
    """All linear layers of the transformer layers (QKV, output projection, MLP), 2 x weights per token."""
    attention: float
    """QK^T and AV over the causal pairs: 4 x (heads * head_dim) FLOPs per (query, key) pair."""
    router: float
    """Router linears: 2 x hidden per candidate token per recursion (expert), 2 x hidden x R once (token)."""
    lm_head: float
    """Output logits, 2 x vocab x hidden; outside the paper's count, so not in :attr:`forward`."""
    tokens_per_recursion: tuple[int, ...]
    """Active tokens of one sequence at each recursion of the shared block (0-based)."""

    @property
    def forward(self) -> float:
        """Forward FLOPs per token in the paper's scope: transformer layers + routers, no LM head."""
        return self.dense_linear + self.attention + self.router

    @property
    def forward_with_lm_head(self) -> float:
        return self.forward + self.lm_head

    @property
    def training_flops_per_token(self) -> float:
        """3 x :attr:`forward` (paper scope, no LM head)."""
        return TRAINING_FLOPS_MULTIPLIER * self.forward

    @property
    def training_flops_per_token_with_lm_head(self) -> float:
        """3 x :attr:`forward_with_lm_head`: the model FLOPs run per token; use it for TFLOP/s and MFU."""
        return TRAINING_FLOPS_MULTIPLIER * self.forward_with_lm_head


def count_parameters(model: ModelConfig, recursion: RecursionConfig) -> ParameterCount:
    """Count the parameters of the megatron-core model built from ``model`` and ``recursion``.

    Raises ConfigError (from :func:`layer_layout`) when ``model.num_layers`` does not fit the recursion.
    """
    layout = layer_layout(model, recursion)
    hidden, head_dim = model.hidden_size, model.head_dim
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * head_dim * hidden
    proj = hidden * model.num_attention_heads * head_dim
    mlp = 3 * model.ffn_hidden_size * hidden
    unique = layout.num_unique_layers
    router = 0 if recursion.routing == "none" else recursion.num_recursions * hidden
    embeddings = model.vocab_size * hidden
    return ParameterCount(
        attention=unique * (qkv + proj), mlp=unique * mlp, norms=unique * 2 * hidden + hidden, router=router,
        word_embeddings=embeddings, output_layer=0 if model.tie_embeddings else embeddings,
        unique_layers=unique, unrolled_layers=layout.num_unrolled_layers)


def flops_per_token(model: ModelConfig, recursion: RecursionConfig, seq_length: int) -> FlopsBreakdown:
    """Forward FLOPs per token for training sequences of ``seq_length`` tokens (see the module docstring)."""
    _check_positive("seq_length", seq_length)
    dense, attention, tokens = _stack_flops(model, recursion, seq_length, "exact")
    hidden = model.hidden_size
    if recursion.routing == "expert_choice":
        # Router r scores recursion r's candidates: the whole sequence first, then the last recursion's picks.
        candidates = (seq_length,) + tokens[:-1]
        router = sum(2 * hidden * c for c in candidates)
    elif recursion.routing == "token_choice":
        router = 2 * hidden * recursion.num_recursions * seq_length
    else:
        router = 0.0
    return FlopsBreakdown(seq_length=seq_length, dense_linear=dense / seq_length,
                          attention=attention / seq_length, router=router / seq_length,
                          lm_head=2.0 * model.vocab_size * hidden,
                          tokens_per_recursion=tuple(int(t) for t in tokens))


def training_flops(model: ModelConfig, recursion: RecursionConfig, seq_length: int, tokens: float, *,
                   include_lm_head: bool = False) -> float:
    """Training FLOPs (3 x forward) for ``tokens`` tokens; paper scope unless ``include_lm_head``."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    breakdown = flops_per_token(model, recursion, seq_length)
    per_token = (breakdown.training_flops_per_token_with_lm_head if include_lm_head
                 else breakdown.training_flops_per_token)
    return per_token * tokens


def tokens_for_budget(model: ModelConfig, recursion: RecursionConfig, seq_length: int, flops_budget: float, *,
                      include_lm_head: bool = False) -> int:
    """Whole tokens whose training FLOPs (3 x forward) fit in ``flops_budget``."""
    _check_positive("flops_budget", flops_budget)
    breakdown = flops_per_token(model, recursion, seq_length)
    per_token = (breakdown.training_flops_per_token_with_lm_head if include_lm_head
                 else breakdown.training_flops_per_token)
    return math.floor(flops_budget / per_token)


def paper_budget_flops_per_token(model: ModelConfig, recursion: RecursionConfig, seq_length: int) -> float:
    """FLOPs per token as the paper's budgets count them, to compare with its 2e18 / 5e18 / 16.5e18 budgets.

    Forward only (no x3), K/V projections at full hidden width, no LM head, no router, n^2 / 2 causal pairs,
    fractional k_r, and no K/V projections at the reused recursions of KV sharing. Reverse-engineered from
    the official configs' step counts, which it reproduces within one step (docs/flops.md).
    """
    _check_positive("seq_length", seq_length)
    dense, attention, _ = _stack_flops(model, recursion, seq_length, "paper")
    return (dense + attention) / seq_length


def paper_budget_tokens(model: ModelConfig, recursion: RecursionConfig, seq_length: int,
                        flops_budget: float) -> int:
    """Whole tokens the paper would train for ``flops_budget`` (see :func:`paper_budget_flops_per_token`)."""
    _check_positive("flops_budget", flops_budget)
    return math.floor(flops_budget / paper_budget_flops_per_token(model, recursion, seq_length))


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _active_tokens(recursion: RecursionConfig, seq_length: int, convention: _Convention) -> tuple[float, ...]:
    """Tokens of one sequence that the shared block processes at each recursion."""
    if recursion.routing == "none":
        return (float(seq_length),) * recursion.num_recursions
    if convention == "paper":
        return tuple(c * seq_length for c in recursion.effective_capacities)
    # The router keeps k = max(1, int(capacity * seq_length)) of the *full* length (paper's code, routing.py);
    # token-choice uses the same counts as its perfectly balanced estimate.
    return tuple(float(max(1, int(c * seq_length))) for c in recursion.effective_capacities)


def _causal_pairs(num_queries: float, num_keys: float, convention: _Convention) -> float:
    """(query, key) pairs on or below the causal diagonal, queries spread evenly over the key positions.

    Queries = keys = n gives n (n + 1) / 2; n queries over m >= n keys give n (m + 1) / 2 on average. The
    paper's arithmetic drops the diagonal: n * m / 2.
    """
    if convention == "paper":
        return num_queries * num_keys / 2
    return num_queries * (num_keys + 1) / 2


def _stack_flops(model: ModelConfig, recursion: RecursionConfig, seq_length: int,
                 convention: _Convention) -> tuple[float, float, tuple[float, ...]]:
    """Forward FLOPs of all transformer layers on one sequence: (dense linear, attention, active tokens)."""
    layout = layer_layout(model, recursion)
    hidden = model.hidden_size
    query_width = model.num_attention_heads * model.head_dim
    # The paper's budgets size K and V as full multi-head attention even for GQA models (docs/flops.md).
    kv_width = hidden if convention == "paper" else model.num_query_groups * model.head_dim
    q_and_out = 2 * 2 * query_width * hidden  # linear_qkv's Q rows + linear_proj, 2 FLOPs per weight
    k_and_v = 2 * 2 * kv_width * hidden
    mlp = 2 * 3 * model.ffn_hidden_size * hidden  # SwiGLU: fc1 (gate + up) and fc2
    per_pair = 4 * query_width  # QK^T and AV, 2 FLOPs per multiply-add each
    full = float(seq_length)

    edge_layers = layout.num_prefix + layout.num_suffix
    dense = edge_layers * (q_and_out + k_and_v + mlp) * full
    attention = edge_layers * per_pair * _causal_pairs(full, full, convention)
    tokens = _active_tokens(recursion, seq_length, convention)
    for recursion_idx, active in enumerate(tokens):
        reuses_kv = recursion.kv_mode == "shared" and recursion_idx > 0
        # Shared KV: later recursions attend over the keys recorded at the first one. The paper skips their
        # K/V projections; our attention still runs them in the fused QKV GEMM (attention.py): we count them.
        kv_tokens = 0.0 if reuses_kv and convention == "paper" else active
        keys = tokens[0] if reuses_kv else active
        dense += layout.num_shared * ((q_and_out + mlp) * active + k_and_v * kv_tokens)
        attention += layout.num_shared * per_pair * _causal_pairs(active, keys, convention)
    return dense, attention, tokens
