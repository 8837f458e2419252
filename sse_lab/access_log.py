"""An access log: one line per request, with its status, its duration and the tokens it sent.

    127.0.0.1:51234 "GET /api/chat/stream?prompt=hi HTTP/1.1" 200 0.352 s 5 tokens

duration: from the request reaching the app to the app being done with it (the
response's last byte handed to the server, or the client gone). tokens sent: the
`token` events in an event stream's body, decoded as a client would decode them,
or the `tokens` field of a JSON reply; 0 for any other response. A stream resumed
with `Last-Event-ID` counts only the tokens this response carried.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .sse import MEDIA_TYPE, Decoder

JSON_MEDIA_TYPE = "application/json"
MAX_JSON_BYTES = 1 << 20  # a JSON reply longer than this is not read for its token count


class _Response:
    """What the log line needs of one response, gathered as its messages pass."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.media_type = ""
        self.decoder: Decoder | None = None
        self.tokens = 0
        self.json_body = bytearray()

    def saw(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = dict(message.get("headers", []))
            self.media_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip()
            if self.media_type == MEDIA_TYPE:
                self.decoder = Decoder()
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if self.decoder is not None:
                self.tokens += sum(event.event == "token" for event in self.decoder.feed(body))
            elif self.media_type == JSON_MEDIA_TYPE and len(self.json_body) + len(body) <= MAX_JSON_BYTES:
                self.json_body += body

    def tokens_sent(self) -> int:
        if self.decoder is not None:
            return self.tokens
        try:
            reply = json.loads(self.json_body)
        except ValueError:
            return 0
        tokens = reply.get("tokens") if isinstance(reply, dict) else None
        return tokens if isinstance(tokens, int) else 0


def request_line(scope: Scope) -> str:
    """The request as the log shows it: client address, then method, target and protocol in quotes."""
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    return f'{who} "{scope["method"]} {target} HTTP/{scope.get("http_version", "1.1")}"'


class AccessLog:
    """ASGI middleware that hands `write` one line per HTTP request, once the app is done with it.

    A request whose app fails before answering is logged with 500, the status the
    server then sends.
    """

    def __init__(self, app: ASGIApp, write: Callable[[str], object] = print) -> None:
        self.app = app
        self.write = write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        response = _Response()

        async def watched_send(message: Message) -> None:
            await send(message)
            response.saw(message)  # after: what the server would not take was not sent

        try:
            await self.app(scope, receive, watched_send)
        finally:
            duration_s = time.perf_counter() - started
            status = 500 if response.status is None else response.status
            self.write(f"{request_line(scope)} {status} {duration_s:.3f} s {response.tokens_sent()} tokens")
