"""The server's own CPU time, request by request, measured on the thread that serves it.

`CpuMeter` wraps an ASGI app and notes, for each HTTP request, the CPU time of
the server's thread from the moment the app is called to the moment it
returns (`time.thread_time()`, which counts only that thread, so a client in
the same process does not count). The figure covers the app and the parts of
uvicorn that run on the event loop meanwhile (writing the response to the
socket); it is only one request's when requests do not overlap, so measure
one at a time.

    >>> from sse_lab import create_app, serve_in_background, stream_chat
    >>> meter = CpuMeter(create_app())
    >>> with serve_in_background(meter) as server:
    ...     _ = stream_chat(server.url, "hi", max_tokens=5, ttft_ms=0, token_ms=0)
    >>> len(meter.cpu_s), meter.cpu_s[0] > 0
    (1, True)
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

# The pace of a stream that measures what one event costs the server: fast (10,000 tokens/s), yet paced, so that
# each event is a write of its own, as a model's tokens are. Unpaced, the server writes as fast as it can, and
# whenever the reader falls behind its writes pile up in the transport and leave in fewer, larger system calls:
# the cost per event then depends on the reader (measured: 5.4-8.8 us per event unpaced, 14-18 us at this pace).
MEASURING_TOKEN_MS = 0.1


class CpuMeter:
    """An ASGI wrapper that appends each HTTP request's server CPU seconds to `cpu_s`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.cpu_s: list[float] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.thread_time()
        try:
            await self.app(scope, receive, send)
        finally:
            self.cpu_s.append(time.thread_time() - started)
