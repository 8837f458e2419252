"""The chat server: one streamed endpoint, one buffered baseline, strict parameters.

    GET /api/chat/stream?prompt=...   text/event-stream: `token` events, then `done`
    GET /api/chat?prompt=...          application/json, sent once generation ends
    GET /api/stats                    counters of the streams and answers served so far
    GET /                             the classroom page (sse_lab.web), and its /static/ files

Both chat endpoints take the same query parameters (see `PARAMETERS`); the
stream takes a few more (`STREAM_PARAMETERS`). Anything malformed is refused
with HTTP 422 and a JSON body naming the parameter and the reason, before any
byte of a stream is sent. Once a stream has started, trouble ends it with an
`error` event (`{"code": ..., "message": ...}`) and a clean end of the response:

    model_error              the model raised (or `fail_after` made it raise)
    content_filter           the next token holds a blocked word; it is not sent
    context_length_exceeded  prompt tokens + generated tokens reached the window
    timeout                  the stream ran longer than the server allows

A stream opens with a `retry:` line and every token event carries its index as
`id`, so a client that lost the connection reconnects with `Last-Event-ID` and
gets the rest of the text, no gap and no duplicate. While the model is silent
(a long prefill), a comment line goes out every `heartbeat_s` seconds.
`drop_after=N` rehearses a lost connection: the response ends after N token
events, without `done`, as a network cut would.

Browsers on other origins may read both chat endpoints when their origin is in
`Settings.cors_origins` (by default loopback on any port); see `sse_lab.web`.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import math
import re
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from functools import partial
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Match, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from .model import MODELS, GenerationRequest, TokenSource, prompt_tokens
from .producer import POLICIES, QUEUE_MAX_LIMIT, decoupled, watch_sends
from .sse import MEDIA_TYPE, encode_comment, encode_event
from .web import LOOPBACK_ORIGINS, CorsMiddleware, check_origin, web_routes

logger = logging.getLogger(__name__)

T = TypeVar("T")

STREAM_HEADERS = {
    # Caches and the browser must not store a stream; nginx must not buffer it.
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

HEARTBEAT = encode_comment("heartbeat")


@dataclass(frozen=True)
class Settings:
    """Server-wide limits, stream behaviour, and the defaults a request falls back on.

    context_window: tokens a model can hold, prompt and reply together.
    blocklist: words the content filter stops a stream on (case-insensitive).
    heartbeat_s: a comment goes out after this many seconds without an event.
    retry_ms: the reconnection delay a stream tells its client (None: say nothing).
    max_concurrent_streams: more open streams than this get HTTP 429.
    max_stream_s: a stream still running after this many seconds ends with an error event.
    cancel_on_disconnect: stop the model when the client leaves. False shows the
        waste of a server that does not: the model runs on and its tokens are dropped.
    backpressure, queue_max: what a stream does when its reader is slower than its
        model (`sse_lab.producer`): `pull` (the model waits for the socket), or a
        producer task with a queue: `buffer` (unbounded), `pause` or `coalesce`
        (of `queue_max` events). send_timeout_s: a write stuck that long ends the
        stream and frees its slot (None: writes may wait forever).
    header_timeout_s: a connection whose request head has not fully arrived this many
        seconds after it opened is answered 408 and closed (`serve_in_background`).
    cors_origins: browser origins on other sites allowed to read the chat endpoints,
        exact (`https://app.example`) or with any port (`http://localhost:*`).
    """

    max_prompt_chars: int = 8_000
    max_tokens_limit: int = 4_096
    context_window: int = 8_192
    blocklist: tuple[str, ...] = ()
    heartbeat_s: float = 15.0
    retry_ms: int | None = 3_000
    max_concurrent_streams: int = 32
    max_stream_s: float = 300.0
    cancel_on_disconnect: bool = True
    cors_origins: tuple[str, ...] = LOOPBACK_ORIGINS

    backpressure: str = "pull"
    queue_max: int = 64
    send_timeout_s: float | None = None
    defaults: GenerationRequest = field(default_factory=partial(GenerationRequest, prompt=""))
    header_timeout_s: float = 5.0
    # The cluster (sse_lab.generations): with a Redis URL, streams are generations kept in Redis,
    # served by any worker. lease_ms: a producer silent this long is taken over. generation_grace_s:
    # a generation runs on this long after its last reader left (None: retry_ms + 2 s).
    # stream_expire_s: a generation's keys are deleted this long after its last write.
    redis_url: str | None = None
    lease_ms: int = 1_500
    generation_grace_s: float | None = None
    stream_expire_s: float = 600.0

    @property
    def max_request_head_bytes(self) -> int:
        """The largest request head (request line and headers) the server reads: the longest valid request fits.

        A character of the prompt or the blocklist takes at most 12 bytes of the request
        line (4 bytes of UTF-8, each percent-encoded in 3); the path, the other parameters
        and the method take less than REQUEST_LINE_ROOM_BYTES, and the headers get
        HEADERS_ROOM_BYTES. So a prompt one character over `max_prompt_chars` still
        reaches the app and gets its 422, whatever its characters.
        """
        return 12 * (self.max_prompt_chars + MAX_BLOCKLIST_CHARS) + REQUEST_LINE_ROOM_BYTES + HEADERS_ROOM_BYTES


class InvalidParameter(Exception):
    """A query parameter the server cannot accept; answered with HTTP 422."""

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(f"{parameter}: {reason}")
        self.parameter = parameter
        self.reason = reason


class TooManyStreams(Exception):
    """Every stream slot is taken; answered with HTTP 429 and Retry-After."""


class InjectedFault(RuntimeError):
    """The failure `fail_after=N` makes a model raise, to rehearse a crash mid-stream."""


# Limits on the request that `Settings.max_request_head_bytes` is computed from.
MAX_BLOCKLIST_CHARS = 1_000
REQUEST_LINE_ROOM_BYTES = 4_096
HEADERS_ROOM_BYTES = 32_768  # a browser's headers, cookies of other apps on localhost included

# Number parameters are plain ASCII decimals, like a token id: Python's int() and float()
# also take other scripts' digits, "1_0", signs, spaces, exponents and leading zeros.
_ASCII_INTEGER = re.compile(r"0|[1-9][0-9]*")
_ASCII_DECIMAL = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]{1,20})?")
_SHOWN_CHARS = 40  # of a refused value, quoted in the reason


def _plain(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else str(bound)


@dataclass(frozen=True)
class _Number:
    kind: type[int] | type[float]
    low: float
    high: float

    def parse(self, name: str, raw: str) -> int | float:
        form = _ASCII_INTEGER if self.kind is int else _ASCII_DECIMAL
        if not form.fullmatch(raw):
            raise self._refused(name, raw)
        try:
            value = self.kind(raw)
        except ValueError:  # an integer of more than 4,300 digits
            raise self._refused(name, raw) from None
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise self._refused(name, raw)
        return value

    def _refused(self, name: str, raw: str) -> InvalidParameter:
        shown = repr(raw if len(raw) <= _SHOWN_CHARS else raw[:_SHOWN_CHARS] + "...")
        if self.kind is int:
            written = "in ASCII digits (no sign, spaces or leading zeros)"
            noun = "an integer"
        else:
            written = "in ASCII digits, with an optional fraction like 2.5 (no sign, exponent, spaces or leading zeros)"
            noun = "a number"
        return InvalidParameter(
            name, f"must be {noun} from {_plain(self.low)} to {_plain(self.high)} {written}, got {shown}"
        )


_NUMBERS = {
    "ttft_ms": _Number(float, 0, 60_000),
    "token_ms": _Number(float, 0, 10_000),
    "jitter_ms": _Number(float, 0, 10_000),
    "seed": _Number(int, 0, 2**32 - 1),
    "ttft_per_prompt_token_ms": _Number(float, 0, 1_000),
}

PARAMETERS = ("prompt", "model", "max_tokens", *_NUMBERS)
STREAM_PARAMETERS = ("last_event_id", "heartbeat_s", "context_window", "blocklist", "fail_after", "drop_after")
BACKPRESSURE_PARAMETERS = ("backpressure", "queue_max", "send_timeout_s")  # see sse_lab.producer
_ALL_STREAM_PARAMETERS = PARAMETERS + STREAM_PARAMETERS + BACKPRESSURE_PARAMETERS

# A token event's id is its index: ASCII digits, no sign, no leading zero.
_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}")


@dataclass(frozen=True)
class StreamOptions:
    """How one stream behaves beyond what the model is asked: see `Settings`.

    prompt_tokens: what the prompt takes of the context window. fail_after: the
    model raises `InjectedFault` instead of producing token number `fail_after`
    (None: never). drop_after: the response ends after this many token events
    of its connection, without `done`, unless the stream is over by then (None:
    never); a resumed connection is dropped after as many again.
    backpressure, queue_max, send_timeout_s: see `Settings`.
    """

    heartbeat_s: float
    context_window: int
    prompt_tokens: int
    blocklist: tuple[str, ...]
    fail_after: int | None = None
    drop_after: int | None = None

    backpressure: str = "pull"
    queue_max: int = 64
    send_timeout_s: float | None = None


@dataclass
class StreamStats:
    """Counters of the streams an app has served, as `GET /api/stats` reports them.

    streams_active: open right now. streams_completed: ended with `done`.
    streams_failed: ended with an `error` event. streams_cancelled: the client
    left before the end. streams_rejected: refused with 429, every slot taken.
    tokens_generated: produced by models for streams. tokens_wasted: of those,
    produced after the client had gone, for nobody. streams_send_timeout: ended
    because a write waited `send_timeout_s` for a reader that took nothing.
    queued_events, queued_bytes, queue_peak_events: the producers' queues (see
    `sse_lab.producer.QueueGauge`).
    """

    streams_active: int = 0
    streams_completed: int = 0
    streams_failed: int = 0
    streams_cancelled: int = 0
    streams_rejected: int = 0
    tokens_generated: int = 0
    tokens_wasted: int = 0
    streams_send_timeout: int = 0
    queued_events: int = 0
    queued_bytes: int = 0
    queue_peak_events: int = 0

    def stream_ended(self, outcome: str) -> None:
        """Move a stream from active to its outcome: completed, failed, send_timeout or cancelled."""
        self.streams_active -= 1
        if outcome == "completed":
            self.streams_completed += 1
        elif outcome == "failed":
            self.streams_failed += 1
        elif outcome == "send_timeout":
            self.streams_send_timeout += 1
        else:
            self.streams_cancelled += 1

    def open_stream(self, max_concurrent_streams: int) -> None:
        """Take a stream slot, or count a rejection and raise TooManyStreams when every slot is taken.

        Call it before any await, so that no two requests get the last slot.
        """
        if self.streams_active >= max_concurrent_streams:
            self.streams_rejected += 1
            raise TooManyStreams
        self.streams_active += 1


def _check_names(query: QueryParams, allowed: tuple[str, ...]) -> None:
    for name in query:
        if name not in allowed:
            if name in STREAM_PARAMETERS + BACKPRESSURE_PARAMETERS:
                raise InvalidParameter(name, "only /api/chat/stream takes this parameter")
            raise InvalidParameter(name, f"unknown parameter; expected one of {', '.join(allowed)}")
        if len(query.getlist(name)) > 1:
            raise InvalidParameter(name, "given more than once")


def parse_request(
    request: Request, settings: Settings, models: Mapping[str, TokenSource]
) -> tuple[TokenSource, GenerationRequest]:
    """Validate the query string into a token source and a generation request."""
    return parse_query(request.query_params, settings, models, stream=request.scope["path"].endswith("/stream"))


def parse_query(
    query: QueryParams, settings: Settings, models: Mapping[str, TokenSource], *, stream: bool
) -> tuple[TokenSource, GenerationRequest]:
    """`parse_request` for parameters from anywhere (`sse_lab.dialects` reads them from JSON bodies)."""
    _check_names(query, _ALL_STREAM_PARAMETERS if stream else PARAMETERS)
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


def parse_resume(request: Request, generation: GenerationRequest) -> GenerationRequest:
    """Read `Last-Event-ID` (header, or the `last_event_id` parameter) into where to resume.

    The id is the index of the last token the client received, so the stream
    resumes at the next one. An empty id means none: start from the beginning.
    """
    header = request.headers.get("last-event-id")
    parameter = request.query_params.get("last_event_id")
    if header is not None and parameter is not None and header != parameter:
        raise InvalidParameter("last_event_id", f"disagrees with the Last-Event-ID header ({header!r})")
    name, raw = ("Last-Event-ID", header) if header is not None else ("last_event_id", parameter)
    if not raw:
        return generation
    if not _TOKEN_ID.fullmatch(raw):
        raise InvalidParameter(name, f"must be the id of a token event (a token index, like '7'), got {raw!r}")
    last = int(raw)
    if last >= generation.max_tokens:
        reason = f"token {last} is beyond the stream: its token ids run from 0 to {generation.max_tokens - 1}"
        raise InvalidParameter(name, reason)
    return replace(generation, resume_from=last + 1)


def parse_stream_options(request: Request, generation: GenerationRequest, settings: Settings) -> StreamOptions:
    """Validate the stream-only parameters; a prompt too long for the context window is refused."""
    return parse_stream_query(request.query_params, generation, settings)


def parse_stream_query(query: QueryParams, generation: GenerationRequest, settings: Settings) -> StreamOptions:
    """`parse_stream_options` for parameters from anywhere."""
    heartbeat_s = settings.heartbeat_s
    if "heartbeat_s" in query:
        heartbeat_s = _Number(float, 0.01, 3_600).parse("heartbeat_s", query["heartbeat_s"])
    context_window = settings.context_window
    if "context_window" in query:
        context_window = int(_Number(int, 1, settings.context_window).parse("context_window", query["context_window"]))
    in_prompt = prompt_tokens(generation.prompt)
    if in_prompt >= context_window:
        reason = f"{in_prompt} tokens leave no room in a context window of {context_window} tokens"
        raise InvalidParameter("prompt", reason)
    blocklist = settings.blocklist
    if "blocklist" in query:
        if len(query["blocklist"]) > MAX_BLOCKLIST_CHARS:
            raise InvalidParameter("blocklist", f"more than the limit of {MAX_BLOCKLIST_CHARS} characters")
        words = [word.strip() for word in query["blocklist"].split(",")]
        if not all(words):
            raise InvalidParameter("blocklist", "must be comma-separated words, none of them empty")
        blocklist += tuple(words)
    fail_after = None
    if "fail_after" in query:
        fail_after = int(_Number(int, 0, settings.max_tokens_limit).parse("fail_after", query["fail_after"]))
    drop_after = None
    if "drop_after" in query:  # at least 1, or a resumed stream would never get further
        drop_after = int(_Number(int, 1, settings.max_tokens_limit).parse("drop_after", query["drop_after"]))
    return StreamOptions(
        heartbeat_s, context_window, in_prompt, blocklist, fail_after, drop_after, *_backpressure(query, settings)
    )


def _backpressure(query: QueryParams, settings: Settings) -> tuple[str, int, float | None]:
    policy = query.get("backpressure", settings.backpressure)
    if policy not in POLICIES:
        raise InvalidParameter("backpressure", f"must be one of {', '.join(POLICIES)}, got {policy!r}")
    queue_max = settings.queue_max
    if "queue_max" in query:
        queue_max = int(_Number(int, 1, QUEUE_MAX_LIMIT).parse("queue_max", query["queue_max"]))
    send_timeout_s = settings.send_timeout_s
    if "send_timeout_s" in query:
        send_timeout_s = _Number(float, 0.01, 3_600).parse("send_timeout_s", query["send_timeout_s"])
    return policy, queue_max, send_timeout_s


def _finish_reason(tokens: int, request: GenerationRequest) -> str:
    return "length" if tokens >= request.max_tokens else "stop"


# One encoder for every event: json.dumps with options builds a new JSONEncoder per call.
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_json_string = json.encoder.encode_basestring  # a str as JSON, without escaping non-ASCII: json.dumps's own


def token_event(token: str, index: int) -> bytes:
    """The bytes of token event number `index`: `encode_event(json, event="token", id=str(index))`, in one step.

    Its data is the JSON `{"token": token, "index": index}` that `json.dumps` with
    ensure_ascii=False writes. JSON escapes CR and LF, so the data is always one
    line, and an index is always a valid id: none of `encode_event`'s checks can
    fail, and the server sends thousands of these per second.

    >>> token_event(" hi", 3)
    b'event: token\\nid: 3\\ndata: {"token":" hi","index":3}\\n\\n'
    """
    return f'event: token\nid: {index}\ndata: {{"token":{_json_string(token)},"index":{index}}}\n\n'.encode()


def _error_event(code: str, message: str) -> bytes:
    return encode_event(_json({"code": code, "message": message}), event="error")


async def _fail_at(tokens: AsyncIterator[str], index: int, fail_at: int) -> AsyncGenerator[str, None]:
    """Pass tokens on from `index`, then raise instead of producing token `fail_at`."""
    try:
        while index < fail_at:
            try:
                yield await anext(tokens)
            except StopAsyncIteration:
                return
            index += 1
        raise InjectedFault(f"fail_after={fail_at}")
    finally:
        await _close(tokens)


async def _close(tokens: AsyncIterator[str]) -> None:
    aclose = getattr(tokens, "aclose", None)
    if aclose is not None:
        await aclose()


class ChatStream:
    """One stream's events, and the counters it keeps up to date.

    `events()` yields the bytes to send: the `retry` line, a `token` event per
    token (id = its index), then `done` or an `error` event. Heartbeats and the
    time limit are the response's business (`EventStreamResponse`). `client_gone`
    is set when the client leaves; tokens the model produces after that count as
    wasted. The bytes come from `opening`, `token_event`, `done_event` and
    `error_event`: `sse_lab.dialects` overrides them to speak other APIs.
    """

    def __init__(
        self,
        source: TokenSource,
        generation: GenerationRequest,
        options: StreamOptions,
        settings: Settings,
        stats: StreamStats,
    ) -> None:
        self.source = source
        self.generation = generation
        self.options = options
        self.settings = settings
        self.stats = stats
        self.client_gone = False
        self.outcome = "cancelled"  # until it ends on its own

    async def events(self) -> AsyncGenerator[bytes, None]:
        if opening := self.opening():
            yield opening
        generation, options = self.generation, self.options
        tokens: AsyncIterator[str] = aiter(self.source(generation))
        if options.fail_after is not None:
            tokens = _fail_at(tokens, generation.resume_from, options.fail_after)
        in_prompt, index, max_tokens = options.prompt_tokens, generation.resume_from, generation.max_tokens
        room = options.context_window - in_prompt  # tokens the window holds after the prompt
        drop_at = None if options.drop_after is None else index + options.drop_after
        stats, blocklist, make_token_event = self.stats, options.blocklist, self.token_event
        next_token = tokens.__anext__  # looked up once: the loop below runs once per token
        try:
            while index < max_tokens:
                if index >= room:
                    message = (
                        f"{in_prompt} prompt tokens + {index} generated fill the window of {options.context_window}"
                    )
                    yield self._failed(self.error_event("context_length_exceeded", message))
                    return
                try:
                    token = await next_token()
                except StopAsyncIteration:
                    break
                except Exception as failure:  # one line in the log, no traceback in a notebook
                    logger.warning("model failed after %d tokens: %r", index, failure)
                    yield self._failed(self.error_event("model_error", f"the model failed after {index} tokens"))
                    return
                stats.tokens_generated += 1
                if self.client_gone:
                    stats.tokens_wasted += 1
                if blocklist and any(word.casefold() in token.casefold() for word in blocklist):
                    yield self._failed(
                        self.error_event("content_filter", f"token {index} was withheld by the content filter")
                    )
                    return
                yield make_token_event(token, index)
                index += 1
                if index == drop_at and index < max_tokens:
                    return  # a connection cut: no `done`, the client resumes with Last-Event-ID
            self.outcome = "completed"
            yield self.done_event(_finish_reason(index, generation), index)
        finally:
            await _close(tokens)

    def opening(self) -> bytes:
        """The bytes before the first token: the `retry` line."""
        if self.settings.retry_ms is None:
            return b""
        # A field line with no blank line after it: it opens the first event's
        # block, so no parser can mistake it for an event of its own.
        return f"retry: {self.settings.retry_ms}\n".encode()

    token_event = staticmethod(token_event)  # token number `index`: `sse_lab.dialects` overrides it as a method

    def done_event(self, finish_reason: str, tokens: int) -> bytes:
        """The end of a stream that ran its course: `length` (max_tokens reached) or `stop`."""
        return encode_event(_json({"finish_reason": finish_reason, "tokens": tokens}), event="done")

    def error_event(self, code: str, message: str) -> bytes:
        """The end of a stream that broke: an `error` event with one of the codes of the module docstring."""
        return _error_event(code, message)

    def timed_out(self) -> bytes:
        """The stream ran over the server's time limit: the error event that ends it."""
        message = f"the stream ran longer than the limit of {self.settings.max_stream_s:g} s"
        return self._failed(self.error_event("timeout", message))

    def _failed(self, event: bytes) -> bytes:
        self.outcome = "failed"
        return event


