"""The NPC Fast card's router recipe on the embedded 135M, as the app runs it: three real jobs.

1. eval-router on the untrained transformers twin (OOD and in-distribution),
2. lora-router with the card's recipe (rank 32, 3 epochs, 189 steps on the 500 pairs),
3. eval-router on the variant the fine-tune made.

    .venv/bin/python -m benchmarks.router_lora --out benchmarks/results/router_lora.json

Jobs, their logs and the new variant go under PLAYGROUND_DATA_DIR (default: a folder in /tmp).

Where the embedded package is not installed (the lent GPU: its GGUF is larger than what travels
there), `--random-base TOKENIZER_DIR` trains random weights of the same shape with SmolLM2's
tokenizer instead: the time is the real one, the accuracy means nothing.
    bash benchmarks/gpu/run_on_device.sh python3 -m benchmarks.router_lora --skip-before --after "" \
      --random-base .gpukit/smollm2-tokenizer --out $OUT/router_lora_gpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASE = "smollm2-135m-router-transformers"


def random_base(tokenizer_dir: Path) -> str:
    """A variant of the base's config and shape (SmolLM2-135M) with random weights and the
    tokenizer saved in `tokenizer_dir`, written where the jobs find the variants they made."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from playground.paths import made_configs_dir

    folder = made_configs_dir().parent / "random-smollm2-135m"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100_000.0, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "model_configs" / f"{BASE}.yaml").read_text())
    spec.update(id="random-smollm2-135m-router", display_name="random SmolLM2-135M router", source={"path": str(folder)})
    made_configs_dir().mkdir(parents=True, exist_ok=True)
    (made_configs_dir() / "random-smollm2-135m-router.yaml").write_text(yaml.safe_dump(spec))
    return spec["id"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="lora-router option")
    parser.add_argument("--skip-before", action="store_true", help="no eval of the untrained router (timing runs)")
    parser.add_argument("--before", default="ood,in_distribution", help="data sets the untrained router is scored on")
    parser.add_argument("--after", default="ood,in_distribution", help="data sets the trained router is scored on")
    parser.add_argument("--no-reason", action="store_true", help="evals route only (no written answers, no JSON validity)")
    parser.add_argument("--random-base", type=Path, metavar="TOKENIZER_DIR", help="random weights of the base's shape")
    args = parser.parse_args()
    from benchmarks.job_runner import job_runner

    run, results = job_runner("router-lora-")
    base = random_base(args.random_base) if args.random_base else BASE

    for data in () if args.skip_before else filter(None, args.before.split(",")):
        results[f"before_{data}"] = run("eval-router", {"model": base, "data": data, "explain": not args.no_reason})
    options = {"model": base, "name": "smollm2-135m-router-lora"}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1] in "0123456789[-" or value in ("true", "false") else value
    results["finetune"] = run("lora-router", options)
    for data in filter(None, args.after.split(",")):
        results[f"after_{data}"] = run("eval-router", {"model": options["name"], "data": data, "explain": not args.no_reason})
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
