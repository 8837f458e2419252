from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sse_lab import Settings, create_app, serve_in_background, stream_chat
from sse_lab.cli import main


def test_demo_prints_a_table_and_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "figures" / "demo.png"
    argv = ["demo", "--runs", "2", "--tokens", "5", "--ttft-ms", "20", "--token-ms", "20", "--output", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^streamed\s+2\s", printed, re.MULTILINE)
    assert re.search(r"^buffered\s+2\s", printed, re.MULTILINE)
    assert output.read_bytes().startswith(b"\x89PNG")


def test_serve_runs_until_interrupted_then_stops_cleanly() -> None:
    command = [sys.executable, "-m", "sse_lab", "serve", "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            ready, _, _ = select.select([process.stdout], [], [], 30)
            assert ready, "the server printed nothing within 30 s"
            banner = process.stdout.readline()  # printed once the server accepts connections
            url = re.search(r"http://127\.0\.0\.1:\d+", banner)
            assert url, f"no URL in {banner!r}; stderr: {process.stderr.read() if process.poll() else ''}"
            assert stream_chat(url.group(), "hi", max_tokens=3, ttft_ms=0, token_ms=0).tokens == 3
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=10)
        finally:
            process.kill()
    assert process.returncode == 0
    assert "stopped" in out
    assert "Traceback" not in err


def test_serve_refuses_a_port_in_use_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "sse_lab", "serve", "--port", str(port)]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert finished.returncode == 1
    assert finished.stderr == f"sse-lab: cannot serve on 127.0.0.1:{port}: Address already in use\n"


def test_load_runs_the_acceptance_command_and_writes_the_json_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "load.json"
    with serve_in_background(create_app(Settings(max_concurrent_streams=100))) as server:
        argv = ["load", "--url", server.url, "--concurrency", "6", "--requests", "6", "--ramp", "0.2"]
        argv += ["--max-tokens", "5", "--ttft-ms", "0", "--token-ms", "10", "--json", str(report)]
        assert main([*argv, "--goodput", "ttft:1000", "tpot:500"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^requests 6 in ", printed, re.MULTILINE) and re.search(r"^lateness\s", printed, re.MULTILINE)
    summary = json.loads(report.read_text())
    assert summary["requests"] == 6 and summary["errors"] == {} and summary["goodput"] is not None
    assert list(summary["client"]) == ["workers", "cpu_percent", "send_lag_ms"]


def test_load_refuses_a_plan_without_a_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", "--url", "http://127.0.0.1:9", "--requests", "3"]) == 2
    assert "give a concurrency" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["load", "--url", "http://127.0.0.1:9", "--concurrency", "1", "--requests", "1", "--goodput", "x:1"])


def test_serve_takes_max_streams() -> None:
    command = [sys.executable, "-m", "sse_lab", "serve", "--port", "0", "--max-streams", "0"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert finished.returncode == 2 and "--max-streams" in finished.stderr
