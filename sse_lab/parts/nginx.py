"""A real nginx in front of the in-kernel server, to measure which proxy settings hold tokens back.

    client (sse_lab.client) ──▶ nginx on 127.0.0.1:P ──────▶ uvicorn on 127.0.0.1:U
                                (a subprocess, 1 worker)      (serve_in_background's thread)
          ◀── tokens one by one, or in one lump ◀──────────── one event per token

`ProxyConfig` names the settings people deploy in front of an event stream, and
`nginx_conf` renders one as a complete nginx.conf (plain text: print it in a
notebook). `start_nginx` runs nginx on that file from a private temporary
directory and returns an `NginxProxy` handle; stopping it ends nginx, its
worker, and deletes the directory. `measure_proxies` streams the same chat
directly and through each configuration, so the results say which ones stream.

Measured with nginx 1.22 (20 tokens, 25 ms apart): every configuration passes
the tokens on as they come, except gzip while `X-Accel-Buffering: no` is ignored,
which delivers the whole answer in one lump at the end. Honoured, that header
turns buffering off, and unbuffered nginx flushes every read, which makes gzip
flush too. Buffering alone still passes each read on (it exists so that a slow
client does not hold up the upstream), but nothing asks gzip to flush, and zlib
emits nothing until a deflate block fills: more than a whole chat answer.
Buffering also holds the response headers until the first body bytes, which the
server's opening `retry:` line sends at once. nginx's HTTP/1.0 to the upstream
changes nothing: uvicorn still answers chunked, and nginx decodes it.

`start_nginx(..., tls=True)` serves HTTPS with HTTP/2 instead, on a self-signed
certificate made for the occasion (`sse_lab.parts.tls`): browsers speak HTTP/2
only over TLS, and notebook 06 needs it to lift the six-connection limit.

nginx is a system package, not a Python one: `nginx_or_skip()` lets a notebook
skip these experiments when it is missing, unless `SSE_LAB_REQUIRE_SYSTEM_PARTS=1`
(set in CI) makes a missing nginx an error.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..handles import Stoppable, stop_process
from . import _system
from ._system import REQUIRE_SYSTEM_PARTS_ENV as REQUIRE_SYSTEM_PARTS_ENV
from ._system import free_port as _free_port
from .tls import CERT_FILE, KEY_FILE, write_self_signed_certificate

SYSTEM_BINARY_DIR = "/usr/sbin"  # where Debian and Ubuntu put nginx; often not on a user's PATH
INSTALL_HINT = "apt-get install nginx, or conda install -c conda-forge nginx"
SKIP_MESSAGE = f"nginx not found: skipping the proxy experiments ({INSTALL_HINT})"
STOP_TIMEOUT_S = 2.0
PORT_ATTEMPTS = 5
_CONF = "nginx.conf"
_PID_FILE = "nginx.pid"
_ERROR_LOG = "error.log"


class NginxNotFoundError(RuntimeError):
    """No nginx binary on PATH or in /usr/sbin."""


class NginxStartError(RuntimeError):
    """nginx did not start: a bad upstream or config (the message quotes its error log), or a timeout."""


@dataclass(frozen=True)
class ProxyConfig:
    """The nginx settings, in front of an event stream, that decide whether tokens get through one by one.

    proxy_buffering: on (nginx's default), nginx reads the upstream's response as
        fast as it comes, into memory and then a temporary file, so that a slow
        client does not hold the upstream up; an upstream that answers
        `X-Accel-Buffering: no` (ours does) turns it off for its response. Off,
        nginx reads from the upstream only as fast as the client takes.
    gzip: compress event streams (`gzip on; gzip_types text/event-stream;`), as a
        site does that lists every text type it serves.
    ignore_accel_buffering: `proxy_ignore_headers X-Accel-Buffering`, which takes
        the upstream's say over buffering away.

    >>> ProxyConfig(gzip=True, ignore_accel_buffering=True).label
    'nginx + ignore X-Accel + gzip'
    >>> print("\\n".join(ProxyConfig(proxy_buffering=False, gzip=True).directives()))
    proxy_buffering off;
    gzip on;
    gzip_types text/event-stream;
    """

    proxy_buffering: bool = True
    gzip: bool = False
    ignore_accel_buffering: bool = False
    # Notebook 09 (other transports). websocket_upgrade: HTTP/1.1 to the upstream and the
    # Upgrade/Connection headers passed on, without which nginx cannot proxy a WebSocket.
    # grpc: listen with HTTP/2 (cleartext, prior knowledge) and `grpc_pass` to a gRPC upstream.
    websocket_upgrade: bool = False
    grpc: bool = False

    @property
    def label(self) -> str:
        """A short name for tables and plot legends: 'nginx' alone is nginx's defaults."""
        parts = ["nginx"]
        if not self.proxy_buffering:
            parts.append("buffering off")
        if self.ignore_accel_buffering:
            parts.append("ignore X-Accel")
        if self.gzip:
            parts.append("gzip")
        if self.websocket_upgrade:
            parts.append("WebSocket upgrade")
        if self.grpc:
            parts.append("grpc_pass over HTTP/2")
        return " + ".join(parts)

    def directives(self) -> list[str]:
        """What this configuration adds to nginx's defaults, one directive a line; none for the defaults."""
        lines = []
        if not self.proxy_buffering:
            lines.append("proxy_buffering off;")
        if self.ignore_accel_buffering:
            lines.append("proxy_ignore_headers X-Accel-Buffering;")
        if self.gzip:
            # Two gzip settings that look relevant are not: gzip_min_length is checked
            # against Content-Length only, which a stream does not have; and gzip_proxied
            # (default off) only applies to requests carrying a Via header, i.e. ones that
            # came through another proxy, which the kit's client does not send.
            lines += ["gzip on;", "gzip_types text/event-stream;"]
        if self.websocket_upgrade:
            # Hop-by-hop headers are not forwarded unless set again; HTTP/1.0 (nginx's default
            # to upstreams) has no Upgrade at all.
            lines += [
                "proxy_http_version 1.1;",
                "proxy_set_header Upgrade $http_upgrade;",
                'proxy_set_header Connection "upgrade";',
            ]
        return lines


NGINX_DEFAULTS = ProxyConfig()


def nginx_conf(config: ProxyConfig, upstream_url: str, port: int, *, as_root: bool = False, tls: bool = False) -> str:
    """The complete nginx.conf that proxies 127.0.0.1:`port` to `upstream_url` with `config`.

    With `tls`, it listens for HTTPS and HTTP/2 with the certificate and key in
    `cert.pem` and `key.pem` beside the configuration.

    Every path in it is relative, so nginx resolves it inside the directory given
    by `nginx -p`: the pid file and the temporary files (whose defaults under
    /var/lib/nginx only root may write) stay in the kit's private directory.
    Errors go to stderr, which `start_nginx` sends to a file in that directory.
    """
    target = _proxy_pass_target(upstream_url)
    location = [f"grpc_pass grpc://{target.removeprefix('http://')};" if config.grpc else f"proxy_pass {target};"]
    location += config.directives()
    lines = [
        # As root, nginx runs its workers as `nobody`, who could not enter the private
        # (0700, root-owned) directory that holds the temporary files. Rather than open
        # the directory to everyone, the workers stay root: the server only listens on loopback.
        *(["user root;"] if as_root else []),
        "worker_processes 1;",
        "daemon off;",
        f"pid {_PID_FILE};",
        "error_log stderr warn;",
        "events {",
        "    worker_connections 64;",
        "}",
        "http {",
        "    access_log off;",
        "    client_body_temp_path client_body_temp;",
        "    proxy_temp_path proxy_temp;",
        "    fastcgi_temp_path fastcgi_temp;",
        "    uwsgi_temp_path uwsgi_temp;",
        "    scgi_temp_path scgi_temp;",
        "    server {",
        f"        listen 127.0.0.1:{port}{' ssl' if tls else ''}{' http2' if tls or config.grpc else ''};",
        *([f"        ssl_certificate {CERT_FILE};", f"        ssl_certificate_key {KEY_FILE};"] if tls else []),
        "        location / {",
        *(f"            {line}" for line in location),
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _proxy_pass_target(upstream_url: str) -> str:
    """`http://host:port` from the upstream's URL; nginx itself judges the host and the port."""
    parts = urlsplit(upstream_url)
    unsafe = set(parts.netloc) & set(" \t\r\n;{}'\"\\$#")
    if parts.scheme != "http" or not parts.netloc or "@" in parts.netloc or unsafe:
        raise ValueError(f"the upstream must be http://host:port, got {upstream_url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"the upstream must have no path, query or fragment, got {upstream_url!r}")
    return f"http://{parts.netloc}"


def find_nginx() -> str | None:
    """The nginx binary: the one on PATH, else /usr/sbin/nginx; None when there is neither."""
    return shutil.which("nginx") or shutil.which("nginx", path=SYSTEM_BINARY_DIR)


def nginx_or_skip() -> str | None:
    """The nginx binary, or None after printing one line saying the proxy experiments are skipped.

    With SSE_LAB_REQUIRE_SYSTEM_PARTS=1 in the environment (CI sets it) a missing
    nginx raises NginxNotFoundError instead, so the experiments cannot silently vanish.
    """
    missing = f" but is neither on PATH nor in {SYSTEM_BINARY_DIR}"
    return _system.require_or_skip(find_nginx(), "nginx", missing, SKIP_MESSAGE, NginxNotFoundError)


def nginx_version(binary: str) -> str:
    """The version nginx reports, like 'nginx/1.22.1': what a measurement was made with."""
    reported = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=True)
    return reported.stderr.strip().removeprefix("nginx version: ")


class NginxProxy(Stoppable):
    """Handle on a running nginx: its `url`, the `conf` it runs, and `stop()`.

    nginx also stops when the handle is garbage collected or the interpreter exits,
    so re-running a notebook cell `proxy = start_nginx(...)` leaves no nginx behind.
    """

    def __init__(
        self, process: subprocess.Popen[bytes], directory: Path, port: int, config: ProxyConfig, *, tls: bool = False
    ) -> None:
        self.port = port
        self.tls = tls  # HTTPS and HTTP/2, on a self-signed certificate
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.config = config
        self.directory = directory  # nginx's prefix: nginx.conf, error.log, temporary files; stop() deletes it
        self.conf = (directory / _CONF).read_text()
        self.pid = process.pid  # nginx's master process, leader of its own process group
        self._process = process
        self._stop = weakref.finalize(self, _stop_and_remove, process, directory)

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> None:
        """Stop nginx and its worker, delete its directory; idempotent."""
        self._stop()

    def __repr__(self) -> str:
        return f"<NginxProxy {self.url} {self.config.label!r} {'running' if self.running else 'stopped'}>"


def start_nginx(
    upstream_url: str,
    config: ProxyConfig = NGINX_DEFAULTS,
    *,
    startup_timeout_s: float = 10.0,
    tls: bool = False,
) -> NginxProxy:
    """Run nginx on a free loopback port in front of `upstream_url`; return once it accepts connections.

    `tls`: serve HTTPS and HTTP/2 on a self-signed certificate made in nginx's directory.

    Raises NginxNotFoundError without nginx, ValueError for an upstream that is not
    http://host:port, and NginxStartError, quoting nginx's error log, when nginx
    refuses the configuration or does not start in time. Nothing is left behind
    when it fails: no process, no directory.
    """
    _proxy_pass_target(upstream_url)  # refuse a bad URL before anything is created
    return _start(
        lambda port, as_root: nginx_conf(config, upstream_url, port, as_root=as_root, tls=tls),
        config,
        startup_timeout_s,
        tls=tls,
    )


def _start(
    render: Callable[[int, bool], str],
    config: ProxyConfig,
    startup_timeout_s: float,
    *,
    port: int = 0,
    tls: bool = False,
) -> NginxProxy:
    """Run nginx on the configuration `render(port, as_root)` gives for `port` (0: a free one); see `start_nginx`."""
    fixed_port = port
    binary = find_nginx()
    if binary is None:
        raise NginxNotFoundError(f"nginx is neither on PATH nor in {SYSTEM_BINARY_DIR} ({INSTALL_HINT})")
    deadline = time.monotonic() + startup_timeout_s
    directory = Path(tempfile.mkdtemp(prefix="sse-lab-nginx-"))
    try:
        if tls:
            write_self_signed_certificate(directory)
        # nginx cannot be told to pick a free port: the kit finds one, and tries
        # another when something else takes it before nginx binds it.
        for _ in range(1 if fixed_port else PORT_ATTEMPTS):
            port = fixed_port or _free_port()
            conf = render(port, os.name == "posix" and os.geteuid() == 0)
            (directory / _CONF).write_text(conf)
            process = _launch(binary, directory)
            try:
                if _wait_until_listening(process, directory, port, deadline, startup_timeout_s):
                    return NginxProxy(process, directory, port, config, tls=tls)
            except BaseException:
                _stop_process(process)
                raise
            _stop_process(process)  # the port was taken: try another
        if fixed_port:
            raise NginxStartError(f"port {fixed_port} is taken")
        raise NginxStartError(f"{PORT_ATTEMPTS} free ports in a row were taken before nginx could bind them")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _launch(binary: str, directory: Path) -> subprocess.Popen[bytes]:
    with (directory / _ERROR_LOG).open("wb") as error_log:
        return subprocess.Popen(
            # -e: nginx opens its built-in error log before reading the config; a user could not write it.
            [binary, "-p", f"{directory}/", "-c", str(directory / _CONF), "-e", "stderr"],
            stdin=subprocess.DEVNULL,
            stdout=error_log,
            stderr=error_log,
            start_new_session=True,  # one process group for the master and its worker, to kill both if need be
        )


def _wait_until_listening(
    process: subprocess.Popen[bytes], directory: Path, port: int, deadline: float, timeout_s: float
) -> bool:
    """True once nginx listens on `port`; False when the port was taken; NginxStartError when nginx fails."""
    return _system.wait_until_ready(
        process,
        lambda: _listening(process, directory, port),
        directory / _ERROR_LOG,
        deadline,
        timeout_s,
        name="nginx",
        readiness=f"accept connections on port {port}",
        error_type=NginxStartError,
    )


def _listening(process: subprocess.Popen[bytes], directory: Path, port: int) -> bool:
    """nginx writes its pid file once its sockets listen, so a connection then reaches nginx, not an intruder."""
    if process.poll() is not None:
        return False
    try:
        if (directory / _PID_FILE).read_text().strip() != str(process.pid):
            return False
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM is nginx's fast shutdown: open streams are cut, the worker exits, then the master.

    (SIGQUIT, the graceful one, would wait for every open stream to end.) SIGKILL, if
    it comes to that, goes to the process group: the master and its worker.
    """
    stop_process(process, STOP_TIMEOUT_S, group=True)


def _stop_and_remove(process: subprocess.Popen[bytes], directory: Path) -> None:
    _stop_process(process)
    shutil.rmtree(directory, ignore_errors=True)


# Several upstreams: the cluster (sse_lab.parts.cluster)

CLUSTER_CONFIG = ProxyConfig(proxy_buffering=False)
CLUSTER_READ_TIMEOUT_S = 30


def upstream_conf(upstream_urls: list[str], port: int, *, as_root: bool = False) -> str:
    """nginx.conf spreading 127.0.0.1:`port` over several upstreams, with the event-stream settings of notebook 03.

    least_conn sends a new stream to the worker with the fewest open ones; a worker
    that refuses connections (killed) passes the request on to the next one
    (`proxy_next_upstream`, before any byte was sent), and is never marked down
    (`max_fails=0`): it is back on its port as soon as it restarts, and marking it
    down after one failure made nginx answer 502 while the others were busy. Buffering is off, and
    `proxy_read_timeout` is moderate: a stopped (not dead) worker still accepts TCP,
    and its streams end after that long without a byte (the server's heartbeats keep
    live ones open). Request headers, `Last-Event-ID` among them, are forwarded as they are.
    """
    if not upstream_urls:
        raise ValueError("the cluster needs at least one upstream")
    servers = [
        f"        server {_proxy_pass_target(url).removeprefix('http://')} max_fails=0;" for url in upstream_urls
    ]
    location = [
        "proxy_pass http://workers;",
        f"proxy_read_timeout {CLUSTER_READ_TIMEOUT_S}s;",
        "proxy_connect_timeout 1s;",
        "proxy_next_upstream error timeout http_502 http_503;",
    ]
    # nginx_conf's server, its proxy_pass pointed at an upstream block of every worker.
    conf = nginx_conf(CLUSTER_CONFIG, upstream_urls[0], port, as_root=as_root)
    conf = conf.replace(f"proxy_pass {_proxy_pass_target(upstream_urls[0])};", "\n            ".join(location), 1)
    upstream = ["    upstream workers {", "        least_conn;", *servers, "    }", "    server {\n"]
    return conf.replace("    server {\n", "\n".join(upstream), 1)


def start_nginx_upstream(upstream_urls: list[str], *, port: int = 0, startup_timeout_s: float = 10.0) -> NginxProxy:
    """Run nginx on loopback `port` (0: a free one) in front of several upstreams; see `start_nginx`."""
    upstream_conf(upstream_urls, 1)  # refuse bad URLs before anything is created
    return _start(
        lambda port, as_root: upstream_conf(upstream_urls, port, as_root=as_root),
        CLUSTER_CONFIG,
        startup_timeout_s,
        port=port,
    )
