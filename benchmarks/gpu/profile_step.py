"""Where one decode token's time goes on the fast path as the app loads it (issue 20).

Loads a random-weight model of a seed shape through the transformers backend, as a variant
would load (`--paths fast,nf4,nf4-int8-head`: bf16, NF4, NF4 with the int8 head), lets it time
its launch shapes and capture its step, then replays the captured step under torch.profiler
(CUPTI reports each kernel a graph replay runs) and, apart, times the same
replays with CUDA events. Each token's kernels are put in their roles by their order in the
step: a layer's four weight matvecs (q/k/v, o, gate/up, down), its attention, the head, and
the rest (embedding, last norm, argmax, copies). Printed per role: microseconds a token and a
layer. Beside them, the step's wall time, the time some kernel ran (the union of the kernels'
intervals) and the gap (wall less busy: launch, ramp-up and dependency waits that no kernel
covers); kernels launched early under programmatic dependent launch overlap their predecessor,
so the sum of the kernels' own times can pass the busy time (the overlap).

Then (`--pass-drafts`, 4 by default) a speculative pass of the last token and that many drafts,
as a reply runs it (its write counters set, its captured graph replayed): its wall time beside
the step's, and its kernels by name, busiest first. A pass goes through the model's own layers,
not the Triton ones, so this says what a pass costs over a step and where.

  bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.gpu.profile_step \\
      --models smollm2-1.7b --paths fast,nf4,nf4-int8-head --out $OUT/profile_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# the roles of a layer's weight matvecs, in the order a step launches them
LAYER_MATVECS = ("qkv", "o", "gate_up", "down")
# cuBLAS and CUTLASS kernel names: the head's matmul where it is not a Triton matvec
CUBLAS_NAMES = ("gemv", "gemm", "cutlass", "xmma", "cublas", "splitk")


def step_roles(names: Sequence[str], layers: int) -> list[str]:
    """The role of each kernel of one decode step, by name and order: the step's Triton matvecs
    are the layers' q/k/v, o, gate/up and down in turn, then (an int8 head) the head's; a
    cuBLAS or CUTLASS matmul is the head's; the attention kernel is attention's; the rest are
    "other". Raises ValueError where the matvecs are not a whole number of layers (a step
    whose kernels this script does not know)."""
    matvecs = [index for index, name in enumerate(names) if "matvec_kernel" in name]
    if len(matvecs) not in (4 * layers, 4 * layers + 1):
        raise ValueError(f"{len(matvecs)} Triton matvecs in a step of {layers} layers: expected {4 * layers} (+1)")
    roles = []
    order = {index: rank for rank, index in enumerate(matvecs)}
    for index, name in enumerate(names):
        lowered = name.lower()
        if index in order:
            rank = order[index]
            roles.append(LAYER_MATVECS[rank % 4] if rank < 4 * layers else "head")
        elif "attention_kernel" in lowered:
            roles.append("attention")
        elif any(part in lowered for part in CUBLAS_NAMES):
            roles.append("head")
        else:
            roles.append("other")
    return roles


def exclusive_us(intervals: Sequence[tuple[float, float]]) -> list[float]:
    """Each (start, end) interval's time past the end of all those that started before it
    (in start order). Under programmatic dependent launch a kernel starts, and waits, while
    the one before still runs: this charges each kernel only for the time it added, and the
    charges add up to the time some kernel ran (the union of the intervals)."""
    charges, reach = [], float("-inf")
    for start, end in intervals:
        charges.append(max(0.0, end - max(start, reach)))
        reach = max(reach, end)
    return charges


def token_breakdown(kernels: Sequence[tuple[str, float, float]], steps: int, layers: int) -> dict[str, Any]:
    """Per token, from the profiled kernels of `steps` replays ((name, start µs, end µs), any
    order): each role's µs, as the kernels' own durations ("us_per_token") and as the time
    they added (`exclusive_us`, "added_us_per_token"), and its kernels; the busy time (the
    added times' sum) and the sum of the kernels' own times. Kernels before the first step
    (the replays' start position written into the step's buffer) are left out, as many as keep
    the rest from splitting into `steps` equal steps, and named under "left_out"."""
    kernels = sorted(kernels, key=lambda kernel: kernel[1])
    if len(kernels) < steps:
        raise ValueError(f"{len(kernels)} kernels for {steps} steps")
    left_out = [name for name, _, _ in kernels[: len(kernels) % steps]]
    kernels = kernels[len(left_out) :]
    per_step = len(kernels) // steps
    sequences = {
        tuple(name for name, _, _ in kernels[step * per_step : (step + 1) * per_step]) for step in range(steps)
    }
    if len(sequences) > 1:  # every replay runs the same kernels: the split is off
        raise ValueError(f"{len(kernels)} kernels in {steps} steps: the steps' kernel sequences differ")
    roles = step_roles([name for name, _, _ in kernels[:per_step]], layers)
    added = exclusive_us([(start, end) for _, start, end in kernels])
    own_us: dict[str, list[float]] = defaultdict(list)
    added_us: dict[str, list[float]] = defaultdict(list)
    busy, own, names = [], [], defaultdict(set)
    for step in range(steps):
        at = slice(step * per_step, (step + 1) * per_step)
        own_totals: dict[str, float] = defaultdict(float)
        added_totals: dict[str, float] = defaultdict(float)
        for role, (name, start, end), charge in zip(roles, kernels[at], added[at], strict=True):
            own_totals[role] += end - start
            added_totals[role] += charge
            names[role].add(name)
        for role in own_totals:
            own_us[role].append(own_totals[role])
            added_us[role].append(added_totals[role])
        busy.append(sum(added[at]))
        own.append(sum(end - start for _, start, end in kernels[at]))
    per_layer = (*LAYER_MATVECS, "attention")
    breakdown = {}
    for role in own_us:
        mine, extra = statistics.median(own_us[role]), statistics.median(added_us[role])
        breakdown[role] = {
            "us_per_token": mine,
            "added_us_per_token": extra,
            "kernels_per_token": roles.count(role),
            "us_per_layer": mine / layers if role in per_layer else None,
            "added_us_per_layer": extra / layers if role in per_layer else None,
            "kernel_names": sorted(names[role])[:4],
        }
    return {
        "kernels_per_token": per_step,
        "roles": breakdown,
        "busy_us_per_token": statistics.median(busy),
        "kernel_us_per_token": statistics.median(own),
        "left_out": left_out,
    }


def pass_breakdown(kernels: Sequence[tuple[str, float, float]], passes: int, top: int = 15) -> dict[str, Any]:
    """Per speculative pass, from the profiled kernels of `passes` passes ((name, start µs,
    end µs), any order): each kernel name's launches and own µs a pass, the busiest `top`
    first, and the pass's busy time (the union of the kernels' intervals, `exclusive_us`).
    A pass runs the model's own layers, whose kernels take no roles by order as a step's do."""
    kernels = sorted(kernels, key=lambda kernel: kernel[1])
    launches: dict[str, int] = defaultdict(int)
    own: dict[str, float] = defaultdict(float)
    for name, start, end in kernels:
        launches[name] += 1
        own[name] += end - start
    busiest = sorted(own, key=own.__getitem__, reverse=True)[:top]
    return {
        "kernels_per_pass": len(kernels) / passes,
        "busy_us_per_pass": sum(exclusive_us([(start, end) for _, start, end in kernels])) / passes,
        "kernel_us_per_pass": sum(own.values()) / passes,
        "by_kernel": [
            {"name": name, "launches_per_pass": launches[name] / passes, "us_per_pass": own[name] / passes}
            for name in busiest
        ],
    }


def profiled_kernels(run: Callable[[], None]) -> list[tuple[str, float, float]]:
    """The CUDA kernels `run` launched, as (name, start µs, end µs). CPU activity too: kernels a
    graph replay runs are reported under its launch, a CPU event."""
    import torch

    activity = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activity) as profiler:
        run()
        torch.cuda.synchronize()
    return [
        (event.name, event.time_range.start, event.time_range.end)
        for event in profiler.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.end > event.time_range.start
    ]


def wall_us(run: Callable[[], None], count: int) -> float:
    """The best of three CUDA-event timings of `run` (which does `count` of something), µs each."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    walls = []
    for _ in range(3):
        start.record()
        run()
        end.record()
        end.synchronize()
        walls.append(start.elapsed_time(end) * 1000 / count)
    return min(walls)


