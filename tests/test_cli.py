from __future__ import annotations

import argparse
import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from sse_lab import BackgroundServer, Settings, create_app, serve_in_background, stream_chat
from sse_lab.cli import (
    DESCRIPTORS_BESIDES_STREAMS,
    SETTING_FLAGS,
    app_from_args,
    build_parser,
    main,
    network_warning,
    settings_from_args,
)
from tests.conftest import wait_for

FAST = {"prompt": "hi", "ttft_ms": 0, "token_ms": 0}


def test_demo_prints_a_table_and_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "figures" / "demo.png"
    argv = ["demo", "--runs", "2", "--tokens", "5", "--ttft-ms", "20", "--token-ms", "20", "--output", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^streamed\s+2\s", printed, re.MULTILINE)
    assert re.search(r"^buffered\s+2\s", printed, re.MULTILINE)
    assert output.read_bytes().startswith(b"\x89PNG")


# `serve`'s flags, each over a real socket: the app `serve` would run, built from the parsed flags.


def serve_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--port", "0", *flags])


@contextmanager
def serving(*flags: str, log: list[str] | None = None) -> Iterator[BackgroundServer]:
    with serve_in_background(
        app_from_args(serve_args(*flags), write_log=(log if log is not None else []).append)
    ) as running:
        yield running


def stream_body(server: BackgroundServer, **params: object) -> str:
    return httpx.get(server.url + "/api/chat/stream", params=params, trust_env=False).text


def error_code(body: str) -> str | None:
    found = re.search(r'^event: error\ndata: \{"code":"(\w+)"', body, re.MULTILINE)
    return found and found.group(1)


def test_flags_left_out_keep_the_settings_defaults() -> None:
    assert settings_from_args(serve_args()) == Settings()


def test_max_streams_flag_refuses_streams_beyond_it_with_429() -> None:
    with serving("--max-streams", "1") as running, httpx.Client(trust_env=False) as client:
        url = running.url + "/api/chat/stream"
        with client.stream("GET", url, params={"prompt": "hi", "ttft_ms": 30_000}) as first:
            assert first.status_code == 200
            assert client.get(url, params=FAST).status_code == 429


def test_max_tokens_flag_is_the_largest_max_tokens_accepted() -> None:
    with serving("--max-tokens", "10") as running:
        refused = httpx.get(running.url + "/api/chat", params={**FAST, "max_tokens": 11}, trust_env=False)
        default = httpx.get(running.url + "/api/chat", params=FAST, trust_env=False)
    assert (refused.status_code, refused.json()["parameter"]) == (422, "max_tokens")
    assert "from 1 to 10" in refused.json()["reason"]
    assert default.json()["tokens"] == 10  # the default of 64 would be beyond the limit


def test_context_window_flag_ends_a_stream_that_fills_it() -> None:
    with serving("--context-window", "5") as running:
        body = stream_body(running, **{**FAST, "prompt": "one two three"}, max_tokens=10)
    assert body.count("event: token") == 2  # 3 prompt tokens + 2 fill the window of 5
    assert error_code(body) == "context_length_exceeded"


def test_retry_ms_flag_sets_the_retry_line() -> None:
    with serving("--retry-ms", "1234") as running:
        assert stream_body(running, **FAST, max_tokens=1).startswith("retry: 1234\n")


def test_heartbeat_s_flag_sets_how_often_a_silent_stream_sends_a_comment() -> None:
    with serving("--heartbeat-s", "0.05") as running:
        body = stream_body(running, prompt="hi", ttft_ms=500, token_ms=0, max_tokens=1)
    before_the_first_token = body.split("event: token")[0]
    assert before_the_first_token.count(": heartbeat") >= 3  # about 10 in a 0.5 s prefill; none at the default 15 s


def test_max_stream_s_flag_ends_longer_streams_with_a_timeout_error() -> None:
    with serving("--max-stream-s", "0.2") as running:
        body = stream_body(running, prompt="hi", ttft_ms=0, token_ms=50, max_tokens=100)
    assert error_code(body) == "timeout"
    assert body.count("event: token") < 20  # about 4 of the 100 in 0.2 s


def test_blocklist_flag_stops_streams_on_any_of_its_words() -> None:
    with serving("--blocklist", "zebra,FIRST") as running:
        body = stream_body(running, **FAST, max_tokens=10)  # the simulated text starts "The first token"
    assert body.count("event: token") == 1
    assert error_code(body) == "content_filter"


def test_access_log_flag_logs_each_request_with_status_duration_and_tokens_sent() -> None:
    log: list[str] = []
    with serving("--access-log", log=log) as running:
        stream_body(running, **FAST, max_tokens=5)
        httpx.get(running.url + "/api/chat", params={**FAST, "max_tokens": 3}, trust_env=False)
        httpx.get(running.url + "/api/chat", params={"prompt": "hi", "max_tokens": "lots"}, trust_env=False)
        wait_for(lambda: len(log) == 3, what="a log line per request")
    line = r'127\.0\.0\.1:\d+ "GET /api/chat{path}\?prompt=hi\S* HTTP/1\.1" {status} \d+\.\d{{3}} s {tokens} tokens'
    assert re.fullmatch(line.format(path="/stream", status=200, tokens=5), log[0]), log[0]
    assert re.fullmatch(line.format(path="", status=200, tokens=3), log[1]), log[1]
    assert re.fullmatch(line.format(path="", status=422, tokens=0), log[2]), log[2]


def test_without_access_log_flag_nothing_is_logged() -> None:
    log: list[str] = []
    with serving(log=log) as running:
        stream_body(running, **FAST, max_tokens=2)
    assert log == []


@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    [
        ("--max-streams", "-1", "must be an integer from 0 up"),
        ("--max-tokens", "2.5", "must be an integer from 1 up"),
        ("--context-window", "0", "must be an integer from 1 up"),
        ("--retry-ms", "soon", "must be an integer from 0 up"),
        ("--heartbeat-s", "0", "must be a number above 0"),
        ("--max-stream-s", "inf", "must be a number above 0"),
        ("--blocklist", "a,,b", "must be comma-separated words, none of them empty"),
    ],
)
def test_bad_flag_values_are_refused_naming_the_flag(
    flag: str, value: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        serve_args(flag, value)
    assert exit_info.value.code == 2
    assert f"argument {flag}: {reason}" in capsys.readouterr().err


def test_serve_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for flag in ["--host", "--port", *(setting.flag for setting in SETTING_FLAGS), "--access-log"]:
        assert re.search(rf"^  {flag} \S*\s+\w", help_text, re.MULTILINE), flag  # the flag, then what it does


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_host_gets_no_network_warning(host: str) -> None:
    assert network_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "lab.example.org"])
