"""The OpenAI-compatible backend against real servers on 127.0.0.1: llama-cpp-python's own,
serving the embedded GGUF or a tiny one; and the Monitor's look at remote variants' servers."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import factories
import pytest
from conftest import EMBEDDED_GGUF, check_reply, collect, free_port, serving_gguf, variant
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from playground.backends.base import Request
from playground.config import GenerationParams
from playground.errors import ConfigError, GenerationError, LoadError
from playground.evals.needle import needle_grid
from playground.monitor import SystemMonitor
from playground.router import ROUTE_END, ROUTE_PREFIX, Router
from playground.ui.charts import monitor_summary


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_streams_from_a_real_server(engine, server, mode):
    config = engine.catalogue.add(variant(id=f"endpoint-{mode}", backend="openai", endpoint={"base_url": server}))
    info = engine.load(config.id)
    assert info.device == "remote" and "smollm2-135m" in info.notes[0]
    prompt = "What is the capital of France?" if mode == "chat" else "Once upon a time, there was a"
    request = engine.request(config.id, prompt=prompt, mode=mode, max_new_tokens=12, temperature=0)
    started, deltas, finished = collect(engine.generate(config.id, request))
    # llama-cpp-python's server sends no usage while streaming: counts come from the chunks,
    # the prompt length stays unknown, and the reply says so rather than inventing a number.
    check_reply(started, deltas, finished, prompt_counted=False)
    assert finished.metrics.backend == "openai"
    assert any("no token usage" in w for w in finished.metrics.warnings)
    assert any("prompt tokens unknown" in w and "tokenizer.path" in w for w in finished.metrics.warnings)
    # Greedy, same weights, same library: the server says what our own llama.cpp backend says
    # (with the server's default repeat penalty, 1.1: the OpenAI protocol has no field for it).
    local = engine.catalogue.add(variant(id=f"local-{mode}", backend="llamacpp", source={"path": str(EMBEDDED_GGUF)}))
    engine.load(local.id)
    mine = collect(
        engine.generate(
            local.id,
            engine.request(
                local.id, prompt=prompt, mode=mode, max_new_tokens=12, temperature=0, repetition_penalty=1.1
            ),
        )
    )[2]
    assert finished.text == mine.text


def test_unreachable_endpoint_is_a_clear_load_error(engine):
    config = engine.catalogue.add(
        variant(id="nowhere", backend="openai", endpoint={"base_url": f"http://127.0.0.1:{free_port()}/v1"})
    )
    with pytest.raises(LoadError, match="cannot reach an OpenAI-compatible server"):
        engine.load(config.id)


class _EchoingServer(BaseHTTPRequestHandler):
    """Lists a model, then refuses every completion with an error that repeats the request's
    Authorization header, as careless servers do."""

    def do_GET(self) -> None:
        self._answer(200, {"data": [{"id": "echo"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(401, {"error": f"invalid key in {self.headers.get('Authorization')}"})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_the_api_key_is_never_shown_back(engine, monkeypatch):
    secret = "sk-test-5f3a9c1e-do-not-show"
    monkeypatch.setenv("TEST_SERVER_API_KEY", secret)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        config = engine.catalogue.add(
            variant(
                id="echoing",
                backend="openai",
                endpoint={
                    "base_url": f"http://127.0.0.1:{httpd.server_port}/v1",
                    "api_key_env": "TEST_SERVER_API_KEY",
                },
            )
        )
        info = engine.load(config.id)
        assert secret not in repr(info) and secret not in repr(engine.catalogue.get(config.id))
        with pytest.raises(GenerationError) as refused:
            collect(engine.generate(config.id, engine.request(config.id, prompt="hi", mode="chat")))
        message = str(refused.value)
        assert "401" in message and "invalid key in Bearer" in message
        assert secret not in message
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_a_server_sends_token_probabilities_when_asked(engine, server, mode):
    """llama.cpp's server gives logprobs: the token view of a remote variant comes from them."""
    config = engine.catalogue.add(variant(id=f"probs-{mode}", backend="openai", endpoint={"base_url": server}))
    engine.load(config.id)
    asked = engine.request(config.id, prompt="Name a colour.", mode=mode, max_new_tokens=6, temperature=0, top_logprobs=3)
    finished = collect(engine.generate(config.id, asked))[2]
    assert finished.scored, "the server sent no logprobs"
    assert "".join(t.token.text for t in finished.scored) == finished.text
    for scored in finished.scored:
        assert scored.token.logprob <= 0 and 1 <= len(scored.top) <= 3
        assert [c.logprob for c in scored.top] == sorted((c.logprob for c in scored.top), reverse=True)
    # (Not every token need be the top-1 even when greedy: the server's default repeat penalty
    # acts after the probabilities it reports.)
    plain = collect(engine.generate(config.id, engine.request(config.id, prompt="Hi", mode=mode, max_new_tokens=3)))[2]
    assert plain.scored is None  # not asked, not sent


