from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import matplotlib
import pytest

from sse_lab import BackgroundServer, serve_in_background

matplotlib.use("Agg")

# Prompts that break naive framing or encoding: every one must survive the trip.
NASTY_PROMPTS = ["", " ", "line\nbreak", "cr\ronly", "crlf\r\n", "a: b", "  lead", "nul\0byte", "é 🌊 日本", "\n\n\n"]


@pytest.fixture(scope="session")
def server() -> Iterator[BackgroundServer]:
    """The default app on a real loopback socket, shared by the tests that only read."""
    with serve_in_background() as running:
        yield running


def wait_for(condition: Callable[[], object], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll `condition` until it is true; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)
