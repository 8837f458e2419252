"""Token sources: what the server streams, behind one async-iterator interface.

A token source is any callable that takes a `GenerationRequest` and returns an
async iterator of text tokens. The server never looks further than that, so a
real model plugs in beside the simulated ones without touching the endpoints:

    async def my_model(request: GenerationRequest) -> AsyncIterator[str]:
        async for token in call_my_llm(request.prompt, request.max_tokens):
            yield token

    app = create_app(models={"mine": my_model})

Both built-in sources keep an absolute schedule: token i is due at
start + ttft + i x token_ms (plus its jitter). Sleeping a fixed interval after
each token instead would drift by the event loop's overshoot on every token, and
the notebooks would blame that drift on the transport.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asked for: the prompt, a token budget and a latency profile.

    ttft_ms is the time to the first token (the model's prefill), token_ms the time
    between tokens after that, jitter_ms the width of a uniform random delay added to
    each token's due time (0 turns it off), seed fixes both the text and the jitter.
    """

    prompt: str
    max_tokens: int = 64
    ttft_ms: float = 200.0
    token_ms: float = 30.0
    jitter_ms: float = 0.0
    seed: int = 0


TokenSource = Callable[[GenerationRequest], AsyncIterator[str]]

_WORDS = (
    "the model streams each token as soon as it is sampled so the reader sees "
    "words appear while the rest of the answer is still being computed a buffered "
    "server would hold them all until the end and the user would stare at an empty "
    "screen for the whole generation every proxy buffer and compressor on the way "
    "can do the same to a stream that was flushed correctly at the source latency "
    "throughput event data field client browser socket chunk byte line reply prompt"
).split()


def _sentences(rng: random.Random) -> Iterator[str]:
    """Yield words of an endless run of sentences, each word with its leading space."""
    first = True
    while True:
        length = rng.randint(6, 14)
        for position in range(length):
            word = rng.choice(_WORDS)
            if position == 0:
                word = word.capitalize()
            if position == length - 1:
                word += rng.choice(".....!?")
            yield word if first else " " + word
            first = False


def schedule_ms(request: GenerationRequest, count: int) -> list[float]:
    """When each of `count` tokens is due, in ms after generation starts.

    Token i is due at ttft_ms + i x token_ms, plus a uniform random delay below
    jitter_ms drawn from the request's seed.

    >>> schedule_ms(GenerationRequest("hi", ttft_ms=100, token_ms=20), 3)
    [100, 120, 140]
    """
    jitter = random.Random(f"jitter:{request.seed}")
    due = [request.ttft_ms + index * request.token_ms for index in range(count)]
    if request.jitter_ms:
        due = [at + jitter.uniform(0, request.jitter_ms) for at in due]
    return due


async def _paced(tokens: list[str], request: GenerationRequest) -> AsyncIterator[str]:
    """Release tokens on the request's absolute schedule."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for token, due_ms in zip(tokens, schedule_ms(request, len(tokens)), strict=True):
        await asyncio.sleep(max(0.0, start + due_ms / 1000 - loop.time()))
        yield token


def sim_tokens(prompt: str, max_tokens: int, seed: int = 0) -> list[str]:
    """The text `sim` produces for a prompt, without the waiting.

    >>> "".join(sim_tokens("hi", 5))
    'Buffered computed reader line browser'
    """
    rng = random.Random(f"text:{seed}:{prompt}")
    words = _sentences(rng)
    return [next(words) for _ in range(max_tokens)]


def sim(request: GenerationRequest) -> AsyncIterator[str]:
    """A simulated LLM: `max_tokens` tokens of prose that depend on the prompt and seed.

    It never stops on its own, so its finish reason is always "length".
    """
    return _paced(sim_tokens(request.prompt, request.max_tokens, request.seed), request)


_ECHO_TOKEN = re.compile(r"\s*\S+|\s+")


def echo_tokens(prompt: str) -> list[str]:
    """Split a prompt into tokens that join back to it character for character.

    >>> echo_tokens("to be\\r\\nor not")
    ['to', ' be', '\\r\\nor', ' not']
    """
    return _ECHO_TOKEN.findall(prompt)


def echo(request: GenerationRequest) -> AsyncIterator[str]:
    """Stream the whole prompt back, word by word, whatever it holds.

    `max_tokens` does not truncate it: echo exists to prove that every byte of a
    payload survives the trip, so it never drops any.
    """
    return _paced(echo_tokens(request.prompt), request)


MODELS: dict[str, TokenSource] = {"sim": sim, "echo": echo}
