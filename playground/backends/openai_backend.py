"""OpenAI-compatible HTTP backend (vLLM, TGI, llama.cpp server, Ollama): the way to reach
the 32B partner and anything too big for this machine.

Streams server-sent events. Token counts come from the server's `usage` when it reports one
(asked for with stream_options.include_usage); otherwise each streamed delta counts as a token,
which is what such servers send.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx

from playground.backends.base import (
    Backend,
    Chunk,
    FinishReason,
    LoadInfo,
    Prompt,
    Request,
    ScoredToken,
    ShouldStop,
    StreamEnd,
    TokenChoice,
)
from playground.config import GenerationParams, ModelConfig
from playground.errors import GenerationError, LoadError
from playground.prompts import render_without_template


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        assert config.endpoint is not None
        self.endpoint = config.endpoint
        self.model_name = config.endpoint.model
        self.client: httpx.Client | None = None

    def _key(self) -> str:
        env = self.endpoint.api_key_env
        return os.environ.get(env, "") if env else ""

    def _headers(self) -> dict[str, str]:
        key = self._key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _redacted(self, text: str) -> str:
        """A server's words with our key taken out: some echo the Authorization header back."""
        key = self._key()
        return text.replace(key, "***") if key else text

    def load(self) -> LoadInfo:
        started = time.perf_counter()
        base = self.endpoint.base_url.rstrip("/") + "/"
        self.client = httpx.Client(base_url=base, headers=self._headers(), timeout=self.endpoint.timeout_s)
        try:
            reply = self.client.get("models", timeout=10.0)
            reply.raise_for_status()
            served = [m.get("id", "") for m in reply.json().get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError) as err:
            raise LoadError(
                f"cannot reach an OpenAI-compatible server at {base}models ({err.__class__.__name__})"
            ) from None
        if not self.model_name:
            if not served:
                raise LoadError(f"{base} serves no models; set endpoint.model")
            self.model_name = served[0]
        return LoadInfo(
            backend=self.name,
            device="remote",
            dtype="remote",
            n_params=None,
            context_length=self.config.context_length,
            load_s=time.perf_counter() - started,
            notes=[f"model {self.model_name!r} at {base}"],
        )

    def prepare(self, request: Request) -> Prompt:
        k = request.top_logprobs
        if request.mode == "chat" and self.config.prompt_format == "chat_template":
            body: dict[str, Any] = {"messages": list(request.messages)}
            if k:
                body |= {"logprobs": True, "top_logprobs": k}
            return Prompt(n_tokens=None, payload=("chat/completions", body))
        text = render_without_template(self.config.prompt_format, request.mode, request.messages, request.text)
        return Prompt(n_tokens=None, payload=("completions", {"prompt": text} | ({"logprobs": k} if k else {})))

    def stream(self, prompt: Prompt, params: GenerationParams, should_stop: ShouldStop) -> Iterator[Chunk | StreamEnd]:
        assert self.client is not None, "load() first"
        path, body = prompt.payload
        body = dict(
            body,
            model=self.model_name,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
        )
        if params.seed is not None:
            body["seed"] = params.seed
        finish: FinishReason = "stop"
        usage: dict[str, Any] = {}
        scored: list[ScoredToken] = []
        try:
            with self.client.stream("POST", path, json=body) as reply:
                if reply.status_code != 200:
                    detail = self._redacted(reply.read().decode("utf-8", errors="replace"))[:300]
                    raise GenerationError(f"the server answered {reply.status_code}: {detail}")
                for event in _sse_data(reply.iter_lines()):
                    if should_stop():
                        finish = "cancelled"
                        break
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or []:
                        piece = (
                            choice.get("text") if path == "completions" else (choice.get("delta") or {}).get("content")
                        )
                        scored += _scored_tokens(choice.get("logprobs"))
                        if piece:
                            yield Chunk(piece, 1)
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
        except httpx.HTTPError as err:
            raise GenerationError(
                f"the connection to {self.endpoint.base_url} failed ({err.__class__.__name__})"
            ) from None
        asked = "logprobs" in body
        yield StreamEnd(
            finish, usage.get("prompt_tokens"), usage.get("completion_tokens"), scored=tuple(scored) if asked else None
        )

    def unload(self) -> None:
        if self.client is not None:
            self.client.close()


def _scored_tokens(logprobs: Any) -> list[ScoredToken]:
    """A streamed choice's `logprobs` as scored tokens: the chat form (`content`: token,
    logprob, top_logprobs) or the completions form (`tokens`, `token_logprobs`, `top_logprobs`
    as {token: logprob}). A server gives no token ids: they are -1."""
    if not isinstance(logprobs, dict):
        return []
    if isinstance(logprobs.get("content"), list):
        return [
            ScoredToken(
                TokenChoice(-1, str(e.get("token", "")), float(e.get("logprob", 0.0))),
                tuple(
                    TokenChoice(-1, str(t.get("token", "")), float(t.get("logprob", 0.0)))
                    for t in sorted(e.get("top_logprobs") or [], key=lambda t: -float(t.get("logprob", 0.0)))
                ),
            )
            for e in logprobs["content"]
            if isinstance(e, dict)
        ]
    tokens, values = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [{}] * len(tokens)
    return [
        ScoredToken(
            TokenChoice(-1, str(token), float(value if value is not None else 0.0)),
            tuple(TokenChoice(-1, str(t), float(lp)) for t, lp in sorted((top or {}).items(), key=lambda kv: -kv[1])),
        )
        for token, value, top in zip(tokens, values, tops, strict=False)
    ]


def _sse_data(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise GenerationError(f"the server sent an event that is not JSON: {data[:120]!r}") from None
        if isinstance(event, dict):
            if "error" in event:
                raise GenerationError(f"the server reported an error: {str(event['error'])[:200]}")
            yield event