async def cancel_on_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run `work` until it finishes or the client disconnects, whichever is first.

    Returns None when the client left: the work was cancelled at its next await, so
    a model behind it is not asked for another token. Errors of `work` propagate.
    """
    working = asyncio.ensure_future(work())
    watching = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((working, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, watching):
            task.cancel()
        await asyncio.wait((working, watching))
    return None if working.cancelled() else working.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response that keeps its connection alive, bounded and watched.

    - `heartbeat_s`: a comment goes out whenever nothing else has for that long,
      so proxies do not cut a stream that waits on a slow model.
    - `max_duration_s`: past it, the events stop and `on_timeout()` gives the last
      bytes to send (an error event).
    - The client leaving is noticed at once (Starlette's StreamingResponse only
      notices on servers speaking ASGI spec 2.3 or older). With `cancel=True` the
      events are cancelled at their next await, so a slow prefill does not keep a
      dead stream's model running; with `cancel=False` they run to their end and
      their bytes are dropped. Either way `on_disconnect()` is called.
    - `send_timeout_s`: a write that cannot complete for that long ends the
      stream as a disconnect does, after `on_send_timeout()` (`producer.watch_sends`).
    - `on_close()` is called once the response is over, however it ended.
    - The request's scope gets `EVENT_STREAM` set: a server that stops ends the
      stream with a comment (`sse_lab.background._Closing`), not just the body.

    What it costs per stream, since a server holds thousands: the events run in
    a task of their own, so waking for an event resumes the few frames of this
    response, not the twenty of the middleware and routing that await it (10 %
    fewer instructions per event); one task waits for the disconnect; the time
    limit is one timer handle; heartbeats share one timer per event loop
    (`_Heartbeats`). Per event, one `send`, one clock reading and a count.
    """

    media_type = MEDIA_TYPE

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        *,
        heartbeat_s: float | None = None,
        max_duration_s: float | None = None,
        on_timeout: Callable[[], bytes] = lambda: b"",
        cancel: bool = True,
        on_disconnect: Callable[[], object] = lambda: None,
        send_timeout_s: float | None = None,
        on_send_timeout: Callable[[], object] = lambda: None,
        on_close: Callable[[], object] = lambda: None,
    ) -> None:
        super().__init__(events, headers=STREAM_HEADERS)
        self.events = events
        self.heartbeat_s = heartbeat_s
        self.max_duration_s = max_duration_s
        self.on_timeout = on_timeout
        self.cancel = cancel
        self.on_disconnect = on_disconnect
        self.send_timeout_s = send_timeout_s
        self.on_send_timeout = on_send_timeout
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        body_send = scope.get(DIRECT_SEND, send)
        if self.send_timeout_s is not None:  # every write watched: the body takes the watched path too
            receive, send = watch_sends(receive, send, self.send_timeout_s, self.on_send_timeout)
            body_send = send
        # The start goes through every layer, so each knows the response has started; the body, once started,
        # may skip the layers that only pass it on (see `_DirectSend`).
        stream = _LiveStream(loop, body_send, self)
        heartbeats = None if self.heartbeat_s is None else _heartbeats(loop)
        watching = deadline = None
        scope[EVENT_STREAM] = True
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            watching = loop.create_task(stream.watch(receive))
            if self.max_duration_s is not None:
                deadline = loop.call_later(self.max_duration_s, stream.expire)
            if heartbeats is not None:
                heartbeats.add(stream, self.heartbeat_s)
            stream.task = loop.create_task(stream.run(self.events))
            await stream.task  # cancelling this task (the server stopping) cancels that one
        finally:
            stream.over = True
            if stream.task is not None and not stream.task.done():  # the events must stop before they are closed
                stream.task.cancel()
                await asyncio.wait((stream.task,))
            if watching is not None:
                watching.cancel()
            if deadline is not None:
                deadline.cancel()
            if heartbeats is not None:
                heartbeats.remove(stream)
            try:
                await self.events.aclose()  # run the producers' cleanup now, not at GC
            finally:
                self.on_close()


