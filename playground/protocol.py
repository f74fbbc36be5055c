"""The messages between a variant's worker process and its parent: frozen dataclasses, pickled
over two one-way pipes. Every message about a request carries that request's id.

Commands go down (generate, a typed call, stop, ping, shutdown); events come up (ready or
load failed, then per request: started, delta..., done; or a value; or failed; and pongs).
A call is one dataclass per backend method, and `run(backend)` is the only place that names
the method: the worker runs whatever call it is sent, and nothing travels as a method name.
This module knows nothing about processes or backends' internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from playground.backends.base import LoadInfo, Request, ScoredToken, TeacherForced, TokenizerProbe
from playground.metrics import GenerationMetrics

if TYPE_CHECKING:
    from playground.backends.base import Backend


# -- commands: parent -> worker --------------------------------------------------------------
@dataclass(frozen=True)
class Generate:
    rid: str
    request: Request


@dataclass(frozen=True)
class Score:
    """Log-probabilities of each continuation right after the request's prompt."""

    rid: str
    request: Request
    continuations: tuple[str, ...]

    def run(self, backend: Backend) -> list[float]:
        return backend.score(self.request, list(self.continuations))


@dataclass(frozen=True)
class CountTokens:
    rid: str
    text: str

    def run(self, backend: Backend) -> int:
        return backend.count_tokens(self.text)


@dataclass(frozen=True)
class RequestTokens:
    """A request's prompt length, chat template included."""

    rid: str
    request: Request

    def run(self, backend: Backend) -> int:
        return backend.request_tokens(self.request)


@dataclass(frozen=True)
class TextLogprobs:
    rid: str
    text: str
    window: int
    stride: int

    def run(self, backend: Backend) -> list[float]:
        return backend.text_logprobs(self.text, self.window, self.stride)


@dataclass(frozen=True)
class PairLogprobs:
    rid: str
    context: str
    continuation: str

    def run(self, backend: Backend) -> tuple[float, bool]:
        return backend.pair_logprobs(self.context, self.continuation)


@dataclass(frozen=True)
class PromptIds:
    """The token ids the backend builds for a request (template and BOS included)."""

    rid: str
    request: Request

    def run(self, backend: Backend) -> list[int]:
        return backend.prompt_ids(self.request)


@dataclass(frozen=True)
class ScoreAnswer:
    """An answer's tokens scored teacher-forced after a prompt (one forward pass)."""

    rid: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    top_k: int
    keep_rows: bool

    def run(self, backend: Backend) -> TeacherForced:
        return backend.teacher_forced(list(self.prompt_ids), list(self.answer_ids), self.top_k, self.keep_rows)


@dataclass(frozen=True)
class TokenTexts:
    rid: str
    ids: tuple[int, ...]

    def run(self, backend: Backend) -> list[str]:
        return backend.token_texts(list(self.ids))


@dataclass(frozen=True)
class ProbeTokenizer:
    rid: str

    def run(self, backend: Backend) -> TokenizerProbe:
        return backend.tokenizer_probe()


Call = Score | CountTokens | RequestTokens | TextLogprobs | PairLogprobs | PromptIds | ScoreAnswer | TokenTexts | ProbeTokenizer


@dataclass(frozen=True)
class Stop:
    rid: str


@dataclass(frozen=True)
class Ping:
    seq: int


@dataclass(frozen=True)
class Shutdown:
    pass


Command = Generate | Call | Stop | Ping | Shutdown


# -- events: worker -> parent ----------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    info: LoadInfo


@dataclass(frozen=True)
class LoadFailed:
    error: str


@dataclass(frozen=True)
class LoadProgress:
    """While the weights download: bytes received so far, and in all (None until known)."""

    done_bytes: int
    total_bytes: int | None


@dataclass(frozen=True)
class RequestStarted:
    rid: str
    prompt_tokens: int | None


@dataclass(frozen=True)
class Delta:
    rid: str
    text: str
    n_tokens: int


@dataclass(frozen=True)
class Done:
    """The last event of a generation: the whole text and its metrics (finish reason and
    token usage among them)."""

    rid: str
    text: str
    metrics: GenerationMetrics
    # The prompt's and the answer's token ids, where the backend has them (the token view).
    prompt_ids: tuple[int, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    scored: tuple[ScoredToken, ...] | None = None  # a server's own token probabilities


@dataclass(frozen=True)
class Value:
    """A call's result and the seconds the worker took for it."""

    rid: str
    value: Any
    seconds: float


@dataclass(frozen=True)
class Failed:
    rid: str
    message: str


@dataclass(frozen=True)
class Pong:
    seq: int
    # Seconds since a request being served last sent anything; None when the worker is idle.
    busy_for: float | None


@dataclass(frozen=True)
class Died:
    """Not sent by a worker: what the parent hands every waiting request when its worker ends."""

    message: str


WorkerEvent = Ready | LoadFailed | LoadProgress | RequestStarted | Delta | Done | Value | Failed | Pong
