from __future__ import annotations

import pytest

from sse_lab.handles import Stoppable


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
