"""Plots of measured results; each draws on an Axes and returns it.

Pass `ax` to place a plot in a figure of your own; without it each function
makes a new figure. Times are shown in milliseconds after the request was sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .metrics import ChatResult, RequestRecord, Spread, ttfts

if TYPE_CHECKING:  # the stack imports no experiment at run time
    from .experiments.backpressure import CrowdRun, PacedRun, StallRun
    from .experiments.browser import ConnectionTimeline, PageRun, Reconnection, TtftPair
    from .experiments.dialects import WireCost
    from .experiments.memory import MemoryPoint
    from .experiments.payload import Smoothness


def _axes(ax: Axes | None) -> Axes:
    return plt.subplots(figsize=(7, 4))[1] if ax is None else ax


def ttft_spread(runs_by_variant: Mapping[str, Sequence[ChatResult]], ax: Axes | None = None) -> Axes:
    """TTFT per variant, one row each, the first on top.

    Every run is a dot; a row's dots are spread over its height, in the order the
    runs were made, so that runs with the same TTFT do not hide one another (a
    strip plot). The black tick is the median, the grey bar spans p10 to p90: the
    10th and 90th percentiles, between which 80% of the runs fall.
    """
    ax = _axes(ax)
    slowest = 0.0
    for row, runs in enumerate(runs_by_variant.values()):
        values = [1000 * ttft for ttft in ttfts(runs)]
        spread = Spread.of(values)
        ax.barh(row, spread.p90 - spread.p10, left=spread.p10, height=_ROW_HEIGHT, color="grey", alpha=0.3)
        ax.scatter(values, _strip(row, len(values)), color=f"C{row}", alpha=0.8, zorder=5)  # over the median
        ax.vlines(spread.median, row - _ROW_HEIGHT / 2, row + _ROW_HEIGHT / 2, color="black", lw=2, zorder=4)
        end = max(spread.high, spread.p90)
        ax.annotate(f"{spread.median:.0f} ms", (end, row), xytext=(8, 0), textcoords="offset points", va="center")
        slowest = max(slowest, end)
    _variant_rows(ax, list(runs_by_variant))
    ax.set_xlim(0, 1.2 * slowest or 1)
    ax.set_xlabel("time to first token (ms)")
    ax.set_title("Time to first token, run by run")
    handles = [
        Line2D([], [], ls="", marker="o", color="grey", label="one run"),
        Line2D([], [], ls="", marker="|", markersize=12, mew=2, color="black", label="median"),
        Patch(color="grey", alpha=0.3, label="p10 to p90"),
    ]
    ax.legend(handles=handles, loc="upper center", ncol=3, fontsize="small")
    return ax


_ROW_HEIGHT = 0.6  # of the 1.0 between two variants' rows


def _strip(row: int, count: int) -> list[float]:
    """Where a row's `count` dots go: evenly over the middle of the row's height."""
    if count == 1:
        return [float(row)]
    return [row - _ROW_HEIGHT / 3 + index * (2 * _ROW_HEIGHT / 3) / (count - 1) for index in range(count)]


def _variant_rows(ax: Axes, variants: Sequence[str]) -> None:
    """One row per variant, the first on top, with a free band above them for the legend."""
    ax.set_yticks(range(len(variants)), variants)
    ax.set_ylim(len(variants) - 0.5, -1.2)


def arrival_timeline(result_by_variant: Mapping[str, ChatResult], ax: Axes | None = None) -> Axes:
    """Tokens received so far against time, one line per variant."""
    ax = _axes(ax)
    for variant, result in result_by_variant.items():
        ax.step(*_arrival_steps(result), where="post", label=variant)
    ax.set_xlabel("time since the request was sent (ms)")
    ax.set_ylabel("tokens received")
    ax.set_title("Token arrival")
    ax.legend()
    return ax


def _arrival_steps(result: ChatResult) -> tuple[list[float], list[int]]:
    """Times (ms after the request) and tokens received by then, from the request to the end of the body."""
    times = [0.0] + [1000 * offset for offset in result.offsets] + [1000 * (result.finished_at - result.started_at)]
    return times, [*range(result.tokens + 1), result.tokens]


def arrival_rows(result_by_variant: Mapping[str, ChatResult], ax: Axes | None = None) -> Axes:
    """Token arrival with one row per variant, the first on top: lines that coincide cannot hide each other.

    Each row's line climbs from no token (the row's bottom) to all of them (its
    top); a lump of tokens read at once is a vertical jump.
    """
    ax = _axes(ax)
    for row, result in enumerate(result_by_variant.values()):
        times, counts = _arrival_steps(result)
        bottom = row + _ROW_HEIGHT / 2
        heights = [bottom - _ROW_HEIGHT * count / max(result.tokens, 1) for count in counts]
        ax.step(times, heights, where="post", color=f"C{row}")
    _variant_rows(ax, list(result_by_variant))
    ax.set_xlabel("time since the request was sent (ms)")
    ax.set_title("Token arrival, one row per variant")
    label = "tokens received: each row climbs from none to all"
    ax.legend(handles=[Line2D([], [], color="black", label=label)], loc="upper center", fontsize="small")
    return ax


def ttft_and_arrivals(runs_by_variant: Mapping[str, Sequence[ChatResult]]) -> Figure:
    """Two panels: (a) TTFT per variant with its spread, (b) the arrival timeline of each variant's first run.

    With two variants (b) draws both lines on one scale; with more, one row per
    variant, the same rows as (a), since lines that coincide would hide each other.
    """
    first_runs = {variant: runs[0] for variant, runs in runs_by_variant.items()}
    if len(first_runs) <= 2:
        return _two_panels(partial(ttft_spread, runs_by_variant), partial(arrival_timeline, first_runs))
    height = 1.2 + 0.5 * len(first_runs)
    return _two_panels(partial(ttft_spread, runs_by_variant), partial(arrival_rows, first_runs), height, sharey=True)


def _two_panels(
    draw_left: Callable[..., Axes], draw_right: Callable[..., Axes], height: float = 4, *, sharey: bool = False
) -> Figure:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, height), layout="constrained", sharey=sharey)
    for letter, draw, ax in (("a", draw_left, left), ("b", draw_right, right)):
        draw(ax=ax)
        ax.set_title(f"({letter}) {ax.get_title()}")
    return figure


def size_and_ttft(
    runs_by_variant: Mapping[str, Sequence[ChatResult]],
    ax: Axes | None = None,
    *,
    first_token_due_ms: float | None = None,
    last_token_due_ms: float | None = None,
) -> Axes:
    """Bytes on the wire against TTFT, one dot per variant (the medians of its runs).

    The trade-off of compression in one picture: down is sooner, left is smaller.
    Variants that land on the same spot share it, their dots drawn one inside the
    other. The dotted and dashed lines mark when the model's first and last tokens
    were due, when given.
    """
    ax = _axes(ax)
    points = {
        variant: (Spread.of([run.wire_bytes for run in runs]).median, Spread.of([1000 * t for t in ttfts(runs)]).median)
        for variant, runs in runs_by_variant.items()
    }
    largest = max(size for size, _ in points.values())
    latest = max([ttft for _, ttft in points.values()] + [last_token_due_ms or 0])
    drawn: list[tuple[float, float]] = []  # the spots of the dots drawn so far
    for color, (variant, (size, ttft)) in enumerate(points.items()):
        inside = sum(abs(x - size) < 0.04 * largest and abs(y - ttft) < 0.04 * latest for x, y in drawn)
        drawn.append((size, ttft))
        dot_size = 200 / (1 + 2 * inside)  # a dot on the spot of another goes inside it
        ax.scatter([size], [ttft], s=dot_size, color=f"C{color}", edgecolors="white", zorder=3 + inside, label=variant)
    for due, label, style in ((first_token_due_ms, "first", ":"), (last_token_due_ms, "last", "--")):
        if due is not None:
            ax.axhline(due, color="grey", ls=style, zorder=1, label=f"the model's {label} token due ({due:.0f} ms)")
    ax.set_xlim(0, 1.1 * largest)
    ax.set_ylim(0, 1.15 * latest)
    ax.set_xlabel("bytes on the wire for the whole answer (after compression)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("Compression: bytes saved against tokens held")
    legend = ax.legend(loc="center", fontsize="small")
    for handle in legend.legend_handles:  # one size for every variant in the legend
        if isinstance(handle, PathCollection):
            handle.set_sizes([60])
    return ax


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
    """The server's peak memory per reply against its length, per mode, as measured.

    The y axis is linear from 0 up to the measurement's resolution (one page:
    a rise below it reads as 0, and is drawn at 0, in the grey band) and
    logarithmic above it; the x axis is logarithmic.
    """
    ax = _axes(ax)
    resolution_kib = points[0].resolution_bytes / 1024
    ax.axhspan(0, resolution_kib, color="grey", alpha=0.2, label=f"less than one page ({resolution_kib:g} KiB) reads 0")
    for mode in dict.fromkeys(point.mode for point in points):
        measured = [point for point in points if point.mode == mode]
        tokens = [point.tokens for point in measured]
        ax.plot(tokens, [point.peak_bytes / 1024 for point in measured], marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=resolution_kib, linscale=0.5)
    highest = max(resolution_kib, *(point.peak_bytes / 1024 for point in points))
    decades = [10.0**power for power in range(1, 1 + math.ceil(math.log10(highest))) if 10**power > resolution_kib]
    ax.set_yticks([0, resolution_kib, *decades], ["0", f"{resolution_kib:g}", *(f"{kib:,.0f}" for kib in decades)])
    ax.set_ylim(0, 2 * highest)
    ax.set_xlabel("tokens in the reply")
    ax.set_ylabel("server peak memory for the reply (KiB)")
    ax.set_title("Tank vs faucet: what a reply costs the server in memory")
    ax.legend(loc="center right")
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


# Notebook 10: a real model


def lateness_by_variant(lateness_ms: Mapping[str, Sequence[float]], ax: Axes | None = None) -> Axes:
    """Each token's lateness (arrival minus due time, ms) against its index, one line per variant."""
    ax = _axes(ax)
    for variant, values in lateness_ms.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=variant)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("token index of the paced stream")
    ax.set_ylabel("lateness (ms, log above 10)")
    ax.set_title("A 20 tokens/s stream served beside a real model")
    ax.legend()
    return ax


