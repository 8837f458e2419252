"""What only a browser shows: the classroom page measured in a real, headless Chromium (notebook 06).

Every function takes a running `Chromium` (`sse_lab.parts.chromium.launch_chromium`)
and does its work on the browser's own thread, so it runs the same from pytest
and from a Jupyter kernel, where Playwright's sync API cannot run on the kernel's
thread. Each opens a browser context of its own (a fresh profile's worth of
cookies, cache and connections) and closes it. Results are plain dataclasses.

Times measured in the page are `performance.now()` in ms since the reader sent
its request (see `sse_lab/static/page.js`):

    TTFT           from `new EventSource(...)` (or `fetch(...)`) to the first token event handled
    first paint    from the request to the first animation frame after that token was put in the
                   DOM: the frame that paints it starts then
    drop gap       from the page seeing a connection lost to the first token after it resumed:
                   EventSource's `retry` wait, a new connection and the model's prefill again
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..background import serve_in_background
from ..client import STREAM_PATH, Param, stream_chat
from ..model import sim_tokens
from ..parts.chromium import Chromium
from ..server import Settings, create_app

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

READERS = ("streamed", "buffered", "fetch")
VIEWPORT = {"width": 1280, "height": 800}
DEFAULT_WAIT_S = 20.0
_ALL_OVER = "(readers) => readers.every((reader) => sseLab.runs[reader] && sseLab.runs[reader].outcome !== null)"
# Resolves once two animation frames have run: whatever the page changed before has been painted.
AFTER_TWO_FRAMES = "() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
_NOT_DROP_MARKS = "(e) => [...e.children].filter((child) => !child.matches('.drop-mark')).length"
# Installed before the page's own script: one sample of both panels' sizes after every change to the document,
# however busy the machine (a mutation observer runs after each task that changed the DOM; polling would miss steps).
_WATCH_PANELS = """
window.__panelGrowth = [];
new MutationObserver(() => {
    const size = (id) => document.getElementById(id)?.textContent.length ?? 0;
    const sample = [performance.now(), size("streamed-text"), size("buffered-text")];
    const last = window.__panelGrowth.at(-1);
    if (!last || last[1] !== sample[1] || last[2] !== sample[2]) window.__panelGrowth.push(sample);
}).observe(document, { childList: true, characterData: true, subtree: true });
"""


@dataclass(frozen=True)
class PageDrop:
    """A connection the page saw lost: when (ms since the request), the last id it had, when text came again."""

    at_ms: float
    last_event_id: str
    resumed_ms: float | None

    @property
    def gap_ms(self) -> float | None:
        """From the loss to the first token after it; None if none came."""
        return None if self.resumed_ms is None else self.resumed_ms - self.at_ms


@dataclass(frozen=True)
class ReaderRun:
    """One reader of the page as it ended: the panel's text (its textContent) and the page's measurements.

    outcome: done, error (an error event or a refusal), dropped (fetch, which does
    not reconnect), failed, stopped; None if it had not ended when the wait did.
    """

    reader: str
    text: str
    ttft_ms: float | None
    first_paint_ms: float | None
    tokens: int
    end_ms: float | None
    outcome: str | None
    error: dict[str, Any] | None
    shown_error: str  # the panel's error line, as the room reads it
    drops: list[PageDrop]
    elements_in_text: int  # element children of the text panel: only drop marks, never markup from a token


@dataclass(frozen=True)
class PageRun:
    """The page after a run: each reader, and (if watched) the panels' sizes over time.

    growth: (ms on the page's clock, characters in the streamed panel, in the buffered
    panel), one sample each time either changed, recorded by a mutation observer.
    """

    url: str
    readers: dict[str, ReaderRun]
    growth: list[tuple[float, int, int]] = field(default_factory=list)
    screenshot: bytes | None = None
    protocol: str = ""  # what the page came over: "http/1.1" or "h2"


def page_url(base_url: str, *, autostart: bool = True, big: bool = False, **params: Param) -> str:
    """The page's URL with its form pre-filled: `/?prompt=hello&max_tokens=40&autostart=1`.

    >>> page_url("http://127.0.0.1:8000", prompt="hi there", max_tokens=5)
    'http://127.0.0.1:8000/?prompt=hi+there&max_tokens=5&autostart=1'
    """
    query = {**params, **({"autostart": 1} if autostart else {}), **({"big": 1} if big else {})}
    return f"{base_url}/?{urlencode(query)}"


@contextmanager
def _page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    try:
        yield context.new_page()
    finally:
        context.close()


def _reader_run(page: Page, reader: str) -> ReaderRun:
    run = page.evaluate("(reader) => JSON.parse(JSON.stringify(sseLab.runs[reader] ?? null))", reader)
    text = page.text_content(f"#{reader}-text") or ""
    shown_error = page.text_content(f"#{reader}-error") or ""
    children = page.eval_on_selector(
        f"#{reader}-text", "(e) => [...e.children].filter((c) => !c.matches('.drop-mark')).length"
    )
    run = run or {}
    return ReaderRun(
        reader=reader,
        text=text,
        ttft_ms=run.get("ttftMs"),
        first_paint_ms=run.get("firstPaintMs"),
        tokens=run.get("tokens", 0),
        end_ms=run.get("endMs"),
        outcome=run.get("outcome"),
        error=run.get("error"),
        shown_error=shown_error,
        drops=[PageDrop(d["atMs"], d["lastEventId"], d["resumedMs"]) for d in run.get("drops", [])],
        elements_in_text=children,
    )


def _wait_over(page: Page, readers: Sequence[str], timeout_s: float) -> None:
    page.wait_for_function(_ALL_OVER, arg=list(readers), timeout=timeout_s * 1000)


def run_page(
    chromium: Chromium,
    base_url: str,
    *,
    readers: Sequence[str] = READERS,
    watch: bool = False,
    screenshot: bool = False,
    big: bool = False,
    timeout_s: float = DEFAULT_WAIT_S,
    **params: Param,
) -> PageRun:
    """Open the page with `params` in its form, start `readers` (all three: `autostart=1`), wait for their end.

    watch: record the streamed and buffered panels' sizes each time they change (`PageRun.growth`).
    screenshot: a PNG of the whole page at the end.
    """
    all_three = tuple(readers) == READERS
    url = page_url(base_url, autostart=all_three, big=big, **params)

    def work(browser: Browser) -> PageRun:
        with _page(browser) as page:
            if watch:
                page.add_init_script(_WATCH_PANELS)
            page.goto(url)
            if not all_three:
                for reader in readers:
                    page.evaluate("(reader) => sseLab.start(reader)", reader)
            _wait_over(page, readers, timeout_s)
            samples = page.evaluate("() => window.__panelGrowth ?? []")
            growth = [(float(at), int(streamed), int(buffered)) for at, streamed, buffered in samples]
            return PageRun(
                url=url,
                readers={reader: _reader_run(page, reader) for reader in readers},
                growth=growth,
                screenshot=page.screenshot(full_page=True) if screenshot else None,
                protocol=page.evaluate("() => sseLab.protocol()"),
            )

    return chromium.run(work, timeout_s + 10)


def screenshot(chromium: Chromium, url: str, *, full_page: bool = False) -> bytes:
    """A PNG of the page at `url` once its readers (if any were started) have ended."""

    def work(browser: Browser) -> bytes:
        with _page(browser) as page:
            page.goto(url)
            page.wait_for_function(
                "() => Object.values(sseLab.runs).every((run) => run.outcome !== null)", timeout=DEFAULT_WAIT_S * 1000
            )
            return page.screenshot(full_page=full_page)

    return chromium.run(work)


@dataclass(frozen=True)
class TtftPair:
    """One stream's TTFT seen by the browser's EventSource and the same stream's by the kit's Python client (s)."""

    browser_ttft: float
    browser_first_paint: float
    client_ttft: float


def browser_vs_client_ttft(chromium: Chromium, base_url: str, *, runs: int = 5, **params: Param) -> list[TtftPair]:
    """`runs` times: the page's EventSource on a stream, then `stream_chat` on the same stream (same parameters).

    Each run opens a fresh page and starts its stream once the page has painted.
    """
    params = {"prompt": "measure me", **params}

    def browser_run(browser: Browser) -> tuple[float, float]:
        with _page(browser) as page:
            page.goto(page_url(base_url, autostart=False, **params))
            page.evaluate(AFTER_TWO_FRAMES)  # the page has painted once: the token's paint is not the page's
            page.evaluate("() => sseLab.start('streamed')")
            _wait_over(page, ["streamed"], DEFAULT_WAIT_S)
            run = page.evaluate("() => [sseLab.runs.streamed.ttftMs, sseLab.runs.streamed.firstPaintMs]")
            return run[0] / 1000, run[1] / 1000

    pairs = []
    for _ in range(runs):
        in_browser, first_paint = chromium.run(browser_run)
        prompt = str(params["prompt"])
        client = stream_chat(base_url, prompt, **{k: v for k, v in params.items() if k != "prompt"})
        assert client.ttft is not None
        pairs.append(TtftPair(in_browser, first_paint, client.ttft))
    return pairs


class StreamRequests:
    """An ASGI wrapper that notes each stream request: when it came (perf_counter) and its Last-Event-ID."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[tuple[float, str | None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == STREAM_PATH:
            self.seen.append((time.perf_counter(), Headers(scope=scope).get("last-event-id")))
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Reconnection:
    """A stream cut every `drop_after` tokens, read by the page's EventSource under one `retry` value.

    gaps_ms: each drop's gap, as the page measured it. last_event_ids: the
    Last-Event-ID header of each request the server got (None on the first).
    text / whole: what the panel showed, and the uninterrupted text.
    """

    retry_ms: int
    drop_after: int
    gaps_ms: list[float]
    last_event_ids: list[str | None]
    text: str
    whole: str


