from __future__ import annotations

import os
from collections.abc import Callable
from itertools import groupby, pairwise

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sse_lab import BackgroundServer, Settings, stream_chat
from sse_lab.course.exercises import (
    check_buffered_ttft,
    check_cors_settings,
    check_first_token_at,
    check_frame,
    check_heartbeat_interval,
    check_line_parser,
    check_lumps,
    check_proxy_config,
    check_resume,
    check_send_timeout,
    check_size_logger,
    check_tokens_in_flight,
    check_tpot,
)
from sse_lab.experiments.middleware import LogWholeBody
from sse_lab.metrics import ChatResult, RequestRecord
from sse_lab.parts.nginx import REQUIRE_SYSTEM_PARTS_ENV, ProxyConfig, find_nginx


@pytest.fixture(scope="module")
def measured(server: BackgroundServer) -> ChatResult:
    return stream_chat(server.url, "hi", max_tokens=5, ttft_ms=0, token_ms=5)


def not_yet(*args: object, **kwargs: object) -> float:
    raise NotImplementedError


def right_tpot(started_at: float, arrivals: list[float]) -> float | None:
    return (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 1 else None


def test_a_right_tpot_passes(measured: ChatResult, capsys: pytest.CaptureFixture[str]) -> None:
    check_tpot(right_tpot, measured)
    assert "passed" in capsys.readouterr().out


def test_a_tpot_that_counts_the_first_token_fails(measured: ChatResult) -> None:
    def mean_from_start(started_at: float, arrivals: list[float]) -> float | None:
        return (arrivals[-1] - started_at) / len(arrivals) if len(arrivals) > 1 else None

    with pytest.raises(AssertionError, match="TPOT is"):
        check_tpot(mean_from_start, measured)


def test_an_unattempted_exercise_only_reminds(measured: ChatResult, capsys: pytest.CaptureFixture[str]) -> None:
    check_tpot(not_yet, measured)
    check_buffered_ttft(not_yet, "http://127.0.0.1:9")
    assert capsys.readouterr().out.count("not attempted yet") == 2


def test_a_right_buffered_prediction_passes(server: BackgroundServer, capsys: pytest.CaptureFixture[str]) -> None:
    check_buffered_ttft(lambda ttft_ms, token_ms, tokens: (ttft_ms + (tokens - 1) * token_ms) / 1000, server.url)
    assert "passed" in capsys.readouterr().out


def test_a_prediction_in_milliseconds_fails(server: BackgroundServer) -> None:
    with pytest.raises(AssertionError, match="seconds"):
        check_buffered_ttft(lambda ttft_ms, token_ms, tokens: ttft_ms + (tokens - 1) * token_ms, server.url)


def right_resume(base_url: str, prompt: str, partial: ChatResult, **params: object) -> str:
    return partial.text + stream_chat(base_url, prompt, last_event_id=partial.events[-1].event.id, **params).text


def test_a_right_resume_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check_resume(right_resume)
    assert "passed" in capsys.readouterr().out


def test_a_resume_at_the_last_id_repeats_a_token_and_fails() -> None:
    def one_too_early(base_url: str, prompt: str, partial: ChatResult, **params: object) -> str:
        last_id = str(int(partial.events[-1].event.id) - 1)
        return partial.text + stream_chat(base_url, prompt, last_event_id=last_id, **params).text

    with pytest.raises(AssertionError, match="resume after it or at it"):
        check_resume(one_too_early)


def test_a_safe_heartbeat_interval_passes_and_a_late_one_fails(capsys: pytest.CaptureFixture[str]) -> None:
    check_heartbeat_interval(lambda idle_timeout_s: idle_timeout_s / 2)
    assert "passed" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="cut the stream"):
        check_heartbeat_interval(lambda idle_timeout_s: 2 * idle_timeout_s)
    with pytest.raises(AssertionError, match="more heartbeats than needed"):
        check_heartbeat_interval(lambda idle_timeout_s: idle_timeout_s / 100)


