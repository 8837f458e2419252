"""What a stream does when its reader is slower than its model: four backpressure policies, and a send timeout.

By default (`pull`) a stream is one async generator that uvicorn pulls only when
the socket takes more bytes, so the model waits whenever the reader does and
nothing queues in the app. A real inference engine cannot wait for one slow
reader (the GPU batch goes on), so it decouples generation from writing: a
producer task runs the stream's events into a queue, and the response writes
from the queue (the reference's `Channel<T>`). What happens when the queue
fills is the policy:

    pull      no producer task, no queue: today's code path, at today's cost.
    buffer    an unbounded queue. The producer never waits; memory grows with
              the reader's lag (the classic mistake).
    pause     a queue of `queue_max` events. A full queue pauses the producer.
    coalesce  a queue of `queue_max` events. When a token finds it full, the
              token events queued and the newcomer merge into one event, so the
              producer never waits, the text stays intact, and the reader
              catches up with fewer, larger events. The queue's length is
              bounded; the text it holds is not (it is the reply, at about one
              byte per character instead of the hundred or so bytes of memory
              a queued token event takes).

The producer task runs the stream's own events (the model, the filters, the
token counts), so the queue holds encoded events and `tokens_generated` counts
what the model produced, sent or not. Coalescing decodes the token events
waiting in the queue to merge them: work done only once the reader is behind.

A merged token event carries the tokens' text, the index of its first token and
how many tokens it holds; its `id` is the index of its last token, so a client
that resumes with `Last-Event-ID` gets the next token, as after any event:

    event: token
    id: 19
    data: {"token":" a b c","index":17,"count":3}

A single token's event is unchanged (no `count`: it is 1). Any SSE client joins
the `token` fields to the exact text; one that counts tokens adds `count`.

The queue is the app's; the queue is not all. Below it, the transport's write
buffer (asyncio's, paused above 64 KiB), and the kernel's send and receive
buffers hold bytes too (see `sse_lab.instruments.sockets`). `send_timeout_s`
bounds the time a write may wait for them: `watch_sends` makes a send that has
not completed in that time end the stream as if the client had left.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.types import Message, Receive, Send

from .sse import decode, encode_event

POLICIES = ("pull", "buffer", "pause", "coalesce")
QUEUE_MAX_LIMIT = 1_024  # the largest `queue_max` a client may ask for

_TOKEN_EVENT = b"event: token\n"


class QueueGauge(Protocol):
    """Where the queues report their depth: the app's `StreamStats`.

    queued_events and queued_bytes: waiting in every stream's queue now (a merged
    event counts as one, by the bytes of its text); queue_peak_events: the most
    events one stream's queue has held.
    """

    queued_events: int
    queued_bytes: int
    queue_peak_events: int


@dataclass
class _Merged:
    """Token events merged while they waited: the first token's index, the last one's, the text as UTF-8."""

    index: int
    last_id: int
    count: int
    text: bytearray

    @classmethod
    def of(cls, chunk: bytes) -> _Merged:
        """The token event `chunk` (as the server encodes it, merged or not) as a merge of its own."""
        (event,) = decode(chunk)
        data = json.loads(event.data)
        count = data.get("count", 1)
        return cls(data["index"], data["index"] + count - 1, count, bytearray(data["token"].encode()))

    def extend(self, later: _Merged) -> None:
        self.last_id = later.last_id
        self.count += later.count
        self.text += later.text

    def encode(self) -> bytes:
        data = {"token": self.text.decode(), "index": self.index, "count": self.count}
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return encode_event(payload, event="token", id=str(self.last_id))


def _is_token(item: bytes | _Merged) -> bool:
    return isinstance(item, _Merged) or item.startswith(_TOKEN_EVENT)


def _size(item: bytes | _Merged) -> int:
    return len(item) if isinstance(item, bytes) else len(item.text)


class Channel:
    """The queue between one stream's producer task and its response, under a policy.

    `put` is the producer's side (it waits only under `pause`), `get` the
    response's. `gauge` is kept up to date with the queue's depth.
    """

    def __init__(self, policy: str, queue_max: int, gauge: QueueGauge) -> None:
        if policy not in POLICIES[1:]:
            raise ValueError(f"a channel's policy is one of {', '.join(POLICIES[1:])}, got {policy!r}")
        if queue_max < 1:  # a pausing producer would wait forever
            raise ValueError(f"queue_max must be 1 or more, got {queue_max}")
        self.policy = policy
        self.queue_max = queue_max
        self.gauge = gauge
        self.items: deque[bytes | _Merged] = deque()
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.finished = False
        self.failure: BaseException | None = None

    async def put(self, chunk: bytes) -> None:
        """Queue one chunk of the stream (an event, or the `retry` line)."""
        if self.policy == "pause":
            while len(self.items) >= self.queue_max:
                self.writable.clear()
                await self.writable.wait()
        elif self.policy == "coalesce" and len(self.items) >= self.queue_max and self._coalesce(chunk):
            self.readable.set()
            return
        self._append(chunk)

    def _append(self, item: bytes | _Merged) -> None:
        self.items.append(item)
        self.gauge.queued_events += 1
        self.gauge.queued_bytes += _size(item)
        self.gauge.queue_peak_events = max(self.gauge.queue_peak_events, len(self.items))
        self.readable.set()

    def _pop(self, at_end: bool = False) -> bytes | _Merged:
        item = self.items.pop() if at_end else self.items.popleft()
        self.gauge.queued_events -= 1
        self.gauge.queued_bytes -= _size(item)
        return item

    def _coalesce(self, chunk: bytes) -> bool:
        """Merge the token events at the end of the queue and `chunk` into one; False if `chunk` is no token."""
        if not _is_token(chunk):  # the stream's last event: it joins the queue as it is
            return False
        tail: list[bytes | _Merged] = []
        while self.items and _is_token(self.items[-1]):
            tail.append(self._pop(at_end=True))
        if not tail:  # only the `retry` line waits (queue_max=1): nothing to merge with
            return False
        tail.reverse()
        merges = [item if isinstance(item, _Merged) else _Merged.of(item) for item in tail]
        merged = merges[0]  # extended in place: a long merge is never copied again
        for later in [*merges[1:], _Merged.of(chunk)]:
            merged.extend(later)
        self._append(merged)
        return True

    def finish(self, failure: BaseException | None = None) -> None:
        """The producer is done: the response gets what is queued, then the end (or `failure`)."""
        self.finished = True
        self.failure = failure
        self.readable.set()

    async def get(self) -> bytes | None:
        """The next chunk to write; None once the producer has finished and the queue is empty."""
        while not self.items:
            if self.finished:
                if self.failure is not None:
                    raise self.failure
                return None
            self.readable.clear()
            await self.readable.wait()
        item = self._pop()
        self.writable.set()
        return item if isinstance(item, bytes) else item.encode()

    def discard(self) -> None:
        """Drop what is still queued (the stream ended early) and take it off the gauge."""
        while self.items:
            self._pop()


async def _produce(events: AsyncIterator[bytes], channel: Channel) -> None:
    try:
        async for chunk in events:
            await channel.put(chunk)
    except asyncio.CancelledError:
        raise
    except Exception as failure:  # a bug: let the response raise it, where it is reported
        channel.finish(failure)
    else:
        channel.finish()


async def decoupled(
    events: AsyncGenerator[bytes, None], policy: str, queue_max: int, gauge: QueueGauge
) -> AsyncGenerator[bytes, None]:
    """Run `events` in a producer task of its own, and yield its chunks from a `Channel` under `policy`.

    The producer task is cancelled, and `events` closed, when this generator ends
    for any reason: the stream's end, the client leaving, a time limit.
    """
    channel = Channel(policy, queue_max, gauge)
    producing = asyncio.ensure_future(_produce(events, channel))
    try:
        while (chunk := await channel.get()) is not None:
            yield chunk
    finally:
        producing.cancel()
        await asyncio.wait((producing,))
        await events.aclose()
        channel.discard()


def watch_sends(
    receive: Receive, send: Send, timeout_s: float, on_timeout: Callable[[], object]
) -> tuple[Receive, Send]:
    """Wrap an ASGI connection so that a send not done within `timeout_s` ends the stream.

    What sse-starlette's `send_timeout` does: a reader that takes nothing for that
    long does not hold its slot (and its producer, and its queue) forever. The
    stuck send is cancelled (uvicorn writes a message whole or not at all, so
    nothing is half sent), `on_timeout()` is called once, every later send is
    dropped, and `receive` reports `http.disconnect`: the response ends as if the
    client had left.
    """
    stalled = asyncio.Event()

    async def timed_send(message: Message) -> None:
        if stalled.is_set():
            return
        try:
            await asyncio.wait_for(send(message), timeout_s)
        except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11 on
            if not stalled.is_set():
                stalled.set()
                on_timeout()

    async def watched_receive() -> Message:
        receiving = asyncio.ensure_future(receive())
        stalling = asyncio.ensure_future(stalled.wait())
        try:
            await asyncio.wait((receiving, stalling), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiving, stalling):
                task.cancel()
            await asyncio.wait((receiving, stalling))
        if not receiving.cancelled():
            message: Message = receiving.result()
            return message
        return {"type": "http.disconnect"}

    return watched_receive, timed_send