def ttft_by_concurrency(runs_by_concurrency: Mapping[int, Sequence[ChatResult]], ax: Axes | None = None) -> Axes:
    """TTFT of every client against the number of clients that asked at once, with the median as a line."""
    ax = _axes(ax)
    levels = sorted(runs_by_concurrency)
    for level in levels:
        values = sorted(1000 * ttft for ttft in ttfts(runs_by_concurrency[level]))
        offsets = [level + 0.06 * (index - (len(values) - 1) / 2) for index in range(len(values))]  # side by side
        ax.scatter(offsets, values, alpha=0.7, color="tab:blue", label="a client" if level == levels[0] else None)
    medians = [Spread.of([1000 * ttft for ttft in ttfts(runs_by_concurrency[level])]).median for level in levels]
    ax.plot(levels, medians, color="black", label="median")
    ax.set_xticks(levels)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("clients asking at once")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("One model serves one generation at a time")
    ax.legend()
    return ax


def real_vs_sim_ttft(
    real: Mapping[int, Sequence[ChatResult]], simulated: Mapping[int, ChatResult], ax: Axes | None = None
) -> Axes:
    """TTFT against prompt length (words): the real model's runs and the sim with the fitted profile."""
    ax = _axes(ax)
    lengths = sorted(real)
    real_points = [(words, 1000 * ttft) for words in lengths for ttft in ttfts(real[words])]
    ax.scatter(*zip(*real_points, strict=True), label="real model (each run)", color="tab:blue")
    ax.plot(
        lengths,
        [1000 * (simulated[words].ttft or 0) for words in lengths],
        "s--",
        color="tab:orange",
        label="sim, fitted profile",
    )
    ax.set_ylim(bottom=0)
    ax.set_xlabel("prompt length (words)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("Prefill grows with the prompt")
    ax.legend()
    return ax


# ── Notebook 07: LLM API dialects ─────────────────────────────────────────────


def wire_bytes_per_token(costs: Mapping[str, WireCost], ax: Axes | None = None) -> Axes:
    """Bytes on the wire per token for each dialect, the tokens' own text shown as the bar's darker base."""
    ax = _axes(ax)
    names = list(costs)
    ax.bar(names, [cost.bytes_per_token for cost in costs.values()], color="tab:blue", alpha=0.5, label="framing")
    ax.bar(names, [cost.token_text_bytes for cost in costs.values()], color="tab:blue", label="token text")
    for position, cost in enumerate(costs.values()):
        ax.annotate(f"{cost.bytes_per_token:.0f} B", (position, cost.bytes_per_token), ha="center", va="bottom")
    ax.set_ylabel("body bytes on the wire per token (B)")
    ax.set_title("What one more token costs on the wire")
    ax.margins(y=0.15)
    ax.legend(loc="upper left")
    return ax


def cpu_per_token(cpu_s: Mapping[str, Sequence[float]], ax: Axes | None = None) -> Axes:
    """Server CPU per token for each dialect: every run a dot, the median a bar."""
    ax = _axes(ax)
    for position, (name, values) in enumerate(cpu_s.items()):
        micros = [1e6 * value for value in values]
        ax.scatter([position] * len(micros), micros, alpha=0.6, zorder=3, label=f"{name} (n={len(micros)})")
        ax.hlines(Spread.of(micros).median, position - 0.25, position + 0.25, color="black", zorder=4)
    ax.set_xticks(range(len(cpu_s)), list(cpu_s))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("server CPU per token (µs)")
    ax.set_title("What one more token costs the server")
    ax.legend(loc="lower right")
    return ax


def dialect_costs(costs: Mapping[str, WireCost], cpu_s: Mapping[str, Sequence[float]]) -> Figure:
    """Two panels: (a) bytes on the wire per token, (b) server CPU per token, per dialect."""
    return _two_panels(partial(wire_bytes_per_token, costs), partial(cpu_per_token, cpu_s))


# Notebook 09: the transports side by side.


def transport_bars(panels: Mapping[str, Mapping[str, float]], units: Mapping[str, str]) -> Figure:
    """One bar chart per measure (`panels`: title -> value per transport), y axis in `units[title]`.

    Each transport keeps its colour across the panels; the legend is in the first.
    """
    transports = list(dict.fromkeys(name for values in panels.values() for name in values))
    colours = {name: f"C{index}" for index, name in enumerate(transports)}
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels.items(), strict=True):
        names = list(values)
        ax.bar(range(len(names)), list(values.values()), color=[colours[name] for name in names], label=names)
        ax.set_xticks(range(len(names)), [str(transports.index(name) + 1) for name in names])
        ax.set_title(title)
        ax.set_xlabel("transport")
        ax.set_ylabel(units[title])
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[name]) for name in transports]
    labels = [f"{index + 1}: {name}" for index, name in enumerate(transports)]
    rows = -(-len(transports) // 3)
    figure.legend(handles, labels, loc="lower center", ncols=min(3, len(transports)), frameon=False)
    figure.tight_layout(rect=(0, 0.07 * rows + 0.02, 1, 1))
    return figure


# In the browser (notebook 06)


def panel_growth(run: PageRun, ax: Axes | None = None) -> Axes:
    """Characters shown in the streamed and the buffered panel over time, as sampled from the page."""
    ax = _axes(ax)
    start = run.growth[0][0]
    at = [sample[0] - start for sample in run.growth]
    ax.step(at, [sample[1] for sample in run.growth], where="post", label="streamed (EventSource)")
    ax.step(at, [sample[2] for sample in run.growth], where="post", label="buffered (fetch)")
    ax.set_xlabel("ms on the page's clock")
    ax.set_ylabel("characters on screen")
    ax.set_title("What the room can read, moment by moment")
    ax.legend()
    return ax


def browser_vs_client(pairs: Sequence[TtftPair], ax: Axes | None = None) -> Axes:
    """Per run: TTFT in the browser, its first paint, and the Python client's TTFT of the same stream."""
    ax = _axes(ax)
    runs = range(1, len(pairs) + 1)
    ax.plot(runs, [1000 * pair.client_ttft for pair in pairs], "o-", label="Python client TTFT")
    ax.plot(runs, [1000 * pair.browser_ttft for pair in pairs], "s-", label="browser TTFT (EventSource)")
    ax.plot(runs, [1000 * pair.browser_first_paint for pair in pairs], "^--", label="browser: first paint")
    ax.set_xticks(list(runs))
    ax.set_xlabel("run")
    ax.set_ylabel("ms after the request")
    ax.set_ylim(bottom=0)
    ax.legend()
    return ax


def reconnection_gaps(runs: Mapping[int, Reconnection], ax: Axes | None = None) -> Axes:
    """Each drop's gap against the `retry` the server announced; the line is gap = retry."""
    ax = _axes(ax)
    for retry_ms, run in runs.items():
        ax.scatter(
            [retry_ms] * len(run.gaps_ms), run.gaps_ms, zorder=3, label=f"retry: {retry_ms} ({len(run.gaps_ms)} drops)"
        )
    top = max(runs) * 1.15
    ax.plot([0, top], [0, top], color="grey", lw=1, label="gap = retry")
    ax.set_xlabel("retry announced by the server (ms)")
    ax.set_ylabel("gap in the text after a drop (ms)")
    ax.legend()
    return ax


def connection_timeline(timeline: ConnectionTimeline, ax: Axes | None = None) -> Axes:
    """One bar per EventSource: waiting (created, no token yet) in grey, then receiving until its end."""
    ax = _axes(ax)
    labels = {"requested, no token yet": "lightgrey", "receiving tokens": "tab:blue"}
    for stream in timeline.streams:
        spans = {}
        if stream.first_token_ms is not None:
            spans["requested, no token yet"] = (stream.created_ms, stream.first_token_ms)
            if stream.end_ms is not None:
                spans["receiving tokens"] = (stream.first_token_ms, stream.end_ms)
        for label, (start, end) in spans.items():
            ax.barh(stream.index, end - start, left=start, height=0.6, color=labels[label], label=label)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))  # one legend entry per kind of span
    ax.legend(unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.set_yticks([stream.index for stream in timeline.streams], [f"#{s.index + 1}" for s in timeline.streams])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first EventSource was created")
    ax.set_ylabel("EventSource")
    ax.set_title(f"{len(timeline.streams)} streams from one page over {timeline.protocol}")
    return ax


# ── Backpressure (notebook 05) ───────────────────────────────────────────────

_KIB = 1024


def buffer_stack(run: StallRun, ax: Axes | None = None) -> Axes:
    """Where a stalled stream's bytes are over time, stacked: read, then each buffer; the bytes written on top."""
    ax = _axes(ax)
    times = [sample.at for sample in run.samples]
    layers = {
        "read by the client": [sample.read for sample in run.samples],
        "client kernel receive queue (SIOCINQ)": [sample.client_inq for sample in run.samples],
        "server kernel send queue (SIOCOUTQ)": [sample.server_outq for sample in run.samples],
        "uvicorn/asyncio transport buffer": [sample.transport for sample in run.samples],
        "app queue (producer)": [sample.app_queue for sample in run.samples],
    }
    ax.stackplot(times, *[[value / _KIB for value in layer] for layer in layers.values()], labels=list(layers))
    ax.plot(
        times, [sample.written / _KIB for sample in run.samples], color="black", ls="--", label="written by the app"
    )
    ax.set_xlabel("time since the request (s)")
    ax.set_ylabel("bytes (KiB)")
    ax.set_title(f"A stalled reader, {run.label}: {run.last.tokens_produced:,} tokens in flight")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the stack, which fills the axes
    return ax


def stalls(runs: Sequence[StallRun]) -> Figure:
    """One `buffer_stack` panel per stalled run, side by side, each with its own scale."""
    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), layout="constrained", squeeze=False)
    for letter, run, ax in zip("abcdef", runs, axes[0], strict=False):
        buffer_stack(run, ax)
        ax.set_title(f"({letter}) {run.label}\n{run.last.tokens_produced:,} tokens in flight", fontsize="medium")
        handles, labels = ax.get_legend_handles_labels()
        ax.get_legend().remove()
    figure.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small")  # one legend for all
    return figure


