from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from functools import partial

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sse_lab import BackgroundServer, ChatResult, GenerationRequest, create_app, encode_event, serve_in_background
from sse_lab.experiments.buffering import (
    COMPRESSION_VARIANTS,
    WHOLE_BODY,
    Gzip,
    WriteBuffer,
    client_reads,
    compression,
    write_buffering,
)
from tests.conftest import wait_for

# On the wire: tokens 10 ms apart after a 50 ms prefill, 20 of them (~1.1 KB of events).
WIRE = {"tokens": 20, "ttft_ms": 50, "token_ms": 10}
TOGETHER_S = 0.004  # arrivals closer than this came in one read; tokens are made 10 ms apart


def lumps(result: ChatResult) -> list[int]:
    """How many tokens arrived together, lump after lump."""
    sizes: list[int] = []
    for index, gap in enumerate([TOGETHER_S, *result.itl]):
        if index and gap < TOGETHER_S:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def spread_out(result: ChatResult) -> bool:
    """Tokens arrived in many reads, as they were made (a stalled, busy machine pairs some up)."""
    return len(lumps(result)) >= result.tokens / 3


# --- the wrappers on plain ASGI messages --------------------------------------------------------


Wrap = Callable[[ASGIApp], ASGIApp]


def body(data: bytes, *, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream"), (b"content-length", b"99"), (b"vary", b"Origin")],
}


def replay(messages: list[Message]) -> ASGIApp:
    """An app that sends `messages`, whatever the request."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for message in messages:
            await send(message)

    return app


def sent_through(wrap: Wrap, messages: list[Message], accept_encoding: bytes = b"gzip") -> list[Message]:
    """What `wrap(replay(messages))` sends on to the server."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "headers": [(b"accept-encoding", accept_encoding)]}
    asyncio.run(wrap(replay(messages))(scope, receive, send))
    return sent


def bodies(sent: list[Message]) -> list[tuple[bytes, bool]]:
    return [
        (message["body"], message.get("more_body", False))
        for message in sent
        if message["type"] == "http.response.body"
    ]


def test_write_buffer_sends_once_it_holds_size_bytes_and_the_rest_at_the_end() -> None:
    sent = sent_through(partial(WriteBuffer, size=10), [START, *[body(b"abcd")] * 5, body(b"", more=False)])
    assert sent[0] is START  # the headers are not held
    assert bodies(sent) == [(b"abcd" * 3, True), (b"abcd" * 2, False)]


def test_write_buffer_of_size_0_passes_every_message_through() -> None:
    messages = [START, body(b"a"), body(b""), body(b"bc", more=False)]
    assert sent_through(partial(WriteBuffer, size=0), messages) == messages


def test_write_buffer_until_the_end_sends_one_body() -> None:
    sent = sent_through(partial(WriteBuffer, size=None), [START, body(b"a"), body(b"b"), body(b"c", more=False)])
    assert bodies(sent) == [(b"abc", False)]


def test_write_buffer_sends_a_whole_response_at_once() -> None:
    whole = {"type": "http.response.body", "body": b"{}"}  # more_body left out: the only message
    assert bodies(sent_through(partial(WriteBuffer, size=4096), [START, whole])) == [(b"{}", False)]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(max_size=40), max_size=12),
    st.one_of(st.none(), st.integers(min_value=0, max_value=100)),
)
def test_write_buffer_keeps_every_byte_and_never_sends_less_than_size(chunks: list[bytes], size: int | None) -> None:
    messages = [START, *[body(chunk) for chunk in chunks], body(b"", more=False)]
    sent = bodies(sent_through(partial(WriteBuffer, size=size), messages))
    assert b"".join(data for data, _ in sent) == b"".join(chunks)
    assert [more for _, more in sent] == [True] * (len(sent) - 1) + [False]
    assert all(len(data) >= (size or 0) for data, more in sent if more)
    assert size is not None or len(sent) == 1


def test_write_buffer_refuses_a_negative_size() -> None:
    with pytest.raises(ValueError, match="size"):
        WriteBuffer(create_app(), -1)


def test_wrappers_hand_the_app_the_same_receive_and_leave_other_scopes_alone() -> None:
    seen: list[tuple[str, Receive]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["type"], receive))

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    for wrapper in (WriteBuffer(app, None), Gzip(app, sync_flush=False)):
        for scope_type in ("http", "lifespan"):
            asyncio.run(wrapper({"type": scope_type, "headers": [(b"accept-encoding", b"gzip")]}, receive, send))
    assert seen == [(scope_type, receive) for scope_type in ("http", "lifespan")] * 2


EVENTS = [
    encode_event(f'{{"token":" word{index}","index":{index}}}', event="token", id=str(index)) for index in range(40)
]
STREAM = [START, *[body(event) for event in EVENTS], body(b"", more=False)]


