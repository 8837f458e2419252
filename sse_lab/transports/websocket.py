"""The chat over a WebSocket: `/ws/chat` in the kit's Starlette app.

    client                                        server
    ──────                                        ──────
    connect, HTTP Upgrade ──────────────────────▶ accept
    {"prompt": ..., "max_tokens": ..., ...} ────▶ the SSE endpoint's validation
                 ◀── {"type": "token", "token": "The", "index": 0}
                 ◀── ... one text message per token
                 ◀── {"type": "done", "finish_reason": "length", "tokens": N}
                 ◀── close 1000

The first message carries the chat parameters of `GET /api/chat/stream` (prompt,
model, max_tokens, ttft_ms, token_ms, jitter_ms, seed) as a JSON object. A bad
one is answered `{"type": "error", "code": "invalid_parameter", "parameter",
"reason"}` and close code 1008 (policy violation); no first message within
`FIRST_MESSAGE_TIMEOUT_S` is answered the same way. Trouble after the start
(model_error, content_filter, context_length_exceeded, timeout) is
`{"type": "error", "code", "message"}` then close 1000. Every slot taken:
`{"type": "error", "code": "too_many_streams", ...}` and close 1013 (try again later).

What SSE cannot do on one connection: any message from the client while tokens
flow (`{"type": "cancel"}`) stops the model at its next await; the answer ends
with `{"type": "done", "finish_reason": "cancelled", "tokens": <sent so far>}`.
A client that leaves stops the model the same way, as on the SSE endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ..metrics import ChatResult
from ..model import TokenSource
from ..server import InvalidParameter, Settings, StreamStats, TooManyStreams
from .generation import Done, Failed, Message, Token, TokenRun, parse_chat, take_slot

PATH = "/ws/chat"
FIRST_MESSAGE_TIMEOUT_S = 10.0
CLOSE_NORMAL = 1000
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


def _text(payload: Mapping[str, object]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


async def _last_words(websocket: WebSocket, payload: Mapping[str, object] | None, code: int) -> None:
    """Send a final message (if any) and close; a client that already left only makes this a no-op."""
    with contextlib.suppress(OSError, WebSocketDisconnect):  # uvicorn's ClientDisconnected is an OSError
        if payload is not None:
            await websocket.send_text(_text(payload))
        await websocket.close(code)


def message_payload(message: Message) -> dict[str, object]:
    """The JSON object a run's message is sent as.

    >>> message_payload(Token("The", 0))
    {'type': 'token', 'token': 'The', 'index': 0}
    """
    if isinstance(message, Token):
        return {"type": "token", "token": message.token, "index": message.index}
    if isinstance(message, Done):
        return {"type": "done", "finish_reason": message.finish_reason, "tokens": message.tokens}
    return {"type": "error", "code": message.code, "message": message.message}


async def _first_message(websocket: WebSocket) -> dict[str, object] | None:
    """The parameters object of the first message; None when the client left. Raises InvalidParameter."""
    try:
        incoming = await asyncio.wait_for(websocket.receive(), FIRST_MESSAGE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise InvalidParameter("message", f"no first message within {FIRST_MESSAGE_TIMEOUT_S:g} s") from None
    if incoming["type"] == "websocket.disconnect":
        return None
    if incoming.get("text") is None:
        raise InvalidParameter("message", "must be a text message holding a JSON object, got a binary one")
    try:
        params = json.loads(incoming["text"])
    except json.JSONDecodeError as error:
        raise InvalidParameter("message", f"must be a JSON object: {error}") from None
    if not isinstance(params, dict):
        raise InvalidParameter("message", f"must be a JSON object, got {type(params).__name__}")
    return params


def websocket_route(settings: Settings, models: Mapping[str, TokenSource], stats: StreamStats) -> WebSocketRoute:
    """The `/ws/chat` route of an app whose limits, models and counters are these."""

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            params = await _first_message(websocket)
            if params is None:
                return
            source, generation, options = parse_chat(params, settings, models, path=PATH)
            take_slot(settings, stats)
        except InvalidParameter as invalid:
            error = {"type": "error", "code": "invalid_parameter", "parameter": invalid.parameter}
            await _last_words(websocket, {**error, "reason": invalid.reason}, CLOSE_POLICY_VIOLATION)
            return
        except TooManyStreams:
            reason = f"all {settings.max_concurrent_streams} stream slots are taken; try again shortly"
            error = {"type": "error", "code": "too_many_streams", "message": reason}
            await _last_words(websocket, error, CLOSE_TRY_AGAIN_LATER)
            return
        await _stream(websocket, TokenRun(source, generation, options, settings, stats), settings.max_stream_s)

    return WebSocketRoute(PATH, chat)


async def _stream(websocket: WebSocket, run: TokenRun, max_stream_s: float) -> None:
    """Send the run's messages while listening: a client message cancels it, a disconnect abandons it."""
    messages = run.messages()
    sent = 0

    async def send_all() -> None:
        nonlocal sent
        async for message in messages:
            await websocket.send_text(_text(message_payload(message)))
            sent += isinstance(message, Token)

    sending = asyncio.ensure_future(asyncio.wait_for(send_all(), max_stream_s))
    listening = asyncio.ensure_future(websocket.receive())
    try:
        await asyncio.wait((sending, listening), return_when=asyncio.FIRST_COMPLETED)
        if listening.done() and not sending.done():
            run.client_gone = listening.result()["type"] == "websocket.disconnect"
            sending.cancel()
            await asyncio.wait((sending,))
            if not run.client_gone:  # a message while streaming: the client asked to stop
                await _last_words(websocket, message_payload(Done("cancelled", sent)), CLOSE_NORMAL)
            return
        listening.cancel()
        try:
            sending.result()
        except asyncio.TimeoutError:
            run.outcome = "failed"
            limit = f"the stream ran longer than the limit of {max_stream_s:g} s"
            await _last_words(websocket, message_payload(Failed("timeout", limit)), CLOSE_NORMAL)
            return
        except (OSError, WebSocketDisconnect):  # the client went away while we were writing
            run.client_gone = True
            return
        await _last_words(websocket, None, CLOSE_NORMAL)
    finally:
        for task in (sending, listening):
            task.cancel()
        await asyncio.wait((sending, listening))
        await messages.aclose()
        run.end()


