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
no cancelled request gets logged as a traceback in the notebook. A stream cut by
the stop ends with a comment (`: server stopping`) and no event: see `_Closing`.

Connections are guarded before the app sees them (`GuardedHttpToolsProtocol`): a
request head has a size limit and a time limit, both from the app's `Settings`;
every response carries `X-Content-Type-Options: nosniff` and no `server` banner;
running out of file descriptors is logged as one line per window, not as a
traceback per failed `accept()`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .collector import collect_forever, steady_collection
from .handles import Stoppable
from .server import EVENT_STREAM, Settings, create_app
from .sse import encode_comment

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 1.0
LISTEN_BACKLOG = 2048  # uvicorn's default: a burst of connections must not wait for SYN retries (1 s each)
SECURITY_HEADERS = [("X-Content-Type-Options", "nosniff")]  # on every response, the server's own refusals too
STOPPING_COMMENT = encode_comment("server stopping")
EXHAUSTION_LOG_WINDOW_S = 10.0
LINGER_S = 1.0
_EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ServerStartError(RuntimeError):
    """The server could not start: the port is taken, or the app failed its startup."""


class _Closing:
    """ASGI middleware that ends every open HTTP response when `close()` is called.

    A response not started yet gets a JSON 503. A started one ends with a clean end of
    its body, so the client sees the server stop, not a broken connection. An event
    stream gets a last comment, `: server stopping`, and deliberately no event: an
    `error` event would tell the client that the answer is broken, and the kit's
    client (like most code written against `EventSource`) stops on one. The answer is
    not broken; the server is going away. A clean end without `done` makes a browser's
    `EventSource`, and `stream_chat`, reconnect after the `retry` delay with
    `Last-Event-ID`, which another instance behind the same address resumes exactly.
    The comment is invisible to `EventSource` and tells a human reading the wire
    (curl, a capture) that the cut was a stop, not a network fault. An event stream is
    a response that `EventStreamResponse` sent: it marks its scope (`EVENT_STREAM`), so
    no message needs to be looked into.

    Each request runs in uvicorn's own task, with nothing added per request or per
    message but a set entry: `close()` cancels the tasks of the open requests, and
    each ends its response where it stands. Where a response stands is read off
    uvicorn's request cycle (the object whose bound method `send` is); under another
    server, a wrapper around `send` keeps track instead.
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
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            body = {"error": "server_stopping", "reason": "the server is stopping; try again shortly"}
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        elif not complete:
            last = STOPPING_COMMENT if scope.get(EVENT_STREAM, False) else b""
            await send({"type": "http.response.body", "body": last, "more_body": False})


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


def _raw_json_response(status: int, body: dict[str, str], default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for refusals made before the app is called."""
    payload = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [b"content-type: application/json", b"content-length: %d" % len(payload), b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def _websocket_handshake_problem(method: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    """What makes a request with `Upgrade: websocket` no opening handshake (RFC 6455 section 4.2.1), or None."""
    fields: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(value)
    if method != "GET":
        return f"a WebSocket handshake is a GET, not {method}"
    if b"upgrade" not in {
        token.strip().lower() for value in fields.get(b"connection", []) for token in value.split(b",")
    }:
        return "a WebSocket handshake needs a Connection header with the token Upgrade"
    if fields.get(b"sec-websocket-version") != [b"13"]:
        return "a WebSocket handshake needs Sec-WebSocket-Version: 13"
    keys = fields.get(b"sec-websocket-key", [])
    try:
        valid_key = len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        return "a WebSocket handshake needs one Sec-WebSocket-Key: 16 bytes, base64-encoded"
    return None


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size limit and a time limit on every request head.

    - A head (request line and headers) longer than `max_head_bytes` is answered 431 and
      its connection closed: a connection makes the server hold at most that much of a
      head, plus one socket read (asyncio reads up to 256 KiB at a time).
    - A head still incomplete `header_timeout_s` after its connection opened (or after the
      first byte of a keep-alive connection's next request) is answered 408 and closed; a
      connection that sent nothing by then is closed without a word (a browser's preconnect).
    - The query string is kept away from `httptools.parse_url`, which refuses URLs longer
      than 65,535 bytes (its offsets are 16-bit): the head limit is the only limit on a
      request line, so the app's own limits (`max_prompt_chars`) are reached first.
    - Malformed requests get a JSON 400 instead of uvicorn's plain text, and so do
      WebSocket upgrades whose handshake the WebSocket library would refuse in text.
    - A connection answered before its request's body has all arrived is closed after the
      answer, so a body trickled forever cannot hold it open.

    All of it runs while a head arrives, once per request: a response's events never pass here.
    """

    def __init__(self, *args: Any, max_head_bytes: int, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes = max_head_bytes
        self.header_timeout_s = header_timeout_s
        self.head_open = True  # a head may be arriving: the limits apply to what comes in
        self.head_bytes = 0  # of the head arriving now
        self.heads_completed = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.discarding = False  # refused: what still arrives is dropped until the connection closes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        if not self.head_open:
            super().data_received(data)
            return
        if self.head_timer is None and not self._responding():
            self._arm_head_timer()
        room = self.max_head_bytes - self.head_bytes
        self.head_bytes += len(data)
        if len(data) <= room:
            super().data_received(data)
            return
        completed = self.heads_completed
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self.heads_completed == completed:
            reason = (
                f"the request line and headers exceed {self.max_head_bytes} bytes; send long prompts in a POST body"
            )
            self._refuse(431, "request_head_too_large", reason)
            return
        self.data_received(data[room:])  # the rest: a body, or the next request's head

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self.head_open = False
        self.heads_completed += 1
        self.url, _, query = self.url.partition(b"#")[0].partition(b"?")
        super().on_headers_complete()
        self.scope["query_string"] = query  # read by the app's task, which has not run yet

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.head_open = True
        self.head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "invalid_http_request", "the request line or headers are not valid HTTP/1.1")

    def handle_websocket_upgrade(self) -> None:
        """Hand a WebSocket handshake over only when it is one: otherwise a JSON 400, not the library's text."""
        if problem := _websocket_handshake_problem(self.scope["method"], self.scope["headers"]):
            self._refuse(400, "invalid_websocket_handshake", problem)
            return
        super().handle_websocket_upgrade()

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self._responding():
            return
        if self.head_bytes == 0:
            self.transport.close()
            return
        self._refuse(408, "request_timeout", f"the request head did not arrive within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, error: str, reason: str) -> None:
        self._cancel_head_timer()
        if self.discarding:
            return
        if self._responding():  # a pipelined head behind a response still being sent: no room for an answer
            self.transport.close()
            return
        if status != 400:  # uvicorn has logged a 400 already
            self.logger.info("refused a request head with %d: %s", status, reason)
        self.transport.write(
            _raw_json_response(status, {"error": error, "reason": reason}, self.server_state.default_headers)
        )
        self._close_after_answer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.head_open and not self.transport.is_closing():
            # Answered while the request's body is still coming (a 405, a 422): reading the
            # rest only to find the next request would let a client hold the connection
            # open by trickling a body that never ends.
            self._close_after_answer()

    def _close_after_answer(self) -> None:
        # Closing with unread bytes would make the kernel reset the connection, and the
        # client could lose the answer: send it, then read and drop what still comes, for
        # at most LINGER_S seconds (nginx's "lingering close").
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self.discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the soft limit now in force.

    Every connection holds a descriptor, and many systems start a process at a
    soft limit of 1,024: a server would then close every connection past about a
    thousand (see `_AcceptFailures`), whatever its `--max-streams`, and a load
    generator could not open them. The hard limit is the one the system allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):  # macOS refuses RLIM_INFINITY: the soft limit stays
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def dedicate_to_serving() -> int:
    """Set this process up to serve many streams and nothing else; return its limit on open files now.

    What `python -m sse_lab serve` and every server of the capacity benchmark do
    once their app is built: the limit on open files raised as far as the system
    allows (`raise_open_files_limit`), what exists now frozen out of the collector's
    reach, and a full collection every ten minutes on a thread of its own
    (`sse_lab.collector`). An in-kernel server leaves its notebook's process alone.
    """
    limit = raise_open_files_limit()
    steady_collection()
    threading.Thread(target=collect_forever, name="sse-lab-collector", daemon=True).start()
    return limit


class _AcceptFailures:
    """`accept()` failing for lack of descriptors, logged as one line per window.

    asyncio reports each failed `accept()` (EMFILE, ENFILE, ENOBUFS, ENOMEM) to the
    loop's exception handler, this object, with a traceback, and retries a second
    later; under a descriptor shortage that fills the log while open connections are
    still served. libuv (under uvloop) tells nobody: it closes each connection it has
    no descriptor for at once, so `probe` looks every `PROBE_S` seconds whether a
    descriptor can still be had. Either way the first failure of a window says what
    happened and how many connections hold descriptors; the next ones in the following
    `window_s` seconds are counted and reported with the next line. Anything else goes
    to asyncio's default handler.
    """

    PROBE_S = 0.1  # a dup() and a close(): nothing next to the streams a loop serves

    def __init__(self, connections: set[Any], window_s: float = EXHAUSTION_LOG_WINDOW_S) -> None:
        self.connections = connections
        self.window_s = window_s
        self.window_ends = float("-inf")
        self.unreported = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        failure = context.get("exception")
        if not (isinstance(failure, OSError) and failure.errno in _EXHAUSTED_ERRNOS and "accept" in context["message"]):
            loop.default_exception_handler(context)
            return
        self._report(loop, failure, "asyncio retries every second")

    def probe(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """Under libuv: try to take a descriptor now and again, and report when none is left."""
        try:
            os.close(os.dup(sock.fileno()))
        except OSError as failure:
            if failure.errno not in _EXHAUSTED_ERRNOS:
                return  # the socket is closed: the server has stopped
            self._report(loop, failure, "new ones are closed as they come")
        loop.call_later(self.PROBE_S, self.probe, loop, sock)

    def _report(self, loop: asyncio.AbstractEventLoop, failure: OSError, meanwhile: str) -> None:
        now = loop.time()
        if now < self.window_ends:
            self.unreported += 1
            return
        earlier = f"; {self.unreported} more since the last report" if self.unreported else ""
        logger.warning(
            "cannot accept connections: %s, with %d open; %s, next report in %g s%s",
            failure.strerror,
            len(self.connections),
            meanwhile,
            self.window_s,
            earlier,
        )
        self.window_ends = now + self.window_s
        self.unreported = 0


class _ServerThread:
    """The uvicorn server, its thread and loop: everything `stop()` needs, and no handle."""

    def __init__(self, app: ASGIApp, sock: socket.socket, settings: Settings, loop: str) -> None:
        self.closing_app = _Closing(app)
        protocol = functools.partial(
            GuardedHttpToolsProtocol,
            max_head_bytes=settings.max_request_head_bytes,
            header_timeout_s=settings.header_timeout_s,
        )
        config = uvicorn.Config(
            self.closing_app,
            http=protocol,  # type: ignore[arg-type]  # uvicorn calls it like a protocol class
            ws="websockets-sansio",  # /ws/chat (notebook 09); uvicorn's legacy "websockets" one is deprecated
            server_header=False,
            headers=SECURITY_HEADERS,
            log_config=None,  # leave the kernel's logging alone
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=STOP_TIMEOUT_S / 2,
            loop=loop,
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
        accept_failures = _AcceptFailures(self.server.server_state.connections)
        self.loop.set_exception_handler(accept_failures)
        if not isinstance(self.loop, asyncio.BaseEventLoop):  # uvloop: libuv keeps failed accepts to itself
            accept_failures.probe(self.loop, self.sock)
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


class BackgroundServer(Stoppable):
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


def _settings_of(app: ASGIApp) -> Settings:
    """The `Settings` of the app `create_app` made, also under wrappers that keep it as `.app`; else the defaults."""
    for _ in range(16):
        settings = getattr(getattr(app, "state", None), "settings", None)
        if isinstance(settings, Settings):
            return settings
        if not hasattr(app, "app"):
            break
        app = app.app
    return Settings()


def serve_in_background(
    app: ASGIApp | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 10.0,
    loop: str = "auto",
) -> BackgroundServer:
    """Start `app` (default: `create_app()`) on its own thread and return once it accepts connections.

    `loop` is uvicorn's: "auto" (uvloop when installed, as `uvicorn.run` picks) or
    "asyncio", whose transports notebook 05 measures (their write-buffer marks).

    It binds loopback and a free port unless told otherwise. Keep the handle: the
    server stops when it is garbage collected, which is how re-running a notebook
    cell `server = serve_in_background()` replaces the old server. Asking again
    for a port that an earlier in-kernel server holds stops that server first.
    Raises ServerStartError when the port is taken or the app fails its startup.
    Connection limits (request head size and time, `Settings.max_request_head_bytes`
    and `header_timeout_s`) come from the app's `Settings` (found through wrappers that
    keep the app as `.app`), or the defaults for any other app.

    >>> with serve_in_background() as server:
    ...     server.url.startswith("http://127.0.0.1:")
    True
    """
    if port and (earlier := _by_address.get((host, port))):
        _stop_and_forget(earlier, (host, port))
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    app = create_app() if app is None else app
    running = _ServerThread(app, sock, _settings_of(app), loop)
    running.start(startup_timeout_s)
    _by_address[(host, port)] = running
    return BackgroundServer(running, host, port)