def profile_pass(decoder: Any, vocab: int, drafts: int, passes: int) -> dict[str, Any]:
    """One short speculative reply (its pass of `drafts` drafts compiled and captured), then
    `passes` passes timed and profiled as a reply runs them."""
    from benchmarks.gpu.speculative_speed import filler_prompt
    from playground.backends.base import SpeculationStats
    from playground.backends.fast_decode import PromptLookupDrafter
    from playground.config import GenerationParams

    prompt = filler_prompt(vocab)
    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    drafter = PromptLookupDrafter(3, drafts)
    for _ in decoder.speculative_tokens(prompt, params, lambda: False, drafter, drafts, SpeculationStats("p")):
        pass
    decoder.replay_passes(8)  # warm
    result: dict[str, Any] = {
        "rows": drafts + 1,
        "graph": decoder._verify_graph is not None,
        "graph_failure": decoder.verify_graph_failure,
        "wall_us_per_pass": wall_us(lambda: decoder.replay_passes(passes), passes),
    }
    result |= pass_breakdown(profiled_kernels(lambda: decoder.replay_passes(passes)), passes)
    result["gap_us_per_pass"] = result["wall_us_per_pass"] - result["busy_us_per_pass"]
    return result


def variant_config(path: str, shape_name: str, folder: Path) -> Any:
    from benchmarks.gpu.decode_speed import SHAPES, variant_for
    from playground.config import parse_config

    data = variant_for(path, SHAPES[shape_name], folder, None, "cuda")
    return parse_config(data, f"profile_step {shape_name} {path}")


