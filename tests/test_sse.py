from __future__ import annotations

import random
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_lab.instruments.conformance import (
    load_vectors,
    parse_with_decoder,
    parse_with_httpx_sse,
    vector_bytes,
    vector_chunks,
)
from sse_lab.sse import MEDIA_TYPE, Decoder, Event, decode, encode_comment, encode_event


def split(raw: bytes, chunk_size: int = 0) -> list[bytes]:
    """`raw` in chunks of `chunk_size` bytes (0: all at once)."""
    chunk_size = chunk_size or max(len(raw), 1)
    return [raw[start : start + chunk_size] for start in range(0, len(raw), chunk_size)]


def parse(raw: bytes, chunk_size: int = 0) -> list[Event]:
    """What httpx-sse, a parser the kit did not write, makes of a stream fed `chunk_size` bytes at a time."""
    return [Event(**parsed) for parsed in parse_with_httpx_sse(split(raw, chunk_size))]


def as_parsed(data: str) -> str:
    """What any SSE parser makes of a payload: every line end becomes LF."""
    return re.sub(r"\r\n|\r", "\n", data)


def test_event_with_every_field_matches_the_spec_layout() -> None:
    raw = encode_event('{"token": "hi"}', event="token", id="3", retry=1500)
    assert raw == b'event: token\nid: 3\nretry: 1500\ndata: {"token": "hi"}\n\n'


def test_each_payload_line_gets_its_own_data_field() -> None:
    assert encode_event("a\nb\r\nc\rd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"


def test_empty_payload_is_still_an_event() -> None:
    assert encode_event("") == b"data: \n\n"
    assert [event.data for event in parse(encode_event(""))] == [""]


def test_leading_space_of_a_value_survives() -> None:
    (event,) = parse(encode_event("  two spaces", event=" spaced"))
    assert (event.data, event.event) == ("  two spaces", " spaced")


def test_payload_is_utf8() -> None:
    assert encode_event("héllo 🌊") == "data: héllo 🌊\n\n".encode()


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb"])
def test_event_name_with_a_line_break_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="event"):
        encode_event("x", event=bad)


@pytest.mark.parametrize("bad", ["1\n2", "1\r2", "1\x002"])
def test_id_with_a_line_break_or_nul_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="id"):
        encode_event("x", id=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "100"])
def test_retry_must_be_a_non_negative_int(bad: object) -> None:
    with pytest.raises(ValueError, match="retry"):
        encode_event("x", retry=bad)  # type: ignore[arg-type]


def test_comment_lines_are_skipped_and_never_close_an_event() -> None:
    assert encode_comment("keep\nalive") == b": keep\n: alive\n"
    stream = encode_comment("hello") + encode_event("1", id="1") + encode_comment() + encode_event("2")
    assert [(event.data, event.id) for event in parse(stream)] == [("1", "1"), ("2", "1")]


single_line = st.text().filter(lambda value: not set(value) & {"\r", "\n"})


@given(
    data=st.text(),
    event=st.one_of(st.none(), single_line),
    event_id=st.one_of(st.none(), single_line.filter(lambda value: "\0" not in value)),
    retry=st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
    chunk_size=st.integers(min_value=0, max_value=7),
)
def test_any_event_round_trips_through_either_parser(
    data: str, event: str | None, event_id: str | None, retry: int | None, chunk_size: int
) -> None:
    try:
        raw = encode_event(data, event=event, id=event_id, retry=retry)
    except UnicodeEncodeError:  # a lone surrogate is no text that UTF-8 can carry
        return
    expected = [Event(as_parsed(data), event or "message", event_id or "", retry)]
    assert parse(raw, chunk_size) == expected
    decoder = Decoder()
    assert [parsed for chunk in split(raw, chunk_size) for parsed in decoder.feed(chunk)] == expected
    assert (decoder.last_event_id, decoder.retry) == (event_id or "", retry)
    assert decode(raw) == expected


