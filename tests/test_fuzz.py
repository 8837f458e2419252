"""A bounded fuzz suite over real sockets: whatever a client sends, the server answers like the README says.

Invariants, checked for every request hypothesis makes up:
- never a 5xx;
- every 4xx has a JSON object body with a non-empty `error` (HEAD answers carry no body);
- never a traceback or an ERROR record in the server's log (`uvicorn`, `sse_lab` and `asyncio` loggers);
- afterwards, no stream or answer is left running and a normal stream is served exactly.

Requests are written byte by byte on a socket, so that nothing is normalised on the way:
random query strings on every endpoint (known and unknown names, repeats, numbers in every
Unicode digit form, invalid percent-encoding and UTF-8, NUL, long values), random
`Last-Event-ID` headers, other methods, malformed, oversized and half-sent heads.

About 30 s by default; `--fuzz-long` (or SSE_LAB_FUZZ_LONG=1) runs 20 times as many examples.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import unicodedata
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sse_lab import BackgroundServer, GenerationRequest, Settings, create_app, serve_in_background, stream_chat
from sse_lab.model import sim_tokens
from sse_lab.server import PARAMETERS, STREAM_PARAMETERS
from tests.conftest import FUZZ_LONG_ENV, wait_for
from tests.raw_http import RawResponse, address, exchange, read_response

HEADER_TIMEOUT_S = 0.5
SETTINGS = Settings(header_timeout_s=HEADER_TIMEOUT_S, defaults=GenerationRequest("", ttft_ms=0, token_ms=0))
LONG = os.environ.get(FUZZ_LONG_ENV) == "1"  # set by --fuzz-long too (tests/conftest.py)
SCALE = 20 if LONG else 1
WATCHED_LOGGERS = ("uvicorn", "uvicorn.error", "sse_lab", "asyncio")
PATHS = ["/api/chat/stream", "/api/chat", "/api/stats", "/api/chat/", "/", "/api/chat/stream/x", "//api/chat"]
METHODS = ["GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "BREW"]
# The zero of every decimal digit system Unicode has: a digit d of that system is zero + d.
ZEROS = [chr(code) for code in range(sys.maxunicode + 1) if unicodedata.decimal(chr(code), None) == 0]
counted = {"requests": 0}
# The `server` fixture checks its invariants once after all of a test's examples, on purpose.
FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}


class Recorder(logging.Handler):
    """Keeps the server's log records with a traceback, or at ERROR and above: none may appear."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.troubles: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR or "Traceback" in record.getMessage():
            self.troubles.append(self.format(record))


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[BackgroundServer, Recorder]]:
    """One server for the module, its log recorded; at the end, the module's request count and time."""
    recorder = Recorder()
    for name in WATCHED_LOGGERS:
        logging.getLogger(name).addHandler(recorder)
    started = time.monotonic()
    try:
        with serve_in_background(create_app(SETTINGS)) as running:
            yield running, recorder
    finally:
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).removeHandler(recorder)
        elapsed = time.monotonic() - started
        print(f"\nfuzz: {counted['requests']} requests in {elapsed:.1f} s", file=sys.__stderr__)


@pytest.fixture
def server(fuzzed: tuple[BackgroundServer, Recorder]) -> Iterator[BackgroundServer]:
    """The fuzzed server; after the test, its log is clean, nothing is left running and a stream is served exactly."""
    running, recorder = fuzzed
    yield running
    assert recorder.troubles == []
    wait_for(lambda: idle(running), 10, "every stream and answer to end")
    result = stream_chat(running.url, "after the fuzz", max_tokens=8, ttft_ms=0, token_ms=0, seed=1)
    assert result.error is None and result.drops == []
    assert result.text == "".join(sim_tokens("after the fuzz", 8, seed=1))


def idle(running: BackgroundServer) -> bool:
    counters = exchange(running.url, b"GET /api/stats HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n").json()
    assert isinstance(counters, dict)
    return counters["streams_active"] == 0 and counters["chats_active"] == 0


