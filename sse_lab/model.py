"""Token sources: what the server streams, behind one async-iterator interface.

A token source is any callable that takes a `GenerationRequest` and returns an
async iterator of text tokens: at most `request.max_tokens` of them, starting at
index `request.resume_from`. The server never looks further than that, so a
real model plugs in beside the simulated ones without touching the endpoints:

    async def my_model(request: GenerationRequest) -> AsyncIterator[str]:
        async for token in call_my_llm(request.prompt, request.max_tokens):
            yield token

    app = create_app(models={"mine": my_model})

Both built-in sources keep an absolute schedule: the i-th token they produce is
due at start + ttft + i x token_ms (plus its jitter). Sleeping a fixed interval after
each token instead would drift by the event loop's overshoot on every token, and
the notebooks would blame that drift on the transport.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import operator
import random
import re
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice, repeat
from itertools import count as indices


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asked for: the prompt, a token budget and a latency profile.

    ttft_ms is the time to the first token (the model's prefill), plus
    ttft_per_prompt_token_ms for each token of the prompt (a real prefill grows with
    the prompt: notebook 10 fits both to a real model), token_ms the time between
    tokens after that, jitter_ms the width of a uniform random delay added to
    each token's due time (0 turns it off), seed fixes both the text and the jitter.

    resume_from is the index of the first token wanted: a client that reconnects
    after receiving tokens 0..n-1 asks for n. A source continues from there as a
    real model would, given the text so far as context: it pays the prefill
    (ttft_ms) again, then produces token n, n+1, ... up to max_tokens in all.
    """

    prompt: str
    max_tokens: int = 64
    ttft_ms: float = 200.0
    token_ms: float = 30.0
    jitter_ms: float = 0.0
    seed: int = 0
    resume_from: int = 0
    ttft_per_prompt_token_ms: float = 0.0


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


_SENTENCE_WORDS = tuple(tuple(sentence.split(" ")) for sentence in _SENTENCES)


def _words(rng: random.Random) -> Iterator[str]:
    """The words of an endless reading of the sentences, in an order `rng` picks.

    Each word after the first carries its leading space, as LLM tokens do, and
    is a string of its own, as a real model's decoded tokens are (what a buffered
    reply holds counts them). Built of itertools, with no Python frame per word:
    the sim makes one per token.
    """
    readings = (rng.sample(_SENTENCE_WORDS, len(_SENTENCE_WORDS)) for _ in repeat(None))
    words = chain.from_iterable(chain.from_iterable(readings))
    first = next(words)
    return chain((first,), map(operator.add, repeat(" "), words))


def _due_ms(request: GenerationRequest) -> Iterator[float]:
    """Each token's due time in ms after generation starts, without end."""
    prefill_ms = request.ttft_ms
    if request.ttft_per_prompt_token_ms:
        prefill_ms += request.ttft_per_prompt_token_ms * prompt_tokens(request.prompt)
    # prefill_ms + index x token_ms for index 0, 1, 2, ...: built of itertools, no Python frame per token
    schedule = map(operator.add, repeat(prefill_ms), map(operator.mul, repeat(request.token_ms), indices()))
    if not request.jitter_ms:
        return schedule
    jitter = random.Random(f"jitter:{request.seed}")
    return (due + jitter.uniform(0, request.jitter_ms) for due in schedule)


def schedule_ms(request: GenerationRequest, count: int) -> list[float]:
    """When each of `count` tokens is due, in ms after generation starts.

    Token i is due at ttft_ms (plus ttft_per_prompt_token_ms per prompt token) +
    i x token_ms, plus a uniform random delay below jitter_ms drawn from the
    request's seed.

    >>> schedule_ms(GenerationRequest("hi", ttft_ms=100, token_ms=20), 3)
    [100, 120, 140]
    """
    return list(islice(_due_ms(request), count))


class _Ticks:
    """One timer for the paced tokens of every stream on an event loop, instead of a timer per token.

    `asyncio.sleep` arms a timer of its own for each token: thousands of streams at
    20 tokens/s arm and fire tens of thousands a second. Here a token waits on a
    future in a heap, and one timer, armed for the earliest, wakes every token
    that is due, at most once per `TICK_S`. A token is then up to one tick late,
    and up to `EARLY_S` early: uvloop's timers run on a millisecond clock and fire
    up to half a millisecond early, as `asyncio.sleep` does under uvloop too. A
    stream cancelled while it waits leaves its future in the heap until it is due;
    it is skipped then. (The loop is passed in, not kept: kept, it would keep
    itself alive as a key of `_ticks_by_loop`.)
    """

    TICK_S = 0.001
    EARLY_S = 0.0005

    def __init__(self) -> None:
        self.waiting: list[tuple[float, int, asyncio.Future[str], str]] = []  # (due, tie-breaker, future, token)
        self.added = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf

    def at(self, loop: asyncio.AbstractEventLoop, when: float, token: str) -> asyncio.Future[str]:
        """A future whose result is `token`, done at `loop`'s time `when`."""
        future: asyncio.Future[str] = loop.create_future()
        self.added += 1
        heapq.heappush(self.waiting, (when, self.added, future, token))
        if when < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.timer_at = loop.call_at(when, self._fire, loop), when
        return future

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        waiting, release_until, pop = self.waiting, now + self.EARLY_S, heapq.heappop
        while waiting and waiting[0][0] <= release_until:
            _, _, future, token = pop(waiting)
            if not future.done():  # done: cancelled with its stream
                future.set_result(token)
        if waiting:
            self.timer_at = max(waiting[0][0], now + self.TICK_S)
            self.timer = loop.call_at(self.timer_at, self._fire, loop)
        else:
            self.timer, self.timer_at = None, math.inf


