"""Needle in a haystack: a sentence with a random code is hidden at chosen depths of filler text
of chosen lengths; the variant is asked for the code. Each cell passes when its answer holds it.

Filler is the bundled Python documentation text. Lengths are in the variant's own tokens
(sized from its tokenizer, then counted); lengths beyond its context are reported as skipped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from playground.engine import Engine
from playground.errors import PlaygroundError
from playground.evals.corpus import documents
from playground.workers import Finished

NEEDLE = "The secret code for the lighthouse is {code}."
QUESTION = "What is the secret code for the lighthouse? Answer with the code only."
ANSWER_TOKENS = 24


def _code(rng: random.Random) -> str:
    return f"{rng.randint(1000, 9999)}-{rng.choice(['ORCHID', 'GRANITE', 'COBALT', 'MAPLE', 'HERON', 'SAFFRON'])}"


def _filler() -> str:
    return "\n\n".join(text for _, text in documents("python-docs"))


def _prompt(haystack: str, chat: bool) -> str:
    if chat:
        return f"{haystack}\n\n{QUESTION}"
    return f"{haystack}\n\nQuestion: {QUESTION}\nAnswer: The secret code for the lighthouse is"


def needle_grid(
    engine: Engine,
    variant_id: str,
    lengths: list[int],
    depths: list[float],
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    config = engine.catalogue.get(variant_id)
    context = engine.context_length(variant_id)
    chat = config.default_mode == "chat"
    filler = _filler()
    rng = random.Random(seed)
    sample = filler[:20_000]
    chars_per_token = len(sample) / engine.count_tokens(variant_id, sample)
    cells, total, done = [], len(lengths) * len(depths), 0
    for length in lengths:
        for depth in depths:
            done += 1
            if length + ANSWER_TOKENS > context:
                cells.append({"length": length, "depth": depth, "skipped": f"beyond the context ({context} tokens)"})
            else:
                code = _code(rng)
                try:
                    request, n_tokens = _fitted_request(
                        engine, variant_id, filler, code, depth, length, chat, chars_per_token
                    )
                except PlaygroundError as err:
                    cells.append({"length": length, "depth": depth, "skipped": str(err)})
                    if progress:
                        progress(done, total)
                    continue
                finished = [e for e in engine.generate(variant_id, request) if isinstance(e, Finished)][0]
                cells.append(
                    {
                        "length": length,
                        "depth": depth,
                        "prompt_tokens": n_tokens,
                        "passed": code.lower() in finished.text.lower(),
                        "answer": finished.text.strip()[:80],
                    }
                )
            if progress:
                progress(done, total)
    by_length = {}
    for length in lengths:
        ran = [c for c in cells if c["length"] == length and "passed" in c]
        by_length[str(length)] = sum(c["passed"] for c in ran) / len(ran) if ran else None
    return {"lengths": lengths, "depths": depths, "context": context, "cells": cells, "pass_rate_by_length": by_length}


def _fitted_request(
    engine: Engine,
    variant_id: str,
    filler: str,
    code: str,
    depth: float,
    length: int,
    chat: bool,
    chars_per_token: float,
) -> tuple[Any, int]:
    """The question over a haystack whose whole prompt (template included) is at most `length`
    tokens and close to it: sized by the measured ratio, then shrunk by count."""
    bare = _request(engine, variant_id, NEEDLE.format(code=code), chat)
    fixed = engine.request_tokens(variant_id, bare)  # question, needle and template
    if fixed >= length:
        raise PlaygroundError(f"the question and needle alone are {fixed} tokens, not under {length}")
    chars = int((length - fixed) * chars_per_token)
    for _ in range(8):
        haystack = (filler * (1 + chars // len(filler)))[:chars]
        cut = _sentence_boundary(haystack, int(len(haystack) * depth))
        text = f"{haystack[:cut]} {NEEDLE.format(code=code)} {haystack[cut:]}".strip()
        request = _request(engine, variant_id, text, chat)
        n_tokens = engine.request_tokens(variant_id, request)
        if n_tokens <= length:
            return request, n_tokens
        chars = int(chars * (length - fixed) / (n_tokens - fixed) * 0.98)
    raise PlaygroundError(f"could not fit a haystack into {length} tokens")


def _request(engine: Engine, variant_id: str, haystack: str, chat: bool) -> Any:
    return engine.request(
        variant_id,
        prompt=_prompt(haystack, chat),
        mode="chat" if chat else "completion",
        temperature=0.0,
        max_new_tokens=ANSWER_TOKENS,
    )


def _sentence_boundary(text: str, position: int) -> int:
    """The end of the sentence nearest before `position` (or 0), so the needle stands alone."""
    cut = text.rfind(". ", 0, position)
    return 0 if cut < 0 else cut + 1
