from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import openai
import pytest

from sse_lab import BackgroundServer, Settings, astream_chat, create_app, serve_in_background, stream_chat
from sse_lab.client import fetch_stats, wait_until_idle
from sse_lab.instruments.faults import DropConnections
from sse_lab.model import sim_tokens
from tests.conftest import wait_for

FAST = {"ttft_ms": 0, "token_ms": 0}
USER = [{"role": "user", "content": "hi"}]


Sdk = Callable[[BackgroundServer], openai.OpenAI]


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    """Makes the official SDK's client for a server; every client made is closed after the test."""
    with ExitStack() as clients:

        def make(server: BackgroundServer) -> openai.OpenAI:
            return clients.enter_context(openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0))

        yield make


def test_the_sdk_reads_a_whole_completion(server: BackgroundServer, sdk: Sdk) -> None:
    completion = sdk(server).chat.completions.create(model="sim", messages=USER, max_tokens=7, extra_body=FAST)
    (choice,) = completion.choices
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == "".join(sim_tokens("hi", 7))
    assert choice.finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert completion.usage.prompt_tokens == 1 and completion.usage.total_tokens == 8


def test_the_sdk_streams_chunks_with_one_id_the_role_first_and_usage_last(server: BackgroundServer, sdk: Sdk) -> None:
    chunks = list(
        sdk(server).chat.completions.create(
            model="sim",
            messages=USER,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FAST,
        )
    )
    assert len({chunk.id for chunk in chunks}) == 1
    first, *deltas, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert "".join(chunk.choices[0].delta.content or "" for chunk in deltas) == "".join(sim_tokens("hi", 5))
    assert len(deltas) == 5 and all(chunk.choices[0].finish_reason is None for chunk in deltas)
    assert finish.choices[0].finish_reason == "length" and finish.usage is None
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 5


def test_the_stream_ends_with_done_and_has_usage_only_when_asked(server: BackgroundServer) -> None:
    body = {"model": "sim", "messages": USER, "max_tokens": 3, "stream": True, **FAST}
    plain = httpx.post(server.url + "/v1/chat/completions", json=body, trust_env=False)
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("text/event-stream")
    assert plain.text.endswith("data: [DONE]\n\n") and '"usage"' not in plain.text
    assert "event:" not in plain.text and "id:" not in plain.text  # nothing to resume with
    with_usage = httpx.post(
        server.url + "/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}, trust_env=False
    )
    assert '"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}' in with_usage.text


def test_a_model_failure_mid_stream_raises_api_error_after_the_tokens_sent(server: BackgroundServer, sdk: Sdk) -> None:
    received = []
    stream = sdk(server).chat.completions.create(
        model="sim", messages=USER, max_tokens=10, stream=True, extra_body={"fail_after": 3, **FAST}
    )
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "".join(sim_tokens("hi", 3))
    assert raised.value.body == {
        "message": "the model failed after 3 tokens",
        "type": "server_error",
        "param": None,
        "code": "model_error",
    }


@pytest.mark.parametrize(
    ("knobs", "finish_reason", "tokens"),
    [({"blocklist": ["token"]}, "content_filter", 2), ({"context_window": 4}, "length", 3), ({}, "length", 10)],
)
def test_the_content_filter_and_the_context_window_end_with_a_finish_reason(
    server: BackgroundServer, knobs: dict[str, object], finish_reason: str, tokens: int, sdk: Sdk
) -> None:
    # sim's reply to "hi" starts "The first token arrives": the filter stops before " token".
    chunks = list(
        sdk(server).chat.completions.create(
            model="sim", messages=USER, max_tokens=10, stream=True, extra_body={**knobs, **FAST}
        )
    )
    assert chunks[-1].choices[0].finish_reason == finish_reason
    assert sum(bool(chunk.choices[0].delta.content) for chunk in chunks) == tokens


def test_max_completion_tokens_is_max_tokens_and_the_two_must_agree(server: BackgroundServer, sdk: Sdk) -> None:
    client = sdk(server)
    completion = client.chat.completions.create(model="sim", messages=USER, max_completion_tokens=4, extra_body=FAST)
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="sim", messages=USER, max_tokens=3, max_completion_tokens=4, extra_body=FAST
        )
    assert refused.value.body["param"] == "max_completion_tokens"


