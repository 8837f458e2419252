"""How many users can one server stream to? The kit's server against the usual ways to write one.

Every server here runs in a process of its own on uvicorn with the same settings
(httptools, uvloop, access log off, its process set up by `dedicate_to_serving`
as `python -m sse_lab serve` sets up its own), streams the same event bytes on
the same absolute schedule (token i due at the request's start + i x token_ms:
one `asyncio.sleep` per token in the comparison servers, the sim model's shared
timer in the kit's) and is read by the same load generator (`sse_lab.load`, in
processes of its own):

    kit            the kit's server as `python -m sse_lab serve --max-streams N` starts it: validation,
                   heartbeats, disconnect cancellation, resumption, stats and limits all on
    starlette      a naive Starlette `StreamingResponse` over an async generator
    sse-starlette  sse-starlette's `EventSourceResponse` (its 15 s ping on, as shipped)
    fastapi        FastAPI's native `fastapi.sse.EventSourceResponse`, when the installed FastAPI has it
    raw            a bare ASGI app writing each event itself: the floor of Python on uvicorn

At each step of concurrency C, C streams of `max_tokens` tokens at one per
`token_ms` start spread over `ramp_s` seconds (a closed loop of C users, one
request each). A server's *capacity* is the largest C at which the p99 lateness
(`sse_lab.metrics.lateness`) stays within `LATENESS_SLO_MS` with no error. A
server that fails a step is not asked for larger ones. Also measured: one stream
unpaced (token_ms 0), in token events per second, the median of streams the
servers take turns at (`unpaced`).

The figures are only as quiet as the machine: compare servers measured in the
same run (the steps interleave the servers for that reason), not runs.

At the `agreement_steps`, in runs of their own after the steps (so that every
server's steps carry the same load), an independent reader (`probe`: blocking
sockets, its own byte scanning, no asyncio, no decoder) reads `PROBE_STREAMS`
more streams of the kit's server while the load generator runs, so the two
measurements of the same server at the same moment can be compared.

sse-starlette and FastAPI come with the `bench` extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import re
import select
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from tqdm.auto import tqdm

from ..background import dedicate_to_serving
from ..handles import stop_process
from ..load import LoadSpec, run_load
from ..metrics import percentiles
from ..model import sim_tokens
from ..server import token_event

SERVERS = ("kit", "starlette", "sse-starlette", "fastapi", "raw")
STEPS = (500, 1000, 1500, 2000, 2500)
MAX_TOKENS = 100
TOKEN_MS = 50.0
RAMP_S = 2.0
LATENESS_SLO_MS = 50.0
COLLAPSE_MS = 5_000.0  # p99 lateness past this: the server has collapsed, larger steps are skipped
AGREEMENT_STEPS = (500, 1000)
PROBE_STREAMS = 50
AGREEMENT_START_S = 2.0  # the reader's and the load's processes start well within this
UNPACED_TOKENS = 4_096  # the kit's limit on max_tokens
UNPACED_RUNS = 9  # streams per server, taken in turns
MAX_STREAMS = 100_000  # the kit's --max-streams: no 429 in the way
PROMPT = "How many users can one server stream to?"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0  # a child server gets this long to exit on SIGTERM, then SIGKILL
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent
COMMITTED_REPORT = Path(__file__).with_name("capacity_report.json")  # a full run, for notebook 08


class BenchmarkUnavailable(RuntimeError):
    """A server of the benchmark cannot run here (its package is missing) or did not start."""


# ── The comparison servers: same bytes, same pacing ─────────────────────────────────────────────────────────────


def _token_data(token: str, index: int) -> str:
    return json.dumps({"token": token, "index": index}, ensure_ascii=False, separators=(",", ":"))


def _done_data(tokens: int) -> str:
    return json.dumps({"finish_reason": "length", "tokens": tokens}, separators=(",", ":"))


def _parameters(query_string: bytes) -> tuple[list[str], float, float]:
    """The tokens to send, the ttft and the token interval (s) a kit-style query asks for."""
    query = dict(parse_qsl(query_string.decode("latin-1")))
    tokens = sim_tokens(query.get("prompt", ""), int(query.get("max_tokens", 64)), int(query.get("seed", 0)))
    return tokens, float(query.get("ttft_ms", 200)) / 1000, float(query.get("token_ms", 30)) / 1000


async def _paced(tokens: list[str], ttft_s: float, token_s: float) -> AsyncIterator[tuple[int, str]]:
    """The model's absolute schedule, as the kit's `sim` keeps it: one sleep per token."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index, token in enumerate(tokens):
        await asyncio.sleep(max(0.0, start + ttft_s + index * token_s - loop.time()))
        yield index, token


