from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sse_lab.experiments.beyond_one_process import fault_run, kill_producer, kill_serving_worker
from sse_lab.generations import WORKER_HEADER
from sse_lab.parts.cluster import Cluster, WorkerOptions, start_cluster
from sse_lab.parts.nginx import upstream_conf
from sse_lab.parts.redis import SKIP_MESSAGE, redis_or_skip
from tests.conftest import wait_for
from tests.parts.test_nginx import alive

FAST = WorkerOptions(retry_ms=50, lease_ms=400, generation_grace_s=1.0)


def cluster_directories() -> set[Path]:
    return {
        path
        for prefix in ("sse-lab-cluster-*", "sse-lab-redis-*", "sse-lab-nginx-*")
        for path in Path(tempfile.gettempdir()).glob(prefix)
    }


@pytest.fixture(scope="module")
def cluster(nginx_binary: str) -> Iterator[Cluster]:
    if redis_or_skip() is None:
        pytest.skip(SKIP_MESSAGE)
    with start_cluster(2, FAST) as running:
        yield running


def test_the_upstream_config_spreads_over_every_worker_with_the_event_stream_settings() -> None:
    conf = upstream_conf(["http://127.0.0.1:7001", "http://127.0.0.1:7002"], 9000)
    for line in ("least_conn;", "server 127.0.0.1:7001", "server 127.0.0.1:7002", "proxy_buffering off;"):
        assert line in conf
    assert "proxy_read_timeout 30s;" in conf
    with pytest.raises(ValueError, match="upstream"):
        upstream_conf(["http://127.0.0.1:7001/path"], 9000)


def test_every_worker_serves_through_nginx_and_names_itself(cluster: Cluster) -> None:
    seen = {httpx.get(cluster.url + "/api/stats", trust_env=False).headers[WORKER_HEADER] for _ in range(4)}
    assert seen == {str(worker.pid) for worker in cluster.workers}


def test_a_stream_survives_the_sigkill_of_its_worker_with_the_exact_text(cluster: Cluster) -> None:
    scenario = kill_serving_worker(cluster, generation=f"kill-{os.getpid()}", max_tokens=30, kill_after=10)
    assert scenario.stream.text == scenario.expected
    assert scenario.stream.duplicated == 0
    workers = [leg.worker for leg in scenario.stream.legs]
    assert workers[0] == str(scenario.killed) and workers[-1] != str(scenario.killed)


def test_a_dead_producer_is_taken_over_and_both_readers_get_the_exact_text(cluster: Cluster) -> None:
    scenario = kill_producer(cluster, generation=f"producer-{os.getpid()}", max_tokens=30, kill_after=8)
    assert scenario.watcher is not None
    assert scenario.stream.text == scenario.expected
    assert scenario.watcher.text == scenario.expected
    assert scenario.watcher.duplicated == 0
    # The watcher waited for the lease to run out (0.4 s) and a new prefill (0.1 s): a takeover, not a replay.
    assert scenario.next_token_after_fault(scenario.watcher) > 0.3


def test_a_seeded_fault_run_loses_and_duplicates_no_token(cluster: Cluster) -> None:
    run = fault_run(cluster, faults=15, kill_share=0.15, interval_s=0.1, concurrency=4, seed=3, progress=False)
    assert [kind for _, kind in run.faults].count("cut") >= 10
    assert run.tokens > 0
    assert (run.lost, run.duplicated, run.wrong_texts) == (0, 0, 0)


def test_stopping_the_cluster_ends_every_process_and_removes_every_directory(nginx_binary: str) -> None:
    if redis_or_skip() is None:
        pytest.skip(SKIP_MESSAGE)
    before = cluster_directories()
    cluster = start_cluster(1, FAST)
    pids = [cluster.redis.pid, cluster.proxy.pid, *(worker.pid for worker in cluster.workers)]
    assert all(alive(pid) for pid in pids)
    cluster.stop()
    assert not any(alive(pid) for pid in pids)
    assert cluster_directories() == before


def test_the_cluster_command_prints_its_workers_and_stops_everything_on_sigterm(nginx_binary: str) -> None:
    if redis_or_skip() is None:
        pytest.skip(SKIP_MESSAGE)
    command = [sys.executable, "-m", "sse_lab", "cluster", "--workers", "1", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("sse-lab cluster on http://127.0.0.1:")
        pid = int(lines[1].split()[2])
        assert alive(pid)
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=15)
    assert process.returncode == 0
    assert "sse-lab cluster stopped" in out
    wait_for(lambda: not alive(pid), what="the worker to stop")