def check(response: RawResponse, method: str = "GET") -> None:
    """The invariants every answer keeps (None: no answer before the client gave up, allowed for slow requests)."""
    counted["requests"] += 1
    if response.status is None:
        return
    assert response.status < 500, response
    assert response.headers.get("x-content-type-options") == "nosniff", response
    if 400 <= response.status < 500 and method != "HEAD":
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], response


def send(running: BackgroundServer, data: bytes, method: str = "GET") -> RawResponse:
    """Send one request; read its answer whole if it comes within a second (a 200 stream may be cut short)."""
    with socket.create_connection(address(running.url), timeout=2) as sock:
        with contextlib.suppress(OSError):  # refused while sending: the answer may still be readable
            sock.sendall(data)
        response = read_response(sock, timeout_s=1.0)
    check(response, method)
    return response


# Strategies: the pieces of a request.


def digits_in(number: str, zero: str) -> str:
    return "".join(chr(ord(zero) + int(char)) if char.isdigit() else char for char in number)


numbers = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "64", "4096", "4097", "1e3", "1_0", "+3", " 3", "03", "0x1f", "3.", ".5", "1.5"]),
)
unicode_numbers = st.builds(digits_in, numbers, st.sampled_from(ZEROS))
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
long_texts = st.builds(
    lambda char, count: char * count, st.characters(exclude_categories=("Cs",)), st.integers(0, 9000)
)
raw_pieces = st.sampled_from(["%", "%G1", "%FF%FE", "%C3", "%00", "%25", "%%", "+", "&", "=", "==", ";", "#", "%0A"])
values = st.one_of(numbers, unicode_numbers, texts, long_texts, raw_pieces, st.just(""))
names = st.one_of(st.sampled_from([*PARAMETERS, *STREAM_PARAMETERS]), texts, raw_pieces)


@st.composite
def query_strings(draw: st.DrawFn) -> str:
    pairs = draw(st.lists(st.tuples(names, values), max_size=8))
    if draw(st.booleans()):
        pairs.append(("prompt", draw(values)))
    encoded = []
    for name, value in pairs:
        if draw(st.booleans()):  # percent-encoded, as a client would
            encoded.append(f"{quote(name, safe='')}={quote(value, safe='')}")
        else:  # as it comes, where the request line allows it
            encoded.append(f"{name}={value}")
    return "&".join(encoded)


def target_bytes(path: str, query: str) -> bytes:
    # Characters a request line cannot carry go percent-encoded; the rest (and bad escapes) as drawn.
    return (path + "?" + quote(query, safe="%&=+;#?/:@!$'()*,~")).encode("ascii")


last_event_ids = st.one_of(numbers, unicode_numbers, texts, st.sampled_from(["", "0", "63", "-1", "7 ", "\uff11"]))


@settings(max_examples=800 * SCALE, **FUZZ)
@given(
    method=st.sampled_from(METHODS),
    path=st.sampled_from(PATHS),
    query=query_strings(),
    last_event_id=st.none() | last_event_ids,
)
def test_random_query_strings_on_every_endpoint(
    server: BackgroundServer, method: str, path: str, query: str, last_event_id: str | None
) -> None:
    head = [f"{method} ".encode() + target_bytes(path, query) + b" HTTP/1.1", b"Host: lab", b"Connection: close"]
    if last_event_id is not None:
        head.append(
            b"Last-Event-ID: " + last_event_id.encode("utf-8", "replace").replace(b"\r", b"").replace(b"\n", b"")
        )
    response = send(server, b"\r\n".join(head) + b"\r\n\r\n", method)
    if response.status == 200 and path == "/api/chat/stream" and method == "GET":
        assert response.headers["content-type"].startswith("text/event-stream")


