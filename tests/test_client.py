from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sse_lab import (
    BackgroundServer,
    ChatRequestError,
    ChatResult,
    Settings,
    afetch_chat,
    astream_chat,
    create_app,
    fetch_chat,
    serve_in_background,
    stream_chat,
)
from sse_lab.instruments.faults import DropConnections
from sse_lab.model import sim_tokens
from tests.conftest import wait_for

FAST = {"ttft_ms": 0, "token_ms": 0, "max_tokens": 8}


def test_stream_chat_records_every_token_and_the_text(server: BackgroundServer) -> None:
    seen: list[str] = []
    result = stream_chat(server.url, "hi", on_token=seen.append, **FAST)
    assert result.mode == "streamed"
    assert result.tokens == 8 and "".join(seen) == result.text
    assert result.finish_reason == "length" and result.error is None
    assert result.started_at < result.headers_at <= result.arrivals[0] <= result.arrivals[-1] <= result.finished_at


def test_fetch_chat_stamps_every_token_with_the_body_arrival(server: BackgroundServer) -> None:
    result = fetch_chat(server.url, "hi", **FAST)
    assert result.mode == "buffered"
    assert result.tokens == 8 and len(set(result.arrivals)) == 1
    assert result.text == stream_chat(server.url, "hi", **FAST).text


def test_streamed_first_token_comes_long_before_the_buffered_one(server: BackgroundServer) -> None:
    params = {"ttft_ms": 20, "token_ms": 40, "max_tokens": 10}
    streamed, buffered = stream_chat(server.url, "hi", **params), fetch_chat(server.url, "hi", **params)
    assert streamed.ttft is not None and buffered.ttft is not None
    assert buffered.ttft > 3 * streamed.ttft


def test_async_twins_give_the_same_results(server: BackgroundServer) -> None:
    async def both() -> tuple[str, str]:
        streamed, buffered = await asyncio.gather(
            astream_chat(server.url, "hi", **FAST), afetch_chat(server.url, "hi", **FAST)
        )
        return streamed.text, buffered.text

    expected = stream_chat(server.url, "hi", **FAST).text
    assert asyncio.run(both()) == (expected, expected)


@pytest.mark.parametrize("call", [stream_chat, fetch_chat])
def test_a_refused_request_raises_with_the_servers_reason(
    server: BackgroundServer, call: Callable[..., ChatResult]
) -> None:
    with pytest.raises(ChatRequestError, match="token_ms") as caught:
        call(server.url, "hi", token_ms=-1)
    assert caught.value.status == 422 and caught.value.body["parameter"] == "token_ms"


def test_async_refusal_raises_too(server: BackgroundServer) -> None:
    with pytest.raises(ChatRequestError):
        asyncio.run(astream_chat(server.url, "hi", model="nope"))
    with pytest.raises(ChatRequestError):
        asyncio.run(afetch_chat(server.url, "hi", model="nope"))


