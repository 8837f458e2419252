from __future__ import annotations

import socket
import sys

import pytest

from sse_lab import BackgroundServer, Settings, create_app, serve_in_background
from sse_lab.instruments.sockets import (
    ServerSide,
    WriteBufferLimit,
    fix_send_buffer,
    kernel_buffers,
    server_side,
)
from tests.conftest import wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ/SIOCINQ are Linux's")

STALLING = b"GET /api/chat/stream?prompt=hi&max_tokens=100000&ttft_ms=0&token_ms=0 HTTP/1.1\r\nHost: lab\r\n\r\n"


def test_kernel_buffers_hold_what_was_sent_and_not_read() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as sender,
        listener.accept()[0] as receiver,
    ):
        sender.sendall(b"x" * 1000)
        wait_for(lambda: kernel_buffers(receiver).inq == 1000, what="the bytes to arrive")
        assert kernel_buffers(sender).outq == 0  # acknowledged: they wait in the receiver's queue now
        receiver.recv(600)
        assert kernel_buffers(receiver).inq == 400
        assert kernel_buffers(sender).sndbuf > 0 and kernel_buffers(receiver).rcvbuf > 0


def paused(server: BackgroundServer, client_port: int) -> ServerSide | None:
    """The server's end of the connection from `client_port`, if its writing is paused now."""
    side = server_side(server, client_port)
    return side if side is not None and side.writing_paused else None


def test_a_stalled_reader_fills_the_transport_to_its_high_water_mark_and_pauses_the_app() -> None:
    settings = Settings(max_tokens_limit=100_000, context_window=200_000)
    with serve_in_background(create_app(settings), loop="asyncio") as server:
        fix_send_buffer(server, 4_096)
        with socket.create_connection((server.host, server.port)) as stalled:
            stalled.sendall(STALLING)
            # The sample that saw the pause: a later one may find the buffer drained into a kernel queue that grew
            side = wait_for(lambda: paused(server, stalled.getsockname()[1]), what="a pause")
        assert side.kernel.sndbuf == 2 * 4_096  # Linux doubles what was asked for
        assert (side.low_water, side.high_water) == (16_384, 65_536)  # asyncio's defaults
        # Paused once above the high-water mark, until the buffer drains below the low one.
        assert side.low_water < side.transport_bytes < side.high_water + 1_000


def test_write_buffer_limit_lowers_the_transports_high_water_mark() -> None:
    settings = Settings(max_tokens_limit=100_000, context_window=200_000)
    with (
        serve_in_background(WriteBufferLimit(create_app(settings), 4_096), loop="asyncio") as server,
        socket.create_connection((server.host, server.port)) as stalled,
    ):
        stalled.sendall(STALLING)
        side = wait_for(lambda: paused(server, stalled.getsockname()[1]), what="a pause")
    assert side.high_water == 4_096 and side.transport_bytes < 4_096 + 1_000
