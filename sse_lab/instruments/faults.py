"""Faults on the way to the client, for rehearsing what a stream must survive.

Each is an ASGI wrapper around an app, standing in for something between the
server and the client that a notebook cannot put on a real network:

    client ◀── DropConnections ◀── app   ends the first streams after n events
    client ◀── IdleTimeout     ◀── app   ends a response silent for too long
    client ◀── SlowLink        ◀── app   lets bytes through a few at a time

A cut response ends cleanly: the client sees its body end before `done`, the
app sees its client leave (uvicorn reports a disconnect once a response is
complete), so a model behind it stops.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _is_event_stream(start: Message) -> bool:
    content_type: bytes = dict(start.get("headers", [])).get(b"content-type", b"")
    return content_type.startswith(b"text/event-stream")


def _end(message: Message) -> Message:
    return {"type": "http.response.body", "body": message.get("body", b""), "more_body": False}


class DropConnections:
    """End the first `connections` event streams after `after_events` events each.

    Only `text/event-stream` responses are cut; everything else passes. An event
    is counted by its closing blank line.
    """

    def __init__(self, app: ASGIApp, *, after_events: int, connections: int = 1) -> None:
        self.app = app
        self.after_events = after_events
        self.connections_left = connections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.connections_left <= 0:
            await self.app(scope, receive, send)
            return
        events = 0
        cut = is_stream = False

        async def cutting(message: Message) -> None:
            nonlocal events, cut, is_stream
            if cut:
                return
            if message["type"] == "http.response.start":
                is_stream = _is_event_stream(message)
                self.connections_left -= is_stream
            elif is_stream:
                events += message.get("body", b"").count(b"\n\n")
                if events >= self.after_events:
                    cut = True
                    message = _end(message)
            await send(message)

        await self.app(scope, receive, cutting)


class IdleTimeout:
    """End a response when no byte of its body has gone out for `idle_s` seconds.

    What a proxy's read timeout does (nginx's `proxy_read_timeout`, 60 s by
    default; load balancers often have less): a stream that stays silent through
    a long prefill is cut, unless heartbeats keep it busy.
    """

    def __init__(self, app: ASGIApp, *, idle_s: float) -> None:
        self.app = app
        self.idle_s = idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = asyncio.Event()
        lock = asyncio.Lock()
        started = cut = False

        async def watched(message: Message) -> None:
            nonlocal started
            async with lock:
                if cut:
                    return
                started = True
                sent.set()
                await send(message)

        async def watchdog() -> None:
            nonlocal cut
            while True:
                sent.clear()
                try:
                    await asyncio.wait_for(sent.wait(), self.idle_s)
                except TimeoutError:
                    if started:
                        async with lock:
                            cut = True
                            await send(_end({}))
                        return

        watching = asyncio.ensure_future(watchdog())
        try:
            await self.app(scope, receive, watched)
        finally:
            watching.cancel()
            await asyncio.wait((watching,))


class SlowLink:
    """Let a response's body through `chunk_bytes` at a time, `pause_s` apart.

    A slow network in miniature: an event longer than a chunk reaches the client
    over several reads, so its first byte and its end arrive at different times.
    """

    def __init__(self, app: ASGIApp, *, chunk_bytes: int = 16, pause_s: float = 0.005) -> None:
        self.app = app
        self.chunk_bytes = chunk_bytes
        self.pause_s = pause_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def trickling(message: Message) -> None:
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or len(body) <= self.chunk_bytes:
                await send(message)
                return
            for start in range(0, len(body), self.chunk_bytes):
                if start:
                    await asyncio.sleep(self.pause_s)
                await send({**message, "body": body[start : start + self.chunk_bytes], "more_body": True})
            if not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app(scope, receive, trickling if scope["type"] == "http" else send)
