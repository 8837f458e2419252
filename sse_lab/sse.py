"""The Server-Sent Events wire format (WHATWG HTML, "Server-sent events").

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
"""

from __future__ import annotations

import re

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
