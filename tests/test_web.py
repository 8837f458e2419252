"""The page and CORS: over HTTP first, then in a real Chromium (one browser for the module)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from sse_lab import BackgroundServer, Settings, create_app, serve_in_background
from sse_lab.experiments.browser import AFTER_TWO_FRAMES, StreamRequests, page_url, run_page
from sse_lab.model import sim_tokens
from sse_lab.parts.chromium import Chromium, launch_chromium
from sse_lab.web import LOOPBACK_ORIGINS, check_origin, origin_matcher

if TYPE_CHECKING:
    from playwright.sync_api import Browser

FAST = {"ttft_ms": 20, "token_ms": 5}


def get(url: str, **headers: str) -> httpx.Response:
    return httpx.get(url, headers=headers, trust_env=False)


# The page over HTTP


def test_the_page_is_served_at_the_root_with_a_policy_allowing_only_its_own_origin(server: BackgroundServer) -> None:
    response = get(server.url + "/")
    assert response.status_code == 200 and response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    for element_id in ("streamed-text", "buffered-text", "fetch-text", "streamed-ttft", "buffered-ttft"):
        assert f'id="{element_id}"' in response.text
    assert "<script>" not in response.text and "style=" not in response.text  # nothing inline to allow


@pytest.mark.parametrize(
    ("name", "media_type"),
    [("page.js", "text/javascript"), ("page.css", "text/css"), ("favicon.svg", "image/svg+xml")],
)
def test_the_static_files_come_with_their_types(server: BackgroundServer, name: str, media_type: str) -> None:
    response = get(f"{server.url}/static/{name}")
    assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)


@pytest.mark.parametrize("name", ["index.html", "..%2Fweb.py", "nothing.js"])
def test_only_the_pages_own_files_are_served_from_static(server: BackgroundServer, name: str) -> None:
    response = get(f"{server.url}/static/{name}")
    assert response.status_code == 404 and response.json()["error"]


# CORS over HTTP


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8888", "http://localhost:3000", "http://[::1]:8888"])
@pytest.mark.parametrize("path", ["/api/chat?prompt=hi&ttft_ms=0&token_ms=0", "/api/chat/stream?prompt=hi&ttft_ms=0"])
def test_loopback_origins_on_any_port_may_read_the_chat_endpoints(
    server: BackgroundServer, origin: str, path: str
) -> None:
    response = get(server.url + path, Origin=origin)
    assert response.headers["access-control-allow-origin"] == origin
    assert "Origin" in response.headers["vary"]


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://127.0.0.1.evil.example:8888", "https://127.0.0.1:8888", "null"]
)
def test_other_origins_get_no_cors_headers_at_all(server: BackgroundServer, origin: str) -> None:
    response = get(server.url + "/api/chat?prompt=hi&max_tokens=2&ttft_ms=0", Origin=origin)
    assert response.status_code == 200
    assert not [name for name in response.headers if name.startswith("access-control-")]


def test_a_preflight_from_an_allowed_origin_may_send_authorization_and_last_event_id(server: BackgroundServer) -> None:
    headers = {
        "Origin": "http://localhost:8888",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization,last-event-id",
    }
    response = httpx.options(server.url + "/api/chat/stream", headers=headers, trust_env=False)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "http://localhost:8888"
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "last-event-id" in allowed


def test_a_preflight_from_another_origin_is_refused_with_json_and_no_cors_headers(server: BackgroundServer) -> None:
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}
    response = httpx.options(server.url + "/api/chat/stream", headers=headers, trust_env=False)
    assert response.status_code == 403 and response.json()["parameter"] == "Origin"
    assert not [name for name in response.headers if name.startswith("access-control-")]


def test_the_cors_origins_setting_replaces_the_loopback_default() -> None:
    app = create_app(Settings(cors_origins=("https://course.example",)))
    with serve_in_background(app) as running:
        url = running.url + "/api/chat?prompt=hi&max_tokens=1&ttft_ms=0"
        assert (
            get(url, Origin="https://course.example").headers["access-control-allow-origin"] == "https://course.example"
        )
        assert "access-control-allow-origin" not in get(url, Origin="http://127.0.0.1:8888").headers


@pytest.mark.parametrize("pattern", ["*", "127.0.0.1:8888", "http://localhost:8888/", "http://a b", "ftp://x"])
def test_a_malformed_cors_origin_is_refused_when_the_app_is_made(pattern: str) -> None:
    with pytest.raises(ValueError, match="CORS origin"):
        create_app(Settings(cors_origins=(pattern,)))


def test_origin_patterns_match_any_port_only_where_they_say_so() -> None:
    allowed = origin_matcher([*LOOPBACK_ORIGINS, "https://course.example:8443"])
    assert allowed("http://localhost:1") and allowed("HTTP://LOCALHOST:65535") and allowed("http://[::1]")
    assert allowed("https://course.example:8443") and not allowed("https://course.example:8444")
    assert not allowed("http://localhost:x") and not allowed("http://localhost.evil:80")
    assert check_origin("http://[::1]:*") == "http://[::1]:*"


# In a real browser


@pytest.fixture(scope="module")
def chromium(chromium_binary: str) -> Iterator[Chromium]:
    with launch_chromium(chromium_binary) as running:
        yield running


def test_the_streamed_panel_grows_in_many_steps_while_the_buffered_one_stays_empty(
    chromium: Chromium, server: BackgroundServer
) -> None:
    run = run_page(chromium, server.url, watch=True, prompt="grow", max_tokens=30, ttft_ms=20, token_ms=25)
    before_buffered = [streamed for _, streamed, buffered in run.growth if buffered == 0]
    sizes_seen = sorted(set(before_buffered))
    assert len(sizes_seen) >= 6, f"the streamed panel was seen at only {sizes_seen} characters"
    assert sizes_seen[0] < len(run.readers["streamed"].text) / 2  # seen early, not only near the end
    assert run.growth[-1][2] == len(run.readers["buffered"].text) > 0


def test_all_three_panels_end_with_the_same_text_and_their_measurements(
    chromium: Chromium, server: BackgroundServer
) -> None:
    run = run_page(chromium, server.url, prompt="same", max_tokens=20, ttft_ms=20, token_ms=15)
    whole = "".join(sim_tokens("same", 20))
    for reader in run.readers.values():
        assert (reader.text, reader.tokens, reader.outcome) == (whole, 20, "done"), reader.reader
        assert reader.ttft_ms is not None and reader.end_ms is not None and reader.ttft_ms <= reader.end_ms
        assert reader.first_paint_ms is not None and reader.first_paint_ms >= reader.ttft_ms
    buffered, streamed = run.readers["buffered"], run.readers["streamed"]
    assert buffered.ttft_ms is not None and streamed.ttft_ms is not None and buffered.ttft_ms > streamed.ttft_ms


HOSTILE = [
    '<img src=x onerror="window.pwned=1">',
    "<script>window.pwned=1</script>",
    "</div><b>bold?</b>",
    "&amp; &lt;not a tag&gt;",
    "data: fake\n\nevent: done\n\n",
    "id: 99",
    '"quotes\' \\backslash {"json": true}',
    "é 🌊 日本",
    "nul\0byte",
    "  lead",
    "\n\n\n",
]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (" ".join(HOSTILE), " ".join(HOSTILE)),
        # A textarea hands its value over with every line break as LF: that is the form, not the rendering.
        ("crlf\r\nline cr\ronly", "crlf\nline cr\nonly"),
    ],
    ids=["markup-and-framing", "line-breaks"],
)
def test_hostile_payloads_through_the_echo_model_render_exactly_as_text(
    chromium: Chromium, server: BackgroundServer, prompt: str, expected: str
) -> None:
    run = run_page(chromium, server.url, prompt=prompt, model="echo", max_tokens=200, ttft_ms=0, token_ms=0)
    for reader in run.readers.values():
        assert reader.text == expected, reader.reader
        assert reader.elements_in_text == 0, f"{reader.reader}: a token became markup"
        assert reader.outcome == "done"


def test_a_drop_after_stream_reconnects_and_ends_with_exactly_the_uninterrupted_text(chromium: Chromium) -> None:
    app = StreamRequests(create_app(Settings(retry_ms=50)))
    with serve_in_background(app) as running:
        run = run_page(
            chromium, running.url, readers=["streamed", "fetch"], prompt="drop", max_tokens=12, drop_after=5, **FAST
        )
    whole = "".join(sim_tokens("drop", 12))
    streamed, fetched = run.readers["streamed"], run.readers["fetch"]
    assert (streamed.text, streamed.tokens, streamed.outcome) == (whole, 12, "done")
    assert [drop.last_event_id for drop in streamed.drops] == ["4", "9"]
    assert all(drop.gap_ms is not None and drop.gap_ms >= 50 for drop in streamed.drops)
    # One EventSource and one fetch made the first requests; only the EventSource came back, twice.
    assert sorted(last_event_id or "" for _, last_event_id in app.seen) == ["", "", "4", "9"]
    # fetch has no reconnection of its own: it keeps the text up to the drop, and says so.
    assert (fetched.text, fetched.outcome) == ("".join(sim_tokens("drop", 12)[:5]), "dropped")


@pytest.mark.parametrize(
    ("params", "code"),
    [({"fail_after": 3}, "model_error"), ({"blocklist": "kept"}, "content_filter")],
)
def test_an_error_event_is_shown_in_the_panel_and_the_stream_closes(
    chromium: Chromium, server: BackgroundServer, params: dict, code: str
) -> None:
    prompt = "these tokens are kept"
    run = run_page(chromium, server.url, readers=["streamed", "fetch"], prompt=prompt, model="echo", **FAST, **params)
    for reader in run.readers.values():
        assert reader.outcome == "error" and reader.error is not None and reader.error["code"] == code
        assert reader.shown_error.startswith(f"{code}: ")
        assert reader.text == "these tokens are"


CROSS_ORIGIN_READS = """async (url) => {
    const fetched = await fetch(url).then((r) => r.json()).then((body) => body.text, (error) => error.name);
    const streamed = await new Promise((resolve) => {
        const source = new EventSource(url.replace("/api/chat?", "/api/chat/stream?"));
        source.addEventListener("done", () => { source.close(); resolve("done"); });
        source.addEventListener("error", () => { source.close(); resolve("refused"); });
    });
    return [fetched, streamed];
}"""


def cross_origin_reads(chromium: Chromium, page_origin: str, url: str) -> list[str]:
    """Read `url` with fetch and EventSource from a document of `page_origin` (its JSON stats: no CSP)."""

    def work(browser: Browser) -> list[str]:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(page_origin + "/api/stats")
            return page.evaluate(CROSS_ORIGIN_READS, url)
        finally:
            context.close()

    return chromium.run(work)


def test_a_page_on_another_loopback_port_may_read_the_chat_endpoints(
    chromium: Chromium, server: BackgroundServer
) -> None:
    with serve_in_background() as other:
        url = other.url + "/api/chat?prompt=from+afar&model=echo&ttft_ms=0&token_ms=0"
        assert cross_origin_reads(chromium, server.url, url) == ["from afar", "done"]


def test_a_page_on_an_origin_outside_the_allow_list_cannot_read_them(
    chromium: Chromium, server: BackgroundServer
) -> None:
    with serve_in_background(create_app(Settings(cors_origins=("https://course.example",)))) as other:
        url = other.url + "/api/chat?prompt=from+afar&model=echo&ttft_ms=0&token_ms=0"
        assert cross_origin_reads(chromium, server.url, url) == ["TypeError", "refused"]


def test_the_pages_button_opens_eight_streams_and_shows_when_each_started(
    chromium: Chromium, server: BackgroundServer
) -> None:
    def work(browser: Browser) -> tuple[str, list[list[str]]]:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(page_url(server.url, autostart=False, max_tokens=16, ttft_ms=0, token_ms=40))
            page.click("#open-many")
            page.wait_for_function("() => sseLab.many.done")
            page.wait_for_function("() => document.querySelectorAll('#many tr').length === 8")
            page.evaluate(AFTER_TWO_FRAMES)  # the table is redrawn on each frame
            rows = page.eval_on_selector_all(
                "#many tr", "(rows) => rows.map((r) => [...r.cells].map((c) => c.textContent))"
            )
            return page.text_content("#many-protocol") or "", rows
        finally:
            context.close()

    protocol, rows = chromium.run(work)
    assert protocol == "http/1.1"
    assert [row[1] for row in rows] == ["done"] * 8
    first_end = min(float(row[3]) for row in rows)
    assert sum(float(row[2]) >= first_end for row in rows) == 2  # #7 and #8 waited for a connection


def test_query_parameters_fill_the_form_and_big_is_presenter_mode(chromium: Chromium, server: BackgroundServer) -> None:
    def work(browser: Browser) -> tuple[dict[str, str], str, str]:
        context = browser.new_context()
        try:
            page = context.new_page()
            fields = {"prompt": "a <b>bold</b> prompt", "model": "echo", "max_tokens": "7", "drop_after": "3"}
            page.goto(page_url(server.url, autostart=False, big=True, **fields))
            filled = {name: page.input_value(f"#knobs [name={name}]") for name in fields}
            big = page.evaluate("() => getComputedStyle(document.body).fontSize")
            page.goto(page_url(server.url, autostart=False))
            return filled, big, page.evaluate("() => getComputedStyle(document.body).fontSize")
        finally:
            context.close()

    filled, big, normal = chromium.run(work)
    assert filled == {"prompt": "a <b>bold</b> prompt", "model": "echo", "max_tokens": "7", "drop_after": "3"}
    assert float(big.removesuffix("px")) > 1.5 * float(normal.removesuffix("px"))
