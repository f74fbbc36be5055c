"""The fused single-token layers (playground/backends/triton_layers.py) against the model's own.

Triton's interpreter runs the kernels on the CPU (it must be switched on before the first kernel
is made, hence the environment line before the imports). On the GPU the same kernels run
compiled: test_gpu.py checks them there through the app's fast path.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from playground.backends import triton_layers  # noqa: E402
from playground.backends.fast_decode import StaticDecoder, fuse_projections  # noqa: E402
from playground.backends.triton_kernels import (  # noqa: E402
    AttentionConfig,
    MatvecConfig,
    NF4Weight,
    attention_counters,
    decode_attention,
    fused_matvec,
    nf4_matvec,
    rows_matvec,
)
from playground.backends.triton_layers import (  # noqa: E402
    FusedDecoderLayer,
    install_fused_layers,
    remove_fused_layers,
    unfusable_reason,
)
from playground.config import GenerationParams  # noqa: E402

# Several column blocks and a partial last row block, so the loops and masks are exercised.
SMALL_BLOCKS = MatvecConfig(block_n=8, block_k=32, num_warps=4)
ROWS, COLUMNS = 37, 100


class Norm(torch.nn.Module):
    """The Llama/Qwen2 RMSNorm, as the model computes it (normalised, rounded, times weight)."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = torch.nn.Parameter(weight), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * normalised.to(x.dtype)


def _random(seed: int, dtype: torch.dtype):
    """Random tensors of `dtype` from a generator seeded with `seed`, as a call of the shape."""
    generator = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=generator).to(dtype)


def _layer_work_case(case: str, x: torch.Tensor, random) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """For `case` ("norm-and-bias", "gated", "residual") and x [K] or [M, K]: a weight, the
    matvec kernels' keyword arguments, and what the layer computes around its matmul."""
    norm = Norm(1 + 0.1 * random(COLUMNS))
    with torch.no_grad():
        if case == "norm-and-bias":
            weight, bias = random(ROWS, COLUMNS), random(ROWS)
            return weight, {"norm": norm, "bias": bias}, F.linear(norm(x), weight, bias)
        if case == "gated":
            weight = random(2 * ROWS, COLUMNS)
            gate, up = F.linear(norm(x), weight).split(ROWS, dim=-1)
            return weight, {"norm": norm, "gated": True}, F.silu(gate) * up
        weight, residual = random(ROWS, COLUMNS), random(*x.shape[:-1], ROWS)
        return weight, {"residual": residual}, residual + F.linear(x, weight)


# fp16 rather than bf16: the interpreter truncates fp32 to bf16 where a GPU rounds to nearest
# (half its conversions came out one ulp low), and fp16 takes the kernel's same rounding steps.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["norm-and-bias", "gated", "residual"])
@pytest.mark.parametrize("way", [{}, {"ahead": True}, {"stages": 3}], ids=["plain", "x-ahead", "pipelined"])
def test_the_matvec_does_what_the_layer_does_around_its_matmul(dtype, case, way):
    random = _random(0, dtype)
    x = random(COLUMNS)
    weight, arguments, expected = _layer_work_case(case, x, random)
    with torch.no_grad():
        got = fused_matvec(x, weight, dataclasses.replace(SMALL_BLOCKS, **way), **arguments)
    assert got.dtype == dtype and got.shape == (ROWS,)
    # fp32: only the order of the sums differs. fp16: the same roundings, so an ulp or two apart.
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 4e-3}
    torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["norm-and-bias", "gated", "residual"])
@pytest.mark.parametrize("tokens", [2, 5, 16])
@pytest.mark.parametrize(
    "config", [MatvecConfig(16, 32, 4), MatvecConfig(32, 64, 4, stages=3)], ids=["16x32", "32x64-pipelined"]
)
def test_a_pass_of_several_tokens_does_for_each_what_the_layer_does(dtype, case, tokens, config):
    """The rows kernel (a check of drafts): each token's row as the layer computes it, with its
    own norm and residual; a partial last block of weight rows and of columns."""
    random = _random(1, dtype)
    x = random(tokens, COLUMNS)
    weight, arguments, expected = _layer_work_case(case, x, random)
    with torch.no_grad():
        got = rows_matvec(x, weight, config, **arguments)
    assert got.dtype == dtype and got.shape == (tokens, ROWS)
    # fp32: the sums' order differs, by tiles of 64 columns too (seen: 1.3e-5 off in SiLU's products)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 4e-3}
    torch.testing.assert_close(got, expected, **tolerance)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        rows_matvec(torch.zeros(17, COLUMNS, dtype=dtype), weight, config)


def _nf4_linears(shapes: list[tuple[int, int]], dtype: torch.dtype, nested: bool, seed: int = 0) -> list:
    """bitsandbytes Linear4bit layers of `shapes` (rows, columns), quantized on the CPU."""
    import bitsandbytes as bnb

    generator = torch.Generator().manual_seed(seed)
    linears = []
    for rows, columns in shapes:
        linear = bnb.nn.Linear4bit(columns, rows, bias=False, compute_dtype=dtype, quant_type="nf4")
        weight = torch.randn(rows, columns, generator=generator).to(dtype)
        linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=nested, quant_type="nf4")
        linears.append(linear.to("cpu"))  # quantizes
    return linears


def _dequantized(linear) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state)


def _nf4_layer_case(case: str, columns: int, dtype: torch.dtype, nested: bool, generator: torch.Generator) -> tuple:
    """One of a layer's NF4 matvecs on `columns` columns: "qkv-norm-and-bias" (three stacked
    parts of different rows, the norm first, a bias added), "gated" (gate/up, the norm first) or
    "residual" (one weight, a residual added). Returns the packed weight, the kernel's call
    `run(x, norm, config)` and the layer's own arithmetic `expected(x, norm)` on bitsandbytes'
    dequantized weights; the bias or residual is drawn from `generator`."""
    shapes = {"qkv-norm-and-bias": [(32, columns), (16, columns), (16, columns)], "gated": [(24, columns)] * 2}
    linears = _nf4_linears(shapes.get(case, [(24, columns)]), dtype, nested)
    weights = [_dequantized(linear) for linear in linears]
    assert weights[0].dtype == dtype
    packed = NF4Weight.of(linears)
    if case == "qkv-norm-and-bias":
        bias = torch.randn(64, generator=generator).to(dtype)

        def run(x, norm, config):  # noqa: ANN001, ANN202
            return nf4_matvec(x, packed, config, norm=norm, bias=bias)

        def expected(x, norm):  # noqa: ANN001, ANN202
            return F.linear(norm(x), torch.cat(weights), bias)
    elif case == "gated":

        def run(x, norm, config):  # noqa: ANN001, ANN202
            return nf4_matvec(x, packed, config, norm=norm, gated=True)

        def expected(x, norm):  # noqa: ANN001, ANN202
            return F.silu(F.linear(norm(x), weights[0])) * F.linear(norm(x), weights[1])
    else:
        residual = torch.randn(24, generator=generator).to(dtype)

        def run(x, norm, config):  # noqa: ANN001, ANN202
            return nf4_matvec(x, packed, config, residual=residual)

        def expected(x, norm):  # noqa: ANN001, ANN202
            return residual + F.linear(x, weights[0])

    return packed, run, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nested", [False, True], ids=["nf4", "nf4-double-quant"])
