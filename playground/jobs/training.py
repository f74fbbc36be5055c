"""What the fine-tune kinds (LoRA, QAT) share: loading a base for training, and the step loop.

A base loaded for training takes plain `generate` (no fused projections, no static cache):
peft wraps the model's own linear layers, and QAT attaches to them, so they must stay as the
checkpoint has them. Torch is imported only when a job runs.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playground.backends import backend_class
from playground.backends.base import shared_prefix_length
from playground.capabilities import capabilities, with_capability
from playground.catalogue import Catalogue
from playground.config import ModelConfig
from playground.errors import PlaygroundError
from playground.jobs.kinds import Emit


def check_trainable(base: ModelConfig, what: str) -> None:
    """Refuse a base whose weights a fine-tune cannot reach."""
    if not capabilities(base.backend).can_finetune or base.quantization.method != "none":
        quantized = "" if base.quantization.method == "none" else " " + base.quantization.method
        raise PlaygroundError(
            f"{what} needs an unquantized variant of the {' or '.join(with_capability('can_finetune'))} backend; "
            f"{base.id} is {base.backend}{quantized} (for a quantized base, choose its unquantized twin"
            " and quantize: nf4)"
        )
    if base.adapter is not None:
        raise PlaygroundError(f"{base.id} is itself base + adapter; fine-tune its merged form instead")


def load_for_training(catalogue: Catalogue, base_id: str, device: str = "auto", quantize: str = "none") -> Any:
    """The base's backend, loaded in this process where training will run: NF4 on a GPU for
    QLoRA, bf16 on a GPU, fp32 on the CPU (bf16 training ran ~30x slower there). The
    catalogue's checks apply as to any load."""
    import torch

    base = catalogue.check_before_load(base_id)
    if quantize == "nf4":
        if device == "cpu" or not torch.cuda.is_available():
            raise PlaygroundError("QLoRA (an NF4 base) needs bitsandbytes on a GPU; this machine has none")
        # bf16 compute on the GPU; the frozen base in NF4 with the LoRA weights in fp32.
        update: dict[str, Any] = {
            "device": "cuda",
            "dtype": "bf16",
            "quantization": {"method": "nf4", "compute_dtype": "bf16", "keep_modules": ["lm_head"]},
        }
    else:
        on = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
        update = {"device": on, "dtype": "bf16" if on == "cuda" else "fp32"}
    # Training needs the checkpoint's own layers: the fast decode path would fuse them.
    update["fast_decode"] = "off"
    config = ModelConfig.model_validate(base.model_dump() | update)
    backend = backend_class(base.backend)(config)
    backend.load()
    return backend


@contextmanager
def saving_into(folder: Path) -> Iterator[Path]:
    """A folder to write a result into, whole or not at all: written beside it, then renamed.
    A failed save (a full disk) leaves nothing half-written behind to hold the space."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        # safetensors reports a full disk as its own error type: say it as the OS does.
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            raise OSError(errno.ENOSPC, "No space left on device while saving", str(folder)) from None
        raise
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


@dataclass(frozen=True)
class Step:
    """One optimizer step: its number, the model's inputs (they include `labels`), and fields
    added to its progress event (epoch, bit width)."""

    number: int
    inputs: dict[str, Any]
    note: dict[str, Any] = field(default_factory=dict)
    # Tokens that every row of the batch begins with (a shared system prompt), none of them
    # labelled: run once and repeated across the batch in the KV cache (0: a plain pass).
    shared_prefix: int = 0


def unlabelled_prefix_length(rows: list[tuple[list[int], list[int]]], least: int = 16) -> int:
    """How many leading tokens all (ids, labels) rows share before the first label, less one
    (the last prefix token's logit predicts the first token after it, which must be unlabelled);
    0 when that is under `least` tokens or the batch has one row, where sharing gains nothing."""
    if len(rows) < 2:
        return 0
    first_label = min(next((i for i, label in enumerate(labels) if label != -100), len(labels)) for _, labels in rows)
    length = min(shared_prefix_length([ids for ids, _ in rows]), first_label - 1)
    return length if length >= least else 0


def padded_batch(rows: list[tuple[list[int], list[int]]], pad: int, device: Any) -> dict[str, Any]:
    """A causal LM's inputs for (ids, labels) rows, padded on the right to the longest row."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=device),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows], device=device),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], device=device),
    }


def causal_lm_loss(model: Any, inputs: dict[str, Any], shared_prefix: int = 0) -> Any:
    """The model's mean loss over labelled tokens, with `shared_prefix` as forward_sharing_prefix
    runs it: the same loss as the plain pass for less compute."""
    return forward_sharing_prefix(model, inputs, shared_prefix).loss


def forward_sharing_prefix(model: Any, inputs: dict[str, Any], shared_prefix: int = 0) -> Any:
    """The model's output for a padded batch (`labels` optional). With `shared_prefix`, the
    tokens every row begins with run once and their keys and values are repeated for every row
    (gradients flow back through the repeat); logits then cover the positions after them."""
    if not shared_prefix:
        return model(**inputs)
    ids, rows = inputs["input_ids"], inputs["input_ids"].shape[0]
    head = model(input_ids=ids[:1, :shared_prefix], use_cache=True, logits_to_keep=1)
    cache = head.past_key_values
    cache.batch_repeat_interleave(rows)
    tail = {"labels": inputs["labels"][:, shared_prefix:]} if "labels" in inputs else {}  # its first is unlabelled
    return model(
        input_ids=ids[:, shared_prefix:],
        attention_mask=inputs["attention_mask"],  # the whole row's, prefix included
        past_key_values=cache,
        use_cache=True,
        **tail,
    )


def train(
    model: Any,
    optimizer: Any,
    steps: Iterable[Step],
    total: int,
    emit: Emit,
    *,
    losses: list[float] | None = None,
    clip_norm: float | None = None,
    after_step: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """Run the steps (forward, backward, optimizer), emitting step, total and loss after each;
    the losses so far (`losses` goes on from a resumed run's)."""
    import torch

    losses = list(losses or [])
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in steps:
        loss = causal_lm_loss(model, step.inputs, step.shared_prefix)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(float(loss), 5))
        emit({"step": step.number, "total": total, "loss": losses[-1], **step.note})
        if after_step is not None:
            after_step(step.number, losses)
    return losses


def sequence_logprobs(
    model: Any, sequences: list[list[int]], starts: list[int], pad: int, batch_size: int = 16
) -> list[float]:
    """Each sequence's summed log-probability of its tokens from its start on, in batches of
    like length that run the tokens they all begin with once (as causal_lm_loss does): what a
    router scores one request at a time, for many requests at once while a model trains."""
    import torch

    totals = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    device = next(model.parameters()).device
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            members = order[first : first + batch_size]
            # Labels mark the scored tokens, so unlabelled_prefix_length keeps them out of the prefix.
            labelled = [(sequences[i], [-100] * starts[i] + sequences[i][starts[i] :]) for i in members]
            shared = unlabelled_prefix_length(labelled, least=1)
            inputs = padded_batch(labelled, pad, device)
            ids = inputs["input_ids"]
            unlabelled = {k: v for k, v in inputs.items() if k != "labels"}  # logits are read, no loss wanted
            logits = forward_sharing_prefix(model, unlabelled, shared).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, index in enumerate(members):
                # The token at position p is predicted at p - 1, which is row p - 1 - shared here.
                positions = torch.arange(starts[index], len(sequences[index]), device=device)
                targets = ids[row, positions]
                totals[index] = float(logprobs[row, positions - 1 - shared, targets].sum())
    return totals
