"""Notebook 10: a real LLM (SmolLM2-135M on llama.cpp, `sse_lab.llama`) behind the same interface.

Each experiment serves the real model beside the simulated ones and measures what
the simulation hides: a blocking C loop freezing the event loop, tokens that split
characters, cancellation reaching the C loop, one model serialising many requests,
and a prefill that grows with the prompt. Lateness of a simulated stream is its
token i's arrival minus (the request's send time + i x token_ms): the sim keeps an
absolute schedule, so anything above a few ms is the server's loop not running.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.applications import Starlette
from tqdm.auto import tqdm

from .. import llama
from ..background import serve_in_background
from ..client import Param, fetch_chat, fetch_stats, stream_chat
from ..llama import LlamaModel, naive_pieces
from ..metrics import ChatResult
from ..model import TokenSource, echo, prompt_tokens, sim
from ..parts._system import require_or_skip
from ..server import create_app
from .edge_cases import read_then_leave

REAL = llama.SMOLLM2
SKIP_MESSAGE = f"SmolLM2 on llama.cpp not installed: skipping the real-model experiments ({llama.INSTALL_HINT})"
PROMPT = "Explain in two sentences why a chat app streams its answer."
# Characters that byte-level BPE splits into several tokens: the model is asked to repeat them.
MULTIBYTE_PROMPT = "Repeat exactly, twice: 🌊🔥 日本語 naïve café e\u0301 👩‍💻"


def model_or_skip() -> bool:
    """True when the real model is installed; else print one line and return False.

    With SSE_LAB_REQUIRE_SYSTEM_PARTS=1 (CI) a missing model raises instead.
    """
    missing = f": {llama.INSTALL_HINT}"
    found = require_or_skip(
        llama.available() or None, "the real model", missing, SKIP_MESSAGE, llama.ModelNotInstalledError
    )
    return found is not None


def app_with(model: LlamaModel) -> Starlette:
    """The kit's app with the simulated sources and this instance of the real model."""
    models: dict[str, TokenSource] = {"sim": sim, "echo": echo, REAL: model}
    return create_app(models=models)


def lateness_ms(result: ChatResult, token_ms: float, ttft_ms: float = 0.0) -> list[float]:
    """Each token's arrival minus its due time (send time + ttft_ms + i x token_ms), in ms."""
    return [
        (arrival - result.started_at) * 1000 - (ttft_ms + index * token_ms)
        for index, arrival in enumerate(result.arrivals)
    ]


ON_THE_LOOP = "model on the event loop"
ON_A_THREAD = "model on a thread"


def loop_lateness(
    *,
    sim_tokens: int = 40,
    token_ms: float = 50,
    real_tokens: int = 32,
    variants: Sequence[str] = (ON_THE_LOOP, ON_A_THREAD),
    progress: bool = True,
) -> dict[str, list[float]]:
    """A simulated 20 tokens/s stream served beside back-to-back real generations: its lateness in ms.

    Once with llama.cpp called on the event loop (`ON_THE_LOOP`), once on a worker
    thread (`ON_A_THREAD`), or only the `variants` asked for.
    """
    results = {}
    for label in tqdm(variants, desc="loop lateness", disable=not progress):
        model = LlamaModel(on_thread=label == ON_A_THREAD)
        model.load()
        with serve_in_background(app_with(model)) as server:
            paced = _beside_real_generations(server.url, model, sim_tokens, token_ms, real_tokens)
        model.close()
        results[label] = lateness_ms(paced, token_ms)
    return results


def _beside_real_generations(
    url: str, model: LlamaModel, sim_tokens: int, token_ms: float, real_tokens: int
) -> ChatResult:
    """A paced sim stream, measured while the real model generates without pause."""
    finished = threading.Event()

    def keep_the_model_busy() -> int:
        generations = 0
        while not finished.is_set():
            fetch_chat(url, PROMPT, model=REAL, max_tokens=real_tokens, seed=generations)
            generations += 1
        return generations

    with ThreadPoolExecutor(max_workers=1) as pool:
        busy = pool.submit(keep_the_model_busy)
        _wait_until(lambda: model.stats.busy, what="the first real generation to start")
        try:
            return stream_chat(url, PROMPT, max_tokens=sim_tokens, ttft_ms=0, token_ms=token_ms)
        finally:
            finished.set()
            busy.result()


@dataclass
class SplitCharacters:
    """One reply's tokens as raw bytes, and the text decoded two ways.

    token_bytes: each model token's bytes, in order. streamed: the text the kit's
    server sent (pieces that end on character boundaries). naive: each token's
    bytes decoded on its own, as a naive detokenizer does.
    """

    token_bytes: list[bytes] = field(default_factory=list)
    streamed: ChatResult | None = None

    @property
    def naive(self) -> str:
        return "".join(naive_pieces(iter(self.token_bytes)))

    @property
    def split_tokens(self) -> int:
        """Tokens whose bytes do not decode on their own: each ends or starts inside a character."""
        return sum(1 for raw in self.token_bytes if _broken(raw))


