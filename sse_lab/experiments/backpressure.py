"""Backpressure made visible: where a stalled stream's bytes wait, and what a slow reader costs under each policy.

Three experiments, each over real loopback sockets with a raw-socket reader (no
HTTP library that would read ahead on its own):

- `stall`: a reader that takes the headers and then nothing. Sampled over time:
  the tokens the model has produced, the bytes the app has written, the bytes
  the reader has read, and where the difference waits: the app's queue, the
  transport's write buffer, the server's kernel send queue, the reader's kernel
  receive queue (`sse_lab.instruments.sockets`). The server runs in this process,
  so that its transport can be read.
- `paced_reader`: a reader that takes `rate_bytes_s` bytes per second, once per
  policy. Sampled: the server's memory (its resident set, RSS, and its queues'
  depth), the producer's progress against the model's schedule, and the events
  and tokens the reader got; per token, the reader's lateness: its arrival minus
  the time the model's schedule made it due (`ttft_ms + index x token_ms`).
- `many_stalled_readers`: `readers` stalled readers at once, per policy; the
  server's RSS growth over its resting RSS.

The last two run the server in a child process (`memory.server_process`) so
that its RSS is its own. Both fix the server's send buffer and the reader's
receive buffer (`sndbuf`, `rcvbuf`): with the kernel's autotuning on loopback a
stalled connection takes megabytes before the app notices anything.

Run all three at full size and save the results (the notebook plots a small run
of its own, and these):

    python -m sse_lab.experiments.backpressure --json sse_lab/experiments/backpressure_report.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..background import serve_in_background
from ..client import fetch_stats, stream_chat
from ..instruments.sockets import UVICORN_VERSION, fix_send_buffer, kernel_buffers, on_server_loop, server_side_now
from ..instruments.wire import _Dechunker
from ..model import sim_tokens
from ..producer import POLICIES
from ..server import Settings, create_app
from ..sse import Decoder
from .memory import MemoryMeasurementUnavailable, ServerProcess, server_process

PROMPT = "How much can a stalled reader make the server hold?"
BENCHMARK = Path(__file__).resolve().parent / "backpressure_report.json"  # saved by `main`, shipped as package data
READ_SIZE = 65_536


@contextlib.contextmanager
def _raw_stream(host: str, port: int, params: dict[str, Any], rcvbuf: int | None) -> Iterator[socket.socket]:
    """A GET of the stream on a plain socket (its `SO_RCVBUF` set before connecting, if given), closed at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:  # before connect, so the window the reader offers is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((host, port))
        query = "&".join(f"{name}={value}" for name, value in {"prompt": PROMPT.replace(" ", "+"), **params}.items())
        sock.sendall(f"GET /api/chat/stream?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        yield sock
    finally:
        sock.close()


def _read_head(sock: socket.socket, timeout_s: float = 10.0) -> tuple[bytes, bytes]:
    """Read the status line and headers; return them and the body bytes that came with them."""
    sock.settimeout(timeout_s)
    received = b""
    while b"\r\n\r\n" not in received:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"the server closed the connection before the headers ended: {received!r}")
        received += data
    head, _, body = received.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"the stream was refused: {head.decode(errors='replace')}")
    return head, body


def _stream_settings(max_tokens: int) -> Settings:
    return Settings(max_tokens_limit=max_tokens, context_window=max_tokens + 1_000, max_stream_s=3_600)


# ── Where the bytes wait ─────────────────────────────────────────────────────


