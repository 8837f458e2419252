"""Notebook 01: the same generation buffered and streamed."""

from __future__ import annotations

from tqdm.auto import tqdm

from ..client import Param, fetch_chat, stream_chat
from ..metrics import ChatResult
from . import DEFAULT_PROMPT


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
