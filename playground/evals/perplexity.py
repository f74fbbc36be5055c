"""Perplexity of a variant on a corpus, with strided windows, through any backend that scores
tokens (transformers, scratch_gpt, llama.cpp)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from playground.engine import Engine

Progress = Callable[[int, int], None]


def perplexity(
    engine: Engine,
    variant_id: str,
    docs: list[tuple[str, str]],
    window: int,
    stride: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Token-level perplexity over all documents (each read on its own), per document too.

    Also bits per byte, which does not depend on the tokenizer, so variants with different
    vocabularies compare fairly.
    """
    total_nll, total_tokens, total_bytes, per_doc = 0.0, 0, 0, []
    for done, (title, text) in enumerate(docs, start=1):
        logprobs = engine.text_logprobs(variant_id, text, window, stride, timeout_s=1800)
        nll = -sum(logprobs)
        total_nll += nll
        total_tokens += len(logprobs)
        total_bytes += len(text.encode("utf-8"))
        if logprobs:
            per_doc.append({"document": title, "tokens": len(logprobs), "perplexity": math.exp(nll / len(logprobs))})
        if progress:
            progress(done, len(docs))
    if not total_tokens:
        return {"perplexity": None, "tokens": 0, "documents": per_doc}
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "nll_per_token": total_nll / total_tokens,
        "bits_per_byte": total_nll / math.log(2) / total_bytes,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "window": window,
        "stride": stride,
        "documents": per_doc,
    }
