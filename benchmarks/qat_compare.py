"""The QAT card's claim on the embedded 135M, as the app runs it: three real jobs.

1. qat with the card's linear schedule on the torch twin (python-docs-train),
2. the same fine-tune without fake quantization (schedule none: the control),
3. qat-compare: base, QAT and control, each exported to GGUF and quantized the same way by
   llama.cpp, perplexity in llama.cpp on held-out text (python-docs-heldout), file sizes.

    .venv/bin/python -m benchmarks.qat_compare --out benchmarks/results/qat_compare.json [--steps N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASE = "smollm2-135m-transformers"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    # Sized for a 2-core CPU: a full QAT step of the 135M on 4 x 256 tokens took about 30 s there.
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    args = parser.parse_args()
    from benchmarks.job_runner import job_runner

    run, results = job_runner("qat-")

    common = {
        "model": BASE,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
    }
    results["qat"] = run("qat", common | {"schedule": "linear", "name": "smollm2-135m-qat-linear"})
    results["control"] = run("qat", common | {"schedule": "none", "name": "smollm2-135m-ft-noqat"})
    results["compare"] = run(
        "qat-compare", {"model": BASE, "qat": "smollm2-135m-qat-linear", "control": "smollm2-135m-ft-noqat"}
    )
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
