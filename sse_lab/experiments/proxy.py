"""Which proxy settings hold tokens back: the same chat streamed directly and through a real nginx per configuration.

The nginx itself is `sse_lab.parts.nginx`; the findings are in its docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from ..client import Param, stream_chat
from ..metrics import ChatResult
from ..parts.nginx import ProxyConfig, start_nginx
from . import DEFAULT_PROMPT

DIRECT = "direct"
# Small enough that a notebook measures every configuration in seconds.
MEASURE_DEFAULTS: dict[str, Param] = {"max_tokens": 20, "ttft_ms": 100, "token_ms": 25}


def measure_proxies(
    upstream_url: str,
    configs: Sequence[ProxyConfig],
    *,
    runs: int = 3,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
    **params: Param,
) -> dict[str, list[ChatResult]]:
    """Stream the same chat `runs` times directly, then `runs` times through nginx with each config.

    Returns `{"direct": [...], config.label: [...], ...}`. Each configuration gets
    its own nginx, stopped before the next starts. `params` go to the server
    (max_tokens, ttft_ms, token_ms, ...) over small defaults: 20 tokens, 100 ms to
    the first, 25 ms apart.
    """
    labels = [DIRECT, *(config.label for config in configs)]
    if len(set(labels)) != len(labels):
        raise ValueError(f"each configuration must be measured once, got {labels[1:]}")
    params = {**MEASURE_DEFAULTS, **params}
    results: dict[str, list[ChatResult]] = {}
    with tqdm(total=runs * len(labels), desc="direct vs nginx", disable=not progress) as bar:
        results[DIRECT] = []
        for _ in range(runs):
            results[DIRECT].append(stream_chat(upstream_url, prompt, **params))
            bar.update()
        for config in configs:
            bar.set_postfix_str(config.label)
            with start_nginx(upstream_url, config) as proxy:
                results[config.label] = []
                for _ in range(runs):
                    results[config.label].append(stream_chat(proxy.url, prompt, **params))
                    bar.update()
    return results
