from __future__ import annotations

import gc
import socket
import tempfile
from pathlib import Path

import pytest

from sse_lab.parts import redis as redis_module
from sse_lab.parts.nginx import REQUIRE_SYSTEM_PARTS_ENV
from sse_lab.parts.redis import SKIP_MESSAGE, RedisNotFoundError, RedisStartError, redis_or_skip, start_redis
from tests.parts.test_nginx import alive


@pytest.fixture(autouse=True)
def redis_binary() -> None:
    if redis_or_skip() is None:
        pytest.skip(SKIP_MESSAGE)


def redis_directories() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("sse-lab-redis-*"))


def ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
        connection.sendall(b"PING\r\n")
        return connection.recv(64)


def test_redis_answers_on_loopback_and_stopping_removes_process_and_directory() -> None:
    before = redis_directories()
    with start_redis() as server:
        assert ping(server.port) == b"+PONG\r\n"
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.directory in redis_directories() - before
        pid = server.pid
    assert not alive(pid)
    assert redis_directories() == before


def test_redis_keeps_nothing_on_disk() -> None:
    with start_redis() as server, socket.create_connection(("127.0.0.1", server.port), timeout=2) as connection:
        connection.sendall(b"CONFIG GET save\r\nCONFIG GET appendonly\r\n")
        reply = b""
        while reply.count(b"\r\n") < 10:
            reply += connection.recv(256)
    assert b"$4\r\nsave\r\n$0\r\n" in reply
    assert b"appendonly\r\n$2\r\nno" in reply


def test_a_redis_handle_dropped_without_stop_is_stopped_by_garbage_collection() -> None:
    server = start_redis()
    pid, directory = server.pid, server.directory
    del server
    gc.collect()
    assert not alive(pid)
    assert not directory.exists()


def test_a_redis_that_cannot_start_leaves_no_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    before = redis_directories()
    monkeypatch.setattr(redis_module, "find_redis", lambda: "/bin/false")
    with pytest.raises(RedisStartError, match="exited with status 1"):
        start_redis()
    assert redis_directories() == before


def test_missing_redis_skips_with_one_line_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(redis_module, "find_redis", lambda: None)
    monkeypatch.delenv(REQUIRE_SYSTEM_PARTS_ENV, raising=False)
    assert redis_or_skip() is None
    assert capsys.readouterr().out == SKIP_MESSAGE + "\n"
    monkeypatch.setenv(REQUIRE_SYSTEM_PARTS_ENV, "1")
    with pytest.raises(RedisNotFoundError, match="required"):
        redis_or_skip()
    with pytest.raises(RedisNotFoundError):
        start_redis()
