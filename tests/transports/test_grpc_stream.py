from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from sse_lab import GenerationRequest, Settings
from sse_lab.model import sim_tokens
from sse_lab.transports import chat_pb2_grpc
from sse_lab.transports.grpc_stream import CLIENT_OPTIONS, GrpcServer, chat_request, grpc_chat, serve_grpc_in_background
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[GrpcServer]:
    with serve_grpc_in_background() as running:
        yield running


def test_the_stream_yields_every_token_in_order_then_ends_ok_with_the_finish_reason(grpc_server: GrpcServer) -> None:
    result = grpc_chat(grpc_server.target, "hi", max_tokens=8, ttft_ms=0, token_ms=0, seed=2)
    assert result.text == "".join(sim_tokens("hi", 8, seed=2)) and result.tokens == 8
    assert result.finish_reason == "length" and result.error is None


def test_the_stream_delivers_tokens_one_by_one_on_the_models_schedule(grpc_server: GrpcServer) -> None:
    result = grpc_chat(grpc_server.target, "hi", max_tokens=10, ttft_ms=100, token_ms=20)
    assert result.lumps == [1] * 10 and result.ttft is not None and 0.1 <= result.ttft < 0.5


def test_echo_survives_the_trip_byte_for_byte(grpc_server: GrpcServer) -> None:
    prompt = "line\nbreak é 🌊 日本\r\n nul\0byte"
    assert grpc_chat(grpc_server.target, prompt, model="echo", max_tokens=50, ttft_ms=0, token_ms=0).text == prompt


@pytest.mark.parametrize(
    ("params", "parameter"),
    [({"max_tokens": 5000}, "max_tokens"), ({"model": "nope"}, "model"), ({"token_ms": 1e9}, "token_ms")],
)
def test_a_bad_request_is_invalid_argument_naming_the_parameter(
    grpc_server: GrpcServer, params: dict, parameter: str
) -> None:
    result = grpc_chat(grpc_server.target, "hi", **params)
    assert result.error is not None and result.error["code"] == "INVALID_ARGUMENT"
    assert result.error["parameter"] == parameter and result.tokens == 0


def test_a_model_failure_after_the_start_is_aborted_with_its_error_code() -> None:
    async def failing(request: GenerationRequest):
        yield "one"
        raise RuntimeError("boom")

    with serve_grpc_in_background(models={"failing": failing}) as running:
        result = grpc_chat(running.target, "hi", model="failing")
        # the status reaches the client before the handler has unwound and counted it
        wait_for(lambda: running.stats()["streams_failed"] == 1, what="the failed stream to be counted")
    assert result.text == "one" and result.error is not None
    assert result.error["code"] == "ABORTED" and result.error["error-code"] == "model_error"


def test_cancelling_the_call_stops_the_model() -> None:
    with (
        serve_grpc_in_background() as running,
        grpc.insecure_channel(running.target, options=CLIENT_OPTIONS) as channel,
    ):
        call = chat_pb2_grpc.ChatStub(channel).Stream(chat_request("hi", max_tokens=400, ttft_ms=0, token_ms=10))
        next(call)
        call.cancel()
        wait_for(lambda: running.stats()["streams_active"] == 0, what="the cancelled stream to end")
        generated = running.stats()["tokens_generated"]
        time.sleep(0.1)  # not a synchronisation: the model must stay stopped over a span of 10 token times
        counters = running.stats()
    assert counters["streams_cancelled"] == 1 and counters["tokens_generated"] == generated < 10


def test_every_slot_taken_is_resource_exhausted() -> None:
    with serve_grpc_in_background(Settings(max_concurrent_streams=1)) as running:
        with grpc.insecure_channel(running.target, options=CLIENT_OPTIONS) as channel:
            holding = chat_pb2_grpc.ChatStub(channel).Stream(chat_request("hi", ttft_ms=60_000))
            wait_for(lambda: running.stats()["streams_active"] == 1, what="the first stream to start")
            result = grpc_chat(running.target, "hi")
            holding.cancel()
        assert result.error is not None and result.error["code"] == "RESOURCE_EXHAUSTED"


def test_the_server_binds_loopback_and_stops_quickly_with_a_stream_open() -> None:
    running = serve_grpc_in_background()
    assert running.target.startswith("127.0.0.1:")
    with grpc.insecure_channel(running.target, options=CLIENT_OPTIONS) as channel:
        call = chat_pb2_grpc.ChatStub(channel).Stream(chat_request("hi", ttft_ms=60_000))
        wait_for(lambda: running.stats()["streams_active"] == 1, what="the stream to start")
        started = time.perf_counter()
        running.stop()
        assert time.perf_counter() - started < 2.0
        with pytest.raises(grpc.RpcError):
            next(call)