def test_gzip_sets_the_headers_of_an_encoded_body() -> None:
    start = sent_through(partial(Gzip, sync_flush=True), STREAM)[0]
    headers = dict(start["headers"])
    assert headers[b"content-encoding"] == b"gzip"
    assert headers[b"vary"] == b"Origin, Accept-Encoding"
    assert b"content-length" not in headers
    assert dict(START["headers"])[b"content-length"] == b"99"  # the app's own message is not touched


def test_gzip_with_sync_flush_sends_each_event_decodable_at_once() -> None:
    decoder = zlib.decompressobj(wbits=31)
    decoded = [decoder.decompress(data) for data, _ in bodies(sent_through(partial(Gzip, sync_flush=True), STREAM))]
    assert decoded == [*EVENTS, b""]


def test_gzip_without_flush_sends_nothing_decodable_until_the_end() -> None:
    sent = bodies(sent_through(partial(Gzip, sync_flush=False), STREAM))
    (header, _), (rest, more) = sent  # zlib lets out the gzip header, then holds the events
    assert len(header) == 10 and zlib.decompressobj(wbits=31).decompress(header) == b""
    assert not more and zlib.decompress(header + rest, wbits=31) == b"".join(EVENTS)


def test_gzip_sync_flush_costs_bytes() -> None:
    def size(sync_flush: bool) -> int:
        return sum(len(data) for data, _ in bodies(sent_through(partial(Gzip, sync_flush=sync_flush), STREAM)))

    assert size(sync_flush=False) < 0.6 * size(sync_flush=True) < 0.6 * len(b"".join(EVENTS))


@pytest.mark.parametrize("accept_encoding", [b"", b"identity", b"gzip;q=0, deflate", b"br"])
def test_gzip_leaves_a_response_alone_for_a_client_that_does_not_accept_it(accept_encoding: bytes) -> None:
    assert sent_through(partial(Gzip, sync_flush=True), STREAM, accept_encoding) == STREAM


def test_gzip_leaves_an_encoded_response_alone() -> None:
    encoded = {**START, "headers": [(b"content-encoding", b"br")]}
    assert sent_through(partial(Gzip, sync_flush=True), [encoded, *STREAM[1:]]) == [encoded, *STREAM[1:]]


# --- over a real socket ------------------------------------------------------------------------


def made_at(index: int) -> float:
    """When the model produced token `index`, in seconds after the request: no write can carry it earlier."""
    return (WIRE["ttft_ms"] + index * WIRE["token_ms"]) / 1000


def test_write_buffers_hold_tokens_back_by_their_size() -> None:
    runs = write_buffering((0, 1024, None), runs=1, progress=False, **WIRE)
    assert list(runs) == ["no buffer", "1 KiB", "until the end"]
    (direct,), (kib,), (whole,) = runs.values()
    assert direct.tokens == kib.tokens == whole.tokens == WIRE["tokens"]
    assert direct.text == kib.text == whole.text
    assert spread_out(direct)
    # A token event is ~57 bytes: 1 KiB leaves every ~18 tokens, the first token with the next ones.
    assert kib.ttft >= made_at(10)
    assert len(lumps(kib)) <= WIRE["tokens"] / 4
    # Until the end: the first token arrives with the last one.
    assert whole.ttft >= made_at(WIRE["tokens"] - 1)
    assert whole.e2e - whole.ttft < 0.25 * (direct.e2e - direct.ttft)


@pytest.fixture(scope="module")
def compressed() -> dict[str, ChatResult]:
    """One run of every compression variant, with the client asking for gzip."""
    return {label: run for label, (run,) in compression(runs=1, progress=False, **WIRE).items()}


def test_every_compression_variant_delivers_every_token(compressed: dict[str, ChatResult]) -> None:
    assert list(compressed) == list(COMPRESSION_VARIANTS)
    assert {(run.tokens, run.text, run.finish_reason) for run in compressed.values()} == {
        (WIRE["tokens"], compressed["identity"].text, "length")
    }


def test_gzip_without_flush_delivers_every_token_at_the_end(compressed: dict[str, ChatResult]) -> None:
    identity, held = compressed["identity"], compressed["gzip, no flush"]
    assert spread_out(identity)
    assert held.ttft >= made_at(WIRE["tokens"] - 1)
    assert held.e2e - held.ttft < 0.25 * (identity.e2e - identity.ttft)


@pytest.mark.parametrize(
    "label", ["gzip, sync flush", "Starlette GZipMiddleware", "Starlette GZipMiddleware, nothing excluded"]
)
def test_variants_that_write_each_event_at_once_keep_tokens_spread(
    compressed: dict[str, ChatResult], label: str
) -> None:
    identity, other = compressed["identity"], compressed[label]
    assert spread_out(other)
    assert other.e2e - other.ttft > 0.5 * (identity.e2e - identity.ttft)


