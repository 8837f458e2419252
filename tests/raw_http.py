"""HTTP/1.1 over a bare socket, for requests no HTTP client would send: malformed, oversized, half-sent."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    """What came back: the status (None: the connection ended without one), headers (names lowercased), body."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    header_names: list[str] = field(default_factory=list)
    body: bytes = b""

    def json(self) -> object:
        return json.loads(self.body)


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def request_bytes(target: str | bytes, method: str = "GET", headers: dict[str, str] | None = None) -> bytes:
    """A whole request head, `Connection: close`, with `target` sent as is (no encoding)."""
    raw_target = target.encode("latin-1") if isinstance(target, str) else target
    lines = [method.encode() + b" " + raw_target + b" HTTP/1.1", b"Host: lab", b"Connection: close"]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def exchange(url: str, data: bytes, timeout_s: float = 5.0, head_only: bool = False) -> RawResponse:
    """Send `data` on a new connection and read the response: to its end, or only its head when `head_only`."""
    with socket.create_connection(address(url), timeout=timeout_s) as sock:
        with contextlib.suppress(OSError):  # refused while sending: the answer may still be readable
            sock.sendall(data)
        return read_response(sock, timeout_s, head_only)


def read_response(sock: socket.socket, timeout_s: float = 5.0, head_only: bool = False) -> RawResponse:
    deadline = time.monotonic() + timeout_s
    received = b""
    while True:
        if head_only and b"\r\n\r\n" in received:
            break
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = _content_length(head)
        if length is not None and len(body) >= length:
            break
    return parse_response(received)


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


def parse_response(received: bytes) -> RawResponse:
    while received.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue): the real one follows
        received = received.partition(b"\r\n\r\n")[2]
    head, separator, body = received.partition(b"\r\n\r\n")
    if not separator:
        return RawResponse(None, body=received)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    response = RawResponse(int(status_line.split()[1]))
    for line in lines:
        name, _, value = line.partition(":")
        response.headers[name.strip().lower()] = value.strip()
        response.header_names.append(name.strip().lower())
    response.body = _dechunk(body) if response.headers.get("transfer-encoding") == "chunked" else body
    return response


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line, 16)
        except ValueError:  # a body cut short
            break
        if size == 0:
            break
        out, body = out + rest[:size], rest[size + 2 :]
    return out
