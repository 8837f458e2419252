"""Generations that outlive their connection and their worker, on Redis Streams.

With `Settings(redis_url=...)` the stream endpoint no longer runs the model for
the connection that asked. A request starts (or finds) a *generation*, keyed by
the `generation` query parameter (a "watch" link: any number of readers, on any
worker), or when it is absent by a hash of the request's parameters:

    client ─▶ nginx ─▶ worker A: reader ◀── XREAD BLOCK ──┐
                    ─▶ worker B: reader ◀── XREAD BLOCK ──┤   Redis
                       worker B: producer ── XADD ────────┴▶ stream sse-lab:{id}:stream
                                  └ lease sse-lab:{id}:lease (SET NX PX, renewed)

- The producer appends every event of the generation to a Redis stream: token i
  as entry `{i+1}-0` (`0-0` is not a valid id), then one last entry, `done` or
  `error`. Explicit ids fence duplicates: Redis refuses an id that is not above the last.
- Any worker serves the SSE response by reading the stream from the client's
  `Last-Event-ID` (XREAD is exclusive: after token k it reads from `{k+1}-0`,
  carrying the last id forward): replay, then the live tail. Each worker has ONE
  reader task and one blocking Redis connection, fanning out to all its open
  streams (a per-worker "wake" stream interrupts the block when a stream joins).
- The producer holds a lease (SET NX PX), renewed from its own task by a
  check-and-extend script; every token write is fenced by the same check, so an
  old producer that was paused and lost its lease cannot write after a takeover.
  A worker with readers of a generation and no producer tries to take the lease
  every `lease_ms / 5`: when a producer dies its lease runs out and another worker
  takes over from the last entry in the stream (the model gets the prompt and the
  text so far: `resume_from` = tokens in the stream; the sim then continues exactly).
- Readers keep a key `sse-lab:{id}:readers` alive (PX `grace_s`) while any is
  connected, on any worker. When the last leaves, the producer runs on for the
  grace period (so a reconnecting EventSource resumes by pure replay) and stops
  after it. A later reader restarts it from the last token.
- Every key expires `stream_expire_s` after the last write, so Redis does not grow.

Producer tasks belong to the app (`GenerationStore.producers`), never to a request.
Intentional divergences from the single-process server (do not fix): `/api/stats`
counts the tokens this worker produced, for whichever reader; a generation's
parameters are those of its first request, a watcher's own are validated then ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from urllib.parse import urlencode

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .model import GenerationRequest, TokenSource
from .server import (
    STREAM_HEADERS,
    ChatStream,
    EventStreamResponse,
    InvalidParameter,
    Settings,
    StreamOptions,
    StreamStats,
    TooManyStreams,
    parse_request,
    parse_resume,
    parse_stream_options,
)
from .sse import MEDIA_TYPE, encode_event

logger = logging.getLogger(__name__)

WORKER_HEADER = "X-SSE-Lab-Worker"
GENERATION_PARAMETER = "generation"
KEY_PREFIX = "sse-lab"
READ_BLOCK_MS = 1_000  # the reader's XREAD BLOCK; a join interrupts it at once through the wake stream
READ_RETRY_S = 1.0
_GENERATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN, _END = b"token", b"end"

# Lua scripts run atomically in Redis: the check and the write cannot be split by another client.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], ARGV[2], 'kind', ARGV[3], 'event', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return 1
"""


def worker_id() -> str:
    """What `X-SSE-Lab-Worker` says: the serving process's pid."""
    return str(os.getpid())


def entry_id(index: int) -> str:
    """The stream entry id of token `index` (or of the end entry after `index` tokens): `0-0` is invalid.

    >>> entry_id(0), entry_id(41)
    ('1-0', '42-0')
    """
    return f"{index + 1}-0"


