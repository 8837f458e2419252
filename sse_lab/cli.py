"""Command line: `python -m sse_lab serve`, `demo`, `cluster`, `load` and `bench`.

`serve` is the instructor's server: each limit an edge case needs is a flag
(`SETTING_FLAGS`), so that it can be shown with curl in front of a class.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import math
import resource
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from starlette.types import ASGIApp

from .access_log import AccessLog
from .background import ServerStartError, dedicate_to_serving, serve_in_background
from .experiments.why_streaming import buffered_vs_streamed
from .metrics import summary_table
from .server import Settings, create_app
from .web import check_origin


def _number(kind: Callable[[str], int | float], low: float, *, above: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite number of `kind` at least `low` (or, with `above`, more than it)."""
    bound = f"above {low:g}" if above else f"from {low:g} up"
    noun = "an integer" if kind is int else "a number"

    def parse(raw: str) -> int | float:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {raw!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {raw!r}")
        return value

    return parse


def _words(raw: str) -> tuple[str, ...]:
    """An argparse type: comma-separated words, none of them empty."""
    words = tuple(word.strip() for word in raw.split(","))
    if not all(words):
        raise argparse.ArgumentTypeError(f"must be comma-separated words, none of them empty, got {raw!r}")
    return words


def _origins(raw: str) -> tuple[str, ...]:
    """An argparse type: comma-separated CORS origins, each exact or with any port (`http://localhost:*`)."""
    try:
        return tuple(check_origin(origin.strip()) for origin in raw.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@dataclass(frozen=True)
class SettingFlag:
    """A `serve` flag that sets one field of `Settings`; its default is the field's."""

    flag: str
    field: str
    type: Callable[[str], Any]
    metavar: str
    help: str


# Add a flag here and it is parsed, documented in --help and applied by `settings_from_args`.
SETTING_FLAGS = (
    SettingFlag("--max-streams", "max_concurrent_streams", _number(int, 0), "N", "streams open at once; more get 429"),
    SettingFlag(
        "--max-tokens", "max_tokens_limit", _number(int, 1), "N", "the largest max_tokens accepted; caps the default"
    ),
    SettingFlag(
        "--context-window", "context_window", _number(int, 1), "N", "tokens the model holds, prompt and reply together"
    ),
    SettingFlag("--retry-ms", "retry_ms", _number(int, 0), "MS", "the reconnection delay a stream's retry: line sets"),
    SettingFlag(
        "--heartbeat-s", "heartbeat_s", _number(float, 0, above=True), "S", "a comment after S seconds without events"
    ),
    SettingFlag(
        "--max-stream-s", "max_stream_s", _number(float, 0, above=True), "S", "longer streams end with a timeout error"
    ),
    SettingFlag(
        "--blocklist", "blocklist", _words, "WORDS", "comma-separated words the content filter stops a stream on"
    ),
    SettingFlag(
        "--header-timeout-s",
        "header_timeout_s",
        _number(float, 0, above=True),
        "S",
        "close a connection whose request head has not arrived after S seconds, with 408 if part of it had",
    ),
    SettingFlag(
        "--cors-origin",
        "cors_origins",
        _origins,
        "ORIGINS",
        "comma-separated browser origins that may read the chat endpoints, exact or any port with :*",
    ),
)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add every `SETTING_FLAGS` flag to `parser`; unset, each leaves its field at the `Settings` default."""
    defaults = Settings()
    for setting in SETTING_FLAGS:
        default = getattr(defaults, setting.field)
        shown = (",".join(default) or "none") if isinstance(default, tuple) else f"{default:g}"
        parser.add_argument(
            setting.flag,
            dest=setting.field,
            type=setting.type,
            default=None,
            metavar=setting.metavar,
            help=f"{setting.help} (default: {shown})",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The server's `Settings` from the parsed flags: each flag given replaces its field's default.

    A `--max-tokens` below the default reply length also shortens that default, so
    that no request gets more tokens than the flag allows.
    """
    names = {field.name for field in fields(Settings)}
    given = {name: value for name, value in vars(args).items() if name in names and value is not None}
    settings = replace(Settings(), **given)
    if settings.defaults.max_tokens > settings.max_tokens_limit:
        settings = replace(settings, defaults=replace(settings.defaults, max_tokens=settings.max_tokens_limit))
    return settings


_print_now = partial(print, flush=True)


def app_from_args(args: argparse.Namespace, write_log: Callable[[str], object] = _print_now) -> ASGIApp:
    """The app `serve` runs: `create_app` with the flags' settings, behind an access log if asked."""
    app = create_app(settings_from_args(args))
    return AccessLog(app, write_log) if args.access_log else app


def network_warning(host: str) -> str | None:
    """The line `serve` prints when `host` is not a loopback address: other machines can then connect."""
    if host == "localhost":
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return None
    return f"sse-lab: warning: --host {host} is not loopback: the server is reachable from the network"


DESCRIPTORS_BESIDES_STREAMS = 64  # the listening socket, the event loop's, stdio, the page's and stats' connections


def open_files_warning(limit: int, max_streams: int) -> str | None:
    """The line `serve` prints when its limit on open files is too low for `max_streams`.

    Each open stream holds a connection, and each connection a descriptor.
    """
    if limit == resource.RLIM_INFINITY or limit >= max_streams + DESCRIPTORS_BESIDES_STREAMS:
        return None
    return (
        f"sse-lab: warning: open files are limited to {limit}, too few for --max-streams {max_streams}: "
        "connections past the limit will be closed; raise it with `ulimit -n`"
    )


# Ctrl-C and SIGTERM both stop the server, as in uvicorn. SIGINT is set here too: a process
# started in the background by a shell script inherits SIGINT ignored, and would never stop on it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Stopped(Exception):
    """A stop signal arrived."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _log_to_terminal() -> None:
    """Show the kit's log lines (a model failing mid-stream, say) on stderr; the package alone stays quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sse-lab: %(message)s"))
    kit_logger = logging.getLogger("sse_lab")
    kit_logger.addHandler(handler)
    kit_logger.setLevel(logging.INFO)


def serve(args: argparse.Namespace) -> None:
    """Serve the chat app in the foreground until Ctrl-C or SIGTERM, then say it stopped.

    The process is the server's alone (`dedicate_to_serving`): its garbage collector is tuned for streams, and
    its limit on open files raised as far as the system allows.
    """
    _log_to_terminal()
    if warning := network_warning(args.host):
        print(warning, file=sys.stderr, flush=True)
    with (
        serve_in_background(app_from_args(args), host=args.host, port=args.port) as server,
        contextlib.suppress(_Stopped),
    ):
        previous: dict[int, Any] = {}
        try:
            for signum in STOP_SIGNALS:  # before the banner: a signal sent once it is read must stop the server
                previous[signum] = signal.signal(signum, _raise_stopped)
            # Before the banner: whoever waits for it (a script, a test) finds any warning already printed
            if warning := open_files_warning(dedicate_to_serving(), settings_from_args(args).max_concurrent_streams):
                print(warning, file=sys.stderr, flush=True)
            print(f"sse-lab serving on {server.url} (Ctrl-C to stop)", flush=True)
            print(f"  open the page: {server.url}/", flush=True)
            print(f"  try: curl -N '{server.url}/api/chat/stream?prompt=hi&token_ms=200'", flush=True)
            threading.Event().wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    print("sse-lab stopped", flush=True)


def demo(runs: int, tokens: int, ttft_ms: float, token_ms: float, output: Path) -> None:
    """Buffered vs streamed from the terminal: a table on stdout and the figure as a PNG."""
    import matplotlib.pyplot as plt

    from .plots import ttft_and_arrivals

    print(f"{runs} runs each: {tokens} tokens, ttft_ms={ttft_ms:g}, token_ms={token_ms:g}")
    with serve_in_background() as server:
        runs_by_variant = buffered_vs_streamed(
            server.url, runs=runs, max_tokens=tokens, ttft_ms=ttft_ms, token_ms=token_ms
        )
    print(summary_table(runs_by_variant))
    output.parent.mkdir(parents=True, exist_ok=True)
    figure = ttft_and_arrivals(runs_by_variant)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    print(f"figure written to {output}")


def cluster(workers: int, port: int) -> None:
    """Redis, `workers` worker processes and nginx on `port` in the foreground, until Ctrl-C (or SIGTERM)."""
    from .parts.cluster import run_cluster

    for signum in STOP_SIGNALS:  # SIGINT too: a background job of a script inherits it ignored
        signal.signal(signum, _exit_on_signal)
    try:
        run_cluster(workers, port)
    except (RuntimeError, ValueError) as error:  # a part missing or failing to start: one line, no traceback
        print(f"sse-lab: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _add_cluster_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("cluster", help="Redis, N worker processes and nginx in front, in the foreground")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="nginx's port, 0 for a free one (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: `serve` with its flags, `demo`, and `cluster`."""
    parser = argparse.ArgumentParser(prog="python -m sse_lab", description="Stream LLM tokens with SSE, measured.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser(
        "serve", help="run the chat server in the foreground", description="Run the chat server until Ctrl-C."
    )
    serve_parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; anything but loopback is reachable from the network (default: %(default)s)",
    )
    serve_parser.add_argument("--port", type=int, default=8000, help="port, 0 for a free one (default: %(default)s)")
    add_setting_flags(serve_parser)
    serve_parser.add_argument(
        "--access-log",
        action="store_true",
        help="print one line per request: client, request, status, duration and tokens sent",
    )

    demo_parser = commands.add_parser("demo", help="compare buffered and streamed responses, print and plot")
    demo_parser.add_argument("--runs", type=int, default=5, help="requests of each kind (default: %(default)s)")
    demo_parser.add_argument("--tokens", type=int, default=40, help="tokens per reply (default: %(default)s)")
    demo_parser.add_argument("--ttft-ms", type=float, default=200, help="model prefill time (default: %(default)s)")
    demo_parser.add_argument("--token-ms", type=float, default=25, help="time per token (default: %(default)s)")
    demo_parser.add_argument("--output", type=Path, default=Path("why_streaming.png"), help="PNG to write")
    _add_cluster_command(commands)
    add_load_command(commands)
    add_bench_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "load":
        return load_command(args)
    if args.command == "bench":
        return bench_command(args)
    try:
        if args.command == "cluster":
            cluster(args.workers, args.port)
        elif args.command == "serve":
            serve(args)
        else:
            demo(args.runs, args.tokens, args.ttft_ms, args.token_ms, args.output)
    except ServerStartError as error:
        print(f"sse-lab: {error}", file=sys.stderr)
        return 1
    return 0


# ── python -m sse_lab load / bench ───────────────────────────────────────────────────────────────────────────────


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _slo(raw: str) -> tuple[str, float]:
    from .metrics import SLO_METRICS

    name, _, limit = raw.partition(":")
    if name not in SLO_METRICS or not limit:
        raise argparse.ArgumentTypeError(f"expected NAME:MS with NAME one of {', '.join(SLO_METRICS)}, got {raw!r}")
    return name, float(limit)


def add_load_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`python -m sse_lab load`: the flags of vLLM's `bench serve` that apply, plus the model's own."""
    from .load import LoadSpec

    parser = commands.add_parser("load", help="stream many chats at once and report TTFT, ITL, lateness, goodput")
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000 (loopback only)")
    mode = parser.add_argument_group("load (give --concurrency, --rate, or both)")
    mode.add_argument("--concurrency", type=_positive_int, help="closed loop: this many users; with --rate: a cap")
    mode.add_argument("--rate", type=float, help="open loop: requests per second (Poisson with --burstiness 1)")
    mode.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (default: %(default)s)")
    mode.add_argument("--requests", type=_positive_int, help="measure this many requests")
    mode.add_argument("--duration", type=float, help="or start requests for this many seconds")
    mode.add_argument("--warmup", type=float, default=0.0, help="seconds of load not measured (default: 0)")
    mode.add_argument("--ramp", type=float, default=0.0, help="spread the users' first starts over S seconds")
    defaults = LoadSpec("http://127.0.0.1", concurrency=1, requests=1)
    model = parser.add_argument_group("what each request asks (the stream endpoint's parameters)")
    model.add_argument("--prompt", default=defaults.prompt)
    model.add_argument("--model", default=defaults.model)
    model.add_argument("--max-tokens", type=_positive_int, default=defaults.max_tokens)
    model.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    model.add_argument("--token-ms", type=float, default=defaults.token_ms)
    model.add_argument("--jitter-ms", type=float, default=defaults.jitter_ms)
    parser.add_argument("--workers", type=_positive_int, help="load processes (default: enough for the load)")
    parser.add_argument(
        "--goodput", type=_slo, nargs="+", metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:60 (keys: ttft tpot e2el)"
    )
    parser.add_argument("--json", type=Path, help="write the report to this file")


def load_command(args: argparse.Namespace) -> int:
    """Run `python -m sse_lab load`: a progress bar, the table, warnings on stderr, the JSON file."""
    import json

    from .load import LoadError, LoadSpec, run_load

    try:
        spec = LoadSpec(
            args.url,
            concurrency=args.concurrency,
            rate=args.rate,
            burstiness=args.burstiness,
            requests=args.requests,
            duration_s=args.duration,
            warmup_s=args.warmup,
            ramp_s=args.ramp,
            prompt=args.prompt,
            model=args.model,
            max_tokens=args.max_tokens,
            ttft_ms=args.ttft_ms,
            token_ms=args.token_ms,
            jitter_ms=args.jitter_ms,
            workers=args.workers,
            slo_ms=dict(args.goodput) if args.goodput else None,
        )
        result = run_load(spec)
    except LoadError as error:
        print(f"sse-lab load: {error}", file=sys.stderr)
        return 2
    print(result.table())
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.summary, indent=2) + "\n")
    return 0


def add_bench_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`python -m sse_lab bench`: the capacity benchmark of `sse_lab.experiments.capacity`."""
    from .experiments import capacity

    parser = commands.add_parser("bench", help="capacity of the kit's server against Starlette, sse-starlette, ...")
    parser.add_argument(
        "--servers", nargs="+", choices=capacity.SERVERS, default=list(capacity.SERVERS), help="(default: all)"
    )
    parser.add_argument(
        "--steps", type=_positive_int, nargs="+", default=list(capacity.STEPS), help="concurrency steps"
    )
    parser.add_argument("--max-tokens", type=_positive_int, default=capacity.MAX_TOKENS)
    parser.add_argument("--token-ms", type=float, default=capacity.TOKEN_MS)
    parser.add_argument("--ramp", type=float, default=capacity.RAMP_S)
    parser.add_argument(
        "--agreement",
        type=_positive_int,
        nargs="*",
        default=list(capacity.AGREEMENT_STEPS),
        help="steps at which an independent reader checks the kit's figures (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, default=Path("build/capacity.json"), help="(default: %(default)s)")
    parser.add_argument("--plot", type=Path, default=Path("build/capacity.png"), help="(default: %(default)s)")


def bench_command(args: argparse.Namespace) -> int:
    """Run `python -m sse_lab bench`: the table on stdout, the JSON and the plot as files."""
    from .experiments import capacity

    try:
        report = capacity.benchmark(
            servers=args.servers,
            steps=args.steps,
            max_tokens=args.max_tokens,
            token_ms=args.token_ms,
            ramp_s=args.ramp,
            agreement_steps=args.agreement,
            command=" ".join(["python -m sse_lab", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "",
        )
    except capacity.BenchmarkUnavailable as error:
        print(f"sse-lab bench: {error}", file=sys.stderr)
        return 2
    print(capacity.table(report))
    capacity.save(report, args.json, args.plot)
    print(f"report written to {args.json}, plot to {args.plot}")
    return 0
