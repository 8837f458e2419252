from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_lab.model import (
    MODELS,
    GenerationRequest,
    TokenSource,
    echo,
    echo_tokens,
    prompt_tokens,
    schedule_ms,
    sim,
    sim_tokens,
)
from tests.conftest import NASTY_PROMPTS


def run(model: str, request: GenerationRequest) -> list[str]:
    async def collect() -> list[str]:
        return [token async for token in MODELS[model](request)]

    return asyncio.run(collect())


def fast(prompt: str, max_tokens: int = 64, jitter_ms: float = 0, seed: int = 0) -> GenerationRequest:
    return GenerationRequest(prompt, max_tokens=max_tokens, ttft_ms=0, token_ms=0, jitter_ms=jitter_ms, seed=seed)


def test_sim_is_deterministic_for_a_prompt_and_seed() -> None:
    assert run("sim", fast("hello", seed=7)) == run("sim", fast("hello", seed=7))


def test_sim_text_depends_on_prompt_and_seed() -> None:
    base = sim_tokens("hello", 20, seed=1)
    assert sim_tokens("goodbye", 20, seed=1) != base
    assert sim_tokens("hello", 20, seed=2) != base


def test_sim_stops_at_max_tokens_and_reads_like_text() -> None:
    tokens = run("sim", fast("hello", max_tokens=30))
    assert len(tokens) == 30
    assert tokens[0][0].isupper() and all(token.startswith(" ") for token in tokens[1:])


def test_sim_text_does_not_depend_on_jitter() -> None:
    assert run("sim", fast("hello", jitter_ms=5)) == run("sim", fast("hello"))


@pytest.mark.parametrize("prompt", NASTY_PROMPTS)
def test_echo_returns_the_prompt_exactly(prompt: str) -> None:
    assert "".join(run("echo", fast(prompt))) == prompt


@given(st.text())
def test_echo_tokens_join_back_to_any_prompt(prompt: str) -> None:
    assert "".join(echo_tokens(prompt)) == prompt


def test_echo_stops_at_max_tokens() -> None:
    assert run("echo", fast("one two three four five", max_tokens=2)) == ["one", " two"]


@pytest.mark.parametrize("model", ["sim", "echo"])
def test_a_resumed_source_continues_exactly_where_it_left_off(model: str) -> None:
    request = fast("the quick brown fox jumps over the lazy dog", max_tokens=7, seed=4)
    whole = run(model, request)
    for resume_from in range(len(whole) + 1):
        assert run(model, replace(request, resume_from=resume_from)) == whole[resume_from:]


def test_a_resumed_source_pays_the_prefill_again() -> None:
    request = GenerationRequest("hi", max_tokens=3, ttft_ms=150, token_ms=0, resume_from=2)
    started = time.perf_counter()
    assert run("sim", request) == sim_tokens("hi", 3)[2:]
    assert time.perf_counter() - started >= 0.15


def test_prompt_tokens_counts_the_words_echo_would_send() -> None:
    assert [prompt_tokens(prompt) for prompt in ("", "hi", "to be\nor  not ")] == [0, 1, 5]


def test_schedule_without_jitter_is_exact() -> None:
    assert schedule_ms(GenerationRequest("", ttft_ms=50, token_ms=10), 4) == [50, 60, 70, 80]


def test_jitter_only_delays_and_depends_on_the_seed() -> None:
    plain = schedule_ms(GenerationRequest("", ttft_ms=50, token_ms=10), 100)
    jittered = schedule_ms(GenerationRequest("", ttft_ms=50, token_ms=10, jitter_ms=8, seed=1), 100)
    assert all(0 <= late - due < 8 for due, late in zip(plain, jittered, strict=True))
    assert jittered == schedule_ms(GenerationRequest("", ttft_ms=50, token_ms=10, jitter_ms=8, seed=1), 100)
    assert jittered != schedule_ms(GenerationRequest("", ttft_ms=50, token_ms=10, jitter_ms=8, seed=2), 100)


