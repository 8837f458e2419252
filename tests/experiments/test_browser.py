from __future__ import annotations

import statistics
from collections.abc import Iterator

import pytest

from sse_lab import BackgroundServer
from sse_lab.experiments.browser import (
    browser_vs_client_ttft,
    connection_limit,
    page_url,
    reconnection_gaps,
    screenshot,
)
from sse_lab.parts.chromium import Chromium, launch_chromium
from sse_lab.parts.nginx import start_nginx


@pytest.fixture(scope="module")
def chromium(chromium_binary: str) -> Iterator[Chromium]:
    # The HTTP/2 test's nginx has a self-signed certificate; this browser visits only the tests' loopback servers.
    with launch_chromium(chromium_binary, ignore_certificate_errors=True) as running:
        yield running


def test_the_browser_and_the_python_client_agree_on_ttft_over_loopback(
    chromium: Chromium, server: BackgroundServer
) -> None:
    pairs = browser_vs_client_ttft(chromium, server.url, runs=3, max_tokens=3, ttft_ms=100, token_ms=5)
    for pair in pairs:
        assert pair.browser_ttft >= 0.1 and pair.client_ttft >= 0.1  # neither beats the model's prefill
        assert pair.browser_first_paint >= pair.browser_ttft
    difference = min(pair.browser_ttft for pair in pairs) - min(pair.client_ttft for pair in pairs)
    # A few ms on a quiet machine; a loaded one delays the browser's processes more than the in-process client.
    assert abs(difference) < 0.25, f"best browser TTFT - best client TTFT: {1000 * difference:.0f} ms"


def test_the_reconnection_gap_follows_the_retry_the_server_announced(chromium: Chromium) -> None:
    runs = reconnection_gaps(chromium, (100, 400), drop_after=4, max_tokens=12, token_ms=5)
    for retry_ms, run in runs.items():
        assert run.text == run.whole
        assert run.last_event_ids == [None, "3", "7"]
        assert len(run.gaps_ms) == 2 and min(run.gaps_ms) >= retry_ms
    beyond_retry = [gap - retry_ms for retry_ms, run in runs.items() for gap in run.gaps_ms]
    assert statistics.median(beyond_retry) < 300, beyond_retry  # a new connection on loopback, on a busy machine


def test_six_streams_at_most_over_http_1_1_and_all_eight_at_once_over_http2(
    chromium: Chromium, server: BackgroundServer, nginx_binary: str
) -> None:
    direct = connection_limit(chromium, server.url, streams=8, max_tokens=16, token_ms=40)
    assert direct.protocol == "http/1.1"
    assert direct.receiving_at_once() == 6
    first_end = min(stream.end_ms for stream in direct.streams if stream.end_ms is not None)
    waiting = [stream for stream in direct.streams if (stream.first_token_ms or 0) >= first_end]
    assert len(waiting) == 2 and all(stream.outcome == "done" for stream in direct.streams)
    with start_nginx(server.url, tls=True) as proxy:
        multiplexed = connection_limit(chromium, proxy.url, streams=8, max_tokens=16, token_ms=40)
    assert multiplexed.protocol == "h2"
    assert multiplexed.receiving_at_once() == 8


def test_a_screenshot_of_the_page_in_presenter_mode_is_a_png(chromium: Chromium, server: BackgroundServer) -> None:
    url = page_url(server.url, prompt="shot", max_tokens=3, ttft_ms=0, token_ms=0, big=True)
    assert url.endswith("&autostart=1&big=1")
    assert screenshot(chromium, url).startswith(b"\x89PNG\r\n\x1a\n")
