"""The Backend contract: load a variant, turn a request into a prompt, stream tokens, unload.

A backend runs inside a worker process and knows nothing about workers, timing or the UI: it
yields chunks of text with the number of tokens each stands for, and the worker times them.
What a backend can do is declared in playground.capabilities, readable without loading it.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Protocol

from playground.capabilities import Capabilities, capabilities
from playground.config import GenerationParams, Mode, ModelConfig
from playground.errors import GenerationError, LoadError
from playground.sources import DownloadProgress

ShouldStop = Callable[[], bool]


@dataclass(frozen=True)
class Request:
    """What the user asked: chat messages or raw completion text, with sampling settings."""

    mode: Mode
    params: GenerationParams
    messages: tuple[dict[str, str], ...] = ()
    text: str = ""
    # Text the answer must start with (e.g. '{"route": "'), appended after the prompt format.
    assistant_prefix: str = ""
    # Constrain the output to this JSON schema where the backend has a grammar (llama.cpp).
    json_schema: dict[str, Any] | None = None
    # The top-k alternatives to ask a server for with each token (the token view of remote
    # variants); 0: none. Local backends score their answers after the fact instead.
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.mode == "chat" and not self.messages:
            raise ValueError("a chat request needs at least one message")


@dataclass(frozen=True)
class Prompt:
    """A request made ready for one backend: its own payload and its length in tokens."""

    n_tokens: int | None  # None where only the server knows (remote endpoints)
    payload: Any
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class Chunk:
    """Newly generated text and the number of tokens it stands for."""

    text: str
    n_tokens: int


@dataclass(frozen=True)
class TokenChoice:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class ScoredToken:
    """One answer token read teacher-forced: its log-probability and the most likely tokens at
    its position (the model's raw distribution, before any sampling setting)."""

    token: TokenChoice
    top: tuple[TokenChoice, ...]

    @property
    def rank1(self) -> bool:
        return bool(self.top) and self.top[0].token_id == self.token.token_id


# Plain steps a speculative reply runs and times before it drafts: their speed, at the reply's
# length and on the machine as it is then, is what the reply's speed-up is measured against.
PLAIN_STEPS_TIMED = 3


@dataclass
class SpeculationStats:
    """How a reply's speculative decoding went: tokens drafted and kept, and the passes of the
    variant that checked them. `plain_tok_s`: the speed of the reply's first plain steps
    (PLAIN_STEPS_TIMED), what `spec_speedup` is measured against. `off`: why a reply of a
    speculative variant decoded plainly (a sampled reply)."""

    method: str
    drafted: int = 0
    accepted: int = 0
    passes: int = 0
    plain_tok_s: float | None = None
    off: str = ""
    paused: int = 0  # tokens decoded without drafts because drafting had stopped paying

    @property
    def accept_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def kept_drafts(drafts: Sequence[int], choose: Callable[[int], int]) -> list[int]:
    """What one speculative pass keeps: the model's own choice at each row (`choose(row)`; row i
    follows the last token and drafts[:i]) while it equals the draft there, then its choice at
    the first row where it does not, or after the last draft."""
    kept: list[int] = []
    for row in range(len(drafts) + 1):
        kept.append(choose(row))
        if row == len(drafts) or kept[-1] != drafts[row]:
            break
    return kept


class DraftPacer:
    """Whether a reply's next step drafts. Drafting pays only while a pass's tokens come faster
    than plain steps do: on text the drafter cannot predict (prompt lookup on new code, say),
    or with a draft model nearly as slow as the variant (the 135M beside the 1.7B on a GPU), a
    pass costs more than it brings, and such replies ran at 0.7x plain decoding on the CPU
    (benchmarks/RESULTS.md). So each `window` drafting passes are compared with the median of
    the reply's recent plain steps; when they came slower, the next `pause` tokens decode
    plainly, the pause doubling (up to `longest_pause`) each time drafting is tried again in
    vain. The steps of a pause are timed too, so a baseline gone stale (a shared CPU slows
    down as other variants start answering) is renewed by the first pause it causes."""

    def __init__(self, window: int = 4, first_pause: int = 8, longest_pause: int = 128) -> None:
        self.window, self.first_pause, self.longest_pause = window, first_pause, longest_pause
        self.pause = first_pause
        self.plain_left = 0  # plain steps still to run before drafting is tried again
        self.plain_seconds: list[float] = []  # the last 16 plain steps
        self.passes: list[tuple[int, float]] = []  # (tokens, seconds) of the window's drafting passes

    def drafts_now(self) -> bool:
        return self.plain_left == 0

    def plain_step(self, seconds: float) -> None:
        self.plain_seconds = [*self.plain_seconds[-15:], seconds]
        self.plain_left = max(self.plain_left - 1, 0)

    def drafting_pass(self, tokens: int, seconds: float) -> None:
        """A pass of drafts that gave `tokens` tokens (the drafts kept and its own) in `seconds`."""
        self.passes.append((tokens, seconds))
        if len(self.passes) < self.window or not self.plain_seconds:
            return
        plain_tok_s = 1 / statistics.median(self.plain_seconds)
        drafting_tok_s = sum(t for t, _ in self.passes) / sum(s for _, s in self.passes)
        self.passes = []
        if drafting_tok_s >= plain_tok_s:
            self.pause = self.first_pause
            return
        self.plain_left = self.pause
        self.pause = min(2 * self.pause, self.longest_pause)


def speculative_loop(
    history: list[int],
    position: int,
    limit: int,
    params: GenerationParams,
    should_stop: Callable[[], bool],
    num_tokens: int,
    propose: Callable[[list[int], int], list[int]],
    check: Callable[[int, list[int], int], Callable[[int], int]],
    stats: SpeculationStats,
    rewind: Callable[[int], None] = lambda position: None,
    pacer: DraftPacer | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[int]:
    """The tokens after the first of a greedy speculative reply, for both backends. `history`
    holds the prompt and the first token, which goes at `position` of a cache of `limit`.
    Each step runs `check(token, drafts, position)`: the last token and its drafts in one pass,
    returning the model's greedy choice at each row; the drafts are kept up to the first it
    would not have chosen, plus its own choice there, and `rewind(next position)` drops the
    rest where a cache must be told. The first PLAIN_STEPS_TIMED steps run without drafts and
    timed: `stats.plain_tok_s` is the speed-up's baseline. After that, `pacer` (a DraftPacer by
    default) says when drafting has stopped paying."""
    pacer = pacer or DraftPacer()
    token, produced = history[-1], 1
    while produced < params.max_new_tokens and position + 1 < limit and not should_stop():
        room = min(num_tokens, params.max_new_tokens - produced - 1, limit - position - 2)
        timed = stats.passes < PLAIN_STEPS_TIMED
        started = clock()
        drafting = room > 0 and not timed and pacer.drafts_now()
        drafts = propose(history, room) if drafting else []
        kept = kept_drafts(drafts, check(token, drafts, position))
        seconds = clock() - started
        stats.passes += 1
        stats.drafted += len(drafts)
        stats.accepted += len(kept) - 1
        if drafts:
            pacer.drafting_pass(len(kept), seconds)
        else:
            pacer.plain_step(seconds)
            if timed:
                stats.plain_tok_s = len(pacer.plain_seconds) / sum(pacer.plain_seconds)
            elif not drafting and room > 0:
                stats.paused += 1
        position += len(kept)
        rewind(position)
        for token in kept:
            history.append(token)
            yield token
            produced += 1
            if produced >= params.max_new_tokens:
                return


class DraftModel(Protocol):
    """A draft model as a speculative drafter uses it (a transformers `StaticDecoder`, a
    llama.cpp backend): its cache made ready for a reply, and greedy continuations."""

    def start_drafting(self, capacity: int) -> int:
        """Ready for a reply of at most `capacity` positions; the positions it can hold."""
        ...

    def greedy_continue(self, ids: list[int], start: int, count: int) -> list[int]:
        """Feed ids[start:] after the first `start` already in its cache, then `count` greedy
        tokens; the cache keeps all but the last of them."""
        ...


class DraftModelDrafter:
    """Drafts with a smaller model, greedy; its cache keeps what the last proposal shares with
    the history, so each pass feeds it only the new tokens."""

    def __init__(self, model: DraftModel) -> None:
        self.model = model
        self.capacity = 0
        self.cached: list[int] = []  # the tokens in the draft model's cache

    def begin(self, capacity: int) -> None:
        self.capacity = self.model.start_drafting(capacity)
        self.cached = []

    def propose(self, history: list[int], count: int) -> list[int]:
        if len(history) + count + 1 >= self.capacity:
            return []
        start = min(shared_prefix_length([self.cached, history]), len(history) - 1)
        drafted = self.model.greedy_continue(history, start, count)
        self.cached = history + drafted[:-1]
        return drafted


# "unloaded": the variant was unloaded while it answered (set by the parent, never by a backend).
FinishReason = Literal["stop", "length", "cancelled", "unloaded"]


@dataclass(frozen=True)
class StreamEnd:
    """The one last item of every stream: why it ended, and the token counts a server reported
    (they replace the worker's own counts; None where the backend counted itself)."""

    finish_reason: FinishReason
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # The ids of the generated tokens, in order, where the backend has them (the token view
    # and the divergence tools score exactly these, never a re-tokenized text).
    token_ids: tuple[int, ...] | None = None
    # Each token's probability and alternatives as a server reported them (OpenAI `logprobs`).
    scored: tuple[ScoredToken, ...] | None = None
    speculation: SpeculationStats | None = None


@dataclass(frozen=True)
class TeacherForced:
    """An answer scored in one forward pass over prompt + answer. `rows` (float32 log-softmax
    over the vocabulary at each answer position, shape [len(answer), vocab]) only when asked:
    the divergence tools need whole distributions, the token view only `tokens`."""

    tokens: tuple[ScoredToken, ...]
    rows: Any = None
    seconds: float = 0.0


# A text every tokenizer splits into many pieces (spaces, digits, code, accents, CJK): two
# tokenizers that give the same ids for it and have the same vocabulary size are one tokenizer.
TOKENIZER_PROBE = (
    "The quick brown fox, 1234567 jumps over 3.14 lazy dogs!\n\tdef f(x): return x**2  # é ñ ü 中文 😀 "
    '{"route": "self", "reason": "ok"}   trailing   spaces'
)


@dataclass(frozen=True)
class TokenizerProbe:
    vocab_size: int
    probe_ids: tuple[int, ...]


@dataclass(frozen=True)
class LoadInfo:
    backend: str
    device: str
    dtype: str
    n_params: int | None
    context_length: int
    load_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    weights_bytes: int | None = None  # the loaded weights as held in memory (quantized size)
    decode: str = ""  # how tokens are made (fast path or not, and why), where a backend has a choice


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        # Set by the worker before `load`: where a hub download reports its bytes, and the
        # config of a speculative variant's draft model.
        self.report_download: DownloadProgress | None = None
        self.draft_config: ModelConfig | None = None

    @property
    def caps(self) -> Capabilities:
        return capabilities(self.name)

    @abstractmethod
    def load(self) -> LoadInfo:
        """Load the weights; raise LoadError with a readable message on any failure."""

    @abstractmethod
    def prepare(self, request: Request) -> Prompt:
        """Format and tokenize the request (chat template, Alpaca or raw)."""

    @abstractmethod
    def stream(self, prompt: Prompt, params: GenerationParams, should_stop: ShouldStop) -> Iterator[Chunk | StreamEnd]:
        """Generate at most params.max_new_tokens tokens, stopping early when should_stop();
        the last item is always one StreamEnd."""

    def score(self, request: Request, continuations: list[str]) -> list[float]:
        """Log-probability of each continuation right after the request's prompt (and prefix).

        The continuations are compared on the same footing: each is scored from the longest
        token prefix they all share, so a tokenizer that merges across the boundary is fair
        to all of them.
        """
        raise GenerationError(f"the {self.name} backend cannot score continuations")

    # -- token-level scoring: perplexity, needle sizing, lm-evaluation-harness -----------------
    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text, with the beginning-of-sequence token the model expects."""
        raise GenerationError(f"the {self.name} backend cannot tokenize locally")

    def window_logprobs(self, ids: list[int]) -> tuple[list[float], list[bool]]:
        """For each position i >= 1 of one window: log P(ids[i] | ids[:i]), and whether ids[i]
        was the most likely token there. A remote server may withhold the first of them: the
        lists then cover the last positions only, so callers read them from the end."""
        raise GenerationError(f"the {self.name} backend cannot score tokens")

    def count_tokens(self, text: str) -> int:
        return len(self.encode_text(text))

    def request_tokens(self, request: Request) -> int:
        """The prompt length of a request, chat template included."""
        n_tokens = self.prepare(request).n_tokens
        if n_tokens is None:
            raise GenerationError(f"the {self.name} backend cannot count prompt tokens")
        return n_tokens

    def text_logprobs(self, text: str, window: int, stride: int) -> list[float]:
        """Log-probability of every token of `text` after the first, read through windows of
        `window` tokens that advance by `stride`: each token is scored once, with up to
        window - stride tokens of context before it (the strided perplexity of HF's docs)."""
        if not 0 < stride <= window:
            raise GenerationError(f"stride must be in 1..window ({window}); got {stride}")
        ids = self.encode_text(text)
        scores: list[float] = []
        scored_until = 1  # position 0 has no context and is never scored
        begin = 0
        while scored_until < len(ids):
            end = min(begin + window, len(ids))
            logprobs, _ = self.window_logprobs(ids[begin:end])
            # logprobs[-1] is for position end - 1; keep the positions not scored before.
            scores.extend(logprobs[max(0, len(logprobs) - (end - scored_until)) :])
            scored_until = end
            begin += stride
            if end == len(ids):
                break
        return scores

    def pair_logprobs(self, context: str, continuation: str) -> tuple[float, bool]:
        """log P(continuation | context) and whether greedy decoding would write it, as
        lm-evaluation-harness asks; tokenized together so merges at the seam are honest."""
        context_ids = self.encode_text(context)
        full = self.encode_text(context + continuation)
        start = shared_prefix_length([context_ids, full])
        if start == len(full):
            raise GenerationError("the continuation adds no tokens to the context")
        start = max(start, 1)
        logprobs, greedy = self.window_logprobs(full)
        wanted = len(full) - start  # read from the end (see window_logprobs)
        if len(logprobs) < wanted:
            raise GenerationError("the model gave no log-probability for the continuation's first token")
        return float(sum(logprobs[-wanted:])), all(greedy[-wanted:])

    # -- token probabilities: the token view and the divergence tools ------------------------
    def prompt_ids(self, request: Request) -> list[int]:
        """The token ids this backend feeds the model for `request` (template, BOS included)."""
        payload = self.prepare(request).payload
        if not isinstance(payload, list):
            raise GenerationError(f"the {self.name} backend does not build prompts from token ids")
        return payload

    def position_logprobs(self, ids: list[int], last: int | None = None) -> Any:
        """One forward pass over `ids`: the log-softmax over the vocabulary at each of the
        `last` final positions (default: every position; row i of the whole is the distribution
        of the token after ids[: i + 1]), float32 numpy array of shape [positions, vocab]. Only
        the positions asked for are kept: a long prompt's rows would cost a vocabulary each."""
        raise GenerationError(f"the {self.name} backend gives no token probabilities")

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (a piece of a character shows as U+FFFD)."""
        raise GenerationError(f"the {self.name} backend cannot show tokens")

    def tokenizer_probe(self) -> TokenizerProbe:
        """What decides whether two variants share a tokenizer (TOKENIZER_PROBE's ids)."""
        raise GenerationError(f"the {self.name} backend cannot tokenize locally")

    def _draft_variant(self) -> ModelConfig:
        """The config of this speculative variant's draft model, which the worker sets."""
        if self.draft_config is None:
            raise LoadError(f"{self.config.display_name} drafts with another variant, and none was given to its worker")
        return self.draft_config

    def _load_draft(self, draft: Backend, unusable: Callable[[Backend], str] = lambda draft: "") -> Backend:
        """`draft` (a backend of the draft variant's config) loaded beside this one, or a
        LoadError: it must load, be usable here (`unusable` says why not) and give the same
        token ids for the same text."""
        draft_id = draft.config.id
        try:
            draft.load()
        except LoadError as err:
            raise LoadError(f"its draft variant {draft_id} failed to load: {err}") from None
        why = unusable(draft)
        if not why and draft.tokenizer_probe() != self.tokenizer_probe():
            why = (
                "has another tokenizer: a draft model must give the same token ids for the same text, "
                "and the same vocabulary"
            )
        if why:
            draft.unload()
            raise LoadError(f"its draft variant {draft_id} {why}")
        return draft

    def teacher_forced(self, prompt_ids: list[int], answer_ids: list[int], top_k: int, keep_rows: bool) -> TeacherForced:
        """Score `answer_ids` after `prompt_ids` in one forward pass: each answer token's
        log-probability and the `top_k` most likely tokens at its position."""
        import numpy as np

        if not prompt_ids or not answer_ids:
            raise GenerationError("teacher forcing needs a prompt and at least one answer token")
        started = time.perf_counter()
        # The rows predicting each answer token: the last prompt position and all but the last answer one.
        rows = self.position_logprobs(list(prompt_ids) + list(answer_ids), last=len(answer_ids) + 1)[:-1]
        vocab = rows.shape[1]
        if max(answer_ids) >= vocab:
            raise GenerationError(f"answer token id {max(answer_ids)} is outside this model's vocabulary ({vocab})")
        k = max(0, min(top_k, vocab))
        top_ids = np.argsort(-rows, axis=1, kind="stable")[:, :k]
        texts = self.token_texts(sorted({*answer_ids, *top_ids.ravel().tolist()}))
        text_of = dict(zip(sorted({*answer_ids, *top_ids.ravel().tolist()}), texts, strict=True))
        tokens = tuple(
            ScoredToken(
                TokenChoice(int(t), text_of[int(t)], float(rows[i, t])),
                tuple(TokenChoice(int(j), text_of[int(j)], float(rows[i, j])) for j in top_ids[i]),
            )
            for i, t in enumerate(answer_ids)
        )
        return TeacherForced(tokens, rows.astype(np.float32) if keep_rows else None, time.perf_counter() - started)

    def reset_memory_peaks(self) -> None:
        """Start a new peak-memory window (GPU backends reset their allocator's peak)."""
        return None

    def device_memory(self) -> dict[str, int]:
        """Accelerator memory figures for the last window (bytes); empty on CPU."""
        return {}

    def unload(self) -> None:
        """Free what can be freed in-process; the worker process exits right after anyway."""
        return None


def stable_prefix_length(
    prompt_tokens: Callable[[Request], list[int]],
    request: Request,
    ids: list[int],
    memo: dict[Any, tuple[list[int], list[int]]] | None = None,
) -> int:
    """How many leading tokens of `ids` (the tokens of `request`, perhaps with a continuation
    after them) stay the same whatever the request's last message says: its system prompt and
    earlier turns, which a router sends unchanged with every request. Found by tokenizing the
    request with two other last messages that differ from their first character on (kept in
    `memo` for the next request with the same start); it depends on the request alone, never on
    what was scored before. 0 for a completion request."""
    if request.mode != "chat":
        return 0
    *earlier, last = request.messages
    key = (tuple(tuple(sorted(m.items())) for m in earlier), last.get("role"), request.assistant_prefix)
    probes = memo.get(key) if memo is not None else None
    if probes is None:
        probed = [replace(request, messages=(*earlier, {**last, "content": c})) for c in ("A", "B")]
        probes = (prompt_tokens(probed[0]), prompt_tokens(probed[1]))
        if memo is not None:
            if len(memo) >= 16:  # a few system prompts at a time; never grows without bound
                memo.clear()
            memo[key] = probes
    return min(shared_prefix_length([ids, probe]) for probe in probes)


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix common to every sequence."""
    shortest = min(len(seq) for seq in sequences)
    for i in range(shortest):
        if len({seq[i] for seq in sequences}) > 1:
            return i
    return shortest
