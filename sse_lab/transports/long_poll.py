"""Long polling, the pre-SSE baseline: `GET /api/chat/poll` answers with the tokens a client has not seen yet.

    GET /api/chat/poll?prompt=hi&max_tokens=40         starts a generation on the server
      ◀── {"id": "k3J...", "tokens": [], "next": 0, "done": null, "error": null}   (nothing yet after wait_s)
    GET /api/chat/poll?id=k3J...&after=0               waits up to wait_s for token 0
      ◀── {"id": ..., "tokens": [{"token": "The", "index": 0}], "next": 1, ...}
    GET /api/chat/poll?id=k3J...&after=1               ... and so on, until
      ◀── {..., "tokens": [...], "next": 40, "done": {"finish_reason": "length", "tokens": 40}}

How a generation is identified across polls: the first poll (chat parameters,
no `id`) starts the model in a task of its own and answers with an unguessable
`id`; every later poll names it (`id`, `after`, `wait_s` only). `after` is how
many tokens the client already has: the answer carries the tokens from index
`after` on that exist now, or, when there are none, waits up to `wait_s`
seconds for the next one (or the end), so a client polling again at once gets
each token as it is produced. `next` is the `after` of the next poll. A poll
is its own resume: after a dropped connection the client asks again with the
same `id` and `after`, and misses nothing.

What a client can make the server hold, and its limit (`PollLimits`):
- a running generation takes one of the app's stream slots (`max_concurrent_streams`,
  shared with SSE and WebSocket streams): beyond them, 429;
- a generation nobody polls for `idle_s` is abandoned: its model is stopped and it
  counts as cancelled, tokens produced after the client left as wasted;
- a finished generation is forgotten `idle_s` after its last poll (then 422 on `id`),
  and at most `max_held` generations are held, running or finished (twice
  `max_concurrent_streams` unless set; the oldest finished one is forgotten first;
  with none finished, 429);
- a poll waits at most `max_wait_s`, and at most `max_waiting_polls` polls wait on
  one generation at a time (more: 429);
- its tokens: at most max_tokens, which the server's own limit bounds.

`DELETE /api/chat/poll?id=...` stops a generation (the answer's `done` says
"cancelled"): long polling's only way to cancel is another request. Parameters
are validated as on the SSE endpoint, with the same 422 body.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..metrics import ChatResult
from ..model import TokenSource
from ..server import InvalidParameter, Settings, StreamStats, _Number, cancel_on_disconnect
from .generation import Done, Failed, Token, TokenRun, parse_chat, take_slot

PATH = "/api/chat/poll"
POLL_PARAMETERS = ("id", "after", "wait_s")
DEFAULT_WAIT_S = 10.0


@dataclass(frozen=True)
class PollLimits:
    """What long polling lets a client make the server hold: see the module docstring."""

    max_wait_s: float = 30.0
    idle_s: float = 30.0
    max_held: int | None = None  # None: twice the app's max_concurrent_streams
    max_waiting_polls: int = 2


class _TooManyPolls(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PolledGeneration:
    """A generation running on the server between polls: its tokens so far, its end, and its idle clock."""

    def __init__(self, run: TokenRun, limits: PollLimits, max_stream_s: float, forget: Callable[[], None]) -> None:
        self.run = run
        self.limits = limits
        self.max_stream_s = max_stream_s
        self.tokens: list[Token] = []
        self.end: Done | Failed | None = None
        self.waiting = 0
        self.loop = asyncio.get_running_loop()
        self.last_seen = self.loop.time()
        self._changed = asyncio.Event()
        self._cancel_asked = False
        self.stopped = asyncio.Event()  # the model has stopped, for good
        self._forget = forget
        self._producing = asyncio.ensure_future(asyncio.wait_for(self._produce(), max_stream_s))
        self.task = asyncio.ensure_future(self._supervise())

    def answer(self, generation_id: str, after: int) -> dict[str, object]:
        self.last_seen = self.loop.time()
        return {
            "id": generation_id,
            "tokens": [{"token": token.token, "index": token.index} for token in self.tokens[after:]],
            "next": max(after, len(self.tokens)),
            "done": {"finish_reason": self.end.finish_reason, "tokens": self.end.tokens}
            if isinstance(self.end, Done)
            else None,
            "error": {"code": self.end.code, "message": self.end.message} if isinstance(self.end, Failed) else None,
        }

    async def wait_beyond(self, after: int, wait_s: float) -> bool:
        """Return once a token from index `after` exists or the generation ended, or after `wait_s`; True."""
        if self.waiting >= self.limits.max_waiting_polls:
            raise _TooManyPolls(f"{self.waiting} polls already wait on this generation")
        self.waiting += 1
        try:
            deadline = self.loop.time() + wait_s
            while len(self.tokens) <= after and self.end is None and (left := deadline - self.loop.time()) > 0:
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), left)
                except asyncio.TimeoutError:
                    break
        finally:
            self.waiting -= 1
            self.last_seen = self.loop.time()
        return True

    def cancel(self) -> None:
        """Stop the model; the generation ends `done` with finish_reason "cancelled"."""
        if self.end is None:
            self._cancel_asked = True
            self._producing.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _produce(self) -> None:
        messages = self.run.messages()
        try:
            async for message in messages:
                if isinstance(message, Token):
                    self.tokens.append(message)
                else:
                    self.end = message
                self._notify()
        finally:
            await messages.aclose()

    async def _supervise(self) -> None:
        producing = self._producing
        try:
            while not producing.done():
                idle_left = self.last_seen + self.limits.idle_s - self.loop.time()
                if idle_left <= 0 and not self.waiting:
                    self.run.client_gone = True  # nobody polls any more: stop the model
                    producing.cancel()
                    break
                await asyncio.wait((producing,), timeout=max(idle_left, 0.05))
            await asyncio.wait((producing,))
            if producing.cancelled():
                if self._cancel_asked:
                    self.end = Done("cancelled", len(self.tokens))
            elif isinstance(producing.exception(), asyncio.TimeoutError):
                self.run.outcome = "failed"
                self.end = Failed("timeout", f"the stream ran longer than the limit of {self.max_stream_s:g} s")
        finally:
            producing.cancel()
            self.run.end()
            self.stopped.set()
            self._notify()
        # Finished: kept for the last polls until nobody has asked for idle_s.
        while (left := self.last_seen + self.limits.idle_s - self.loop.time()) > 0 or self.waiting:
            await asyncio.sleep(max(left, 0.05))
        self._forget()


def _parse_after(raw: str | None, max_tokens: int) -> int:
    return 0 if raw is None else int(_Number(int, 0, max_tokens).parse("after", raw))


def long_poll_routes(
    settings: Settings, models: Mapping[str, TokenSource], stats: StreamStats, limits: PollLimits | None = None
) -> list[Route]:
    """`GET` and `DELETE /api/chat/poll` for an app whose limits, models and counters are these."""
    limits = limits or PollLimits()
    max_held = 2 * settings.max_concurrent_streams if limits.max_held is None else limits.max_held
    held: dict[str, PolledGeneration] = {}

    def start(params: Mapping[str, str]) -> tuple[str, PolledGeneration]:
        source, generation, options = parse_chat(params, settings, models, path=PATH)
        if len(held) >= max_held:
            finished = [key for key, polled in held.items() if polled.end is not None]
            if not finished:
                raise _TooManyPolls(f"the server holds {len(held)} generations, its limit")
            held.pop(min(finished, key=lambda key: held[key].last_seen)).task.cancel()
        take_slot(settings, stats)
        generation_id = secrets.token_urlsafe(12)
        run = TokenRun(source, generation, options, settings, stats)
        held[generation_id] = PolledGeneration(
            run, limits, settings.max_stream_s, lambda: held.pop(generation_id, None)
        )
        return generation_id, held[generation_id]

    def find(query: Mapping[str, str]) -> PolledGeneration:
        polled = held.get(query["id"])
        if polled is None:
            raise InvalidParameter("id", "no such generation: it never existed, or expired after no poll for a while")
        return polled

    async def poll(request: Request) -> Response:
        query = request.query_params
        for name in POLL_PARAMETERS:
            if len(query.getlist(name)) > 1:
                raise InvalidParameter(name, "given more than once")
        wait_s = DEFAULT_WAIT_S
        if "wait_s" in query:
            wait_s = _Number(float, 0, limits.max_wait_s).parse("wait_s", query["wait_s"])
        if "id" in query:
            extra = sorted(set(query) - set(POLL_PARAMETERS))
            if extra:
                raise InvalidParameter(extra[0], "a poll naming an id takes only id, after and wait_s")
            generation_id, polled = query["id"], find(query)
        else:
            chat_params = {name: value for name, value in query.items() if name not in POLL_PARAMETERS}
            try:
                generation_id, polled = start(chat_params)
            except _TooManyPolls as full:
                return _too_many(full.reason)
        after = _parse_after(query.get("after"), polled.run.generation.max_tokens)
        try:
            waited = await cancel_on_disconnect(request.receive, lambda: polled.wait_beyond(after, wait_s))
        except _TooManyPolls as full:
            return _too_many(full.reason)
        if waited is None and polled.end is None and len(polled.tokens) <= after:
            return Response(status_code=499)  # the client left while waiting: nobody to answer
        return JSONResponse(polled.answer(generation_id, after))

    async def cancel(request: Request) -> Response:
        query = request.query_params
        if "id" not in query:
            raise InvalidParameter("id", "required")
        polled = find(query)
        polled.cancel()
        with contextlib.suppress(asyncio.TimeoutError):  # answer anyway: the model stops at its next await
            await asyncio.wait_for(polled.stopped.wait(), 1.0)
        return JSONResponse(polled.answer(query["id"], len(polled.tokens)))

    return [Route(PATH, poll, methods=["GET"]), Route(PATH, cancel, methods=["DELETE"])]


def _too_many(reason: str) -> Response:
    return JSONResponse({"error": "too_many_streams", "reason": reason}, status_code=429, headers={"Retry-After": "1"})


def poll_chat(
    base_url: str, prompt: str, *, wait_s: float = DEFAULT_WAIT_S, timeout_s: float = 60.0, **params: object
) -> ChatResult:
    """Long-poll a chat over one keep-alive connection, as a browser's fetch loop would; record each token's arrival.

    Each poll asks for the tokens after those received (`after`) and waits up to
    `wait_s` for one; the tokens a poll brings arrive together, when its response has been read.
    """
    query = {"prompt": prompt, "wait_s": wait_s, **params}
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        result = ChatResult(mode="long_poll", started_at=time.perf_counter())
        while True:
            response = client.get(base_url + PATH, params=query)
            arrived = time.perf_counter()
            result.headers_at = result.headers_at or arrived  # the first poll's answer
            body = response.json()
            if response.status_code != 200:
                result.error = body
                break
            result.arrivals += [arrived] * len(body["tokens"])
            result.text += "".join(token["token"] for token in body["tokens"])
            if body["done"] or body["error"]:
                result.finish_reason = (body["done"] or {}).get("finish_reason")
                result.error = body["error"]
                break
            query = {"id": body["id"], "after": body["next"], "wait_s": wait_s}
        result.finished_at = time.perf_counter()
    return result
