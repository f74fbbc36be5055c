"""Speculative decoding's speed on the GPU as a function of how many drafts are kept (issue 20).

Speed does not depend on weight values, but acceptance does: random weights of the seed shapes
cannot show how often a real draft is right. So the drafts here come from an oracle that knows
the target's own greedy continuation (made first by plain decoding) and spoils each drafted
token with probability 1 - `p`: the pass costs what a real pass costs, and the acceptance is
set. The real acceptance of each drafter comes from the CPU benchmark on real weights
(benchmarks/speculative.py: prompt lookup kept 53–80% of its drafts there). Also timed: a draft
model's step (the 135M shape) beside the target's (the 1.7B shape), for what a draft-model
pass adds.

Reported per (p, drafted a pass): decode tok/s against plain decoding on the same decoder, the
tokens kept per pass, and whether the reply equals the plain one (it must: a spoiled draft is
rejected, the target's own token is kept).

On the lent GPU:
  bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.gpu.speculative_speed --out $OUT/speculative_gpu.json
Check on a CPU: python -m benchmarks.gpu.speculative_speed --tiny --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES = {
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    # Qwen2.5-3B's layers (grouped heads, head_dim 128) on SmolLM2's vocabulary: a stand-in for
    # step timings of the layer stack, not of the 3B's 151936-row head
    "qwen2.5-3b-layers": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
}  # fmt: skip


def make_decoder(shape: str, device: str, folder: Path, wide_margin: bool = False, nf4: bool = False) -> Any:
    """A random bf16 model of `shape` on `device` with the fast path's fused projections and
    static decoder (graph and compiled step on a GPU, eager on a CPU).

    `wide_margin`: each layer's output projections scaled by 1e-3, so the residual stream stays
    close to the input embedding and the tied head's choice (the input token again) wins by a
    wide margin. A random model's top two logits are near ties, and in bf16 a batched pass
    rounds differently from a single step, so its greedy continuation is not reproducible from
    one decode path to another: the oracle's drafts would all be rejected (seen on the H200).
    The values change nothing in what a pass costs.

    `nf4`: the model saved and loaded again through bitsandbytes NF4 (bf16 compute, as the
    shipped NF4 config), its projections left unfused, as the app loads an NF4 variant."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from playground.backends.fast_decode import StaticDecoder, fuse_projections

    config = LlamaConfig(
        vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=130_000.0, **SHAPES[shape]
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.eval()
    if wide_margin:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    parameter.mul_(1e-3)
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


class OracleDrafter:
    """Drafts the target's own greedy continuation, each token spoiled with probability 1 - p."""

    def __init__(self, prompt_len: int, reference: list[int], p: float, seed: int = 0) -> None:
        self.prompt_len, self.reference, self.p = prompt_len, reference, p
        self.random = random.Random(seed)

    def begin(self, capacity: int) -> None:
        return None

    def propose(self, history: list[int], count: int) -> list[int]:
        start = len(history) - self.prompt_len
        drafted = self.reference[start : start + count]
        return [t if self.random.random() < self.p else (t + 1) % 49152 for t in drafted]


def decode_rate(tokens: Any) -> tuple[list[int], float]:
    stamps, ids = [], []
    for token in tokens:
        ids.append(token)
        stamps.append(time.perf_counter())
    return ids, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def step_ms(decoder: Any, prompt: list[int], n: int = 64) -> float:
    """Milliseconds per plain greedy token (pipelined, as replies decode)."""
    from playground.config import GenerationParams

    _, rate = decode_rate(decoder.tokens(prompt, GenerationParams(temperature=0.0, max_new_tokens=n), lambda: False))
    return 1000 / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=256, help="greedy tokens per reply")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script")
    args = parser.parse_args()

    from playground.backends.base import SpeculationStats
    from playground.config import GenerationParams

    device = "cpu" if args.tiny else "cuda"
    target_shape = "tiny" if args.tiny else "smollm2-1.7b"
    params = GenerationParams(temperature=0.0, max_new_tokens=args.tokens)
    prompt = [(i * 7919) % 49152 for i in range(256)]  # a 256-token prompt, as in the decode runs
    with tempfile.TemporaryDirectory() as tmp:
        target = make_decoder(target_shape, device, Path(tmp), wide_margin=True)
        for _ in range(2):  # compile, capture, settle
            decode_rate(target.tokens(prompt, params, lambda: False))
        plain_runs = [decode_rate(target.tokens(prompt, params, lambda: False)) for _ in range(3)]
        reference = plain_runs[0][0]
        plain = statistics.median(rate for _, rate in plain_runs)
        rows = []
        for num_tokens in (4, 8):
            for p in (0.5, 0.7, 0.8, 0.9, 1.0):
                runs = []
                for seed in range(3):
                    stats = SpeculationStats("oracle")
                    drafter = OracleDrafter(len(prompt), reference, p, seed)
                    ids, rate = decode_rate(
                        target.speculative_tokens(prompt, params, lambda: False, drafter, num_tokens, stats)
                    )
                    runs.append((rate, stats, ids == reference))
                rate = statistics.median(r for r, _, _ in runs)
                stats = runs[0][1]
                rows.append(
                    {
                        "drafted_per_pass": num_tokens,
                        "p_draft_right": p,
                        "spec_tok_s": rate,
                        "speedup": rate / plain,
                        "kept_rate": stats.accept_rate,
                        "tokens_per_pass": (len(reference) - 1) / stats.passes,
                        "equal_to_plain": all(same for _, _, same in runs),
                        "verify_pass": "graph"
                        if target._verify_graph is not None
                        else target.verify_graph_failure or "eager",
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        draft_shape = "tiny" if args.tiny else "smollm2-135m"
        draft = make_decoder(draft_shape, device, Path(tmp))
        step_ms(draft, prompt)  # compile, capture
        timing = {"target_step_ms": 1000 / plain, "draft_step_ms": step_ms(draft, prompt)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "commit": commit,
        "target": target_shape,
        "draft": draft_shape,
        "plain_tok_s": plain,
        **timing,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


if __name__ == "__main__":
    main()
