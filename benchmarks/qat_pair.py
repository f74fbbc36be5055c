"""A QAT export pair, measured the way the app's report measures it: three real jobs.

1. qat with the card's linear schedule on the torch twin of the embedded 135M (python-docs-train),
2. export-gguf of that fine-tune to Q8_0 and Q4_K_M (llama.cpp's quantizer; new variants),
3. report: Q4_K_M against Q8_0 (the reference) over the bundled prompt set: mean KL, top-1
   agreement, speed, memory, perplexity, check pass rate, reproducibility.

    .venv/bin/python -m benchmarks.qat_pair --out benchmarks/results/qat_pair.json [--steps N] [--limit N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASE = "smollm2-135m-transformers"
NAME = "smollm2-135m-qat-pair"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)  # as benchmarks.qat_compare: ~3 s a step on 2 cores
    parser.add_argument("--limit", type=int)  # the first N prompts of mixed-50 (default: all)
    args = parser.parse_args()
    from benchmarks.job_runner import job_runner

    run, results = job_runner("qat-pair-")
    results["command"] = f"python -m benchmarks.qat_pair --out {args.out} --steps {args.steps}" + (
        f" --limit {args.limit}" if args.limit else ""
    )
    results["qat"] = run(
        "qat", {"model": BASE, "steps": args.steps, "seq_len": 128, "batch_size": 4, "learning_rate": 5e-5,
                "schedule": "linear", "name": NAME}
    )
    results["export"] = run("export-gguf", {"model": NAME, "types": ["Q8_0", "Q4_K_M"], "name": NAME})
    made = {f["type"]: f["variant_id"] for f in results["export"]["files"]}
    results["report"] = run(
        "report", {"model": made["Q8_0"], "variants": [made["Q4_K_M"]], "limit": args.limit, "max_new_tokens": 48}
    )
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
