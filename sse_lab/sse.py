"""The Server-Sent Events wire format (WHATWG HTML, "Server-sent events"): both ends.

An event is a block of `field: value` lines closed by a blank line:

    event: token
    id: 3
    data: {"token": " world", "index": 3}
    <blank line>

A parser splits lines on CR, LF and CRLF alike and joins the `data` lines of one
event with LF. So a payload's line breaks survive as separate `data` lines, but a
CR arrives as LF: text whose exact line ends matter must be escaped first (the
server sends JSON, which escapes them). Values that a parser would cut or drop
(a line break in an event name or id, NUL in an id) are refused here rather than
sent broken.

The sending side is `encode_event` and `encode_comment`. The receiving side is
`Decoder`, which follows the standard's "Parsing an event stream" and
"Interpreting an event stream" to the letter, and `decode` for a whole body. The
decoder is incremental because a client feeds it every socket read as it comes,
and reads split the stream anywhere: inside a line, inside a UTF-8 character,
between the CR and the LF of one line end. Where a popular parser departs from
the standard, sse_lab/instruments/sse_vectors.json records how (httpx-sse, for one,
dispatches blocks that carry no data and accepts `retry: -1`).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from decimal import Decimal

MEDIA_TYPE = "text/event-stream"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _lines(field: str, value: str) -> list[str]:
    # One space after the colon, always: a parser strips exactly one, so a value
    # that itself starts with a space keeps it.
    return [f"{field}: {line}\n" for line in _LINE_BREAK.split(value)]


def _single_line(field: str, value: str, forbidden: str) -> str:
    for char in forbidden:
        if char in value:
            raise ValueError(f"SSE {field} must not contain {char!r}: {value!r}")
    return f"{field}: {value}\n"


def encode_event(
    data: str,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one event as UTF-8 bytes, ready to write to the socket.

    `event` names the type (a browser dispatches it to listeners of that name;
    without one it is "message"), `id` becomes the stream's last event id (what a
    reconnecting client sends back as Last-Event-ID), `retry` tells the client how
    many milliseconds to wait before reconnecting.

    >>> encode_event("two\\nlines", event="token", id="7")
    b'event: token\\nid: 7\\ndata: two\\ndata: lines\\n\\n'
    """
    lines = []
    if event is not None:
        lines.append(_single_line("event", event, "\r\n"))
    if id is not None:
        lines.append(_single_line("id", id, "\r\n\0"))
    if retry is not None:
        if type(retry) is not int or retry < 0:
            raise ValueError(f"SSE retry must be a non-negative int of milliseconds: {retry!r}")
        lines.append(f"retry: {retry}\n")
    lines += _lines("data", data)
    return ("".join(lines) + "\n").encode()


def encode_comment(text: str = "") -> bytes:
    """Encode a comment: lines a parser skips, used as heartbeats or annotations.

    No blank line follows it, so it can never close an event of its own.

    >>> encode_comment("keep-alive")
    b': keep-alive\\n'
    """
    return "".join(f": {line}\n" for line in _LINE_BREAK.split(text)).encode()


@dataclass(frozen=True)
class Event:
    """One dispatched event."""

    data: str
    event: str = "message"  # the type: the block's `event` field, "message" without one
    id: str = ""  # the stream's last event ID when this event was dispatched: it persists across events
    retry: int | None = None  # the reconnection time (ms) a `retry` field of this event's block set, else None


# The three line ends, CRLF first so that it counts as one. A CR that ends a chunk
# matches alone; an LF opening the next chunk is then the rest of that line end.
_LINE_END = re.compile(r"\r\n?|\n")


