"""Notebook 11: streams that survive a dead worker, measured on a real cluster (`sse_lab.parts.cluster`).

`follow` is a small asyncio client that reads one generation through nginx,
reconnecting with `Last-Event-ID` whenever its connection ends before `done`,
and notes for every token its index, when it arrived and which worker served
it (`X-SSE-Lab-Worker`). A `Follow` can be cut from outside (`cut()`): the
connection closes, the producer lives on, the client reconnects at once.

    kill_serving_worker   SIGKILL the worker a stream is on, mid-generation
    cut_and_resume        cut only the connection; the resumed leg is a replay
    kill_producer         a watcher on another worker sees the generation taken over
    fault_run             many clients, random kills and cuts: lost, duplicated, time lost
    throughput            tokens per second through 1 or 2 workers
    redis_cost            latency Redis adds, at the first token and per token

Definitions: a token is *lost* when its index never arrived, *duplicated* when
it arrived more than once. *Time lost* by a break is the time from the moment the
connection ended (or the worker was killed) to the next token's arrival. *TTFT of
a leg* is the time from opening that connection to its first token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import random
import statistics
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from ..client import STREAM_PATH, stream_chat
from ..generations import WORKER_HEADER, Keys
from ..model import sim_tokens
from ..parts.cluster import Cluster, WorkerOptions, start_worker
from ..parts.redis import start_redis
from ..sse import MEDIA_TYPE, Decoder

T = TypeVar("T")


@dataclass(frozen=True)
class Arrival:
    """One token as the client got it: its index, text, arrival time (perf_counter s) and serving worker pid."""

    index: int
    token: str
    at: float
    worker: str


@dataclass(frozen=True)
class Leg:
    """One connection of a stream: when it opened, which worker answered, its first token, how it ended."""

    opened_at: float
    worker: str
    first_token_at: float | None
    ended_at: float
    ended_by: str  # "done", "error", "cut" (the client's own), "lost" (the connection failed)

    @property
    def ttft(self) -> float | None:
        """Seconds from opening this connection to its first token."""
        return None if self.first_token_at is None else self.first_token_at - self.opened_at


@dataclass
class Follow:
    """A stream followed across its connections; `cut()` ends the current connection from outside."""

    generation: str
    prompt: str
    params: dict[str, str | int | float]
    started_at: float = field(default_factory=time.perf_counter)
    arrivals: list[Arrival] = field(default_factory=list)
    legs: list[Leg] = field(default_factory=list)
    finish_reason: str | None = None
    error: dict[str, str] | None = None
    _cut: asyncio.Event | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        return "".join(arrival.token for arrival in self.arrivals)

    @property
    def duplicated(self) -> int:
        """Tokens that arrived more than once."""
        return len(self.arrivals) - len({arrival.index for arrival in self.arrivals})

    def lost(self, expected_tokens: int) -> int:
        """Token indices below `expected_tokens` that never arrived."""
        return len(set(range(expected_tokens)) - {arrival.index for arrival in self.arrivals})

    def cut(self) -> None:
        """Close the current connection (thread-safe); the client reconnects at once with Last-Event-ID."""
        if self._loop is not None and self._cut is not None:
            self._loop.call_soon_threadsafe(self._cut.set)

    @property
    def breaks(self) -> list[tuple[float, float, str]]:
        """(ended_at, next token's arrival, how the connection ended) for every leg that ended before `done`."""
        found = []
        for leg in self.legs:
            if leg.ended_by in ("cut", "lost"):
                later = [arrival.at for arrival in self.arrivals if arrival.at > leg.ended_at]
                if later:
                    found.append((leg.ended_at, min(later), leg.ended_by))
        return found


async def follow(
    base_url: str,
    prompt: str,
    generation: str,
    *,
    record: Follow | None = None,
    retry_s: float = 0.05,
    max_reconnects: int = 50,
    timeout_s: float = 30.0,
    **params: str | int | float,
) -> Follow:
    """Read generation `generation` from `base_url` to its end, through every reconnection; see `Follow`.

    An empty `generation` sends none: the single-process app takes no such parameter.
    """
    result = record or Follow(generation, prompt, params)
    result._loop, result._cut = asyncio.get_running_loop(), asyncio.Event()
    query = {"prompt": prompt, **params} | ({"generation": generation} if generation else {})
    last_event_id = ""
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
        for _ in range(max_reconnects + 1):
            headers = {"Accept": MEDIA_TYPE}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            opened_at, worker, first, ended_by = time.perf_counter(), "?", None, "lost"
            result._cut.clear()
            reading = asyncio.ensure_future(_read_leg(client, base_url, query, headers, result))
            cutting = asyncio.ensure_future(result._cut.wait())
            await asyncio.wait((reading, cutting), return_when=asyncio.FIRST_COMPLETED)
            cutting.cancel()
            if not reading.done():
                reading.cancel()
                ended_by = "cut"
            await asyncio.wait((reading, cutting))
            if not reading.cancelled() and reading.exception() is None:
                worker, ended_by = reading.result()
            arrived = [arrival for arrival in result.arrivals if arrival.at >= opened_at]
            if arrived:
                first, worker = arrived[0].at, arrived[0].worker
                last_event_id = str(result.arrivals[-1].index)
            result.legs.append(Leg(opened_at, worker, first, time.perf_counter(), ended_by))
            if ended_by in ("done", "error"):
                return result
            await asyncio.sleep(retry_s if ended_by == "lost" else 0)
    result.error = {"code": "connection_lost", "message": f"gave up after {max_reconnects} reconnections"}
    return result


async def _read_leg(
    client: httpx.AsyncClient,
    base_url: str,
    query: dict[str, str | int | float],
    headers: dict[str, str],
    result: Follow,
) -> tuple[str, str]:
    """One connection: append its tokens to `result`; (worker, 'done'|'error'|'lost')."""
    try:
        async with client.stream("GET", base_url + STREAM_PATH, params=query, headers=headers) as response:
            worker = response.headers.get(WORKER_HEADER, "?")
            if response.status_code != 200:
                await response.aread()
                return worker, "lost"
            decoder = Decoder()
            async for chunk in response.aiter_bytes():
                now = time.perf_counter()
                for event in decoder.feed(chunk):
                    data = json.loads(event.data) if event.data else {}
                    if event.event == "token":
                        result.arrivals.append(Arrival(data["index"], data["token"], now, worker))
                    elif event.event == "done":
                        result.finish_reason = data["finish_reason"]
                        return worker, "done"
                    elif event.event == "error":
                        result.error = data
                        return worker, "error"
            return worker, "lost"
    except httpx.TransportError:
        return "?", "lost"


def _params(max_tokens: int, ttft_ms: float, token_ms: float) -> dict[str, int | float]:
    return {"max_tokens": max_tokens, "ttft_ms": ttft_ms, "token_ms": token_ms}


def expected_text(prompt: str, max_tokens: int, seed: int = 0) -> str:
    """The uninterrupted text of the sim for this request."""
    return "".join(sim_tokens(prompt, max_tokens, seed))


class _Background:
    """An event loop in a thread, so a notebook cell can kill and cut while streams run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@contextlib.contextmanager
def _background() -> Iterator[_Background]:
    running = _Background()
    try:
        yield running
    finally:
        running.close()


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.002)


@dataclass
class Scenario:
    """One scripted fault on one stream: the `Follow` of the stream (and of a watcher), what was done when."""

    stream: Follow
    expected: str
    fault_at: float
    killed: int | None = None
    watcher: Follow | None = None

    def next_token_after_fault(self, stream: Follow | None = None) -> float:
        """Seconds from the fault to the next token `stream` (default: the main one) received."""
        stream = stream or self.stream
        return min(arrival.at for arrival in stream.arrivals if arrival.at > self.fault_at) - self.fault_at


def lease_holder(redis_url: str, generation: str) -> str | None:
    """The pid of the worker producing `generation` right now (its lease's value is `pid:nonce`), or None."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        holder = client.get(Keys.of(generation).lease)
    return None if holder is None else holder.decode().split(":")[0]


@contextlib.contextmanager
def _one_stream(
    cluster: Cluster, generation: str, prompt: str, params: dict[str, int | float], tokens: int
) -> Iterator[Follow]:
    """Follow `generation` through the cluster; yield its record once `tokens` arrived, then wait for its end."""
    with _background() as background:
        record = Follow(generation, prompt, params)
        done = background.submit(follow(cluster.url, prompt, generation, record=record, **params))
        _wait_until(lambda: len(record.arrivals) >= tokens, 10, f"{tokens} tokens")
        yield record
        done.result(30)


def kill_serving_worker(
    cluster: Cluster,
    *,
    generation: str,
    prompt: str = "beyond one process",
    max_tokens: int = 40,
    kill_after: int = 15,
    ttft_ms: float = 100,
    token_ms: float = 20,
) -> Scenario:
    """Stream a generation, SIGKILL the worker serving it after `kill_after` tokens, follow it to the end."""
    with _one_stream(cluster, generation, prompt, _params(max_tokens, ttft_ms, token_ms), kill_after) as record:
        victim = cluster.worker(record.arrivals[-1].worker)
        fault_at = time.perf_counter()
        cluster.kill(victim)
    cluster.restart(victim)
    return Scenario(record, expected_text(prompt, max_tokens), fault_at, killed=victim.pid)


def cut_and_resume(
    cluster: Cluster,
    *,
    generation: str,
    prompt: str = "cut the wire",
    max_tokens: int = 40,
    cut_after: int = 15,
    ttft_ms: float = 500,
    token_ms: float = 20,
) -> Scenario:
    """Cut only the connection after `cut_after` tokens; the client reconnects at once and gets a replay."""
    with _one_stream(cluster, generation, prompt, _params(max_tokens, ttft_ms, token_ms), cut_after) as record:
        fault_at = time.perf_counter()
        record.cut()
    return Scenario(record, expected_text(prompt, max_tokens), fault_at)


def kill_producer(
    cluster: Cluster,
    *,
    generation: str,
    prompt: str = "take it over",
    max_tokens: int = 40,
    kill_after: int = 15,
    ttft_ms: float = 100,
    token_ms: float = 20,
) -> Scenario:
    """Two readers of one generation on two workers; SIGKILL the producer's worker; both end with the full text."""
    params = _params(max_tokens, ttft_ms, token_ms)
    with _background() as background:
        first, watcher = Follow(generation, prompt, params), Follow(generation, prompt, params)
        streaming = background.submit(follow(cluster.url, prompt, generation, record=first, **params))
        _wait_until(lambda: len(first.arrivals) >= 1, 10, "the first token")
        watching = background.submit(follow(cluster.url, prompt, generation, record=watcher, **params))
        _wait_until(lambda: len(first.arrivals) >= kill_after and len(watcher.arrivals) >= 1, 10, "both readers")
        producer = lease_holder(cluster.redis.url, generation)
        assert producer is not None, "no producer holds the lease"
        victim = cluster.worker(producer)
        fault_at = time.perf_counter()
        cluster.kill(victim)
        streaming.result(30)
        watching.result(30)
    cluster.restart(victim)
    return Scenario(first, expected_text(prompt, max_tokens), fault_at, killed=victim.pid, watcher=watcher)


# Many streams and many faults


@dataclass(frozen=True)
class StreamSpec:
    """One stream a pool runs: a prompt, its generation id and the endpoint's parameters."""

    prompt: str
    generation: str
    params: dict[str, str | int | float]

    @property
    def expected(self) -> str:
        return expected_text(self.prompt, int(self.params["max_tokens"]), int(self.params.get("seed", 0)))


def stream_pool(
    base_url: str,
    specs: Iterable[StreamSpec],
    *,
    concurrency: int,
    during: Callable[[Callable[[], list[Follow]]], None] | None = None,
) -> list[Follow]:
    """Run the streams of `specs`, `concurrency` at a time, to their end; return what each client got.

    With `during`, streams are started only while `during(active)` runs in this
    thread (`specs` may then be endless); `active()` lists the streams running now,
    for `during` to cut. This is the load of the fault run; a load generator with
    the same shape can stand in for it.
    """
    specs = iter(specs)
    follows: list[Follow] = []
    running: set[int] = set()
    stopping = threading.Event()

    async def client() -> None:
        while not stopping.is_set() and (spec := next(specs, None)) is not None:
            record = Follow(spec.generation, spec.prompt, spec.params)
            follows.append(record)
            running.add(id(record))
            try:
                await follow(base_url, spec.prompt, spec.generation, record=record, **spec.params)
            finally:
                running.discard(id(record))

    async def clients() -> None:
        await asyncio.gather(*(client() for _ in range(concurrency)))

    with _background() as background:
        done = background.submit(clients())
        try:
            if during is not None:
                during(lambda: [record for record in list(follows) if id(record) in running])
                stopping.set()
            done.result(120)
        finally:
            stopping.set()
    return follows


@dataclass
class FaultRun:
    """What a fault run did and what the clients got: see `fault_run`."""

    follows: list[Follow]
    expected: dict[str, str]
    faults: list[tuple[float, str]]  # (when, "kill" or "cut")

    @property
    def tokens(self) -> int:
        return sum(len(record.arrivals) for record in self.follows)

    @property
    def lost(self) -> int:
        return sum(record.lost(len(sim_tokens_of(record))) for record in self.follows)

    @property
    def duplicated(self) -> int:
        return sum(record.duplicated for record in self.follows)

    @property
    def wrong_texts(self) -> int:
        """Streams whose text is not exactly the uninterrupted one."""
        return sum(record.text != self.expected[record.generation] for record in self.follows)

    def time_lost(self, kind: str) -> list[float]:
        """Seconds from a fault of `kind` ("kill" or "cut") to the next token, for every stream it broke.

        A break is attributed to the last fault at or before the connection ended.
        """
        times = []
        for record in self.follows:
            for ended_at, resumed_at, _ in record.breaks:
                earlier = [fault for fault in self.faults if fault[0] <= ended_at]
                if earlier and earlier[-1][1] == kind:
                    times.append(resumed_at - earlier[-1][0])
        return times


def sim_tokens_of(record: Follow) -> list[str]:
    params = record.params
    return sim_tokens(record.prompt, int(params["max_tokens"]), int(params.get("seed", 0)))


def fault_run(
    cluster: Cluster,
    *,
    faults: int = 100,
    kill_share: float = 0.1,
    interval_s: float = 0.1,
    concurrency: int = 4,
    seed: int = 0,
    max_tokens: int = 40,
    ttft_ms: float = 50,
    token_ms: float = 30,
    progress: bool = True,
) -> FaultRun:
    """Random kills and cuts during a load of `concurrency` streams; every stream is checked token by token.

    Every `interval_s` (seeded), a fault: with probability `kill_share` SIGKILL a
    random worker (restarted on its port at once, in the background; no second
    kill until it is back), otherwise cut the connection of a random running stream.
    """
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    run_id = f"{seed}-{time.time_ns()}"
    params = {"max_tokens": max_tokens, "ttft_ms": ttft_ms, "token_ms": token_ms}
    specs = (StreamSpec(f"fault run {n}", f"fault-{run_id}-{n}", params) for n in range(10**6))
    injected: list[tuple[float, str]] = []
    restarting: list[threading.Thread] = []

    def inject(active: Callable[[], list[Follow]]) -> None:
        for _ in tqdm(range(faults), desc="faults", disable=not progress):
            time.sleep(rng.uniform(0.5, 1.5) * interval_s)
            busy = [record for record in active() if record.arrivals]
            can_kill = all(worker.running for worker in cluster.workers) and not any(t.is_alive() for t in restarting)
            if can_kill and rng.random() < kill_share:
                victim = rng.choice(cluster.workers)
                injected.append((time.perf_counter(), "kill"))
                cluster.kill(victim)
                thread = threading.Thread(target=cluster.restart, args=(victim,), daemon=True)
                thread.start()
                restarting.append(thread)
            elif busy:
                injected.append((time.perf_counter(), "cut"))
                rng.choice(busy).cut()
        for thread in restarting:
            thread.join(20)

    follows = stream_pool(cluster.url, specs, concurrency=concurrency, during=inject)
    expected = {record.generation: "".join(sim_tokens_of(record)) for record in follows}
    return FaultRun(follows, expected, injected)


# Throughput and what Redis costs


def throughput(cluster: Cluster, *, streams: int = 16, concurrency: int = 8, max_tokens: int = 50) -> float:
    """Tokens per second delivered through nginx to `concurrency` clients, model as fast as it goes (0 ms a token).

    Throughput = tokens received by all clients / wall time from the first request to the last token.
    """
    run_id = time.time_ns()
    params = {"max_tokens": max_tokens, "ttft_ms": 0, "token_ms": 0}
    specs = [StreamSpec(f"throughput {n}", f"tp-{run_id}-{n}", params) for n in range(streams)]
    started = time.perf_counter()
    follows = stream_pool(cluster.url, specs, concurrency=concurrency)
    ended = max(record.arrivals[-1].at for record in follows if record.arrivals)
    return sum(len(record.arrivals) for record in follows) / (ended - started)


@dataclass(frozen=True)
class RedisCost:
    """Per-token latency with and without Redis, one worker process each, no nginx.

    lateness: how long after its due time (request start + ttft_ms + i x token_ms) token i
    arrived, p50 over all tokens of all runs, in ms; ttft_ms_*: median TTFT in ms.
    """

    lateness_ms_plain: float
    lateness_ms_redis: float
    ttft_ms_plain: float
    ttft_ms_redis: float
    bytes_per_token: float

    @property
    def added_per_token_ms(self) -> float:
        return self.lateness_ms_redis - self.lateness_ms_plain

    @property
    def added_at_first_token_ms(self) -> float:
        return self.ttft_ms_redis - self.ttft_ms_plain


def redis_cost(*, runs: int = 8, max_tokens: int = 40, ttft_ms: float = 50, token_ms: float = 10) -> RedisCost:
    """One worker without Redis, one with: the same streams, one at a time, directly, read by `stream_chat`."""
    import redis as redis_client

    params = {"max_tokens": max_tokens, "ttft_ms": ttft_ms, "token_ms": token_ms}
    results: dict[str, tuple[list[float], list[float]]] = {}
    with start_redis() as redis_server, contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(_temporary_directory()))
        workers = {
            "plain": stack.enter_context(start_worker(None, WorkerOptions(), directory)),
            "redis": stack.enter_context(start_worker(redis_server.url, WorkerOptions(), directory)),
        }
        run_id = time.time_ns()
        for n in range(runs):  # the two alternate, so that a busy moment of the machine hits both
            for name, worker in workers.items():
                generation = {"generation": f"cost-{run_id}-{n}"} if name == "redis" else {}
                result = stream_chat(worker.url, "cost", **params, **generation)
                lateness, ttfts = results.setdefault(name, ([], []))
                ttfts.append(1000 * (result.arrivals[0] - result.started_at))
                lateness += [
                    1000 * (arrival - result.started_at) - (ttft_ms + index * token_ms)
                    for index, arrival in enumerate(result.arrivals)
                ]
        with redis_client.Redis.from_url(redis_server.url) as client:
            used = client.memory_usage(Keys.of(f"cost-{run_id}-0").stream, samples=0) or 0
    return RedisCost(
        statistics.median(results["plain"][0]),
        statistics.median(results["redis"][0]),
        statistics.median(results["plain"][1]),
        statistics.median(results["redis"][1]),
        used / max_tokens,
    )


@contextlib.contextmanager
def _temporary_directory() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sse-lab-cluster-") as directory:
        yield directory


# Plots of the runs above (here rather than in sse_lab.plots: they read this module's types)


def worker_timeline(scenario: Scenario, ax: Any = None, *, title: str = "") -> Any:
    """Token index against arrival time (ms after the request), one colour per serving worker, the fault marked."""
    import matplotlib.pyplot as plt

    ax = ax if ax is not None else plt.subplots(figsize=(7, 4))[1]
    streams = [("", scenario.stream)] + ([("watcher, ", scenario.watcher)] if scenario.watcher else [])
    markers = iter("os")
    start = scenario.stream.started_at
    for prefix, stream in streams:
        marker = next(markers)
        for worker in dict.fromkeys(arrival.worker for arrival in stream.arrivals):
            mine = [arrival for arrival in stream.arrivals if arrival.worker == worker]
            ax.scatter(
                [1000 * (arrival.at - start) for arrival in mine],
                [arrival.index for arrival in mine],
                s=14,
                marker=marker,
                label=f"{prefix}served by worker {worker}",
            )
    label = f"SIGKILL worker {scenario.killed}" if scenario.killed else "connection cut"
    ax.axvline(1000 * (scenario.fault_at - start), color="red", ls="--", lw=1, label=label)
    ax.set_xlabel("arrival (ms after the request)")
    ax.set_ylabel("token index")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    return ax


def time_lost_histogram(run: FaultRun, ax: Any = None) -> Any:
    """How long each break lasted (fault to next token, ms), kills and cuts apart, on a log scale."""
    import matplotlib.pyplot as plt

    ax = ax if ax is not None else plt.subplots(figsize=(7, 4))[1]
    for kind in ("cut", "kill"):
        lost = [1000 * seconds for seconds in run.time_lost(kind)]
        if lost:
            ax.hist(
                lost,
                bins=_log_bins(lost),
                alpha=0.6,
                label=f"{kind} (n={len(lost)}, median {statistics.median(lost):.0f} ms)",
            )
    ax.set_xscale("log")
    ax.set_xlabel("time lost: fault to the next token (ms)")
    ax.set_ylabel("broken streams")
    ax.legend()
    return ax


def _log_bins(values: list[float], count: int = 20) -> list[float]:
    low, high = max(min(values), 0.1), max(values) * 1.01
    return [low * (high / low) ** (step / count) for step in range(count + 1)]
