"""sse-lab: stream LLM tokens with Server-Sent Events, and measure what arrives when."""

import logging

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

# A library logs and the application decides where it goes: without this, Python's
# last-resort handler prints the server's warnings (a model failing on purpose) as
# stderr under every notebook cell. `python -m sse_lab serve` shows them on its terminal.
logging.getLogger(__name__).addHandler(logging.NullHandler())
