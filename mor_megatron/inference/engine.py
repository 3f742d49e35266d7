"""Serving engines with a paged KV cache: continuous depth-wise batching (MoR) and sequence-wise (vanilla).

Both engines serve a list of :class:`Request` (prompt token ids, ``max_new_tokens``) with ``num_slots``
sequences resident at once. A free slot is refilled from the request queue as soon as its sequence finishes
(EOS or length): the new prompt is prefilled by the model's own full-sequence forward (``MoRForCausalLM``
with its ``MoRCache``, or ``LlamaForCausalLM`` with a ``DynamicCache``), whose K/V are copied into blocks of
the paged cache (:mod:`mor_megatron.inference.kv_buffers`) and whose last logits give the first new token.
A sequence's blocks go back to the pool when it finishes. When the pool runs out, the sequences of the prefill
or step that needed the blocks end with :class:`~mor_megatron.inference.kv_buffers.KVPoolExhausted` (raise
``kv_blocks``) and give their blocks back; the other sequences go on.

Two ways in: :meth:`_Engine.run` serves a fixed list and returns the completions (it raises the first
``KVPoolExhausted`` once the rest is served); :meth:`_Engine.serve` runs the same step loop on one thread
until told to stop, while other threads queue a :class:`Ticket` with :meth:`_Engine.submit`; its callbacks
receive each new token and the completion (``mor-serve``'s HTTP server works this way). Queued requests take
free slots between steps.
Each request picks its tokens by its own :class:`~mor_megatron.inference.sampling.SamplingParams` (greedy by
default; temperature, top-k, top-p with a per-request seed; stop sequences). Greedy decoding is the argmax, so
an engine's output for a prompt equals ``model.generate(prompt, do_sample=False, max_new_tokens=...,
eos_token_id=...)``; a sampled request draws from its own generator, so its tokens do not depend on the
requests it shares batches with.

**Sequence-wise batching** (:class:`SequenceWiseEngine`, vanilla and routing-`none` models): every step
feeds the newest token of every active slot through all unrolled layers, norm and LM head.

**Continuous depth-wise batching** (:class:`DepthWiseEngine`, any MoR model with cycle sharing; the paper's
appendix C engine). A sequence has one token in flight at a time, in one of three places:

1. *pool* (FIFO): tokens waiting to run recursion ``depth`` of the shared block. An engine step takes up to
   ``max_batch`` tokens from its front, whatever their depths, and runs each shared layer once over all of
   them (each token reads and writes the K/V of its own slot at its own depth). After the recursion the
   router decides, per token and causally, whether it runs the next one (back to the pool's end at
   ``depth + 1``) or exits;
2. *exit buffer*: exited tokens wait until ``max_batch`` of them exist, or until the pool is empty (nothing
   else can run); then up to ``max_batch`` go together through the suffix layers, final norm and LM head;
3. *entering*: the argmax tokens, with the first tokens of prompts admitted meanwhile, go together through
   the embedding and the prefix layers; the router then places them in the pool at depth 0 or, if they skip
   every recursion, in the exit buffer.

The routing is ``MoRForCausalLM``'s causal routing, token by token:

* expert-choice: a token runs recursion ``r`` iff it ran ``r - 1`` and (capacity ``r`` >= 1.0 or its
  router logit ``z_r >= 0``, i.e. sigmoid >= 0.5), computed on its hidden state before recursion ``r``;
  then ``h <- h + alpha * sigmoid(z_r) * f(h)``;
* token-choice: the depth is ``argmax(softmax(z) [+ depth_bias])`` of the router on the hidden state after
  the prefix layers; intermediate recursions carry ``f(h)`` on, the last gives ``H1 + g * f(h)``;
* routing none: every token runs every recursion.

KV caching per the model's ``kv_mode``: `recursion_wise` writes a token's K/V only at the depths it runs
and attends at depth ``r`` over its sequence's depth-``r`` entries; `shared` writes at the first recursion
only (every token runs it) and later recursions read those entries, causally (the sequence has no later
token yet). Either way a stream's blocks follow its tokens, so the KV bytes in use are those of the tokens
cached at each depth (``EngineStats.kv_peak_bytes``, ``Completion.kv_bytes``).
"""