@pytest.mark.parametrize("source", [sim, echo])
def test_a_slow_consumer_does_not_push_the_schedule_back(source: TokenSource) -> None:
    """Tokens are due on an absolute schedule: time the consumer spends is not added per token."""
    tokens, token_ms, consumer_ms = 20, 20, 10
    request = GenerationRequest(" ".join(["word"] * tokens), max_tokens=tokens, ttft_ms=0, token_ms=token_ms)

    async def consume() -> float:
        start = time.perf_counter()
        async for _ in source(request):
            time.sleep(consumer_ms / 1000)  # blocks the loop, as a busy server would
        return time.perf_counter() - start

    elapsed = asyncio.run(consume())
    on_schedule = ((tokens - 1) * token_ms + consumer_ms) / 1000
    drifting = tokens * (token_ms + consumer_ms) / 1000
    assert elapsed < (on_schedule + drifting) / 2


def test_paced_streams_wait_in_one_heap_under_one_timer() -> None:
    from sse_lab.model import _ticks

    async def scenario() -> tuple[int, bool]:
        request = GenerationRequest("", max_tokens=3, ttft_ms=60_000, token_ms=10)
        firsts = [asyncio.ensure_future(anext(aiter(sim(request)))) for _ in range(50)]
        ticks = _ticks(asyncio.get_running_loop())
        deadline = time.monotonic() + 5
        while len(ticks.waiting) < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0)
        waiting, one_timer = len(ticks.waiting), ticks.timer is not None
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        return waiting, one_timer

    assert asyncio.run(scenario()) == (50, True)


def test_no_paced_token_is_released_before_its_timer_could_fire() -> None:
    from sse_lab.model import _Ticks

    tokens, token_ms = 5, 10

    async def stream(ttft_ms: int) -> list[float]:
        loop = asyncio.get_running_loop()
        request = GenerationRequest("", max_tokens=tokens, ttft_ms=ttft_ms, token_ms=token_ms)
        start = loop.time()
        due = [start + ms / 1000 for ms in schedule_ms(request, tokens)]
        early = []
        index = 0
        async for _ in sim(request):
            early.append(due[index] - loop.time())
            index += 1
        return early

    async def everyone() -> list[list[float]]:
        return await asyncio.gather(*(stream(index % 7) for index in range(50)))

    runs = asyncio.run(everyone())
    assert all(len(run) == tokens for run in runs)
    assert max(max(run) for run in runs) <= _Ticks.EARLY_S  # uvloop's timers may fire half a millisecond early


def test_a_stream_cancelled_while_it_waits_leaves_the_others_on_time() -> None:
    async def scenario() -> list[str]:
        request = GenerationRequest("", max_tokens=3, ttft_ms=20, token_ms=5)
        doomed = asyncio.ensure_future(anext(aiter(sim(request))))
        survivor = asyncio.ensure_future(_collect(sim(request)))
        await asyncio.sleep(0.005)
        doomed.cancel()
        return await asyncio.wait_for(survivor, timeout=5)

    assert len(asyncio.run(scenario())) == 3


def test_a_paced_token_is_awaited_on_the_shared_timers_future_with_no_frame_between() -> None:
    """The stream's task waits on the heap's future itself: waking for a token resumes no frame of the model."""
    from sse_lab.model import _ticks

    request = GenerationRequest("hi", max_tokens=2, ttft_ms=50, token_ms=10)

    async def scenario() -> tuple[bool, bool, str]:
        waiting = aiter(sim(request)).__anext__()
        queued = any(entry[2] is waiting for entry in _ticks(asyncio.get_running_loop()).waiting)
        return isinstance(waiting, asyncio.Future), queued, await waiting

    assert asyncio.run(scenario()) == (True, True, sim_tokens("hi", 1)[0])


def test_streams_whose_tokens_are_already_due_take_turns() -> None:
    """Unpaced (or behind schedule), a stream still lets the others run between its tokens."""
    order: list[int] = []

    async def consume(stream: int) -> None:
        async for _ in sim(fast("", max_tokens=20)):
            order.append(stream)

    async def both() -> None:
        await asyncio.gather(consume(0), consume(1))

    asyncio.run(both())
    assert len(order) == 40
    assert all(order[index] != order[index + 1] for index in range(len(order) - 1))


async def _collect(tokens: AsyncIterator[str]) -> list[str]:
    return [token async for token in tokens]
