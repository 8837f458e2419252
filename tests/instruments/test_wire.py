from __future__ import annotations

import socket
import time

import httpx
import pytest

from sse_lab import BackgroundServer, Settings, create_app, serve_in_background
from sse_lab.instruments.wire import (
    Read,
    WireCapture,
    capture,
    capture_chat,
    format_wire,
)
from sse_lab.sse import Event, decode

QUICK = {"max_tokens": 3, "ttft_ms": 0, "token_ms": 0}
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def synthetic(*pieces: bytes, closed: bool = True) -> WireCapture:
    """A capture made of these reads, 1 ms apart, with no server."""
    return WireCapture("http://127.0.0.1/", b"", 0.0, [Read(i / 1000, piece) for i, piece in enumerate(pieces)], closed)


def test_a_stream_has_its_status_line_and_headers(server: BackgroundServer) -> None:
    wire = capture_chat(server.url, "hi", **QUICK)
    assert (wire.status_line, wire.status) == ("HTTP/1.1 200 OK", 200)
    assert wire.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert wire.headers["cache-control"] == "no-cache"
    assert wire.headers["x-accel-buffering"] == "no"
    assert wire.headers["transfer-encoding"] == "chunked" and wire.chunked
    assert wire.head.endswith(b"\r\n\r\n") and wire.raw.startswith(wire.head)
    assert (wire.closed, wire.complete) == (True, True)


def test_the_request_is_written_by_hand_and_asks_to_close(server: BackgroundServer) -> None:
    wire = capture_chat(server.url, "two words", **QUICK)
    request_line, *headers, blank, end = wire.request.split(b"\r\n")
    assert request_line.startswith(b"GET /api/chat/stream?prompt=two+words&max_tokens=3&") and request_line.endswith(
        b" HTTP/1.1"
    )
    assert b"Connection: close" in headers and b"Accept: text/event-stream" in headers
    assert headers[0] == f"Host: {server.url.removeprefix('http://')}".encode()
    assert (blank, end) == (b"", b"")


def test_the_dechunked_body_is_what_httpx_reads(server: BackgroundServer) -> None:
    params = {"prompt": "same bytes", "max_tokens": 6, "ttft_ms": 0, "token_ms": 1}
    wire = capture(server.url + "/api/chat/stream", params=params)
    with httpx.Client(trust_env=False) as client:
        assert wire.body == client.get(server.url + "/api/chat/stream", params=params).content
    assert [event.event for event in decode(wire.body)] == ["token"] * 6 + ["done"]


def test_the_framing_stays_visible_around_each_chunk(server: BackgroundServer) -> None:
    wire = capture_chat(server.url, "hi", **QUICK)
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in wire.chunks)
    assert wire.body_wire == framed + b"0\r\n\r\n"
    assert wire.chunks[0] == b"retry: 3000\n"
    assert b"".join(wire.chunks) == wire.body


def test_reads_of_a_slow_stream_arrive_spread_over_time(server: BackgroundServer) -> None:
    wire = capture_chat(server.url, "hi", max_tokens=4, ttft_ms=0, token_ms=60)
    token_reads = [
        (read.at, events)
        for read, events in zip(wire.body_reads, wire.events_per_read(), strict=True)
        if any(event.event == "token" for event in events)
    ]
    assert [sum(event.event == "token" for event in events) for _, events in token_reads] == [1, 1, 1, 1]
    assert token_reads[-1][0] - token_reads[0][0] > 0.12  # 180 ms apart when produced
    assert all(earlier.at <= later.at for earlier, later in zip(wire.reads, wire.reads[1:], strict=False))


def test_heartbeats_arrive_as_comment_chunks_before_the_first_token(server: BackgroundServer) -> None:
    wire = capture_chat(server.url, "hi", max_tokens=1, ttft_ms=300, token_ms=0, heartbeat_s=0.05)
    before = wire.body.split(b"event: token")[0]
    assert before.startswith(b"retry: 3000\n") and before.count(b": heartbeat\n") >= 3
    assert wire.chunks.count(b": heartbeat\n") == before.count(b": heartbeat\n")


def test_a_buffered_reply_is_delimited_by_its_content_length(server: BackgroundServer) -> None:
    wire = capture(server.url + "/api/chat", params={"prompt": "hi", **QUICK})
    assert not wire.chunked and wire.complete and wire.chunks == []
    assert int(wire.headers["content-length"]) == len(wire.body) == len(wire.body_wire)
    assert httpx.Response(200, content=wire.body).json()["tokens"] == 3


