"""Conformance vectors for event-stream parsers, and the two parsers the kit runs them through.

`sse_vectors.json`, package data beside this module, holds streams written from the WHATWG HTML standard
("Parsing an event stream", "Interpreting an event stream") and the
web-platform-tests `eventsource/format-*` tests: each with the events the
standard says it holds, and, where httpx-sse parses it otherwise, what httpx-sse
gives and why. `sse_lab.sse.Decoder` must match the standard on every one, fed
whole or a byte at a time; notebook 02 shows the disagreements.

    >>> parse_with_decoder([b"retry: 500\\n\\n"])  # the standard: a block without data is no event
    []
    >>> parse_with_httpx_sse([b"retry: 500\\n\\n"])
    [{'event': 'message', 'data': '', 'id': '', 'retry': 500}]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import EventSource

from ..sse import MEDIA_TYPE, Decoder, Event

VECTORS_PATH = Path(__file__).resolve().parent / "sse_vectors.json"


def load_vectors(path: Path = VECTORS_PATH) -> list[dict[str, Any]]:
    """The SSE conformance vectors, as a list of dicts.

    Each holds a stream, the events the standard says it holds (`events`) and,
    where httpx-sse 0.4.3 parses it otherwise, what httpx-sse gives (`httpx_sse`)
    and why (`httpx_sse_note`). They ship inside the package, so a wheel install has them too.
    """
    vectors: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return vectors


def vector_chunks(vector: Mapping[str, Any]) -> list[bytes]:
    """A vector's stream in the chunks it spells (`chunks_hex`), else in one chunk (`raw_hex` or `raw`)."""
    if "chunks_hex" in vector:
        return [bytes.fromhex(chunk) for chunk in vector["chunks_hex"]]
    if "raw_hex" in vector:
        return [bytes.fromhex(vector["raw_hex"])]
    return [str(vector["raw"]).encode()]


def vector_bytes(vector: Mapping[str, Any]) -> bytes:
    """A vector's stream as bytes, however the vector spells it."""
    return b"".join(vector_chunks(vector))


def _as_dict(event: Event) -> dict[str, Any]:
    return {"event": event.event, "data": event.data, "id": event.id, "retry": event.retry}


def parse_with_decoder(chunks: Iterable[bytes]) -> list[dict[str, Any]]:
    """The events `sse_lab.sse.Decoder` makes of a stream fed in these chunks, as the vectors spell them."""
    decoder = Decoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)] + decoder.close()
    return [_as_dict(event) for event in events]


def parse_with_httpx_sse(chunks: Iterable[bytes], content_type: str = MEDIA_TYPE) -> list[dict[str, Any]]:
    """The events httpx-sse makes of a stream fed in these chunks: httpx decodes, `EventSource` parses."""
    response = httpx.Response(200, headers={"content-type": content_type}, content=iter(list(chunks)))
    return [
        {"event": sse.event, "data": sse.data, "id": sse.id, "retry": sse.retry}
        for sse in EventSource(response).iter_sse()
    ]
