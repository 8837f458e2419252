"""The checkers of notebook 11's exercises (kept apart from test_exercises.py to keep merges easy)."""

from __future__ import annotations

import pytest

from sse_lab.course.exercises import check_lost_and_duplicated, check_resume_position
from sse_lab.experiments.beyond_one_process import Arrival, Follow
from sse_lab.parts.redis import SKIP_MESSAGE, redis_or_skip, start_redis


def right_count(indices: list[int], expected: int) -> tuple[int, int]:
    return len(set(range(expected)) - set(indices)), len(indices) - len(set(indices))


def right_position(last_event_id: str) -> str:
    return f"{int(last_event_id) + 1}-0" if last_event_id else "0-0"


def not_yet(*args: object) -> tuple[int, int]:
    raise NotImplementedError


def test_a_right_count_passes_on_a_measured_stream_too(capsys: pytest.CaptureFixture[str]) -> None:
    stream = Follow("g", "p", {"max_tokens": 3})
    stream.arrivals = [Arrival(index, "t", 0.0, "1") for index in (0, 1, 1, 2)]
    check_lost_and_duplicated(right_count, stream)
    assert "passed" in capsys.readouterr().out.lower()


def test_a_count_by_length_fails() -> None:
    with pytest.raises(AssertionError, match="a replay that overlapped"):
        check_lost_and_duplicated(lambda indices, expected: (max(0, expected - len(indices)), 0))


def test_unattempted_cluster_exercises_only_remind(capsys: pytest.CaptureFixture[str]) -> None:
    check_lost_and_duplicated(not_yet)
    check_resume_position(not_yet)  # type: ignore[arg-type]
    assert capsys.readouterr().out.count("not attempted yet") == 2


def test_the_resume_position_is_checked_on_a_real_stream(capsys: pytest.CaptureFixture[str]) -> None:
    if redis_or_skip() is None:
        pytest.skip(SKIP_MESSAGE)
    with start_redis() as server:
        check_resume_position(right_position, server.url)
    assert "passed" in capsys.readouterr().out.lower()


def test_resuming_from_the_last_received_id_fails_as_a_duplicate() -> None:
    with pytest.raises(AssertionError, match="XREAD is exclusive"):
        check_resume_position(lambda last: f"{int(last or 0)}-0" if last else "0-0")