def test_proxy_settings_in_the_environment_are_ignored(
    server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert stream_chat(server.url, "hi", **FAST).tokens == 8


def test_every_read_and_both_ends_of_every_event_are_timed(server: BackgroundServer) -> None:
    result = stream_chat(server.url, "hi", **FAST)
    assert [received.event.event for received in result.events] == ["token"] * 8 + ["done"]
    assert result.arrivals == [received.complete_at for received in result.events[:-1]]
    assert all(received.first_byte_at <= received.complete_at for received in result.events)
    assert sum(chunk.size for chunk in result.chunks) == result.wire_bytes  # not compressed
    assert [chunk.at for chunk in result.chunks] == sorted(chunk.at for chunk in result.chunks)


def split_event_app() -> Starlette:
    """Writes one event in two halves, 300 ms apart, then `done`."""

    async def halves() -> AsyncIterator[bytes]:
        yield b'event: token\nid: 0\ndata: {"token":"slow","index":0}\n'
        await asyncio.sleep(0.3)
        yield b'\nevent: done\ndata: {"finish_reason":"stop","tokens":1}\n\n'

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(halves(), media_type="text/event-stream")

    return Starlette(routes=[Route("/api/chat/stream", endpoint)])


def test_an_event_split_across_reads_arrives_when_complete_not_at_its_first_byte() -> None:
    with serve_in_background(split_event_app()) as running:
        result = stream_chat(running.url, "hi")
    token = result.events[0]
    assert token.complete_at - token.first_byte_at > 0.2
    assert result.arrivals == [token.complete_at] and result.text == "slow"


def test_reads_that_wait_for_a_chunk_size_hold_tokens_back(server: BackgroundServer) -> None:
    params = {"max_tokens": 6, "ttft_ms": 0, "token_ms": 50}
    event_by_event = stream_chat(server.url, "hi", **params)
    whole_body = stream_chat(server.url, "hi", chunk_size=1 << 20, **params)
    assert event_by_event.arrivals[-1] - event_by_event.arrivals[0] > 0.15
    assert len(whole_body.chunks) == 1 and len(set(whole_body.arrivals)) == 1
    assert whole_body.text == event_by_event.text


UNINTERRUPTED = {"max_tokens": 20, "ttft_ms": 20, "token_ms": 5}


def test_a_dropped_stream_is_resumed_with_last_event_id_and_nothing_lost_or_repeated() -> None:
    app = DropConnections(create_app(Settings(retry_ms=20)), after_events=5, connections=2)
    with serve_in_background(app) as running:
        result = stream_chat(running.url, "hi", **UNINTERRUPTED)
    assert result.text == "".join(sim_tokens("hi", 20)) and result.tokens == 20
    assert [drop.last_event_id for drop in result.drops] == ["4", "9"]
    assert all(drop.resumed_at is not None and drop.attempts == 1 for drop in result.drops)
    assert result.finish_reason == "length" and result.error is None
    assert 0 < result.time_lost < result.e2e  # type: ignore[operator]


def test_the_retry_delay_the_server_sets_is_honoured() -> None:
    def lost_time(retry_ms: int) -> float:
        app = DropConnections(create_app(Settings(retry_ms=retry_ms)), after_events=2)
        with serve_in_background(app) as running:
            return stream_chat(running.url, "hi", max_tokens=4, ttft_ms=0, token_ms=0).time_lost

    assert lost_time(400) >= 0.4 > lost_time(10)


def test_a_stream_survives_its_server_being_restarted_on_the_same_port() -> None:
    settings = Settings(retry_ms=30)
    first = serve_in_background(create_app(settings))
    port, seen, restarted = first.port, [], []

    def restart_when_five_tokens_are_in(token: str) -> None:
        seen.append(token)
        if len(seen) == 5:
            first.stop()  # open responses end; the port refuses connections for 200 ms
            restart = threading.Timer(
                0.2, lambda: restarted.append(serve_in_background(create_app(settings), port=port))
            )
            restart.start()

    try:
        result = stream_chat(
            first.url, "hi", on_token=restart_when_five_tokens_are_in, max_reconnects=50, **UNINTERRUPTED
        )
    finally:
        wait_for(lambda: restarted, what="the restarted server")
        restarted[0].stop()
    assert result.text == "".join(sim_tokens("hi", 20)) and result.error is None
    (drop,) = result.drops
    assert drop.last_event_id == "4" and drop.attempts >= 1 and drop.resumed_at is not None


def test_the_client_gives_up_after_max_reconnects_and_keeps_what_it_got() -> None:
    server = serve_in_background(create_app(Settings(retry_ms=10)))
    result = stream_chat(server.url, "hi", on_token=lambda token: server.stop(), max_reconnects=2, **UNINTERRUPTED)
    # The tokens already on their way when the server stopped still arrive; the rest never do.
    assert 1 <= result.tokens < 20 and result.text == "".join(sim_tokens("hi", result.tokens))
    assert result.error is not None and result.error["code"] == "connection_lost"
    assert "gave up after 2 failed reconnection attempts" in result.error["message"]
    assert result.drops[0].attempts == 2 and result.drops[0].resumed_at is None


def test_a_server_that_refuses_to_resume_ends_the_stream() -> None:
    first = serve_in_background(create_app(Settings(retry_ms=10)))
    port, replaced = first.port, []

    def replace_with_an_empty_app(token: str) -> None:
        if not replaced:
            first.stop()
            replaced.append(serve_in_background(Starlette(), port=port))  # 404 for everything

    try:
        result = stream_chat(first.url, "hi", on_token=replace_with_an_empty_app, **UNINTERRUPTED)
    finally:
        replaced[0].stop()
    assert 1 <= result.tokens < 20 and result.error is not None
    assert "refused to resume: HTTP 404" in result.error["message"]


SERVE_UNTIL_STDIN_CLOSES = """
import sys
from sse_lab import Settings, create_app, serve_in_background
server = serve_in_background(create_app(Settings(retry_ms=30)), port=int(sys.argv[1]))
print(server.url, flush=True)
sys.stdin.read()
"""


def start_server_process(port: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_UNTIL_STDIN_CLOSES, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().startswith("http://127.0.0.1:")
    return process


def test_a_stream_survives_its_server_process_being_killed_and_restarted() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [start_server_process(port)]
    seen: list[str] = []

    def kill_and_restart(token: str) -> None:
        seen.append(token)
        if len(seen) == 5:
            processes[0].kill()  # SIGKILL: no goodbye on the open connection
            processes[0].wait()
            threading.Thread(target=lambda: processes.append(start_server_process(port))).start()

    try:
        result = stream_chat(
            f"http://127.0.0.1:{port}", "hi", on_token=kill_and_restart, max_reconnects=200, **UNINTERRUPTED
        )
    finally:
        wait_for(lambda: len(processes) == 2, timeout_s=30, what="the restarted server process")
        for process in processes:
            process.kill()
            process.communicate()
    assert result.text == "".join(sim_tokens("hi", 20)) and result.error is None
    (drop,) = result.drops
    assert drop.last_event_id == "4" and drop.resumed_at is not None
