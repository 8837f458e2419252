"""One generation as the non-SSE transports see it: validated like the SSE endpoint, counted in the same stats.

The SSE endpoint's `ChatStream` yields bytes already framed as events; the other
transports frame tokens their own way (a WebSocket message, a Protobuf message, a
JSON list in a poll's answer), so they share this plain-message version instead:
`TokenRun.messages()` yields `Token`, then `Done` or `Failed`. Parameters go
through the server's own `parse_request` and `parse_stream_options` (so a bad
`token_ms` is refused with the same reason on every transport), and the run
counts itself into the app's `StreamStats` exactly as a stream does: active,
completed, failed, cancelled, tokens generated and wasted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.requests import Request

from ..model import GenerationRequest, TokenSource
from ..server import (
    InvalidParameter,
    Settings,
    StreamOptions,
    StreamStats,
    TooManyStreams,
    parse_request,
    parse_stream_options,
)

logger = logging.getLogger(__name__)


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
    if stats.streams_active >= settings.max_concurrent_streams:
        stats.streams_rejected += 1
        raise TooManyStreams
    stats.streams_active += 1


class TokenRun:
    """One generation, its slot already taken (`take_slot`): `messages()` yields Token..., then Done or Failed.

    Set `client_gone` when the client leaves: tokens produced after that count as
    wasted. Whatever ends it, the caller calls `end()` once it knows the outcome
    (a time limit it enforces makes it "failed"): that gives the slot back.
    """

    def __init__(
        self,
        source: TokenSource,
        generation: GenerationRequest,
        options: StreamOptions,
        stats: StreamStats,
    ) -> None:
        self.source = source
        self.generation = generation
        self.options = options
        self.stats = stats
        self.client_gone = False
        self.outcome = "cancelled"  # until it ends on its own
        self._ended = False

    async def messages(self) -> AsyncGenerator[Message, None]:
        generation, options = self.generation, self.options
        tokens: AsyncIterator[str] = aiter(self.source(generation))
        index = 0
        try:
            while index < generation.max_tokens:
                if options.prompt_tokens + index >= options.context_window:
                    message = f"{options.prompt_tokens} prompt tokens + {index} generated fill the window"
                    yield self._failed("context_length_exceeded", message)
                    return
                try:
                    token = await anext(tokens)
                except StopAsyncIteration:
                    break
                except Exception as failure:  # one line in the log, no traceback in a notebook
                    logger.warning("model failed after %d tokens: %r", index, failure)
                    yield self._failed("model_error", f"the model failed after {index} tokens")
                    return
                self.stats.tokens_generated += 1
                if self.client_gone:
                    self.stats.tokens_wasted += 1
                if any(word.casefold() in token.casefold() for word in options.blocklist):
                    yield self._failed("content_filter", f"token {index} was withheld by the content filter")
                    return
                yield Token(token, index)
                index += 1
            self.outcome = "completed"
            yield Done("length" if index >= generation.max_tokens else "stop", index)
        finally:
            aclose = getattr(tokens, "aclose", None)
            if aclose is not None:
                await aclose()

    def end(self) -> None:
        """Give the slot back, counting the outcome: completed, failed, or cancelled (the client left or asked)."""
        if not self._ended:
            self._ended = True
            self.stats.stream_ended("cancelled" if self.client_gone else self.outcome)

    def _failed(self, code: str, message: str) -> Failed:
        self.outcome = "failed"
        return Failed(code, message)
