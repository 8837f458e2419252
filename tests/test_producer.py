from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from httpx_sse import connect_sse

from sse_lab import GenerationRequest, Settings, create_app, serve_in_background, stream_chat
from sse_lab.client import fetch_stats
from sse_lab.instruments.faults import DropConnections, SlowLink
from sse_lab.model import MODELS, sim_tokens
from sse_lab.producer import POLICIES, QUEUE_MAX_LIMIT, Channel
from sse_lab.sse import decode, encode_event
from tests.conftest import wait_for

PROMPT = "how slow is the reader?"
FAST = {"max_tokens": 120, "ttft_ms": 0, "token_ms": 0}
WHOLE = "".join(sim_tokens(PROMPT, FAST["max_tokens"]))


def slow_writer_app(**settings: object) -> SlowLink:
    """The app behind a link that takes each write in 16-byte pieces 1 ms apart: a response slower than the model."""
    return SlowLink(create_app(Settings(**settings)), chunk_bytes=16, pause_s=0.001)  # type: ignore[arg-type]


def httpx_sse_tokens(url: str, **params: object) -> list[tuple[str, dict]]:
    with httpx.Client(trust_env=False) as client, connect_sse(client, "GET", url, params=params) as source:
        return [(sse.id, json.loads(sse.data)) for sse in source.iter_sse() if sse.event == "token"]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_delivers_the_exact_text_to_the_kits_client_and_to_httpx_sse(policy: str) -> None:
    with serve_in_background(slow_writer_app()) as server:
        result = stream_chat(server.url, PROMPT, backpressure=policy, queue_max=4, **FAST)
        tokens = httpx_sse_tokens(
            server.url + "/api/chat/stream", prompt=PROMPT, backpressure=policy, queue_max=4, **FAST
        )
    assert result.text == WHOLE and result.tokens == FAST["max_tokens"] and result.finish_reason == "length"
    assert "".join(data["token"] for _, data in tokens) == WHOLE
    assert sum(data.get("count", 1) for _, data in tokens) == FAST["max_tokens"]
    # Every event's id is the index of its last token: what Last-Event-ID resumes after.
    assert all(event_id == str(data["index"] + data.get("count", 1) - 1) for event_id, data in tokens)


def test_coalesce_sends_fewer_larger_events_when_the_writer_falls_behind() -> None:
    with serve_in_background(slow_writer_app()) as server:
        merged = stream_chat(server.url, PROMPT, backpressure="coalesce", queue_max=4, **FAST)
        paused = stream_chat(server.url, PROMPT, backpressure="pause", queue_max=4, **FAST)
    token_events = [received for received in merged.events if received.event.event == "token"]
    assert merged.text == paused.text == WHOLE
    assert len(token_events) < FAST["max_tokens"] / 3
    assert len([received for received in paused.events if received.event.event == "token"]) == FAST["max_tokens"]
    assert max(merged.lumps) > 4  # tokens of one merged event arrive together


@pytest.mark.parametrize("policy", POLICIES)
def test_the_queue_is_bounded_by_queue_max_except_under_buffer(policy: str) -> None:
    with serve_in_background(slow_writer_app()) as server:
        stream_chat(server.url, PROMPT, backpressure=policy, queue_max=4, **FAST)
        counters = fetch_stats(server.url)
    peak = counters["queue_peak_events"]
    if policy == "pull":
        assert peak == 0  # no queue at all
    elif policy == "buffer":
        assert peak > 10 * 4  # the producer ran ahead: most of the reply waited in the queue
    else:
        assert 1 <= peak <= 4 + 1  # queue_max events, and the `done` that closes a coalesced queue
    assert counters["queued_events"] == counters["queued_bytes"] == 0  # nothing left behind


def test_settings_choose_the_policy_of_every_stream() -> None:
    with serve_in_background(slow_writer_app(backpressure="coalesce", queue_max=2)) as server:
        result = stream_chat(server.url, PROMPT, **FAST)
        assert fetch_stats(server.url)["queue_peak_events"] <= 3
    assert result.text == WHOLE and len(result.events) < FAST["max_tokens"] / 3


def test_a_resumed_coalesce_stream_ends_with_exactly_the_uninterrupted_text() -> None:
    # The model makes a token a millisecond and the link takes about 16 bytes one (a token event is about 65):
    # the queue fills at once and stays full, so the events before the cut are merged ones.
    params = {"backpressure": "coalesce", "queue_max": 3, "max_tokens": 300, "ttft_ms": 0, "token_ms": 1}
    whole = "".join(sim_tokens(PROMPT, 300))
    app = SlowLink(DropConnections(create_app(Settings(retry_ms=10)), after_events=8), chunk_bytes=16, pause_s=0.001)
    with serve_in_background(app) as server:
        resumed = stream_chat(server.url, PROMPT, **params)
    (drop,) = resumed.drops
    counts = [json.loads(received.event.data).get("count", 1) for received in resumed.events[:8]]
    assert max(counts) > 1  # merged events before the drop: resumption starts after the last of their tokens
    assert int(drop.last_event_id) > 7
    assert resumed.text == whole and resumed.tokens == 300


@dataclass
class Gauge:
    queued_events: int = 0
    queued_bytes: int = 0
    queue_peak_events: int = 0


def token_event(index: int, token: str) -> bytes:
    return encode_event(json.dumps({"token": token, "index": index}), event="token", id=str(index))


