"""How long a route decision takes: P(escalate) and the route, without the written reason.

    .venv/bin/python -m benchmarks.router_latency --out benchmarks/results/router_latency_cpu.json [--prompts 60]

For each embedded router (llama.cpp and its transformers twin) the first N requests of the
bundled OOD set are decided one after another, as the Router tab and `route --no-reason` do,
after two warm-up decisions; each figure is the wall time of `Router.decide(explain=False)` in
the caller (worker round trip included). Then the first 10 (--reason-prompts) are decided again with the reason
written, to time that part apart. The script runs on any commit that has `Router.decide`, so the
same command measures the code before and after a change.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

ROUTERS = ("smollm2-135m-router", "smollm2-135m-router-transformers")


def _percentiles(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(values, 50)) * 1000,
        "p95_ms": float(np.percentile(values, 95)) * 1000,
        "mean_ms": statistics.fmean(values) * 1000,
    }


def measure(engine: Any, router_id: str, prompts: list[str], reason_prompts: int = 10) -> dict[str, Any]:
    from playground.router import Router

    router = Router(engine, router_id, calibrated=False)
    router.ensure_loaded()
    for prompt in prompts[:2]:
        router.decide(prompt, explain=False)
    decisions = []
    for prompt in prompts:
        started = time.perf_counter()
        router.decide(prompt, explain=False)
        decisions.append(time.perf_counter() - started)
    with_reason = []
    for prompt in prompts[:reason_prompts]:
        started = time.perf_counter()
        router.decide(prompt, explain=True)
        with_reason.append(time.perf_counter() - started)
    engine.unload(router_id)
    return {"decision": _percentiles(decisions), "with_reason": _percentiles(with_reason), "n": len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--reason-prompts", type=int, default=10, help="how many are timed again with the reason")
    args = parser.parse_args()

    from playground.catalogue import Catalogue
    from playground.engine import Engine
    from playground.router import router_rows

    prompts = [row["prompt"] for row in router_rows("ood", ["self", "npc_fin"], args.prompts)]
    engine = Engine(Catalogue.from_settings())
    try:
        results = {router_id: measure(engine, router_id, prompts, args.reason_prompts) for router_id in ROUTERS}
    finally:
        engine.shutdown()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"commit": commit, "machine": platform.processor() or platform.machine(), "routers": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for router_id, r in results.items():
        d, w = r["decision"], r["with_reason"]
        print(
            f"{router_id}: decision p50 {d['p50_ms']:.0f} ms, p95 {d['p95_ms']:.0f} ms; "
            f"with the reason p50 {w['p50_ms']:.0f} ms ({r['n']} requests)"
        )


if __name__ == "__main__":
    main()