def _broken(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def split_characters(prompt: str = MULTIBYTE_PROMPT, *, max_tokens: int = 48, seed: int = 0) -> SplitCharacters:
    """Ask the real model to repeat multi-byte characters; keep its raw token bytes and the streamed text."""
    captured = SplitCharacters()
    model = LlamaModel(on_token_bytes=captured.token_bytes.append)
    with serve_in_background(app_with(model)) as server:
        captured.streamed = stream_chat(server.url, prompt, model=REAL, max_tokens=max_tokens, seed=seed)
    model.close()
    return captured


@dataclass
class Waste:
    """What one client that left cost: tokens it read, tokens the model sampled, and after the stop signal."""

    read: int
    sampled: int
    after_stop: int


def disconnect_waste(*, leave_after: int = 3, runs: int = 3, max_tokens: int = 200) -> list[Waste]:
    """Clients that read `leave_after` pieces of a long reply and leave: how far did the C loop run on?"""
    model = LlamaModel()
    wastes = []
    with serve_in_background(app_with(model)) as server:
        for run in range(runs):
            before = fetch_stats(server.url)["models"][REAL]
            read = read_then_leave(
                server.url, PROMPT, leave_after, timeout_s=60, model=REAL, max_tokens=max_tokens, seed=run
            )
            after = _wait_for_the_model(server.url)
            wastes.append(
                Waste(
                    read=read,
                    sampled=after["tokens_generated"] - before["tokens_generated"],
                    after_stop=after["tokens_after_stop"] - before["tokens_after_stop"],
                )
            )
    model.close()
    return wastes


def _wait_until(condition: Callable[[], object], *, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.002)


def _wait_for_the_model(url: str, timeout_s: float = 60.0) -> dict[str, int]:
    """The model's counters once no stream is open and no generation holds or waits for the model."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = fetch_stats(url)
        model: dict[str, int] = stats["models"][REAL]
        if not stats["streams_active"] and not model["queue_depth"] and not model["busy"]:
            return model
        if time.monotonic() > deadline:
            raise TimeoutError(f"the model is still busy after {timeout_s} s: {stats}")
        time.sleep(0.01)


def queueing(
    concurrency: Sequence[int] = (1, 2, 4), *, max_tokens: int = 16, progress: bool = True
) -> dict[int, list[ChatResult]]:
    """C clients ask at once; one llama.cpp context serves them in turn. Returns `{C: [ChatResult, ...]}`.

    A client's TTFT is its wait for the model plus its own prefill: the queueing
    delay every serving benchmark folds into TTFT.
    """
    model = LlamaModel()
    model.load()
    results = {}
    with serve_in_background(app_with(model)) as server:
        for clients in tqdm(concurrency, desc="concurrent requests", disable=not progress):
            with ThreadPoolExecutor(max_workers=clients) as pool:
                futures = [
                    pool.submit(stream_chat, server.url, PROMPT, model=REAL, max_tokens=max_tokens, seed=seed)
                    for seed in range(clients)
                ]
                results[clients] = [future.result() for future in futures]
    model.close()
    return results


@dataclass(frozen=True)
class Profile:
    """The simulation fitted to the real model.

    TTFT = ttft_ms + ttft_per_prompt_token_ms x prompt tokens (as the kit counts
    them: words, `sse_lab.model.prompt_tokens`), least squares over the runs.
    token_ms: the 10th percentile of the gaps between tokens (the model's pace);
    jitter_ms: the 90th minus the 10th (the sim adds a uniform delay below it).
    """

    ttft_ms: float
    ttft_per_prompt_token_ms: float
    token_ms: float
    jitter_ms: float

    def params(self) -> dict[str, Param]:
        return {
            "ttft_ms": round(self.ttft_ms, 2),
            "ttft_per_prompt_token_ms": round(self.ttft_per_prompt_token_ms, 4),
            "token_ms": round(self.token_ms, 2),
            "jitter_ms": round(self.jitter_ms, 2),
        }


_FILLER = "the river runs past a quiet town where people stream music and news every day"
_QUESTION = "Summarise the text above in one short sentence."


def prompt_of(words: int) -> str:
    """A prompt of `words` words (the kit's token count), common ones of about one model token each."""
    filler, question = _FILLER.split(), _QUESTION.split()
    padding = [filler[index % len(filler)] for index in range(max(0, words - len(question)))]
    return " ".join(padding + question)


def prefill_profile(
    prompt_words: Sequence[int] = (10, 80, 160), *, runs: int = 2, max_tokens: int = 24, progress: bool = True
) -> dict[int, list[ChatResult]]:
    """The real model's TTFT and token gaps for prompts of several lengths. Returns `{words: [ChatResult, ...]}`."""
    model = LlamaModel()
    model.load()
    results: dict[int, list[ChatResult]] = {words: [] for words in prompt_words}
    with serve_in_background(app_with(model)) as server:
        stream_chat(server.url, "warm up", model=REAL, max_tokens=2)
        for run in tqdm(range(runs), desc="prefill profile", disable=not progress):
            for words in prompt_words:
                results[words].append(
                    stream_chat(server.url, prompt_of(words), model=REAL, max_tokens=max_tokens, seed=run)
                )
    model.close()
    return results


def fit_profile(measured: dict[int, list[ChatResult]]) -> Profile:
    """Fit the sim's latency knobs to `prefill_profile`'s results (see `Profile`)."""
    lengths, ttfts, gaps = [], [], []
    for words, results in measured.items():
        for result in results:
            if result.ttft is not None:
                lengths.append(prompt_tokens(prompt_of(words)))
                ttfts.append(result.ttft * 1000)
            gaps.extend(gap * 1000 for gap in result.itl)
    slope, intercept = statistics.linear_regression(lengths, ttfts)
    deciles = statistics.quantiles(gaps, n=10)
    return Profile(
        ttft_ms=max(0.0, intercept),
        ttft_per_prompt_token_ms=max(0.0, slope),
        token_ms=deciles[0],
        jitter_ms=deciles[-1] - deciles[0],
    )


def sim_with_profile(
    profile: Profile, prompt_words: Sequence[int] = (10, 80, 160), *, max_tokens: int = 24
) -> dict[int, ChatResult]:
    """The simulated model with the fitted profile, on the same prompts: `{words: ChatResult}`."""
    with serve_in_background() as server:
        return {
            words: stream_chat(server.url, prompt_of(words), max_tokens=max_tokens, **profile.params())
            for words in prompt_words
        }
