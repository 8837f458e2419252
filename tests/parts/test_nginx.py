from __future__ import annotations

import gc
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sse_lab import BackgroundServer, serve_in_background, stream_chat
from sse_lab.parts import nginx as nginx_module
from sse_lab.parts.nginx import (
    REQUIRE_SYSTEM_PARTS_ENV,
    SKIP_MESSAGE,
    NginxNotFoundError,
    NginxStartError,
    ProxyConfig,
    find_nginx,
    nginx_conf,
    nginx_or_skip,
    nginx_version,
    start_nginx,
)
from tests.conftest import ALL_PROXY_CONFIGS, wait_for

UPSTREAM = "http://127.0.0.1:8000"


def nginx_processes() -> set[int]:
    """Every running nginx process, master or worker, from /proc."""
    if not Path("/proc/self/comm").exists():
        pytest.skip("needs /proc to list processes")
    found = set()
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "nginx":
                found.add(int(comm.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, waiting for its parent to reap it) counts as gone."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except ProcessLookupError:
        return False
    except FileNotFoundError:  # without /proc (macOS), os.kill found it; with /proc, it has just ended
        return not Path("/proc").is_dir()
    return state != "Z"


def nginx_directories() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("sse-lab-nginx-*"))


# The rendered configuration


@pytest.mark.parametrize(
    ("config", "present", "absent"),
    [
        (ProxyConfig(), [], ["proxy_buffering", "proxy_ignore_headers", "gzip"]),
        (ProxyConfig(proxy_buffering=False), ["proxy_buffering off;"], ["proxy_ignore_headers", "gzip"]),
        (
            ProxyConfig(ignore_accel_buffering=True),
            ["proxy_ignore_headers X-Accel-Buffering;"],
            ["proxy_buffering", "gzip"],
        ),
        (
            ProxyConfig(gzip=True),
            ["gzip on;", "gzip_types text/event-stream;"],
            ["proxy_buffering", "proxy_ignore_headers", "gzip_proxied", "gzip_min_length"],
        ),
    ],
)
def test_each_option_adds_exactly_its_directives(config: ProxyConfig, present: list[str], absent: list[str]) -> None:
    conf = nginx_conf(config, UPSTREAM, 8080)
    location = conf.split("location / {")[1].split("}")[0]
    assert location.split() == ["proxy_pass", "http://127.0.0.1:8000;", *" ".join(present).split()]
    for directive in absent:
        assert directive not in conf
    assert config.directives() == present


def test_the_conf_listens_on_loopback_and_keeps_every_path_in_the_prefix() -> None:
    conf = nginx_conf(ProxyConfig(), UPSTREAM + "/", 8080)
    lines = [line.strip() for line in conf.splitlines()]
    for expected in ("listen 127.0.0.1:8080;", "worker_processes 1;", "daemon off;", "access_log off;"):
        assert expected in lines
    assert "proxy_pass http://127.0.0.1:8000;" in lines
    # nginx resolves relative paths against `-p DIR`: nothing may point outside it
    paths = {line.split()[0]: line.split()[1].rstrip(";") for line in lines if line.startswith(("pid ", "error_log "))}
    paths |= {line.split()[0]: line.split()[1].rstrip(";") for line in lines if "_temp_path " in line}
    assert set(paths) == {
        "pid",
        "error_log",
        "client_body_temp_path",
        "proxy_temp_path",
        "fastcgi_temp_path",
        "uwsgi_temp_path",
        "scgi_temp_path",
    }
    assert not any(path.startswith("/") for path in paths.values())


def test_workers_run_as_root_only_when_nginx_is_started_by_root() -> None:
    assert "user" not in nginx_conf(ProxyConfig(), UPSTREAM, 8080).split()
    assert nginx_conf(ProxyConfig(), UPSTREAM, 8080, as_root=True).startswith("user root;\n")


