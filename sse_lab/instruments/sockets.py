"""Where a stream's bytes wait between the app and its reader: the transport's buffer and the kernel's.

    app ── send() ──▶ uvicorn ── transport.write() ──▶ asyncio write buffer ──▶ kernel send queue
                                                                                  │ loopback
    reader ◀── recv() ◀── kernel receive queue ◀────────────────────────────────┘

What is read here, on Linux:

- `SO_SNDBUF`, `SO_RCVBUF` (getsockopt): the kernel buffers' sizes. Linux doubles
  the value a `setsockopt` asks for (the other half is its bookkeeping), and
  unless one is set, grows them as the connection needs, up to
  /proc/sys/net/ipv4/tcp_wmem and tcp_rmem's maxima (4 MiB and 6 MiB by default).
- `SIOCOUTQ` (the same request as `TIOCOUTQ`, 0x5411): bytes in the send queue not
  yet acknowledged by the peer. `SIOCINQ` (= `FIONREAD`, 0x541B): bytes received
  that the application has not read.
- The transport's write buffer. uvicorn (0.54 here, the httptools protocol; h11's
  is alike) hands every ASGI body message to asyncio's `transport.write()`, which
  sends what the socket takes and keeps the rest (`get_write_buffer_size()`).
  Above the high-water mark (asyncio's default: 64 KiB, the low-water mark a
  quarter of it) the transport calls the protocol's `pause_writing()`; uvicorn's
  `FlowControl` then makes the app's next `send()` wait in `drain()` until the
  buffer falls below the low-water mark. So the transport holds at most the mark
  plus one message. (uvicorn's own `HIGH_WATER_LIMIT = 65536`, in
  protocols/http/flow_control.py, is about the request body it reads, not writes.)
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import uvicorn

from ..background import BackgroundServer, _by_address

SIOCOUTQ = 0x5411  # Linux's TIOCOUTQ, which sockets answer with their send queue
SIOCINQ = 0x541B  # Linux's FIONREAD
UVICORN_VERSION = uvicorn.__version__


class _Socket(Protocol):
    def fileno(self) -> int: ...
    def getsockopt(self, level: int, option: int) -> int: ...


@dataclass(frozen=True)
class KernelBuffers:
    """One socket's kernel buffers: sizes (sndbuf, rcvbuf) and bytes queued in them now (outq, inq)."""

    sndbuf: int
    rcvbuf: int
    outq: int  # written by the application, not yet acknowledged by the peer
    inq: int  # arrived, not yet read by the application


def _ioctl_int(fd: int, request: int) -> int:
    import fcntl  # here: the module imports on systems without it; only the measurement needs Linux

    queued: int = struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0]
    return queued


def kernel_buffers(sock: _Socket) -> KernelBuffers:
    """Read a socket's buffer sizes and queues (Linux); works on a `socket.socket` and an asyncio transport's socket."""
    fd = sock.fileno()
    return KernelBuffers(
        sndbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        outq=_ioctl_int(fd, SIOCOUTQ),
        inq=_ioctl_int(fd, SIOCINQ),
    )


@dataclass(frozen=True)
class ServerSide:
    """The server's end of one connection: its kernel buffers and its transport's write buffer.

    transport_bytes: waiting in the transport, not yet taken by the kernel.
    high_water, low_water: the transport's marks (see the module docstring).
    writing_paused: above the mark, uvicorn holds the app's next send.
    """

    kernel: KernelBuffers
    transport_bytes: int
    high_water: int
    low_water: int
    writing_paused: bool


def _connection(server_address: tuple[str, int], client_port: int) -> Any:
    # The in-kernel server's uvicorn.Server knows its connections (protocol objects, each
    # with its transport and FlowControl); ASGI gives an app no way to reach them.
    running = _by_address.get(server_address)
    for protocol in [] if running is None else list(running.server.server_state.connections):
        peer = protocol.transport.get_extra_info("peername")
        if peer is not None and peer[1] == client_port:
            return protocol
    return None


T = TypeVar("T")


def on_server_loop(server: BackgroundServer, sample: Callable[[], T]) -> T:
    """Call `sample()` on the event loop of `server` (one `serve_in_background` started in this process).

    Nothing is written to a connection while it runs, so what it reads together is one instant's state.
    """
    running = _by_address[(server.host, server.port)]
    assert running.loop is not None

    async def call() -> T:
        return sample()

    return asyncio.run_coroutine_threadsafe(call(), running.loop).result(timeout=5)


def server_side_now(server: BackgroundServer, client_port: int) -> ServerSide | None:
    """The server's end of the connection from `client_port`; None once it is gone. Call it on the server's loop."""
    protocol = _connection((server.host, server.port), client_port)
    if protocol is None or protocol.transport.is_closing():
        return None
    transport = protocol.transport
    low, high = transport.get_write_buffer_limits()
    return ServerSide(
        kernel=kernel_buffers(transport.get_extra_info("socket")),
        transport_bytes=transport.get_write_buffer_size(),
        high_water=high,
        low_water=low,
        writing_paused=protocol.flow.write_paused,
    )


def server_side(server: BackgroundServer, client_port: int) -> ServerSide | None:
    """Sample the server's end of the connection from `client_port`, on the server's own loop; None once it is gone."""
    return on_server_loop(server, lambda: server_side_now(server, client_port))


def fix_send_buffer(server: BackgroundServer, sndbuf: int) -> None:
    """Give every connection `server` accepts from now on a fixed `SO_SNDBUF` of `sndbuf` bytes (Linux doubles it).

    Set on the listening socket, it is inherited by each accepted one, and turns the
    kernel's autotuning off for them: the send queue of a stalled connection then
    stops near that size instead of growing to megabytes.
    """
    _by_address[(server.host, server.port)].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)


class WriteBufferLimit:
    """ASGI wrapper for an app that `serve_in_background` serves: each connection's transport pauses above `high` bytes.

    asyncio's default high-water mark is 64 KiB (see the module docstring): for a
    stalled stream of 60-byte events that is a thousand tokens waiting in the
    transport, in front of any queue of the app's. A smaller mark shows the app's
    own queue sooner. It is set when a request arrives, on the server's loop.
    """

    def __init__(self, app: Any, high: int) -> None:
        self.app = app
        self.high = high

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("server") and scope.get("client"):
            protocol = _connection(tuple(scope["server"]), scope["client"][1])
            if protocol is not None:
                protocol.transport.set_write_buffer_limits(high=self.high)
        await self.app(scope, receive, send)
