"""The measuring client: request a chat, note when every token arrives.

`stream_chat` reads the event stream with httpx-sse and stamps each `token` event
the moment it has been parsed; `fetch_chat` asks the buffered endpoint and stamps
every token with the moment the body arrived. Both have async twins. See
`sse_lab.metrics` for what the resulting numbers mean.

    >>> from sse_lab import serve_in_background
    >>> with serve_in_background() as server:
    ...     result = stream_chat(server.url, "hello", max_tokens=5, ttft_ms=100, token_ms=10)
    >>> result.tokens, result.finish_reason, result.ttft > 0.1
    (5, 'length', True)

The client never uses proxy settings from the environment: it measures the path
to the server it was given, nothing else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from .metrics import ChatResult

STREAM_PATH = "/api/chat/stream"
BUFFERED_PATH = "/api/chat"
DEFAULT_TIMEOUT_S = 30.0

Param = str | int | float
OnToken = Callable[[str], object]


class ChatRequestError(Exception):
    """The server refused the request; `status` and `body` say why."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class _Recording:
    """Turns a response, as it is read, into a ChatResult."""

    def __init__(self, mode: str, on_token: OnToken | None) -> None:
        self.result = ChatResult(mode=mode, started_at=time.perf_counter())
        self.on_token = on_token
        self.parts: list[str] = []

    def headers_arrived(self) -> None:
        self.result.headers_at = time.perf_counter()

    def event(self, sse: ServerSentEvent) -> None:
        now = time.perf_counter()
        data: Any = json.loads(sse.data) if sse.data else None
        if sse.event == "token":
            self.result.arrivals.append(now)
            self.parts.append(data["token"])
            if self.on_token is not None:
                self.on_token(data["token"])
        elif sse.event == "done":
            self.result.finish_reason = data["finish_reason"]
        elif sse.event == "error":
            self.result.error = data

    def body(self, payload: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.result.arrivals = [now] * payload["tokens"]
        self.parts = [payload["text"]]
        self.result.finish_reason = payload["finish_reason"]
        if self.on_token is not None:
            self.on_token(payload["text"])

    def finish(self) -> ChatResult:
        self.result.finished_at = time.perf_counter()
        self.result.text = "".join(self.parts)
        return self.result


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


def stream_chat(
    base_url: str,
    prompt: str,
    *,
    on_token: OnToken | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **params: Param,
) -> ChatResult:
    """Stream a chat from `base_url` and record when each token arrived.

    `params` are the endpoint's query parameters (model, max_tokens, ttft_ms,
    token_ms, jitter_ms, seed); `on_token` is called with each token as it arrives.
    """
    with httpx.Client(**_client_options(timeout_s)) as client:
        recording = _Recording("streamed", on_token)  # starts the clock
        with connect_sse(client, "GET", base_url + STREAM_PATH, params=_query(prompt, params)) as source:
            recording.headers_arrived()
            if source.response.is_error:
                source.response.read()
                raise _refusal(source.response)
            for sse in source.iter_sse():
                recording.event(sse)
        return recording.finish()


async def astream_chat(
    base_url: str,
    prompt: str,
    *,
    on_token: OnToken | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **params: Param,
) -> ChatResult:
    """`stream_chat` for asyncio code: many can run at once on one event loop."""
    async with httpx.AsyncClient(**_client_options(timeout_s)) as client:
        recording = _Recording("streamed", on_token)  # starts the clock
        async with aconnect_sse(client, "GET", base_url + STREAM_PATH, params=_query(prompt, params)) as source:
            recording.headers_arrived()
            if source.response.is_error:
                await source.response.aread()
                raise _refusal(source.response)
            async for sse in source.aiter_sse():
                recording.event(sse)
        return recording.finish()


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
        recording = _Recording("buffered", on_token)  # starts the clock
        with client.stream("GET", base_url + BUFFERED_PATH, params=_query(prompt, params)) as response:
            recording.headers_arrived()
            response.read()
            if response.is_error:
                raise _refusal(response)
            recording.body(response.json())
        return recording.finish()


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
        recording = _Recording("buffered", on_token)  # starts the clock
        async with client.stream("GET", base_url + BUFFERED_PATH, params=_query(prompt, params)) as response:
            recording.headers_arrived()
            await response.aread()
            if response.is_error:
                raise _refusal(response)
            recording.body(response.json())
        return recording.finish()
