from __future__ import annotations

from pathlib import Path

import pytest

from sse_lab.conformance import load_vectors, parse_with_decoder, parse_with_httpx_sse, vector_bytes


def test_the_vectors_load_and_both_parsers_run_on_them() -> None:
    vectors = load_vectors()
    assert len(vectors) == 83
    disagreements = [vector for vector in vectors if "httpx_sse" in vector]
    assert len(disagreements) == 14
    for vector in vectors:
        raw = vector_bytes(vector)
        assert parse_with_decoder([raw[i : i + 1] for i in range(len(raw))]) == vector["events"], vector["name"]
        content_type = vector.get("content_type", "text/event-stream")
        assert parse_with_httpx_sse([raw], content_type) == vector.get("httpx_sse", vector["events"]), vector["name"]


def test_a_missing_vectors_file_says_where_the_vectors_come_from(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkout"):
        load_vectors(tmp_path / "nope.json")
