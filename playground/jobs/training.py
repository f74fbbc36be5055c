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
        loss = model(**step.inputs).loss
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