@given(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",))), max_size=5))
def test_consecutive_events_stay_apart(payloads: list[str]) -> None:
    raw = b"".join(encode_event(payload) for payload in payloads)
    assert [event.data for event in parse(raw, chunk_size=3)] == [as_parsed(payload) for payload in payloads]


# The decoder against conformance vectors written from the WHATWG text and the
# web-platform-tests eventsource/format-* tests (see each vector's "source").

VECTORS = load_vectors()
by_name = pytest.mark.parametrize("vector", VECTORS, ids=[vector["name"] for vector in VECTORS])


def chunkings(vector: dict[str, Any]) -> dict[str, list[bytes]]:
    """The same stream split in different ways, all of which must parse alike."""
    raw = vector_bytes(vector)
    splits = {"given": vector_chunks(vector), "whole": [raw], "byte by byte": [raw[i : i + 1] for i in range(len(raw))]}
    for seed in range(4):
        rng = random.Random(seed)
        cuts = sorted(rng.choices(range(len(raw) + 1), k=rng.randint(1, 8)))  # repeated cuts give empty chunks
        splits[f"random {seed}"] = [raw[start:end] for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    return splits


def final_state(chunks: list[bytes]) -> dict[str, Any]:
    decoder = Decoder()
    for chunk in chunks:
        decoder.feed(chunk)
    decoder.close()
    return {"last_event_id": decoder.last_event_id, "retry": decoder.retry}


def test_vectors_are_well_formed() -> None:
    assert len(VECTORS) >= 40
    assert len({vector["name"] for vector in VECTORS}) == len(VECTORS)
    for vector in VECTORS:
        assert vector["source"].startswith(("WHATWG: ", "wpt eventsource/")), vector["name"]
        assert len({"raw", "raw_hex", "chunks_hex"} & vector.keys()) == 1, vector["name"]
        # A recorded disagreement is explained, and is a disagreement.
        assert ("httpx_sse" in vector) == ("httpx_sse_note" in vector), vector["name"]
        if "httpx_sse" in vector:
            assert vector["httpx_sse"] != vector["events"], vector["name"]


@by_name
def test_vector_parses_alike_however_the_stream_is_split(vector: dict[str, Any]) -> None:
    for how, chunks in chunkings(vector).items():
        assert (parse_with_decoder(chunks), final_state(chunks)) == (vector["events"], vector["final"]), how


@by_name
def test_httpx_sse_agrees_except_where_the_vector_records_it(vector: dict[str, Any]) -> None:
    expected = vector.get("httpx_sse", vector["events"])
    content_type = vector.get("content_type", MEDIA_TYPE)
    for how, chunks in chunkings(vector).items():
        assert parse_with_httpx_sse(chunks, content_type) == expected, how


@pytest.mark.parametrize(
    ("chunks", "in_event"),
    [
        ([], False),
        ([b":"], False),
        ([b": keep-alive\n"], False),
        ([b"d"], True),
        ([b"\xef\xbb\xbf"], False),  # the byte order mark is not part of an event
        ([b"\xef\xbb\xbfd"], True),
        ([b"data: x\n"], True),
        ([b"data: x\n: comment\n"], True),
        ([b"data: x\n\n"], False),
        ([b"data: x\r\n\r"], False),  # dispatched at the CR already
        ([b"event: x\n\n"], False),  # a blank line ends the block even when nothing is dispatched
        ([b"data: x\n\n", b"i"], True),
        ([b"data: x\n\n", b": c"], False),
        ([b"retry: 5\n"], False),  # a retry line carries nothing of an event
        ([b"ret"], False),  # perhaps a retry line: not yet
        ([b"ret", b"urn"], True),  # not a retry line after all
        ([b"retry: 5\nid: 1\n"], True),
        ([b"\n"], False),
    ],
)
def test_in_event_says_whether_an_undispatched_event_has_begun(chunks: list[bytes], in_event: bool) -> None:
    decoder = Decoder()
    for chunk in chunks:
        decoder.feed(chunk)
    assert decoder.in_event is in_event


def test_events_come_out_as_soon_as_their_blank_line_is_complete() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [Event("a")]  # a CR ends a line at once; the LF that may follow is skipped
    assert decoder.feed(b"\ndata: b\n") == []
    assert decoder.feed(b"\n") == [Event("b")]


def test_close_discards_the_unfinished_event_and_ends_the_stream() -> None:
    decoder = Decoder()
    assert decoder.feed(b"id: 1\ndata: a\n\nid: 2\nretry: 9\ndata: \xe2\x82") == [Event("a", id="1")]
    assert decoder.in_event
    assert decoder.close() == []
    assert (decoder.in_event, decoder.last_event_id, decoder.retry) == (False, "1", 9)
    assert decoder.close() == []
    with pytest.raises(ValueError, match="closed"):
        decoder.feed(b"\n")


def test_a_retry_too_long_for_int_does_not_crash() -> None:
    digits = "7" * 5000  # int() refuses over 4,300 digits
    (event,) = decode(f"retry: {digits}\ndata: x\n\n".encode())
    assert event.retry == 7 * (10**5000 - 1) // 9


def test_long_lines_fed_byte_by_byte_are_joined_once() -> None:
    raw = b"data: " + b"x" * 200_000 + b"\r\n\r\n"
    decoder = Decoder()
    events = [event for i in range(len(raw)) for event in decoder.feed(raw[i : i + 1])]
    assert events == [Event("x" * 200_000)]


def test_a_large_stream_parses_alike_in_socket_sized_reads() -> None:
    raw = b"".join(encode_event(f"token {i} \u00e9\U0001f30a", event="token", id=str(i)) for i in range(20_000))
    decoder = Decoder()
    chunked = [event for i in range(0, len(raw), 4096) for event in decoder.feed(raw[i : i + 4096])]
    assert chunked == decode(raw)
    assert chunked[-1] == Event("token 19999 \u00e9\U0001f30a", event="token", id="19999")


utf8_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)))


@given(comment=utf8_text, data=utf8_text)
def test_comments_decode_to_nothing(comment: str, data: str) -> None:
    decoder = Decoder()
    assert decoder.feed(encode_comment(comment)) == []
    assert not decoder.in_event
    event = encode_event(data)
    assert decode(encode_comment(comment) + event + encode_comment(comment) + b"\n") == decode(event)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_bytes_like_chunk_is_fed_alike(kind: type) -> None:
    stream = "data: caf\u00e9\n\n".encode()
    whole, split = Decoder(), Decoder()  # split: a read ends inside the two bytes of the é
    assert whole.feed(kind(stream)) == split.feed(kind(stream[:10])) + split.feed(kind(stream[10:])) == [Event("café")]
