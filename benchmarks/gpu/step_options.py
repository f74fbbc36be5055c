"""How torch.compile's options change one decode step's time on the GPU (issue 20).

The fast path compiles the step with Inductor's defaults and replays it as a CUDA graph. What is
left between it and the bandwidth bound is mostly per-kernel cost (launch, ramp-up and tail of
~300 kernels a token) and cuBLAS's batch-1 GEMV rate (benchmarks/RESULTS.md, profile). Options
tried here, each in its own process so Inductor's caches and settings do not carry over:
- `default`: what the app uses;
- `pdl`: programmatic dependent launch for Inductor's Triton kernels (a kernel's launch overlaps
  the tail of the one before);
- `max-autotune`: Inductor times Triton templates against cuBLAS for each matmul;
- `max-autotune-pdl`: both;
- `coordinate-descent`: tunes the block sizes of Inductor's own kernels;
- `triton-layers`: the default compile over playground/backends/triton_layers.py's fused layers
  (norm, SiLU and residual add inside four Triton matvecs a layer). Its row also holds each
  matvec's time against cuBLAS's plain matmul of the same weight, and how far one eager step's
  logits move from the model's own layers;
- `triton-layers-model-attention`: the same with the model's own RoPE, cache update and SDPA in
  place of triton_layers' decode-attention kernel;
- `triton-layers-no-pdl`: the same without programmatic dependent launch among the choices;
- `triton-layers-pdl-all`: the same with every layer kernel launched with it. The load-time
  picker keeps PDL for a kernel only where that kernel alone, repeated, ran faster with it (on
  the H200 only gate/up did); but a kernel can start under the one before's tail only if that
  one is a PDL launch too, so a mix gains little;
- `triton-layers-nf4`: the model through bitsandbytes NF4 (bf16 compute) and the same layers.
Per option and shape: ms per token of the captured step, timed with CUDA events over replays
from position 256 on (a 1024-slot cache), against the bytes a token reads at the measured copy rate.

On the lent GPU:
  bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.gpu.step_options --out $OUT/step_options.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DECODER_SHAPES = {
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    # Qwen2.5-3B's layers (grouped heads, head_dim 128) on SmolLM2's vocabulary: a stand-in for
    # step timings of the layer stack, not of the 3B's 151936-row head
    "qwen2.5-3b-layers": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
}  # fmt: skip


def make_decoder(shape: str, device: str, folder: Path, nf4: bool = False) -> Any:
    """A random bf16 model of `shape` on `device` with the fast path's fused projections and
    static decoder (graph and compiled step on a GPU, eager on a CPU), built here rather than
    loaded through the backend, so each option can install its own layers and compile its step.

    `nf4`: the model saved and loaded again through bitsandbytes NF4 (bf16 compute, as the
    shipped NF4 config), its projections left unfused, as the app loads an NF4 variant."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from playground.backends.fast_decode import StaticDecoder, fuse_projections

    config = LlamaConfig(
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=130_000.0,
        **DECODER_SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.eval()
    if nf4:
        from transformers import BitsAndBytesConfig

        model.save_pretrained(folder / f"{shape}-bf16")
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder / f"{shape}-bf16", quantization_config=quantization, device_map=device, dtype=torch.bfloat16
        ).eval()
    fuse_projections(model)  # plain linear layers only: NF4 ones stay as they are
    on_gpu = device == "cuda"
    return StaticDecoder(model, 2048, use_cuda_graph=on_gpu, compile_step=on_gpu)


# In the order they are run (--options), most telling first, so a budget cuts the least.
OPTIONS = {
    "default": {},
    "triton-layers": {},
    "triton-layers-model-attention": {},
    "triton-layers-no-pdl": {},
    "triton-layers-pdl-all": {},
    "triton-layers-nf4": {},  # bitsandbytes NF4 weights through the same layers
    "pdl": {"options": {"triton.enable_pdl": True}},
    # torch.compile takes a mode or options, not both: max-autotune-no-cudagraphs as options.
    "max-autotune-pdl": {"options": {"max_autotune": True, "triton.cudagraphs": False, "triton.enable_pdl": True}},
    "coordinate-descent": {"options": {"coordinate_descent_tuning": True}},
    "max-autotune": {"mode": "max-autotune-no-cudagraphs"},
}


