from __future__ import annotations

import pytest

from sse_lab import BackgroundServer
from sse_lab.experiments.under_load import client_bottleneck, collector_pause, in_flight, token_lateness_ms
from sse_lab.metrics import RequestRecord


def test_streams_in_flight_step_up_at_each_send_and_down_at_each_end() -> None:
    records = [
        RequestRecord(0.0, 10.0, ended_at=11.0),
        RequestRecord(0.0, 10.5, ended_at=12.0),
        RequestRecord(0.0, 11.5, ended_at=11.8),
    ]
    times, counts = in_flight(records)
    assert times == pytest.approx([0.0, 0.5, 1.0, 1.5, 1.8, 2.0])
    assert counts == [1, 2, 1, 2, 1, 0]


def test_token_lateness_counts_from_the_send_on_the_models_schedule() -> None:
    record = RequestRecord(0.0, 1.0, arrivals=[1.0, 1.03, 1.05])
    assert token_lateness_ms([record], 0, 20) == pytest.approx([0.0, 10.0, 10.0])


def test_both_clients_read_every_token_of_the_same_streams(server: BackgroundServer) -> None:
    read = client_bottleneck(server.url, 4, max_tokens=5, token_ms=5, ramp_s=0.05)
    assert set(read) == {"astream_chat, one loop", "load generator"}
    for records in read.values():
        assert [len(record.arrivals) for record in records] == [5] * 4
        assert all(record.outcome == "done" for record in records)


def test_each_open_stream_gives_a_full_collection_objects_to_walk() -> None:
    pause = collector_pause(streams=30)
    assert pause.streams == 30
    assert pause.objects_per_stream > 50  # tasks, coroutines, the request, the response: about 150
    assert pause.idle_ms > 0 and pause.open_ms > 0
