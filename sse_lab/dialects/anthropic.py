"""Anthropic Messages: `POST /v1/messages`, named events around content blocks.

Every event has an `event:` field (the SDK skips events without one) equal to
its JSON `type`:

    event: message_start          the message: id, model, empty content, usage.input_tokens
    event: content_block_start    block 0, {"type": "text", "text": ""}
    event: ping
    event: content_block_delta    one per token: {"delta": {"type": "text_delta", "text": " world"}}
    event: content_block_stop
    event: message_delta          {"delta": {"stop_reason": "end_turn" | "max_tokens" | "refusal" |
                                  "model_context_window_exceeded"}, "usage": {"output_tokens": 40}}
    event: message_stop

A failure mid-stream is `event: error` with
`{"type": "error", "error": {"type": "api_error" | "timeout_error" | ..., "message"}}`
and nothing after it (Anthropic's own servers send `overloaded_error` this way
when they are busy; this server refuses a full house before the stream, with 429
`rate_limit_error`). Nothing resumes a dropped stream.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from ..server import InvalidParameter
from ..sse import MEDIA_TYPE, Event
from .common import (
    JSON,
    Ask,
    Dialect,
    DialectError,
    DialectStream,
    End,
    Reading,
    StreamRequest,
    check_fields,
    flag,
    integer,
    json_data,
    knobs,
    prompt_of,
    required,
    sse,
    string,
    text_of,
)

PATH = "/v1/messages"
ROLES = ("user", "assistant")
FIELDS = ("model", "messages", "system", "max_tokens", "stream", "stop_sequences")
VERSION = "2023-06-01"  # the anthropic-version header the SDK sends

# The kit's end of a stream -> stop_reason, and back (for a client reading the stream).
_STOP_REASON = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "refusal",
    "context_length_exceeded": "model_context_window_exceeded",
}
_FINISH = {"end_turn": "stop", "max_tokens": "length", "refusal": "content_filter"}
_FINISH |= {"model_context_window_exceeded": "length"}
_ERROR_TYPE = {"invalid_request": "invalid_request_error", "request_too_large": "request_too_large"}
_ERROR_TYPE |= {"rate_limit": "rate_limit_error", "model_error": "api_error", "timeout": "timeout_error"}


def parse(body: dict[str, JSON]) -> Ask:
    """Read a Messages body into the kit's parameters; `max_tokens` is required, as Anthropic's API requires it."""
    check_fields(body, FIELDS)
    messages = required(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages", "must be a non-empty list of messages")
    turns = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidParameter(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        turns.append((message["role"], text_of(message.get("content"), f"{where}.content", ("text",))))
    system = None if body.get("system") is None else text_of(body["system"], "system", ("text",))
    parameters = {"prompt": prompt_of(system, turns), "model": string(required(body, "model"), "model")}
    parameters |= {"max_tokens": integer(required(body, "max_tokens"), "max_tokens"), **knobs(body)}
    if body.get("stop_sequences") not in (None, []):
        raise InvalidParameter("stop_sequences", "not supported by the simulated models")
    stream = body.get("stream") is not None and flag(body["stream"], "stream")
    return Ask(parameters, stream)


class MessageStream(DialectStream):
    """Anthropic's named events: message_start, one text block, message_delta, message_stop."""

    @cached_property
    def id(self) -> str:
        return f"msg_{uuid.uuid4().hex}"

    def message(self, stop_reason: str | None) -> dict[str, JSON]:
        content = [] if stop_reason is None else [{"type": "text", "text": self.text}]
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.ask.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        }

    def opening(self) -> bytes:
        return b"".join(
            [
                sse({"type": "message_start", "message": self.message(None)}, event="message_start"),
                sse(
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    event="content_block_start",
                ),
                sse({"type": "ping"}, event="ping"),
            ]
        )

    def encode_token(self, token: str) -> bytes:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}
        return sse(delta, event="content_block_delta")

    def encode_end(self, end: End) -> bytes:
        if end.failed:
            error = {"type": "error", "error": {"type": _ERROR_TYPE[end.reason], "message": end.message}}
            return sse(error, event="error")
        delta = {"stop_reason": _STOP_REASON[end.reason], "stop_sequence": None}
        usage = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        return b"".join(
            [
                sse({"type": "content_block_stop", "index": 0}, event="content_block_stop"),
                sse({"type": "message_delta", "delta": delta, "usage": usage}, event="message_delta"),
                sse({"type": "message_stop"}, event="message_stop"),
            ]
        )


def complete(chat: DialectStream) -> dict[str, JSON]:
    """The message answering `stream: false`."""
    assert isinstance(chat, MessageStream) and chat.end is not None
    return chat.message(_STOP_REASON[chat.end.reason])


def error_body(error: DialectError) -> dict[str, JSON]:
    """Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`."""
    return {"type": "error", "error": {"type": _ERROR_TYPE[error.kind], "message": error.message}}


def stream_request(base_url: str, prompt: str, params: Mapping[str, Any]) -> StreamRequest:
    """A streamed Messages request to `base_url` (the server's root: the path adds /v1); max_tokens 64 unless given."""
    body: dict[str, JSON] = {"model": "sim", "max_tokens": 64, "messages": [{"role": "user", "content": prompt}]}
    body |= {"stream": True, **params}
    headers = {"Accept": MEDIA_TYPE, "anthropic-version": VERSION}
    return StreamRequest("POST", base_url.rstrip("/") + PATH, json=body, headers=headers)


def read_event(event: Event) -> Reading:
    """What one event of a Messages stream means, by its `event:` name."""
    if event.event not in ("content_block_delta", "message_delta", "message_stop", "error"):
        return Reading()
    data = json_data(event)
    if not isinstance(data, dict):
        return Reading()
    if event.event == "content_block_delta":
        delta = data.get("delta") or {}
        return Reading(token=(delta.get("text") or None) if delta.get("type") == "text_delta" else None)
    if event.event == "message_delta":
        stop_reason = (data.get("delta") or {}).get("stop_reason")
        return Reading(finish_reason=_FINISH.get(stop_reason, stop_reason) if isinstance(stop_reason, str) else None)
    if event.event == "message_stop":
        return Reading(over=True)
    error = data.get("error") or {}
    return Reading(error={"code": error.get("type"), "message": error.get("message", "")}, over=True)


DIALECT = Dialect("anthropic", PATH, parse, MessageStream, complete, error_body, stream_request, read_event)