def _event(data: str, event: str, id: str | None = None) -> bytes:
    return (f"event: {event}\n" + ("" if id is None else f"id: {id}\n") + f"data: {data}\n\n").encode()


RETRY_LINE = b"retry: 3000\n"
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The floor: a bare ASGI app that writes each event as it is due, and nothing else.

    It encodes events with the kit's own `token_event`, so that the difference
    between the two is the framework and the kit's features, not the encoding.
    """
    if scope["type"] != "http":
        return
    tokens, ttft_s, token_s = _parameters(scope["query_string"])
    await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
    await send({"type": "http.response.body", "body": RETRY_LINE, "more_body": True})
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index, token in enumerate(tokens):
        await asyncio.sleep(max(0.0, start + ttft_s + index * token_s - loop.time()))
        await send({"type": "http.response.body", "body": token_event(token, index), "more_body": True})
    await send({"type": "http.response.body", "body": _event(_done_data(len(tokens)), "done"), "more_body": False})


def starlette_app() -> Any:
    """A naive Starlette `StreamingResponse` over an async generator of event bytes."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def stream(request: Request) -> StreamingResponse:
        tokens, ttft_s, token_s = _parameters(request.scope["query_string"])

        async def events() -> AsyncIterator[bytes]:
            yield RETRY_LINE
            async for index, token in _paced(tokens, ttft_s, token_s):
                yield _event(_token_data(token, index), "token", str(index))
            yield _event(_done_data(len(tokens)), "done")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return Starlette(routes=[Route("/api/chat/stream", stream)])


def sse_starlette_app() -> Any:
    """sse-starlette's `EventSourceResponse`, as its documentation writes it (LF line ends, like the others)."""
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    async def stream(request: Request) -> EventSourceResponse:
        tokens, ttft_s, token_s = _parameters(request.scope["query_string"])

        async def events() -> AsyncIterator[ServerSentEvent]:
            async for index, token in _paced(tokens, ttft_s, token_s):
                yield ServerSentEvent(data=_token_data(token, index), event="token", id=str(index))
            yield ServerSentEvent(data=_done_data(len(tokens)), event="done")

        return EventSourceResponse(events(), sep="\n")

    return Starlette(routes=[Route("/api/chat/stream", stream)])


def fastapi_app() -> Any:
    """FastAPI's native SSE (`response_class=EventSourceResponse` on a generator path operation)."""
    try:
        from fastapi import FastAPI
        from fastapi.sse import EventSourceResponse, ServerSentEvent
    except ImportError as missing:
        raise BenchmarkUnavailable(f"this FastAPI has no fastapi.sse ({missing})") from None

    app = FastAPI()

    @app.get("/api/chat/stream", response_class=EventSourceResponse)
    async def stream(prompt: str = "", max_tokens: int = 64, ttft_ms: float = 200, token_ms: float = 30,
                     seed: int = 0) -> AsyncIterator[ServerSentEvent]:  # fmt: skip
        tokens = sim_tokens(prompt, max_tokens, seed)
        async for index, token in _paced(tokens, ttft_ms / 1000, token_ms / 1000):
            yield ServerSentEvent(raw_data=_token_data(token, index), event="token", id=str(index))
        yield ServerSentEvent(raw_data=_done_data(len(tokens)), event="done")

    return app


def comparison_app(name: str) -> Any:
    """The ASGI app of a comparison server (every one of `SERVERS` but the kit)."""
    try:
        factories = {"starlette": starlette_app, "sse-starlette": sse_starlette_app, "fastapi": fastapi_app}
        return raw_app if name == "raw" else factories[name]()
    except ImportError as missing:
        raise BenchmarkUnavailable(f"{name} is not installed ({missing}); pip install -e '.[bench]'") from None


def _serve_comparison(name: str) -> None:
    """Child process: serve `name` on 127.0.0.1, a free port, print its URL, serve until killed."""
    import uvicorn

    app = comparison_app(name)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, backlog=2048)
    server = uvicorn.Server(config)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    dedicate_to_serving()  # as `python -m sse_lab serve` does: the same for every server
    server.run(sockets=[sock])


# ── Server processes ───────────────────────────────────────────────────────────────────────────────────────────


def _command(name: str) -> list[str]:
    if name == "kit":  # exactly as users start it
        return [sys.executable, "-m", "sse_lab", "serve", "--port", "0", "--max-streams", str(MAX_STREAMS)]
    return [sys.executable, "-m", "sse_lab.experiments.capacity", "--serve", name]


