"""The overhead of our path on CPU: decode tokens/s through `python -m playground generate`
(worker process, pipe, metrics) against the library called directly with the same settings.

Both backends of the embedded default: llama.cpp on the GGUF, transformers on its dequantized
twin. Greedy decoding and the same chat prompt, so both paths make the same tokens. Runs
alternate (ours, direct, ours, ...) so drift on a shared machine hits both; medians reported.

    .venv/bin/python benchmarks/cpu_overhead.py --runs 3 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from playground.config import load_config_dir  # noqa: E402
from playground.sources import locate  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def ours(variant_id: str, max_tokens: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "playground",
            "generate",
            "--model",
            variant_id,
            "--prompt",
            MESSAGES[0]["content"],
            "--max-tokens",
            str(max_tokens),
            "--temperature",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    result = json.loads(out.stdout)
    return {k: result[k] for k in ("completion_tokens", "decode_tok_s", "ttft_s")}


def direct_llamacpp(path: str, context: int, threads: int, max_tokens: int) -> dict:
    import llama_cpp

    from playground.backends.llamacpp_backend import cpu_repack_allowed, extra_buffer_types

    # as the app makes it: no repacked weights on a CPU with AMX, where prompts crashed
    with extra_buffer_types(cpu_repack_allowed()):
        llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_threads=threads, n_batch=512, verbose=False)
    t0 = time.perf_counter()
    stamps = []
    for chunk in llm.create_chat_completion(
        messages=MESSAGES, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, stream=True
    ):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    llm.close()
    return _rates(t0, stamps)


def direct_transformers(folder: str, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    streamer = Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
    # If generation ends on EOS, that token is stamped here too (our path does not count it);
    # with --max-tokens below the story's length both paths stop on the limit.
    return _rates(t0, streamer.times)


def _rates(t0: float, stamps: list[float]) -> dict:
    decode_s = stamps[-1] - stamps[0]
    return {"completion_tokens": len(stamps), "decode_tok_s": (len(stamps) - 1) / decode_s, "ttft_s": stamps[0] - t0}


def run_direct_in_subprocess(kind: str, *args: str) -> dict:
    """The direct call runs in a fresh process too, so both sides pay the same start-up."""
    out = subprocess.run(
        [sys.executable, __file__, "--direct", kind, *args], capture_output=True, text=True, check=True, cwd=REPO
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--direct", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_overhead.json")
    args = parser.parse_args()

    if args.direct:  # child mode: one direct measurement, printed as JSON
        kind, *rest = args.direct
        if kind == "llamacpp":
            print(json.dumps(direct_llamacpp(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))))
        else:
            print(json.dumps(direct_transformers(rest[0], int(rest[1]))))
        return

    import psutil

    from playground.backends.transformers_backend import dequantized_gguf_folder

    configs = load_config_dir()
    gguf_cfg, twin_cfg = configs["smollm2-135m-gguf"], configs["smollm2-135m-transformers"]
    gguf_path = locate(gguf_cfg).location
    twin_folder, _ = dequantized_gguf_folder(Path(gguf_path))
    threads = psutil.cpu_count(logical=False) or 1
    cases = {
        "smollm2-135m-gguf (llama.cpp Q4_1)": (
            gguf_cfg.id,
            ("llamacpp", gguf_path, str(gguf_cfg.context_length), str(threads), str(args.max_tokens)),
        ),
        "smollm2-135m-transformers (bf16)": (twin_cfg.id, ("transformers", str(twin_folder), str(args.max_tokens))),
    }
    results = {}
    for name, (variant_id, direct_args) in cases.items():
        ours_runs, direct_runs = [], []
        for _ in range(args.runs):
            ours_runs.append(ours(variant_id, args.max_tokens))
            direct_runs.append(run_direct_in_subprocess(*direct_args))
        ours_rate = statistics.median(r["decode_tok_s"] for r in ours_runs)
        direct_rate = statistics.median(r["decode_tok_s"] for r in direct_runs)
        results[name] = {
            "ours_decode_tok_s": round(ours_rate, 2),
            "direct_decode_tok_s": round(direct_rate, 2),
            "ratio_ours_over_direct": round(ours_rate / direct_rate, 3),
            "ours_runs": ours_runs,
            "direct_runs": direct_runs,
        }
        print(
            f"{name}: ours {ours_rate:.1f} tok/s, direct {direct_rate:.1f} tok/s, ratio {ours_rate / direct_rate:.3f}"
        )
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {psutil.cpu_count(logical=False)} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.python_version()}",
        "command": f"python benchmarks/cpu_overhead.py --runs {args.runs} --max-tokens {args.max_tokens}",
        "max_tokens": args.max_tokens,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
