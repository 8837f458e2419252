"""Regression tests for the findings of the outside test of the server (issue 16), one or more per finding."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from sse_lab import BackgroundServer, GenerationRequest, Settings, create_app, serve_in_background, stream_chat
from sse_lab.model import sim_tokens
from sse_lab.server import HEADERS_ROOM_BYTES, MAX_BLOCKLIST_CHARS
from sse_lab.sse import Decoder
from tests.conftest import wait_for
from tests.raw_http import RawResponse, address, exchange, read_response, request_bytes

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's /proc entries")
FAST = GenerationRequest("", ttft_ms=0, token_ms=0)


def stats(server: BackgroundServer) -> dict[str, int]:
    return httpx.get(server.url + "/api/stats", trust_env=False).json()


def assert_json_error(response: RawResponse | httpx.Response, status: int, error: str) -> dict:
    status_code = response.status if isinstance(response, RawResponse) else response.status_code
    assert status_code == status, response
    body = response.json()
    assert isinstance(body, dict) and body["error"] == error and (body.get("reason") or body.get("parameter")), body
    return body


@contextlib.contextmanager
def cli_server(*flags: str, max_descriptors: int | None = None) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """`python -m sse_lab serve --port 0 FLAGS` in a child, its descriptor limit lowered if asked.

    Yields the process, its URL and the file its stderr goes to.
    """
    limit = "" if max_descriptors is None else f"resource.setrlimit(resource.RLIMIT_NOFILE, ({max_descriptors},) * 2); "
    code = f"import resource, sys; {limit}from sse_lab.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "serve", "--port", "0", *flags]
    with tempfile.TemporaryDirectory(prefix="sse-lab-hardening-") as directory:
        stderr_path = Path(directory) / "stderr"
        with (
            stderr_path.open("w") as stderr,
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            ) as process,
        ):
            try:
                assert process.stdout is not None
                banner = process.stdout.readline()
                url = re.search(r"http://127\.0\.0\.1:\d+", banner)
                assert url, f"no URL in {banner!r}: {stderr_path.read_text()}"
                yield process, url.group(), stderr_path
            finally:
                process.terminate()
                process.wait(10)


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def half_sent(url: str, count: int, data: bytes = b"GET /api/chat/stream?prompt=h") -> list[socket.socket]:
    socks = [socket.create_connection(address(url)) for _ in range(count)]
    for sock in socks:
        sock.sendall(data)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(65536, socket.MSG_PEEK) is not None  # data (an answer) or b"" (EOF)
    except BlockingIOError:
        return False
    except OSError:
        return True


# 1. Request heads of any size were accepted and held in memory.


@linux_only
def test_oversized_request_head_is_refused_and_memory_does_not_grow() -> None:
    with cli_server() as (process, url, _):
        before = peak_rss_kib(process.pid)
        sock = socket.create_connection(address(url))
        sock.sendall(b"GET /api/stats HTTP/1.1\r\nHost: lab\r\nX-Big: ")
        block, sent = b"a" * (1 << 20), 0
        with contextlib.suppress(OSError):  # refused while sending
            while sent < 64 << 20 and not closed_by_server(sock):
                sock.setblocking(True)
                sock.sendall(block)
                sent += len(block)
        sock.setblocking(True)
        response = read_response(sock)
        sock.close()
        body = assert_json_error(response, 431, "request_head_too_large")
        assert str(Settings().max_request_head_bytes) in body["reason"]
        assert sent < 8 << 20  # refused after the limit (141 KiB), not after 64 MiB
        assert peak_rss_kib(process.pid) - before < 16 * 1024  # before the fix: +370 MB for 200 MB


def test_longest_valid_request_fits_under_the_head_limit(server: BackgroundServer) -> None:
    """Issue 8: the kit's own limits (prompt, blocklist) are reached before any limit of the HTTP layer."""
    settings = Settings()
    longest_prompt = "🌊" * settings.max_prompt_chars  # 4 bytes of UTF-8: 12 bytes percent-encoded
    query = {
        "prompt": longest_prompt,
        "blocklist": "\U0001d535" * MAX_BLOCKLIST_CHARS,  # 4 bytes of UTF-8
        "model": "sim",
        "max_tokens": "4096",
        "ttft_ms": "0",
        "token_ms": "0.00000000000000000001",
        "jitter_ms": "0.00000000000000000000",
        "seed": "4294967295",
        "heartbeat_s": "3600.00000000000000000000",
        "context_window": "8192",
        "fail_after": "4096",
        "last_event_id": "4094",
    }
    target = "/api/chat/stream?" + "&".join(f"{quote(name)}={quote(value, safe='')}" for name, value in query.items())
    headers = {"Last-Event-ID": "4094", "Cookie": "c" * (HEADERS_ROOM_BYTES - 1024)}
    data = request_bytes(target, headers=headers)
    assert len(data) < settings.max_request_head_bytes
    response = exchange(server.url, data)
    assert response.status == 200, response
    assert [event.event for event in Decoder().feed(response.body)] == ["token", "done"]  # token 4095, then done

    one_more = target.replace("prompt=", "prompt=%F0%9F%8C%8A", 1)
    body = assert_json_error(exchange(server.url, request_bytes(one_more, headers=headers)), 422, "invalid_parameter")
    assert body["parameter"] == "prompt" and "more than the limit of 8000" in body["reason"]


