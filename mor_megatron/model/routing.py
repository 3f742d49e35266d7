"""MoR routers: which tokens take part in each recursion, their gates, and the auxiliary losses.

Expert-choice (paper eq. 1): recursion r has its own linear router ``z = theta_r . h / T`` and gate
``g = alpha * sigmoid(z)``. During training it keeps the top ``k_r = max(1, int(capacity_r * s))`` tokens of each
sequence among the tokens chosen at r - 1 (hierarchical filtering); chosen tokens get ``h <- h + g * f(h)``.
Top-k looks at future tokens, so an auxiliary BCE loss teaches ``sigmoid(z)`` to predict top-k membership;
causal routing (inference) keeps a candidate iff ``sigmoid(z) >= 0.5``.

Token-choice (paper eq. 2): one router with R outputs reads the hidden state after the first unique layer and
assigns each token a depth once (top-1 of ``alpha * softmax(z)``, plus a non-trainable bias in loss-free mode);
it is causal by construction. Balancing uses the Switch loss ``R * sum_i f_i P_i`` or DeepSeek's loss-free bias.

Routers are replicated across tensor-parallel ranks: their input is the replicated residual stream, so every TP
rank computes the same logits and makes the same decision.

This module holds the router parameters, their fp32 logits and the auxiliary losses; the selection, gate and
combine rules are :mod:`mor_megatron.model.recursion`'s, shared with the Hugging Face export and the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor_megatron.model.recursion import (
    ActiveTokens,
    expert_gate,
    threshold_decision,
    token_choice_depth,
    top_k_counts,
    top_k_decision,
)

RoutingMode = Literal["topk", "causal"]


@dataclass
class RoutingDecision:
    """Tokens selected for one recursion and what the router produced for them.

    Attributes:
        active: the selected tokens (compacted positions).
        gate: ``[k, b]`` gate per selected slot (already alpha-scaled), or None when ungated.
        aux_loss: scalar auxiliary loss of this decision (already coefficient-scaled), or None.
        stats: detached scalars for logging (e.g. ``aux_loss``, ``z_loss``).
    """

    active: ActiveTokens
    gate: Tensor | None
    aux_loss: Tensor | None
    stats: dict[str, Tensor]


def _init_router_weight(weight: Tensor, std: float) -> None:
    with torch.no_grad():
        nn.init.normal_(weight, mean=0.0, std=std)


class ExpertChoiceRouter(nn.Module):
    """One linear router (hidden -> 1, no bias) per recursion, with capacities and hierarchical top-k.

    Args:
        hidden_size: model width.
        capacities: per-recursion fraction of the full sequence selected in training (non-increasing).
        alpha: gate scale (paper: 0.1).
        temperature: router input is ``h / temperature``.
        aux_loss_coeff: BCE coefficient (paper: 0.001); the BCE is a mean over each recursion's candidates,
            summed over recursions.
        z_loss_coeff: coefficient of ``mean(z^2)`` (logsumexp of a single logit is the logit).
        init_std: normal init std of the router weights.
    """

    def __init__(self, *, hidden_size: int, capacities: tuple[float, ...], alpha: float, temperature: float,
                 aux_loss_coeff: float, z_loss_coeff: float, init_std: float, params_dtype: torch.dtype):
        super().__init__()
        self.capacities = capacities
        self.alpha = alpha
        self.temperature = temperature
        self.aux_loss_coeff = aux_loss_coeff
        self.z_loss_coeff = z_loss_coeff
        self.weight = nn.Parameter(torch.empty(len(capacities), hidden_size, dtype=params_dtype))
        _init_router_weight(self.weight, init_std)

    def logits(self, recursion_idx: int, hidden: Tensor) -> Tensor:
        """fp32 router logits ``[k, b]`` of the candidate tokens ``hidden`` ``[k, b, h]`` for 0-based recursion.

        In fp32 whatever the model's dtype: bf16 logits (8-bit mantissa) tie often, and a tie broken differently
        changes which tokens are routed, between TP ranks' kernels or between training and serving.
        """
        weight = self.weight[recursion_idx : recursion_idx + 1].float()
        return F.linear(hidden.float() / self.temperature, weight).squeeze(-1)

    def route(self, recursion_idx: int, hidden: Tensor, candidates: ActiveTokens | None, seq_length: int,
              mode: RoutingMode) -> RoutingDecision:
        """Select this recursion's tokens among ``candidates`` (None = every position).

        Args:
            hidden: full residual stream ``[s, b, h]``.
            candidates: tokens selected at the previous recursion (hierarchical filtering).
            seq_length: ``s``; capacities are fractions of the full length, as in the paper's code.
            mode: `topk` (training) or `causal` (threshold on sigmoid(z), what serving does).
        """
        cand_hidden = hidden if candidates is None else candidates.gather(hidden)
        logits = self.logits(recursion_idx, cand_hidden)  # [c, b], fp32
        cand_valid = None if candidates is None else candidates.valid
        batch = hidden.shape[1]
        cand_index = (torch.arange(seq_length, device=hidden.device).expand(batch, -1)
                      if candidates is None else candidates.index)
        capacity = self.capacities[recursion_idx]
        if mode == "topk":
            available = (torch.full((batch,), logits.shape[0], device=hidden.device) if cand_valid is None
                         else cand_valid.sum(dim=1))
            counts = top_k_counts(capacity, torch.full((batch,), seq_length, device=hidden.device), available)
            selected = top_k_decision(logits.t(), cand_valid, counts)
        else:
            selected = threshold_decision(logits.t(), capacity)
            if cand_valid is not None:
                selected = selected & cand_valid
        chosen_slots, active = _compact_selection(selected, cand_index, seq_length)
        gate = expert_gate(torch.gather(logits.t(), 1, chosen_slots).t(), self.alpha, hidden.dtype)  # [k, b]
        if active.valid is not None:
            gate = gate * active.valid.t().to(gate.dtype)

        aux_loss, stats = self._aux_losses(logits.t(), selected, cand_valid)
        return RoutingDecision(active=active, gate=gate, aux_loss=aux_loss, stats=stats)

    def _aux_losses(self, logits: Tensor, selected: Tensor, cand_valid: Tensor | None
                    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """BCE of logits ``[b, c]`` vs top-k membership over the candidates, plus optional z-loss."""
        weight = None if cand_valid is None else cand_valid.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, selected.to(logits.dtype), weight=weight, reduction="sum")
        num_candidates = logits.numel() if cand_valid is None else cand_valid.sum().clamp(min=1)
        bce = bce / num_candidates
        stats = {"bce_loss": bce.detach()}
        total = self.aux_loss_coeff * bce
        if self.z_loss_coeff > 0:
            z_loss = (logits.square() * (1.0 if weight is None else weight)).sum() / num_candidates
            stats["z_loss"] = z_loss.detach()
            total = total + self.z_loss_coeff * z_loss
        return total, stats


def _compact_selection(selected: Tensor, cand_index: Tensor, seq_length: int) -> tuple[Tensor, ActiveTokens]:
    """From a ``[b, c]`` selection over candidate slots to (chosen slot ids ``[b, k]``, ActiveTokens)."""
    slots = ActiveTokens.from_mask(selected)
    positions = torch.gather(cand_index, 1, slots.index)
    if slots.valid is not None:
        positions = torch.where(slots.valid, positions, torch.zeros_like(positions))
    return slots.index, ActiveTokens(index=positions, valid=slots.valid, seq_length=seq_length)


class TokenChoiceRouter(nn.Module):
    """One linear router (hidden -> R, no bias) assigning each token its number of recursions once.

    Args:
        num_recursions: R.
        alpha: gate scale of the softmax probabilities (paper code default 1.0).
        balancing: `loss` (Switch-style, ``coeff * R * sum_i f_i P_i``) or `loss_free` (bias on selection).
        aux_loss_coeff: balancing-loss coefficient (paper: 0.1).
        z_loss_coeff: coefficient of ``mean(logsumexp(z)^2)``.
    """

    def __init__(self, *, hidden_size: int, num_recursions: int, alpha: float, temperature: float,
                 balancing: Literal["loss", "loss_free"], aux_loss_coeff: float, z_loss_coeff: float,
                 init_std: float, params_dtype: torch.dtype):
        super().__init__()
        self.num_recursions = num_recursions
        self.alpha = alpha
        self.temperature = temperature
        self.balancing = balancing
        self.aux_loss_coeff = aux_loss_coeff
        self.z_loss_coeff = z_loss_coeff
        self.weight = nn.Parameter(torch.empty(num_recursions, hidden_size, dtype=params_dtype))
        _init_router_weight(self.weight, init_std)
        # Loss-free balancing state; fp32 so that small bias steps are not rounded away.
        self.register_buffer("depth_bias", torch.zeros(num_recursions, dtype=torch.float32))
        self.register_buffer("local_tokens_per_depth", torch.zeros(num_recursions, dtype=torch.float32),
                             persistent=False)

    def assign(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
        """Assign depths to all tokens of ``hidden`` ``[s, b, h]``.

        Returns:
            depth: ``[b, s]`` int64, 0-based index of the last recursion a token takes part in.
            gate: ``[b, s]`` gate of the assigned depth (alpha * softmax prob, un-biased).
            aux_loss: scalar balancing (+ z) loss, coefficient-scaled; None in loss-free mode without z-loss.
            stats: detached logging scalars.
        """
        # fp32 for the same reason as ExpertChoiceRouter.logits: the argmax must not depend on bf16 rounding.
        logits = F.linear(hidden.float() / self.temperature, self.weight.float()).transpose(0, 1)  # [b, s, R]
        depth, gate, probs = token_choice_depth(logits, self.alpha,
                                                self.depth_bias if self.balancing == "loss_free" else None,
                                                hidden.dtype)
        tokens_per_depth = F.one_hot(depth, self.num_recursions).to(torch.float32).sum(dim=(0, 1))
        if self.balancing == "loss_free" and torch.is_grad_enabled():
            # Counted only in grad-enabled passes, so evaluation and recompute do not move the bias.
            self.local_tokens_per_depth += tokens_per_depth.detach()
        fraction = tokens_per_depth / depth.numel()
        stats = {"max_violation": (fraction.max() * self.num_recursions - 1.0).detach()}
        aux_loss = None
        if self.balancing == "loss":
            balance = self.num_recursions * (fraction.detach() * probs.mean(dim=(0, 1))).sum()
            stats["balance_loss"] = balance.detach()
            aux_loss = self.aux_loss_coeff * balance
        if self.z_loss_coeff > 0:
            z_loss = torch.logsumexp(logits, dim=-1).square().mean()
            stats["z_loss"] = z_loss.detach()
            aux_loss = self.z_loss_coeff * z_loss if aux_loss is None else aux_loss + self.z_loss_coeff * z_loss
        return depth, gate, aux_loss, stats

    @torch.no_grad()
    def update_bias(self, rate: float, group: torch.distributed.ProcessGroup | None = None) -> None:
        """Loss-free balancing step after an optimizer step: ``b_i += rate * sign(mean_load - load_i)``.

        ``group`` is the data-parallel group whose token counts are summed first (None: local counts only).
        """
        counts = self.local_tokens_per_depth.clone()
        if group is not None and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts, group=group)
        self.depth_bias += rate * torch.sign(counts.mean() - counts)
        self.local_tokens_per_depth.zero_()
