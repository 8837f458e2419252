from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

from sse_lab import BackgroundServer, Settings, create_app, serve_in_background
from sse_lab.experiments.capacity import server_process
from sse_lab.instruments.wire import capture_chat
from sse_lab.load import (
    DIALECTS,
    LoadError,
    LoadSpec,
    WorkerReport,
    _new_loop,
    _run_worker,
    _StreamReader,
    default_workers,
    gamma_arrivals,
    load,
    plan,
    report_shape,
    run_load,
    summarize,
)
from sse_lab.metrics import PERCENTILES, RequestRecord
from sse_lab.server import token_event
from sse_lab.sse import Event, decode

URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def roomy_server() -> Iterator[BackgroundServer]:
    """The kit's server with room for every stream the tests open at once."""
    with serve_in_background(create_app(Settings(max_concurrent_streams=500))) as running:
        yield running


def shape_of(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: shape_of(item) for key, item in value.items()}
    return type(value).__name__


def assert_report_shape(summary: dict[str, Any]) -> None:
    """Exactly the keys other tools read, with P = {p50, p90, p99, max, mean}."""
    assert list(summary) == list(report_shape())
    assert isinstance(summary["requests"], int)
    assert all(isinstance(count, int) for count in summary["errors"].values())
    for key in ("duration_s", "request_rate", "output_tokens_per_s"):
        assert isinstance(summary[key], float)
    assert summary["goodput"] is None or isinstance(summary["goodput"], float)
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "lateness_ms"):
        assert summary[key] is None or list(summary[key]) == list(PERCENTILES), key
    assert list(summary["client"]) == ["workers", "cpu_percent", "send_lag_ms"]
    assert len(summary["client"]["cpu_percent"]) == summary["client"]["workers"]
    assert list(summary["client"]["send_lag_ms"]) == list(PERCENTILES)


def test_a_closed_loop_over_loopback_measures_every_token(roomy_server: BackgroundServer) -> None:
    result = load(
        roomy_server.url, concurrency=8, requests=16, ramp_s=0.2, max_tokens=5, ttft_ms=20, token_ms=10,
        slo_ms={"ttft": 5_000, "tpot": 1_000}, progress=False,
    )  # fmt: skip
    summary = result.summary
    assert_report_shape(summary)
    assert summary["requests"] == 16 and summary["errors"] == {}
    assert all(len(record.arrivals) == 5 and record.outcome == "done" for record in result.records)
    assert summary["output_tokens_per_s"] == pytest.approx(16 * 5 / summary["duration_s"], rel=1e-4)
    assert summary["goodput"] == pytest.approx(summary["request_rate"])  # generous SLOs: every request is good
    # The model's own schedule: the first token 20 ms after the send, never earlier.
    assert summary["ttft_ms"]["p50"] >= 20 and summary["lateness_ms"]["p50"] >= 0
    assert summary["tpot_ms"]["p50"] == pytest.approx(10, abs=8)
    assert summary["client"]["workers"] == 1


def test_an_open_loop_sends_at_the_planned_rate(roomy_server: BackgroundServer) -> None:
    result = load(roomy_server.url, rate=100, requests=30, max_tokens=2, ttft_ms=0, token_ms=5, progress=False)
    sent = sorted(record.sent_at for record in result.records)
    assert result.summary["requests"] == 30 and result.summary["errors"] == {}
    assert 0.1 < sent[-1] - sent[0] < 1.5  # 29 gaps of 10 ms on average
    assert result.summary["client"]["send_lag_ms"]["p50"] < 50


def test_the_clock_can_start_at_a_given_moment(roomy_server: BackgroundServer) -> None:
    """So that another process (the benchmark's independent reader) can start its ramp with the load's."""
    start_at = time.perf_counter() + 1.0  # later than the workers take to be ready
    spec = LoadSpec(roomy_server.url, concurrency=4, requests=4, ramp_s=0.2, max_tokens=1, ttft_ms=0, token_ms=0)
    records = run_load(spec, progress=False, start_at=start_at).records
    assert min(record.scheduled_at for record in records) == pytest.approx(start_at, abs=1e-6)
    assert all(record.sent_at >= start_at for record in records)


