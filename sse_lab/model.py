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

_SENTENCES = (
    "Streaming sends each token the moment the model samples it.",
    "A buffered reply keeps the reader waiting for the whole generation.",
    "The first token arrives after the prefill, not after the last token.",
    "Server-Sent Events frame every token as a small text event.",
    "Each event ends with a blank line, so the client knows where it stops.",
    "An unflushed buffer can hold tokens back as surely as a buffered reply.",
    "Proxies and compressors on the way may gather bytes into lumps.",
    "The browser's EventSource reconnects by itself and sends the last event id.",
    "Heartbeats keep idle connections alive through impatient proxies.",
    "When the client leaves, the server should stop generating at once.",
    "Time to first token is what the user feels; total time is what the GPU pays.",
    "A token is often a piece of a word, with its leading space attached.",
    "Measure at the client, because the server cannot see the network.",
    "Backpressure slows the producer when the reader cannot keep up.",
    "Errors after the headers are sent must travel as events, not status codes.",
    "Every claim about latency deserves a measurement and a plot.",
)


def _words(rng: random.Random) -> Iterator[str]:
    """Yield the words of an endless reading of the sentences, in an order `rng` picks.

    Each word after the first carries its leading space, as LLM tokens do.
    """
    first = True
    while True:
        for sentence in rng.sample(_SENTENCES, len(_SENTENCES)):
            for word in sentence.split(" "):
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
    'The first token arrives after'
    """
    words = _words(random.Random(f"text:{seed}:{prompt}"))
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
