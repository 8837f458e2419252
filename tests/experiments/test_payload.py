from __future__ import annotations

import re

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sse_lab import BackgroundServer, encode_event, serve_in_background
from sse_lab.experiments.payload import (
    FORMATS,
    SERIALIZERS,
    STREAM_PATH,
    SerializerCost,
    ServerCpu,
    WireFormat,
    coalescing_smoothness,
    create_payload_app,
    payload_cost,
    round_trip,
    serialization_table,
    serializer_cost,
    server_cpu_per_event,
)
from sse_lab.model import sim_tokens
from tests.conftest import NASTY_PROMPTS

TOKENS = ["Hi", " é", "\n"]  # 2 + 3 + 1 = 6 bytes of UTF-8

EXPECTED_EVENTS = {
    WireFormat("json", 1): [
        b'event: token\nid: 0\ndata: {"token":"Hi","index":0}\n\n',
        b'event: token\nid: 1\ndata: {"token":" \xc3\xa9","index":1}\n\n',
        b'event: token\nid: 2\ndata: {"token":"\\n","index":2}\n\n',
    ],
    WireFormat("json", 2): [
        b'event: token\nid: 1\ndata: {"tokens":["Hi"," \xc3\xa9"],"index":0}\n\n',
        b'event: token\nid: 2\ndata: {"tokens":["\\n"],"index":2}\n\n',
    ],
    WireFormat("json", 4): [b'event: token\nid: 2\ndata: {"tokens":["Hi"," \xc3\xa9","\\n"],"index":0}\n\n'],
    WireFormat("text", 1): [b"data: Hi\n\n", b"data:  \xc3\xa9\n\n", b"data: \ndata: \n\n"],
    WireFormat("text", 4): [b"data: Hi \xc3\xa9\ndata: \n\n"],
}


@pytest.mark.parametrize("wire_format", EXPECTED_EVENTS, ids=lambda wire_format: wire_format.name)
def test_events_are_exactly_the_expected_bytes(wire_format: WireFormat) -> None:
    assert list(wire_format.events(TOKENS)) == EXPECTED_EVENTS[wire_format]


def test_payload_cost_counts_every_byte() -> None:
    costs = {cost.format: cost for cost in payload_cost(TOKENS, formats=list(EXPECTED_EVENTS), repeats=1)}
    assert {name: (cost.events, cost.wire_bytes) for name, cost in costs.items()} == {
        "json x1": (3, 51 + 52 + 51),
        "json x2": (2, 60 + 54),
        "json x4": (1, 65),
        "text x1": (3, 10 + 11 + 15),
        "text x4": (1, 20),
    }
    json_x1 = costs["json x1"]
    assert (json_x1.tokens, json_x1.token_bytes) == (3, 6)
    assert json_x1.bytes_per_token == pytest.approx(154 / 3)
    assert json_x1.overhead_ratio == pytest.approx(154 / 6)


def test_coalescing_and_raw_text_cut_the_bytes_per_token_of_real_text() -> None:
    costs = payload_cost()
    per_token = {cost.format: cost.bytes_per_token for cost in costs}
    assert per_token["json x1"] > per_token["json x4"] > per_token["json x16"] > per_token["text x16"]
    assert per_token["json x1"] > per_token["text x1"] > per_token["text x4"] > per_token["text x16"]
    assert all(cost.overhead_ratio > 1 and cost.cpu_us_per_token > 0 for cost in costs)


def test_json_x1_is_what_the_chat_server_sends(server: BackgroundServer) -> None:
    params = {"prompt": "wire", "max_tokens": 20, "ttft_ms": 0, "token_ms": 0}
    body = httpx.get(server.url + "/api/chat/stream", params=params, trust_env=False).content
    sent = re.findall(rb"event: token\n.*?\n\n", body, re.DOTALL)
    assert sent == list(WireFormat("json").events(sim_tokens("wire", 20)))


@pytest.mark.parametrize("wire_format", FORMATS, ids=lambda wire_format: wire_format.name)
def test_every_format_carries_the_text_of_nasty_tokens(wire_format: WireFormat) -> None:
    tokens = [token for token in NASTY_PROMPTS if "\r" not in token]
    received = round_trip(tokens, wire_format)
    assert "".join(received) == "".join(tokens)
    if wire_format.kind == "json":
        assert received == tokens  # token boundaries survive coalescing too


def test_raw_text_turns_cr_and_crlf_into_lf_where_json_keeps_them() -> None:
    tokens = ["cr\ronly", "crlf\r\n", "lf\n"]
    assert round_trip(tokens, WireFormat("text")) == ["cr\nonly", "crlf\n", "lf\n"]
    assert round_trip(tokens, WireFormat("json")) == tokens