# A router prompt short enough for the tiny model's 256 positions.
TINY_ROUTER = {
    "routes": ["self", "npc_fin"],
    "escalate_route": "npc_fin",
    "system_prompt": "Route the request: self or npc_fin. Answer in JSON.",
    "system_prompt_source": "written for the tests",
}


@pytest.fixture(scope="module")
def bos_gguf(models_dir):
    """A tiny GGUF whose prompts begin with a beginning-of-sequence token, and a server for it."""
    path = factories.make_gguf(models_dir / "tiny-bos.gguf", add_bos=True)
    with serving_gguf(path, "tiny-bos") as base:
        yield path, base


def test_a_remote_variant_scores_routes_and_text_as_the_same_gguf_does_locally(engine, bos_gguf):
    """With prompt log-probabilities that pass the load-time self-check and the served model's
    tokenizer named in the config, route scores, the route decision and perplexity come from
    the server, and match the same GGUF loaded here (llama.cpp both sides: the numbers differ by
    batch shape only)."""
    path, base = bos_gguf
    common = {"prompt_format": "raw", "role": "router", "router": TINY_ROUTER, "context_length": 256}
    remote = engine.catalogue.add(
        variant(id="remote-tiny", backend="openai", endpoint={"base_url": base}, tokenizer={"path": str(path)}, **common)
    )
    local = engine.catalogue.add(variant(id="local-tiny", backend="llamacpp", source={"path": str(path)}, **common))
    info = engine.load(remote.id)
    assert any("passed a self-check" in note for note in info.notes), info.notes
    assert any("prompt token counts are exact" in note for note in info.notes)
    engine.load(local.id)
    prompt = "Build a DCF for TSLA with 3 scenarios."
    remote_router, local_router = Router(engine, remote.id, calibrated=False), Router(engine, local.id, calibrated=False)
    for asked in (prompt, "What is 2 + 2?"):
        continuations = [r + ROUTE_END for r in TINY_ROUTER["routes"]]
        routed = Request(
            mode="chat",
            params=GenerationParams(),
            messages=({"role": "system", "content": TINY_ROUTER["system_prompt"]}, {"role": "user", "content": asked}),
            assistant_prefix=ROUTE_PREFIX,
        )
        there, _ = engine.score(remote.id, routed, continuations)
        here, _ = engine.score(local.id, routed, continuations)
        assert there == pytest.approx(here, abs=0.02)
        assert remote_router.score(asked)[0]["npc_fin"] == pytest.approx(local_router.score(asked)[0]["npc_fin"], abs=0.01)
    decided = remote_router.decide(prompt, threshold=0.5, explain=False)
    assert decided.route == local_router.decide(prompt, threshold=0.5, explain=False).route
    text = "The capital of France is Paris. Numbers like 12345 appear in code."
    there = engine.text_logprobs(remote.id, text, window=64, stride=64)
    here = engine.text_logprobs(local.id, text, window=64, stride=64)
    # llama-cpp-python's server leaves out the first token's log-probability (OpenAI's old
    # convention): one token fewer, the rest the same.
    assert len(here) - 1 == len(there) > 5 and there == pytest.approx(here[1:], abs=0.02)
    # The exact prompt length, from the configured tokenizer, where the server reports none.
    asked = engine.request(remote.id, prompt="Once upon a time", mode="completion", max_new_tokens=4, temperature=0)
    started, deltas, finished = collect(engine.generate(remote.id, asked))
    assert started.prompt_tokens == engine.request_tokens(local.id, asked)
    # The needle eval sizes its haystacks with those counts, then asks the server.
    grid = needle_grid(engine, remote.id, lengths=[120, 400], depths=[0.5])
    ran, skipped = grid["cells"]
    assert 100 <= ran["prompt_tokens"] <= 120 and "answer" in ran and "beyond the context" in skipped["skipped"]


