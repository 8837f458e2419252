from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sse_lab import BackgroundServer, ChatRequestError, ChatResult, afetch_chat, astream_chat, fetch_chat, stream_chat

FAST = {"ttft_ms": 0, "token_ms": 0, "max_tokens": 8}


def test_stream_chat_records_every_token_and_the_text(server: BackgroundServer) -> None:
    seen: list[str] = []
    result = stream_chat(server.url, "hi", on_token=seen.append, **FAST)
    assert result.mode == "streamed"
    assert result.tokens == 8 and "".join(seen) == result.text
    assert result.finish_reason == "length" and result.error is None
    assert result.started_at < result.headers_at <= result.arrivals[0] <= result.arrivals[-1] <= result.finished_at


def test_fetch_chat_stamps_every_token_with_the_body_arrival(server: BackgroundServer) -> None:
    result = fetch_chat(server.url, "hi", **FAST)
    assert result.mode == "buffered"
    assert result.tokens == 8 and len(set(result.arrivals)) == 1
    assert result.text == stream_chat(server.url, "hi", **FAST).text


def test_streamed_first_token_comes_long_before_the_buffered_one(server: BackgroundServer) -> None:
    params = {"ttft_ms": 20, "token_ms": 40, "max_tokens": 10}
    streamed, buffered = stream_chat(server.url, "hi", **params), fetch_chat(server.url, "hi", **params)
    assert streamed.ttft is not None and buffered.ttft is not None
    assert buffered.ttft > 3 * streamed.ttft


def test_async_twins_give_the_same_results(server: BackgroundServer) -> None:
    async def both() -> tuple[str, str]:
        streamed, buffered = await asyncio.gather(
            astream_chat(server.url, "hi", **FAST), afetch_chat(server.url, "hi", **FAST)
        )
        return streamed.text, buffered.text

    expected = stream_chat(server.url, "hi", **FAST).text
    assert asyncio.run(both()) == (expected, expected)


@pytest.mark.parametrize("call", [stream_chat, fetch_chat])
def test_a_refused_request_raises_with_the_servers_reason(
    server: BackgroundServer, call: Callable[..., ChatResult]
) -> None:
    with pytest.raises(ChatRequestError, match="token_ms") as caught:
        call(server.url, "hi", token_ms=-1)
    assert caught.value.status == 422 and caught.value.body["parameter"] == "token_ms"


def test_async_refusal_raises_too(server: BackgroundServer) -> None:
    with pytest.raises(ChatRequestError):
        asyncio.run(astream_chat(server.url, "hi", model="nope"))
    with pytest.raises(ChatRequestError):
        asyncio.run(afetch_chat(server.url, "hi", model="nope"))


def test_proxy_settings_in_the_environment_are_ignored(
    server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert stream_chat(server.url, "hi", **FAST).tokens == 8
