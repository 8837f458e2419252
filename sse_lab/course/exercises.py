"""Checkers for the notebooks' exercises.

Each `check_*` function takes the student's answer, tests it (against measured
runs where the exercise is about measurement) and prints a line saying it passed;
a wrong answer raises AssertionError with a hint. An exercise not attempted yet
(its body still raises NotImplementedError) only prints a reminder, so a fresh
notebook runs from top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product
from typing import Any

import httpx
from starlette.types import ASGIApp

from ..background import serve_in_background
from ..client import Param, fetch_chat, stream_chat
from ..experiments.browser import connection_limit
from ..experiments.buffering import WriteBuffer
from ..instruments.conformance import load_vectors
from ..instruments.faults import DropConnections, IdleTimeout
from ..metrics import ChatResult, RequestRecord
from ..model import one_at_a_time, sim
from ..parts.chromium import Chromium
from ..parts.nginx import ProxyConfig, nginx_or_skip, start_nginx
from ..server import Settings, create_app
from ..sse import decode


def _attempted(exercise: str, attempt: Callable[[], object]) -> bool:
    try:
        attempt()
    except NotImplementedError:
        _remind(exercise)
        return False
    return True


def _remind(exercise: str) -> None:
    print(f"{exercise}: not attempted yet. Replace `raise NotImplementedError` with your code.")


def _passed(exercise: str, detail: str) -> None:
    print(f"{exercise}: passed. {detail}")


def check_tpot(tpot: Callable[[float, list[float]], float | None], measured: ChatResult) -> None:
    """Exercise 01.1: `tpot(started_at, arrivals)` must match the benchmark definition."""
    exercise = "Exercise 1 (TPOT)"
    if measured.tpot is None:
        raise ValueError("check_tpot needs a measured run with two tokens or more")
    if not _attempted(exercise, lambda: tpot(0.0, [0.1, 0.2])):
        return
    cases = {
        "two tokens 50 ms apart": (1.0, [1.2, 1.25], 0.05),
        "uneven gaps": (0.0, [0.5, 0.6, 0.9, 1.0], (1.0 - 0.5) / 3),
        "a lone token": (0.0, [0.3], None),
        "no token at all": (0.0, [], None),
        "your measured run": (measured.started_at, measured.arrivals, measured.tpot),
    }
    for name, (started_at, arrivals, expected) in cases.items():
        got = tpot(started_at, list(arrivals))
        if expected is None:
            assert got is None, f"{name}: TPOT needs two tokens or more; expected None, got {got!r}"
        else:
            assert got is not None and abs(got - expected) < 1e-9, (
                f"{name}: expected {expected:.6f} s, got {got!r}. "
                "TPOT is (E2E - TTFT) / (tokens - 1): does the request start cancel out?"
            )
    _passed(exercise, f"Your measured run: {1000 * measured.tpot:.1f} ms per token after the first.")


def check_buffered_ttft(predict: Callable[[float, float, int], float], base_url: str) -> None:
    """Exercise 01.2: predict the buffered TTFT (s) from ttft_ms, token_ms and the token count."""
    exercise = "Exercise 2 (buffered TTFT)"
    if not _attempted(exercise, lambda: predict(100.0, 10.0, 5)):
        return
    for ttft_ms, token_ms, tokens in [(50.0, 10.0, 30), (250.0, 5.0, 10)]:
        predicted = predict(ttft_ms, token_ms, tokens)
        measured = fetch_chat(base_url, "predict me", max_tokens=tokens, ttft_ms=ttft_ms, token_ms=token_ms).ttft
        assert measured is not None
        # The prediction leaves out the network and the server's own time: allow
        # for them generously, since a shared machine adds its own delays.
        assert abs(predicted - measured) < 0.2 * measured + 0.05, (
            f"ttft_ms={ttft_ms}, token_ms={token_ms}, {tokens} tokens: you predicted "
            f"{1000 * predicted:.0f} ms, the server took {1000 * measured:.0f} ms. "
            "When is the last token due? (And is your answer in seconds?)"
        )
    _passed(exercise, "A buffered client waits for the last token, whatever the first one cost.")


def check_resume(resume: Callable[..., str]) -> None:
    """Exercise 04.1: `resume(base_url, prompt, partial, **params)` must return the whole text.

    `partial` is what a client got before its connection dropped (it did not
    reconnect by itself); the answer must reconnect where it left off.
    """
    exercise = "Exercise 1 (resume by hand)"
    params: dict[str, Param] = {"max_tokens": 24, "ttft_ms": 0, "token_ms": 0}
    for drop_after in (3, 11):
        app = DropConnections(create_app(), after_events=drop_after)
        with serve_in_background(app) as server:
            partial = stream_chat(server.url, "resume me", max_reconnects=0, **params)
            whole = stream_chat(server.url, "resume me", **params).text
            try:
                text = resume(server.url, "resume me", partial, **params)
            except NotImplementedError:
                _remind(exercise)
                return
        assert text == whole, (
            f"cut after {drop_after} tokens: the text differs from the uninterrupted one "
            f"({len(text)} vs {len(whole)} characters). Which id did the client see last, "
            "and does the server resume after it or at it?"
        )
    _passed(exercise, "No token lost, none repeated.")


def check_heartbeat_interval(heartbeat_interval: Callable[[float], float]) -> None:
    """Exercise 04.2: pick `heartbeat_s` for a proxy that cuts connections idle for `idle_timeout_s`.

    The stream must survive a prefill three times longer than the timeout, and
    the heartbeats must not be wasteful: at most 10 per timeout.
    """
    exercise = "Exercise 2 (heartbeat interval)"
    if not _attempted(exercise, lambda: heartbeat_interval(1.0)):
        return
    for idle_s in (0.3, 0.6):
        interval = heartbeat_interval(idle_s)
        assert idle_s / 10 <= interval, f"{interval} s for a {idle_s} s timeout: more heartbeats than needed"
        with serve_in_background(IdleTimeout(create_app(), idle_s=idle_s)) as server:
            result = stream_chat(
                server.url, "keep me", max_reconnects=0, max_tokens=3, ttft_ms=3000 * idle_s, heartbeat_s=interval
            )
        assert not result.drops and result.tokens == 3, (
            f"heartbeat every {interval} s behind a {idle_s} s idle timeout: the proxy cut the stream. "
            "What if a heartbeat is a little late?"
        )
    _passed(exercise, "The proxy never saw a silent connection.")


# Notebook 02's exercises import what they need here, so the module's imports stay as they were.

_FRAME_CASES = {
    "plain text": "hello",
    "the empty string": "",
    "two lines": "two\nlines",
    "a blank line inside": "An SSE event looks like this:\n\nevent: done\ndata: {}\n\nThat is all.",
    "leading spaces": "  indented",
    "a trailing line break": "end\n",
    "only line breaks": "\n\n\n",
    "a colon first": ": not a comment",
    "a field name alone": "data",
    "non-ASCII": "é 🌊 日本",
    "NUL": "a\0b",
}


def check_frame(frame: Callable[[str], bytes]) -> None:
    """Exercise 02.1: `frame(text)` must give bytes that `sse_lab.sse.decode` turns back into one event: `text`."""
    exercise = "Exercise 1 (framing)"
    if not _attempted(exercise, lambda: frame("hi")):
        return
    cases = dict(_FRAME_CASES)
    cases.update((f"the text {''.join(chars)!r}", "".join(chars)) for chars in product(" a:\n", repeat=4))
    for name, text in cases.items():
        raw = frame(text)
        assert isinstance(raw, bytes), f"{name}: frame() must return bytes ready for the socket, got {type(raw)}"
        events = decode(raw)
        assert events, (
            f"{name}: {raw!r} holds no event. Does it end with a blank line, and does it have a `data:` "
            "field even when the text is empty?"
        )
        assert len(events) == 1, (
            f"{name}: {raw!r} decodes to {len(events)} events: the text broke out of its frame. "
            "A blank line ends an event: give each line of the text its own `data:` field."
        )
        assert events[0].data == text, (
            f"{name}: {text!r} was framed as {raw!r} and came back as {events[0].data!r}. "
            "A parser removes exactly one space after the colon and joins `data` lines with LF."
        )
    first, second = "one\n\ntwo", "three"
    together = [event.data for event in decode(frame(first) + frame(second))]
    assert together == [first, second], f"two frames sent back to back decode to {together!r}: does each one end?"
    _passed(exercise, f"{len(cases)} texts, blank lines and all, came back exactly.")


def check_line_parser(parse: Callable[[str], list[tuple[str, str]]], stream: bytes) -> None:
    """Exercise 02.2: `parse(body)` must find the (type, data) of every event, as the standard does.

    It is checked on `stream` (a body the server sent) and on every conformance
    vector that stays inside the subset the exercise states: LF line ends, no
    byte order mark.
    """
    exercise = "Exercise 2 (a line parser)"
    if not _attempted(exercise, lambda: parse("data: x\n\n")):
        return
    expected = [(event.event, event.data) for event in decode(stream)]
    got = [tuple(event) for event in parse(stream.decode())]
    assert got == expected, f"the server's stream holds {expected}, your parser found {got}"
    vectors = [vector for vector in load_vectors() if "raw" in vector and not {"\r", "\ufeff"} & set(vector["raw"])]
    for vector in vectors:
        expected = [(event["event"], event["data"]) for event in vector["events"]]
        got = [tuple(event) for event in parse(vector["raw"])]
        assert got == expected, (
            f"vector {vector['name']!r}: the stream {vector['raw']!r} holds {expected}, your parser found {got}. "
            f"The rule: {vector['source']}"
        )
    _passed(exercise, f"The server's stream and {len(vectors)} conformance vectors parse as the standard says.")


def check_lumps(lumps: Callable[[list[float]], list[int]]) -> None:
    """Exercise 03.1: `lumps(arrivals)` must count the tokens that arrived together, lump by lump."""
    exercise = "Exercise 1 (find the lumps)"
    if not _attempted(exercise, lambda: lumps([0.1, 0.2])):
        return
    cases = {
        "one by one": [0.1, 0.2, 0.3],
        "all at once": [0.5] * 4,
        "in bursts": [0.1, 0.1, 0.3, 0.3, 0.3, 0.4],
        "nothing": [],
    }
    with serve_in_background(WriteBuffer(create_app(), 1024)) as server:
        cases["measured behind a 1 KiB write buffer"] = stream_chat(
            server.url, "lumps", max_tokens=60, ttft_ms=0, token_ms=2
        ).arrivals
    for name, arrivals in cases.items():
        expected = ChatResult(mode="streamed", started_at=0.0, arrivals=arrivals).lumps
        got = lumps(list(arrivals))
        assert got == expected, f"{name}: expected {expected}, got {got}. Tokens of one read share one arrival time."
    _passed(exercise, "A lump is one read that carried several tokens: the signature of a buffer upstream.")


def check_proxy_config(sse_proxy_config: Callable[[], ProxyConfig]) -> None:
    """Exercise 03.2: `sse_proxy_config()` returns a config with gzip on and X-Accel-Buffering ignored that streams."""
    exercise = "Exercise 2 (an nginx that streams anyway)"
    if not _attempted(exercise, sse_proxy_config) or nginx_or_skip() is None:
        return
    config = sse_proxy_config()
    assert config.gzip and config.ignore_accel_buffering, (
        "the operations team insists: gzip on, and upstream X-Accel-Buffering headers ignored"
    )
    with serve_in_background() as server, start_nginx(server.url, config) as proxy:
        result = stream_chat(proxy.url, "stream anyway", max_tokens=20, ttft_ms=50, token_ms=20)
    assert result.tokens == 20 and max(result.lumps) < result.tokens / 2, (
        f"through {config.label}, the tokens arrived in lumps of {result.lumps}: something still holds them"
    )
    _passed(exercise, f"{config.label}: tokens arrived one by one, compressed.")


# Notebook 10: a real model

_SPLIT_TEXTS = ("🌊🔥", "日本語", "naïve café", "e\u0301", "👩‍💻 ok")


def check_detokenize(detokenize: Callable[[list[bytes]], list[str]]) -> None:
    """Exercise 10.1: pieces that never end inside a character and join to the text, however tokens split it."""
    exercise = "Exercise 1 (a detokenizer that never breaks a character)"
    if not _attempted(exercise, lambda: detokenize([b"a"])):
        return
    for text in _SPLIT_TEXTS:
        raw = text.encode()
        for cut in range(1, len(raw)):
            tokens = [raw[:cut], raw[cut:]]
            sent = detokenize(tokens)
            assert "".join(sent) == text, f"{tokens!r} became {sent!r}: the pieces must join to {text!r}"
            assert all("\ufffd" not in piece for piece in sent), f"{tokens!r} became {sent!r}: a broken character"
        each_byte = [raw[index : index + 1] for index in range(len(raw))]
        assert "".join(detokenize(each_byte)) == text, f"{text!r} fed a byte at a time came out wrong"
    _passed(exercise, "Every split of emoji, CJK and combining accents arrived whole.")


def check_predicted_ttft(predicted_ttft: Callable[[int, float, float], float]) -> None:
    """Exercise 10.2: the TTFT of the k-th of three clients that ask one model at once, within 25 %.

    Measured on the sim served one generation at a time (`model.one_at_a_time`), the
    queue of a single llama.cpp context with the sim's exact timing.
    """
    from concurrent.futures import ThreadPoolExecutor

    exercise = "Exercise 2 (predict the wait)"
    if not _attempted(exercise, lambda: predicted_ttft(0, 0.1, 0.5)):
        return
    params: dict[str, Param] = {"model": "queued", "max_tokens": 10, "ttft_ms": 150, "token_ms": 20}
    with serve_in_background(create_app(models={"queued": one_at_a_time(sim)})) as server:
        alone = stream_chat(server.url, "alone", **params)
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(stream_chat, server.url, "together", **params) for _ in range(3)]
            measured = sorted(result.ttft or 0.0 for result in (future.result() for future in futures))
    assert alone.ttft is not None and alone.e2e is not None
    for k, ttft in enumerate(measured):
        guess = predicted_ttft(k, alone.ttft, alone.e2e)
        assert abs(guess - ttft) <= 0.25 * ttft, (
            f"client {k}: predicted {guess * 1000:.0f} ms, measured {ttft * 1000:.0f} ms. "
            "What does client k wait for before its own prefill starts?"
        )
    _passed(exercise, f"Measured {', '.join(f'{ttft * 1000:.0f}' for ttft in measured)} ms.")


# ── Notebook 07: LLM API dialects ─────────────────────────────────────────────


def check_chat_completions_parser(parse: Callable[[bytes], str]) -> None:
    """Exercise 07.1: `parse(body)` reads a raw Chat Completions stream as the official openai SDK does.

    It must return the text, and raise (any exception) where the SDK raises
    APIError: on a `data:` line whose JSON holds a top-level `error`.
    """
    import httpx
    import openai

    exercise = "Exercise 1 (read Chat Completions from raw bytes)"
    if not _attempted(exercise, lambda: parse(b"data: [DONE]\n\n")):
        return
    fast = {"ttft_ms": 0, "token_ms": 0}
    cases: dict[str, tuple[str, str, dict[str, Param | list[str]]]] = {
        "a plain reply": ("sim", "hi", {"max_tokens": 12}),
        "a hostile payload, echoed": ("echo", 'crlf\r\nnul\0 data: [DONE]\n\n{"error": 1} 🌊', {}),
        "heartbeats during a slow prefill": ("sim", "hi", {"max_tokens": 3, "ttft_ms": 120, "heartbeat_s": 0.02}),
        "a content filter": ("sim", "hi", {"blocklist": ["token"]}),
        "a model failing mid-stream": ("sim", "hi", {"fail_after": 4}),
    }
    with (
        serve_in_background() as server,
        openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk,
    ):
        for name, (model, prompt, knobs) in cases.items():
            messages: Any = [{"role": "user", "content": prompt}]
            knobs = {**fast, **knobs}
            body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
            raw = httpx.post(server.url + "/v1/chat/completions", json={**body, **knobs}, trust_env=False).content
            sdk_error: str | None = None
            pieces: list[str] = []
            try:
                for chunk in sdk.chat.completions.create(
                    model=model,
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=knobs,
                ):
                    pieces.extend(choice.delta.content or "" for choice in chunk.choices)
            except openai.APIError as error:
                sdk_error = error.message
            if sdk_error is not None:
                try:
                    got = parse(raw)
                except Exception:
                    continue
                raise AssertionError(
                    f"{name}: the SDK raised APIError ({sdk_error!r}) on this stream, your parser returned {got!r}. "
                    "A data line whose JSON has a top-level 'error' is a failure, not a chunk."
                )
            got = parse(raw)
            assert got == "".join(pieces), (
                f"{name}: the SDK read {''.join(pieces)!r}, your parser {got!r}. Each chunk's "
                "choices[i].delta.content is a piece of text (absent or null in the role, finish and usage chunks)."
            )
    _passed(exercise, f"Your parser and the openai SDK agree on {len(cases)} streams, failure included.")


# --- notebook 03, exercise 3: a size logger that holds nothing ---------------------------------------------------


def check_size_logger(size_logger: Callable[[ASGIApp, Callable[[int], object]], ASGIApp]) -> None:
    """Exercise 03.3: `size_logger(app, log)` serves `app`, streams it untouched and logs its body size at the end."""
    exercise = "Exercise 3 (a size logger that holds nothing)"
    if not _attempted(exercise, lambda: size_logger(create_app(), print)):
        return
    sizes: list[int] = []
    with serve_in_background(size_logger(create_app(), sizes.append)) as server:
        result = stream_chat(server.url, "log my size", max_tokens=20, ttft_ms=50, token_ms=20)
    assert result.tokens == 20 and result.finish_reason == "length", f"the stream broke: {result.error}"
    assert max(result.lumps) < result.tokens / 2, (
        f"the tokens arrived in lumps of {result.lumps}: the logger holds them (does it read the whole body first?)"
    )
    received = sum(chunk.size for chunk in result.chunks)
    assert sizes == [received], f"logged {sizes} for one response of {received} body bytes: log once, at the end"
    _passed(exercise, f"logged {received} bytes, and every token went on as it came.")


# Notebook 09: SSE vs WebSocket vs gRPC vs long polling.


def check_wire_cost(wire_cost: Callable[[int, int, int, int], tuple[float, float]]) -> None:
    """Exercise 09.1: `wire_cost(n1, bytes1, n2, bytes2)` returns (bytes per token, fixed bytes) of a transport."""
    from ..experiments.transports import Endpoints, wire_totals
    from ..transports.grpc_stream import serve_grpc_in_background

    exercise = "Exercise 1 (bytes per token)"
    if not _attempted(exercise, lambda: wire_cost(1, 100, 2, 150)):
        return
    cases = {
        "50 bytes a token over 400 fixed": ((10, 900, 30, 1900), (50.0, 400.0)),
        "free tokens": ((1, 7, 5, 7), (0.0, 7.0)),
    }
    for name, (arguments, expected) in cases.items():
        got = wire_cost(*arguments)
        assert all(abs(value - want) < 1e-9 for value, want in zip(got, expected, strict=True)), (
            f"{name}: wire_cost{arguments} should be {expected}, got {got}. The difference of the two chats is"
            " made of tokens only: the fixed part is the same in both."
        )
    with serve_grpc_in_background() as grpc_server:
        endpoints = Endpoints("http://127.0.0.1:1", grpc_server.target)  # only the gRPC server is asked
        short, long = wire_totals("grpc", endpoints, (5, 25), ttft_ms=0, token_ms=2)
    per_token, fixed = wire_cost(5, short.total, 25, long.total)
    assert 5 < per_token < 100 and 200 < fixed < 3000, (
        f"measured over gRPC: {per_token:.1f} bytes a token and {fixed:.0f} fixed bytes: not HTTP/2 + Protobuf's"
    )
    _passed(exercise, f"gRPC, measured just now: {per_token:.1f} bytes a token, {fixed:.0f} bytes of set-up and end.")


def check_websocket_cancel(chat_and_cancel: Callable[[str, int], list[str]]) -> None:
    """Exercise 09.2: `chat_and_cancel(ws_url, after)` receives `after` tokens, stops the model, returns them."""
    from ..client import fetch_stats, wait_until_idle

    exercise = "Exercise 2 (cancel over the same WebSocket)"
    with serve_in_background() as server:
        url = "ws" + server.url.removeprefix("http") + "/ws/chat"
        if not _attempted(exercise, lambda: chat_and_cancel(url, 3)):
            return
        wait_until_idle(server.url)
        before = fetch_stats(server.url)
        tokens = chat_and_cancel(url, 5)
        counters = wait_until_idle(server.url)
    assert len(tokens) >= 5 and all(isinstance(token, str) for token in tokens), (
        f"expected the first 5 tokens (and any already on their way), got {tokens!r}"
    )
    cancelled = counters["streams_cancelled"] - before["streams_cancelled"]
    generated = counters["tokens_generated"] - before["tokens_generated"]
    assert cancelled == 1, "the server did not count a cancelled stream: did you send a message while it streamed?"
    assert generated < 20, f"the model produced {generated} tokens: it was not stopped after the 5th"
    _passed(exercise, f"the model stopped after {generated} tokens; you received {len(tokens)}.")


# Notebook 06: in the browser


def check_cors_settings(cors_settings: Callable[[], Settings]) -> None:
    """Exercise 06.1: `cors_settings()` lets the course's JupyterHub and local notebooks read streams, nobody else."""
    exercise = "Exercise 1 (a CORS allow list)"
    if not _attempted(exercise, cors_settings):
        return
    settings = cors_settings()
    allowed = ["https://hub.course.example", "http://localhost:8888", "http://localhost:9999"]
    refused = ["https://evil.example", "http://hub.course.example", "https://hub.course.example.evil.example"]
    refused += ["http://127.0.0.1:8888"]  # not asked for: the course only uses localhost
    with serve_in_background(create_app(settings)) as server:
        url = server.url + "/api/chat/stream?prompt=cors&max_tokens=1&ttft_ms=0"
        with httpx.Client(trust_env=False) as client:
            for origin in allowed + refused:
                granted = client.get(url, headers={"Origin": origin}).headers.get("access-control-allow-origin")
                if origin in allowed:
                    assert granted == origin, f"{origin} should be allowed to read the stream; it was not"
                else:
                    assert granted is None, f"{origin} should get no CORS headers, but was allowed"
    _passed(exercise, f"allowed: {', '.join(settings.cors_origins)}; everyone else gets no CORS header.")


