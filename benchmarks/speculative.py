"""Speculative decoding against plain decoding, on grounded prompts (issue 20).

Each variant answers every prompt twice through the engine (worker processes, as the app runs
them): once plainly, once with `speculative` set, greedy, the same token limit. Both decode on
the same path (a transformers variant's static-cache decoder, which speculation runs on). Reported per
variant: decode tok/s of both (median over prompts), the measured speed-up (plain vs
speculative, same prompt), the speed-up the reply itself reports (`spec_speedup`, against its
first plain steps), the draft acceptance rate, and how many replies were token for token the
plain ones.

The prompts are grounded, where prompt lookup has something to find: edit a given text and
return it, summarise it quoting its commands, continue a given piece of code. Texts are this
repository's own files.

  .venv/bin/python -m benchmarks.speculative --out benchmarks/results/speculative_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def grounded_prompts() -> list[tuple[str, str]]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    docs = (REPO / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    code = (REPO / "playground" / "jsonl.py").read_text(encoding="utf-8")
    memory = (REPO / "playground" / "memory.py").read_text(encoding="utf-8")
    return [
        ("edit", "Fix the spelling in this text and return the whole text:\n\n" + readme[:1200].replace("the ", "teh ")),
        ("edit", "Rewrite this text with British spelling and return all of it:\n\n" + docs[:1200]),
        ("summary", "Summarise this text in five bullet points, quoting its exact commands:\n\n" + readme[1200:2600]),
        ("summary", "List every setting this text names, with its sentence:\n\n" + docs[1200:2600]),
        ("code", "Continue this Python module; repeat its last function first:\n\n" + code[:1400]),
        ("code", "Add type hints to this code and return it:\n\n" + memory[2000:3300]),
    ]


def run(variants: list[tuple[str, dict[str, Any]]], max_new_tokens: int) -> dict[str, Any]:
    from playground.catalogue import Catalogue
    from playground.engine import Engine

    engine = Engine(Catalogue.from_settings())
    prompts = grounded_prompts()
    results = []
    try:
        for base_id, spec in variants:
            shipped = engine.catalogue.get(base_id)
            # The plain side decodes on the same path as the speculative one: a transformers
            # variant's static-cache decoder (which speculation runs on; on a CPU the shipped
            # variant would take plain generate, a slower path that is not what is measured here).
            base = shipped.model_copy(update={"id": f"{base_id}-plain", "display_name": f"{base_id}-plain"})
            if shipped.backend == "transformers":
                base = base.model_copy(update={"fast_decode": "on"})
            engine.catalogue.add(base)
            base_id = base.id
            spec_id = f"{shipped.id}-spec-{spec['method']}-{spec.get('num_tokens', 8)}"
            engine.catalogue.add(
                shipped.model_copy(update={"id": spec_id, "display_name": spec_id, "speculative": _spec(spec)})
            )
            rows = []
            for variant_id in (base_id, spec_id):
                engine.load(variant_id)
            for kind, prompt in prompts:
                replies = {}
                for variant_id in (base_id, spec_id):
                    request = engine.request(variant_id, prompt=prompt, temperature=0.0, max_new_tokens=max_new_tokens)
                    replies[variant_id] = _finished(engine.generate(variant_id, request))
                plain, fast = replies[base_id], replies[spec_id]
                rows.append(
                    {
                        "kind": kind,
                        "tokens": fast.metrics.completion_tokens,
                        "plain_decode_tok_s": plain.metrics.decode_tok_s,
                        "spec_decode_tok_s": fast.metrics.decode_tok_s,
                        "measured_speedup": fast.metrics.decode_tok_s / plain.metrics.decode_tok_s,
                        "spec_speedup": fast.metrics.spec_speedup,
                        "draft_accept_rate": fast.metrics.draft_accept_rate,
                        "passes": fast.metrics.spec_passes,
                        "paused_tokens": fast.metrics.spec_paused_tokens,
                        "same_tokens": fast.token_ids == plain.token_ids,
                        "first_difference": _first_difference(plain.token_ids, fast.token_ids),
                    }
                )
                print(json.dumps({"variant": spec_id, **rows[-1]}), flush=True)
            for variant_id in (base_id, spec_id):
                engine.unload(variant_id)
            results.append({"variant": shipped.id, "speculative": spec, "prompts": rows, **_summary(rows)})
    finally:
        engine.shutdown()
    return {"max_new_tokens": max_new_tokens, "results": results}


def _spec(spec: dict[str, Any]) -> Any:
    from playground.config import SpeculativeSpec

    return SpeculativeSpec.model_validate(spec)


def _finished(events: Any) -> Any:
    from playground.workers import Finished

    for event in events:  # a failed reply raises here
        if isinstance(event, Finished):
            return event
    raise RuntimeError("the reply never finished")


def _first_difference(a: Any, b: Any) -> int | None:
    for i, (x, y) in enumerate(zip(a or (), b or (), strict=False)):
        if x != y:
            return i
    return None if len(a or ()) == len(b or ()) else min(len(a or ()), len(b or ()))


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    return {
        "median_plain_decode_tok_s": median("plain_decode_tok_s"),
        "median_spec_decode_tok_s": median("spec_decode_tok_s"),
        "median_measured_speedup": median("measured_speedup"),
        "median_spec_speedup": median("spec_speedup"),
        "median_draft_accept_rate": median("draft_accept_rate"),
        "same_tokens": f"{sum(r['same_tokens'] for r in rows)}/{len(rows)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--variants",
        default="smollm2-135m-gguf,smollm2-135m-transformers",
        help="shipped variant ids, each run plainly and with prompt lookup",
    )
    parser.add_argument("--num-tokens", default="4,8", help="drafted tokens a pass, one run each")
    args = parser.parse_args()
    variants = [
        (variant_id, {"method": "prompt-lookup", "num_tokens": int(n), "ngram": 3})
        for variant_id in args.variants.split(",")
        for n in args.num_tokens.split(",")
    ]
    report = run(variants, args.max_new_tokens)
    report["machine"] = {"processor": platform.processor() or platform.machine(), "cores": _cores()}
    report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    args.out.write_text(json.dumps(report, indent=1))
    for result in report["results"]:
        summary = {k: v for k, v in result.items() if k not in ("prompts",)}
        print(json.dumps(summary))


def _cores() -> int | None:
    import psutil

    return psutil.cpu_count(logical=False)


if __name__ == "__main__":
    main()
