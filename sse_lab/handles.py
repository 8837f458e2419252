"""What every handle on something running has in common: a `with` block that ends in `stop()`, and how a process stops.

The in-kernel server, the gRPC server, nginx, Redis, the cluster and Chromium are
each a handle of this kind: `stop()` ends what runs and frees what it holds, and
may be called again (a `with` block and a notebook's own `stop()` can both end it).
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import subprocess
from types import TracebackType
from typing import TypeVar

_Handle = TypeVar("_Handle", bound="Stoppable")


class Stoppable(abc.ABC):
    """A handle whose `with` block ends in `stop()`, failed or not."""

    @abc.abstractmethod
    def stop(self) -> None:
        """End what runs and free what it holds; idempotent."""

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def stop_process(process: subprocess.Popen[bytes], timeout_s: float, *, group: bool = False) -> None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL: the whole process group with `group` (the process leads it)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        if group:
            with contextlib.suppress(ProcessLookupError):  # it exited in between
                os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.wait()