def check_first_token_at(first_token_at: Callable[[int, int, float], float], chromium: Chromium | None) -> None:
    """Exercise 06.2: `first_token_at(index, connections, stream_s)`: when EventSource number `index` starts receiving.

    Streams are opened at once, each lasts `stream_s` seconds (its first token comes
    at once), and the browser keeps at most `connections` per origin. With a browser
    at hand the checker also measures 8 streams over HTTP/1.1.
    """
    exercise = "Exercise 2 (the seventh EventSource)"
    if not _attempted(exercise, lambda: first_token_at(0, 6, 1.0)):
        return
    cases = [
        (0, 6, 1.0, 0.0),
        (5, 6, 1.0, 0.0),
        (6, 6, 1.0, 1.0),
        (7, 6, 0.5, 0.5),
        (13, 6, 0.5, 1.0),
        (3, 1, 2.0, 6.0),
    ]
    for index, connections, stream_s, expected in cases:
        got = first_token_at(index, connections, stream_s)
        assert abs(got - expected) < 1e-9, (
            f"stream #{index + 1} of many, {connections} connections, {stream_s} s each: expected {expected} s, "
            f"got {got}. Which streams get a connection at once, and when is the next one free?"
        )
    if chromium is None:
        _passed(exercise, "(no browser here: checked against the arithmetic only)")
        return
    with serve_in_background() as server:
        timeline = connection_limit(chromium, server.url, streams=8, max_tokens=16, token_ms=40)
    first_tokens = [stream.first_token_ms / 1000 for stream in timeline.streams if stream.first_token_ms is not None]
    ends = [stream.end_ms / 1000 for stream in timeline.streams if stream.end_ms is not None]
    assert len(first_tokens) == len(ends) == len(timeline.streams), "a stream did not receive its whole answer"
    stream_s = min(ends) - min(first_tokens)  # from the first token to the first connection freed
    for stream, first_token in zip(timeline.streams, first_tokens, strict=True):
        predicted, waited = first_token_at(stream.index, 6, stream_s), first_token >= min(ends)
        measured = first_token - min(first_tokens)
        # A busy machine spreads the first six over a good part of a stream: what tells them apart is whether
        # a stream had to wait for the first one to end, and then that it started when it did.
        on_time = not waited or abs(measured - predicted) < stream_s / 2
        assert waited == (predicted > 0) and on_time, (
            f"stream #{stream.index + 1}: predicted {predicted:.2f} s, measured {measured:.2f} s after the first"
        )
    _passed(exercise, f"measured in Chromium: streams #7 and #8 waited {stream_s:.2f} s for a free connection.")


