from __future__ import annotations

import re

import httpx
from httpx_sse import connect_sse
from starlette.types import Receive, Scope, Send

from sse_lab import create_app, serve_in_background
from sse_lab.access_log import AccessLog
from tests.conftest import wait_for


def test_a_client_that_leaves_is_logged_with_the_tokens_it_was_sent() -> None:
    log: list[str] = []
    with serve_in_background(AccessLog(create_app(), log.append)) as running, httpx.Client(trust_env=False) as client:
        params = {"prompt": "hi", "max_tokens": 100, "ttft_ms": 0, "token_ms": 20}
        with connect_sse(client, "GET", running.url + "/api/chat/stream", params=params) as source:
            stream = source.iter_sse()
            for _ in range(3):
                next(stream)
        wait_for(lambda: log, what="the log line of the abandoned stream")
    tokens = int(re.search(r" (\d+) tokens$", log[0]).group(1))  # type: ignore[union-attr]
    assert 3 <= tokens < 50  # what was sent before the server noticed the client leave, far from 100


def test_an_app_that_fails_before_answering_is_logged_with_500() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("no answer")

    log: list[str] = []
    with serve_in_background(AccessLog(broken, log.append)) as running:
        assert httpx.get(running.url + "/anything", trust_env=False).status_code == 500
        wait_for(lambda: log, what="the log line")
    assert re.fullmatch(r'127\.0\.0\.1:\d+ "GET /anything HTTP/1\.1" 500 \d+\.\d{3} s 0 tokens', log[0])