def test_refusals_are_counted_as_http_429() -> None:
    with serve_in_background(create_app(Settings(max_concurrent_streams=2))) as running:
        result = load(running.url, concurrency=6, requests=6, max_tokens=3, ttft_ms=300, token_ms=0, progress=False)
    errors = result.summary["errors"]
    assert errors.get("http_429", 0) >= 3 and result.summary["requests"] == 6
    assert all(record.status == 429 for record in result.records if record.outcome == "http_429")


def test_a_server_that_is_not_there_is_a_connect_failure() -> None:
    with serve_in_background() as gone:
        url = gone.url
    result = load(url, concurrency=2, requests=2, max_tokens=1, ttft_ms=0, token_ms=0, progress=False)
    assert result.summary["errors"] == {"connect_failed": 2}
    assert result.summary["ttft_ms"]["p50"] is None


def test_a_server_that_resets_every_connection_at_once_is_counted_not_a_crash() -> None:
    """As a server out of descriptors does (libuv closes what it cannot keep): regression, the worker crashed."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def reset_each() -> None:
            with contextlib.suppress(OSError):  # the listener closed: the test is over
                while True:
                    connection, _ = listener.accept()
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    connection.close()  # with linger 0: a reset

        resetter = threading.Thread(target=reset_each, daemon=True)
        resetter.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result = load(url, concurrency=20, requests=200, max_tokens=3, ttft_ms=0, token_ms=0, progress=False)
        listener.shutdown(socket.SHUT_RDWR)
    resetter.join(5)
    errors = result.summary["errors"]
    assert sum(errors.values()) == 200 and set(errors) <= {"connect_failed", "cut_short"}


def read_response(pieces: list[bytes]) -> tuple[RequestRecord, list[Event]]:
    """Feed a response to the load generator's reader, one `data_received` per piece: its record and its events."""

    async def read() -> tuple[RequestRecord, list[Event]]:
        record, events = RequestRecord(scheduled_at=0.0, sent_at=0.0), []

        def read_event(event: Event) -> tuple[int, str | None]:
            events.append(event)
            return DIALECTS["kit"].read(event)

        reader = _StreamReader(record, read_event)
        for piece in pieces:
            reader.data_received(piece)
        return record, events

    return asyncio.run(read())


def test_several_tokens_in_one_read_arrive_together(server: BackgroundServer) -> None:
    wire = capture_chat(server.url, "hi", max_tokens=4, ttft_ms=0, token_ms=0)

    whole, _ = read_response([wire.raw])
    assert whole.outcome == "done" and len(whole.arrivals) == 4
    assert len(set(whole.arrivals)) == 1  # one read: one arrival time for all four
    byte_by_byte, _ = read_response([wire.raw[i : i + 1] for i in range(len(wire.raw))])
    assert byte_by_byte.outcome == "done" and len(byte_by_byte.arrivals) == 4


