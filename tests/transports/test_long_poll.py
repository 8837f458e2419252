from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sse_lab import MODELS, BackgroundServer, Settings, create_app, serve_in_background
from sse_lab.model import sim_tokens
from sse_lab.server import InvalidParameter, StreamStats
from sse_lab.transports.long_poll import PATH, PollLimits, long_poll_routes, poll_chat
from tests.conftest import wait_for


def poll(server: BackgroundServer, **params: object) -> httpx.Response:
    return httpx.get(server.url + PATH, params=params, trust_env=False, timeout=10)


def test_polls_collect_every_token_in_order_then_done(server: BackgroundServer) -> None:
    result = poll_chat(server.url, "hi", max_tokens=12, ttft_ms=20, token_ms=10, seed=5)
    assert result.text == "".join(sim_tokens("hi", 12, seed=5)) and result.tokens == 12
    assert result.finish_reason == "length" and result.error is None


def test_a_poll_returns_what_exists_now_and_waits_for_the_next_only_when_there_is_none(
    server: BackgroundServer,
) -> None:
    first = poll(server, prompt="hi", max_tokens=5, ttft_ms=0, token_ms=0, wait_s=5).json()
    wait_for(lambda: poll(server, id=first["id"], after=0, wait_s=0).json()["done"], what="the generation to end")
    everything = poll(server, id=first["id"], after=0, wait_s=5).json()
    assert [token["index"] for token in everything["tokens"]] == [0, 1, 2, 3, 4] and everything["next"] == 5
    assert everything["done"] == {"finish_reason": "length", "tokens": 5}
    tail = poll(server, id=first["id"], after=3).json()
    assert [token["index"] for token in tail["tokens"]] == [3, 4]


def test_a_poll_with_nothing_new_waits_at_most_wait_s(server: BackgroundServer) -> None:
    first = poll(server, prompt="hi", ttft_ms=60_000, wait_s=0).json()
    assert first["tokens"] == [] and first["done"] is None
    response = poll(server, id=first["id"], after=0, wait_s=0.2)
    assert response.json()["tokens"] == [] and 0.15 < response.elapsed.total_seconds() < 3
    httpx.delete(server.url + PATH, params={"id": first["id"]}, trust_env=False)


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"prompt": "hi", "token_ms": "abc"}, "token_ms"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "wait_s": 31}, "wait_s"),
        ({"prompt": "hi", "max_tokens": 3, "after": 4}, "after"),
        ({"id": "nope", "after": 0}, "id"),
        ({"prompt": "hi", "colour": "red"}, "colour"),
    ],
)
def test_bad_poll_parameters_get_422_naming_them(server: BackgroundServer, params: dict, parameter: str) -> None:
    response = poll(server, **params)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_parameter" and response.json()["parameter"] == parameter


def test_a_poll_naming_an_id_refuses_chat_parameters(server: BackgroundServer) -> None:
    first = poll(server, prompt="hi", max_tokens=2, ttft_ms=0, token_ms=0).json()
    response = poll(server, id=first["id"], prompt="other")
    assert response.status_code == 422 and response.json()["parameter"] == "prompt"


def test_delete_cancels_the_generation_and_stops_the_model() -> None:
    with serve_in_background() as running:
        first = poll(running, prompt="hi", max_tokens=400, ttft_ms=0, token_ms=10, wait_s=1).json()
        cancelled = httpx.delete(running.url + PATH, params={"id": first["id"]}, trust_env=False).json()
        counters = httpx.get(running.url + "/api/stats", trust_env=False).json()
    assert cancelled["done"]["finish_reason"] == "cancelled"
    assert counters["streams_active"] == 0 and counters["streams_cancelled"] == 1
    assert counters["tokens_generated"] < 50


def test_a_generation_nobody_polls_expires_and_its_model_stops() -> None:
    async def invalid(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "invalid_parameter"}, status_code=422)

    stats = StreamStats()
    routes = long_poll_routes(Settings(), MODELS, stats, PollLimits(idle_s=0.2))
    app = Starlette(routes=routes, exception_handlers={InvalidParameter: invalid})
    with serve_in_background(app) as running:
        first = poll(running, prompt="hi", max_tokens=400, ttft_ms=0, token_ms=10, wait_s=0).json()
        wait_for(lambda: stats.streams_active == 0, what="the abandoned generation to expire")
        assert stats.streams_cancelled == 1 and stats.tokens_generated < 100
        forgotten = lambda: poll(running, id=first["id"]).status_code == 422  # noqa: E731
        wait_for(forgotten, what="the expired generation to be forgotten")


def test_long_polls_share_the_apps_slots_and_the_server_holds_a_bounded_number() -> None:
    with serve_in_background(create_app(Settings(max_concurrent_streams=1))) as running:
        first = poll(running, prompt="hi", ttft_ms=60_000, wait_s=0).json()
        assert poll(running, prompt="hi", wait_s=0).status_code == 429
        httpx.delete(running.url + PATH, params={"id": first["id"]}, trust_env=False)
        assert poll(running, prompt="hi", max_tokens=1, ttft_ms=0, wait_s=0).status_code == 200
        # two finished generations held (2 x max_concurrent_streams); a third start forgets the oldest
        assert poll(running, prompt="hi", max_tokens=1, ttft_ms=0, wait_s=0).status_code in (200, 429)
        assert poll(running, id=first["id"]).status_code == 422


def test_too_many_polls_waiting_on_one_generation_get_429(server: BackgroundServer) -> None:
    first = poll(server, prompt="hi", ttft_ms=60_000, wait_s=0).json()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(poll, server, id=first["id"], wait_s=1) for _ in range(3)]
        statuses = sorted(future.result().status_code for future in waiting)
    httpx.delete(server.url + PATH, params={"id": first["id"]}, trust_env=False)
    assert statuses == [200, 200, 429]
