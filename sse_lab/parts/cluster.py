"""A cluster on one machine: Redis, N worker processes and nginx in front, started and stopped together.

    client ──▶ nginx 127.0.0.1:P ──least_conn──▶ worker 1 (uvicorn, own process, 127.0.0.1:A) ─┐
                                              └─▶ worker 2 (127.0.0.1:B) ────────────────────────┤
                                                                      Redis 127.0.0.1:R ◀─────────┘

`start_cluster(workers=2)` returns a `Cluster` handle (a context manager): its
`url` is nginx's, `workers` lists each `Worker`'s pid, port and url, `kill(worker)`
sends SIGKILL (the worker dies with its streams and its leases), `restart(worker)`
starts a new process on the same port. Stopping the cluster (the `with`, `stop()`,
garbage collection or the end of the interpreter) stops the workers, nginx and
Redis and deletes every temporary directory, even when starting failed.

A worker is `python -m sse_lab.parts.cluster --redis-url URL --port 0 ...`: the app
of `create_app(Settings(redis_url=...))` in `serve_in_background`, which prints
one line, `sse-lab worker <pid> <url>`, once it accepts connections, and stops
cleanly on SIGTERM (handing its leases back). `python -m sse_lab cluster` runs
a cluster in the foreground.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

from ..handles import Stoppable, stop_process
from .nginx import NginxProxy, start_nginx_upstream
from .redis import RedisServer, start_redis

READY_PREFIX = "sse-lab worker "
STOP_TIMEOUT_S = 3.0


class WorkerStartError(RuntimeError):
    """A worker process exited or did not say it was ready in time (the message quotes its log)."""


@dataclass(frozen=True)
class WorkerOptions:
    """The Settings a worker runs with, beyond its Redis URL: see `sse_lab.server.Settings`."""

    retry_ms: int = 3_000
    lease_ms: int = 1_500
    generation_grace_s: float | None = None
    stream_expire_s: float = 600.0
    heartbeat_s: float = 15.0
    max_concurrent_streams: int = 32


@dataclass
class Worker:
    """One worker process: its `pid`, `port` and `url`, and the log its stderr goes to."""

    pid: int
    port: int
    url: str
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def running(self) -> bool:
        return self.process.poll() is None


class Cluster(Stoppable):
    """Handle on Redis, the workers and nginx: `url` (nginx's), `workers`, `kill()`, `restart()`, `stop()`."""

    def __init__(self, directory: Path, redis: RedisServer, options: WorkerOptions) -> None:
        self.directory = directory  # the workers' logs; stop() deletes it
        self.redis = redis
        self.options = options
        self.workers: list[Worker] = []
        self._proxies: list[NginxProxy] = []  # nginx, once started: a list the finalizer can hold without the handle
        self._lock = threading.Lock()
        self._stop = weakref.finalize(self, _stop_all, self._proxies, self.workers, redis, directory)

    @property
    def proxy(self) -> NginxProxy:
        return self._proxies[0]

    @property
    def url(self) -> str:
        """nginx's URL: where clients connect."""
        return self.proxy.url

    def worker(self, pid: int | str) -> Worker:
        """The worker with this pid (as `X-SSE-Lab-Worker` gives it)."""
        return next(worker for worker in self.workers if worker.pid == int(pid))

    def kill(self, worker: Worker) -> None:
        """SIGKILL: the worker dies at once, its streams cut and its leases left to run out."""
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGKILL)
        _stop_process(worker.process)  # reaps it and closes its pipe

    def restart(self, worker: Worker, *, startup_timeout_s: float = 10.0) -> Worker:
        """Start a new worker process on the port of `worker` (killed or stopped first); return it."""
        if worker.running:
            _stop_process(worker.process)
        with self._lock:
            replacement = _start_worker(self.redis.url, self.options, self.directory, worker.port, startup_timeout_s)
            self.workers[self.workers.index(worker)] = replacement
        return replacement

    def stop(self) -> None:
        """Stop the workers, nginx and Redis, delete the temporary directories; idempotent."""
        self._stop()

    def __repr__(self) -> str:
        pids = ", ".join(f"{worker.pid}:{worker.port}" for worker in self.workers)
        return f"<Cluster {self.url if self._proxies else '-'} workers [{pids}] redis {self.redis.port}>"


def start_cluster(
    workers: int = 2, options: WorkerOptions | None = None, *, port: int = 0, startup_timeout_s: float = 20.0
) -> Cluster:
    """Start Redis, `workers` worker processes (each waited for) and nginx in front on `port` (0: a free one).

    Raises RedisNotFoundError or NginxNotFoundError when a part is missing, and
    WorkerStartError when a worker does not start; nothing is left running then.
    """
    if workers < 1:
        raise ValueError(f"a cluster needs at least 1 worker, got {workers}")
    options = options or WorkerOptions()
    redis = start_redis()
    directory = Path(tempfile.mkdtemp(prefix="sse-lab-cluster-"))
    cluster = Cluster(directory, redis, options)
    launched: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        launched += [_launch_worker(redis.url, options, directory, 0) for _ in range(workers)]  # start in parallel
        for process, log in launched:
            cluster.workers.append(_await_ready(process, log, startup_timeout_s))
        cluster._proxies.append(start_nginx_upstream([worker.url for worker in cluster.workers], port=port))
    except BaseException:
        for process, _ in launched:
            _stop_process(process)
        cluster.stop()
        raise
    return cluster