_ticks_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ticks] = weakref.WeakKeyDictionary()


def _ticks(loop: asyncio.AbstractEventLoop) -> _Ticks:
    """The shared token timer of `loop`, made on first use."""
    ticks = _ticks_by_loop.get(loop)
    if ticks is None:
        ticks = _ticks_by_loop[loop] = _Ticks()
    return ticks


class _Paced:
    """The tokens of one request, each released at its due time on the request's absolute schedule.

    An async iterator without a frame of its own: `__anext__` returns the shared
    timer's future for the next token, which the stream's task awaits directly,
    so waking for a token resumes the server's frames only. An async generator
    here cost 2-3 µs more per token (1,000 paced streams, in process): about a
    tenth of all a token costs the server. A token already due, on time or
    behind, still lets the other streams run first, as `asyncio.sleep(0)` would.
    """

    __slots__ = ("due_ms", "loop", "start", "ticks", "tokens")

    def __init__(self, tokens: Iterable[str], request: GenerationRequest) -> None:
        self.tokens = iter(tokens)
        self.due_ms = _due_ms(request)  # endless
        self.loop: asyncio.AbstractEventLoop | None = None  # the schedule starts at the first request for a token
        self.ticks: _Ticks | None = None
        self.start = 0.0

    def __aiter__(self) -> _Paced:
        return self

    def __anext__(self) -> Awaitable[str]:
        loop, ticks = self.loop, self.ticks
        if loop is None or ticks is None:
            loop = self.loop = asyncio.get_running_loop()
            ticks = self.ticks = _ticks(loop)
            self.start = loop.time()
        token = next(self.tokens, None)
        if token is None:
            raise StopAsyncIteration
        due = self.start + next(self.due_ms) / 1000
        if due > loop.time():
            return ticks.at(loop, due, token)
        return _after_the_others(token)


@types.coroutine
def _after_the_others(token: str) -> Generator[None, None, str]:
    """`token`, once every other task ready to run has run: a bare yield, as `asyncio.sleep(0)` does."""
    yield
    return token


def sim_tokens(prompt: str, max_tokens: int, seed: int = 0) -> list[str]:
    """The text `sim` produces for a prompt, without the waiting.

    >>> "".join(sim_tokens("hi", 5))
    'The first token arrives after'
    """
    return list(islice(_sim_words(prompt, seed), max_tokens))


def _sim_words(prompt: str, seed: int) -> Iterator[str]:
    return _words(random.Random(f"text:{seed}:{prompt}"))


def sim(request: GenerationRequest) -> AsyncIterator[str]:
    """A simulated LLM: `max_tokens` tokens of prose that depend on the prompt and seed.

    It never stops on its own, so its finish reason is always "length". Tokens are
    made one at a time, so a long stream holds no more than one in memory.
    """
    words = islice(_sim_words(request.prompt, request.seed), request.resume_from, request.max_tokens)
    return _Paced(words, request)


_ECHO_TOKEN = re.compile(r"\s*\S+|\s+")


def echo_tokens(prompt: str) -> list[str]:
    """Split a prompt into tokens that join back to it character for character.

    >>> echo_tokens("to be\\r\\nor not")
    ['to', ' be', '\\r\\nor', ' not']
    """
    return _ECHO_TOKEN.findall(prompt)


def prompt_tokens(prompt: str) -> int:
    """How many tokens a prompt takes in the context window, for the simulated models.

    The simulated tokenizer is echo's: one token per word with its leading space.

    >>> prompt_tokens("to be or not")
    4
    """
    return len(echo_tokens(prompt))


def echo(request: GenerationRequest) -> AsyncIterator[str]:
    """Stream the prompt back, word by word, whatever it holds, up to `max_tokens` words.

    Echo exists to prove that every byte of a payload survives the trip: the
    tokens join back to the prompt exactly (when it fits in `max_tokens`).
    """
    return _Paced(echo_tokens(request.prompt)[request.resume_from : request.max_tokens], request)


def one_at_a_time(source: TokenSource) -> TokenSource:
    """`source`, serving one generation at a time per event loop: the others wait their turn.

    A single llama.cpp context works this way (`sse_lab.llama`): a request's TTFT is
    then its wait plus its own prefill. `one_at_a_time(sim)` models that queue with
    the sim's exact timing.
    """
    turns: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    async def queued(request: GenerationRequest) -> AsyncIterator[str]:
        turn = turns.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with turn:
            async for token in source(request):
                yield token

    return queued


def _installed_real_models() -> dict[str, TokenSource]:
    """Real models whose optional extra is installed: `smollm2` with the `model` extra (`sse_lab.llama`)."""
    from . import llama  # here, not at the top: sse_lab.llama builds on this module

    return {llama.SMOLLM2: llama.LlamaModel()} if llama.available() else {}


MODELS: dict[str, TokenSource] = {"sim": sim, "echo": echo, **_installed_real_models()}