def test_unattempted_edge_case_exercises_only_remind(capsys: pytest.CaptureFixture[str]) -> None:
    check_resume(not_yet)
    check_heartbeat_interval(not_yet)
    assert capsys.readouterr().out.count("not attempted yet") == 2


def right_frame(text: str) -> bytes:
    return b"".join(b"data: " + line.encode() + b"\n" for line in text.split("\n")) + b"\n"


def right_line_parser(body: str) -> list[tuple[str, str]]:
    events, data, kind = [], [], ""
    for line in body.split("\n")[:-1]:
        if not line:
            if data:
                events.append((kind or "message", "\n".join(data)))
            data, kind = [], ""
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                kind = value
    return events


SERVER_BODY = b"retry: 3000\n: heartbeat\nevent: token\nid: 0\ndata: {}\n\nevent: done\ndata: {}\n\n"


def test_a_right_frame_passes(capsys: pytest.CaptureFixture[str]) -> None:

    check_frame(right_frame)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("frame", "hint"),
    [
        (lambda text: f"data: {text}\n\n".encode(), "broke out of its frame|came back as"),
        (lambda text: f"data:{text}\n\n".replace("\n", "\ndata:").encode(), "came back as|no event"),
        (lambda text: b"".join(b"data:" + line.encode() + b"\n" for line in text.split("\n")) + b"\n", "one space"),
        (lambda text: right_frame(text)[:-1], "no event"),
        (lambda text: b"" if not text else right_frame(text), "even when the text is empty"),
        (lambda text: right_frame(text).decode(), "must return bytes"),
    ],
)
def test_a_wrong_frame_fails_with_a_hint(frame: object, hint: str) -> None:

    with pytest.raises(AssertionError, match=hint):
        check_frame(frame)  # type: ignore[arg-type]


def test_a_right_line_parser_passes(capsys: pytest.CaptureFixture[str]) -> None:

    check_line_parser(right_line_parser, SERVER_BODY)
    assert "passed" in capsys.readouterr().out


def test_a_line_parser_that_dispatches_blocks_without_data_fails() -> None:

    def dispatches_every_block(body: str) -> list[tuple[str, str]]:
        return [
            (next((line[7:] for line in block.split("\n") if line.startswith("event: ")), "message"), "")
            for block in body.split("\n\n")[:-1]
        ]

    with pytest.raises(AssertionError, match="your parser found"):
        check_line_parser(dispatches_every_block, SERVER_BODY)


def test_a_line_parser_that_splits_on_every_unicode_line_break_fails_on_a_vector() -> None:

    def splitlines_parser(body: str) -> list[tuple[str, str]]:
        return right_line_parser("\n".join(body.splitlines()) + "\n" if body.endswith("\n") else body)

    with pytest.raises(AssertionError, match="vector"):
        check_line_parser(splitlines_parser, SERVER_BODY)


def test_unattempted_wire_exercises_only_remind(capsys: pytest.CaptureFixture[str]) -> None:

    check_frame(not_yet)  # type: ignore[arg-type]
    check_line_parser(not_yet, SERVER_BODY)  # type: ignore[arg-type]
    assert capsys.readouterr().out.count("not attempted yet") == 2


def right_lumps(arrivals: list[float]) -> list[int]:
    return [len(list(together)) for _, together in groupby(arrivals)]


def test_right_lumps_pass_and_counting_distinct_times_fails(capsys: pytest.CaptureFixture[str]) -> None:
    check_lumps(right_lumps)
    assert "passed" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="share one arrival time"):
        check_lumps(lambda arrivals: [1] * len(arrivals))


@pytest.mark.skipif(find_nginx() is None and os.environ.get(REQUIRE_SYSTEM_PARTS_ENV) != "1", reason="no nginx")
def test_an_unbuffered_gzip_proxy_passes_and_a_buffered_one_fails(capsys: pytest.CaptureFixture[str]) -> None:
    check_proxy_config(lambda: ProxyConfig(proxy_buffering=False, gzip=True, ignore_accel_buffering=True))
    assert "passed" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="lumps"):
        check_proxy_config(lambda: ProxyConfig(gzip=True, ignore_accel_buffering=True))
    with pytest.raises(AssertionError, match="insists"):
        check_proxy_config(lambda: ProxyConfig(proxy_buffering=False))


