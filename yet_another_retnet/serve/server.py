"""``retnet serve``: an HTTP API in the shape of OpenAI's completions and chat completions, on
FastAPI/Starlette (the ``[serve]`` extra), decoding concurrent requests together (:mod:`.engine`).

Endpoints: ``POST /v1/completions`` (``prompt``), ``POST /v1/chat/completions`` (``messages``, laid
out as the ``User:``/``Assistant:`` transcript of :mod:`.chat`), ``GET /v1/models``, ``GET /health``
(requests in flight and waiting). ``"stream": true`` sends server-sent events, one chunk per
piece of text and ``data: [DONE]`` at the end. A client that disconnects frees its slot at the next
step. A malformed request gets a 400 whose ``error.message`` names the field.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..training.data import StreamDecoder
from .chat import ASSISTANT
from .engine import Engine
from .engine import Request as EngineRequest


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Sampling):
    prompt: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}})


def chat_prompt(messages: list[Message]) -> str:
    """The transcript the model continues: one ``Role: content`` line per message, then ``Assistant:``."""
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join(lines) + "\n" + ASSISTANT


def build_app(model: Any, tokenizer: Any, name: str = "retnet", max_batch: int = 16,
              max_tokens_limit: int = 4096) -> FastAPI:
    """The FastAPI application serving ``model`` (its engine thread runs while the app does)."""
    engine = Engine(model, max_batch=max_batch)
    vocab = int(model.config.vocab_size)

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
        message = f"{field_name}: {first.get('msg', 'invalid')}" if field_name else str(first.get("msg", "invalid request"))
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

    def encode(text: str, body: _Sampling, field_name: str) -> list[int]:
        if body.max_tokens > max_tokens_limit:
            raise BadRequest(f"max_tokens: at most {max_tokens_limit} on this server, got {body.max_tokens}",
                             "max_tokens")
        ids = tokenizer.encode(text)
        if not ids:
            raise BadRequest(f"{field_name}: must hold at least one token", field_name)
        if max(ids) >= vocab:
            raise BadRequest(f"{field_name}: the tokenizer gave ids beyond the model's vocabulary", field_name)
        return list(ids)

    async def run(ids: list[int], body: _Sampling, chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()

        def emit(token: int | None, finish: str | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (token, finish))

        seed = body.seed if body.seed is not None else random.getrandbits(63)
        request = EngineRequest(ids, body.max_tokens, emit, body.temperature, body.top_p, body.top_k, seed)
        engine.submit(request)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        async def pieces() -> AsyncIterator[tuple[str, str | None]]:
            decoder = StreamDecoder(tokenizer)
            try:
                while True:
                    token, finish = await events.get()
                    if finish is not None:
                        tail = decoder.flush()
                        yield tail, finish
                        return
                    assert token is not None
                    yield decoder.push(token), None
            finally:
                request.cancel()  # a no-op after the end; frees the slot if the client left

        def choice(text: str, finish: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            key = "delta" if delta else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                count = 0
                async for text, finish in pieces():
                    if finish is not None and finish.startswith("error"):
                        yield f"data: {json.dumps({'error': {'message': finish}})}\n\n"
                        return
                    count += finish is None
                    chunk = {"id": ident, "object": kind + (".chunk" if chat else ""), "created": created,
                             "model": name, "choices": [choice(text, finish, True)]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        parts: list[str] = []
        reason = "length"
        count = 0
        async for text, finish in pieces():
            parts.append(text)
            if finish is not None:
                reason = finish
            else:
                count += 1
        if reason.startswith("error"):
            return JSONResponse(status_code=500, content={"error": {"message": reason, "type": "server_error"}})
        return {"id": ident, "object": kind, "created": created, "model": name,
                "choices": [choice("".join(parts), reason, False)],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await run(encode(body.prompt, body, "prompt"), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        return await run(encode(chat_prompt(body.messages), body, "messages"), body, chat=True)

    return app
