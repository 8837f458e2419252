"""OpenAI Chat Completions: `POST /v1/chat/completions`, the dialect most OpenAI-compatible servers speak.

A stream is `data:` lines with no `event:` field, each a `chat.completion.chunk`
with the same `id`; the end is a line that is not JSON:

    data: {"id":"chatcmpl-1f…","object":"chat.completion.chunk",…,"choices":[{…,"delta":{"role":"assistant",…}]}
    data: {…,"choices":[{"index":0,"delta":{"content":"The"},"logprobs":null,"finish_reason":null}]}
    data: {…,"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}]}
    data: {…,"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":40,"total_tokens":43}}   (include_usage)
    data: [DONE]

finish_reason is `stop`, `length` (max_tokens, or the context window filled) or
`content_filter`. A failure mid-stream is a `data:` line whose JSON has a
top-level `error` object, then `[DONE]`, as vLLM sends it; the official SDK
raises `APIError` on it. Nothing resumes a dropped stream: no event has an id.
"""

from __future__ import annotations

import time
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
    compact,
    flag,
    integer,
    json_data,
    knobs,
    prompt_of,
    required,
    string,
    text_of,
)

PATH = "/v1/chat/completions"
ROLES = ("system", "developer", "user", "assistant")
FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "seed", "stream", "stream_options", "n")
DONE = b"data: [DONE]\n\n"

_FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter", "context_length_exceeded": "length"}


def parse(body: dict[str, JSON]) -> Ask:
    """Read a Chat Completions body into the kit's parameters."""
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
    parameters = {"prompt": prompt_of(None, turns), "model": string(required(body, "model"), "model"), **knobs(body)}
    limits = {
        name: integer(body[name], name)
        for name in ("max_tokens", "max_completion_tokens")
        if body.get(name) is not None
    }
    if len(set(limits.values())) > 1:
        raise InvalidParameter("max_completion_tokens", "disagrees with max_tokens (max_tokens is its older name)")
    if limits:
        parameters["max_tokens"] = next(iter(limits.values()))
    if body.get("n") not in (None, 1):
        raise InvalidParameter("n", "only one choice (n=1) is supported")
    stream = body.get("stream") is not None and flag(body["stream"], "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream or not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise InvalidParameter("stream_options", 'only {"include_usage": true|false}, and only with stream: true')
        include_usage = options.get("include_usage") is not None and flag(options["include_usage"], "include_usage")
    return Ask(parameters, stream, include_usage)


class ChatCompletionStream(DialectStream):
    """`chat.completion.chunk` lines: the role first, a delta per token, finish_reason, usage, `[DONE]`."""

    @cached_property
    def id(self) -> str:
        return f"chatcmpl-{uuid.uuid4().hex}"

    @cached_property
    def created(self) -> int:
        return int(time.time())

    def _chunk(self, choices: list[JSON], **extra: JSON) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.ask.model}
        chunk["choices"] = choices
        if self.ask.include_usage:
            chunk["usage"] = None  # every chunk but the last, as OpenAI sends them
        chunk.update(extra)
        return b"data: " + compact(chunk).encode() + b"\n\n"

    def _choice(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def opening(self) -> bytes:
        return self._choice({"role": "assistant", "content": ""})

    def encode_token(self, token: str) -> bytes:
        return self._choice({"content": token})

    def encode_end(self, end: End) -> bytes:
        if end.failed:
            error = {"message": end.message, "type": "server_error", "param": None, "code": end.reason}
            return b"data: " + compact({"error": error}).encode() + b"\n\n" + DONE
        finish = self._choice({}, _FINISH[end.reason])
        if self.ask.include_usage:
            finish += self._chunk([], usage=usage(self))
        return finish + DONE


def usage(chat: DialectStream) -> dict[str, int]:
    return {
        "prompt_tokens": chat.input_tokens,
        "completion_tokens": chat.output_tokens,
        "total_tokens": chat.input_tokens + chat.output_tokens,
    }


def complete(chat: DialectStream) -> dict[str, JSON]:
    """The `chat.completion` answering `stream: false`."""
    assert isinstance(chat, ChatCompletionStream) and chat.end is not None
    message = {"role": "assistant", "content": chat.text, "refusal": None}
    return {
        "id": chat.id,
        "object": "chat.completion",
        "created": chat.created,
        "model": chat.ask.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _FINISH[chat.end.reason]}],
        "usage": usage(chat),
    }


def error_body(error: DialectError) -> dict[str, JSON]:
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""
    kind = {"invalid_request": "invalid_request_error", "request_too_large": "invalid_request_error"}
    kind |= {"rate_limit": "rate_limit_error"}
    return {
        "error": {
            "message": error.message,
            "type": kind.get(error.kind, "server_error"),
            "param": error.param,
            "code": error.code or error.kind,
        }
    }


def stream_request(base_url: str, prompt: str, params: Mapping[str, Any]) -> StreamRequest:
    """A streamed Chat Completions request for `prompt` to `base_url` (ending in /v1), usage included.

    `params` are body fields: `model` (default "sim", the kit's), `max_tokens`,
    `seed`, and anything else a server takes (the kit's knobs: ttft_ms, token_ms...).

    >>> request = stream_request("http://127.0.0.1:8000/v1", "hi", {"max_tokens": 5})
    >>> request.url, request.json["messages"], request.json["max_tokens"]
    ('http://127.0.0.1:8000/v1/chat/completions', [{'role': 'user', 'content': 'hi'}], 5)
    """
    body: dict[str, JSON] = {"model": "sim", "messages": [{"role": "user", "content": prompt}]}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    body |= params
    return StreamRequest("POST", base_url.rstrip("/") + "/chat/completions", json=body, headers={"Accept": MEDIA_TYPE})


def read_event(event: Event) -> Reading:
    """What one event of a Chat Completions stream means: a token, the finish, an error, or the end.

    >>> read_event(Event('{"choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}'))
    Reading(token=' hi', finish_reason=None, error=None, over=False)
    >>> read_event(Event("[DONE]")).over
    True
    """
    if event.data == "[DONE]":
        return Reading(over=True)
    data = json_data(event)
    if not isinstance(data, dict):
        return Reading()
    error = data.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type") or "error"
        return Reading(error={"code": code, "message": error.get("message", "")}, over=True)
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    delta = choice.get("delta") or {}
    return Reading(token=delta.get("content") or None, finish_reason=choice.get("finish_reason"))


DIALECT = Dialect("openai-chat", PATH, parse, ChatCompletionStream, complete, error_body, stream_request, read_event)
