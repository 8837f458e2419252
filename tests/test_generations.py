from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
import redis

from sse_lab import BackgroundServer, Settings, create_app, serve_in_background, stream_chat
from sse_lab.experiments.beyond_one_process import Follow, follow
from sse_lab.generations import _APPEND, WORKER_HEADER, Keys, entry_id, generation_keys, worker_id
from sse_lab.model import sim_tokens
from sse_lab.parts.redis import SKIP_MESSAGE, RedisServer, redis_or_skip, start_redis
from tests.conftest import wait_for

FAST = {"max_tokens": 30, "ttft_ms": 50, "token_ms": 10}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if redis_or_skip() is None:
        pytest.skip(SKIP_MESSAGE)
    with start_redis() as server:
        yield server


@pytest.fixture(scope="module")
def settings(redis_server: RedisServer) -> Settings:
    return Settings(redis_url=redis_server.url, retry_ms=50, lease_ms=400, generation_grace_s=0.5)


@pytest.fixture
def worker(settings: Settings) -> Iterator[BackgroundServer]:
    with serve_in_background(create_app(settings)) as server:
        yield server


def stats(server: BackgroundServer) -> dict[str, int]:
    counters: dict[str, int] = httpx.get(server.url + "/api/stats", trust_env=False).json()
    return counters


def test_a_generation_streams_the_sim_text_with_the_worker_named(worker: BackgroundServer) -> None:
    result = stream_chat(worker.url, "hello", generation="plain-1", **FAST)
    assert result.text == "".join(sim_tokens("hello", 30))
    assert result.finish_reason == "length"
    with httpx.stream("GET", worker.url + "/api/chat/stream", params={"prompt": "x", "max_tokens": 1}) as response:
        assert response.headers[WORKER_HEADER] == worker_id()
    wait_for(lambda: stats(worker)["streams_active"] == 0, what="every slot released")


def test_without_redis_the_app_is_unchanged(server: BackgroundServer) -> None:
    response = httpx.get(server.url + "/api/chat/stream", params={"prompt": "hi", "generation": "g"})
    assert response.status_code == 422
    assert response.json()["parameter"] == "generation"
    assert WORKER_HEADER.lower() not in response.headers


def test_a_bad_generation_id_is_refused_with_422(worker: BackgroundServer) -> None:
    response = httpx.get(worker.url + "/api/chat/stream", params={"prompt": "hi", "generation": "a b"})
    assert response.status_code == 422
    assert response.json()["parameter"] == "generation"


def test_a_cut_connection_resumes_by_replay_without_paying_the_prefill_again(worker: BackgroundServer) -> None:
    params = {"max_tokens": 30, "ttft_ms": 800, "token_ms": 10}

    async def scenario() -> Follow:
        record = Follow("cut-1", "cut me", params)
        task = asyncio.ensure_future(follow(worker.url, "cut me", "cut-1", record=record, **params))
        while len(record.arrivals) < 10:
            await asyncio.sleep(0.005)
        record.cut()
        return await task

    record = asyncio.run(scenario())
    assert record.text == "".join(sim_tokens("cut me", 30))
    assert record.duplicated == 0
    first, resumed = record.legs[0], record.legs[1]
    assert first.ended_by == "cut"
    assert first.ttft > 0.8
    assert resumed.ttft < 0.4  # the prefill (0.8 s) is not paid again: the model never stopped


def test_two_readers_of_one_generation_get_one_answer_from_one_model_run(worker: BackgroundServer) -> None:
    before = stats(worker)["tokens_generated"]

    async def both() -> list[Follow]:
        first = asyncio.ensure_future(follow(worker.url, "shared", "shared-1", **FAST))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(follow(worker.url, "shared", "shared-1", **FAST))
        return list(await asyncio.gather(first, second))

    readers = asyncio.run(both())
    expected = "".join(sim_tokens("shared", 30))
    assert [reader.text for reader in readers] == [expected, expected]
    assert stats(worker)["tokens_generated"] - before == 30  # the model ran once


def test_a_late_reader_gets_the_whole_answer_replayed(worker: BackgroundServer) -> None:
    params = {"max_tokens": 30, "ttft_ms": 500, "token_ms": 10}
    stream_chat(worker.url, "late", generation="late-1", **params)
    result = stream_chat(worker.url, "late", generation="late-1", **params)
    assert result.text == "".join(sim_tokens("late", 30))
    assert result.ttft < 0.25  # replay: no prefill (0.5 s), no pacing


def test_streams_expire(redis_server: RedisServer, settings: Settings) -> None:
    with serve_in_background(create_app(replace(settings, stream_expire_s=0.3))) as server:
        stream_chat(server.url, "expire", generation="expire-1", **FAST)
        assert generation_keys(redis_server.url, "expire-1")["stream"]
        wait_for(lambda: not any(generation_keys(redis_server.url, "expire-1").values()), 3, "every key to expire")
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.keys("sse-lab:wake:*") == []  # a stopped worker deletes its wake stream


def test_a_generation_nobody_reads_stops_after_the_grace_period(
    worker: BackgroundServer, redis_server: RedisServer
) -> None:
    params = {"max_tokens": 2000, "ttft_ms": 0, "token_ms": 5}
    with httpx.stream(
        "GET", worker.url + "/api/chat/stream", params={"prompt": "alone", "generation": "grace-1", **params}
    ) as response:
        next(response.iter_bytes())
    wait_for(lambda: stats(worker)["streams_active"] == 0, what="the reader to leave")
    wait_for(lambda: not generation_keys(redis_server.url, "grace-1")["lease"], 3, "the producer to stop")
    produced = stats(worker)["tokens_generated"]
    assert produced < 2000


def test_a_producer_that_lost_its_lease_cannot_write(redis_server: RedisServer) -> None:
    keys = Keys.of("fenced-1")
    with redis.Redis.from_url(redis_server.url) as client:
        append = client.register_script(_APPEND)
        client.set(keys.lease, "new-owner", px=5_000)
        assert append(keys=[keys.lease, keys.stream, keys.request], args=["new-owner", entry_id(0), "token", "a", 5000])
        assert not append(
            keys=[keys.lease, keys.stream, keys.request], args=["old-owner", entry_id(1), "token", "b", 5000]
        )
        with pytest.raises(redis.ResponseError):  # an id written already is refused: no duplicate token
            append(keys=[keys.lease, keys.stream, keys.request], args=["new-owner", entry_id(0), "token", "c", 5000])
        assert client.xlen(keys.stream) == 1


def test_a_request_while_redis_is_down_gets_503_not_a_traceback() -> None:
    if redis_or_skip() is None:
        pytest.skip(SKIP_MESSAGE)
    with start_redis() as lonely:
        app = create_app(Settings(redis_url=lonely.url))
        with serve_in_background(app) as server:
            lonely.stop()
            response = httpx.get(server.url + "/api/chat/stream", params={"prompt": "hi", "generation": "down-1"})
            assert response.status_code == 503
            assert response.json()["error"] == "store_unavailable"
            wait_for(lambda: stats(server)["streams_active"] == 0, what="the slot released")