class _LiveStream:
    """One open event stream: its task, when it last wrote, and why it was stopped, if it was.

    `stopped` is None while it runs on, "gone" once the client left (with
    cancel), "timeout" once the time limit passed. Both stop it the same way: the
    task is cancelled at its next await and the cancellation is caught in `run`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send, response: EventStreamResponse) -> None:
        self.loop = loop
        self.send = send
        self.response = response
        self.task: asyncio.Task[None] | None = None  # runs the events, once the response has started
        self.last_write = loop.time()
        self.events_written = 0  # tells a heartbeat whether an event went out since it was due
        self.gone = False
        self.stopped: str | None = None
        self.last_bytes = b""
        self.over = False  # the final message is being sent: nothing may interrupt it
        self.beating: asyncio.Task[None] | None = None

    async def run(self, events: AsyncGenerator[bytes, None]) -> None:
        send, loop = self.send, self.loop
        try:
            async for chunk in events:
                self.last_write = loop.time()
                self.events_written += 1
                if not self.gone:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            if self.stopped is None:
                raise  # cancelled from outside (the server stopping): not ours to swallow
            uncancel = getattr(self.task, "uncancel", None)  # Python 3.11+: undo the cancel we asked for
            if uncancel is not None:
                uncancel()
            if self.stopped == "gone":
                self.response.on_disconnect()
                return
        self.over = True
        if self.beating is not None:  # a heartbeat still on its way must not follow the end
            self.beating.cancel()
            await asyncio.wait((self.beating,))
        if self.gone:
            return
        if self.last_bytes:
            await send({"type": "http.response.body", "body": self.last_bytes, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def watch(self, receive: Receive) -> None:
        await _disconnected(receive)
        if self.over:  # the response has ended (uvicorn then answers "disconnect"): nobody left early
            return
        self.gone = True
        if not self.response.cancel:
            self.response.on_disconnect()
        elif not self.over:
            self._stop("gone")

    def expire(self) -> None:
        """The time limit passed: the timeout bytes (the error event) go out instead of further events."""
        if not self.over and self.stopped is None:
            self.last_bytes = self.response.on_timeout()
            self._stop("timeout")

    def _stop(self, reason: str) -> None:
        if self.stopped is None and self.task is not None:
            self.stopped = reason
            self.task.cancel()

    def beat(self) -> None:
        """Send a heartbeat now (called by the shared timer), unless one is still on its way."""
        if self.over or self.gone or (self.beating is not None and not self.beating.done()):
            return
        self.last_write = self.loop.time()
        self.beating = self.loop.create_task(self._send_heartbeat(self.events_written))

    async def _send_heartbeat(self, events_written: int) -> None:
        # An event written between the timer and this task already told the proxies the stream is alive. (A count,
        # not a time: uvloop's clock reads the same all through one turn of the loop.)
        if not self.over and self.events_written == events_written:
            await self.send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})


class _Heartbeats:
    """One timer for the heartbeats of every stream on an event loop, instead of a task per stream.

    A heap holds each open stream under the time its heartbeat would be due; one
    timer handle waits for the earliest. When it fires, a stream that wrote in
    the meantime goes back under its new due time, a silent one gets its
    heartbeat. A stream that writes a token costs one clock reading, and one
    stream costs a heap entry, not a sleeping task.
    """

    EARLY_S = 0.001  # a timer may fire this much early; a heartbeat that early is still on time

    def __init__(self) -> None:
        self.due: list[tuple[float, int, float, _LiveStream]] = []  # (due, tie-breaker, interval, stream)
        self.added = 0
        self.live = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf

    def add(self, stream: _LiveStream, interval_s: float) -> None:
        self.added += 1
        self.live += 1
        heapq.heappush(self.due, (stream.last_write + interval_s, self.added, interval_s, stream))
        self._arm(stream.loop)

    def remove(self, stream: _LiveStream) -> None:
        """A stream ended (`stream.over` is set): its entry leaves the heap when due, or now if many are dead.

        The last one to end empties the heap, so nothing keeps a loop that is closed alive (the loop is not kept
        here either: kept, it would keep itself alive as a key of `_heartbeat_timers`).
        """
        self.live -= 1
        if not self.live:
            self.due.clear()
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.timer_at = None, math.inf
        elif len(self.due) > 2 * self.live + 64:  # long heartbeat intervals must not keep ended streams for long
            self.due = [entry for entry in self.due if not entry[3].over]
            heapq.heapify(self.due)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.due:
            return
        soonest = self.due[0][0]
        if soonest < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.timer_at = loop.call_at(soonest, self._fire, loop), soonest

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer, self.timer_at = None, math.inf
        now = loop.time()
        while self.due and self.due[0][0] <= now + self.EARLY_S:
            _, tie, interval_s, stream = heapq.heappop(self.due)
            if stream.over:
                continue  # ended: dropped from the heap
            due = stream.last_write + interval_s
            if due <= now + self.EARLY_S:
                stream.beat()
                due = now + interval_s
            heapq.heappush(self.due, (due, tie, interval_s, stream))
        self._arm(loop)


_heartbeat_timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Heartbeats] = weakref.WeakKeyDictionary()


def _heartbeats(loop: asyncio.AbstractEventLoop) -> _Heartbeats:
    """The heartbeat timer of `loop`, made on first use."""
    timer = _heartbeat_timers.get(loop)
    if timer is None:
        timer = _heartbeat_timers[loop] = _Heartbeats()
    return timer


DIRECT_SEND = "sse_lab.direct_send"
EVENT_STREAM = "sse_lab.event_stream"  # set in the scope of a request answered by an `EventStreamResponse`


class _DirectSend:
    """Starlette middleware that keeps, in the scope, the `send` it was given.

    Starlette's exception middleware and each route wrap `send` to note whether
    the response has started, and the kit's CORS middleware to add headers to
    that start; all pass every later message on unchanged. An event stream sends
    thousands of messages; `EventStreamResponse` sends its start through the
    wrappers and its body through the `send` kept here, one call instead of four.
    Middleware added to the app later sits outside this one, so it still sees
    every message.

    The `send` leaves the scope when the request is over: uvicorn's request
    object holds the scope, and the `send` holds that object, so kept, it would
    tie the connection's objects (transport, events, buffers: about 19) into a
    reference cycle that only a full collection frees.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[DIRECT_SEND] = send
        try:
            await self.app(scope, receive, send)
        finally:
            del scope[DIRECT_SEND]