def _read_url(process: subprocess.Popen[bytes], stderr: IO[bytes]) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = process.stdout.readline().decode()
        if not line:
            break
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        if found:
            return found.group()
    stderr.seek(0)
    raise BenchmarkUnavailable(f"the server did not start; its stderr:\n{stderr.read().decode(errors='replace')}")


@contextlib.contextmanager
def server_process(name: str) -> Iterator[tuple[str, int]]:
    """Run server `name` in a child process for a `with` block: yields its URL and pid.

    It is stopped when the block ends, failed or not, and at the latest when this
    interpreter exits (a notebook whose kernel is shut down mid-way).
    """
    with (
        tempfile.TemporaryFile() as stderr,
        subprocess.Popen(_command(name), stdout=subprocess.PIPE, stderr=stderr, cwd=_PACKAGE_PARENT) as process,
    ):

        def stop() -> None:
            stop_process(process, STOP_TIMEOUT_S)

        atexit.register(stop)
        try:
            yield _read_url(process, stderr), process.pid
        finally:
            stop()
            atexit.unregister(stop)


# ── The independent reader ─────────────────────────────────────────────────────────────────────────────────────


def _probe_main(url: str, streams: int, ramp_s: float, max_tokens: int, token_ms: float, start_at: float = 0.0) -> None:
    """Child process: read `streams` streams with blocking sockets and `selectors`; print every token's lateness (ms).

    The first starts at `start_at` (`time.perf_counter()`, one clock for every
    process; 0: as soon as it has started), the others spread over `ramp_s` as
    the load generator spreads its own.

    Deliberately shares no code with the load generator: no asyncio, no chunked
    decoding, no SSE decoder. A token arrives with the read that brings the blank
    line after its `event: token` line (chunk framing never holds a blank line).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    query = urlencode(
        {"prompt": PROMPT, "max_tokens": max_tokens, "ttft_ms": 0, "token_ms": f"{token_ms:g}", "seed": 0}
    )
    request = f"GET /api/chat/stream?{query} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    chooser = selectors.DefaultSelector()
    start = start_at or time.perf_counter() + 0.05
    state: dict[socket.socket, dict[str, Any]] = {}
    late: list[float] = []
    pending = list(range(streams))
    while pending or state:
        now = time.perf_counter()
        while pending and now >= start + ramp_s * pending[0] / streams:
            pending.pop(0)
            sock = socket.create_connection((host, port))
            state[sock] = {"sent": time.perf_counter(), "buffer": b"", "at": 0, "tokens": 0}
            sock.sendall(request)
            chooser.register(sock, selectors.EVENT_READ)
        timeout = 0.001 if pending else 1.0
        for key, _ in chooser.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(65_536)
            arrived = time.perf_counter()
            stream = state[sock]
            stream["buffer"] += data
            buffer = stream["buffer"]
            while (found := buffer.find(b"event: token\n", stream["at"])) >= 0:
                end = buffer.find(b"\n\n", found)
                if end < 0:
                    break
                late.append(1000 * (arrived - stream["sent"]) - stream["tokens"] * token_ms)
                stream["tokens"] += 1
                stream["at"] = end + 2
            if not data:
                chooser.unregister(sock)
                sock.close()
                del state[sock]
    print(json.dumps(late))


def probe(
    url: str, streams: int, ramp_s: float, max_tokens: int, token_ms: float, start_at: float | None = None
) -> subprocess.Popen[str]:
    """Start the independent reader (`_probe_main`) in a child process; its stdout will hold the JSON lateness list.

    Its ramp starts at `start_at` (`time.perf_counter()`), or as soon as it can.
    """
    command = [
        sys.executable, "-m", "sse_lab.experiments.capacity", "--probe", url, "--streams", str(streams),
        "--ramp", str(ramp_s), "--max-tokens", str(max_tokens), "--token-ms", str(token_ms),
        *([] if start_at is None else ["--start-at", repr(start_at)]),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=_PACKAGE_PARENT)


# ── The benchmark ──────────────────────────────────────────────────────────────────────────────────────────────


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _step(
    url: str, pid: int, concurrency: int, max_tokens: int, token_ms: float, ramp_s: float, start_at: float | None = None
) -> dict[str, Any]:
    """One step: the load generator's report, and the server's CPU time per token delivered (µs).

    The ramp starts at `start_at` (`time.perf_counter()`) if given, else once the load's workers are ready.

    CPU per token is the figure that a busy machine disturbs least: contention
    makes streams late, but barely changes the work each token costs.
    """
    spec = LoadSpec(
        url, concurrency=concurrency, requests=concurrency, ramp_s=ramp_s, max_tokens=max_tokens, ttft_ms=0,
        token_ms=token_ms, prompt=PROMPT,
    )  # fmt: skip
    before = cpu_seconds(pid)
    summary = run_load(spec, progress=False, start_at=start_at).summary
    tokens = summary["output_tokens_per_s"] * summary["duration_s"]
    per_token = round(1e6 * (cpu_seconds(pid) - before) / tokens, 1) if tokens else None
    return {"load": summary, "server_cpu_us_per_token": per_token}


def unpaced(urls: Mapping[str, str], runs: int = UNPACED_RUNS, max_tokens: int = UNPACED_TOKENS) -> dict[str, float]:
    """One stream at a time, token_ms 0: each server's token events per second (1 / TPOT), the median of `runs` streams.

    The servers take turns, a stream each, so that a machine that slows down for
    a while slows them alike. The median, not the fastest: a reader that falls
    behind lets the server's writes pile up into fewer, larger ones, so the
    fastest streams are those the reader was slowest on (the floor's fastest
    stream ran 40 % above its median).
    """
    tpots: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(runs):
        for name, url in urls.items():
            spec = LoadSpec(url, concurrency=1, requests=1, max_tokens=max_tokens, ttft_ms=0, token_ms=0, prompt=PROMPT)
            tpots[name] += [record.tpot for record in run_load(spec, progress=False).records if record.tpot]
    return {name: round(1 / statistics.median(values), 1) for name, values in tpots.items() if values}


def benchmark(
    servers: Sequence[str] = SERVERS,
    steps: Sequence[int] = STEPS,
    *,
    max_tokens: int = MAX_TOKENS,
    token_ms: float = TOKEN_MS,
    ramp_s: float = RAMP_S,
    agreement_steps: Sequence[int] = AGREEMENT_STEPS,
    unpaced_runs: int = UNPACED_RUNS,
    command: str = "",
) -> dict[str, Any]:
    """Run the capacity benchmark; return everything measured, ready for `save`, `table` and the plots.

    `unpaced_runs` 0 skips the unpaced measurement.

    {"command", "settings", "servers": {name: {"steps": {C: {"load": the load generator's report,
    "server_cpu_us_per_token"}}, "unpaced_events_per_s", "capacity"}}, "agreement": [{"concurrency",
    "load_p99_ms", "probe_p99_ms", ...}]}
    """
    report: dict[str, Any] = {
        "command": command,
        "settings": {
            "max_tokens": max_tokens,
            "token_ms": token_ms,
            "ramp_s": ramp_s,
            "lateness_slo_ms": LATENESS_SLO_MS,
            "machine_cores": os.cpu_count() or 1,
        },
        "servers": {name: {"steps": {}, "unpaced_events_per_s": None, "capacity": 0} for name in servers},
        "agreement": [],
    }
    with contextlib.ExitStack() as running:
        processes = {name: running.enter_context(server_process(name)) for name in servers}
        collapsed: set[str] = set()
        checked = agreement_steps if "kit" in servers else ()
        total = len(servers) * (len(steps) + 1) + len(checked)
        with tqdm(total=total, desc="bench", unit="run", leave=False) as bar:
            if unpaced_runs:
                rates = unpaced({name: url for name, (url, _) in processes.items()}, unpaced_runs)
                for name, rate in rates.items():
                    report["servers"][name]["unpaced_events_per_s"] = rate
            bar.update(len(servers))
            for concurrency in steps:
                for name in servers:
                    bar.update()
                    if name in collapsed:
                        continue
                    step = _step(*processes[name], concurrency, max_tokens, token_ms, ramp_s)
                    report["servers"][name]["steps"][str(concurrency)] = step
                    summary = step["load"]
                    p99 = summary["lateness_ms"]["p99"]
                    if not summary["errors"] and p99 is not None and p99 <= LATENESS_SLO_MS:
                        report["servers"][name]["capacity"] = concurrency
                    elif summary["errors"] or p99 is None or p99 > COLLAPSE_MS:
                        collapsed.add(name)
            # Runs of their own: the reader's streams and process must not weigh on the kit's steps alone
            for concurrency in checked:
                report["agreement"].append(_agreement(*processes["kit"], concurrency, max_tokens, token_ms, ramp_s))
                bar.update()
    return report


def _agreement(url: str, pid: int, concurrency: int, max_tokens: int, token_ms: float, ramp_s: float) -> dict[str, Any]:
    """A step with the independent reader's streams beside the load generator's: both p99 and p50 lateness.

    Both ramps start at the same moment, once both have started their processes: a reader whose streams began
    earlier would meet less of the queue at the ramp's end.
    """
    start_at = time.perf_counter() + AGREEMENT_START_S
    reader = probe(url, PROBE_STREAMS, ramp_s, max_tokens, token_ms, start_at)
    try:
        step = _step(url, pid, concurrency, max_tokens, token_ms, ramp_s, start_at)
        summary = step["load"]
        out, _ = reader.communicate(timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    probe_late = percentiles(json.loads(out))
    return {
        "concurrency": concurrency,
        "probe_streams": PROBE_STREAMS,
        "load_p99_ms": summary["lateness_ms"]["p99"],
        "probe_p99_ms": probe_late["p99"],
        "load_p50_ms": summary["lateness_ms"]["p50"],
        "probe_p50_ms": probe_late["p50"],
    }


def capacity_curve(report: dict[str, Any]) -> dict[str, tuple[list[int], list[float]]]:
    """Per server: the concurrency steps it ran and its p99 lateness (ms) at each."""
    curves = {}
    for name, server in report["servers"].items():
        steps = sorted(server["steps"], key=int)
        p99s = [server["steps"][step]["load"]["lateness_ms"]["p99"] for step in steps]
        curves[name] = ([int(step) for step in steps], p99s)
    return curves


def table(report: dict[str, Any]) -> str:
    """p99 lateness (ms) per server and step, the capacity, unpaced events/s and its share of the raw floor."""
    steps = sorted({int(step) for server in report["servers"].values() for step in server["steps"]})
    floor = report["servers"].get("raw", {}).get("unpaced_events_per_s")
    header = f"{'server':<15}" + "".join(f"{'C=' + str(step):>9}" for step in steps)
    lines = [header + f"{'capacity':>10}{'unpaced ev/s':>14}{'of raw':>8}"]
    for name, server in report["servers"].items():
        cells = ""
        for step in steps:
            measured = server["steps"].get(str(step))
            if measured is None:
                cells += f"{'-':>9}"
            else:
                summary = measured["load"]
                p99 = summary["lateness_ms"]["p99"]
                mark = "*" if summary["errors"] else ""
                cells += f"{'err' if p99 is None else f'{p99:.0f}{mark}':>9}"
        events = server["unpaced_events_per_s"]
        share = f"{100 * events / floor:.0f} %" if floor and events else "-"
        lines.append(f"{name:<15}{cells}{server['capacity']:>10}{events or 0:>14.0f}{share:>8}")
    lines.append(f"p99 lateness in ms (* with errors); capacity: the largest C with p99 <= {LATENESS_SLO_MS:g} ms")
    lines.append("")
    lines.append(f"{'CPU us/token':<15}" + "".join(f"{'C=' + str(step):>9}" for step in steps))
    for name, server in report["servers"].items():
        costs = [server["steps"].get(str(step), {}).get("server_cpu_us_per_token") for step in steps]
        lines.append(f"{name:<15}" + "".join(f"{'-' if cost is None else f'{cost:.1f}':>9}" for cost in costs))
    for check in report["agreement"]:
        lines.append(
            f"agreement at C={check['concurrency']}: load generator p99 {check['load_p99_ms']:.1f} ms, "
            f"independent reader p99 {check['probe_p99_ms']:.1f} ms"
        )
    return "\n".join(lines)


def save(report: dict[str, Any], json_path: Path, plot_path: Path | None = None) -> None:
    """Write the report as JSON and, optionally, the capacity plot as a PNG."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    if plot_path is not None:
        import matplotlib.pyplot as plt

        from ..plots import capacity_plot

        plot_path.parent.mkdir(parents=True, exist_ok=True)
        figure = capacity_plot(report)
        figure.savefig(plot_path, dpi=100)
        plt.close(figure)


def load_report(path: Path) -> dict[str, Any]:
    """A report written by `save`."""
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the capacity benchmark's child processes")
    parser.add_argument("--serve", choices=[name for name in SERVERS if name != "kit"])
    parser.add_argument("--probe")
    parser.add_argument("--streams", type=int, default=PROBE_STREAMS)
    parser.add_argument("--ramp", type=float, default=RAMP_S)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--token-ms", type=float, default=TOKEN_MS)
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.serve:
        _serve_comparison(args.serve)
    elif args.probe:
        _probe_main(args.probe, args.streams, args.ramp, args.max_tokens, args.token_ms, args.start_at)


if __name__ == "__main__":
    main()
