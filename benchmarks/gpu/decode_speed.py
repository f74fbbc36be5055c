"""Batch-1 decode speed of every path, on random weights of the seed shapes (issue 7).

Per model, one run: every path is loaded in its own worker, as the app loads it, then the paths are
timed one after another on the same 256-token prompts, so their ratios hold on a noisy machine.
Paths: plain `generate` (bf16), our fast path (bf16), bitsandbytes NF4 and int8 through whatever
path the backend picks for them (`nf4-dq`: NF4 with double quant; `nf4-int8-head`: NF4 with the
embedding and head in int8, `quantization.head`; `int8-t0`: int8 without the outlier split), and
llama.cpp with CUDA on an F16 GGUF of the same weights, with flash attention (its tools' default
on a GPU) and, as `llamacpp-nofa`, without.
The figures are the app's own per-reply metrics (time to first token, decode tokens/s, the worker's
peak allocated GPU memory) plus nvml's view of each worker's memory.

The bound: batch-1 decoding reads every weight once per token (an untied input embedding only a
row), plus the KV cache so far; bytes / measured copy bandwidth is the fastest any engine can go.
Speed does not depend on weight values, so random weights stand in for the checkpoints; a token
id whose head row is zero serves as end of sequence, so no path stops early.

On the lent GPU (benchmarks/gpu/README.md):
  BUILD_LLAMA=1 bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.gpu.decode_speed --out $OUT/decode.json
Dry run on a CPU (tiny shapes, CPU paths only): python -m benchmarks.gpu.decode_speed --tiny --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from playground.catalogue import Catalogue
from playground.config import parse_config
from playground.engine import Engine
from playground.workers import Finished, TextDelta

PROMPT_TOKENS = 256

# torch is imported inside the functions that use it, never at this module's top: the engine's
# workers are spawned, so each re-imports this module as its main, and a llama.cpp worker whose
# process has loaded torch's CUDA libraries dies with SIGSEGV when llama.cpp starts on the GPU
# (benchmarks/gpu/llamacpp_probe.py narrows it down).


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str  # llama or qwen2
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    rope_theta: float
    note: str = ""

    def n_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        bias = self.head_dim * (self.heads + 2 * self.kv_heads) if self.arch == "qwen2" else 0
        per_layer = attn + bias + 3 * self.hidden * self.ffn + 2 * self.hidden
        embed = self.vocab * self.hidden
        return self.layers * per_layer + embed * (1 if self.tied else 2) + self.hidden

    def bytes_per_token(self, context: int, weight_bytes: float = 2.0) -> float:
        """Bytes a batch-1 decode step must read: every weight (an untied input embedding: one
        row) and the K and V of `context` earlier positions, in bf16."""
        weights = self.n_params() - (0 if self.tied else self.vocab * self.hidden)
        kv = self.layers * 2 * self.kv_heads * self.head_dim * 2 * context
        return weights * weight_bytes + kv


SHAPES = {
    "smollm2-135m": Shape("smollm2-135m", "llama", 576, 30, 9, 3, 64, 1536, 49152, True, 100_000.0),
    "smollm2-1.7b": Shape("smollm2-1.7b", "llama", 2048, 24, 32, 32, 64, 8192, 49152, True, 130_000.0),
    "auto-g-nano-1b": Shape("auto-g-nano-1b", "llama", 1792, 24, 14, 2, 128, 5376, 50257, False, 500_000.0),
    "qwen2.5-3b": Shape("qwen2.5-3b", "qwen2", 2048, 36, 16, 2, 128, 11008, 151936, True, 1_000_000.0),
    "0.5b": Shape(
        "0.5b", "qwen2", 896, 24, 14, 2, 64, 4864, 151936, True, 1_000_000.0,
        note="Qwen2.5-0.5B's shape: npc-nano-0.5b's card gives 501M parameters but not its layout",
    ),
}  # fmt: skip
TINY = Shape("tiny", "llama", 64, 2, 4, 2, 16, 128, 600, True, 10_000.0)
PATHS = ["generate", "fast", "nf4", "nf4-dq", "nf4-int8-head", "int8", "int8-t0", "llamacpp", "llamacpp-nofa"]


# -- model files ---------------------------------------------------------------------------------
def filler_tokenizer(vocab_size: int) -> Any:
    """A byte-level tokenizer with one unused merge: every byte of a prompt is one token in both
    transformers and llama.cpp, so a prompt of N ASCII characters is N tokens in every path.
    The last id is the end of sequence; the rest are fillers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(vocab), vocab_size - 1):
        vocab[f"<f{i}>"] = i
    eos = "<|end|>"
    vocab[eos] = vocab_size - 1
    # llama.cpp refuses a BPE vocabulary without merges: one that the prompts never use.
    del vocab[f"<f{len(alphabet)}>"]
    vocab["{}"] = len(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("{", "}")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([eos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


def make_model(shape: Shape, folder: Path, device: str, output_scale: float = 1.0) -> Any:
    """Random bf16 weights of `shape`, saved as an HF folder with the filler tokenizer; each
    layer's output projections (o, down) times `output_scale` where it is not 1."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    eos = shape.vocab - 1
    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=4096,
        tie_word_embeddings=shape.tied,
        rope_theta=shape.rope_theta,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=None,
    )
    config = LlamaConfig(**common) if shape.arch == "llama" else Qwen2Config(**common)
    import torch

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # the end-of-sequence logit is 0 while the others spread around it
        model.get_output_embeddings().weight[eos].zero_()
        if output_scale != 1.0:
            for name, parameter in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    parameter.mul_(output_scale)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    filler_tokenizer(shape.vocab).save_pretrained(folder)
    return model


def write_f16_gguf(model: Any, path: Path) -> Path:
    from playground.gguf_export import write_gguf

    # The filler tokenizer itself: read back from a Qwen2 folder, transformers gives it Qwen2's
    # default <|endoftext|> as one token more than the model has rows, which no GGUF can hold.
    tokenizer = filler_tokenizer(model.config.vocab_size)
    return write_gguf(model, tokenizer, path, dtype="f16", name=path.stem)


# -- the machine ---------------------------------------------------------------------------------
def copy_bandwidth_in_child() -> float:
    """`copy_bandwidth` measured in a child process, so this one never touches CUDA (see --weights-on)."""
    code = "from benchmarks.gpu.decode_speed import copy_bandwidth; print(copy_bandwidth())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    import torch

    src = torch.randn(2**28, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates = []
    for _ in range(5):
        start.record()
        for _ in range(10):
            dst.copy_(src)
        end.record()
        end.synchronize()
        rates.append(2 * src.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3))
    del src, dst
    torch.cuda.empty_cache()
    return statistics.median(rates)


# -- paths ---------------------------------------------------------------------------------------
def variant_for(path: str, shape: Shape, folder: Path, gguf: Path | None, device: str) -> dict[str, Any]:
    base = {
        "id": f"{shape.name}-{path}",
        "display_name": f"{shape.name} {path}",
        "backend": "transformers",
        "source": {"path": str(folder)},
        "dtype": "bf16",
        "device": device,
        "prompt_format": "raw",
        "context_length": 1024,
    }
    if path == "generate":
        return base | {"fast_decode": "off"}
    # On a CPU (the dry run) the static cache must be asked for; on a GPU it is the default.
    fast = {"fast_decode": "on"} if device == "cpu" else {}
    if path == "fast":
        return base | fast
    if path == "fast-fp32":
        return base | fast | {"dtype": "fp32", "id": f"{shape.name}-fast-fp32"}
    if path == "generate-fp32":
        return base | {"dtype": "fp32", "fast_decode": "off", "id": f"{shape.name}-generate-fp32"}
    if path in ("nf4", "int8"):
        return base | {"quantization": {"method": path}}
    if path == "nf4-int8-head":
        return base | {"quantization": {"method": "nf4", "head": "int8"}}
    if path == "nf4-dq":  # NF4 with its per-block scales quantized too (bitsandbytes' double quant)
        return base | {"quantization": {"method": "nf4", "double_quant": True}}
    if path == "int8-t0":  # int8 without the outlier split, so the step can be captured
        return base | {"quantization": {"method": "int8", "int8_outlier_threshold": 0}}
    if path in ("llamacpp", "llamacpp-nofa"):
        assert gguf is not None
        flash = {"llamacpp": {"flash_attn": "off"}} if path == "llamacpp-nofa" else {}
        return base | {"backend": "llamacpp", "source": {"path": str(gguf)}, "dtype": "auto"} | flash
    raise ValueError(path)


def one_reply(engine: Engine, variant_id: str, prompt: str, new_tokens: int) -> tuple[dict[str, Any], list[str]]:
    request = engine.request(variant_id, prompt=prompt, mode="completion", temperature=0.0, max_new_tokens=new_tokens)
    pieces, finished = [], None
    for event in engine.generate(variant_id, request):
        if isinstance(event, TextDelta):
            pieces.extend([event.text] * event.n_tokens)
        elif isinstance(event, Finished):
            finished = event
    if finished is None:
        raise RuntimeError(f"{variant_id}: no reply")
    return finished.metrics.to_dict(), pieces


def gpu_memory_of(engine: Engine, variant_id: str) -> int | None:
    from playground.monitor import SystemMonitor

    return SystemMonitor(engine).sample_now().variant_gpu.get(variant_id)


def measure(engine: Engine, variant_id: str, prompt: str, new_tokens: int, runs: int) -> dict[str, Any]:
    # Each reply's prompt starts with a letter of its own: llama.cpp reuses the cache of a prompt
    # that starts as the previous one did, which would time a one-token prefill as the prompt's.
    one_reply(engine, variant_id, "z" + prompt[1:], 8)  # warm-up: first-call costs stay out of the figures
    replies = [
        one_reply(engine, variant_id, string.ascii_lowercase[run] + prompt[1:], new_tokens) for run in range(runs)
    ]
    metrics = [m for m, _ in replies]
    return {
        "runs": metrics,
        "decode_tok_s": statistics.median(m["decode_tok_s"] for m in metrics),
        "ttft_s": statistics.median(m["ttft_s"] for m in metrics),
        "prompt_tokens": metrics[0]["prompt_tokens"],
        "completion_tokens": [m["completion_tokens"] for m in metrics],
        "gpu_allocated_peak_bytes": max((m["gpu_allocated_peak_bytes"] or 0) for m in metrics) or None,
        "worker_gpu_bytes": gpu_memory_of(engine, variant_id),
        "tokens": replies[0][1],  # the first reply's prompt is the same in every path
    }


def leading_agreement(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def bench_model(shape: Shape, paths: list[str], args: argparse.Namespace, bandwidth: float | None) -> dict[str, Any]:
    device = "cpu" if args.tiny else "cuda"
    work = Path(tempfile.mkdtemp(prefix=f"bench-{shape.name}-", dir=args.work_dir))
    folder = work / "hf"
    started = time.perf_counter()
    model = make_model(shape, folder, "cpu" if args.tiny else args.weights_on)
    gguf = None
    engine = Engine(Catalogue([work]))
    result: dict[str, Any] = {"shape": asdict(shape), "n_params": shape.n_params(), "paths": {}, "errors": {}}
    try:
        wanted = list(paths) + (["generate-fp32", "fast-fp32"] if shape.name in args.fp32_check else [])
        # Every path loads in its own worker at once; the GGUF is written meanwhile.
        llama_paths = [p for p in wanted if p.startswith("llamacpp")]
        for path in [p for p in wanted if p not in llama_paths]:
            engine.catalogue.add(parse_config(variant_for(path, shape, folder, None, device), origin=path))
            engine.start_load(f"{shape.name}-{path}", check_memory=False)
        if llama_paths:
            gguf = write_f16_gguf(model.to("cpu").float(), work / f"{shape.name}-f16.gguf")
            for path in llama_paths:
                engine.catalogue.add(parse_config(variant_for(path, shape, folder, gguf, device), origin=path))
                engine.start_load(f"{shape.name}-{path}", check_memory=False)
        del model
        result["prepare_s"] = time.perf_counter() - started
        # Every load finishes before any path is timed: a worker still loading (timing its
        # kernels' launch shapes, llama.cpp reading its GGUF) takes the GPU from the one timed.
        # (It did: on 2026-12-01 the 1.7B's fast path ran at 309-439 tok/s while NF4 loaded.)
        infos = {}
        for path in wanted:
            try:
                infos[path] = engine.load(f"{shape.name}-{path}", check_memory=False, timeout_s=600)
            except Exception as err:  # a path that cannot load here is written down, not fatal
                result["errors"][path] = f"{err.__class__.__name__}: {err}"
                print(f"  {path}: did not load: {err}", flush=True)
        result["load_all_s"] = time.perf_counter() - started
        for path, info in infos.items():
            variant_id = f"{shape.name}-{path}"
            slow = path in ("generate", "int8", "generate-fp32")
            new_tokens = args.slow_tokens if slow else args.new_tokens
            runs = args.slow_runs if slow else args.runs
            try:
                figures = measure(engine, variant_id, args.prompt, new_tokens, runs)
            except Exception as err:
                result["errors"][path] = f"{err.__class__.__name__}: {err}"
                print(f"  {path}: failed: {err}", flush=True)
                continue
            finally:
                engine.unload(variant_id)
            figures.update(
                decode=info.decode,
                dtype=info.dtype,
                device=info.device,
                load_s=info.load_s,
                weights_bytes=info.weights_bytes,
                new_tokens=new_tokens,
            )
            if bandwidth:
                # The model's bound is bf16's (the issue's definition); a quantized path also gets
                # its own, from the weight bytes it really holds (less an untied embedding's rows).
                mean_context = figures["prompt_tokens"] + new_tokens / 2
                bound = bandwidth / shape.bytes_per_token(mean_context)
                figures["bound_tok_s"] = bound
                figures["share_of_bound"] = figures["decode_tok_s"] / bound
                quantized = ("nf4", "nf4-dq", "nf4-int8-head", "int8", "int8-t0", "llamacpp", "llamacpp-nofa")
                if path in quantized and info.weights_bytes:
                    row_bytes = 1 if path == "nf4-int8-head" else 2
                    untied = 0 if shape.tied else shape.vocab * shape.hidden * row_bytes
                    kv = shape.bytes_per_token(mean_context) - shape.bytes_per_token(0)
                    own = bandwidth / (info.weights_bytes - untied + kv)
                    figures["own_bound_tok_s"] = own
                    figures["share_of_own_bound"] = figures["decode_tok_s"] / own
            result["paths"][path] = figures
            print(
                f"  {path:>13}: {figures['decode_tok_s']:8.1f} tok/s  ttft {figures['ttft_s'] * 1e3:7.1f} ms  "
                f"weights {(figures['weights_bytes'] or 0) / 2**20:8.1f} MiB  [{info.decode or info.dtype}]",
                flush=True,
            )
    finally:
        engine.shutdown()
        if not args.keep_files:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    tokens = {p: f.pop("tokens") for p, f in result["paths"].items()}
    for a, b in [("fast", "generate"), ("fast-fp32", "generate-fp32")]:
        if a in tokens and b in tokens:
            n = min(len(tokens[a]), len(tokens[b]))
            result[f"greedy_agreement_{a}_vs_{b}"] = {
                "compared": n,
                "leading_equal": leading_agreement(tokens[a], tokens[b]),
            }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slow-tokens", type=int, default=48, help="for plain generate and int8")
    parser.add_argument("--slow-runs", type=int, default=2)
    parser.add_argument("--fp32-check", default="smollm2-135m", help="models also decoded in fp32, both paths")
    parser.add_argument("--tiny", action="store_true", help="a CPU dry run on a tiny shape")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--keep-files", action="store_true")
    parser.add_argument(
        "--weights-on",
        choices=["cuda", "cpu"],
        default="cuda",
        help="where this process makes the random weights; cpu keeps it off CUDA altogether (the "
        "copy bandwidth is then measured in a child), to tell whether a CUDA context in the parent "
        "is what kills llama.cpp's workers",
    )
    args = parser.parse_args(argv)
    # Every variant times its launch shapes as a first load does (load_s), none reads an earlier
    # run's picks (`launch_shape_cache`); its workers inherit this.
    os.environ["PLAYGROUND_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-cache-", dir=args.work_dir)
    args.fp32_check = set(filter(None, args.fp32_check.split(",")))
    random.seed(0)
    words = ["".join(random.choices(string.ascii_lowercase, k=7)) for _ in range(PROMPT_TOKENS // 8)]
    args.prompt = " ".join(words) + " " * (PROMPT_TOKENS - len(" ".join(words)))
    assert len(args.prompt) == PROMPT_TOKENS
    paths = args.paths.split(",")
    if args.tiny:
        shapes = [TINY]
        paths = [p for p in paths if p in ("generate", "fast") or p.startswith("llamacpp")]
        args.fp32_check = {"tiny"}
        bandwidth = None
    else:
        shapes = [SHAPES[name] for name in args.models.split(",")]
        bandwidth = copy_bandwidth() if args.weights_on == "cuda" else copy_bandwidth_in_child()
        print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s", flush=True)
    import torch

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "copy_bandwidth_bytes_s": bandwidth,
        "prompt_tokens": PROMPT_TOKENS,
        "models": {},
    }
    try:
        import transformers

        report["transformers"] = transformers.__version__
        import llama_cpp

        report["llama_cpp_python"] = getattr(llama_cpp, "__version__", None)
    except ImportError:
        pass
    for shape in shapes:
        print(f"{shape.name}: {shape.n_params() / 1e9:.3f} B parameters", flush=True)
        started = time.perf_counter()
        report["models"][shape.name] = bench_model(shape, paths, args, bandwidth)
        report["models"][shape.name]["bench_s"] = time.perf_counter() - started
        print(f"{shape.name}: done in {time.perf_counter() - started:.0f} s", flush=True)
        args.out.write_text(json.dumps(report, indent=1))  # after every model: a cut-off run keeps its part
    print_table(report)
    return 0


def print_table(report: dict[str, Any]) -> None:
    print("\nmodel            path           tok/s   share   own  ttft ms  weights MiB  peak alloc MiB  nvml MiB")
    for name, model in report["models"].items():
        for path, f in model["paths"].items():
            share, own = f.get("share_of_bound"), f.get("share_of_own_bound")
            print(
                f"{name:<16} {path:<13} {f['decode_tok_s']:7.1f} {'' if share is None else f'{share:6.1%}':>7} "
                f"{'' if own is None else f'{own:5.0%}':>5} "
                f"{f['ttft_s'] * 1e3:8.1f} {(f['weights_bytes'] or 0) / 2**20:12.1f} "
                f"{(f['gpu_allocated_peak_bytes'] or 0) / 2**20:15.1f} {(f['worker_gpu_bytes'] or 0) / 2**20:9.1f}"
            )
        for key, value in model.items():
            if key.startswith("greedy_agreement"):
                print(f"{name:<16} {key}: {value['leading_equal']}/{value['compared']} leading tokens equal")
        for path, err in model["errors"].items():
            print(f"{name:<16} {path:<13} ERROR {err[:150]}")


if __name__ == "__main__":
    raise SystemExit(main())
