"""The measuring client: request a chat, note when every token arrives.

`stream_chat` reads the event stream with `sse_lab.sse.Decoder` and stamps each
event twice: when its first byte came and when it was complete (a token
"arrives" then). It notes every read from the socket too, and resumes a dropped
stream with Last-Event-ID, as a browser's EventSource would. `fetch_chat` asks
the buffered endpoint and stamps every token with the moment the body arrived.
Both have async twins. See `sse_lab.metrics` for what the numbers mean.

    >>> from sse_lab import serve_in_background
    >>> with serve_in_background() as server:
    ...     result = stream_chat(server.url, "hello", max_tokens=5, ttft_ms=100, token_ms=10)
    >>> result.tokens, result.finish_reason, result.ttft > 0.1
    (5, 'length', True)

`api` picks the dialect the stream speaks: "kit" (`GET /api/chat/stream`, the
default), or a provider's, for measuring any server that speaks it:
"openai-chat" (`POST {base_url}/chat/completions`, base_url ending in /v1, as
vLLM, llama.cpp's server and Ollama serve it), "openai-responses"
(`{base_url}/responses`) or "anthropic" (`{base_url}/v1/messages`). The
provider dialects cannot resume: a drop ends the stream, with `error` saying so.

The client never uses proxy settings from the environment: it measures the path
to the server it was given, nothing else.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx

from .dialects import DIALECTS, Reading, StreamRequest
from .metrics import ChatResult, Chunk, Drop, Received
from .sse import MEDIA_TYPE, Decoder, Event

STREAM_PATH = "/api/chat/stream"
BUFFERED_PATH = "/api/chat"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRY_MS = 3_000  # until the server says otherwise; browsers wait about as long
DEFAULT_MAX_RECONNECTS = 3

# A server that is restarting or overloaded may answer these. EventSource gives up
# on any status but 200; a client that can resume may as well try again.
_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})

Param = str | int | float
OnToken = Callable[[str], object]
ReadEvent = Callable[[Event], Reading]
APIS = ("kit", *DIALECTS)  # what `api=` takes


class ChatRequestError(Exception):
    """The server refused the request; `status` and `body` say why."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class _Dropped(Exception):
    """A reconnection answered with a status worth another try."""


class _Stream:
    """One stream across its connections: what to send, what came back, when to give up.

    The I/O loops of `stream_chat` and `astream_chat` drive it; all they share
    lives here, with no I/O of its own.
    """

    def __init__(self, on_token: OnToken | None, max_reconnects: int, read_event: ReadEvent | None = None) -> None:
        self.result = ChatResult(mode="streamed", started_at=time.perf_counter())
        self.on_token = on_token
        self.max_reconnects = max_reconnects
        self.read_event = read_event  # a provider dialect's reader; None: the kit's events, resumable
        self.decoder = Decoder()
        self.pending_since: float | None = None  # first byte of an event not complete yet
        self.last_event_id = ""
        self.retry_ms = DEFAULT_RETRY_MS
        self.reconnects = 0  # reconnection attempts since the last drop
        self.last_failure = ""  # why the last connection ended early
        self.over = False  # `done` or `error` came, or the client gave up

    def next_attempt(self) -> tuple[float, dict[str, str]] | None:
        """Seconds to wait and the headers for the next connection; None: stop."""
        if self.over:
            return None
        headers = {"Accept": MEDIA_TYPE, "Cache-Control": "no-cache"}
        if not self.result.drops:
            return 0.0, headers
        if self.read_event is not None:
            self._give_up(f"{self.last_failure}; this API cannot resume a stream")
            return None
        if self.reconnects >= self.max_reconnects:
            attempts = f"{self.reconnects} failed reconnection attempt{'' if self.reconnects == 1 else 's'}"
            self._give_up(f"gave up after {attempts}; the last: {self.last_failure}")
            return None
        self.reconnects += 1
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        return self.retry_ms / 1000, headers

    def connected(self, response: httpx.Response) -> bool:
        """The headers are in: True to read the body as the stream.

        A refusal of the first request raises ChatRequestError. A refusal of a
        reconnection ends the stream, or counts as a failed attempt when its
        status says the server may soon be back.
        """
        if not self.result.headers_at:
            self.result.headers_at = time.perf_counter()
        if not response.is_error:
            self.decoder = Decoder()
            self.pending_since = None
            return True
        if not self.result.drops:
            raise _refusal(response)
        if response.status_code in _RETRYABLE_STATUS:
            raise _Dropped(f"HTTP {response.status_code} on reconnecting")
        self._give_up(f"the server refused to resume: {_refusal(response)}")
        return False

    def feed(self, chunk: bytes) -> None:
        """One read from the socket: note it, and every event it completes."""
        now = time.perf_counter()
        self.result.chunks.append(Chunk(now, len(chunk)))
        for event in self.decoder.feed(chunk):
            first_byte_at = now if self.pending_since is None else self.pending_since
            self.pending_since = None
            self._received(Received(event, first_byte_at, now))
        if not self.decoder.in_event:
            self.pending_since = None
        elif self.pending_since is None:
            self.pending_since = now
        if self.decoder.retry is not None:
            self.retry_ms = self.decoder.retry
        if self.decoder.last_event_id:
            self.last_event_id = self.decoder.last_event_id

    def _received(self, received: Received) -> None:
        self.result.events.append(received)
        if self.result.drops and self.result.drops[-1].resumed_at is None:
            self._update_drop(resumed_at=received.complete_at)
            self.reconnects = 0
        event = received.event
        if self.read_event is not None:
            self._read(self.read_event(event), received.complete_at)
            return
        data: Any = json.loads(event.data) if event.data else None
        if event.event == "token":
            self.result.arrivals.append(received.complete_at)
            self.result.text += data["token"]
            if self.on_token is not None:
                self.on_token(data["token"])
        elif event.event == "done":
            self.result.finish_reason = data["finish_reason"]
            self.over = True
        elif event.event == "error":
            self.result.error = data
            self.over = True

    def _read(self, reading: Reading, at: float) -> None:
        if reading.token is not None:
            self.result.arrivals.append(at)
            self.result.text += reading.token
            if self.on_token is not None:
                self.on_token(reading.token)
        if reading.finish_reason is not None:
            self.result.finish_reason = reading.finish_reason
        if reading.error is not None:
            self.result.error = reading.error
        self.over = self.over or reading.over

    def ended(self, wire_bytes: int, failure: Exception | None = None) -> None:
        """A connection is over, cleanly or with `failure`. Before `done` or `error`, that is a drop."""
        self.result.wire_bytes += wire_bytes
        if self.over:
            return
        reason = "the connection closed before the stream ended" if failure is None else _describe(failure)
        self.last_failure = reason
        if self.result.drops and self.result.drops[-1].resumed_at is None:  # a reconnection that failed
            self._update_drop()
        else:
            self.result.drops.append(Drop(time.perf_counter(), self.last_event_id, reason))

    def _update_drop(self, **changes: Any) -> None:
        self.result.drops[-1] = replace(self.result.drops[-1], attempts=self.reconnects, **changes)

    def _give_up(self, message: str) -> None:
        self.result.error = {"code": "connection_lost", "message": message}
        self.over = True

    def finish(self) -> ChatResult:
        self.result.finished_at = time.perf_counter()
        return self.result


