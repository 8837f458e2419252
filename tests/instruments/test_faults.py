from __future__ import annotations

import httpx

from sse_lab import Settings, create_app, serve_in_background, stream_chat
from sse_lab.instruments.faults import DropConnections, IdleTimeout, SlowLink
from sse_lab.sse import decode

PARAMS = {"prompt": "hi", "max_tokens": 10, "ttft_ms": 0, "token_ms": 0}


def test_the_first_streams_are_cut_after_the_given_number_of_events() -> None:
    app = DropConnections(create_app(Settings(retry_ms=None)), after_events=3, connections=2)
    with serve_in_background(app) as running, httpx.Client(trust_env=False) as client:
        bodies = [client.get(running.url + "/api/chat/stream", params=PARAMS).content for _ in range(3)]
    assert [len(decode(body)) for body in bodies] == [3, 3, 11]  # cut, cut, then 10 tokens and done


def test_other_responses_pass_untouched() -> None:
    app = DropConnections(create_app(), after_events=0)
    with serve_in_background(app) as running, httpx.Client(trust_env=False) as client:
        assert client.get(running.url + "/api/chat", params=PARAMS).json()["tokens"] == 10
        assert len(decode(client.get(running.url + "/api/chat/stream", params=PARAMS).content)) == 0
        assert len(decode(client.get(running.url + "/api/chat/stream", params=PARAMS).content)) == 11


def test_an_idle_timeout_cuts_a_silent_stream_and_heartbeats_keep_it_alive() -> None:
    app = IdleTimeout(create_app(Settings(retry_ms=10)), idle_s=0.2)
    slow_prefill = {"max_tokens": 3, "ttft_ms": 600, "token_ms": 0, "max_reconnects": 1}
    with serve_in_background(app) as running:
        silent = stream_chat(running.url, "hi", **slow_prefill)
        kept_alive = stream_chat(running.url, "hi", heartbeat_s=0.05, **slow_prefill)
    assert silent.tokens == 0 and silent.error is not None and silent.error["code"] == "connection_lost"
    assert kept_alive.tokens == 3 and kept_alive.error is None and not kept_alive.drops


def test_a_slow_link_splits_events_across_reads() -> None:
    with serve_in_background(SlowLink(create_app(), chunk_bytes=8, pause_s=0.01)) as running:
        result = stream_chat(running.url, "hi", max_tokens=10, ttft_ms=0, token_ms=0)
    assert result.tokens == 10 and len(result.chunks) > 5 * len(result.events)
    assert all(received.complete_at - received.first_byte_at > 0.03 for received in result.events)
