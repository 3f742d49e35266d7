"""An OpenAI-compatible completions server over a serving engine (``mor-serve``; docs/serving.md).

One thread runs the engine's step loop (:meth:`~mor_megatron.inference.engine._Engine.serve`); HTTP handlers
tokenize, submit a :class:`~mor_megatron.inference.engine.Ticket` per prompt and await its events, which the
engine's callbacks hand to the event loop with ``call_soon_threadsafe``. Requests therefore join the running
batch between steps, and tokens stream out as they are chosen.

Stop strings become token sequences for the engine (``tokenizer.encode``), which ends a request on them
without decoding. A stop string can tokenize differently inside the text, so the server also looks for it
in the decoded text: the text is cut before the first stop string, and a match cancels the request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mor_megatron.inference.engine import Completion, DepthWiseEngine, SequenceWiseEngine, Ticket
from mor_megatron.inference.engine import Request as EngineRequest
from mor_megatron.inference.kv_buffers import KVPoolExhausted
from mor_megatron.inference.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default


class BadRequest(ValueError):
    """A request the server refuses (status 400), naming the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CompletionParams:
    """A validated ``POST /v1/completions`` body."""

    prompts: list[str]
    max_tokens: int
    stream: bool
    stop: list[str]
    sampling: SamplingParams


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "a boolean"}


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    """``body[name]`` (``default`` if absent or null); BadRequest unless it is one of ``kinds``."""
    value = body.get(name)
    if value is None:
        return default
    # bool is an int subclass, but `"max_tokens": true` is a client bug, not 1.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = "a number" if float in kinds else " or ".join(_KIND_NAMES[k] for k in kinds)
        raise BadRequest(name, f"'{name}' must be {expected}, got {type(value).__name__} {value!r}")
    return value


