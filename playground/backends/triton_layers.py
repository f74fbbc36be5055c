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
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import StaticLayer

# Architectures whose layers have the pre-norm Llama shape (norm, attention, add, norm, gated
# MLP, add) with the standard rotary embedding; others keep their own layers.
FUSABLE_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True)
class MatvecConfig:
    """One launch shape of the matvec kernel: rows and columns per program, and warps."""

    block_n: int
    block_k: int
    num_warps: int


DEFAULT_CONFIG = MatvecConfig(16, 128, 4)
# Candidates timed per weight shape. Small row blocks give more programs (a 2048-row weight must
# spread over 132 multiprocessors), large column blocks more bytes in flight per program.
CANDIDATE_CONFIGS = (
    MatvecConfig(2, 1024, 4),
    MatvecConfig(4, 256, 4),
    MatvecConfig(4, 512, 4),
    MatvecConfig(8, 256, 4),
    MatvecConfig(8, 512, 4),
    MatvecConfig(8, 512, 8),
    MatvecConfig(16, 256, 4),
    MatvecConfig(16, 512, 8),
    MatvecConfig(32, 128, 4),
    MatvecConfig(32, 256, 8),
)


@dataclass(frozen=True)
class AttentionConfig:
    """The attention kernel's launch shape: cache slots per loop step, and warps."""

    block_t: int
    num_warps: int


