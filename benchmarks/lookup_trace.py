"""Prompt lookup's drafts on real text, position by position, for replay on a GPU (issue 20).

The 1.7B's real weights are not on these machines, and random weights of its shape cannot say
how often a draft is right. So the embedded 135M (same tokenizer as SmolLM2-1.7B) answers
benchmarks/speculative.py's six grounded prompts greedily, and at every position of each reply
the app's own prompt-lookup drafter (`PromptLookupDrafter`) is asked for its drafts, as a
speculative reply would ask it there: how many it proposes and how many of them the reply
itself continues with. benchmarks/gpu/speculative_speed.py `--trace` replays these outcomes on
the target shape: at position t its drafter proposes what the real drafter proposed at t, right
as often as that was right, so the pass lengths, the pacer's choices and the tokens a pass gives
follow real text instead of a fixed chance per draft.

  .venv/bin/python -m benchmarks.lookup_trace --out benchmarks/results/lookup_trace_135m.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.speculative import grounded_prompts


def position_outcomes(drafter: Any, prompt: list[int], reply: list[int], count: int) -> list[list[int]]:
    """At each position t of `reply`: [drafts proposed, drafts that the reply continues with]."""
    outcomes = []
    for t in range(len(reply)):
        proposed = drafter.propose(prompt + reply[:t], count)
        right = 0
        for draft, actual in zip(proposed, reply[t:], strict=False):
            if draft != actual:
                break
            right += 1
        outcomes.append([len(proposed), right])
    return outcomes


def kept_without_pacer(outcomes: list[list[int]]) -> tuple[float, float]:
    """(share of drafts kept, tokens a pass) if every pass drafted: a pass at t gives right + 1
    tokens and moves to t + right + 1."""
    t = passes = proposed_total = kept_total = 0
    while t < len(outcomes):
        proposed, right = outcomes[t]
        passes += 1
        proposed_total += proposed
        kept_total += right
        t += right + 1
    return (kept_total / proposed_total if proposed_total else 0.0), len(outcomes) / passes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", default="smollm2-135m-transformers")
    parser.add_argument("--tokens", type=int, default=256, help="greedy tokens per reply at most")
    parser.add_argument("--drafted", default="4,8", help="drafts a pass, comma-separated")
    parser.add_argument("--ngram", type=int, default=3, help="the longest n-gram matched (the shipped variant's)")
    args = parser.parse_args(argv)
    drafted = [int(n) for n in args.drafted.split(",")]

    from playground.backends.base import Request
    from playground.backends.fast_decode import PromptLookupDrafter
    from playground.backends.transformers_backend import TransformersBackend
    from playground.catalogue import Catalogue
    from playground.config import GenerationParams

    # the static-cache decoder, which speculative replies run on (a CPU's "auto" takes generate)
    config = Catalogue.from_settings().get(args.variant).model_copy(update={"fast_decode": "on"})
    backend = TransformersBackend(config)
    backend.load()
    params = GenerationParams(temperature=0.0, max_new_tokens=args.tokens)
    eos = backend.end_ids()  # where a reply of the app's stops
    traces = []
    try:
        for kind, text in grounded_prompts():
            request = Request(mode="chat", params=params, messages=({"role": "user", "content": text},))
            prompt = backend.prompt_ids(request)
            started = time.perf_counter()
            reply = []
            for token in backend.decoder.tokens(prompt, params, lambda: False):
                if token in eos:
                    break
                reply.append(token)
            trace: dict[str, Any] = {
                "kind": kind,
                "prompt_tokens": len(prompt),
                "reply_tokens": len(reply),
                "decode_s": time.perf_counter() - started,
                "outcomes": {},
                "kept_without_pacer": {},
            }
            for count in drafted:
                outcomes = position_outcomes(PromptLookupDrafter(args.ngram, count), prompt, reply, count)
                kept, per_pass = kept_without_pacer(outcomes)
                trace["outcomes"][str(count)] = outcomes
                trace["kept_without_pacer"][str(count)] = {"kept_rate": kept, "tokens_per_pass": per_pass}
            print(kind, len(prompt), len(reply), json.dumps(trace["kept_without_pacer"]), flush=True)
            traces.append(trace)
    finally:
        backend.unload()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": commit,
        "variant": args.variant,
        "decode": backend.decode_path.describe(),
        "ngram": args.ngram,
        "max_new_tokens": args.tokens,
        "traces": traces,
    }
    args.out.write_text(json.dumps(report, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
