from __future__ import annotations

import logging
import socket

import httpx
import pytest

from sse_lab import BackgroundServer
from sse_lab.instruments.relay import relay_to
from sse_lab.instruments.wire import capture_chat
from tests.conftest import wait_for


def test_the_relay_counts_every_byte_each_way_as_a_raw_capture_sees_them(server: BackgroundServer) -> None:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with relay_to(host, int(port)) as relay:
        wire = capture_chat(relay.url, "hi", max_tokens=5, ttft_ms=0, token_ms=0)
        wait_for(lambda: relay.totals().down == len(wire.raw), what="the relay to count the response")
        totals = relay.totals()
    assert totals.up == len(wire.request) and totals.connections == 1
    assert wire.complete and b'"tokens":5' in wire.body


def test_reset_zeroes_the_counters(server: BackgroundServer) -> None:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with relay_to(host, int(port)) as relay:
        httpx.get(relay.url + "/api/stats", trust_env=False)
        assert relay.totals().total > 0
        relay.reset()
        assert relay.totals().total == 0 and relay.totals().connections == 0


def test_the_relay_only_forwards_to_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"), relay_to("example.com", 80):
        pass


def test_the_relay_listens_on_loopback_and_stops() -> None:
    with socket.create_server(("127.0.0.1", 0)) as upstream, relay_to(*upstream.getsockname()) as relay:
        assert relay.host == "127.0.0.1"
        address = (relay.host, relay.port)
    with pytest.raises(OSError), socket.create_connection(address, timeout=1):
        pass


def test_stopping_the_relay_with_a_connection_open_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncio"), socket.create_server(("127.0.0.1", 0)) as upstream:
        with relay_to(*upstream.getsockname()) as relay:
            client = socket.create_connection((relay.host, relay.port))
            accepted, _ = upstream.accept()
            client.sendall(b"open")
            assert accepted.recv(4) == b"open"
        client.close()
        accepted.close()
    assert not caplog.records
