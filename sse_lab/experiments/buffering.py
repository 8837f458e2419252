"""Places on the server where a token waits: ASGI wrappers to put in front of the app.

Each wrapper sits between the app and uvicorn, so the tokens leave the model on time
and then wait, as bytes, before they reach the socket:

    model ─▶ ChatStream  ─▶ WriteBuffer ──────────────▶ uvicorn ─▶ socket ─▶ client
                             holds bytes until it has
                             `size` of them, or the end
                             Gzip ─────────────────────▶
                             without a flush, bytes wait
                             inside zlib until its block
                             fills, or the end

Serve a wrapped app like the plain one, and measure it with the usual client:

    >>> from sse_lab import create_app, serve_in_background, stream_chat
    >>> with serve_in_background(WriteBuffer(create_app(), size=None)) as server:
    ...     result = stream_chat(server.url, "hi", max_tokens=5, ttft_ms=0, token_ms=20)
    >>> result.e2e - result.ttft < 0.01  # every token in the one final write
    True

`write_buffering` and `compression` serve the variants side by side on one server and return
`{variant: [ChatResult, ...]}` for `sse_lab.plots` and `sse_lab.metrics`;
each result's `wire_bytes` is the body as it crossed the wire, compressed or not.

Starlette's own `GZipMiddleware` (1.10) is among the compression variants. By
default it leaves `text/event-stream` alone: headers and events pass through at
once, uncompressed. Told to exclude nothing, it compresses with a sync flush per
event, but holds the headers back until the app's first body message: a stream
that sends nothing before its first token gets its headers only with that token.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.gzip import GZipMiddleware
from starlette.routing import Mount, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tqdm.auto import tqdm

from ..background import serve_in_background
from ..client import Param, stream_chat
from ..metrics import ChatResult
from ..server import create_app
from . import DEFAULT_PROMPT


class WriteBuffer:
    """Hold the response body until at least `size` bytes wait, then send them in one write.

    This is the server that 'forgot to flush': `size=0` sends every message as it
    comes, `size=None` holds everything until the body ends. Whatever is left
    when the body ends is sent then. `receive` passes through untouched, so the
    app still notices a client that leaves.
    """

    def __init__(self, app: ASGIApp, size: int | None) -> None:
        if size is not None and size < 0:
            raise ValueError(f"size must be 0 or more bytes, or None for 'until the end': {size!r}")
        self.app = app
        self.size = size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = bytearray()

        async def send_when_full(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
                return
            held.extend(message.get("body", b""))
            full = self.size is not None and len(held) >= self.size
            if message.get("more_body", False) and not full:
                return
            await send({**message, "body": bytes(held)})
            held.clear()

        await self.app(scope, receive, send_when_full)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether a request's Accept-Encoding value lets the response be gzip (q=0 refuses).

    >>> accepts_gzip("gzip, deflate"), accepts_gzip("br;q=1, *;q=0.1"), accepts_gzip("")
    (True, True, False)
    >>> accepts_gzip("gzip;q=0, *"), accepts_gzip("identity")
    (False, False)
    """
    qualities: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, *parameters = (part.strip().lower() for part in item.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        qualities[coding] = quality
    return qualities.get("gzip", qualities.get("*", 0.0)) > 0


class Gzip:
    """Gzip the response body for clients that accept it; `sync_flush` decides when bytes leave.

    Without `sync_flush`, as a naive compressor does, each body message goes
    through `compress()` and only what zlib lets out is sent: the 10-byte gzip
    header, then nothing until a deflate block fills. This kit's repetitive text
    fills one only after some 200 KB of events (about 3,600 tokens), so every
    token of an answer waits for its end. With `sync_flush`, a Z_SYNC_FLUSH after
    every message pushes each event out at once, and the compression ratio
    suffers. Headers go out as soon as the app sends them; a response that is
    already encoded is left alone.
    """

    def __init__(self, app: ASGIApp, *, sync_flush: bool) -> None:
        self.app = app
        self.sync_flush = sync_flush

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not accepts_gzip(Headers(scope=scope).get("accept-encoding", "")):
            await self.app(scope, receive, send)
            return
        compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)  # the gzip container
        compressing = True

        async def send_compressed(message: Message) -> None:
            nonlocal compressing
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                compressing = "content-encoding" not in headers
                if compressing:
                    headers["Content-Encoding"] = "gzip"
                    headers.add_vary_header("Accept-Encoding")
                    del headers["Content-Length"]  # unknown until the body is compressed
                message = {**message, "headers": headers.raw}
            elif message["type"] == "http.response.body" and compressing:
                more_body = message.get("more_body", False)
                body = compressor.compress(message.get("body", b""))
                if not more_body:
                    body += compressor.flush()
                elif self.sync_flush:
                    body += compressor.flush(zlib.Z_SYNC_FLUSH)
                elif not body:
                    return  # zlib kept it all: nothing to write yet
                message = {**message, "body": body}
            await send(message)

        await self.app(scope, receive, send_compressed)


