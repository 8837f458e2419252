from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import openai
import pytest

from sse_lab import BackgroundServer, stream_chat
from sse_lab.model import sim_tokens
from sse_lab.sse import decode

FAST = {"ttft_ms": 0, "token_ms": 0}
OPENING = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


Sdk = Callable[[BackgroundServer], openai.OpenAI]


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    """Makes the official SDK's client for a server; every client made is closed after the test."""
    with ExitStack() as clients:

        def make(server: BackgroundServer) -> openai.OpenAI:
            return clients.enter_context(openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0))

        yield make


def test_the_sdk_streams_typed_events_in_order_numbered_from_zero(server: BackgroundServer, sdk: Sdk) -> None:
    with sdk(server).responses.create(
        model="sim", input="hi", max_output_tokens=4, stream=True, extra_body=FAST
    ) as stream:
        events = list(stream)
    assert [event.type for event in events] == OPENING + ["response.output_text.delta"] * 4 + CLOSING + [
        "response.incomplete"
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == "".join(sim_tokens("hi", 4)) == events[-4].text
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == text and final.usage is not None and final.usage.output_tokens == 4


def test_on_the_wire_each_event_is_named_by_its_type_and_nothing_follows_the_last(server: BackgroundServer) -> None:
    body = {"model": "echo", "input": "a b", "stream": True, **FAST}
    response = httpx.post(server.url + "/v1/responses", json=body, trust_env=False)
    events = decode(response.content)
    assert all(event.event == httpx.Response(200, content=event.data).json()["type"] for event in events)
    assert events[-1].event == "response.completed" and "[DONE]" not in response.text


def test_the_stream_helper_and_a_whole_response_give_the_text(server: BackgroundServer, sdk: Sdk) -> None:
    client = sdk(server)
    with client.responses.stream(model="echo", input="to be\r\nor not", extra_body=FAST) as stream:
        assert stream.get_final_response().output_text == "to be\r\nor not"
    whole = client.responses.create(model="echo", input="to be", instructions="Be brief.", extra_body=FAST)
    assert whole.status == "completed" and whole.output_text == "system: Be brief.\n\nuser: to be"


def test_a_model_failure_is_a_failed_response(server: BackgroundServer, sdk: Sdk) -> None:
    with sdk(server).responses.create(
        model="sim", input="hi", stream=True, extra_body={"fail_after": 2, **FAST}
    ) as stream:
        events = list(stream)
    assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
    assert (
        events[-1].response.error is not None and events[-1].response.error.message == "the model failed after 2 tokens"
    )
    with pytest.raises(openai.APIStatusError) as whole:
        sdk(server).responses.create(model="sim", input="hi", extra_body={"fail_after": 2, **FAST})
    assert whole.value.status_code == 502


def test_the_content_filter_makes_an_incomplete_response(server: BackgroundServer, sdk: Sdk) -> None:
    with sdk(server).responses.create(
        model="sim", input="hi", stream=True, extra_body={"blocklist": "token", **FAST}
    ) as stream:
        final = list(stream)[-1]
    assert final.type == "response.incomplete" and final.response.incomplete_details.reason == "content_filter"


def test_the_kit_client_reads_the_responses_dialect(server: BackgroundServer) -> None:
    result = stream_chat(server.url + "/v1", "hi", api="openai-responses", max_tokens=6, **FAST)
    assert result.text == "".join(sim_tokens("hi", 6)) and result.tokens == 6 and result.finish_reason == "length"
    failed = stream_chat(server.url + "/v1", "hi", api="openai-responses", fail_after=1, **FAST)
    assert failed.tokens == 1 and failed.error == {"code": "server_error", "message": "the model failed after 1 tokens"}
