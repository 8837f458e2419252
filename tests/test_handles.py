from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from sse_lab.handles import Stoppable, stop_process


class Counted(Stoppable):
    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


def test_a_with_block_hands_back_the_handle_and_stops_it_however_it_ends() -> None:
    with Counted() as handle:
        assert isinstance(handle, Counted)
    assert handle.stops == 1
    with pytest.raises(ValueError), Counted() as failing:
        raise ValueError("the block failed")
    assert failing.stops == 1


def test_a_handle_must_say_how_it_stops() -> None:
    class Unstoppable(Stoppable):
        pass

    with pytest.raises(TypeError):
        Unstoppable()  # type: ignore[abstract]


def test_stop_process_ends_a_process_that_stops_on_sigterm_and_kills_one_that_does_not() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_process(polite, timeout_s=5)
    assert polite.returncode == -signal.SIGTERM

    ignores = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", ignores], stdout=subprocess.PIPE) as stubborn:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"  # SIGTERM is ignored from here
        stop_process(stubborn, timeout_s=0.2)
    assert stubborn.returncode == -signal.SIGKILL
    stop_process(stubborn, timeout_s=0.2)  # already stopped: nothing to do
