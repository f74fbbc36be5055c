"""The Triton kernels behind `triton_kernels`' ops (imported only when an op is first made, so
the rest of the app runs without Triton, and after the tests have switched on its interpreter).

Shared pieces are `@triton.jit` helpers: the RMSNorm prologue (`rms_rstd`, `matmul_input`), the
epilogue (`finish`: bias, SiLU(gate) * up, residual add) and bitsandbytes' NF4 dequantization
(`nf4_bytes`, `nf4_tile`, `nf4_values`). Every rounding follows the model's eager code: a value
is rounded to the model's dtype (the output's) wherever the eager code would hold it in that
dtype.
"""

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from playground.backends import int8_head, nf4_permute

# How `nf4_values` finds a code's value (MatvecConfig.nf4_lookup): both of a byte's in a
# 256-entry table of pairs, each code's in the 16-entry table, or byte permutes in registers
# (bitsandbytes' code book only; not in Triton's interpreter, which runs no PTX).
LOOKUP_BYTE: tl.constexpr = tl.constexpr(0)
LOOKUP_NIBBLE: tl.constexpr = tl.constexpr(1)
LOOKUP_REGISTERS: tl.constexpr = tl.constexpr(2)
# Each block's 16 values scaled and rounded once, into registers (`nf4_permute.scaled_*`), then
# looked up by byte permutes: bf16 weights with bitsandbytes' code book, on a GPU; elsewhere as
# LOOKUP_NIBBLE.
LOOKUP_SCALED: tl.constexpr = tl.constexpr(3)
# Triton's interpreter (the CPU tests) runs the register lookup's kernel with the 16-entry table
# in its place; the permutes themselves are checked by `nf4_permute.emulate`.
INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
NF4_HIGH_PTX: tl.constexpr = tl.constexpr(nf4_permute.ptx(nf4_permute.program(high=True)))
NF4_LOW_PTX: tl.constexpr = tl.constexpr(nf4_permute.ptx(nf4_permute.program(high=False)))
NF4_SCALED_TABLE_PTX: tl.constexpr = tl.constexpr(
    nf4_permute.ptx(nf4_permute.scaled_table_program(), outputs=8, inputs={"scale": 8})
)
NF4_SCALED_LOOKUP_PTX: tl.constexpr = tl.constexpr(
    nf4_permute.ptx(nf4_permute.scaled_lookup_program(), outputs=8, inputs=nf4_permute.SCALED_LOOKUP_INPUTS)
)
# One word of four packed bytes a call, each element with its own planes: a tensor-core
# operand's layout may give a thread's consecutive elements rows of other blocks (wgmma's
# rows r and r + 8), so Triton's packing of four bytes cannot be trusted to share a block there.
NF4_SCALED_PAIRS_PTX: tl.constexpr = tl.constexpr(
    nf4_permute.ptx(
        nf4_permute.scaled_lookup_program(paired=True),
        outputs=4,
        inputs=nf4_permute.scaled_lookup_inputs(4, elements=1),
    )
)
# Four packed int8 weights to fp32 by byte permutes, not the compiler's quarter-rate conversion.
INT8_PTX: tl.constexpr = tl.constexpr(nf4_permute.ptx(nf4_permute.int8_program()))
# bitsandbytes' 1/127, as its int8 dequantization multiplies a row by it
RECIPROCAL_127: tl.constexpr = tl.constexpr(int8_head.RECIPROCAL_127)
# $2 and $3 rounded to bf16 into one register's upper and lower halves, then each half as fp32 bits.
BF16_PAIR_ROUND_PTX: tl.constexpr = tl.constexpr(
    "{ .reg .b32 pair; cvt.rn.bf16x2.f32 pair, $2, $3; and.b32 $0, pair, 0xffff0000; shl.b32 $1, pair, 16; }"
)


@triton.jit
def rms_rstd(x_ptr, eps, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) over x's K values, in fp32 (each program recomputes it: x is a
    few KB, cheaper to read again than a kernel of its own)."""
    cols = tl.arange(0, BLOCK_K)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        value = tl.load(x_ptr + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
        squares += value * value
    return tl.rsqrt(tl.sum(squares, axis=0) / K + eps)


@triton.jit
def matmul_input(x_ptr, norm_ptr, col, col_ok, rstd, HAS_NORM: tl.constexpr):
    """x at `col` as the matmul sees it, in fp32: with the model's RMSNorm where there is one
    (normalised in fp32, rounded, times its weight, rounded)."""
    value = tl.load(x_ptr + col, mask=col_ok, other=0.0)
    if HAS_NORM:
        dtype = value.dtype
        scale = tl.load(norm_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        value = (scale * (value.to(tl.float32) * rstd).to(dtype).to(tl.float32)).to(dtype)
    return value.to(tl.float32)


@triton.jit
def weight_values(weight, INT8_ROWS: tl.constexpr):
    """A weight tile in fp32; int8 rows (the int8 head) by byte permutes on a GPU
    (`nf4_permute.int8_program`: exact, as the conversion is)."""
    if INT8_ROWS and not INTERPRETED:
        return tl.inline_asm_elementwise(INT8_PTX, "=r,=r,=r,=r,r", [weight], dtype=tl.float32, is_pure=True, pack=4)
    return weight.to(tl.float32)


@triton.jit
def finish(
    result,
    up,
    rows,
    row_ok,
    bias_ptr,
    res_ptr,
    out_ptr,
    N,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """Store `result` (fp32 sums of `rows`) after the layer's work around the matmul: its bias;
    SiLU(gate) * up where `up` holds the up rows' sums (their bias N rows further on); the
    residual. Each step rounded as the model's eager code rounds it."""
    finish_at(result, up, rows, row_ok, rows, row_ok, bias_ptr, res_ptr, out_ptr, N, HAS_BIAS, GATED, HAS_RES)