def test_a_full_coalescing_queue_merges_everything_waiting_with_the_newcomer() -> None:
    async def fill_then_drain() -> tuple[list[bytes], Gauge]:
        gauge = Gauge()
        channel = Channel("coalesce", 3, gauge)
        await channel.put(b"retry: 10\n")
        for index in range(10):
            await channel.put(token_event(index, f" t{index}\n"))  # a line break: escaped in JSON, intact
        await channel.put(encode_event("{}", event="done"))
        # retry, tokens 0-8 merged when token 8 found the queue full, token 9, and `done` beyond queue_max
        assert gauge.queued_events == len(channel.items) == gauge.queue_peak_events == 4
        channel.finish()
        return [chunk async for chunk in _drain(channel)], gauge

    chunks, gauge = asyncio.run(fill_then_drain())
    assert chunks[0] == b"retry: 10\n"
    events = decode(b"".join(chunks))
    tokens = [(event.id, json.loads(event.data)) for event in events if event.event == "token"]
    assert "".join(data["token"] for _, data in tokens) == "".join(f" t{index}\n" for index in range(10))
    assert [(event_id, data["index"], data.get("count", 1)) for event_id, data in tokens] == [("8", 0, 9), ("9", 9, 1)]
    assert events[-1].event == "done" and gauge.queued_events == gauge.queued_bytes == 0


async def _drain(channel: Channel) -> AsyncIterator[bytes]:
    while (chunk := await channel.get()) is not None:
        yield chunk


def test_the_producer_task_stops_when_the_client_leaves() -> None:
    closed = asyncio.Event()

    async def watched_sim(request: GenerationRequest) -> AsyncIterator[str]:
        try:
            async for token in MODELS["sim"](request):
                yield token
        finally:
            closed.set()  # the producer's cleanup reached the model

    with serve_in_background(create_app(models={"sim": watched_sim})) as server:
        url = server.url + "/api/chat/stream"
        params = {"prompt": PROMPT, "max_tokens": 400, "ttft_ms": 0, "token_ms": 10, "backpressure": "buffer"}
        with httpx.Client(trust_env=False) as client, connect_sse(client, "GET", url, params=params) as source:
            events = source.iter_sse()
            for _ in range(3):
                next(events)
        wait_for(lambda: fetch_stats(server.url)["streams_active"] == 0, what="the stream to end")
        wait_for(closed.is_set, what="the model to be closed")
        counters = fetch_stats(server.url)
    assert counters["streams_cancelled"] == 1 and counters["queued_events"] == 0
    assert counters["tokens_generated"] < 400 / 4  # the producer did not run on to the end


async def huge_tokens(request: GenerationRequest) -> AsyncIterator[str]:
    """Tokens of 64 KiB each, at once: a reply that fills any socket buffer in a few tokens."""
    for _ in range(request.max_tokens):
        yield "x" * 65_536
        await asyncio.sleep(0)


@pytest.mark.parametrize("policy", POLICIES)
def test_send_timeout_ends_a_stream_whose_reader_takes_nothing_and_frees_its_slot(policy: str) -> None:
    settings = Settings(max_concurrent_streams=1, send_timeout_s=0.2)
    with serve_in_background(create_app(settings, models={"huge": huge_tokens, **MODELS})) as server:
        query = f"prompt=hi&model=huge&max_tokens=200&ttft_ms=0&backpressure={policy}&queue_max=4"
        with socket.create_connection((server.host, server.port)) as stalled:
            stalled.sendall(f"GET /api/chat/stream?{query} HTTP/1.1\r\nHost: lab\r\n\r\n".encode())
            wait_for(
                lambda: fetch_stats(server.url)["streams_send_timeout"] == 1, what="the send timeout", timeout_s=20
            )
            wait_for(lambda: fetch_stats(server.url)["streams_active"] == 0, what="the slot to be freed")
            after = stream_chat(server.url, "the next client", max_tokens=3, ttft_ms=0, token_ms=0)  # the only slot
        counters = fetch_stats(server.url)
    assert after.tokens == 3
    assert counters["streams_send_timeout"] == 1 and counters["streams_cancelled"] == 0
    assert counters["streams_completed"] == 1 and counters["tokens_generated"] <= 200 + 3
    assert counters["queued_events"] == 0


@pytest.mark.parametrize(
    ("params", "parameter", "reason"),
    [
        ({"backpressure": "drop"}, "backpressure", "one of pull, buffer, pause, coalesce"),
        ({"queue_max": "0"}, "queue_max", f"from 1 to {QUEUE_MAX_LIMIT}"),
        ({"queue_max": str(QUEUE_MAX_LIMIT + 1)}, "queue_max", f"from 1 to {QUEUE_MAX_LIMIT}"),
        ({"queue_max": "lots"}, "queue_max", "integer"),
        ({"send_timeout_s": "0"}, "send_timeout_s", "from 0.01"),
        ({"send_timeout_s": "nan"}, "send_timeout_s", "number"),
    ],
)
def test_bad_backpressure_parameters_get_422(params: dict, parameter: str, reason: str) -> None:
    with serve_in_background() as server:
        stream = httpx.get(server.url + "/api/chat/stream", params={"prompt": "hi", **params}, trust_env=False)
        buffered = httpx.get(server.url + "/api/chat", params={"prompt": "hi", **params}, trust_env=False)
    assert stream.status_code == 422
    assert stream.json()["parameter"] == parameter and reason in stream.json()["reason"]
    assert buffered.status_code == 422 and "only /api/chat/stream" in buffered.json()["reason"]