def test_a_server_whose_prompt_log_probabilities_fail_the_self_check_is_not_scored_through(engine, server):
    """llama-cpp-python's server reports each prompt token's log-probability one position late
    for a model without a beginning-of-sequence token (the embedded SmolLM2): the load says so,
    scoring and perplexity refuse with that reason, and generation goes on."""
    config = engine.catalogue.add(
        variant(
            id="remote-shifted",
            backend="openai",
            endpoint={"base_url": server},
            tokenizer={"path": str(EMBEDDED_GGUF)},
            role="router",
            router=TINY_ROUTER,
        )
    )
    info = engine.load(config.id)
    assert any("failed a self-check" in note for note in info.notes), info.notes
    with pytest.raises(GenerationError, match="cannot score continuations: the server's prompt log-probabilities failed"):
        Router(engine, config.id, calibrated=False).score("Build a DCF for TSLA.")
    with pytest.raises(GenerationError, match="cannot score tokens"):
        engine.text_logprobs(config.id, "Once upon a time there was a cat.", window=64, stride=64)
    request = engine.request(config.id, prompt="Say hi.", mode="chat", max_new_tokens=4, temperature=0)
    started, deltas, finished = collect(engine.generate(config.id, request))
    assert finished.text and started.prompt_tokens > 0  # counted by the configured tokenizer


def test_a_remote_tokenizer_path_is_checked_when_the_config_is_read(tiny_gguf):
    with pytest.raises(ConfigError, match="a remote variant's tokenizer is `path`"):
        variant(id="r", backend="openai", endpoint={"base_url": "http://127.0.0.1:1/v1"}, tokenizer={"tiktoken": "gpt2"})
    with pytest.raises(ConfigError, match="tokenizer.path names a remote variant's tokenizer"):
        variant(id="l", backend="llamacpp", source={"path": str(tiny_gguf)}, tokenizer={"path": str(tiny_gguf)})


class _EngineLikeServer(BaseHTTPRequestHandler):
    """A stand-in for a vLLM server's two GET routes: its model list, and its Prometheus
    /metrics written by prometheus_client from real gauges with vLLM's names."""

    registry: Any = None

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/v1/models":
            body, kind = json.dumps({"data": [{"id": "big-model"}]}).encode(), "application/json"
        elif self.path == "/metrics":
            body, kind = generate_latest(self.registry), CONTENT_TYPE_LATEST
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_monitor_looks_at_each_remote_variants_server(engine, server):
    """Reachable or not, the round trip, and the queue where the server's /metrics has one:
    llama-cpp-python's server (no /metrics), a server with vLLM's gauges, and no server."""
    registry = CollectorRegistry()
    running = Gauge("vllm:num_requests_running", "running", ["model_name"], registry=registry)
    waiting = Gauge("vllm:num_requests_waiting", "waiting", ["model_name"], registry=registry)
    running.labels("big-model").set(3)
    waiting.labels("big-model").set(5)
    handler = type("Handler", (_EngineLikeServer,), {"registry": registry})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    vllm_like = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        for vid, url in (("llama-server", server), ("vllm-like", vllm_like), ("gone", f"http://127.0.0.1:{free_port()}/v1")):
            engine.catalogue.add(variant(id=vid, backend="openai", endpoint={"base_url": url}))
        monitor = SystemMonitor(engine)
        seen = monitor.check_remotes()
        assert seen["llama-server"].reachable and seen["llama-server"].latency_ms > 0
        assert seen["llama-server"].running is None and "/metrics answered 404" in seen["llama-server"].queue_source
        assert (seen["vllm-like"].running, seen["vllm-like"].waiting) == (3, 5)
        assert seen["vllm-like"].queue_source == "vLLM /metrics"
        assert not seen["gone"].reachable and seen["gone"].error == "ConnectError"
        lines = monitor_summary(monitor.sample_now(), seen)
        assert f"vllm-like → {vllm_like}: reachable" in lines and "3 running, 5 waiting (vLLM /metrics)" in lines
        assert re.search(r"gone → http://127\.0\.0\.1:\d+/v1: unreachable \(ConnectError\)", lines)
    finally:
        httpd.shutdown()
