"""The engine: the known variants, their workers, and the requests sent to them.

This is the one object the UI and the command line talk to. It owns no model itself: each
loaded variant is a Worker (its own process). One Engine instance holds everything; there is
no module-global state.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from playground.backends.base import LoadInfo, Request, TeacherForced, TokenizerProbe
from playground.catalogue import Catalogue
from playground.config import GenerationParams, Mode, ModelConfig
from playground.errors import GenerationError, InsufficientMemory, LoadError, PlaygroundError
from playground.memory import RUNTIME_BYTES, GpuBudget, MemoryEstimate, estimate
from playground.prompts import check_prompt_text
from playground.protocol import (
    CountTokens,
    PairLogprobs,
    ProbeTokenizer,
    PromptIds,
    RequestTokens,
    Score,
    ScoreAnswer,
    TextLogprobs,
    TokenTexts,
)
from playground.sources import locate
from playground.workers import Event, Worker


@dataclass(frozen=True)
class VariantStatus:
    config: ModelConfig
    weights_present: bool
    weights_location: str
    state: str  # not loaded / loading / ready / failed / dead / hung
    error: str | None
    info: LoadInfo | None
    rss_bytes: int | None
    pid: int | None
    loading_s: float | None = None  # while loading: seconds since the worker started
    expected_load_s: float | None = None  # how long this variant's last load in this app took
    # While its weights download: bytes received, and in all (None until the hub said).
    download_bytes: int | None = None
    download_total: int | None = None
    gpu: int | None = None  # the GPU its worker was placed on (nvml's index)


class Engine:
    """The workers of the loaded variants; which variants exist is the catalogue's to say."""

    def __init__(
        self,
        catalogue: Catalogue | None = None,
        *,
        memory_budget_bytes: int | None = None,
        gpu_budget_bytes: int | None = None,
        stall_timeout_s: float = 300.0,
        silent_after_s: float = 10.0,
    ) -> None:
        self.catalogue = catalogue if catalogue is not None else Catalogue.from_settings()
        self.memory_budget_bytes = memory_budget_bytes
        # The most the variants may take of each GPU (settings.gpu_budget_mib), counted by the
        # estimates their loads were placed with.
        self.gpu_budget_bytes = gpu_budget_bytes
        self._placed: dict[str, MemoryEstimate] = {}
        self.stall_timeout_s = stall_timeout_s  # a request that sends nothing this long is stuck
        self.silent_after_s = silent_after_s  # a worker that answers no heartbeat this long is hung
        self.workers: dict[str, Worker] = {}
        self._lock = threading.Lock()
        # Each variant's last load time here: what a load in progress is measured against.
        self._load_seconds: dict[str, float] = {}
        self._failures: dict[str, str] = {}  # the last failed load's message, per variant

    @classmethod
    def from_settings(cls) -> Engine:
        """The engine of a running app or command: the configured catalogue and GPU budget."""
        from playground.settings import get_settings

        budget = get_settings().gpu_budget_mib
        return cls(Catalogue.from_settings(), gpu_budget_bytes=budget * 2**20 if budget else None)

    def status(self, variant_id: str) -> VariantStatus:
        config = self.catalogue.get(variant_id)
        try:
            weights = locate(config)
            present, location = weights.present, weights.location
        except PlaygroundError as err:
            present, location = False, str(err)
        worker = self.workers.get(variant_id)
        if worker is not None and worker.info is not None:
            self._load_seconds[variant_id] = worker.info.load_s
        loading = worker is not None and worker.state == "loading"
        download = worker.download if loading and worker else None
        failure = self._failures.get(variant_id)
        return VariantStatus(
            config=config,
            weights_present=present,
            weights_location=location,
            state=worker.state if worker else ("failed" if failure else "not loaded"),
            error=worker.error if worker else failure,
            info=worker.info if worker else None,
            rss_bytes=worker.rss_bytes() if worker else None,
            pid=worker.pid if worker else None,
            loading_s=time.monotonic() - worker.started_at if loading and worker else None,
            expected_load_s=self._load_seconds.get(variant_id),
            download_bytes=download.done_bytes if download else None,
            download_total=download.total_bytes if download else None,
            gpu=worker.gpu if worker else None,
        )

    def statuses(self) -> list[VariantStatus]:
        return [self.status(v) for v in self.catalogue]

    def loaded_statuses(self) -> list[VariantStatus]:
        """The statuses of the variants that have a worker (loading, ready, hung, dead...) and
        of those whose last load failed (until they are loaded again or unloaded)."""
        return [self.status(v) for v in dict.fromkeys([*self.workers, *self._failures]) if v in self.catalogue]

    def estimate(self, variant_id: str) -> MemoryEstimate:
        config = self.catalogue.get(variant_id)
        return self._estimate(config, self.catalogue.draft_of(config))

    def _estimate(self, config: ModelConfig, draft: ModelConfig | None) -> MemoryEstimate:
        """What `config` needs where it goes, its draft model (`Catalogue.draft_of`) included."""
        needed = estimate(config, self.memory_budget_bytes, self._gpu_budget(exclude=config.id))
        if draft is None:
            return needed
        # The draft model loads in the same worker, on the same device.
        extra = estimate(draft.model_copy(update={"device": config.device}), self.memory_budget_bytes)
        return dataclasses.replace(
            needed,
            weights_bytes=needed.weights_bytes + extra.weights_bytes,
            kv_cache_bytes=needed.kv_cache_bytes + extra.kv_cache_bytes,
            runtime_bytes=needed.runtime_bytes + extra.runtime_bytes - RUNTIME_BYTES[draft.backend],
            basis=f"{needed.basis}; with its draft model {draft.id}",
        )

    def _gpu_budget(self, exclude: str = "") -> GpuBudget | None:
        """The GPU budget with what each GPU's live workers were placed with (a variant being
        reloaded is not counted against itself)."""
        if self.gpu_budget_bytes is None:
            return None
        held: dict[int, int] = {}
        for variant_id, worker in list(self.workers.items()):
            placed = self._placed.get(variant_id)
            if variant_id == exclude or placed is None or worker.gpu is None:
                continue
            if worker.state in ("loading", "ready", "hung"):
                held[worker.gpu] = held.get(worker.gpu, 0) + placed.total_bytes
        size = max(held, default=-1) + 1
        return GpuBudget(self.gpu_budget_bytes, tuple(held.get(i, 0) for i in range(size)))

    # -- loading -------------------------------------------------------------------------
    def start_load(self, variant_id: str, *, check_memory: bool = True) -> Worker:
        """Start a variant's worker and return at once; `finish_load` waits for it."""
        try:
            return self._start_load(variant_id, check_memory)
        except PlaygroundError as err:
            self._failures[variant_id] = str(err)
            raise

    def _start_load(self, variant_id: str, check_memory: bool) -> Worker:
        config = self.catalogue.check_before_load(variant_id)
        with self._lock:
            current = self.workers.get(variant_id)
            if current is not None and current.state in ("loading", "ready"):
                return current
            draft = self.catalogue.draft_of(config)  # checked as its own load would be
            # Where it goes: needed for the GPU it is placed on even when memory is not checked.
            needed = self._estimate(config, draft) if check_memory else self._placement(config, draft)
            if needed is not None and needed.refusal:
                raise InsufficientMemory(f"{config.display_name} cannot load: {needed.refusal}")
            if check_memory and needed is not None and not needed.fits:
                raise InsufficientMemory(f"{config.display_name} will not fit: needs {needed.describe()}")
            if current is not None:
                current.unload()
            worker = Worker(
                config,
                stall_timeout_s=self.stall_timeout_s,
                silent_after_s=self.silent_after_s,
                gpu=self._gpu_for(needed),
                draft=draft,
            )
            self.workers[variant_id] = worker
            if needed is not None and worker.gpu is not None:
                self._placed[variant_id] = needed
            else:
                self._placed.pop(variant_id, None)
            self._failures.pop(variant_id, None)
            return worker

    @staticmethod
    def _gpu_for(needed: MemoryEstimate | None) -> int | None:
        """The GPU a new worker is placed on; none where this process was itself given its GPUs
        (CUDA_VISIBLE_DEVICES: a job placed on one, or an app started that way), whose workers
        keep that choice."""
        if needed is None or needed.device != "cuda" or "CUDA_VISIBLE_DEVICES" in os.environ:
            return None
        return needed.gpu

    def _placement(self, config: ModelConfig, draft: ModelConfig | None) -> MemoryEstimate | None:
        """Where the variant goes and what it needs there (the GPU with the most free memory,
        or the pinned one); None where that cannot be worked out before loading."""
        try:
            return self._estimate(config, draft)
        except PlaygroundError:  # weights not there yet and no shape hint: the load will say
            return None

    def load(self, variant_id: str, *, check_memory: bool = True, timeout_s: float | None = 900) -> LoadInfo:
        return self.finish_load(variant_id, self.start_load(variant_id, check_memory=check_memory), timeout_s)

    def loading(self, variant_id: str, every_s: float = 0.5, *, check_memory: bool = True) -> Iterator[VariantStatus]:
        """Load `variant_id` unless it is ready (joining a load under way), yielding its status
        every `every_s` while it loads (elapsed time, download bytes); once the loop ends the
        variant is ready. A refused or failed load raises, as `start_load` and `finish_load` do."""
        if self.status(variant_id).state == "ready":
            return
        worker = self.start_load(variant_id, check_memory=check_memory)
        if not worker.settled(0):  # said at once, then every `every_s`
            yield self.status(variant_id)
            while not worker.settled(every_s):
                yield self.status(variant_id)
        self.finish_load(variant_id, worker)

    def finish_load(self, variant_id: str, worker: Worker, timeout_s: float | None = 900) -> LoadInfo:
        """Wait for a worker `start_load` gave; one that failed is ended and its error kept for
        the variant's status."""
        try:
            return worker.wait_ready(timeout_s)
        except LoadError as err:
            if worker.state in ("failed", "dead"):
                self._failures[variant_id] = str(err)
                self._forget(variant_id, worker)
            raise

    def _forget(self, variant_id: str, worker: Worker) -> None:
        worker.unload(timeout_s=2)
        with self._lock:
            if self.workers.get(variant_id) is worker:
                del self.workers[variant_id]

    def unload(self, variant_id: str) -> None:
        with self._lock:
            worker = self.workers.pop(variant_id, None)
            self._failures.pop(variant_id, None)
            self._placed.pop(variant_id, None)
        if worker is not None:
            worker.unload()

    def shutdown(self) -> None:
        for variant_id in list(self.workers):
            self.unload(variant_id)

    # -- generation ----------------------------------------------------------------------
    def request(
        self,
        variant_id: str,
        *,
        prompt: str = "",
        messages: list[dict[str, str]] | None = None,
        mode: Mode | None = None,
        assistant_prefix: str = "",
        json_schema: dict[str, Any] | None = None,
        top_logprobs: int = 0,
        **overrides: Any,
    ) -> Request:
        """A request for one variant: its default settings with `overrides` applied."""
        config = self.catalogue.get(variant_id)
        params: GenerationParams = config.generation.merged(**overrides)
        mode = mode or config.default_mode
        if mode == "chat":
            chat = list(messages or []) or [{"role": "user", "content": prompt}]
            for message in chat:  # an earlier answer cut by Stop may be blank; a user turn may not
                role = message.get("role", "user")
                check_prompt_text(message.get("content", ""), f"the {role} message", allow_blank=role != "user")
            return Request(
                mode="chat",
                params=params,
                messages=tuple(chat),
                assistant_prefix=assistant_prefix,
                json_schema=json_schema,
                top_logprobs=top_logprobs,
            )
        return Request(
            mode="completion",
            params=params,
            text=check_prompt_text(prompt),
            assistant_prefix=assistant_prefix,
            json_schema=json_schema,
            top_logprobs=top_logprobs,
        )

    def _loaded_worker(self, variant_id: str) -> Worker:
        worker = self.workers.get(variant_id)
        if worker is None:
            raise GenerationError(f"{self.catalogue.get(variant_id).display_name} is not loaded")
        return worker

    def generate(
        self, variant_id: str, request: Request, cancel: threading.Event | None = None, *, session: str = "local"
    ) -> Iterator[Event]:
        """A request's events. Requests to one variant take turns fairly over `session`s: a
        caller sees `Queued` events (its place in line) until its turn."""
        return self._loaded_worker(variant_id).generate(request, cancel, session)

    # -- scoring in the variant's worker: perplexity, needle sizing, routing, lm-eval ----------
    def score(self, variant_id: str, request: Request, continuations: list[str]) -> tuple[list[float], float]:
        """Log-probability of each continuation after the request's prompt, and the seconds the
        worker took (a router's decision latency)."""
        worker = self._loaded_worker(variant_id)
        return worker.ask(lambda rid: Score(rid, request, tuple(continuations)))

    def count_tokens(self, variant_id: str, text: str) -> int:
        return self._loaded_worker(variant_id).ask(lambda rid: CountTokens(rid, text))[0]

    def request_tokens(self, variant_id: str, request: Request) -> int:
        """The prompt length of a request, chat template included."""
        return self._loaded_worker(variant_id).ask(lambda rid: RequestTokens(rid, request))[0]

    def text_logprobs(
        self, variant_id: str, text: str, window: int, stride: int, timeout_s: float | None = None
    ) -> list[float]:
        """Log-probability of every token of `text` after the first (strided windows)."""
        return self._loaded_worker(variant_id).ask(lambda rid: TextLogprobs(rid, text, window, stride), timeout_s)[0]

    def pair_logprobs(self, variant_id: str, context: str, continuation: str) -> tuple[float, bool]:
        """log P(continuation | context) and whether greedy decoding would write it."""
        return self._loaded_worker(variant_id).ask(lambda rid: PairLogprobs(rid, context, continuation))[0]

    def prompt_ids(self, variant_id: str, request: Request) -> list[int]:
        """The token ids the variant's backend builds for `request` (template, BOS included)."""
        return self._loaded_worker(variant_id).ask(lambda rid: PromptIds(rid, request))[0]

    def score_answer(
        self, variant_id: str, prompt_ids: list[int], answer_ids: list[int], top_k: int = 5, keep_rows: bool = False
    ) -> TeacherForced:
        """`answer_ids` scored after `prompt_ids` in the variant, in one forward pass: each
        token's log-probability and the top_k most likely tokens at its position; with
        keep_rows, the whole distributions too (what KL needs)."""
        call = lambda rid: ScoreAnswer(rid, tuple(prompt_ids), tuple(answer_ids), top_k, keep_rows)  # noqa: E731
        return self._loaded_worker(variant_id).ask(call)[0]

    def token_texts(self, variant_id: str, ids: list[int]) -> list[str]:
        """Each token's own text in the variant's tokenizer."""
        return self._loaded_worker(variant_id).ask(lambda rid: TokenTexts(rid, tuple(ids)))[0]

    def tokenizer_probe(self, variant_id: str) -> TokenizerProbe:
        return self._loaded_worker(variant_id).ask(lambda rid: ProbeTokenizer(rid))[0]

    def context_length(self, variant_id: str) -> int:
        """The context the loaded variant really has (a backend may cap the configured one)."""
        worker = self._loaded_worker(variant_id)
        return worker.info.context_length if worker.info else self.catalogue.get(variant_id).context_length

    def stop(self, variant_id: str) -> None:
        worker = self.workers.get(variant_id)
        if worker is not None:
            worker.stop()
