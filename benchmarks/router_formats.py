"""The embedded router by the weight type llama.cpp computes with: decision latency on this CPU,
and how far its P(escalate) lies from the same weights run in fp32.

    .venv/bin/python -m benchmarks.router_formats --out benchmarks/results/router_formats_cpu.json

Each type is the shipped Q4_1 file as the app loads it with `llamacpp.convert_weights` (no, F16,
BF16, Q8_0: converted by llama.cpp's own quantizer, cached). Latency is the wall time of
`Router.decide(explain=False)` through the engine, as benchmarks/router_latency.py times it.
Fidelity compares each type's P(escalate) on the same requests with the transformers twin's in
fp32 (the Q4_1 weights dequantized): the reference for what these weights compute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.router_latency import measure

CONFIGS = Path(__file__).resolve().parents[1] / "model_configs"


def p_escalate(engine: object, variant_id: str, prompts: list[str]) -> list[float]:
    from playground.router import Router

    router = Router(engine, variant_id, calibrated=False)
    router.ensure_loaded()
    values = [router.score(prompt)[0][router.spec.escalate_route] for prompt in prompts]
    engine.unload(variant_id)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=30, help="OOD requests timed per type")
    parser.add_argument("--fidelity-prompts", type=int, default=64, help="OOD requests compared with fp32")
    parser.add_argument("--types", default="no,F16,BF16,Q8_0", help="convert_weights values")
    args = parser.parse_args()

    import llama_cpp

    from playground.catalogue import Catalogue
    from playground.config import parse_config
    from playground.engine import Engine
    from playground.router import router_rows

    rows = router_rows("ood", ["self", "npc_fin"], max(args.prompts, args.fidelity_prompts))
    prompts = [row["prompt"] for row in rows]
    catalogue = Catalogue.from_settings()
    spec = yaml.safe_load((CONFIGS / "smollm2-135m-router.yaml").read_text())
    twin = yaml.safe_load((CONFIGS / "smollm2-135m-router-transformers.yaml").read_text())
    reference = catalogue.add(parse_config(dict(twin, id="router-fp32", dtype="fp32", device="cpu"), origin="benchmark"))
    engine = Engine(catalogue)
    results: dict[str, dict] = {}
    try:
        p_fp32 = np.array(p_escalate(engine, reference.id, prompts[: args.fidelity_prompts]))
        for kind in args.types.split(","):
            data = dict(spec, id=f"router-{kind.lower()}", display_name=f"router {kind}")
            data["llamacpp"] = dict(spec.get("llamacpp", {}), convert_weights=kind)
            config = catalogue.add(parse_config(data, origin="benchmark"))
            info = engine.load(config.id)
            result = measure(engine, config.id, prompts[: args.prompts], reason_prompts=1)
            p = np.array(p_escalate(engine, config.id, prompts[: args.fidelity_prompts]))
            gap = np.abs(p - p_fp32)
            result |= {
                "weights": info.dtype,
                "weights_mb": round((info.weights_bytes or 0) / 2**20, 1),
                "vs_fp32": {
                    "max_abs_diff": float(gap.max()),
                    "mean_abs_diff": float(gap.mean()),
                    "route_flips_at_0.5": int(((p > 0.5) != (p_fp32 > 0.5)).sum()),
                    "n": len(p),
                },
            }
            results[kind] = result
            d = result["decision"]
            print(
                f"{kind} ({info.dtype}): decision p50 {d['p50_ms']:.0f} ms, p95 {d['p95_ms']:.0f} ms; "
                f"|P - P_fp32| max {gap.max():.4f}, mean {gap.mean():.4f}",
                flush=True,
            )
    finally:
        engine.shutdown()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "date": time.strftime("%Y-%m-%d"),
        "prompts": args.prompts,
        "types": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