def reconnection_gaps(
    chromium: Chromium,
    retry_values_ms: Sequence[int] = (250, 1000),
    *,
    drop_after: int = 4,
    max_tokens: int = 12,
    token_ms: float = 10,
) -> dict[int, Reconnection]:
    """For each retry value, a server announcing it and a stream dropped every `drop_after` tokens.

    The model's prefill is 0 ms, so a gap is the retry wait plus a new connection.
    """
    prompt = "reconnect me"
    results = {}
    for retry_ms in retry_values_ms:
        app = StreamRequests(create_app(Settings(retry_ms=retry_ms)))
        with serve_in_background(app) as server:
            run = run_page(
                chromium,
                server.url,
                readers=["streamed"],
                timeout_s=DEFAULT_WAIT_S + 3 * retry_ms / 1000,
                prompt=prompt,
                max_tokens=max_tokens,
                ttft_ms=0,
                token_ms=token_ms,
                drop_after=drop_after,
            ).readers["streamed"]
        results[retry_ms] = Reconnection(
            retry_ms=retry_ms,
            drop_after=drop_after,
            gaps_ms=[drop.gap_ms for drop in run.drops if drop.gap_ms is not None],
            last_event_ids=[last_event_id for _, last_event_id in app.seen],
            text=run.text,
            whole="".join(sim_tokens(prompt, max_tokens)),
        )
    return results


