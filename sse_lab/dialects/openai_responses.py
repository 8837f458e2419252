"""OpenAI Responses: `POST /v1/responses`, typed events that describe a response as it is built.

Every event names its type twice, in the `event:` field and in the JSON's
`type`, and carries a `sequence_number` that counts from 0:

    event: response.created                  the response, status in_progress, no output yet
    event: response.in_progress
    event: response.output_item.added        a message item, status in_progress
    event: response.content_part.added       an output_text part, empty
    event: response.output_text.delta        one per token: {"delta": " world", ...}
    event: response.output_text.done         the whole text
    event: response.content_part.done
    event: response.output_item.done
    event: response.completed                or response.incomplete (max_output_tokens, content_filter)
                                             or response.failed (the model failed; status failed, error)

There is no `[DONE]`: the terminal event is the end. OpenAI resumes only
background responses (`GET /v1/responses/{id}?stream=true&starting_after=N`,
N a sequence number); a foreground stream, like this one, cannot be resumed.
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
from .openai_chat import error_body

PATH = "/v1/responses"
ROLES = ("system", "developer", "user", "assistant")
FIELDS = ("model", "input", "instructions", "max_output_tokens", "stream")
PART_TYPES = ("input_text", "output_text")

# The kit's end of a stream -> (status, incomplete_details.reason)
_STATUS = {
    "stop": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "context_length_exceeded": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}


def parse(body: dict[str, JSON]) -> Ask:
    """Read a Responses body into the kit's parameters: `input` (text or messages), `instructions`."""
    check_fields(body, FIELDS)
    given = required(body, "input")
    if isinstance(given, str):
        turns = [("user", given)]
    elif isinstance(given, list) and given:
        turns = []
        for number, item in enumerate(given):
            where = f"input[{number}]"
            if not isinstance(item, dict) or item.get("role") not in ROLES or item.get("type", "message") != "message":
                raise InvalidParameter(f"{where}.role", f"must be a message with a role of {', '.join(ROLES)}")
            turns.append((item["role"], text_of(item.get("content"), f"{where}.content", PART_TYPES)))
    else:
        raise InvalidParameter("input", "must be a string or a non-empty list of messages")
    system = None if body.get("instructions") is None else string(body["instructions"], "instructions")
    parameters = {"prompt": prompt_of(system, turns), "model": string(required(body, "model"), "model"), **knobs(body)}
    if body.get("max_output_tokens") is not None:
        parameters["max_tokens"] = integer(body["max_output_tokens"], "max_output_tokens")
    stream = body.get("stream") is not None and flag(body["stream"], "stream")
    return Ask(parameters, stream)


class ResponseStream(DialectStream):
    """The Responses API's typed events, numbered from 0."""

    sequence_number = 0

    @cached_property
    def id(self) -> str:
        return f"resp_{uuid.uuid4().hex}"

    @cached_property
    def item_id(self) -> str:
        return f"msg_{uuid.uuid4().hex}"

    @cached_property
    def created_at(self) -> int:
        return int(time.time())

    def _event(self, kind: str, **fields: JSON) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse(payload, event=kind)

    def response(self, status: str, **fields: JSON) -> dict[str, JSON]:
        """The response object as the events carry it: `status` and what is known so far."""
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.ask.model,
            "output": [],
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": self.generation.max_tokens,
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "usage": None,
            **fields,
        }

    def part(self) -> dict[str, JSON]:
        return {"type": "output_text", "text": self.text, "annotations": []}

    def item(self, status: str) -> dict[str, JSON]:
        content = [self.part()] if status != "in_progress" else []
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def usage(self) -> dict[str, JSON]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def finished(self, end: End) -> dict[str, JSON]:
        """The response once the stream is over."""
        if end.failed:
            error = {"code": "server_error", "message": end.message}
            return self.response("failed", output=[self.item("incomplete")], error=error, usage=self.usage())
        status, reason = _STATUS[end.reason]
        details = None if reason is None else {"reason": reason}
        output = [self.item(status)]
        return self.response(status, output=output, incomplete_details=details, usage=self.usage())

    def opening(self) -> bytes:
        place = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return b"".join(
            [
                self._event("response.created", response=self.response("in_progress")),
                self._event("response.in_progress", response=self.response("in_progress")),
                self._event("response.output_item.added", output_index=0, item=self.item("in_progress")),
                self._event("response.content_part.added", **place, part=self.part()),
            ]
        )

    def encode_token(self, token: str) -> bytes:
        place = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return self._event("response.output_text.delta", **place, delta=token, logprobs=[])

    def encode_end(self, end: End) -> bytes:
        response = self.finished(end)
        if end.failed:
            return self._event("response.failed", response=response)
        place = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        (item,) = response["output"]
        return b"".join(
            [
                self._event("response.output_text.done", **place, text=self.text, logprobs=[]),
                self._event("response.content_part.done", **place, part=self.part()),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event(f"response.{response['status']}", response=response),
            ]
        )


def complete(chat: DialectStream) -> dict[str, JSON]:
    """The response object answering `stream: false`."""
    assert isinstance(chat, ResponseStream) and chat.end is not None
    return chat.finished(chat.end)


def stream_request(base_url: str, prompt: str, params: Mapping[str, Any]) -> StreamRequest:
    """A streamed Responses request: `input` is the prompt; `max_tokens` in `params` becomes max_output_tokens."""
    fields = dict(params)
    if "max_tokens" in fields:
        fields["max_output_tokens"] = fields.pop("max_tokens")
    body: dict[str, JSON] = {"model": "sim", "input": prompt, "stream": True, **fields}
    return StreamRequest("POST", base_url.rstrip("/") + "/responses", json=body, headers={"Accept": MEDIA_TYPE})


def read_event(event: Event) -> Reading:
    """What one event of a Responses stream means, by its JSON `type`."""
    data = json_data(event)
    if not isinstance(data, dict):
        return Reading()
    kind = data.get("type")
    if kind == "response.output_text.delta":
        return Reading(token=data.get("delta") or None)
    if kind in ("response.completed", "response.incomplete"):
        details = (data.get("response") or {}).get("incomplete_details") or {}
        reason = {None: "stop", "max_output_tokens": "length"}.get(details.get("reason"), details.get("reason"))
        return Reading(finish_reason=reason, over=True)
    if kind in ("response.failed", "error"):
        error = (data.get("response") or {}).get("error") or data
        return Reading(error={"code": error.get("code"), "message": error.get("message", "")}, over=True)
    return Reading()


DIALECT = Dialect("openai-responses", PATH, parse, ResponseStream, complete, error_body, stream_request, read_event)
