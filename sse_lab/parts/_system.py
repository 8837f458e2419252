"""What every system part shares: a free loopback port, waiting for a process to be ready, stopping it, skipping it.

The parts (nginx, redis, chromium, the cluster's workers) differ in how they are
launched and how they say they are ready; the mechanics around that are here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REQUIRE_SYSTEM_PARTS_ENV = "SSE_LAB_REQUIRE_SYSTEM_PARTS"
POLL_S = 0.01
LOG_LINES_IN_ERRORS = 10


def require_or_skip(
    found: T | None, name: str, missing: str, skip_message: str, error_type: type[Exception]
) -> T | None:
    """`found`, or None after printing `skip_message`, when the part `name` is missing.

    With SSE_LAB_REQUIRE_SYSTEM_PARTS=1 in the environment (CI sets it) a missing
    part raises `error_type` instead, "`name` is required (...=1)" followed by
    `missing` (what was looked for), so that experiments cannot silently vanish.
    """
    if found is None:
        if os.environ.get(REQUIRE_SYSTEM_PARTS_ENV) == "1":
            raise error_type(f"{name} is required ({REQUIRE_SYSTEM_PARTS_ENV}=1){missing}")
        print(skip_message)
    return found


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (something else may take it before the caller binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def log_tail(path: Path) -> str:
    """The last lines of a part's log, to quote in an error."""
    text = path.read_text(errors="replace")
    return "\n".join(text.splitlines()[-LOG_LINES_IN_ERRORS:])


def wait_until_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    log: Path,
    deadline: float,
    timeout_s: float,
    *,
    name: str,
    readiness: str,
    error_type: type[Exception],
) -> bool:
    """True once `ready()`; False when the log says the port was taken; `error_type` when `process` exits or times out.

    `readiness` says what was awaited, for the timeout's message: "accept connections on port 8080".
    """
    while not ready():
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(POLL_S)  # the pause between checks, cut short if the process exits
        tail = log_tail(log)
        if "Address already in use" in tail:
            return False
        if process.returncode is not None:
            raise error_type(f"{name} exited with status {process.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise error_type(f"{name} did not {readiness} within {timeout_s} s:\n{tail}")
    return True
