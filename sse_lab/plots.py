"""Plots of measured results; each draws on an Axes and returns it.

Pass `ax` to place a plot in a figure of your own; without it each function
makes a new figure. Times are shown in milliseconds after the request was sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .metrics import ChatResult, Spread, ttfts


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


def why_streaming(runs_by_variant: Mapping[str, Sequence[ChatResult]]) -> Figure:
    """Notebook 01's figure: (a) TTFT with spread, (b) the arrival timeline of each variant's first run."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    ttft_spread(runs_by_variant, ax=left)
    arrival_timeline({variant: runs[0] for variant, runs in runs_by_variant.items()}, ax=right)
    left.set_title("(a) " + left.get_title())
    right.set_title("(b) " + right.get_title())
    return figure
