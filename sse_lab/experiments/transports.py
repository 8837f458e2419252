"""SSE, WebSocket, gRPC server streaming and long polling, measured side by side on the same tokens (notebook 09).

Every transport serves the same token sources with the same parameters and the
same validation (`sse_lab.transports`). The measures, each written out where it
is computed:

- TTFT and ITL as everywhere in the kit (`sse_lab.metrics`), each client on a
  fresh connection, its clock started before it connects.
- bytes per token: what one more token costs on the wire, both directions,
  framing included, counted by a TCP relay (`sse_lab.instruments.relay`):
  (bytes of an n2-token chat - bytes of an n1-token chat) / (n2 - n1). The rest,
  bytes(n1) - n1 x per token, is the fixed cost of a chat: connection set-up
  (Upgrade, HTTP/2 preface and SETTINGS), the request, the end and the close.
- set-up time: TTFT of a one-token chat with no model delay (ttft_ms=0), on a
  fresh connection: connecting, handshaking, asking and one token back.
- server CPU per token: CPU time (all threads, from /proc/PID/task/*/schedstat)
  of a server in a child process while it serves `tokens` tokens, divided by them.
- cancellation: from the client's cancel (SSE: closing the connection; WebSocket:
  a `cancel` message; gRPC: cancelling the call; long polling: `DELETE`) to the
  model's generator being closed on the server, both read on the same clock.
- memory per connection: the server's resident set (VmRSS) with `connections`
  streams held open (each waiting on a long prefill) minus before, divided by them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlencode, urlsplit

import grpc
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from tqdm.auto import tqdm
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect_sync

from ..background import serve_in_background
from ..client import STREAM_PATH, fetch_chat, stream_chat
from ..handles import stop_process
from ..instruments.relay import ByteCount, relay_to
from ..metrics import ChatResult
from ..model import GenerationRequest, sim
from ..parts._system import require_or_skip
from ..parts.nginx import ProxyConfig, start_nginx
from ..server import Settings, create_app
from ..transports import chat_pb2_grpc
from ..transports.grpc_stream import CLIENT_OPTIONS, chat_request, grpc_chat, serve_grpc_in_background
from ..transports.long_poll import PATH as POLL_PATH
from ..transports.long_poll import poll_chat
from ..transports.websocket import websocket_url, ws_chat

T = TypeVar("T")

TRANSPORTS = ("sse", "websocket", "grpc", "long_poll")
PROMPT = "Which transport should stream my tokens?"
WS_NO_DEFLATE = "websocket, no deflate"
BASELINE = "buffered (baseline)"
STOP_TIMEOUT_S = 5.0  # a child server gets this long to exit on SIGTERM, then SIGKILL
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Endpoints:
    """Where the transports are served: the Starlette app (SSE, WebSocket, long polling) and the gRPC server."""

    http_url: str
    grpc_target: str
    grpc_stats: Callable[[], dict[str, int]] | None = field(default=None, compare=False)  # the gRPC server's counters


@contextlib.contextmanager
def serve_transports(settings: Settings | None = None, *, models: dict[str, Any] | None = None) -> Iterator[Endpoints]:
    """The kit's app and a gRPC server, both on loopback and free ports, with the same settings and models."""
    with (
        serve_in_background(create_app(settings, models=models)) as http,
        serve_grpc_in_background(settings, models=models) as grpc_server,
    ):
        yield Endpoints(http.url, grpc_server.target, grpc_server.stats)


def chat(transport: str, endpoints: Endpoints, prompt: str = PROMPT, **params: Any) -> ChatResult:
    """One chat over `transport` on a fresh connection, measured by that transport's client."""
    if transport == "sse":
        return stream_chat(endpoints.http_url, prompt, max_reconnects=0, **params)
    if transport == "websocket":
        return ws_chat(endpoints.http_url, prompt, **params)
    if transport == WS_NO_DEFLATE:
        return ws_chat(endpoints.http_url, prompt, deflate=False, **params)
    if transport == "grpc":
        return grpc_chat(endpoints.grpc_target, prompt, **params)
    if transport == "long_poll":
        return poll_chat(endpoints.http_url, prompt, **params)
    raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")


def measure_latency(
    endpoints: Endpoints,
    *,
    runs: int = 5,
    transports: tuple[str, ...] = TRANSPORTS,
    progress: bool = True,
    **params: Any,
) -> dict[str, list[ChatResult]]:
    """`runs` chats per transport, taken in turns (so that the machine's noise falls on all alike)."""
    results: dict[str, list[ChatResult]] = {transport: [] for transport in transports}
    for _ in tqdm(range(runs), desc="TTFT and ITL", disable=not progress):
        for transport in transports:
            results[transport].append(chat(transport, endpoints, **params))
    return results


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


