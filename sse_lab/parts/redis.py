"""A real Redis server for the cluster, started and stopped by the kit like its nginx.

`start_redis` runs `redis-server` on a free loopback port from a private temporary
directory, with no persistence (`--save "" --appendonly no`: nothing is written
to disk) and protected mode on, waits until it answers PING, and returns a
`RedisServer` handle whose `url` the workers connect to (`redis://127.0.0.1:P/0`).
Stopping it (`stop()`, the end of a `with`, garbage collection or the end of the
interpreter) ends the server and deletes the directory, even when starting failed.

Redis is a system package (Debian `redis-server`, conda-forge `redis`):
`redis_or_skip()` lets a notebook skip the cluster when it is missing, unless
`SSE_LAB_REQUIRE_SYSTEM_PARTS=1` (set in CI) makes a missing Redis an error.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

from ..handles import Stoppable, stop_process
from . import _system
from ._system import free_port as _free_port

SYSTEM_BINARY_DIR = "/usr/bin"  # where Debian and Ubuntu put redis-server
INSTALL_HINT = "apt-get install redis-server, or conda install -c conda-forge redis"
SKIP_MESSAGE = f"redis-server not found: skipping the cluster experiments ({INSTALL_HINT})"
STOP_TIMEOUT_S = 2.0
PORT_ATTEMPTS = 5
_LOG = "redis.log"


class RedisNotFoundError(RuntimeError):
    """No redis-server binary on PATH or in /usr/bin."""


class RedisStartError(RuntimeError):
    """redis-server did not start or did not answer PING in time (the message quotes its log)."""


def find_redis() -> str | None:
    """The redis-server binary: the one on PATH, else /usr/bin/redis-server; None when there is neither."""
    return shutil.which("redis-server") or shutil.which("redis-server", path=SYSTEM_BINARY_DIR)


def redis_or_skip() -> str | None:
    """The redis-server binary, or None after printing one line saying the cluster experiments are skipped.

    With SSE_LAB_REQUIRE_SYSTEM_PARTS=1 in the environment (CI sets it) a missing
    Redis raises RedisNotFoundError instead.
    """
    missing = f" but is neither on PATH nor in {SYSTEM_BINARY_DIR}"
    return _system.require_or_skip(find_redis(), "redis-server", missing, SKIP_MESSAGE, RedisNotFoundError)


class RedisServer(Stoppable):
    """Handle on a running redis-server: its `url`, `port`, `pid`, and `stop()`; also a context manager."""

    def __init__(self, process: subprocess.Popen[bytes], directory: Path, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.directory = directory  # the server's working directory and log; stop() deletes it
        self.pid = process.pid
        self._process = process
        self._stop = weakref.finalize(self, _stop_and_remove, process, directory)

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> None:
        """Stop the server and delete its directory; idempotent."""
        self._stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} {'running' if self.running else 'stopped'}>"


def start_redis(*, startup_timeout_s: float = 10.0) -> RedisServer:
    """Run redis-server on a free loopback port, without persistence; return once it answers PING.

    Raises RedisNotFoundError without redis-server and RedisStartError when it does
    not start in time. Nothing is left behind when it fails: no process, no directory.
    """
    binary = find_redis()
    if binary is None:
        raise RedisNotFoundError(f"redis-server is neither on PATH nor in {SYSTEM_BINARY_DIR} ({INSTALL_HINT})")
    deadline = time.monotonic() + startup_timeout_s
    directory = Path(tempfile.mkdtemp(prefix="sse-lab-redis-"))
    try:
        # Redis cannot report a port it picked: the kit finds a free one and tries
        # another when something else takes it first.
        for _ in range(PORT_ATTEMPTS):
            port = _free_port()
            process = _launch(binary, directory, port)
            try:
                if _wait_until_ready(process, directory, port, deadline, startup_timeout_s):
                    return RedisServer(process, directory, port)
            except BaseException:
                _stop_process(process)
                raise
            _stop_process(process)
        raise RedisStartError(f"{PORT_ATTEMPTS} free ports in a row were taken before redis-server could bind them")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _launch(binary: str, directory: Path, port: int) -> subprocess.Popen[bytes]:
    arguments = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--daemonize",
        "no",
    ]
    with (directory / _LOG).open("wb") as log:
        return subprocess.Popen(
            arguments, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=directory, start_new_session=True
        )


def _wait_until_ready(
    process: subprocess.Popen[bytes], directory: Path, port: int, deadline: float, timeout_s: float
) -> bool:
    """True once the server answers PING; False when the port was taken; RedisStartError when it fails."""
    answered = _system.wait_until_ready(
        process,
        lambda: _answers_ping(port),
        directory / _LOG,
        deadline,
        timeout_s,
        name="redis-server",
        readiness=f"answer PING on port {port}",
        error_type=RedisStartError,
    )
    return answered and process.poll() is None  # not another server's PONG


def _answers_ping(port: int) -> bool:
    """A raw PING in the inline protocol: no client library needed to know the server is up."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM: Redis exits at once (nothing to save); SIGKILL if it does not."""
    stop_process(process, STOP_TIMEOUT_S)


def _stop_and_remove(process: subprocess.Popen[bytes], directory: Path) -> None:
    _stop_process(process)
    shutil.rmtree(directory, ignore_errors=True)
