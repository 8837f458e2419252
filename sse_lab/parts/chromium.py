"""A real Chromium, headless, driven by Playwright from a thread of its own.

    kernel or test thread              "sse-lab-chromium" thread            subprocesses
    ─────────────────────              ─────────────────────────            ────────────
    launch_chromium() ───────────────▶ sync_playwright().start()  ────────▶ Playwright's driver
                                       chromium.launch(executable_path=…) ─▶ /usr/bin/chromium
    chromium.run(work) ──────────────▶ work(browser) ── returns plain data
    chromium.stop() (or GC, or exit) ▶ browser.close(), playwright.stop()   both end

Playwright's sync API refuses to run where an asyncio loop is running, which is
always the case in a Jupyter kernel; its objects also belong to the thread that
made them. So the browser lives on one worker thread and `Chromium.run` hands
it plain functions: the same experiment code runs from pytest and from a notebook.

The browser is the system's (Debian's `chromium` package): Playwright's own
`playwright install` downloads a build, which the kit does not rely on. Each
launch gets a fresh profile (Playwright's temporary user-data-dir, deleted when
the browser closes), no first-run UI, no background networking, no QUIC: the
browser only talks to the servers the kit starts.

A missing browser (or a missing `playwright` package) lets a notebook skip its
browser part with one printed line, unless SSE_LAB_REQUIRE_SYSTEM_PARTS=1 (CI)
makes it an error, as for nginx (`sse_lab.parts.nginx.nginx_or_skip`).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import shutil
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..handles import Stoppable
from ._system import require_or_skip

if TYPE_CHECKING:
    from playwright.sync_api import Browser

T = TypeVar("T")

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
SYSTEM_CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "apt-get install chromium, and pip install playwright (no `playwright install` needed)"
SKIP_MESSAGE = f"Chromium or Playwright not found: skipping the browser experiments ({INSTALL_HINT})"
# Headless, in a container (no sandbox, no GPU), and quiet: nothing but the kit's own traffic.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# For nginx's self-signed certificate (notebook 06's HTTP/2): only ever for loopback servers the kit starts.
IGNORE_CERTIFICATE_ERRORS = "--ignore-certificate-errors"
DEFAULT_TIMEOUT_S = 60.0


class ChromiumNotFoundError(RuntimeError):
    """No Chromium on PATH (nor at /usr/bin/chromium), or no `playwright` package to drive it."""


def find_chromium() -> str | None:
    """The Chromium binary to drive, or None when there is none or Playwright is not installed."""
    if importlib.util.find_spec("playwright") is None:
        return None
    for name in BROWSER_NAMES:
        if found := shutil.which(name):
            return found
    return SYSTEM_CHROMIUM if os.access(SYSTEM_CHROMIUM, os.X_OK) else None


def chromium_or_skip() -> str | None:
    """The Chromium binary, or None after printing one line saying the browser experiments are skipped.

    With SSE_LAB_REQUIRE_SYSTEM_PARTS=1 (CI) a missing browser raises ChromiumNotFoundError instead.
    """
    return require_or_skip(find_chromium(), "Chromium", f": {INSTALL_HINT}", SKIP_MESSAGE, ChromiumNotFoundError)


class _Session:
    """What the worker thread holds: Playwright and its browser. No reference to the handle."""

    def __init__(self) -> None:
        self.playwright: Any = None
        self.browser: Browser | None = None

    def start(self, binary: str, args: list[str], timeout_s: float) -> str:
        from playwright.sync_api import sync_playwright

        self.playwright = sync_playwright().start()
        try:
            self.browser = self.playwright.chromium.launch(
                executable_path=binary, args=args, headless=True, timeout=timeout_s * 1000
            )
        except BaseException:
            self.playwright.stop()
            self.playwright = None
            raise
        return self.browser.version

    def close(self) -> None:
        try:
            if self.browser is not None:
                self.browser.close()
        finally:
            self.browser = None
            if self.playwright is not None:
                self.playwright.stop()
                self.playwright = None


def _stop(worker: concurrent.futures.ThreadPoolExecutor, session: _Session) -> None:
    try:
        worker.submit(session.close).result(DEFAULT_TIMEOUT_S)
    finally:
        worker.shutdown(wait=True)


class Chromium(Stoppable):
    """Handle on a headless Chromium: `run(work)` calls `work(browser)` on the browser's thread.

    `browser` is a Playwright `Browser`. `work` should open a context of its own
    (`browser.new_context()`) and close it, and return plain data: Playwright's
    objects are only usable on that thread. The browser also stops when the handle
    is garbage collected or the interpreter exits.
    """

    def __init__(self, binary: str, *, ignore_certificate_errors: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.binary = binary
        self.args = [*CHROMIUM_ARGS, *([IGNORE_CERTIFICATE_ERRORS] if ignore_certificate_errors else [])]
        self.timeout_s = timeout_s
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sse-lab-chromium")
        session = _Session()
        self._stop = weakref.finalize(self, _stop, self._worker, session)
        try:
            self.version = self._worker.submit(session.start, binary, self.args, timeout_s).result(timeout_s)
        except BaseException:
            self._stop()
            raise
        self._session = session

    @property
    def running(self) -> bool:
        return self._stop.alive

    def run(self, work: Callable[[Browser], T], timeout_s: float | None = None) -> T:
        """`work(browser)` on the browser's thread; its result, or its exception, here."""
        if not self.running:
            raise RuntimeError("this Chromium has been stopped")
        browser = self._session.browser
        assert browser is not None
        return self._worker.submit(work, browser).result(timeout_s or self.timeout_s)

    def stop(self) -> None:
        """Close the browser and Playwright, end the thread; idempotent."""
        self._stop()

    def __repr__(self) -> str:
        return f"<Chromium {self.version} {'running' if self.running else 'stopped'}>"


def launch_chromium(binary: str | None = None, *, ignore_certificate_errors: bool = False) -> Chromium:
    """Start a headless Chromium (the system's, found by `find_chromium`) on a thread of its own.

    `ignore_certificate_errors` makes it accept any TLS certificate: for the kit's
    own loopback nginx with its self-signed one, never for anything else.
    Raises ChromiumNotFoundError when there is no browser to start.
    """
    binary = binary or find_chromium()
    if binary is None:
        raise ChromiumNotFoundError(SKIP_MESSAGE.split(": ", 1)[0] + f" ({INSTALL_HINT})")
    return Chromium(binary, ignore_certificate_errors=ignore_certificate_errors)