def websocket_url(base_url: str) -> str:
    """The `/ws/chat` URL of a server at `base_url`.

    >>> websocket_url("http://127.0.0.1:8000")
    'ws://127.0.0.1:8000/ws/chat'
    """
    return "ws" + base_url.removeprefix("http") + PATH


def ws_chat(
    base_url: str,
    prompt: str,
    *,
    cancel_after: int | None = None,
    deflate: bool = True,
    timeout_s: float = 30.0,
    **params: object,
) -> ChatResult:
    """Chat over `/ws/chat` on a fresh connection and record when each token arrived.

    The clock starts before the TCP connection and the Upgrade handshake, as
    `stream_chat`'s does. `cancel_after=N` sends `{"type": "cancel"}` once N tokens
    have arrived. `deflate` offers permessage-deflate, as browsers do; uvicorn accepts it.
    """
    result = ChatResult(mode="websocket", started_at=time.perf_counter())
    with connect(
        websocket_url(base_url), proxy=None, compression="deflate" if deflate else None, open_timeout=timeout_s
    ) as websocket:
        result.headers_at = time.perf_counter()  # the Upgrade handshake is done
        websocket.send(_text({"prompt": prompt, **params}))
        while True:
            message = json.loads(websocket.recv(timeout_s))
            if message["type"] == "token":
                result.arrivals.append(time.perf_counter())
                result.text += message["token"]
                if cancel_after is not None and result.tokens == cancel_after:
                    websocket.send(_text({"type": "cancel"}))
            else:
                if message["type"] == "done":
                    result.finish_reason = message["finish_reason"]
                else:
                    result.error = message
                break
        result.finished_at = time.perf_counter()
        with contextlib.suppress(ConnectionClosed):  # the server closes after its last message
            websocket.recv(timeout_s)
    return result