# ── Notebook 05 (backpressure) ───────────────────────────────────────────────


def check_tokens_in_flight(predict: Callable[[int, int, int, float], float]) -> None:
    """Exercise 05.1: `predict(server_sndbuf, client_rcvbuf, high_water, event_bytes)` estimates a stalled pull stream.

    The estimate must be between 0.6 and 1.75 times the tokens a real stalled stream
    made the model produce, for two buffer shapes (sizes as getsockopt reports them:
    Linux doubles what was asked for and keeps part of it for its own bookkeeping, so
    the buffers' sum is an upper bound, reached more or less closely).
    """
    from ..experiments.backpressure import stall  # imported here: this section stays self-contained

    exercise = "Exercise 1 (tokens in flight)"
    if not _attempted(exercise, lambda: predict(32_768, 8_192, 65_536, 66.0)):
        return
    for rcvbuf, sndbuf in ((4_096, 16_384), (16_384, 4_096)):
        run = stall(stall_s=3.0, rcvbuf=rcvbuf, sndbuf=sndbuf, max_tokens=50_000)
        last = run.last
        predicted = predict(last.server_sndbuf, last.client_rcvbuf, run.high_water, run.event_bytes)
        assert 0.6 * last.tokens_produced <= predicted <= 1.75 * last.tokens_produced, (
            f"SO_SNDBUF {last.server_sndbuf}, SO_RCVBUF {last.client_rcvbuf}, high-water mark {run.high_water}, "
            f"{run.event_bytes:.0f} bytes per event: you predicted {predicted:.0f} tokens, the model made "
            f"{last.tokens_produced}. Which buffers hold bytes the reader has not read, and in what unit?"
        )
    _passed(exercise, "Under pull, the buffers are the only place tokens can wait: their sizes bound the waste.")


