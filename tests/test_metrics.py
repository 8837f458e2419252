from __future__ import annotations

import pytest

from sse_lab.metrics import ChatResult, Spread, summary_table, ttfts


def result(arrivals: list[float], started_at: float = 10.0) -> ChatResult:
    return ChatResult(mode="streamed", started_at=started_at, headers_at=started_at + 0.01, arrivals=arrivals)


def test_latency_metrics_follow_the_benchmark_definitions() -> None:
    run = result([10.5, 10.6, 10.8, 11.1])
    assert run.ttft == pytest.approx(0.5)
    assert run.itl == pytest.approx([0.1, 0.2, 0.3])
    assert run.e2e == pytest.approx(1.1)
    assert run.tpot == pytest.approx((run.e2e - run.ttft) / (run.tokens - 1))
    assert run.tpot == pytest.approx(sum(run.itl) / len(run.itl))
    assert run.offsets == pytest.approx([0.5, 0.6, 0.8, 1.1])
    assert run.time_to_headers == pytest.approx(0.01)


def test_metrics_without_enough_tokens_are_none() -> None:
    assert (result([]).ttft, result([]).e2e, result([]).tpot, result([]).itl) == (None, None, None, [])
    assert result([10.2]).tpot is None


def test_spread_of_a_sample() -> None:
    spread = Spread.of([float(value) for value in range(1, 12)])
    assert (spread.n, spread.median, spread.p10, spread.p90, spread.low, spread.high) == (11, 6, 2, 10, 1, 11)
    assert Spread.of([3.0]).p90 == 3.0
    with pytest.raises(ValueError):
        Spread.of([])


def test_summary_table_has_a_row_per_variant_in_ms() -> None:
    table = summary_table({"streamed": [result([10.1, 10.2])], "buffered": [result([11.0, 11.0])]})
    header, streamed, buffered = table.splitlines()
    assert header.split()[:2] == ["variant", "runs"]
    assert streamed.split() == ["streamed", "1", "10", "ms", "100", "ms", "100", "ms", "200", "ms", "200", "ms"]
    assert buffered.split()[:5] == ["buffered", "1", "10", "ms", "1000"]


def test_summary_table_fits_long_variant_names() -> None:
    name = "nginx + buffering off + ignore X-Accel + gzip"
    header, row = summary_table({name: [result([10.1])]}).splitlines()
    assert row.startswith(name + "  ") and row[len(name) :].split()[:2] == ["1", "10"]
    assert header.index("runs") + len("runs") == row.index("1 ") + 1  # columns line up


def test_ttfts_skips_runs_without_tokens() -> None:
    assert ttfts([result([]), result([10.25])]) == [0.25]


def test_lumps_count_the_tokens_that_arrived_together() -> None:
    assert result([10.1, 10.2, 10.2, 10.2, 10.5]).lumps == [1, 3, 1]
    assert result([]).lumps == []
