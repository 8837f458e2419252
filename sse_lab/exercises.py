"""Checkers for the notebooks' exercises.

Each `check_*` function takes the student's answer, tests it (against measured
runs where the exercise is about measurement) and prints a line saying it passed;
a wrong answer raises AssertionError with a hint. An exercise not attempted yet
(its body still raises NotImplementedError) only prints a reminder, so a fresh
notebook runs from top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable

from .client import fetch_chat
from .metrics import ChatResult


def _attempted(exercise: str, attempt: Callable[[], object]) -> bool:
    try:
        attempt()
    except NotImplementedError:
        print(f"{exercise}: not attempted yet. Replace `raise NotImplementedError` with your code.")
        return False
    return True


def _passed(exercise: str, detail: str) -> None:
    print(f"{exercise}: passed. {detail}")


def check_tpot(tpot: Callable[[float, list[float]], float | None], measured: ChatResult) -> None:
    """Exercise 01.1: `tpot(started_at, arrivals)` must match the benchmark definition."""
    exercise = "Exercise 1 (TPOT)"
    if measured.tpot is None:
        raise ValueError("check_tpot needs a measured run with two tokens or more")
    if not _attempted(exercise, lambda: tpot(0.0, [0.1, 0.2])):
        return
    cases = {
        "two tokens 50 ms apart": (1.0, [1.2, 1.25], 0.05),
        "uneven gaps": (0.0, [0.5, 0.6, 0.9, 1.0], (1.0 - 0.5) / 3),
        "a lone token": (0.0, [0.3], None),
        "no token at all": (0.0, [], None),
        "your measured run": (measured.started_at, measured.arrivals, measured.tpot),
    }
    for name, (started_at, arrivals, expected) in cases.items():
        got = tpot(started_at, list(arrivals))
        if expected is None:
            assert got is None, f"{name}: TPOT needs two tokens or more; expected None, got {got!r}"
        else:
            assert got is not None and abs(got - expected) < 1e-9, (
                f"{name}: expected {expected:.6f} s, got {got!r}. "
                "TPOT is (E2E - TTFT) / (tokens - 1): does the request start cancel out?"
            )
    _passed(exercise, f"Your measured run: {1000 * measured.tpot:.1f} ms per token after the first.")


def check_buffered_ttft(predict: Callable[[float, float, int], float], base_url: str) -> None:
    """Exercise 01.2: predict the buffered TTFT (s) from ttft_ms, token_ms and the token count."""
    exercise = "Exercise 2 (buffered TTFT)"
    if not _attempted(exercise, lambda: predict(100.0, 10.0, 5)):
        return
    for ttft_ms, token_ms, tokens in [(50.0, 10.0, 30), (250.0, 5.0, 10)]:
        predicted = predict(ttft_ms, token_ms, tokens)
        measured = fetch_chat(base_url, "predict me", max_tokens=tokens, ttft_ms=ttft_ms, token_ms=token_ms).ttft
        assert measured is not None
        # The prediction leaves out the network and the server's own time: allow
        # for them generously, since a shared machine adds its own delays.
        assert abs(predicted - measured) < 0.2 * measured + 0.05, (
            f"ttft_ms={ttft_ms}, token_ms={token_ms}, {tokens} tokens: you predicted "
            f"{1000 * predicted:.0f} ms, the server took {1000 * measured:.0f} ms. "
            "When is the last token due? (And is your answer in seconds?)"
        )
    _passed(exercise, "A buffered client waits for the last token, whatever the first one cost.")