def profile_path(shape_name: str, path: str, folder: Path, steps: int, pass_drafts: int = 0) -> dict[str, Any]:
    """Load `path` of the model in `folder` through the backend, warm it with one reply, then
    profile and time `steps` replays of its captured step; with `pass_drafts`, as many
    speculative passes of that many drafts too (`profile_pass`)."""
    import torch

    from playground.backends.base import Request
    from playground.backends.transformers_backend import TransformersBackend
    from playground.config import GenerationParams

    backend = TransformersBackend(variant_config(path, shape_name, folder))
    started = time.perf_counter()
    info = backend.load()
    load_s = time.perf_counter() - started
    try:
        decoder = backend.decoder
        if decoder is None or not decoder.use_cuda_graph:
            return {"error": f"no captured step: {info.decode}", "decode": info.decode}
        params = GenerationParams(max_new_tokens=16, temperature=0.0)
        prompt = backend.prepare(Request(params=params, mode="completion", text="a" * 256))
        for _ in backend.stream(prompt, params, lambda: False):
            pass
        decoder.replay_steps(16)  # warm
        step_wall = wall_us(lambda: decoder.replay_steps(steps), steps)
        kernels = profiled_kernels(lambda: decoder.replay_steps(steps))
        layers = backend.model.config.num_hidden_layers
        result: dict[str, Any] = {"decode": info.decode, "load_s": load_s, "wall_us_per_token": step_wall}
        if pass_drafts:  # before the step's breakdown, which may not fit its roles
            try:
                result["pass"] = profile_pass(decoder, backend.model.config.vocab_size, pass_drafts, steps)
            except Exception as err:  # the step's figures stand without it
                result["pass"] = {"error": f"{type(err).__name__}: {err}"}
        try:
            result |= token_breakdown(kernels, steps, layers)
        except ValueError as err:  # kept with the kernel names seen, to read what the step was
            seen = sorted({name for name, _, _ in kernels})
            result |= {"error": str(err), "kernels": len(kernels), "kernel_names": seen[:40]}
            return result
        result["gap_us_per_token"] = result["wall_us_per_token"] - result["busy_us_per_token"]
        result["overlap_us_per_token"] = result["kernel_us_per_token"] - result["busy_us_per_token"]
        return result
    finally:
        backend.unload()
        torch.cuda.empty_cache()