def check_send_timeout(send_timeout_for: Callable[[float], float]) -> None:
    """Exercise 05.2: `send_timeout_for(longest_pause_s)` must spare a reader that pauses that long, and cut a dead one.

    Checked on a real server: a reader that stops reading for 0.4 s then reads
    on must get the whole reply; one that never reads must lose its slot within
    ten times the pause.
    """
    from ..experiments.backpressure import paused_reader_survives, send_timeout

    exercise = "Exercise 2 (a send timeout)"
    if not _attempted(exercise, lambda: send_timeout_for(1.0)):
        return
    pause_s = 0.4
    timeout_s = send_timeout_for(pause_s)
    assert 0.01 <= timeout_s <= 10 * pause_s, (
        f"{timeout_s} s for a {pause_s} s pause: a dead reader would hold its slot for that long"
    )
    # Twice at most: the reader shares the kernel's process with the server, and a machine busy elsewhere can
    # starve both for longer than any sane timeout; a timeout too short fails every time.
    survived = paused_reader_survives(timeout_s, pause_s) or paused_reader_survives(timeout_s, pause_s)
    assert survived, (
        f"send_timeout_s={timeout_s} cut a reader that only paused for {pause_s} s. "
        "How long does the server's last write wait when the pause starts just after it?"
    )
    counters = send_timeout(timeout_s)
    assert counters["streams_send_timeout"] == 1 and counters["second_client_tokens"] == 5
    _passed(exercise, "Pauses survive, dead readers free their slot, and /api/stats says why.")


