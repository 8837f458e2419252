"""Plots of measured results; each draws on an Axes and returns it.

Pass `ax` to place a plot in a figure of your own; without it each function
makes a new figure. Times are shown in milliseconds after the request was sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import accumulate
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .metrics import ChatResult, Spread, ttfts

if TYPE_CHECKING:  # the stack imports no experiment at run time
    from .experiments.dialects import WireCost
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
