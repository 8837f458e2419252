from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import shutil
import socket
import statistics
import subprocess
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from httpx_sse import connect_sse
from hypothesis import given, settings
from hypothesis import strategies as st
from jupyter_client.manager import start_new_kernel

from sse_lab import (
    BackgroundServer,
    GenerationRequest,
    Settings,
    TokenSource,
    create_app,
    serve_in_background,
    sim,
    stream_chat,
)
from tests.conftest import NASTY_PROMPTS, wait_for
from tests.raw_http import address, exchange, read_response, request_bytes


def events(url: str, **params: object) -> list[tuple[str, str, dict]]:
    with httpx.Client(trust_env=False) as client, connect_sse(client, "GET", url, params=params) as source:
        return [(sse.event, sse.id, json.loads(sse.data)) for sse in source.iter_sse()]


def test_stream_sends_a_token_event_per_token_then_done(server: BackgroundServer) -> None:
    received = events(server.url + "/api/chat/stream", prompt="hi", max_tokens=5, ttft_ms=0, token_ms=0)
    tokens, (done,) = received[:-1], received[-1:]
    assert [(event, event_id, data["index"]) for event, event_id, data in tokens] == [
        ("token", str(index), index) for index in range(5)
    ]
    assert done == ("done", "4", {"finish_reason": "length", "tokens": 5})


def test_stream_headers_forbid_caching_and_proxy_buffering(server: BackgroundServer) -> None:
    params = {"prompt": "hi", "max_tokens": 1, "ttft_ms": 0}
    response = httpx.get(server.url + "/api/chat/stream", params=params, trust_env=False)
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"


def test_tokens_reach_the_client_as_they_are_produced(server: BackgroundServer) -> None:
    result = stream_chat(server.url, "hi", max_tokens=5, ttft_ms=0, token_ms=100)
    # 400 ms between the first and the last token, spread out, not in one lump.
    assert result.arrivals[-1] - result.arrivals[0] > 0.3
    assert statistics.median(result.itl) > 0.05
    assert result.ttft is not None and result.ttft < result.arrivals[-1] - result.arrivals[0]


def test_each_event_leaves_the_server_in_its_own_write(server: BackgroundServer) -> None:
    params = {"prompt": "hi", "max_tokens": 4, "ttft_ms": 0, "token_ms": 60}
    with httpx.stream("GET", server.url + "/api/chat/stream", params=params, trust_env=False) as response:
        chunks = [(time.perf_counter(), chunk) for chunk in response.iter_raw()]
    token_chunks = [(at, chunk) for at, chunk in chunks if chunk.startswith(b"event: token")]
    assert [chunk.count(b"event: ") for _, chunk in token_chunks] == [1, 1, 1, 1]
    assert token_chunks[-1][0] - token_chunks[0][0] > 0.1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_prints_events_as_they_are_produced(server: BackgroundServer) -> None:
    url = server.url + "/api/chat/stream?prompt=hi&max_tokens=4&ttft_ms=0&token_ms=100"
    with subprocess.Popen(["curl", "-sN", "--max-time", "10", url], stdout=subprocess.PIPE) as curl:
        data_lines = [(time.perf_counter(), line) for line in curl.stdout if line.startswith(b"data: ")]
    assert curl.returncode == 0 and len(data_lines) == 5  # four tokens and done
    assert data_lines[3][0] - data_lines[0][0] > 0.2  # 300 ms apart when produced


def test_buffered_endpoint_returns_the_same_text_at_once(server: BackgroundServer) -> None:
    params = {"prompt": "same", "max_tokens": 12, "ttft_ms": 0, "token_ms": 0, "seed": 3}
    body = httpx.get(server.url + "/api/chat", params=params, trust_env=False).json()
    streamed = "".join(data["token"] for event, _, data in events(server.url + "/api/chat/stream", **params)[:-1])
    assert body == {"text": streamed, "tokens": 12, "finish_reason": "length"}


