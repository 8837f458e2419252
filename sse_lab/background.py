"""A real uvicorn server on a real socket, running inside the notebook's kernel.

    notebook thread                      server thread (own event loop)
    ───────────────                      ──────────────────────────────
    serve_in_background() ─ bind ──────▶ uvicorn.Server.serve(sockets=[sock])
            │  waits for server.started ◀── startup done
            ▼
    handle.url  ── HTTP over loopback ──▶ app (wrapped in _Closing)
    handle.stop() ─ call_soon_threadsafe ▶ close open responses cleanly
                  ─ server.should_exit ──▶ uvicorn shuts down, thread ends

Open streams are ended by the `_Closing` wrapper (the client sees the response end,
not a reset) so that uvicorn's graceful shutdown has nothing left to wait for and
no cancelled request gets logged as a traceback in the notebook.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .server import create_app

STOP_TIMEOUT_S = 1.0
LISTEN_BACKLOG = 2048  # uvicorn's default: a burst of connections must not wait for SYN retries (1 s each)


class ServerStartError(RuntimeError):
    """The server could not start: the port is taken, or the app failed its startup."""


class _Closing:
    """ASGI middleware that ends every open HTTP response when `close()` is called.

    Each request runs in uvicorn's own task, with nothing added per request or per
    message but a set entry: `close()` cancels the tasks of the open requests, and
    each ends its response where it stands (a 503 before the headers, the end of
    the body after them). Where a response stands is read off uvicorn's
    request cycle (the object whose bound method `send` is); under another server,
    a wrapper around `send` keeps track instead.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.closed = False
        self.responding: set[asyncio.Task[Any]] = set()

    def close(self) -> None:
        """End open responses; call it on the server's event loop."""
        self.closed = True
        for task in self.responding:
            task.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        progress, send = _progress(send)
        task = asyncio.current_task()
        assert task is not None
        if not self.closed:
            self.responding.add(task)
            try:
                await self.app(scope, receive, send)
                return
            except asyncio.CancelledError:
                if not self.closed:
                    raise
                uncancel = getattr(task, "uncancel", None)  # Python 3.11+: the cancel was ours
                if uncancel is not None:
                    uncancel()
            finally:
                self.responding.discard(task)
        started, complete = progress()
        if not started:
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": b"server is stopping"})
        elif not complete:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _progress(send: Send) -> tuple[Callable[[], tuple[bool, bool]], Send]:
    """How to tell whether the response has started and completed, and the `send` to use for it."""
    cycle = getattr(send, "__self__", None)
    if hasattr(cycle, "response_started") and hasattr(cycle, "response_complete"):  # uvicorn's request cycle
        return lambda: (cycle.response_started, cycle.response_complete), send
    status = {"started": False, "complete": False}

    async def tracking_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status["started"] = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            status["complete"] = True
        await send(message)

    return lambda: (status["started"], status["complete"]), tracking_send


class _ServerThread:
    """The uvicorn server, its thread and loop: everything `stop()` needs, and no handle."""

    def __init__(self, app: ASGIApp, sock: socket.socket) -> None:
        self.closing_app = _Closing(app)
        config = uvicorn.Config(
            self.closing_app,
            log_config=None,  # leave the kernel's logging alone
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=STOP_TIMEOUT_S / 2,
        )
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"sse-lab-server-{sock.getsockname()[1]}", daemon=True)

    def _run(self) -> None:
        try:
            _run_on_uvicorns_loop(self._serve(), self.server.config)
        except BaseException as error:  # reported to the starting thread
            self.error = error
        finally:
            self.sock.close()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def start(self, timeout_s: float) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise ServerStartError(f"the server did not start: {self.error or 'see the log above'}") from self.error
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"the server did not start within {timeout_s} s")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between: nothing to end
                self.loop.call_soon_threadsafe(self.closing_app.close)
        self.server.should_exit = True
        self.thread.join(STOP_TIMEOUT_S * 0.8)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(STOP_TIMEOUT_S * 0.2)


def _run_on_uvicorns_loop(main: Coroutine[Any, Any, None], config: uvicorn.Config) -> None:
    """Run `main` on a new loop of the kind `uvicorn.run` picks (uvloop when installed), as `asyncio.run` would.

    `asyncio.run` alone always makes a plain asyncio loop, and the same app then
    falls behind under load several times sooner than under `uvicorn.run`. Only
    this thread's loop changes; the notebook's own loop and policy are left alone.
    """
    loop_factory = config.get_loop_factory()
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main)
    else:  # Python 3.10: asyncio.run takes no loop factory; the plain loop is slower, not wrong
        asyncio.run(main)


_by_address: dict[tuple[str, int], _ServerThread] = {}


class BackgroundServer:
    """Handle on a server running in this process: its `url`, and `stop()`.

    The server also stops when the handle is garbage collected, so re-running a
    notebook cell `server = serve_in_background()` stops the server it replaces.
    """

    def __init__(self, running: _ServerThread, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._thread = running.thread
        self._stop = weakref.finalize(self, _stop_and_forget, running, (host, port))

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """End open responses, stop the server and its thread; idempotent, about 0.2 s."""
        self._stop()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<BackgroundServer {self.url} {'running' if self.running else 'stopped'}>"


def _stop_and_forget(running: _ServerThread, address: tuple[str, int]) -> None:
    running.stop()
    if _by_address.get(address) is running:
        del _by_address[address]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on connections of
    # a socket that says it is TCP, and a stream must not wait on Nagle's algorithm.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        raise ServerStartError(f"cannot serve on {host}:{port}: {error.strerror}") from error
    return sock


def serve_in_background(
    app: ASGIApp | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 10.0,
) -> BackgroundServer:
    """Start `app` (default: `create_app()`) on its own thread and return once it accepts connections.

    It binds loopback and a free port unless told otherwise. Keep the handle: the
    server stops when it is garbage collected, which is how re-running a notebook
    cell `server = serve_in_background()` replaces the old server. Asking again
    for a port that an earlier in-kernel server holds stops that server first.
    Raises ServerStartError when the port is taken or the app fails its startup.

    >>> with serve_in_background() as server:
    ...     server.url.startswith("http://127.0.0.1:")
    True
    """
    if port and (earlier := _by_address.get((host, port))):
        _stop_and_forget(earlier, (host, port))
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    running = _ServerThread(create_app() if app is None else app, sock)
    running.start(startup_timeout_s)
    _by_address[(host, port)] = running
    return BackgroundServer(running, host, port)
