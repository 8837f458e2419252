from __future__ import annotations

from sse_lab import BackgroundServer
from sse_lab.client import fetch_stats, wait_until_idle
from sse_lab.experiments.edge_cases import (
    disconnect_waste,
    dropped_and_resumed,
    heartbeats_through_an_idle_timeout,
    read_then_leave,
)


def test_read_then_leave_reads_that_many_tokens_and_the_stream_is_cancelled(server: BackgroundServer) -> None:
    before = fetch_stats(server.url)["streams_cancelled"]
    assert read_then_leave(server.url, "hi", 3, max_tokens=50, ttft_ms=0, token_ms=20) == 3
    assert wait_until_idle(server.url)["streams_cancelled"] == before + 1


def test_disconnect_waste_compares_cancelling_with_running_on() -> None:
    waste = disconnect_waste(leave_after=2, max_tokens=20, token_ms=5)
    cancelling, running_on = waste["cancel on disconnect"], waste["run to the end"]
    assert cancelling["tokens_wasted"] == 0 and running_on["tokens_generated"] == 20
    assert running_on["tokens_wasted"] >= 20 - 2 - 2


def test_dropped_and_resumed_gives_the_same_text_both_ways() -> None:
    runs = dropped_and_resumed(drop_after=3, retry_ms=10, max_tokens=8, ttft_ms=0, token_ms=0)
    assert runs["dropped and resumed"].text == runs["uninterrupted"].text
    assert [len(result.drops) for result in runs.values()] == [0, 1]


def test_heartbeats_keep_a_stream_alive_through_an_idle_timeout() -> None:
    runs = heartbeats_through_an_idle_timeout(idle_s=0.2, prefill_ms=500, heartbeat_s=0.05, max_tokens=3, token_ms=0)
    silent, kept_alive = runs.values()
    assert silent.tokens == 0 and silent.error is not None
    assert kept_alive.tokens == 3 and kept_alive.error is None