class _CountWrites:
    """ASGI wrapper: `written` is the body bytes the app handed to uvicorn, with uvicorn's chunk framing."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.written = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counting(message: Any) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                framing = len(b"%x\r\n\r\n" % len(body)) if body else 0  # size line and CRLF, as uvicorn frames it
                self.written += len(body) + framing + (0 if message.get("more_body", False) else 5)
            await send(message)

        await self.app(scope, receive, counting)


@dataclass(frozen=True)
class BufferSample:
    """Where a stalled stream's bytes are, at `at` seconds after the request (all bytes on the wire, framed).

    written = read + client_inq + server_outq + transport + (in flight on loopback: none);
    app_queue is what the app holds before writing (a producer's queue).
    """

    at: float
    tokens_produced: int
    written: int
    read: int
    client_inq: int
    server_outq: int
    transport: int
    app_queue: int
    server_sndbuf: int
    client_rcvbuf: int
    writing_paused: bool

    @property
    def in_buffers(self) -> int:
        """Bytes written and not read: in the reader's receive queue, the server's send queue and the transport."""
        return self.client_inq + self.server_outq + self.transport


@dataclass
class StallRun:
    """One stalled reader: its samples, the transport's water marks, and the average bytes of one token event."""

    label: str
    rcvbuf_asked: int | None
    sndbuf_fixed: int | None
    policy: str
    samples: list[BufferSample]
    high_water: int
    low_water: int
    event_bytes: float  # on the wire, framing included
    uvicorn_version: str = UVICORN_VERSION

    @property
    def last(self) -> BufferSample:
        return self.samples[-1]


def _settled(samples: Sequence[BufferSample | ServerSample], settle_s: float) -> bool:
    """Whether the model has produced no token during the last `settle_s` seconds of samples."""
    if not samples or samples[-1].at < settle_s:
        return False
    recent = [sample for sample in samples if sample.at >= samples[-1].at - settle_s]
    return recent[0].tokens_produced == recent[-1].tokens_produced and recent[0] is not samples[-1]


def stall(
    *,
    stall_s: float = 4.0,
    max_tokens: int = 1_000_000,
    rcvbuf: int | None = None,
    sndbuf: int | None = None,
    policy: str = "pull",
    queue_max: int = 64,
    interval_s: float = 0.1,
    settle_s: float = 0.5,
    label: str | None = None,
) -> StallRun:
    """Ask for `max_tokens` tokens at full speed (ttft_ms=0, token_ms=0), read the headers, then nothing.

    Sampling stops once the model has produced nothing for `settle_s` (every
    buffer is full: the stream has stalled), or after `stall_s`. `rcvbuf` sets
    the reader's SO_RCVBUF before it connects, `sndbuf` fixes the server's (None:
    the kernel's defaults and autotuning).
    """
    counted = _CountWrites(create_app(_stream_settings(max_tokens)))
    params = {"max_tokens": max_tokens, "ttft_ms": 0, "token_ms": 0, "backpressure": policy, "queue_max": queue_max}
    samples: list[BufferSample] = []
    with serve_in_background(counted, loop="asyncio") as server:
        if sndbuf is not None:
            fix_send_buffer(server, sndbuf)
        started = time.perf_counter()
        with _raw_stream(server.host, server.port, params, rcvbuf) as sock:
            _, body = _read_head(sock)
            client_port = sock.getsockname()[1]
            limits = (0, 0)
            while (at := time.perf_counter() - started) < stall_s and not _settled(samples, settle_s):
                time.sleep(interval_s)
                counters = fetch_stats(server.url)
                # One instant on the server's loop: what was written, and where it is.
                side, mine, written = on_server_loop(
                    server, lambda: (server_side_now(server, client_port), kernel_buffers(sock), counted.written)
                )
                if side is None:
                    raise ConnectionError("the server closed the stalled connection")
                limits = (side.low_water, side.high_water)
                samples.append(
                    BufferSample(
                        at=at,
                        tokens_produced=counters["tokens_generated"],
                        written=written,
                        read=len(body),
                        client_inq=mine.inq,
                        server_outq=side.kernel.outq,
                        transport=side.transport_bytes,
                        app_queue=counters["queued_bytes"],
                        server_sndbuf=side.kernel.sndbuf,
                        client_rcvbuf=mine.rcvbuf,
                        writing_paused=side.writing_paused,
                    )
                )
            tokens = samples[-1].tokens_produced
    event_bytes = samples[-1].written / max(tokens, 1)
    name = label or f"rcvbuf {'default' if rcvbuf is None else rcvbuf}"
    return StallRun(name, rcvbuf, sndbuf, policy, samples, limits[1], limits[0], event_bytes)


# ── A reader that takes k bytes per second ───────────────────────────────────


@dataclass(frozen=True)
class ServerSample:
    """The server and the reader at `at` seconds after the request.

    rss_growth: the server's resident set minus its resting one, in bytes.
    tokens_produced: by the model so far; tokens_due: what the model's schedule
    (ttft_ms + index x token_ms) had made due by then. queued_events/bytes: in
    the producer's queue. events_read, tokens_read: complete events the reader
    has parsed, and the tokens they carried.
    """

    at: float
    rss_growth: int
    tokens_produced: int
    tokens_due: int
    queued_events: int
    queued_bytes: int
    bytes_read: int
    events_read: int
    tokens_read: int


@dataclass
class PacedRun:
    """One policy against a reader of `rate_bytes_s`: samples over time, and each token's lateness (s) at the reader."""

    policy: str
    rate_bytes_s: float
    samples: list[ServerSample]
    lateness: list[tuple[int, float]]  # (token index, arrival - due)
    text_intact: bool  # what the reader got is the start of the model's text, token for token

    @property
    def peak_queued_bytes(self) -> int:
        return max(sample.queued_bytes for sample in self.samples)

    @property
    def producer_lag(self) -> int:
        """The most tokens the producer was ever behind the model's schedule: what pausing it cost."""
        return max(sample.tokens_due - sample.tokens_produced for sample in self.samples)

    @property
    def events_read(self) -> int:
        return self.samples[-1].events_read

    @property
    def tokens_read(self) -> int:
        return self.samples[-1].tokens_read

    @property
    def last_lateness(self) -> float:
        """How late the last token the reader got was, in seconds."""
        return self.lateness[-1][1]


class _PacedReader(threading.Thread):
    """Reads a stream at most `rate_bytes_s` bytes per second; parses events as they complete."""

    def __init__(self, sock: socket.socket, rate_bytes_s: float, started: float, body: bytes) -> None:
        super().__init__(name="sse-lab-paced-reader", daemon=True)
        self.sock = sock
        self.rate = rate_bytes_s
        self.started = started
        self.stop = threading.Event()
        self.dechunker = _Dechunker()
        self.decoder = Decoder()
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.events = 0
        self.tokens: list[tuple[int, str, float]] = []  # (index, text, arrival), one per token
        self._take(body)

    def _take(self, data: bytes) -> None:
        now = time.perf_counter() - self.started
        for event in self.decoder.feed(self.dechunker.feed(data)):
            if event.event != "token":
                continue
            token = json.loads(event.data)
            with self.lock:
                self.events += 1
                for offset in range(token.get("count", 1)):  # a merged event's tokens arrive together
                    self.tokens.append((token["index"] + offset, token["token"] if offset == 0 else "", now))
        with self.lock:
            self.bytes_read += len(data)

    def run(self) -> None:
        self.sock.settimeout(0.05)
        allowance, last = 0.0, time.perf_counter()
        while not self.stop.is_set() and not self.dechunker.done:
            now = time.perf_counter()
            allowance = min(allowance + (now - last) * self.rate, self.rate * 0.05)  # no bursts above 50 ms' worth
            last = now
            if allowance < 1:
                time.sleep(0.005)
                continue
            try:
                data = self.sock.recv(min(int(allowance), READ_SIZE))
            except (TimeoutError, OSError):
                continue
            if not data:
                return
            allowance -= len(data)
            self._take(data)


def _paced_sample(
    server: ServerProcess, reader: _PacedReader, resting: int, token_ms: float, max_tokens: int
) -> ServerSample:
    counters = fetch_stats(server.url)
    at = time.perf_counter() - reader.started  # after the counters came: the schedule is not read early
    with reader.lock:
        read = (reader.bytes_read, reader.events, len(reader.tokens))
    due = _due(at, 0, token_ms, max_tokens)
    queued = (counters["queued_events"], counters["queued_bytes"])
    return ServerSample(at, server.resident_bytes() - resting, counters["tokens_generated"], due, *queued, *read)


def _due(elapsed_s: float, ttft_ms: float, token_ms: float, max_tokens: int) -> int:
    elapsed_ms = 1000 * elapsed_s - ttft_ms
    if elapsed_ms < 0:
        return 0
    return max_tokens if token_ms == 0 else min(max_tokens, int(elapsed_ms // token_ms) + 1)


def _server_limit(max_tokens: int, readers: int) -> dict[str, int]:
    return {"max_tokens_limit": max_tokens, "max_concurrent_streams": max(readers, 32)}


def paced_reader(
    policies: Sequence[str] = POLICIES,
    *,
    rate_bytes_s: float = 20_000,
    max_tokens: int = 1_500,
    token_ms: float = 1.0,
    duration_s: float = 10.0,
    queue_max: int = 16,
    sndbuf: int | None = 4_096,
    rcvbuf: int | None = 4_096,
    write_buffer_high: int | None = 4_096,
    interval_s: float = 0.05,
    progress: bool = True,
) -> dict[str, PacedRun]:
    """Per policy, a fresh server process streaming to a reader that takes `rate_bytes_s` bytes per second.

    The model produces a token every `token_ms` (about 65 bytes on the wire
    each), so below about 65,000 / token_ms bytes per second the reader falls
    behind. The reader reads to the end of the stream, or leaves after
    `duration_s`. The buffers in front of the app's queue are kept small
    (`sndbuf`, `rcvbuf`, `write_buffer_high`; None: the defaults) so that the
    queue's effect shows within seconds.
    """
    runs = {}
    expected = sim_tokens(PROMPT, max_tokens)
    for policy in tqdm(policies, desc="paced reader", disable=not progress):
        params = {"max_tokens": max_tokens, "ttft_ms": 0, "token_ms": token_ms, "backpressure": policy}
        params["queue_max"] = queue_max
        limits = _server_limit(max_tokens, 1)
        with server_process(**limits, sndbuf=sndbuf, write_buffer_high=write_buffer_high) as server:
            host, port = _host_port(server.url)
            resting = server.resident_bytes()
            samples = []
            started = time.perf_counter()
            with _raw_stream(host, port, params, rcvbuf) as sock:
                _, body = _read_head(sock)
                reader = _PacedReader(sock, rate_bytes_s, started, body)

                reader.start()
                try:
                    while time.perf_counter() - started < duration_s and reader.is_alive():
                        samples.append(_paced_sample(server, reader, resting, token_ms, max_tokens))
                        time.sleep(interval_s)
                finally:
                    reader.stop.set()
                    reader.join(5)
                samples.append(_paced_sample(server, reader, resting, token_ms, max_tokens))  # after its last read
        received = reader.tokens
        text = [piece for _, piece, _ in received]
        intact = "".join(text) == "".join(expected[: len(received)])
        lateness = [(index, arrival - (index * token_ms) / 1000) for index, _, arrival in received]
        runs[policy] = PacedRun(policy, rate_bytes_s, samples, lateness, intact)
    return runs


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


# ── Many stalled readers ─────────────────────────────────────────────────────


@dataclass
class CrowdRun:
    """`readers` stalled readers under one policy: the server's RSS growth and its counters over time.

    rss_growth and peak_growth: resident set (VmRSS) and its high-water mark
    (VmHWM) minus the resting resident set, in bytes.
    """

    policy: str
    readers: int
    max_tokens: int
    resting_bytes: int
    peak_growth: int
    samples: list[ServerSample] = field(default_factory=list)


def many_stalled_readers(
    policies: Sequence[str] = POLICIES,
    *,
    readers: int = 100,
    max_tokens: int = 4_000,
    stall_s: float = 30.0,
    settle_s: float = 0.5,
    queue_max: int = 16,
    sndbuf: int | None = 4_096,
    rcvbuf: int | None = 4_096,
    write_buffer_high: int | None = 4_096,
    interval_s: float = 0.1,
    progress: bool = True,
) -> dict[str, CrowdRun]:
    """Per policy, a fresh server process and `readers` readers that each ask for `max_tokens` tokens and read nothing.

    The model runs at full speed (ttft_ms=0, token_ms=0). Once no model has
    produced a token for `settle_s` (each has finished, or stalled), or after
    `stall_s`, the readers leave. `sndbuf`, `rcvbuf` and `write_buffer_high` keep
    the buffers in front of the app's queue small, as in `paced_reader`.
    """
    runs = {}
    params = {"max_tokens": max_tokens, "ttft_ms": 0, "token_ms": 0, "queue_max": queue_max}
    for policy in tqdm(policies, desc=f"{readers} stalled readers", disable=not progress):
        limits = _server_limit(max_tokens, readers)
        with server_process(**limits, sndbuf=sndbuf, write_buffer_high=write_buffer_high) as server:
            host, port = _host_port(server.url)
            resting = server.resident_bytes()
            server.reset_peak()
            samples = []
            with contextlib.ExitStack() as stack:
                for _ in range(readers):
                    stack.enter_context(_raw_stream(host, port, {**params, "backpressure": policy}, rcvbuf))
                started = time.perf_counter()
                while (at := time.perf_counter() - started) < stall_s and not _settled(samples, settle_s):
                    time.sleep(interval_s)
                    counters = fetch_stats(server.url)
                    samples.append(
                        ServerSample(
                            at,
                            server.resident_bytes() - resting,
                            counters["tokens_generated"],
                            readers * max_tokens,
                            counters["queued_events"],
                            counters["queued_bytes"],
                            0,
                            0,
                            0,
                        )
                    )
                peak = server.peak_resident_bytes() - resting
        runs[policy] = CrowdRun(policy, readers, max_tokens, resting, peak, samples)
    return runs


# ── A send timeout ───────────────────────────────────────────────────────────


def send_timeout(timeout_s: float = 0.3, *, policy: str = "pull", max_tokens: int = 100_000) -> dict[str, int]:
    """A reader that takes nothing, against a server with `send_timeout_s=timeout_s` and one stream slot.

    Returns the server's counters once the stalled stream has ended, after a
    second client has used the slot it freed (`second_client_tokens`).
    """
    settings = replace(_stream_settings(max_tokens), max_concurrent_streams=1, send_timeout_s=timeout_s)
    params = {"max_tokens": max_tokens, "ttft_ms": 0, "token_ms": 0, "backpressure": policy}
    with serve_in_background(create_app(settings), loop="asyncio") as server:
        fix_send_buffer(server, 4_096)
        with _raw_stream(server.host, server.port, params, 4_096) as sock:
            _read_head(sock)
            deadline = time.monotonic() + 10 + 10 * timeout_s
            while fetch_stats(server.url)["streams_active"]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the stalled stream was still open after {deadline} s")
                time.sleep(0.02)
            second = stream_chat(server.url, "my turn", max_tokens=5, ttft_ms=0, token_ms=0)
        return {**fetch_stats(server.url), "second_client_tokens": second.tokens}


def paused_reader_survives(timeout_s: float, pause_s: float, *, max_tokens: int = 2_000) -> bool:
    """Whether a reader that takes the headers, looks away for `pause_s`, then reads on gets the whole reply.

    Against a server with `send_timeout_s=timeout_s` and small buffers (they
    fill at once, so the server's write waits for the whole pause).
    """
    settings = replace(_stream_settings(max_tokens), send_timeout_s=timeout_s)
    params = {"max_tokens": max_tokens, "ttft_ms": 0, "token_ms": 0}
    with serve_in_background(create_app(settings), loop="asyncio") as server:
        fix_send_buffer(server, 4_096)
        with _raw_stream(server.host, server.port, params, 4_096) as sock:
            _, tail = _read_head(sock)
            time.sleep(pause_s)  # the reader looks away: the load this measures, not a wait for anything
            while not tail.endswith(b"\r\n0\r\n\r\n"):  # the end of a chunked body
                data = sock.recv(READ_SIZE)
                if not data:
                    break
                tail = (tail + data)[-200:]
        completed = b"event: done" in tail and tail.endswith(b"\r\n0\r\n\r\n")
        return completed and fetch_stats(server.url)["streams_send_timeout"] == 0


# ── Saved results ────────────────────────────────────────────────────────────


def save_results(path: Path, results: dict[str, Any], command: list[str]) -> None:
    """Write results as JSON with the command line that produced them."""
    payload = {"command": " ".join(command), "uvicorn": UVICORN_VERSION, "results": _plain(results)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def load_results(path: Path) -> dict[str, Any]:
    """Read results saved by `save_results` back: `stall`, `paced` and `crowd` as dataclasses."""
    payload = json.loads(path.read_text())
    results = payload["results"]
    stalls = [
        StallRun(**{**run, "samples": [BufferSample(**sample) for sample in run["samples"]]})
        for run in results["stall"]
    ]
    paced = {
        policy: PacedRun(
            **{
                **run,
                "samples": [ServerSample(**sample) for sample in run["samples"]],
                "lateness": [tuple(pair) for pair in run["lateness"]],
            }
        )
        for policy, run in results["paced"].items()
    }
    crowd = {
        policy: CrowdRun(**{**run, "samples": [ServerSample(**sample) for sample in run["samples"]]})
        for policy, run in results["crowd"].items()
    }
    return {"command": payload["command"], "stall": stalls, "paced": paced, "crowd": crowd}


def _thin(samples: list[Any], keep: int) -> list[Any]:
    step = max(1, len(samples) // keep)
    return samples[::step] if samples[-1] in samples[::step] else [*samples[::step], samples[-1]]


def main(argv: list[str] | None = None) -> None:
    """`python -m sse_lab.experiments.backpressure --json FILE`: all three experiments at full size."""
    parser = argparse.ArgumentParser(
        prog="python -m sse_lab.experiments.backpressure", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--readers", type=int, default=100, help="stalled readers at once (default 100)")
    parser.add_argument("--max-tokens", type=int, default=2_000, help="each stalled reader asks for this many (2000)")
    parser.add_argument("--stall-s", type=float, default=4.0, help="how long the single reader stalls (default 4)")
    args = parser.parse_args(argv)
    try:
        stalls = [
            stall(stall_s=args.stall_s),
            stall(stall_s=args.stall_s, rcvbuf=4_096),
            stall(stall_s=args.stall_s, rcvbuf=4_096, sndbuf=16_384, label="rcvbuf 4096, sndbuf 16384"),
        ]
        paced = paced_reader()
        crowd = many_stalled_readers(readers=args.readers, max_tokens=args.max_tokens)
    except MemoryMeasurementUnavailable as missing:
        sys.exit(f"cannot measure here: {missing}")
    for run in stalls:
        run.samples = _thin(run.samples, 40)
    for one in paced.values():
        one.samples = _thin(one.samples, 60)
        one.lateness = _thin(one.lateness, 300)
    for crowded in crowd.values():
        crowded.samples = _thin(crowded.samples, 30)
    save_results(
        args.json,
        {"stall": stalls, "paced": paced, "crowd": crowd},
        ["python", "-m", "sse_lab.experiments.backpressure", *(sys.argv[1:] if argv is None else argv)],
    )
    for run in stalls:
        last = run.last
        print(
            f"{run.label}: {last.tokens_produced} tokens in flight after {last.at:.1f} s; "
            f"client inq {last.client_inq}, server outq {last.server_outq}, transport {last.transport}, "
            f"app queue {last.app_queue} bytes"
        )
    for policy, one in paced.items():
        print(
            f"a {one.rate_bytes_s:g} B/s reader, {policy}: queue peak {one.peak_queued_bytes} B, producer lag "
            f"{one.producer_lag} tokens, {one.events_read} events for {one.tokens_read} tokens, "
            f"last token {one.last_lateness:.2f} s late"
        )
    for policy, crowded in crowd.items():
        queued = max(sample.queued_bytes for sample in crowded.samples)
        print(
            f"{crowded.readers} stalled readers, {policy}: server RSS +{crowded.peak_growth / 2**20:.1f} MiB, "
            f"queues at most {queued / 2**20:.1f} MiB, {crowded.samples[-1].tokens_produced} tokens produced"
        )


if __name__ == "__main__":
    main()
