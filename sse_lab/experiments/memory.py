"""Tank vs faucet: how much memory the server needs to buffer a reply, and to stream it.

A buffered reply is a tank: the server collects every token, joins them and
encodes one JSON body, so its memory grows with the length of the answer. A
streamed reply is a faucet: each token is encoded, written and forgotten, so the
server holds a constant amount whatever the length.

The server under test runs in a child Python process of its own (`server_process`,
started as `python -m sse_lab.experiments.memory`), so that the numbers are the server's
alone: the client that reads the reply, the notebook's kernel and its plots live
in another process. Each measurement gets a fresh process, so that no earlier
reply has left its pages behind.

The metric, `peak_bytes`: how far one reply raised the server's resident memory
(RSS, the pages of RAM the process actually occupies, whoever allocated them:
Python objects, C buffers, the allocator's slack). Just before the request the
kernel's high-water mark of the resident set is reset to the current resident
set (`echo 5 > /proc/PID/clear_refs`); once the client has read the last byte,

    peak_bytes = VmHWM after the reply - VmRSS before the request

read from /proc/PID/status. This needs Linux. The kernel counts resident memory
in pages, so `peak_bytes` moves in whole pages (`PAGE_BYTES`, 4 KiB on most
systems): a reply that raised the resident set by less than one page reads as 0. Two tempting alternatives are
wrong here: `resource.getrusage(...).ru_maxrss` is carried across fork and exec,
so a child of a 400 MB notebook kernel reports 400 MB before it does anything;
`tracemalloc` sees only Python allocations, and its bookkeeping slows every
allocation down and occupies memory of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
from tqdm.auto import tqdm

from ..background import serve_in_background
from ..client import BUFFERED_PATH, STREAM_PATH
from ..handles import stop_process
from ..instruments.sockets import WriteBufferLimit, fix_send_buffer
from ..server import Settings, create_app

MODES = {"buffered": BUFFERED_PATH, "streamed": STREAM_PATH}
PROMPT = "How much memory does a long answer cost?"
WARM_UP_TOKENS = 200
STOP_TIMEOUT_S = 5.0
PAGE_BYTES = mmap.PAGESIZE  # the resolution of peak_bytes
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class MemoryMeasurementUnavailable(RuntimeError):
    """This system has no /proc/PID/status with VmHWM and VmRSS (the measurement needs Linux)."""


class ServerProcessError(RuntimeError):
    """The server process did not start, or a reply it sent was not the complete one asked for."""


def _status_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status")
    found = re.search(rf"^{field}:\s+(\d+) kB$", status.read_text(), re.MULTILINE)
    if found is None:
        raise MemoryMeasurementUnavailable(f"{status} has no {field} line")
    return int(found.group(1))


class ServerProcess:
    """Handle on a server running in a child process (see `server_process`): its url, pid and memory."""

    def __init__(self, url: str, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.pid = process.pid
        self._process = process

    @property
    def returncode(self) -> int | None:
        """None while the child runs; its exit status once it has been reaped (-15 after SIGTERM)."""
        return self._process.returncode

    def resident_bytes(self) -> int:
        """The server's resident set now (VmRSS)."""
        return 1024 * _status_kib(self.pid, "VmRSS")

    def peak_resident_bytes(self) -> int:
        """The high-water mark of its resident set (VmHWM) since it started or since `reset_peak()`."""
        return 1024 * _status_kib(self.pid, "VmHWM")

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far, user and system, all threads (from /proc/PID/stat).

        The kernel counts it in clock ticks (usually 10 ms): measure over long enough to make that negligible.
        """
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        user_ticks, system_ticks = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        return (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")

    def reset_peak(self) -> None:
        """Lower the high-water mark to the current resident set.

        A kernel that refuses keeps the older mark, which can only overstate a later peak.
        """
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")


def _read_url(process: subprocess.Popen[bytes], stderr: IO[bytes], timeout_s: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    line = process.stdout.readline().decode().strip() if ready else ""
    if not line.startswith("http://"):
        stderr.seek(0)
        reason = f"printed {line!r}" if ready else f"printed nothing within {timeout_s} s"
        raise ServerProcessError(f"the server process {reason}; its stderr:\n{stderr.read().decode(errors='replace')}")
    return line


@contextlib.contextmanager
def server_process(
    max_tokens_limit: int,
    *,
    max_concurrent_streams: int = 32,
    sndbuf: int | None = None,
    write_buffer_high: int | None = None,
    startup_timeout_s: float = 30.0,
) -> Iterator[ServerProcess]:
    """Serve the chat app from a child Python process on 127.0.0.1, a free port, for a `with` block.

    `sndbuf`, if given, fixes the SO_SNDBUF of every connection it accepts
    (`sse_lab.instruments.sockets.fix_send_buffer`); `write_buffer_high` the
    transport's high-water mark (`sockets.WriteBufferLimit`).

    The child prints its URL once it accepts connections and serves until the block
    ends, failed or not: then it gets SIGTERM (SIGKILL if it lingers) and is reaped.
    It has nothing to save, and a graceful shutdown would add 0.3 s to every
    measurement. Should this process die first, the child sees its stdin close and
    exits: it never outlives its parent.
    """
    command = [sys.executable, "-m", "sse_lab.experiments.memory", "--max-tokens-limit", str(max_tokens_limit)]
    command += ["--max-concurrent-streams", str(max_concurrent_streams)]
    if sndbuf is not None:
        command += ["--sndbuf", str(sndbuf)]
    if write_buffer_high is not None:
        command += ["--write-buffer-high", str(write_buffer_high)]
    with (
        tempfile.TemporaryFile() as stderr,
        # Run from the directory holding this package, so the child serves this very code.
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=_PACKAGE_PARENT
        ) as process,  # its exit closes the pipes and reaps the child
    ):
        try:
            yield ServerProcess(_read_url(process, stderr, startup_timeout_s), process)
        finally:
            stop_process(process, STOP_TIMEOUT_S)


@dataclass(frozen=True)
class MemoryPoint:
    """One reply measured: `peak_bytes` as defined in the module docstring.

    `seconds` runs from sending the request to reading its last byte; `body_bytes`
    is the size of the response body; `resting_bytes` the server's resident set
    just before the request (its fixed cost: Python, Starlette, uvicorn);
    `resolution_bytes` the page size, the least rise `peak_bytes` can show.
    """

    mode: str  # "buffered" or "streamed"
    tokens: int
    peak_bytes: int
    seconds: float
    body_bytes: int
    resting_bytes: int
    resolution_bytes: int = PAGE_BYTES


def read_reply(client: httpx.Client, url: str, tokens: int, token_ms: float = 0) -> tuple[int, float]:
    """Read a reply of `tokens` tokens (ttft_ms=0, one per `token_ms`) chunk by chunk, keeping only its size and tail.

    Returns (bytes, seconds); raises ServerProcessError unless it was complete.
    """
    params: dict[str, str | int | float] = {"prompt": PROMPT, "max_tokens": tokens, "ttft_ms": 0, "token_ms": token_ms}
    started = time.perf_counter()
    with client.stream("GET", url, params=params) as response:
        size, tail = 0, b""
        for chunk in response.iter_bytes():
            size += len(chunk)
            tail = (tail + chunk)[-200:]
    seconds = time.perf_counter() - started
    # Both endpoints end by stating the count: `"tokens":N` in the JSON body or in the `done` event.
    if response.status_code != 200 or f'"tokens":{tokens}'.encode() not in tail:
        raise ServerProcessError(f"HTTP {response.status_code} from {url}, not {tokens} tokens; body ends {tail!r}")
    return size, seconds


def measure_reply(mode: str, tokens: int, *, timeout_s: float = 600.0) -> MemoryPoint:
    """Measure one reply of `tokens` tokens (ttft_ms=0, token_ms=0) in a fresh server process.

    The server first answers one small request on each endpoint, so that first-use
    costs (lazy imports, parser buffers) belong to its resting memory, not to the reply.
    Raises MemoryMeasurementUnavailable on a system without Linux's /proc.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not Path("/proc/self/status").exists():
        raise MemoryMeasurementUnavailable("measuring the server's memory needs Linux's /proc/PID/status")
    with (
        server_process(max(tokens, WARM_UP_TOKENS)) as server,
        httpx.Client(trust_env=False, timeout=timeout_s) as client,
    ):
        for path in MODES.values():
            read_reply(client, server.url + path, WARM_UP_TOKENS)
        resting = server.resident_bytes()
        server.reset_peak()
        body_bytes, seconds = read_reply(client, server.url + MODES[mode], tokens)
        peak = server.peak_resident_bytes() - resting
    return MemoryPoint(mode, tokens, peak, seconds, body_bytes, resting)


