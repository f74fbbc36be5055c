"""Where the embedded pair departs: the Q4_1 GGUF in llama.cpp against the same weights
dequantized into transformers, over the bundled prompt set, in both directions (each as the
reference), with the scoring speed of each backend.

    .venv/bin/python -m benchmarks.divergence --out benchmarks/results/divergence_embedded.json [--limit N]

Per prompt: the reference's greedy answer (48 tokens at most), mean KL, top-1 agreement, first
divergence, whether the prompt token ids are equal; then the same with each variant reading the
answer after the reference's prompt ids. Scoring speed: (prompt + answer tokens) / seconds of
the teacher-forced pass, as the worker timed it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

PAIR = ("smollm2-135m-transformers", "smollm2-135m-gguf")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    from playground.catalogue import Catalogue
    from playground.divergence import diff
    from playground.engine import Engine
    from playground.matrix import read_prompts

    cases = read_prompts("mixed-50")[: args.limit]
    engine = Engine(Catalogue.from_settings())
    results: dict = {"command": f"python -m benchmarks.divergence --out {args.out}", "machine": platform.processor()
                     or platform.machine(), "prompts": len(cases), "max_new_tokens": args.max_tokens, "runs": {}}
    started = time.perf_counter()
    try:
        for variant_id in PAIR:
            engine.load(variant_id)
        for reference, other in (PAIR, PAIR[::-1]):
            rows, speeds = [], {reference: [], other: []}
            for case in cases:
                request = engine.request(reference, prompt=case.prompt, max_new_tokens=args.max_tokens, temperature=0.0)
                own = diff(engine, reference, [other], request)
                same_prompt = diff(engine, reference, [other], request, scored_after="reference")
                outcome, fixed = own.variants[0], same_prompt.variants[0]
                prompt_tokens = outcome.prompt.reference_tokens
                speeds[reference].append((prompt_tokens + own.answer_tokens) / own.reference_score_s)
                speeds[other].append((outcome.prompt.variant_tokens + own.answer_tokens) / outcome.score_s)
                rows.append({
                    "id": case.id, "answer": own.answer, "answer_tokens": own.answer_tokens,
                    "mean_kl": outcome.mean_kl, "top1_agreement": outcome.top1_agreement,
                    "first_divergence": outcome.first_divergence, "prompt_tokens_equal": outcome.prompt_tokens_equal,
                    "mean_kl_same_prompt": fixed.mean_kl, "top1_agreement_same_prompt": fixed.top1_agreement,
                })
            tokens = sum(r["answer_tokens"] for r in rows)
            results["runs"][f"{reference} as reference"] = {
                "token_weighted_mean_kl": sum(r["mean_kl"] * r["answer_tokens"] for r in rows) / tokens,
                "token_weighted_top1_agreement": sum(r["top1_agreement"] * r["answer_tokens"] for r in rows) / tokens,
                "prompts_with_equal_prompt_ids": sum(bool(r["prompt_tokens_equal"]) for r in rows),
                "prompts_diverging_at_token_0": sum(r["first_divergence"] == 0 for r in rows),
                "prompts_never_diverging": sum(r["first_divergence"] is None for r in rows),
                "answer_tokens": tokens,
                "scoring_tok_s_median": {k: statistics.median(v) for k, v in speeds.items()},
                "rows": rows,
            }
            print(reference, {k: v for k, v in results["runs"][f"{reference} as reference"].items() if k != "rows"})
    finally:
        engine.shutdown()
    results["wall_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
