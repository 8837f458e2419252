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
    from .experiments.backpressure import CrowdRun, PacedRun, StallRun
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
