"""Notebook 07: the same reply in four dialects, what each costs on the wire and on the server, and what reads it.

The four are the kit's own (`GET /api/chat/stream`) and the providers' the
kit's server speaks on `/v1` (see `sse_lab.dialects`). Every measurement here
asks the same token source for the same tokens, so any difference is framing:

- bytes per token: the body bytes on the wire (chunk framing included) that one
  more token adds, the slope between a short and a long reply; `fixed_bytes` is
  what a reply costs before and after its tokens (the intercept).
- server CPU per token: the serving thread's CPU time for a whole stream
  (`sse_lab.instruments.cpu.CpuMeter`) divided by its tokens, for streams long
  enough that the fixed part hardly counts.
- TTFT and ITL: measured by the kit's client, speaking each dialect
  (`stream_chat(..., api=...)`), runs interleaved so a slow moment hits all alike.
- what an official SDK shows: its iterator stamped as it yields text
  (`sdk_stream`), next to the kit's client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from .. import client
from ..background import serve_in_background
from ..client import Param, stream_chat, stream_request
from ..instruments.cpu import MEASURING_TOKEN_MS, CpuMeter
from ..instruments.faults import DropConnections
from ..instruments.wire import WireCapture, capture
from ..metrics import ChatResult
from ..server import Settings, create_app
from ..sse import MEDIA_TYPE
from . import DEFAULT_PROMPT

APIS = client.APIS  # the kit's own, then the providers'
SDK_APIS = APIS[1:]


def base_url_for(api: str, server_url: str) -> str:
    """Where a client of `api` points: the server's root, or its /v1 for the OpenAI dialects."""
    return server_url + "/v1" if api.startswith("openai") else server_url


def capture_stream(server_url: str, api: str, prompt: str, **params: Param) -> WireCapture:
    """The raw bytes of one stream in `api`'s dialect, read by read (`sse_lab.instruments.wire`)."""
    request, _ = stream_request(api, base_url_for(api, server_url), prompt, dict(params))
    headers = {"Accept": MEDIA_TYPE, **(request.headers or {})}
    if request.json is None:
        return capture(request.url, params=request.params, headers=headers)
    body = json.dumps(request.json, ensure_ascii=False).encode()
    return capture(request.url, headers={**headers, "Content-Type": "application/json"}, body=body)


@dataclass(frozen=True)
class WireCost:
    """A dialect's bytes: per token (the slope) and per reply (the intercept), body bytes on the wire."""

    api: str
    bytes_per_token: float
    fixed_bytes: float
    token_text_bytes: float  # the tokens' own UTF-8 bytes, per token: what the framing wraps

    @property
    def overhead(self) -> float:
        """Wire bytes per byte of token text."""
        return self.bytes_per_token / self.token_text_bytes


def wire_costs(
    server_url: str, *, apis: Sequence[str] = APIS, short: int = 10, long: int = 60, prompt: str = DEFAULT_PROMPT
) -> dict[str, WireCost]:
    """Capture a `short` and a `long` reply in each dialect; the slope is bytes per token."""
    costs = {}
    for api in apis:
        sizes = []
        for tokens in (short, long):
            wire = capture_stream(server_url, api, prompt, max_tokens=tokens, ttft_ms=0, token_ms=0)
            sizes.append(len(wire.body_wire))
        per_token = (sizes[1] - sizes[0]) / (long - short)
        text = stream_chat(server_url, prompt, max_tokens=long, ttft_ms=0, token_ms=0).text
        costs[api] = WireCost(api, per_token, sizes[0] - per_token * short, len(text.encode()) / long)
    return costs


def server_cpu_per_token(
    *, apis: Sequence[str] = APIS, tokens: int = 400, runs: int = 3, prompt: str = DEFAULT_PROMPT, progress: bool = True
) -> dict[str, list[float]]:
    """Server CPU seconds per token, one figure per run, for each dialect: streams one at a time, at
    `MEASURING_TOKEN_MS` (each event a write of its own)."""
    meter = CpuMeter(create_app())
    per_token: dict[str, list[float]] = {api: [] for api in apis}
    with serve_in_background(meter) as server:
        for _ in tqdm(range(runs), desc="server CPU per dialect", disable=not progress):
            for api in apis:
                result = stream_chat(
                    base_url_for(api, server.url),
                    prompt,
                    api=api,
                    max_tokens=tokens,
                    ttft_ms=0,
                    token_ms=MEASURING_TOKEN_MS,
                )
                assert result.tokens == tokens, result.error
                per_token[api].append(meter.cpu_s[-1] / tokens)
    return per_token


