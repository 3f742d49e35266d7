"""Choosing the next token: greedy, or a seeded draw with temperature, top-k and top-p; stop sequences.

One implementation for every decoder of this project (``mor-sample`` and the serving engines). Greedy
(temperature 0) is the argmax, so it stays token-exact with ``generate(do_sample=False)``. A sampled sequence
draws from its own ``torch.Generator`` seeded by its request, so its tokens do not depend on which other
sequences share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens.

    Attributes:
        temperature: 0 is greedy; > 0 divides the logits before the softmax.
        top_k: sample among the ``top_k`` most likely tokens (None: all).
        top_p: nucleus sampling, the smallest set of most likely tokens whose probability reaches ``top_p``
            (1.0: all).
        seed: seed of the sequence's generator (same seed, same tokens).
        stop: token-id sequences that end the generation when generated; the matched one is not returned.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None: every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not stop for stop in self.stop):
            raise ValueError("a stop sequence must hold at least one token")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh generator for one sequence (None when greedy: nothing is drawn)."""
        return None if self.greedy else torch.Generator(device=device).manual_seed(self.seed)


GREEDY = SamplingParams()


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from one position's logits ``[V]``."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        logits = logits.masked_fill(logits < logits.topk(params.top_k).values[-1], float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token if the mass before it is below top_p: the most likely token always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def matched_stop(tokens: list[int], params: SamplingParams) -> tuple[int, ...] | None:
    """The stop sequence ``tokens`` ends with, if any."""
    for stop in params.stop:
        if len(tokens) >= len(stop) and tuple(tokens[-len(stop):]) == stop:
            return stop
    return None
