"""Where a decode token's time goes: the fast path's kernels, by kind, per token (issue 7).

The captured graph runs the same kernels as the static-cache steps launched one by one (compiled
or not, as the run is asked), so those steps are profiled (torch.profiler, CUDA activity) and their kernel times are grouped: matrix-vector
products (the weight reads), attention, and everything else (norms, RoPE, SiLU, residual adds,
copies). The graph's own time per token, measured with CUDA events, is printed beside them: the
gap between the two is launch overhead that the graph did not remove.

  bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.gpu.profile_decode --models smollm2-1.7b --out $OUT/p.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.decode_speed import SHAPES, make_model
from playground.backends.fast_decode import StaticDecoder
from playground.config import GenerationParams


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    # Attention first: cuDNN's SDPA kernels also carry an "sm90" in their names.
    if any(k in name for k in ("fmha", "attention", "flash", "sdpa", "softmax", "efficient")):
        return "attention"
    if any(k in name for k in ("gemv", "gemm", "cutlass", "xmma", "sm90", "matmul", "matvec", "splitk", "cublas")):
        return "matmul (weights)"
    return "other (norms, rope, activations, copies)"


def kernel_times(run: Callable[[], object]) -> dict[str, tuple[float, int]]:
    """CUDA kernel name -> (total device microseconds, calls) while `run` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
    times = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.key] = (device_us, event.count)
    return times


def graph_ms_per_token(decoder: StaticDecoder, prompt: list[int], tokens: int) -> float:
    params = GenerationParams(temperature=0.0, max_new_tokens=tokens)
    list(decoder.tokens(prompt, params, lambda: False))  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    n = sum(1 for _ in decoder.tokens(prompt, params, lambda: False))
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def profile(shape_name: str, steps: int, compile_step: bool) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    with tempfile.TemporaryDirectory() as folder:
        model = make_model(shape, Path(folder), "cuda").eval()
    prompt = list(range(300, 556))
    graphed = StaticDecoder(model, 1024, use_cuda_graph=True)
    per_token_graph = graph_ms_per_token(graphed, prompt, 256)
    graphed.release()
    started = time.perf_counter()
    compiled = StaticDecoder(model, 1024, use_cuda_graph=True, compile_step=compile_step)
    compiled.prepare(512)
    compile_s = time.perf_counter() - started
    per_token_compiled = graph_ms_per_token(compiled, prompt, 256)
    compiled.release()
    eager = StaticDecoder(model, 1024, use_cuda_graph=False, compile_step=compile_step)
    params = GenerationParams(temperature=0.0, max_new_tokens=steps + 1)
    list(eager.tokens(prompt, params, lambda: False))  # warm
    kernels = kernel_times(lambda: list(eager.tokens(prompt, params, lambda: False)))
    # The prefill's kernels are in the profile too: take them out by subtracting one prefill.
    one_token = GenerationParams(temperature=0.0, max_new_tokens=1)
    for name, (us, count) in kernel_times(lambda: list(eager.tokens(prompt, one_token, lambda: False))).items():
        total, calls = kernels.get(name, (0.0, 0))
        kernels[name] = (total - us, calls - count)
    by_kind: dict[str, float] = defaultdict(float)
    for name, (us, _) in kernels.items():
        by_kind[kind_of(name)] += us
    per_token = {kind: us / steps / 1e3 for kind, us in by_kind.items()}
    weight_bytes = shape.bytes_per_token(0)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "model": shape_name,
        "graph_ms_per_token": per_token_graph,
        "compiled": compile_step,
        "compiled_graph_ms_per_token": per_token_compiled,
        "compile_and_capture_s": compile_s,
        "kernel_ms_per_token": per_token,
        "kernel_sum_ms_per_token": sum(per_token.values()),
        "kernels_per_token": sum(c for _, c in kernels.values()) / steps,
        "matmul_bandwidth_tb_s": weight_bytes / (per_token.get("matmul (weights)", 0) / 1e3) / 1e12
        if per_token.get("matmul (weights)")
        else None,
        "top_kernels": [
            {"kernel": k[:120], "ms_per_token": us / steps / 1e3, "calls_per_token": c / steps, "kind": kind_of(k)}
            for k, (us, c) in top
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,smollm2-1.7b")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true", help="profile the uncompiled step")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = []
    for name in args.models.split(","):
        result = profile(name, args.steps, not args.no_compile)
        results.append(result)
        args.out.write_text(json.dumps(results, indent=1))
        print(
            f"{name}: graph {result['graph_ms_per_token']:.3f} ms/token; compiled step in a graph "
            f"{result['compiled_graph_ms_per_token']:.3f} ms/token (compile + capture {result['compile_and_capture_s']:.0f} s); "
            "kernels of the profiled step "
            f"{result['kernel_sum_ms_per_token']:.3f} ms/token in {result['kernels_per_token']:.0f} launches; "
            f"weight matmuls at {result['matmul_bandwidth_tb_s'] or 0:.2f} TB/s",
            flush=True,
        )
        for kind, ms in sorted(result["kernel_ms_per_token"].items(), key=lambda kv: -kv[1]):
            print(f"   {kind:<42} {ms:.3f} ms")
        for k in result["top_kernels"][:8]:
            print(f"   {k['ms_per_token']:.3f} ms  x{k['calls_per_token']:.0f}  {k['kernel'][:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
