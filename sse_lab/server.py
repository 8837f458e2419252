"""The chat server: one streamed endpoint, one buffered baseline, strict parameters.

    GET /api/chat/stream?prompt=...   text/event-stream: `token` events, then `done`
    GET /api/chat?prompt=...          application/json, sent once generation ends

Both take the same query parameters (see `PARAMETERS`). Anything malformed is
refused with HTTP 422 and a JSON body naming the parameter and the reason. Once a
stream has started, a failing model ends it with an `error` event instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .model import MODELS, GenerationRequest, TokenSource
from .sse import MEDIA_TYPE, encode_event

logger = logging.getLogger(__name__)

T = TypeVar("T")

STREAM_HEADERS = {
    # Caches and the browser must not store a stream; nginx must not buffer it.
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(frozen=True)
class Settings:
    """Server-wide limits and the defaults a request falls back on."""

    max_prompt_chars: int = 8_000
    max_tokens_limit: int = 4_096
    defaults: GenerationRequest = field(default_factory=partial(GenerationRequest, prompt=""))


class InvalidParameter(Exception):
    """A query parameter the server cannot accept; answered with HTTP 422."""

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(f"{parameter}: {reason}")
        self.parameter = parameter
        self.reason = reason


@dataclass(frozen=True)
class _Number:
    kind: type[int] | type[float]
    low: float
    high: float

    def parse(self, name: str, raw: str) -> int | float:
        noun = "an integer" if self.kind is int else "a number"
        reason = f"must be {noun} from {self.low:g} to {self.high:g}, got {raw!r}"
        try:
            value = self.kind(raw)
        except ValueError:
            raise InvalidParameter(name, reason) from None
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise InvalidParameter(name, reason)
        return value


_NUMBERS = {
    "ttft_ms": _Number(float, 0, 60_000),
    "token_ms": _Number(float, 0, 10_000),
    "jitter_ms": _Number(float, 0, 10_000),
    "seed": _Number(int, 0, 2**32 - 1),
}

PARAMETERS = ("prompt", "model", "max_tokens", *_NUMBERS)


def parse_request(
    request: Request, settings: Settings, models: Mapping[str, TokenSource]
) -> tuple[TokenSource, GenerationRequest]:
    """Validate the query string into a token source and a generation request."""
    query = request.query_params
    for name in query:
        if name not in PARAMETERS:
            raise InvalidParameter(name, f"unknown parameter; expected one of {', '.join(PARAMETERS)}")
        if len(query.getlist(name)) > 1:
            raise InvalidParameter(name, "given more than once")
    if "prompt" not in query:
        raise InvalidParameter("prompt", "required")
    prompt = query["prompt"]
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidParameter(
            "prompt", f"{len(prompt)} characters, more than the limit of {settings.max_prompt_chars}"
        )
    model = query.get("model", "sim")
    if model not in models:
        raise InvalidParameter("model", f"unknown model {model!r}; expected one of {', '.join(models)}")
    fields: dict[str, Any] = {"prompt": prompt}
    if "max_tokens" in query:
        limit = _Number(int, 1, settings.max_tokens_limit)
        fields["max_tokens"] = limit.parse("max_tokens", query["max_tokens"])
    for name, number in _NUMBERS.items():
        if name in query:
            fields[name] = number.parse(name, query[name])
    return models[model], replace(settings.defaults, **fields)


def _finish_reason(tokens: int, request: GenerationRequest) -> str:
    return "length" if tokens >= request.max_tokens else "stop"


def _json(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


async def token_events(source: TokenSource, request: GenerationRequest) -> AsyncGenerator[bytes, None]:
    """The event stream for one request: a `token` event per token, then `done`.

    Each token event's id is its index, so a client always knows the last token it
    received. A model that fails mid-stream ends the stream with an `error` event.
    """
    count = 0
    try:
        async for token in source(request):
            yield encode_event(_json({"token": token, "index": count}), event="token", id=str(count))
            count += 1
    except Exception as failure:  # one line in the log, no traceback in a notebook
        logger.warning("model failed after %d tokens: %r", count, failure)
        error = {"code": "model_error", "message": f"the model failed after {count} tokens"}
        yield encode_event(_json(error), event="error")
        return
    done = {"finish_reason": _finish_reason(count, request), "tokens": count}
    yield encode_event(_json(done), event="done")


async def cancel_on_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run `work` until it finishes or the client disconnects, whichever is first.

    Returns None when the client left: the work was cancelled at its next await, so
    a model behind it is not asked for another token. Errors of `work` propagate.
    """

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    working = asyncio.ensure_future(work())
    watching = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((working, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, watching):
            task.cancel()
        await asyncio.wait((working, watching))
    return None if working.cancelled() else working.result()


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response that stops producing when the client leaves.

    Starlette's StreamingResponse only notices a disconnect on servers speaking
    ASGI spec 2.3 or older; this one always listens for it, so a long silence (a
    slow prefill) does not keep a dead stream's model running.
    """

    media_type = MEDIA_TYPE

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, headers=STREAM_HEADERS)
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await cancel_on_disconnect(receive, lambda: self.stream_response(send))
        finally:
            await self.events.aclose()  # run the producers' cleanup now, not at GC


def create_app(settings: Settings | None = None, *, models: Mapping[str, TokenSource] | None = None) -> Starlette:
    """Build the chat app: `settings` sets limits and defaults, `models` the token sources."""
    settings = settings or Settings()
    models = dict(MODELS if models is None else models)

    async def chat_stream(request: Request) -> Response:
        source, generation = parse_request(request, settings, models)
        return EventStreamResponse(token_events(source, generation))

    async def chat(request: Request) -> Response:
        source, generation = parse_request(request, settings, models)

        async def complete() -> list[str]:
            return [token async for token in source(generation)]

        try:
            tokens = await cancel_on_disconnect(request.receive, complete)
        except Exception as failure:
            logger.warning("model failed: %r", failure)
            error = {"error": "model_error", "reason": "the model failed before finishing"}
            return JSONResponse(error, status_code=502)
        if tokens is None:  # nobody is left to answer
            return Response(status_code=499)
        return JSONResponse(
            {
                "text": "".join(tokens),
                "tokens": len(tokens),
                "finish_reason": _finish_reason(len(tokens), generation),
            }
        )

    async def invalid_parameter(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InvalidParameter)
        body = {"error": "invalid_parameter", "parameter": exc.parameter, "reason": exc.reason}
        return JSONResponse(body, status_code=422)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return Starlette(
        routes=[
            Route("/api/chat/stream", chat_stream),
            Route("/api/chat", chat),
        ],
        exception_handlers={InvalidParameter: invalid_parameter, HTTPException: http_error},
    )
