from __future__ import annotations

import contextlib
import gc
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from httpx_sse import connect_sse
from starlette.applications import Starlette

from sse_lab import ServerStartError, serve_in_background
from sse_lab.background import STOP_TIMEOUT_S
from tests.conftest import wait_for


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_binds_loopback_on_a_free_port_and_serves() -> None:
    with serve_in_background() as server:
        assert server.host == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        response = httpx.get(server.url + "/api/chat", params={"prompt": "hi", "ttft_ms": 0, "token_ms": 0})
        assert response.status_code == 200
    assert not accepts_connections(server.port)


def test_stop_returns_within_a_second_with_a_stream_open(capfd: pytest.CaptureFixture[str]) -> None:
    server = serve_in_background()
    params = {"prompt": "hi", "max_tokens": 4096, "token_ms": 50, "ttft_ms": 0}
    with (
        httpx.Client(trust_env=False) as client,
        connect_sse(client, "GET", server.url + "/api/chat/stream", params=params) as source,
    ):
        stream = source.iter_sse()
        assert next(stream).event == "token"
        started = time.perf_counter()
        server.stop()
        stopped_in = time.perf_counter() - started
        rest = list(stream)  # the response ends cleanly, without a `done` event
    assert stopped_in < STOP_TIMEOUT_S
    assert all(event.event == "token" for event in rest)
    assert not server.running and not accepts_connections(server.port)
    assert "Traceback" not in capfd.readouterr().err


def test_stop_is_idempotent() -> None:
    server = serve_in_background()
    server.stop()
    server.stop()
    assert repr(server).endswith("stopped>")


def test_a_dropped_handle_stops_its_server() -> None:
    """What re-running `server = serve_in_background()` in a notebook does to the old server."""
    server = serve_in_background()
    port = server.port
    del server
    gc.collect()
    wait_for(lambda: not accepts_connections(port), what="the server to stop")


def test_asking_again_for_a_port_replaces_the_server_holding_it() -> None:
    first = serve_in_background()
    second = serve_in_background(port=first.port)
    try:
        assert not first.running and second.running
        assert httpx.get(second.url + "/api/chat/nope").status_code == 404
    finally:
        second.stop()


@pytest.fixture
def foreign_listener() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_taken_by_someone_else_is_a_clear_error(foreign_listener: int) -> None:
    with pytest.raises(ServerStartError, match=f"cannot serve on 127.0.0.1:{foreign_listener}"):
        serve_in_background(port=foreign_listener)


@contextlib.asynccontextmanager
async def no_model_weights(app: Starlette) -> AsyncIterator[None]:
    raise RuntimeError("no model weights")
    yield


def test_an_app_that_cannot_start_is_a_clear_error_not_a_hang() -> None:
    started = time.perf_counter()
    with pytest.raises(ServerStartError, match="did not start"):
        serve_in_background(Starlette(lifespan=no_model_weights), startup_timeout_s=5)
    assert time.perf_counter() - started < 5
