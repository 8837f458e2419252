"""What `GuardedHttpToolsProtocol` costs: time per stream event and per request, against uvicorn's own protocol.

    .venv/bin/python benchmarks/protocol_cost.py

Both servers run the same app in this process, in turn, three rounds each; each round streams six
responses of 4,096 events (ttft_ms=0, token_ms=0) and sends 50 `GET /api/stats` on one keep-alive
connection. Figures: the median, over the streams, of (time to read the whole stream) / events; and
the median, over the rounds, of the time per `/api/stats` request. Client and server share the CPU,
so these are whole-path figures; on a shared machine they are noisy, compare them within one run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import httpx
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

import sse_lab.background as background
from sse_lab import GenerationRequest, Settings, create_app

EVENTS = 4_096


class StockProtocol(HttpToolsProtocol):
    """uvicorn's protocol, taking (and ignoring) the guard's settings."""

    def __init__(self, *args: Any, max_head_bytes: int, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


def one_round(protocol: type[HttpToolsProtocol]) -> tuple[list[float], float]:
    """Microseconds per event of six streams, and milliseconds per stats request."""
    background.GuardedHttpToolsProtocol = protocol  # type: ignore[misc]  # what _ServerThread builds
    app = create_app(Settings(defaults=GenerationRequest("", ttft_ms=0, token_ms=0)))
    per_event = []
    with background.serve_in_background(app) as server, httpx.Client(trust_env=False) as client:
        for _ in range(6):
            started = time.perf_counter()
            params = {"prompt": "hi", "max_tokens": EVENTS}
            with client.stream("GET", server.url + "/api/chat/stream", params=params) as response:
                for _ in response.iter_raw():
                    pass
            per_event.append((time.perf_counter() - started) / EVENTS * 1e6)
        started = time.perf_counter()
        for _ in range(50):
            client.get(server.url + "/api/stats")
        per_request = (time.perf_counter() - started) / 50 * 1e3
    return per_event, per_request


def main() -> None:
    guarded = background.GuardedHttpToolsProtocol
    results: dict[str, dict[str, list[float]]] = {
        "stock": {"event": [], "request": []},
        "guarded": {"event": [], "request": []},
    }
    for _ in range(3):
        for name, protocol in (("stock", StockProtocol), ("guarded", guarded)):
            per_event, per_request = one_round(protocol)
            results[name]["event"] += per_event
            results[name]["request"].append(per_request)
    background.GuardedHttpToolsProtocol = guarded  # type: ignore[misc]
    summary = {
        name: {
            "us_per_event_median": round(statistics.median(figures["event"]), 2),
            "ms_per_request_median": round(statistics.median(figures["request"]), 3),
        }
        for name, figures in results.items()
    }
    print(json.dumps({"command": " ".join(sys.argv), **summary}, indent=2))


if __name__ == "__main__":
    main()