def _id_key(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one generation."""

    stream: str
    lease: str
    request: str
    readers: str

    @classmethod
    def of(cls, generation_id: str) -> Keys:
        base = f"{KEY_PREFIX}:{generation_id}"
        return cls(f"{base}:stream", f"{base}:lease", f"{base}:request", f"{base}:readers")


@dataclass
class _Reader:
    """One open response: the entries after `position` go into `queue`."""

    generation_id: str
    position: str
    queue: asyncio.Queue[tuple[bytes, bytes]] = field(default_factory=asyncio.Queue)


class WorkerHeader:
    """ASGI middleware: every response says which process served it (`X-SSE-Lab-Worker: <pid>`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.header = (WORKER_HEADER.lower().encode(), worker_id().encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, with_header if scope["type"] == "http" else send)


class GenerationStore:
    """One worker's share of the generations: its reader task, its producers, its Redis connections."""

    def __init__(self, settings: Settings, models: Mapping[str, TokenSource], stats: StreamStats) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.models = models
        self.stats = stats
        self.lease_ms = settings.lease_ms
        self.poll_s = settings.lease_ms / 5 / 1000
        self.grace_ms = round(1000 * generation_grace_s(settings))
        self.expire_ms = round(1000 * settings.stream_expire_s)
        self.owner = f"{worker_id()}:{secrets.token_hex(4)}"  # this worker's lease value
        self.wake_key = f"{KEY_PREFIX}:wake:{self.owner}"
        self.readers: dict[str, list[_Reader]] = {}
        self.producers: dict[str, asyncio.Task[None]] = {}  # owned by the app, not by a request
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None  # the reader's own connection, held by XREAD BLOCK

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "the store is not started (the app's lifespan starts it)"
        return self._redis

    async def start(self) -> None:
        self._redis = aioredis.Redis.from_url(self.settings.redis_url)
        self._blocking = aioredis.Redis.from_url(self.settings.redis_url, single_connection_client=True)
        await self._redis.ping()
        self._extend = self._redis.register_script(_EXTEND)
        self._release = self._redis.register_script(_RELEASE)
        self._append = self._redis.register_script(_APPEND)
        self._tasks = [asyncio.ensure_future(self._read_all()), asyncio.ensure_future(self._supervise())]

    async def stop(self) -> None:
        """Cancel the tasks, hand the leases back (another worker takes over at once), close the connections."""
        tasks = [*self._tasks, *self.producers.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._redis is not None:
            with contextlib.suppress(RedisError):
                await self._redis.delete(self.wake_key)
        for connection in (self._blocking, self._redis):
            if connection is not None:
                await connection.aclose()

    # The request side

    async def respond(self, request: Request) -> Response:
        """Validate like the single-process endpoint, then serve the generation from its stream."""
        generation_id = request.query_params.get(GENERATION_PARAMETER)
        query = [(name, value) for name, value in request.query_params.multi_items() if name != GENERATION_PARAMETER]
        request = Request({**request.scope, "query_string": urlencode(query).encode()}, request.receive)
        _, generation = parse_request(request, self.settings, self.models)
        generation = parse_resume(request, generation)
        options = parse_stream_options(request, generation, self.settings)
        if generation_id is None:
            fields = sorted((name, value) for name, value in query if name != "last_event_id")
            generation_id = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]
        elif not _GENERATION_ID.fullmatch(generation_id):
            raise InvalidParameter(GENERATION_PARAMETER, "must be 1 to 64 letters, digits, '-' or '_'")
        if request.method == "HEAD":
            response = Response(media_type=MEDIA_TYPE, headers=STREAM_HEADERS)
            del response.headers["content-length"]
            return response
        if self.stats.streams_active >= self.settings.max_concurrent_streams:
            self.stats.streams_rejected += 1
            raise TooManyStreams
        self.stats.streams_active += 1  # before any await, as in the single-process endpoint
        try:
            record = {
                "model": request.query_params.get("model", "sim"),
                "generation": asdict(generation),
                "options": asdict(options),
            }
            reader = _Reader(generation_id, f"{generation.resume_from}-0")
            await self._join(reader, json.dumps(record))
        except RedisError as failure:
            self.stats.stream_ended("failed")
            logger.warning("Redis failed: %r", failure)
            reason = "the stream store (Redis) is unavailable; try again shortly"
            return JSONResponse({"error": "store_unavailable", "reason": reason}, status_code=503)
        except BaseException:
            self.stats.stream_ended("failed")
            raise
        return EventStreamResponse(
            self._events(reader),
            heartbeat_s=options.heartbeat_s,
            max_duration_s=self.settings.max_stream_s,
            on_timeout=self._timed_out,
            on_disconnect=lambda: self._leave(reader),
        )

    async def _events(self, reader: _Reader) -> AsyncGenerator[bytes, None]:
        outcome = "cancelled"
        try:
            if self.settings.retry_ms is not None:
                yield f"retry: {self.settings.retry_ms}\n".encode()
            while True:
                kind, event = await reader.queue.get()
                if kind == _END:
                    outcome = "failed" if event.startswith(b"event: error") else "completed"
                yield event
                if kind == _END:
                    return
        finally:
            self._leave(reader)
            self.stats.stream_ended(outcome)

    def _timed_out(self) -> bytes:
        message = f"the stream ran longer than the limit of {self.settings.max_stream_s:g} s"
        return encode_event(json.dumps({"code": "timeout", "message": message}), event="error")

    async def _join(self, reader: _Reader, record: str) -> None:
        """Register the reader, and in one round trip: store the request (if new), keep the readers key,
        bid for the lease when no producer runs here, and wake this worker's reader task."""
        generation_id, keys = reader.generation_id, Keys.of(reader.generation_id)
        self.readers.setdefault(generation_id, []).append(reader)
        bid = generation_id not in self.producers
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(keys.request, record, nx=True, px=self.expire_ms)
                pipe.set(keys.readers, self.owner, px=self.grace_ms)
                if bid:  # the lease first, then (in the producer) the last entry, never the other way round
                    pipe.set(keys.lease, self.owner, nx=True, px=self.lease_ms)
                pipe.xadd(self.wake_key, {"join": generation_id}, maxlen=16, approximate=True)
                pipe.pexpire(self.wake_key, self.expire_ms)  # a worker that died leaves nothing for ever
                replies = await pipe.execute()
        except BaseException:
            self._leave(reader)
            raise
        if bid and replies[2]:
            self._start_producer(generation_id)

    def _leave(self, reader: _Reader) -> None:
        readers = self.readers.get(reader.generation_id, [])
        with contextlib.suppress(ValueError):
            readers.remove(reader)
        if not readers:
            self.readers.pop(reader.generation_id, None)  # the readers key now runs out after the grace period

    async def _keep_readers_key(self, generation_id: str) -> None:
        await self.redis.set(Keys.of(generation_id).readers, self.owner, px=self.grace_ms)

    # The worker's reader: one blocking connection for every open stream

    async def _read_all(self) -> None:
        assert self._blocking is not None
        wake_position = "0-0"
        while True:
            streams: dict[str, str] = {self.wake_key: wake_position}
            for generation_id, readers in self.readers.items():
                streams[Keys.of(generation_id).stream] = min((r.position for r in readers), key=_id_key)
            try:
                replies = await self._blocking.xread(streams, block=READ_BLOCK_MS)  # type: ignore[arg-type]
            except RedisError as failure:
                logger.warning("reading the streams failed: %r", failure)
                await asyncio.sleep(READ_RETRY_S)  # one line a second while Redis is away, not a flood
                continue
            for key, entries in replies:
                name = key.decode()
                if name == self.wake_key:
                    wake_position = entries[-1][0].decode()
                    continue
                generation_id = name.split(":")[1]
                for reader in self.readers.get(generation_id, []):
                    self._deliver(reader, streams[name], entries)

    @staticmethod
    def _deliver(reader: _Reader, read_from: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Queue the entries after the reader's position, and move it on: never one twice, never one skipped.

        `entries` are all those after `read_from`. A reader that joined while that read
        was under way may be behind it: it gets nothing now, and the next read starts
        from its position.
        """
        position = _id_key(reader.position)
        if position < _id_key(read_from):
            return
        for raw_id, fields in entries:
            if _id_key(raw_id) > position:
                reader.queue.put_nowait((fields[b"kind"], fields[b"event"]))
                position = _id_key(raw_id)
                reader.position = raw_id.decode()

    # Producers: leases, takeover, grace period

    async def _supervise(self) -> None:
        """Every `lease_ms / 5`: keep the readers keys alive, and take over generations without a producer."""
        while True:
            await asyncio.sleep(self.poll_s)
            for generation_id in list(self.readers):
                try:
                    await self._keep_readers_key(generation_id)
                    await self._try_to_produce(generation_id)
                except RedisError as failure:
                    logger.warning("supervising generation %s failed: %r", generation_id, failure)

    async def _try_to_produce(self, generation_id: str) -> None:
        if generation_id in self.producers:
            return
        # The lease first, then the last entry: two workers never pick a start from the same stale view.
        if await self.redis.set(Keys.of(generation_id).lease, self.owner, nx=True, px=self.lease_ms):
            self._start_producer(generation_id)

    def _start_producer(self, generation_id: str) -> None:
        task = asyncio.ensure_future(self._produce(generation_id))
        self.producers[generation_id] = task  # the app's, not the request's: a disconnect does not cancel it
        task.add_done_callback(lambda _: self.producers.pop(generation_id, None))

    async def _produce(self, generation_id: str) -> None:
        keys = Keys.of(generation_id)
        renewing = asyncio.ensure_future(self._renew(keys))
        try:
            producing = asyncio.ensure_future(self._generate(keys))
            await asyncio.wait((producing, renewing), return_when=asyncio.FIRST_COMPLETED)
            producing.cancel()
            await asyncio.wait((producing,))
            if not producing.cancelled() and producing.exception() is not None:
                logger.warning("producing generation %s failed: %r", generation_id, producing.exception())
        finally:
            renewing.cancel()
            await asyncio.wait((renewing,))
            with contextlib.suppress(RedisError):
                await asyncio.shield(self._release(keys=[keys.lease], args=[self.owner]))

    async def _renew(self, keys: Keys) -> None:
        """Extend the lease every lease_ms / 3 while it is ours and someone reads; return when it is lost or unread."""
        while True:
            await asyncio.sleep(self.lease_ms / 3 / 1000)
            if not await self._extend(keys=[keys.lease], args=[self.owner, self.lease_ms]):
                logger.warning("lost the lease of %s", keys.lease)
                return
            if not await self.redis.exists(keys.readers):
                return  # no reader anywhere for the grace period: stop the model

    async def _generate(self, keys: Keys) -> None:
        raw = await self.redis.get(keys.request)
        if raw is None:
            return  # expired: nothing to continue
        record = json.loads(raw)
        last = await self.redis.xrevrange(keys.stream, count=1)
        if last and last[0][1][b"kind"] == _END:
            return  # finished already
        generation = GenerationRequest(**record["generation"])
        start = _id_key(last[0][0])[0] if last else generation.resume_from
        generation = replace(generation, resume_from=start)  # the model continues from the text so far
        options = StreamOptions(**{**record["options"], "blocklist": tuple(record["options"]["blocklist"])})
        chat = ChatStream(self.models[record["model"]], generation, options, self.settings, self.stats)
        index = start
        events: AsyncIterator[bytes] = chat.events()
        async for event in events:
            if event.startswith(b"retry:"):
                continue  # each response sends its own
            kind = _TOKEN if event.startswith(b"event: token\n") else _END
            args = [self.owner, entry_id(index), kind, event, self.expire_ms]
            try:
                written = await self._append(keys=[keys.lease, keys.stream, keys.request], args=args)
            except ResponseError as refused:  # the id exists: another producer wrote it
                logger.warning("token %d of %s was written already: %s", index, keys.stream, refused)
                return
            if not written:
                logger.warning("lost the lease of %s before token %d", keys.lease, index)
                return
            index += 1


def generation_grace_s(settings: Settings) -> float:
    """How long a generation runs on after its last reader left: the setting, or the announced retry + 2 s."""
    if settings.generation_grace_s is not None:
        return settings.generation_grace_s
    return (settings.retry_ms or 0) / 1000 + 2.0


def install(app: Starlette, store: GenerationStore) -> None:
    """Start and stop `store` with the app, and name the worker on every response."""
    app.add_middleware(WorkerHeader)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.start()
        try:
            yield
        finally:
            await store.stop()

    app.router.lifespan_context = lifespan


def stream_memory_bytes(redis_url: str, generation_id: str) -> int:
    """Bytes Redis holds for one generation's stream (`MEMORY USAGE`), for the notebook's cost per token."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        used = client.memory_usage(Keys.of(generation_id).stream, samples=0)
    return int(used or 0)


def generation_keys(redis_url: str, generation_id: str) -> dict[str, bool]:
    """Which of a generation's keys exist right now (to watch them expire)."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        return {name: bool(client.exists(key)) for name, key in asdict(Keys.of(generation_id)).items()}
