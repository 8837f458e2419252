from __future__ import annotations

from sse_lab import create_app, serve_in_background, stream_chat
from sse_lab.instruments.cpu import CpuMeter


def test_a_longer_stream_costs_the_server_more_cpu_and_waiting_costs_none() -> None:
    meter = CpuMeter(create_app())
    with serve_in_background(meter) as server:
        stream_chat(server.url, "hi", max_tokens=10, ttft_ms=0, token_ms=0)  # the first request warms up the server
        stream_chat(server.url, "hi", max_tokens=10, ttft_ms=0, token_ms=0)
        stream_chat(server.url, "hi", max_tokens=2_000, ttft_ms=0, token_ms=0)
        stream_chat(server.url, "hi", max_tokens=10, ttft_ms=300, token_ms=0)  # 0.3 s asleep: no CPU
    _, short, long, slow = meter.cpu_s
    assert long > 5 * short
    assert slow < 0.1  # far below the 0.3 s it took: waiting is not CPU
