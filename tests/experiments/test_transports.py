from __future__ import annotations

from collections.abc import Iterator

import pytest

from sse_lab.experiments import transports
from sse_lab.experiments.transports import Endpoints


@pytest.fixture(scope="module")
def endpoints() -> Iterator[Endpoints]:
    with transports.serve_transports() as served:
        yield served


@pytest.mark.parametrize("transport", [*transports.TRANSPORTS, transports.WS_NO_DEFLATE])
def test_every_transport_delivers_the_same_text(endpoints: Endpoints, transport: str) -> None:
    expected = transports.chat("sse", endpoints, max_tokens=8, ttft_ms=0, token_ms=1, seed=4).text
    result = transports.chat(transport, endpoints, max_tokens=8, ttft_ms=0, token_ms=1, seed=4)
    assert result.text == expected and result.tokens == 8 and result.finish_reason == "length"


def test_an_unknown_transport_is_refused(endpoints: Endpoints) -> None:
    with pytest.raises(ValueError, match="transport"):
        transports.chat("carrier pigeon", endpoints)


def test_wire_costs_separate_the_per_token_bytes_from_the_fixed_ones(endpoints: Endpoints) -> None:
    wire = transports.measure_wire(endpoints, tokens=(4, 12), ttft_ms=0, token_ms=5)
    assert set(wire) == {*transports.TRANSPORTS, transports.WS_NO_DEFLATE}
    for name, cost in wire.items():
        assert cost.per_token > 0 and cost.up > 0 and cost.down > 0, name
    assert wire["long_poll"].per_message > 2 * wire["sse"].per_token  # a whole HTTP exchange per answer
    assert wire["grpc"].fixed > wire["sse"].fixed  # the HTTP/2 preface and SETTINGS


def test_the_model_stops_soon_after_each_transports_cancel() -> None:
    delays = transports.measure_cancellation(runs=1, after=2, token_ms=10)
    assert set(delays) == set(transports.TRANSPORTS)
    assert all(0 <= delay < 0.5 for runs in delays.values() for delay in runs)


def test_resuming_clients_get_the_whole_answer_and_their_lines_are_counted() -> None:
    costs = {cost.transport: cost for cost in transports.measure_resume(tokens=6, drop_after=3, token_ms=25)}
    assert all(cost.same_text for cost in costs.values())
    assert costs["websocket"].regenerated >= 3 and costs["grpc"].regenerated >= 3  # asked again from the start
    assert costs["sse"].regenerated <= 2 and costs["long_poll"].regenerated == 0  # at most what was in flight
    assert all(cost.extra_lines > 0 for cost in costs.values())


def test_code_lines_leave_out_the_signature_comments_blanks_and_drill_lines() -> None:
    def sample() -> None:
        # a comment

        print("counted")
        print("not counted")  # drill

    assert transports.code_lines(sample) == 1


def test_cpu_and_memory_come_from_a_child_server_process() -> None:
    cpu = transports.measure_cpu(tokens=20, token_ms=2, transports=("sse", "long_poll"))
    assert set(cpu) == {transports.BASELINE, "sse", "long_poll"}
    assert all(cost.per_token > 0 for cost in cpu.values()) and cpu["sse"].messages == 20
    memory = transports.measure_memory(connections=10, transports=("sse", "grpc"))
    assert set(memory) == {"sse", "grpc"} and all(size < 1024 * 1024 for size in memory.values())


def test_a_browser_streams_sse_and_websocket_natively_and_cannot_call_grpc() -> None:
    binary = transports.chromium_or_skip()
    if binary is None:
        pytest.skip(transports.CHROMIUM_SKIP_MESSAGE)
    browser = transports.from_the_browser(binary)
    assert browser["sse"] == {"tokens": 5, "error": None}
    assert browser["websocket"] == {"tokens": 5, "error": None}
    assert browser["grpc"]["tokens"] == 0 and browser["grpc"]["error"]


def test_handshakes_are_counted_before_the_first_request(endpoints: Endpoints) -> None:
    handshake = transports.measure_handshake(endpoints)
    assert handshake["sse"].total == 0 and handshake["long_poll"].total == 0
    assert handshake["websocket"].up > 100 and handshake["websocket"].down > 100  # Upgrade request and 101
    assert handshake["grpc"].up >= 24 + 9  # at least the connection preface and a SETTINGS frame header
