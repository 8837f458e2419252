"""Payload cost: what a way of framing tokens as events costs in bytes, CPU and smoothness.

Two formats, each with `per_event` tokens coalesced into one event:

    json   what the server sends (`per_event=1`):   event: token
                                                     id: 7
                                                     data: {"token":" world","index":7}
           several tokens keep their boundaries:     data: {"tokens":[" big"," world"],"index":6}
           (the id is the index of the event's last token, so Last-Event-ID still names the last token received)
    text   the bare text of the event's tokens:      data:  world

Raw text is cheaper but not exact: the encoder writes a token with a line break
as several `data` lines and a parser joins them with LF, so CR and CRLF arrive as
LF (`round_trip(["a\\r\\nb"], WireFormat("text"))` gives `["a\\nb"]`). JSON escapes
them. Coalescing saves framing, and the reader pays in smoothness: text that was
produced every token_ms arrives in bursts of `per_event` tokens every
`per_event` x token_ms.

Serializers: the reference's fix for JSON overhead is a faster serializer.
`serializer_cost` times `json.dumps` (what the server calls), `orjson.dumps` and
msgspec's JSON encoder on each token event's payload, `{"token": ..., "index": ...}`;
all three write the same bytes. `server_cpu_per_event` measures what one token
event costs the whole server (model, filters, encoding, Starlette, uvicorn's
HTTP framing, the write to the socket), so that `serialization_table` can say
which share of it the serializer is, and so what switching could save at most.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice, pairwise
from pathlib import Path

import httpx
import msgspec
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tqdm.auto import tqdm

from ..background import serve_in_background
from ..client import STREAM_PATH as STREAM_PATH_CHAT
from ..instruments.cpu import MEASURING_TOKEN_MS
from ..model import GenerationRequest, sim, sim_tokens
from ..server import EventStreamResponse
from ..sse import Decoder, Event, decode, encode_event
from . import memory

KINDS = ("json", "text")
PROMPT = "What does each token cost on the wire?"
STREAM_PATH = "/payload/stream"


def _json(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))  # as the server writes it


def _chunks(tokens: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(tokens)
    while chunk := list(islice(iterator, size)):
        yield chunk


@dataclass(frozen=True)
class WireFormat:
    """How tokens become events: `kind` "json" or "text", `per_event` tokens in each event."""

    kind: str = "json"
    per_event: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if type(self.per_event) is not int or self.per_event < 1:
            raise ValueError(f"per_event must be a positive int, got {self.per_event!r}")

    @property
    def name(self) -> str:
        """A label such as "json x4"."""
        return f"{self.kind} x{self.per_event}"

    def encode(self, tokens: Sequence[str], first_index: int) -> bytes:
        """One event carrying `tokens`, the first of which is token number `first_index`."""
        if self.kind == "text":
            return encode_event("".join(tokens))
        last_id = str(first_index + len(tokens) - 1)
        if self.per_event == 1:
            (token,) = tokens
            return encode_event(_json({"token": token, "index": first_index}), event="token", id=last_id)
        return encode_event(_json({"tokens": list(tokens), "index": first_index}), event="token", id=last_id)

    def events(self, tokens: Iterable[str]) -> Iterator[bytes]:
        """The events for a sequence of tokens, `per_event` at a time (the last one may carry fewer)."""
        for number, chunk in enumerate(_chunks(tokens, self.per_event)):
            yield self.encode(chunk, number * self.per_event)

    def decode(self, event: Event) -> list[str]:
        """What one received event carries: its tokens (json), or its text as one piece (text)."""
        if self.kind == "text":
            return [event.data]
        payload = json.loads(event.data)
        return [payload["token"]] if self.per_event == 1 else payload["tokens"]


FORMATS = tuple(WireFormat(kind, per_event) for kind in KINDS for per_event in (1, 4, 16))


def decode_body(body: bytes, wire_format: WireFormat) -> list[str]:
    """Parse a whole event-stream body, as a client would, into what its events carry."""
    return [piece for event in decode(body) for piece in wire_format.decode(event)]


def round_trip(tokens: Iterable[str], wire_format: WireFormat) -> list[str]:
    """Encode tokens, parse them back: what a client receives (text: one piece per event).

    >>> round_trip(["to", " be\\r\\n", "or"], WireFormat("json"))
    ['to', ' be\\r\\n', 'or']
    >>> round_trip(["to", " be\\r\\n", "or"], WireFormat("text"))
    ['to', ' be\\n', 'or']
    """
    return decode_body(b"".join(wire_format.events(tokens)), wire_format)


@dataclass(frozen=True)
class PayloadCost:
    """What one format costs for one sequence of tokens; only token events count (no `done`).

    token_bytes: the tokens' own UTF-8 bytes. wire_bytes: the bytes of their events.
    bytes_per_token: wire_bytes / tokens. overhead_ratio: wire_bytes / token_bytes
    (1.0 would be free framing). cpu_us_per_token: CPU time of this thread to encode
    them all, best of the repeats, per token, in microseconds.
    """

    format: str
    kind: str
    per_event: int
    tokens: int
    events: int
    token_bytes: int
    wire_bytes: int
    bytes_per_token: float
    overhead_ratio: float
    cpu_us_per_token: float


def _encode_cpu_s(wire_format: WireFormat, tokens: Sequence[str], repeats: int) -> float:
    """The least CPU time (time.thread_time) of `repeats` encodings: the run least disturbed by the machine."""
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        for _event in wire_format.events(tokens):
            pass
        best = min(best, time.thread_time() - started)
    return best


def payload_cost(
    tokens: Sequence[str] | None = None,
    *,
    formats: Sequence[WireFormat] = FORMATS,
    repeats: int = 5,
) -> list[PayloadCost]:
    """Bytes and encoding CPU per token of each format, for `tokens` (default: 2,000 of `sim`'s)."""
    if tokens is None:
        tokens = sim_tokens(PROMPT, 2_000)
    if not tokens:
        raise ValueError("no tokens to measure")
    token_bytes = sum(len(token.encode()) for token in tokens)
    costs = []
    for wire_format in formats:
        events = list(wire_format.events(tokens))
        wire_bytes = sum(len(event) for event in events)
        cpu_s = _encode_cpu_s(wire_format, tokens, repeats)
        costs.append(
            PayloadCost(
                format=wire_format.name,
                kind=wire_format.kind,
                per_event=wire_format.per_event,
                tokens=len(tokens),
                events=len(events),
                token_bytes=token_bytes,
                wire_bytes=wire_bytes,
                bytes_per_token=wire_bytes / len(tokens),
                overhead_ratio=wire_bytes / token_bytes if token_bytes else float("inf"),
                cpu_us_per_token=1e6 * cpu_s / len(tokens),
            )
        )
    return costs


def _invalid(parameter: str, reason: str) -> Response:
    return JSONResponse({"error": "invalid_parameter", "parameter": parameter, "reason": reason}, status_code=422)


def create_payload_app() -> Starlette:
    """A tiny app that streams `sim`'s tokens in a chosen format, as they are produced.

    GET /payload/stream?kind=json&per_event=4&max_tokens=64&token_ms=10
    Each event leaves as soon as its last token is produced (ttft_ms=0).
    """

    async def stream(request: Request) -> Response:
        query = request.query_params
        parameters = {"per_event": (int, "1"), "max_tokens": (int, "64"), "token_ms": (float, "10")}
        values: dict[str, float] = {}
        for name, (convert, default) in parameters.items():
            try:
                values[name] = convert(query.get(name, default))
            except ValueError as error:
                return _invalid(name, str(error))
        try:
            wire_format = WireFormat(query.get("kind", "json"), int(values["per_event"]))
        except ValueError as error:
            return _invalid("kind" if "kind" in str(error) else "per_event", str(error))
        generation = GenerationRequest(
            PROMPT, max_tokens=int(values["max_tokens"]), ttft_ms=0, token_ms=values["token_ms"]
        )

        async def events() -> AsyncGenerator[bytes, None]:
            chunk: list[str] = []
            index = 0
            async for token in sim(generation):
                chunk.append(token)
                if len(chunk) == wire_format.per_event:
                    yield wire_format.encode(chunk, index)
                    index += len(chunk)
                    chunk = []
            if chunk:
                yield wire_format.encode(chunk, index)

        return EventStreamResponse(events())

    return Starlette(routes=[Route(STREAM_PATH, stream)])


@dataclass(frozen=True)
class Smoothness:
    """When the client saw the text change, for one coalescing factor, over a real socket.

    The gap is the time between two consecutive events: between two visible
    updates of the text. Every token of an event arrives at the same instant, so
    with `per_event` = k the reader sees k tokens at once every k x token_ms
    (`expected_gap_ms`) instead of one every token_ms; the mean rate of tokens is
    the same. Gaps are in milliseconds, p90 is their 90th percentile; offsets are
    in seconds after the request was sent.
    """

    per_event: int
    token_ms: float
    tokens: int
    event_offsets_s: tuple[float, ...]
    tokens_per_event: tuple[int, ...]
    gaps_ms: tuple[float, ...]
    median_gap_ms: float
    p90_gap_ms: float
    expected_gap_ms: float

    @property
    def token_offsets_s(self) -> list[float]:
        """Each token's arrival: the arrival of the event that carried it."""
        return [at for at, count in zip(self.event_offsets_s, self.tokens_per_event, strict=True) for _ in range(count)]


def measure_smoothness(base_url: str, per_event: int, *, tokens: int = 64, token_ms: float = 10.0) -> Smoothness:
    """Stream `tokens` tokens coalesced `per_event` at a time from `create_payload_app` at `base_url`.

    The json format is used because its events say how many tokens they carry; the
    format does not change the timing. Raises if the tokens received are not the ones produced.
    """
    if tokens <= per_event:
        raise ValueError(f"{tokens} tokens at {per_event} per event make a single event: no gap to measure")
    wire_format = WireFormat("json", per_event)
    params: dict[str, str | float] = {"kind": "json", "per_event": per_event}
    params.update(max_tokens=tokens, token_ms=token_ms)
    offsets, counts, received = [], [], []
    decoder = Decoder()
    with httpx.Client(trust_env=False) as client:
        started = time.perf_counter()
        with client.stream("GET", base_url + STREAM_PATH, params=params) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                arrived = time.perf_counter() - started
                for event in decoder.feed(chunk):
                    offsets.append(arrived)
                    carried = wire_format.decode(event)
                    counts.append(len(carried))
                    received += carried
    if received != sim_tokens(PROMPT, tokens):
        raise RuntimeError(f"received {len(received)} tokens that differ from the {tokens} produced")
    gaps = [1000 * (later - earlier) for earlier, later in pairwise(offsets)]
    return Smoothness(
        per_event=per_event,
        token_ms=token_ms,
        tokens=tokens,
        event_offsets_s=tuple(offsets),
        tokens_per_event=tuple(counts),
        gaps_ms=tuple(gaps),
        median_gap_ms=statistics.median(gaps),
        p90_gap_ms=statistics.quantiles(gaps, n=10, method="inclusive")[-1] if len(gaps) > 1 else gaps[0],
        expected_gap_ms=per_event * token_ms,
    )


def coalescing_smoothness(
    per_event: Sequence[int] = (1, 4, 16),
    *,
    tokens: int = 64,
    token_ms: float = 10.0,
    progress: bool = True,
) -> list[Smoothness]:
    """Measure `measure_smoothness` for each coalescing factor on a fresh in-kernel server (about 2.5 s by default)."""
    with serve_in_background(create_payload_app()) as server:
        return [
            measure_smoothness(server.url, k, tokens=tokens, token_ms=token_ms)
            for k in tqdm(per_event, desc="coalescing", disable=not progress)
        ]


SERIALIZERS: Mapping[str, Callable[[object], bytes]] = {
    "json": lambda payload: _json(payload).encode(),  # the standard library, as the server calls it
    "orjson": orjson.dumps,
    "msgspec": msgspec.json.Encoder().encode,  # one encoder reused, as msgspec recommends
}
"""Each serializer, by name: the payload of a token event to the bytes of its `data` line."""


@dataclass(frozen=True)
class SerializerCost:
    """What one serializer costs per token event.

    cpu_us_per_event: CPU time (time.process_time) to serialize every event's
    payload, best of the repeats, divided by the events, in microseconds.
    times_faster_than_json: json's cpu_us_per_event / this one's.
    """

    serializer: str
    events: int
    cpu_us_per_event: float
    times_faster_than_json: float


def _serialize_cpu_s(serialize: Callable[[object], bytes], payloads: Sequence[object], repeats: int) -> float:
    """The least CPU time of `repeats` passes over every payload: the pass least disturbed by the machine."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for payload in payloads:
            serialize(payload)
        best = min(best, time.process_time() - started)
    return best


def serializer_cost(tokens: Sequence[str] | None = None, *, repeats: int = 5) -> list[SerializerCost]:
    """CPU per token event of each of `SERIALIZERS`, for `tokens` (default: 20,000 of `sim`'s).

    Raises if two serializers write different bytes for the same payload.
    """
    if tokens is None:
        tokens = sim_tokens(PROMPT, 20_000)
    if not tokens:
        raise ValueError("no tokens to measure")
    payloads = [{"token": token, "index": index} for index, token in enumerate(tokens)]
    for name, serialize in SERIALIZERS.items():
        if (differs := next((p for p in payloads if serialize(p) != SERIALIZERS["json"](p)), None)) is not None:
            raise RuntimeError(
                f"{name} writes {serialize(differs)!r} where json writes {SERIALIZERS['json'](differs)!r}"
            )
    cpu_us = {
        name: 1e6 * _serialize_cpu_s(serialize, payloads, repeats) / len(payloads)
        for name, serialize in SERIALIZERS.items()
    }
    return [SerializerCost(name, len(payloads), us, cpu_us["json"] / us) for name, us in cpu_us.items()]


@dataclass(frozen=True)
class ServerCpu:
    """The chat server's CPU time per token event: `cpu_s` over a streamed reply of `tokens` tokens, per token.

    Measured in a server process of its own (`memory.server_process`), from its
    /proc/PID/stat (user and system time, every thread), around one reply streamed
    at ttft_ms=0 and `MEASURING_TOKEN_MS` and read by this process: the server's
    work alone, the client's not included.
    """

    tokens: int
    cpu_s: float
    us_per_event: float


def server_cpu_per_event(tokens: int = 20_000) -> ServerCpu:
    """Measure `ServerCpu` for one streamed reply of `tokens` tokens at `MEASURING_TOKEN_MS` (2 s at the default).

    At about 15 µs per event, 20,000 events are some 30 clock ticks of CPU: a tick's resolution is about 3 %.

    Raises memory.MemoryMeasurementUnavailable on a system without Linux's /proc.
    """
    if not Path("/proc/self/stat").exists():
        raise memory.MemoryMeasurementUnavailable("measuring the server's CPU needs Linux's /proc/PID/stat")
    with memory.server_process(tokens) as server, httpx.Client(trust_env=False, timeout=600) as client:
        memory.read_reply(client, server.url + STREAM_PATH_CHAT, memory.WARM_UP_TOKENS)
        before = server.cpu_seconds()
        memory.read_reply(client, server.url + STREAM_PATH_CHAT, tokens, MEASURING_TOKEN_MS)
        cpu_s = server.cpu_seconds() - before
    return ServerCpu(tokens, cpu_s, 1e6 * cpu_s / tokens)


def serialization_table(costs: Sequence[SerializerCost], server: ServerCpu) -> str:
    """Per serializer: µs per token event, times faster than json, and share of the server's CPU per event."""
    lines = [f"{'serializer':>10} {'CPU µs/event':>13} {'x json':>7} {'share of the server':>20}"]
    for cost in costs:
        share = cost.cpu_us_per_event / server.us_per_event
        lines.append(
            f"{cost.serializer:>10} {cost.cpu_us_per_event:>13.2f} {cost.times_faster_than_json:>7.1f} {share:>20.1%}"
        )
    lines.append(f"{'server':>10} {server.us_per_event:>13.2f}  (the whole server, per token event)")
    return "\n".join(lines)
