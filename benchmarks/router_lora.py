"""The NPC Fast card's router recipe on the embedded 135M, as the app runs it: three real jobs.

1. eval-router on the untrained transformers twin (OOD and in-distribution),
2. lora-router with the card's recipe (rank 32, 3 epochs, 189 steps on the 500 pairs),
3. eval-router on the variant the fine-tune made.

    .venv/bin/python -m benchmarks.router_lora --out benchmarks/results/router_lora.json

Jobs, their logs and the new variant go under PLAYGROUND_DATA_DIR (default: a folder in /tmp).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASE = "smollm2-135m-router-transformers"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="lora-router option")
    args = parser.parse_args()
    from benchmarks.job_runner import job_runner

    run, results = job_runner("router-lora-")

    for data in ("ood", "in_distribution"):
        results[f"before_{data}"] = run("eval-router", {"model": BASE, "data": data})
    options = {"model": BASE, "name": "smollm2-135m-router-lora"}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1] in "0123456789[-" or value in ("true", "false") else value
    results["finetune"] = run("lora-router", options)
    for data in ("ood", "in_distribution"):
        results[f"after_{data}"] = run("eval-router", {"model": options["name"], "data": data})
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