def test_bytes_on_the_wire_per_compression_variant() -> None:
    runs = compression(runs=1, progress=False, tokens=60, ttft_ms=0, token_ms=0)  # sizes do not depend on timing
    sizes = {label: run.wire_bytes for label, (run,) in runs.items()}
    identity = sizes["identity"]
    assert sizes["Starlette GZipMiddleware"] == identity  # text/event-stream is not compressed
    assert sizes["gzip, no flush"] < 0.6 * sizes["gzip, sync flush"]  # a flush per event costs bytes
    assert sizes["gzip, sync flush"] < 0.6 * identity
    assert sizes["Starlette GZipMiddleware, nothing excluded"] < 0.6 * identity


def test_starlette_gzip_headers_say_what_it_did() -> None:
    with serve_in_background(GZipMiddleware(create_app())) as server:
        params = {"prompt": "hi", "max_tokens": 200, "ttft_ms": 0, "token_ms": 0}
        stream = httpx.get(server.url + "/api/chat/stream", params=params, trust_env=False)
        whole = httpx.get(server.url + "/api/chat", params=params, trust_env=False)
    assert "content-encoding" not in stream.headers
    assert "accept-encoding" not in stream.headers.get("vary", "").lower()  # Vary: Origin is CORS's
    assert whole.headers["content-encoding"] == "gzip" and whole.json()["tokens"] == 200


def event_stream_released_by(release: threading.Event) -> ASGIApp:
    """An event stream whose headers are ready at once and whose first event waits for `release`."""

    async def events() -> AsyncIterator[bytes]:
        while not release.is_set():  # the model's prefill
            await asyncio.sleep(0.005)
        yield encode_event("first")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(events(), media_type="text/event-stream")(scope, receive, send)

    return app


@pytest.mark.parametrize(
    ("options", "headers_held"),
    [({}, False), ({"exclude_content_types": ()}, True)],
    ids=["event-stream excluded (default)", "nothing excluded"],
)
def test_starlette_gzip_holds_the_headers_until_the_first_event_only_when_it_compresses(
    options: dict[str, tuple[str, ...]], headers_held: bool
) -> None:
    release = threading.Event()
    prefill_ends = threading.Timer(0.2, release.set)  # what frees held headers; free ones come sooner
    app = GZipMiddleware(event_stream_released_by(release), **options)
    with serve_in_background(app) as server, httpx.Client(trust_env=False) as client:
        prefill_ends.start()
        try:
            with client.stream("GET", server.url) as response:
                headers_before_the_first_event = not release.is_set()
                release.set()
                assert response.read() == encode_event("first")
        finally:
            prefill_ends.cancel()
            release.set()
    assert headers_before_the_first_event is not headers_held
    assert (response.headers.get("content-encoding") == "gzip") is headers_held


class EndlessModel:
    """A model that never stops on its own and notes when it is shut."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def __call__(self, request: GenerationRequest) -> AsyncIterator[str]:
        try:
            while True:
                yield " more"
                await asyncio.sleep(0.005)
        finally:
            self.closed.set()


@pytest.mark.parametrize(
    "wrap", [partial(WriteBuffer, size=None), partial(Gzip, sync_flush=False)], ids=["write buffer", "gzip"]
)
def test_a_client_that_leaves_a_held_stream_stops_generation(wrap: Wrap) -> None:
    endless = EndlessModel()
    with serve_in_background(wrap(create_app(models={"endless": endless}))) as server:
        params = {"prompt": "hi", "model": "endless", "max_tokens": 4096}
        with httpx.stream("GET", server.url + "/api/chat/stream", params=params, trust_env=False) as response:
            assert response.status_code == 200  # headers out; every token held back
        wait_for(endless.closed.is_set, what="the model to be shut")


def test_client_reads_that_wait_for_a_size_hold_tokens_that_have_arrived(server: BackgroundServer) -> None:
    runs = client_reads(
        server.url, (None, 1024, WHOLE_BODY), runs=1, progress=False, max_tokens=40, ttft_ms=0, token_ms=10
    )
    assert list(runs) == ["as bytes come", "reads of 1024 B", "whole body"]
    (direct,), (kib,), (whole,) = runs.values()
    assert direct.text == kib.text == whole.text
    assert len(set(direct.arrivals)) > 30  # tokens one by one
    assert len(set(kib.arrivals)) < 10  # about 18 tokens per 1 KiB read
    assert len(set(whole.arrivals)) == 1 and whole.ttft > 0.3  # everything at the end of a 390 ms stream
