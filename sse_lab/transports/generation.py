"""One generation as the non-SSE transports see it: validated like the SSE endpoint, counted in the same stats.

The SSE endpoint's `ChatStream` yields bytes already framed as events; the other
transports frame tokens their own way (a WebSocket message, a Protobuf message, a
JSON list in a poll's answer), so `TokenRun` runs the same loop (`ChatStream.events`:
context window, model failures, blocklist, `fail_after`, counting) with its output
hooks returning plain messages: `TokenRun.messages()` yields `Token`, then `Done` or `Failed`. Parameters go
through the server's own `parse_request` and `parse_stream_options` (so a bad
`token_ms` is refused with the same reason on every transport), and the run
counts itself into the app's `StreamStats` exactly as a stream does: active,
completed, failed, cancelled, tokens generated and wasted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.requests import Request

from ..model import GenerationRequest, TokenSource
from ..server import (
    ChatStream,
    InvalidParameter,
    Settings,
    StreamOptions,
    StreamStats,
    parse_request,
    parse_stream_options,
)


@dataclass(frozen=True)
class Token:
    """One token and its index in the answer (0 for the first)."""

    token: str
    index: int


@dataclass(frozen=True)
class Done:
    """The generation ended: "length" when max_tokens was reached, else "stop" ("cancelled" when asked to stop)."""

    finish_reason: str
    tokens: int


@dataclass(frozen=True)
class Failed:
    """The generation broke after it started: the codes of the SSE `error` event (model_error, content_filter, ...)."""

    code: str
    message: str


Message = Token | Done | Failed


def _query_value(name: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidParameter(name, f"must be a string or a number, got {json.dumps(value)}")
    return value if isinstance(value, str) else str(value)


def parse_chat(
    params: Mapping[str, object], settings: Settings, models: Mapping[str, TokenSource], *, path: str
) -> tuple[TokenSource, GenerationRequest, StreamOptions]:
    """Validate chat parameters given as a mapping (a WebSocket's JSON, a Protobuf message) as the SSE endpoint would.

    They are turned into the query string of a request to `path` and go through the
    server's own parsers, so names, ranges and reasons are the same everywhere.
    Raises InvalidParameter.
    """
    query = urlencode({name: _query_value(name, value) for name, value in params.items()})
    request = Request({"type": "http", "method": "GET", "path": path, "query_string": query.encode(), "headers": []})
    source, generation = parse_request(request, settings, models)
    return source, generation, parse_stream_options(request, generation, settings)


def take_slot(settings: Settings, stats: StreamStats) -> None:
    """Count a new generation as active, or raise TooManyStreams when every slot is taken (SSE streams included)."""
    stats.open_stream(settings.max_concurrent_streams)


class TokenRun(ChatStream):
    """One generation, its slot already taken (`take_slot`): `messages()` yields Token..., then Done or Failed.

    Set `client_gone` when the client leaves: tokens produced after that count as
    wasted. Whatever ends it, the caller calls `end()` once it knows the outcome
    (a time limit it enforces makes it "failed"): that gives the slot back.
    """

    _ended = False  # set once `end()` has given the slot back

    def messages(self) -> AsyncGenerator[Message, None]:
        return self.events()  # type: ignore[return-value]  # the hooks below make its items messages

    def opening(self) -> bytes:
        return b""  # no `retry` line: these transports do not reconnect by themselves

    def token_event(self, token: str, index: int) -> Token:  # type: ignore[override]
        return Token(token, index)

    def done_event(self, finish_reason: str, tokens: int) -> Done:  # type: ignore[override]
        return Done(finish_reason, tokens)

    def error_event(self, code: str, message: str) -> Failed:  # type: ignore[override]
        return Failed(code, message)

    def end(self) -> None:
        """Give the slot back, counting the outcome: completed, failed, or cancelled (the client left or asked)."""
        if not self._ended:
            self._ended = True
            self.stats.stream_ended("cancelled" if self.client_gone else self.outcome)
