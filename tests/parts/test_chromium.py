from __future__ import annotations

import asyncio
import gc
import os
import threading
from pathlib import Path

import pytest

from sse_lab.parts import chromium as chromium_part
from sse_lab.parts.chromium import (
    CHROMIUM_ARGS,
    SKIP_MESSAGE,
    Chromium,
    ChromiumNotFoundError,
    chromium_or_skip,
    find_chromium,
    launch_chromium,
)
from sse_lab.parts.nginx import REQUIRE_SYSTEM_PARTS_ENV
from tests.conftest import wait_for


def child_processes() -> set[int]:
    """Every live descendant of this process (Playwright's driver, Chromium and its helpers), from /proc."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to list processes")
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # it ended in between
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":  # a zombie has ended; only its exit status is left
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def browser_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("sse-lab-chromium")]


@pytest.fixture
def no_chromium(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chromium_part, "find_chromium", lambda: None)


def test_a_missing_browser_skips_with_one_line(
    no_chromium: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(REQUIRE_SYSTEM_PARTS_ENV, raising=False)
    assert chromium_or_skip() is None
    assert capsys.readouterr().out == SKIP_MESSAGE + "\n"


def test_a_missing_browser_fails_when_system_parts_are_required(
    no_chromium: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REQUIRE_SYSTEM_PARTS_ENV, "1")
    with pytest.raises(ChromiumNotFoundError, match=REQUIRE_SYSTEM_PARTS_ENV):
        chromium_or_skip()


def test_launching_without_a_browser_says_how_to_install_one(no_chromium: None) -> None:
    with pytest.raises(ChromiumNotFoundError, match="apt-get install chromium"):
        launch_chromium()


def test_without_playwright_there_is_no_browser_to_drive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chromium_part.importlib.util, "find_spec", lambda name: None)
    assert find_chromium() is None


def test_the_browser_runs_quiet_and_headless() -> None:
    for flag in ("--headless", "--no-sandbox", "--disable-quic", "--disable-background-networking"):
        assert flag in CHROMIUM_ARGS
    assert "--ignore-certificate-errors" not in CHROMIUM_ARGS  # only when asked for


def test_the_browser_runs_inside_an_event_loop_as_in_a_kernel_and_stop_ends_everything(chromium_binary: str) -> None:
    before = child_processes()

    async def in_a_kernel() -> tuple[Chromium, str]:
        chromium = launch_chromium(chromium_binary, ignore_certificate_errors=True)
        return chromium, chromium.run(lambda browser: threading.current_thread().name)

    chromium, thread = asyncio.run(in_a_kernel())
    assert chromium.version[0].isdigit() and thread.startswith("sse-lab-chromium")
    assert "--ignore-certificate-errors" in chromium.args
    assert child_processes() - before
    chromium.stop()
    chromium.stop()  # idempotent
    assert not chromium.running and not browser_threads()
    wait_for(lambda: not (child_processes() - before), what="Chromium's processes to end")
    with pytest.raises(RuntimeError, match="stopped"):
        chromium.run(lambda browser: None)


def test_a_dropped_handle_stops_the_browser(chromium_binary: str) -> None:
    """What re-running `chromium = launch_chromium()` in a notebook does to the old browser."""
    before = child_processes()
    chromium = launch_chromium(chromium_binary)
    del chromium
    gc.collect()
    assert not browser_threads()
    wait_for(lambda: not (child_processes() - before), what="Chromium's processes to end")
