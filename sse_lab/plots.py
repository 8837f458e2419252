"""Plots of measured results; each draws on an Axes and returns it.

Pass `ax` to place a plot in a figure of your own; without it each function
makes a new figure. Times are shown in milliseconds after the request was sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .metrics import ChatResult, RequestRecord, Spread, ttfts

if TYPE_CHECKING:  # the stack imports no experiment at run time
    from .experiments.memory import MemoryPoint
    from .experiments.payload import Smoothness


def _axes(ax: Axes | None) -> Axes:
    return plt.subplots(figsize=(7, 4))[1] if ax is None else ax


def ttft_spread(runs_by_variant: Mapping[str, Sequence[ChatResult]], ax: Axes | None = None) -> Axes:
    """TTFT per variant: every run as a dot, the median as a bar, p10 to p90 as a line."""
    ax = _axes(ax)
    for position, (variant, runs) in enumerate(runs_by_variant.items()):
        values = [1000 * ttft for ttft in ttfts(runs)]
        spread = Spread.of(values)
        ax.scatter([position] * len(values), values, alpha=0.6, zorder=3, label=f"{variant} (n={spread.n})")
        ax.hlines(spread.median, position - 0.25, position + 0.25, color="black", zorder=4)
        ax.vlines(position, spread.p10, spread.p90, color="grey", lw=6, alpha=0.4)
        ax.annotate(f"{spread.median:.0f} ms", (position + 0.28, spread.median), va="center")
    ax.set_xticks(range(len(runs_by_variant)), list(runs_by_variant))
    if sum(map(len, runs_by_variant)) > 60:  # long names would overlap: slant them
        ax.tick_params(axis="x", labelrotation=20)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    ax.set_xlim(-0.6, len(runs_by_variant) - 0.2)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("Time to first token: dots are runs, bars medians")
    return ax


def arrival_timeline(result_by_variant: Mapping[str, ChatResult], ax: Axes | None = None) -> Axes:
    """Tokens received so far against time, one line per variant."""
    ax = _axes(ax)
    for variant, result in result_by_variant.items():
        times = [0.0] + [1000 * offset for offset in result.offsets] + [1000 * (result.finished_at - result.started_at)]
        counts = [*range(result.tokens + 1), result.tokens]
        ax.step(times, counts, where="post", label=variant)
    ax.set_xlabel("time since the request was sent (ms)")
    ax.set_ylabel("tokens received")
    ax.set_title("Token arrival")
    ax.legend()
    return ax


def ttft_and_arrivals(runs_by_variant: Mapping[str, Sequence[ChatResult]]) -> Figure:
    """Two panels: (a) TTFT per variant with its spread, (b) the arrival timeline of each variant's first run."""
    first_runs = {variant: runs[0] for variant, runs in runs_by_variant.items()}
    return _two_panels(partial(ttft_spread, runs_by_variant), partial(arrival_timeline, first_runs))


def _two_panels(draw_left: Callable[..., Axes], draw_right: Callable[..., Axes]) -> Figure:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for letter, draw, ax in (("a", draw_left, left), ("b", draw_right, right)):
        draw(ax=ax)
        ax.set_title(f"({letter}) {ax.get_title()}")
    return figure


def drop_timeline(results: Mapping[str, ChatResult], ax: Axes | None = None) -> Axes:
    """Token arrival per variant, with each drop and its resumption marked and the time lost shaded."""
    ax = arrival_timeline(results, ax)
    for result in results.values():
        for drop in result.drops:
            dropped_ms = 1000 * (drop.at - result.started_at)
            resumed_ms = 1000 * ((drop.resumed_at or result.finished_at) - result.started_at)
            ax.axvspan(dropped_ms, resumed_ms, color="tab:red", alpha=0.15)
            ax.axvline(dropped_ms, color="tab:red", ls="--")
            ax.annotate(f" dropped after id {drop.last_event_id}", (dropped_ms, 0), rotation=90, va="bottom")
            ax.axvline(resumed_ms, color="tab:green", ls="--")
            ax.annotate(f" resumed on attempt {drop.attempts}", (resumed_ms, 0), rotation=90, va="bottom")
    ax.set_title("A dropped stream, resumed with Last-Event-ID")
    return ax


