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
from collections.abc import Mapping, Sequence
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
