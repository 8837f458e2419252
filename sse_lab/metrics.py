"""What a client measured, and the latency metrics of LLM-serving benchmarks.

All times are `time.perf_counter()` readings in seconds (a monotonic clock), taken
by the client. The definitions follow the serving benchmarks (vLLM's, NVIDIA's
genai-perf), so the numbers here mean what they mean there:

- TTFT, time to first token: from the moment the request is sent to the arrival
  of the first token. It is what the user spends staring at an empty screen.
- ITL, inter-token latency: the gaps between consecutive token arrivals.
- E2E, end-to-end latency: from the request to the arrival of the last token.
- TPOT, time per output token: (E2E - TTFT) / (tokens - 1), the mean ITL.

A token "arrives" when its event is complete: its closing blank line has been
read and parsed. The client also notes when the event's first byte came (see
`Received`) and every read from the socket (see `Chunk`), so a notebook can show
where the clock is read and when bytes moved.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby, pairwise
from typing import Any

from .sse import Event


@dataclass(frozen=True)
class Chunk:
    """One read from the response body: when it came and how many bytes it held (after decompression)."""

    at: float
    size: int


@dataclass(frozen=True)
class Received:
    """One event as the client received it.

    first_byte_at: the read that brought the event's first byte (a `data`,
    `event` or `id` line begun; comments and `retry` lines do not count).
    complete_at: the read that brought its closing blank line, when a parser
    can hand it over. The gap between the two is time an event spent split
    across reads.
    """

    event: Event
    first_byte_at: float
    complete_at: float


@dataclass(frozen=True)
class Drop:
    """A connection that ended before the stream did, and what the client did about it.

    at: when the connection was lost. last_event_id: what the client sent back
    on reconnecting. reason: what ended it. resumed_at: when the first event after
    it arrived, None if none did. attempts: connections tried before one held.
    """

    at: float
    last_event_id: str
    reason: str
    resumed_at: float | None = None
    attempts: int = 0


@dataclass
class ChatResult:
    """One request as the client saw it.

    For a streamed response each token arrives when its event has been read; for
    a buffered one every token arrives when the whole body has.
    """

    mode: str  # "streamed" or "buffered"
    started_at: float  # just before the request was sent
    headers_at: float = 0.0  # status line and headers read
    arrivals: list[float] = field(default_factory=list)  # one per token, in order
    text: str = ""
    finished_at: float = 0.0  # the response body has ended
    finish_reason: str | None = None
    error: dict[str, Any] | None = None  # an `error` event's data, or why the client gave up
    events: list[Received] = field(default_factory=list)  # every event of a stream, in order
    chunks: list[Chunk] = field(default_factory=list)  # every read from the body
    drops: list[Drop] = field(default_factory=list)  # connections lost mid-stream
    wire_bytes: int = 0  # body bytes as they crossed the network (compressed, if they were)

    @property
    def tokens(self) -> int:
        return len(self.arrivals)

    @property
    def offsets(self) -> list[float]:
        """Each token's arrival in seconds after the request was sent."""
        return [arrival - self.started_at for arrival in self.arrivals]

    @property
    def time_to_headers(self) -> float:
        return self.headers_at - self.started_at

    @property
    def ttft(self) -> float | None:
        """Time to first token in seconds; None when no token arrived."""
        return self.arrivals[0] - self.started_at if self.arrivals else None

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies in seconds: one fewer than there are tokens."""
        return [later - earlier for earlier, later in pairwise(self.arrivals)]

    @property
    def e2e(self) -> float | None:
        """End-to-end latency in seconds, to the last token; None when no token arrived."""
        return self.arrivals[-1] - self.started_at if self.arrivals else None

    @property
    def lumps(self) -> list[int]:
        """How many tokens arrived together, lump by lump: all ones when each came on its own."""
        return [len(list(together)) for _, together in groupby(self.arrivals)]

    @property
    def time_lost(self) -> float:
        """Seconds without progress because of drops: from each drop to the next event (or the end)."""
        return sum((drop.resumed_at or self.finished_at) - drop.at for drop in self.drops)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, in seconds; None for fewer than two tokens."""
        if self.tokens < 2:
            return None
        return (self.arrivals[-1] - self.arrivals[0]) / (self.tokens - 1)


