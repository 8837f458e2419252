from __future__ import annotations

from typing import Any

import pytest

from sse_lab.metrics import (
    ChatResult,
    RequestRecord,
    Spread,
    is_good,
    lateness,
    load_summary,
    percentiles,
    summary_table,
    ttfts,
)


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


# ── Under load: the metrics of many requests (sse_lab.load), on hand-made records ──────────────────────────────────


def record(arrivals: list[float], sent_at: float = 0.0, outcome: str = "done", **fields: Any) -> RequestRecord:
    fields.setdefault("ended_at", max([sent_at, *arrivals]))
    return RequestRecord(scheduled_at=sent_at, sent_at=sent_at, arrivals=arrivals, outcome=outcome, **fields)


def test_tokens_that_one_read_completed_share_its_time_and_gaps_of_zero() -> None:
    lumped = record([0.5, 0.5, 0.5, 0.6, 0.8])  # three tokens came in one read
    assert lumped.itl == pytest.approx([0.0, 0.0, 0.1, 0.2])
    assert lumped.ttft == pytest.approx(0.5)
    assert lumped.e2e == pytest.approx(0.8)
    assert lumped.tpot == pytest.approx((0.8 - 0.5) / 4)  # (E2E - TTFT) / (N - 1): lumps do not change it
    summary = load_summary([lumped])
    assert summary["itl_ms"]["p50"] == pytest.approx(50.0)  # gaps 0, 0, 100, 200 ms
    assert summary["itl_ms"]["max"] == pytest.approx(200.0)


def test_percentiles_interpolate_like_numpy() -> None:
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert percentiles(values) == {"p50": 3.5, "p90": 6.9, "p99": 8.79, "max": 9.0, "mean": 3.875}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}


def test_errors_and_refusals_are_counted_by_kind_and_left_out_of_the_latencies() -> None:
    records = [
        record([1.0, 1.1, 1.2], sent_at=0.0),
        record([], sent_at=0.1, outcome="http_429", status=429, ended_at=0.2),
        record([], sent_at=0.2, outcome="http_429", status=429, ended_at=0.3),
        record([0.5, 0.6], sent_at=0.3, outcome="error_model_error", status=200, ended_at=0.7),
        record([], sent_at=0.4, outcome="connect_failed", ended_at=0.4),
        record([2.0, 3.0], sent_at=0.5, outcome="cut_short", status=200, ended_at=3.0),
    ]
    summary = load_summary(records)
    assert summary["requests"] == 6
    assert summary["errors"] == {"connect_failed": 1, "cut_short": 1, "error_model_error": 1, "http_429": 2}
    assert summary["ttft_ms"]["max"] == pytest.approx(1000.0)  # only the request that was done
    assert summary["duration_s"] == pytest.approx(3.0)  # first sent at 0, last ended at 3
    assert summary["request_rate"] == pytest.approx(1 / 3)
    assert summary["output_tokens_per_s"] == pytest.approx(3 / 3)  # the done request's tokens only, as vLLM


def test_goodput_counts_done_requests_within_every_slo_per_second() -> None:
    fast = record([0.2, 0.25, 0.3], sent_at=0.0)  # TTFT 200 ms, TPOT 50 ms
    slow_start = record([0.9, 0.95], sent_at=0.0)  # TTFT 900 ms
    slow_tokens = record([0.1, 0.5], sent_at=0.0)  # TPOT 400 ms
    one_token = record([0.3], sent_at=0.0)  # a TPOT of 0, as vLLM counts it
    refused = record([], outcome="http_429", ended_at=1.0)
    slo = {"ttft": 500.0, "tpot": 60.0}
    assert [is_good(r, slo) for r in (fast, slow_start, slow_tokens, one_token, refused)] == [
        True, False, False, True, False,
    ]  # fmt: skip
    summary = load_summary([fast, slow_start, slow_tokens, one_token, refused], slo_ms=slo)
    assert summary["goodput"] == pytest.approx(2 / 1.0)  # 2 good requests in 1 s
    assert load_summary([fast])["goodput"] is None  # no SLO given


def test_lateness_is_measured_against_the_absolute_schedule_from_the_send() -> None:
    on_time = record([10.1, 10.15, 10.2], sent_at=10.0)
    assert lateness(on_time, [100.0, 150.0, 200.0]) == pytest.approx([0.0, 0.0, 0.0])
    drifting = record([10.12, 10.2, 10.3], sent_at=10.0)  # 20, 50, 100 ms late
    assert lateness(drifting, [100.0, 150.0, 200.0]) == pytest.approx([0.02, 0.05, 0.1])
    summary = load_summary([drifting], schedule=lambda r, n: [100.0 + 50.0 * i for i in range(n)])
    assert summary["lateness_ms"]["max"] == pytest.approx(100.0)
    assert load_summary([drifting])["lateness_ms"] is None  # no known schedule


def test_warm_up_requests_are_not_measured() -> None:
    warm = record([5.0], sent_at=0.0, counted=False, ended_at=5.0)
    measured = record([1.1, 1.2], sent_at=1.0, ended_at=1.2)
    summary = load_summary([warm, measured])
    assert summary["requests"] == 1 and summary["duration_s"] == pytest.approx(0.2)
    assert summary["ttft_ms"]["max"] == pytest.approx(100.0)


def test_send_lag_is_sent_minus_scheduled() -> None:
    late = RequestRecord(scheduled_at=1.0, sent_at=1.025)
    assert late.send_lag == pytest.approx(0.025)
