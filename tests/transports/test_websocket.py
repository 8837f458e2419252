from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from sse_lab import BackgroundServer, GenerationRequest, Settings, create_app, serve_in_background
from sse_lab.model import sim_tokens
from sse_lab.transports.websocket import websocket_url, ws_chat
from tests.conftest import wait_for


def stats(server: BackgroundServer) -> dict[str, int]:
    return httpx.get(server.url + "/api/stats", trust_env=False).json()


@contextlib.contextmanager
def open_chat(server: BackgroundServer, **params: object) -> Iterator[ClientConnection]:
    with connect(websocket_url(server.url), proxy=None) as websocket:
        websocket.send(json.dumps(params))
        yield websocket


def receive_all(websocket: ClientConnection) -> list[dict]:
    """Every message until the server closes; the close code is then in websocket.close_code."""
    messages = []
    try:
        while True:
            messages.append(json.loads(websocket.recv(5)))
    except ConnectionClosed:
        return messages


def test_websocket_sends_a_message_per_token_then_done_and_closes_1000(server: BackgroundServer) -> None:
    with open_chat(server, prompt="hi", max_tokens=5, ttft_ms=0, token_ms=0, seed=3) as websocket:
        *tokens, done = receive_all(websocket)
    assert [message["type"] for message in tokens] == ["token"] * 5
    assert [message["index"] for message in tokens] == list(range(5))
    assert [message["token"] for message in tokens] == sim_tokens("hi", 5, seed=3)
    assert done == {"type": "done", "finish_reason": "length", "tokens": 5}
    assert websocket.close_code == 1000


def test_websocket_echo_returns_the_prompt_exactly(server: BackgroundServer) -> None:
    prompt = "line\nbreak é 🌊 日本\r\n  and: more"
    result = ws_chat(server.url, prompt, model="echo", max_tokens=100, ttft_ms=0, token_ms=0)
    assert result.text == prompt and result.finish_reason == "stop"


