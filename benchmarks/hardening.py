"""Before/after figures for the hardening findings, against `python -m sse_lab serve` in a child process.

    .venv/bin/python benchmarks/hardening.py                       # this checkout
    .venv/bin/python benchmarks/hardening.py --python ../old/.venv/bin/python --cwd ../old   # another checkout (before)

Figures (Linux: read from /proc/PID of the server):
- rss: the server's resident memory (VmRSS) before, and its peak (VmHWM), while one connection
  sends an unfinished header of `--header-mb` MB (it stops once the server refuses or closes), and
  the median latency of `GET /api/stats` from another client meanwhile.
- half_sent: descriptors the server holds for 200 connections that sent part of a request line,
  `--wait-s` seconds later (open descriptors minus those before), and how many the server closed.
- buffered: of 100 concurrent `GET /api/chat?ttft_ms=60000&max_tokens=4096&token_ms=10000`, how many
  were refused (HTTP 429) within 3 s, and how many the server holds.
Results print as JSON, with the command line. Timing figures are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PARTIAL_LINE = b"GET /api/chat/stream?prompt=h"
SLOW_CHAT = b"GET /api/chat?prompt=hi&ttft_ms=60000&max_tokens=4096&token_ms=10000 HTTP/1.1\r\nHost: lab\r\n\r\n"


def start_server(python: str, cwd: str) -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen(
        [python, "-m", "sse_lab", "serve", "--port", "0"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    return child, int(line.split("http://127.0.0.1:")[1].split()[0])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stats_latency_ms(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(b"GET /api/stats HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        while sock.recv(65536):
            pass
        return (time.perf_counter() - started) * 1000


def oversized_header(pid: int, port: int, megabytes: int) -> dict[str, object]:
    before = status_kib(pid, "VmRSS")
    latencies: list[float] = []
    sending = threading.Event()
    sending.set()

    def probe() -> None:
        while sending.is_set():
            latencies.append(stats_latency_ms(port))
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /api/stats HTTP/1.1\r\nHost: lab\r\nX-Big: ")
    block = b"a" * (1 << 20)
    sent_mb = 0
    answer = b""
    prober.start()
    try:
        for sent_mb in range(1, megabytes + 1):  # noqa: B007  # the count reached is a result
            sock.sendall(block)
            sock.setblocking(False)
            try:
                answer = sock.recv(65536)
                break  # the server answered (or closed: b"")
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
    except OSError:  # the server closed the connection while we were sending
        pass
    finally:
        sending.clear()
        prober.join()
        sock.close()
    return {
        "rss_before_mb": round(before / 1024, 1),
        "rss_peak_mb": round(status_kib(pid, "VmHWM") / 1024, 1),
        "sent_mb_until_refused": sent_mb,
        "answer": answer.split(b"\r\n", 1)[0].decode(errors="replace"),
        "stats_latency_ms_median_while_sending": round(statistics.median(latencies), 2) if latencies else None,
    }


def half_sent(pid: int, port: int, connections: int, wait_s: float) -> dict[str, object]:
    before = open_fds(pid)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    for sock in socks:
        sock.sendall(PARTIAL_LINE)
    time.sleep(1.0)
    held_at_1s = open_fds(pid) - before
    time.sleep(max(0.0, wait_s - 1.0))
    held = open_fds(pid) - before
    closed = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            sock.recv(65536)
            closed += 1  # an answer or EOF: the server ended it
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        sock.close()
    return {"connections": connections, "held_after_1s": held_at_1s, f"held_after_{wait_s:g}s": held, "closed": closed}


def buffered(pid: int, port: int, requests: int) -> dict[str, object]:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(requests)]
    for sock in socks:
        sock.sendall(SLOW_CHAT)
    deadline = time.monotonic() + 3.0
    refused = unanswered = 0
    for sock in socks:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            refused += sock.recv(65536).startswith(b"HTTP/1.1 429")
        except OSError:
            unanswered += 1
    held = stats_json(port).get("chats_active", "no such counter")
    for sock in socks:
        sock.close()
    return {"requests": requests, "refused_429_within_3s": refused, "held_unanswered": unanswered, "chats_active": held}


def stats_json(port: int) -> dict[str, int]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /api/stats HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the server")
    parser.add_argument("--cwd", default=".", help="the checkout it runs from")
    parser.add_argument("--header-mb", type=int, default=200)
    parser.add_argument("--wait-s", type=float, default=7.0, help="after the half-sent requests (default 5 s timeout)")
    args = parser.parse_args()
    results: dict[str, object] = {"command": " ".join(sys.argv)}
    for name, measure in [
        ("rss", lambda pid, port: oversized_header(pid, port, args.header_mb)),
        ("half_sent", lambda pid, port: half_sent(pid, port, 200, args.wait_s)),
        ("buffered", lambda pid, port: buffered(pid, port, 100)),
    ]:
        child, port = start_server(args.python, args.cwd)
        try:
            results[name] = measure(child.pid, port)
        finally:
            child.terminate()
            child.wait(10)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