def test_a_100000_character_prompt_gets_the_json_422_not_a_plain_400(server: BackgroundServer) -> None:
    """Issue 8: uvicorn's httptools refused URLs over 64 KiB with a plain-text 400 before the app could answer."""
    response = exchange(server.url, request_bytes("/api/chat?prompt=" + "a" * 100_000))  # too long for httpx
    body = assert_json_error(response, 422, "invalid_parameter")
    assert body["parameter"] == "prompt" and "100000 characters" in body["reason"]


def test_a_prompt_too_long_even_for_the_request_head_gets_a_json_431(server: BackgroundServer) -> None:
    response = exchange(server.url, request_bytes("/api/chat?prompt=" + "%F0%9F%8C%8A" * 100_000))
    assert "POST body" in assert_json_error(response, 431, "request_head_too_large")["reason"]


def test_head_limit_follows_the_prompt_limit() -> None:
    app = create_app(Settings(max_prompt_chars=20_000, defaults=FAST))
    with serve_in_background(app) as big:
        response = exchange(big.url, request_bytes("/api/chat?max_tokens=1&prompt=" + "%F0%9F%8C%8A" * 20_000))
        assert response.status == 200, response


def test_many_requests_on_one_connection_each_get_a_fresh_head_limit(server: BackgroundServer) -> None:
    with httpx.Client(trust_env=False) as client:
        for _ in range(5):
            params = {"prompt": "a" * 7_000, "max_tokens": 1, "ttft_ms": 0}
            assert client.get(server.url + "/api/chat", params=params).status_code == 200


# 2. Half-sent requests were never closed; descriptor exhaustion filled the log.


def test_half_sent_requests_are_answered_408_and_closed_after_the_header_timeout() -> None:
    with serve_in_background(create_app(Settings(header_timeout_s=0.3))) as quick:
        socks = half_sent(quick.url, 20)
        idle = socket.create_connection(address(quick.url))
        try:
            wait_for(lambda: all(closed_by_server(sock) for sock in [*socks, idle]), 5, "the server to close them")
            for sock in socks:
                sock.setblocking(True)
                assert_json_error(read_response(sock), 408, "request_timeout")
            idle.setblocking(True)
            assert read_response(idle).status is None  # sent nothing: closed without an answer
        finally:
            for sock in [*socks, idle]:
                sock.close()


def test_a_slow_but_timely_request_head_is_served() -> None:
    with serve_in_background(create_app(Settings(header_timeout_s=1.0, defaults=FAST))) as quick:
        data = request_bytes("/api/chat?prompt=hi&max_tokens=2")
        with socket.create_connection(address(quick.url)) as sock:
            for piece in (data[:10], data[10:30], data[30:]):
                sock.sendall(piece)
                time.sleep(0.1)  # pacing the client's bytes, not synchronisation
            assert read_response(sock).status == 200


