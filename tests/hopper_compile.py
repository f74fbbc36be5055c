"""Compile every Triton kernel variant the app launches for Hopper (sm_90), with no GPU.

Triton's wheel carries ptxas, so a kernel that would not compile on the lent H200 (a type that
differs between branches, a bad constexpr) fails here, in CI, instead of on scarce device time.
Run by tests/test_triton_layers.py in a process of its own: the interpreter the other tests
switch on would turn the kernels into Python.
"""

from __future__ import annotations

import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from playground.backends import triton_source

HOPPER = GPUTarget("cuda", 90, 32)
BF16 = "*bf16"
MATVEC_ARGS = {name: BF16 for name in ("x_ptr", "w_ptr", "norm_ptr", "bias_ptr", "res_ptr", "out_ptr")}
MATVEC_ARGS |= {"scale_ptr": "*fp32"}
NF4_PART = {"packed": "*u8", "absmax": "*u8", "outer": "*fp32", "code": "*fp32", "offset": "fp32"}


def layer_work(norm: bool, bias: bool, gated: bool, residual: bool) -> dict:
    """Both matvec kernels' flags for what the layer does around the matmul."""
    return dict(HAS_NORM=norm, HAS_BIAS=bias, GATED=gated, HAS_RES=residual)


def matvec(
    norm: bool,
    bias: bool,
    gated: bool,
    residual: bool,
    pdl: bool = False,
    ahead: bool = False,
    stages: int = 1,
    int8_rows: bool = False,
) -> tuple:
    signature = MATVEC_ARGS | {"N": "i32", "eps": "fp32"}
    if int8_rows:  # the int8 head: int8 weights, each row's sum scaled
        signature |= {"w_ptr": "*i8"}
    work = layer_work(norm, bias, gated, residual)
    constants = dict(K=2048, **work, BLOCK_N=8, BLOCK_K=512, USE_PDL=pdl, AHEAD=ahead, STAGES=stages)
    constants |= dict(ROW_SCALE=int8_rows)
    return triton_source.matvec_kernel, signature, constants


def nf4(
    parts: int,
    nested: bool,
    norm: bool,
    bias: bool,
    gated: bool,
    residual: bool,
    pdl: bool = False,
    aligned: bool = True,
    lookup: int = 0,  # triton_source.LOOKUP_BYTE, LOOKUP_NIBBLE, LOOKUP_REGISTERS, LOOKUP_SCALED
    prefetch: bool = False,
    stages: int = 1,
    dot: bool = False,
    splits: int = 1,
    pdl_late: bool = False,
    halves: int = 1,
    block_n: int = 8,
    x_words: bool = True,  # bf16 x at an aligned address, as on the GPU
) -> tuple:
    signature = {name: BF16 for name in ("x_ptr", "norm_ptr", "bias_ptr", "res_ptr", "out_ptr")}
    signature |= {"table_ptr": "*fp32", "pairs_ptr": "*i64"}
    for index in range(3):
        for name, kind in NF4_PART.items():
            kind = kind if nested or name != "absmax" else "*fp32"
            signature[f"{name}{index}"] = kind
    signature |= {
        "rows0": "i32",
        "rows1": "i32",
        "N": "i32",
        "eps": "fp32",
        "partial_ptr": "*fp32",
        "counter_ptr": "*i32",
    }
    constants = dict(
        K=2048,
        PARTS=parts,
        NESTED=nested,
        BLOCKSIZE=64,
        BLOCKSIZE2=256,
        **layer_work(norm, bias, gated, residual),
        BLOCK_N=64 if dot else block_n,  # a wgmma program's rows
        BLOCK_K=256 if dot else 512,
        ALIGNED=aligned,
        TILE_BLOCKS=(256 if dot else 512) // 64 if aligned else 1,
        LOOKUP=lookup,
        PREFETCH=prefetch,
        NUM_STAGES=stages,
        USE_PDL=pdl,
        DOT=dot,
        SPLITS=splits,
        PDL_LATE=pdl_late,
        HALVES=halves,
        X_WORDS=x_words,
    )
    return triton_source.nf4_matvec_kernel, signature, constants


def rows(norm: bool, bias: bool, gated: bool, residual: bool, stages: int = 1, wide: bool = False) -> tuple:
    """The rows kernel (passes of several tokens) in bf16, its dot on tensor cores; `wide`: 16
    rows by 512 columns a loop step, else 32 by 128."""
    signature = {name: BF16 for name in ("x_ptr", "w_ptr", "norm_ptr", "bias_ptr", "res_ptr", "out_ptr")}
    signature |= {"M": "i32", "N": "i32", "eps": "fp32"}
    work = layer_work(norm, bias, gated, residual)
    block = dict(BLOCK_N=16, BLOCK_K=512) if wide else dict(BLOCK_N=32, BLOCK_K=128)
    constants = dict(K=2048, **work, BLOCK_M=16, **block, STAGES=stages)
    return triton_source.rows_matvec_kernel, signature, constants


