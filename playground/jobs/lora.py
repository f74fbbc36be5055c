"""LoRA supervised fine-tuning (peft) of a transformers-backed variant, in the job process.

Data: JSONL rows in chat form ({"messages": [...]}, the last message the assistant's answer) or
instruction form ({"instruction", "response"}). The loss counts answer tokens only. The result
is merged into the base weights and saved as an HF folder, with a variant config beside it
that records base, data, options and job id, so it loads next to its base at once.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field

from playground.errors import PlaygroundError
from playground.jobs.kinds import Emit, _Options
from playground.jsonl import read_jsonl


class LoraOptions(_Options):
    model: str
    data: str
    rank: Annotated[int, Field(ge=1, le=512)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-4
    epochs: Annotated[int, Field(ge=1, le=100)] = 1
    max_length: Annotated[int, Field(ge=8, le=8192)] = 256
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    seed: int = 0
    name: str | None = None  # the new variant's id; default: <base>-lora-<job>


def read_sft_rows(path: Path) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, answer) pairs from chat or instruction/response JSONL."""
    rows = []
    for number, item in read_jsonl(path):
        if isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"]:
            messages = item["messages"]
            if messages[-1].get("role") != "assistant":
                raise PlaygroundError(f"{path}, line {number}: the last message must be the assistant's answer")
            rows.append((messages[:-1], messages[-1]["content"]))
        elif (
            isinstance(item, dict)
            and isinstance(item.get("instruction"), str)
            and isinstance(item.get("response"), str)
        ):
            rows.append(([{"role": "user", "content": item["instruction"]}], item["response"]))
        else:
            raise PlaygroundError(f'{path}, line {number}: expected "messages" or "instruction" and "response"')
    if not rows:
        raise PlaygroundError(f"{path} holds no examples")
    return rows


def run_lora(options: LoraOptions, emit: Emit, job_id: str, out_root: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from playground.backends.base import Request
    from playground.backends.transformers_backend import TransformersBackend
    from playground.config import GenerationParams
    from playground.engine import Engine

    base = Engine().resolve(options.model)
    if base.backend != "transformers" or base.quantization.method != "none":
        raise PlaygroundError(f"LoRA jobs need an unquantized transformers variant; {base.id} is {base.backend}")
    rows = read_sft_rows(Path(options.data))
    torch.manual_seed(options.seed)
    # Train in fp32: on CPU, bf16 training ran ~30x slower here.
    backend = TransformersBackend(base.model_copy(update={"dtype": "fp32"}))
    backend.load()
    codec, model = backend.codec, backend.model
    examples = []
    for messages, answer in rows:
        prompt = backend.prepare(Request(mode="chat", params=GenerationParams(), messages=tuple(messages)))
        answer_ids = codec.encode(answer, add_special_tokens=False) + sorted(codec.eos_ids)[:1]
        ids = (prompt.payload + answer_ids)[: options.max_length]
        labels = ([-100] * len(prompt.payload) + answer_ids)[: options.max_length]
        if any(label != -100 for label in labels):
            examples.append((ids, labels))
    if not examples:
        raise PlaygroundError(f"every example is longer than max_length {options.max_length} before its answer")
    model = get_peft_model(
        model,
        LoraConfig(
            r=options.rank,
            lora_alpha=options.alpha,
            lora_dropout=0.0,
            target_modules=options.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate)
    steps_per_epoch = math.ceil(len(examples) / options.batch_size)
    total = steps_per_epoch * options.epochs
    emit({"message": f"{len(examples)} examples, {total} steps", "step": 0, "total": total})
    rng, step, started = random.Random(options.seed), 0, time.perf_counter()
    pad = sorted(codec.eos_ids)[0] if codec.eos_ids else 0
    for epoch in range(options.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), options.batch_size):
            batch = [examples[i] for i in order[start : start + options.batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            emit({"step": step, "total": total, "epoch": epoch + 1, "loss": round(float(loss), 5)})
    wall = time.perf_counter() - started
    folder = out_root / job_id / "merged"
    model.merge_and_unload().save_pretrained(folder)
    backend.codec.tokenizer.save_pretrained(folder)
    variant_id = options.name or f"{base.id}-lora-{job_id[-6:]}"
    config = {
        "id": variant_id,
        "display_name": f"{base.display_name} + LoRA ({job_id[-6:]})",
        "backend": "transformers",
        "source": {"path": str(folder)},
        "prompt_format": base.prompt_format,
        "context_length": base.context_length,
        "generation": base.generation.model_dump(exclude_none=True),
        "role": base.role,
        "finetune": {"base": base.id, "data": options.data, "job_id": job_id, "options": options.model_dump()},
    }
    if base.router is not None:
        config["router"] = base.router.model_dump()
    config_dir = out_root / "model_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{variant_id}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    emit({"message": f"saved {variant_id} in {folder}"})
    return {"variant_id": variant_id, "folder": str(folder), "steps": total, "train_wall_s": round(wall, 2)}