# Notebook 11: beyond one process


def check_lost_and_duplicated(count: Callable[[list[int], int], tuple[int, int]], measured: object = None) -> None:
    """Exercise 11.1: `count(indices, expected)` returns (lost, duplicated) for the token indices a client received.

    lost: indices from 0 to expected - 1 that never arrived; duplicated: arrivals
    beyond the first of an index. `measured`, a `Follow` of the notebook, is checked too.
    """
    exercise = "Exercise 1 (count lost and duplicated tokens)"
    if not _attempted(exercise, lambda: count([0, 1], 2)):
        return
    cases = {
        "all there": ([0, 1, 2, 3], 4, (0, 0)),
        "a gap": ([0, 1, 3], 4, (1, 0)),
        "a replay that overlapped": ([0, 1, 2, 1, 2, 3], 4, (0, 2)),
        "both": ([0, 0, 2], 4, (2, 1)),
        "nothing arrived": ([], 3, (3, 0)),
    }
    if measured is not None:
        from ..experiments.beyond_one_process import Follow

        assert isinstance(measured, Follow)
        indices = [arrival.index for arrival in measured.arrivals]
        expected_tokens = int(measured.params["max_tokens"])
        cases["the notebook's stream"] = (
            indices,
            expected_tokens,
            (measured.lost(expected_tokens), measured.duplicated),
        )
    for name, (indices, expected, answer) in cases.items():
        got = count(list(indices), expected)
        assert tuple(got) == answer, f"{name}: indices {indices} of {expected} tokens: expected {answer}, got {got}"
    _passed(exercise, "Counting by index is what lets a fault run claim 0 lost and 0 duplicated.")