def test_the_kit_client_measures_an_openai_compatible_stream(server: BackgroundServer) -> None:
    params = {"max_tokens": 12, "ttft_ms": 60, "token_ms": 10}
    kit = stream_chat(server.url, "hi", **params)
    seen: list[str] = []
    chat = stream_chat(server.url + "/v1", "hi", api="openai-chat", on_token=seen.append, **params)
    assert chat.text == kit.text == "".join(seen) and chat.tokens == 12
    assert chat.finish_reason == "length" and chat.error is None and not chat.drops
    assert chat.ttft is not None and chat.ttft >= 0.06 and chat.tpot is not None and chat.tpot >= 0.009


def test_the_async_client_speaks_the_dialect_too(server: BackgroundServer) -> None:
    result = asyncio.run(astream_chat(server.url + "/v1", "a b c", api="openai-chat", model="echo", **FAST))
    assert result.text == "a b c" and result.tokens == 3 and result.finish_reason == "stop"


def test_the_kit_client_reports_a_mid_stream_error(server: BackgroundServer) -> None:
    result = stream_chat(server.url + "/v1", "hi", api="openai-chat", fail_after=2, **FAST)
    assert result.tokens == 2 and result.error == {"code": "model_error", "message": "the model failed after 2 tokens"}


def test_a_dropped_stream_is_not_resumed_and_the_client_says_why() -> None:
    with serve_in_background(DropConnections(create_app(), after_events=4)) as server:
        result = stream_chat(server.url + "/v1", "hi", api="openai-chat", max_tokens=10, **FAST)
        assert result.tokens == 3 and len(result.drops) == 1  # the role chunk, then 3 tokens
        assert result.error is not None and result.error["code"] == "connection_lost"
        assert "cannot resume" in result.error["message"]
        assert wait_until_idle(server.url)["streams_cancelled"] == 1  # one connection, never retried


def test_an_unknown_api_is_refused(server: BackgroundServer) -> None:
    with pytest.raises(ValueError, match="api must be one of kit, openai-chat"):
        stream_chat(server.url, "hi", api="openai")


def test_when_every_slot_is_taken_the_sdk_gets_429_with_retry_after(sdk: Sdk) -> None:
    with serve_in_background(create_app(Settings(max_concurrent_streams=1))) as server:
        opened = threading.Event()
        holder = threading.Thread(
            target=lambda: stream_chat(
                server.url + "/v1",
                "hi",
                api="openai-chat",
                on_token=lambda _: opened.set(),
                max_tokens=2,
                ttft_ms=0,
                token_ms=1000,
            )
        )
        holder.start()
        try:
            wait_for(opened.is_set, what="the first stream to hold the slot")
            with pytest.raises(openai.RateLimitError) as refused:
                sdk(server).chat.completions.create(model="sim", messages=USER, stream=True, extra_body=FAST)
            assert refused.value.response.headers["retry-after"] == "1"
            assert refused.value.body["code"] == "rate_limit_exceeded"
        finally:
            holder.join()
        assert fetch_stats(server.url)["streams_rejected"] == 1


def test_a_stream_over_the_time_limit_ends_with_a_timeout_error(sdk: Sdk) -> None:
    with serve_in_background(create_app(Settings(max_stream_s=0.2))) as server:
        stream = sdk(server).chat.completions.create(
            model="sim", messages=USER, stream=True, extra_body={"ttft_ms": 5000}
        )
        with pytest.raises(openai.APIError) as raised:
            list(stream)
        assert raised.value.body["code"] == "timeout"
        with pytest.raises(openai.APIStatusError) as whole:
            sdk(server).chat.completions.create(model="sim", messages=USER, extra_body={"ttft_ms": 5000})
        assert whole.value.status_code == 504 and whole.value.body["code"] == "timeout"


def test_dialect_streams_count_in_the_kits_stats(sdk: Sdk) -> None:
    with serve_in_background() as server:
        client = sdk(server)
        list(client.chat.completions.create(model="sim", messages=USER, max_tokens=3, stream=True, extra_body=FAST))
        with pytest.raises(openai.APIError):
            list(
                client.chat.completions.create(
                    model="sim", messages=USER, stream=True, extra_body={"fail_after": 1, **FAST}
                )
            )
        stats = wait_until_idle(server.url)
        assert stats["streams_completed"] == 1 and stats["streams_failed"] == 1
        assert stats["tokens_generated"] == 3 + 1