def latencies(
    server_url: str,
    *,
    apis: Sequence[str] = APIS,
    runs: int = 5,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
    **params: Param,
) -> dict[str, list[ChatResult]]:
    """`runs` streams per dialect through the kit's client, the dialects taking turns."""
    results: dict[str, list[ChatResult]] = {api: [] for api in apis}
    for _ in tqdm(range(runs), desc="TTFT and ITL per dialect", disable=not progress):
        for api in apis:
            results[api].append(stream_chat(base_url_for(api, server_url), prompt, api=api, **params))
    return results


Pieces = Callable[[str, dict[str, Any]], Iterator[str]]


@contextmanager
def sdk_reader(api: str, server_url: str) -> Iterator[Pieces]:
    """A function `(prompt, params) -> text pieces` that streams with `api`'s official SDK, its client made beforehand.

    `params` are `model` and `max_tokens` (the SDK's own arguments) and the kit's
    knobs (sent with `extra_body`). The client, and its connections, close when
    the `with` block ends.
    """
    if api not in SDK_APIS:
        raise ValueError(f"api must be one of {', '.join(SDK_APIS)}, got {api!r}")
    # The SDKs come with the `lab` and `test` extras, not with the kit: imported only when used.
    if api == "anthropic":
        import anthropic

        def anthropic_pieces(prompt: str, params: dict[str, Any]) -> Iterator[str]:
            model, max_tokens, knobs = _split(params)
            messages: Any = [{"role": "user", "content": prompt}]
            with claude.messages.stream(
                model=model, max_tokens=max_tokens, messages=messages, extra_body=knobs
            ) as stream:
                yield from stream.text_stream

        with anthropic.Anthropic(base_url=server_url, api_key="unused", max_retries=0) as claude:
            yield anthropic_pieces
        return
    import openai

    def chat_pieces(prompt: str, params: dict[str, Any]) -> Iterator[str]:
        model, max_tokens, knobs = _split(params)
        messages: Any = [{"role": "user", "content": prompt}]
        for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, stream=True, extra_body=knobs
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    def responses_pieces(prompt: str, params: dict[str, Any]) -> Iterator[str]:
        model, max_tokens, knobs = _split(params)
        with client.responses.create(
            model=model, input=prompt, max_output_tokens=max_tokens, stream=True, extra_body=knobs
        ) as events:
            for event in events:
                if event.type == "response.output_text.delta":
                    yield event.delta

    with openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0) as client:
        yield chat_pieces if api == "openai-chat" else responses_pieces


def _split(params: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    knobs = {name: value for name, value in params.items() if name not in ("model", "max_tokens")}
    return str(params.get("model", "sim")), int(params.get("max_tokens", 64)), knobs


def sdk_stream(
    read: Pieces, prompt: str = DEFAULT_PROMPT, *, on_token: Callable[[str], object] | None = None, **params: Any
) -> ChatResult:
    """Stream with an SDK reader (`sdk_reader`), stamping each text piece when the SDK's iterator yields it.

    Neither SDK stamps anything itself: this is the best a program built on one
    can know, and it includes the SDK's own parsing (a pydantic object per
    event). The clock starts as the SDK is asked; `headers_at` stays 0.
    """
    result = ChatResult(mode="streamed", started_at=time.perf_counter())
    for piece in read(prompt, params):
        result.arrivals.append(time.perf_counter())
        result.text += piece
        if on_token is not None:
            on_token(piece)
    result.finished_at = time.perf_counter()
    return result


def sdk_vs_kit(
    server_url: str, api: str, *, runs: int = 5, prompt: str = DEFAULT_PROMPT, progress: bool = True, **params: Any
) -> dict[str, list[ChatResult]]:
    """The same stream read `runs` times by the official SDK and by the kit's client, taking turns."""
    results: dict[str, list[ChatResult]] = {f"{api} SDK": [], f"{api} kit client": []}
    with sdk_reader(api, server_url) as read:
        sdk_stream(read, prompt, **{**params, "ttft_ms": 0, "token_ms": 0})  # untimed: the SDK builds its types
        for _ in tqdm(range(runs), desc=f"{api}: SDK vs kit client", disable=not progress):
            results[f"{api} SDK"].append(sdk_stream(read, prompt, **params))
            results[f"{api} kit client"].append(stream_chat(base_url_for(api, server_url), prompt, api=api, **params))
    return results


def dropped_streams(
    *,
    apis: Sequence[str] = APIS,
    after_events: int = 10,
    retry_ms: int = 200,
    prompt: str = DEFAULT_PROMPT,
    **params: Param,
) -> dict[str, ChatResult]:
    """One stream per dialect through a proxy that cuts it after `after_events` events: who gets the rest?

    The kit's client resumes with Last-Event-ID after `retry_ms`; the provider
    dialects have no event ids, so their streams end with what they got.
    """
    results = {}
    for api in apis:
        app = DropConnections(create_app(Settings(retry_ms=retry_ms)), after_events=after_events)
        with serve_in_background(app) as server:
            results[api] = stream_chat(base_url_for(api, server.url), prompt, api=api, **params)
    return results
