from __future__ import annotations

import asyncio

import pytest

from sse_lab import MODELS, GenerationRequest, Settings
from sse_lab.server import InvalidParameter, StreamOptions, StreamStats, TooManyStreams
from sse_lab.transports.generation import Done, Failed, Token, TokenRun, parse_chat, take_slot


def run_to_the_end(run: TokenRun) -> list[object]:
    async def collect() -> list[object]:
        messages = [message async for message in run.messages()]
        run.end()
        return messages

    return asyncio.run(collect())


def test_parse_chat_takes_json_numbers_and_strings_as_the_query_string_would() -> None:
    source, generation, options = parse_chat(
        {"prompt": "hi", "max_tokens": 7, "token_ms": 1.5, "seed": "3"}, Settings(), MODELS, path="/ws/chat"
    )
    assert source is MODELS["sim"] and (generation.max_tokens, generation.token_ms, generation.seed) == (7, 1.5, 3)
    assert options.context_window == Settings().context_window


@pytest.mark.parametrize(("value", "parameter"), [(True, "seed"), (None, "seed"), ([1], "seed"), ("x", "seed")])
def test_parse_chat_refuses_what_is_not_a_valid_number(value: object, parameter: str) -> None:
    with pytest.raises(InvalidParameter) as refused:
        parse_chat({"prompt": "hi", "seed": value}, Settings(), MODELS, path="/ws/chat")
    assert refused.value.parameter == parameter


def test_a_prompt_too_long_for_the_window_is_refused_like_on_the_stream() -> None:
    with pytest.raises(InvalidParameter) as refused:
        parse_chat({"prompt": "a " * 20}, Settings(context_window=10), MODELS, path="/ws/chat")
    assert refused.value.parameter == "prompt"


def test_a_run_yields_tokens_then_done_and_counts_itself() -> None:
    stats = StreamStats()
    take_slot(Settings(), stats)
    run = TokenRun(MODELS["echo"], GenerationRequest("a b c", ttft_ms=0, token_ms=0), _options(), Settings(), stats)
    assert run_to_the_end(run) == [Token("a", 0), Token(" b", 1), Token(" c", 2), Done("stop", 3)]
    assert (stats.streams_active, stats.streams_completed, stats.tokens_generated) == (0, 1, 3)


def test_the_content_filter_withholds_the_token_and_fails_the_run() -> None:
    stats = StreamStats()
    take_slot(Settings(), stats)
    options = _options(blocklist=("bad",))
    run = TokenRun(MODELS["echo"], GenerationRequest("ok bad ok", ttft_ms=0, token_ms=0), options, Settings(), stats)
    messages = run_to_the_end(run)
    assert messages[0] == Token("ok", 0) and isinstance(messages[1], Failed) and messages[1].code == "content_filter"
    assert len(messages) == 2 and stats.streams_failed == 1


def test_slots_are_shared_and_limited() -> None:
    stats = StreamStats()
    take_slot(Settings(max_concurrent_streams=1), stats)
    with pytest.raises(TooManyStreams):
        take_slot(Settings(max_concurrent_streams=1), stats)
    assert stats.streams_rejected == 1


def _options(blocklist: tuple[str, ...] = ()) -> StreamOptions:
    return StreamOptions(heartbeat_s=15, context_window=8192, prompt_tokens=1, blocklist=blocklist)
