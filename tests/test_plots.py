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


def test_ttft_spread_draws_every_run_per_variant_in_a_row_of_its_own() -> None:
    ax = plots.ttft_spread(RUNS)
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["streamed", "buffered"]
    scatters = [points for points in ax.collections if isinstance(points, PathCollection)]
    assert [len(points.get_offsets()) for points in scatters] == [2, 2]
    assert [round(y) for points in scatters for _, y in points.get_offsets()] == [0, 0, 1, 1]


def test_ttft_spread_strips_runs_with_the_same_ttft_apart() -> None:
    same = [run("streamed", [0.2]) for _ in range(5)]
    (dots,) = [points for points in plots.ttft_spread({"same": same}).collections if isinstance(points, PathCollection)]
    heights = [y for _, y in dots.get_offsets()]
    assert len(set(heights)) == 5  # five runs at one TTFT: five dots, none hidden under another


def test_ttft_spread_has_a_legend_saying_what_the_bar_and_the_tick_are() -> None:
    legend = plots.ttft_spread(RUNS).get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["one run", "median", "p10 to p90"]


def test_arrival_timeline_steps_up_to_every_token() -> None:
    ax = plots.arrival_timeline({"streamed": RUNS["streamed"][0], "buffered": RUNS["buffered"][0]})
    streamed, buffered = ax.get_lines()
    assert list(streamed.get_ydata()) == [0, 1, 2, 3, 3]
    assert list(buffered.get_xdata())[1:4] == pytest.approx([300, 300, 300])


def test_ttft_and_arrivals_has_both_panels() -> None:
    figure = plots.ttft_and_arrivals(RUNS)
    assert [ax.get_title()[:3] for ax in figure.axes] == ["(a)", "(b)"]
    assert [line.get_label() for line in figure.axes[1].get_lines()] == ["streamed", "buffered"]  # on one scale


def test_ttft_and_arrivals_gives_each_of_many_variants_a_row_so_coinciding_lines_stay_visible() -> None:
    many = {f"variant {index}": RUNS["streamed"] for index in range(4)}
    figure = plots.ttft_and_arrivals(many)
    rows = figure.axes[1].get_lines()
    assert len(rows) == 4
    bottoms = [line.get_ydata()[0] for line in rows]
    tops = [line.get_ydata()[-1] for line in rows]
    assert bottoms == sorted(bottoms) and len(set(bottoms)) == 4  # the same arrivals, four separate lines
    assert all(bottom - top == pytest.approx(0.6) for bottom, top in zip(bottoms, tops, strict=True))


def test_size_and_ttft_puts_each_variant_at_its_bytes_and_ttft() -> None:
    small = run("buffered", [0.6] * 3)
    small.wire_bytes = 1_000
    large = run("streamed", [0.1, 0.2, 0.3])
    large.wire_bytes = 6_000
    same_spot = run("streamed", [0.1, 0.2, 0.3])
    same_spot.wire_bytes = 6_000
    runs = {"gzip": [small], "identity": [large], "twin": [same_spot]}
    ax = plots.size_and_ttft(runs, first_token_due_ms=100, last_token_due_ms=600)
    dots = [points for points in ax.collections if isinstance(points, PathCollection)]
    assert [tuple(points.get_offsets()[0]) for points in dots] == [(1_000, 600), (6_000, 100), (6_000, 100)]
    assert dots[2].get_sizes()[0] < dots[1].get_sizes()[0]  # on the same spot: drawn inside, not hidden
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[:3] == ["gzip", "identity", "twin"] and "first token due (100 ms)" in labels[3]


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
    assert ax.get_xscale() == "log" and ax.get_yscale() == "symlog"
    assert list(buffered.get_xdata()) == [1_000, 10_000] and list(streamed.get_xdata()) == [1_000]


def test_memory_growth_draws_what_was_measured_not_a_floor() -> None:
    points = [MemoryPoint("streamed", 1_000, 0, 0.1, 0, 0, resolution_bytes=4096)]
    ax = plots.memory_growth(points)
    (streamed,) = ax.get_lines()
    assert list(streamed.get_ydata()) == [0]  # measured 0 (less than a page), drawn at 0
    assert ax.get_ylim()[0] == 0
    assert "one page (4 KiB)" in ax.get_legend().get_texts()[0].get_text()


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


# ── Notebook 07: LLM API dialects ─────────────────────────────────────────────


def test_dialect_costs_draws_a_bar_per_dialect_and_a_dot_per_cpu_run() -> None:
    from sse_lab.experiments.dialects import WireCost

    costs = {api: WireCost(api, per_token, 100.0, 6.0) for api, per_token in (("kit", 60.0), ("openai-chat", 230.0))}
    figure = plots.dialect_costs(costs, {"kit": [2e-5, 2.1e-5], "openai-chat": [2.2e-5, 2.3e-5]})
    wire, cpu = figure.axes
    assert [round(bar.get_height()) for bar in wire.patches] == [60, 230, 6, 6]
    assert (
        sum(len(collection.get_offsets()) for collection in cpu.collections if isinstance(collection, PathCollection))
        == 4
    )
    assert "(B)" in wire.get_ylabel() and "(µs)" in cpu.get_ylabel()