def attention(pdl: bool = False, splits: int = 1) -> tuple:
    signature = {name: BF16 for name in ("qkv_ptr", "cos_ptr", "sin_ptr", "keys_ptr", "values_ptr", "out_ptr")}
    signature |= {"position_ptr": "*i64", "length_ptr": "*i64", "scale": "fp32", "capacity": "i32"}
    signature |= {"partial_ptr": "*fp32", "counter_ptr": "*i32"}
    constants = dict(
        Q_HEADS=16, KV_HEADS=2, HEAD_DIM=128, BLOCK_T=128 if splits == 1 else 32, SPLITS=splits, USE_PDL=pdl
    )
    return triton_source.attention_kernel, signature, constants


# What a layer launches: q/k/v (norm, bias), o and down (residual), gate/up (norm, gated).
VARIANTS = {
    "matvec qkv": matvec(norm=True, bias=True, gated=False, residual=False),
    "matvec gate/up": matvec(norm=True, bias=False, gated=True, residual=False),
    "matvec o/down": matvec(norm=False, bias=False, gated=False, residual=True),
    "nf4 qkv, double quant": nf4(3, nested=True, norm=True, bias=True, gated=False, residual=False),
    "nf4 gate/up": nf4(2, nested=False, norm=True, bias=False, gated=True, residual=False),
    "nf4 o/down, double quant": nf4(1, nested=True, norm=False, bias=False, gated=False, residual=True),
    "nf4 gate/up, blocks straddling rows": nf4(
        2, nested=False, norm=True, bias=False, gated=True, residual=False, aligned=False
    ),
    "nf4 gate/up, by nibble": nf4(2, nested=False, norm=True, bias=False, gated=True, residual=False, lookup=1),
    "nf4 o/down, double quant, by nibble": nf4(
        1, nested=True, norm=False, bias=False, gated=False, residual=True, lookup=1
    ),
    "nf4 gate/up, by nibble, prefetched": nf4(
        2, nested=False, norm=True, bias=False, gated=True, residual=False, lookup=1, prefetch=True
    ),
    "nf4 qkv, double quant, prefetched": nf4(
        3, nested=True, norm=True, bias=True, gated=False, residual=False, prefetch=True
    ),
    "nf4 o/down, double quant, by nibble, pipelined": nf4(
        1, nested=True, norm=False, bias=False, gated=False, residual=True, lookup=1, stages=3
    ),
    # the lookups in registers: byte permutes (2), and each block's values scaled once (3, bf16)
    **{
        f"nf4 {case}, {name}": nf4(**arguments, lookup=lookup)
        for name, lookup in (("registers", 2), ("scaled", 3))
        for case, arguments in {
            "gate/up": dict(parts=2, nested=False, norm=True, bias=False, gated=True, residual=False),
            "qkv, double quant, prefetched": dict(
                parts=3, nested=True, norm=True, bias=True, gated=False, residual=False, prefetch=True
            ),
            "o/down, blocks straddling rows": dict(
                parts=1, nested=False, norm=False, bias=False, gated=False, residual=True, aligned=False
            ),
            "gate/up, pipelined": dict(
                parts=2, nested=False, norm=True, bias=False, gated=True, residual=False, stages=3
            ),
        }.items()
    },
    # tensor cores summing the products, unsplit and with the columns shared by 4 programs
    "nf4 gate/up, scaled, tensor cores": nf4(
        2, nested=False, norm=True, bias=False, gated=True, residual=False, lookup=3, dot=True
    ),
    "nf4 qkv, double quant, scaled, tensor cores, 4 shares": nf4(
        3, nested=True, norm=True, bias=True, gated=False, residual=False, lookup=3, dot=True, splits=4
    ),
    "nf4 gate/up, scaled, tensor cores, 4 shares, PDL": nf4(
        2, nested=False, norm=True, bias=False, gated=True, residual=False, lookup=3, dot=True, splits=4, pdl=True
    ),
    "nf4 o/down, by nibble, tensor cores, 8 shares": nf4(
        1, nested=False, norm=False, bias=False, gated=False, residual=True, lookup=1, dot=True, splits=8
    ),
    "nf4 o/down, scaled, 4 shares": nf4(
        1, nested=True, norm=False, bias=False, gated=False, residual=True, lookup=3, splits=4
    ),
    "attention": attention(),
    "attention, slots shared over 8 programs a head": attention(splits=8),
    # with programmatic dependent launch (griddepcontrol, Hopper's own instructions)
    "matvec qkv, PDL": matvec(norm=True, bias=True, gated=False, residual=False, pdl=True),
    "matvec gate/up, PDL": matvec(norm=True, bias=False, gated=True, residual=False, pdl=True),
    "matvec o/down, PDL": matvec(norm=False, bias=False, gated=False, residual=True, pdl=True),
    "matvec qkv, x ahead": matvec(norm=True, bias=True, gated=False, residual=False, ahead=True),
    "matvec gate/up, x ahead, PDL": matvec(norm=True, bias=False, gated=True, residual=False, pdl=True, ahead=True),
    "matvec o/down, x ahead": matvec(norm=False, bias=False, gated=False, residual=True, ahead=True),
    "matvec o/down, pipelined": matvec(norm=False, bias=False, gated=False, residual=True, stages=3),
    "matvec gate/up, pipelined, PDL": matvec(norm=True, bias=False, gated=True, residual=False, pdl=True, stages=2),
    "nf4 qkv, double quant, PDL": nf4(3, nested=True, norm=True, bias=True, gated=False, residual=False, pdl=True),
    "nf4 gate/up, PDL": nf4(2, nested=False, norm=True, bias=False, gated=True, residual=False, pdl=True),
    "nf4 o/down, double quant, PDL": nf4(1, nested=True, norm=False, bias=False, gated=False, residual=True, pdl=True),
    "nf4 o/down, double quant, scaled, PDL": nf4(
        1, nested=True, norm=False, bias=False, gated=False, residual=True, lookup=3, pdl=True
    ),
    # the next kernel launched only once a program's loop is done; a prefetched first step read
    # before the wait
    **{
        f"nf4 {case}, scaled, PDL late": nf4(**arguments, lookup=3, pdl=True, pdl_late=True)
        for case, arguments in {
            "qkv, prefetched": dict(
                parts=3, nested=True, norm=True, bias=True, gated=False, residual=False, prefetch=True
            ),
            "gate/up, pipelined": dict(
                parts=2, nested=False, norm=True, bias=False, gated=True, residual=False, stages=3
            ),
            "o/down, tensor cores, 8 shares": dict(
                parts=1, nested=False, norm=False, bias=False, gated=False, residual=True, dot=True, splits=8
            ),
        }.items()
    },
    # whole blocks a thread, read as two half-block tiles (16 rows: a thread's 16 bytes a half)
    **{
        f"nf4 {case}, whole blocks": nf4(**arguments, halves=2, block_n=16)
        for case, arguments in {
            "gate/up, scaled": dict(parts=2, nested=False, norm=True, bias=False, gated=True, residual=False, lookup=3),
            "qkv, scaled, pipelined, PDL": dict(
                parts=3, nested=False, norm=True, bias=True, gated=False, residual=False, lookup=3, stages=3, pdl=True
            ),
            "o/down, double quant, by nibble": dict(
                parts=1, nested=True, norm=False, bias=False, gated=False, residual=True, lookup=1
            ),
        }.items()
    },
    "matvec int8 head": matvec(norm=False, bias=False, gated=False, residual=False, int8_rows=True),
    "matvec int8 head, pipelined": matvec(
        norm=False, bias=False, gated=False, residual=False, int8_rows=True, stages=3
    ),
    "rows qkv": rows(norm=True, bias=True, gated=False, residual=False),
    "rows gate/up, pipelined": rows(norm=True, bias=False, gated=True, residual=False, stages=3),
    "rows o/down": rows(norm=False, bias=False, gated=False, residual=True),
    "rows o/down, 16 x 512 pipelined": rows(norm=False, bias=False, gated=False, residual=True, stages=3, wide=True),
    "attention, PDL": attention(pdl=True),
    "attention, 16 shares, PDL": attention(pdl=True, splits=16),
}


def main() -> int:
    failed = 0
    for name, (kernel, signature, constants) in VARIANTS.items():
        order = [arg for arg in kernel.arg_names if arg not in constants]
        signature = {arg: signature[arg] for arg in order} | {arg: "constexpr" for arg in constants}
        # Pointers 16-byte aligned, as Triton's launcher finds torch's tensors and specializes
        # for: without it no load is vectorized and the code is not what the GPU runs.
        names = list(signature)
        aligned = {(names.index(arg),): [["tt.divisibility", 16]] for arg in order if signature[arg].startswith("*")}
        try:
            source = ASTSource(kernel, signature, constants, aligned)
            compiled = triton.compile(source, target=HOPPER, options={"num_warps": 8})
            loads = len(re.findall(r"\bld\.global\b", compiled.asm["ptx"]))
            print(f"{name}: {len(compiled.asm['cubin'])} bytes of sm_90 code, {loads} global loads")
        except Exception as err:  # report every variant, then fail
            failed += 1
            print(f"{name}: FAILED {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
