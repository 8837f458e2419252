from __future__ import annotations

import pytest

from sse_lab import BackgroundServer
from sse_lab.experiments import dialects

FAST = {"ttft_ms": 0, "token_ms": 0}


def test_the_capture_of_each_dialect_is_a_complete_event_stream(server: BackgroundServer) -> None:
    for api in dialects.APIS:
        wire = dialects.capture_stream(server.url, api, "a b", model="echo", **FAST)
        assert wire.status == 200 and wire.complete and wire.headers["content-type"].startswith("text/event-stream")
        assert wire.request.startswith(b"GET" if api == "kit" else b"POST")


def test_the_provider_framings_cost_more_bytes_per_token_than_the_kits(server: BackgroundServer) -> None:
    costs = dialects.wire_costs(server.url, short=5, long=25)
    assert costs["kit"].bytes_per_token < costs["anthropic"].bytes_per_token < costs["openai-chat"].bytes_per_token
    assert all(cost.fixed_bytes >= 0 and cost.overhead > 1 for cost in costs.values())
    assert costs["openai-responses"].fixed_bytes > costs["openai-chat"].fixed_bytes  # the response object, thrice


def test_server_cpu_per_token_is_measured_per_run_and_dialect() -> None:
    cpu = dialects.server_cpu_per_token(tokens=50, runs=2, progress=False)
    assert set(cpu) == set(dialects.APIS) and all(len(values) == 2 and min(values) > 0 for values in cpu.values())


def test_latencies_run_every_dialect_in_turn(server: BackgroundServer) -> None:
    timed = dialects.latencies(server.url, runs=2, progress=False, max_tokens=4, **FAST)
    assert {api: [run.tokens for run in runs] for api, runs in timed.items()} == {api: [4, 4] for api in dialects.APIS}


@pytest.mark.parametrize("api", dialects.SDK_APIS)
def test_the_sdk_and_the_kit_client_read_the_same_text(server: BackgroundServer, api: str) -> None:
    pieces: list[str] = []
    with dialects.sdk_reader(api, server.url) as read:
        by_sdk = dialects.sdk_stream(read, "hi", on_token=pieces.append, max_tokens=6, **FAST)
    assert by_sdk.tokens == 6 and "".join(pieces) == by_sdk.text
    runs = dialects.sdk_vs_kit(server.url, api, runs=1, prompt="hi", progress=False, max_tokens=6, **FAST)
    assert [run.text for results in runs.values() for run in results] == [by_sdk.text] * 2


def test_an_unknown_sdk_is_refused(server: BackgroundServer) -> None:
    with pytest.raises(ValueError, match="api must be one of openai-chat"), dialects.sdk_reader("kit", server.url):
        pass


def test_only_the_kits_stream_survives_a_drop() -> None:
    dropped = dialects.dropped_streams(after_events=6, retry_ms=10, max_tokens=12, **FAST)
    assert dropped["kit"].tokens == 12 and dropped["kit"].error is None and len(dropped["kit"].drops) == 1
    for api in dialects.SDK_APIS:
        assert dropped[api].tokens < 6 and dropped[api].error is not None
        assert dropped[api].error["code"] == "connection_lost"
