"""The same tokens over other transports than SSE, for notebook 09 to measure side by side.

- `websocket`: `/ws/chat` in the kit's Starlette app (a JSON message per token, cancel by message).
- `long_poll`: `GET /api/chat/poll`, the pre-SSE baseline (a generation held server-side between polls).
- `grpc_stream`: `rpc Stream(ChatRequest) returns (stream Token)` on a gRPC server of its own (HTTP/2, Protobuf).

All of them take the SSE endpoint's parameters through its own parsers, run the same
token sources, and count into the same kind of `StreamStats` (`generation`).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.routing import BaseRoute

from ..model import TokenSource
from ..server import Settings, StreamStats
from .long_poll import long_poll_routes
from .websocket import websocket_route


def transport_routes(settings: Settings, models: Mapping[str, TokenSource], stats: StreamStats) -> list[BaseRoute]:
    """The WebSocket and long-polling routes `create_app` mounts beside the SSE endpoint."""
    return [websocket_route(settings, models, stats), *long_poll_routes(settings, models, stats)]
