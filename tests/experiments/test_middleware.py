from __future__ import annotations

import logging

import httpx
import pytest

from sse_lab import ChatResult, create_app, serve_in_background, stream_chat
from sse_lab.client import wait_until_idle
from sse_lab.experiments.middleware import (
    MIDDLEWARE_VARIANTS,
    CountBytesAsTheyPass,
    LogWholeBody,
    PassThrough,
    lateness,
    middleware_cpu,
    middleware_cpu_table,
    middleware_experiment,
    middleware_table,
)

# 20 tokens 20 ms apart after a 50 ms prefill: the last is due 430 ms after the request.
STREAM = {"max_tokens": 20, "ttft_ms": 50, "token_ms": 20}
LAST_TOKEN_DUE_S = (50 + 19 * 20) / 1000


def one_by_one(result: ChatResult) -> bool:
    """Tokens came in many reads, as they were made (a stalled, busy machine pairs some up)."""
    return len(result.lumps) >= result.tokens / 3


def test_logging_that_reads_the_whole_body_holds_the_headers_and_every_token_until_the_end() -> None:
    with serve_in_background(LogWholeBody(create_app())) as server:
        result = stream_chat(server.url, "hi", **STREAM)
    assert result.tokens == 20 and result.finish_reason == "length"
    assert result.lumps == [20]  # one read: a buffered reply
    assert result.time_to_headers >= LAST_TOKEN_DUE_S and result.ttft >= LAST_TOKEN_DUE_S


def test_logging_that_reads_the_whole_body_turns_the_stream_into_a_reply_with_a_content_length() -> None:
    app = LogWholeBody(create_app())
    with serve_in_background(app) as server:
        response = httpx.get(server.url + "/api/chat/stream", params={"prompt": "hi", **STREAM}, trust_env=False)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert int(response.headers["content-length"]) == len(response.content) == app.logged[0]
    assert "transfer-encoding" not in response.headers


def test_counting_bytes_as_they_pass_delivers_tokens_one_by_one_and_logs_the_body_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = CountBytesAsTheyPass(create_app())
    with caplog.at_level(logging.INFO, "sse_lab.experiments.middleware"), serve_in_background(app) as server:
        result = stream_chat(server.url, "hi", **STREAM)
    assert one_by_one(result) and result.ttft < LAST_TOKEN_DUE_S / 2
    assert app.logged == [sum(chunk.size for chunk in result.chunks)]  # every body byte, counted once
    assert caplog.messages == [f"GET /api/chat/stream: {app.logged[0]} bytes"]


def test_both_logging_middlewares_log_the_same_size_for_the_same_stream() -> None:
    whole, counted = LogWholeBody(create_app()), CountBytesAsTheyPass(create_app())
    for app in (whole, counted):
        with serve_in_background(app) as server:
            stream_chat(server.url, "same answer", **STREAM)
    assert whole.logged == counted.logged and whole.logged[0] > 20 * 40  # about 50 bytes per token event


def test_base_http_middleware_passing_through_holds_no_token() -> None:
    with serve_in_background(PassThrough(create_app())) as server:
        result = stream_chat(server.url, "hi", **STREAM)
    assert result.tokens == 20 and one_by_one(result)
    assert result.ttft < LAST_TOKEN_DUE_S / 2  # the prefill (50 ms) and little else


def test_base_http_middleware_passing_through_still_lets_the_server_notice_a_client_that_leaves() -> None:
    with serve_in_background(PassThrough(create_app())) as server:
        params = {"prompt": "hi", "max_tokens": 200, "ttft_ms": 0, "token_ms": 10}
        with httpx.stream("GET", server.url + "/api/chat/stream", params=params, trust_env=False) as response:
            next(response.iter_bytes())
        stats = wait_until_idle(server.url)
    assert stats["streams_cancelled"] == 1 and stats["tokens_generated"] < 200


def test_middleware_experiment_streams_every_variant_and_only_the_whole_body_logger_lumps() -> None:
    results = middleware_experiment(runs=1, tokens=20, ttft_ms=50, token_ms=10, progress=False)
    assert list(results) == list(MIDDLEWARE_VARIANTS)
    texts = {run.text for runs in results.values() for run in runs}
    assert len(texts) == 1
    lumped = [label for label, runs in results.items() if all(run.lumps == [run.tokens] for run in runs)]
    assert lumped == ["logging: reads the whole body"]
    table = middleware_table(results, ttft_ms=50, token_ms=10)
    assert table.splitlines()[0].split()[:3] == ["variant", "headers", "p50"]
    assert table.splitlines()[3].rstrip().endswith("20.0")  # the whole-body logger: all 20 tokens in one read


def test_lateness_is_arrival_minus_the_models_schedule() -> None:
    result = ChatResult("streamed", started_at=10.0, arrivals=[10.05, 10.07, 10.5])
    assert lateness(result, ttft_ms=50, token_ms=10) == pytest.approx([0.0, 0.01, 0.43])


def test_middleware_cpu_measures_every_variant_against_no_middleware() -> None:
    costs = middleware_cpu(tokens=500, repeats=1, progress=False)
    assert [cost.variant for cost in costs] == list(MIDDLEWARE_VARIANTS)
    none, passed = costs[0], costs[1]
    assert (none.extra_us_per_event, none.times_no_middleware) == (0.0, 1.0)
    assert all(cost.tokens == 500 and cost.us_per_event > 0 for cost in costs)
    assert passed.extra_us_per_event == pytest.approx(passed.us_per_event - none.us_per_event)
    assert passed.times_no_middleware > 1.2  # measured 2 to 3.4: extra trips through the event loop per event
    table = middleware_cpu_table(costs)
    assert len(table.splitlines()) == 1 + len(costs) and table.splitlines()[1].split()[-1] == "1.00"