def test_keep_alive_connection_with_a_half_sent_second_request_is_closed() -> None:
    quick = serve_in_background(create_app(Settings(header_timeout_s=0.3, defaults=FAST)))
    with quick, socket.create_connection(address(quick.url)) as sock:
        sock.sendall(b"GET /api/stats HTTP/1.1\r\nHost: lab\r\n\r\n")
        assert read_response(sock).status == 200
        sock.sendall(b"GET /api/st")
        assert_json_error(read_response(sock), 408, "request_timeout")


@linux_only
def test_half_sent_requests_release_their_descriptors_after_the_header_timeout() -> None:
    with cli_server("--header-timeout-s", "0.5") as (process, url, _):
        before = open_descriptors(process.pid)
        socks = half_sent(url, 200)
        try:
            wait_for(lambda: open_descriptors(process.pid) >= before + 200, 5, "the server to accept them all")
            wait_for(lambda: open_descriptors(process.pid) <= before, 10, "the server to close them all")
        finally:
            for sock in socks:
                sock.close()


@linux_only
def test_descriptor_exhaustion_is_logged_once_per_window_and_serving_resumes() -> None:
    with cli_server("--header-timeout-s", "0.5", max_descriptors=64) as (_, url, stderr):
        kept = httpx.Client(trust_env=False)  # a keep-alive connection opened before the shortage
        assert kept.get(url + "/api/stats").status_code == 200
        socks = half_sent(url, 100)  # more than the server has descriptors for
        try:
            wait_for(lambda: "cannot accept connections" in stderr.read_text(), 10, "the exhaustion to be logged")
            assert kept.get(url + "/api/stats").status_code == 200  # open connections are still served
            wait_for(lambda: all(closed_by_server(sock) for sock in socks), 30, "every half-sent request closed")
        finally:
            kept.close()
            for sock in socks:
                sock.close()
        response = httpx.get(url + "/api/chat", params={"prompt": "hi", "max_tokens": 2, "ttft_ms": 0}, trust_env=False)
        assert response.status_code == 200
        log = stderr.read_text()
    assert "Traceback" not in log
    assert 1 <= log.count("cannot accept connections") <= 2, log  # one line per 10 s window


def test_header_timeout_flag_sets_the_timeout() -> None:
    with cli_server("--header-timeout-s", "0.2") as (_, url, _):
        started = time.monotonic()
        response = exchange(url, b"GET /api/chat?prompt=hi HTTP/1.1\r\nHost: l", timeout_s=10)
        assert_json_error(response, 408, "request_timeout")
        assert time.monotonic() - started < 3


# 3. The buffered endpoint had no bounds.


def test_buffered_endpoint_has_the_streams_concurrency_limit_and_time_limit() -> None:
    app = create_app(Settings(max_concurrent_streams=2, max_stream_s=0.5))
    with serve_in_background(app) as limited:
        slow = {"prompt": "hi", "ttft_ms": 60_000}
        answers: list[httpx.Response] = []
        clients = [
            threading.Thread(
                target=lambda: answers.append(
                    httpx.get(limited.url + "/api/chat", params=slow, timeout=10, trust_env=False)
                )
            )
            for _ in range(2)
        ]
        for client in clients:
            client.start()
        wait_for(lambda: stats(limited)["chats_active"] == 2, 5, "two answers in progress")
        refused = httpx.get(limited.url + "/api/chat", params=slow, trust_env=False)
        assert_json_error(refused, 429, "too_many_chats")
        assert refused.headers["retry-after"] == "1"
        for client in clients:
            client.join(10)
        for answer in answers:
            assert "longer than the limit of 0.5 s" in assert_json_error(answer, 504, "timeout")["reason"]
        counters = stats(limited)
    assert counters["chats_active"] == 0
    assert (counters["chats_rejected"], counters["chats_failed"], counters["chats_completed"]) == (1, 2, 0)
    assert counters["streams_rejected"] == 0  # the stream counters are the streams' own