from __future__ import annotations

import abc
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from mor_megatron.inference.hf.modeling_mor import output_cache
from mor_megatron.inference.kv_buffers import KVBuffers, KVPoolExhausted
from mor_megatron.inference.sampling import GREEDY, SamplingParams, matched_stop, next_token
from mor_megatron.inference.stack import ModelStack, apply_layer
from mor_megatron.model.recursion import (
    expert_choice_update,
    expert_gate,
    threshold_decision,
    token_choice_depth,
    token_choice_update,
)


@dataclass(frozen=True)
class Request:
    """One generation request: prompt token ids (at least one), how many tokens to generate at most, and how
    to pick them."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY


@dataclass
class Completion:
    """What an engine produced for one request.

    Attributes:
        request_index: position of the request in the list given to :meth:`run`, or the submission number
            (from 0, per engine) of a request given to :meth:`submit`.
        tokens: generated ids, the EOS included when it ended the sequence, a matched stop sequence not.
        finish_reason: `eos`, `stop` (a stop sequence of the request's sampling parameters) or `length`.
        token_depths: recursions run by each token whose K/V were cached: the prompt, then ``tokens[:-1]``.
        kv_lengths: the slot's shared-block KV entries per stored depth when the sequence finished (one
            value under KV sharing, where only depth 0 is stored).
        kv_bytes: bytes of the KV blocks the sequence held when it finished (its largest footprint: a
            sequence's cache only grows), all layer sites.
        kv_recursion_bytes: the part of ``kv_bytes`` in the shared block's sites.
    """

    request_index: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: Literal["eos", "stop", "length"]
    token_depths: list[int]
    kv_lengths: tuple[int, ...]
    kv_bytes: int
    kv_recursion_bytes: int


@dataclass
class EngineStats:
    """Counters and times of one :meth:`run` (seconds are wall-clock, ``time.perf_counter``)."""

    generated_tokens: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    """Time spent in prompt prefills (the model's forward plus the copy into the KV blocks)."""
    prefills: int = 0
    refills: int = 0
    """Prefills into a slot that an earlier sequence of the same run had used."""
    decode_steps: int = 0
    """Sequence-wise: steps through all layers. Depth-wise: passes through the shared block."""
    decode_step_tokens: int = 0
    mixed_depth_steps: int = 0
    """Depth-wise: shared-block passes whose tokens were at more than one depth."""
    kv_reserved_bytes: int = 0
    """Bytes of the KV block pool (every block, used or not)."""
    kv_peak_bytes: int = 0
    """Most bytes of KV blocks in use at once during the run."""

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the whole run (prefills included)."""
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens generated by decoding (not the first token of each prefill) per second outside prefills."""
        decode_s = self.wall_s - self.prefill_s
        return (self.generated_tokens - self.prefills) / decode_s if decode_s > 0 else 0.0


@dataclass
class EngineResult:
    """Completions in request order, and the run's statistics."""

    completions: list[Completion]
    stats: EngineStats


@dataclass(eq=False)
class Ticket:
    """A request and where its results go. The callbacks run on the engine's thread, so they must be quick
    and must not raise.

    Attributes:
        on_token: every new token as it is chosen, the tokens of a stop sequence included (a stop sequence is
            only known to match once its last token is chosen; :class:`Completion` leaves it out).
        on_finish: the request's :class:`Completion`, or the exception that ended it (``KVPoolExhausted``).
    """

    request: Request
    on_token: Callable[[int], None] | None = None
    on_finish: Callable[[Completion | Exception], None] | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """End the request at its next token with finish reason `stop` (e.g. a stop string matched in the
        decoded text, or the client left). Thread-safe: the engine only reads the flag."""
        self.cancelled = True


@dataclass
class _Sequence:
    """A request being served in a slot."""

    request_index: int
    ticket: Ticket
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    token_depths: list[int] = field(default_factory=list)

    @property
    def request(self) -> Request:
        return self.ticket.request

    def next_token(self, logits: Tensor) -> int:
        """This sequence's choice from one position's logits ``[V]``."""
        return next_token(logits, self.request.sampling, self.generator)


class _Engine(abc.ABC):
    """Slots, request queue, prefill and completion bookkeeping shared by both engines."""

    def __init__(self, model: nn.Module, *, num_slots: int, max_len: int, eos_token_id: int | None,
                 block_size: int, kv_blocks: int | None):
        for name, value in (("num_slots", num_slots), ("max_len", max_len), ("block_size", block_size),
                            ("kv_blocks", 1 if kv_blocks is None else kv_blocks)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be an integer >= 1, got {value!r}")
        self.model = model
        self.stack = ModelStack.from_model(model)
        self.num_slots, self.max_len, self.eos_token_id = num_slots, max_len, eos_token_id
        self.buffers = KVBuffers(self.stack, num_slots=num_slots, max_len=max_len, block_size=block_size,
                                 num_blocks=kv_blocks)
        # Position of each slot's newest token, the one to feed next.
        self.position = torch.zeros(num_slots, dtype=torch.long, device=self.stack.device)
        # Requests waiting for a slot. Submitting threads append, the engine's thread alone pops: deque's
        # append and popleft are atomic, and the condition only wakes an idle engine.
        self.queue: deque[tuple[int, Ticket]] = deque()
        self._arrived = threading.Condition()
        self._submissions = itertools.count()
        self._reset()

    def run(self, requests: Sequence[Request]) -> EngineResult:
        """Serve ``requests`` to completion; completions come back in request order. Raises the first
        ``KVPoolExhausted`` (after serving the other requests) if the pool ran out. Not while :meth:`serve`
        runs."""
        self._check(requests)
        self._reset()
        self.queue.clear()
        done: list[Completion] = []
        failures: list[Exception] = []

        def finish(outcome: Completion | Exception) -> None:
            (failures if isinstance(outcome, Exception) else done).append(outcome)

        self.queue.extend((i, Ticket(request, on_finish=finish)) for i, request in enumerate(requests))
        start = time.perf_counter()
        with torch.inference_mode():
            self._serve()
        self.stats.wall_s = time.perf_counter() - start
        self.stats.kv_peak_bytes = self.buffers.pool.peak_blocks * self.buffers.pool.block_bytes
        if failures:
            raise failures[0]
        return EngineResult(completions=sorted(done, key=lambda c: c.request_index), stats=self.stats)

    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket`` for :meth:`serve` (any thread); ValueError if the request can never be served."""
        self._check([ticket.request])
        with self._arrived:
            self.queue.append((next(self._submissions), ticket))
            self._arrived.notify()

    def serve(self, stop: threading.Event) -> None:
        """Serve submitted tickets until ``stop`` is set; run it on one thread. ``stats`` count from the
        start (``wall_s`` and ``kv_peak_bytes`` stay unset). An unexpected error ends every resident and
        queued request with it (so no caller waits forever), then propagates."""
        self._reset()
        try:
            with torch.inference_mode():
                while not stop.is_set():
                    with self._arrived:
                        # The timeout bounds how long a set ``stop`` goes unnoticed by an idle engine.
                        if not self._arrived.wait_for(lambda: self.queue, timeout=0.1):
                            continue
                    self._serve()
        except Exception as err:
            self._fail([slot for slot, sequence in enumerate(self.slots) if sequence is not None], err)
            while self.queue:
                _, ticket = self.queue.popleft()
                if ticket.on_finish is not None:
                    ticket.on_finish(err)
            raise

    @abc.abstractmethod
    def _serve(self) -> None:
        """Serve the queue until it is empty and every admitted request is complete."""

    def _check(self, requests: Sequence[Request]) -> None:
        for index, request in enumerate(requests):
            if not request.prompt or request.max_new_tokens < 1:
                raise ValueError(f"request {index}: needs a non-empty prompt and max_new_tokens >= 1, got "
                                 f"{len(request.prompt)} prompt tokens and max_new_tokens="
                                 f"{request.max_new_tokens}")
            cached = len(request.prompt) + request.max_new_tokens - 1
            if cached > self.max_len:
                raise ValueError(f"request {index}: prompt {len(request.prompt)} + max_new_tokens "
                                 f"{request.max_new_tokens} - 1 = {cached} cached tokens exceed the engine's "
                                 f"max_len={self.max_len}; build the engine with max_len >= {cached}")

    def _reset(self) -> None:
        self.slots: list[_Sequence | None] = [None] * self.num_slots
        self._used = [False] * self.num_slots
        self.stats = EngineStats(kv_reserved_bytes=self.buffers.pool.nbytes())
        for slot in range(self.num_slots):  # a run that raised may have left sequences behind
            self.buffers.clear(slot)
        self.buffers.pool.reset_peak()

    def _admit(self) -> list[int]:
        """Prefill queued requests into free slots; returns the slots whose first token must be fed."""
        ready = []
        for slot in range(self.num_slots):
            while self.slots[slot] is None and self.queue:
                index, ticket = self.queue.popleft()
                self.stats.refills += self._used[slot]
                self._used[slot] = True
                sequence = _Sequence(request_index=index, ticket=ticket,
                                     generator=ticket.request.sampling.generator(self.stack.device))
                self.slots[slot] = sequence
                try:
                    token = self._prefill(slot, sequence)
                except KVPoolExhausted as err:
                    self._fail([slot], err)
                    continue
                if self._accept(slot, token):
                    ready.append(slot)
        return ready

    def _guarded(self, slots: list[int], step: Callable[[list[int]], list[int] | None]) -> list[int]:
        """``step(slots)``'s slots going on (none if it returns None); if the KV pool runs out during it, the
        sequences of ``slots`` fail instead. A step writes K/V layer by layer, so it cannot be undone for
        some of its slots only: all of them end, the other resident sequences go on."""
        try:
            return step(slots) or []
        except KVPoolExhausted as err:
            self._fail(slots, err)
            return []

    def _fail(self, slots: list[int], error: Exception) -> None:
        """End the sequences of ``slots`` with ``error``; their blocks go back to the pool."""
        for slot in slots:
            sequence, self.slots[slot] = self.slots[slot], None
            self.buffers.clear(slot)
            if sequence.ticket.on_finish is not None:
                sequence.ticket.on_finish(error)

    def _prefill(self, slot: int, sequence: _Sequence) -> int:
        """Run the prompt through the model's forward into ``slot``'s KV blocks; returns the first token."""
        start = time.perf_counter()
        prompt = list(sequence.request.prompt)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.stack.device)
        if self.model.config.model_type == "mor":
            out = self.model(ids, use_cache=True, logits_to_keep=1, output_recursion_masks=True,
                             return_dict=True)
            self.buffers.load_mor_cache(slot, output_cache(out))
            sequence.token_depths = torch.stack(out.recursion_masks).sum(dim=0)[0].tolist()
        else:
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            self.buffers.load_dynamic_cache(slot, output_cache(out))
            sequence.token_depths = [1] * len(prompt)
        self.position[slot] = len(prompt)
        self.stats.prefills += 1
        self.stats.prefill_s += time.perf_counter() - start
        return sequence.next_token(out.logits[0, -1])

    def _accept(self, slot: int, token: int) -> bool:
        """Record ``slot``'s new ``token``; finish the sequence (free the slot) on EOS or length.

        Returns True when the sequence goes on (``token`` must be fed next).
        """
        sequence = self.slots[slot]
        sequence.tokens.append(token)
        self.stats.generated_tokens += 1
        if sequence.ticket.on_token is not None:
            sequence.ticket.on_token(token)
        stop = matched_stop(sequence.tokens, sequence.request.sampling)
        stopped = stop is not None or sequence.ticket.cancelled
        reason = ("eos" if token == self.eos_token_id else "stop" if stopped
                  else "length" if len(sequence.tokens) >= sequence.request.max_new_tokens else None)
        if reason is None:
            return True
        tokens = sequence.tokens[:len(sequence.tokens) - len(stop)] if stop is not None else sequence.tokens
        kv_bytes, kv_recursion_bytes = self.buffers.slot_bytes(slot)
        completion = Completion(request_index=sequence.request_index, prompt=list(sequence.request.prompt),
                                tokens=tokens, finish_reason=reason, token_depths=sequence.token_depths,
                                kv_lengths=self.buffers.depth_lengths(slot), kv_bytes=kv_bytes,
                                kv_recursion_bytes=kv_recursion_bytes)
        self.slots[slot] = None
        self.buffers.clear(slot)
        if sequence.ticket.on_finish is not None:
            sequence.ticket.on_finish(completion)
        return False

    def _finish_tokens(self, slots: list[int], hidden: Tensor) -> list[int]:
        """Suffix layers, final norm, LM head and each sequence's token choice for the newest tokens of
        ``slots``; returns the slots whose new token must be fed (the others finished)."""
        stack = self.stack
        index = torch.tensor(slots, dtype=torch.long, device=stack.device)
        cos, sin = stack.rope(self.position[index])
        zeros = torch.zeros_like(index)
        for site, layer_id in enumerate(stack.suffix_layers):
            hidden = apply_layer(stack, stack.layers[layer_id], hidden, cos, sin,
                                 self.buffers.suffix[site], index, zeros, None)
        logits = stack.lm_head(stack.norm(hidden))
        next_tokens = logits.argmax(dim=-1).tolist()  # every greedy sequence's choice, in one call
        for row, slot in enumerate(slots):
            if not self.slots[slot].request.sampling.greedy:
                next_tokens[row] = self.slots[slot].next_token(logits[row])
        self.position[index] += 1
        return [slot for slot, token in zip(slots, next_tokens) if self._accept(slot, token)]

    def _embed_prefix(self, index: Tensor) -> Tensor:
        """Embedding and prefix layers for the newest tokens of slots ``index`` ``[n]``; ``[n, h]`` out."""
        stack = self.stack
        tokens = torch.tensor([self.slots[s].tokens[-1] for s in index.tolist()], dtype=torch.long,
                              device=stack.device)
        hidden = stack.embed(tokens)
        cos, sin = stack.rope(self.position[index])
        zeros = torch.zeros_like(index)
        for site in range(stack.num_prefix):
            hidden = apply_layer(stack, stack.layers[site], hidden, cos, sin, self.buffers.prefix[site],
                                 index, zeros, None)
        return hidden


class SequenceWiseEngine(_Engine):
    """Continuous sequence-wise batching for models without routing (vanilla Llama, or MoR routing `none`).

    Args:
        model: a ``LlamaForCausalLM`` or a ``MoRForCausalLM`` with routing `none` (in eval mode).
        num_slots: sequences decoded together (the batch of every step).
        max_len: cached tokens per sequence (prompt + max_new_tokens - 1 at most).
        eos_token_id: a sequence ends after generating it; None: only ``max_new_tokens`` ends sequences.
        block_size: tokens per KV block.
        kv_blocks: blocks in the KV pool, shared by all layers; None: enough for every slot at ``max_len``.
    """

    def __init__(self, model: nn.Module, *, num_slots: int, max_len: int, eos_token_id: int | None,
                 block_size: int = 16, kv_blocks: int | None = None):
        super().__init__(model, num_slots=num_slots, max_len=max_len, eos_token_id=eos_token_id,
                         block_size=block_size, kv_blocks=kv_blocks)
        if self.stack.routing != "none":
            raise ValueError("SequenceWiseEngine runs every token through every layer, but the model has "
                             f"routing={self.stack.routing!r}; serve it with DepthWiseEngine")

    def _serve(self) -> None:
        active = self._admit()
        while active:
            self.stats.decode_steps += 1
            self.stats.decode_step_tokens += len(active)
            active = self._guarded(active, self._step) + self._admit()

    def _step(self, slots: list[int]) -> list[int]:
        """One token for every slot in ``slots`` through all unrolled layers; returns the slots going on."""
        stack = self.stack
        index = torch.tensor(slots, dtype=torch.long, device=stack.device)
        hidden = self._embed_prefix(index)
        cos, sin = stack.rope(self.position[index])
        for depth, layer_ids in enumerate(stack.recursion_layers):
            depths = torch.full_like(index, depth)
            for site, layer_id in enumerate(layer_ids):
                hidden = apply_layer(stack, stack.layers[layer_id], hidden, cos, sin,
                                     self.buffers.shared[site], index, depths, None)
        for slot in slots:
            self.slots[slot].token_depths.append(stack.num_recursions)
        return self._finish_tokens(slots, hidden)


class DepthWiseEngine(_Engine):
    """Continuous depth-wise batching for MoR models (module docstring).

    Args:
        model: a ``MoRForCausalLM`` (in eval mode) with cycle or middle-cycle sharing, any routing and KV
            mode.
        num_slots: sequences resident at once (each has one token in flight). With ``num_slots > max_batch``
            the pool holds more tokens than one shared-block pass takes, so passes stay full while tokens
            exit.
        max_batch: most tokens per pass through the shared block, and per pass of exited tokens through the
            suffix and LM head.
        max_len: cached tokens per sequence and depth (prompt + max_new_tokens - 1 at most).
        eos_token_id: a sequence ends after generating it; None: only ``max_new_tokens`` ends sequences.
        block_size: tokens per KV block.
        kv_blocks: blocks in the KV pool, shared by all layers and depths; None: enough for every slot at
            ``max_len`` at every depth (never runs out). Smaller pools hold what routing really caches; one
            that runs out raises ``KVPoolExhausted``.
    """

    def __init__(self, model: nn.Module, *, num_slots: int, max_batch: int, max_len: int,
                 eos_token_id: int | None, block_size: int = 16, kv_blocks: int | None = None):
        super().__init__(model, num_slots=num_slots, max_len=max_len, eos_token_id=eos_token_id,
                         block_size=block_size, kv_blocks=kv_blocks)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"DepthWiseEngine: max_batch must be an integer >= 1, got {max_batch!r}")
        if not self.stack.is_cycled:
            raise ValueError("DepthWiseEngine batches tokens of different depths through the same layers, "
                             "which needs sharing 'cycle' or 'middle_cycle'; serve sequence-shared models "
                             "(routing none) with SequenceWiseEngine")
        self.max_batch = max_batch
        stack, slots = self.stack, num_slots
        # Per-slot state of the in-flight token. hidden: its hidden state; first_hidden: token-choice H1
        # (after the prefix layers); gate: expert-choice, of the recursion it runs next, token-choice, of its
        # last one; target: token-choice index of its last recursion; depth: the recursion it runs next
        # (once it exited: the recursions it ran).
        self.hidden = torch.zeros(slots, stack.embed.embedding_dim, dtype=stack.dtype, device=stack.device)
        self.first_hidden = torch.zeros_like(self.hidden)
        self.gate = torch.zeros(slots, dtype=stack.dtype, device=stack.device)
        self.target = torch.zeros(slots, dtype=torch.long, device=stack.device)
        self.depth = torch.zeros(slots, dtype=torch.long, device=stack.device)
        self.capacities = torch.tensor(stack.capacities or [1.0] * stack.num_recursions, device=stack.device)
        self.pool: deque[int] = deque()
        self.exits: list[int] = []

    def _serve(self) -> None:
        self.pool.clear()
        self.exits.clear()
        entering = self._admit()
        while entering or self.pool or self.exits:
            if entering:
                self._guarded(entering, self._enter)
            entering = []
            if self.pool:
                self._guarded([self.pool.popleft() for _ in range(min(self.max_batch, len(self.pool)))],
                              self._block_step)
            if self.exits and (len(self.exits) >= self.max_batch or not self.pool):
                batch, self.exits = self.exits[:self.max_batch], self.exits[self.max_batch:]
                entering = self._guarded(batch, self._exit_step) + self._admit()

    def _enter(self, slots: list[int]) -> None:
        """Embedding + prefix layers, then the decision on recursion 0."""
        stack = self.stack
        index = torch.tensor(slots, dtype=torch.long, device=stack.device)
        hidden = self._embed_prefix(index)
        self.hidden[index] = hidden
        self.depth[index] = 0
        runs = torch.ones(len(slots), dtype=torch.bool, device=stack.device)
        if stack.routing == "expert_choice":
            runs = self._expert_decision(index, hidden, torch.zeros_like(index))
        elif stack.routing == "token_choice":
            bias = stack.router.depth_bias if stack.token_balancing == "loss_free" else None
            self.target[index], self.gate[index], _ = token_choice_depth(stack.router.logits(hidden),
                                                                         stack.router_alpha, bias, stack.dtype)
            self.first_hidden[index] = hidden
        self._place(slots, runs.tolist())

    def _expert_decision(self, index: Tensor, hidden: Tensor, depth: Tensor) -> Tensor:
        """Whether each token runs recursion ``depth`` ``[n]`` (< R); stores its gate. ``[n]`` bool out."""
        stack = self.stack
        logits = stack.router.logits(hidden).gather(-1, depth[:, None]).squeeze(-1)  # fp32 [n]
        self.gate[index] = expert_gate(logits, stack.router_alpha, stack.dtype)
        return threshold_decision(logits, self.capacities[depth])

    def _place(self, slots: list[int], runs: list[bool]) -> None:
        for slot, run in zip(slots, runs):
            (self.pool.append if run else self.exits.append)(slot)

    def _block_step(self, slots: list[int]) -> None:
        """One pass of pooled tokens (up to ``max_batch``), each at its own depth, through the shared
        block."""
        stack = self.stack
        index = torch.tensor(slots, dtype=torch.long, device=stack.device)
        depth = self.depth[index]
        hidden = self.hidden[index]
        cos, sin = stack.rope(self.position[index])
        if stack.kv_mode == "shared":  # depth 0 writes its K/V, every depth reads depth 0's
            read, write = torch.zeros_like(depth), (depth == 0).nonzero().squeeze(-1)
        else:
            read, write = depth, None
        out = hidden
        for site, layer_id in enumerate(stack.recursion_layers[0]):
            out = apply_layer(stack, stack.layers[layer_id], out, cos, sin, self.buffers.shared[site], index,
                              read, write)
        following = depth + 1
        runs = following < stack.num_recursions
        if stack.routing == "expert_choice":
            hidden = expert_choice_update(hidden, self.gate[index], out)
            last = stack.num_recursions - 1
            runs = runs & self._expert_decision(index, hidden, following.clamp(max=last))
        elif stack.routing == "token_choice":
            last = depth == self.target[index]
            hidden = token_choice_update(out, exits=last, first_hidden=self.first_hidden[index],
                                         gate=self.gate[index])
            runs = ~last
        else:
            hidden = out
        self.hidden[index] = hidden
        self.depth[index] = following
        self.stats.decode_steps += 1
        self.stats.decode_step_tokens += len(slots)
        self.stats.mixed_depth_steps += int(bool((depth != depth[0]).any()))
        self._place(slots, runs.tolist())

    def _exit_step(self, slots: list[int]) -> list[int]:
        """Suffix, norm, LM head for exited tokens; returns the slots whose new token must be fed."""
        index = torch.tensor(slots, dtype=torch.long, device=self.stack.device)
        for slot, ran in zip(slots, self.depth[index].tolist()):
            self.slots[slot].token_depths.append(ran)
        return self._finish_tokens(slots, self.hidden[index])