def buffer_label(size: int | None) -> str:
    """How a write buffer's size reads in a table or a legend.

    >>> [buffer_label(size) for size in (0, 1024, 16384, 1000, None)]
    ['no buffer', '1 KiB', '16 KiB', '1000 B', 'until the end']
    """
    if size is None:
        return "until the end"
    if size == 0:
        return "no buffer"
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


COMPRESSION_VARIANTS: Mapping[str, Callable[[], ASGIApp]] = {
    "identity": create_app,
    "gzip, no flush": lambda: Gzip(create_app(), sync_flush=False),
    "gzip, sync flush": lambda: Gzip(create_app(), sync_flush=True),
    "Starlette GZipMiddleware": lambda: GZipMiddleware(create_app()),
    "Starlette GZipMiddleware, nothing excluded": lambda: GZipMiddleware(create_app(), exclude_content_types=()),
}
"""Each compression variant's app, by label: `serve_in_background(COMPRESSION_VARIANTS[label]())`."""


@contextlib.contextmanager
def _serving(apps: Mapping[str, ASGIApp]) -> Iterator[dict[str, str]]:
    """Serve every app on one server, each under a path of its own; yield their base URLs by label."""
    router = Router([Mount(f"/{index}", app=app) for index, app in enumerate(apps.values())])
    with serve_in_background(router) as server:
        yield {label: f"{server.url}/{index}" for index, label in enumerate(apps)}


def _stream_each(
    apps: Mapping[str, ASGIApp],
    *,
    runs: int,
    prompt: str,
    description: str,
    progress: bool,
    **params: Param,
) -> dict[str, list[ChatResult]]:
    """Stream from each app in turn, `runs` rounds.

    The variants alternate, so a slow moment on the machine hits them alike.
    """
    results: dict[str, list[ChatResult]] = {label: [] for label in apps}
    with _serving(apps) as urls, tqdm(total=runs * len(apps), desc=description, disable=not progress) as bar:
        for _ in range(runs):
            for label, url in urls.items():
                results[label].append(stream_chat(url, prompt, **params))
                bar.update()
    return results


def write_buffering(
    buffer_sizes: Sequence[int | None] = (0, 1024, 4096, 16384, None),
    *,
    runs: int = 2,
    tokens: int = 100,
    ttft_ms: float = 100,
    token_ms: float = 5,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
) -> dict[str, list[ChatResult]]:
    """Stream the same answer through a `WriteBuffer` of each size; labels from `buffer_label`.

    A token event is 50 to 60 bytes, so a buffer of `size` bytes holds back about
    size / 57 tokens and delays the first by about size / 57 x `token_ms`; one
    larger than the whole answer makes it a buffered reply.
    """
    apps = {buffer_label(size): WriteBuffer(create_app(), size) for size in buffer_sizes}
    return _stream_each(
        apps,
        runs=runs,
        prompt=prompt,
        description="write buffering",
        progress=progress,
        max_tokens=tokens,
        ttft_ms=ttft_ms,
        token_ms=token_ms,
    )


def compression(
    *,
    runs: int = 2,
    tokens: int = 100,
    ttft_ms: float = 100,
    token_ms: float = 5,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
) -> dict[str, list[ChatResult]]:
    """Stream the same answer through each of `COMPRESSION_VARIANTS`; the client asks for gzip."""
    return _stream_each(
        {label: make_app() for label, make_app in COMPRESSION_VARIANTS.items()},
        runs=runs,
        prompt=prompt,
        description="compression",
        progress=progress,
        max_tokens=tokens,
        ttft_ms=ttft_ms,
        token_ms=token_ms,
    )


WHOLE_BODY = 1 << 40  # a read size no response reaches: the read returns at the end of the body


def client_reads(
    base_url: str,
    chunk_sizes: Sequence[int | None] = (None, 1024, 4096, WHOLE_BODY),
    *,
    runs: int = 2,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
    **params: Param,
) -> dict[str, list[ChatResult]]:
    """The same stream read as bytes come (None), in reads that wait for `chunk_size` bytes, or whole.

    A client that reads in fixed sizes (`iter_bytes(chunk_size=...)`, a
    `read(4096)` loop) holds tokens that have already arrived until its read fills.
    """
    labels = {size: _read_label(size) for size in chunk_sizes}
    results: dict[str, list[ChatResult]] = {label: [] for label in labels.values()}
    for _ in tqdm(range(runs), desc="client reads", disable=not progress):
        for size, label in labels.items():
            results[label].append(stream_chat(base_url, prompt, chunk_size=size, **params))
    return results


def _read_label(chunk_size: int | None) -> str:
    if chunk_size is None:
        return "as bytes come"
    if chunk_size == WHOLE_BODY:
        return "whole body"
    return f"reads of {chunk_size} B"