@pytest.mark.parametrize("case", ["qkv-norm-and-bias", "gated", "residual"])
@pytest.mark.parametrize(
    "columns,config",
    [
        (100, SMALL_BLOCKS),
        (100, MatvecConfig(block_n=8, block_k=32, num_warps=4, nf4_lookup="nibble")),
        (192, MatvecConfig(block_n=8, block_k=128, num_warps=4)),
        (192, MatvecConfig(block_n=8, block_k=128, num_warps=4, nf4_lookup="nibble")),
        (100, MatvecConfig(block_n=8, block_k=32, num_warps=4, nf4_prefetch=True)),
        (192, MatvecConfig(block_n=8, block_k=128, num_warps=4, nf4_lookup="nibble", nf4_prefetch=True)),
        (100, MatvecConfig(block_n=8, block_k=32, num_warps=4, nf4_lookup="registers", nf4_prefetch=True)),
        (192, MatvecConfig(block_n=8, block_k=128, num_warps=4, nf4_lookup="registers")),
        (100, MatvecConfig(block_n=8, block_k=32, num_warps=4, nf4_lookup="nibble", nf4_stages=3)),
        (192, MatvecConfig(block_n=8, block_k=64, num_warps=4, nf4_lookup="registers", nf4_stages=3)),
        (192, MatvecConfig(block_n=8, block_k=128, num_warps=4, nf4_lookup="scaled")),
        (192, MatvecConfig(block_n=16, block_k=128, num_warps=4, nf4_lookup="nibble", nf4_dot=True)),
        (256, MatvecConfig(block_n=16, block_k=64, num_warps=4, nf4_lookup="scaled", nf4_dot=True, nf4_splits=2)),
        (256, MatvecConfig(block_n=8, block_k=64, num_warps=4, nf4_lookup="nibble", nf4_prefetch=True, nf4_splits=4)),
        (192, MatvecConfig(block_n=8, block_k=128, num_warps=4, nf4_lookup="scaled", nf4_whole_blocks=True)),
        (
            256,
            MatvecConfig(block_n=8, block_k=128, num_warps=2, nf4_lookup="byte", nf4_whole_blocks=True, nf4_stages=3),
        ),
    ],
    ids=[
        "blocks-straddle-rows",
        "blocks-straddle-rows-by-nibble",
        "whole-blocks-a-tile",
        "whole-blocks-by-nibble",
        "blocks-straddle-rows-prefetched",
        "whole-blocks-by-nibble-prefetched",
        "blocks-straddle-rows-registers-prefetched",
        "whole-blocks-registers",
        "blocks-straddle-rows-by-nibble-pipelined",
        "whole-blocks-registers-pipelined",
        "whole-blocks-scaled",
        "tensor-cores",
        "tensor-cores-columns-split-2-ways",
        "columns-split-4-ways-prefetched",
        "whole-blocks-a-thread-in-two-halves",
        "whole-blocks-a-thread-by-byte-pipelined",
    ],
)
def test_the_nf4_matvec_reads_bitsandbytes_weights_as_they_dequantize(dtype, nested, case, columns, config):
    """Three stacked parts (q, k, v of different rows), gate/up, and one weight with a residual,
    against bitsandbytes' own dequantization. 100 columns: 64-value blocks straddle rows, and
    each byte finds its scale. 192: blocks lie in rows and a tile holds two whole blocks (the
    last tile one, and one masked), one scale load a block. Each with both table lookups: a
    byte's two values at once, or a code's at a time; with the next step's bytes read ahead, or
    the loop's loads pipelined three steps deep; summed by `tl.dot` in the tile's block-fastest
    order; its columns shared by two or four programs, the last adding their sums (the counters are
    left at zero for the next call); each block read as two half-block tiles, so that a thread
    decodes whole blocks.
    The register lookup's kernel too (its loads shaped to keep the tile's layout), with the
    16-entry table in the permutes' place: the interpreter runs no PTX."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(columns, generator=generator).to(dtype)
    norm = Norm((1 + 0.1 * torch.randn(columns, generator=generator)).to(dtype))
    with torch.no_grad():
        packed, run, layer = _nf4_layer_case(case, columns, dtype, nested, generator)
        expected, got = layer(x, norm), run(x, norm, config)
    fp32 = 3e-5 if config.nf4_splits > 1 else 1e-5  # split shares' sums add up in another order
    tolerance = {"atol": fp32, "rtol": fp32} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 4e-3}
    torch.testing.assert_close(got, expected, **tolerance)
    assert not packed.counters.any()


@pytest.mark.parametrize("case", ["qkv-norm-and-bias", "gated", "residual"])
@pytest.mark.parametrize(
    "config",
    [
        MatvecConfig(block_n=8, block_k=128, num_warps=4, nf4_lookup="scaled"),
        MatvecConfig(block_n=8, block_k=128, num_warps=4, nf4_lookup="registers", nf4_stages=3),
        MatvecConfig(block_n=8, block_k=128, num_warps=4, nf4_lookup="scaled", nf4_whole_blocks=True),
    ],
    ids=["scaled", "registers-pipelined", "scaled-whole-blocks"],
)
def test_bf16_x_read_in_pairs_gives_what_x_read_a_column_at_a_time_gives(case, config):
    """bf16 x (and the norm's weight) at a word-aligned address: the register lookups' kernel
    reads, normalises and moves each byte's two columns as one word (`X_WORDS`). The same x a
    column at a time (a copy at an odd address, where a word cannot be read) gives the same
    sums; both are near the layer's own arithmetic (the interpreter truncates to bf16 where
    torch rounds, and gate times up compounds it: hence a tolerance of 5% of the largest output;
    a column out of place is far off)."""
    from playground.backends.triton_kernels import _pairs_readable

    columns = 192
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(columns, generator=generator).to(torch.bfloat16)
    unaligned = torch.empty(columns + 1, dtype=torch.bfloat16)[1:]
    unaligned.copy_(x)
    norm = Norm((1 + 0.1 * torch.randn(columns, generator=generator)).to(torch.bfloat16))
    assert _pairs_readable(x, norm.weight) and not _pairs_readable(unaligned, norm.weight)
    assert not _pairs_readable(x.to(torch.float16), None)
    with torch.no_grad():
        _, run, layer = _nf4_layer_case(case, columns, torch.bfloat16, False, generator)
        expected, pairs, single = layer(x, norm), run(x, norm, config), run(unaligned, norm, config)
    torch.testing.assert_close(pairs, single, atol=0, rtol=0)
    scale = expected.float().abs().max().item()  # gate times up cancels near zero: a share of the largest
    torch.testing.assert_close(pairs.float(), expected.float(), atol=0.05 * scale, rtol=0)


def test_tensor_cores_and_split_columns_take_only_shapes_they_can_run():
    """The picker offers tensor cores for whole NF4 blocks a tile and 16 rows or more, and
    splits its columns only in whole loop steps, a power of two of shares."""
    from playground.backends.triton_layers import NF4_DOT_CONFIGS, Projection

    weight = NF4Weight.of(_nf4_linears([(128, 512)], torch.bfloat16, nested=False))
    projection = Projection(weight, None, (128,))
    dot = MatvecConfig(64, 256, 4, nf4_lookup="nibble", nf4_dot=True)
    assert projection.fits(dot) and projection.fits(dataclasses.replace(dot, nf4_splits=2))
    assert not projection.fits(dataclasses.replace(dot, nf4_splits=4))  # 128 columns a share
    assert not projection.fits(dataclasses.replace(dot, block_k=32))  # half an NF4 block a tile
    assert not projection.fits(dataclasses.replace(dot, block_n=8))  # too few rows for tl.dot
    assert not projection.fits(MatvecConfig(8, 128, 4, nf4_lookup="nibble", nf4_splits=3))
    assert projection.fits(MatvecConfig(8, 128, 4, nf4_lookup="nibble", nf4_splits=4))
    assert [config.nf4_splits for config in NF4_DOT_CONFIGS if projection.fits(config)] == [1, 2]
    assert not projection.fits(dataclasses.replace(dot, nf4_lookup="scaled"))  # registers: a GPU's
    # bytes that do not start on a word (tensor cores read them four at a time)
    storage = torch.zeros(weight.packed[0].numel() + 1, dtype=torch.uint8)
    shifted = storage[1:]
    shifted.copy_(weight.packed[0])
    unaligned = Projection(dataclasses.replace(weight, packed=(shifted,)), None, (128,))
    assert not unaligned.fits(dot) and unaligned.fits(MatvecConfig(8, 128, 4, nf4_lookup="nibble", nf4_splits=4))


@pytest.mark.parametrize(
    "config",
    [MatvecConfig(8, 32, 4), MatvecConfig(8, 32, 4, ahead=True), MatvecConfig(16, 64, 4, stages=3)],
    ids=["plain", "x-ahead", "pipelined"],
)
def test_the_matvec_reads_int8_rows_as_bitsandbytes_dequantizes_them(config):
    """The int8 head's matvec (`quantization.head`): bitsandbytes' vector-wise int8 rows, each
    row's sum scaled by its absmax / 127, give the dequantized rows' product; 100 columns leave
    a masked tail, 40 rows a masked row block."""
    import bitsandbytes.functional as bnb_functional

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 100, generator=generator)
    rows, absmax, _ = bnb_functional.int8_vectorwise_quant(weight)
    x = torch.randn(100, generator=generator)
    expected = bnb_functional.int8_vectorwise_dequant(rows, absmax) @ x
    torch.testing.assert_close(fused_matvec(x, rows, config, row_absmax=absmax), expected, atol=1e-5, rtol=1e-5)


def test_whole_blocks_a_thread_take_only_tiles_of_whole_blocks():
    """A thread decodes whole NF4 blocks only from tiles of whole blocks (two half-block tiles a
    step), and not with tensor cores or bytes read a step ahead; the picker's whole-block shapes
    give each thread 16 bytes of each half."""
    from playground.backends.triton_layers import NF4_WHOLE_BLOCK_CONFIGS, Projection

    projection = Projection(NF4Weight.of(_nf4_linears([(128, 512)], torch.bfloat16, nested=False)), None, (128,))
    whole = MatvecConfig(8, 128, 4, nf4_lookup="nibble", nf4_whole_blocks=True)
    assert projection.fits(whole) and projection.fits(dataclasses.replace(whole, nf4_stages=3))
    assert not projection.fits(dataclasses.replace(whole, block_k=32))  # half a block a tile
    assert not projection.fits(dataclasses.replace(whole, nf4_prefetch=True))
    assert not projection.fits(dataclasses.replace(whole, block_n=16, nf4_dot=True))
    straddling = Projection(NF4Weight.of(_nf4_linears([(24, 100)], torch.bfloat16, nested=False)), None, (24,))
    assert not straddling.fits(dataclasses.replace(whole, block_k=64))  # blocks straddle rows
    for config in NF4_WHOLE_BLOCK_CONFIGS:
        assert config.block_n * config.block_k // 4 == 16 * 32 * config.num_warps, config


def test_byte_permutes_give_every_int8_value_as_fp32_exactly():
    """The int8 head's conversion (`nf4_permute.int8_program`), run instruction by instruction as
    the GPU runs its PTX: every int8 value in each of the four bytes a call takes gives its own
    value in fp32, bit for bit; and the PTX the kernel holds is that program."""
    import random
    import struct

    from playground.backends import nf4_permute, triton_source

    rng = random.Random(0)
    program = nf4_permute.int8_program()
    for position in range(4):
        for value in range(256):
            packed = [rng.randrange(256) for _ in range(4)]
            packed[position] = value
            expected = [struct.pack("<f", float(byte - 256 if byte > 127 else byte)) for byte in packed]
            got = nf4_permute.emulate(program, int.from_bytes(bytes(packed), "little"))
            assert [struct.pack("<I", bits) for bits in got] == expected, packed
    assert triton_source.INT8_PTX.value == nf4_permute.ptx(program)


def test_byte_permutes_give_the_nf4_code_book_value_of_every_code():
    """The register lookup's program (`nf4_permute`), run instruction by instruction as the GPU
    runs its PTX: each code of every byte value, in each of the four bytes a call takes, gives
    bitsandbytes' NF4 value bit for bit; and the PTX the kernel holds is that program."""
    import random
    import struct

    import bitsandbytes.functional as bnbf

    from playground.backends import nf4_permute

    book = bnbf.get_4bit_type("nf4", device="cpu")
    assert tuple(book.tolist()) == nf4_permute.NF4_CODE_BOOK
    bits = [struct.unpack("<I", struct.pack("<f", value))[0] for value in book.tolist()]
    rng = random.Random(0)
    for high in (True, False):
        program = nf4_permute.program(high)
        for position in range(4):
            for value in range(256):
                packed = [rng.randrange(256) for _ in range(4)]
                packed[position] = value
                word = int.from_bytes(bytes(packed), "little")
                expected = [bits[byte >> 4] if high else bits[byte & 15] for byte in packed]
                assert nf4_permute.emulate(program, word) == expected, (high, packed)
        ptx = nf4_permute.ptx(program)
        assert ptx.count("prmt.b32") == sum(op == "prmt" for op, *_ in program) == 21
        assert all(f"${k}," in ptx for k in range(4)) and "$4," in ptx
    from playground.backends import triton_source

    assert triton_source.NF4_HIGH_PTX == nf4_permute.ptx(nf4_permute.program(high=True))


