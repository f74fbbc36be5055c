"""Where llama.cpp with CUDA dies on the benchmark's GGUF (issue 7).

The decode benchmark's llama.cpp worker was killed by SIGSEGV on the H100 while a tiny test GGUF
loaded there. This writes the benchmark's 135M-shape F16 GGUF and loads it in fresh processes,
one setting changed at a time (flash attention, GPU layers, torch's CUDA context first, through
the app's worker), each under faulthandler with llama.cpp's own log, and writes down how each
ended.

On the lent GPU: bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.gpu.llamacpp_probe --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

DIRECT = textwrap.dedent(
    """
    import sys
    if sys.argv[4] in ("torch-first", "torch-imported"):
        import torch
        if sys.argv[4] == "torch-first":
            torch.zeros(1, device="cuda")
    import llama_cpp
    llm = llama_cpp.Llama(sys.argv[1], n_ctx=1024, n_gpu_layers=int(sys.argv[2]),
                          flash_attn=sys.argv[3] == "on", verbose=True)
    out = llm("abc def ghi", max_tokens=16)
    print("generated", out["usage"], flush=True)
    """
)

THROUGH_WORKER = textwrap.dedent(
    """
    import sys
    if sys.argv[4] == "torch-first":  # as the benchmark's parent: its workers inherit torch's env
        import torch
        torch.zeros(1, device="cuda")
    from playground.config import parse_config
    from playground.catalogue import Catalogue
    from playground.engine import Engine
    engine = Engine(Catalogue())
    engine.catalogue.add(parse_config({"id": "probe", "display_name": "probe", "backend": "llamacpp",
        "source": {"path": sys.argv[1]}, "device": sys.argv[3], "prompt_format": "raw",
        "context_length": 1024, "llamacpp": {"flash_attn": sys.argv[2]}}, origin="probe"))
    try:
        info = engine.load("probe", check_memory=False, timeout_s=300)
        print("loaded", info.device, info.dtype, flush=True)
        request = engine.request("probe", prompt="abc def ghi", mode="completion", max_new_tokens=16)
        reply = "".join(getattr(e, "text", "") for e in engine.generate("probe", request))
        print("generated", repr(reply[:40]), flush=True)
    finally:
        engine.shutdown()
    """
)


def run(args: list[str], timeout_s: int, env: dict[str, str] | None = None) -> dict[str, object]:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as err:
        return {"rc": "timeout", "tail": str(err.stderr or "")[-3000:]}
    lines = (done.stdout + done.stderr).splitlines()
    tail = [line for line in lines if "llama_model_loader: - " not in line][-40:]
    return {"rc": done.returncode, "tail": "\n".join(tail)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the worker cases here")
    parser.add_argument("--only", default="", help="comma-separated: run only cases whose name holds one of these")
    args = parser.parse_args(argv)
    from benchmarks.gpu.decode_speed import SHAPES, make_model, write_f16_gguf

    work = Path(tempfile.mkdtemp(prefix="probe-"))
    model = make_model(SHAPES[args.model], work / "hf", "cpu")
    gguf = write_f16_gguf(model.float(), work / "probe-f16.gguf")
    cases = {
        f"direct gpu_layers={layers} flash={flash} {order}": [
            sys.executable,
            "-X",
            "faulthandler",
            "-c",
            DIRECT,
            str(gguf),
            str(layers),
            flash,
            order,
        ]
        for layers, flash, order in [
            (-1, "on", "llama-only"),
            (-1, "off", "llama-only"),
            (0, "off", "llama-only"),
            (-1, "off", "torch-first"),
            (-1, "on", "torch-first"),
            # torch imported, CUDA untouched: what a spawned worker does when it re-imports a
            # main module that imports torch at its top (the benchmark did)
            (-1, "off", "torch-imported"),
        ]
    }
    lazy = [sys.executable, "-X", "faulthandler", "-c", DIRECT, str(gguf), "-1", "off", "llama-only"]
    cases["direct gpu_layers=-1 flash=off CUDA_MODULE_LOADING=LAZY"] = lazy
    for flash, parent in [("off", "llama-only"), ("auto", "llama-only"), ("auto", "torch-first")]:
        cases[f"worker flash={flash} parent={parent}"] = [
            sys.executable,
            "-X",
            "faulthandler",
            "-c",
            THROUGH_WORKER,
            str(gguf),
            flash,
            args.device,
            parent,
        ]
    # The benchmark itself, llama.cpp only: its workers died while the probe's own worker cases
    # loaded; the benchmark's parent makes its weights on CUDA, and its spawned workers re-import it.
    for weights_on in ("cuda", "cpu"):
        cases[f"benchmark llamacpp weights-on={weights_on}"] = [
            sys.executable, "-m", "benchmarks.gpu.decode_speed", "--models", args.model, "--paths", "llamacpp",
            "--fp32-check", "none", "--runs", "1", "--new-tokens", "32", "--weights-on", weights_on,
            "--out", str(work / f"bench-{weights_on}.json"),
        ]  # fmt: skip
    report: dict[str, object] = {}
    for name, command in [(n, c) for n, c in cases.items() if any(part in n for part in args.only.split(","))]:
        env = os.environ | {"CUDA_MODULE_LOADING": "LAZY"} if "LAZY" in name else None
        report[name] = run(command, timeout_s=240, env=env)
        print(f"{name}: rc={report[name]['rc']}", flush=True)  # type: ignore[index]
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