@triton.jit
def finish_at(
    result,
    up,
    rows,
    row_ok,
    places,
    place_ok,
    bias_ptr,
    res_ptr,
    out_ptr,
    N,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """`finish` for sums laid out otherwise than the weight's rows: `rows` index the bias,
    `places` the residual and the output (a pass of several tokens: a token's row of N)."""
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if GATED:
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + rows, mask=row_ok, other=0.0).to(tl.float32)
        gate = result.to(dtype).to(tl.float32)
        activated = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        result = activated * up.to(dtype).to(tl.float32)
    if HAS_RES:
        result = tl.load(res_ptr + places, mask=place_ok, other=0.0).to(tl.float32) + result.to(dtype).to(tl.float32)
    tl.store(out_ptr + places, result.to(dtype), mask=place_ok)


@triton.jit
def matvec_kernel(
    x_ptr,
    w_ptr,
    norm_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    scale_ptr,
    N,
    eps,
    K: tl.constexpr,  # known when compiled: static loops, and Triton's interpreter needs it so
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    AHEAD: tl.constexpr = False,
    STAGES: tl.constexpr = 1,
    ROW_SCALE: tl.constexpr = False,
):
    """out[N] = w[N, K] @ x (gated: w holds gate's N rows over up's), with `finish`'s work.
    ROW_SCALE (int8 rows, `int8_head`): each row's sum times its absmax at `scale_ptr` and 1/127,
    as bitsandbytes' vector-wise int8 dequantizes the row.
    `AHEAD`: each loop step also loads the next step's x (normed) with the next weight tile, and
    a plain launch reads its weights a step ahead as a PDL launch does. Why: in the sm_90 build
    the tile loaded ahead lands in the registers of the one in use, so its load waits for the
    step's products and is waited on at the step's end; x loaded at the step's start made that
    two round trips a step where a plain loop has one. `STAGES` > 1: Triton's software pipeliner
    keeps that many steps' loads in flight through shared memory (NF4's o and down gained
    30% so on the H200); with PDL, such a program reads nothing before its wait."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_start = rows.to(tl.int64)[:, None] * K
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = acc
    if (USE_PDL or AHEAD) and STAGES == 1:
        # Programmatic dependent launch: the next kernel may start now, and this one reads its
        # first weight tile (which no earlier kernel writes) before waiting for the one before
        # to finish, so the weight stream starts under that kernel's tail. Each later tile is
        # loaded one step ahead of its use.
        if USE_PDL:
            gdc_launch_dependents()
        in_bounds = row_ok[:, None] & (cols < K)[None, :]
        weight = tl.load(w_ptr + row_start + cols[None, :], mask=in_bounds, other=0.0)
        weight_up = weight
        if GATED:
            weight_up = tl.load(w_ptr + row_start + N * K + cols[None, :], mask=in_bounds, other=0.0)
        if USE_PDL:
            gdc_wait()
        rstd = 1.0
        if HAS_NORM:
            rstd = rms_rstd(x_ptr, eps, K, BLOCK_K)
        if AHEAD:
            value = matmul_input(x_ptr, norm_ptr, cols, cols < K, rstd, HAS_NORM)[None, :]
        for start in range(0, K, BLOCK_K):
            col = start + cols
            if not AHEAD:
                value = matmul_input(x_ptr, norm_ptr, col, col < K, rstd, HAS_NORM)[None, :]
            ahead = col + BLOCK_K
            in_bounds = row_ok[:, None] & (ahead < K)[None, :]
            weight_ahead = tl.load(w_ptr + row_start + ahead[None, :], mask=in_bounds, other=0.0)
            if AHEAD:
                value_ahead = matmul_input(x_ptr, norm_ptr, ahead, ahead < K, rstd, HAS_NORM)[None, :]
            acc += weight_values(weight, ROW_SCALE) * value
            weight = weight_ahead
            if GATED:
                weight_up_ahead = tl.load(w_ptr + row_start + N * K + ahead[None, :], mask=in_bounds, other=0.0)
                acc_up += weight_values(weight_up, ROW_SCALE) * value
                weight_up = weight_up_ahead
            if AHEAD:
                value = value_ahead
    else:
        if USE_PDL:  # pipelined (STAGES > 1): nothing is read before the wait
            gdc_launch_dependents()
            gdc_wait()
        rstd = 1.0
        if HAS_NORM:
            rstd = rms_rstd(x_ptr, eps, K, BLOCK_K)
        for start in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            col = start + cols
            col_ok = col < K
            value = matmul_input(x_ptr, norm_ptr, col, col_ok, rstd, HAS_NORM)[None, :]
            in_bounds = row_ok[:, None] & col_ok[None, :]
            weight = tl.load(w_ptr + row_start + col[None, :], mask=in_bounds, other=0.0)
            acc += weight_values(weight, ROW_SCALE) * value
            if GATED:  # the up projection's rows sit N rows below the gate's
                weight_up = tl.load(w_ptr + row_start + N * K + col[None, :], mask=in_bounds, other=0.0)
                acc_up += weight_values(weight_up, ROW_SCALE) * value
    total = tl.sum(acc, axis=1)
    if ROW_SCALE:
        total = total * tl.load(scale_ptr + rows, mask=row_ok, other=0.0) * RECIPROCAL_127
    finish(
        total,
        tl.sum(acc_up, axis=1),
        rows,
        row_ok,
        bias_ptr,
        res_ptr,
        out_ptr,
        N,
        HAS_BIAS,
        GATED,
        HAS_RES,
    )


@triton.jit
def rows_dot(x, weight, acc):
    """acc + x @ weight.T on tensor cores; fp32 in full precision (tf32 would round the inputs
    that the model's own fp32 matmul keeps, and the fp32 tests compare tokens one for one)."""
    if x.dtype == tl.float32:
        return tl.dot(x, tl.trans(weight), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(weight), acc)


@triton.jit
def rows_matvec_kernel(
    x_ptr,
    w_ptr,
    norm_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    N,
    eps,
    K: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr = 1,
):
    """out[M, N] = x[M, K] @ w[N, K].T for a pass of M <= BLOCK_M tokens (a speculative check of
    drafts), with `matvec_kernel`'s work around it, each token's row as that kernel does one:
    its own RMSNorm, the bias, SiLU(gate) * up, its residual row. Each weight tile is read once
    for all the rows and multiplied on tensor cores (BLOCK_M of 16: the smallest tile they take;
    rows past M are zeros and never stored)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_start = rows.to(tl.int64)[:, None] * K
    tokens = tl.arange(0, BLOCK_M)
    token_ok = tokens < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tokens[:, None] * K
    rstd = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if HAS_NORM:  # each token's 1 / sqrt(mean(x^2) + eps), as `rms_rstd` for one
        squares = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ok = token_ok[:, None] & (start + cols < K)[None, :]
            value = tl.load(x_rows + start + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            squares += value * value
        rstd = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = acc
    for start in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        col = start + cols
        col_ok = col < K
        x = tl.load(x_rows + col[None, :], mask=token_ok[:, None] & col_ok[None, :], other=0.0)
        # As `matmul_input`: normalised in fp32, rounded, times the norm's weight, rounded. Not
        # that helper itself: its one mask would load the norm's weights once per token row.
        if HAS_NORM:
            dtype = x.dtype
            scale = tl.load(norm_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
            x = (scale[None, :] * (x.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
        in_bounds = row_ok[:, None] & col_ok[None, :]
        weight = tl.load(w_ptr + row_start + col[None, :], mask=in_bounds, other=0.0)
        acc = rows_dot(x, weight, acc)
        if GATED:  # the up projection's rows sit N rows below the gate's
            weight_up = tl.load(w_ptr + row_start + N * K + col[None, :], mask=in_bounds, other=0.0)
            acc_up = rows_dot(x, weight_up, acc_up)
    places = tokens[:, None] * N + rows[None, :]
    place_ok = token_ok[:, None] & row_ok[None, :]
    finish_at(
        acc,
        acc_up,
        rows[None, :],
        row_ok[None, :],
        places,
        place_ok,
        bias_ptr,
        res_ptr,
        out_ptr,
        N,
        HAS_BIAS,
        GATED,
        HAS_RES,
    )


@triton.jit
def nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, ok, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    """The fp32 scale of NF4 block `block`, as bitsandbytes computes it; NESTED (double quant):
    a scale is itself code2[byte] * absmax2[its block of blocks] + offset."""
    if NESTED:
        quantized = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        outer = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=ok, other=0.0)
        scale = tl.load(code2_ptr + quantized) * outer + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    return scale


@triton.jit
def nf4_values(packed, table_ptr, pairs_ptr, scale, dtype: tl.constexpr, LOOKUP: tl.constexpr):
    """The two weights of each packed byte (the high nibble's, the even column, first), in fp32,
    as bitsandbytes dequantizes them: table[code] * scale, rounded to the compute dtype. LOOKUP
    (see LOOKUP_BYTE): `pairs_ptr` holds, per byte value, both codes' table values as fp32 bits
    (high nibble's in the upper half); `table_ptr` the 16 values; or `nf4_permute`'s PTX."""
    if LOOKUP == LOOKUP_REGISTERS and not INTERPRETED:
        packed_bytes = packed.to(tl.uint8)
        high = tl.inline_asm_elementwise(
            NF4_HIGH_PTX, "=r,=r,=r,=r,r", [packed_bytes], dtype=tl.float32, is_pure=True, pack=4
        )
        low = tl.inline_asm_elementwise(
            NF4_LOW_PTX, "=r,=r,=r,=r,r", [packed_bytes], dtype=tl.float32, is_pure=True, pack=4
        )
    elif LOOKUP == LOOKUP_BYTE:
        pair = tl.load(pairs_ptr + packed)
        high = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        low = pair.to(tl.int32).to(tl.float32, bitcast=True)
    else:  # LOOKUP_NIBBLE, and the register lookup in the interpreter (no PTX there)
        high = tl.load(table_ptr + (packed >> 4))
        low = tl.load(table_ptr + (packed & 15))
    return round_pair(high * scale, low * scale, dtype)


@triton.jit
def nf4_scaled_operands(packed, scale, WORDS: tl.constexpr = False):
    """The scaled lookups' inline asm operands: each block's 16 values scaled and rounded once
    (`scale`: [rows, blocks]), as eight registers of byte planes, after the packed bytes
    (`packed`: [rows, blocks, bytes]; four bytes a call take one block's planes), or WORDS of
    four bytes each."""
    low0, low1, low2, low3, high0, high1, high2, high3 = tl.inline_asm_elementwise(
        NF4_SCALED_TABLE_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,f", [scale], dtype=(tl.int32,) * 8, is_pure=True, pack=1
    )
    if not WORDS:
        packed = packed.to(tl.uint8)
    return (
        packed,
        low0[:, :, None],
        low1[:, :, None],
        low2[:, :, None],
        low3[:, :, None],
        high0[:, :, None],
        high1[:, :, None],
        high2[:, :, None],
        high3[:, :, None],
    )


@triton.jit
def nf4_scaled_values(packed, scale):
    """`nf4_values` for bf16 weights with bitsandbytes' code book, on a GPU: each packed byte's
    two values looked up by byte permutes in its block's planes (`nf4_scaled_operands`)."""
    packed, low0, low1, low2, low3, high0, high1, high2, high3 = nf4_scaled_operands(packed, scale)
    return nf4_scaled_lookup(packed, low0, low1, low2, low3, high0, high1, high2, high3)


@triton.jit
def nf4_scaled_lookup(packed, low0, low1, low2, low3, high0, high1, high2, high3):
    """(high, low) of the packed bytes (uint8) looked up in their blocks' planes."""
    constraints: tl.constexpr = "=r,=r,=r,=r,=r,=r,=r,=r" + ",r" * 33
    operands = [packed, low0, low1, low2, low3, high0, high1, high2, high3]
    return tl.inline_asm_elementwise(
        NF4_SCALED_LOOKUP_PTX, constraints, operands, dtype=(tl.float32, tl.float32), is_pure=True, pack=4
    )


@triton.jit
def nf4_scaled_pairs(words, scale):
    """`nf4_scaled_values` as one int32 a packed byte: its two weights as a bf16 pair, the even
    column's in the lower half, as a tensor-core multiply takes them. `words`: [rows, blocks,
    words] of four packed bytes each (`nf4_words`); returns [rows, blocks, 4 * words], in the
    bytes' order."""
    constraints: tl.constexpr = "=r,=r,=r,=r" + ",r" * 9
    operands = nf4_scaled_operands(words, scale, WORDS=True)
    pair0, pair1, pair2, pair3 = tl.inline_asm_elementwise(
        NF4_SCALED_PAIRS_PTX, constraints, operands, dtype=(tl.int32,) * 4, is_pure=True, pack=1
    )
    # [..., words, 4]: join's new axis is last, so the pairs 0, 2 and 1, 3 go in first
    pairs = tl.join(tl.join(pair0, pair2), tl.join(pair1, pair3))
    return tl.reshape(pairs, (words.shape[0], words.shape[1], 4 * words.shape[2]))


@triton.jit
def nf4_words(packed_ptr, rows3, block_col, row_ok3, K: tl.constexpr, WORDS: tl.constexpr):
    """Whole NF4 blocks' packed bytes at block columns `block_col` of rows `rows3`, as int32
    words of four ([rows, blocks, WORDS]; byte k of a word is the k-th of its four: little
    endian). A row's K / 2 bytes are a whole number of words where its blocks are aligned."""
    word = block_col * WORDS + tl.arange(0, WORDS)[None, None, :]
    ok = row_ok3 & (word < K // 8)
    return tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + rows3 * (K // 8) + word, mask=ok, other=0)


@triton.jit
def round_pair(first, second, dtype: tl.constexpr):
    """Both fp32 values rounded to `dtype` and back to fp32. In bf16 on the GPU one packed
    conversion rounds the two (the same round to nearest even as two single ones: single
    conversions run at an eighth of the float rate and were one per NF4 weight) and bit
    operations widen them again."""
    if dtype == tl.bfloat16 and not INTERPRETED:
        first, second = tl.inline_asm_elementwise(
            BF16_PAIR_ROUND_PTX, "=r,=r,f,f", [first, second], dtype=(tl.float32, tl.float32), is_pure=True, pack=1
        )
    else:
        first, second = first.to(dtype).to(tl.float32), second.to(dtype).to(tl.float32)
    return first, second


@triton.jit
def nf4_bytes(packed_ptr, rows3, half, ok, K: tl.constexpr):
    """The packed bytes at `half` of rows `rows3` (two codes each), as int32 (0 where not `ok`)."""
    return tl.load(packed_ptr + rows3 * (K // 2) + half, mask=ok, other=0).to(tl.int32)


@triton.jit
def nf4_block_scales(
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    rows3,
    block_col,
    block_ok,
    K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
):
    """An ALIGNED tile's scales, one a row and block, as [rows, blocks] (`nf4_scale`)."""
    shape: tl.constexpr = (rows3.shape[0], block_col.shape[1])
    block = tl.reshape(rows3 * (K // BLOCKSIZE) + block_col, shape)
    scale_ok = tl.reshape(block_ok, shape)
    return nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, scale_ok, NESTED, BLOCKSIZE2)


@triton.jit
def nf4_tile(
    packed,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    table_ptr,
    pairs_ptr,
    rows3,
    block_col,
    half,
    ok,
    block_ok,
    dtype: tl.constexpr,
    K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    LOOKUP: tl.constexpr,
):
    """The weights at columns 2*half and 2*half + 1 of rows `rows3` of one bitsandbytes NF4
    weight (`nf4_values`) from its `packed` bytes there (`nf4_bytes`), on a [rows, block
    columns, bytes] tile (`ok`: which are in). ALIGNED (blocks lie within rows, whole blocks in
    the tile, as in every real model): one scale load per row and block (`block_ok`), broadcast
    over its bytes; else each byte finds its own block's scale (blocks may straddle rows)."""
    byte = rows3 * (K // 2) + half
    if ALIGNED and (LOOKUP == LOOKUP_REGISTERS or LOOKUP == LOOKUP_SCALED):
        # Loaded as [rows, blocks] and broadcast over the bytes: then the compiler keeps the
        # decoding in the packed bytes' layout (a [rows, blocks, 1] load gets a layout of its
        # own, and the whole tile was moved into it through shared memory).
        scale = nf4_block_scales(
            absmax_ptr, absmax2_ptr, code2_ptr, offset, rows3, block_col, block_ok, K, BLOCKSIZE, BLOCKSIZE2, NESTED
        )
        if LOOKUP == LOOKUP_SCALED and dtype == tl.bfloat16 and not INTERPRETED:
            high, low = nf4_scaled_values(packed, scale)
        else:
            high, low = nf4_values(packed, table_ptr, pairs_ptr, scale[:, :, None], dtype, LOOKUP)
    else:
        if ALIGNED:
            block = rows3 * (K // BLOCKSIZE) + block_col
            scale_ok = block_ok
        else:
            block = (byte * 2) // BLOCKSIZE
            scale_ok = ok
        scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, scale_ok, NESTED, BLOCKSIZE2)
        high, low = nf4_values(packed, table_ptr, pairs_ptr, scale, dtype, LOOKUP)
    return high, low


@triton.jit
def x_pairs(x_ptr, norm_ptr, flat, flat_ok, rstd, HAS_NORM: tl.constexpr):
    """bf16 x at the even and odd columns of packed bytes `flat`, as the matmul sees it
    (`matmul_input`), in fp32: each byte's two columns read as one word, as x and the norm's
    weight are stored, and normalised as a pair (`round_pair`)."""
    words = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + flat, mask=flat_ok, other=0)
    even = (words << 16).to(tl.float32, bitcast=True)
    odd = (words & -65536).to(tl.float32, bitcast=True)
    if HAS_NORM:
        scales = tl.load(norm_ptr.to(tl.pointer_type(tl.int32)) + flat, mask=flat_ok, other=0)
        even, odd = round_pair(even * rstd, odd * rstd, tl.bfloat16)
        scale_even = (scales << 16).to(tl.float32, bitcast=True)
        scale_odd = (scales & -65536).to(tl.float32, bitcast=True)
        even, odd = round_pair(scale_even * even, scale_odd * odd, tl.bfloat16)
    return even, odd


@triton.jit
def nf4_x_pair(
    x_ptr,
    norm_ptr,
    half,
    rstd,
    K: tl.constexpr,
    HAS_NORM: tl.constexpr,
    LOOKUP: tl.constexpr,
    X_WORDS: tl.constexpr = False,
):
    """x at the even and odd columns of packed bytes `half` ([1, blocks, bytes]), as the matmul
    sees it (`matmul_input`). For the register lookups, a [blocks, bytes] load broadcast over
    the rows, for the reason the scales are (`nf4_tile`): only these small tiles change layout,
    not the weights'. X_WORDS (bf16 x and norm weight, 4-byte aligned): a byte's two columns
    are read as one word and normalised and widened to fp32 there, a few a thread (`x_pairs`),
    then moved into the tile's layout joined, as one fp32 pair: the sm_90 loops then take one
    exchange through shared memory a step, not two (two barriers, not four), and their threads
    no longer widen each x value they multiply (the exchange moved bf16 values before): 8-19%
    fewer instructions a weight in the 1.7B's shapes."""
    if X_WORDS and (LOOKUP == LOOKUP_REGISTERS or LOOKUP == LOOKUP_SCALED):
        flat = tl.reshape(half, (half.shape[1], half.shape[2]))
        even, odd = x_pairs(x_ptr, norm_ptr, flat, flat < K // 2, rstd, HAS_NORM)
        # joined, the pair changes layout once, and as fp32 (apart, the compiler moved each
        # before widening it)
        even, odd = tl.split(tl.join(even, odd)[None, :, :, :])
    elif LOOKUP == LOOKUP_REGISTERS or LOOKUP == LOOKUP_SCALED:
        flat = tl.reshape(half, (half.shape[1], half.shape[2]))
        flat_ok = flat < K // 2
        even = matmul_input(x_ptr, norm_ptr, 2 * flat, flat_ok, rstd, HAS_NORM)[None, :, :]
        odd = matmul_input(x_ptr, norm_ptr, 2 * flat + 1, flat_ok, rstd, HAS_NORM)[None, :, :]
    else:
        half_ok = half < K // 2
        even = matmul_input(x_ptr, norm_ptr, 2 * half, half_ok, rstd, HAS_NORM)
        odd = matmul_input(x_ptr, norm_ptr, 2 * half + 1, half_ok, rstd, HAS_NORM)
    return even, odd


@triton.jit
def nf4_tile_halves(
    packed,
    packed2,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    table_ptr,
    pairs_ptr,
    rows3,
    block_col,
    half,
    half2,
    ok,
    ok2,
    block_ok,
    dtype: tl.constexpr,
    K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    LOOKUP: tl.constexpr,
):
    """`nf4_tile` of an ALIGNED tile read as two tiles of the same shape, each block's first
    bytes (`packed` at `half`) and its last (`packed2` at `half2`): the two take the same
    layout, so a thread holds both halves of its blocks and builds each block's scaled values
    once for all its weights (with one tile of whole blocks two threads share a block, and each
    builds them). Returns both tiles' (high, low)."""
    if LOOKUP == LOOKUP_SCALED and dtype == tl.bfloat16 and not INTERPRETED:
        scale = nf4_block_scales(
            absmax_ptr, absmax2_ptr, code2_ptr, offset, rows3, block_col, block_ok, K, BLOCKSIZE, BLOCKSIZE2, NESTED
        )
        packed, low0, low1, low2, low3, high0, high1, high2, high3 = nf4_scaled_operands(packed, scale)
        high, low = nf4_scaled_lookup(packed, low0, low1, low2, low3, high0, high1, high2, high3)
        high2, low2 = nf4_scaled_lookup(packed2.to(tl.uint8), low0, low1, low2, low3, high0, high1, high2, high3)
    else:
        high, low = nf4_tile(
            packed, absmax_ptr, absmax2_ptr, code2_ptr, offset, table_ptr, pairs_ptr, rows3, block_col, half, ok,
            block_ok, dtype, K, BLOCKSIZE, BLOCKSIZE2, NESTED, True, LOOKUP,
        )  # fmt: skip
        high2, low2 = nf4_tile(
            packed2, absmax_ptr, absmax2_ptr, code2_ptr, offset, table_ptr, pairs_ptr, rows3, block_col, half2, ok2,
            block_ok, dtype, K, BLOCKSIZE, BLOCKSIZE2, NESTED, True, LOOKUP,
        )  # fmt: skip
    return high, low, high2, low2


@triton.jit
def nf4_dot_tile(
    packed,
    words,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    table_ptr,
    pairs_ptr,
    rows3,
    block_col,
    half,
    ok,
    block_ok,
    dtype: tl.constexpr,
    K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    LOOKUP: tl.constexpr,
):
    """An ALIGNED tile's weights as a tensor-core multiply's [rows, 2 * bytes] operand, in the
    model's dtype, its K in `dot_columns`' order: block fastest. Then the wgmma operand layout
    (four lanes along K) gives each thread all the bytes of one block, whose 16 values the
    scaled lookup builds once for 64 weights (in the tile's own order, once for 16). `packed`:
    the tile's bytes; `words`: the same as `nf4_words` (read by the scaled lookup on a GPU)."""
    rows: tl.constexpr = rows3.shape[0]
    blocks: tl.constexpr = block_col.shape[1]
    bytes_: tl.constexpr = half.shape[2]
    if LOOKUP == LOOKUP_SCALED and dtype == tl.bfloat16 and not INTERPRETED:  # the kernel reads words then
        scale = nf4_block_scales(
            absmax_ptr, absmax2_ptr, code2_ptr, offset, rows3, block_col, block_ok, K, BLOCKSIZE, BLOCKSIZE2, NESTED
        )
        pairs = tl.reshape(tl.permute(nf4_scaled_pairs(words, scale), (0, 2, 1)), (rows, blocks * bytes_))
        even = (pairs & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
        odd = (pairs >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        tile = tl.reshape(tl.join(even, odd), (rows, 2 * blocks * bytes_))
    else:
        high, low = nf4_tile(
            packed, absmax_ptr, absmax2_ptr, code2_ptr, offset, table_ptr, pairs_ptr, rows3, block_col, half, ok,
            block_ok, dtype, K, BLOCKSIZE, BLOCKSIZE2, NESTED, True, LOOKUP,
        )  # fmt: skip
        tile = tl.reshape(tl.permute(tl.join(high, low), (0, 2, 1, 3)), (rows, 2 * blocks * bytes_)).to(dtype)
    return tile


@triton.jit
def dot_columns(first, BLOCK_K: tl.constexpr, TILE_BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """The columns of x that `nf4_dot_tile`'s K order holds, from column `first` on: pair p is
    byte p // TILE_BLOCKS of block p % TILE_BLOCKS, each pair's even column first."""
    k = tl.arange(0, BLOCK_K)
    pair = k // 2
    return first + (pair % TILE_BLOCKS) * BLOCKSIZE + (pair // TILE_BLOCKS) * 2 + k % 2


@triton.jit
def nf4_matvec_kernel(
    x_ptr,
    norm_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    table_ptr,
    pairs_ptr,
    packed0,
    absmax0,
    outer0,
    code0,
    offset0,
    packed1,
    absmax1,
    outer1,
    code1,
    offset1,
    packed2,
    absmax2,
    outer2,
    code2,
    offset2,
    rows0,
    rows1,
    N,
    eps,
    partial_ptr,
    counter_ptr,
    K: tl.constexpr,
    PARTS: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ALIGNED: tl.constexpr = False,
    TILE_BLOCKS: tl.constexpr = 1,
    LOOKUP: tl.constexpr = 0,
    PREFETCH: tl.constexpr = False,
    NUM_STAGES: tl.constexpr = 1,
    USE_PDL: tl.constexpr = False,
    DOT: tl.constexpr = False,
    SPLITS: tl.constexpr = 1,
    PDL_LATE: tl.constexpr = False,
    HALVES: tl.constexpr = 1,
    X_WORDS: tl.constexpr = False,
):
    """out[N] from up to three NF4 weights of K columns stacked (q, k, v: `rows0`, `rows1`
    rows, then the rest), each read in bitsandbytes' own layout, with `finish`'s work. GATED:
    part 0 is gate and part 1 up, both of N rows. A program's rows lie in one part (the launch
    shape's row block divides every part's rows). PREFETCH: each loop step loads the next
    step's packed bytes before it decodes its own, so their reads overlap the decoding.
    NUM_STAGES: Triton pipelines the loop's loads that many steps deep through shared memory
    (NF4 reads a quarter of bf16's bytes a weight, so a step's loads alone keep too few bytes in
    flight to cover memory's latency). DOT (ALIGNED): tensor cores sum the products
    (`nf4_dot_tile`), with x as the one non-zero column of a [K, 16] operand; they leave the
    decoding fewer instructions a weight. SPLITS: programs share a row block's columns (a DOT
    program holds 64 rows, too few programs otherwise); each stores its sums in `partial_ptr`
    [parts of the result, SPLITS, N] and the last to finish, counted in `counter_ptr` (one per
    row block, zero on entry and left zero), adds them in order and finishes the rows.
    USE_PDL: the next kernel may launch at a program's start, or (PDL_LATE) once its loop is
    done; a prefetched first step's bytes are read before the wait for the kernel before.
    HALVES = 2 (ALIGNED, not DOT or PREFETCH): a step's blocks are read as two tiles of half
    a block each (`nf4_tile_halves`), so a thread decodes whole blocks. X_WORDS: x's columns
    read in pairs (`nf4_x_pair`)."""
    dtype = out_ptr.dtype.element_ty
    first = tl.program_id(0) * BLOCK_N
    rows = first + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    packed, absmax, outer, code, offset, base = packed0, absmax0, outer0, code0, offset0, 0
    if PARTS > 1 and not GATED:
        if first >= rows0:
            packed, absmax, outer, code, offset, base = packed1, absmax1, outer1, code1, offset1, rows0
        if PARTS > 2:
            if first >= rows0 + rows1:
                packed, absmax, outer, code, offset, base = packed2, absmax2, outer2, code2, offset2, rows0 + rows1
    local_rows = rows - base
    if USE_PDL and not PDL_LATE:  # the next kernel may launch now
        gdc_launch_dependents()
    # Tiles are [rows, block columns, bytes]: ALIGNED, TILE_BLOCKS whole NF4 blocks of
    # BLOCKSIZE / 2 bytes (`nf4_tile` loads a block's scale once); else one column of BLOCK_K / 2.
    rows3 = local_rows.to(tl.int64)[:, None, None]
    row_ok3 = row_ok[:, None, None]
    blocks = tl.arange(0, TILE_BLOCKS)[None, :, None]
    # the bytes of each block a tile holds: all of them, or (HALVES) half, read twice a step
    BYTES: tl.constexpr = BLOCK_K // (2 * TILE_BLOCKS * HALVES)
    inner = tl.arange(0, BYTES)[None, None, :]
    acc = tl.zeros([BLOCK_N, TILE_BLOCKS, BYTES], dtype=tl.float32)
    acc_up = acc
    lanes = tl.arange(0, 16)[None, :]
    acc_dot = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    acc_dot_up = acc_dot
    ahead = tl.zeros([BLOCK_N, TILE_BLOCKS, BYTES], dtype=tl.int32)
    ahead_up = ahead
    # this program's share of the columns, in packed bytes; unsplit, known at compile time (a
    # share read from the program id cost the sm_90 FMA loops 4-7% more instructions)
    begin = 0
    if SPLITS > 1:
        begin = tl.program_id(1) * (K // (2 * SPLITS))
    end = begin + K // (2 * SPLITS)
    if PREFETCH:  # the first step's bytes: no kernel writes weights, so before the wait
        first_half = begin + blocks * (BLOCK_K // (2 * TILE_BLOCKS)) + inner
        first_ok = row_ok3 & (first_half < end)
        ahead = nf4_bytes(packed, rows3, first_half, first_ok, K)
        if GATED:
            ahead_up = nf4_bytes(packed1, rows3, first_half, first_ok, K)
    if USE_PDL:  # x and the residual come from the kernel before
        gdc_wait()
    rstd = 1.0
    if HAS_NORM:
        rstd = rms_rstd(x_ptr, eps, K, BLOCK_K)
    for step in tl.range(0, K // (2 * SPLITS), BLOCK_K // 2, num_stages=NUM_STAGES):
        start = begin + step
        block_col = start // (BLOCK_K // (2 * TILE_BLOCKS)) + blocks
        half = block_col * (BLOCK_K // (2 * TILE_BLOCKS)) + inner
        half_ok = half < K // 2
        ok = row_ok3 & half_ok
        if PREFETCH:
            codes, codes_up = ahead, ahead_up
            next_half = half + BLOCK_K // 2
            next_ok = row_ok3 & (next_half < end)
            ahead = nf4_bytes(packed, rows3, next_half, next_ok, K)
            if GATED:
                ahead_up = nf4_bytes(packed1, rows3, next_half, next_ok, K)
        else:
            codes = nf4_bytes(packed, rows3, half, ok, K)
            codes_up = codes
            if GATED:
                codes_up = nf4_bytes(packed1, rows3, half, ok, K)
        even, odd = nf4_x_pair(x_ptr, norm_ptr, half, rstd, K, HAS_NORM, LOOKUP, X_WORDS)
        block_ok = row_ok3 & (block_col < K // BLOCKSIZE)
        if DOT:
            columns = dot_columns(2 * start, BLOCK_K, TILE_BLOCKS, BLOCKSIZE)
            x_column = matmul_input(x_ptr, norm_ptr, columns, columns < K, rstd, HAS_NORM)
            x_tile = tl.where(lanes == 0, x_column[:, None], 0.0).to(dtype)
            words, words_up = codes, codes_up  # unread unless the lookup takes words
            if LOOKUP == LOOKUP_SCALED and dtype == tl.bfloat16 and not INTERPRETED:  # nf4_dot_tile's asm
                words = nf4_words(packed, rows3, block_col, row_ok3, K, BLOCKSIZE // 8)
                if GATED:
                    words_up = nf4_words(packed1, rows3, block_col, row_ok3, K, BLOCKSIZE // 8)
            tile = nf4_dot_tile(
                codes, words, absmax, outer, code, offset, table_ptr, pairs_ptr, rows3, block_col, half, ok,
                block_ok, dtype, K, BLOCKSIZE, BLOCKSIZE2, NESTED, LOOKUP,
            )  # fmt: skip
            acc_dot = tl.dot(tile, x_tile, acc_dot)
            if GATED:
                tile = nf4_dot_tile(
                    codes_up, words_up, absmax1, outer1, code1, offset1, table_ptr, pairs_ptr, rows3, block_col, half,
                    ok, block_ok, dtype, K, BLOCKSIZE, BLOCKSIZE2, NESTED, LOOKUP,
                )  # fmt: skip
                acc_dot_up = tl.dot(tile, x_tile, acc_dot_up)
        elif HALVES == 2:
            half2 = half + BYTES  # each block's last bytes
            ok2 = row_ok3 & (half2 < K // 2)
            even2, odd2 = nf4_x_pair(x_ptr, norm_ptr, half2, rstd, K, HAS_NORM, LOOKUP, X_WORDS)
            high, low, high2, low2 = nf4_tile_halves(
                codes, nf4_bytes(packed, rows3, half2, ok2, K), absmax, outer, code, offset, table_ptr, pairs_ptr,
                rows3, block_col, half, half2, ok, ok2, block_ok, dtype, K, BLOCKSIZE, BLOCKSIZE2, NESTED, LOOKUP,
            )  # fmt: skip
            acc += high * even
            acc += low * odd
            acc += high2 * even2
            acc += low2 * odd2
            if GATED:
                high, low, high2, low2 = nf4_tile_halves(
                    codes_up, nf4_bytes(packed1, rows3, half2, ok2, K), absmax1, outer1, code1, offset1, table_ptr,
                    pairs_ptr, rows3, block_col, half, half2, ok, ok2, block_ok, dtype, K, BLOCKSIZE, BLOCKSIZE2,
                    NESTED, LOOKUP,
                )  # fmt: skip
                acc_up += high * even
                acc_up += low * odd
                acc_up += high2 * even2
                acc_up += low2 * odd2
        else:
            high, low = nf4_tile(
                codes, absmax, outer, code, offset, table_ptr, pairs_ptr, rows3, block_col, half, ok, block_ok,
                dtype, K, BLOCKSIZE, BLOCKSIZE2, NESTED, ALIGNED, LOOKUP,
            )  # fmt: skip
            # two fused multiply-adds (a sum of the products first took a multiply, an fma and an add)
            acc += high * even
            acc += low * odd
            if GATED:  # gate and up: both parts of N rows, so local rows are rows
                high, low = nf4_tile(
                    codes_up, absmax1, outer1, code1, offset1, table_ptr, pairs_ptr, rows3, block_col, half, ok,
                    block_ok, dtype, K, BLOCKSIZE, BLOCKSIZE2, NESTED, ALIGNED, LOOKUP,
                )  # fmt: skip
                acc_up += high * even
                acc_up += low * odd
    if USE_PDL and PDL_LATE:  # the next kernel's programs take room only as this one's finish
        gdc_launch_dependents()
    if DOT:  # the other 15 columns of x's operand are zero
        total = tl.sum(acc_dot, axis=1)
        total_up = tl.sum(acc_dot_up, axis=1)
    else:
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
        total_up = tl.sum(tl.sum(acc_up, axis=2), axis=1)
    if SPLITS > 1:
        share = tl.program_id(1)
        tl.store(partial_ptr + share * N + rows, total, mask=row_ok)
        if GATED:
            tl.store(partial_ptr + (SPLITS + share) * N + rows, total_up, mask=row_ok)
        # as decode_attention's shares: every thread's stores issued before the count that
        # publishes them (release); the last program reads the others' after it (acquire)
        tl.debug_barrier()
        finished = tl.atomic_add(counter_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if finished == SPLITS - 1:
            shares = tl.arange(0, SPLITS)[:, None]
            ok2 = row_ok[None, :]
            at = partial_ptr + shares * N + rows[None, :]
            total = tl.sum(tl.load(at, mask=ok2, other=0.0, cache_modifier=".cg"), axis=0)
            if GATED:
                at = partial_ptr + (SPLITS + shares) * N + rows[None, :]
                total_up = tl.sum(tl.load(at, mask=ok2, other=0.0, cache_modifier=".cg"), axis=0)
            finish(total, total_up, rows, row_ok, bias_ptr, res_ptr, out_ptr, N, HAS_BIAS, GATED, HAS_RES)
            tl.atomic_xchg(counter_ptr + tl.program_id(0), 0)  # ready for the next launch
    else:
        finish(total, total_up, rows, row_ok, bias_ptr, res_ptr, out_ptr, N, HAS_BIAS, GATED, HAS_RES)


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
    partial_ptr,
    counter_ptr,
    scale,
    capacity,
    Q_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SPLITS: tl.constexpr = 1,
    USE_PDL: tl.constexpr = False,
):
    """One program per query head and share of the filled slots (`SPLITS` shares: one program
    per head keeps too few loads in flight to fill the GPU). Each share's online softmax goes to
    `partial_ptr` [Q_HEADS, SPLITS, HEAD_DIM + 2] (fp32: running max, sum, weighted values); the
    last program of a head to finish, counted in `counter_ptr` [Q_HEADS] (zero on entry, zero
    again on exit), combines them, so one launch does it all."""
    dtype = out_ptr.dtype.element_ty
    head = tl.program_id(0)
    share = tl.program_id(1)
    group = head // (Q_HEADS // KV_HEADS)
    position = tl.load(position_ptr)
    dims = tl.arange(0, HEAD_DIM)
    group_start = group.to(tl.int64) * capacity
    # This share of slots 0..position-1 (whole slot blocks; the last shares may be empty). Its
    # first block is loaded before waiting on the kernel before: the slots were written by
    # earlier replays of the step (complete before this one began), not by that kernel, so with
    # PDL their reading overlaps its tail. Each later block is loaded one loop step ahead.
    per_share = tl.cdiv(tl.cdiv(position, SPLITS), BLOCK_T) * BLOCK_T
    start = share * per_share
    end = tl.minimum(start + per_share, position)
    slots = start + tl.arange(0, BLOCK_T)
    at = (group_start + slots)[:, None] * HEAD_DIM + dims[None, :]
    keys = tl.load(keys_ptr + at, mask=(slots < end)[:, None], other=0.0)
    values = tl.load(values_ptr + at, mask=(slots < end)[:, None], other=0.0)
    if USE_PDL:  # the next kernel may launch now; q/k/v come from the kernel before
        gdc_launch_dependents()
        gdc_wait()
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
    if share == 0 and head % (Q_HEADS // KV_HEADS) == 0:  # one program per kv head writes the slot
        tl.store(keys_ptr + (group_start + position) * HEAD_DIM + dims, key)
        tl.store(values_ptr + (group_start + position) * HEAD_DIM + dims, value)
    tl.store(length_ptr, position + 1)  # the same value from every program
    # Online softmax over this share of the cache's slots; the first share starts from the new
    # token's own score, its slot used from registers, so no program waits on another's write.
    query_scaled = query.to(tl.float32) * scale
    own = tl.sum(query_scaled * key.to(tl.float32), axis=0)
    if share == 0:
        best = own
        total = own * 0.0 + 1.0
        acc = value.to(tl.float32)
    else:
        best = own * 0.0 - float("inf")
        total = own * 0.0
        acc = value.to(tl.float32) * 0.0
    while start < end:
        filled = slots < end
        scores = tl.sum(keys.to(tl.float32) * query_scaled[None, :], axis=1)
        scores = tl.where(filled, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        shrink = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best)
        acc = acc * shrink + tl.sum(weights[:, None] * values.to(tl.float32), axis=0)
        total = total * shrink + tl.sum(weights, axis=0)
        best = new_best
        start += BLOCK_T
        # the next block's keys and values, both issued before either is used (none past `end`)
        slots = start + tl.arange(0, BLOCK_T)
        at = (group_start + slots)[:, None] * HEAD_DIM + dims[None, :]
        keys = tl.load(keys_ptr + at, mask=(slots < end)[:, None], other=0.0)
        values = tl.load(values_ptr + at, mask=(slots < end)[:, None], other=0.0)
    if SPLITS == 1:
        tl.store(out_ptr + head * HEAD_DIM + dims, (acc / total).to(dtype))
    else:
        row = partial_ptr + (head * SPLITS + share) * (HEAD_DIM + 2)
        tl.store(row + dims, acc)
        tl.store(row + HEAD_DIM, best)
        tl.store(row + HEAD_DIM + 1, total)
        # Every thread's stores are issued before the count that publishes them (release),
        # and the last program reads the others' after it (acquire), past the L1 cache.
        tl.debug_barrier()
        finished = tl.atomic_add(counter_ptr + head, 1, sem="acq_rel", scope="gpu")
        if finished == SPLITS - 1:
            rows = partial_ptr + (head * SPLITS + tl.arange(0, SPLITS)) * (HEAD_DIM + 2)
            bests = tl.load(rows + HEAD_DIM, cache_modifier=".cg")
            totals = tl.load(rows + HEAD_DIM + 1, cache_modifier=".cg")
            accs = tl.load(rows[:, None] + dims[None, :], cache_modifier=".cg")
            top = tl.max(bests, axis=0)
            weights = tl.exp(bests - top)  # an empty share's -inf gives 0
            combined = tl.sum(weights[:, None] * accs, axis=0) / tl.sum(weights * totals, axis=0)
            tl.store(out_ptr + head * HEAD_DIM + dims, combined.to(dtype))
            tl.atomic_xchg(counter_ptr + head, 0)  # ready for the next launch
