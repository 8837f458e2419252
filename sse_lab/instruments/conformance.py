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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import EventSource

from ..sse import MEDIA_TYPE, Decoder, Event
from .wire import describe

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


# --- the disagreements with httpx-sse, as a table for notebook 02 ----------------------------------------


@dataclass(frozen=True)
class Disagreement:
    """A vector that httpx-sse parses otherwise than the standard: both parsers' events, and why they part."""

    name: str
    stream: bytes
    standard: list[dict[str, Any]]
    httpx_sse: list[dict[str, Any]]
    why: str

    @classmethod
    def of(
        cls, vector: Mapping[str, Any], standard: list[dict[str, Any]], httpx_sse: list[dict[str, Any]]
    ) -> Disagreement:
        return cls(vector["name"], vector_bytes(vector), standard, httpx_sse, vector.get("httpx_sse_note", ""))

    @property
    def difference(self) -> str:
        """What differs, in a few words: the number of events, else each differing field, standard first.

        >>> Disagreement("", b"", [{"data": "x", "retry": None}], [{"data": "x", "retry": 100}], "").difference
        'retry: None vs 100'
        """
        if len(self.standard) != len(self.httpx_sse):
            return f"{_count(self.standard)} vs {_count(self.httpx_sse)}"
        return "; ".join(
            f"{field}: {ours[field]!r} vs {theirs[field]!r}"
            for ours, theirs in zip(self.standard, self.httpx_sse, strict=True)
            for field in ours
            if ours[field] != theirs.get(field)
        )

    def detail(self) -> str:
        """The whole story on five lines: the stream, what each parser makes of it, and why."""
        return "\n".join(
            [
                self.name,
                f"    stream:    {self.stream!r}",
                f"    standard:  {_events(self.standard)}",
                f"    httpx-sse: {_events(self.httpx_sse)}",
                f"    why:       {self.why}",
            ]
        )


def _count(events: Sequence[dict[str, Any]]) -> str:
    return "no event" if not events else "1 event" if len(events) == 1 else f"{len(events)} events"


def _events(events: Sequence[dict[str, Any]]) -> str:
    return " | ".join(describe(Event(**event)) for event in events) or "(no event)"


class DisagreementTable:
    """Disagreements one line each: an HTML table in Jupyter (click a name for its detail), plain text elsewhere.

    `table.show(name)` prints one disagreement in full.
    """

    def __init__(self, disagreements: Sequence[Disagreement]) -> None:
        self.disagreements = list(disagreements)

    def _repr_html_(self) -> str:
        head = "<tr><th>#</th><th>vector (click for its stream, both parsers' events, and why)</th>"
        head += "<th>standard vs httpx-sse</th></tr>"
        rows = [
            f"<tr><td>{number}</td><td style='text-align:left'><details><summary>{escape(item.name)}</summary>"
            f"<pre style='white-space:pre-wrap'>{escape(item.detail())}</pre></details></td>"
            f"<td style='text-align:left;white-space:nowrap'><code>{escape(item.difference)}</code></td></tr>"
            for number, item in enumerate(self.disagreements, 1)
        ]
        return f"<table>{head}{''.join(rows)}</table>"

    def __repr__(self) -> str:
        return "\n".join(
            f"{number:>2}. {item.name}: {item.difference}" for number, item in enumerate(self.disagreements, 1)
        )

    def show(self, name: str) -> None:
        """Print the disagreement whose vector's name starts with `name`."""
        matching = [item for item in self.disagreements if item.name.startswith(name)]
        if not matching:
            raise KeyError(f"no disagreement named {name!r}; names: {[item.name for item in self.disagreements]}")
        print("\n\n".join(item.detail() for item in matching))
