"""Command line: `python -m sse_lab serve`, `demo`, `load` and `bench`."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sse_lab", description="Stream LLM tokens with SSE, measured.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the chat server in the foreground")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve_parser.add_argument("--port", type=int, default=8000, help="port, 0 for a free one (default: %(default)s)")
    serve_parser.add_argument(
        "--max-streams",
        type=_positive_int,
        default=Settings.max_concurrent_streams,
        help="streams open at once; more get HTTP 429 (default: %(default)s)",
    )

    _add_connection_limit_flags(serve_parser)

    demo_parser = commands.add_parser("demo", help="compare buffered and streamed responses, print and plot")
    demo_parser.add_argument("--runs", type=int, default=5, help="requests of each kind (default: %(default)s)")
    demo_parser.add_argument("--tokens", type=int, default=40, help="tokens per reply (default: %(default)s)")
    demo_parser.add_argument("--ttft-ms", type=float, default=200, help="model prefill time (default: %(default)s)")
    demo_parser.add_argument("--token-ms", type=float, default=25, help="time per token (default: %(default)s)")
    demo_parser.add_argument("--output", type=Path, default=Path("why_streaming.png"), help="PNG to write")

    add_load_command(commands)
    add_bench_command(commands)

    args = parser.parse_args(argv)
    if args.command == "load":
        return load_command(args)
    if args.command == "bench":
        return bench_command(args)
    try:
        if args.command == "serve":
            serve(args.host, args.port, _connection_limits(args, Settings(max_concurrent_streams=args.max_streams)))
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