def print_table(shape_name: str, results: dict[str, dict[str, Any]]) -> None:
    roles = ["qkv", "attention", "o", "gate_up", "down", "head", "other"]
    paths = [path for path, result in results.items() if "roles" in result]
    for path, result in results.items():
        if "roles" not in result:
            print(f"{shape_name} {path}: {result.get('error')}")
    if not paths:
        return
    print(f"\n{shape_name}: µs a token, the kernels' own / the time they added")
    print(f"{'':22}" + "".join(f"{path:>22}" for path in paths))
    for role in roles:
        cells = []
        for path in paths:
            entry = results[path]["roles"].get(role)
            if entry is None:
                cells.append(f"{'-':>22}")
                continue
            cells.append(f"{entry['us_per_token']:>11.1f} / {entry['added_us_per_token']:<8.1f}")
        print(f"{role:22}" + "".join(cells))
    for label, key in (
        ("kernels' own sum", "kernel_us_per_token"),
        ("busy (union)", "busy_us_per_token"),
        ("wall (CUDA events)", "wall_us_per_token"),
        ("gap (wall - busy)", "gap_us_per_token"),
        ("overlap (sum - busy)", "overlap_us_per_token"),
    ):
        print(f"{label:22}" + "".join(f"{results[path][key]:>22.1f}" for path in paths))


def print_passes(shape_name: str, results: dict[str, dict[str, Any]]) -> None:
    for path, result in results.items():
        profiled = result.get("pass")
        if profiled is None:
            continue
        if "error" in profiled:
            print(f"{shape_name} {path} pass: {profiled['error']}")
            continue
        graph = "graph" if profiled["graph"] else f"eager ({profiled['graph_failure'] or 'no graph'})"
        print(
            f"\n{shape_name} {path}: a pass of {profiled['rows']} rows ({graph}): wall "
            f"{profiled['wall_us_per_pass']:.1f} µs, busy {profiled['busy_us_per_pass']:.1f}, "
            f"{profiled['kernels_per_pass']:.0f} kernels; against a step's wall {result['wall_us_per_token']:.1f}"
        )
        for entry in profiled["by_kernel"]:
            print(f"  {entry['us_per_pass']:>9.1f} µs  {entry['launches_per_pass']:>5.1f}×  {entry['name'][:90]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-1.7b")
    parser.add_argument("--paths", default="fast,nf4,nf4-int8-head")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument(
        "--pass-drafts", type=int, default=4, help="also profile speculative passes of this many drafts (0: none)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from benchmarks.gpu.decode_speed import SHAPES, make_model

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(0),
        "steps": args.steps,
        "models": {},
    }
    for shape_name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / shape_name
            make_model(SHAPES[shape_name], folder, "cuda")  # written, then dropped: each path loads its own
            torch.cuda.empty_cache()
            results = {}
            for path in args.paths.split(","):
                try:
                    results[path] = profile_path(shape_name, path, folder, args.steps, args.pass_drafts)
                except Exception as err:  # one path's failure leaves the others' figures
                    results[path] = {"error": f"{type(err).__name__}: {err}"}
                report["models"][shape_name] = results
                args.out.write_text(json.dumps(report, indent=1))
            print_table(shape_name, results)
            print_passes(shape_name, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
