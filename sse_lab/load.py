"""A load generator that is never the bottleneck: many streams at once, each token timed.

    parent process                         worker processes (--workers), each on its own loop
    ──────────────                         ─────────────────────────────────────────────────
    plan: who sends when ── start at t0 ──▶ one raw socket per request: GET, then read
    progress bar        ◀── every 0.25 s ── chunked framing undone, the kit's sse.Decoder
    load_summary()      ◀── the records ─── one RequestRecord per request, CPU time used

Two ways to make load, as in vLLM's `bench serve` and AIPerf:

- closed loop (`concurrency=C`): C users, each sending its next request as soon as
  its last one ends; their first requests spread evenly over `ramp_s`.
- open loop (`rate=R`): requests arrive R per second whatever the server does,
  with gamma-distributed gaps of mean 1/R and shape `burstiness` (1: a Poisson
  process; below 1 burstier, above 1 more regular), as vLLM defines it. With
  `concurrency` too, at most that many are in flight (vLLM's --max-concurrency).

It stops after `requests` requests, or after `duration_s` seconds (no request
starts later). The first `warmup_s` seconds load the server without being
measured. Metrics are defined in `sse_lab.metrics.load_summary`.

Why it is not the bottleneck, and how it checks: each worker reads with an
`asyncio.Protocol` straight off the socket (no HTTP library, no per-event task
or JSON parsing; token events are only counted), on uvloop when it is installed,
with the garbage collector off (a worker makes no reference cycles, and the
collector's pauses would stamp arrivals late), and there are as many workers as
the load needs (`default_workers`). Each worker reports its CPU share (CPU
seconds / wall seconds, in % of one core) and how late its own loop wakes (a
timer every `LOOP_PROBE_S`), and every request its send lag (sent - scheduled).
A busy or CPU-starved worker stamps arrivals late and sends late, so all three
are checked: crossing `CPU_WARNING_PERCENT`, `LOOP_LAG_WARNING_MS` or
`SEND_LAG_WARNING_MS` adds a warning to the result (the CLI prints it).

The API a server speaks is a `Dialect`: the bytes of the request and what each
event means (tokens, or the end). Only the kit's is here; another, such as
OpenAI's chat completions, plugs in as one more entry of `DIALECTS`.

Only loopback hosts are accepted: it is a lab instrument for servers the kit runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

from tqdm.auto import tqdm

from .background import raise_open_files_limit
from .metrics import PERCENTILES, SLO_METRICS, RequestRecord, load_summary, percentiles
from .model import GenerationRequest, schedule_ms
from .sse import Decoder, Event

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
PER_WORKER_EVENTS_S = 5_000  # token events per second one worker reads with room to spare, on a busy machine too
CPU_WARNING_PERCENT = 70.0  # a worker busier than this stamps arrivals late
SEND_LAG_WARNING_MS = 10.0  # p99 send lag above this: the schedule was not kept
LOOP_LAG_WARNING_MS = 10.0  # a worker's loop woke this late (p99): its arrival stamps are as late
LOOP_PROBE_S = 0.01  # how often a worker checks its own loop
DEFAULT_TIMEOUT_S = 120.0
START_MARGIN_S = 0.1  # workers get the start time this far ahead
PROGRESS_EVERY_S = 0.25
SCHEDULED_MODELS = frozenset({"sim", "echo"})  # the kit's models that keep the absolute schedule
_READ_ERRORS = (OSError, ValueError, IndexError, UnicodeError)  # a response that breaks HTTP: cut short
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # workers run this very code


class LoadError(RuntimeError):
    """The load run could not be made: a bad URL or plan, or a worker that failed."""


@dataclass(frozen=True)
class LoadSpec:
    """What load to make and what to ask: see the module docstring for the modes.

    The model parameters (prompt ... jitter_ms) go to the stream endpoint as
    query parameters; request number k asks for seed k. timeout_s: a request
    still running after it ends as `client_timeout`.
    """

    url: str
    concurrency: int | None = None
    rate: float | None = None
    burstiness: float = 1.0
    requests: int | None = None
    duration_s: float | None = None
    warmup_s: float = 0.0
    ramp_s: float = 0.0
    prompt: str = "How many users can one server stream to?"
    model: str = "sim"
    max_tokens: int = 64
    ttft_ms: float = 200.0
    token_ms: float = 30.0
    jitter_ms: float = 0.0
    workers: int | None = None
    slo_ms: Mapping[str, float] | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    dialect: str = "kit"
    seed: int = 0  # of the open loop's arrival times

    def __post_init__(self) -> None:
        if self.concurrency is None and self.rate is None:
            raise LoadError("give a concurrency (closed loop) or a rate (open loop)")
        if (self.requests is None) == (self.duration_s is None):
            raise LoadError("give either a number of requests or a duration, not both")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise LoadError(f"rate must be more than 0 requests/s, got {self.rate}")
        if not self.burstiness > 0:
            raise LoadError(f"burstiness must be more than 0, got {self.burstiness}")
        if self.requests is not None and self.requests < 1:
            raise LoadError(f"requests must be at least 1, got {self.requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise LoadError(f"duration must be more than 0 s, got {self.duration_s}")
        if self.workers is not None and self.workers < 1:
            raise LoadError(f"workers must be at least 1, got {self.workers}")
        if self.dialect not in DIALECTS:
            raise LoadError(f"unknown dialect {self.dialect!r}; expected one of {', '.join(DIALECTS)}")
        for name in self.slo_ms or {}:
            if name not in SLO_METRICS:
                raise LoadError(f"unknown SLO {name!r}; expected one of {', '.join(SLO_METRICS)}")
        _address(self.url)

    def generation(self, seed: int) -> GenerationRequest:
        """The generation request number `seed` makes, as the server reads it."""
        return GenerationRequest(
            self.prompt, self.max_tokens, self.ttft_ms, self.token_ms, self.jitter_ms, seed % 2**32
        )


# ── Dialects: the only code that knows the server's API ──────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Dialect:
    """How to ask a server for one stream, and how to read its events.

    request(spec, seed, host, path_prefix) -> the HTTP/1.1 request bytes.
    read(event) -> (tokens it carries, None or how the stream ended: `done`,
    `error_<code>`).
    """

    request: Callable[[LoadSpec, int, str, str], bytes]
    read: Callable[[Event], tuple[int, str | None]]


def _kit_request(spec: LoadSpec, seed: int, host: str, path_prefix: str) -> bytes:
    generation = spec.generation(seed)
    query = urlencode(
        {
            "prompt": generation.prompt,
            "model": spec.model,
            "max_tokens": generation.max_tokens,
            "ttft_ms": f"{generation.ttft_ms:g}",
            "token_ms": f"{generation.token_ms:g}",
            "jitter_ms": f"{generation.jitter_ms:g}",
            "seed": generation.seed,
        }
    )
    return (
        f"GET {path_prefix}/api/chat/stream?{query} HTTP/1.1\r\n"
        f"Host: {host}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
    ).encode()


def _kit_read(event: Event) -> tuple[int, str | None]:
    kind = event.event
    if kind == "token":
        return 1, None
    if kind == "done":
        return 0, "done"
    if kind == "error":
        try:
            code = json.loads(event.data).get("code", "unknown")
        except (ValueError, AttributeError):
            code = "unknown"
        return 0, f"error_{code}"
    return 0, None


DIALECTS: dict[str, Dialect] = {"kit": Dialect(_kit_request, _kit_read)}


# ── One request on one socket ────────────────────────────────────────────────────────────────────────────────────


class _StreamReader(asyncio.Protocol):
    """Reads one response: the head, then the body (chunked or not), event by event, stamping each token."""

    def __init__(self, record: RequestRecord, read: Callable[[Event], tuple[int, str | None]]) -> None:
        self.record = record
        self.read = read
        self.finished = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._in_body = False
        self._chunked = False
        self._left = 0  # data bytes still due in the current chunk
        self._skip = 0  # bytes of the CRLF after a chunk's data still due
        self._pending = b""  # a chunk-size line cut by a read
        self._decoder = Decoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        try:
            if not self._in_body:
                data = self._read_head(data, now)
                if not data:
                    return
            body = self._dechunk(data) if self._chunked else data
            if body:
                self._feed(body, now)
        except _READ_ERRORS:
            self._end("cut_short")

    def _read_head(self, data: bytes, now: float) -> bytes:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return b""
        head, rest = self._head[:end], self._head[end + 4 :]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        self.record.headers_at, self.record.status = now, status
        if status != 200:
            self._end(f"http_{status}")
            return b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding" and value.strip().lower() == b"chunked":
                self._chunked = True
        self._in_body = True
        return rest

    def _dechunk(self, data: bytes) -> bytes:
        if not (self._left or self._skip or self._pending):  # at a chunk's size line
            size_end = data.find(b"\r\n")
            # The common case: the read is one whole chunk, as a server writes each event. Else, the long way.
            if size_end > 0 and data.endswith(b"\r\n"):
                size = int(data[:size_end].split(b";", 1)[0], 16)
                if size and size_end + 4 + size == len(data):
                    return data[size_end + 2 : -2]
        if self._pending:
            data, self._pending = self._pending + data, b""
        pieces = []
        position, size = 0, len(data)
        while position < size:
            if self._left:
                take = min(self._left, size - position)
                pieces.append(data[position : position + take])
                position += take
                self._left -= take
                if not self._left:
                    self._skip = 2
            elif self._skip:
                take = min(self._skip, size - position)
                position += take
                self._skip -= take
            else:
                line_end = data.find(b"\r\n", position)
                if line_end < 0:
                    self._pending = data[position:]
                    break
                chunk_size = int(data[position:line_end].split(b";", 1)[0], 16)
                position = line_end + 2
                if not chunk_size:  # the last chunk: the body is over
                    if pieces:
                        self._feed(b"".join(pieces), time.perf_counter())
                    self._end(self.record.outcome)
                    return b""
                self._left = chunk_size
        return b"".join(pieces)

    def _feed(self, body: bytes, now: float) -> None:
        record, read = self.record, self.read
        for event in self._decoder.feed(body):
            tokens, end = read(event)
            if tokens == 1:
                record.arrivals.append(now)
            elif tokens:
                record.arrivals.extend([now] * tokens)
            if end is not None:
                self._end(end)

    def _end(self, outcome: str) -> None:
        if self.finished.done():
            return
        self.record.outcome = outcome
        self.record.ended_at = time.perf_counter()
        self.finished.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(self.record.outcome)  # before the end event: still `cut_short`


async def _one_request(
    spec: LoadSpec, dialect: Dialect, address: tuple[str, int, str], scheduled_at: float, seed: int, counted: bool
) -> RequestRecord:
    host, port, prefix = address
    loop = asyncio.get_running_loop()
    record = RequestRecord(scheduled_at=scheduled_at, sent_at=time.perf_counter(), seed=seed, counted=counted)
    try:
        transport, reader = await asyncio.wait_for(
            loop.create_connection(lambda: _StreamReader(record, dialect.read), host, port), spec.timeout_s
        )
    except (OSError, asyncio.TimeoutError):
        record.outcome, record.ended_at = "connect_failed", time.perf_counter()
        return record
    if not transport.is_closing():  # closed at once (a server out of descriptors does that): `cut_short`, not a crash
        transport.write(dialect.request(spec, seed, f"{host}:{port}", prefix))
    try:
        await asyncio.wait_for(asyncio.shield(reader.finished), spec.timeout_s - (time.perf_counter() - record.sent_at))
    except asyncio.TimeoutError:
        reader._end("client_timeout")
    return record


# ── The plan: who sends when ─────────────────────────────────────────────────────────────────────────────────────


@dataclass
class WorkerPlan:
    """One worker's share of the load, in seconds after the common start t0.

    users: closed loop, one (first send, requests to count or None for the
    duration) per user. arrivals: open loop, one (send time, seed, counted) per
    request. max_in_flight: the open loop's cap on this worker, None for none.
    """

    users: list[tuple[float, int | None]] = field(default_factory=list)
    arrivals: list[tuple[float, int, bool]] = field(default_factory=list)
    max_in_flight: int | None = None
    first_seed: int = 0  # closed loop: this worker's seeds are first_seed + k x workers


def gamma_arrivals(rate: float, burstiness: float, count: int | None, until_s: float | None, seed: int) -> list[float]:
    """Arrival times in seconds from 0: gaps gamma-distributed with mean 1/rate and shape burstiness (vLLM's).

    The first request goes at 0. Either `count` arrivals, or all before `until_s`.

    >>> gamma_arrivals(10, 1.0, 3, None, seed=0)[0]
    0.0
    """
    rng = random.Random(seed)
    times, at = [], 0.0
    while (count is None or len(times) < count) and (until_s is None or at < until_s):
        times.append(at)
        at += rng.gammavariate(burstiness, 1 / (rate * burstiness))
    return times


def plan(spec: LoadSpec, workers: int) -> list[WorkerPlan]:
    """Split the load among `workers`: users (or arrivals) dealt round-robin, starts spread over the ramp."""
    plans = [WorkerPlan(first_seed=index) for index in range(workers)]
    if spec.rate is None:
        assert spec.concurrency is not None
        users = spec.concurrency
        for user in range(users):
            quota = None
            if spec.requests is not None:
                quota = spec.requests // users + (user < spec.requests % users)
                if not quota:
                    continue
            plans[user % workers].users.append((spec.ramp_s * user / users, quota))
        return plans
    warmup = gamma_arrivals(spec.rate, spec.burstiness, None, spec.warmup_s, spec.seed) if spec.warmup_s else []
    measured = gamma_arrivals(spec.rate, spec.burstiness, spec.requests, spec.duration_s, spec.seed + 1)
    arrivals = [(at, False) for at in warmup] + [(spec.warmup_s + at, True) for at in measured]
    for number, (at, counted) in enumerate(arrivals):
        plans[number % workers].arrivals.append((at, number, counted))
    if spec.concurrency is not None:
        for number, worker_plan in enumerate(plans):
            worker_plan.max_in_flight = max(1, spec.concurrency // workers + (number < spec.concurrency % workers))
    return plans


def expected_concurrency(spec: LoadSpec) -> float:
    """Streams open at once: C in a closed loop, rate x stream length in an open one (Little's law)."""
    if spec.rate is None:
        return float(spec.concurrency or 1)
    stream_s = (spec.ttft_ms + spec.max_tokens * spec.token_ms) / 1000
    open_streams = spec.rate * max(stream_s, 0.01)
    return min(open_streams, spec.concurrency) if spec.concurrency else open_streams


def default_workers(spec: LoadSpec) -> int:
    """Enough workers that none reads more than `PER_WORKER_EVENTS_S` token events per second.

    Unpaced streams (token_ms 0) go as fast as the server writes: one worker per
    stream, up to the cores. Never more workers than cores or streams.
    """
    streams = expected_concurrency(spec)
    cores = os.cpu_count() or 1
    needed = streams if spec.token_ms <= 0 else math.ceil(streams * 1000 / spec.token_ms / PER_WORKER_EVENTS_S)
    return int(max(1, min(needed, cores, math.ceil(streams))))


# ── A worker ─────────────────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class WorkerReport:
    """What a worker sends back: every record, the CPU and wall seconds of its run, and its loop's lateness.

    loop_lag_s: how late each of its periodic `LOOP_PROBE_S` timers fired. A
    worker starved of CPU (the machine busy) or busy itself wakes late, and every
    arrival it stamps is late by as much, whatever its own CPU share says.
    """

    records: list[RequestRecord]
    cpu_s: float
    wall_s: float
    loop_lag_s: list[float] = field(default_factory=list)

    @property
    def cpu_percent(self) -> float:
        """CPU seconds per wall second, in % of one core."""
        return 100 * self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def _address(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise LoadError(f"expected an http:// URL, got {url!r}")
    host = parts.hostname
    if host not in LOOPBACK_HOSTS:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise LoadError(f"only loopback servers are load-tested here, not {host!r}")
    return host, parts.port or 80, parts.path.rstrip("/")


async def _run_worker(spec: LoadSpec, worker_plan: WorkerPlan, t0: float, workers: int, report: Connection) -> None:
    dialect, address = DIALECTS[spec.dialect], _address(spec.url)
    records: list[RequestRecord] = []
    warm_until = t0 + spec.warmup_s
    stop_at = None if spec.duration_s is None else warm_until + spec.duration_s

    async def sleep_until(at: float) -> None:
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    async def user(first_s: float, quota: int | None, seeds: Iterator[int]) -> None:
        scheduled, counted = t0 + first_s, 0
        await sleep_until(scheduled)
        while True:
            now = time.perf_counter()
            # Without a warm-up every request counts: a sleep that wakes a hair before t0 must not make one uncounted
            measured = not spec.warmup_s or now >= warm_until
            if (quota is not None and counted >= quota) or (stop_at is not None and now >= stop_at):
                return
            record = await _one_request(spec, dialect, address, scheduled, next(seeds), measured)
            records.append(record)
            counted += measured
            scheduled = time.perf_counter()  # closed loop: the next request is due at once

    async def arrival(at: float, seed: int, counted: bool, slots: asyncio.Semaphore | None) -> None:
        if slots is None:
            records.append(await _one_request(spec, dialect, address, at, seed, counted))
            return
        async with slots:
            records.append(await _one_request(spec, dialect, address, at, seed, counted))

    loop_lag: list[float] = []

    async def progress() -> None:
        loop = asyncio.get_running_loop()
        last_report = loop.time()
        while True:
            due = time.perf_counter() + LOOP_PROBE_S
            await asyncio.sleep(LOOP_PROBE_S)
            loop_lag.append(max(0.0, time.perf_counter() - due))
            if loop.time() - last_report >= PROGRESS_EVERY_S:
                last_report = loop.time()
                report.send(("progress", sum(record.counted for record in records)))

    started_cpu = time.process_time()
    await sleep_until(t0)
    started = time.perf_counter()
    reporting = asyncio.ensure_future(progress())
    try:
        if worker_plan.users:
            seeds = iter(range(worker_plan.first_seed, 2**62, workers))
            await asyncio.gather(*(user(first, quota, seeds) for first, quota in worker_plan.users))
        else:
            slots = None if worker_plan.max_in_flight is None else asyncio.Semaphore(worker_plan.max_in_flight)
            running = []
            for at, seed, counted in worker_plan.arrivals:
                await sleep_until(t0 + at)
                running.append(asyncio.ensure_future(arrival(t0 + at, seed, counted, slots)))
            await asyncio.gather(*running)
    finally:
        reporting.cancel()
    cpu_s, wall_s = time.process_time() - started_cpu, time.perf_counter() - started
    report.send(("done", WorkerReport(records, cpu_s, wall_s, loop_lag)))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # the plain loop is slower, not wrong
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def worker_main(fd: int) -> None:
    """A worker process (`python -c ...`, see `run_load`): get the plan, wait for t0, make the load, report."""
    raise_open_files_limit()  # a worker holds a socket per stream it reads
    control = Connection(fd)
    try:
        spec, worker_plan, workers = control.recv()
        control.send(("ready", None))
        t0 = control.recv()
        loop = _new_loop()
        # A worker makes no reference cycles (a collection after a run of 2,000 streams frees nothing), so the
        # collector could only pause it: its full collections took 15-70 ms mid-run, and stamped every arrival
        # behind them that late. The process ends with the run.
        gc.disable()
        try:
            loop.run_until_complete(_run_worker(spec, worker_plan, t0, workers, control))
        finally:
            loop.close()
    except Exception as error:  # reported to the parent, which raises LoadError
        with contextlib.suppress(OSError):
            control.send(("failed", f"{type(error).__name__}: {error}"))
    finally:
        control.close()


# ── The run ──────────────────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class LoadResult:
    """A load run: `summary` is the JSON report (see `report_shape`), `records` every request, `warnings` any doubt."""

    spec: LoadSpec
    summary: dict[str, Any]
    records: list[RequestRecord]
    warnings: list[str]

    def table(self) -> str:
        """The summary as a plain-text table, in ms."""
        return summary_table(self.summary)


def _schedule(spec: LoadSpec) -> Callable[[RequestRecord, int], Sequence[float]] | None:
    if spec.model not in SCHEDULED_MODELS or spec.dialect != "kit":
        return None
    if not spec.jitter_ms:  # the same for every seed: computed once
        base = spec.generation(0)
        due = [base.ttft_ms + index * base.token_ms for index in range(spec.max_tokens)]
        return lambda record, count: due[:count]
    return lambda record, count: schedule_ms(spec.generation(record.seed), count)


def summarize(spec: LoadSpec, reports: Sequence[WorkerReport]) -> tuple[dict[str, Any], list[str]]:
    """The JSON report of a run and the warnings its self-checks raise."""
    records = [record for report in reports for record in report.records]
    summary = load_summary(records, schedule=_schedule(spec), slo_ms=spec.slo_ms)
    cpu = [round(report.cpu_percent, 1) for report in reports]
    lags = [1000 * record.send_lag for record in records if record.counted]
    summary["client"] = {"workers": len(reports), "cpu_percent": cpu, "send_lag_ms": percentiles(lags)}
    warnings = []
    busy = [f"{percent:g} %" for percent in cpu if percent > CPU_WARNING_PERCENT]
    if busy:
        warnings.append(
            f"load generator busy: worker CPU {', '.join(busy)} of a core (over {CPU_WARNING_PERCENT:g} %); "
            "its timestamps may be late: use more --workers"
        )
    loop_lag = percentiles([1000 * lag for report in reports for lag in report.loop_lag_s])
    if loop_lag["p99"] is not None and loop_lag["p99"] > LOOP_LAG_WARNING_MS:
        warnings.append(
            f"load generator late: its event loops woke {loop_lag['p99']:.1f} ms late (p99; over "
            f"{LOOP_LAG_WARNING_MS:g} ms), so its arrival times are as late: the machine is busy or too few --workers"
        )
    lag_p99 = summary["client"]["send_lag_ms"]["p99"]
    if lag_p99 is not None and lag_p99 > SEND_LAG_WARNING_MS:
        warnings.append(
            f"requests went out late: send lag p99 {lag_p99:.1f} ms (over {SEND_LAG_WARNING_MS:g} ms); "
            "the load was lighter than planned and queueing is hidden: use more --workers"
        )
    return summary, warnings


def run_load(spec: LoadSpec, *, progress: bool = True, start_at: float | None = None) -> LoadResult:
    """Make the load `spec` describes from worker processes and measure every stream.

    Workers are started (and import the kit) before the clock starts, so their
    start-up costs the server nothing. The clock starts once they are ready, or
    at `start_at` (a `time.perf_counter()` reading) if that is later: another
    process can then start with it. Each worker is stopped and reaped even on
    failure: a worker whose parent has gone finds its socket closed and exits.
    """
    workers = spec.workers or default_workers(spec)
    plans = plan(spec, workers)
    processes: list[subprocess.Popen[bytes]] = []
    controls: list[Connection] = []
    try:
        for worker_plan in plans:
            controls.append(_start_worker(processes))
            controls[-1].send((spec, worker_plan, workers))
        for control in controls:
            _expect(control, "ready")
        t0 = max(time.perf_counter() + START_MARGIN_S, start_at or 0.0)
        for control in controls:
            control.send(t0)
        reports = _collect(spec, controls, progress)
    finally:
        for control in controls:
            control.close()  # a worker still running sees it and stops
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    summary, warnings = summarize(spec, reports)
    records = sorted((record for report in reports for record in report.records), key=lambda record: record.sent_at)
    return LoadResult(spec, summary, records, warnings)


def _start_worker(processes: list[subprocess.Popen[bytes]]) -> Connection:
    """A fresh Python process (not a fork: a kernel's threads, a server among them, stay behind) on a socket pair."""
    ours, theirs = socket.socketpair()
    with theirs:
        command = [sys.executable, "-c", f"from sse_lab.load import worker_main; worker_main({theirs.fileno()})"]
        processes.append(subprocess.Popen(command, pass_fds=[theirs.fileno()], cwd=_PACKAGE_PARENT))
    return Connection(ours.detach())


def _expect(control: Connection, kind: str) -> Any:
    try:
        got, payload = control.recv()
    except EOFError:
        raise LoadError("a load worker exited before reporting") from None
    if got == "failed":
        raise LoadError(f"a load worker failed: {payload}")
    if got != kind:
        raise LoadError(f"a load worker said {got!r}, expected {kind!r}")
    return payload


def _collect(spec: LoadSpec, controls: list[Connection], show: bool) -> list[WorkerReport]:
    done_by_worker = [0] * len(controls)
    reports: dict[int, WorkerReport] = {}
    total = spec.requests if spec.requests is not None else None
    with tqdm(total=total, desc="load", unit="req", disable=not show, leave=False) as bar:
        while len(reports) < len(controls):
            for control in wait([c for index, c in enumerate(controls) if index not in reports]):
                assert isinstance(control, Connection)
                index = controls.index(control)
                try:
                    kind, payload = control.recv()
                except EOFError:
                    raise LoadError("a load worker exited before reporting") from None
                if kind == "failed":
                    raise LoadError(f"a load worker failed: {payload}")
                if kind == "progress":
                    done_by_worker[index] = payload
                else:
                    reports[index] = payload
                    done_by_worker[index] = sum(record.counted for record in payload.records)
                bar.update(sum(done_by_worker) - bar.n)
    return [reports[index] for index in range(len(controls))]


def report_shape() -> dict[str, Any]:
    """The keys of the JSON report, for tools that read it: P is {p50, p90, p99, max, mean} in ms."""
    p = dict.fromkeys(PERCENTILES, "float")
    return {
        "requests": "int",
        "errors": {"kind": "count"},
        "duration_s": "float",
        "request_rate": "float",
        "output_tokens_per_s": "float",
        "goodput": "float|null",
        "ttft_ms": p,
        "itl_ms": p,
        "tpot_ms": p,
        "e2e_ms": p,
        "lateness_ms": "P|null",
        "client": {"workers": "int", "cpu_percent": ["float"], "send_lag_ms": p},
    }


def summary_table(summary: Mapping[str, Any]) -> str:
    """The JSON report as a plain-text table: the headline figures, then each metric's percentiles in ms."""
    errors = ", ".join(f"{kind} {count}" for kind, count in summary["errors"].items()) or "none"
    goodput = "-" if summary["goodput"] is None else f"{summary['goodput']:.2f} req/s"
    client = summary["client"]
    lines = [
        f"requests {summary['requests']} in {summary['duration_s']:.2f} s; errors: {errors}",
        f"request rate {summary['request_rate']:.2f} req/s, output {summary['output_tokens_per_s']:.0f} tokens/s, "
        f"goodput {goodput}",
        f"client: {client['workers']} worker(s), CPU {', '.join(f'{c:g} %' for c in client['cpu_percent'])}",
        f"{'ms':<14}" + "".join(f"{name:>10}" for name in PERCENTILES),
    ]
    rows = {
        "TTFT": summary["ttft_ms"],
        "ITL": summary["itl_ms"],
        "TPOT": summary["tpot_ms"],
        "E2E": summary["e2e_ms"],
        "lateness": summary["lateness_ms"],
        "send lag": client["send_lag_ms"],
    }
    for name, values in rows.items():
        if values is None:
            continue
        cells = "".join("         -" if values[p] is None else f"{values[p]:>10.1f}" for p in PERCENTILES)
        lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)


def load(url: str, **spec: Any) -> LoadResult:
    """`run_load(LoadSpec(url, ...))` with the spec's fields as keywords, for notebooks.

    `progress=False` hides the progress bar.
    """
    show = spec.pop("progress", True)
    return run_load(LoadSpec(url, **spec), progress=show)
