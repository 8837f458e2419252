from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sse_lab.experiments.backpressure import (
    BENCHMARK,
    load_results,
    many_stalled_readers,
    paced_reader,
    paused_reader_survives,
    send_timeout,
    stall,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the buffers are read with Linux's ioctls and /proc")


def test_a_stalled_pull_stream_holds_its_tokens_in_the_buffers_and_nowhere_else() -> None:
    run = stall(stall_s=5, rcvbuf=4_096, sndbuf=4_096, max_tokens=50_000)
    last = run.last
    assert last.app_queue == 0 and last.writing_paused
    assert abs(last.written - last.read - last.in_buffers) < 0.05 * last.written  # every byte written is somewhere
    assert last.tokens_produced * run.event_bytes == pytest.approx(last.written, rel=0.01)
    assert last.tokens_produced < 50_000 / 10  # the model stopped: pull waits for the socket


def test_under_buffer_the_app_queue_takes_what_the_socket_does_not() -> None:
    last = stall(stall_s=5, rcvbuf=4_096, sndbuf=4_096, max_tokens=5_000, policy="buffer").last
    assert last.tokens_produced == 5_000  # the producer never waited
    assert last.app_queue > 0.5 * last.written


def test_a_slow_reader_costs_each_policy_what_it_claims() -> None:
    runs = paced_reader(rate_bytes_s=15_000, max_tokens=800, token_ms=1.0, progress=False)
    assert all(run.text_intact and run.tokens_read == 800 for run in runs.values())
    assert runs["buffer"].peak_queued_bytes > 5 * max(runs["pause"].peak_queued_bytes, 1)
    assert runs["pause"].peak_queued_bytes <= 16 * 100  # queue_max events of about 65 bytes
    assert runs["pause"].producer_lag > 100 and runs["pull"].producer_lag > 100  # they waited for the reader
    # What remains is a busy CPU: 5-43 tokens behind on a quiet machine, 133 once beside the whole suite (pause: ~400)
    assert runs["coalesce"].producer_lag < runs["pause"].producer_lag / 2
    assert runs["coalesce"].events_read < runs["pause"].events_read


def test_many_stalled_readers_grow_only_the_buffer_policys_queue() -> None:
    runs = many_stalled_readers(["pause", "buffer"], readers=5, max_tokens=3_000, progress=False)
    pause, buffer = runs["pause"], runs["buffer"]
    assert max(sample.queued_events for sample in pause.samples) <= 5 * (16 + 1)
    assert buffer.samples[-1].tokens_produced == 5 * 3_000
    assert max(sample.queued_bytes for sample in buffer.samples) > 100 * max(s.queued_bytes for s in pause.samples)


def test_send_timeout_cuts_a_dead_reader_and_spares_a_paused_one() -> None:
    counters = send_timeout(0.3)
    assert counters["streams_send_timeout"] == 1 and counters["second_client_tokens"] == 5
    assert paused_reader_survives(2.0, 0.3)
    assert not paused_reader_survives(0.1, 0.6)


def test_the_committed_benchmark_loads() -> None:
    results = load_results(BENCHMARK)
    assert results["command"].startswith("python -m sse_lab.experiments.backpressure")
    assert set(results["crowd"]) == set(results["paced"]) == {"pull", "buffer", "pause", "coalesce"}
    assert Path(BENCHMARK).stat().st_size < 500_000
