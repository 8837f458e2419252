from __future__ import annotations

import pytest

from sse_lab import BackgroundServer, stream_chat
from sse_lab.exercises import check_buffered_ttft, check_tpot
from sse_lab.metrics import ChatResult


@pytest.fixture(scope="module")
def measured(server: BackgroundServer) -> ChatResult:
    return stream_chat(server.url, "hi", max_tokens=5, ttft_ms=0, token_ms=5)


def not_yet(*args: object) -> float:
    raise NotImplementedError


def right_tpot(started_at: float, arrivals: list[float]) -> float | None:
    return (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 1 else None


def test_a_right_tpot_passes(measured: ChatResult, capsys: pytest.CaptureFixture[str]) -> None:
    check_tpot(right_tpot, measured)
    assert "passed" in capsys.readouterr().out


def test_a_tpot_that_counts_the_first_token_fails(measured: ChatResult) -> None:
    def mean_from_start(started_at: float, arrivals: list[float]) -> float | None:
        return (arrivals[-1] - started_at) / len(arrivals) if len(arrivals) > 1 else None

    with pytest.raises(AssertionError, match="TPOT is"):
        check_tpot(mean_from_start, measured)


def test_an_unattempted_exercise_only_reminds(measured: ChatResult, capsys: pytest.CaptureFixture[str]) -> None:
    check_tpot(not_yet, measured)
    check_buffered_ttft(not_yet, "http://127.0.0.1:9")
    assert capsys.readouterr().out.count("not attempted yet") == 2


def test_a_right_buffered_prediction_passes(server: BackgroundServer, capsys: pytest.CaptureFixture[str]) -> None:
    check_buffered_ttft(lambda ttft_ms, token_ms, tokens: (ttft_ms + (tokens - 1) * token_ms) / 1000, server.url)
    assert "passed" in capsys.readouterr().out


def test_a_prediction_in_milliseconds_fails(server: BackgroundServer) -> None:
    with pytest.raises(AssertionError, match="seconds"):
        check_buffered_ttft(lambda ttft_ms, token_ms, tokens: ttft_ms + (tokens - 1) * token_ms, server.url)
