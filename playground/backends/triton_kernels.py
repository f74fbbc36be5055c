"""Triton kernels for one token's pass through a Llama-shaped layer, as torch ops.

- `fused_matvec`: weight @ x for a plain (bf16, fp16 or fp32) weight, with what the layer does
  around the matmul folded in: the RMSNorm before it, a bias, SiLU(gate) * up, a residual add.
- `decode_attention`: RoPE on q and k, the static cache's new slot written, and attention over
  the filled slots, in one kernel.

Each is a `torch.library.custom_op` with a shape-only fake, so torch.compile puts the launch in
its graph without tracing into it and a CUDA graph captures it like any other kernel. Rounding
follows the model's eager code step by step (see each kernel). The kernels are made at first use,
so importing this module needs no Triton, and Triton's interpreter (TRITON_INTERPRET=1, the CPU
tests) is honoured when the tests set it. `triton_layers` decides where they run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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
