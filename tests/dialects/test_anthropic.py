from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import anthropic
import httpx
import pytest

from sse_lab import BackgroundServer, stream_chat
from sse_lab.model import sim_tokens
from sse_lab.sse import decode

FAST = {"ttft_ms": 0, "token_ms": 0}
USER = [{"role": "user", "content": "hi"}]


Sdk = Callable[[BackgroundServer], anthropic.Anthropic]


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    """Makes the official SDK's client for a server; every client made is closed after the test."""
    with ExitStack() as clients:

        def make(server: BackgroundServer) -> anthropic.Anthropic:
            return clients.enter_context(anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0))

        yield make


def test_messages_stream_gives_the_text_and_the_final_message(server: BackgroundServer, sdk: Sdk) -> None:
    with sdk(server).messages.stream(model="sim", max_tokens=6, messages=USER, extra_body=FAST) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "".join(sim_tokens("hi", 6)) == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6 and final.usage.input_tokens == 1


def test_on_the_wire_every_event_is_named_and_a_ping_follows_the_block_start(server: BackgroundServer) -> None:
    body = {"model": "echo", "max_tokens": 10, "messages": [{"role": "user", "content": "a b"}], "stream": True, **FAST}
    response = httpx.post(server.url + "/v1/messages", json=body, trust_env=False)
    events = decode(response.content)
    assert [event.event for event in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(json.loads(event.data)["type"] == event.event for event in events)
    assert json.loads(events[-2].data)["delta"]["stop_reason"] == "end_turn"


def test_an_error_event_mid_stream_raises_with_anthropics_error_shape(server: BackgroundServer, sdk: Sdk) -> None:
    pieces: list[str] = []
    stream = sdk(server).messages.stream(
        model="sim", max_tokens=10, messages=USER, extra_body={"fail_after": 2, **FAST}
    )
    with pytest.raises(anthropic.APIStatusError) as raised, stream as reading:
        for piece in reading.text_stream:
            pieces.append(piece)
    assert "".join(pieces) == "".join(sim_tokens("hi", 2))
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "the model failed after 2 tokens"},
    }


def test_a_whole_message_and_the_refusals_before_a_stream(server: BackgroundServer, sdk: Sdk) -> None:
    client = sdk(server)
    message = client.messages.create(
        model="echo", max_tokens=10, system="Be brief.", messages=[{"role": "user", "content": "hi"}], extra_body=FAST
    )
    assert message.content[0].text == "system: Be brief.\n\nuser: hi" and message.stop_reason == "end_turn"
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="sim", max_tokens=0, messages=USER)
    assert refused.value.body["type"] == "error"
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in refused.value.body["error"]["message"]


def test_max_tokens_is_required_as_anthropic_requires_it(server: BackgroundServer) -> None:
    body = {"model": "sim", "messages": USER}
    response = httpx.post(server.url + "/v1/messages", json=body, trust_env=False)
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: required"},
    }


def test_the_content_filter_is_a_refusal(server: BackgroundServer, sdk: Sdk) -> None:
    with sdk(server).messages.stream(
        model="sim", max_tokens=10, messages=USER, extra_body={"blocklist": ["token"], **FAST}
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "refusal" and final.content[0].text == "".join(sim_tokens("hi", 2))


def test_the_kit_client_reads_the_anthropic_dialect(server: BackgroundServer) -> None:
    result = stream_chat(server.url, "hi", api="anthropic", max_tokens=6, **FAST)
    assert result.text == "".join(sim_tokens("hi", 6)) and result.finish_reason == "length"
    failed = stream_chat(server.url, "hi", api="anthropic", fail_after=1, **FAST)
    assert failed.tokens == 1 and failed.error == {"code": "api_error", "message": "the model failed after 1 tokens"}