@dataclass(frozen=True)
class Spread:
    """Median and spread of a sample: p10 and p90 are the 10th and 90th percentiles."""

    n: int
    median: float
    p10: float
    p90: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values to summarize")
        if len(values) == 1:
            (only,) = values
            return cls(1, only, only, only, only, only)
        deciles = statistics.quantiles(values, n=10, method="inclusive")
        return cls(len(values), statistics.median(values), deciles[0], deciles[-1], min(values), max(values))


def ttfts(runs: Sequence[ChatResult]) -> list[float]:
    """The TTFTs of the runs that received at least one token."""
    return [run.ttft for run in runs if run.ttft is not None]


def summary_table(runs_by_variant: Mapping[str, Sequence[ChatResult]]) -> str:
    """A plain-text table per variant: runs, median time to headers, TTFT and E2E medians and p90s, in ms."""
    width = max(len("variant"), *map(len, runs_by_variant)) + 2
    columns = ["headers p50", "TTFT p50", "TTFT p90", "E2E p50", "E2E p90"]
    lines = [f"{'variant':<{width}}{'runs':>5}" + "".join(f"{column:>13}" for column in columns)]
    for variant, runs in runs_by_variant.items():
        headers = Spread.of([run.time_to_headers for run in runs])
        ttft = Spread.of(ttfts(runs))
        e2e = Spread.of([run.e2e for run in runs if run.e2e is not None])
        cells = [headers.median, ttft.median, ttft.p90, e2e.median, e2e.p90]
        lines.append(f"{variant:<{width}}{len(runs):>5}" + "".join(f"{1000 * cell:>10.0f} ms" for cell in cells))
    return "\n".join(lines)


# ── Under load: one record per request of a load run, and the benchmark metrics over many ──────────────────────────


@dataclass
class RequestRecord:
    """One request of a load run (`sse_lab.load`), as the load generator saw it.

    Times are `time.perf_counter()` readings, which on Linux and macOS are one
    system-wide monotonic clock, so records from several worker processes compare.

    scheduled_at: when the load plan said to send it. sent_at: when the client
    began it (just before connecting); every latency counts from here.
    headers_at: the status line and headers read (None: never). status: the
    HTTP status (None: no response). arrivals: one time per token, when the read
    that completed its event returned. ended_at: when the client was done with it.
    outcome: `done` (the stream's end event), `error_<code>` (an error event),
    `http_<status>` (a refusal, such as `http_429`), `connect_failed`, `cut_short`
    (the connection ended before the stream did) or `client_timeout`.
    seed: the model seed it asked for (the jitter of its schedule depends on it).
    counted: False for warm-up requests, which load the server but are not measured.
    """

    scheduled_at: float
    sent_at: float
    headers_at: float | None = None
    status: int | None = None
    arrivals: list[float] = field(default_factory=list)
    ended_at: float | None = None
    outcome: str = "cut_short"
    seed: int = 0
    counted: bool = True

    @property
    def send_lag(self) -> float:
        """How late the request went out against its schedule, in seconds.

        An open-loop generator that sends late hides the queueing it should
        measure (coordinated omission), so the lag is reported, not absorbed.
        """
        return self.sent_at - self.scheduled_at

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.sent_at if self.arrivals else None

    @property
    def e2e(self) -> float | None:
        return self.arrivals[-1] - self.sent_at if self.arrivals else None

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (N - 1) in seconds; None for fewer than two tokens."""
        if len(self.arrivals) < 2:
            return None
        return (self.arrivals[-1] - self.arrivals[0]) / (len(self.arrivals) - 1)

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive token arrivals; tokens completed by one read have gaps of 0."""
        return [later - earlier for earlier, later in pairwise(self.arrivals)]