def tank_vs_faucet(
    token_counts: tuple[int, ...] = (1_000, 3_000, 10_000), *, progress: bool = True
) -> list[MemoryPoint]:
    """The server's peak memory for a buffered and a streamed reply of each length, each in a fresh process.

    The defaults take about 3 s. Each measurement starts a server process (about
    0.3 s); then, at ttft_ms=0 and token_ms=0, a streamed reply costs about 30 µs
    per token, server and client together (one event, one write, one parse each),
    and a buffered one about 5 µs: 100,000 tokens take about 3 s streamed, 0.5 s
    buffered.
    """
    runs = [(mode, tokens) for tokens in token_counts for mode in MODES]
    return [measure_reply(mode, tokens) for mode, tokens in tqdm(runs, desc="tank vs faucet", disable=not progress)]


def _serve_until_stdin_closes(
    max_tokens_limit: int,
    stdin: IO[bytes],
    max_concurrent_streams: int = 32,
    sndbuf: int | None = None,
    write_buffer_high: int | None = None,
) -> None:
    # Room for the prompt and the longest reply, and time for it: else the stream ends early with an error event.
    settings = Settings(
        max_tokens_limit=max_tokens_limit,
        context_window=max_tokens_limit + 1_000,
        max_stream_s=3_600,
        max_concurrent_streams=max_concurrent_streams,
    )
    app = create_app(settings)
    with serve_in_background(
        app if write_buffer_high is None else WriteBufferLimit(app, write_buffer_high), loop="asyncio"
    ) as server:
        if sndbuf is not None:
            fix_send_buffer(server, sndbuf)
        print(server.url, flush=True)
        stdin.read()  # returns at end of file: the measuring process closed the pipe, or died


def main(argv: list[str] | None = None) -> None:
    """The child's entry point: `python -m sse_lab.experiments.memory --max-tokens-limit N`."""
    description = "Serve the chat app on 127.0.0.1, a free port; print its URL once ready; stop when stdin closes."
    parser = argparse.ArgumentParser(prog="python -m sse_lab.experiments.memory", description=description)
    parser.add_argument("--max-tokens-limit", type=int, required=True, help="the largest max_tokens to allow")
    parser.add_argument("--max-concurrent-streams", type=int, default=32, help="more streams at once get 429")
    parser.add_argument("--sndbuf", type=int, help="a fixed SO_SNDBUF for every connection (default: autotuned)")
    parser.add_argument("--write-buffer-high", type=int, help="the transport's high-water mark (default: 64 KiB)")
    args = parser.parse_args(argv)
    _serve_until_stdin_closes(
        args.max_tokens_limit, sys.stdin.buffer, args.max_concurrent_streams, args.sndbuf, args.write_buffer_high
    )


if __name__ == "__main__":
    main()
