"""What every dialect shares: exact echo of hostile payloads, refusals that are never a 500, the prompt rule."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sse_lab import BackgroundServer, Settings, create_app, serve_in_background, stream_chat
from sse_lab.dialects.common import prompt_of
from tests.conftest import NASTY_PROMPTS

FAST = {"ttft_ms": 0, "token_ms": 0}
DIALECTS = ("openai-chat", "openai-responses", "anthropic")
PATHS = {"openai-chat": "/v1/chat/completions", "openai-responses": "/v1/responses", "anthropic": "/v1/messages"}
HOSTILE = [
    *NASTY_PROMPTS,
    "data: [DONE]\n\n",
    '{"error": {"message": "x"}}',
    "event: error\ndata: x\n\n",
    "\u2028\ufeff",
]


def body(dialect: str, content: Any, **fields: Any) -> dict[str, Any]:
    """A request whose one user message is `content` (a string, or a list of text parts)."""
    if dialect == "openai-responses":
        given = content if isinstance(content, str) else [{"role": "user", "content": content}]
        return {"model": "echo", "input": given, "max_output_tokens": 4096, **FAST, **fields}
    return {"model": "echo", "max_tokens": 4096, "messages": [{"role": "user", "content": content}], **FAST, **fields}


def parts(dialect: str, text: str) -> list[dict[str, str]]:
    kind = "input_text" if dialect == "openai-responses" else "text"
    return [{"type": kind, "text": text[:2]}, {"type": kind, "text": text[2:]}]


def whole_text(dialect: str, answer: dict[str, Any]) -> str:
    if dialect == "openai-chat":
        return str(answer["choices"][0]["message"]["content"])
    if dialect == "openai-responses":
        return str(answer["output"][0]["content"][0]["text"])
    return str(answer["content"][0]["text"])


def post(server: BackgroundServer, dialect: str, payload: object) -> httpx.Response:
    raw = json.dumps(payload).encode()  # NaN and Infinity allowed: Python's json.loads reads them
    return httpx.post(
        server.url + PATHS[dialect], content=raw, headers={"Content-Type": "application/json"}, trust_env=False
    )


def base_url(server: BackgroundServer, dialect: str) -> str:
    return server.url if dialect == "anthropic" else server.url + "/v1"


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("prompt", HOSTILE)
def test_echo_returns_a_hostile_payload_exactly_streamed_and_whole(
    server: BackgroundServer, dialect: str, prompt: str
) -> None:
    streamed = stream_chat(base_url(server, dialect), prompt, api=dialect, model="echo", max_tokens=4096, **FAST)
    assert streamed.text == prompt and streamed.error is None
    for content in (prompt, parts(dialect, prompt)):
        response = post(server, dialect, body(dialect, content))
        assert response.status_code == 200 and whole_text(dialect, response.json()) == prompt


def test_the_sdks_echo_a_hostile_payload_exactly(server: BackgroundServer) -> None:
    prompt = "crlf\r\nnul\0 data: [DONE]\n\n🌊"
    messages: Any = [{"role": "user", "content": prompt}]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        chunks = client.chat.completions.create(model="echo", messages=messages, stream=True, extra_body=FAST)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == prompt
        with client.responses.stream(model="echo", input=prompt, extra_body=FAST) as stream:
            assert stream.get_final_response().output_text == prompt
    with (
        anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0) as claude,
        claude.messages.stream(model="echo", max_tokens=100, messages=messages, extra_body=FAST) as reading,
    ):
        assert "".join(reading.text_stream) == prompt


@pytest.mark.parametrize("dialect", DIALECTS)
def test_several_messages_and_a_system_prompt_become_a_transcript(server: BackgroundServer, dialect: str) -> None:
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "and?"},
    ]
    if dialect == "openai-chat":
        payload = body(dialect, "", messages=[{"role": "system", "content": "Be brief."}, *turns])
    elif dialect == "openai-responses":
        payload = body(dialect, "", input=turns, instructions="Be brief.")
    else:
        payload = body(dialect, "", messages=turns, system=[{"type": "text", "text": "Be brief."}])
    response = post(server, dialect, payload)
    expected = "system: Be brief.\n\nuser: hi\n\nassistant: Hello!\n\nuser: and?"
    assert whole_text(dialect, response.json()) == expected
    assert expected == prompt_of("Be brief.", [("user", "hi"), ("assistant", "Hello!"), ("user", "and?")])


BAD = {
    "not JSON": b"{nope",
    "invalid UTF-8": b'{"model": "\xff"}',
    "an array": b"[]",
    "nested too deep": b"[" * 100_000,
    "empty": b"",
}


def error_of(dialect: str, response: httpx.Response) -> tuple[str, str | None]:
    """The refusal's message and the parameter it names (Anthropic's shape names none), checking the shape."""
    payload = response.json()
    if dialect == "anthropic":
        assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"}
        return payload["error"]["message"], None
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]["message"], payload["error"]["param"]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
def test_a_body_that_is_not_a_json_object_is_a_400(server: BackgroundServer, dialect: str, raw: bytes) -> None:
    response = httpx.post(
        server.url + PATHS[dialect], content=raw, headers={"Content-Type": "application/json"}, trust_env=False
    )
    assert response.status_code == 400
    message, _ = error_of(dialect, response)
    assert "JSON" in message


WRONG_FIELDS = {
    "unknown model": ({"model": "gpt-9"}, "model"),
    "model not a string": ({"model": 7}, "model"),
    "max_tokens a string": ({"max_tokens": "5", "max_output_tokens": "5"}, "max"),
    "max_tokens a bool": ({"max_tokens": True, "max_output_tokens": True}, "max"),
    "max_tokens a float": ({"max_tokens": 5.5, "max_output_tokens": 5.5}, "max"),
    "max_tokens too big": ({"max_tokens": 10**6, "max_output_tokens": 10**6}, "max"),
    "stream not a bool": ({"stream": "yes"}, "stream"),
    "ttft_ms negative": ({"ttft_ms": -1}, "ttft_ms"),
    "ttft_ms a string": ({"ttft_ms": "fast"}, "ttft_ms"),
    "token_ms infinite": ({"token_ms": float("inf")}, "token_ms"),
    "jitter_ms NaN": ({"jitter_ms": float("nan")}, "jitter_ms"),
    "seed a list": ({"seed": [1]}, "seed"),
    "fail_after negative": ({"fail_after": -1}, "fail_after"),
    "blocklist of numbers": ({"blocklist": [1]}, "blocklist"),
    "context_window too small": ({"context_window": 1}, "prompt"),
    "an unknown field": ({"frobnicate": 1}, "frobnicate"),
    "a prompt too long": ({"messages": [{"role": "user", "content": "x" * 8001}], "input": "x" * 8001}, "prompt"),
    "an image part": (
        {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
        },
        "content[0]",
    ),
    "a tool role": (
        {"messages": [{"role": "tool", "content": "x"}], "input": [{"role": "tool", "content": "x"}]},
        "role",
    ),
    "no messages": ({"messages": [], "input": []}, ""),
}


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(("fields", "named"), WRONG_FIELDS.values(), ids=WRONG_FIELDS.keys())
def test_a_wrong_field_is_a_400_that_names_it(
    server: BackgroundServer, dialect: str, fields: dict[str, Any], named: str
) -> None:
    payload = body(dialect, "hi", stream=True)
    mine = {"messages", "max_tokens"} if dialect != "openai-responses" else {"input", "max_output_tokens"}
    for name, value in fields.items():
        if name in mine or name not in ("messages", "input", "max_tokens", "max_output_tokens"):
            payload[name] = value
    response = post(server, dialect, payload)
    assert response.status_code == 400, response.text
    message, param = error_of(dialect, response)
    assert named in message and (param is None or named in param)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_body_over_the_limit_is_refused_before_it_is_read(dialect: str) -> None:
    with serve_in_background(create_app(Settings(max_prompt_chars=100))) as server:
        response = post(server, dialect, body(dialect, "x" * 100_000))
        assert response.status_code == 413
        assert "limit" in error_of(dialect, response)[0]


def test_the_models_list_is_read_by_both_sdks(server: BackgroundServer) -> None:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x") as client:
        assert [model.id for model in client.models.list()] == ["sim", "echo"]
    with anthropic.Anthropic(base_url=server.url, api_key="x") as claude:
        assert [model.id for model in claude.models.list()] == ["sim", "echo"]


def test_the_knobs_shape_the_stream_as_on_the_kits_endpoint(server: BackgroundServer) -> None:
    knobs = {"ttft_ms": 80, "token_ms": 0, "seed": 3, "max_tokens": 5}
    kit = stream_chat(server.url, "hi", **knobs)
    for dialect in DIALECTS:
        result = stream_chat(base_url(server, dialect), "hi", api=dialect, **knobs)
        assert result.text == kit.text and result.ttft is not None and result.ttft >= 0.08


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
TIME_KNOBS = ("ttft_ms", "token_ms", "jitter_ms")  # a random number there is a random wait: fuzzed with non-numbers
FUZZED = {
    "openai-chat": ("model", "messages", "max_tokens", "max_completion_tokens", "stream_options", "n", "seed"),
    "openai-responses": ("model", "input", "instructions", "max_output_tokens"),
    "anthropic": ("model", "messages", "system", "max_tokens", "stop_sequences"),
}
KNOB_FIELDS = ("seed", "fail_after", "context_window", "blocklist", "heartbeat_s", "temperature", "surprise")


@pytest.mark.parametrize("dialect", DIALECTS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_whatever_a_field_holds_the_answer_is_an_answer_or_a_400(
    server: BackgroundServer, dialect: str, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(FUZZED[dialect] + KNOB_FIELDS + TIME_KNOBS))
    values = JSON_VALUES.filter(lambda value: type(value) not in (int, float)) if name in TIME_KNOBS else JSON_VALUES
    payload = {**body(dialect, "hi"), name: data.draw(values), "stream": False}
    response = post(server, dialect, payload)
    allowed = (200, 400, 502) if name == "fail_after" else (200, 400)  # 502: the model failed, as asked
    assert response.status_code in allowed, response.text
    if response.status_code != 200:
        assert error_of(dialect, response)[0]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_heartbeats_keep_a_slow_prefill_alive_in_every_dialect(server: BackgroundServer, dialect: str) -> None:
    payload = body(dialect, "a b", stream=True, ttft_ms=150, heartbeat_s=0.02)
    response = post(server, dialect, payload)
    assert response.text.count(": heartbeat\n") >= 3
    result = stream_chat(base_url(server, dialect), "a b", api=dialect, model="echo", ttft_ms=150, heartbeat_s=0.02)
    assert result.text == "a b" and result.error is None


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_json_number_written_with_an_exponent_is_read_as_the_number(server: BackgroundServer, dialect: str) -> None:
    # The kit's query parsers take plain ASCII decimals only; JSON writes 1e-07 and 1e+16 with exponents.
    response = post(server, dialect, body(dialect, "hi", ttft_ms=1e-07, jitter_ms=0.0))
    assert response.status_code == 200, response.text
    refused = post(server, dialect, body(dialect, "hi", ttft_ms=1e16))
    assert refused.status_code == 400 and "60000" in error_of(dialect, refused)[0]
