"""Experiments: each runs requests against a live server and returns plain results.

Results come back as `{variant: [ChatResult, ...]}`, so every plot and summary
in `sse_lab.plots` and `sse_lab.metrics` works on every experiment.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .client import Param, fetch_chat, stream_chat
from .metrics import ChatResult

DEFAULT_PROMPT = "Why should an LLM stream its answer?"


def buffered_vs_streamed(
    base_url: str,
    *,
    runs: int = 5,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
    **params: Param,
) -> dict[str, list[ChatResult]]:
    """Ask for the same generation `runs` times streamed and `runs` times buffered.

    The two kinds alternate, so a slow moment on the machine hits both alike.
    `params` go to the server unchanged (model, max_tokens, ttft_ms, token_ms, ...).
    """
    results: dict[str, list[ChatResult]] = {"streamed": [], "buffered": []}
    for _ in tqdm(range(runs), desc="buffered vs streamed", disable=not progress):
        results["streamed"].append(stream_chat(base_url, prompt, **params))
        results["buffered"].append(fetch_chat(base_url, prompt, **params))
    return results
