"""The streaming dialects of real LLM APIs, spoken by the kit's server and read by its client.

    POST /v1/chat/completions   OpenAI Chat Completions   (`openai_chat`)
    POST /v1/responses          OpenAI Responses          (`openai_responses`)
    POST /v1/messages           Anthropic Messages        (`anthropic`)
    GET  /v1/models             the token sources, in a list both SDKs read

Each takes its provider's request body (`stream: true` or false) plus the kit's
knobs as extra fields (`ttft_ms`, `token_ms`, `jitter_ms`, `seed`, `fail_after`,
`blocklist`, `context_window`, `heartbeat_s`) and runs the kit's own stream:
same token sources, same limits (max_tokens, prompt length, context window,
concurrent streams, `max_stream_s`), same `/api/stats` counters. Only the
framing differs. A bad body gets 400 in the dialect's own error shape, never
a 500; see `common` for how messages become the prompt.

The client side of each dialect (`stream_request`, `read_event`) is what
`sse_lab.client.stream_chat(..., api=...)` speaks, and what any other measuring
client can reuse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..model import TokenSource
from ..server import (
    InvalidParameter,
    Settings,
    StreamStats,
    TooManyStreams,
    _stream_response,
    cancel_on_disconnect,
    parse_query,
    parse_stream_query,
)
from . import anthropic, openai_chat, openai_responses
from .common import Dialect, DialectError, DialectStream, Reading, StreamRequest, max_body_bytes, read_json

__all__ = ["DIALECTS", "Dialect", "Reading", "StreamRequest", "routes"]

logger = logging.getLogger(__name__)

DIALECTS: dict[str, Dialect] = {
    dialect.name: dialect for dialect in (openai_chat.DIALECT, openai_responses.DIALECT, anthropic.DIALECT)
}


def _refusal(dialect: Dialect, error: DialectError) -> Response:
    headers = {"Retry-After": "1"} if error.kind == "rate_limit" else None
    return JSONResponse(dialect.error_body(error), status_code=error.status, headers=headers)


async def _run_to_the_end(chat: DialectStream) -> None:
    events = chat.events()
    try:
        async for _ in events:
            pass
    finally:
        await events.aclose()


async def _whole(chat: DialectStream, max_stream_s: float) -> bool:
    """Run a stream whose bytes nobody reads, under the time limit: what `stream: false` waits for."""
    try:
        await asyncio.wait_for(_run_to_the_end(chat), max_stream_s)
    except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11 on
        chat.timed_out()
    return True


def endpoint(dialect: Dialect, settings: Settings, models: Mapping[str, TokenSource], stats: StreamStats) -> Route:
    """The route of one dialect, over the app's settings, token sources and counters."""
    limit = max_body_bytes(settings)

    async def answer(request: Request) -> Response:
        try:
            ask = dialect.parse(await read_json(request, limit))
            source, generation = parse_query(ask.query, settings, models, stream=True)
            options = parse_stream_query(ask.query, generation, settings)
            stats.open_stream(settings.max_concurrent_streams)
        except InvalidParameter as error:
            return _refusal(dialect, DialectError.invalid(error))
        except DialectError as error:
            return _refusal(dialect, error)
        except TooManyStreams:
            message = f"all {settings.max_concurrent_streams} stream slots are taken; try again shortly"
            return _refusal(dialect, DialectError("rate_limit", message, code="rate_limit_exceeded"))
        chat = dialect.stream(source, generation, options, settings, stats, ask)

        def release() -> None:
            stats.stream_ended("cancelled" if chat.client_gone else chat.outcome)

        if ask.stream:
            return _stream_response(chat, release)
        finished = None
        try:
            finished = await cancel_on_disconnect(request.receive, lambda: _whole(chat, settings.max_stream_s))
        finally:
            chat.client_gone = finished is None
            release()
        if finished is None or chat.end is None:  # nobody is left to answer
            return Response(status_code=499)
        if chat.end.failed:
            return _refusal(dialect, DialectError(chat.end.reason, chat.end.message, code=chat.end.reason))
        return JSONResponse(dialect.complete(chat))

    return Route(dialect.path, answer, methods=["POST"])


def routes(settings: Settings, models: Mapping[str, TokenSource], stats: StreamStats) -> list[BaseRoute]:
    """Every dialect's route, and `GET /v1/models`, for `sse_lab.server.create_app`."""

    async def list_models(request: Request) -> Response:
        # One list in both providers' shapes: OpenAI reads id/object/owned_by, Anthropic id/type/display_name.
        data = [
            {
                "id": name,
                "object": "model",
                "type": "model",
                "created": 0,
                "created_at": "1970-01-01T00:00:00Z",
                "display_name": name,
                "owned_by": "sse-lab",
            }
            for name in models
        ]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return JSONResponse({"object": "list", "data": data, "has_more": False, "first_id": first, "last_id": last})

    dialect_routes: list[BaseRoute] = [endpoint(dialect, settings, models, stats) for dialect in DIALECTS.values()]
    return [*dialect_routes, Route("/v1/models", list_models)]
