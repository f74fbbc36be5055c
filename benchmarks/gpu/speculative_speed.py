"""Speculative decoding's speed on the GPU as a function of how many drafts are kept (issue 20).

The target loads through the transformers backend as a variant does (`--paths fast,nf4`: bf16 on
the fast path with its Triton layers, or NF4), so a plain step and a pass of drafts cost here
what they cost in the app. Speed does not depend on weight values, but acceptance does: random
weights of the seed shapes cannot show how often a real draft is right. So the drafts come from
an oracle that knows the target's own greedy continuation (made first by plain decoding) and
spoils each drafted token with probability 1 - `p`: the pass costs what a real pass costs, and
the acceptance is set. The real acceptance of each drafter comes from the CPU benchmark on real
weights (benchmarks/speculative.py: prompt lookup kept 53–80% of its drafts there). Also timed:
a draft model's step (the 135M shape, also through the backend) beside the target's.

Reported per (path, drafted a pass, p): decode tok/s against plain decoding on the same
decoder, the tokens a pass gives, the milliseconds a pass takes (tokens a pass / tok/s: the
drafter, the pass and its read-back together), the tokens the pacer decoded plainly because
drafting did not pay, and whether the reply equals the plain one (it must: a spoiled draft is
rejected, the target's own token kept).

`--trace` replays real text instead of a fixed chance (benchmarks/lookup_trace.py): prompt
lookup's outcome at each position of the embedded 135M's greedy replies to six grounded prompts,
so how many drafts a pass has, how many are right and where the pacer pauses follow what the
app's drafter did on that text; each reply against plain decoding of the same prompt and reply
length. The 1.7B's own replies would differ from the 135M's: this is the nearest stand-in here.

On the lent GPU:
  bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.gpu.speculative_speed --out $OUT/speculative_gpu.json
Check on a CPU: python -m benchmarks.gpu.speculative_speed --tiny --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.gpu.decode_speed import SHAPES, TINY, Shape, make_model, variant_for

PROMPT_TOKENS = 256
# The layers' output projections are scaled by this, so the residual stream stays close to the
# input embedding and the tied head's choice (the input token again) wins by a wide margin. A
# random model's top two logits are near ties, and in bf16 a batched pass rounds differently
# from a single step, so its greedy continuation would not be reproducible from one decode path
# to the other: the oracle's drafts would all be rejected (seen on the H200). The values change
# nothing in what a step or a pass costs.
OUTPUT_SCALE = 1e-3


def make_target(shape: Shape, folder: Path, device: str) -> None:
    """decode_speed's random model of `shape`, with a wide greedy margin (OUTPUT_SCALE), saved
    in `folder` for the backend to load."""
    import torch

    make_model(shape, folder, device, output_scale=OUTPUT_SCALE)  # written, then dropped
    if device == "cuda":
        torch.cuda.empty_cache()


def filler_prompt(vocab: int, length: int = PROMPT_TOKENS) -> list[int]:
    """A prompt of spread ids, never the end token (decode_speed's: the last)."""
    return [(i * 7919) % (vocab - 1) for i in range(length)]


# A path with this suffix loads as the path before it, with its passes of drafts kept on the
# model's own layers (cuBLAS), not the Triton rows kernel: the same run's comparison.
OWN_PASSES = "-own-passes"


def load_backend(path: str, shape: Shape, folder: Path, device: str) -> Any:
    """The model in `folder` loaded as the `path` variant (decode_speed.variant_for) is; a path
    ending in OWN_PASSES with the rows kernel left out, its launch shapes timed afresh in a
    cache folder of its own (so it takes no picks with the rows kernel in, and leaves none
    without it for the next load)."""
    import os
    from unittest import mock

    from playground.backends import triton_layers
    from playground.backends.transformers_backend import TransformersBackend
    from playground.config import parse_config

    own_passes = path.endswith(OWN_PASSES)
    base = path.removesuffix(OWN_PASSES)
    config = parse_config(variant_for(base, shape, folder, None, device), f"speculative_speed {shape.name} {path}")
    backend = TransformersBackend(config)
    with contextlib.ExitStack() as patches:
        if own_passes:
            cache = patches.enter_context(tempfile.TemporaryDirectory())
            patches.enter_context(mock.patch.dict(os.environ, {"PLAYGROUND_CACHE_DIR": cache}))
            left_out = dict.fromkeys(triton_layers.ROWS_PICKS.values())
            patches.enter_context(mock.patch.object(triton_layers, "_pick_rows_configs", lambda *_, **__: left_out))
        backend.load()
    return backend


class OracleDrafter:
    """Drafts the target's own greedy continuation, each token spoiled with probability 1 - p."""

    def __init__(self, prompt_len: int, reference: list[int], p: float, vocab: int, seed: int = 0) -> None:
        self.prompt_len, self.reference, self.p, self.vocab = prompt_len, reference, p, vocab
        self.random = random.Random(seed)

    def begin(self, capacity: int) -> None:
        return None

    def propose(self, history: list[int], count: int) -> list[int]:
        start = len(history) - self.prompt_len
        drafted = self.reference[start : start + count]
        return [t if self.random.random() < self.p else (t + 1) % self.vocab for t in drafted]


class TraceDrafter:
    """Replays prompt lookup's outcomes on real text (benchmarks/lookup_trace.py): at reply
    position t it proposes as many drafts as the app's drafter proposed there on the 135M's
    real reply, the first as many as were right there the target's own tokens, the rest spoiled."""

    def __init__(self, prompt_len: int, reference: list[int], outcomes: list[list[int]], vocab: int) -> None:
        self.prompt_len, self.reference, self.outcomes, self.vocab = prompt_len, reference, outcomes, vocab

    def begin(self, capacity: int) -> None:
        return None

    def propose(self, history: list[int], count: int) -> list[int]:
        start = len(history) - self.prompt_len
        if start >= len(self.outcomes):
            return []
        proposed, right = self.outcomes[start]
        drafted = self.reference[start : start + min(proposed, count)]
        return [t if i < right else (t + 1) % self.vocab for i, t in enumerate(drafted)]


def decode_rate(tokens: Iterable[int]) -> tuple[list[int], float]:
    """The ids and the tok/s after the first (the first comes after the prefill)."""
    stamps, ids = [], []
    for token in tokens:
        ids.append(token)
        stamps.append(time.perf_counter())
    return ids, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def plain_rate(decoder: Any, prompt: Sequence[int], tokens: int, runs: int) -> tuple[list[int], float]:
    """Plain greedy decoding (pipelined, as replies decode): the first run's ids, the median
    tok/s of `runs` after two that compile, capture and settle."""
    from playground.config import GenerationParams

    params = GenerationParams(temperature=0.0, max_new_tokens=tokens)
    for _ in range(2):
        decode_rate(decoder.tokens(prompt, params, lambda: False))
    measured = [decode_rate(decoder.tokens(prompt, params, lambda: False)) for _ in range(runs)]
    return measured[0][0], statistics.median(rate for _, rate in measured)


def speculative_reply(
    decoder: Any, prompt: list[int], params: Any, drafter: Any, num_tokens: int, reference: list[int]
) -> tuple[float, Any, bool]:
    """One greedy reply with `drafter`'s drafts: its tok/s, its speculation stats, and whether
    it equals plain decoding's `reference`."""
    from playground.backends.base import SpeculationStats

    stats = SpeculationStats("benchmark")
    ids, rate = decode_rate(decoder.speculative_tokens(prompt, params, lambda: False, drafter, num_tokens, stats))
    return rate, stats, ids == reference


def speculative_rows(
    decoder: Any,
    prompt: list[int],
    reference: list[int],
    plain: float,
    vocab: int,
    drafted: Sequence[int],
    p_values: Sequence[float],
    seeds: int,
) -> list[dict[str, Any]]:
    from playground.config import GenerationParams

    params = GenerationParams(temperature=0.0, max_new_tokens=len(reference))
    rows = []
    for num_tokens in drafted:
        # a first reply of this pass length compiles and captures its pass
        speculative_reply(
            decoder, prompt, params, OracleDrafter(len(prompt), reference, 1.0, vocab), num_tokens, reference
        )
        for p in p_values:
            runs = [
                speculative_reply(
                    decoder,
                    prompt,
                    params,
                    OracleDrafter(len(prompt), reference, p, vocab, seed),
                    num_tokens,
                    reference,
                )
                for seed in range(seeds)
            ]
            rate = statistics.median(r for r, _, _ in runs)
            stats = runs[0][1]
            tokens_per_pass = (len(reference) - 1) / stats.passes
            rows.append(
                {
                    "drafted_per_pass": num_tokens,
                    "p_draft_right": p,
                    "spec_tok_s": rate,
                    "speedup": rate / plain,
                    "kept_rate": stats.accept_rate,
                    "tokens_per_pass": tokens_per_pass,
                    "ms_per_pass": 1000 * tokens_per_pass / rate,
                    "paused_tokens": stats.paused,
                    "equal_to_plain": all(same for _, _, same in runs),
                    "verify_pass": "graph"
                    if decoder._verify_graph is not None
                    else decoder.verify_graph_failure or "eager",
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def trace_rows(
    decoder: Any, vocab: int, traces: list[dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Each real-text trace replayed: a prompt of the trace's length, a reply of its length,
    drafts as prompt lookup drafted there; against plain decoding of the same length."""
    from playground.config import GenerationParams

    rows = []
    for index, trace in enumerate(traces):
        tokens = min(trace["reply_tokens"], args.tokens)
        if tokens < 2:
            continue
        prompt = filler_prompt(vocab, trace["prompt_tokens"])
        reference, plain = plain_rate(decoder, prompt, tokens, args.runs)
        params = GenerationParams(temperature=0.0, max_new_tokens=tokens)
        for num_tokens in args.drafted:
            outcomes = trace["outcomes"].get(str(num_tokens))
            if outcomes is None:
                continue
            runs = [  # the first compiles and captures this prompt's pass
                speculative_reply(
                    decoder,
                    prompt,
                    params,
                    TraceDrafter(len(prompt), reference, outcomes, vocab),
                    num_tokens,
                    reference,
                )
                for _ in range(args.seeds + 1)
            ]
            timed = runs[1:]
            rate = statistics.median(r for r, _, _ in timed)
            stats = timed[0][1]
            rows.append(
                {
                    "trace": index,
                    "kind": trace["kind"],
                    "prompt_tokens": len(prompt),
                    "reply_tokens": tokens,
                    "drafted_per_pass": num_tokens,
                    "plain_tok_s": plain,
                    "spec_tok_s": rate,
                    "speedup": rate / plain,
                    "kept_rate": stats.accept_rate,
                    "tokens_per_pass": (tokens - 1) / stats.passes if stats.passes else None,
                    "paused_tokens": stats.paused,
                    "equal_to_plain": all(same for _, _, same in runs),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def trace_summary(rows: list[dict[str, Any]], drafted: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per draft count: the replies' median, least and greatest speed-up, and the pooled one
    (the time the replies took together, plainly over speculatively)."""
    summary = {}
    for num_tokens in drafted:
        chosen = [r for r in rows if r["drafted_per_pass"] == num_tokens]
        if chosen:
            speedups = [r["speedup"] for r in chosen]
            summary[str(num_tokens)] = {
                "median_speedup": statistics.median(speedups),
                "min_speedup": min(speedups),
                "max_speedup": max(speedups),
                "pooled_speedup": sum(r["reply_tokens"] / r["plain_tok_s"] for r in chosen)
                / sum(r["reply_tokens"] / r["spec_tok_s"] for r in chosen),
            }
    return summary


def measure_path(path: str, shape: Shape, folder: Path, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """Plain decoding, then the oracle rows, of one path of the target."""
    import torch

    started = time.perf_counter()
    backend = load_backend(path, shape, folder, device)
    try:
        decoder = backend.decoder
        if decoder is None:
            return {"error": f"no static-cache decoder: {backend.decode_path.describe()}"}
        prompt = filler_prompt(shape.vocab)
        reference, plain = plain_rate(decoder, prompt, args.tokens, args.runs)
        result: dict[str, Any] = {
            "decode": backend.decode_path.describe(),
            "load_s": time.perf_counter() - started,
            "plain_tok_s": plain,
            "plain_ms_per_token": 1000 / plain,
        }
        print(f"{shape.name} {path}: plain {plain:.1f} tok/s; {result['decode']}", flush=True)
        if args.p_values:
            result["rows"] = speculative_rows(
                decoder, prompt, reference, plain, shape.vocab, args.drafted, args.p_values, args.seeds
            )
        if args.traces:
            result["trace_rows"] = trace_rows(decoder, shape.vocab, args.traces, args)
            result["trace_summary"] = trace_summary(result["trace_rows"], args.drafted)
        return result
    finally:
        backend.unload()
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--paths",
        default="fast,nf4",
        help=f"decode_speed's paths (fast, nf4, nf4-int8-head, ...); a path{OWN_PASSES}: its passes on the model's own layers",
    )
    parser.add_argument("--target", default="smollm2-1.7b", choices=sorted(SHAPES))
    parser.add_argument(
        "--draft", default="smollm2-135m", help="the draft model's shape, whose step is timed ('' for none)"
    )
    parser.add_argument("--tokens", type=int, default=256, help="greedy tokens per reply")
    parser.add_argument("--runs", type=int, default=3, help="plain replies timed")
    parser.add_argument("--seeds", type=int, default=3, help="replies per row")
    parser.add_argument("--drafted", default="4,8", help="drafts a pass, comma-separated")
    parser.add_argument("--p", dest="p_values", default="0.5,0.7,0.8,0.9,1.0", help="chances a draft is right")
    parser.add_argument(
        "--trace",
        type=Path,
        help="benchmarks/lookup_trace.py's JSON: also replay prompt lookup's drafts on real text ('--p \"\"' for these alone)",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script")
    args = parser.parse_args(argv)
    args.drafted = [int(n) for n in args.drafted.split(",")]
    args.p_values = [float(p) for p in args.p_values.split(",") if p]
    args.traces = json.loads(args.trace.read_text())["traces"] if args.trace else []

    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (--tiny checks the script on a CPU)")
    target = TINY if args.tiny else SHAPES[args.target]
    paths = args.paths.split(",")
    if args.tiny:  # bitsandbytes' NF4 needs the GPU
        paths = [path for path in paths if not path.startswith("nf4")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": commit,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "target": target.name,
        "prompt_tokens": PROMPT_TOKENS,
        "paths": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / target.name
        make_target(target, folder, device)
        for path in paths:
            try:
                report["paths"][path] = measure_path(path, target, folder, device, args)
            except Exception as err:  # one path's failure leaves the others' figures
                report["paths"][path] = {"error": f"{type(err).__name__}: {err}"}
            args.out.write_text(json.dumps(report, indent=1))  # a cut-off run keeps what it measured
        draft = TINY if args.tiny and args.draft else SHAPES.get(args.draft)
        if draft is not None:
            draft_folder = Path(tmp) / f"draft-{draft.name}"
            make_model(draft, draft_folder, device)
            backend = load_backend("fast", draft, draft_folder, device)
            try:
                prompt = filler_prompt(draft.vocab)
                _, rate = plain_rate(backend.decoder, prompt, min(args.tokens, 64), args.runs)
                report["draft"] = {
                    "shape": draft.name,
                    "step_ms": 1000 / rate,
                    "decode": backend.decode_path.describe(),
                }
            finally:
                backend.unload()
    args.out.write_text(json.dumps(report, indent=1))
    summary = {
        path: {k: v for k, v in result.items() if k not in ("rows", "trace_rows")}
        for path, result in report["paths"].items()
    }
    print(json.dumps({"paths": summary, "draft": report.get("draft")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
