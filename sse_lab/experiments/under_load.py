"""Many users at once (notebook 08): what a measuring client does to the figures, and what load does to a server.

- `client_bottleneck`: the same streams read by `astream_chat` tasks on one event
  loop, and by the load generator (`sse_lab.load`) in processes of its own.
- `sweep`: the load generator at several concurrencies.
- `open_vs_closed`: a closed loop of C users and an open loop (Poisson arrivals)
  with the same mean number of streams in flight (Little's law: rate = C / the
  mean stream duration).
- `in_flight`, `token_lateness_ms`: what to plot from the records.
- `collector_pause`: what one full garbage collection costs a server holding many
  streams, which is why `python -m sse_lab serve` tunes its collector (`sse_lab.collector`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import socket
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlencode

from tqdm.auto import tqdm

from ..background import serve_in_background
from ..client import astream_chat, fetch_stats
from ..load import LoadResult, LoadSpec, run_load
from ..metrics import ChatResult, RequestRecord, lateness
from ..server import Settings, create_app

PROMPT = "How many users can one server stream to?"
T = TypeVar("T")


def _in_a_thread(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh loop in its own thread: a notebook's kernel already runs a loop of its own."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(asyncio.run(work))
        except BaseException as error:  # re-raised in the caller
            errors.append(error)

    thread = threading.Thread(target=run, name="sse-lab-one-loop-client")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def _as_record(result: ChatResult) -> RequestRecord:
    outcome = "done" if result.finish_reason else ("error_" + str((result.error or {}).get("code", "unknown")))
    return RequestRecord(
        scheduled_at=result.started_at,
        sent_at=result.started_at,
        headers_at=result.headers_at or None,
        status=200,
        arrivals=list(result.arrivals),
        ended_at=result.finished_at,
        outcome=outcome,
    )


async def _one_loop(url: str, concurrency: int, ramp_s: float, params: dict[str, Any]) -> list[RequestRecord]:
    async def user(number: int) -> ChatResult:
        await asyncio.sleep(ramp_s * number / concurrency)
        return await astream_chat(url, PROMPT, max_reconnects=0, **params)

    return [_as_record(result) for result in await asyncio.gather(*(user(n) for n in range(concurrency)))]


def client_bottleneck(
    url: str, concurrency: int, *, max_tokens: int = 40, token_ms: float = 25, ramp_s: float = 0.5
) -> dict[str, list[RequestRecord]]:
    """The same load on the same server, read two ways, one after the other.

    "astream_chat, one loop": C tasks of the kit's httpx-based client on one event
    loop in this process. "load generator": `sse_lab.load` in worker processes.
    Both ask for C streams of `max_tokens` at one per `token_ms`, started evenly
    over `ramp_s`, with ttft 0, so token i is due i x token_ms after the send.
    """
    params = {"max_tokens": max_tokens, "ttft_ms": 0, "token_ms": token_ms}
    one_loop = _in_a_thread(_one_loop(url, concurrency, ramp_s, params))
    spec = LoadSpec(url, concurrency=concurrency, requests=concurrency, ramp_s=ramp_s, prompt=PROMPT, **params)
    return {"astream_chat, one loop": one_loop, "load generator": run_load(spec, progress=False).records}


def token_lateness_ms(records: Sequence[RequestRecord], ttft_ms: float, token_ms: float) -> list[float]:
    """Every token's lateness (ms) against the schedule ttft + i x token_ms from its request's send."""
    late = []
    for record in records:
        due = [ttft_ms + index * token_ms for index in range(len(record.arrivals))]
        late += [1000 * value for value in lateness(record, due)]
    return late


def sweep(
    url: str, levels: Sequence[int], *, max_tokens: int = 40, token_ms: float = 25, ramp_s: float = 0.5
) -> dict[int, LoadResult]:
    """The load generator at each concurrency in `levels`: C users, one stream each, starts over `ramp_s`."""
    results = {}
    for concurrency in tqdm(levels, desc="sweep", unit="level"):
        spec = LoadSpec(
            url, concurrency=concurrency, requests=concurrency, ramp_s=ramp_s, max_tokens=max_tokens, ttft_ms=0,
            token_ms=token_ms, prompt=PROMPT,
        )  # fmt: skip
        results[concurrency] = run_load(spec, progress=False)
    return results


def open_vs_closed(
    url: str, concurrency: int, *, requests: int, max_tokens: int = 40, token_ms: float = 25
) -> dict[str, LoadResult]:
    """A closed loop of `concurrency` users against an open loop of the same mean load, `requests` each.

    The open loop's rate is concurrency / stream duration, so on average as
    many streams are in flight; Poisson arrivals make it burst above that.
    """
    stream_s = max_tokens * token_ms / 1000
    closed = LoadSpec(
        url, concurrency=concurrency, requests=requests, max_tokens=max_tokens, ttft_ms=0, token_ms=token_ms,
        prompt=PROMPT,
    )  # fmt: skip
    opened = replace(closed, concurrency=None, rate=concurrency / stream_s)
    return {
        "closed loop": run_load(closed, progress=False),
        "open loop (Poisson)": run_load(opened, progress=False),
    }


def in_flight(records: Sequence[RequestRecord]) -> tuple[list[float], list[int]]:
    """Streams open over time: (seconds since the first send, count), a step at every send and every end."""
    if not records:
        return [], []
    start = min(record.sent_at for record in records)
    changes = sorted(
        [(record.sent_at - start, 1) for record in records]
        + [((record.ended_at or record.sent_at) - start, -1) for record in records]
    )
    times, counts, open_now = [], [], 0
    for at, change in changes:
        open_now += change
        times.append(at)
        counts.append(open_now)
    return times, counts


@dataclass(frozen=True)
class CollectorPause:
    """One full garbage collection of a process serving `streams` open streams, against the same process idle.

    objects_per_stream: the objects the collector tracks that each open stream adds
    (len(gc.get_objects()) with the streams open minus before, divided by
    `streams`; the client's socket object is one of them). idle_ms, open_ms: how
    long `gc.collect()` took, the fastest of `FULL_COLLECTION_RUNS` runs each (noise
    only adds). Nothing else runs in the process meanwhile, the server included:
    the pause stops every stream.
    """

    streams: int
    objects_per_stream: float
    idle_ms: float
    open_ms: float

    @property
    def ms_per_1000_streams(self) -> float:
        """What 1,000 more open streams add to each full collection, in ms."""
        return 1000 * (self.open_ms - self.idle_ms) / self.streams


FULL_COLLECTION_RUNS = 5


def _fastest_full_collection_ms() -> float:
    fastest = math.inf
    for _ in range(FULL_COLLECTION_RUNS):
        started = time.perf_counter()
        gc.collect()
        fastest = min(fastest, 1000 * (time.perf_counter() - started))
    return fastest


def collector_pause(streams: int = 400, timeout_s: float = 30.0) -> CollectorPause:
    """Time a full collection of this process with an in-kernel server holding `streams` open streams, and without.

    The streams wait on a prefill of a minute (opened with raw sockets, no client
    library), so the collector finds them as a server under load holds them: their
    tasks, coroutines, request and response alive. They are closed, and the server
    stopped, however it ends.
    """
    query = urlencode({"prompt": PROMPT, "ttft_ms": 60_000, "heartbeat_s": 3_600})
    with serve_in_background(create_app(Settings(max_concurrent_streams=streams))) as server:
        request = f"GET /api/chat/stream?{query} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n\r\n".encode()
        idle_ms = _fastest_full_collection_ms()
        before = len(gc.get_objects())
        with contextlib.ExitStack() as open_streams:
            for _ in range(streams):
                sock = open_streams.enter_context(socket.create_connection((server.host, server.port)))
                sock.sendall(request)
            deadline = time.monotonic() + timeout_s
            while fetch_stats(server.url)["streams_active"] < streams:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{streams} streams did not open within {timeout_s} s")
                time.sleep(0.01)
            objects_per_stream = (len(gc.get_objects()) - before) / streams
            open_ms = _fastest_full_collection_ms()
    return CollectorPause(streams, round(objects_per_stream, 1), round(idle_ms, 2), round(open_ms, 2))
