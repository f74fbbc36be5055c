"""The OpenAI-compatible backend against a real server on 127.0.0.1: llama-cpp-python's own,
serving the embedded GGUF."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import EMBEDDED_GGUF, check_reply, collect, free_port, variant

from playground.errors import GenerationError, LoadError


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