def test_a_refusal_is_captured_too(server: BackgroundServer) -> None:
    wire = capture_chat(server.url, "hi", token_ms="abc")
    assert wire.status == 422 and wire.complete
    assert b'"parameter":"token_ms"' in wire.body


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/",
        "http://10.0.0.1:8000/api/chat",
        "http://127.0.0.2:8000/",
        "http://[2001:db8::1]:80/",
        "https://127.0.0.1/",
        "ftp://127.0.0.1/",
        "http://user:pw@127.0.0.1/",
        "127.0.0.1:8000",
    ],
)
def test_anything_but_plain_http_to_loopback_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"loopback|http://|credentials"):
        capture(url, deadline_s=0.1)


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("http://127.0.0.1:9/a b", {}),
        ("http://127.0.0.1:9/\u00e9", {}),
        ("http://127.0.0.1:9/", {"X-Evil": "a\r\nHost: elsewhere"}),
        ("http://127.0.0.1:9/", {"Bad Name": "x"}),
        ("http://127.0.0.1:9/", {"Host": "elsewhere"}),
        ("http://127.0.0.1:9/", {"connection": "keep-alive"}),
    ],
)
def test_a_request_that_would_be_sent_broken_is_refused(url: str, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        capture(url, headers=headers, deadline_s=0.1)


def test_localhost_is_reached_on_a_loopback_address(server: BackgroundServer) -> None:
    wire = capture_chat(server.url.replace("127.0.0.1", "localhost"), "hi", **QUICK)
    assert wire.status == 200 and wire.complete


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_loopback_works() -> None:
    with serve_in_background(host="::1") as running:
        wire = capture_chat(running.url, "hi", **QUICK)
    assert running.url.startswith("http://[::1]:") and wire.status == 200 and wire.complete


def test_the_deadline_is_respected() -> None:
    with serve_in_background(create_app(Settings(heartbeat_s=0.05))) as running:
        started = time.perf_counter()
        wire = capture_chat(running.url, "hi", max_tokens=1, ttft_ms=5000, deadline_s=0.3)
        took = time.perf_counter() - started
    assert 0.3 <= took < 1.0
    assert (wire.closed, wire.complete, wire.status) == (False, False, 200)
    assert all(read.at < 0.3 for read in wire.reads)
    assert wire.chunks[0] == b"retry: 3000\n" and b": heartbeat\n" in wire.chunks
    assert decode(wire.body) == []


def test_a_refused_connection_raises_oserror() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(OSError):
            capture(f"http://127.0.0.1:{port}/", deadline_s=1.0)


def test_dechunking_does_not_care_where_reads_split_the_framing() -> None:
    body = b"4\r\nab\r\n\r\n" + b"3;ext=1\r\nxyz\r\n" + b"0\r\ntrailer: yes\r\n\r\n"
    raw = HEAD + body
    for cut in range(len(raw) + 1):
        wire = synthetic(raw[:cut], raw[cut:])
        assert wire.body == b"ab\r\nxyz", cut
        assert wire.chunks == [b"ab\r\n", b"xyz"] and wire.complete, cut
        assert len(wire.body_reads) == 2, cut


def test_bytes_of_a_chunk_come_out_with_the_read_that_brought_them() -> None:
    wire = synthetic(HEAD + b"12\r\nevent:", b" x\ndata:", b" 1\n\n\r\n")
    assert [read.data for read in wire.body_reads] == [b"event:", b" x\ndata:", b" 1\n\n"]
    assert wire.events_per_read() == [[], [], [Event("1", event="x")]]
    assert not wire.complete  # no last chunk yet


def test_a_malformed_chunk_is_reported() -> None:
    with pytest.raises(ValueError, match="chunk-size"):
        synthetic(HEAD + b"zz\r\nab\r\n")
    with pytest.raises(ValueError, match="CRLF after a chunk"):
        synthetic(HEAD + b"2\r\nabc\r\n")


def test_a_body_without_length_or_chunks_ends_with_the_connection() -> None:
    head = b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n"
    assert synthetic(head + b"all of it").complete
    assert not synthetic(head + b"some of it", closed=False).complete
    assert synthetic(head + b"all", b" of it").body == b"all of it"


def test_no_head_yet_means_no_body() -> None:
    wire = synthetic(b"HTTP/1.1 200 OK\r\ncontent-", closed=False)
    assert (wire.status_line, wire.status, wire.headers, wire.body, wire.body_wire) == ("", 0, {}, b"", b"")
    assert not wire.complete


def test_format_wire_shows_every_read_with_its_time_escapes_and_events() -> None:
    text = format_wire(synthetic(HEAD + b"d\r\ndata: caf\xc3\xa9\n\n\r\n", b"0\r\n\r\n"), limit=1)
    lines = text.splitlines()
    assert lines[0] == "request, sent at 0 ms:"
    assert "response, 2 reads until the server closed the connection:" in lines
    assert "+    0.0 ms  b'HTTP/1.1 200 OK\\r\\n'" in lines
    assert any(line.strip() == "b'data: caf\\xc3\\xa9\\n'" for line in lines)
    assert any(line.strip() == "→ message data='café'" for line in lines)
    assert lines[-1] == "... 1 more reads, 5 bytes"