@pytest.mark.parametrize(
    "upstream",
    [
        "https://127.0.0.1:8000",
        "127.0.0.1:8000",
        "http://",
        "http://127.0.0.1:8000/api",
        "http://127.0.0.1:8000/?x=1",
        "http://user@127.0.0.1:8000",
        "http://127.0.0.1:8000;evil",
        "http://127.0.0.1:8000 x",
    ],
)
def test_an_upstream_that_is_not_http_host_port_is_refused(upstream: str) -> None:
    with pytest.raises(ValueError, match="upstream"):
        nginx_conf(ProxyConfig(), upstream, 8080)


def test_every_combination_has_its_own_label() -> None:
    labels = [config.label for config in ALL_PROXY_CONFIGS]
    assert len(set(labels)) == len(labels)
    assert ProxyConfig().label == "nginx"


# Finding nginx, or skipping without it


def test_nginx_is_found_in_sbin_when_it_is_not_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "nginx"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(nginx_module, "SYSTEM_BINARY_DIR", str(tmp_path))
    assert find_nginx() == str(binary)


def test_without_nginx_the_experiments_are_skipped_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(nginx_module, "find_nginx", lambda: None)
    monkeypatch.delenv(REQUIRE_SYSTEM_PARTS_ENV, raising=False)
    assert nginx_or_skip() is None
    assert capsys.readouterr().out == SKIP_MESSAGE + "\n"
    with pytest.raises(NginxNotFoundError, match="apt-get install nginx"):
        start_nginx(UPSTREAM)


def test_without_nginx_a_run_that_requires_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nginx_module, "find_nginx", lambda: None)
    monkeypatch.setenv(REQUIRE_SYSTEM_PARTS_ENV, "1")
    with pytest.raises(NginxNotFoundError, match=f"nginx is required \\({REQUIRE_SYSTEM_PARTS_ENV}=1\\)"):
        nginx_or_skip()


# A real nginx


def test_nginx_reports_its_version(nginx_binary: str) -> None:
    assert re.fullmatch(r"nginx/\d+\.\d+\.\d+.*", nginx_version(nginx_binary))


def test_nginx_proxies_a_stream_from_a_free_loopback_port(nginx_binary: str, server: BackgroundServer) -> None:
    with start_nginx(server.url) as proxy:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", proxy.url) and proxy.port != server.port
        assert proxy.conf == (proxy.directory / "nginx.conf").read_text()
        through = stream_chat(proxy.url, "hi", max_tokens=5, ttft_ms=0, token_ms=0)
        assert repr(proxy).endswith("'nginx' running>")
    assert (through.tokens, through.finish_reason) == (5, "length")
    assert through.text == stream_chat(server.url, "hi", max_tokens=5, ttft_ms=0, token_ms=0).text


def test_stop_leaves_no_process_and_no_directory(nginx_binary: str, server: BackgroundServer) -> None:
    before = nginx_processes()
    proxy = start_nginx(server.url)
    # nginx listens before it forks its worker
    wait_for(lambda: len(nginx_processes() - before) == 2, what="the master and its worker")
    started = nginx_processes() - before
    assert proxy.pid in started
    proxy.stop()
    proxy.stop()  # idempotent
    assert not proxy.running and not proxy.directory.exists()
    assert not nginx_processes() & started
    with pytest.raises(ProcessLookupError):
        os.killpg(proxy.pid, 0)  # nothing left in nginx's process group


def test_a_dropped_handle_stops_nginx(nginx_binary: str, server: BackgroundServer) -> None:
    """What re-running `proxy = start_nginx(...)` in a notebook does to the old nginx."""
    before = nginx_processes()
    proxy = start_nginx(server.url)
    wait_for(lambda: len(nginx_processes() - before) == 2, what="the master and its worker")
    directory, started = proxy.directory, nginx_processes() - before
    del proxy
    gc.collect()
    assert not nginx_processes() & started and not directory.exists()


def test_a_config_nginx_refuses_leaves_no_process_and_no_directory(nginx_binary: str) -> None:
    processes, directories = nginx_processes(), nginx_directories()
    with pytest.raises(NginxStartError, match=re.escape('invalid port in upstream "127.0.0.1:0"')):
        start_nginx("http://127.0.0.1:0")
    assert nginx_processes() <= processes and nginx_directories() <= directories


