from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sse_lab.experiments.memory import server_process, tank_vs_faucet

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the measurement needs Linux's /proc")


def children() -> set[int]:
    """This process's child processes, zombies included, from /proc/PID/stat."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, ...
        except (FileNotFoundError, ProcessLookupError):  # ended while we looked
            continue
        if int(fields[1]) == os.getpid():
            found.add(int(stat.parent.name))
    return found


def test_a_buffered_reply_grows_the_server_while_a_streamed_one_does_not() -> None:
    before = children()
    points = {(point.mode, point.tokens): point for point in tank_vs_faucet((1_000, 10_000), progress=False)}
    assert children() == before  # every server process was reaped

    kib = 1024
    buffered_1k, buffered_10k = points["buffered", 1_000].peak_bytes, points["buffered", 10_000].peak_bytes
    streamed_1k, streamed_10k = points["streamed", 1_000].peak_bytes, points["streamed", 10_000].peak_bytes
    # Measured: buffered about 90 bytes per token (86 KiB, 0.9 MiB); streamed a few KiB at both sizes.
    assert buffered_10k > 400 * kib
    assert buffered_10k > 4 * buffered_1k
    assert streamed_1k < 256 * kib and streamed_10k < 256 * kib
    assert streamed_10k < buffered_10k / 4
    # The streamed body is the larger one: what the faucet saves is not bytes on the wire.
    assert points["streamed", 10_000].body_bytes > points["buffered", 10_000].body_bytes > 10_000


def test_server_process_serves_then_is_reaped_even_when_the_caller_fails() -> None:
    with pytest.raises(RuntimeError, match="caller failed"), server_process(10) as server:
        pid = server.pid
        assert pid in children() and server.returncode is None
        params = {"prompt": "hi", "max_tokens": 3, "ttft_ms": 0, "token_ms": 0}
        assert httpx.get(server.url + "/api/chat", params=params, trust_env=False).json()["tokens"] == 3
        assert 0 < server.resident_bytes() <= server.peak_resident_bytes()
        raise RuntimeError("caller failed")
    assert server.returncode is not None
    assert pid not in children()
    assert not Path(f"/proc/{pid}").exists()


def test_the_server_process_exits_by_itself_when_its_parent_goes() -> None:
    # A parent that dies closes the child's stdin: that alone must end the child, cleanly.
    command = [sys.executable, "-m", "sse_lab.experiments.memory", "--max-tokens-limit", "10"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdin is not None and child.stderr is not None
            ready, _, _ = select.select([child.stdout], [], [], 30)
            assert ready, "the server process printed nothing within 30 s"
            assert child.stdout.readline().startswith(b"http://127.0.0.1:")
            child.stdin.close()
            assert child.wait(timeout=10) == 0
            errors = child.stderr.read()
        finally:
            child.kill()
    assert b"Traceback" not in errors
