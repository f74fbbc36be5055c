"""Honest per-reply numbers: time to first token, prefill and decode speed, peak memory.

Definitions (the same for every backend, timed inside the worker process):
- ttft_s: from the worker taking the request to the first generated token (templating,
  tokenizing and prefill included).
- prefill_tok_s: prompt tokens / ttft_s.
- decode_tok_s: tokens after the first / time from the first token to the last. Prefill is
  never in it. None when fewer than two tokens were made.
- peak_mem_bytes: the worker's peak RSS during the reply on CPU; on a GPU, the peak of memory
  allocated by the framework (reserved is reported beside it).
- draft_accept_rate: drafted tokens the variant kept / drafted tokens (speculative decoding).
- spec_speedup: decode_tok_s / the tok/s of the reply's own first plain steps, which run and
  are timed before drafting starts (at the reply's length, on the machine as it is then).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from playground.backends.base import SpeculationStats


@dataclass
class GenerationMetrics:
    prompt_tokens: int | None
    completion_tokens: int
    ttft_s: float | None
    prefill_tok_s: float | None
    decode_tok_s: float | None
    decode_s: float
    total_s: float
    peak_mem_bytes: int
    peak_rss_bytes: int
    backend: str
    device: str
    finish_reason: str
    gpu_allocated_peak_bytes: int | None = None
    gpu_reserved_peak_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    # Speculative decoding (a variant's `speculative`): its method, or why this reply decoded
    # plainly; drafted and kept tokens; decode tok/s over the tok/s of the reply's own first
    # plain steps.
    speculation: str | None = None
    draft_tokens: int | None = None
    accepted_tokens: int | None = None
    draft_accept_rate: float | None = None
    spec_passes: int | None = None
    spec_speedup: float | None = None
    # Tokens decoded without drafts because drafting had stopped paying (base.DraftPacer).
    spec_paused_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_speculation(self, stats: SpeculationStats | None) -> GenerationMetrics:
        if stats is None:
            return self
        if stats.off:
            return replace(self, speculation=f"off: {stats.off}")
        speedup = self.decode_tok_s / stats.plain_tok_s if self.decode_tok_s and stats.plain_tok_s else None
        return replace(
            self,
            speculation=stats.method,
            draft_tokens=stats.drafted,
            accepted_tokens=stats.accepted,
            draft_accept_rate=stats.accept_rate,
            spec_passes=stats.passes,
            spec_speedup=speedup,
            spec_paused_tokens=stats.paused,
        )


class GenerationTimer:
    """Timestamps token arrivals; `finish` turns them into GenerationMetrics."""

    def __init__(self) -> None:
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.first_tokens = 0
        self.tokens = 0

    def on_tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
            self.first_tokens = n
        self.t_last = now
        self.tokens += n

    def finish(
        self,
        *,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        backend: str,
        device: str,
        finish_reason: str,
        peak_rss_bytes: int,
        device_memory: dict[str, int],
        warnings: list[str],
    ) -> GenerationMetrics:
        t_end = time.perf_counter()
        completion = self.tokens if completion_tokens is None else completion_tokens
        ttft = None if self.t_first is None else self.t_first - self.t_start
        decode_s = 0.0 if self.t_first is None else (self.t_last or self.t_first) - self.t_first
        decode_tokens = completion - self.first_tokens
        decode_rate = decode_tokens / decode_s if decode_tokens > 0 and decode_s > 0 else None
        prefill_rate = prompt_tokens / ttft if prompt_tokens and ttft else None
        gpu_alloc = device_memory.get("allocated_peak")
        return GenerationMetrics(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            ttft_s=ttft,
            prefill_tok_s=prefill_rate,
            decode_tok_s=decode_rate,
            decode_s=decode_s,
            total_s=t_end - self.t_start,
            peak_mem_bytes=gpu_alloc if gpu_alloc is not None else peak_rss_bytes,
            peak_rss_bytes=peak_rss_bytes,
            backend=backend,
            device=device,
            finish_reason=finish_reason,
            gpu_allocated_peak_bytes=gpu_alloc,
            gpu_reserved_peak_bytes=device_memory.get("reserved_peak"),
            warnings=warnings,
        )


class PeakRssSampler:
    """Samples this process's RSS in a background thread while a reply is generated.

    A thread, not per-token sampling, so that peaks during prefill (before any token) count.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> PeakRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def repetition_warning(text: str, ngram_words: int = 4, min_repeats: int = 4) -> str | None:
    """A warning when the reply ends in the same few words over and over (a greedy loop)."""
    words = text.split()
    if len(words) < ngram_words * min_repeats:
        return None
    tail = words[-ngram_words:]
    repeats = 0
    for start in range(len(words) - ngram_words, -1, -ngram_words):
        if words[start : start + ngram_words] != tail:
            break
        repeats += 1
    if repeats >= min_repeats:
        return f"the reply repeats {' '.join(tail)!r} {repeats} times: the model is looping"
    return None
