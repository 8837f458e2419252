"""A TCP relay that counts the bytes crossing it each way: the wire cost of any protocol, handshakes included.

    client ──▶ relay on 127.0.0.1:R ──▶ upstream 127.0.0.1:U
           ◀──  counts every read   ◀──

It knows nothing of HTTP, WebSocket or HTTP/2: every byte the client and the server
exchange over TCP passes through it and is counted (TCP/IP headers are not, they
are the same for every protocol on top). It runs on its own thread and loop and
forwards each read at once (TCP_NODELAY, asyncio's default), so it adds a hop but
no buffering. `relay_to` is a context manager; `CountingRelay.totals()` reads the
counters, `reset()` zeroes them between measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .wire import LOOPBACK_HOSTS

READ_SIZE = 65_536
STOP_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ByteCount:
    """Bytes that crossed the relay: `up` from the client to the server, `down` back, over `connections`."""

    up: int
    down: int
    connections: int

    @property
    def total(self) -> int:
        return self.up + self.down


class CountingRelay:
    """Handle on a running relay: `host`, `port`, `url` (http://host:port), `totals()`, `reset()`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        if upstream_host not in LOOPBACK_HOSTS:
            raise ValueError(f"the relay only forwards to loopback, got {upstream_host!r}")
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self._lock = threading.Lock()
        self._up = self._down = self._connections = 0
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._relaying: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="sse-lab-relay", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def target(self) -> str:
        """host:port, as gRPC channels want it."""
        return f"{self.host}:{self.port}"

    def totals(self) -> ByteCount:
        with self._lock:
            return ByteCount(self._up, self._down, self._connections)

    def reset(self) -> None:
        with self._lock:
            self._up = self._down = self._connections = 0

    def _count(self, direction: str, size: int) -> None:
        with self._lock:
            if direction == "up":
                self._up += size
            else:
                self._down += size

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while data := await reader.read(READ_SIZE):
                self._count(direction, len(data))
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):  # the other side is already closed
                writer.write_eof() if writer.can_write_eof() else writer.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        relaying = asyncio.current_task()
        assert relaying is not None
        self._relaying.add(relaying)
        with self._lock:
            self._connections += 1
        writers = [client_writer]
        self._open.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
            writers.append(server_writer)
            self._open.add(server_writer)
            await asyncio.gather(
                self._pump(client_reader, server_writer, "up"), self._pump(server_reader, client_writer, "down")
            )
        except OSError:
            pass  # the upstream refused: the client sees its connection close
        finally:
            for writer in writers:
                writer.close()
                self._open.discard(writer)
            self._relaying.discard(relaying)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._relay, self.host, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        async with server:
            await self._stopping.wait()
            # Connections still open end now, and their tasks finish rather than being cancelled at exit.
            for writer in list(self._open):
                writer.close()
            if self._relaying:
                await asyncio.wait(self._relaying, timeout=STOP_TIMEOUT_S / 2)

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(STOP_TIMEOUT_S * 5):
            raise RuntimeError("the relay did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(STOP_TIMEOUT_S)


@contextlib.contextmanager
def relay_to(upstream_host: str, upstream_port: int) -> Iterator[CountingRelay]:
    """Run a counting relay on 127.0.0.1, a free port, to the loopback `upstream` for a `with` block.

    >>> import socket
    >>> with socket.create_server(("127.0.0.1", 0)) as upstream, relay_to(*upstream.getsockname()) as relay:
    ...     with socket.create_connection((relay.host, relay.port)) as client:
    ...         client.sendall(b"hello")
    ...         accepted, _ = upstream.accept()
    ...         accepted.recv(5), accepted.close()
    (b'hello', None)
    >>> relay.totals().up
    5
    """
    relay = CountingRelay(upstream_host, upstream_port)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()
