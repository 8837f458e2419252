"""Middleware that holds tokens back without compressing anything: logging, and Starlette's BaseHTTPMiddleware.

A logging middleware that records each response's size is written, the common
way, on Starlette's `BaseHTTPMiddleware`: `await call_next(request)`, then read
`response.body_iterator` to the end, log `len(body)`, and return a new
`Response(body)`. On a stream that read lasts until the last token, so the
client gets the headers and every token at once, at the end: a buffered reply
with a `Content-Length`. Counting bytes as they pass, in a plain ASGI wrapper
around `send`, logs the same number when the body ends and holds nothing:

    LogWholeBody          call_next ─▶ read body_iterator to the end ─▶ log ─▶ Response(body) ─▶ uvicorn
    CountBytesAsTheyPass  app ─▶ send(message): count len(body), pass it on at once ─▶ uvicorn; log at the end

`BaseHTTPMiddleware` itself, in Starlette 1.10 (read in
starlette/middleware/base.py): `call_next` runs the app in a task whose `send`
puts each message into an anyio memory object stream created with its default
`max_buffer_size=0`, and the response it returns (`_StreamingResponse`) reads
that stream and sends each body chunk on as it comes. With no buffer, the app's
`send` returns only once the message has been taken, so nothing piles up: a
pass-through `dispatch` (`return await call_next(request)`) delays no token
into a buffer, as `middleware_experiment` measures. What buffers is the
dispatch function that reads the body. What the base class costs instead is CPU:
every message makes extra trips through the event loop (the memory stream, the
task that runs the app, the task group that watches for a disconnect), which
`middleware_cpu` measures per token event. Through a pass-through
BaseHTTPMiddleware a token event cost this process (the server's thread and the
client that reads the stream, together) 2.0 to 3.4 times the CPU it costs
without middleware (2 shared cores under load, Linux, Starlette 1.10, 3,000 to
20,000 events at token_ms=0: 19 to 28 µs without middleware, 42 to 88 µs with
it); `CountBytesAsTheyPass` cost 0.95 to 1.2 times. On a busy machine that CPU
shows as tokens arriving tens of milliseconds late, though none is held back.

`middleware_experiment` streams the same answer through each of
`MIDDLEWARE_VARIANTS` and returns `{variant: [ChatResult, ...]}`; `lateness`
says how long after the model produced it each token arrived.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import httpx
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tqdm.auto import tqdm

from ..client import STREAM_PATH
from ..metrics import ChatResult, Spread
from ..server import Settings, create_app
from . import DEFAULT_PROMPT
from .buffering import _serving, _stream_each
from .memory import read_reply

logger = logging.getLogger(__name__)


class LogWholeBody(BaseHTTPMiddleware):
    """Log each response's size, the common way: read the whole body, log, send it as a new response.

    Every size logged is also appended to `logged` (bytes of body).
    """

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.logged: list[int] = []

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        body = b"".join([chunk async for chunk in response.body_iterator])  # type: ignore[attr-defined]
        self.logged.append(len(body))
        logger.info("%s %s: %d bytes", request.method, request.url.path, len(body))
        return Response(body, status_code=response.status_code, headers=dict(response.headers))


class CountBytesAsTheyPass:
    """Log each response's size as LogWholeBody does, counting body bytes on their way to the socket.

    A plain ASGI wrapper around `send`: each message goes on at once; the size is
    logged (and appended to `logged`) when the body ends.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.logged: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal sent
            await send(message)
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self.logged.append(sent)
                    logger.info("%s %s: %d bytes", scope["method"], scope["path"], sent)

        await self.app(scope, receive, counting_send)


class PassThrough(BaseHTTPMiddleware):
    """A BaseHTTPMiddleware that does nothing but `call_next`: what the base class alone costs a stream."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


MIDDLEWARE_VARIANTS: Mapping[str, Callable[[ASGIApp], ASGIApp]] = {
    "no middleware": lambda app: app,
    "BaseHTTPMiddleware, pass-through": PassThrough,
    "logging: reads the whole body": LogWholeBody,
    "logging: counts bytes as they pass": CountBytesAsTheyPass,
}
"""Each variant's middleware, by label: `serve_in_background(MIDDLEWARE_VARIANTS[label](create_app()))`."""


def middleware_experiment(
    *,
    runs: int = 2,
    tokens: int = 40,
    ttft_ms: float = 100,
    token_ms: float = 10,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
) -> dict[str, list[ChatResult]]:
    """Stream the same answer through each of `MIDDLEWARE_VARIANTS`, `runs` rounds, the variants alternating."""
    return _stream_each(
        {label: wrap(create_app()) for label, wrap in MIDDLEWARE_VARIANTS.items()},
        runs=runs,
        prompt=prompt,
        description="middleware",
        progress=progress,
        max_tokens=tokens,
        ttft_ms=ttft_ms,
        token_ms=token_ms,
    )


