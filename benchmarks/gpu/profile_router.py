"""Where a 1.7B router's route decision spends its time on the GPU: `score` in process, split
into its parts, for bf16 (fast decode path on and off) and NF4, with torch.profiler's table of
one decision. Random weights of NPC Fast 1.7B's shape, as benchmarks/gpu/router_latency.py.

    bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.gpu.profile_router \
      --tokenizer .gpukit/smollm2-tokenizer --out $OUT/profile_router
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.router_latency import make_router_folder, router_config


def timed(fn: Any, sync: Any) -> tuple[Any, float]:
    sync()
    started = time.perf_counter()
    value = fn()
    sync()
    return value, (time.perf_counter() - started) * 1000


def profile(config: Any, prompts: list[str], out: Path) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from playground.backends.base import Request
    from playground.backends.transformers_backend import TransformersBackend
    from playground.config import GenerationParams
    from playground.router import ROUTE_END, ROUTE_PREFIX

    backend = TransformersBackend(config)
    backend.load()
    sync = torch.cuda.synchronize
    continuations = [r + ROUTE_END for r in config.router.routes]

    def request(prompt: str) -> Request:
        messages = ({"role": "system", "content": config.router.system_prompt}, {"role": "user", "content": prompt})
        return Request(mode="chat", params=GenerationParams(), messages=messages, assistant_prefix=ROUTE_PREFIX)

    for prompt in prompts[:3]:
        backend.score(request(prompt), continuations)
    parts: dict[str, list[float]] = {"score": [], "render_and_encode": [], "forward_rest_of_prompt": [], "forward_plain": []}
    for prompt in prompts:
        _, took = timed(lambda p=prompt: backend.score(request(p), continuations), sync)
        parts["score"].append(took)
        ids, took = timed(lambda p=prompt: backend.prompt_ids(request(p)), sync)
        parts["render_and_encode"].append(took)
        with torch.inference_mode():
            tail = torch.tensor([ids[-40:]], device="cuda")
            _, took = timed(lambda t=tail: backend.model(t, logits_to_keep=8), sync)
            parts["forward_plain"].append(took)
            from transformers import DynamicCache

            cache = DynamicCache(config=backend.model.config)
            backend.model(torch.tensor([ids[:-40]], device="cuda"), past_key_values=cache, use_cache=True, logits_to_keep=1)
            _, took = timed(
                lambda t=tail, c=cache: backend.model(t, past_key_values=c, use_cache=True, logits_to_keep=8), sync
            )
            parts["forward_rest_of_prompt"].append(took)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for prompt in prompts[:5]:
            backend.score(request(prompt), continuations)
        sync()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    (out / f"{config.id}_profile.txt").write_text(table)
    fast = type(backend.decoder).__name__ if getattr(backend, "decoder", None) is not None else None
    scorer = backend._scorer
    graphs = sorted(length for length, run in scorer._passes.items() if run["graph"] is not None) if scorer else []
    cache_ok = backend._prefix_cache_ok
    backend.unload()
    return {
        "fast_decode": fast,
        "cache_ok": cache_ok,
        "static_scorer": scorer is not None,
        "graphs_for_lengths": graphs,
        **{name: {"p50_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2)} for name, v in parts.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokenizer", type=Path)
    args = parser.parse_args()
    from playground.catalogue import Catalogue
    from playground.config import parse_config
    from playground.router import router_rows

    args.out.mkdir(parents=True, exist_ok=True)
    prompts = [row["prompt"] for row in router_rows("ood", ["self", "npc_fin"], args.prompts)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "npc-fast-random"
        make_router_folder(folder, False, args.tokenizer)
        catalogue = Catalogue.from_settings()
        for name, quantization, fast in (("bf16", None, "auto"), ("bf16-plain", None, "off"), ("nf4", "nf4", "auto")):
            data = router_config(folder, quantization, "cuda") | {"fast_decode": fast}
            data["id"] += "-plain" if fast == "off" else ""
            config = catalogue.add(parse_config(data, origin="benchmark"))
            results[name] = profile(config, prompts, args.out)
            print(name, json.dumps(results[name]), flush=True)
    (args.out / "profile_router.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