def byte_timeline(results: Mapping[str, ChatResult], ax: Axes | None = None) -> Axes:
    """Bytes received so far against time, one line per variant: every read from the socket is a step."""
    ax = _axes(ax)
    for variant, result in results.items():
        times = [0.0] + [1000 * (chunk.at - result.started_at) for chunk in result.chunks]
        received = [0, *accumulate(chunk.size for chunk in result.chunks)]
        ax.step(times, received, where="post", marker=".", label=variant)
    ax.set_xlabel("time since the request was sent (ms)")
    ax.set_ylabel("bytes received")
    ax.set_title("Bytes arriving: each dot is one read from the socket")
    ax.legend()
    return ax


def event_spans(results: Mapping[str, ChatResult], ax: Axes | None = None) -> Axes:
    """Each event of each run as a bar from its first byte (hollow dot) to its complete arrival (filled dot)."""
    ax = _axes(ax)
    for row, (variant, result) in enumerate(results.items()):
        color = f"C{row}"
        rows = [index + 0.25 * row for index in range(len(result.events))]
        starts = [1000 * (received.first_byte_at - result.started_at) for received in result.events]
        ends = [1000 * (received.complete_at - result.started_at) for received in result.events]
        ax.hlines(rows, starts, ends, color=color, lw=3, alpha=0.5)
        ax.scatter(starts, rows, facecolors="none", edgecolors=color, zorder=3, label=f"{variant}: first byte")
        ax.scatter(ends, rows, color=color, zorder=3, label=f"{variant}: complete")
    ax.invert_yaxis()  # the first event on top, as in a log
    ax.set_xlabel("time since the request was sent (ms)")
    ax.set_ylabel("event")
    ax.set_title("Each event from its first byte to its last")
    ax.legend(fontsize="small")
    return ax


def clock_gaps(results: Mapping[str, ChatResult], ax: Axes | None = None) -> Axes:
    """Per event, the time from its first byte to its completion (ms), one line per variant."""
    ax = _axes(ax)
    for variant, result in results.items():
        gaps = [1000 * (received.complete_at - received.first_byte_at) for received in result.events]
        ax.plot(range(len(gaps)), gaps, marker="o", label=variant)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("event")
    ax.set_ylabel("complete - first byte (ms)")
    ax.set_title("What reading the clock at the first byte leaves out")
    ax.legend()
    return ax


def where_the_clock_is_read(results: Mapping[str, ChatResult]) -> Figure:
    """Notebook 02's figure: (a) each event's first byte and completion, (b) the gap between them."""
    return _two_panels(partial(event_spans, results), partial(clock_gaps, results))


def memory_growth(points: Sequence[MemoryPoint], ax: Axes | None = None) -> Axes:
    """The server's peak memory per reply against its length, per mode, on log axes."""
    ax = _axes(ax)
    for mode in dict.fromkeys(point.mode for point in points):
        measured = [point for point in points if point.mode == mode]
        # A reply that raised the peak by less than a page reads as 0: draw it at one KiB.
        ax.loglog(
            [point.tokens for point in measured],
            [max(point.peak_bytes, 1024) / 1024 for point in measured],
            marker="o",
            label=mode,
        )
    ax.set_xlabel("tokens in the reply")
    ax.set_ylabel("server peak memory for the reply (KiB)")
    ax.set_title("Tank vs faucet: what a reply costs the server in memory")
    ax.legend()
    return ax


