"""Quantization-aware training: fake quantization of linear weights with a straight-through
estimator, and the bit-width schedules of the SmolLM2 scheduled-QAT card.

The forward pass sees each weight rounded to `bits` levels per group of `group_size` values
along its input dimension, with each group's own minimum and step (the layout of llama.cpp's
Q4_1: blocks of 32, a scale and a minimum each); the backward pass treats the rounding as the
identity, so the full-precision latent weights keep learning. The latent weights are what is
saved; the GGUF exporter and llama.cpp's quantizer make the low-bit files from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

Schedule = Literal["linear", "step", "constant", "none"]
WARMUP, TAIL = 0.1, 0.1  # FP32 for the first 10% of steps, INT4 for the last 10% (the card's schedule)


def bits_at(schedule: Schedule, progress: float, constant_bits: int = 4) -> int | None:
    """The bit width at `progress` (0..1) of training; None means full precision.

    linear: FP32 warm-up, then the width falls linearly from 32 to 4 bits, then INT4.
    step: FP32 warm-up, then 16, 8 and 4 bits in equal thirds, then INT4.
    constant: `constant_bits` from the first step. none: never quantized (the control run).
    """
    if schedule == "none":
        return None
    if schedule == "constant":
        return constant_bits
    if progress < WARMUP:
        return None
    if progress >= 1.0 - TAIL:
        return 4
    x = (progress - WARMUP) / (1.0 - WARMUP - TAIL)
    if schedule == "linear":
        bits = round(32 - 28 * x)
        return None if bits >= 32 else bits
    return (16, 8, 4)[min(int(x * 3), 2)]


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """`weight` rounded to 2**bits levels per group (min/max asymmetric), gradients passed
    straight through."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    step = (high - low).clamp(min=1e-12) / levels
    rounded = torch.round((groups - low) / step).clamp(0, levels) * step + low
    return (groups + (rounded - groups).detach()).reshape(rows, cols)


@dataclass
class BitWidth:
    """The current width, shared by every fake-quantized layer; None: full precision."""

    bits: int | None = None


class FakeQuantize(nn.Module):
    def __init__(self, width: BitWidth, group_size: int) -> None:
        super().__init__()
        self.width = width
        self.group_size = group_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.width.bits is None:
            return weight
        return fake_quantize(weight, self.width.bits, self.group_size)


def attach(model: nn.Module, width: BitWidth, group_size: int, targets: tuple[str, ...]) -> list[str]:
    """Fake-quantize the weights of the Linear layers whose names end with one of `targets`;
    their names. Layers whose input size is not a multiple of the group are left alone."""
    attached = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            if module.in_features % group_size == 0:
                parametrize.register_parametrization(module, "weight", FakeQuantize(width, group_size))
                attached.append(name)
    return attached


def detach(model: nn.Module) -> None:
    """Remove the fake quantizers, keeping the latent full-precision weights."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