header_lines = st.one_of(
    st.sampled_from(
        [
            b"Content-Length: 5",
            b"Content-Length: -1",
            b"Content-Length: 99999999999999999999",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: gzip, chunked",
            b"Content-Length: 3\r\nContent-Length: 4",
            b"Expect: 100-continue",
            b"Connection: upgrade\r\nUpgrade: websocket",
            b" folded: line",
            b"no colon",
            b": empty name",
            b"X: \x00nul",
            b"X:\x7f",
            b"Host: a\r\nHost: b",
        ]
    ),
    st.binary(max_size=60).map(lambda raw: raw.replace(b"\r\n", b"")),
)
request_lines = st.one_of(
    st.sampled_from(
        [
            b"GET /api/chat?prompt=hi HTTP/1.1",
            b"GET /api/chat?prompt=hi HTTP/1.0",
            b"GET /api/chat?prompt=hi HTTP/2.0",
            b"GET /api/chat?prompt=hi",
            b"GET  /api/chat HTTP/1.1",
            b"GET http://lab/api/chat?prompt=hi HTTP/1.1",
            b"GET * HTTP/1.1",
            b"get /api/stats HTTP/1.1",
            b"GET /api/\xff\xfe HTTP/1.1",
            b"GET /api/chat?prompt=\xc3\x28 HTTP/1.1",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
        ]
    ),
    st.binary(max_size=80).map(lambda raw: raw.replace(b"\r\n", b"")),
)


@settings(max_examples=400 * SCALE, **FUZZ)
@given(
    request_line=request_lines,
    headers=st.lists(header_lines, max_size=5),
    body=st.binary(max_size=40),
    line_end=st.sampled_from([b"\r\n", b"\n"]),
)
def test_malformed_heads_get_a_json_400_or_an_answer(
    server: BackgroundServer, request_line: bytes, headers: list[bytes], body: bytes, line_end: bytes
) -> None:
    lines = [request_line, b"Host: lab", *headers, b"Connection: close"]
    send(server, line_end.join(lines) + line_end + line_end + body)


@settings(max_examples=30 * SCALE, **FUZZ)
@given(
    extra=st.integers(-2_000, 3 * SETTINGS.max_request_head_bytes),
    where=st.sampled_from(["header", "query", "many headers"]),
)
def test_oversized_heads_get_a_json_431(server: BackgroundServer, extra: int, where: str) -> None:
    size = SETTINGS.max_request_head_bytes + extra
    if where == "query":
        data = b"GET /api/chat?prompt=" + b"a" * size + b" HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
    elif where == "header":
        data = b"GET /api/stats HTTP/1.1\r\nHost: lab\r\nConnection: close\r\nX: " + b"a" * size + b"\r\n\r\n"
    else:
        data = b"GET /api/stats HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n" + b"X: y\r\n" * (size // 6) + b"\r\n"
    response = send(server, data)
    if len(data) > SETTINGS.max_request_head_bytes + 65536:  # well past the limit
        assert response.status == 431, response


valid_request = b"GET /api/chat/stream?prompt=hi&max_tokens=2 HTTP/1.1\r\nHost: lab\r\nLast-Event-ID: 0\r\n\r\n"


@settings(max_examples=5 * SCALE, **FUZZ)
@given(cuts=st.lists(st.integers(0, len(valid_request) - 3), min_size=1, max_size=30))
def test_half_sent_requests_are_closed_after_the_header_timeout(server: BackgroundServer, cuts: list[int]) -> None:
    socks = [socket.create_connection(address(server.url)) for _ in cuts]
    try:
        for sock, cut in zip(socks, cuts, strict=True):
            if cut:
                sock.sendall(valid_request[:cut])
        for sock, cut in zip(socks, cuts, strict=True):
            response = read_response(sock, timeout_s=HEADER_TIMEOUT_S + 5)
            check(response)
            assert response.status == (408 if cut else None), (cut, response)
    finally:
        for sock in socks:
            sock.close()