@pytest.mark.parametrize("prompt", NASTY_PROMPTS)
def test_echo_survives_the_wire_exactly(server: BackgroundServer, prompt: str) -> None:
    received = events(server.url + "/api/chat/stream", prompt=prompt, model="echo", ttft_ms=0, token_ms=0)
    assert "".join(data["token"] for event, _, data in received if event == "token") == prompt
    assert received[-1][2]["finish_reason"] == "stop"


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_echo_survives_any_prompt(prompt: str) -> None:
    """Content only, so an in-memory transport is fine here."""

    async def echoed() -> str:
        transport = httpx.ASGITransport(app=create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://lab") as client:
            params = {"prompt": prompt, "model": "echo", "max_tokens": 4096, "ttft_ms": 0, "token_ms": 0}
            response = await client.get("/api/chat", params=params)
            return response.json()["text"]

    assert asyncio.run(echoed()) == prompt


BAD_REQUESTS = [
    ({}, "prompt", "required"),
    ({"prompt": "x" * 8001}, "prompt", "limit"),
    ({"prompt": "hi", "model": "gpt-9"}, "model", "unknown model"),
    ({"prompt": "hi", "max_tokens": "0"}, "max_tokens", "from 1 to"),
    ({"prompt": "hi", "max_tokens": "4097"}, "max_tokens", "from 1 to"),
    ({"prompt": "hi", "max_tokens": "2.5"}, "max_tokens", "integer"),
    ({"prompt": "hi", "token_ms": "abc"}, "token_ms", "number"),
    ({"prompt": "hi", "token_ms": "-1"}, "token_ms", "from 0"),
    ({"prompt": "hi", "ttft_ms": "nan"}, "ttft_ms", "number"),
    ({"prompt": "hi", "ttft_ms": "inf"}, "ttft_ms", "number"),
    ({"prompt": "hi", "jitter_ms": "1e9"}, "jitter_ms", "to 10000"),
    ({"prompt": "hi", "seed": "-3"}, "seed", "integer"),
    ({"prompt": "hi", "tokens_ms": "5"}, "tokens_ms", "unknown parameter"),
    ({"prompt": ["a", "b"]}, "prompt", "more than once"),
]


@pytest.mark.parametrize("path", ["/api/chat/stream", "/api/chat"])
@pytest.mark.parametrize(("params", "parameter", "reason"), BAD_REQUESTS)
def test_bad_parameters_get_422_naming_the_parameter(
    server: BackgroundServer, path: str, params: dict, parameter: str, reason: str
) -> None:
    response = httpx.get(server.url + path, params=params, trust_env=False)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_parameter"
    assert body["parameter"] == parameter
    assert reason in body["reason"]


def test_unknown_path_is_a_json_404(server: BackgroundServer) -> None:
    response = httpx.get(server.url + "/api/nope", trust_env=False)
    assert (response.status_code, response.json()) == (404, {"error": "Not Found"})


def test_settings_set_limits_and_defaults() -> None:
    app = create_app(Settings(max_prompt_chars=3, defaults=GenerationRequest("", max_tokens=2, ttft_ms=0, token_ms=0)))
    with serve_in_background(app) as small:
        assert httpx.get(small.url + "/api/chat", params={"prompt": "four"}, trust_env=False).status_code == 422
        assert httpx.get(small.url + "/api/chat", params={"prompt": "hi"}, trust_env=False).json()["tokens"] == 2


async def failing_model(request: GenerationRequest) -> AsyncIterator[str]:
    yield "one"
    yield " two"
    raise RuntimeError("the GPU caught fire")


@pytest.fixture
def failing_server() -> Iterator[BackgroundServer]:
    with serve_in_background(create_app(models={"failing": failing_model})) as running:
        yield running


def test_a_model_failing_mid_stream_ends_it_with_an_error_event(failing_server: BackgroundServer) -> None:
    received = events(failing_server.url + "/api/chat/stream", prompt="hi", model="failing")
    assert [event for event, _, _ in received] == ["token", "token", "error"]
    assert received[-1][2] == {"code": "model_error", "message": "the model failed after 2 tokens"}


def test_a_model_failing_before_a_buffered_reply_is_a_json_502(failing_server: BackgroundServer) -> None:
    response = httpx.get(failing_server.url + "/api/chat", params={"prompt": "hi", "model": "failing"}, trust_env=False)
    assert response.status_code == 502
    assert response.json()["error"] == "model_error"


class ProbeModel:
    """A model that counts the tokens it is asked for and notes when it is shut."""

    def __init__(self, ttft_ms: float = 0, token_ms: float = 20) -> None:
        self.ttft_ms, self.token_ms = ttft_ms, token_ms
        self.produced = 0
        self.closed = threading.Event()

    async def __call__(self, request: GenerationRequest) -> AsyncIterator[str]:
        try:
            await asyncio.sleep(self.ttft_ms / 1000)
            while True:
                self.produced += 1
                yield f" t{self.produced}"
                await asyncio.sleep(self.token_ms / 1000)
        finally:
            self.closed.set()


def serve_probe(probe: ProbeModel) -> BackgroundServer:
    return serve_in_background(create_app(models={"probe": probe}))


def test_a_client_that_leaves_stops_generation() -> None:
    probe = ProbeModel(token_ms=20)
    with serve_probe(probe) as running, httpx.Client(trust_env=False) as client:
        url = running.url + "/api/chat/stream"
        with connect_sse(client, "GET", url, params={"prompt": "hi", "model": "probe"}) as source:
            stream = source.iter_sse()
            received = [next(stream) for _ in range(3)]
        wait_for(probe.closed.is_set, what="the model to be shut")
    assert len(received) == 3
    assert probe.produced <= len(received) + 2  # at most what was in flight when the client left


def test_a_client_that_leaves_during_prefill_stops_generation() -> None:
    probe = ProbeModel(ttft_ms=30_000)
    with serve_probe(probe) as running, httpx.Client(trust_env=False) as client:
        url = running.url + "/api/chat/stream"
        with client.stream("GET", url, params={"prompt": "hi", "model": "probe"}) as response:
            assert response.status_code == 200  # headers are out before the first token
        wait_for(probe.closed.is_set, what="the model to be shut")
    assert probe.produced == 0


def test_a_client_that_gives_up_on_a_buffered_reply_stops_generation() -> None:
    probe = ProbeModel(token_ms=20)
    with serve_probe(probe) as running, httpx.Client(trust_env=False, timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.get(running.url + "/api/chat", params={"prompt": "hi", "model": "probe"})
        wait_for(probe.closed.is_set, what="the model to be shut")


def raw_stream(url: str, headers: dict[str, str] | None = None, **params: object) -> str:
    with httpx.Client(trust_env=False) as client:
        return client.get(url + "/api/chat/stream", params=params, headers=headers).text


def stats(server: BackgroundServer) -> dict[str, int]:
    return httpx.get(server.url + "/api/stats", trust_env=False).json()


def test_a_stream_opens_with_retry_and_every_token_event_carries_its_index_as_id() -> None:
    with serve_in_background(create_app(Settings(retry_ms=1234))) as running:
        body = raw_stream(running.url, prompt="hi", max_tokens=3, ttft_ms=0, token_ms=0)
    assert body.startswith("retry: 1234\nevent: token\nid: 0\n")
    assert body.count("retry:") == 1
    assert [line for line in body.splitlines() if line.startswith("id:")] == ["id: 0", "id: 1", "id: 2"]


def test_heartbeats_are_comments_sent_while_the_model_is_silent(server: BackgroundServer) -> None:
    body = raw_stream(server.url, prompt="hi", max_tokens=2, ttft_ms=500, token_ms=0, heartbeat_s=0.1)
    before_first_token = body.split("event: token")[0]
    assert 2 <= before_first_token.count(": heartbeat\n") <= 6  # about one per 100 ms of a 500 ms prefill
    assert "\n\n" not in before_first_token  # no blank line: a heartbeat never closes an event
    assert body.count(": heartbeat") == before_first_token.count(": heartbeat")  # not between quick tokens


def test_no_parser_sees_heartbeats_or_retry_as_events(server: BackgroundServer) -> None:
    params = {"prompt": "hi", "max_tokens": 3, "ttft_ms": 300, "token_ms": 150, "heartbeat_s": 0.05}
    plain = events(server.url + "/api/chat/stream", **params)
    assert [event for event, _, _ in plain] == ["token", "token", "token", "done"]
    ours = stream_chat(server.url, **params)
    assert [received.event.event for received in ours.events] == ["token", "token", "token", "done"]


def test_resuming_after_an_id_gives_the_rest_of_the_text_exactly(server: BackgroundServer) -> None:
    params = {"prompt": "resume me", "max_tokens": 12, "ttft_ms": 0, "token_ms": 0, "seed": 5}
    whole = [data["token"] for event, _, data in events(server.url + "/api/chat/stream", **params)[:-1]]
    for last_id in range(12):
        by_header = httpx.get(
            server.url + "/api/chat/stream", params=params, headers={"Last-Event-ID": str(last_id)}, trust_env=False
        )
        by_parameter = events(server.url + "/api/chat/stream", **params, last_event_id=last_id)
        rest = [data["token"] for event, _, data in by_parameter if event == "token"]
        assert whole[: last_id + 1] + rest == whole
        assert [data["index"] for event, _, data in by_parameter if event == "token"] == list(range(last_id + 1, 12))
        assert by_parameter[-1][::2] == ("done", {"finish_reason": "length", "tokens": 12})
        assert by_header.text == raw_stream(server.url, **params, last_event_id=last_id)


@pytest.mark.parametrize(
    ("last_id", "reason"),
    [("x", "id of a token event"), ("-1", "id of a token event"), ("05", "id of a token event"),
     ("1.5", "id of a token event"), ("+3", "id of a token event"), ("99999999999", "id of a token event"),
     ("8", "beyond the stream"), ("4000", "beyond the stream")],
)  # fmt: skip
def test_a_malformed_or_unknown_last_event_id_is_refused(server: BackgroundServer, last_id: str, reason: str) -> None:
    params = {"prompt": "hi", "max_tokens": 8}
    by_header = httpx.get(
        server.url + "/api/chat/stream", params=params, headers={"Last-Event-ID": last_id}, trust_env=False
    )
    by_parameter = httpx.get(server.url + "/api/chat/stream", params={**params, "last_event_id": last_id})
    for response, parameter in ((by_header, "Last-Event-ID"), (by_parameter, "last_event_id")):
        assert response.status_code == 422
        assert response.json()["parameter"] == parameter and reason in response.json()["reason"]


def test_header_and_parameter_must_agree(server: BackgroundServer) -> None:
    response = httpx.get(
        server.url + "/api/chat/stream",
        params={"prompt": "hi", "last_event_id": "2"},
        headers={"Last-Event-ID": "3"},
        trust_env=False,
    )
    assert response.status_code == 422 and response.json()["parameter"] == "last_event_id"


STREAM_ONLY_BAD_REQUESTS = [
    ({"heartbeat_s": "0"}, "heartbeat_s", "from 0.01"),
    ({"heartbeat_s": "soon"}, "heartbeat_s", "number"),
    ({"context_window": "0"}, "context_window", "from 1"),
    ({"context_window": "9000"}, "context_window", "to 8192"),
    ({"blocklist": "a,,b"}, "blocklist", "empty"),
    ({"fail_after": "-1"}, "fail_after", "from 0"),
    ({"drop_after": "0"}, "drop_after", "from 1"),
    ({"prompt": "one two three", "context_window": "3"}, "prompt", "no room"),
]


@pytest.mark.parametrize(("params", "parameter", "reason"), STREAM_ONLY_BAD_REQUESTS)
def test_bad_stream_parameters_get_422(server: BackgroundServer, params: dict, parameter: str, reason: str) -> None:
    response = httpx.get(server.url + "/api/chat/stream", params={"prompt": "hi", **params}, trust_env=False)
    assert response.status_code == 422
    assert response.json()["parameter"] == parameter and reason in response.json()["reason"]


def test_stream_parameters_are_refused_by_the_buffered_endpoint(server: BackgroundServer) -> None:
    response = httpx.get(server.url + "/api/chat", params={"prompt": "hi", "fail_after": "2"}, trust_env=False)
    assert response.status_code == 422 and "only /api/chat/stream" in response.json()["reason"]


FAST_STREAM = {"prompt": "hi", "max_tokens": 30, "ttft_ms": 0, "token_ms": 0}


def test_the_context_window_ends_a_stream_with_an_error_event(server: BackgroundServer) -> None:
    received = events(server.url + "/api/chat/stream", **FAST_STREAM, context_window=6)
    assert [event for event, _, _ in received] == ["token"] * 5 + ["error"]  # "hi" takes 1 of the 6
    assert received[-1][2]["code"] == "context_length_exceeded"


def test_the_content_filter_withholds_the_blocked_token(server: BackgroundServer) -> None:
    whole = [data["token"] for event, _, data in events(server.url + "/api/chat/stream", **FAST_STREAM)[:-1]]
    blocked_at = whole.index(" token")
    received = events(server.url + "/api/chat/stream", **FAST_STREAM, blocklist="TOKEN,nonsense")
    assert [data["token"] for event, _, data in received[:-1]] == whole[:blocked_at]
    assert received[-1][0] == "error" and received[-1][2]["code"] == "content_filter"


def test_the_blocklist_setting_applies_to_every_stream() -> None:
    with serve_in_background(create_app(Settings(blocklist=("first",)))) as running:
        received = events(running.url + "/api/chat/stream", **FAST_STREAM)
    assert [event for event, _, _ in received] == ["token", "error"]  # "The", then " first" is withheld


@pytest.mark.parametrize("fail_after", [0, 1, 7])
def test_fail_after_makes_the_model_fail_after_that_many_tokens(server: BackgroundServer, fail_after: int) -> None:
    received = events(server.url + "/api/chat/stream", **FAST_STREAM, fail_after=fail_after)
    assert [event for event, _, _ in received] == ["token"] * fail_after + ["error"]
    assert received[-1][2] == {"code": "model_error", "message": f"the model failed after {fail_after} tokens"}


def test_a_stream_longer_than_the_wall_clock_cap_ends_with_an_error_event() -> None:
    with serve_in_background(create_app(Settings(max_stream_s=0.3))) as running:
        received = events(running.url + "/api/chat/stream", prompt="hi", max_tokens=100, ttft_ms=0, token_ms=50)
    assert received[-1][0] == "error" and received[-1][2]["code"] == "timeout"
    assert 1 <= len(received) - 1 < 20  # about 6 tokens in 300 ms, far fewer than 100


def test_streams_beyond_the_limit_get_429_with_retry_after() -> None:
    with serve_in_background(create_app(Settings(max_concurrent_streams=1))) as running:
        url = running.url + "/api/chat/stream"
        with httpx.Client(trust_env=False) as client:
            with client.stream("GET", url, params={"prompt": "hi", "ttft_ms": 30_000}) as first:
                assert first.status_code == 200
                refused = client.get(url, params={"prompt": "hi"})
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"] == "too_many_streams"
            wait_for(lambda: stats(running)["streams_active"] == 0, what="the first stream to end")
            assert client.get(url, params={"prompt": "hi", "max_tokens": 1, "ttft_ms": 0}).status_code == 200
        assert stats(running)["streams_rejected"] == 1


def leave_after(url: str, tokens: int, **params: object) -> None:
    with httpx.Client(trust_env=False) as client, connect_sse(client, "GET", url, params=params) as source:
        stream = source.iter_sse()
        for _ in range(tokens):
            next(stream)


@pytest.mark.parametrize("cancel", [True, False])
def test_stats_count_streams_and_the_tokens_wasted_on_departed_clients(cancel: bool) -> None:
    with serve_in_background(create_app(Settings(cancel_on_disconnect=cancel))) as running:
        url = running.url + "/api/chat/stream"
        events(url, prompt="hi", max_tokens=5, ttft_ms=0, token_ms=0)
        events(url, prompt="hi", max_tokens=5, ttft_ms=0, token_ms=0, fail_after=2)
        leave_after(url, 3, prompt="hi", max_tokens=40, ttft_ms=0, token_ms=10)
        wait_for(lambda: stats(running)["streams_active"] == 0, what="the abandoned stream to end")
        counters = stats(running)
    assert counters["streams_completed"] == 1 and counters["streams_failed"] == 1
    assert counters["streams_cancelled"] == 1 and counters["streams_rejected"] == 0
    if cancel:
        assert counters["tokens_wasted"] == 0
        assert counters["tokens_generated"] <= 5 + 2 + 3 + 2  # what was in flight when the client left
    else:  # the model ran on to its 40th token for nobody
        assert counters["tokens_generated"] == 5 + 2 + 40
        assert 30 <= counters["tokens_wasted"] <= 40 - 3


# Regression tests of issue 8's bugs, each named after the problem it pins down.


@pytest.mark.parametrize(
    "pace", [{"ttft_ms": 0, "token_ms": 50}, {"ttft_ms": 30_000, "token_ms": 0}], ids=["mid-stream", "during-prefill"]
)
def test_a_stream_cut_by_max_stream_s_counts_as_failed_not_cancelled(pace: dict) -> None:
    with serve_in_background(create_app(Settings(max_stream_s=0.2))) as running:
        received = events(running.url + "/api/chat/stream", prompt="hi", max_tokens=100, **pace)
        wait_for(lambda: stats(running)["streams_active"] == 0, what="the cut stream to be counted")
        counters = stats(running)
    assert received[-1][2]["code"] == "timeout"
    assert (counters["streams_failed"], counters["streams_cancelled"]) == (1, 0)


async def shout(request: GenerationRequest) -> AsyncIterator[str]:
    for word in request.prompt.upper().split():
        yield word + " "


def test_plugging_in_a_model_keeps_sim_and_echo() -> None:
    with serve_in_background(create_app(models={"shout": shout})) as running:
        plain = httpx.get(running.url + "/api/chat", params={"prompt": "hi", "max_tokens": 3}, trust_env=False)
        echoed = httpx.get(running.url + "/api/chat", params={"prompt": "hi", "model": "echo"}, trust_env=False)
        shouted = httpx.get(
            running.url + "/api/chat", params={"prompt": "hello there", "model": "shout"}, trust_env=False
        )
    assert (plain.status_code, plain.json()["tokens"]) == (200, 3)
    assert echoed.json()["text"] == "hi"
    assert shouted.json()["text"] == "HELLO THERE "


def test_a_plugged_in_model_replaces_a_built_in_one_of_the_same_name() -> None:
    with serve_in_background(create_app(models={"sim": shout})) as running:
        reply = httpx.get(running.url + "/api/chat", params={"prompt": "hello there"}, trust_env=False)
    assert reply.json()["text"] == "HELLO THERE "


def test_an_empty_prompt_is_a_prompt_of_no_words(server: BackgroundServer) -> None:
    url = server.url + "/api/chat/stream"
    written = events(url, prompt="", max_tokens=5, ttft_ms=0, token_ms=0)
    echoed = events(url, prompt="", model="echo", ttft_ms=0, token_ms=0)
    missing = httpx.get(url, params={"max_tokens": 5}, trust_env=False)
    assert written[-1][::2] == ("done", {"finish_reason": "length", "tokens": 5})  # sim writes without a prompt
    assert echoed == [("done", "", {"finish_reason": "stop", "tokens": 0})]  # echo has nothing to give back
    assert (missing.status_code, missing.json()["parameter"], missing.json()["reason"]) == (422, "prompt", "required")


def test_a_model_failing_on_purpose_writes_nothing_to_a_notebooks_stderr() -> None:
    """In a real kernel, as notebook 04 does it: its stderr shows as red text, which reads as the notebook failing."""
    code = (
        "import httpx\n"
        "from sse_lab import serve_in_background\n"
        "with serve_in_background() as server:\n"
        "    params = {'prompt': 'hi', 'ttft_ms': 0, 'token_ms': 0, 'fail_after': 2}\n"
        "    body = httpx.get(server.url + '/api/chat/stream', params=params, trust_env=False).text\n"
        "print(body.rstrip().splitlines()[-1])\n"
    )
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        streams = {"stdout": "", "stderr": ""}
        executing = client.execute(code)
        while True:
            message = client.get_iopub_msg(timeout=60)
            if message["parent_header"].get("msg_id") != executing:
                continue
            if message["msg_type"] == "stream":
                streams[message["content"]["name"]] += message["content"]["text"]
            elif message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                break
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert streams == {
        "stdout": 'data: {"code":"model_error","message":"the model failed after 2 tokens"}\n',
        "stderr": "",
    }


def test_a_model_failing_is_still_logged_for_whoever_listens(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sse_lab"):
        events(server.url + "/api/chat/stream", **FAST_STREAM, fail_after=2)
        wait_for(lambda: caplog.records, what="the server's warning")
    assert caplog.records[0].getMessage() == "model failed after 2 tokens: InjectedFault('fail_after=2')"


# drop_after: the server rehearses a lost connection (the page's "drop the connection" control)


def test_drop_after_ends_the_response_after_that_many_tokens_without_done(server: BackgroundServer) -> None:
    received = events(server.url + "/api/chat/stream", **FAST_STREAM, drop_after=4)
    assert [(event, id) for event, id, _ in received] == [("token", str(index)) for index in range(4)]


def test_drop_after_drops_each_resumed_connection_after_as_many_again(server: BackgroundServer) -> None:
    url = server.url + "/api/chat/stream"
    received = events(url, **FAST_STREAM, drop_after=4, last_event_id="3")
    assert [id for _, id, _ in received] == ["4", "5", "6", "7"]
    last = events(url, **FAST_STREAM, drop_after=4, last_event_id="27")
    assert [event for event, _, _ in last] == ["token", "token", "done"]  # the stream ended first: no drop


def test_a_client_resumes_a_drop_after_stream_to_exactly_the_uninterrupted_text() -> None:
    with serve_in_background(create_app(Settings(retry_ms=1))) as running:
        whole = stream_chat(running.url, "hi", max_tokens=30, ttft_ms=0, token_ms=0)
        dropped = stream_chat(running.url, "hi", max_tokens=30, ttft_ms=0, token_ms=0, drop_after=7, max_reconnects=1)
    assert dropped.text == whole.text and dropped.finish_reason == "length"
    assert [drop.last_event_id for drop in dropped.drops] == ["6", "13", "20", "27"]


# ── Streams at scale: what each open stream costs, and the shared heartbeat timer ──────────────────────────────────


@given(st.text(), st.integers(min_value=0, max_value=10**9))
def test_token_events_built_in_one_step_equal_encode_event(token: str, index: int) -> None:
    from sse_lab.server import _json, token_event
    from sse_lab.sse import encode_event

    try:
        expected = encode_event(_json({"token": token, "index": index}), event="token", id=str(index))
    except UnicodeEncodeError:  # a lone surrogate is no text either way
        with pytest.raises(UnicodeEncodeError):
            token_event(token, index)
        return
    assert token_event(token, index) == expected


def test_an_open_stream_costs_three_tasks_its_request_its_events_and_its_disconnect_watcher() -> None:
    """Regression: each stream used to hold seven (work, watcher, wait_for, heartbeat, two in the closing wrapper).

    The events have a task of their own so that each wake-up resumes a few frames, not the middleware's twenty.
    """

    async def count_tasks(request: GenerationRequest) -> AsyncIterator[str]:
        yield str(len(asyncio.all_tasks()))

    models = {"sim": sim, "count": count_tasks}
    with serve_in_background(create_app(models=models)) as running:
        url = running.url + "/api/chat/stream"
        with httpx.Client(trust_env=False, timeout=10) as client:
            idle = int(events(url, prompt="hi", model="count", max_tokens=1)[0][2]["token"])
            with contextlib.ExitStack() as open_streams:
                for _ in range(20):
                    response = open_streams.enter_context(
                        client.stream("GET", url, params={"prompt": "hi", "ttft_ms": 10_000, "heartbeat_s": 60})
                    )
                    assert response.status_code == 200
                busy = int(events(url, prompt="hi", model="count", max_tokens=1)[0][2]["token"])
    assert 3 * 20 <= busy - idle <= 3 * 20 + 3  # a request just finished may not have left yet


def test_the_shared_timers_keep_no_stopped_server_loop_alive() -> None:
    """Regression: the heartbeat and token timers, kept per loop, held their loop, so no loop was ever freed."""
    loops: list[asyncio.AbstractEventLoop] = []
    for _ in range(3):
        with serve_in_background(create_app(models={"loop": reporting_its_loop(loops)})) as running:
            url = running.url + "/api/chat/stream"
            events(url, prompt="hi", max_tokens=3, ttft_ms=1, token_ms=1)  # the token timer and the heartbeats
            events(url, prompt="hi", model="loop", max_tokens=1)
    gone = [weakref.ref(loop) for loop in loops]
    loops.clear()
    gc.collect()
    assert len(gone) == 3 and all(loop() is None for loop in gone)


SERVER_PACKAGES = ("sse_lab", "starlette", "uvicorn", "uvloop", "asyncio")


def server_garbage(garbage: list[object]) -> list[str]:
    """The types of the objects in `garbage` that a server made (the test's own HTTP client's are not counted)."""
    made_here = [item for item in garbage if (getattr(type(item), "__module__", "") or "").startswith(SERVER_PACKAGES)]
    made_here += [item for item in garbage if type(item).__name__ in ("coroutine", "frame", "async_generator")]
    return sorted({type(item).__qualname__ for item in made_here})


@pytest.mark.parametrize(
    ("query", "read_bytes"),
    [
        ("max_tokens=3&token_ms=1", None),  # ends on its own
        ("max_tokens=5&token_ms=0&fail_after=2", None),  # an error event
        ("max_tokens=-1", None),  # a 422
        ("max_tokens=50&token_ms=20", 60),  # cut by its client mid-stream
    ],
)
def test_a_stream_leaves_no_reference_cycle(query: str, read_bytes: int | None) -> None:
    """Nothing of a stream waits for a full collection, which `python -m sse_lab serve` makes only every 10 minutes.

    Regression: the `send` that `_DirectSend` keeps in the scope tied each connection's objects (uvicorn's
    request, its transport, events and buffers: 19 objects) into a cycle, because the request holds the scope.
    """
    target = f"/api/chat/stream?prompt=hi&ttft_ms=0&{query}"
    with serve_in_background() as running:
        exchange(running.url, request_bytes(target))  # the first request's one-off objects
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds goes to gc.garbage, to be looked at
        try:
            for _ in range(5):
                with socket.create_connection(address(running.url)) as sock:
                    sock.sendall(request_bytes(target))
                    if read_bytes is None:
                        read_response(sock)
                    else:
                        sock.recv(read_bytes)  # then the close: a client leaving mid-stream
            wait_for(lambda: stats(running)["streams_active"] == 0, what="the streams to end")
            gc.collect()
            found = server_garbage(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert found == []


def reporting_its_loop(loops: list[asyncio.AbstractEventLoop]) -> TokenSource:
    """A model that appends the event loop it runs on to `loops`: the server's loop, seen from a test."""

    async def report_loop(request: GenerationRequest) -> AsyncIterator[str]:
        loops.append(asyncio.get_running_loop())
        yield "here"

    return report_loop


def test_one_timer_keeps_the_heartbeat_cadence_of_each_stream() -> None:
    with serve_in_background() as running:
        threads = {}
        bodies: dict[float, str] = {}
        for heartbeat_s in (0.05, 0.2):

            def read(interval: float = heartbeat_s) -> None:
                bodies[interval] = raw_stream(running.url, prompt="hi", max_tokens=1, ttft_ms=600, heartbeat_s=interval)

            threads[heartbeat_s] = threading.Thread(target=read)
            threads[heartbeat_s].start()
        for thread in threads.values():
            thread.join(10)
    assert 6 <= bodies[0.05].count(": heartbeat") <= 13  # about 12 in a 600 ms prefill
    assert 1 <= bodies[0.2].count(": heartbeat") <= 3  # about 3


def test_ended_streams_leave_the_heartbeat_timer() -> None:
    from sse_lab.server import _heartbeat_timers

    loops: list[asyncio.AbstractEventLoop] = []
    app = create_app(Settings(heartbeat_s=3_600), models={"loop": reporting_its_loop(loops)})
    with serve_in_background(app) as running, httpx.Client(trust_env=False, timeout=10) as client:
        held = client.stream("GET", running.url + "/api/chat/stream", params={"prompt": "hi", "ttft_ms": 60_000})
        with held as response:  # one stream stays open, so the timer has a live stream to keep
            assert response.status_code == 200
            for _ in range(200):
                raw_stream(running.url, prompt="hi", max_tokens=1, ttft_ms=0)
            events(running.url + "/api/chat/stream", prompt="hi", model="loop", max_tokens=1)
            timer = _heartbeat_timers[loops[0]]
            assert len(timer.due) <= 2 * timer.live + 64  # not 200 waiting an hour


def test_a_stream_cut_by_the_time_limit_counts_as_failed() -> None:
    with serve_in_background(create_app(Settings(max_stream_s=0.2))) as running:
        received = events(running.url + "/api/chat/stream", prompt="hi", max_tokens=100, ttft_ms=0, token_ms=50)
        wait_for(lambda: stats(running)["streams_active"] == 0, what="the stream to end")
        counters = stats(running)
    assert received[-1][2]["code"] == "timeout"
    assert counters["streams_failed"] == 1 and counters["streams_cancelled"] == 0