def copy_rate_bytes_per_s() -> float:
    """Device-to-device copy, bytes read and written, as decode_speed measures it."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * 10 * src.numel() / (start.elapsed_time(end) / 1000)


def prefill_ms(decoder) -> dict:
    """A 256-token prompt's prefill, median of 10 (synchronized): through its captured pass,
    and as the app did it before, one eager unpadded pass."""
    import statistics

    import torch

    prompt = [(i * 7919) % 49152 for i in range(256)]

    def timed(write) -> float:
        runs = []
        for _ in range(12):
            torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.inference_mode():
                int(torch.argmax(write(), dim=-1))  # read back, as the first token is
            runs.append((time.perf_counter() - started) * 1000)
        return statistics.median(runs[2:])

    def eager():
        decoder.cache.reset()
        ids = torch.tensor([prompt], device="cuda")
        return decoder.model(input_ids=ids, past_key_values=decoder.cache, use_cache=True, logits_to_keep=1).logits[
            :, -1
        ]

    return {
        "prefill_256_graph_ms": timed(lambda: decoder._write_prompt(prompt)),
        "prefill_256_eager_ms": timed(eager),
        "prefill_graph_failure": decoder.prefill_graph_failure,
    }


def matvec_times(model) -> dict:
    """Per projection: the fused matvec (its picked launch shape, on the picker's own trial
    call: every layer's weight in turn, so they come from memory as in a step) and cuBLAS's
    plain matmul of the same weights, each timed in CUDA graphs, per layer, with the weight's read
    rate."""
    import torch
    from triton.testing import do_bench_cudagraph

    from playground.backends.triton_kernels import NF4Weight
    from playground.backends.triton_layers import (
        MATVECS,
        NF4_DOT_CONFIGS,
        NF4_WHOLE_BLOCK_CONFIGS,
        PLAIN_LOADING_WAYS,
        agrees,
        matvec_trial,
        nf4_variants,
        plain_loading,
    )

    fused_layers = list(model.model.layers)
    layers = [fused.layer for fused in fused_layers]
    projections = [fused.projections for fused in fused_layers]  # built when they were installed
    count = len(layers)
    layer = fused_layers[0]
    out = {}
    for name in MATVECS:
        projection, config = layer.projections[name], layer.configs[name]
        weight = projection.weight
        trial = matvec_trial(layers, name, projections)
        fused_ms = do_bench_cudagraph(functools.partial(trial, config)) / count
        if isinstance(weight, NF4Weight):  # bytes read: codes and block scales; no cuBLAS matmul
            size = sum(t.numel() * t.element_size() for t in (*weight.packed, *weight.absmax))
            # the same launch shape with each lookup, bytes prefetched, loads pipelined or neither:
            # what the picker's choice bought
            variants_us, variants_agree = {}, {}
            reference = trial(config)
            for variant in nf4_variants(config, projection):
                label = f"tensor cores, {variant.nf4_splits} shares, " if variant.nf4_dot else ""
                label += variant.nf4_lookup + (", prefetched" if variant.nf4_prefetch else "")
                label += f", {variant.nf4_stages} stages" if variant.nf4_stages > 1 else ""
                label += ", whole blocks" if variant.nf4_whole_blocks else ""
                variants_agree[label] = agrees(trial, variant, reference)
                variants_us[label] = do_bench_cudagraph(functools.partial(trial, variant)) * 1000 / count
            # tensor cores summing the products, each column share the picker tries; with
            # --nf4-more, their loads pipelined too, the picked shape's columns shared out, and
            # the shapes whose threads decode whole blocks, plain and pipelined (by default these
            # took the 1.7B's run past 220 s)
            more = []
            if os.environ.get("STEP_NF4_MORE") == "1":
                more = [dataclasses.replace(dot, nf4_stages=3) for dot in NF4_DOT_CONFIGS]
                more += [dataclasses.replace(config, nf4_splits=splits) for splits in (2, 4, 8)]
                more += [
                    dataclasses.replace(shape, nf4_stages=stages)
                    for shape in NF4_WHOLE_BLOCK_CONFIGS
                    for stages in (1, 3)
                ]
            for variant in (*NF4_DOT_CONFIGS, *more):
                variant = dataclasses.replace(variant, nf4_lookup=config.nf4_lookup)
                if variant == config or not projection.fits(variant):
                    continue
                label = "tensor cores " if variant.nf4_dot else "FMA "
                label += f"{variant.block_n}x{variant.block_k} w{variant.num_warps}, "
                label += f"{variant.nf4_splits} shares, {variant.nf4_lookup}"
                label += f", {variant.nf4_stages} stages" if variant.nf4_stages > 1 else ""
                label += ", prefetched" if variant.nf4_prefetch else ""
                label += ", whole blocks" if variant.nf4_whole_blocks else ""
                variants_agree[label] = agrees(trial, variant, reference)
                variants_us[label] = do_bench_cudagraph(functools.partial(trial, variant)) * 1000 / count
            out[f"matvec_{name}"] = {
                "parts": list(weight.rows),
                "config": [config.block_n, config.block_k, config.num_warps, config.pdl],
                "nf4_lookup": config.nf4_lookup,
                "nf4_prefetch": config.nf4_prefetch,
                "nf4_stages": config.nf4_stages,
                "nf4_dot": config.nf4_dot,
                "nf4_splits": config.nf4_splits,
                "nf4_whole_blocks": config.nf4_whole_blocks,
                "fused_us": fused_ms * 1000,
                "fused_tb_s": size / (fused_ms / 1000) / 1e12,
                "variants_us": variants_us,
                "variants_agree": variants_agree,  # with the picked variant, as the picker checks
            }
            continue
        x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device="cuda")
        weights = [fused.projections[name].weight for fused in fused_layers]

        def cublas(x=x, weights=weights) -> None:
            for each in weights:
                torch.nn.functional.linear(x, each)

        cublas_ms = do_bench_cudagraph(cublas) / count
        size = weight.numel() * weight.element_size()
        # the picked shape loading each way the picker tries, as plain and PDL launches (a PDL
        # launch reads its weights a step ahead whatever `ahead` says)
        variants_us = {}
        for pdl in (False, True):
            for way in PLAIN_LOADING_WAYS:
                label = "x ahead" if way.get("ahead") else f"{way['stages']} stages" if "stages" in way else "plain"
                variant = plain_loading(config, way, pdl=pdl)
                label += ", pdl" if pdl else ""
                variants_us[label] = do_bench_cudagraph(functools.partial(trial, variant)) * 1000 / count
        out[f"matvec_{name}"] = {
            "shape": list(weight.shape),
            "config": [config.block_n, config.block_k, config.num_warps, config.pdl],
            "ahead": config.ahead,
            "stages": config.stages,
            "variants_us": variants_us,
            "fused_us": fused_ms * 1000,
            "cublas_us": cublas_ms * 1000,
            "fused_tb_s": size / (fused_ms / 1000) / 1e12,
            "cublas_tb_s": size / (cublas_ms / 1000) / 1e12,
        }
    return out


def pdl_sequence_times(model, configs: dict) -> dict:
    """The layer sequence the load-time PDL choice times, with the picked shapes, as plain
    launches and as PDL launches: ms per run of every layer's kernels (what the choice saw)."""
    from playground.backends.triton_kernels import MatvecConfig
    from playground.backends.triton_layers import _with_pdl_if_faster

    plain = {}
    for name, config in configs.items():
        if isinstance(config, MatvecConfig):
            config = dataclasses.replace(config, nf4_pdl_late=False)
        plain[name] = None if config is None else dataclasses.replace(config, pdl=False)
    layers = [fused.layer for fused in model.model.layers]
    projections = [fused.projections for fused in model.model.layers]
    trial: dict = {}
    _with_pdl_if_faster(model, layers, projections, plain, trial=trial)  # the load's own choice
    return trial["ms"]


def replay_from_256(decoder, replays: int) -> None:
    """`replays` replays of the step's graph, from position 256 of the cache on."""
    decoder._position.fill_(256)
    decoder._set_length(256)
    for _ in range(replays):
        decoder._graph.replay()


def graph_kernel_profile(decoder, replays: int = 32) -> dict:
    """The kernels inside the step's graph, as CUPTI records them during replays from position
    256: device time per token by kernel, and their sum. The step's time less that sum is time
    the GPU spent between kernels (launch and dependency gaps, ramp-up and drain)."""
    import torch

    from benchmarks.gpu.profile_decode import kernel_times, kind_of

    def replay() -> None:
        replay_from_256(decoder, replays)
        torch.cuda.synchronize()

    replay()  # warm
    times = kernel_times(replay)
    by_kind: dict[str, float] = {}
    for name, (us, _) in times.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us / replays
    top = sorted(times.items(), key=lambda kv: -kv[1][0])[:10]
    return {
        "graph_kernel_us_per_token": sum(us for us, _ in times.values()) / replays,
        "graph_kernels_per_token": sum(calls for _, calls in times.values()) / replays,
        "graph_kernel_us_by_kind": by_kind,
        "graph_kernel_top": [
            {"kernel": name[:100], "us_per_token": us / replays, "calls_per_token": calls / replays}
            for name, (us, calls) in top
        ],
    }


LAYER_ROLES = ("qkv", "attention", "o", "gate_up", "down")


def layer_kernel_times(sequence: list[tuple[str, float]]) -> dict[str, list[float]]:
    """Each fused layer's five kernels found in a replay's kernel sequence ((name, us) in launch
    order): an attention kernel, the matvec before it (q/k/v) and the three after (o, gate/up,
    down). Durations by role, one entry a layer and replay."""
    roles: dict[str, list[float]] = {role: [] for role in LAYER_ROLES}
    for index, (name, us) in enumerate(sequence):
        if "attention_kernel" not in name or index == 0 or index + 3 >= len(sequence):
            continue
        around = [sequence[index - 1], *sequence[index + 1 : index + 4]]
        if not all("matvec_kernel" in kernel for kernel, _ in around):
            continue
        roles["attention"].append(us)
        for role, (_, took) in zip(("qkv", "o", "gate_up", "down"), around, strict=True):
            roles[role].append(took)
    return roles


def in_place_layer_times(decoder, replays: int = 8) -> dict:
    """Per role of a layer, the mean time of its kernel inside the replayed graph (after the
    layer's other kernels, as in a real step, where `matvec_times` runs one role's kernels back
    to back) and the read rate that gives; from CUPTI's per-kernel records."""
    import torch
    from torch.autograd import DeviceType

    from playground.backends.triton_kernels import NF4Weight

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        replay_from_256(decoder, replays)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    roles = layer_kernel_times([(e.name, e.time_range.elapsed_us()) for e in kernels])
    layer = decoder.model.model.layers[0]
    out = {}
    for role, times in roles.items():
        if not times:
            continue
        mean_us = sum(times) / len(times)
        row = {"us": mean_us, "count": len(times)}
        if role != "attention":
            weight = layer.projections[role].weight
            tensors = (*weight.packed, *weight.absmax) if isinstance(weight, NF4Weight) else (weight,)
            size = sum(t.numel() * t.element_size() for t in tensors)
            row["tb_s"] = size / (mean_us / 1e6) / 1e12
        out[role] = row
    return {"in_graph_layer_kernels": out}


def split_attention_agreement(model) -> dict:
    """The attention kernel with a head's slots shared over 8 programs against one program a
    head, on this model's head shape and a random cache (the picker's `attention_trial`), at
    positions 256 and 2000: the largest difference, and whether the counters came back to zero
    (the in-launch combine's contract)."""
    import torch

    from playground.backends.triton_kernels import AttentionConfig, attention_counters
    from playground.backends.triton_layers import attention_trial

    counters = attention_counters(model.config.num_attention_heads, "cuda")
    worst = 0.0
    for position in (256, 2000):
        run = attention_trial(model, (position,), counters)
        one, shared = (run(chosen).float() for chosen in (AttentionConfig(64, 4), AttentionConfig(32, 2, splits=8)))
        worst = max(worst, float((one - shared).abs().max()))
    torch.cuda.synchronize()
    return {"split_attention_max_diff": worst, "split_attention_counters_zero": not bool(counters.any())}


def fused_against_own_layers(decoder) -> dict:
    """One eager step at position 256, through the fused layers and then the model's own (bf16):
    the largest logit difference and whether the greedy choice agrees."""

    from playground.backends.triton_layers import remove_fused_layers

    logits = []
    for _ in range(2):
        decoder._position.fill_(256)
        decoder._set_length(256)  # the cache's own write counter, so both steps write slot 256
        decoder._token.fill_(17)
        logits.append(decoder._step().float().clone())
        remove_fused_layers(decoder.model)
    fused, own = logits
    return {
        "step_logits_max_diff": float((fused - own).abs().max()),
        "step_logits_scale": float(own.abs().max()),
        "step_greedy_agrees": bool(int(fused.argmax()) == int(own.argmax())),
    }


def measure(option: str, shape: str, replays: int) -> dict:
    """One option on one shape, in this process."""
    import torch

    with_folder = Path("/tmp")
    decoder = make_decoder(shape, "cuda", with_folder, nf4=option == "triton-layers-nf4")
    settings = OPTIONS[option]
    matvecs = {}
    if option.startswith("triton-layers"):
        from playground.backends.triton_layers import install_fused_layers

        tuning_started = time.perf_counter()
        install_fused_layers(
            decoder.model,
            triton_attention=option != "triton-layers-model-attention",
            pdl=option != "triton-layers-no-pdl",
        )
        configs = decoder.model.model.layers[0].configs  # one dict, shared by every layer
        if option == "triton-layers-pdl-all":
            configs.update({name: dataclasses.replace(config, pdl=True) for name, config in configs.items()})
        tuning_s = time.perf_counter() - tuning_started
        matvecs = {"tuning_s": tuning_s, "pdl_sequence_ms": pdl_sequence_times(decoder.model, configs)}
        matvecs.update(matvec_times(decoder.model))
        chosen = configs["attention"]
        matvecs["attention_config"] = (
            None if chosen is None else [chosen.block_t, chosen.num_warps, chosen.pdl, chosen.splits]
        )
    decoder._step_fn = torch.compile(
        decoder._step, dynamic=False, mode=settings.get("mode"), options=settings.get("options")
    )
    started = time.perf_counter()
    try:
        decoder.prepare(1024)
    except Exception as err:  # an option this torch lacks: say so, measure the rest
        return {"option": option, "shape": shape, "error": str(err).splitlines()[0][:300]}
    prepare_s = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in decoder.model.parameters())
    times = []
    for _ in range(3):
        decoder._position.fill_(256)
        decoder._set_length(256)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            decoder._graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    config = decoder.model.config
    kv_bytes = (
        config.num_hidden_layers
        * 2
        * config.num_key_value_heads
        * (config.hidden_size // config.num_attention_heads)
        * 2
        * (256 + replays / 2)
    )
    rate = copy_rate_bytes_per_s()
    bound_ms = (weights + kv_bytes) / rate * 1000
    best = min(times)
    try:
        kernels = graph_kernel_profile(decoder)
        kernels["graph_gap_us_per_token"] = best * 1000 - kernels["graph_kernel_us_per_token"]
    except Exception as err:  # a profiler that cannot see into graphs here: the step's time stands
        kernels = {"graph_kernel_profile_error": str(err).splitlines()[0][:300]}
    if option.startswith("triton-layers"):
        try:
            kernels |= in_place_layer_times(decoder)
        except Exception as err:
            kernels["in_graph_layer_kernels_error"] = str(err).splitlines()[0][:300]
    prefill = prefill_ms(decoder) if option in ("default", "triton-layers") else {}
    if option.startswith("triton-layers"):
        matvecs |= fused_against_own_layers(decoder) | split_attention_agreement(decoder.model)
    return {
        **prefill,
        **matvecs,
        **kernels,
        "option": option,
        "shape": shape,
        "ms_per_token": best,
        "runs_ms": times,
        "bound_ms": bound_ms,
        "share_of_bound": bound_ms / best,
        "copy_rate_tb_s": rate / 1e12,
        "compile_and_capture_s": prepare_s,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--shapes", default="smollm2-1.7b,smollm2-135m")
    parser.add_argument("--replays", type=int, default=256)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per option and shape")
    parser.add_argument("--budget", type=int, default=3600, help="no new run starts after this many seconds")
    parser.add_argument("--nf4-more", action="store_true", help="NF4: time more tensor-core and split variants")
    parser.add_argument("--one", nargs=2, metavar=("OPTION", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import torch

        with torch.inference_mode():  # as the app decodes: the decoder's buffers are inference tensors
            row = measure(*args.one, args.replays)
        print("RESULT " + json.dumps(row), flush=True)
        return
    rows = []
    begun = time.monotonic()
    for shape, option in [(s, o) for o in args.options.split(",") for s in args.shapes.split(",")]:
        if time.monotonic() - begun > args.budget:
            rows.append({"option": option, "shape": shape, "error": "not run: over the budget"})
            continue
        command = [sys.executable, "-m", "benchmarks.gpu.step_options", "--out", "-", "--one", option, shape]
        command += ["--replays", str(args.replays)]
        # a fresh cache: the picker times (tuning_s), as on a first load (`launch_shape_cache`)
        environment = dict(os.environ, PLAYGROUND_CACHE_DIR=tempfile.mkdtemp(prefix="step-options-cache-"))
        if args.nf4_more:
            environment["STEP_NF4_MORE"] = "1"
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=environment)
            found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(found[0]) if found else {"option": option, "shape": shape, "error": done.stderr[-600:]}
        except subprocess.TimeoutExpired:
            row = {"option": option, "shape": shape, "error": f"over {args.timeout} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