@settings(max_examples=50, deadline=None)
@given(tokens=st.lists(st.text(max_size=8), max_size=12), per_event=st.sampled_from([1, 3]))
def test_round_trip_of_any_tokens(tokens: list[str], per_event: int) -> None:
    assert round_trip(tokens, WireFormat("json", per_event)) == tokens
    chunks = [tokens[start : start + per_event] for start in range(0, len(tokens), per_event)]
    as_lf = [re.sub(r"\r\n|\r", "\n", "".join(chunk)) for chunk in chunks]
    assert round_trip(tokens, WireFormat("text", per_event)) == as_lf


def test_a_format_must_be_known_and_hold_at_least_one_token() -> None:
    with pytest.raises(ValueError, match="kind"):
        WireFormat("xml")
    with pytest.raises(ValueError, match="per_event"):
        WireFormat("json", 0)


@pytest.mark.parametrize(
    ("params", "parameter"),
    [({"kind": "xml"}, "kind"), ({"per_event": "0"}, "per_event"), ({"per_event": "x"}, "per_event"),
     ({"max_tokens": "many"}, "max_tokens"), ({"token_ms": "soon"}, "token_ms")],
)  # fmt: skip
def test_payload_app_refuses_bad_parameters_with_json_naming_them(params: dict[str, str], parameter: str) -> None:
    with serve_in_background(create_payload_app()) as payload_server:
        response = httpx.get(payload_server.url + STREAM_PATH, params=params, trust_env=False)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_parameter" and response.json()["parameter"] == parameter


def test_coalescing_4_tokens_per_event_spaces_updates_4_token_times_apart() -> None:
    token_ms = 20
    one, four = coalescing_smoothness((1, 4), tokens=24, token_ms=token_ms, progress=False)
    assert one.tokens_per_event == (1,) * 24
    assert four.tokens_per_event == (4,) * 6
    assert 0.5 * token_ms < one.median_gap_ms < 2 * token_ms
    assert 3 * token_ms < four.median_gap_ms < 6 * token_ms
    assert four.expected_gap_ms == 4 * token_ms
    # The same tokens in the same time: only the way they arrive changed.
    assert len(four.token_offsets_s) == 24
    assert abs(four.event_offsets_s[-1] - one.event_offsets_s[-1]) < 0.15


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_every_serializer_writes_the_bytes_the_chat_server_writes(serializer: str) -> None:
    tokens = [*NASTY_PROMPTS, "\r\n", '"quoted"', "back\\slash", "\u2028"]
    expected = [WireFormat("json").encode([token], index) for index, token in enumerate(tokens)]
    serialize = SERIALIZERS[serializer]
    written = [
        encode_event(serialize({"token": token, "index": index}).decode(), event="token", id=str(index))
        for index, token in enumerate(tokens)
    ]
    assert written == expected


def test_serializer_cost_measures_each_serializer_against_json() -> None:
    costs = {cost.serializer: cost for cost in serializer_cost(sim_tokens("cost", 2_000), repeats=2)}
    assert list(costs) == ["json", "orjson", "msgspec"]
    assert costs["json"].times_faster_than_json == 1.0
    assert all(cost.events == 2_000 and cost.cpu_us_per_event > 0 for cost in costs.values())
    for name in ("orjson", "msgspec"):
        assert costs[name].times_faster_than_json == pytest.approx(
            costs["json"].cpu_us_per_event / costs[name].cpu_us_per_event
        )


def test_server_cpu_per_event_is_measured_in_the_server_process_alone() -> None:
    server = server_cpu_per_event(20_000)
    assert server.tokens == 20_000 and server.cpu_s > 0
    assert server.us_per_event == pytest.approx(1e6 * server.cpu_s / 20_000)
    assert server.us_per_event < 1_000  # microseconds: a token event is cheap, even on a busy machine


def test_serialization_table_gives_each_serializers_share_of_the_server() -> None:
    costs = [SerializerCost("json", 10, 2.0, 1.0), SerializerCost("orjson", 10, 0.1, 20.0)]
    table = serialization_table(costs, ServerCpu(tokens=10, cpu_s=0.0001, us_per_event=10.0))
    rows = table.splitlines()
    assert rows[1].split() == ["json", "2.00", "1.0", "20.0%"]
    assert rows[2].split() == ["orjson", "0.10", "20.0", "1.0%"]
    assert rows[3].split()[:2] == ["server", "10.00"]
