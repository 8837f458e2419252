"""What a browser needs from the chat server: the classroom page, its two static files, and CORS.

    GET /                   the page: a prompt, the model's knobs, three readers side by side
    GET /static/page.js     its script (EventSource, fetch, fetch + ReadableStream, the event log)
    GET /static/page.css    its style (`?big=1`: presenter mode, readable at the back of a room)
    GET /static/favicon.svg its icon

The files ship inside the package (`sse_lab/static/`): no build step, no CDN, it
works offline. The page carries a Content-Security-Policy that allows only its own
origin: no inline script, no inline style, no connection elsewhere; it may be framed
by the origins CORS allows (JupyterLab on 127.0.0.1:8888 shows it in an IFrame).

CORS: a page on another origin (a notebook's HTML, a front end under development)
may read `/api/chat` and `/api/chat/stream` when its origin is in the allow list,
`Settings.cors_origins`. Each entry is an origin, exact (`https://app.example`) or
on any port (`http://localhost:*`). The default is loopback on any port. A request
from any other origin gets no CORS headers at all, so the browser keeps the answer
from the page; its preflight is refused with 403.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATH = "/"
LOOPBACK_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")
CORS_PATHS = frozenset({"/api/chat", "/api/chat/stream"})
# What the page's fetch readers may send across origins: a token, and a resumption.
CORS_REQUEST_HEADERS = ("Authorization", "Cache-Control", "Last-Event-ID")
CORS_MAX_AGE_S = 600

_STATIC_FILES = {
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_NO_STORE = {"Cache-Control": "no-cache"}  # an edited page shows on the next reload
_ORIGIN = re.compile(r"(https?)://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5}|:\*)?")


def check_origin(pattern: str) -> str:
    """Return `pattern` if it is an origin the allow list can hold, else raise ValueError.

    >>> check_origin("http://localhost:*")
    'http://localhost:*'
    >>> check_origin("http://localhost:8888/lab")
    Traceback (most recent call last):
    ...
    ValueError: a CORS origin is scheme://host, scheme://host:port or scheme://host:*, got 'http://localhost:8888/lab'
    """
    if not _ORIGIN.fullmatch(pattern):
        raise ValueError(f"a CORS origin is scheme://host, scheme://host:port or scheme://host:*, got {pattern!r}")
    return pattern


def origin_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A test of an `Origin` header against the allow list; `:*` stands for any port, or none.

    >>> allowed = origin_matcher(["http://127.0.0.1:*", "https://app.example"])
    >>> [allowed(o) for o in ["http://127.0.0.1:8888", "http://127.0.0.1", "https://app.example", "http://app.example"]]
    [True, True, True, False]
    >>> allowed("http://127.0.0.1.evil.example:80")
    False
    """
    exact = {check_origin(pattern).lower() for pattern in patterns if not pattern.endswith(":*")}
    any_port = [pattern[:-2].lower() for pattern in patterns if pattern.endswith(":*")]

    def allowed(origin: str) -> bool:
        origin = origin.lower()
        if origin in exact:
            return True
        host, _, port = origin.rpartition(":")
        return origin in any_port or (host in any_port and port.isdigit())

    return allowed


class CorsMiddleware:
    """CORS for the chat endpoints, with nothing for an origin outside the allow list.

    An allowed origin gets `Access-Control-Allow-Origin` naming it (never `*`) and
    a preflight answered 204. Every other origin gets no CORS header and its
    preflight a 403 JSON refusal. Same-origin requests carry no `Origin` on GET
    and pass through untouched.
    """

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        for pattern in origins:
            check_origin(pattern)
        self.allowed = origin_matcher(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in CORS_PATHS:
            await self.app(scope, receive, send)
            return
        request_headers = Headers(scope=scope)
        origin = request_headers.get("origin")
        allowed = origin is not None and self.allowed(origin)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in request_headers:
            await self._preflight(origin if allowed else None)(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.append("Vary", "Origin")
                if allowed:
                    headers["Access-Control-Allow-Origin"] = str(origin)
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _preflight(allowed_origin: str | None) -> Response:
        if allowed_origin is None:
            reason = "this origin is not in the server's CORS allow list (Settings.cors_origins, --cors-origin)"
            body = {"error": "invalid_parameter", "parameter": "Origin", "reason": reason}
            return JSONResponse(body, status_code=403, headers={"Vary": "Origin"})
        headers = {
            "Access-Control-Allow-Origin": allowed_origin,
            "Access-Control-Allow-Methods": "GET",
            "Access-Control-Allow-Headers": ", ".join(CORS_REQUEST_HEADERS),
            "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
            "Vary": "Origin",
        }
        return Response(status_code=204, headers=headers)


def content_security_policy(frame_origins: Sequence[str]) -> str:
    """The page's policy: everything from its own origin only; framed by itself and `frame_origins`.

    IPv6 origins are left out of `frame-ancestors`, whose grammar has no bracketed hosts.

    >>> content_security_policy(["http://localhost:*", "http://[::1]:*"])  # doctest: +NORMALIZE_WHITESPACE
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self';
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self' http://localhost:*"
    """
    ancestors = " ".join(["'self'", *(origin for origin in frame_origins if "[" not in origin)])
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        f"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors {ancestors}"
    )


def web_routes(cors_origins: Sequence[str] = LOOPBACK_ORIGINS) -> list[BaseRoute]:
    """The page and its static files, read once from the package."""
    page = (STATIC_DIR / "index.html").read_bytes()
    files = {name: (STATIC_DIR / name).read_bytes() for name in _STATIC_FILES}
    page_headers = {**_NO_STORE, "Content-Security-Policy": content_security_policy(cors_origins)}

    async def serve_page(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=page_headers)

    async def serve_static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files:
            return JSONResponse({"error": "not_found", "reason": f"no static file {name!r}"}, 404)
        return Response(files[name], media_type=_STATIC_FILES[name], headers=_NO_STORE)

    return [Route(PAGE_PATH, serve_page), Route("/static/{name}", serve_static)]
