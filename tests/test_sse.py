from __future__ import annotations

import codecs
import re

import pytest
from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import given
from hypothesis import strategies as st

from sse_lab.sse import encode_comment, encode_event


def parse(raw: bytes, chunk_size: int = 0) -> list[ServerSentEvent]:
    """Parse a byte stream with httpx-sse's decoders, fed `chunk_size` bytes at a time (0: all at once)."""
    chunk_size = chunk_size or max(len(raw), 1)
    text = codecs.getincrementaldecoder("utf-8")()
    lines, decoder = SSELineDecoder(), SSEDecoder()
    parsed = []
    for start in range(0, len(raw), chunk_size):
        for line in lines.decode(text.decode(raw[start : start + chunk_size])):
            if (event := decoder.decode(line)) is not None:
                parsed.append(event)
    return parsed


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
def test_any_event_round_trips_through_a_parser(
    data: str, event: str | None, event_id: str | None, retry: int | None, chunk_size: int
) -> None:
    try:
        raw = encode_event(data, event=event, id=event_id, retry=retry)
    except UnicodeEncodeError:  # a lone surrogate is no text that UTF-8 can carry
        return
    (parsed,) = parse(raw, chunk_size)
    assert parsed.data == as_parsed(data)
    assert parsed.event == (event or "message")
    assert parsed.id == (event_id or "")
    assert parsed.retry == retry


@given(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",))), max_size=5))
def test_consecutive_events_stay_apart(payloads: list[str]) -> None:
    raw = b"".join(encode_event(payload) for payload in payloads)
    assert [event.data for event in parse(raw, chunk_size=3)] == [as_parsed(payload) for payload in payloads]