class Decoder:
    """An incremental event-stream parser, exact to the WHATWG standard.

    Feed it the body's bytes as they arrive, in chunks of any size, and it returns
    each event as soon as its closing blank line is complete. The state a
    reconnecting client needs (the last event ID, the reconnection time) is kept
    across events.

    >>> decoder = Decoder()
    >>> decoder.feed(b"id: 1\\ndata: hel")
    []
    >>> decoder.in_event
    True
    >>> decoder.feed(b"lo\\n\\n")
    [Event(data='hello', event='message', id='1', retry=None)]
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._utf8_held = False  # the incremental decoder holds the first bytes of a character
        self._at_start = True  # no character decoded yet: a U+FEFF now is the byte order mark
        self._after_cr = False  # the last line ended with a CR, so an LF next is part of that line end
        self._partial: list[str] = []  # the line not ended yet, in pieces, so a long line is joined once
        self._closed = False
        self._fields_seen = False  # a field line arrived since the last blank line
        # The standard's buffers. The data buffer is kept as its lines: it is empty
        # exactly when no `data` field came, and "\n".join() is the buffer with its
        # last LF removed.
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer = ""
        self._last_event_id = ""
        self._block_retry: int | None = None
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str:
        """The stream's last event ID so far: an `id` field counts once its block is dispatched."""
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The latest reconnection time (ms) the stream set, None if it never did."""
        return self._retry

    @property
    def in_event(self) -> bool:
        """Whether bytes of an event not yet dispatched have arrived.

        True once a field line has begun since the last blank line, so a client
        can timestamp an event's first byte. Comments and `retry` lines do not
        count: they carry nothing of the event (a server may send `retry` long
        before its first event). Counts decoded characters: a line that begins
        with a multi-byte character counts once that character is complete.
        """
        return self._fields_seen or (bool(self._partial) and not _outside_events(self._line_start()))

    def _line_start(self) -> str:
        """The first characters of the line not ended yet: enough to tell a comment or a retry line."""
        start = ""
        for piece in self._partial:
            start += piece
            if len(start) >= len("retry:"):
                break
        return start

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse the next bytes of the stream; return the events they complete, in order."""
        if self._closed:
            raise ValueError("feed() on a closed SSE decoder")
        if not self._utf8_held:
            try:  # the common case, whole characters only: one call in C, and the same text the decoder would give
                return self._parse(str(chunk, "utf-8"))  # any bytes-like object, as the incremental decoder takes
            except UnicodeDecodeError:
                pass
        text = self._utf8.decode(chunk)
        self._utf8_held = bool(self._utf8.getstate()[0])  # bytes of a character cut by the read wait for the next
        return self._parse(text)

    def close(self) -> list[Event]:
        """End the stream. An event without its closing blank line is discarded, as the standard says.

        So this returns [] (kept for symmetry with `feed`). A character cut short by
        the end is flushed as U+FFFD, into the discarded line. Later feeds raise.
        """
        if self._closed:
            return []
        events = self._parse(self._utf8.decode(b"", final=True))
        self._closed = True
        self._partial.clear()
        self._fields_seen = False
        return events

    def _parse(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            if text[0] == "\ufeff":
                text = text[1:]
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        self._after_cr = text.endswith("\r")
        # The lines, and last the line not ended yet ("" when the text ends with a line end). str.split in C
        # when no CR is in sight, as in every stream the kit sends.
        lines = _LINE_END.split(text) if "\r" in text else text.split("\n")
        unended = lines.pop()
        if self._partial:
            if not lines:  # the common case when fed a few bytes at a time
                if unended:
                    self._partial.append(unended)
                return []
            self._partial.append(lines[0])
            lines[0] = "".join(self._partial)
            self._partial.clear()
        if unended:
            self._partial.append(unended)
        events = []
        for line in lines:
            if not line:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
            elif line[0] != ":":  # not a comment
                self._interpret(line)
        return events

    def _interpret(self, line: str) -> None:
        name, _, value = line.partition(":")  # no colon: the whole line is the name, the value is empty
        self._fields_seen = self._fields_seen or name != "retry"
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            # Decimal, because int() refuses more than 4,300 digits and a stream must not crash its client.
            self._retry = self._block_retry = int(Decimal(value))

    def _dispatch(self) -> Event | None:
        self._fields_seen = False
        self._last_event_id = self._id_buffer
        retry, self._block_retry = self._block_retry, None
        data, self._data = self._data, []
        event_type, self._event_type = self._event_type, ""
        if not data:
            return None
        return Event("\n".join(data), event_type or "message", self._last_event_id, retry)


def _outside_events(line_start: str) -> bool:
    """Whether a line that begins so carries nothing of an event: a comment, or (perhaps) a retry field."""
    return line_start.startswith((":", "retry:")) or "retry:".startswith(line_start)


def decode(raw: bytes) -> list[Event]:
    """Parse a whole event stream, such as a response body read to its end.

    >>> decode(b"event: token\\nid: 7\\ndata: two\\ndata: lines\\n\\n: a comment\\ndata: unfinished")
    [Event(data='two\\nlines', event='token', id='7', retry=None)]
    """
    decoder = Decoder()
    return decoder.feed(raw) + decoder.close()