def test_scaled_byte_permutes_give_bitsandbytes_bf16_value_of_every_code():
    """The scaled lookup's two programs (`nf4_permute.scaled_*`), run instruction by instruction
    as the GPU runs their PTX: a block's planes made from its scale, then every byte value in
    each of the four places of a call, give both codes' values as bitsandbytes dequantizes bf16
    weights (code book value times scale in fp32, rounded to bf16), bit for bit; and the PTX
    the kernel holds is those programs."""
    import random
    import struct

    import bitsandbytes.functional as bnbf

    from playground.backends import nf4_permute, triton_source

    book = bnbf.get_4bit_type("nf4", device="cpu").float()
    table, lookup = nf4_permute.scaled_table_program(), nf4_permute.scaled_lookup_program()
    rng = random.Random(1)
    for scale in (3.0517578125e-05, 0.0123, 0.5, 1.7, 2.9e3):  # the first a power of two
        scale_bits = struct.unpack("<I", struct.pack("<f", scale))[0]
        planes = nf4_permute.emulate(table, {"scale": scale_bits}, outputs=8)
        registers = {f"low{q}": planes[q] for q in range(4)} | {f"high{q}": planes[4 + q] for q in range(4)}
        values = (book * torch.tensor(scale)).to(torch.bfloat16).float()
        bits = values.view(torch.int32).tolist()
        bits = [value & 0xFFFFFFFF for value in bits]
        for position in range(4):
            for value in range(256):
                packed = [rng.randrange(256) for _ in range(4)]
                packed[position] = value
                word = int.from_bytes(bytes(packed), "little")
                expected = [bits[byte >> 4] for byte in packed] + [bits[byte & 15] for byte in packed]
                got = nf4_permute.emulate(lookup, registers | {"in": word}, outputs=8)
                assert got == expected, (scale, packed)
    assert sum(op in ("mul", "cvt") for op, *_ in table) == 16 + 8
    assert len(lookup) == 30  # eight weights
    assert triton_source.NF4_SCALED_TABLE_PTX == nf4_permute.ptx(table, outputs=8, inputs={"scale": 8})
    lookup_ptx = nf4_permute.ptx(lookup, outputs=8, inputs=nf4_permute.SCALED_LOOKUP_INPUTS)
    assert triton_source.NF4_SCALED_LOOKUP_PTX == lookup_ptx
    assert "$8," in lookup_ptx and "$37," in lookup_ptx  # the bytes, and the last plane's first register
    # The paired form for tensor cores: each byte's two values as one bf16 pair, the even
    # column's (high nibble's) in the lower half, from the same planes.
    paired = nf4_permute.scaled_lookup_program(paired=True)
    for _ in range(500):
        word = rng.getrandbits(32)
        plain = nf4_permute.emulate(lookup, registers | {"in": word}, outputs=8)
        pairs = nf4_permute.emulate(paired, registers | {"in": word}, outputs=4)
        assert pairs == [(plain[k] >> 16) | (plain[4 + k] & 0xFFFF0000) for k in range(4)], word
    assert len(paired) == 22
    # one word of four bytes a call, with its own planes: $4 the word, $5..$12 the planes
    pairs_ptx = nf4_permute.ptx(paired, outputs=4, inputs=nf4_permute.scaled_lookup_inputs(4, elements=1))
    assert triton_source.NF4_SCALED_PAIRS_PTX == pairs_ptx and "$4," in pairs_ptx and "$12," in pairs_ptx
    assert "$13" not in pairs_ptx