@pytest.mark.parametrize(
    ("message", "parameter"),
    [
        ({"prompt": "hi", "token_ms": "abc"}, "token_ms"),
        ({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
        ({"max_tokens": 5}, "prompt"),
        ({"prompt": "hi", "model": "nope"}, "model"),
        ({"prompt": "hi", "colour": "red"}, "colour"),
        ({"prompt": "hi", "seed": True}, "seed"),
        (["not", "an", "object"], "message"),
    ],
)
def test_a_bad_first_message_gets_an_invalid_parameter_error_and_close_1008(
    server: BackgroundServer, message: object, parameter: str
) -> None:
    with connect(websocket_url(server.url), proxy=None) as websocket:
        websocket.send(json.dumps(message))
        (error,) = receive_all(websocket)
    assert error["type"] == "error" and error["code"] == "invalid_parameter"
    assert error["parameter"] == parameter and error["reason"]
    assert websocket.close_code == 1008


def test_a_first_message_that_is_not_json_gets_close_1008(server: BackgroundServer) -> None:
    with connect(websocket_url(server.url), proxy=None) as websocket:
        websocket.send("prompt=hi")
        (error,) = receive_all(websocket)
    assert error["parameter"] == "message" and websocket.close_code == 1008


def test_a_model_failure_after_the_start_is_an_error_message_then_close_1000() -> None:
    async def failing(request: GenerationRequest):
        yield "one"
        raise RuntimeError("boom")

    with (
        serve_in_background(create_app(models={"failing": failing})) as running,
        open_chat(running, prompt="hi", model="failing") as websocket,
    ):
        token, error = receive_all(websocket)
    assert token["token"] == "one"
    assert error == {"type": "error", "code": "model_error", "message": "the model failed after 1 tokens"}
    assert websocket.close_code == 1000


def test_a_cancel_message_while_streaming_stops_the_model() -> None:
    with serve_in_background() as running:
        with open_chat(running, prompt="hi", max_tokens=200, ttft_ms=0, token_ms=10) as websocket:
            first = json.loads(websocket.recv(5))
            websocket.send(json.dumps({"type": "cancel"}))
            rest = receive_all(websocket)
        wait_for(lambda: stats(running)["streams_active"] == 0, what="the cancelled stream to end")
        counters = stats(running)
    assert first["index"] == 0
    assert rest[-1]["type"] == "done" and rest[-1]["finish_reason"] == "cancelled"
    assert rest[-1]["tokens"] == 1 + len(rest) - 1  # every token sent is counted
    assert websocket.close_code == 1000
    assert counters["streams_cancelled"] == 1 and counters["tokens_generated"] < 20


def test_a_client_that_leaves_stops_the_model() -> None:
    with serve_in_background() as running:
        with open_chat(running, prompt="hi", max_tokens=400, ttft_ms=0, token_ms=10) as websocket:
            for _ in range(3):
                websocket.recv(5)
        wait_for(lambda: stats(running)["streams_active"] == 0, what="the abandoned stream to end")
        generated = stats(running)["tokens_generated"]
        time.sleep(0.1)  # not a synchronisation: the model must stay stopped over a span of 10 token times
        counters = stats(running)
    assert counters["streams_cancelled"] == 1 and counters["tokens_wasted"] == 0
    assert counters["tokens_generated"] == generated < 10


def test_a_client_that_leaves_during_the_prefill_stops_the_model() -> None:
    with serve_in_background() as running:
        with open_chat(running, prompt="hi", ttft_ms=60_000):
            wait_for(lambda: stats(running)["streams_active"] == 1, what="the stream to start")
        wait_for(lambda: stats(running)["streams_active"] == 0, what="the abandoned prefill to stop")
        assert stats(running)["streams_cancelled"] == 1


def test_websocket_streams_share_the_apps_slots() -> None:
    with serve_in_background(create_app(Settings(max_concurrent_streams=1))) as running:
        with open_chat(running, prompt="hi", ttft_ms=60_000):
            wait_for(lambda: stats(running)["streams_active"] == 1, what="the first stream to start")
            with open_chat(running, prompt="hi") as second:
                (refusal,) = receive_all(second)
        assert refusal["code"] == "too_many_streams" and second.close_code == 1013
        assert stats(running)["streams_rejected"] == 1


def test_websocket_tokens_arrive_one_by_one_on_the_models_schedule(server: BackgroundServer) -> None:
    result = ws_chat(server.url, "hi", max_tokens=10, ttft_ms=100, token_ms=20)
    assert result.tokens == 10 and result.lumps == [1] * 10
    assert result.ttft is not None and 0.1 <= result.ttft < 0.5
    assert 0.1 < result.e2e - result.ttft < 0.5  # type: ignore[operator]


def test_stopping_the_server_with_a_websocket_open_is_quick_and_quiet() -> None:
    running = serve_in_background()
    with open_chat(running, prompt="hi", ttft_ms=60_000) as websocket:
        wait_for(lambda: stats(running)["streams_active"] == 1, what="the stream to start")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            started = time.perf_counter()
            running.stop()
            assert time.perf_counter() - started < 1.0
        with pytest.raises(ConnectionClosed):
            websocket.recv(5)
        assert websocket.close_code == 1012  # service restart


def test_a_client_that_closes_as_soon_as_done_arrives_causes_no_server_traceback(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        for _ in range(20):  # the client's close races the server's: both orders must be quiet
            with open_chat(server, prompt="hi", max_tokens=2, ttft_ms=0, token_ms=0) as websocket:
                while json.loads(websocket.recv(5))["type"] == "token":
                    pass
        wait_for(lambda: stats(server)["streams_active"] == 0, what="the streams to end")
        # a round trip more, so that a late close on the server side has been handled
        assert ws_chat(server.url, "hi", max_tokens=1, ttft_ms=0).finish_reason == "length"
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