DEFAULT_ATTENTION = AttentionConfig(64, 4)
# Larger slot blocks put more of a head's cache in flight at once (a 256-token context in one
# step); the kernel has one program per query head, so each must keep many loads going.
ATTENTION_CANDIDATES = (
    AttentionConfig(32, 4),
    AttentionConfig(64, 4),
    AttentionConfig(128, 4),
    AttentionConfig(128, 8),
    AttentionConfig(256, 8),
)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's interpreter runs kernels on the CPU with NumPy: the tests' way in without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _matvec_op() -> Any:
    """The kernel and the torch op around it, made at first use, so importing this module needs
    no Triton and the interpreter setting is read when the tests have set it."""
    import triton
    import triton.language as tl
    from torch.library import custom_op

    @triton.jit
    def matvec_kernel(
        x_ptr,
        w_ptr,
        norm_ptr,
        bias_ptr,
        res_ptr,
        out_ptr,
        N,
        eps,
        K: tl.constexpr,  # known when compiled: static loops, and Triton's interpreter needs it so
        HAS_NORM: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        GATED: tl.constexpr,
        HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        dtype = out_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        row_start = rows.to(tl.int64)[:, None] * K
        cols = tl.arange(0, BLOCK_K)
        if HAS_NORM:
            squares = tl.zeros([BLOCK_K], dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                value = tl.load(x_ptr + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
                squares += value * value
            rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            col = start + cols
            col_ok = col < K
            value = tl.load(x_ptr + col, mask=col_ok, other=0.0)
            if HAS_NORM:
                # As the model's RMSNorm: normalised in fp32, rounded, then times its weight.
                scale = tl.load(norm_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
                value = (scale * (value.to(tl.float32) * rstd).to(dtype).to(tl.float32)).to(dtype)
            value = value.to(tl.float32)[None, :]
            in_bounds = row_ok[:, None] & col_ok[None, :]
            weight = tl.load(w_ptr + row_start + col[None, :], mask=in_bounds, other=0.0)
            acc += weight.to(tl.float32) * value
            if GATED:  # the up projection's rows sit N rows below the gate's
                weight_up = tl.load(w_ptr + row_start + N * K + col[None, :], mask=in_bounds, other=0.0)
                acc_up += weight_up.to(tl.float32) * value
        result = tl.sum(acc, axis=1)
        if HAS_BIAS:
            result += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if GATED:
            up = tl.sum(acc_up, axis=1)
            if HAS_BIAS:
                up += tl.load(bias_ptr + N + rows, mask=row_ok, other=0.0).to(tl.float32)
            gate = result.to(dtype).to(tl.float32)
            activated = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
            result = activated * up.to(dtype).to(tl.float32)
        if HAS_RES:
            result = tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) + result.to(dtype).to(tl.float32)
        tl.store(out_ptr + rows, result.to(dtype), mask=row_ok)

    # An opaque op with a fake (shape-only) twin: torch.compile places the kernel's launch in its
    # graph without tracing into it, and a CUDA graph captures it like any other kernel.
    @custom_op("playground::fused_matvec", mutates_args=())
    def fused_matvec(
        x: torch.Tensor,
        weight: torch.Tensor,
        norm_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        gated: bool,
        block_n: int,
        block_k: int,
        num_warps: int,
    ) -> torch.Tensor:
        rows = weight.shape[0] // 2 if gated else weight.shape[0]
        out = torch.empty((rows,), dtype=x.dtype, device=x.device)
        matvec_kernel[(triton.cdiv(rows, block_n),)](
            x,
            weight,
            x if norm_weight is None else norm_weight,
            x if bias is None else bias,
            x if residual is None else residual,
            out,
            rows,
            eps,
            K=weight.shape[1],
            HAS_NORM=norm_weight is not None,
            HAS_BIAS=bias is not None,
            GATED=gated,
            HAS_RES=residual is not None,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=num_warps,
        )
        return out

    @fused_matvec.register_fake
    def _(x, weight, norm_weight, bias, residual, eps, gated, block_n, block_k, num_warps):  # noqa: ANN001, ANN202
        rows = weight.shape[0] // 2 if gated else weight.shape[0]
        return x.new_empty((rows,))

    return fused_matvec


def fused_matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    config: MatvecConfig = DEFAULT_CONFIG,
    norm: nn.Module | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """`weight @ x` for a vector `x` [K], with what the layer does around it: `norm` (an RMSNorm
    module: `weight` and `variance_epsilon`) applied to `x` first, `bias` added, SiLU(gate) * up
    when `gated` (the weight is gate's rows over up's), then `residual` added. Returns [N]."""
    if not torch.compiler.is_compiling():  # registered by the first eager call, before any compile
        _matvec_op()
    norm_weight = norm.weight if norm is not None else None
    eps = float(norm.variance_epsilon) if norm is not None else 0.0
    return torch.ops.playground.fused_matvec(
        x, weight, norm_weight, bias, residual, eps, gated, config.block_n, config.block_k, config.num_warps
    )


@functools.cache
def _attention_op() -> Any:
    """The decode-attention kernel and its op, made at first use (as `_matvec_op`)."""
    import triton
    import triton.language as tl
    from torch.library import custom_op

    @triton.jit
    def attention_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        keys_ptr,
        values_ptr,
        position_ptr,
        length_ptr,
        out_ptr,
        scale,
        capacity,
        Q_HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        dtype = out_ptr.dtype.element_ty
        head = tl.program_id(0)
        group = head // (Q_HEADS // KV_HEADS)
        position = tl.load(position_ptr)
        dims = tl.arange(0, HEAD_DIM)
        # rotate_half: the first half takes minus the second, the second the first
        partner = (dims + HEAD_DIM // 2) % HEAD_DIM
        sign = tl.where(dims < HEAD_DIM // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + dims).to(tl.float32)
        sin = tl.load(sin_ptr + dims).to(tl.float32)
        # RoPE as the model rounds it: x*cos and rotate_half(x)*sin each rounded, then the sum.
        q_at = head * HEAD_DIM
        q_turned = (tl.load(qkv_ptr + q_at + partner).to(tl.float32) * sign * sin).to(dtype).to(tl.float32)
        query = ((tl.load(qkv_ptr + q_at + dims).to(tl.float32) * cos).to(dtype).to(tl.float32) + q_turned).to(dtype)
        k_at = (Q_HEADS + group) * HEAD_DIM
        k_turned = (tl.load(qkv_ptr + k_at + partner).to(tl.float32) * sign * sin).to(dtype).to(tl.float32)
        key = ((tl.load(qkv_ptr + k_at + dims).to(tl.float32) * cos).to(dtype).to(tl.float32) + k_turned).to(dtype)
        value = tl.load(qkv_ptr + (Q_HEADS + KV_HEADS + group) * HEAD_DIM + dims)
        group_start = group.to(tl.int64) * capacity
        if head % (Q_HEADS // KV_HEADS) == 0:  # one program per kv head writes the new slot
            tl.store(keys_ptr + (group_start + position) * HEAD_DIM + dims, key)
            tl.store(values_ptr + (group_start + position) * HEAD_DIM + dims, value)
        tl.store(length_ptr, position + 1)  # the same value from every program
        # Online softmax over slots 0..position-1 from the cache, starting from the new token's
        # own score; the new slot is used from registers, so no program waits on another's write.
        query_scaled = query.to(tl.float32) * scale
        best = tl.sum(query_scaled * key.to(tl.float32), axis=0)
        total = best * 0.0 + 1.0
        acc = value.to(tl.float32)
        start = 0
        while start < position:
            slots = start + tl.arange(0, BLOCK_T)
            filled = slots < position
            at = (group_start + slots)[:, None] * HEAD_DIM + dims[None, :]
            # both loads issued before either is used, so their latencies overlap
            keys = tl.load(keys_ptr + at, mask=filled[:, None], other=0.0)
            values = tl.load(values_ptr + at, mask=filled[:, None], other=0.0)
            scores = tl.sum(keys.to(tl.float32) * query_scaled[None, :], axis=1)
            scores = tl.where(filled, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            shrink = tl.exp(best - new_best)
            weights = tl.exp(scores - new_best)
            values = values.to(tl.float32)
            acc = acc * shrink + tl.sum(weights[:, None] * values, axis=0)
            total = total * shrink + tl.sum(weights, axis=0)
            best = new_best
            start += BLOCK_T
        tl.store(out_ptr + head * HEAD_DIM + dims, (acc / total).to(dtype))

    @custom_op("playground::decode_attention", mutates_args=("keys", "values", "length"))
    def decode_attention(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        position: torch.Tensor,
        length: torch.Tensor,
        q_heads: int,
        scale: float,
        block_t: int,
        num_warps: int,
    ) -> torch.Tensor:
        kv_heads, capacity, head_dim = keys.shape[1], keys.shape[2], keys.shape[3]
        out = torch.empty((q_heads * head_dim,), dtype=qkv.dtype, device=qkv.device)
        attention_kernel[(q_heads,)](
            qkv,
            cos,
            sin,
            keys,
            values,
            position,
            length,
            out,
            scale,
            capacity,
            Q_HEADS=q_heads,
            KV_HEADS=kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_T=block_t,
            num_warps=num_warps,
        )
        return out

    @decode_attention.register_fake
    def _(qkv, cos, sin, keys, values, position, length, q_heads, scale, block_t, num_warps):  # noqa: ANN001, ANN202
        return qkv.new_empty((q_heads * keys.shape[3],))

    return decode_attention


def decode_attention(
    qkv: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache_layer: Any,
    position: torch.Tensor,
    q_heads: int,
    scale: float,
    config: AttentionConfig = DEFAULT_ATTENTION,
) -> torch.Tensor:
    """One token's attention straight from its q/k/v projection [(q_heads + 2 kv_heads) * d]:
    q and k rotated, k and v written to `cache_layer` (a transformers `StaticLayer`) at
    `position` ([1], on the device), the cache's length set past it, and q attending to slots
    0..position. Returns [q_heads * d], heads in order, as the model's attention output."""
    if not torch.compiler.is_compiling():
        _attention_op()
    cos, sin = (t.reshape(-1) for t in position_embeddings)
    return torch.ops.playground.decode_attention(
        qkv,
        cos,
        sin,
        cache_layer.keys,
        cache_layer.values,
        position,
        cache_layer.cumulative_length,
        q_heads,
        scale,
        config.block_t,
        config.num_warps,
    )


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
