from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sse_lab.instruments.conformance import (
    Disagreement,
    DisagreementTable,
    load_vectors,
    parse_with_decoder,
    parse_with_httpx_sse,
    vector_bytes,
)

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_wheel_ships_the_vectors_and_runs_the_conformance_check(tmp_path: Path) -> None:
    """A non-editable install (the wheel, unpacked away from the checkout) loads the vectors it ships."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("sse_lab-*.whl")
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    check = "from sse_lab.instruments import conformance as c; print(c.VECTORS_PATH, len(c.load_vectors()))"
    env = {**os.environ, "PYTHONPATH": str(installed)}
    printed = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert printed == [str(installed / "sse_lab" / "instruments" / "sse_vectors.json"), "83"]


def test_the_disagreement_table_gives_one_line_each_and_the_detail_a_click_away(
    capsys: pytest.CaptureFixture[str],
) -> None:
    vectors = [vector for vector in load_vectors() if "httpx_sse" in vector]
    table = DisagreementTable([Disagreement.of(vector, vector["events"], vector["httpx_sse"]) for vector in vectors])
    assert len(repr(table).splitlines()) == len(vectors)  # one line each
    html = table._repr_html_()
    assert html.count("<tr>") == len(vectors) + 1 and html.count("<details>") == len(vectors)
    escaped = DisagreementTable([Disagreement("a <b> vector", b"<", [], [], "why & how")])._repr_html_()
    assert "a &lt;b&gt; vector" in escaped and "why &amp; how" in escaped  # names are text, not markup
    table.show("retry: a leading '+'")
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "retry: a leading '+' makes it invalid" and shown[1].startswith("    stream:")
    with pytest.raises(KeyError, match="no disagreement"):
        table.show("no such vector")


def test_a_disagreement_says_what_differs_in_a_few_words() -> None:
    event = {"event": "message", "data": "x", "id": "", "retry": None}
    assert Disagreement("", b"", [event], [{**event, "retry": 100}], "").difference == "retry: None vs 100"
    assert Disagreement("", b"", [], [event], "").difference == "no event vs 1 event"
    assert Disagreement("", b"", [event], [event, event], "").difference == "1 event vs 2 events"
