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

from starlette.types import ASGIApp

from ..background import serve_in_background
from ..client import Param, fetch_chat, stream_chat
from ..experiments.buffering import WriteBuffer
from ..instruments.conformance import load_vectors
from ..instruments.faults import DropConnections, IdleTimeout
from ..metrics import ChatResult, RequestRecord
from ..parts.nginx import ProxyConfig, nginx_or_skip, start_nginx
from ..server import create_app
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
