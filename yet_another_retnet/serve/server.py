"""``retnet serve``: an HTTP API in the shape of OpenAI's completions and chat completions, on
FastAPI/Starlette (the ``[serve]`` extra), decoding concurrent requests together (:mod:`.engine`).

Endpoints: ``POST /v1/completions`` (``prompt``: a text, token ids, or a list of either), ``POST
/v1/chat/completions`` (``messages``, laid out as the ``User:``/``Assistant:`` transcript of
:mod:`.chat`; a reply ends at its line break), ``GET /v1/models``, ``GET /health`` (requests in
flight and waiting). ``"stream": true`` sends server-sent events, one chunk per piece of text and
``data: [DONE]`` at the end. Generation stops at the tokenizer's end-of-sequence token and at the
``stop`` strings (``finish_reason`` ``"stop"``).
``logit_bias``, ``presence_penalty`` and ``frequency_penalty`` adjust each request's logits as
OpenAI's API defines them; ``logprobs`` (and chat's ``top_logprobs``) return each token's
log-probability (:mod:`.logprobs`; with ``echo``, the prompt's tokens' too); ``n`` choices run as
requests of their own (seeds ``seed + i``; those beyond the batch wait for its rows). A client that
disconnects, streaming or not, frees its slots at the next step. A malformed request, or one with a
field this server does not know or support, gets a 400 whose ``error.message`` names the field; a
full queue gets a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..training.data import StreamDecoder
from .chat import ASSISTANT, end_token, with_bos
from .engine import MAX_WAITING, Engine, QueueFull
from .engine import Request as EngineRequest
from .logprobs import MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS, LogprobsLayout, TokenLogprobs

#: The seeds ``torch.Generator.manual_seed`` takes (a negative one counts modulo 2**64).
SEED_RANGE = (-(2**63), 2**64 - 1)
#: ``stop`` strings a request may give at most (as OpenAI's API).
MAX_STOPS = 4
#: Seconds a client refused for a full queue is asked to wait (``Retry-After``).
RETRY_AFTER = 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: A last chunk with no choices and the request's token counts, before ``[DONE]`` (OpenAI's shape).
    include_usage: bool = False


class _Sampling(BaseModel):
    # Unknown fields are refused, not ignored: a misspelt or unsupported one (``max_token``,
    # ``best_of``) would otherwise get a 200 that does not do what was asked.
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    n: int = Field(1, ge=1, le=128)  # choices, each a request of its own (OpenAI's limit: 128)
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    # An end-user id OpenAI's clients may send (for its abuse monitoring): accepted, not used.
    user: str | None = None
    # OpenAI's: a bias (-100 to 100) added to the logit of each token id named (as a string), and
    # penalties on tokens by whether and how often the completion has generated them.
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # Completions: how many alternatives per token (0 to 5) with each token's log-probability;
    # chat: whether to return them (with top_logprobs alternatives). See serve/logprobs.py.
    logprobs: bool | int | None = None


class CompletionRequest(_Sampling):
    # A text, token ids, or several of either (each its own choices, index = prompt * n + choice).
    prompt: str | list[int] | list[str] | list[list[int]]
    # The prompt's text before the completion's (and with logprobs, its tokens' entries first: the
    # first token's logprob null, each other's from the positions before it).
    echo: bool | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers, content={
        "error": {"message": message, "type": kind, "param": param, "code": None}})


def _top_logprobs(body: _Sampling) -> int | None:
    """The alternatives per token the request asks log-probabilities for; ``None``: none asked."""
    if isinstance(body, ChatRequest):
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise BadRequest("logprobs: true or false in a chat request (top_logprobs says how many)", "logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs: needs logprobs: true", "top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    if body.logprobs is None:
        return None
    if isinstance(body.logprobs, bool) or not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise BadRequest(f"logprobs: an integer from 0 to {MAX_COMPLETION_LOGPROBS} (the alternatives per token), "
                         f"got {body.logprobs!r}", "logprobs")
    return body.logprobs


def _logit_bias(body: _Sampling, vocab: int) -> dict[int, float] | None:
    """``logit_bias`` with its keys read as token ids in ``[0, vocab)`` and its values checked."""
    if not body.logit_bias:
        return None
    bias: dict[int, float] = {}
    for key, value in body.logit_bias.items():
        try:
            token: int | None = int(key)
        except ValueError:
            token = None
        if token is None or not 0 <= token < vocab:
            raise BadRequest(f"logit_bias: keys must be token ids in [0, {vocab}), got {key!r}", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise BadRequest(f"logit_bias: values must be in [-100, 100], got {value} for {key!r}", "logit_bias")
        bias[token] = value
    return bias


def _max_new_tokens(body: _Sampling, limit: int) -> int:
    """``max_completion_tokens`` or else ``max_tokens``, at most ``limit``."""
    name, value = "max_tokens", body.max_tokens
    if body.max_completion_tokens is not None:
        if "max_tokens" in body.model_fields_set and body.max_tokens != body.max_completion_tokens:
            raise BadRequest("max_completion_tokens: differs from max_tokens; give one of them",
                             "max_completion_tokens")
        name, value = "max_completion_tokens", body.max_completion_tokens
    if value > limit:
        raise BadRequest(f"{name}: at most {limit} on this server, got {value}", name)
    return value


def _stops(body: _Sampling) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"stop: at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if not all(stops):
        raise BadRequest("stop: the strings must not be empty", "stop")
    return stops


class StopText:
    """Generated text cut at the first of ``stops``, piece by piece as it streams.

    Text that could be the start of a stop string is held back until the next piece settles it,
    so a streaming client never sees part of a stop string (which may span several tokens)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""
        self.stopped = False  # a stop string was met: the text ended before it

    def push(self, text: str) -> str:
        """What can be sent of the held text and ``text``: up to the first stop string, if one is
        there (``stopped`` is then set), else all but the end that may start one."""
        text = self.held + text
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.held, self.stopped = "", True
            return text[:min(found)]
        keep = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held text: the generation ended without completing a stop string."""
        held, self.held = self.held, ""
        return held


async def _cancel_on_disconnect(http: Request, requests: list[EngineRequest]) -> None:
    """Cancel ``requests`` when the client of ``http`` goes away. The body has been read, so the
    next message the server delivers is the disconnect (what Starlette's streaming responses
    listen for); a non-streaming endpoint is otherwise never told."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    for request in requests:
        request.cancel()