def check_resume_position(resume_position: Callable[[str], str], redis_url: str | None = None) -> None:
    """Exercise 11.2: `resume_position(last_event_id)` is the XREAD id after which a resumed reader's tokens start.

    Token i is stream entry `{i+1}-0`; XREAD returns the entries after the id it is
    given. With `redis_url`, the answer is tried on a real stream.
    """
    exercise = "Exercise 2 (where to resume in the stream)"
    if not _attempted(exercise, lambda: resume_position("")):
        return
    for last_event_id, expected in [("", "0-0"), ("0", "1-0"), ("7", "8-0"), ("41", "42-0")]:
        got = resume_position(last_event_id)
        assert got == expected, (
            f"after Last-Event-ID {last_event_id!r} the reader must start at token "
            f"{int(last_event_id or -1) + 1}, entry {int(last_event_id or -1) + 2}-0; XREAD is exclusive: "
            f"expected {expected!r}, got {got!r}"
        )
    if redis_url is not None:
        import time

        import redis

        key = f"sse-lab:exercise:{time.time_ns()}"
        with redis.Redis.from_url(redis_url) as client:
            for index in range(10):
                client.xadd(key, {"token": str(index)}, id=f"{index + 1}-0")
            entries = client.xread({key: resume_position("4")})[0][1]
            client.delete(key)
        first = int(entries[0][1][b"token"])
        assert first == 5, f"after token 4, XREAD from your position returned token {first} first"
    _passed(exercise, "Resume after token k from entry k+1-0, exclusive: no gap, no duplicate.")


