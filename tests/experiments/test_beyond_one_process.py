from __future__ import annotations

import pytest

from sse_lab.experiments.beyond_one_process import Arrival, FaultRun, Follow, Leg, redis_cost, throughput
from sse_lab.parts.cluster import WorkerOptions, start_cluster
from sse_lab.parts.redis import SKIP_MESSAGE, redis_or_skip


@pytest.fixture
def redis_binary() -> None:
    if redis_or_skip() is None:
        pytest.skip(SKIP_MESSAGE)


def test_time_lost_is_fault_to_next_token_and_attributed_to_the_last_fault() -> None:
    record = Follow("g", "p", {"max_tokens": 3})
    record.arrivals = [Arrival(0, "a", 1.0, "7"), Arrival(1, "b", 2.5, "8"), Arrival(2, "c", 4.2, "8")]
    record.legs = [Leg(0.0, "7", 1.0, 2.0, "lost"), Leg(2.1, "8", 2.5, 4.0, "cut"), Leg(4.0, "8", 4.2, 5.0, "done")]
    run = FaultRun([record], {"g": "abd"}, [(1.9, "kill"), (3.9, "cut")])
    assert run.time_lost("kill") == [pytest.approx(0.6)]
    assert run.time_lost("cut") == [pytest.approx(0.3)]
    assert (run.lost, run.duplicated, run.wrong_texts) == (0, 0, 1)


def test_redis_cost_measures_both_paths(redis_binary: None) -> None:
    cost = redis_cost(runs=1, max_tokens=5, ttft_ms=10, token_ms=5)
    assert cost.ttft_ms_plain >= 10 and cost.ttft_ms_redis >= 10  # no token before its prefill
    assert 0 < cost.bytes_per_token < 1_000


def test_throughput_counts_every_token(redis_binary: None, nginx_binary: str) -> None:
    with start_cluster(1, WorkerOptions(retry_ms=50, lease_ms=400)) as cluster:
        assert throughput(cluster, streams=2, concurrency=2, max_tokens=10) > 0