def _stream_response(chat: ChatStream, release: Callable[[], None]) -> EventStreamResponse:
    options = chat.options
    produced = chat.events()
    if options.backpressure != "pull":  # a producer task and a queue; pull keeps today's path
        produced = decoupled(produced, options.backpressure, options.queue_max, chat.stats)

    def on_disconnect() -> None:
        if chat.outcome != "send_timeout":  # a send timeout ends the stream as a disconnect does; the server cut it
            chat.client_gone = True

    def on_send_timeout() -> None:
        chat.outcome = "send_timeout"

    return EventStreamResponse(
        produced,
        heartbeat_s=options.heartbeat_s,
        max_duration_s=chat.settings.max_stream_s,
        on_timeout=chat.timed_out,
        cancel=chat.settings.cancel_on_disconnect,
        on_disconnect=on_disconnect,
        send_timeout_s=options.send_timeout_s,
        on_send_timeout=on_send_timeout,
        on_close=release,
    )


def _model_stats(models: Mapping[str, TokenSource]) -> dict[str, dict[str, int]]:
    """The counters of the token sources that keep some (a real model's queue depth, say)."""
    return {
        name: asdict(source.stats) for name, source in models.items() if is_dataclass(getattr(source, "stats", None))
    }


@dataclass
class ChatStats:
    """Counters of the buffered endpoint, `GET /api/chat`, reported by `GET /api/stats` next to `StreamStats`.

    chats_active: generating right now. chats_completed: answered 200.
    chats_failed: answered 502 (the model raised) or 504 (over `max_stream_s`).
    chats_cancelled: the client left first. chats_rejected: refused with 429,
    `max_concurrent_streams` answers already being generated.
    """

    chats_active: int = 0
    chats_completed: int = 0
    chats_failed: int = 0
    chats_cancelled: int = 0
    chats_rejected: int = 0