# ── Notebook 08: under load ──────────────────────────────────────────────────────────────────────────────────────


def check_lateness(lateness_ms: Callable[[RequestRecord, float, float], list[float]], url: str) -> None:
    """Exercise 08.1: `lateness_ms(record, ttft_ms, token_ms)` against the model's absolute schedule, in ms."""
    from ..load import LoadSpec, run_load
    from ..metrics import lateness

    exercise = "Exercise 1 (lateness)"
    probe = RequestRecord(scheduled_at=0.0, sent_at=0.0, arrivals=[0.1])
    if not _attempted(exercise, lambda: lateness_ms(probe, 100.0, 10.0)):
        return
    measured = run_load(
        LoadSpec(url, concurrency=4, requests=4, max_tokens=10, ttft_ms=50, token_ms=20), progress=False
    ).records
    cases = {
        "on time": (RequestRecord(0.0, 1.0, arrivals=[1.1, 1.12, 1.14]), 100.0, 20.0),
        "drifting": (RequestRecord(0.0, 1.0, arrivals=[1.1, 1.15, 1.3]), 100.0, 20.0),
        "three tokens in one read": (RequestRecord(0.0, 2.0, arrivals=[2.05, 2.05, 2.05]), 0.0, 10.0),
        "no token": (RequestRecord(0.0, 1.0), 100.0, 20.0),
        **{f"measured stream {n}": (record, 50.0, 20.0) for n, record in enumerate(measured)},
    }
    for name, (record, ttft_ms, token_ms) in cases.items():
        due = [ttft_ms + index * token_ms for index in range(len(record.arrivals))]
        expected = [1000 * late for late in lateness(record, due)]
        got = list(lateness_ms(record, ttft_ms, token_ms))
        assert len(got) == len(expected) and all(abs(a - b) < 1e-6 for a, b in zip(got, expected, strict=True)), (
            f"{name}: expected {expected}, got {got}. Token i is due at sent_at + ttft_ms + i x token_ms."
        )
    _passed(exercise, "Lateness counts from the send and the model's own schedule, not from the previous token.")