def coalescing(measured: Sequence[Smoothness], ax: Axes | None = None) -> Axes:
    """Tokens the reader has seen against time, one line per coalescing factor."""
    ax = _axes(ax)
    for smoothness in measured:
        offsets = [1000 * offset for offset in smoothness.token_offsets_s]
        ax.step([0.0, *offsets], range(len(offsets) + 1), where="post", label=f"{smoothness.per_event} per event")
    ax.set_xlabel("time since the request was sent (ms)")
    ax.set_ylabel("tokens received")
    ax.set_title("Coalescing: the same tokens in fewer, bigger steps")
    ax.legend()
    return ax


# ── Under load (notebook 08): plots of load runs and of the capacity benchmark ────────────────────────────────────


def capacity_plot(report: Mapping[str, Any], ax: Axes | None = None) -> Figure:
    """p99 lateness against concurrency, one line per server, on a log scale, with the SLO as a dashed line.

    `report` is what `sse_lab.experiments.capacity.benchmark` returns.
    """
    ax = _axes(ax)
    slo = report["settings"]["lateness_slo_ms"]
    for name, server in report["servers"].items():
        steps = sorted(server["steps"], key=int)
        p99s = [server["steps"][step]["load"]["lateness_ms"]["p99"] for step in steps]
        ax.plot([int(step) for step in steps], [max(p99 or 0.0, 0.1) for p99 in p99s], marker="o", label=name)
    ax.axhline(slo, color="grey", linestyle="--", label=f"SLO: p99 lateness {slo:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("p99 lateness (ms, log scale)")
    ax.set_title(f"Capacity at {1000 / report['settings']['token_ms']:g} tokens/s per stream")
    ax.legend(fontsize="small")
    figure = ax.figure
    assert isinstance(figure, Figure)
    return figure


def load_percentiles(
    summaries: Mapping[int, Mapping[str, Any]], metrics: Sequence[str] = ("ttft_ms", "itl_ms", "lateness_ms")
) -> Figure:
    """One panel per metric: p50, p90 and p99 against concurrency, from load reports keyed by concurrency."""
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), layout="constrained")
    levels = sorted(summaries)
    for ax, metric in zip(axes, metrics, strict=True):
        for percentile in ("p50", "p90", "p99"):
            ax.plot(levels, [summaries[level][metric][percentile] for level in levels], marker="o", label=percentile)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(f"{metric.removesuffix('_ms')} (ms)")
        ax.set_title(metric.removesuffix("_ms").upper() if metric != "lateness_ms" else "lateness")
        ax.legend(fontsize="small")
    return figure


def cdf(samples_by_label: Mapping[str, Sequence[float]], xlabel: str, ax: Axes | None = None) -> Axes:
    """The empirical CDF of each sample: the share of values at or below x."""
    ax = _axes(ax)
    for label, samples in samples_by_label.items():
        ordered = sorted(samples)
        ax.step(ordered, [(rank + 1) / len(ordered) for rank in range(len(ordered))], where="post", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of values at or below")
    ax.legend()
    return ax


def request_timeline(records: Sequence[RequestRecord], ax: Axes | None = None, limit: int = 60) -> Axes:
    """One row per request (in the order they were sent), a dot per token arrival, a bar from send to end.

    Times are seconds since the first request was sent; at most `limit` requests, evenly picked.
    """
    ax = _axes(ax)
    ordered = sorted(records, key=lambda record: record.sent_at)
    picked = ordered[:: max(1, len(ordered) // limit)][:limit]
    start = ordered[0].sent_at if ordered else 0.0
    for row, record in enumerate(picked):
        end = (record.ended_at or record.sent_at) - start
        ax.hlines(row, record.sent_at - start, end, color="lightgrey", lw=3, zorder=1)
        ax.scatter([arrival - start for arrival in record.arrivals], [row] * len(record.arrivals), s=2, zorder=2)
    ax.hlines([], 0, 0, color="lightgrey", lw=3, label="request: sent to ended")
    ax.scatter([], [], s=6, label="a token arrives")
    ax.set_xlabel("time since the first request was sent (s)")
    ax.set_ylabel("request (in order sent)")
    ax.legend(loc="lower right", fontsize="small")
    return ax
