"""Triton kernels for one token's pass through a Llama-shaped layer, as torch ops.

- `fused_matvec`: weight @ x for a plain (bf16, fp16 or fp32) weight, with what the layer does
  around the matmul folded in: the RMSNorm before it, a bias, SiLU(gate) * up, a residual add.
- `nf4_matvec`: the same for bitsandbytes NF4 weights, read in bitsandbytes' own layout.
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
    """One launch shape of the matvec kernel: rows and columns per program, and warps; `pdl`:
    launched with programmatic dependent launch (Hopper on): the next kernel may launch early,
    and the plain matvec reads its first weight tile before waiting for the kernel before.
    `nf4_lookup` (NF4 weights only): "byte" reads both codes' values of a packed byte with one
    load from a 256-entry table (2 KB); "nibble" reads each code's value from the 16-entry table,
    two loads a byte, but all of a warp's loads fall in one cache line; "registers" finds them
    by byte permutes, no loads and no change of layout (`nf4_permute`; GPU only, and only for
    bitsandbytes' own NF4 code book); "scaled" scales and rounds each block's 16 values once,
    into registers, and finds a weight's there by byte permutes (as "registers", and bf16 weights
    only). `nf4_prefetch`: each loop step loads the next step's packed bytes before decoding its
    own. `nf4_stages`: loop steps whose loads are in flight at once, through shared memory
    (Triton's software pipelining, asynchronous copies on the GPU); 1 loads as each step needs
    them. `nf4_dot`: tensor cores sum the products (whole NF4 blocks in a tile, 16 rows or more;
    on Hopper a 64-row program uses wgmma), `nf4_splits` programs sharing each row block's
    columns, the last adding their sums. `nf4_pdl_late` (with `pdl`): an NF4 program lets the
    next kernel launch once its loop is done, not at its start. `ahead` (plain weights only): each
    loop step loads the next step's x with the next weight tile, and a plain launch reads its
    weights a step ahead too (`matvec_kernel`'s AHEAD). `stages` (plain weights only): loop
    steps whose loads are in flight at once, as `nf4_stages`. `nf4_whole_blocks` (NF4 tiles of
    whole blocks; not with `nf4_dot` or `nf4_prefetch`): a step reads each block's first half,
    then its last half, as two tiles laid out alike, so one thread decodes both halves of its
    blocks and builds a block's scaled values once, not once per half."""

    block_n: int
    block_k: int
    num_warps: int
    pdl: bool = False
    nf4_lookup: str = "byte"
    nf4_prefetch: bool = False
    nf4_stages: int = 1
    nf4_dot: bool = False
    nf4_splits: int = 1
    nf4_pdl_late: bool = False
    nf4_whole_blocks: bool = False
    ahead: bool = False
    stages: int = 1


DEFAULT_CONFIG = MatvecConfig(16, 128, 4)
# Candidates timed per weight shape. Small row blocks give more programs (a 2048-row weight must
# spread over 132 multiprocessors), large column blocks more bytes in flight per program (weights
# read from memory, as in a step, want more in flight than those timed from L2 did).
CANDIDATE_CONFIGS = (
    MatvecConfig(2, 1024, 4),
    MatvecConfig(2, 2048, 4),
    MatvecConfig(2, 2048, 8),
    MatvecConfig(4, 2048, 8),
    MatvecConfig(4, 1024, 4),
    MatvecConfig(4, 1024, 8),
    MatvecConfig(8, 1024, 8),
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
    """The attention kernel's launch shape: cache slots per loop step, and warps; `pdl` as for
    `MatvecConfig`; `splits`: programs per query head, each over its share of the filled slots
    (a power of two)."""

    block_t: int
    num_warps: int
    pdl: bool = False
    splits: int = 1


DEFAULT_ATTENTION = AttentionConfig(64, 4)
# One program per head (splits 1) must keep many loads in flight itself: large slot blocks. With
# the slots shared out, more programs run at once, each over fewer slots: small blocks.
# (On the H200 one program per head took 8.5 us a layer on the 1.7B and 18.6 on the 3B.)
ATTENTION_CANDIDATES = (
    AttentionConfig(32, 4),
    AttentionConfig(64, 4),
    AttentionConfig(128, 4),
    AttentionConfig(128, 8),
    AttentionConfig(256, 8),
    AttentionConfig(32, 2, splits=4),
    AttentionConfig(64, 4, splits=4),
    AttentionConfig(32, 2, splits=8),
    AttentionConfig(64, 4, splits=8),
    AttentionConfig(32, 2, splits=16),
    AttentionConfig(64, 4, splits=16),
)


def attention_counters(q_heads: int, device: torch.device | str) -> torch.Tensor:
    """The zeroed per-head counters `decode_attention` needs when its slots are split: the
    kernel's last program of a head leaves its counter at zero again, so one tensor serves every
    layer and step. Made before any CUDA graph is captured."""
    return torch.zeros(q_heads, dtype=torch.int32, device=device)


# Launch options: programmatic dependent launch is asked for only where a config wants it (the
# interpreter knows no such option).
PDL_LAUNCH: dict[bool, dict[str, bool]] = {False: {}, True: {"launch_pdl": True}}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _norm_arguments(norm: nn.Module | None) -> tuple[torch.Tensor | None, float]:
    """An RMSNorm module (`weight`, `variance_epsilon`) as the matvec ops take it."""
    return (norm.weight, float(norm.variance_epsilon)) if norm is not None else (None, 0.0)


def _matvec_options(
    norm_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gated: bool,
    block_n: int,
    block_k: int,
    num_warps: int,
    pdl: bool,
) -> dict[str, Any]:
    """The compile-time flags and launch options both matvec kernels take."""
    return dict(
        HAS_NORM=norm_weight is not None,
        HAS_BIAS=bias is not None,
        GATED=gated,
        HAS_RES=residual is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        USE_PDL=pdl,
        **PDL_LAUNCH[pdl],
    )


@functools.cache
def _matvec_op() -> Any:
    """The matvec kernel's torch op, made at first use (see the module's note)."""
    import triton
    from torch.library import custom_op

    from playground.backends.triton_source import matvec_kernel

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
        pdl: bool,
        ahead: bool,
        stages: int,
        row_absmax: torch.Tensor | None = None,
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
            x if row_absmax is None else row_absmax,
            rows,
            eps,
            K=weight.shape[1],
            AHEAD=ahead,
            STAGES=stages,
            ROW_SCALE=row_absmax is not None,
            **_matvec_options(norm_weight, bias, residual, gated, block_n, block_k, num_warps, pdl),
        )
        return out

    @fused_matvec.register_fake
    def _(x, weight, norm_weight, bias, residual, eps, gated, block_n, block_k, num_warps, pdl, ahead, stages, *scale):  # noqa: ANN001, ANN002, ANN202
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
    row_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """`weight @ x` for a vector `x` [K], with what the layer does around it: `norm` (an RMSNorm
    module: `weight` and `variance_epsilon`) applied to `x` first, `bias` added, SiLU(gate) * up
    when `gated` (the weight is gate's rows over up's), then `residual` added. Returns [N].
    `row_absmax` [N] (fp32): `weight` is bitsandbytes' vector-wise int8, each row's sum scaled
    by its absmax / 127."""
    if not torch.compiler.is_compiling():  # registered by the first eager call, before any compile
        _matvec_op()
    norm_weight, eps = _norm_arguments(norm)
    return torch.ops.playground.fused_matvec(
        x,
        weight,
        norm_weight,
        bias,
        residual,
        eps,
        gated,
        config.block_n,
        config.block_k,
        config.num_warps,
        config.pdl,
        config.ahead,
        config.stages,
        row_absmax,
    )


# A pass of this many tokens or fewer (a check of drafts) can go through `rows_matvec`: the
# smallest tile tensor cores take. Longer passes (prompts) stay on the model's own GEMMs.
ROWS_MAX = 16
# Launch shapes timed for `rows_matvec` (block_n of 16 or more: tensor cores' smallest tile).
# Few: each is compiled for every weight shape at a model's first load. On the H200 the
# narrow ones (4-16 KB of weights a loop step) lost to cuBLAS by 1.7x on the 1.7B's pass
# (benchmarks/RESULTS.md), where the step's matvecs win with 8-32 KB in flight a program: so
# also wide steps, pipelined (a shape whose buffers do not fit is dropped by the trial).
ROWS_CANDIDATES = (
    MatvecConfig(16, 128, 4),
    MatvecConfig(16, 256, 4),
    MatvecConfig(32, 128, 4),
    MatvecConfig(32, 256, 8),
    MatvecConfig(64, 64, 4),
    MatvecConfig(16, 128, 4, stages=3),
    MatvecConfig(32, 128, 4, stages=3),
    MatvecConfig(16, 512, 4),
    MatvecConfig(16, 512, 8, stages=3),
    MatvecConfig(16, 1024, 8),
    MatvecConfig(32, 512, 8, stages=3),
)


@functools.cache
def _rows_matvec_op() -> Any:
    """The rows kernel's torch op, made at first use (as `_matvec_op`)."""
    import triton
    from torch.library import custom_op

    from playground.backends.triton_source import rows_matvec_kernel

    @custom_op("playground::rows_matvec", mutates_args=())
    def rows_matvec(
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
        stages: int,
    ) -> torch.Tensor:
        rows = weight.shape[0] // 2 if gated else weight.shape[0]
        x = x.contiguous()
        out = torch.empty((x.shape[0], rows), dtype=x.dtype, device=x.device)
        rows_matvec_kernel[(triton.cdiv(rows, block_n),)](
            x,
            weight,
            x if norm_weight is None else norm_weight,
            x if bias is None else bias,
            x if residual is None else residual.contiguous(),
            out,
            x.shape[0],
            rows,
            eps,
            K=weight.shape[1],
            HAS_NORM=norm_weight is not None,
            HAS_BIAS=bias is not None,
            GATED=gated,
            HAS_RES=residual is not None,
            BLOCK_M=ROWS_MAX,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            STAGES=stages,
            num_warps=num_warps,
        )
        return out

    @rows_matvec.register_fake
    def _(x, weight, norm_weight, bias, residual, eps, gated, block_n, block_k, num_warps, stages):  # noqa: ANN001, ANN202
        rows = weight.shape[0] // 2 if gated else weight.shape[0]
        return x.new_empty((x.shape[0], rows))

    return rows_matvec


def rows_matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    config: MatvecConfig,
    norm: nn.Module | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """`fused_matvec` for a pass of M <= ROWS_MAX tokens: `x` [M, K], `residual` [M, N];
    returns [M, N], each row what `fused_matvec` gives for that token (up to the order of the
    sums). Each weight is read once for all M. `config`: block_n (16 or more), block_k, warps,
    stages."""
    if x.shape[0] > ROWS_MAX:
        raise ValueError(f"rows_matvec takes at most {ROWS_MAX} tokens, got {x.shape[0]}")
    if not torch.compiler.is_compiling():  # registered by the first eager call, before any compile
        _rows_matvec_op()
    norm_weight, eps = _norm_arguments(norm)
    return torch.ops.playground.rows_matvec(
        x,
        weight,
        norm_weight,
        bias,
        residual,
        eps,
        gated,
        config.block_n,
        config.block_k,
        config.num_warps,
        config.stages,
    )


# MatvecConfig.nf4_lookup: the kernel's LOOKUP (triton_source.LOOKUP_BYTE and on)
NF4_LOOKUPS = {"byte": 0, "nibble": 1, "registers": 2, "scaled": 3}


@dataclass(frozen=True)
class NF4Weight:
    """One or more bitsandbytes NF4 weights of the same columns, stacked as one matvec reads
    them (q, k and v; or gate and up), each in bitsandbytes' own layout, nothing copied: per
    part its packed codes, block scales (8-bit with `outer` and `code2` when `nested`, i.e.
    double quant), and the nested scales' offset."""

    packed: tuple[torch.Tensor, ...]
    absmax: tuple[torch.Tensor, ...]
    outer: tuple[torch.Tensor, ...]
    code2: tuple[torch.Tensor, ...]
    offsets: tuple[float, ...]
    rows: tuple[int, ...]
    columns: int
    table: torch.Tensor  # the 16 NF4 values (fp32): what the kernel reads looking up a nibble
    pairs: torch.Tensor  # `nf4_code_pairs(table)`: what it reads looking up a byte
    blocksize: int
    blocksize2: int
    nested: bool
    dtype: torch.dtype  # what the weights dequantize to: the layer's compute dtype
    # One per row (enough for any row block), zero between launches: the split programs' count.
    # Made with the weight, before any CUDA graph is captured.
    counters: torch.Tensor

    @classmethod
    def of(cls, linears: list[nn.Module]) -> NF4Weight:
        """From bitsandbytes `Linear4bit` modules quantized alike (checked by `nf4_parts_match`)."""
        states = [linear.weight.quant_state for linear in linears]
        nested = bool(states[0].nested)
        rows = [int(state.shape[0]) for state in states]
        return cls(
            packed=tuple(linear.weight.data.view(-1) for linear in linears),
            absmax=tuple(state.absmax for state in states),
            outer=tuple(state.state2.absmax if nested else state.absmax for state in states),
            code2=tuple(state.state2.code if nested else state.absmax for state in states),
            offsets=tuple(float(state.offset) if nested else 0.0 for state in states),
            rows=tuple(rows),
            columns=int(states[0].shape[1]),
            # a fresh allocation is aligned, so the 64-byte table lies in one 128-byte line
            table=states[0].code.float().clone(),
            pairs=nf4_code_pairs(states[0].code),
            blocksize=int(states[0].blocksize),
            blocksize2=int(states[0].state2.blocksize) if nested else 1,
            nested=nested,
            dtype=states[0].dtype,
            counters=torch.zeros(sum(rows), dtype=torch.int32, device=states[0].absmax.device),
        )

    def registers_lookup_fits(self) -> bool:
        """Whether the kernel can find these weights' values by byte permutes (`nf4_permute`):
        on a GPU (Triton's interpreter runs no PTX), with bitsandbytes' own NF4 code book."""
        from playground.backends.nf4_permute import NF4_CODE_BOOK

        book = torch.tensor(NF4_CODE_BOOK, dtype=torch.float32)
        return self.table.device.type == "cuda" and torch.equal(self.table.cpu(), book)

    def scaled_lookup_fits(self) -> bool:
        """Whether the kernel can scale each block's values once and look them up in registers
        (`nf4_permute.scaled_table_program`): as `registers_lookup_fits`, for bf16 weights (the
        planes hold two bytes a value), in blocks of 32 weights or more. A lookup takes four
        packed bytes with one block's planes, so four bytes a thread holds in a row must lie in
        one block: a block of 16 bytes or more is read 16 at a time."""
        fits = self.dtype == torch.bfloat16 and self.blocksize >= 32 and self.blocksize % 32 == 0
        return fits and self.registers_lookup_fits()


def nf4_code_pairs(table: torch.Tensor) -> torch.Tensor:
    """Per byte value, the NF4 values of both its codes as one int64: the high nibble's fp32
    bits in the upper half, the low nibble's in the lower, so the kernel decodes a byte with one
    load instead of two."""
    bits = table.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    byte = torch.arange(256, device=table.device)
    return (bits[byte >> 4] << 32) | bits[byte & 15]


def nf4_parts_match(linears: list[nn.Module]) -> str:
    """Why these bitsandbytes 4-bit layers cannot go through one `nf4_matvec`; "" when they can."""
    states = [getattr(linear.weight, "quant_state", None) for linear in linears]
    if any(state is None or state.quant_type != "nf4" for state in states):
        return "fused layers read NF4 weights only (not FP4)"
    first = states[0]
    if any(
        (state.blocksize, bool(state.nested), state.dtype, int(state.shape[1]))
        != (first.blocksize, bool(first.nested), first.dtype, int(first.shape[1]))
        for state in states
    ):
        return "fused layers need the q/k/v (or gate/up) weights quantized alike"
    if int(first.shape[1]) % 2 or first.blocksize % 2:
        return "fused layers need an even number of columns"
    if any(getattr(linear, "compute_dtype", None) not in (None, first.dtype) for linear in linears):
        # the kernel computes in the model's dtype, as bitsandbytes does only when they agree
        return "fused layers need NF4 layers that compute in the model's dtype (quantization.compute_dtype)"
    return ""


def _pairs_readable(x: torch.Tensor, norm_weight: torch.Tensor | None) -> bool:
    """Whether the NF4 kernel may read x (and the norm's weight) a bf16 pair a 4-byte word:
    bf16, and each at an address a word divides (a view may start at any element)."""
    tensors = [x] if norm_weight is None else [x, norm_weight]
    return all(tensor.dtype == torch.bfloat16 and tensor.data_ptr() % 4 == 0 for tensor in tensors)


@functools.cache
def _nf4_matvec_op() -> Any:
    """The NF4 matvec kernel's torch op, made at first use (see the module's note)."""
    import triton
    from torch.library import custom_op

    from playground.backends.triton_source import nf4_matvec_kernel

    @custom_op("playground::nf4_matvec", mutates_args=("counters",))
    def nf4_matvec(
        x: torch.Tensor,
        packed: list[torch.Tensor],
        absmax: list[torch.Tensor],
        outer: list[torch.Tensor],
        code2: list[torch.Tensor],
        offsets: list[float],
        rows: list[int],
        table: torch.Tensor,
        pairs: torch.Tensor,
        counters: torch.Tensor,
        lookup: int,
        prefetch: bool,
        stages: int,
        dot: bool,
        splits: int,
        norm_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        gated: bool,
        columns: int,
        blocksize: int,
        blocksize2: int,
        nested: bool,
        block_n: int,
        block_k: int,
        num_warps: int,
        pdl: bool,
        pdl_late: bool,
        whole_blocks: bool = False,
    ) -> torch.Tensor:
        out_rows = rows[0] if gated else sum(rows)
        out = torch.empty((out_rows,), dtype=x.dtype, device=x.device)
        aligned = columns % blocksize == 0 and block_k % blocksize == 0
        parts = len(packed)
        pick = [min(index, parts - 1) for index in range(3)]  # unused parts repeat the last
        part_args = []
        for index in pick:
            part_args += [packed[index], absmax[index], outer[index], code2[index], offsets[index]]
        # each split program's sums (gate's, then up's); not read back unsplit
        partials = torch.empty(
            ((2 if gated else 1) * splits * out_rows,) if splits > 1 else (1,), dtype=torch.float32, device=x.device
        )
        nf4_matvec_kernel[(triton.cdiv(out_rows, block_n), splits)](
            x,
            x if norm_weight is None else norm_weight,
            x if bias is None else bias,
            x if residual is None else residual,
            out,
            table,
            pairs,
            *part_args,
            rows[0],
            rows[1] if parts > 1 else 0,
            out_rows,
            eps,
            partials,
            counters,
            K=columns,
            PARTS=parts,
            NESTED=nested,
            BLOCKSIZE=blocksize,
            BLOCKSIZE2=blocksize2,
            # blocks within rows, whole blocks in a tile: one scale load per block (real models)
            ALIGNED=aligned,
            TILE_BLOCKS=block_k // blocksize if aligned else 1,
            LOOKUP=lookup,
            PREFETCH=prefetch,
            NUM_STAGES=stages,
            DOT=dot,
            SPLITS=splits,
            PDL_LATE=pdl_late,
            HALVES=2 if whole_blocks and aligned else 1,
            X_WORDS=_pairs_readable(x, norm_weight),
            **_matvec_options(norm_weight, bias, residual, gated, block_n, block_k, num_warps, pdl),
        )
        return out

    @nf4_matvec.register_fake
    def _(x, packed, absmax, outer, code2, offsets, rows, *rest):  # noqa: ANN001, ANN002, ANN202
        # after table, pairs, counters, lookup, prefetch, stages, dot, splits, norm, bias, residual, eps
        gated = rest[12]
        return x.new_empty((rows[0] if gated else sum(rows),))

    return nf4_matvec


def nf4_matvec(
    x: torch.Tensor,
    weight: NF4Weight,
    config: MatvecConfig = DEFAULT_CONFIG,
    norm: nn.Module | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """As `fused_matvec`, for NF4 weights: the parts' rows stacked (q, k, v), or, `gated`, gate
    (part 0) and up (part 1). A row block of `config` must divide every part's rows."""
    if not torch.compiler.is_compiling():
        _nf4_matvec_op()
    norm_weight, eps = _norm_arguments(norm)
    return torch.ops.playground.nf4_matvec(
        x,
        list(weight.packed),
        list(weight.absmax),
        list(weight.outer),
        list(weight.code2),
        list(weight.offsets),
        list(weight.rows),
        weight.table,
        weight.pairs,
        weight.counters,
        NF4_LOOKUPS[config.nf4_lookup],
        config.nf4_prefetch,
        config.nf4_stages,
        config.nf4_dot,
        config.nf4_splits,
        norm_weight,
        bias,
        residual,
        eps,
        gated,
        weight.columns,
        weight.blocksize,
        weight.blocksize2,
        weight.nested,
        config.block_n,
        config.block_k,
        config.num_warps,
        config.pdl,
        config.nf4_pdl_late,
        config.nf4_whole_blocks,
    )


@functools.cache
def _attention_op() -> Any:
    """The decode-attention kernel's torch op, made at first use (see the module's note)."""
    from torch.library import custom_op

    from playground.backends.triton_source import attention_kernel

    @custom_op("playground::decode_attention", mutates_args=("keys", "values", "length", "counters"))
    def decode_attention(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        position: torch.Tensor,
        length: torch.Tensor,
        counters: torch.Tensor,
        q_heads: int,
        scale: float,
        block_t: int,
        num_warps: int,
        pdl: bool,
        splits: int,
    ) -> torch.Tensor:
        kv_heads, capacity, head_dim = keys.shape[1], keys.shape[2], keys.shape[3]
        out = torch.empty((q_heads * head_dim,), dtype=qkv.dtype, device=qkv.device)
        # Each share's running max, sum and weighted values; not read back when unsplit.
        partials = torch.empty(
            (q_heads * splits * (head_dim + 2),) if splits > 1 else (1,), dtype=torch.float32, device=qkv.device
        )
        attention_kernel[(q_heads, splits)](
            qkv,
            cos,
            sin,
            keys,
            values,
            position,
            length,
            out,
            partials,
            counters,
            scale,
            capacity,
            Q_HEADS=q_heads,
            KV_HEADS=kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_T=block_t,
            SPLITS=splits,
            num_warps=num_warps,
            USE_PDL=pdl,
            **PDL_LAUNCH[pdl],
        )
        return out

    @decode_attention.register_fake
    def _(qkv, cos, sin, keys, values, position, length, counters, q_heads, scale, block_t, num_warps, pdl, splits):  # noqa: ANN001, ANN202
        return qkv.new_empty((q_heads * keys.shape[3],))

    return decode_attention


def decode_attention(
    qkv: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache_layer: Any,
    position: torch.Tensor,
    q_heads: int,
    scale: float,
    counters: torch.Tensor,
    config: AttentionConfig = DEFAULT_ATTENTION,
) -> torch.Tensor:
    """One token's attention straight from its q/k/v projection [(q_heads + 2 kv_heads) * d]:
    q and k rotated, k and v written to `cache_layer` (a transformers `StaticLayer`) at
    `position` ([1], on the device), the cache's length set past it, and q attending to slots
    0..position. `counters`: `attention_counters(q_heads, ...)`, for a split config. Returns
    [q_heads * d], heads in order, as the model's attention output."""
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
        counters,
        q_heads,
        scale,
        config.block_t,
        config.num_warps,
        config.pdl,
        config.splits,
    )