def _head_response(media_type: str, headers: Mapping[str, str] | None = None) -> Response:
    """What a GET would start with, without running the model: no slot taken, no body, no length."""
    response = Response(media_type=media_type, headers=headers)
    del response.headers["content-length"]
    return response


async def _buffered_answer(
    receive: Receive, source: TokenSource, generation: GenerationRequest, settings: Settings, stats: ChatStats
) -> Response:
    """Generate the whole answer, within `max_stream_s` and while the client stays, and answer in one piece."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.max_stream_s
    tokens: list[str] = []

    async def complete() -> bool:
        async def collect() -> None:
            async for token in source(generation):
                tokens.append(token)

        try:
            await asyncio.wait_for(collect(), settings.max_stream_s)
        except asyncio.TimeoutError:  # the model's own TimeoutError is a model failure
            if loop.time() < deadline:
                raise
            return False
        return True

    try:
        finished = await cancel_on_disconnect(receive, complete)
    except Exception as failure:
        stats.chats_failed += 1
        logger.warning("model failed: %r", failure)
        error = {"error": "model_error", "reason": "the model failed before finishing"}
        return JSONResponse(error, status_code=502)
    if finished is None:  # nobody is left to answer
        stats.chats_cancelled += 1
        return Response(status_code=499)
    if not finished:
        stats.chats_failed += 1
        reason = (
            f"the answer took longer than the limit of {settings.max_stream_s:g} s; {len(tokens)} tokens were ready"
        )
        return JSONResponse({"error": "timeout", "reason": reason}, status_code=504)
    stats.chats_completed += 1
    return JSONResponse(
        {"text": "".join(tokens), "tokens": len(tokens), "finish_reason": _finish_reason(len(tokens), generation)}
    )


async def _relative_slash_redirect(router: Router, scope: Scope, receive: Receive, send: Send) -> None:
    """Starlette's redirect to the path with or without its trailing slash, with a relative `Location`.

    Starlette's own builds an absolute URL from the request's Host header, so any
    client could make the server send a redirect to a host of its choosing.
    """
    path = scope["path"]
    if scope["type"] == "http" and path != "/":
        other = path.rstrip("/") if path.endswith("/") else path + "/"
        if not other.startswith("//") and any(
            route.matches({**scope, "path": other})[0] is not Match.NONE for route in router.routes
        ):
            query = scope["query_string"].decode("latin-1")
            await RedirectResponse(other + "?" + query if query else other)(scope, receive, send)
            return
    await router.not_found(scope, receive, send)


def create_app(settings: Settings | None = None, *, models: Mapping[str, TokenSource] | None = None) -> Starlette:
    """Build the chat app: `settings` sets limits and defaults; `models` adds token sources.

    `models` is added to the built-in `MODELS` (`sim`, `echo`), and a name already
    there is replaced, so plugging in a model changes no endpoint and no default.
    """
    from . import dialects  # the provider APIs (/v1/...) build on this module

    settings = settings or Settings()
    cors_origins = [check_origin(origin) for origin in settings.cors_origins]  # a typo fails here, not per request
    models = {**MODELS, **(models or {})}
    stats = StreamStats()
    chat_stats = ChatStats()
    store = None
    if settings.redis_url is not None:
        from .generations import GenerationStore  # imports this module

        store = GenerationStore(settings, models, stats)

    async def chat_stream(request: Request) -> Response:
        if store is not None:
            return await store.respond(request)
        source, generation = parse_request(request, settings, models)
        generation = parse_resume(request, generation)
        options = parse_stream_options(request, generation, settings)
        if request.method == "HEAD":
            return _head_response(MEDIA_TYPE, STREAM_HEADERS)
        stats.open_stream(settings.max_concurrent_streams)
        chat = ChatStream(source, generation, options, settings, stats)

        return _stream_response(chat, lambda: stats.stream_ended("cancelled" if chat.client_gone else chat.outcome))

    async def chat(request: Request) -> Response:
        source, generation = parse_request(request, settings, models)
        if request.method == "HEAD":
            return _head_response("application/json")
        if chat_stats.chats_active >= settings.max_concurrent_streams:
            chat_stats.chats_rejected += 1
            reason = f"all {settings.max_concurrent_streams} answer slots are taken; try again shortly"
            return JSONResponse(
                {"error": "too_many_chats", "reason": reason}, status_code=429, headers={"Retry-After": "1"}
            )
        chat_stats.chats_active += 1  # taken before any await, like a stream slot
        try:
            return await _buffered_answer(request.receive, source, generation, settings, chat_stats)
        finally:
            chat_stats.chats_active -= 1

    async def stream_stats(request: Request) -> Response:
        counters: dict[str, Any] = asdict(stats) | asdict(chat_stats)
        if model_stats := _model_stats(models):
            counters["models"] = model_stats
        return JSONResponse(counters)

    async def invalid_parameter(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InvalidParameter)
        body = {"error": "invalid_parameter", "parameter": exc.parameter, "reason": exc.reason}
        return JSONResponse(body, status_code=422)

    async def too_many_streams(request: Request, exc: Exception) -> Response:
        reason = f"all {settings.max_concurrent_streams} stream slots are taken; try again shortly"
        return JSONResponse(
            {"error": "too_many_streams", "reason": reason}, status_code=429, headers={"Retry-After": "1"}
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    from .transports import transport_routes  # imported here: the transports use this module's parsers

    app = Starlette(
        routes=[
            Route("/api/chat/stream", chat_stream),
            Route("/api/chat", chat),
            Route("/api/stats", stream_stats),
            *dialects.routes(settings, models, stats),
            *transport_routes(settings, models, stats),  # /ws/chat, /api/chat/poll (notebook 09)
            *web_routes(cors_origins),
        ],
        # The body skips the layers inside _DirectSend: CORS only adds headers to the start of a response
        middleware=[Middleware(_DirectSend), Middleware(CorsMiddleware, origins=cors_origins)],
        exception_handlers={
            InvalidParameter: invalid_parameter,
            TooManyStreams: too_many_streams,
            HTTPException: http_error,
        },
    )
    app.state.settings = settings  # serve_in_background reads the connection limits here
    app.router.redirect_slashes = False
    app.router.default = partial(_relative_slash_redirect, app.router)
    if store is not None:
        from .generations import install

        install(app, store)
    return app
