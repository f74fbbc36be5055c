"""The QAT job: fine-tune a transformers Llama-family variant on a text corpus while its linear
weights pass through fake quantization on a bit-width schedule (playground.qat).

All transformer-block weights train (the token embeddings, tied to the output head in SmolLM2,
stay frozen); the latent full-precision weights are saved as a new variant, ready for the GGUF
export job. `schedule: none` is the control run: the same fine-tune without fake quantization,
so a comparison can tell what QAT adds from what the extra training on the corpus adds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from playground.capabilities import capabilities, with_capability
from playground.errors import PlaygroundError
from playground.evals.corpus import BUNDLED as CORPORA
from playground.jobs.kinds import JobContext, _Options
from playground.jobs.lora import result_config, save_variant_config
from playground.jobs.training import Step, check_trainable, load_for_training, saving_into, train
from playground.settings import named_or_allowed

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class QatOptions(_Options):
    model: str
    corpus: str = "python-docs-train"  # a bundled corpus (see playground.evals.corpus) or a text file

    @field_validator("corpus")
    @classmethod
    def _readable(cls, value: str) -> str:
        return named_or_allowed(value, CORPORA, "corpus file")

    max_chars: Annotated[int, Field(ge=1000)] | None = 300_000
    schedule: Literal["linear", "step", "constant", "none"] = "linear"
    constant_bits: Annotated[int, Field(ge=2, le=8)] = 4
    group_size: Annotated[int, Field(ge=8, le=256)] = 32
    targets: list[str] = LINEAR_TARGETS
    steps: Annotated[int, Field(ge=1, le=100_000)] = 120
    seq_len: Annotated[int, Field(ge=16, le=8192)] = 256
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-5
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._\-]*$", max_length=80)] | None = None


def token_blocks(codec: Any, docs: list[tuple[str, str]], seq_len: int) -> list[list[int]]:
    """The corpus as consecutive blocks of `seq_len` tokens, documents separated by end-of-text."""
    eos = sorted(codec.eos_ids)[:1]
    stream: list[int] = []
    for _, text in docs:
        stream += codec.encode(text, add_special_tokens=False) + eos
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def run_qat(options: QatOptions, ctx: JobContext) -> dict[str, Any]:
    import torch

    from playground import qat
    from playground.evals.corpus import documents, limited

    base = ctx.catalogue.resolve(options.model)
    # QAT exists for the GGUF export: it trains what the export can write.
    check_trainable(base, "QAT")
    if not capabilities(base.backend).exports_gguf:
        raise PlaygroundError(
            f"QAT needs a variant of the {', '.join(with_capability('exports_gguf'))} backend; {base.id} is {base.backend}"
        )
    torch.manual_seed(options.seed)
    backend = load_for_training(ctx.catalogue, base.id, options.device)
    model = backend.model
    if getattr(model.config, "model_type", "") not in ("llama", "mistral", "qwen2"):
        raise PlaygroundError(f"QAT and the GGUF export handle Llama-family models, not {model.config.model_type}")
    blocks = token_blocks(backend.codec, limited(documents(options.corpus), options.max_chars), options.seq_len)
    if not blocks:
        raise PlaygroundError(f"{options.corpus} holds fewer than {options.seq_len} tokens")
    width = qat.BitWidth()
    attached = qat.attach(model, width, options.group_size, tuple(options.targets))
    if not attached and options.schedule != "none":
        raise PlaygroundError(
            f"no linear layer named {options.targets} has an input size divisible by {options.group_size}"
        )
    model.get_input_embeddings().weight.requires_grad_(False)  # tied to the head in SmolLM2: both stay
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate)
    ctx.emit(
        {
            "message": f"{len(blocks)} blocks of {options.seq_len} tokens, {options.steps} steps, schedule "
            f"{options.schedule}, {len(attached)} linear layers fake-quantized in groups of {options.group_size}, "
            f"on {backend.device}",
            "step": 0,
            "total": options.steps,
        }
    )

    def batches() -> Iterator[Step]:
        order = list(range(len(blocks)))
        random.Random(options.seed).shuffle(order)
        at = 0
        for step in range(1, options.steps + 1):
            # Set lazily, right before this step's forward pass.
            width.bits = qat.bits_at(options.schedule, (step - 1) / options.steps, options.constant_bits)
            batch = [blocks[order[(at + i) % len(order)]] for i in range(options.batch_size)]
            at += options.batch_size
            input_ids = torch.tensor(batch, device=backend.device)
            yield Step(step, {"input_ids": input_ids, "labels": input_ids}, {"bits": width.bits or 32})

    started = time.perf_counter()
    losses = train(model, optimizer, batches(), options.steps, ctx.emit, clip_norm=1.0)
    wall = time.perf_counter() - started
    qat.detach(model)
    model.eval()
    variant_id = options.name or f"{base.id}-qat-{ctx.job_id[-6:]}"
    folder = ctx.folder / "model"
    with saving_into(folder) as partial:
        model.save_pretrained(partial)
        backend.codec.tokenizer.save_pretrained(partial)
    label = "QAT " + options.schedule if options.schedule != "none" else "fine-tune (no QAT)"
    config = result_config(base, options, variant_id, ctx.job_id, label)
    config.update(backend="transformers", source={"path": str(folder)})
    save_variant_config(config, ctx.catalogue)
    ctx.emit({"message": f"saved {variant_id} in {folder}"})
    return {
        "variant_id": variant_id,
        "folder": str(folder),
        "steps": options.steps,
        "final_loss": losses[-1],
        "train_wall_s": round(wall, 2),
        "fake_quantized_layers": len(attached),
    }
