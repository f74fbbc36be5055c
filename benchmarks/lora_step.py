"""Seconds per router-LoRA step on this machine, three ways: the plain padded pass on shuffled
batches; the shared-prefix pass (the system prompt once per batch) on the same batches; and the
shared-prefix pass on batches grouped by length (the job's default). The bundled router data,
with the job's own tokenizing, batching, LoRA settings and loss.

    .venv/bin/python -m benchmarks.lora_step --steps 4 --out benchmarks/results/lora_step_cpu.json

Each mode runs one warm-up step, then `--steps` timed steps; the modes alternate step by step so
a change in the machine's load falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-router-transformers")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from playground.catalogue import Catalogue
    from playground.jobs.lora import ROUTER_TRAIN, RouterLoraOptions, _tokenize, epoch_batches, read_router_rows
    from playground.jobs.training import causal_lm_loss, load_for_training, padded_batch, unlabelled_prefix_length

    options = RouterLoraOptions(model=args.model, batch_size=args.batch_size)
    catalogue = Catalogue.from_settings()
    backend = load_for_training(catalogue, args.model, args.device)
    spec = catalogue.get(args.model).router
    rows = read_router_rows(ROUTER_TRAIN, spec)
    examples, _, kept = _tokenize(backend, rows, options.max_length)
    routes = [json.loads(rows[i][1])["route"] for i in kept]
    model = get_peft_model(
        backend.model,
        LoraConfig(
            r=options.rank, lora_alpha=options.alpha, target_modules=options.target_modules, task_type="CAUSAL_LM"
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate)
    lengths = [len(ids) for ids, _ in examples]
    shuffled = epoch_batches(lengths, args.batch_size, random.Random(0), group_by_length=False)
    grouped = epoch_batches(lengths, args.batch_size, random.Random(0), group_by_length=True, strata=routes)
    pad = sorted(backend.codec.eos_ids)[0]

    def batch(indices: list[int]) -> tuple[dict, int]:
        rows = [examples[i] for i in indices]
        return padded_batch(rows, pad, backend.device), unlabelled_prefix_length(rows)

    def step(inputs: dict, shared: int) -> float:
        if backend.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = causal_lm_loss(model, inputs, shared)
        loss.backward()
        optimizer.zero_grad()  # no optimizer step: both modes see the same weights
        if backend.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    modes = {"plain": (shuffled, False), "shared_prefix": (shuffled, True), "shared_prefix_grouped": (grouped, True)}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    tokens = dict.fromkeys(modes, 0)
    for index in range(args.steps + 1):
        for mode, (batches, share) in modes.items():
            inputs, shared = batch(batches[index])
            prefix = shared if share else 0
            took = step(inputs, prefix)
            if index:  # the first step of each mode warms up
                seconds[mode].append(round(took, 3))
                rows, width = inputs["input_ids"].shape
                tokens[mode] += rows * width if not prefix else prefix + rows * (width - prefix)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {backend.device}",
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "batch_size": args.batch_size,
        "shared_prefix_tokens": unlabelled_prefix_length(examples),
        "examples": len(examples),
        "mean_example_tokens": round(statistics.mean(len(ids) for ids, _ in examples), 1),
        "seconds_per_step": seconds,
        "median_s": {mode: statistics.median(values) for mode, values in seconds.items()},
        "tokens_run_per_step": {mode: round(count / args.steps) for mode, count in tokens.items()},
        # Over a whole epoch, what each way of batching runs (a timed sample is a few batches).
        "tokens_per_epoch": {
            mode: sum(
                (len(b) * max(lengths[i] for i in b) - (len(b) - 1) * unlabelled_prefix_length([examples[i] for i in b]))
                if share
                else len(b) * max(lengths[i] for i in b)
                for b in batches
            )
            for mode, (batches, share) in modes.items()
        },
    }
    result["speedup"] = {mode: round(result["median_s"]["plain"] / result["median_s"][mode], 2) for mode in modes}
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