def check_goodput(goodput: Callable[[list[RequestRecord], float, float, float], float]) -> None:
    """Exercise 08.2: `goodput(records, ttft_slo_ms, tpot_slo_ms, duration_s)`, requests/s, as DistServe has it."""
    from ..metrics import load_summary

    exercise = "Exercise 2 (goodput)"
    if not _attempted(exercise, lambda: goodput([], 500.0, 60.0, 1.0)):
        return

    def done(sent_at: float, arrivals: list[float]) -> RequestRecord:
        return RequestRecord(sent_at, sent_at, arrivals=arrivals, outcome="done", ended_at=arrivals[-1])

    records = [
        done(0.0, [0.2, 0.25, 0.3]),  # good
        done(0.0, [0.9, 0.95]),  # TTFT too long
        done(0.1, [0.2, 0.6]),  # TPOT too long
        done(0.2, [0.4]),  # one token: TPOT counts as 0, good
        RequestRecord(0.3, 0.3, outcome="http_429", ended_at=0.31),  # refused: never good
        RequestRecord(0.4, 0.4, arrivals=[0.5], outcome="error_model_error", ended_at=0.5),  # broken: never good
    ]
    summary = load_summary(records, slo_ms={"ttft": 500, "tpot": 60})
    got = goodput(records, 500.0, 60.0, summary["duration_s"])
    assert abs(got - summary["goodput"]) < 1e-6, (
        f"expected {summary['goodput']:.3f} requests/s (2 good requests in {summary['duration_s']:.2f} s), got {got}. "
        "A request is good when it is done and within every SLO."
    )
    _passed(exercise, "Goodput counts the requests that were done within every SLO, per second.")
