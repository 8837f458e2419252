"""Edge cases of notebook 04: a client that leaves, a dropped connection resumed, heartbeats through an idle proxy."""

from __future__ import annotations

import httpx

from ..background import serve_in_background
from ..client import STREAM_PATH, Param, stream_chat, wait_until_idle
from ..instruments.faults import DropConnections, IdleTimeout
from ..metrics import ChatResult
from ..server import Settings, create_app
from ..sse import Decoder
from . import DEFAULT_PROMPT


def read_then_leave(base_url: str, prompt: str, tokens: int, *, timeout_s: float = 5.0, **params: Param) -> int:
    """Open a stream, read `tokens` token events, then close the connection. Returns the tokens read."""
    decoder, received = Decoder(), 0
    query = {"prompt": prompt, **params}
    with httpx.stream("GET", base_url + STREAM_PATH, params=query, trust_env=False, timeout=timeout_s) as response:
        for chunk in response.iter_bytes():
            received += sum(event.event == "token" for event in decoder.feed(chunk))
            if received >= tokens:
                break
    return received


def disconnect_waste(
    *, leave_after: int = 5, max_tokens: int = 60, token_ms: float = 10, prompt: str = DEFAULT_PROMPT
) -> dict[str, dict[str, int]]:
    """A client reads `leave_after` tokens and leaves: what did the server generate for nobody?

    Runs it against two servers, one that cancels generation when its client
    leaves (the kit's default) and one that lets the model run to the end, and
    returns each one's counters (`tokens_wasted` among them) once it is idle.
    """
    counters = {}
    for label, cancel in (("cancel on disconnect", True), ("run to the end", False)):
        with serve_in_background(create_app(Settings(cancel_on_disconnect=cancel))) as server:
            read_then_leave(server.url, prompt, leave_after, max_tokens=max_tokens, ttft_ms=0, token_ms=token_ms)
            counters[label] = wait_until_idle(server.url)
    return counters


def dropped_and_resumed(
    *, drop_after: int = 10, retry_ms: int = 250, prompt: str = DEFAULT_PROMPT, **params: Param
) -> dict[str, ChatResult]:
    """The same stream uninterrupted, and cut after `drop_after` events then resumed with Last-Event-ID.

    The cut is `sse_lab.faults.DropConnections`; the server tells the client to
    wait `retry_ms` before reconnecting.
    """
    app = DropConnections(create_app(Settings(retry_ms=retry_ms)), after_events=drop_after)
    with serve_in_background(app) as server:
        resumed = stream_chat(server.url, prompt, **params)  # the first stream is the one cut
        uninterrupted = stream_chat(server.url, prompt, **params)
    return {"uninterrupted": uninterrupted, "dropped and resumed": resumed}


def heartbeats_through_an_idle_timeout(
    *,
    idle_s: float = 0.5,
    prefill_ms: float = 1_500,
    heartbeat_s: float = 0.2,
    prompt: str = DEFAULT_PROMPT,
    **params: Param,
) -> dict[str, ChatResult]:
    """A long prefill behind a proxy that cuts connections idle for `idle_s`, without and with heartbeats.

    The client reconnects once; without heartbeats the second try is cut too.
    """
    app = IdleTimeout(create_app(Settings(retry_ms=50)), idle_s=idle_s)
    with serve_in_background(app) as server:
        return {
            label: stream_chat(server.url, prompt, ttft_ms=prefill_ms, max_reconnects=1, **extra, **params)
            for label, extra in (
                ("no heartbeats", {}),
                (f"heartbeat every {heartbeat_s:g} s", {"heartbeat_s": heartbeat_s}),
            )
        }