def test_unattempted_buffering_exercises_only_remind(capsys: pytest.CaptureFixture[str]) -> None:
    check_lumps(not_yet)
    check_proxy_config(not_yet)
    assert capsys.readouterr().out.count("not attempted yet") == 2


# ── Notebook 07: LLM API dialects ─────────────────────────────────────────────


def right_chat_parser(body: bytes) -> str:
    import json

    from sse_lab.sse import decode

    pieces = []
    for event in decode(body):
        if event.data == "[DONE]":
            break
        chunk = json.loads(event.data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        pieces.extend(choice["delta"].get("content") or "" for choice in chunk["choices"])
    return "".join(pieces)


def test_a_right_chat_completions_parser_passes(capsys: pytest.CaptureFixture[str]) -> None:
    from sse_lab.course.exercises import check_chat_completions_parser

    check_chat_completions_parser(right_chat_parser)
    assert "passed" in capsys.readouterr().out


def test_a_chat_parser_that_ignores_errors_fails_where_the_sdk_raises() -> None:
    from sse_lab.course.exercises import check_chat_completions_parser

    def lenient(body: bytes) -> str:
        try:
            return right_chat_parser(body)
        except RuntimeError:
            return ""

    with pytest.raises(AssertionError, match="a model failing mid-stream: the SDK raised APIError"):
        check_chat_completions_parser(lenient)


def test_a_chat_parser_that_splits_text_on_line_breaks_fails() -> None:
    from sse_lab.course.exercises import check_chat_completions_parser

    def lossy(body: bytes) -> str:
        return right_chat_parser(body).replace("\r\n", "\n")

    with pytest.raises(AssertionError, match="a hostile payload, echoed: the SDK read"):
        check_chat_completions_parser(lossy)


def test_an_unattempted_chat_parser_only_reminds(capsys: pytest.CaptureFixture[str]) -> None:
    from sse_lab.course.exercises import check_chat_completions_parser

    check_chat_completions_parser(not_yet)


def right_size_logger(app: ASGIApp, log: Callable[[int], object]) -> ASGIApp:
    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal sent
            await send(message)
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    log(sent)

        await app(scope, receive, counting_send)

    return logged


def test_size_logger_checker_passes_a_logger_that_counts_as_bytes_pass(capsys: pytest.CaptureFixture[str]) -> None:
    check_size_logger(right_size_logger)
    assert "passed" in capsys.readouterr().out


def test_size_logger_checker_fails_a_logger_that_reads_the_whole_body() -> None:
    def holding(app: ASGIApp, log: Callable[[int], object]) -> ASGIApp:
        return LogWholeBody(app)  # holds every token until the end (and logs elsewhere)

    with pytest.raises(AssertionError, match="lumps"):
        check_size_logger(holding)


def test_size_logger_checker_fails_a_logger_that_logs_every_message() -> None:
    with pytest.raises(AssertionError, match="log once"):
        check_size_logger(log_each_message)


def log_each_message(app: ASGIApp, log: Callable[[int], object]) -> ASGIApp:
    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        async def logging_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body":
                log(len(message.get("body", b"")))

        await app(scope, receive, logging_send)

    return logged


def test_size_logger_checker_reminds_until_attempted(capsys: pytest.CaptureFixture[str]) -> None:
    check_size_logger(not_yet)  # type: ignore[arg-type]
    assert "not attempted yet" in capsys.readouterr().out


# Notebook 06: in the browser


def test_a_right_cors_allow_list_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check_cors_settings(lambda: Settings(cors_origins=("https://hub.course.example", "http://localhost:*")))
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "origins",
    [("https://hub.course.example",), ("https://hub.course.example", "http://localhost:*", "http://127.0.0.1:*")],
    ids=["no-localhost", "more-than-asked"],
)
def test_a_wrong_cors_allow_list_fails(origins: tuple[str, ...]) -> None:
    with pytest.raises(AssertionError, match="http://"):
        check_cors_settings(lambda: Settings(cors_origins=origins))