PERCENTILES = ("p50", "p90", "p99", "max", "mean")
SLO_METRICS = ("ttft", "tpot", "e2el")  # vLLM's `--goodput` keys


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99, max and mean of a sample, with numpy's default (linear) interpolation.

    An empty sample gives None for each, so the shape of a report never changes.

    >>> percentiles([1.0, 2.0, 3.0, 4.0])
    {'p50': 2.5, 'p90': 3.7, 'p99': 3.97, 'max': 4.0, 'mean': 2.5}
    """
    if not values:
        return dict.fromkeys(PERCENTILES)
    ordered = sorted(values)
    last = len(ordered) - 1

    def quantile(q: float) -> float:
        position = q * last
        below = int(position)
        above = min(below + 1, last)
        return round(ordered[below] + (ordered[above] - ordered[below]) * (position - below), 9)

    return {
        "p50": quantile(0.50),
        "p90": quantile(0.90),
        "p99": quantile(0.99),
        "max": round(ordered[-1], 9),
        "mean": round(statistics.fmean(ordered), 9),
    }


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    return percentiles([1000 * value for value in values])


def lateness(record: RequestRecord, due_ms: Sequence[float]) -> list[float]:
    """How late each token arrived against the model's own absolute schedule, in seconds.

    Token i is due at `sent_at + due_ms[i] / 1000`, where due_ms[i] = ttft_ms +
    i x token_ms (+ its jitter) is the schedule the simulated model keeps
    (`sse_lab.model.schedule_ms`). The model never drifts from that schedule, so
    whatever lateness remains belongs to the server and the transport (and the
    time to connect): the one metric that isolates them from the model.
    """
    return [arrival - (record.sent_at + due / 1000) for arrival, due in zip(record.arrivals, due_ms, strict=False)]


def is_good(record: RequestRecord, slo_ms: Mapping[str, float]) -> bool:
    """Whether a request met every SLO: done, and each of its ttft, tpot, e2el at most the limit in ms.

    As vLLM counts it: a request with a single token has a TPOT of 0.
    """
    if record.outcome != "done" or not record.arrivals:
        return False
    measured = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.e2e}
    return all(1000 * float(measured[name] or 0.0) <= limit for name, limit in slo_ms.items())


def load_summary(
    records: Sequence[RequestRecord],
    *,
    schedule: Callable[[RequestRecord, int], Sequence[float]] | None = None,
    slo_ms: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The benchmark metrics of a load run, as `python -m sse_lab load --json` writes them (minus `client`).

    Over the counted requests (warm-up ones are left out):

    - requests: how many; errors: how many ended each way but `done`, by outcome.
    - duration_s: from the first request sent to the last one ended.
    - request_rate: requests done per second of that; output_tokens_per_s: their
      tokens per second (vLLM's request and output throughput: done requests only).
    - goodput: requests per second that were done and met every SLO of `slo_ms`
      (`{"ttft": 500, "tpot": 60}`, in ms), DistServe's definition as vLLM
      computes it; None without SLOs.
    - ttft_ms, tpot_ms, e2e_ms: one value per done request (TPOT: those with two
      tokens or more). itl_ms: every gap of every done request, pooled; tokens
      that one read completed share its arrival time, so coalescing shows as
      gaps of 0 (and the next gap as a long one) instead of being smoothed away.
    - lateness_ms: every token of every done request against the model's
      schedule (`lateness`), when `schedule(record, n)` gives the first n due
      times in ms; None when the model keeps no known schedule.

    Each is p50, p90, p99, max and mean (`percentiles`), in ms.
    """
    counted = [record for record in records if record.counted]
    done = [record for record in counted if record.outcome == "done"]
    errors: dict[str, int] = {}
    for record in counted:
        if record.outcome != "done":
            errors[record.outcome] = errors.get(record.outcome, 0) + 1
    if counted:
        first = min(record.sent_at for record in counted)
        last = max(record.ended_at or record.sent_at for record in counted)
        duration = last - first
    else:
        duration = 0.0

    def per_second(count: float) -> float:
        return round(count / duration, 6) if duration > 0 else 0.0

    late: list[float] = []
    if schedule is not None:
        for record in done:
            late += lateness(record, schedule(record, len(record.arrivals)))
    goodput = None if slo_ms is None else per_second(sum(is_good(record, slo_ms) for record in done))
    return {
        "requests": len(counted),
        "errors": dict(sorted(errors.items())),
        "duration_s": round(duration, 6),
        "request_rate": per_second(len(done)),
        "output_tokens_per_s": per_second(sum(len(record.arrivals) for record in done)),
        "goodput": goodput,
        "ttft_ms": _ms([record.ttft for record in done if record.ttft is not None]),
        "itl_ms": _ms([gap for record in done for gap in record.itl]),
        "tpot_ms": _ms([record.tpot for record in done if record.tpot is not None]),
        "e2e_ms": _ms([record.e2e for record in done if record.e2e is not None]),
        "lateness_ms": None if schedule is None else _ms(late),
    }