def test_the_pdl_choice_compares_medians_of_timings_taken_in_turns(monkeypatch):
    """With several rounds, one slow timing of the faster candidate (a clock dip) does not
    decide, and the rounds alternate their order. The GPU timer is replaced by a script of
    times, since this runs where there is no GPU; the choice's logic is what is checked."""
    import triton.testing

    script = {"plain": [1.00, 1.01, 0.99, 1.00, 1.02], "pdl": [1.20, 0.97, 0.98, 0.96, 0.97]}
    order = []

    def timer(call, rep):
        label = call.args[0]
        order.append(label)
        return script[label][sum(seen == label for seen in order) - 1]

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", timer)
    run = lambda label: torch.zeros(1)  # noqa: E731
    timings = {}
    assert triton_layers._fastest(("plain", "pdl"), run, "plain", timings=timings, rounds=5) == "pdl"
    assert timings == {"plain": 1.00, "pdl": 0.97}
    assert order == ["plain", "pdl", "pdl", "plain", "plain", "pdl", "pdl", "plain", "plain", "pdl"]
    order.clear()  # one round: the first timing alone decides
    assert triton_layers._fastest(("plain", "pdl"), run, "plain", rounds=1) == "plain"


def test_a_close_pdl_choice_is_settled_on_the_whole_step_and_kept_for_the_next_load(
    llama_folder, tmp_path, monkeypatch
):
    """Where the layer trial timed PDL's runner-up within `WHOLE_STEP_PDL_MARGIN` of its choice,
    `close_pdl_choice` names it (the backend then times the whole step both ways: test_gpu.py);
    `use_pdl_choice` puts a choice's launch shapes in every layer; `keep_launch_shapes` stores
    them for the next load, and the decode line gives the step's times. Further apart, or with
    no trial in this load (a CPU, or picks an earlier load kept), nothing is asked."""
    from playground.backends import launch_shape_cache

    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    model = _fused_model(llama_folder)
    assert triton_layers.close_pdl_choice(model) is None  # a CPU times nothing
    configs = model.model.layers[0].configs
    choices = triton_layers.pdl_choices(dict(configs))
    description = {"test": "the whole step"}
    key = launch_shape_cache.key(description)
    trial = {"choices": choices, "chosen": "plain", "ms": {"plain": 1.991, "pdl": 1.993}}  # the 3B on the H200
    model._launch_shapes = {"cache_key": key, "cached": False, "description": description, "pdl_trial": trial}
    assert triton_layers.close_pdl_choice(model) == "pdl"

    triton_layers.use_pdl_choice(model, "pdl")
    assert all(layer.configs is configs for layer in model.model.layers)  # one dict serves every layer
    assert configs == choices["pdl"] and triton_layers.uses_pdl(model)
    triton_layers.keep_launch_shapes(model, {"plain": 2.0104, "pdl": 1.9851})
    assert launch_shape_cache.load(key, set(configs)) == choices["pdl"]
    choices_line = triton_layers.describe_choices(model)
    assert "programmatic dependent launch, PDL decided on the whole step (2.010 ms plain against 1.985 ms pdl)" in (
        choices_line
    )
    triton_layers.use_pdl_choice(model, "plain")
    assert configs == choices["plain"] and not triton_layers.uses_pdl(model)

    trial["ms"] = {"plain": 1.90, "pdl": 1.96}  # 3% apart: the trial's choice stands
    assert triton_layers.close_pdl_choice(model) is None
    model._launch_shapes = {"cache_key": key, "cached": True, "description": description}  # kept picks
    assert triton_layers.close_pdl_choice(model) is None