def test_a_start_that_never_listens_is_killed_with_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in for a stuck nginx: it ignores SIGTERM, never listens, and has a child, like a worker."""
    stuck = tmp_path / "nginx"
    stuck.write_text(f"#!/bin/sh\ntrap '' TERM\nsleep 60 &\necho $$ $! > {tmp_path}/pids\nexec sleep 60\n")
    stuck.chmod(0o755)
    monkeypatch.setattr(nginx_module, "find_nginx", lambda: str(stuck))
    monkeypatch.setattr(nginx_module, "STOP_TIMEOUT_S", 0.1)
    private_tmp = tmp_path / "tmp"  # its own temporary folder: a test running beside it may start a real nginx
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    with pytest.raises(NginxStartError, match=r"did not accept connections on port \d+ within 0\.5 s"):
        start_nginx(UPSTREAM, startup_timeout_s=0.5)
    assert not nginx_directories()
    for pid in map(int, (tmp_path / "pids").read_text().split()):
        wait_for(lambda pid=pid: not alive(pid), what=f"process {pid} to end")


def test_a_port_taken_before_nginx_binds_it_is_replaced_by_another(
    nginx_binary: str, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports: Iterator[int] = iter([taken, nginx_module._free_port()])
        monkeypatch.setattr(nginx_module, "_free_port", lambda: next(ports))
        with start_nginx(server.url) as proxy:
            assert proxy.port != taken
            assert stream_chat(proxy.url, "hi", max_tokens=2, ttft_ms=0, token_ms=0).tokens == 2


async def body_length(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(len(await request.body())))


def test_the_worker_can_write_its_temporary_files(nginx_binary: str) -> None:
    """A request body too big for memory goes to client_body_temp: as root, only `user root` lets the worker in."""
    upload = Starlette(routes=[Route("/", body_length, methods=["POST"])])
    with serve_in_background(upload) as upstream, start_nginx(upstream.url) as proxy:
        response = httpx.post(proxy.url, content=b"x" * 100_000, trust_env=False)
        log = (proxy.directory / "error.log").read_text()
    assert (response.status_code, response.text) == (200, "100000"), log
    assert "buffered to a temporary file" in log


@pytest.mark.parametrize(("gzip", "encoding"), [(False, None), (True, "gzip")])
def test_the_gzip_option_compresses_the_stream(
    nginx_binary: str, server: BackgroundServer, gzip: bool, encoding: str | None
) -> None:
    params: dict[str, str | int] = {"prompt": "hi", "max_tokens": 2, "ttft_ms": 0, "token_ms": 0}
    with start_nginx(server.url, ProxyConfig(gzip=gzip)) as proxy:
        response = httpx.get(proxy.url + "/api/chat/stream", params=params, trust_env=False)
    assert response.headers.get("content-encoding") == encoding
    assert response.text.count("event: token") == 2


# HTTPS and HTTP/2 (notebook 06: the six-connection limit lifted)


def test_a_tls_config_listens_for_https_and_http2_with_the_certificate_beside_it() -> None:
    conf = nginx_conf(ProxyConfig(), UPSTREAM, 8443, tls=True)
    assert "listen 127.0.0.1:8443 ssl http2;" in conf
    assert "ssl_certificate cert.pem;" in conf and "ssl_certificate_key key.pem;" in conf
    assert "ssl" not in nginx_conf(ProxyConfig(), UPSTREAM, 8443)


def test_nginx_with_tls_proxies_a_stream_over_https_and_removes_its_certificate(
    nginx_binary: str, server: BackgroundServer
) -> None:
    with start_nginx(server.url, tls=True) as proxy:
        assert proxy.url.startswith("https://127.0.0.1:") and proxy.tls
        key = proxy.directory / "key.pem"
        assert key.stat().st_mode & 0o077 == 0  # the private key is the owner's only
        with httpx.Client(verify=False, trust_env=False) as client:
            response = client.get(proxy.url + "/api/chat", params={"prompt": "hi", "max_tokens": 3, "ttft_ms": 0})
        assert response.json()["tokens"] == 3
    assert not key.exists()
