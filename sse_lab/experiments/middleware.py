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
beyond a task switch per message, as `middleware_experiment` measures. What
buffers is the dispatch function that reads the body.

`middleware_experiment` streams the same answer through each of
`MIDDLEWARE_VARIANTS` and returns `{variant: [ChatResult, ...]}`; `lateness`
says how long after the model produced it each token arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import ChatResult, Spread
from ..server import create_app
from . import DEFAULT_PROMPT
from .buffering import _stream_each

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


MIDDLEWARE_VARIANTS: Mapping[str, Callable[[], ASGIApp]] = {
    "no middleware": create_app,
    "BaseHTTPMiddleware, pass-through": lambda: PassThrough(create_app()),
    "logging: reads the whole body": lambda: LogWholeBody(create_app()),
    "logging: counts bytes as they pass": lambda: CountBytesAsTheyPass(create_app()),
}
"""Each variant's app, by label: `serve_in_background(MIDDLEWARE_VARIANTS[label]())`."""


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
        {label: make_app() for label, make_app in MIDDLEWARE_VARIANTS.items()},
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