@dataclass(frozen=True)
class WireCost:
    """Bytes on the wire, both directions: `per_token` (one more token) and `fixed` (the rest of a chat).

    `per_message`: one more message that carries tokens. It is `per_token` except for
    long polling, whose answers carry several tokens when the client falls behind.
    """

    per_token: float
    fixed: float
    up: int  # client to server, the longer chat
    down: int  # server to client, the longer chat
    per_message: float


def wire_totals(transport: str, endpoints: Endpoints, counts: Sequence[int], **params: Any) -> list[ByteCount]:
    """The bytes crossing a counting relay for one chat of each token count in `counts`, over `transport`."""
    return [count for count, _ in _wire_runs(transport, endpoints, counts, **params)]


def _wire_runs(
    transport: str, endpoints: Endpoints, counts: Sequence[int], **params: Any
) -> list[tuple[ByteCount, int]]:
    """Per chat: the bytes, and the messages that carried its tokens (a long poll's answers; else the tokens)."""
    http, grpc_address = urlsplit(endpoints.http_url), endpoints.grpc_target.rsplit(":", 1)
    upstream = (grpc_address[0], int(grpc_address[1])) if transport == "grpc" else (str(http.hostname), http.port)
    totals = []
    with relay_to(upstream[0], int(upstream[1])) as relay:
        relayed = Endpoints(relay.url, relay.target)
        for count in counts:
            relay.reset()
            result = chat(transport, relayed, max_tokens=count, **params)
            if result.tokens != count:
                raise RuntimeError(f"{transport}: {result.tokens} tokens of {count}, error {result.error}")
            totals.append((_settled(relay.totals), len(result.lumps) if transport == "long_poll" else count))
    return totals


def measure_wire(
    endpoints: Endpoints,
    *,
    tokens: tuple[int, int] = (10, 40),
    transports: tuple[str, ...] = (*TRANSPORTS, WS_NO_DEFLATE),
    **params: Any,
) -> dict[str, WireCost]:
    """What each transport puts on the wire for a chat of n1 and of n2 tokens; see the module docstring."""
    costs = {}
    for transport in transports:
        (short, short_messages), (long, long_messages) = _wire_runs(transport, endpoints, tokens, **params)
        per_token = (long.total - short.total) / (tokens[1] - tokens[0])
        messages = long_messages - short_messages
        per_message = (long.total - short.total) / messages if messages > 0 else per_token
        costs[transport] = WireCost(per_token, short.total - tokens[0] * per_token, long.up, long.down, per_message)
    return costs


def _settled(read: Callable[[], T], *, quiet_s: float = 0.05, timeout_s: float = 2.0) -> T:
    """The counters once unchanged for `quiet_s`: a close's last bytes may cross after the client has returned."""
    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        if (now := read()) == last:
            return now
        last = now
    return last


def measure_setup(
    endpoints: Endpoints, *, runs: int = 5, transports: tuple[str, ...] = TRANSPORTS
) -> dict[str, list[float]]:
    """Set-up time (s): TTFT of a one-token chat with ttft_ms=0 on a fresh connection, `runs` times each."""
    times: dict[str, list[float]] = {transport: [] for transport in transports}
    for _ in range(runs):
        for transport in transports:
            result = chat(transport, endpoints, max_tokens=1, ttft_ms=0, token_ms=0)
            assert result.ttft is not None, f"{transport}: no token ({result.error})"
            times[transport].append(result.ttft)
    return times


def measure_handshake(endpoints: Endpoints) -> dict[str, ByteCount]:
    """Bytes each way to make a connection ready for its first request, TCP's own handshake aside.

    SSE and long polling: none, the request is the first thing sent. WebSocket: the
    HTTP Upgrade request and its 101 answer (with and without permessage-deflate
    offered). gRPC: HTTP/2's connection preface, both SETTINGS frames and their
    acknowledgements, a WINDOW_UPDATE (`channel_ready_future` returns once the channel is up).
    """
    http, (grpc_host, grpc_port) = urlsplit(endpoints.http_url), endpoints.grpc_target.rsplit(":", 1)
    handshakes = {"sse": ByteCount(0, 0, 0), "long_poll": ByteCount(0, 0, 0)}
    for name, compression in (("websocket", "deflate"), (WS_NO_DEFLATE, None)):
        with relay_to(str(http.hostname), int(http.port or 80)) as relay:
            url = websocket_url(relay.url)
            with ws_connect_sync(url, proxy=None, compression=compression):  # returns once the 101 is read
                handshakes[name] = _settled(relay.totals)
    with (
        relay_to(grpc_host, int(grpc_port)) as relay,
        grpc.insecure_channel(relay.target, options=CLIENT_OPTIONS) as channel,
    ):
        grpc.channel_ready_future(channel).result(timeout=10)
        handshakes["grpc"] = _settled(relay.totals)
    return handshakes