class _Choice:
    """One choice of a response (``n`` of them run as requests of their own): its engine request,
    the tokens its ``emit`` hands over from the engine's thread, and the text they make."""

    def __init__(self, index: int, settings: dict[str, Any], tokenizer: Any, stops: list[str],
                 layout: LogprobsLayout | None, echo: str | None = None) -> None:
        """``settings``: the engine request's fields but ``emit`` (this choice's)."""
        self.index, self.tokenizer, self.stops, self.layout = index, tokenizer, stops, layout
        self.echo = echo  # the prompt's text, sent before the completion's (completions' echo)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int | None, str | None, TokenLogprobs | None]] = asyncio.Queue()
        self.generated = 0
        self.request = EngineRequest(emit=self._emit, **settings)

    def _emit(self, token: int | None, finish: str | None) -> None:
        # (Read here, on the engine's thread: the next token replaces it.)
        info = self.request.logprobs if token is not None else None
        self.loop.call_soon_threadsafe(self.events.put_nowait, (token, finish, info))

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """``(text, finish_reason)`` as the tokens come; the last one has a finish reason."""
        decoder, cut = StreamDecoder(self.tokenizer), StopText(self.stops)
        decoded = 0  # characters the tokens so far decoded to (a token's text offset)
        echoed = self.echo is None
        try:
            while True:
                token, finish, info = await self.events.get()
                if not echoed:  # at the first event the engine has scored the prompt, if asked
                    echoed = True
                    assert self.echo is not None
                    self._prompt_entries()
                    decoded = len(self.echo)
                    if finish is None or not finish.startswith("error"):
                        yield self.echo, None
                if finish is not None:
                    text = cut.push(decoder.flush())
                    yield text if cut.stopped else text + cut.flush(), "stop" if cut.stopped else finish
                    return
                assert token is not None
                self.generated += 1
                if token == self.request.eos_token_id:  # it ends the text and is none of it; "stop" follows
                    continue
                if self.layout is not None and info is not None:
                    self.layout.add(info, decoded)
                piece = decoder.push(token)
                decoded += len(piece)
                text = cut.push(piece)
                if cut.stopped:
                    yield text, "stop"
                    return
                yield text, None
        finally:
            self.request.cancel()  # a no-op after the end; frees the slot at a stop string or if the client left

    def _prompt_entries(self) -> None:
        """The prompt's tokens into the logprobs, when they were asked and scored: the first with no
        logprob, each other with the engine's entry; offsets from their own decoding."""
        entries = self.request.prompt_entries
        ids = self.request.ids
        if self.layout is None or entries is None or len(entries) != len(ids) - 1:
            return
        decoder, at = StreamDecoder(self.tokenizer), 0
        for i, token in enumerate(ids):
            self.layout.add(TokenLogprobs(token, None, ()) if i == 0 else entries[i - 1], at)
            at += len(decoder.push(token))

    def choice(self, text: str, finish: str | None, chat: bool, delta: bool) -> dict[str, Any]:
        """The choice object of a chunk (``delta``) or of the whole reply."""
        logprobs = self.layout.take() if self.layout is not None else None  # the tokens since the last chunk's
        if not chat:
            return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        key = "delta" if delta else "message"
        return {"index": self.index, key: {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}


def chat_prompt(messages: list[Message]) -> str:
    """The transcript the model continues: one ``Role: content`` line per message, then ``Assistant:``."""
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join(lines) + "\n" + ASSISTANT


def build_app(model: Any, tokenizer: Any, name: str = "retnet", max_batch: int = 16,
              max_tokens_limit: int = 4096, max_waiting: int = MAX_WAITING,
              max_prompt_tokens: int = 32768) -> FastAPI:
    """The FastAPI application serving ``model`` (its engine thread runs while the app does).

    ``max_tokens_limit``: the largest ``max_tokens`` a request may ask; ``max_waiting``: requests
    queued for a slot at most (more get a 503); ``max_prompt_tokens``: the longest prompt (in
    tokens, with the chat transcript's markers) a request may send."""
    if max_tokens_limit < 1 or max_prompt_tokens < 1:
        raise ValueError(f"max_tokens_limit and max_prompt_tokens must be >= 1, got {max_tokens_limit} and "
                         f"{max_prompt_tokens}")
    engine = Engine(model, max_batch=max_batch, max_waiting=max_waiting)
    vocab = int(model.config.vocab_size)
    eos = end_token(tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="yet-another-retnet", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field_name = ".".join(loc) or None
        msg = str(first.get("msg", "invalid"))
        if first.get("type") == "extra_forbidden":
            msg = "not a field this server knows (misspelt, or not supported)"
        message = f"{field_name}: {msg}" if field_name else msg
        return _error(400, message, field_name)

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(400, str(exc), exc.param)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active": engine.active, "waiting": engine.waiting, "steps": engine.steps}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "local"}]}

    def checked(ids: list[int], field_name: str, beyond: str) -> list[int]:
        """A prompt's ids: at least one, each in the vocabulary (else ``beyond``), at most
        ``max_prompt_tokens``."""
        if not ids:
            raise BadRequest(f"{field_name}: must hold at least one token", field_name)
        if min(ids) < 0 or max(ids) >= vocab:
            raise BadRequest(f"{field_name}: {beyond}", field_name)
        if len(ids) > max_prompt_tokens:
            raise BadRequest(f"{field_name}: {len(ids)} tokens, more than this server's limit of "
                             f"{max_prompt_tokens}", field_name)
        return ids

    def encode(text: str, field_name: str) -> list[int]:
        ids = list(tokenizer.encode(text))
        if not ids:  # (checked before the BOS: a BOS alone is no prompt)
            raise BadRequest(f"{field_name}: must hold at least one token", field_name)
        # As `retnet generate`: a pretrained model's prompts start with <s>.
        return checked(with_bos(tokenizer, ids), field_name, "the tokenizer gave ids beyond the model's vocabulary")

    def token_prompt(ids: list[int], field_name: str) -> tuple[list[int], str]:
        """A prompt of token ids (as the client's tokenizer made them: no BOS added) and its text."""
        ids = checked(list(ids), field_name, f"token ids must lie in [0, {vocab})")
        return ids, tokenizer.decode(ids)

    def completion_prompts(body: CompletionRequest) -> list[tuple[list[int], str]]:
        """``(ids, text)`` of each prompt of a completions request."""
        prompt = body.prompt
        if isinstance(prompt, str):
            return [(encode(prompt, "prompt"), prompt)]
        if not prompt:
            raise BadRequest("prompt: an empty list", "prompt")
        if all(isinstance(t, int) for t in prompt):
            return [token_prompt(cast(list[int], prompt), "prompt")]
        prompts: list[tuple[list[int], str]] = []
        for i, p in enumerate(cast(list[str | list[int]], prompt)):
            prompts.append((encode(p, f"prompt[{i}]"), p) if isinstance(p, str) else token_prompt(p, f"prompt[{i}]"))
        return prompts

    async def run(prompts: list[tuple[list[int], str]], body: _Sampling, chat: bool, http: Request) -> Any:
        max_new = _max_new_tokens(body, max_tokens_limit)
        # A chat reply ends at its line break, where the transcript's next "User:" turn would begin
        # (as `retnet chat`'s replies do).
        stops = _stops(body) + (["\n"] if chat else [])
        if len(prompts) * body.n > max_waiting:  # (more than the batch wait for its free rows)
            field_name = "n" if len(prompts) == 1 else "prompt"
            raise BadRequest(f"{field_name}: at most {max_waiting} choices on this server (--max-waiting), got "
                             f"{len(prompts)} prompt(s) x n {body.n}", field_name)
        top = _top_logprobs(body)
        bias = _logit_bias(body, vocab)
        seed = body.seed if body.seed is not None else random.getrandbits(63)
        echo = isinstance(body, CompletionRequest) and bool(body.echo)
        shared = {"max_tokens": max_new, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                  "eos_token_id": eos, "logit_bias": bias, "presence_penalty": body.presence_penalty or 0.0,
                  "frequency_penalty": body.frequency_penalty or 0.0, "top_logprobs": top,
                  "prompt_logprobs": top if echo else None}
        # Choice i of a prompt samples from seed + i (modulo 2**64, as torch reads a seed): n
        # choices differ, and choice 0 is what the request gets with n 1.
        choices = [_Choice(p * body.n + i, {**shared, "ids": ids, "seed": (seed + i) % 2**64}, tokenizer, stops,
                           LogprobsLayout(tokenizer, chat) if top is not None else None, text if echo else None)
                   for p, (ids, text) in enumerate(prompts) for i in range(body.n)]
        submitted: list[_Choice] = []
        try:
            for c in choices:
                engine.submit(c.request)
                submitted.append(c)
        except (QueueFull, RuntimeError) as err:
            for c in submitted:  # all or nothing: the ones queued leave at their turn
                c.request.cancel()
            if isinstance(err, QueueFull):
                return _error(503, f"the server is busy: {err}", kind="server_error",
                              headers={"Retry-After": str(RETRY_AFTER)})
            return _error(503, str(err), kind="server_error")  # the engine's thread died: nothing would answer
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict[str, int]:
            generated = sum(c.generated for c in choices)
            read = sum(len(ids) for ids, _ in prompts)
            return {"prompt_tokens": read, "completion_tokens": generated, "total_tokens": read + generated}

        def event(parts: list[dict[str, Any]], **more: Any) -> str:
            """One server-sent event: a chunk of ``parts`` (its choices) and ``more``."""
            chunk = {"id": ident, "object": kind + (".chunk" if chat else ""), "created": created, "model": name,
                     "choices": parts, **more}
            return f"data: {json.dumps(chunk)}\n\n"

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                # Each choice's pieces as they come, one chunk each (its index in it).
                merged: asyncio.Queue[tuple[_Choice, str, str | None]] = asyncio.Queue()

                async def pump(c: _Choice) -> None:
                    async for text, finish in c.pieces():
                        await merged.put((c, text, finish))

                tasks = [asyncio.create_task(pump(c)) for c in choices]
                try:
                    ended = 0
                    while ended < len(choices):
                        c, text, finish = await merged.get()
                        if finish is not None and finish.startswith("error"):
                            yield f"data: {json.dumps({'error': {'message': finish}})}\n\n"
                            return
                        yield event([c.choice(text, finish, chat, True)])
                        ended += finish is not None
                finally:  # the client left, or an error: every choice's request is cancelled
                    for task in tasks:
                        task.cancel()
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield event([], usage=usage())
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        async def whole(c: _Choice) -> tuple[str, str]:
            parts: list[str] = []
            reason = "length"
            async for text, finish in c.pieces():
                parts.append(text)
                if finish is not None:
                    reason = finish
            return "".join(parts), reason

        # Nothing else tells a non-streaming endpoint that its client left (Starlette's streaming
        # response watches for that itself): without this, its slots would stay taken to max_tokens.
        watcher = asyncio.create_task(_cancel_on_disconnect(http, [c.request for c in choices]))
        try:
            replies = await asyncio.gather(*(whole(c) for c in choices))
        finally:
            watcher.cancel()
        errors = [reason for _, reason in replies if reason.startswith("error")]
        if errors:
            return JSONResponse(status_code=500, content={"error": {"message": errors[0], "type": "server_error"}})
        return {"id": ident, "object": kind, "created": created, "model": name,
                "choices": [c.choice(text, reason, chat, False) for c, (text, reason) in zip(choices, replies,
                                                                                            strict=True)],
                "usage": usage()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        return await run(completion_prompts(body), body, False, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: Request) -> Any:
        text = chat_prompt(body.messages)
        return await run([(encode(text, "messages"), text)], body, True, http)

    return app