def lateness(result: ChatResult, *, ttft_ms: float, token_ms: float) -> list[float]:
    """Seconds from when the model produced each token to its arrival at the client.

    The simulated model keeps an absolute schedule: token i is due `ttft_ms + i x
    token_ms` after the request, so what comes on top is the server's and the
    path's doing: about a millisecond on loopback, the rest of the answer behind
    a buffer.

    >>> late = ChatResult("streamed", started_at=0.0, arrivals=[0.101, 0.112, 0.3])
    >>> [round(1000 * seconds) for seconds in lateness(late, ttft_ms=100, token_ms=10)]
    [1, 2, 180]
    """
    return [offset - (ttft_ms + index * token_ms) / 1000 for index, offset in enumerate(result.offsets)]


def middleware_table(results: Mapping[str, Sequence[ChatResult]], *, ttft_ms: float, token_ms: float) -> str:
    """Per variant: headers and TTFT medians, token lateness p50 and p90 (ms), and tokens per read (mean lump).

    headers: time to the status line and headers. lateness: see `lateness`,
    pooled over every token of every run. tokens per read: 1.0 when each token
    came on its own, every token of the answer when they all came at once.
    """
    width = max(len("variant"), *map(len, results)) + 2
    columns = ["headers p50", "TTFT p50", "late p50", "late p90", "tokens/read"]
    lines = [f"{'variant':<{width}}" + "".join(f"{column:>13}" for column in columns)]
    for label, runs in results.items():
        late = Spread.of([seconds for run in runs for seconds in lateness(run, ttft_ms=ttft_ms, token_ms=token_ms)])
        times = [
            Spread.of([run.time_to_headers for run in runs]).median,
            Spread.of([run.ttft for run in runs if run.ttft is not None]).median,
            late.median,
            late.p90,
        ]
        per_read = sum(run.tokens for run in runs) / sum(len(run.lumps) for run in runs)
        cells = "".join(f"{1000 * seconds:>10.1f} ms" for seconds in times) + f"{per_read:>13.1f}"
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


@dataclass(frozen=True)
class MiddlewareCpu:
    """CPU time per token event through one variant, in microseconds.

    us_per_event: time.process_time of this process (the in-kernel server's
    thread and the client that reads the stream, together) over one stream of
    `tokens` tokens at ttft_ms=0 and token_ms=0, divided by `tokens`, best of the
    repeats. extra_us_per_event: us_per_event minus the one without middleware:
    the client and the app are the same, so the difference is the middleware's.
    times_no_middleware: us_per_event over the one without middleware.
    """

    variant: str
    tokens: int
    us_per_event: float
    extra_us_per_event: float
    times_no_middleware: float


def middleware_cpu(*, tokens: int = 2_000, repeats: int = 2, progress: bool = True) -> list[MiddlewareCpu]:
    """Measure `MiddlewareCpu` for each of `MIDDLEWARE_VARIANTS` (1 s on a quiet machine at the defaults)."""
    settings = Settings(max_tokens_limit=tokens, context_window=tokens + 1_000)
    apps = {label: wrap(create_app(settings)) for label, wrap in MIDDLEWARE_VARIANTS.items()}
    best = dict.fromkeys(apps, float("inf"))
    with _serving(apps) as urls, httpx.Client(trust_env=False, timeout=600) as client:
        for url in urls.values():
            read_reply(client, url + STREAM_PATH, 100)  # first-use costs out of the way
        for _ in tqdm(range(repeats), desc="middleware CPU", disable=not progress):
            for label, url in urls.items():  # alternating, so a busy moment hits every variant alike
                started = time.process_time()
                read_reply(client, url + STREAM_PATH, tokens)
                best[label] = min(best[label], time.process_time() - started)
    base = best[next(iter(best))]
    return [
        MiddlewareCpu(label, tokens, 1e6 * cpu_s / tokens, 1e6 * (cpu_s - base) / tokens, cpu_s / base)
        for label, cpu_s in best.items()
    ]


def middleware_cpu_table(costs: Sequence[MiddlewareCpu]) -> str:
    """Per variant: CPU µs per token event, what the middleware adds, and the ratio to no middleware."""
    width = max(len("variant"), *(len(cost.variant) for cost in costs)) + 2
    lines = [f"{'variant':<{width}}{'CPU µs/event':>14}{'added µs':>10}{'x none':>8}"]
    for cost in costs:
        cells = f"{cost.us_per_event:>14.1f}{cost.extra_us_per_event:>+10.1f}{cost.times_no_middleware:>8.2f}"
        lines.append(f"{cost.variant:<{width}}{cells}")
    return "\n".join(lines)