def test_buffered_answers_within_the_limits_are_counted(server: BackgroundServer) -> None:
    before = stats(server)["chats_completed"]
    params = {"prompt": "hi", "max_tokens": 3, "ttft_ms": 0, "token_ms": 0}
    assert httpx.get(server.url + "/api/chat", params=params, trust_env=False).json()["tokens"] == 3
    assert stats(server)["chats_completed"] == before + 1


# 4. Number parameters accepted more than ASCII digits.

NOT_ASCII_DECIMAL = [
    "\u0663",
    "\uff13",
    "1_0",
    "+3",
    "-0",
    " 3",
    "3 ",
    "03",
    "0x10",
    "1e3",
    "3.",
    ".5",
    "\u00b2",
    "\u0969",
    "3\u00a0",
]


@pytest.mark.parametrize("raw", NOT_ASCII_DECIMAL)
@pytest.mark.parametrize("name", ["max_tokens", "ttft_ms", "seed", "context_window", "heartbeat_s", "fail_after"])
def test_number_parameters_accept_ascii_decimal_only(server: BackgroundServer, name: str, raw: str) -> None:
    response = httpx.get(server.url + "/api/chat/stream", params={"prompt": "hi", name: raw}, trust_env=False)
    body = assert_json_error(response, 422, "invalid_parameter")
    assert body["parameter"] == name and "ASCII digits" in body["reason"]


@pytest.mark.parametrize(("name", "raw"), [("max_tokens", "10"), ("ttft_ms", "0"), ("token_ms", "2.5"), ("seed", "0")])
def test_plain_ascii_decimals_are_accepted(server: BackgroundServer, name: str, raw: str) -> None:
    params = {"prompt": "hi", "max_tokens": "2", "ttft_ms": "0", "token_ms": "0", name: raw}
    assert httpx.get(server.url + "/api/chat", params=params, trust_env=False).status_code == 200


def test_integer_bounds_are_printed_as_integers(server: BackgroundServer) -> None:
    """Issue 8: `seed=-5` said 'from 0 to 4.29497e+09'."""
    response = httpx.get(server.url + "/api/chat", params={"prompt": "hi", "seed": "-5"}, trust_env=False)
    assert "an integer from 0 to 4294967295 " in assert_json_error(response, 422, "invalid_parameter")["reason"]


# 5. HEAD took a stream slot and ran the model.


@pytest.mark.parametrize(("path", "media_type"), [("/api/chat/stream", "text/event-stream"), ("/api/chat", "json")])
def test_head_answers_without_starting_a_generation(server: BackgroundServer, path: str, media_type: str) -> None:
    before = stats(server)
    params = {"prompt": "hi", "ttft_ms": 60_000}
    response = httpx.head(server.url + path, params=params, trust_env=False, timeout=5)
    assert response.status_code == 200 and media_type in response.headers["content-type"]
    assert response.content == b""
    after = stats(server)
    assert after["streams_active"] == after["chats_active"] == 0
    assert after["tokens_generated"] == before["tokens_generated"]
    bad = httpx.head(server.url + path, params={"prompt": "hi", "seed": "x"}, trust_env=False)
    assert bad.status_code == 422  # validated as a GET would be


# 6. The Host header was copied into redirects.


def test_slash_redirect_does_not_copy_the_host_header(server: BackgroundServer) -> None:
    data = b"GET /api/chat/?prompt=hi HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    response = exchange(server.url, data)
    assert response.status == 307
    assert response.headers["location"] == "/api/chat?prompt=hi"
    assert "evil" not in response.headers["location"]


def test_a_path_with_no_route_either_way_is_a_json_404(server: BackgroundServer) -> None:
    response = httpx.get(server.url + "//evil.example/", trust_env=False)
    assert (response.status_code, response.json()) == (404, {"error": "Not Found"})


