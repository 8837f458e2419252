"""Command line: `python -m sse_lab serve` and `python -m sse_lab demo`."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import FrameType

from .background import ServerStartError, serve_in_background
from .experiments.why_streaming import buffered_vs_streamed
from .metrics import summary_table
from .server import Settings, create_app


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(host: str, port: int, settings: Settings | None = None) -> None:
    """Serve the chat app in the foreground until Ctrl-C (or SIGTERM)."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with serve_in_background(create_app(settings), host=host, port=port) as server:
        print(f"sse-lab serving on {server.url} (Ctrl-C to stop)", flush=True)
        print(f"  try: curl -N '{server.url}/api/chat/stream?prompt=hi&token_ms=200'", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
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


def _add_connection_limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--header-timeout-s",
        type=_positive_seconds,
        default=Settings.header_timeout_s,
        help="close a connection whose request head has not arrived after this many seconds, with 408 "
        "if part of it had (default: %(default)s)",
    )


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return seconds


def _connection_limits(args: argparse.Namespace, settings: Settings) -> Settings:
    """The flags of `_add_connection_limit_flags`, applied to `settings`."""
    return replace(settings, header_timeout_s=args.header_timeout_s)


def cluster(workers: int, port: int) -> None:
    """Redis, `workers` worker processes and nginx on `port` in the foreground, until Ctrl-C (or SIGTERM)."""
    from .parts.cluster import run_cluster

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        run_cluster(workers, port)
    except (RuntimeError, ValueError) as error:  # a part missing or failing to start: one line, no traceback
        print(f"sse-lab: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _add_cluster_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("cluster", help="Redis, N worker processes and nginx in front, in the foreground")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="nginx's port, 0 for a free one (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sse_lab", description="Stream LLM tokens with SSE, measured.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the chat server in the foreground")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve_parser.add_argument("--port", type=int, default=8000, help="port, 0 for a free one (default: %(default)s)")

    _add_connection_limit_flags(serve_parser)

    demo_parser = commands.add_parser("demo", help="compare buffered and streamed responses, print and plot")
    demo_parser.add_argument("--runs", type=int, default=5, help="requests of each kind (default: %(default)s)")
    demo_parser.add_argument("--tokens", type=int, default=40, help="tokens per reply (default: %(default)s)")
    demo_parser.add_argument("--ttft-ms", type=float, default=200, help="model prefill time (default: %(default)s)")
    demo_parser.add_argument("--token-ms", type=float, default=25, help="time per token (default: %(default)s)")
    demo_parser.add_argument("--output", type=Path, default=Path("why_streaming.png"), help="PNG to write")

    _add_cluster_command(commands)

    args = parser.parse_args(argv)
    try:
        if args.command == "cluster":
            cluster(args.workers, args.port)
        elif args.command == "serve":
            serve(args.host, args.port, _connection_limits(args, Settings()))
        else:
            demo(args.runs, args.tokens, args.ttft_ms, args.token_ms, args.output)
    except ServerStartError as error:
        print(f"sse-lab: {error}", file=sys.stderr)
        return 1
    return 0
