"""Check the monitor's VRAM figures against nvidia-smi on a real GPU.

Loads a random-weight model of the SmolLM2-135M shape through the engine on CUDA (its own
worker), then reads the monitor's sample and nvidia-smi at the same moments, five times.

    python benchmarks/gpu/monitor_vs_smi.py --out $OUT/monitor_vs_smi.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from playground.catalogue import Catalogue  # noqa: E402
from playground.config import parse_config  # noqa: E402
from playground.engine import Engine  # noqa: E402
from playground.monitor import SystemMonitor  # noqa: E402


def smi() -> tuple[int, dict[int, int]]:
    total = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    apps = (
        subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    per_pid = {int(p): int(m) for p, m in (line.split(",") for line in apps if line.strip())}
    return int(total), per_pid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch
    from factories import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.mkdtemp()) / "smollm2-135m-shape"
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    engine = Engine(Catalogue())
    engine.catalogue.add(
        parse_config(
            {
                "id": "shape-135m",
                "display_name": "135M shape",
                "backend": "transformers",
                "source": {"path": str(folder)},
                "device": "cuda",
                "dtype": "bf16",
            },
            "monitor check",
        )
    )
    engine.load("shape-135m")
    monitor = SystemMonitor(engine)
    rows = []
    for _ in range(5):
        sample = monitor.sample_now()
        total_smi, per_pid = smi()
        worker_pid = engine.workers["shape-135m"].pid
        rows.append(
            {
                "monitor_gpu_used_mib": sample.gpus[0].used_bytes / 2**20,
                "smi_gpu_used_mib": total_smi,
                "monitor_worker_mib": sample.variant_gpu.get("shape-135m", 0) / 2**20,
                "smi_worker_mib": per_pid.get(worker_pid),
            }
        )
        time.sleep(1)
    engine.shutdown()
    diffs = [abs(r["monitor_gpu_used_mib"] - r["smi_gpu_used_mib"]) for r in rows]
    report = {
        "rows": rows,
        "max_abs_diff_total_mib": max(diffs),
        "max_abs_diff_worker_mib": max(abs(r["monitor_worker_mib"] - (r["smi_worker_mib"] or 0)) for r in rows),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