@pytest.mark.parametrize("runner_up_runs", [True, False])
def test_the_backend_times_both_whole_steps_and_keeps_the_faster(llama_folder, tmp_path, monkeypatch, runner_up_runs):
    """The load's whole-step PDL choice through a real backend's decoders (no graphs on a CPU:
    the steps run eagerly through the interpreted kernels): both steps run and are timed, the
    faster decoder is kept with its launch shapes installed and stored; where the runner-up
    cannot run its step, the trial's choice stands and the decode notes say why. (The first GPU
    run found the timing writing the step's buffers outside inference mode, and the failure
    swallowed: test_gpu.py runs it captured.)"""
    from conftest import variant

    from playground.backends import launch_shape_cache
    from playground.backends import transformers_backend as tb
    from playground.backends.fast_decode import time_in_turns

    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tb, "WHOLE_STEP_REPLAYS", 2)
    config = variant(id="whole-step-cpu", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32")
    backend = tb.TransformersBackend(config.model_copy(update={"fast_decode": "on"}))
    backend.load()
    prompt = [3, 14, 15, 9]
    expected = backend.model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
    fuse_projections(backend.model)
    install_fused_layers(backend.model)
    configs = backend.model.model.layers[0].configs
    # The interpreter runs no PDL instructions: here the runner-up differs in another launch
    # shape (the choice's mechanics do not look inside), or in one no kernel accepts.
    other = AttentionConfig(4, 4, splits=2) if runner_up_runs else AttentionConfig(3, 4)
    # "plain" is the installed dict itself, as it was when the trial returned its choice
    choices = {"plain": configs, "pdl": dict(configs) | {"attention": other}}
    plain = dict(configs)
    description = {"test": "the whole step on a CPU"}
    trial = {"choices": choices, "chosen": "plain", "ms": {"plain": 1.0, "pdl": 1.01}}
    backend.model._launch_shapes = {
        "cache_key": launch_shape_cache.key(description),
        "cached": False,
        "description": description,
        "pdl_trial": trial,
    }
    decoder = StaticDecoder(backend.model, backend._context_length(), False, False)
    backend._try_decoder(decoder)
    timed = []

    def recording(runs, synchronize, rounds=5):
        timed.append(result := time_in_turns(runs, synchronize, rounds))
        return result

    monkeypatch.setattr(tb, "time_in_turns", recording)
    kept, undecided = backend._whole_step_pdl_choice(decoder, compile_step=False)
    if not runner_up_runs:
        assert kept is decoder and configs == plain and not timed
        assert undecided.startswith("PDL left as the layer trial chose it: timing the whole step failed:")
        assert "whole_step_ms" not in backend.model._launch_shapes
        return
    assert undecided == ""
    (step_ms,) = timed
    faster = min(step_ms, key=step_ms.__getitem__)
    assert backend.model._launch_shapes["whole_step_ms"] == {label: ms / 2 for label, ms in step_ms.items()}
    assert (kept is decoder) == (faster == "plain") and kept.capacity > 0
    assert configs == (plain if faster == "plain" else choices["pdl"]) and trial["chosen"] == faster
    assert launch_shape_cache.load(launch_shape_cache.key(description), set(configs)) == configs
    pdl = dict(choices["pdl"])
    for label in ("plain", "pdl", "plain", "pdl"):  # back and forth, nothing lost on the way
        triton_layers.use_pdl_choice(backend.model, label)
        assert configs == {"plain": plain, "pdl": pdl}[label]
    assert configs["attention"] == other
    triton_layers.use_pdl_choice(backend.model, faster)
    assert "PDL decided on the whole step" in triton_layers.describe_choices(backend.model)
    params = GenerationParams(temperature=0.0, max_new_tokens=4)
    assert list(kept.tokens(prompt, params, lambda: False)) == expected[0, len(prompt) :].tolist()


def _pdl_ways_timed(model, configs, monkeypatch, winner) -> tuple[dict, dict]:
    """`_pdl_loading_ways` over `model`'s layers with the GPU's timing (do_bench_cudagraph; the
    interpreter runs no PDL launch) replaced by `winner(name, candidates)`. Returns its configs
    and, per matvec, what it was given: (candidates, default, agree_with)."""
    asked = {}
    names = iter(name for name, config in configs.items() if name in triton_layers.MATVECS and config is not None)

    def fastest(candidates, run, default, agree_with=None, **_):
        name = next(names)  # in the order of `configs`, as it times them
        asked[name] = (list(candidates), default, agree_with)
        return winner(name, list(candidates))

    monkeypatch.setattr(triton_layers, "_fastest", fastest)
    layers = [fused.layer for fused in model.model.layers]
    projections = [fused.projections for fused in model.model.layers]
    return triton_layers._pdl_loading_ways(layers, projections, configs), asked


def test_the_pdl_choice_takes_each_matvec_s_fastest_way_as_a_pdl_launch(llama_folder, monkeypatch):
    """The "pdl" choice has each matvec load its weights the way that timed fastest as a PDL
    launch (`_pdl_loading_ways`): bf16, every way of `PLAIN_LOADING_WAYS` from plain, whatever
    the plain launches' pick was; NF4, its picked lookup plain, prefetched and pipelined, and on
    tensor cores, where it fits, counted only where its output agrees with the pick's. NF4
    layers have a third sequence: the NF4 matvecs letting the next launch after their loop."""
    from playground.backends.triton_layers import NF4_LOADING_WAYS, PLAIN_LOADING_WAYS, pdl_choices

    rows = {"qkv": 2, "o": 4, "gate_up": 8, "down": 16}
    plain = {name: MatvecConfig(rows[name], 32, 4, ahead=name == "o") for name in rows} | {"attention": None}
    with_pdl, asked = _pdl_ways_timed(
        _fused_model(llama_folder), plain, monkeypatch, lambda name, ways: ways[-1] if name == "down" else ways[0]
    )
    assert set(asked) == set(rows) and len(PLAIN_LOADING_WAYS) == 4
    assert asked["o"][0] == [
        MatvecConfig(4, 32, 4, pdl=True),
        MatvecConfig(4, 32, 4, pdl=True, ahead=True),
        MatvecConfig(4, 32, 4, pdl=True, stages=2),
        MatvecConfig(4, 32, 4, pdl=True, stages=3),
    ]
    assert asked["o"][1] == MatvecConfig(4, 32, 4, pdl=True, ahead=True)  # should none run: as picked
    assert with_pdl["down"] == MatvecConfig(16, 32, 4, pdl=True, stages=3)
    assert with_pdl["o"] == MatvecConfig(4, 32, 4, pdl=True) and with_pdl["attention"] is None
    choices = pdl_choices(plain, pdl_configs=with_pdl)
    assert list(choices) == ["plain", "pdl"] and choices["pdl"] is with_pdl and choices["plain"] is plain
    assert pdl_choices(plain)["pdl"]["o"] == MatvecConfig(4, 32, 4, pdl=True, ahead=True)  # untimed: as picked

    model = _fused_model(llama_folder, "nf4")
    nf4 = dict(model.model.layers[0].configs)  # the CPU's picks: the first shape that fits
    with_pdl, asked = _pdl_ways_timed(model, nf4, monkeypatch, lambda name, ways: ways[-1])
    for name in rows:
        ways, default, reference = asked[name]
        picked = nf4[name]
        assert ways[0] == default == dataclasses.replace(picked, pdl=True)  # the pick first: it stays on a tie
        assert all(way.pdl and way.nf4_lookup == picked.nf4_lookup for way in ways)
        loading = {(way.nf4_prefetch, way.nf4_stages) for way in ways if not way.nf4_dot}
        assert loading == set(NF4_LOADING_WAYS)
        projection = model.model.layers[0].projections[name]
        assert all(projection.fits(way) for way in ways)
        # each way must agree with the pick's own output on the trial's input
        trial = triton_layers.matvec_trial([fused.layer for fused in model.model.layers], name)
        assert reference is not None and reference.shape == trial(picked).shape
        assert with_pdl[name] == ways[-1]
    choices = pdl_choices(nf4, nf4=True, pdl_configs=with_pdl)
    assert list(choices) == ["plain", "pdl", "pdl, NF4 late"]
    late = choices["pdl, NF4 late"]
    assert late["qkv"] == dataclasses.replace(with_pdl["qkv"], nf4_pdl_late=True)
    assert late["attention"] == with_pdl["attention"] == dataclasses.replace(nf4["attention"], pdl=True)
    assert not choices["pdl"]["qkv"].nf4_pdl_late and not choices["plain"]["qkv"].pdl


def test_a_lookup_variant_counts_only_where_it_gives_the_same_bits():
    """The picker times NF4 lookup variants of one launch shape only where their output equals
    the code-at-a-time lookup's up to rounding; a wrong table does not. The register lookup asks for
    a GPU."""
    generator = torch.Generator().manual_seed(2)
    linears = _nf4_linears([(32, 192)], torch.float32, nested=True)
    weight = NF4Weight.of(linears)
    x = torch.randn(192, generator=generator)
    shape = MatvecConfig(block_n=8, block_k=128, num_warps=4, nf4_lookup="nibble")
    run = lambda config: nf4_matvec(x, weight, config)  # noqa: E731
    reference = run(shape)
    assert triton_layers.agrees(run, dataclasses.replace(shape, nf4_lookup="byte"), reference)
    assert triton_layers.agrees(run, dataclasses.replace(shape, nf4_prefetch=True), reference)
    assert triton_layers.agrees(run, dataclasses.replace(shape, nf4_stages=3), reference)
    # its tile in another layout (in the interpreter with the 16 values for the permutes)
    assert triton_layers.agrees(run, dataclasses.replace(shape, nf4_lookup="registers"), reference)
    assert triton_layers.agrees(run, dataclasses.replace(shape, nf4_lookup="scaled"), reference)
    wrong = dataclasses.replace(weight, table=weight.table.flip(0).contiguous())
    assert not triton_layers.agrees(lambda config: nf4_matvec(x, wrong, config), shape, reference)
    assert not weight.registers_lookup_fits()  # a CPU: the interpreter runs no PTX
    assert not weight.scaled_lookup_fits()
    # what the picker times at a winning shape: here without the register lookup
    variants = triton_layers.nf4_variants(shape, triton_layers.Projection(weight, None, weight.rows))
    assert [(v.nf4_lookup, v.nf4_prefetch, v.nf4_stages) for v in variants] == [
        ("nibble", False, 1),
        ("byte", False, 1),
        ("nibble", True, 1),
        ("byte", True, 1),
        ("nibble", False, 3),
        ("byte", False, 3),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("position", [0, 5, 37])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_rotates_writes_and_attends_as_the_model_does(dtype, position, splits):
    """Grouped heads (4 query heads on 2 kv heads), slots over several blocks, in one program
    per head or shared out over four (some shares empty at the short positions): the kernel's
    output, the cache slot it wrote and the length it set, against RoPE, index_copy and SDPA."""
    from transformers.cache_utils import StaticLayer

    generator = torch.Generator().manual_seed(position)
    q_heads, kv_heads, head_dim, capacity = 4, 2, 16, 64
    qkv = torch.randn((q_heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    angles = torch.randn(head_dim // 2, generator=generator).repeat(2)
    cos, sin = (f(angles).to(dtype).view(1, 1, -1) for f in (torch.cos, torch.sin))
    layer = StaticLayer(max_cache_len=capacity)
    cached = torch.randn(1, kv_heads, capacity, head_dim, generator=generator).to(dtype)
    layer.lazy_initialization(cached[:, :, :1], cached[:, :, :1])
    layer.keys.copy_(cached)
    layer.values.copy_(cached.flip(-1))

    query, key, value = (
        part.view(1, 1, -1, head_dim).transpose(1, 2)
        for part in qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    )
    query, key = (triton_layers._rotate(t, cos.unsqueeze(1), sin.unsqueeze(1)) for t in (query, key))
    keys, values = layer.keys.clone(), layer.values.clone()
    keys[:, :, position], values[:, :, position] = key[:, :, 0], value[:, :, 0]
    expected = F.scaled_dot_product_attention(
        query.float(),
        keys[:, :, : position + 1].float(),
        values[:, :, : position + 1].float(),
        enable_gqa=True,
        scale=head_dim**-0.5,
    ).to(dtype)

    scale = head_dim**-0.5
    counters = attention_counters(q_heads, "cpu")
    config = AttentionConfig(8, 4, splits=splits)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 4e-3}
    for _ in range(2):  # the counters the last program of each head sets back serve the next launch
        got = decode_attention(qkv, (cos, sin), layer, torch.tensor([position]), q_heads, scale, counters, config)
        torch.testing.assert_close(got, expected.reshape(-1), **tolerance)
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert int(layer.cumulative_length) == position + 1
        assert not counters.any()


def _fused_model(folder, nf4: str = ""):
    """fp32 model, its projections fused (plain) or in NF4 ("nf4", "nf4-double-quant"), with
    the fused layers installed."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if nf4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=nf4 == "nf4-double-quant",
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    fuse_projections(model)  # plain linears only: NF4 layers stay as they are
    assert unfusable_reason(model) == ""
    assert install_fused_layers(model) == model.config.num_hidden_layers
    return model


@pytest.mark.parametrize(
    "arch,weights,splits",
    [
        ("llama", "plain", 1),
        ("qwen2", "plain", 1),
        ("qwen2", "plain", 4),
        ("llama", "nf4", 1),
        ("qwen2", "nf4-double-quant", 1),
    ],
)
def test_fused_layers_decode_the_tokens_of_generate(llama_folder, qwen2_folder, arch, weights, splits, monkeypatch):
    """fp32, greedy: the static-cache decoder over fused layers gives generate's tokens one for
    one (Qwen2's q/k/v biases included; NF4 weights against bitsandbytes' own layers, their
    values looked up a byte or a code at a time; attention
    in one program per head, or its slots shared out over four), and its single-token passes did
    go through the kernels."""
    folder = {"llama": llama_folder, "qwen2": qwen2_folder}[arch]
    nf4 = "" if weights == "plain" else weights
    prompt = [3, 14, 15, 9, 26, 5, 35, 8]
    new_tokens = 10
    plain = _fused_model(folder, nf4)
    remove_fused_layers(plain)  # the model's own layers (and bitsandbytes' own matmuls)
    expected = plain.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens
    )[0, len(prompt) :].tolist()

    calls: list[str] = []
    for name in ("fused_matvec", "nf4_matvec", "decode_attention"):
        kernel = getattr(triton_layers, name)
        counted = lambda *a, name=name, kernel=kernel, **k: calls.append(name) or kernel(*a, **k)  # noqa: E731
        monkeypatch.setattr(triton_layers, name, counted)
    model = _fused_model(folder, nf4)
    configs = model.model.layers[0].configs  # every layer's
    configs["attention"] = AttentionConfig(4, 4, splits=splits)
    if weights == "nf4-double-quant":  # two of the matvecs look their NF4 values up a byte at a time
        for name in ("gate_up", "down"):
            configs[name] = dataclasses.replace(configs[name], nf4_lookup="byte")
        configs["qkv"] = dataclasses.replace(configs["qkv"], nf4_prefetch=True)
        configs["down"] = dataclasses.replace(configs["down"], nf4_stages=3)
        configs["o"] = dataclasses.replace(configs["o"], nf4_lookup="registers")  # the 16 values here
        choices = triton_layers.describe_choices(model)
        lookups = "a nibble at a time in qkv; a byte at a time in down, gate_up; by byte permutes in o"
        assert f"NF4 values looked up {lookups}" in choices
        assert "NF4 bytes read a step ahead in qkv" in choices
        assert "NF4 loads pipelined in down" in choices
    elif weights == "nf4":
        assert "NF4 values looked up a nibble at a time" in triton_layers.describe_choices(model)
        # tensor cores in gate/up and down, whose 128 columns two programs share, as do q/k/v's
        configs["gate_up"] = MatvecConfig(16, 64, 4, nf4_lookup="nibble", nf4_dot=True)
        configs["down"] = MatvecConfig(16, 64, 4, nf4_lookup="nibble", nf4_dot=True, nf4_splits=2)
        configs["qkv"] = MatvecConfig(8, 32, 4, nf4_lookup="nibble", nf4_splits=2)
        choices = triton_layers.describe_choices(model)
        assert "NF4 products summed by tensor cores in down, gate_up" in choices
        assert "NF4 columns shared by several programs in down, qkv" in choices
    decoder = StaticDecoder(model, 256, use_cuda_graph=False)
    params = GenerationParams(temperature=0.0, max_new_tokens=new_tokens)
    assert list(decoder.tokens(prompt, params, lambda: False)) == expected
    # four matvecs a layer in every single-token pass (the cache's first token and each step),
    # and the attention kernel in every step (the first token allocates through the cache's own)
    layers = model.config.num_hidden_layers
    assert calls.count("nf4_matvec" if nf4 else "fused_matvec") == 4 * layers * new_tokens
    assert calls.count("decode_attention") == layers * (new_tokens - 1)


def test_a_compiled_step_over_the_fused_layers_decodes_the_tokens_of_generate(qwen2_folder):
    """torch.compile, as the app compiles the step on a GPU, around the kernels' ops (they
    mutate the cache and the split attention's counters): generate's fp32 tokens, and the
    counters left at zero. (The app's GPU path adds only the CUDA graph, in tests/test_gpu.py.)"""
    prompt = [3, 14, 15, 9, 26, 5, 35, 8]
    plain = _fused_model(qwen2_folder)
    remove_fused_layers(plain)
    expected = plain.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    model = _fused_model(qwen2_folder)
    first = model.model.layers[0]
    first.configs["attention"] = AttentionConfig(4, 4, splits=4)
    # the plain matvec's ways of loading, through the op's arguments as the GPU picker sets them
    first.configs["o"] = dataclasses.replace(first.configs["o"], ahead=True)
    first.configs["down"] = dataclasses.replace(first.configs["down"], stages=2)
    decoder = StaticDecoder(model, 64, use_cuda_graph=False, compile_step=True)
    params = GenerationParams(temperature=0.0, max_new_tokens=8)
    assert list(decoder.tokens(prompt, params, lambda: False)) == expected[0, len(prompt) :].tolist()
    assert hasattr(decoder._step_fn, "_torchdynamo_orig_callable")  # the step did go through torch.compile
    assert not first.attention_counters.any()
    assert triton_layers.describe_choices(model) == (
        "each head's slots over 4 programs, x read a step ahead in o, loads pipelined in down,"
        " checks of 2-16 tokens through a Triton kernel of several rows"
    )


def test_checks_of_drafts_through_the_rows_kernel_give_the_tokens_of_generate(qwen2_folder, monkeypatch):
    """fp32, greedy: prompt lookup over the fused layers (Qwen2's biases too), its passes of
    drafts through the rows kernel under the pass's mask, gives generate's tokens one for one."""
    from playground.backends.base import SpeculationStats
    from playground.backends.fast_decode import PromptLookupDrafter

    prompt = [3, 14, 15, 9, 26, 5, 35, 8, 3, 14, 15, 9, 26, 5, 35, 8, 3, 14, 15]  # repeats: drafts to check
    new_tokens = 12
    plain = _fused_model(qwen2_folder)
    remove_fused_layers(plain)
    expected = plain.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens
    )[0, len(prompt) :].tolist()
    model = _fused_model(qwen2_folder)
    passes: list[int] = []
    kernel = triton_layers.rows_matvec
    monkeypatch.setattr(
        triton_layers, "rows_matvec", lambda x, *a, **k: passes.append(x.shape[0]) or kernel(x, *a, **k)
    )
    decoder = StaticDecoder(model, 256, use_cuda_graph=False)
    params = GenerationParams(temperature=0.0, max_new_tokens=new_tokens)
    stats = SpeculationStats("prompt-lookup")
    got = list(decoder.speculative_tokens(prompt, params, lambda: False, PromptLookupDrafter(2, 4), 4, stats))
    assert got == expected
    # the checks (the token before and up to 4 drafts) took the kernel, four launches a layer;
    # the 19-token prompt did not
    assert stats.accepted > 0 and passes and set(passes) <= {2, 3, 4, 5}
    assert len(passes) % (4 * model.config.num_hidden_layers) == 0


def test_the_pickers_trials_read_every_layer_s_own_weights_and_cache(llama_folder):
    """What the launch-shape pickers time: a matvec over each layer's own weight in turn, and
    attention over one cache per layer, as a step reads them (one weight or cache timed alone
    stays in L2 and flatters the shapes that read it). The trial returns the last layer's output."""
    model = _fused_model(llama_folder)
    remove_fused_layers(model)
    layers = model.model.layers
    assert len(layers) > 1
    config = MatvecConfig(block_n=8, block_k=32, num_warps=4)
    outputs = {}
    for label, chosen in {"all": layers, "last": layers[-1:], "first": layers[:1]}.items():
        torch.manual_seed(0)  # the same random input each time
        outputs[label] = triton_layers.matvec_trial(chosen, "gate_up")(config)
    torch.testing.assert_close(outputs["all"], outputs["last"], atol=0, rtol=0)
    assert not torch.equal(outputs["all"], outputs["first"])

    counters = attention_counters(model.config.num_attention_heads, "cpu")
    run = triton_layers.attention_trial(model, (5,), counters, caches=3)
    shape = AttentionConfig(4, 4, splits=2)
    every = run(shape)  # each cache in turn: the last one's output
    torch.testing.assert_close(every, run(shape, 2), atol=0, rtol=0)
    assert not torch.equal(every, run(shape, 0))
    assert not counters.any()


def test_the_attention_trial_computes_in_the_model_s_dtype_past_int8_and_nf4_tables(llama_folder):
    """With NF4 layers and the embedding in int8 (`quantization.head`) the model's first
    parameter is a layer's NF4 bytes: the attention picker's trial still runs in the compute
    dtype (on the H200 it once made its random cache in uint8 and the load fell back to eager)."""
    from playground.backends.int8_head import quantize_embedding_and_head

    model = _fused_model(llama_folder, "nf4")
    remove_fused_layers(model)
    quantize_embedding_and_head(model)
    assert next(model.parameters()).dtype == torch.uint8
    counters = attention_counters(model.config.num_attention_heads, "cpu")
    out = triton_layers.attention_trial(model, (5,), counters)(AttentionConfig(4, 4))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_passes_of_several_tokens_take_the_rows_kernel_longer_ones_and_removal_the_model_s_own(
    llama_folder, monkeypatch
):
    """A pass of 2-16 tokens (a check of drafts) goes through the rows kernel, four launches a
    layer, and gives the model's own logits up to the sums' order; a longer pass (a prompt) and
    the layers put back give them exactly."""
    model = _fused_model(llama_folder)
    calls: list[int] = []
    kernel = triton_layers.rows_matvec
    monkeypatch.setattr(triton_layers, "rows_matvec", lambda x, *a, **k: calls.append(x.shape[0]) or kernel(x, *a, **k))
    short = torch.tensor([[3, 14, 15, 9, 26, 5]])
    long = torch.tensor([[(7 * i) % 50 + 1 for i in range(20)]])
    with torch.no_grad():
        fused_short, fused_long = model(short).logits, model(long).logits
        assert calls == [6] * 4 * model.config.num_hidden_layers  # the long pass took none
        remove_fused_layers(model)
        assert not any(isinstance(layer, FusedDecoderLayer) for layer in model.model.layers)
        torch.testing.assert_close(model(long).logits, fused_long, atol=0, rtol=0)
        torch.testing.assert_close(model(short).logits, fused_short, atol=1e-4, rtol=1e-4)


def test_layers_that_cannot_be_fused_say_why(llama_folder):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32, attn_implementation="eager")
    fuse_projections(eager)
    assert "SDPA" in unfusable_reason(eager)
    # NF4 layers that compute in another dtype than the model's: bitsandbytes casts, the kernel would not
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    mixed = AutoModelForCausalLM.from_pretrained(
        llama_folder, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    assert "compute in the model's dtype" in unfusable_reason(mixed)
    # a LoRA adapter left unmerged on an NF4 base, as the app loads a QLoRA variant: peft wraps
    # the model and the projections
    from peft import LoraConfig, get_peft_model

    quantization.bnb_4bit_compute_dtype = torch.float32
    nf4 = AutoModelForCausalLM.from_pretrained(
        llama_folder, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    assert unfusable_reason(nf4) == ""
    adapted = get_peft_model(nf4, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "LoRA adapter layers left unmerged" in unfusable_reason(adapted)
    # q/k/v left as three matmuls, as for quantized or adapter layers (fusable_groups skips those)
    unfused = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32)
    assert "q/k/v and gate/up fused, or every projection in NF4" in unfusable_reason(unfused)


def test_every_kernel_variant_compiles_for_hopper():
    """ptxas from Triton's wheel, no GPU: each kernel as the app launches it, built for sm_90,
    in a process without the interpreter (tests/hopper_compile.py)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run(
        [sys.executable, str(root / "tests" / "hopper_compile.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    from hopper_compile import VARIANTS  # noqa: PLC0415  (tests/ is on the path under pytest)

    assert done.stdout.count("bytes of sm_90 code") == len(VARIANTS), done.stdout
    # Where NF4 blocks lie within rows, a block's scale is one load, not one a byte.
    loads = {line.split(":")[0]: int(line.split(", ")[-1].split()[0]) for line in done.stdout.splitlines()}
    assert loads["nf4 gate/up"] < loads["nf4 gate/up, blocks straddling rows"], done.stdout


def test_timed_launch_shapes_are_kept_for_the_next_load_and_anything_odd_times_again(tmp_path, monkeypatch):
    """Picks stored under a key come back as the same configs; a different description is
    another key; a missing, corrupt or ill-typed file, or one without every name, is a miss
    (the load times again), and a forgotten key is gone."""
    from playground.backends import launch_shape_cache
    from playground.backends.triton_kernels import AttentionConfig

    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    names = {"qkv", "o", "gate_up", "down", "attention"}
    description = {"gpu": ["NVIDIA H200", 9, 0, 132], "layers": 24, "pdl": True}
    picks = {
        "qkv": MatvecConfig(16, 512, 8, pdl=True, nf4_lookup="scaled"),
        "o": MatvecConfig(4, 512, 4, nf4_lookup="scaled", nf4_stages=3),
        "gate_up": MatvecConfig(8, 512, 4, nf4_prefetch=True),
        "down": MatvecConfig(8, 1024, 8),
        "attention": AttentionConfig(32, 2, pdl=True, splits=16),
    }
    key = launch_shape_cache.key(description)
    assert launch_shape_cache.key(description | {"layers": 28}) != key
    assert launch_shape_cache.load(key, names) is None  # nothing stored yet
    launch_shape_cache.store(key, picks, description)
    assert launch_shape_cache.load(key, names) == picks
    without_attention = dict(picks, attention=None)
    launch_shape_cache.store(key, without_attention, description)
    assert launch_shape_cache.load(key, names) == without_attention
    assert launch_shape_cache.load(key, names | {"lm_head"}) is None

    path = launch_shape_cache.folder() / f"{key}.json"
    stored = path.read_text()
    assert list(launch_shape_cache.folder().iterdir()) == [path]  # no temporary file left
    path.write_text(stored[: len(stored) // 2])
    assert launch_shape_cache.load(key, names) is None
    path.write_text(stored.replace('"block_k": 512', '"block_k": "512"'))
    assert launch_shape_cache.load(key, names) is None
    path.write_text(stored.replace('"nf4_stages": 3', '"nf4_stages": 3, "unknown": 1'))
    assert launch_shape_cache.load(key, names) is None
    launch_shape_cache.forget(key)
    assert not path.exists()
    launch_shape_cache.forget(key)  # twice: nothing to drop

    # a cache folder that cannot be made: nothing kept, no error
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "file"))
    launch_shape_cache.store(key, picks, description)
    assert launch_shape_cache.load(key, names) is None


def test_stored_picks_that_do_not_fit_the_layers_are_not_taken(llama_folder):
    """A stored pick is checked against the layers it would run (`Projection.fits`): a column
    block too wide for a projection, a missing matvec or attention config, or an attention config
    where the model's own attention runs."""
    from transformers import AutoModelForCausalLM

    from playground.backends.triton_kernels import AttentionConfig

    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32)
    fuse_projections(model)
    first = triton_layers.layer_projections(triton_layers._decoder_layers(model)[0])
    fitting = {name: MatvecConfig(8, 64, 4) for name in triton_layers.MATVECS}
    fitting |= {pick: MatvecConfig(16, 64, 4) for pick in triton_layers.ROWS_PICKS.values()}
    assert triton_layers._cached_picks_fit(fitting | {"attention": AttentionConfig(32, 4)}, first, True)
    assert triton_layers._cached_picks_fit(fitting | {"attention": None}, first, False)
    assert not triton_layers._cached_picks_fit(fitting | {"attention": None}, first, True)
    assert not triton_layers._cached_picks_fit(fitting | {"attention": AttentionConfig(32, 4)}, first, False)
    wide = dict(fitting, qkv=MatvecConfig(8, 4 * first["qkv"].columns, 4))  # mostly masked columns
    assert not triton_layers._cached_picks_fit(wide | {"attention": AttentionConfig(32, 4)}, first, True)
    assert not triton_layers._cached_picks_fit(dict(fitting, o=None) | {"attention": None}, first, False)
    # passes of several tokens: a shape too wide is refused; none found (None) stays a valid pick
    wide_rows = dict(fitting, rows_down=MatvecConfig(16, 4 * first["down"].columns, 4))
    assert not triton_layers._cached_picks_fit(wide_rows | {"attention": None}, first, False)
    assert triton_layers._cached_picks_fit(dict(fitting, rows_down=None) | {"attention": None}, first, False)
