"""The LM head alone on the GPU: cuBLAS reading bf16 rows against the int8 head's Triton matvec
(`quantization.head: int8`), in the launch shape the load would time, for the seed shapes' heads.

    python3 -m benchmarks.gpu.int8_head_speed --out $OUT/int8_head.json

Random rows (speed does not depend on their values); each figure is `do_bench_cudagraph`'s, one
head call a replay, as a decode step replays it.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from playground.backends.int8_head import Int8Head, Int8Rows
from playground.backends.triton_kernels import fused_matvec
from playground.backends.triton_layers import _time_int8_head

HEADS = {"smollm2-1.7b": (49152, 2048), "qwen2.5-3b": (151936, 2048), "smollm2-135m": (49152, 576)}


class _HeadOnly(torch.nn.Module):
    """What `_time_int8_head` asks of a model: its output embeddings."""

    def __init__(self, head: Int8Head) -> None:
        super().__init__()
        self.head = head

    def get_output_embeddings(self) -> Int8Head:
        return self.head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name()}
    for name, (vocab, width) in HEADS.items():
        weight = torch.randn(vocab, width, dtype=torch.bfloat16, device="cuda")
        head = Int8Head(Int8Rows(weight))
        x = torch.randn(width, dtype=torch.bfloat16, device="cuda")
        started = time.perf_counter()
        _time_int8_head(_HeadOnly(head))
        timing_s = time.perf_counter() - started
        rows, absmax = head.table.rows, head.table.absmax
        int8_ms = do_bench_cudagraph(functools.partial(fused_matvec, x, rows, head.config, row_absmax=absmax))
        bf16_ms = do_bench_cudagraph(functools.partial(torch.nn.functional.linear, x, weight))
        got = fused_matvec(x, rows, head.config, row_absmax=absmax).float()
        expected = head.table.dequantized(slice(None)).float() @ x.float()
        result[name] = {
            "int8_us": int8_ms * 1000,
            "bf16_cublas_us": bf16_ms * 1000,
            "int8_tb_s": (rows.numel() + absmax.numel() * 4) / (int8_ms / 1000) / 1e12,
            "bf16_tb_s": weight.numel() * 2 / (bf16_ms / 1000) / 1e12,
            "config": [head.config.block_n, head.config.block_k, head.config.num_warps],
            "ahead": head.config.ahead,
            "stages": head.config.stages,
            "timing_s": timing_s,
            "max_abs_diff_vs_dequantized": float((got - expected).abs().max()),
            "logit_scale": float(expected.abs().max()),
        }
        print(name, json.dumps(result[name]), flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
