from __future__ import annotations

import json
from typing import Any

import httpx
import matplotlib.pyplot as plt
import pytest

from sse_lab import serve_in_background
from sse_lab.experiments import capacity
from sse_lab.plots import capacity_plot
from sse_lab.sse import decode

QUERY = {"prompt": "same bytes", "max_tokens": 6, "ttft_ms": 0, "token_ms": 0, "seed": 3}


def body(app: Any = None) -> bytes:
    with serve_in_background(app) as running:
        return httpx.get(running.url + "/api/chat/stream", params=QUERY, trust_env=False).content


@pytest.fixture(scope="module")
def kit_body() -> bytes:
    return body()


@pytest.mark.parametrize("name", ["raw", "starlette"])
def test_the_floor_and_starlette_send_the_kits_bytes(name: str, kit_body: bytes) -> None:
    assert body(capacity.comparison_app(name)) == kit_body


@pytest.mark.parametrize(("name", "package"), [("sse-starlette", "sse_starlette"), ("fastapi", "fastapi.sse")])
def test_the_sse_libraries_send_the_kits_events(name: str, package: str, kit_body: bytes) -> None:
    pytest.importorskip(package, reason="the bench extra is not installed")
    theirs = [(event.event, event.data, event.id) for event in decode(body(capacity.comparison_app(name)))]
    assert theirs == [(event.event, event.data, event.id) for event in decode(kit_body)]


def test_the_independent_reader_times_every_token() -> None:
    with serve_in_background() as running:
        reader = capacity.probe(running.url, streams=3, ramp_s=0.1, max_tokens=5, token_ms=10)
        out, _ = reader.communicate(timeout=60)
    late = json.loads(out)
    assert len(late) == 3 * 5 and all(-1 < value < 2_000 for value in late)


def test_a_small_benchmark_runs_every_step_then_the_agreement_check_apart() -> None:
    measured = capacity.benchmark(
        ("kit", "raw"), (4, 8), max_tokens=3, token_ms=10, ramp_s=0.05, agreement_steps=(4,), unpaced_runs=1
    )
    for server in measured["servers"].values():
        assert list(server["steps"]) == ["4", "8"] and server["unpaced_events_per_s"] > 0
        assert all(
            step["load"]["requests"] == int(c) and not step["load"]["errors"] for c, step in server["steps"].items()
        )
    (check,) = measured["agreement"]
    assert check["concurrency"] == 4 and check["probe_p99_ms"] is not None and check["load_p99_ms"] is not None


def report(p99s: dict[str, list[float | None]]) -> dict[str, Any]:
    def step(p99: float | None) -> dict[str, Any]:
        return {"load": {"lateness_ms": {"p99": p99}, "errors": {} if p99 else {"http_429": 1}},
                "server_cpu_us_per_token": 20.0}  # fmt: skip

    return {
        "command": "python -m sse_lab bench",
        "settings": {"token_ms": 50, "lateness_slo_ms": 50.0},
        "servers": {
            name: {
                "steps": {str(500 * (n + 1)): step(p99) for n, p99 in enumerate(values)},
                "unpaced_events_per_s": 1000.0,
                "capacity": 500,
            }
            for name, values in p99s.items()
        },
        "agreement": [{"concurrency": 500, "load_p99_ms": 12.0, "probe_p99_ms": 11.0}],
    }


def test_the_table_shows_every_server_and_step_and_marks_errors() -> None:
    printed = capacity.table(report({"kit": [12.0, 30.0], "raw": [10.0, None]}))
    assert "C=500" in printed and "C=1000" in printed
    assert printed.splitlines()[1].split()[:3] == ["kit", "12", "30"]
    assert "err" in printed.splitlines()[2]
    assert "independent reader p99 11.0 ms" in printed


def test_the_capacity_plot_has_a_line_per_server_and_the_slo() -> None:
    figure = capacity_plot(report({"kit": [12.0, 30.0], "raw": [10.0, 20.0]}))
    (ax,) = figure.axes
    assert [line.get_label() for line in ax.get_lines()] == ["kit", "raw", "SLO: p99 lateness 50 ms"]
    assert "concurrent" in ax.get_xlabel() and "ms" in ax.get_ylabel()
    plt.close(figure)


def test_the_committed_report_records_its_command_and_every_server() -> None:
    committed = capacity.load_report(capacity.COMMITTED_REPORT)
    assert committed["command"].startswith("python -m sse_lab bench")
    assert set(committed["servers"]) == set(capacity.SERVERS)
