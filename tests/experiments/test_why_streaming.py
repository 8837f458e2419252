from __future__ import annotations

from sse_lab import BackgroundServer
from sse_lab.experiments.why_streaming import buffered_vs_streamed


def test_buffered_vs_streamed_runs_both_with_the_same_settings(server: BackgroundServer) -> None:
    runs = buffered_vs_streamed(server.url, runs=3, progress=False, max_tokens=10, ttft_ms=20, token_ms=30)
    assert list(runs) == ["streamed", "buffered"]
    assert [len(results) for results in runs.values()] == [3, 3]
    texts = {result.text for results in runs.values() for result in results}
    assert len(texts) == 1  # one deterministic reply, whichever way it travelled
    for streamed, buffered in zip(runs["streamed"], runs["buffered"], strict=True):
        assert buffered.ttft > 3 * streamed.ttft