def _start_worker(
    redis_url: str | None, options: WorkerOptions, directory: Path, port: int, timeout_s: float
) -> Worker:
    return _await_ready(*_launch_worker(redis_url, options, directory, port), timeout_s)


@contextlib.contextmanager
def start_worker(
    redis_url: str | None, options: WorkerOptions, directory: Path, *, startup_timeout_s: float = 20.0
) -> Iterator[Worker]:
    """One worker process alone (no nginx), its log in `directory`; without `redis_url`, the single-process app."""
    worker = _start_worker(redis_url, options, directory, 0, startup_timeout_s)
    try:
        yield worker
    finally:
        _stop_process(worker.process)


def _launch_worker(
    redis_url: str | None, options: WorkerOptions, directory: Path, port: int
) -> tuple[subprocess.Popen[bytes], Path]:
    log = Path(tempfile.mkstemp(prefix="worker-", suffix=".log", dir=directory)[1])
    command = [sys.executable, "-m", "sse_lab.parts.cluster", "--port", str(port)]
    command += ["--options", json.dumps(asdict(options))]
    command += [] if redis_url is None else ["--redis-url", redis_url]
    with log.open("wb") as errors:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
    return process, log


def _await_ready(process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> Worker:
    try:
        line = _ready_line(process, timeout_s)
    except BaseException:
        _stop_process(process)
        raise
    if not line.startswith(READY_PREFIX):
        _stop_process(process)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
        raise WorkerStartError(f"worker exited with status {process.returncode} before it was ready:\n{tail}")
    pid, url = line.removeprefix(READY_PREFIX).split()
    return Worker(int(pid), int(url.rsplit(":", 1)[1]), url, log, process)


def _ready_line(process: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The worker's first line on stdout, within `timeout_s`; '' when it exits first."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            raise WorkerStartError(f"worker {process.pid} did not say it was ready within {timeout_s} s")
    return process.stdout.readline().decode().strip()


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, SIGKILL if need be (the worker alone: it shares the kit's process group), then close its pipe."""
    stop_process(process, STOP_TIMEOUT_S)
    if process.stdout is not None:
        process.stdout.close()


def _stop_all(proxies: list[NginxProxy], workers: list[Worker], redis: RedisServer, directory: Path) -> None:
    for proxy in proxies:
        proxy.stop()
    for worker in workers:  # SIGTERM to all first: they stop in parallel
        if worker.running:
            worker.process.terminate()
    for worker in workers:
        _stop_process(worker.process)
    redis.stop()
    shutil.rmtree(directory, ignore_errors=True)


def run_cluster(workers: int, port: int) -> None:
    """`python -m sse_lab cluster`: start a cluster, print who is where, run until Ctrl-C (or SIGTERM)."""
    with start_cluster(workers, port=port) as cluster:
        with contextlib.suppress(KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI raises SystemExit)
            print(f"sse-lab cluster on {cluster.url} (Ctrl-C to stop); redis on port {cluster.redis.port}", flush=True)
            for worker in cluster.workers:
                print(f"  worker pid {worker.pid} on port {worker.port}", flush=True)
            print(
                f"  try: curl -N -i '{cluster.url}/api/chat/stream?prompt=hi&token_ms=200&generation=mine'", flush=True
            )
            threading.Event().wait()
        for stop_signal in (signal.SIGINT, signal.SIGTERM):  # a second one must not cut the cleanup short
            signal.signal(stop_signal, signal.SIG_IGN)
    print("sse-lab cluster stopped", flush=True)


# The worker process


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_worker(redis_url: str | None, port: int, options: WorkerOptions) -> None:
    """Serve the cluster app on 127.0.0.1:`port` (0: a free one) until SIGTERM; say so on stdout once ready."""
    from ..background import serve_in_background
    from ..server import Settings, create_app

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    settings = Settings(redis_url=redis_url, **asdict(options))
    with serve_in_background(create_app(settings), port=port) as server:
        print(f"{READY_PREFIX}{os.getpid()} {server.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sse_lab.parts.cluster", description="One worker of the cluster.")
    parser.add_argument("--redis-url", help="the cluster's Redis; without it, the single-process app")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--options", default="{}", help="WorkerOptions as JSON")
    args = parser.parse_args(argv)
    run_worker(args.redis_url, args.port, WorkerOptions(**json.loads(args.options)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
