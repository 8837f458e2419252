"""What a client measured, and the latency metrics of LLM-serving benchmarks.

All times are `time.perf_counter()` readings in seconds (a monotonic clock), taken
by the client. The definitions follow the serving benchmarks (vLLM's, NVIDIA's
genai-perf), so the numbers here mean what they mean there:

- TTFT, time to first token: from the moment the request is sent to the arrival
  of the first token. It is what the user spends staring at an empty screen.
- ITL, inter-token latency: the gaps between consecutive token arrivals.
- E2E, end-to-end latency: from the request to the arrival of the last token.
- TPOT, time per output token: (E2E - TTFT) / (tokens - 1), the mean ITL.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any


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
    error: dict[str, Any] | None = None  # an `error` event's data, if the stream sent one

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
    """A plain-text table: per variant, the runs and their TTFT and E2E medians and p90s in ms."""
    header = f"{'variant':<12}{'runs':>5}{'TTFT p50':>11}{'TTFT p90':>11}{'E2E p50':>11}{'E2E p90':>11}"
    lines = [header]
    for variant, runs in runs_by_variant.items():
        ttft = Spread.of(ttfts(runs))
        e2e = Spread.of([run.e2e for run in runs if run.e2e is not None])
        cells = [ttft.median, ttft.p90, e2e.median, e2e.p90]
        lines.append(f"{variant:<12}{len(runs):>5}" + "".join(f"{1000 * cell:>8.0f} ms" for cell in cells))
    return "\n".join(lines)
