from __future__ import annotations

import pytest

from sse_lab import BackgroundServer
from sse_lab.experiments.proxy import DIRECT, measure_proxies
from sse_lab.metrics import ChatResult
from sse_lab.parts.nginx import ProxyConfig
from tests.conftest import ALL_PROXY_CONFIGS

UPSTREAM = "http://127.0.0.1:8000"
# What nginx 1.22 measured: only gzip with the upstream's X-Accel-Buffering ignored holds the tokens back.
HOLDS_TOKENS_BACK = {ProxyConfig(gzip=True, ignore_accel_buffering=True)}
TOKENS, TOKEN_MS = 6, 40  # 200 ms from the first token to the last


def spread(result: ChatResult) -> float:
    """From the first token's arrival to the last's: about 0 when they came in one lump."""
    assert result.ttft is not None and result.e2e is not None
    return result.e2e - result.ttft


def test_no_configuration_is_labelled_like_the_direct_stream() -> None:
    assert DIRECT not in {config.label for config in ALL_PROXY_CONFIGS}


def test_measuring_a_configuration_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="once"):
        measure_proxies(UPSTREAM, [ProxyConfig(), ProxyConfig()], progress=False)


# What each configuration does to the tokens, measured in one run


@pytest.fixture(scope="module")
def measured(nginx_binary: str, server: BackgroundServer) -> dict[str, list[ChatResult]]:
    """Every configuration, and the direct stream, measured once in the same run."""
    return measure_proxies(
        server.url, ALL_PROXY_CONFIGS, runs=1, progress=False, max_tokens=TOKENS, ttft_ms=0, token_ms=TOKEN_MS
    )


def test_measure_proxies_runs_direct_then_each_configuration(measured: dict[str, list[ChatResult]]) -> None:
    assert list(measured) == [DIRECT, *(config.label for config in ALL_PROXY_CONFIGS)]
    assert all(len(runs) == 1 for runs in measured.values())
    assert len({run.text for runs in measured.values() for run in runs}) == 1


@pytest.mark.parametrize("config", ALL_PROXY_CONFIGS, ids=lambda config: config.label)
def test_what_each_configuration_does_to_the_tokens(measured: dict[str, list[ChatResult]], config: ProxyConfig) -> None:
    (direct,) = measured[DIRECT]
    (proxied,) = measured[config.label]
    assert proxied.tokens == direct.tokens == TOKENS
    if config in HOLDS_TOKENS_BACK:
        # in one lump at the end: the wait for the first token is the wait for the last
        assert spread(proxied) < 0.2 * spread(direct)
        assert proxied.ttft is not None and direct.ttft is not None
        assert proxied.ttft > direct.ttft + 0.5 * spread(direct)
    else:
        # spread out like the direct stream
        assert spread(proxied) > 0.5 * spread(direct)