@pytest.mark.parametrize("extension", [b"", b";note=x"])
def test_a_read_of_one_whole_chunk_or_of_several_or_of_part_reads_alike(extension: bytes) -> None:
    """A read that is exactly one chunk takes the reader's short way; all other reads take the long way."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    tokens = [token_event(f" t{index}", index) for index in range(4)]
    done = b'event: done\ndata: {"finish_reason":"length","tokens":4}\n\n'
    writes = [b"retry: 1000\n", *tokens[:2], tokens[2][:20], tokens[2][20:], tokens[3], done]  # one event in two
    chunks = [b"%x%s\r\n%s\r\n" % (len(write), extension, write) for write in writes] + [b"0\r\n\r\n"]

    body = b"".join(chunks)
    for pieces in ([head, *chunks], [head + body], [head, body[:7], body[7:60], body[60:]]):
        record, events = read_response(pieces)
        assert (record.outcome, len(record.arrivals)) == ("done", 4)
        assert events == decode(b"".join(writes))
    one_chunk_per_read, _ = read_response([head, *chunks])
    assert len(set(one_chunk_per_read.arrivals)) == 4  # each token stamped at its own read


def test_a_worker_leaves_no_reference_cycles_so_it_runs_with_the_collector_off() -> None:
    """Workers turn the collector off (its pauses stamped arrivals late): nothing may pile up for want of it."""
    with server_process("kit") as (url, _):  # in another process: the server's own cycles are not counted here
        spec = LoadSpec(url, concurrency=20, requests=60, ramp_s=0.1, max_tokens=5, ttft_ms=0, token_ms=2)
        ours, theirs = socket.socketpair()
        with ours, Connection(theirs.detach()) as report:
            loop = _new_loop()
            gc.collect()
            gc.disable()
            try:
                loop.run_until_complete(_run_worker(spec, plan(spec, 1)[0], time.perf_counter(), 1, report))
                loop.close()
                unreachable = gc.collect()
            finally:
                gc.enable()
    assert unreachable == 0


def test_send_lag_and_worker_cpu_raise_warnings_past_their_thresholds() -> None:
    spec = LoadSpec(URL, rate=10, requests=4)
    on_time = [RequestRecord(scheduled_at=i, sent_at=i + 0.001, arrivals=[i + 0.1], outcome="done") for i in range(4)]
    summary, warnings = summarize(spec, [WorkerReport(on_time, cpu_s=1.0, wall_s=4.0)])
    assert summary["client"]["send_lag_ms"]["p50"] == pytest.approx(1.0)
    assert summary["client"]["cpu_percent"] == [25.0]
    assert warnings == []
    late = [RequestRecord(scheduled_at=i, sent_at=i + 0.2, arrivals=[i + 0.3], outcome="done") for i in range(4)]
    summary, warnings = summarize(spec, [WorkerReport(late, cpu_s=3.9, wall_s=4.0)])
    assert summary["client"]["send_lag_ms"]["p99"] == pytest.approx(200.0)
    assert any("send lag p99 200.0 ms" in warning for warning in warnings)
    assert any("worker CPU 97.5 %" in warning for warning in warnings)


def test_a_closed_loop_spreads_its_users_over_the_ramp_and_deals_them_to_workers() -> None:
    plans = plan(LoadSpec(URL, concurrency=4, requests=10, ramp_s=2.0), workers=2)
    starts = sorted(start for worker_plan in plans for start, _ in worker_plan.users)
    assert starts == [0.0, 0.5, 1.0, 1.5]
    assert sum(quota or 0 for worker_plan in plans for _, quota in worker_plan.users) == 10
    assert [len(worker_plan.users) for worker_plan in plans] == [2, 2]


def test_open_loop_gaps_are_gamma_with_the_asked_mean_and_burstiness() -> None:
    poisson = gamma_arrivals(100, 1.0, 4001, None, seed=1)
    gaps = [later - earlier for earlier, later in itertools.pairwise(poisson)]
    assert statistics.fmean(gaps) == pytest.approx(0.01, rel=0.1)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.1)  # exponential: CV 1
    regular = gamma_arrivals(100, 16.0, 4001, None, seed=1)
    regular_gaps = [later - earlier for earlier, later in itertools.pairwise(regular)]
    assert statistics.stdev(regular_gaps) / statistics.fmean(regular_gaps) == pytest.approx(0.25, rel=0.15)
    assert gamma_arrivals(10, 1.0, None, 1.0, seed=0)[-1] < 1.0  # a duration bounds the arrivals


def test_enough_workers_for_the_token_rate_and_never_more_than_cores() -> None:
    assert default_workers(LoadSpec(URL, concurrency=10, requests=10, token_ms=50)) == 1
    heavy = LoadSpec(URL, concurrency=10_000, requests=10_000, token_ms=10)
    assert 1 <= default_workers(heavy) <= (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"requests": 1}, "concurrency"),
        ({"concurrency": 1}, "requests or a duration"),
        ({"concurrency": 1, "requests": 1, "duration_s": 1.0}, "not both"),
        ({"rate": 0, "requests": 1}, "rate"),
        ({"concurrency": 1, "requests": 1, "slo_ms": {"itl": 5}}, "unknown SLO"),
    ],
)
def test_a_load_that_cannot_be_made_is_refused_clearly(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(LoadError, match=message):
        LoadSpec(URL, **fields)


def test_only_loopback_servers_are_load_tested() -> None:
    with pytest.raises(LoadError, match="only loopback"):
        LoadSpec("http://example.com", concurrency=1, requests=1)
    LoadSpec("http://[::1]:8000", concurrency=1, requests=1)


@pytest.mark.parametrize(
    "garbage",
    [b"HTTP/1.1\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
)
def test_a_response_that_breaks_http_is_cut_short_not_a_crash(garbage: bytes) -> None:
    assert read_response([garbage])[0].outcome == "cut_short"