def _record_body(result: ChatResult, response: httpx.Response, on_token: OnToken | None) -> ChatResult:
    """Every token of a buffered reply arrives with the body, at once."""
    now = time.perf_counter()
    payload = response.json()
    result.wire_bytes = response.num_bytes_downloaded
    result.chunks.append(Chunk(now, len(response.content)))
    result.arrivals = [now] * payload["tokens"]
    result.text = payload["text"]
    result.finish_reason = payload["finish_reason"]
    if on_token is not None:
        on_token(payload["text"])
    result.finished_at = time.perf_counter()
    return result


def _describe(failure: Exception) -> str:
    return f"{type(failure).__name__}: {failure}" if str(failure) else type(failure).__name__


def _refusal(response: httpx.Response) -> ChatRequestError:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return ChatRequestError(response.status_code, body)


def _query(prompt: str, params: dict[str, Param]) -> dict[str, Param]:
    return {"prompt": prompt, **params}


def _client_options(timeout_s: float) -> dict[str, Any]:
    return {"timeout": timeout_s, "trust_env": False}


def stream_request(
    api: str, base_url: str, prompt: str, params: dict[str, Param]
) -> tuple[StreamRequest, ReadEvent | None]:
    """What to send to open a stream in `api`'s dialect, and how to read its events (None: the kit's reader).

    A load generator speaking several dialects builds its requests with this and
    feeds each event to the reader it returns.

    >>> request, read_event = stream_request("openai-chat", "http://127.0.0.1:8000/v1", "hi", {"max_tokens": 3})
    >>> request.method, request.url, read_event(Event('{"choices":[{"delta":{"content":"Hi"}}]}')).token
    ('POST', 'http://127.0.0.1:8000/v1/chat/completions', 'Hi')
    """
    if api == "kit":
        return StreamRequest("GET", base_url + STREAM_PATH, params=_query(prompt, params)), None
    if api not in DIALECTS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
    dialect = DIALECTS[api]
    return dialect.stream_request(base_url, prompt, params), dialect.read_event


def _send(request: StreamRequest, headers: dict[str, str]) -> dict[str, Any]:
    """httpx's `stream()` arguments for one connection."""
    headers = headers if request.headers is None else {**headers, **request.headers}
    return {
        "method": request.method,
        "url": request.url,
        "params": request.params,
        "json": request.json,
        "headers": headers,
    }


