"""What the three provider dialects share: reading a JSON body, messages to a prompt, one stream's end.

A dialect is a module (`openai_chat`, `openai_responses`, `anthropic`) that
turns a provider's request body into the kit's own parameters, and the kit's
stream into the provider's events. Validation, limits and counters are the
kit's own (`sse_lab.server.parse_query`, `parse_stream_query`,
`StreamStats.open_stream`): the body's fields are handed to them as if they had
come in a query string, so a knob means the same thing, with the same range and
the same reason when it is refused, on every endpoint.

Messages become the prompt this way (`prompt_of`): a single user message is
the prompt exactly, character for character, whether its content is a string or
a list of text parts (joined with nothing between them). Anything else (several
messages, or a system prompt: OpenAI's `system`/`developer` messages, the
Responses API's `instructions`, Anthropic's `system`) becomes a transcript, one
block per message, system first, blocks separated by a blank line:

    system: Answer briefly.

    user: hi

    assistant: Hello!

    user: how are you?

which is what a chat template does for a real model: the model reads one text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request

from ..model import GenerationRequest, TokenSource
from ..server import ChatStream, InvalidParameter, Settings, StreamOptions, StreamStats
from ..sse import Event, encode_event

JSON = Any  # a value json.loads returned

# The kit's knobs, accepted as extra body fields (the SDKs send them with `extra_body`).
INTEGER_KNOBS = ("seed", "fail_after", "context_window")
NUMBER_KNOBS = ("ttft_ms", "token_ms", "jitter_ms", "heartbeat_s")
KNOBS = (*NUMBER_KNOBS, *INTEGER_KNOBS, "blocklist")

# Fields of the providers' requests that change nothing for a simulated model: accepted and ignored.
IGNORED_FIELDS = frozenset({"temperature", "top_p", "top_k", "user", "metadata", "store", "service_tier"})

# Every error a dialect answers before a stream starts, by kind: its HTTP status.
STATUS = {"invalid_request": 400, "request_too_large": 413, "rate_limit": 429, "model_error": 502, "timeout": 504}


def max_body_bytes(settings: Settings) -> int:
    """The largest request body read: room for a prompt at the limit, every character JSON-escaped (6 bytes)."""
    return 6 * settings.max_prompt_chars + 65_536


class DialectError(Exception):
    """A request a dialect refuses before any byte of a stream: `kind` is a key of STATUS."""

    def __init__(self, kind: str, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code

    @property
    def status(self) -> int:
        return STATUS[self.kind]

    @classmethod
    def invalid(cls, error: InvalidParameter) -> DialectError:
        code = "model_not_found" if error.parameter == "model" and "unknown" in error.reason else "invalid_value"
        return cls("invalid_request", f"{error.parameter}: {error.reason}", error.parameter, code)


async def read_json(request: Request, limit: int) -> dict[str, JSON]:
    """The request's body as a JSON object; DialectError for anything else, or for more than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise DialectError("request_too_large", f"the body has {declared} bytes, more than the limit of {limit}")
    pieces, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise DialectError("request_too_large", f"the body is longer than the limit of {limit} bytes")
        pieces.append(piece)
    try:
        body = json.loads(b"".join(pieces))
    except (ValueError, RecursionError) as error:  # bad JSON, bad UTF-8, or nested too deep
        raise DialectError("invalid_request", f"the body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise DialectError("invalid_request", f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _shown(value: JSON) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(value: JSON, name: str) -> str:
    """A JSON integer as the kit's parsers take it (a string); a bool, float or string is refused."""
    if type(value) is not int:
        raise InvalidParameter(name, f"must be an integer, got {_shown(value)}")
    return str(value)


def number(value: JSON, name: str) -> str:
    """A JSON number as the kit's parsers take it: a plain decimal string, no exponent (1e-07 is '0.0000001').

    >>> number(1e-07, "ttft_ms"), number(250, "ttft_ms"), number(2.5, "ttft_ms")
    ('0.0000001', '250', '2.5')
    """
    if type(value) not in (int, float):
        raise InvalidParameter(name, f"must be a number, got {_shown(value)}")
    text = repr(value)
    if "e" not in text or not math.isfinite(value):
        return text.removesuffix(".0")
    return f"{value:.20f}".rstrip("0").rstrip(".") or "0"  # the kit reads no exponent


def flag(value: JSON, name: str) -> bool:
    if type(value) is not bool:
        raise InvalidParameter(name, f"must be true or false, got {_shown(value)}")
    return value


def string(value: JSON, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidParameter(name, f"must be a string, got {_shown(value)}")
    return value


def words(value: JSON, name: str) -> str:
    """`blocklist`: a list of words, or the kit's comma-separated string of them."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(word, str) and word and "," not in word for word in value):
        return ",".join(value)
    raise InvalidParameter(name, f"must be a list of non-empty words without commas, got {_shown(value)}")


def knobs(body: Mapping[str, JSON]) -> dict[str, str]:
    """The kit's knobs a body holds, as query-string values (null means absent)."""
    found: dict[str, str] = {}
    for name in KNOBS:
        value = body.get(name)
        if value is None:
            continue
        if name in INTEGER_KNOBS:
            found[name] = integer(value, name)
        elif name in NUMBER_KNOBS:
            found[name] = number(value, name)
        else:
            found[name] = words(value, name)
    return found


def check_fields(body: Mapping[str, JSON], known: Iterable[str]) -> None:
    """Refuse a field no one here knows, rather than silently ignore what the client meant."""
    allowed = set(known) | set(KNOBS) | IGNORED_FIELDS
    for name in body:
        if name not in allowed:
            raise DialectError(
                "invalid_request",
                f"unknown field {name!r}; this server takes {', '.join(sorted(allowed))}",
                name,
                "unknown_parameter",
            )


def required(body: Mapping[str, JSON], name: str) -> JSON:
    if body.get(name) is None:
        raise DialectError("invalid_request", f"{name}: required", name, "missing_required_parameter")
    return body[name]


def text_of(content: JSON, path: str, part_types: tuple[str, ...]) -> str:
    """A message's content as text: a string, or a list of text parts joined with nothing between them."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidParameter(path, f"must be a string or a list of text parts, got {_shown(content)}")
    texts = []
    for number_, part in enumerate(content):
        where = f"{path}[{number_}]"
        if not isinstance(part, dict) or part.get("type") not in part_types or not isinstance(part.get("text"), str):
            kinds = " or ".join(repr(kind) for kind in part_types)
            raise InvalidParameter(where, f"only text parts are supported: {{'type': {kinds}, 'text': '...'}}")
        texts.append(part["text"])
    return "".join(texts)


def prompt_of(system: str | None, turns: list[tuple[str, str]]) -> str:
    """The prompt the model reads: a lone user message exactly, else a transcript (see the module docstring).

    >>> prompt_of(None, [("user", "hi\\r\\n")])
    'hi\\r\\n'
    >>> prompt_of("Be brief.", [("user", "hi")])
    'system: Be brief.\\n\\nuser: hi'
    """
    if system is None and len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    blocks = ([("system", system)] if system is not None else []) + turns
    return "\n\n".join(f"{role}: {text}" for role, text in blocks)


@dataclass(frozen=True)
class Ask:
    """A dialect's request, read: the kit's parameters (as query-string values) and how to answer."""

    parameters: dict[str, str]  # prompt, model, max_tokens and the knobs, for parse_query / parse_stream_query
    stream: bool
    include_usage: bool = False

    @property
    def query(self) -> QueryParams:
        return QueryParams(self.parameters)

    @property
    def model(self) -> str:
        return self.parameters["model"]


@dataclass(frozen=True)
class End:
    """How a stream ended, in the kit's words: reason is `stop`, `length` or one of the kit's error codes."""

    reason: str
    message: str = ""

    @property
    def failed(self) -> bool:
        """Broken, not finished: the model failed, or the server's time limit cut it."""
        return self.reason in ("model_error", "timeout")


class DialectStream(ChatStream):
    """A kit stream that writes another API's events: subclasses say how, per token and at the end.

    It keeps the text sent and the end, so a non-streamed request runs the same
    stream and builds its one JSON answer from them.
    """

    def __init__(
        self,
        source: TokenSource,
        generation: GenerationRequest,
        options: StreamOptions,
        settings: Settings,
        stats: StreamStats,
        ask: Ask,
    ) -> None:
        super().__init__(source, generation, options, settings, stats)
        self.ask = ask
        self.pieces: list[str] = []
        self.end: End | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def input_tokens(self) -> int:
        return self.options.prompt_tokens

    @property
    def output_tokens(self) -> int:
        return len(self.pieces)

    def token_event(self, token: str, index: int) -> bytes:
        self.pieces.append(token)
        return self.encode_token(token)

    def done_event(self, finish_reason: str, tokens: int) -> bytes:
        self.end = End(finish_reason)
        return self.encode_end(self.end)

    def error_event(self, code: str, message: str) -> bytes:
        self.end = End(code, message)
        return self.encode_end(self.end)

    def opening(self) -> bytes:
        return b""

    def encode_token(self, token: str) -> bytes:
        raise NotImplementedError

    def encode_end(self, end: End) -> bytes:
        raise NotImplementedError


def compact(payload: JSON) -> str:
    """JSON as the kit writes it: no spaces, non-ASCII characters as they are (line breaks escaped)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse(payload: JSON, event: str | None = None) -> bytes:
    """One event whose data is `payload` as compact JSON."""
    return encode_event(compact(payload), event=event)


@dataclass(frozen=True)
class StreamRequest:
    """What a client sends to open a dialect's stream."""

    method: str
    url: str
    json: dict[str, JSON] | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Reading:
    """What one received event means to a measuring client.

    token: text it carries (None: none). finish_reason: the stream finished, in the
    kit's words (`stop`, `length`, `content_filter`). error: it failed,
    `{"code", "message"}`. over: nothing more will come.
    """

    token: str | None = None
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    over: bool = False


def json_data(event: Event) -> JSON:
    """An event's data as JSON; None for data that is not."""
    try:
        return json.loads(event.data)
    except ValueError:
        return None


@dataclass(frozen=True)
class Dialect:
    """One provider API: its route, how to read its requests, and how a client reads its streams."""

    name: str
    path: str
    parse: Callable[[dict[str, JSON]], Ask]
    stream: type[DialectStream]
    complete: Callable[[DialectStream], dict[str, JSON]]  # the whole answer to stream: false
    error_body: Callable[[DialectError], dict[str, JSON]]
    stream_request: Callable[[str, str, Mapping[str, Any]], StreamRequest]
    read_event: Callable[[Event], Reading]