class StopWatch:
    """A token source (`sim`) that notes when each generation's generator is closed: the model has stopped."""

    def __init__(self) -> None:
        self.stopped: list[float] = []

    def __call__(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self._run(request)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[str]:
        try:
            async for token in sim(request):
                yield token
        finally:
            self.stopped.append(time.perf_counter())


def _cancel_sse(endpoints: Endpoints, params: dict[str, Any], after: int) -> float:
    with (
        httpx.Client(trust_env=False) as client,
        client.stream("GET", endpoints.http_url + STREAM_PATH, params={"prompt": PROMPT, **params}) as response,
    ):
        seen = 0
        for line in response.iter_lines():
            seen += line == "event: token"
            if seen == after:
                cancelled_at = time.perf_counter()
                break  # leaving the blocks closes the connection
    return cancelled_at


def _cancel_websocket(endpoints: Endpoints, params: dict[str, Any], after: int) -> float:
    with ws_connect_sync(websocket_url(endpoints.http_url), proxy=None) as websocket:
        websocket.send(json.dumps({"prompt": PROMPT, **params}))
        for _ in range(after):
            websocket.recv(10)
        cancelled_at = time.perf_counter()
        websocket.send(json.dumps({"type": "cancel"}))
        while json.loads(websocket.recv(10))["type"] == "token":
            pass
    return cancelled_at


def _cancel_grpc(endpoints: Endpoints, params: dict[str, Any], after: int) -> float:
    with grpc.insecure_channel(endpoints.grpc_target, options=CLIENT_OPTIONS) as channel:
        call = chat_pb2_grpc.ChatStub(channel).Stream(chat_request(PROMPT, **params))
        for _ in range(after):
            next(call)
        cancelled_at = time.perf_counter()
        call.cancel()
    return cancelled_at


def _cancel_long_poll(endpoints: Endpoints, params: dict[str, Any], after: int) -> float:
    url = endpoints.http_url + POLL_PATH
    with httpx.Client(trust_env=False) as client:
        body = client.get(url, params={"prompt": PROMPT, **params}).json()
        while body["next"] < after:
            body = client.get(url, params={"id": body["id"], "after": body["next"]}).json()
        cancelled_at = time.perf_counter()
        client.delete(url, params={"id": body["id"]})
    return cancelled_at


_CANCELLERS = {"sse": _cancel_sse, "websocket": _cancel_websocket, "grpc": _cancel_grpc, "long_poll": _cancel_long_poll}


def measure_cancellation(*, runs: int = 3, after: int = 3, token_ms: float = 20.0) -> dict[str, list[float]]:
    """Seconds from the client's cancel to the model's stop, per transport, after `after` tokens arrived."""
    watch = StopWatch()
    params = {"max_tokens": 1000, "ttft_ms": 0, "token_ms": token_ms}
    delays: dict[str, list[float]] = {transport: [] for transport in _CANCELLERS}
    with serve_transports(models={"sim": watch}) as endpoints:
        for _ in range(runs):
            for transport, cancel in _CANCELLERS.items():
                stops = len(watch.stopped)
                cancelled_at = cancel(endpoints, params, after)
                deadline = time.monotonic() + 5
                while len(watch.stopped) == stops and time.monotonic() < deadline:
                    time.sleep(0.001)
                if len(watch.stopped) == stops:
                    raise RuntimeError(f"{transport}: the model did not stop within 5 s of the cancel")
                delays[transport].append(watch.stopped[-1] - cancelled_at)
    return delays


def comparison_table(
    latency: dict[str, list[ChatResult]],
    wire: dict[str, WireCost],
    setup: dict[str, list[float]],
    cpu: dict[str, CpuCost],
    memory: dict[str, float],
    handshake: dict[str, ByteCount],
) -> str:
    """The notebook's summary, one row per transport: medians of TTFT, ITL and set-up, and the costs.

    >>> comparison_table({}, {}, {}, {}, {}, {}).split()[:6]
    ['transport', 'TTFT', 'ms', 'ITL', 'ms', 'bytes/token']
    """
    columns = ["TTFT ms", "ITL ms", "bytes/token", "fixed B", "handshake B", "set-up ms", "CPU µs/token", "KiB/conn"]
    lines = [f"{'transport':<22}" + "".join(f"{column:>14}" for column in columns)]
    for transport in dict.fromkeys([*latency, *wire, *handshake, *setup, *cpu, *memory]):
        runs = latency.get(transport, [])
        cells = [
            median_ms([run.ttft for run in runs if run.ttft is not None]) if runs else None,
            median_ms([gap for run in runs for gap in run.itl]) if runs else None,
            wire[transport].per_token if transport in wire else None,
            wire[transport].fixed if transport in wire else None,
            handshake[transport].total if transport in handshake else None,
            median_ms(setup[transport]) if transport in setup else None,
            1e6 * cpu[transport].per_token if transport in cpu else None,
            memory[transport] / 1024 if transport in memory else None,
        ]
        lines.append(f"{transport:<22}" + "".join(f"{'-' if cell is None else f'{cell:.1f}':>14}" for cell in cells))
    return "\n".join(lines)


class TransportServer:
    """Handle on the transports served from a child process (see `transport_server`): endpoints, CPU and memory."""

    def __init__(self, endpoints: Endpoints, pid: int) -> None:
        self.endpoints = endpoints
        self.pid = pid

    def cpu_seconds(self) -> float:
        """CPU time of all the child's threads so far (schedstat: nanoseconds on a CPU)."""
        total_ns = 0
        for schedstat in Path(f"/proc/{self.pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError):  # a thread that ended in between
                total_ns += int(schedstat.read_text().split()[0])
        return total_ns / 1e9

    def resident_bytes(self) -> int:
        """The child's resident set now (VmRSS)."""
        found = re.search(r"^VmRSS:\s+(\d+) kB$", Path(f"/proc/{self.pid}/status").read_text(), re.MULTILINE)
        if found is None:
            raise RuntimeError("no VmRSS in /proc/PID/status: this measurement needs Linux")
        return 1024 * int(found.group(1))

    def active(self, transport: str) -> int:
        """Streams open now on the server `transport` uses."""
        path = "/grpc/stats" if transport == "grpc" else "/api/stats"  # the child serves both
        stats: dict[str, int] = httpx.get(self.endpoints.http_url + path, trust_env=False).json()
        return stats["streams_active"]

    def wait_active(self, transport: str, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.active(transport) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{transport}: {self.active(transport)} streams active, not {count}")
            time.sleep(0.02)


@contextlib.contextmanager
def transport_server(*, max_streams: int = 1_000, startup_timeout_s: float = 30.0) -> Iterator[TransportServer]:
    """Serve every transport from a child Python process (`python -m sse_lab.experiments.transports`) for a block.

    The child's CPU and memory are the servers' alone. It prints its endpoints once
    it serves, and stops when the block ends (SIGTERM, then SIGKILL) or when its stdin
    closes, so it never outlives this process.
    """
    command = [sys.executable, "-m", "sse_lab.experiments.transports", "--max-streams", str(max_streams)]
    with (
        tempfile.TemporaryFile() as stderr,
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=_PACKAGE_PARENT
        ) as process,
    ):
        try:
            yield TransportServer(_read_endpoints(process, stderr, startup_timeout_s), process.pid)
        finally:
            stop_process(process, STOP_TIMEOUT_S)


def _read_endpoints(process: subprocess.Popen[bytes], stderr: IO[bytes], timeout_s: float) -> Endpoints:
    assert process.stdout is not None
    reading: dict[str, bytes] = {}
    reader = threading.Thread(target=lambda: reading.update(line=process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    try:
        return Endpoints(**json.loads(reading.get("line", b"")))
    except (json.JSONDecodeError, TypeError):
        stderr.seek(0)
        raise RuntimeError(
            f"the server process did not start; its stderr:\n{stderr.read().decode(errors='replace')}"
        ) from None


@dataclass(frozen=True)
class CpuCost:
    """Server CPU of one chat: `per_token` seconds, and `per_message` seconds per message that carried tokens.

    A message is an SSE event, a WebSocket message, a gRPC message: one token each.
    A long poll's answer carries every token produced since the last poll: one when
    the client keeps up, several when it falls behind (a loaded machine), which makes
    long polling cheaper per token and lumpier.
    """

    per_token: float
    per_message: float
    messages: int


def measure_cpu(
    *, tokens: int = 300, token_ms: float = 3.0, transports: tuple[str, ...] = TRANSPORTS
) -> dict[str, CpuCost]:
    """Server CPU per token for each transport, and for the buffered endpoint as a baseline (its one message).

    The tokens are paced (`token_ms`) so that each long poll carries about one
    token, as it would with a real model; the model's own pacing costs the same
    under every transport, and the buffered baseline shows how much that is.
    """
    params = {"max_tokens": tokens, "ttft_ms": 0, "token_ms": token_ms}
    cpu: dict[str, CpuCost] = {}
    with transport_server() as server:
        for transport in transports:  # first use: imports, buffers, the gRPC channel machinery
            chat(transport, server.endpoints, max_tokens=5, ttft_ms=0, token_ms=0)
        before = server.cpu_seconds()
        fetch_chat(server.endpoints.http_url, PROMPT, **params)
        spent = server.cpu_seconds() - before
        cpu[BASELINE] = CpuCost(spent / tokens, spent, 1)
        for transport in transports:
            before = server.cpu_seconds()
            result = chat(transport, server.endpoints, **params)
            spent = server.cpu_seconds() - before
            if result.tokens != tokens:
                raise RuntimeError(f"{transport}: {result.tokens} tokens of {tokens}, error {result.error}")
            messages = len(result.lumps) if transport == "long_poll" else tokens
            cpu[transport] = CpuCost(spent / tokens, spent / messages, messages)
    return cpu


def _run_async(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh event loop in a thread of its own (a notebook's kernel has a loop running)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(work())
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, name="sse-lab-clients", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


HOLD = {"prompt": PROMPT, "ttft_ms": 60_000}  # a stream that waits on its prefill: open, quiet, holding its slot


async def _hold(transport: str, server: TransportServer, connections: int) -> int:
    """Open `connections` streams over `transport`, return the server's resident bytes with them all open."""
    endpoints = server.endpoints
    http = urlsplit(endpoints.http_url)
    async with contextlib.AsyncExitStack() as stack:

        async def sse() -> None:
            _, writer = await asyncio.open_connection(http.hostname, http.port)
            stack.callback(writer.close)
            writer.write(f"GET {STREAM_PATH}?{urlencode(HOLD)} HTTP/1.1\r\nHost: {http.netloc}\r\n\r\n".encode())

        async def websocket(compression: str | None) -> None:
            url = websocket_url(endpoints.http_url)
            opened = await stack.enter_async_context(ws_connect(url, proxy=None, compression=compression))
            await opened.send(json.dumps(HOLD))

        async def grpc_call() -> None:
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(endpoints.grpc_target, options=CLIENT_OPTIONS)
            )
            call = chat_pb2_grpc.ChatStub(channel).Stream(chat_request(**HOLD))  # type: ignore[arg-type]
            stack.callback(call.cancel)

        polls: list[str] = []

        async def long_poll() -> None:
            reader, writer = await asyncio.open_connection(http.hostname, http.port)
            stack.callback(writer.close)
            first = await _exchange(reader, writer, http.netloc, {**HOLD, "wait_s": 0})
            polls.append(first["id"])
            writer.write(_request(http.netloc, {"id": first["id"], "wait_s": 30}))  # held: nothing comes back

        async def cancel_polls() -> None:
            await asyncio.gather(*(_cancel_poll(http.hostname, http.port, http.netloc, id_) for id_ in polls))

        opener = {
            "sse": sse,
            "websocket": lambda: websocket("deflate"),
            WS_NO_DEFLATE: lambda: websocket(None),
            "grpc": grpc_call,
            "long_poll": long_poll,
        }[transport]
        stack.push_async_callback(cancel_polls)
        await asyncio.gather(*(opener() for _ in range(connections)))
        await asyncio.to_thread(server.wait_active, transport, connections)
        return server.resident_bytes()


def _request(host: str, params: dict[str, Any], method: str = "GET") -> bytes:
    return f"{method} {POLL_PATH}?{urlencode(params)} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, params: dict[str, Any], method: str = "GET"
) -> dict[str, Any]:
    """One request on a raw keep-alive connection; its JSON answer (uvicorn sends a Content-Length)."""
    writer.write(_request(host, params, method))
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    answer: dict[str, Any] = json.loads(await reader.readexactly(length))
    return answer


async def _cancel_poll(hostname: str | None, port: int | None, host: str, generation_id: str) -> None:
    reader, writer = await asyncio.open_connection(hostname, port)
    try:
        await _exchange(reader, writer, host, {"id": generation_id}, "DELETE")
    finally:
        writer.close()


def measure_memory(
    *, connections: int = 200, transports: tuple[str, ...] = (*TRANSPORTS, WS_NO_DEFLATE)
) -> dict[str, float]:
    """Server memory (bytes) per open stream for each transport, `connections` streams held at once.

    Each transport gets a fresh server process, warmed up by a few streams, so that
    no earlier transport's pages are counted, nor one-off costs (imports, buffers).
    """
    per_connection = {}
    for transport in tqdm(transports, desc="memory per connection"):
        with transport_server(max_streams=connections + 10) as server:
            _run_async(lambda: _hold(transport, server, 10))  # noqa: B023 (run at once)
            server.wait_active(transport, 0)
            resting = server.resident_bytes()
            held = _run_async(lambda: _hold(transport, server, connections))  # noqa: B023
            per_connection[transport] = (held - resting) / connections
    return per_connection


def main(argv: list[str] | None = None) -> None:
    """The child's entry point: serve every transport, print the endpoints as JSON, stop when stdin closes."""
    parser = argparse.ArgumentParser(prog="python -m sse_lab.experiments.transports", description=main.__doc__)
    parser.add_argument("--max-streams", type=int, default=1_000, help="max_concurrent_streams of both servers")
    args = parser.parse_args(argv)
    settings = Settings(max_concurrent_streams=args.max_streams)
    with serve_grpc_in_background(settings) as grpc_server:
        app = create_app(settings)

        async def with_grpc_stats(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/grpc/stats":
                body = json.dumps(grpc_server.stats()).encode()
                await send(
                    {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
                )
                await send({"type": "http.response.body", "body": body})
            else:
                await app(scope, receive, send)

        with serve_in_background(with_grpc_stats) as http:
            print(json.dumps({"http_url": http.url, "grpc_target": grpc_server.target}), flush=True)
            sys.stdin.buffer.read()


if __name__ == "__main__":
    main()


@dataclass(frozen=True)
class ProxyOutcome:
    """One transport through one nginx configuration: did the tokens get through, and if not, what the client saw."""

    transport: str
    config: str
    tokens: int
    error: str | None

    @property
    def works(self) -> bool:
        return self.error is None and self.tokens > 0


def through_nginx(*, tokens: int = 10) -> list[ProxyOutcome]:
    """Each transport through the nginx configurations that make or break it.

    SSE with nginx's defaults and with buffering off; WebSocket without and with `proxy_http_version 1.1`
    and the Upgrade/Connection headers; gRPC through `proxy_pass` (HTTP/1.1 to
    the upstream) and through `grpc_pass` with HTTP/2 on the listening side.
    """
    params = {"max_tokens": tokens, "ttft_ms": 0, "token_ms": 5}
    cases = [
        ("sse", ProxyConfig()),
        ("sse", ProxyConfig(proxy_buffering=False)),
        ("websocket", ProxyConfig()),
        ("websocket", ProxyConfig(websocket_upgrade=True)),
        ("grpc", ProxyConfig()),
        ("grpc", ProxyConfig(grpc=True)),
    ]
    outcomes = []
    with serve_transports() as endpoints:
        for transport, config in cases:
            upstream = "http://" + endpoints.grpc_target if transport == "grpc" else endpoints.http_url
            with start_nginx(upstream, config) as proxy:
                proxied = Endpoints(proxy.url, f"127.0.0.1:{proxy.port}")
                try:
                    result = chat(transport, proxied, timeout_s=5, **params)
                except Exception as failure:  # what the client library raises is the finding
                    outcomes.append(ProxyOutcome(transport, config.label, 0, f"{type(failure).__name__}: {failure}"))
                    continue
                error = None if result.error is None else json.dumps(result.error)[:200]
                outcomes.append(ProxyOutcome(transport, config.label, result.tokens, error))
    return outcomes


# Resuming after a dropped connection. Each transport has two clients below: the
# plainest one, and one that survives a drop. The lines marked `# drill` simulate
# the drop (the first connection breaks after `drop_after` tokens) and are not counted.


class _Drill(ConnectionError):
    """The simulated drop."""


def sse_plain(base_url: str, prompt: str, **params: Any) -> str:
    text = []
    with (
        httpx.Client(trust_env=False) as client,
        client.stream("GET", base_url + STREAM_PATH, params={"prompt": prompt, **params}) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: ") and "index" in (data := json.loads(line[6:])):
                text.append(data["token"])
    return "".join(text)


def sse_resuming(base_url: str, prompt: str, *, drop_after: int | None = None, **params: Any) -> str:
    text, last_id = [], ""
    with httpx.Client(trust_env=False) as client:
        while True:
            try:
                headers = {"Last-Event-ID": last_id} if last_id else {}
                with client.stream(
                    "GET", base_url + STREAM_PATH, params={"prompt": prompt, **params}, headers=headers
                ) as response:
                    for line in response.iter_lines():
                        if line.startswith("id: "):
                            last_id = line[4:]
                        elif line.startswith("data: ") and "index" in (data := json.loads(line[6:])):
                            text.append(data["token"])
                            if len(text) == drop_after:  # drill
                                drop_after = None  # drill
                                raise _Drill  # drill
                        elif line.startswith("data: "):
                            return "".join(text)
            except (httpx.TransportError, ConnectionError):
                continue


def websocket_plain(base_url: str, prompt: str, **params: Any) -> str:
    text = []
    with ws_connect_sync(websocket_url(base_url), proxy=None) as websocket:
        websocket.send(json.dumps({"prompt": prompt, **params}))
        for raw in websocket:
            message = json.loads(raw)
            if message["type"] == "token":
                text.append(message["token"])
    return "".join(text)


def websocket_resuming(base_url: str, prompt: str, *, drop_after: int | None = None, **params: Any) -> str:
    # Nothing to resume from: ask again with the same seed and skip the tokens already
    # received. The server generates them a second time.
    text: list[str] = []
    while True:
        try:
            with ws_connect_sync(websocket_url(base_url), proxy=None) as websocket:
                websocket.send(json.dumps({"prompt": prompt, **params}))
                for raw in websocket:
                    message = json.loads(raw)
                    if message["type"] != "token":
                        return "".join(text)
                    if message["index"] >= len(text):
                        text.append(message["token"])
                        if len(text) == drop_after:  # drill
                            drop_after = None  # drill
                            raise _Drill  # drill
        except (OSError, ConnectionClosed):
            continue


def grpc_plain(target: str, prompt: str, **params: Any) -> str:
    with grpc.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
        return "".join(token.token for token in chat_pb2_grpc.ChatStub(channel).Stream(chat_request(prompt, **params)))


def grpc_resuming(target: str, prompt: str, *, drop_after: int | None = None, **params: Any) -> str:
    # As for WebSocket: ask again, skip what arrived; the server regenerates it.
    text: list[str] = []
    while True:
        try:
            with grpc.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
                for token in chat_pb2_grpc.ChatStub(channel).Stream(chat_request(prompt, **params)):
                    if token.index >= len(text):
                        text.append(token.token)
                        if len(text) == drop_after:  # drill
                            drop_after = None  # drill
                            raise _Drill  # drill
                return "".join(text)
        except (grpc.RpcError, ConnectionError):
            continue


def long_poll_plain(base_url: str, prompt: str, **params: Any) -> str:
    text, query = [], {"prompt": prompt, **params}
    with httpx.Client(trust_env=False, timeout=60) as client:
        while True:
            body = client.get(base_url + POLL_PATH, params=query).json()
            text += [token["token"] for token in body["tokens"]]
            if body["done"] or body["error"]:
                return "".join(text)
            query = {"id": body["id"], "after": body["next"]}


def long_poll_resuming(base_url: str, prompt: str, *, drop_after: int | None = None, **params: Any) -> str:
    text, query = [], {"prompt": prompt, **params}
    with httpx.Client(trust_env=False, timeout=60) as client:
        while True:
            try:
                if drop_after is not None and len(text) >= drop_after:  # drill
                    drop_after = None  # drill
                    raise _Drill  # drill
                body = client.get(base_url + POLL_PATH, params=query).json()
            except (httpx.TransportError, ConnectionError):
                continue
            text += [token["token"] for token in body["tokens"]]
            if body["done"] or body["error"]:
                return "".join(text)
            query = {"id": body["id"], "after": body["next"]}


CLIENTS: dict[str, tuple[Callable[..., str], Callable[..., str]]] = {
    "sse": (sse_plain, sse_resuming),
    "websocket": (websocket_plain, websocket_resuming),
    "grpc": (grpc_plain, grpc_resuming),
    "long_poll": (long_poll_plain, long_poll_resuming),
}


def code_lines(function: Callable[..., object]) -> int:
    """Lines of code in a function's body: no signature, blank line, comment, or `# drill` line."""
    body = inspect.getsource(function).split(":\n", 1)[1]  # after the signature
    lines = [line.strip() for line in body.splitlines()]
    return sum(1 for line in lines if line and not line.startswith("#") and not line.endswith("# drill"))


@dataclass(frozen=True)
class ResumeCost:
    """What resuming after a drop costs a transport's client: `extra_lines` over the plainest client, and the proof."""

    transport: str
    plain_lines: int
    resuming_lines: int
    same_text: bool  # the resuming client, its first connection dropped mid-answer, got the whole answer
    regenerated: int  # tokens the server generated again because the transport had no way to resume

    @property
    def extra_lines(self) -> int:
        return self.resuming_lines - self.plain_lines


def measure_resume(*, tokens: int = 10, drop_after: int = 5, token_ms: float = 25.0) -> list[ResumeCost]:
    """Count each client's lines, then drop each resuming client's first connection after `drop_after` tokens.

    `regenerated` counts the tokens the server produced beyond the answer: those
    asked for again, and those in flight when the connection dropped (at most
    one or two, with tokens `token_ms` apart, for a server that notices at once).
    """
    params = {"max_tokens": tokens, "ttft_ms": 0, "token_ms": token_ms}
    costs = []
    for transport, (plain, resuming) in CLIENTS.items():
        with serve_transports() as endpoints:
            address = endpoints.grpc_target if transport == "grpc" else endpoints.http_url
            expected = plain(address, PROMPT, **params)
            generated_before = _generated(transport, endpoints)
            text = resuming(address, PROMPT, drop_after=drop_after, **params)
            regenerated = _generated(transport, endpoints) - generated_before - tokens
        costs.append(
            ResumeCost(transport, code_lines(plain), code_lines(resuming), text == expected, max(regenerated, 0))
        )
    return costs


def _generated(transport: str, endpoints: Endpoints) -> int:
    if transport == "grpc":
        assert endpoints.grpc_stats is not None
        return endpoints.grpc_stats()["tokens_generated"]
    counters: dict[str, int] = httpx.get(endpoints.http_url + "/api/stats", trust_env=False).json()
    return counters["tokens_generated"]


# From the browser: a small test page run by a headless Chromium (the kit's browser part,
# parts/chromium.py, is another branch's; this needs nothing but the chromium binary).

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_SKIP_MESSAGE = "chromium not found: skipping the browser part (apt-get install chromium)"
BROWSER_TIMEOUT_S = 30.0
_BROWSER_PAGE = """<!doctype html>
<meta charset="utf-8"><title>transports</title>
<script>
const query = "prompt=hi&max_tokens=5&ttft_ms=0&token_ms=10";
const report = (results) => fetch("/browser/results", {method: "POST", body: JSON.stringify(results)});

function sse() {
  return new Promise((resolve) => {
    const source = new EventSource("/api/chat/stream?" + query);
    let tokens = 0;
    source.addEventListener("token", () => tokens++);
    source.addEventListener("done", () => { source.close(); resolve({tokens, error: null}); });
    source.onerror = () => { source.close(); resolve({tokens, error: "EventSource error"}); };
  });
}

function websocket() {
  return new Promise((resolve) => {
    const socket = new WebSocket(`ws://${location.host}/ws/chat`);
    let tokens = 0;
    socket.onopen = () => socket.send(JSON.stringify({prompt: "hi", max_tokens: 5, ttft_ms: 0, token_ms: 10}));
    socket.onmessage = (message) => { if (JSON.parse(message.data).type === "token") tokens++; };
    socket.onclose = (close) => resolve({tokens, error: close.code === 1000 ? null : `close ${close.code}`});
  });
}

async function grpc() {
  // A gRPC call as a page could try it: POST to the method's path. The request field 1 is "hi".
  const message = new Uint8Array([0, 0, 0, 0, 4, 10, 2, 104, 105]);
  try {
    const response = await fetch("GRPC_URL/sse_lab.chat.Chat/Stream", {
      method: "POST", headers: {"content-type": "application/grpc", "te": "trailers"}, body: message});
    return {tokens: 0, error: `HTTP ${response.status}`};
  } catch (failure) {
    return {tokens: 0, error: `${failure.name}: ${failure.message}`};
  }
}

(async () => report({sse: await sse(), websocket: await websocket(), grpc: await grpc()}))();
</script>
"""


def chromium_or_skip() -> str | None:
    """The chromium binary, or None after printing one line (an error with SSE_LAB_REQUIRE_SYSTEM_PARTS=1)."""
    binary = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    return require_or_skip(binary, "chromium", " but not found", CHROMIUM_SKIP_MESSAGE, RuntimeError)


def from_the_browser(binary: str) -> dict[str, dict[str, Any]]:
    """Open a test page in a headless Chromium: SSE (EventSource), WebSocket, and a gRPC call with fetch.

    Returns, per transport, the tokens the page received and the error it saw
    (None when it worked). The browser runs with a fresh profile in a temporary
    directory, and is killed (its process group) and the directory removed whatever happens.
    """
    reported: dict[str, Any] = {}
    arrived = threading.Event()
    with serve_grpc_in_background() as grpc_server:

        async def page(request: Request) -> Response:
            html = _BROWSER_PAGE.replace("GRPC_URL", f"http://{grpc_server.target}")
            return HTMLResponse(html)

        async def results(request: Request) -> Response:
            reported.update(json.loads(await request.body()))
            arrived.set()
            return Response(status_code=204)

        routes = [Route("/browser", page), Route("/browser/results", results, methods=["POST"])]
        app = Starlette(routes=[*routes, Mount("", app=create_app())])
        with serve_in_background(app) as server, tempfile.TemporaryDirectory(prefix="sse-lab-chromium-") as profile:
            command = [binary, *_CHROMIUM_ARGS, f"--user-data-dir={profile}", server.url + "/browser"]
            browser = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            try:
                if not arrived.wait(BROWSER_TIMEOUT_S):
                    raise TimeoutError(f"the browser reported nothing within {BROWSER_TIMEOUT_S} s")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(browser.pid, signal.SIGKILL)
                browser.wait()
    return reported


_CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",  # as root in a container
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
