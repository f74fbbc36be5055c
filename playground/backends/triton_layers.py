"""Decoder layers of fewer kernels for single-token passes on a GPU, through Triton.

At batch 1 a compiled, graph-captured step still runs about a dozen kernels a layer, and on the
H200 each costs a few microseconds whatever its size: on the 1.7B shape the weights alone would
take 0.8 ms a token but the step took 1.69 ms (benchmarks/RESULTS.md). Here a Llama-family
layer's single-token pass runs its four weight reads as four Triton matrix-vector kernels that
also do the work around them:

- the RMSNorm before q/k/v and before gate/up, done in the matvec's prologue (each program
  recomputes the norm of the 2-8 KB input, which is cheaper than a kernel of its own);
- q/k/v's bias, where the model has one (Qwen2);
- SiLU(gate) * up, in the gate/up matvec's epilogue (a program reads a gate row and its up row);
- the residual add, in the o_proj and down_proj epilogues.

Rotary embedding, the cache write and attention stay the model's own (Inductor fuses the first
two). Passes of several tokens (prefill, speculative checks) go through the model's own layer:
a matvec reads each weight once per token, which only pays at one token.

Rounding follows the model's eager code step by step (the norm rounded to the model's dtype
before its weight multiplies, each projection rounded before SiLU, the product and the add), so
bf16 results match the unfused layer up to the order of the sums, and fp32 tokens match
`generate` (tests/test_triton_layers.py, through Triton's interpreter on a CPU).

Each kernel's block sizes are picked per weight shape when the layers are installed, by timing
the candidates in CUDA graphs on the model's own weights; a CPU (the interpreter) takes one
default. This module knows nothing of caches or sampling: `fast_decode` owns those.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import StaticLayer

from playground.backends.triton_kernels import (
    ATTENTION_CANDIDATES,
    CANDIDATE_CONFIGS,
    DEFAULT_ATTENTION,
    DEFAULT_CONFIG,
    AttentionConfig,
    MatvecConfig,
    decode_attention,
    fused_matvec,
)

# Architectures whose layers have the pre-norm Llama shape (norm, attention, add, norm, gated
# MLP, add) with the standard rotary embedding; others keep their own layers.
FUSABLE_MODEL_TYPES = ("llama", "qwen2")


def unfusable_reason(model: nn.Module) -> str:
    """Why this model's layers cannot take the fused single-token pass; "" when they can."""
    config = model.config
    if config.model_type not in FUSABLE_MODEL_TYPES:
        return f"fused layers are written for {', '.join(FUSABLE_MODEL_TYPES)}, not {config.model_type}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"fused layers need SiLU, the model uses {config.hidden_act}"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"fused layers call SDPA attention, the model uses {config._attn_implementation}"
    for layer in _decoder_layers(model):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if getattr(attention, "qkv_fused", None) is None or getattr(mlp, "gate_up_fused", None) is None:
            return "fused layers need q/k/v and gate/up fused first (quantized or adapter layers are not)"
        if type(attention.o_proj) is not nn.Linear or type(mlp.down_proj) is not nn.Linear:
            return "fused layers need plain linear o_proj and down_proj"
        if getattr(attention, "sliding_window", None) is not None:
            return "fused layers do not do sliding-window attention"
    return ""


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