# 7. Security headers.


def test_every_response_has_nosniff_and_no_server_banner(server: BackgroundServer) -> None:
    fast = "prompt=hi&max_tokens=1&ttft_ms=0"
    responses = {
        "stream": exchange(server.url, request_bytes(f"/api/chat/stream?{fast}")),
        "buffered": exchange(server.url, request_bytes(f"/api/chat?{fast}")),
        "stats": exchange(server.url, request_bytes("/api/stats")),
        "422": exchange(server.url, request_bytes("/api/chat?seed=x")),
        "404": exchange(server.url, request_bytes("/nope")),
        "405": exchange(server.url, request_bytes("/api/chat", method="DELETE")),
        "400": exchange(server.url, b"NOT HTTP AT ALL\r\n\r\n"),
        "431": exchange(server.url, request_bytes("/api/stats", headers={"X": "x" * 200_000})),
    }
    for name, response in responses.items():
        assert response.headers.get("x-content-type-options") == "nosniff", name
        assert "server" not in response.header_names, name


# 8. A stream cut by a stop ended without any sign.


def test_stream_cut_by_shutdown_ends_with_a_comment_and_no_event() -> None:
    running = serve_in_background()
    params = {"prompt": "hi", "max_tokens": 50, "ttft_ms": 0, "token_ms": 50}
    with httpx.stream("GET", running.url + "/api/chat/stream", params=params, trust_env=False) as response:
        chunks = response.iter_raw()
        received = next(chunks) + next(chunks)  # the retry line, then a token or two
        running.stop()
        received += b"".join(chunks)  # ends without an error: a clean end of the body
    assert received.endswith(b"\n: server stopping\n")
    events = Decoder().feed(received)
    assert events and {event.event for event in events} == {"token"}  # no done, no error: the client resumes


def test_a_buffered_request_cut_by_shutdown_gets_a_json_503() -> None:
    running = serve_in_background()
    answer: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answer.append(
            httpx.get(running.url + "/api/chat", params={"prompt": "hi", "ttft_ms": 60_000}, trust_env=False)
        )
    )
    client.start()
    wait_for(lambda: stats(running)["chats_active"] == 1, 5, "the answer to start")
    running.stop()
    client.join(5)
    assert_json_error(answer[0], 503, "server_stopping")


def test_a_stream_cut_by_shutdown_resumes_on_the_next_instance() -> None:
    """The reason for no `error` event: the client reconnects, and whichever instance answers resumes exactly."""
    fast_retry = Settings(retry_ms=50)
    instances = [serve_in_background(create_app(fast_retry))]
    port = instances[0].port
    seen: list[str] = []

    def replace_the_server(token: str) -> None:
        seen.append(token)
        if len(seen) == 5:
            instances[0].stop()
            instances.append(serve_in_background(create_app(fast_retry), port=port))

    try:
        result = stream_chat(instances[0].url, "hi", on_token=replace_the_server, max_tokens=20, ttft_ms=0, token_ms=20)
    finally:
        for instance in instances:
            instance.stop()
    assert result.error is None and result.text == "".join(sim_tokens("hi", 20))
    (drop,) = result.drops
    assert drop.resumed_at is not None and int(drop.last_event_id) >= 4


def test_a_request_body_still_arriving_after_the_answer_does_not_hold_the_connection(server: BackgroundServer) -> None:
    with socket.create_connection(address(server.url)) as sock:
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: lab\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100)
        response = read_response(sock)
        assert (response.status, response.json()) == (405, {"error": "Method Not Allowed"})
        started = time.monotonic()
        with contextlib.suppress(OSError):  # trickling on, as a slow-loris client would
            while not closed_by_server(sock) and time.monotonic() - started < 10:
                sock.setblocking(True)
                sock.sendall(b"x")
                time.sleep(0.1)  # the client's pace, not synchronisation
        assert time.monotonic() - started < 5  # closed after the answer (and 1 s of lingering), not held