@dataclass(frozen=True)
class StreamTiming:
    """One of many EventSources opened at once by a page, in ms since the first was created."""

    index: int
    created_ms: float
    open_ms: float | None
    first_token_ms: float | None
    end_ms: float | None
    outcome: str | None


@dataclass(frozen=True)
class ConnectionTimeline:
    """`streams` EventSources opened together from one page on `url`, and what the page came over."""

    url: str
    protocol: str
    streams: list[StreamTiming]

    def receiving_at_once(self) -> int:
        """How many streams had their first token before the first stream ended."""
        first_end = min(s.end_ms for s in self.streams if s.end_ms is not None)
        return sum(1 for s in self.streams if s.first_token_ms is not None and s.first_token_ms < first_end)


def connection_limit(
    chromium: Chromium,
    base_url: str,
    *,
    streams: int = 8,
    max_tokens: int = 15,
    token_ms: float = 40,
    ttft_ms: float = 0,
    timeout_s: float = DEFAULT_WAIT_S,
) -> ConnectionTimeline:
    """Open `streams` EventSources at once from the page on `base_url`; when did each start receiving?

    Over HTTP/1.1 Chromium keeps at most 6 connections per origin, so the 7th waits
    for the 1st to end. Over HTTP/2 they share one connection.
    """
    params: Mapping[str, Param] = {"max_tokens": max_tokens, "token_ms": token_ms, "ttft_ms": ttft_ms}

    def work(browser: Browser) -> ConnectionTimeline:
        with _page(browser) as page:
            page.goto(page_url(base_url, autostart=False))
            page.evaluate("([count, params]) => sseLab.openMany(count, params)", [streams, dict(params)])
            page.wait_for_function("() => sseLab.many.done", timeout=timeout_s * 1000)
            timings = page.evaluate("() => sseLab.many.streams")
            return ConnectionTimeline(
                url=base_url,
                protocol=page.evaluate("() => sseLab.protocol()"),
                streams=[
                    StreamTiming(t["index"], t["createdMs"], t["openMs"], t["firstTokenMs"], t["endMs"], t["outcome"])
                    for t in timings
                ],
            )

    return chromium.run(work, timeout_s + 10)
