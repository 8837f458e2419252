from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import pytest
from matplotlib.collections import PathCollection

from sse_lab import plots
from sse_lab.metrics import ChatResult


def run(mode: str, arrivals: list[float]) -> ChatResult:
    return ChatResult(mode=mode, started_at=0.0, arrivals=arrivals, finished_at=arrivals[-1] + 0.01)


RUNS = {
    "streamed": [run("streamed", [0.1, 0.2, 0.3]), run("streamed", [0.12, 0.22, 0.31])],
    "buffered": [run("buffered", [0.3] * 3), run("buffered", [0.32] * 3)],
}


@pytest.fixture(autouse=True)
def close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def test_ttft_spread_draws_every_run_per_variant() -> None:
    ax = plots.ttft_spread(RUNS)
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["streamed", "buffered"]
    scatters = [points for points in ax.collections if isinstance(points, PathCollection)]
    assert [len(points.get_offsets()) for points in scatters] == [2, 2]


def test_arrival_timeline_steps_up_to_every_token() -> None:
    ax = plots.arrival_timeline({"streamed": RUNS["streamed"][0], "buffered": RUNS["buffered"][0]})
    streamed, buffered = ax.get_lines()
    assert list(streamed.get_ydata()) == [0, 1, 2, 3, 3]
    assert list(buffered.get_xdata())[1:4] == pytest.approx([300, 300, 300])


def test_why_streaming_has_both_panels() -> None:
    figure = plots.why_streaming(RUNS)
    assert [ax.get_title()[:3] for ax in figure.axes] == ["(a)", "(b)"]
