"""Experiments: each runs requests against a live server and returns plain results.

Results come back as `{variant: [ChatResult, ...]}`, so every plot and summary
in `sse_lab.plots` and `sse_lab.metrics` works on every experiment.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx
from tqdm.auto import tqdm

from .background import serve_in_background
from .client import STREAM_PATH, Param, fetch_chat, stream_chat
from .faults import DropConnections, IdleTimeout
from .metrics import ChatResult
from .server import Settings, create_app
from .sse import Decoder

DEFAULT_PROMPT = "Why should an LLM stream its answer?"


def buffered_vs_streamed(
    base_url: str,
    *,
    runs: int = 5,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
    **params: Param,
) -> dict[str, list[ChatResult]]:
    """Ask for the same generation `runs` times streamed and `runs` times buffered.

    The two kinds alternate, so a slow moment on the machine hits both alike.
    `params` go to the server unchanged (model, max_tokens, ttft_ms, token_ms, ...).
    """
    results: dict[str, list[ChatResult]] = {"streamed": [], "buffered": []}
    for _ in tqdm(range(runs), desc="buffered vs streamed", disable=not progress):
        results["streamed"].append(stream_chat(base_url, prompt, **params))
        results["buffered"].append(fetch_chat(base_url, prompt, **params))
    return results


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


def read_then_leave(base_url: str, prompt: str, tokens: int, **params: Param) -> int:
    """Open a stream, read `tokens` token events, then close the connection. Returns the tokens read."""
    decoder, received = Decoder(), 0
    query = {"prompt": prompt, **params}
    with httpx.stream("GET", base_url + STREAM_PATH, params=query, trust_env=False) as response:
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


WHOLE_BODY = 1 << 40  # a read size no response reaches: the read returns at the end of the body


def client_reads(
    base_url: str,
    chunk_sizes: Sequence[int | None] = (None, 1024, 4096, WHOLE_BODY),
    *,
    runs: int = 2,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
    **params: Param,
) -> dict[str, list[ChatResult]]:
    """The same stream read as bytes come (None), in reads that wait for `chunk_size` bytes, or whole.

    A client that reads in fixed sizes (`iter_bytes(chunk_size=...)`, a
    `read(4096)` loop) holds tokens that have already arrived until its read fills.
    """
    labels = {size: _read_label(size) for size in chunk_sizes}
    results: dict[str, list[ChatResult]] = {label: [] for label in labels.values()}
    for _ in tqdm(range(runs), desc="client reads", disable=not progress):
        for size, label in labels.items():
            results[label].append(stream_chat(base_url, prompt, chunk_size=size, **params))
    return results


def _read_label(chunk_size: int | None) -> str:
    if chunk_size is None:
        return "as bytes come"
    if chunk_size == WHOLE_BODY:
        return "whole body"
    return f"reads of {chunk_size} B"