def policies_side_by_side(runs: Mapping[str, PacedRun]) -> Figure:
    """A reader of k bytes/s under each policy: (a) the app's queue, (b) the producer against the model's schedule,
    (c) each token's lateness at the reader, (d) events and tokens the reader got."""
    figure, axes = plt.subplots(2, 2, figsize=(13, 8), layout="constrained")
    (queue_ax, producer_ax), (late_ax, events_ax) = axes
    for index, (policy, run) in enumerate(runs.items()):
        color = f"C{index}"
        times = [sample.at for sample in run.samples]
        queue_ax.plot(times, [sample.queued_bytes / _KIB for sample in run.samples], color=color, label=policy)
        producer_ax.plot(times, [sample.tokens_produced for sample in run.samples], color=color, label=policy)
        late_ax.plot(*zip(*run.lateness, strict=True), color=color, label=policy)
        events_ax.plot(times, [sample.events_read for sample in run.samples], color=color, label=f"{policy}: events")
        events_ax.plot(
            times, [sample.tokens_read for sample in run.samples], color=color, ls=":", label=f"{policy}: tokens"
        )
    first = next(iter(runs.values()))
    times = [sample.at for sample in first.samples]
    producer_ax.plot(times, [sample.tokens_due for sample in first.samples], color="black", ls="--", label="schedule")
    rate = f"{first.rate_bytes_s / 1000:g} kB/s"
    for letter, ax, title, ylabel, xlabel in (
        ("a", queue_ax, "the app's queue", "queued (KiB)", "time since the request (s)"),
        (
            "b",
            producer_ax,
            "the producer against the model's schedule",
            "tokens produced",
            "time since the request (s)",
        ),
        ("c", late_ax, f"lateness at a {rate} reader", "arrival - due (s)", "token index"),
        ("d", events_ax, "what the reader got", "events (solid), tokens (dotted)", "time since the request (s)"),
    ):
        ax.set_title(f"({letter}) {title}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small", ncols=2 if ax is events_ax else 1)
    return figure


def crowd_memory(runs: Mapping[str, CrowdRun], ax: Axes | None = None) -> Axes:
    """Server memory (RSS growth over resting) over time, per policy, with stalled readers."""
    ax = _axes(ax)
    for policy, run in runs.items():
        times = [sample.at for sample in run.samples]
        label = f"{policy} (peak +{run.peak_growth / 2**20:.1f} MiB)"
        ax.plot(times, [sample.rss_growth / 2**20 for sample in run.samples], marker=".", label=label)
    readers = next(iter(runs.values())).readers
    ax.set_xlabel("time since the readers connected (s)")
    ax.set_ylabel("server RSS growth (MiB)")
    ax.set_title(f"{readers} stalled readers: what each policy makes the server hold")
    ax.set_ylim(bottom=0)
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
