"""The raw bytes of an HTTP response, read by read, as they came off the socket.

`capture` sends a GET over a plain socket (no HTTP library in between) and notes
every `recv()` with its arrival time, until the server closes the connection or
a deadline passes. `show_wire` prints the reads with their escapes visible:

    client                                  server (uvicorn)
    ──────                                  ────────────────
    GET /api/chat/stream?... HTTP/1.1 ────▶
    +   0.9 ms ◀── HTTP/1.1 200 OK\\r\\n ... \\r\\n\\r\\n     status line, headers
    +   1.0 ms ◀── c\\r\\nretry: 1500\\n\\r\\n                 one chunk per write:
    +  51.2 ms ◀── c\\r\\n: heartbeat\\n\\r\\n                 size in hex, CRLF,
    + 151.3 ms ◀── 32\\r\\nevent: token\\nid: 0\\n...\\r\\n    the bytes, CRLF
    + 192.0 ms ◀── 0\\r\\n\\r\\n                              the end of the body

uvicorn sends a stream with `Transfer-Encoding: chunked`, so the body on the
wire is framed: `WireCapture.body_wire` keeps the framing, `WireCapture.body`
and `WireCapture.body_reads` have it undone. Only loopback hosts are accepted:
this is a microscope for the kit's own server, not a general HTTP client.

    >>> from sse_lab import serve_in_background
    >>> with serve_in_background() as server:
    ...     wire = capture_chat(server.url, "hi", max_tokens=2, ttft_ms=0, token_ms=0)
    >>> wire.status_line, wire.closed, wire.complete
    ('HTTP/1.1 200 OK', True, True)
    >>> wire.body_wire.startswith(b"c\\r\\nretry: 3000\\n\\r\\n")
    True
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlencode, urlsplit

from ..sse import MEDIA_TYPE, Decoder, Event

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_DEADLINE_S = 10.0
READ_SIZE = 65_536

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")


class Read(NamedTuple):
    """One `recv()`: when it returned (seconds after the request was sent) and the bytes it got."""

    at: float
    data: bytes


@dataclass(frozen=True)
class WireCapture:
    """A response as the socket delivered it.

    url: what was asked. request: the bytes sent. started_at: `time.perf_counter()`
    just before they were sent; every `Read.at` counts from it. reads: every
    `recv()` that returned bytes, in order. closed: True when the server closed
    the connection, False when the deadline passed first.
    """

    url: str
    request: bytes
    started_at: float
    reads: list[Read]
    closed: bool
    _body: _Body = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_body", _Body.of(self.reads))

    @property
    def raw(self) -> bytes:
        """Every byte received, framing and all."""
        return b"".join(read.data for read in self.reads)

    @property
    def head(self) -> bytes:
        """The status line and the headers, up to and including the blank line (b"" if it never came)."""
        return self._body.head

    @property
    def status_line(self) -> str:
        """The response's first line, like 'HTTP/1.1 200 OK' ("" if it never came)."""
        return self.head.decode("latin-1").split("\r\n", 1)[0]

    @property
    def status(self) -> int:
        """The status code (0 if no status line came)."""
        parts = self.status_line.split(" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    @property
    def headers(self) -> dict[str, str]:
        """The response headers, names in lower case; a repeated header's values are joined with ', '."""
        headers: dict[str, str] = {}
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                name, value = name.strip().lower(), value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return headers

    @property
    def chunked(self) -> bool:
        """Whether the body is sent with `Transfer-Encoding: chunked`."""
        return self._body.chunked

    @property
    def body_wire(self) -> bytes:
        """The body as it crossed the wire: with the chunk framing, if any (b"" until the head is complete)."""
        return self.raw[len(self.head) :] if self.head else b""

    @property
    def body(self) -> bytes:
        """The body with the chunk framing undone: what an HTTP library hands over."""
        return b"".join(read.data for read in self.body_reads)

    @property
    def body_reads(self) -> list[Read]:
        """One per read, at the same times: the body bytes each read carried, framing undone (b"" if none)."""
        return self._body.reads

    @property
    def chunks(self) -> list[bytes]:
        """The payload of every complete chunk, in order (empty unless the body is chunked)."""
        return self._body.chunks

    @property
    def complete(self) -> bool:
        """Whether the body ended as HTTP says it ends: its last chunk, its Content-Length, or the close."""
        return self._body.complete or (self.closed and bool(self.head) and not self._body.framed)

    def events_per_read(self) -> list[list[Event]]:
        """One list per read, aligned with `reads`: the events of an SSE body that the read completed."""
        decoder = Decoder()
        return [decoder.feed(read.data) for read in self.body_reads]


@dataclass(frozen=True)
class _Body:
    """What the reads hold once the head is split off and the body's framing is undone."""

    head: bytes
    reads: list[Read]
    chunks: list[bytes]
    chunked: bool
    framed: bool  # the body's end is marked (chunked, or a Content-Length), not just the connection's close
    complete: bool

    @classmethod
    def of(cls, reads: Sequence[Read]) -> _Body:
        raw = b"".join(read.data for read in reads)
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return cls(b"", [Read(read.at, b"") for read in reads], [], False, False, False)
        head = raw[: end + 4]
        fields = [line.partition(b":") for line in head.split(b"\r\n")[1:]]
        values = {name.strip().lower(): value.strip() for name, _, value in fields}
        chunked = values.get(b"transfer-encoding", b"").lower() == b"chunked"
        declared = values.get(b"content-length", b"")
        length = int(declared) if declared.isdigit() and not chunked else None
        dechunker = _Dechunker() if chunked else None
        body_reads = []
        consumed = 0  # bytes of the body that arrived so far, framing included
        offset = 0
        for read in reads:
            start = max(len(head) - offset, 0)  # a read may carry the end of the head and the start of the body
            offset += len(read.data)
            piece = read.data[start:]
            if dechunker is not None:
                data = dechunker.feed(piece)
            elif length is not None:
                data = piece[: max(length - consumed, 0)]
            else:
                data = piece
            consumed += len(piece)
            body_reads.append(Read(read.at, data))
        if dechunker is not None:
            return cls(head, body_reads, dechunker.chunks, True, True, dechunker.done)
        if length is not None:
            return cls(head, body_reads, [], False, True, consumed >= length)
        return cls(head, body_reads, [], False, False, False)


class _Dechunker:
    """Undo HTTP/1.1 chunked transfer-encoding incrementally; bytes of a chunk come out as they arrive."""

    def __init__(self) -> None:
        self._buffer = b""
        self._state = "size"  # size line, chunk data, the CRLF after it, trailer lines, done
        self._left = 0  # data bytes still due in the current chunk
        self._current: list[bytes] = []
        self.chunks: list[bytes] = []
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = []
        while self._buffer and not self.done:
            if self._state == "data":
                piece = self._buffer[: self._left]
                self._buffer = self._buffer[len(piece) :]
                self._left -= len(piece)
                out.append(piece)
                self._current.append(piece)
                if not self._left:
                    self.chunks.append(b"".join(self._current))
                    self._current.clear()
                    self._state = "data end"
                continue
            if self._state == "data end":
                if len(self._buffer) < 2:
                    break
                if not self._buffer.startswith(b"\r\n"):
                    raise ValueError(f"malformed chunked body: expected CRLF after a chunk, got {self._buffer[:20]!r}")
                self._buffer = self._buffer[2:]
                self._state = "size"
                continue
            eol = self._buffer.find(b"\r\n")
            if eol < 0:
                break
            line, self._buffer = self._buffer[:eol], self._buffer[eol + 2 :]
            if self._state == "size":
                size = line.split(b";", 1)[0].strip()  # a chunk extension may follow the size
                if not _CHUNK_SIZE.fullmatch(size):
                    raise ValueError(f"malformed chunked body: bad chunk-size line {line[:20]!r}")
                self._left = int(size, 16)
                self._state = "data" if self._left else "trailer"
            elif not line:  # the blank line that ends the trailer
                self.done = True
        return b"".join(out)


def _target(url: str, params: Mapping[str, object] | None) -> tuple[str, int, str, str]:
    """Check the URL; return the host, the port, the Host header and the request target."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only plain http:// URLs can be captured, got {url!r}")
    host = parts.hostname or ""
    if host not in LOOPBACK_HOSTS:
        allowed = ", ".join(sorted(LOOPBACK_HOSTS))
        raise ValueError(f"only loopback hosts can be captured ({allowed}), got {host!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a URL with credentials cannot be captured")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if params:
        target += ("&" if parts.query else "?") + urlencode({name: str(value) for name, value in params.items()})
    if not target.isascii() or any(ord(char) <= 0x20 or ord(char) == 0x7F for char in target):
        raise ValueError(f"the URL must be ASCII without spaces or control characters: {target!r}")
    return host, parts.port or 80, parts.netloc, target


def _request(host_header: str, target: str, headers: Mapping[str, str], body: bytes | None = None) -> bytes:
    lines = [f"{'GET' if body is None else 'POST'} {target} HTTP/1.1", f"Host: {host_header}"]
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name.encode("latin-1", "replace")) or name.lower() in {"host", "connection"}:
            raise ValueError(f"cannot send a header named {name!r}")
        if any(char in value for char in "\r\n\0"):
            raise ValueError(f"a header value must not contain CR, LF or NUL: {name}: {value!r}")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (body or b"")


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """Connect to a loopback address of `host`, and to nothing else."""
    addresses = [
        info
        for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]).is_loopback
    ]
    if not addresses:
        raise ValueError(f"{host!r} does not resolve to a loopback address")
    failure: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(timeout_s, 0.001))
            sock.connect(address)
        except OSError as error:
            sock.close()
            failure = error
        else:
            return sock
    assert failure is not None
    raise failure


def capture(
    url: str,
    *,
    params: Mapping[str, object] | None = None,
    headers: Mapping[str, str] | None = None,
    deadline_s: float = DEFAULT_DEADLINE_S,
    body: bytes | None = None,
) -> WireCapture:
    """GET `url` (plus `params`) over a raw socket and record every read until the close or `deadline_s`.

    The request is written by hand: `GET`, `Host`, the given `headers`, then
    `Connection: close`, so the server ends the connection with the response.
    With a `body`, it is a `POST` of those bytes (give its Content-Type in `headers`).
    Raises ValueError for a host that is not loopback (127.0.0.1, localhost,
    ::1), a URL or header that would make a malformed request, or a chunked
    body whose framing is broken; OSError if the connection cannot be made
    before the deadline.
    """
    host, port, host_header, target = _target(url, params)
    request = _request(host_header, target, headers or {}, body)
    deadline = time.perf_counter() + deadline_s
    reads: list[Read] = []
    closed = False
    with _connect(host, port, deadline - time.perf_counter()) as sock:
        started_at = time.perf_counter()
        sock.sendall(request)
        while (remaining_s := deadline - time.perf_counter()) > 0:
            sock.settimeout(remaining_s)
            try:
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                break
            if not data:
                closed = True
                break
            arrived = time.perf_counter()
            if arrived > deadline:  # returned only after the deadline (the thread waited for a core): not captured
                break
            reads.append(Read(arrived - started_at, data))
    return WireCapture(url, request, started_at, reads, closed)


def capture_chat(
    base_url: str, prompt: str, *, deadline_s: float = DEFAULT_DEADLINE_S, **params: object
) -> WireCapture:
    """Capture `GET /api/chat/stream` of the kit's server, asking for an event stream as a browser does."""
    return capture(
        base_url + "/api/chat/stream",
        params={"prompt": prompt, **params},
        headers={"Accept": MEDIA_TYPE, "Cache-Control": "no-cache"},
        deadline_s=deadline_s,
    )


def _byte_lines(data: bytes) -> list[bytes]:
    """Split after each LF, keeping it, so every wire line is shown on a line of its own."""
    return [line for line in re.split(rb"(?<=\n)", data) if line]


def format_wire(wire: WireCapture, *, limit: int | None = None, events: bool = True) -> str:
    """The request, then each read as `+  12.3 ms  b'...'`, one wire line per printed line.

    `limit` shows only the first reads. With `events`, each read is followed by
    the events it completed (`→ token id=0 data='...'`).
    """
    indent = " " * 12
    lines = ["request, sent at 0 ms:"]
    lines += [f"{indent}{line!r}" for line in _byte_lines(wire.request)]
    end = "the server closed the connection" if wire.closed else "the deadline passed"
    lines.append(f"response, {len(wire.reads)} reads until {end}:")
    completed = dict(enumerate(wire.events_per_read())) if events else {}
    shown = wire.reads if limit is None else wire.reads[:limit]
    for index, read in enumerate(shown):
        for number, line in enumerate(_byte_lines(read.data)):
            stamp = f"+{1000 * read.at:7.1f} ms  " if number == 0 else indent
            lines.append(f"{stamp}{line!r}")
        lines += [f"{indent}→ {describe(event)}" for event in completed.get(index, [])]
    if len(shown) < len(wire.reads):
        rest = wire.reads[len(shown) :]
        lines.append(f"... {len(rest)} more reads, {sum(len(read.data) for read in rest)} bytes")
    return "\n".join(lines)


def show_wire(wire: WireCapture, *, limit: int | None = None, events: bool = True) -> None:
    """Print `format_wire(wire)`: the request, then the response read by read."""
    print(format_wire(wire, limit=limit, events=events))


def describe(event: Event) -> str:
    """One event on one line, leaving out what is at its default: `token id=0 data='...'`.

    >>> describe(Event("a\\nb", event="token", id="3"))
    "token id=3 data='a\\\\nb'"
    >>> describe(Event("x", retry=500))
    "message retry=500 data='x'"
    """
    parts = [event.event]
    if event.id:
        parts.append(f"id={event.id}")
    if event.retry is not None:
        parts.append(f"retry={event.retry}")
    parts.append(f"data={event.data!r}")
    return " ".join(parts)