class FusedDecoderLayer(nn.Module):
    """A Llama-shaped decoder layer whose single-token pass runs through `fused_matvec`; any other
    pass goes to the wrapped layer unchanged."""

    def __init__(self, layer: nn.Module, configs: dict[str, Any]) -> None:
        super().__init__()
        self.layer = layer
        # MatvecConfig per projection ("qkv", "o", "gate_up", "down"); "attention": an
        # AttentionConfig for decode_attention, or None for the model's own attention
        self.configs = configs
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self._attention = sdpa_attention_forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if hidden_states.shape[0] * hidden_states.shape[1] != 1 or position_embeddings is None:
            return self.layer(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        layer, attention, mlp = self.layer, self.layer.self_attn, self.layer.mlp
        head_dim = attention.head_dim
        x = hidden_states.reshape(-1)
        qkv = attention.qkv_fused
        projected = fused_matvec(x, qkv.weight, self.configs["qkv"], norm=layer.input_layernorm, bias=qkv.bias)
        cache_layer = past_key_values.layers[attention.layer_idx] if past_key_values is not None else None
        kernel = self.configs.get("attention")
        if (
            kernel is not None
            and type(cache_layer) is StaticLayer
            and cache_layer.is_initialized
            and position_ids is not None
        ):
            # The static-cache decoder's single-token passes attend to slots 0..position, which
            # is the mask it builds (fast_decode); the kernel reads only those slots.
            q_heads = qkv.sizes[0] // head_dim
            attended = decode_attention(
                projected,
                position_embeddings,
                cache_layer,
                position_ids.reshape(-1),
                q_heads,
                attention.scaling,
                kernel,
            )
        else:  # another cache (or its first, allocating write): the model's own steps
            attended = self._model_attention(projected, position_embeddings, past_key_values, attention_mask, **kwargs)
        o_proj, down_proj, gate_up = attention.o_proj, mlp.down_proj, mlp.gate_up_fused
        hidden = fused_matvec(attended.reshape(-1), o_proj.weight, self.configs["o"], bias=o_proj.bias, residual=x)
        activated = fused_matvec(
            hidden,
            gate_up.weight,
            self.configs["gate_up"],
            norm=layer.post_attention_layernorm,
            bias=gate_up.bias,
            gated=True,
        )
        out = fused_matvec(activated, down_proj.weight, self.configs["down"], bias=down_proj.bias, residual=hidden)
        return out.view_as(hidden_states)

    def _model_attention(
        self,
        projected: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values: Any,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """RoPE, the cache's own update and SDPA, as the model's attention does them."""
        attention = self.layer.self_attn
        head_dim = attention.head_dim
        parts = projected.split(attention.qkv_fused.sizes)
        query, key, value = (part.view(1, 1, -1, head_dim).transpose(1, 2) for part in parts)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, attention.layer_idx)
        attended, _ = self._attention(
            attention, query, key, value, attention_mask, dropout=0.0, scaling=attention.scaling, **kwargs
        )
        return attended.reshape(-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The standard rotary embedding, in the model's own order of operations."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def install_fused_layers(model: nn.Module, triton_attention: bool = True) -> int:
    """Wrap every decoder layer in a `FusedDecoderLayer`; returns how many. Call only when
    `unfusable_reason` is "". On a GPU each kernel's launch shape is timed first.
    `triton_attention`: False keeps the model's own RoPE, cache update and SDPA."""
    layers = _decoder_layers(model)
    first = layers[0]
    weights = {
        "qkv": (first.self_attn.qkv_fused.weight, first.input_layernorm, False),
        "o": (first.self_attn.o_proj.weight, None, False),
        "gate_up": (first.mlp.gate_up_fused.weight, first.post_attention_layernorm, True),
        "down": (first.mlp.down_proj.weight, None, False),
    }
    configs: dict[str, Any] = {name: _pick_config(*spec) for name, spec in weights.items()}
    configs["attention"] = _pick_attention_config(model) if triton_attention else None
    for index, layer in enumerate(layers):
        layers[index] = FusedDecoderLayer(layer, configs)
    return len(layers)


def remove_fused_layers(model: nn.Module) -> None:
    """Put the model's own layers back (a fused path that failed its trial)."""
    layers = _decoder_layers(model)
    for index, layer in enumerate(layers):
        if isinstance(layer, FusedDecoderLayer):
            layers[index] = layer.layer


def has_fused_layers(model: nn.Module) -> bool:
    return any(isinstance(layer, FusedDecoderLayer) for layer in _decoder_layers(model))


def _pick_config(weight: torch.Tensor, norm: nn.Module | None, gated: bool) -> MatvecConfig:
    """The fastest candidate launch shape for this weight (`_fastest`); the default off a GPU."""
    if weight.device.type != "cuda":
        return DEFAULT_CONFIG
    columns = weight.shape[1]
    x = torch.randn(columns, dtype=weight.dtype, device=weight.device)
    rows = weight.shape[0] // 2 if gated else weight.shape[0]
    residual = None if norm is not None or gated else torch.zeros(rows, dtype=weight.dtype, device=weight.device)
    candidates = [config for config in CANDIDATE_CONFIGS if config.block_k <= 2 * columns]  # else mostly masked

    def run(config: MatvecConfig) -> torch.Tensor:
        return fused_matvec(x, weight, config, norm=norm, residual=residual, gated=gated)

    return _fastest(candidates, run, DEFAULT_CONFIG)


def _pick_attention_config(model: nn.Module, position: int = 256, capacity: int = 1024) -> AttentionConfig:
    """The fastest candidate for the attention kernel at `position` of a `capacity`-slot cache
    shaped as this model's (`_fastest`); the default off a GPU."""
    parameter = next(model.parameters())
    if parameter.device.type != "cuda":
        return DEFAULT_ATTENTION
    from types import SimpleNamespace

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    device, dtype = parameter.device, parameter.dtype
    qkv = torch.randn((q_heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    angles = (torch.ones(1, 1, head_dim, device=device, dtype=dtype),) * 2
    cache = SimpleNamespace(
        keys=torch.randn(1, kv_heads, capacity, head_dim, dtype=dtype, device=device),
        values=torch.randn(1, kv_heads, capacity, head_dim, dtype=dtype, device=device),
        cumulative_length=torch.zeros((), dtype=torch.long, device=device),
    )
    where = torch.tensor([position], device=device)

    def run(candidate: AttentionConfig) -> torch.Tensor:
        return decode_attention(qkv, angles, cache, where, q_heads, head_dim**-0.5, candidate)

    return _fastest(ATTENTION_CANDIDATES, run, DEFAULT_ATTENTION)


def _fastest(candidates: Sequence[Any], run: Callable[[Any], torch.Tensor], default: Any) -> Any:
    """The candidate whose `run` replays fastest in a CUDA graph (a step replays one, so launch
    cost counts as it will there); `default` if none runs."""
    from triton.testing import do_bench_cudagraph

    timings = {}
    for candidate in candidates:
        try:
            run(candidate)  # compiles it, outside the graph
            timings[candidate] = float(do_bench_cudagraph(functools.partial(run, candidate), rep=20))
        except Exception:  # a shape the compiler or the device refuses: not a candidate
            continue
    return min(timings, key=timings.__getitem__) if timings else default