def right_first_token_at(index: int, connections: int, stream_s: float) -> float:
    return (index // connections) * stream_s


def test_a_right_first_token_prediction_passes_without_a_browser(capsys: pytest.CaptureFixture[str]) -> None:
    check_first_token_at(right_first_token_at, None)
    assert "arithmetic only" in capsys.readouterr().out


def test_a_first_token_prediction_without_the_limit_fails() -> None:
    with pytest.raises(AssertionError, match="stream #7"):
        check_first_token_at(lambda index, connections, stream_s: 0.0, None)


def test_unattempted_browser_exercises_only_remind(capsys: pytest.CaptureFixture[str]) -> None:
    check_cors_settings(not_yet)  # type: ignore[arg-type]
    check_first_token_at(not_yet, None)
    assert capsys.readouterr().out.count("not attempted yet") == 2


# Notebook 05 (backpressure)


def test_a_right_tokens_in_flight_estimate_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check_tokens_in_flight(lambda sndbuf, rcvbuf, high_water, event_bytes: (sndbuf + rcvbuf + high_water) / event_bytes)
    assert "passed" in capsys.readouterr().out


def test_a_tokens_in_flight_estimate_in_bytes_fails() -> None:
    with pytest.raises(AssertionError, match="in what unit"):
        check_tokens_in_flight(lambda sndbuf, rcvbuf, high_water, event_bytes: sndbuf + rcvbuf + high_water)


def test_a_send_timeout_shorter_than_the_pause_fails() -> None:
    with pytest.raises(AssertionError, match="only paused"):
        check_send_timeout(lambda pause_s: pause_s / 4)


def test_a_right_send_timeout_passes_and_unattempted_ones_remind(capsys: pytest.CaptureFixture[str]) -> None:
    check_send_timeout(lambda pause_s: 3 * pause_s + 1.0)
    check_send_timeout(not_yet)
    check_tokens_in_flight(not_yet)
    out = capsys.readouterr().out
    assert "passed" in out and out.count("not attempted yet") == 2


# ── Notebook 08: under load ──────────────────────────────────────────────────────────────────────────────────────


def test_lateness_against_the_absolute_schedule_passes_and_against_the_last_token_fails(
    server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from sse_lab.course.exercises import check_lateness

    def absolute(record: RequestRecord, ttft_ms: float, token_ms: float) -> list[float]:
        return [1000 * (at - record.sent_at) - (ttft_ms + i * token_ms) for i, at in enumerate(record.arrivals)]

    check_lateness(absolute, server.url)
    assert "passed" in capsys.readouterr().out

    def from_the_previous_token(record: RequestRecord, ttft_ms: float, token_ms: float) -> list[float]:
        times = [record.sent_at, *record.arrivals]
        return [1000 * (later - earlier) - token_ms for earlier, later in pairwise(times)]

    with pytest.raises(AssertionError, match="due at sent_at"):
        check_lateness(from_the_previous_token, server.url)
    check_lateness(not_yet, server.url)
    assert "not attempted yet" in capsys.readouterr().out


def test_goodput_counts_only_done_requests_within_every_slo(capsys: pytest.CaptureFixture[str]) -> None:
    from sse_lab.course.exercises import check_goodput
    from sse_lab.metrics import is_good

    check_goodput(lambda records, ttft, tpot, duration: sum(is_good(r, {"ttft": ttft, "tpot": tpot}) for r in records)
                  / duration)  # fmt: skip
    assert "passed" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="2 good requests"):
        check_goodput(lambda records, ttft, tpot, duration: len(records) / duration)  # throughput, not goodput
    check_goodput(not_yet)
    assert "not attempted yet" in capsys.readouterr().out
