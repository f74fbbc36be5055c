"""OpenAI-compatible HTTP backend (vLLM, TGI, llama.cpp server, Ollama): the way to reach
the 32B partner and anything too big for this machine.

Streams server-sent events. Token counts come from the server's `usage` when it reports one
(asked for with stream_options.include_usage); otherwise each streamed delta counts as a token,
which is what such servers send.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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
    shared_prefix_length,
)
from playground.backends.served_tokenizer import ServedTokenizer
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
        self.tokenizer: ServedTokenizer | None = None  # the served model's, where the config names one
        # Whether the server's prompt log-probabilities passed the load-time self-check, and why not.
        self.prompt_logprobs = False
        self.prompt_logprobs_note = "not checked"


    def _redacted(self, text: str) -> str:
        """A server's words with our key taken out: some echo the Authorization header back."""
        key = self.endpoint.api_key()
        return text.replace(key, "***") if key else text

    def load(self) -> LoadInfo:
        started = time.perf_counter()
        base = self.endpoint.base_url.rstrip("/") + "/"
        self.client = httpx.Client(base_url=base, headers=self.endpoint.auth_headers(), timeout=self.endpoint.timeout_s)
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
        notes = [f"model {self.model_name!r} at {base}"]
        if self.config.tokenizer is not None and self.config.tokenizer.path:
            self.tokenizer = ServedTokenizer(Path(self.config.tokenizer.path).expanduser())
            notes.append(f"tokenizer from {self.tokenizer.path.name}: prompt token counts are exact")
        else:
            notes.append("no tokenizer in the config: prompt token counts are the server's, or estimated")
        self.prompt_logprobs, self.prompt_logprobs_note = self._check_prompt_logprobs()
        notes.append(self.prompt_logprobs_note)
        return LoadInfo(
            backend=self.name,
            device="remote",
            dtype="remote",
            n_params=None,
            context_length=self.config.context_length,
            load_s=time.perf_counter() - started,
            notes=notes,
        )

    # -- log-probabilities of given text, through the completions endpoint's `echo` ----------
    def _completion(self, text: str, echo: bool) -> dict[str, Any]:
        """One greedy token after `text`, with log-probabilities (of the prompt's tokens too
        with `echo`); the first choice's `logprobs` object, or {} where the server sent none."""
        assert self.client is not None, "load() first"
        body = {
            "model": self.model_name,
            "prompt": text,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 1,  # the top token too: whether the scored one was the greedy choice
            "echo": echo,
        }
        try:
            reply = self.client.post("completions", json=body)
        except httpx.HTTPError as err:
            raise GenerationError(
                f"the connection to {self.endpoint.base_url} failed ({err.__class__.__name__})"
            ) from None
        if reply.status_code != 200:
            detail = self._redacted(reply.text)[:300]
            raise GenerationError(f"the server answered {reply.status_code}: {detail}")
        try:
            choice = reply.json()["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise GenerationError("the server's completion holds no choice") from None
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        return logprobs if isinstance(logprobs, dict) else {}

    def _prompt_entries(self, text: str) -> list[PromptToken]:
        """The server's tokens of `text` with each one's log-probability given those before
        it (None for the first), from an echoed completion; the generated token left out."""
        logprobs = self._completion(text, echo=True)
        tokens = logprobs.get("tokens") or []
        offsets = logprobs.get("text_offset") or []
        values = logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or [None] * len(tokens)
        entries = []
        for token, offset, value, best in zip(tokens, offsets, values, tops, strict=False):
            if offset >= len(text):  # the generated token, or anything after the prompt
                break
            best_value = max(best.values()) if isinstance(best, dict) and best else None
            entries.append(PromptToken(int(offset), str(token), None if value is None else float(value), best_value))
        return entries

    def _check_prompt_logprobs(self) -> tuple[bool, str]:
        """Whether the server's prompt log-probabilities can be trusted: a token it has just
        generated, echoed back at the end of the prompt, must get the log-probability it was
        generated with. (llama-cpp-python's server, for a model without a beginning-of-sequence
        token, reports each prompt token's log-probability one position late.)"""
        # A generated token may merge with the probe's last word when echoed (" is" + "land"):
        # then the check says nothing, and the next probe is tried.
        for probe in ("The capital of France is", "One, two, three,", "Hello, my name is"):
            try:
                generated = self._completion(probe, echo=False)
                tokens, values = generated.get("tokens") or [], generated.get("token_logprobs") or []
                if not tokens or not values or values[0] is None:
                    return False, "the server gives no log-probabilities: scoring, routing by scores and perplexity are off"
                entries = self._prompt_entries(probe + str(tokens[0]))
            except GenerationError as err:
                return False, f"the server's log-probabilities could not be read ({err}): scoring and perplexity are off"
            if not entries or entries[-1].logprob is None:
                return False, "the server gives no prompt log-probabilities (echo): scoring and perplexity are off"
            last, expected = entries[-1], float(values[0])
            if last.offset != len(probe) or last.token != tokens[0]:
                continue
            if abs(last.logprob - expected) > 0.1 + 0.02 * abs(expected):
                return False, (
                    f"the server's prompt log-probabilities failed a self-check (a token it generated at "
                    f"{expected:.3f} came back at {last.logprob:.3f} when echoed): scoring and perplexity are off"
                )
            return True, "the server's prompt log-probabilities passed a self-check: scoring and perplexity run through it"
        return False, "the server's prompt log-probabilities could not be checked (it split every probe otherwise): scoring is off"

    def _need_prompt_logprobs(self, what: str) -> None:
        if not self.prompt_logprobs:
            raise GenerationError(f"{self.config.display_name} cannot {what}: {self.prompt_logprobs_note}")

    def _need_tokenizer(self, what: str) -> ServedTokenizer:
        if self.tokenizer is None:
            raise GenerationError(
                f"{self.config.display_name} cannot {what} without the served model's tokenizer: "
                "name it in the variant's config (tokenizer.path: a tokenizer folder or GGUF file)"
            )
        return self.tokenizer

    def _text_to_score(self, request: Request, suffix: str = "") -> str:
        if self.tokenizer is not None:
            text, templated = self.tokenizer.prompt_text(request, self.config.prompt_format, suffix)
            bos = self.tokenizer.bos_text
            # The server adds the model's beginning-of-sequence token itself; a template that
            # writes it too would make two.
            return text[len(bos) :] if templated and bos and text.startswith(bos) else text
        if request.mode == "chat" and self.config.prompt_format == "chat_template":
            self._need_tokenizer("score a chat request (its chat template renders the prompt here)")
        text = render_without_template(self.config.prompt_format, request.mode, request.messages, request.text)
        return text + request.assistant_prefix + suffix

    def score(self, request: Request, continuations: list[str]) -> list[float]:
        self._need_prompt_logprobs("score continuations")
        sequences = [self._prompt_entries(self._text_to_score(request, c)) for c in continuations]
        start = shared_prefix_length([[(e.offset, e.token) for e in seq] for seq in sequences])
        if start == 0:
            raise GenerationError("cannot score: the continuations share no prompt tokens")
        totals = []
        for seq in sequences:
            values = [e.logprob for e in seq[start:]]
            if not values or any(v is None for v in values):
                raise GenerationError("the server left out log-probabilities of the continuation's tokens")
            totals.append(float(sum(v for v in values if v is not None)))
        return totals

    # -- token-level scoring (perplexity) with the served model's tokenizer ------------------
    def encode_text(self, text: str) -> list[int]:
        return self._need_tokenizer("tokenize").encode(text)

    def window_logprobs(self, ids: list[int]) -> tuple[list[float], list[bool]]:
        """The window's text, scored by the server: its tokens must be the window's (the same
        tokenizer), or the numbers would belong to other tokens."""
        self._need_prompt_logprobs("score tokens")
        tokenizer = self._need_tokenizer("score tokens")
        bos = tokenizer.bos_id
        body = ids[1:] if bos is not None and ids and ids[0] == bos else ids
        entries = self._prompt_entries(tokenizer.decode(body))
        if len(entries) == len(body) + 1 and entries[0].logprob is None:  # the server's own BOS, listed
            entries = entries[1:]
        if len(entries) != len(body):
            raise GenerationError(
                f"the server split the window into {len(entries)} tokens where the configured tokenizer "
                f"made {len(body)}: is tokenizer.path the served model's?"
            )
        # The window's first token has no log-probability where no beginning-of-sequence token
        # precedes it, and llama-cpp-python's server leaves the first out even where one does:
        # the positions after those, read from the end.
        kept = entries[len(entries) - (len(ids) - 1) :]
        while kept and kept[0].logprob is None:
            kept = kept[1:]
        if any(e.logprob is None for e in kept):
            raise GenerationError("the server left out log-probabilities inside the window")
        logprobs = [float(e.logprob) for e in kept if e.logprob is not None]
        greedy = [e.best is not None and e.logprob is not None and e.logprob >= e.best - 1e-6 for e in kept]
        return logprobs, greedy

    def prepare(self, request: Request) -> Prompt:
        k = request.top_logprobs
        n_tokens = None
        if self.tokenizer is not None:  # counted as the served model's tokenizer counts
            n_tokens = len(self.tokenizer.encode(*self.tokenizer.prompt_text(request, self.config.prompt_format)))
        if request.mode == "chat" and self.config.prompt_format == "chat_template":
            body: dict[str, Any] = {"messages": list(request.messages)}
            if k:
                body |= {"logprobs": True, "top_logprobs": k}
            return Prompt(n_tokens=n_tokens, payload=("chat/completions", body))
        text = render_without_template(self.config.prompt_format, request.mode, request.messages, request.text)
        return Prompt(n_tokens=n_tokens, payload=("completions", {"prompt": text} | ({"logprobs": k} if k else {})))

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

    # -- what a server cannot give ----------------------------------------------------------
    FULL_DISTRIBUTION = (
        "a server returns the top few tokens of each position, never the whole distribution: "
        "divergence (KL) and the full-distribution token tools need a local variant"
    )

    def position_logprobs(self, ids: list[int], last: int | None = None) -> Any:
        raise GenerationError(self.FULL_DISTRIBUTION)

    def tokenizer_probe(self) -> Any:
        raise GenerationError(self.FULL_DISTRIBUTION)

    def unload(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.tokenizer is not None:
            self.tokenizer.close()


@dataclass(frozen=True)
class PromptToken:
    """One prompt token as an echoing server reports it."""

    offset: int  # where its text begins in the prompt
    token: str
    logprob: float | None  # given the tokens before it; None for the first
    best: float | None  # the highest log-probability at its position (its top_logprobs)


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
