from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import pytest
from matplotlib.collections import PathCollection

from sse_lab import Event, Received, plots
from sse_lab.experiments.memory import MemoryPoint
from sse_lab.experiments.payload import Smoothness
from sse_lab.metrics import ChatResult, Chunk, Drop


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


def test_ttft_and_arrivals_has_both_panels() -> None:
    figure = plots.ttft_and_arrivals(RUNS)
    assert [ax.get_title()[:3] for ax in figure.axes] == ["(a)", "(b)"]


def test_drop_timeline_marks_each_drop_and_its_resumption() -> None:
    resumed = run("streamed", [0.1, 0.2, 0.6, 0.7])
    resumed.drops = [Drop(at=0.25, last_event_id="1", reason="cut", resumed_at=0.6, attempts=1)]
    ax = plots.drop_timeline({"uninterrupted": run("streamed", [0.1, 0.2, 0.3, 0.4]), "resumed": resumed})
    marks = [line.get_xdata()[0] for line in ax.get_lines()[2:]]
    assert marks == pytest.approx([250, 600])
    assert any("id 1" in text.get_text() for text in ax.texts)


def test_byte_timeline_steps_at_every_read() -> None:
    result = run("streamed", [0.1])
    result.chunks = [Chunk(0.05, 12), Chunk(0.1, 30), Chunk(0.2, 5)]
    (line,) = plots.byte_timeline({"reads": result}).get_lines()
    assert list(line.get_ydata()) == [0, 12, 42, 47]
    assert list(line.get_xdata()) == pytest.approx([0, 50, 100, 200])


def spans_run(gaps: list[float]) -> ChatResult:

    events = [Received(Event(str(index)), 0.1 * index, 0.1 * index + gap) for index, gap in enumerate(gaps)]
    return ChatResult(mode="streamed", started_at=0.0, events=events)


SPANS = {"healthy": spans_run([0.0, 0.0, 0.0]), "slow link": spans_run([0.03, 0.02, 0.03])}


def test_event_spans_marks_the_first_byte_and_the_completion_of_every_event() -> None:
    ax = plots.event_spans(SPANS)
    first_bytes, completions = [points for points in ax.collections if isinstance(points, PathCollection)][2:]
    assert [x for x, _ in first_bytes.get_offsets()] == pytest.approx([0, 100, 200])
    assert [x for x, _ in completions.get_offsets()] == pytest.approx([30, 120, 230])


def test_clock_gaps_plots_each_events_gap_in_ms() -> None:
    ax = plots.clock_gaps(SPANS)
    healthy, slow = ax.get_lines()
    assert list(healthy.get_ydata()) == pytest.approx([0, 0, 0])
    assert list(slow.get_ydata()) == pytest.approx([30, 20, 30])


def test_where_the_clock_is_read_has_both_panels() -> None:
    figure = plots.where_the_clock_is_read(SPANS)
    assert [ax.get_title()[:3] for ax in figure.axes] == ["(a)", "(b)"]


def test_memory_growth_draws_one_line_per_mode_on_log_axes() -> None:
    points = [
        MemoryPoint(mode, tokens, peak, seconds=0.1, body_bytes=0, resting_bytes=0)
        for mode, tokens, peak in [("buffered", 1_000, 90_000), ("buffered", 10_000, 900_000), ("streamed", 1_000, 0)]
    ]
    ax = plots.memory_growth(points)
    buffered, streamed = ax.get_lines()
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert list(buffered.get_xdata()) == [1_000, 10_000]
    assert list(streamed.get_ydata()) == [1]  # below a page reads as 0: drawn at 1 KiB


def test_coalescing_draws_a_step_line_per_factor() -> None:
    def measured(per_event: int) -> Smoothness:
        offsets = tuple(0.01 * per_event * (index + 1) for index in range(8 // per_event))
        return Smoothness(per_event, 10, 8, offsets, (per_event,) * len(offsets), (), 0, 0, 10 * per_event)

    ax = plots.coalescing([measured(1), measured(4)])
    one, four = ax.get_lines()
    assert list(one.get_ydata()) == list(range(9))
    assert list(four.get_ydata()) == list(range(9))
    assert len(set(four.get_xdata())) == 3  # the start, then two bursts of four tokens
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["1 per event", "4 per event"]


# Notebook 05 (backpressure): drawn from the committed benchmark's results, no server needed.


def test_the_backpressure_plots_draw_the_saved_benchmark_with_labelled_axes() -> None:
    from sse_lab.experiments.backpressure import BENCHMARK, load_results

    saved = load_results(BENCHMARK)
    stalls = plots.stalls(saved["stall"])
    side_by_side = plots.policies_side_by_side(saved["paced"])
    crowd = plots.crowd_memory(saved["crowd"])
    for ax in [*stalls.axes, *side_by_side.axes, crowd]:
        assert ax.get_xlabel() and ax.get_ylabel()
    assert all(ax.get_legend() is not None for ax in [*side_by_side.axes, crowd])
    assert len(stalls.legends) == 1  # one legend under the panels, none drawn over a stack
    assert len(crowd.get_lines()) == 4  # one per policy
