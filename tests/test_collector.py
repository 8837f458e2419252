from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sse_lab import collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_steady_collection_freezes_startup_and_keeps_only_young_collections_automatic() -> None:
    young, middle, _ = gc.get_threshold()
    collector.steady_collection()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[:2] == (young, middle)
    assert gc.get_threshold()[2] == 2**31 - 1


@pytest.mark.usefixtures("restored_collector")
def test_a_full_collection_still_frees_cycles_made_after_the_freeze() -> None:
    """A cycle made after the freeze (by a token source of one's own, say) is found by the next full collection."""
    collector.steady_collection()

    class Node:
        partner: object = None

    first, second = Node(), Node()
    first.partner, second.partner = second, first
    del first, second
    assert gc.collect() >= 2


def test_collect_forever_makes_a_full_collection_each_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    collected: list[int] = []

    class Stop(Exception):
        pass

    def sleep(seconds: float) -> None:
        if len(slept) == 3:
            raise Stop  # a stop signal, as the CLI raises one
        slept.append(seconds)

    monkeypatch.setattr(collector.time, "sleep", sleep)
    monkeypatch.setattr(collector.gc, "collect", lambda generation=2: collected.append(generation) or 0)
    with pytest.raises(Stop):
        collector.collect_forever(0.25)
    assert slept == [0.25] * 3 and collected == [2] * 3
