from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from sse_lab import serve_in_background, stream_chat
from sse_lab.experiments.nagle import (
    NAGLE_LABEL,
    NODELAY_LABEL,
    NagleSummary,
    delivery_delays,
    nagle_experiment,
    nagle_finding,
    nagle_table,
    serve_small_writes,
    split_writes,
    uvicorn_nodelay,
)

# Tokens 5 ms apart: long enough for each event's pieces to be on their own, short enough for a quick test.
PACED = {"tokens": 20, "token_ms": 5, "runs": 3, "progress": False}


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _read_head(client: socket.socket) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received:
        read = client.recv(4096)
        assert read, f"connection closed before the response head: {received!r}"
        received += read
    return received


@pytest.mark.parametrize(("proto", "nodelay"), [(0, False), (socket.IPPROTO_TCP, True)])
def test_asyncio_sets_nodelay_only_on_connections_accepted_by_a_socket_made_as_tcp(proto: int, nodelay: bool) -> None:
    async def accepted_nodelay() -> bool:
        seen: list[bool] = []
        handled = asyncio.Event()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.append(bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
            await reader.read()  # until the client closes
            writer.close()
            await writer.wait_closed()
            handled.set()

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        listener.bind(("127.0.0.1", 0))
        async with await asyncio.start_server(on_connect, sock=listener):
            _, writer = await asyncio.open_connection(*listener.getsockname())
            writer.close()
            await writer.wait_closed()
            await handled.wait()
        return seen[0]

    assert asyncio.run(accepted_nodelay()) is nodelay


def test_serve_in_background_connections_have_nodelay() -> None:
    # Its listening socket is made with proto IPPROTO_TCP: with proto 0, asyncio would leave Nagle on.
    with serve_in_background() as server:
        assert uvicorn_nodelay(server) is True


def test_the_small_write_server_accepts_connections_with_asyncios_nodelay() -> None:
    with serve_small_writes() as server:
        results = [stream_chat(server.url, "hi", max_tokens=2, token_ms=0, nodelay=nodelay) for nodelay in (0, 1)]
        assert server.accepted_nodelay == [True, True]
    assert [result.tokens for result in results] == [2, 2]


def test_split_writes_cuts_at_line_ends_and_keeps_every_byte() -> None:
    event = b"event: token\nid: 12\ndata: a\ndata: b\n\n"
    for writes in range(1, 8):
        pieces = split_writes(event, writes)
        assert b"".join(pieces) == event
        assert len(pieces) == min(writes, 5)
        assert all(piece.endswith(b"\n") for piece in pieces)
    with pytest.raises(ValueError, match="1 or more"):
        split_writes(event, 0)


def test_three_writes_per_event_nagle_holds_the_rest_of_each_event_but_costs_no_noticeable_time() -> None:
    results = nagle_experiment(writes_per_event=3, **PACED)
    for runs in results.values():
        assert [(run.tokens, run.finish_reason) for run in runs] == [(20, "length")] * 3
    nodelay, nagle = NagleSummary.of(results[NODELAY_LABEL]), NagleSummary.of(results[NAGLE_LABEL])
    # Nagle acts: after the quickack start, the 2nd and 3rd pieces of an event wait for the
    # ACK of the 1st, so the client reads the event in two parts. (With TCP_NODELAY the
    # share depends on scheduling: ~5% on an idle machine, most events on a busy one.)
    assert nagle.split >= 0.5, nagle
    # ...but the ACK comes back as soon as the client reads: nothing like a delayed ACK's 40 ms.
    assert nagle.spread_median_ms < 5, nagle
    assert nagle.delay_median_ms < nodelay.delay_median_ms + 5, (nodelay, nagle)
    assert abs(nagle.itl_median_ms - nodelay.itl_median_ms) < 0.2 * PACED["token_ms"], (nodelay, nagle)
    assert nagle_finding(results).startswith("No noticeable delay from Nagle here")
    assert nagle_table(results).splitlines()[1].startswith(NODELAY_LABEL)


def test_one_write_per_event_leaves_nagle_nothing_to_hold() -> None:
    results = nagle_experiment(writes_per_event=1, **PACED)
    nodelay, nagle = NagleSummary.of(results[NODELAY_LABEL]), NagleSummary.of(results[NAGLE_LABEL])
    assert nodelay.tokens == nagle.tokens == 60
    assert nodelay.split == nagle.split == 0  # an event is one small segment: it arrives whole
    assert abs(nagle.itl_median_ms - nodelay.itl_median_ms) < 0.2 * PACED["token_ms"], (nodelay, nagle)


def test_delivery_delays_are_measured_from_the_servers_first_write() -> None:
    with serve_small_writes() as server:
        result = stream_chat(server.url, "hi", max_tokens=3, token_ms=0, writes_per_event=1)
    delays = delivery_delays(result)
    assert len(delays) == 3
    assert all(0 < delay < result.finished_at - result.started_at for delay in delays)


def test_requests_it_does_not_serve_are_refused() -> None:
    with serve_small_writes() as server, httpx.Client(trust_env=False) as client:
        assert client.get(server.url + "/api/chat").status_code == 404
        assert client.get(server.url + "/api/chat/stream", params={"nodelay": 2}).status_code == 400
        assert client.get(server.url + "/api/chat/stream", params={"token_ms": "soon"}).status_code == 400
        assert client.get(server.url + "/api/chat/stream", params={"max_tokens": 0}).status_code == 400


def test_leaving_stops_the_server_and_ends_open_streams() -> None:
    with socket.socket() as client:
        with serve_small_writes() as server:
            address = _address(server.url)
            client.connect(address)
            client.sendall(b"GET /api/chat/stream?max_tokens=100&token_ms=10000 HTTP/1.1\r\nHost: x\r\n\r\n")
            received = _read_head(client)
        while read := client.recv(4096):
            received += read
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.count(b"event: token") == 1  # the first token, then the close
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address).close()


def test_too_few_tokens_for_an_inter_token_latency_are_refused() -> None:
    with pytest.raises(ValueError, match="2 tokens"):
        nagle_experiment(tokens=1, progress=False)