def parse_completion_request(body: Any) -> CompletionParams:
    """Check an OpenAI completions body; BadRequest names the field at fault."""
    if not isinstance(body, dict):
        raise BadRequest("body", "the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest("prompt", "'prompt' is required: a string or a non-empty list of strings")
    _field(body, "model", (str,), None)  # type-checked only: the server has one model
    max_tokens = _field(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise BadRequest("max_tokens", f"'max_tokens' must be >= 1, got {max_tokens}")
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise BadRequest("n", f"'n' must be 1 (one completion per prompt), got {n}")
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop", "'stop' must be a non-empty string or a list of non-empty strings")
    temperature = _field(body, "temperature", (float, int), 1.0)
    top_p = _field(body, "top_p", (float, int), 1.0)
    top_k = _field(body, "top_k", (int,), None)
    seed = _field(body, "seed", (int,), 0)
    try:
        sampling = SamplingParams(temperature=float(temperature), top_k=top_k, top_p=float(top_p), seed=seed)
    except ValueError as err:  # its messages start with the field's name
        raise BadRequest(str(err).split(" ", 1)[0], str(err)) from None
    stream = _field(body, "stream", (bool,), False)
    return CompletionParams(prompts=prompts, max_tokens=max_tokens, stream=stream, stop=stop,
                            sampling=sampling)


@dataclass
class _Choice:
    """The text of one prompt's completion as its tokens arrive. ``live``: decode as tokens arrive (to stream,
    or to find stop strings); each decode is of the whole completion, which keeps the text exact (a token's
    text can depend on its neighbours) at a cost quadratic in its length."""

    ticket: Ticket
    stops: list[str]
    decode: Callable[[list[int]], str]
    live: bool
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    text: str = ""
    completion: Completion | None = None
    stopped_in_text: bool = False

    def _cut(self, tokens: list[int]) -> str:
        text = self.decode(tokens)
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        if cuts:
            self.stopped_in_text = True
            self.ticket.cancel()
            return text[:min(cuts)]
        return text

    def add(self, token: int) -> str:
        """Take a new token; returns the text now safe to send (never part of a possible stop string)."""
        self.tokens.append(token)
        if not self.live:
            return ""
        text = self._cut(self.tokens)
        if not self.stopped_in_text:
            # The end may be the start of a stop string, or half a multi-byte character.
            text = text[:len(text) - max((len(s) - 1 for s in self.stops), default=0)].rstrip("\ufffd")
        return self._advance(text)

    def finish(self, completion: Completion) -> str:
        """Take the completion; returns the rest of the text."""
        self.completion = completion
        self.text = self._cut(completion.tokens)
        return self._advance(self.text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def finish_reason(self) -> str:
        stopped = self.stopped_in_text or self.completion.finish_reason in ("eos", "stop")
        return "stop" if stopped else "length"


class CompletionServer:
    """The engine, its thread and the tokenizer behind the HTTP app."""

    def __init__(self, engine: DepthWiseEngine | SequenceWiseEngine, tokenizer: Any, model_name: str):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.created = int(time.time())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=engine.serve, args=(self._stop,), name="mor-engine",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def engine_request(self, prompt: list[int], params: CompletionParams) -> EngineRequest:
        """The engine's request for one tokenized prompt; BadRequest if it cannot fit the engine."""
        if not prompt:
            raise BadRequest("prompt", "'prompt' tokenizes to no tokens; give at least one character")
        cached = len(prompt) + params.max_tokens - 1
        if cached > self.engine.max_len:
            # The newest token is never cached: max_len cached tokens allow max_len + 1 in all.
            limit, total = self.engine.max_len + 1, cached + 1
            raise BadRequest("max_tokens", f"prompt ({len(prompt)} tokens) + max_tokens "
                             f"({params.max_tokens}) = {total} tokens exceeds this server's limit of {limit} "
                             f"(max_len={self.engine.max_len}); shorten the prompt or lower max_tokens")
        stop = tuple(tuple(ids) for ids in map(self.encode, params.stop) if ids)
        return EngineRequest(prompt=tuple(prompt), max_new_tokens=params.max_tokens,
                             sampling=dataclasses.replace(params.sampling, stop=stop))

    def submit(self, params: CompletionParams) -> tuple[list[_Choice], asyncio.Queue]:
        """Submit every prompt; events ``(choice index, token | Completion | Exception)`` arrive on the
        queue. BadRequest (nothing submitted) if a prompt does not fit."""
        requests = [self.engine_request(self.encode(prompt), params) for prompt in params.prompts]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(index: int) -> Callable[[Any], None]:
            def put(event: Any) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))
                except RuntimeError:  # the event loop closed (shutdown): nobody waits, and the engine goes on
                    pass
            return put

        choices = []
        for index, request in enumerate(requests):
            ticket = Ticket(request, on_token=post(index), on_finish=post(index))
            choices.append(_Choice(ticket=ticket, stops=params.stop, decode=self.decode,
                                   live=params.stream or bool(params.stop)))
        for choice in choices:
            self.engine.submit(choice.ticket)
        return choices, events


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


def _usage(choices: list[_Choice]) -> dict[str, int]:
    prompt = sum(len(c.ticket.request.prompt) for c in choices)
    completion = sum(len(c.completion.tokens) for c in choices if c.completion is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _events(choices: list[_Choice], events: asyncio.Queue) -> AsyncIterator[tuple[int, str, bool]]:
    """``(choice index, new text, finished)`` until every choice finished; cancels the unfinished tickets
    if the consumer stops early (client gone). A request the engine failed raises the error that ended it
    (KVPoolExhausted; anything else is an engine bug, which also stopped the engine thread)."""
    pending = len(choices)
    try:
        while pending:
            index, event = await events.get()
            choice = choices[index]
            if isinstance(event, Exception):
                raise event
            if isinstance(event, Completion):
                pending -= 1
                yield index, choice.finish(event), True
            else:
                yield index, choice.add(event), False
    finally:
        for choice in choices:
            if choice.completion is None:
                choice.ticket.cancel()


def create_app(server: CompletionServer) -> FastAPI:
    """The HTTP app; its lifespan starts and stops the engine thread."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.start()
        yield
        server.close()

    app = FastAPI(title="mor-serve", lifespan=lifespan)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not server.alive:
            return JSONResponse({"status": "engine thread stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": server.created, "owned_by": "mor_megatron"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, f"the request body is not valid JSON: {err}", "body")
        try:
            params = parse_completion_request(body)
            if not server.alive:  # nothing would ever answer
                return _error(503, "the engine thread stopped; see the server's log and restart it")
            choices, events = server.submit(params)
        except BadRequest as err:
            return _error(400, str(err), err.param)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_name}
        if params.stream:
            return StreamingResponse(_stream(head, choices, events), media_type="text/event-stream")
        try:
            async for _ in _events(choices, events):
                pass
        except KVPoolExhausted as err:
            return _error(503, f"{type(err).__name__}: {err}")
        return {**head, "choices": [{"text": c.text, "index": i, "logprobs": None,
                                     "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": _usage(choices)}

    return app


async def _stream(head: dict[str, Any], choices: list[_Choice], events: asyncio.Queue) -> AsyncIterator[str]:
    """Server-Sent Events: a chunk per new text (and one with each finish reason), then ``[DONE]``."""

    def chunk(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    try:
        async for index, text, finished in _events(choices, events):
            if text or finished:
                reason = choices[index].finish_reason if finished else None
                yield chunk({**head, "choices": [{"text": text, "index": index, "logprobs": None,
                                                  "finish_reason": reason}]})
    except KVPoolExhausted as err:  # the status was sent already: the error goes in the stream
        yield chunk({"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error"}})
    yield "data: [DONE]\n\n"