def stream_chat(
    base_url: str,
    prompt: str,
    *,
    on_token: OnToken | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_reconnects: int = DEFAULT_MAX_RECONNECTS,
    chunk_size: int | None = None,
    api: str = "kit",
    **params: Param,
) -> ChatResult:
    """Stream a chat from `base_url` and record when each token arrived.

    `params` are the endpoint's query parameters (model, max_tokens, ttft_ms,
    token_ms, ...); `on_token` is called with each token as it arrives. A
    connection lost before `done` is resumed as EventSource would: after the
    server's `retry` delay, with `Last-Event-ID`, up to `max_reconnects` tries in
    a row; then the result's `error` says so. `chunk_size` makes every read wait
    for that many bytes (client-side buffering, for experiments). `api` is the
    dialect to speak (see the module docstring); with a provider's, `params` are
    body fields (`model` defaults to the kit's "sim").
    """
    request, read_event = stream_request(api, base_url, prompt, params)
    with httpx.Client(**_client_options(timeout_s)) as client:
        stream = _Stream(on_token, max_reconnects, read_event)  # starts the clock
        while (attempt := stream.next_attempt()) is not None:
            wait_s, headers = attempt
            time.sleep(wait_s)  # the reconnection delay, 0 the first time
            wire_bytes = 0
            try:
                with client.stream(**_send(request, headers)) as response:
                    if response.is_error:
                        response.read()
                    if stream.connected(response):
                        for chunk in response.iter_bytes(chunk_size):
                            stream.feed(chunk)
                    wire_bytes = response.num_bytes_downloaded
            except (httpx.TransportError, _Dropped) as failure:
                stream.ended(wire_bytes, failure)
            else:
                stream.ended(wire_bytes)
        return stream.finish()


async def astream_chat(
    base_url: str,
    prompt: str,
    *,
    on_token: OnToken | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_reconnects: int = DEFAULT_MAX_RECONNECTS,
    chunk_size: int | None = None,
    api: str = "kit",
    **params: Param,
) -> ChatResult:
    """`stream_chat` for asyncio code: many can run at once on one event loop."""
    request, read_event = stream_request(api, base_url, prompt, params)
    async with httpx.AsyncClient(**_client_options(timeout_s)) as client:
        stream = _Stream(on_token, max_reconnects, read_event)  # starts the clock
        while (attempt := stream.next_attempt()) is not None:
            wait_s, headers = attempt
            await asyncio.sleep(wait_s)  # the reconnection delay, 0 the first time
            wire_bytes = 0
            try:
                async with client.stream(**_send(request, headers)) as response:
                    if response.is_error:
                        await response.aread()
                    if stream.connected(response):
                        async for chunk in response.aiter_bytes(chunk_size):
                            stream.feed(chunk)
                    wire_bytes = response.num_bytes_downloaded
            except (httpx.TransportError, _Dropped) as failure:
                stream.ended(wire_bytes, failure)
            else:
                stream.ended(wire_bytes)
        return stream.finish()


def fetch_chat(
    base_url: str,
    prompt: str,
    *,
    on_token: OnToken | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **params: Param,
) -> ChatResult:
    """Ask the buffered endpoint: every token arrives at once, with the whole body.

    `on_token`, if given, is called once, with the whole text.
    """
    with httpx.Client(**_client_options(timeout_s)) as client:
        result = ChatResult(mode="buffered", started_at=time.perf_counter())
        with client.stream("GET", base_url + BUFFERED_PATH, params=_query(prompt, params)) as response:
            result.headers_at = time.perf_counter()
            response.read()
            if response.is_error:
                raise _refusal(response)
            return _record_body(result, response, on_token)


async def afetch_chat(
    base_url: str,
    prompt: str,
    *,
    on_token: OnToken | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **params: Param,
) -> ChatResult:
    """`fetch_chat` for asyncio code."""
    async with httpx.AsyncClient(**_client_options(timeout_s)) as client:
        result = ChatResult(mode="buffered", started_at=time.perf_counter())
        async with client.stream("GET", base_url + BUFFERED_PATH, params=_query(prompt, params)) as response:
            result.headers_at = time.perf_counter()
            await response.aread()
            if response.is_error:
                raise _refusal(response)
            return _record_body(result, response, on_token)


def fetch_stats(base_url: str) -> dict[str, int]:
    """The server's stream counters (`GET /api/stats`)."""
    counters: dict[str, int] = httpx.get(base_url + "/api/stats", trust_env=False).raise_for_status().json()
    return counters


def wait_until_idle(base_url: str, timeout_s: float = 5.0) -> dict[str, int]:
    """Poll the counters until no stream is active; return them. Raises TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (stats := fetch_stats(base_url))["streams_active"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"streams still active after {timeout_s} s: {stats}")
        time.sleep(0.01)
    return stats