def test_a_host_other_than_loopback_gets_a_one_line_network_warning(host: str) -> None:
    warning = network_warning(host)
    assert warning is not None and "\n" not in warning
    assert warning.endswith(f"--host {host} is not loopback: the server is reachable from the network")


# The foreground command itself, in a child process.


@contextmanager
def serve_process(*flags: str, shell_prefix: str = "") -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m sse_lab serve --port 0 ...` and the URL its banner names, killed at the end whatever happens."""
    command = [sys.executable, "-m", "sse_lab", "serve", "--port", "0", *flags]
    if shell_prefix:
        command = ["sh", "-c", f"{shell_prefix} exec {shlex.join(command)}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 30)
            assert ready, "the server printed nothing within 30 s"
            banner = process.stdout.readline()  # printed once the server accepts connections
            url = re.search(r"http://127\.0\.0\.1:\d+", banner)
            assert url, f"no URL in {banner!r}"
            yield process, url.group()
        finally:
            process.kill()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stopped_by_sigint_or_sigterm_says_stopped(stop: signal.Signals) -> None:
    with serve_process() as (process, url):
        assert stream_chat(url, "hi", max_tokens=3, ttft_ms=0, token_ms=0).tokens == 3
        process.send_signal(stop)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert out.rstrip().endswith("sse-lab stopped")
    assert err == ""  # no traceback, and no network warning on loopback


def test_serve_started_by_a_script_in_the_background_still_stops_on_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored."""
    with serve_process(shell_prefix="trap '' INT;") as (process, _):
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=10)
    assert out.rstrip().endswith("sse-lab stopped")


def test_serve_passes_its_flags_and_shows_log_lines_on_the_terminal() -> None:
    with serve_process("--access-log", "--retry-ms", "1234") as (process, url):
        body = httpx.get(url + "/api/chat/stream", params={**FAST, "fail_after": 2}, trust_env=False).text
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    assert body.startswith("retry: 1234\n") and error_code(body) == "model_error"
    assert re.search(r'"GET /api/chat/stream\?\S+ HTTP/1\.1" 200 \d+\.\d+ s 2 tokens$', out, re.MULTILINE), out
    assert err == "sse-lab: model failed after 2 tokens: InjectedFault('fail_after=2')\n"


def test_serve_on_a_host_other_than_loopback_warns_first() -> None:
    command = [sys.executable, "-m", "sse_lab", "serve", "--host", "192.0.2.1", "--port", "0"]  # TEST-NET-1: not ours
    finished = subprocess.run(command, capture_output=True, text=True, timeout=30)
    warning, *_ = finished.stderr.splitlines()
    assert warning == "sse-lab: warning: --host 192.0.2.1 is not loopback: the server is reachable from the network"


def open_files_limits(pid: int) -> tuple[str, str]:
    """The soft and hard limits on open files of process `pid`, as Linux shows them."""
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if line.startswith("Max open"))
    soft, hard = line.split()[3:5]
    return soft, hard


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/limits")
def test_serve_raises_its_open_files_limit_as_far_as_the_system_allows() -> None:
    """Many systems start processes at a soft limit of 1,024 descriptors: a thousand streams, whatever --max-streams."""
    with serve_process("--max-streams", "5000", shell_prefix="ulimit -S -n 256;") as (process, _):
        soft, hard = open_files_limits(process.pid)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    assert soft == hard and (hard == "unlimited" or int(hard) > 256)
    if hard == "unlimited" or int(hard) >= 5_000 + DESCRIPTORS_BESIDES_STREAMS:
        assert err == ""  # enough for every stream: no warning


def test_serve_warns_when_the_system_allows_too_few_open_files_for_max_streams() -> None:
    with serve_process("--max-streams", "1000", shell_prefix="ulimit -n 300;") as (process, _):
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    assert err.splitlines()[0] == (
        "sse-lab: warning: open files are limited to 300, too few for --max-streams 1000: "
        "connections past the limit will be closed; raise it with `ulimit -n`"
    )


def test_serve_refuses_a_port_in_use_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "sse_lab", "serve", "--port", str(port)]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert finished.returncode == 1
    assert finished.stderr == f"sse-lab: cannot serve on 127.0.0.1:{port}: Address already in use\n"


def test_serve_prints_the_pages_url_and_takes_cors_origins() -> None:
    origins = "https://course.example,http://localhost:*"
    command = [sys.executable, "-m", "sse_lab", "serve", "--port", "0", "--cors-origin", origins]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            ready, _, _ = select.select([process.stdout], [], [], 30)
            assert ready, "the server printed nothing within 30 s"
            url = re.search(r"http://127\.0\.0\.1:\d+", process.stdout.readline())
            assert url
            page_line = process.stdout.readline()
            assert f"{url.group()}/" in page_line
            chat = f"{url.group()}/api/chat?prompt=hi&max_tokens=1&ttft_ms=0"
            allowed = httpx.get(chat, headers={"Origin": "https://course.example"}, trust_env=False)
            assert allowed.headers["access-control-allow-origin"] == "https://course.example"
            local = httpx.get(chat, headers={"Origin": "http://localhost:8888"}, trust_env=False)
            assert local.headers["access-control-allow-origin"] == "http://localhost:8888"
            loopback = httpx.get(chat, headers={"Origin": "http://127.0.0.1:8888"}, trust_env=False)
            assert "access-control-allow-origin" not in loopback.headers
            assert "text/html" in httpx.get(f"{url.group()}/", trust_env=False).headers["content-type"]
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=10)
        finally:
            process.kill()
    assert process.returncode == 0


def test_a_malformed_cors_origin_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--cors-origin", "localhost:8888"])
    assert exited.value.code == 2
    assert "a CORS origin is scheme://host" in capsys.readouterr().err


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
