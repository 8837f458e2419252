from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import matplotlib
import pytest
from hypothesis import HealthCheck, settings

from sse_lab import BackgroundServer, serve_in_background
from sse_lab.parts import chromium as chromium_part
from sse_lab.parts.nginx import SKIP_MESSAGE, ProxyConfig, nginx_or_skip

matplotlib.use("Agg")

T = TypeVar("T")

# Hypothesis's defaults time each example (a 200 ms deadline, a too-slow health check): timing
# assertions with no margin, which fail on a loaded machine running two test workers, not on a bug.
# What the properties check stays the same; timing is asserted where it is the claim, with margins.
settings.register_profile("sse-lab", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sse-lab")

# tests/ and notebooks/ each have a conftest.py and no __init__.py, so both import as the
# module `conftest`: collecting either as a doctest module as well would clash with the other.
collect_ignore = ["conftest.py"]

# Prompts that break naive framing or encoding: every one must survive the trip.
ALL_PROXY_CONFIGS = [ProxyConfig(*flags) for flags in itertools.product([True, False], repeat=3)]
NASTY_PROMPTS = ["", " ", "line\nbreak", "cr\ronly", "crlf\r\n", "a: b", "  lead", "nul\0byte", "é 🌊 日本", "\n\n\n"]


@pytest.fixture(scope="session")
def server() -> Iterator[BackgroundServer]:
    """The default app on a real loopback socket, shared by the tests that only read."""
    with serve_in_background() as running:
        yield running


def wait_for(condition: Callable[[], T], timeout_s: float = 5.0, what: str = "condition") -> T:
    """Poll `condition` until it is true and return what it returned then; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)
    return value


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    """The nginx binary; skips the test without one, unless SSE_LAB_REQUIRE_SYSTEM_PARTS=1 (then it errors)."""
    binary = nginx_or_skip()
    if binary is None:
        pytest.skip(SKIP_MESSAGE)
    return binary


# The fuzz suite (tests/test_fuzz.py) runs about 30 s; --fuzz-long or SSE_LAB_FUZZ_LONG=1 makes it run for minutes.
FUZZ_LONG_ENV = "SSE_LAB_FUZZ_LONG"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-long", action="store_true", help=f"run the fuzz suite for minutes (or {FUZZ_LONG_ENV}=1)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--fuzz-long"):
        os.environ[FUZZ_LONG_ENV] = "1"  # read when tests/test_fuzz.py is imported, after this hook


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """The Chromium binary; skips without it (or Playwright), unless SSE_LAB_REQUIRE_SYSTEM_PARTS=1 (then it errors)."""
    binary = chromium_part.chromium_or_skip()
    if binary is None:
        pytest.skip(chromium_part.SKIP_MESSAGE)
    return binary
