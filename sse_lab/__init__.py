"""sse-lab: stream LLM tokens with Server-Sent Events, and measure what arrives when."""

from .background import BackgroundServer, ServerStartError, serve_in_background
from .client import ChatRequestError, afetch_chat, astream_chat, fetch_chat, stream_chat
from .metrics import ChatResult, Chunk, Drop, Received, Spread
from .model import MODELS, GenerationRequest, TokenSource, echo, sim
from .server import Settings, create_app
from .sse import Decoder, Event, encode_comment, encode_event

__all__ = [
    "MODELS",
    "BackgroundServer",
    "ChatRequestError",
    "ChatResult",
    "Chunk",
    "Decoder",
    "Drop",
    "Event",
    "GenerationRequest",
    "Received",
    "ServerStartError",
    "Settings",
    "Spread",
    "TokenSource",
    "afetch_chat",
    "astream_chat",
    "create_app",
    "echo",
    "encode_comment",
    "encode_event",
    "fetch_chat",
    "serve_in_background",
    "sim",
    "stream_chat",
]
