r"""Nagle's algorithm vs TCP_NODELAY for a server that writes each event in small pieces, measured on loopback.

A naive unbuffered server writes an event line by line, one `send()` each. With
Nagle's algorithm on, the kernel sends the first piece at once and holds the
rest until that piece is acknowledged; if the receiver delays its ACK (Linux:
40 ms or more), every token can wait that long:

    server                                client
    send("event: token\n") ─────────────▶ read: 13 bytes, event incomplete
    send("id: 3\n")         held ┐ ◀───── ACK, sent when that read empties the buffer
    send("data: ...\n\n")   held ┴──────▶ read: the rest, event complete

`serve_small_writes` is such a server (raw asyncio, 127.0.0.1, a free port); each
request picks TCP_NODELAY and the writes per event, and each event carries the
server's clock at its first write, so the client can tell how long the event
spent on the way (`delivery_delays`). `nagle_experiment` streams with TCP_NODELAY
on and off; `nagle_table` and `nagle_finding` summarize.

Before measuring: asyncio sets TCP_NODELAY on every TCP connection it makes or
accepts (`asyncio.base_events._set_nodelay`, since Python 3.6), uvloop does the
same, and uvicorn never touches the option. But asyncio only sets it on a socket
whose `proto` is IPPROTO_TCP. A socket made as `socket.socket(AF_INET,
SOCK_STREAM)` has proto 0, and so has every connection it accepts, so asyncio
leaves Nagle on. `serve_in_background` therefore binds with proto IPPROTO_TCP
(`uvicorn_nodelay` reads its connections' option); `uvicorn app:app`, which
binds through getaddrinfo (proto 6), gets TCP_NODELAY too, as does
`serve_small_writes` (`SmallWriteServer.accepted_nodelay` reads asyncio's
default before the server changes it). Even with Nagle on, the kit's server
would not suffer: uvicorn writes each event (chunk size, event, CRLF) with one
`transport.write`, and with one write per event Nagle has nothing to hold, as
measured below.

FINDING: loopback shows no delay from Nagle. Nagle does act, but the ACK it
waits for comes back within a tenth of a millisecond. Linux 6.18, 2 shared
cores, 10 runs of 30 tokens per variant; medians, TCP_NODELAY on / Nagle on:

    writes/event  token_ms  delivery delay ms  ITL ms         events split  reads/token
    1             0         0.14 / 0.13        0.10 / 0.09     0% /  0%     0.96 / 0.83
    1             1         0.10 / 0.10        1.15 / 1.14     0% /  0%     0.89 / 0.93
    1             10        0.25 / 0.27        10.33 / 10.35   0% /  0%     1.00 / 1.00
    1             50        0.29 / 0.29        50.33 / 50.34   0% /  0%     1.00 / 1.00
    3             0         0.20 / 0.21        0.16 / 0.08    89% / 27%     2.55 / 1.36
    3             1         0.11 / 0.15        1.15 / 1.14    10% / 70%     1.00 / 1.58
    3             10        0.17 / 0.22        10.22 / 10.23   2% / 81%     1.02 / 1.90
    3             50        0.32 / 0.42        50.36 / 50.33   0% / 82%     1.00 / 1.88

(TTFT was 1.4 to 2.2 ms for both.) With one write per event Nagle has nothing
to hold: the previous event was acknowledged long before. With three, Nagle
holds the second and third pieces of almost every event, so the client reads
the event in two parts (with Nagle off and tokens back to back, it reads one
piece at a time instead), but the hold lasts 0.05 to 0.09 ms (median from an
event's first byte to its last): +0.04 to 0.10 ms per token. No 40 ms stall
ever appeared, because on loopback a segment reaches the receiving socket
within the `send()` call, a new connection ACKs at once (quickack mode: the
first 5 events of each stream were never held), and after that Linux ACKs as
soon as the client's read empties a small pushed segment: the ACK costs one
wake-up of the reading thread, not a timer. The last event is not held either:
the `done` event and the close follow at once, and closing the socket sends
whatever Nagle holds. Across a real network the hold is a round trip per event,
or a delayed-ACK timeout when the receiver does not read at once, which
loopback cannot show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from tqdm.auto import tqdm

from ..background import BackgroundServer, _by_address
from ..client import STREAM_PATH, stream_chat
from ..metrics import ChatResult
from ..sse import MEDIA_TYPE, encode_event

NODELAY_LABEL = "TCP_NODELAY on (asyncio's default)"
NAGLE_LABEL = "Nagle on"
THREAD_TIMEOUT_S = 5.0  # for the server's thread to start, and to stop
NOTICEABLE_DELAY_MS = 5.0  # a median delay difference below this is no delay a reader of tokens could notice

_STREAM_HEAD = (
    f"HTTP/1.1 200 OK\r\nContent-Type: {MEDIA_TYPE}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
).encode()


def _refusal(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


def split_writes(event: bytes, writes: int) -> list[bytes]:
    """Cut an encoded event into at most `writes` pieces at line ends, as a server writing line by line would.

    The first pieces are one line each; the last holds the rest, blank line included.

    >>> split_writes(b"event: token\\nid: 0\\ndata: x\\n\\n", 3)
    [b'event: token\\n', b'id: 0\\n', b'data: x\\n\\n']
    >>> split_writes(b"event: token\\nid: 0\\ndata: x\\n\\n", 1)
    [b'event: token\\nid: 0\\ndata: x\\n\\n']
    """
    if writes < 1:
        raise ValueError(f"writes must be 1 or more: {writes!r}")
    lines = event.splitlines(keepends=True)
    alone = min(writes, len(lines)) - 1
    return [*lines[:alone], b"".join(lines[alone:])]


@dataclass(frozen=True)
class _StreamRequest:
    """What one request asks of the small-write server, from its query string."""

    tokens: int
    token_ms: float
    writes_per_event: int
    nodelay: bool

    @classmethod
    def from_query(cls, query: str) -> _StreamRequest:
        """Parse `max_tokens`, `token_ms`, `writes_per_event` and `nodelay` (1 or 0); ValueError if out of range."""
        values = {name: given[-1] for name, given in parse_qs(query).items()}
        nodelay = values.get("nodelay", "1")
        request = cls(
            tokens=int(values.get("max_tokens", 30)),
            token_ms=float(values.get("token_ms", 10)),
            writes_per_event=int(values.get("writes_per_event", 3)),
            nodelay=nodelay == "1",
        )
        in_range = request.tokens >= 1 and request.writes_per_event >= 1 and 0 <= request.token_ms <= 10_000
        if nodelay not in ("0", "1") or not in_range:
            raise ValueError(f"out of range: {query}")
        return request


@dataclass
class SmallWriteServer:
    """The running server's `url`, and TCP_NODELAY as asyncio left each connection it accepted.

    `accepted_nodelay` is read before the server sets the option a request asks for.
    """

    url: str
    accepted_nodelay: list[bool] = field(default_factory=list)


async def _stream(writer: asyncio.StreamWriter, request: _StreamRequest) -> None:
    """Write the head, then each token event in `writes_per_event` pieces, each its own `send()`.

    asyncio's `transport.write` calls `send()` at once while nothing is queued, so
    each piece reaches the kernel on its own, where Nagle (if on) may hold it. Each
    event carries `sent_at`, `time.perf_counter()` just before its first piece:
    client and server run in one process and share that clock.
    """
    writer.write(_STREAM_HEAD)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index in range(request.tokens):
        await asyncio.sleep(max(0.0, start + index * request.token_ms / 1000 - loop.time()))
        data = json.dumps({"token": f" t{index}", "index": index, "sent_at": time.perf_counter()})
        for piece in split_writes(encode_event(data, event="token", id=str(index)), request.writes_per_event):
            writer.write(piece)
        await writer.drain()
    writer.write(encode_event(json.dumps({"finish_reason": "length", "tokens": request.tokens}), event="done"))
    await writer.drain()


class _SmallWriteLoop:
    """The server's thread and event loop: all that starting and stopping it needs."""

    def __init__(self) -> None:
        self.server: SmallWriteServer | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.responding: set[asyncio.Task[None]] = set()
        self.thread = threading.Thread(target=self._run, name="sse-lab-small-writes", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # reported to the starting thread
            self.error = error
        finally:
            self.ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        listener = await asyncio.start_server(self._respond, "127.0.0.1", 0)
        async with listener:
            port = listener.sockets[0].getsockname()[1]
            self.server = SmallWriteServer(f"http://127.0.0.1:{port}")
            self.ready.set()
            await self.stopping.wait()
            listener.close()
            for task in self.responding:
                task.cancel()
            await asyncio.gather(*self.responding, return_exceptions=True)

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self.server is not None
        self.responding.add(task)
        sock = writer.get_extra_info("socket")
        self.server.accepted_nodelay.append(bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            try:
                method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
                url = urlsplit(target)
                request = _StreamRequest.from_query(url.query)
            except ValueError:
                writer.write(_refusal("400 Bad Request"))
                return
            if method != "GET" or url.path != STREAM_PATH:
                writer.write(_refusal("404 Not Found"))
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(request.nodelay))
            await _stream(writer, request)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client left before a whole request, or sent an endless one
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.responding.discard(task)

    def start(self) -> SmallWriteServer:
        self.thread.start()
        self.ready.wait(THREAD_TIMEOUT_S)
        if self.server is None:
            self.stop()
            raise RuntimeError(f"the small-write server did not start: {self.error or 'timed out'}") from self.error
        return self.server

    def stop(self) -> None:
        if self.loop is not None and self.stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing left to stop
                self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(THREAD_TIMEOUT_S)


@contextlib.contextmanager
def serve_small_writes() -> Iterator[SmallWriteServer]:
    """Serve `GET /api/chat/stream` on 127.0.0.1, a free port, from a thread of its own; stop on leaving.

    Query: `max_tokens` (30), `token_ms` (10), `writes_per_event` (3), `nodelay`
    (1: TCP_NODELAY on; 0: Nagle on). Tokens leave on a fixed schedule from the
    first, with no prefill. `stream_chat` reads it like the kit's own server:

    >>> with serve_small_writes() as server:
    ...     result = stream_chat(server.url, "hi", max_tokens=3, token_ms=0, writes_per_event=3, nodelay=0)
    >>> result.tokens, result.finish_reason, server.accepted_nodelay
    (3, 'length', [True])
    """
    running = _SmallWriteLoop()
    server = running.start()
    try:
        yield server
    finally:
        running.stop()


def uvicorn_nodelay(server: BackgroundServer) -> bool:
    """TCP_NODELAY on the socket that `server`'s uvicorn accepted for a connection of ours, read on its side.

    Opens a keep-alive connection, waits for a response's head (by then uvicorn
    tracks the connection), and finds its socket among uvicorn's connections.
    """
    uvicorn_server = _by_address[(server.host, server.port)].server
    with socket.create_connection((server.host, server.port)) as client:
        client.sendall(f"GET /api/stats HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
        received = b""
        while b"\r\n\r\n" not in received:
            if not (read := client.recv(4096)):
                raise ConnectionError("the server closed the connection before answering")
            received += read
        ours = client.getsockname()
        for connection in list(uvicorn_server.server_state.connections):
            accepted = connection.transport.get_extra_info("socket")
            if accepted.getpeername() == ours:
                return bool(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    raise LookupError(f"uvicorn holds no connection from {ours}")


def delivery_delays(result: ChatResult) -> list[float]:
    """Seconds from the server's first write of each token event to the client holding the complete event."""
    return [
        received.complete_at - json.loads(received.event.data)["sent_at"]
        for received in result.events
        if received.event.event == "token"
    ]


def nagle_experiment(
    *,
    tokens: int = 30,
    token_ms: float = 10,
    writes_per_event: int = 3,
    runs: int = 3,
    progress: bool = True,
) -> dict[str, list[ChatResult]]:
    """Stream the same small-write events `runs` times with TCP_NODELAY on and `runs` times with Nagle on.

    One server serves both; the variants alternate, so a slow moment of the machine hits both alike.
    """
    if tokens < 2:
        raise ValueError(f"inter-token latency needs 2 tokens or more: {tokens!r}")
    variants = {NODELAY_LABEL: 1, NAGLE_LABEL: 0}
    results: dict[str, list[ChatResult]] = {label: [] for label in variants}
    with serve_small_writes() as server:
        for _ in tqdm(range(runs), desc="TCP_NODELAY vs Nagle", disable=not progress):
            for label, nodelay in variants.items():
                result = stream_chat(
                    server.url,
                    "hi",
                    max_tokens=tokens,
                    token_ms=token_ms,
                    writes_per_event=writes_per_event,
                    nodelay=nodelay,
                )
                results[label].append(result)
    return results


@dataclass(frozen=True)
class NagleSummary:
    """A variant's runs pooled. Times in ms; `split` is the share of token events that came in more than one read."""

    runs: int
    tokens: int
    ttft_ms: float
    itl_median_ms: float
    itl_p90_ms: float
    delay_median_ms: float
    delay_p90_ms: float
    spread_median_ms: float  # from an event's first byte to its completion: how long its rest came after it
    split: float
    reads_per_token: float

    @classmethod
    def of(cls, runs: Sequence[ChatResult]) -> NagleSummary:
        itl = [gap for run in runs for gap in run.itl]
        delays = [delay for run in runs for delay in delivery_delays(run)]
        token_events = [received for run in runs for received in run.events if received.event.event == "token"]
        spreads = [received.complete_at - received.first_byte_at for received in token_events]
        tokens = sum(run.tokens for run in runs)
        return cls(
            runs=len(runs),
            tokens=tokens,
            ttft_ms=1000 * statistics.median(run.ttft for run in runs if run.ttft is not None),
            itl_median_ms=1000 * statistics.median(itl),
            itl_p90_ms=1000 * _p90(itl),
            delay_median_ms=1000 * statistics.median(delays),
            delay_p90_ms=1000 * _p90(delays),
            spread_median_ms=1000 * statistics.median(spreads),
            split=sum(spread > 0 for spread in spreads) / len(spreads),
            reads_per_token=sum(len(run.chunks) for run in runs) / tokens,
        )


def _p90(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def nagle_table(results: Mapping[str, Sequence[ChatResult]]) -> str:
    """A plain-text table of `NagleSummary` per variant."""
    columns = ["runs", "tokens", "TTFT", "ITL p50", "ITL p90", "delay p50", "delay p90", "spread p50", "split"]
    columns.append("reads/tok")
    width = max(map(len, results)) + 2
    lines = [f"{'variant':<{width}}" + "".join(f"{column:>11}" for column in columns)]
    for label, runs in results.items():
        summary = NagleSummary.of(runs)
        times = [summary.ttft_ms, summary.itl_median_ms, summary.itl_p90_ms]
        times += [summary.delay_median_ms, summary.delay_p90_ms, summary.spread_median_ms]
        cells = [f"{summary.runs:>11}", f"{summary.tokens:>11}"] + [f"{ms:>8.2f} ms" for ms in times]
        cells += [f"{summary.split:>11.0%}", f"{summary.reads_per_token:>11.2f}"]
        lines.append(f"{label:<{width}}" + "".join(cells))
    return "\n".join(lines)


def nagle_finding(results: Mapping[str, Sequence[ChatResult]]) -> str:
    """One sentence: did Nagle delay the tokens, and by how much, in these results."""
    nodelay, nagle = NagleSummary.of(results[NODELAY_LABEL]), NagleSummary.of(results[NAGLE_LABEL])
    extra_ms = nagle.delay_median_ms - nodelay.delay_median_ms
    numbers = (
        f"median delivery delay {nagle.delay_median_ms:.2f} ms with Nagle vs {nodelay.delay_median_ms:.2f} ms "
        f"with TCP_NODELAY, ITL median {nagle.itl_median_ms:.1f} vs {nodelay.itl_median_ms:.1f} ms, "
        f"{nagle.split:.0%} vs {nodelay.split:.0%} of token events split across reads"
    )
    if extra_ms >= NOTICEABLE_DELAY_MS:
        return f"Nagle delayed each token by about {extra_ms:.0f} ms: {numbers}."
    return f"No noticeable delay from Nagle here ({extra_ms:+.2f} ms per token): {numbers}."
