from __future__ import annotations

import json

import pytest
from websockets.sync.client import connect

from sse_lab.course.exercises import check_websocket_cancel, check_wire_cost


def not_yet(*args: object) -> tuple[float, float]:
    raise NotImplementedError


def right_wire_cost(n1: int, bytes1: int, n2: int, bytes2: int) -> tuple[float, float]:
    per_token = (bytes2 - bytes1) / (n2 - n1)
    return per_token, bytes1 - n1 * per_token


def test_a_right_wire_cost_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check_wire_cost(right_wire_cost)
    assert "passed" in capsys.readouterr().out


def test_a_wire_cost_that_forgets_the_fixed_part_fails() -> None:
    with pytest.raises(AssertionError, match="fixed part"):
        check_wire_cost(lambda n1, bytes1, n2, bytes2: (bytes2 / n2, 0.0))


def test_an_unattempted_wire_cost_only_reminds(capsys: pytest.CaptureFixture[str]) -> None:
    check_wire_cost(not_yet)
    assert "not attempted" in capsys.readouterr().out


def cancel_after(url: str, after: int) -> list[str]:
    tokens = []
    with connect(url, proxy=None) as websocket:
        websocket.send(json.dumps({"prompt": "stop me", "max_tokens": 500, "ttft_ms": 0, "token_ms": 10}))
        while (message := json.loads(websocket.recv(10)))["type"] == "token":
            tokens.append(message["token"])
            if len(tokens) == after:
                websocket.send(json.dumps({"type": "cancel"}))
    return tokens


def never_cancel(url: str, after: int) -> list[str]:
    with connect(url, proxy=None) as websocket:
        websocket.send(json.dumps({"prompt": "run on", "max_tokens": 40, "ttft_ms": 0, "token_ms": 0}))
        return [message["token"] for raw in websocket if (message := json.loads(raw))["type"] == "token"]


def test_a_right_websocket_cancel_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check_websocket_cancel(cancel_after)
    assert "passed" in capsys.readouterr().out


def test_a_client_that_never_cancels_fails() -> None:
    with pytest.raises(AssertionError, match="cancelled stream"):
        check_websocket_cancel(never_cancel)
