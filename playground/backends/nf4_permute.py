"""NF4 values looked up in registers: byte permutes (PTX `prmt`) that turn four packed bytes'
codes into the code book's four fp32 values, with no memory access.

A table lookup in a Triton kernel is a gather, and the compiler gives a gather a register layout
of its own: the packed bytes then go through shared memory (and barriers) every loop step before
they are looked up. An inline-asm function applies to each element where it lies, so the bytes
stay where they were loaded.

How: byte j of every code book value forms a 16-byte "plane" (four registers). `prmt` picks any
four bytes out of two registers by 3-bit indices, so one `prmt` a half plane gives byte j of four
values; a third picks each code's half by its top bit. Four planes, then a 4 x 4 byte transpose,
give the four values. 28 integer instructions for four values.

For bf16 weights the kernel can instead build the planes of each block's own 16 values, scaled
by the block's scale and rounded once (`scaled_table_program`); then two planes hold a value, and
a lookup gives weights ready for the multiply-add (`scaled_lookup_program`).

The programs are data, rendered to PTX for the kernel (`ptx`) and run by `emulate`, which the
tests check against bitsandbytes' values for every byte.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

# bitsandbytes' NF4 code book (`bitsandbytes.functional.get_4bit_type("nf4")`), the 16 values a
# code stands for, low code first.
NF4_CODE_BOOK = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

Instruction = tuple[str, str, str | int, str | int, str | int]  # op, destination, operands


def _bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _planes(book: tuple[float, ...]) -> dict[str, int]:
    """Byte j of every value, four values a register: `p{j}_{quarter}` holds codes 4q..4q+3."""
    bits = [_bits(value) for value in book]
    planes = {}
    for j in range(4):
        for quarter in range(4):
            word = 0
            for slot in range(4):
                word |= ((bits[4 * quarter + slot] >> (8 * j)) & 0xFF) << (8 * slot)
            planes[f"p{j}_{quarter}"] = word
    return planes


def program(high: bool, book: tuple[float, ...] = NF4_CODE_BOOK) -> list[Instruction]:
    """The instructions from `in` (four packed bytes, byte k of element k) to `out0`..`out3`:
    the fp32 bits of each byte's high (`high`) or low nibble's value in `book`."""
    code: list[Instruction] = [("mov", name, value, 0, 0) for name, value in _planes(book).items()]
    # the four codes as one nibble each, code k in bits 4k..4k+3
    if high:
        code += [("shr", "v", "in", 4, 0), ("and", "v", "v", 0x0F0F0F0F, 0)]
    else:
        code += [("and", "v", "in", 0x0F0F0F0F, 0)]
    code += [
        ("shr", "u", "v", 4, 0),
        ("or", "u", "u", "v", 0),  # byte 0: code 0 | code 1 << 4; byte 2: code 2 | code 3 << 4
        ("prmt", "s", "u", "u", 0x0020),
        ("and", "low3", "s", 0x7777, 0),  # each code's index within its half of the book
        ("and", "top", "s", 0x8888, 0),
        ("shr", "top", "top", 1, 0),
        ("or", "halves", "top", 0x3210, 0),  # byte k from the low half's result, or the high's
    ]
    for j in range(4):
        code += [
            ("prmt", "lo", f"p{j}_0", f"p{j}_1", "low3"),
            ("prmt", "hi", f"p{j}_2", f"p{j}_3", "low3"),
            ("prmt", f"r{j}", "lo", "hi", "halves"),  # byte k: byte j of code k's value
        ]
    code += [
        ("prmt", "x01l", "r0", "r1", 0x5140),
        ("prmt", "x01h", "r0", "r1", 0x7362),
        ("prmt", "x23l", "r2", "r3", 0x5140),
        ("prmt", "x23h", "r2", "r3", 0x7362),
        ("prmt", "out0", "x01l", "x23l", 0x5410),
        ("prmt", "out1", "x01l", "x23l", 0x7632),
        ("prmt", "out2", "x01h", "x23h", 0x5410),
        ("prmt", "out3", "x01h", "x23h", 0x7632),
    ]
    return code


def scaled_table_program(book: tuple[float, ...] = NF4_CODE_BOOK) -> list[Instruction]:
    """From one block's scale (`scale`, fp32 bits) to its 16 values in bf16 as bitsandbytes
    dequantizes them (book[c] * scale in fp32, rounded to nearest even), as byte planes for
    `scaled_lookup_program`: `out0`..`out3` the low bytes of values 4q..4q+3, `out4`..`out7`
    their high bytes. 32 instructions a block instead of a multiply and half a conversion a
    weight."""
    code: list[Instruction] = [("mul", f"p{c}", "scale", _bits(value), 0) for c, value in enumerate(book)]
    code += [("cvt", f"w{j}", f"p{2 * j + 1}", f"p{2 * j}", 0) for j in range(len(book) // 2)]
    for q in range(4):  # w holds values 2j (lower half) and 2j + 1 (upper half)
        code += [
            ("prmt", f"out{q}", f"w{2 * q}", f"w{2 * q + 1}", 0x6420),
            ("prmt", f"out{4 + q}", f"w{2 * q}", f"w{2 * q + 1}", 0x7531),
        ]
    return code


def scaled_lookup_program(paired: bool = False) -> list[Instruction]:
    """From `in` (four packed bytes, byte k of element k) and one block's planes (`low0`..`low3`,
    `high0`..`high3`: `scaled_table_program`'s outputs) to `out0`..`out3`, the fp32 bits of each
    byte's high nibble's value (the even column's), and `out4`..`out7`, its low nibble's. The
    planes are two bytes deep, not four, and the values come scaled and rounded: 30
    instructions for eight weights, where `program` takes 56 (and its 16 constants), and a
    multiply and half a conversion a weight follow. `paired`: `out0`..`out3` are each byte's
    two values as a bf16 pair, the even column's in the lower half, as a tensor-core multiply
    takes them (22 instructions)."""
    code: list[Instruction] = [
        ("and", "index", "in", 0x77777777, 0),  # nibble k: code k's place in its half of the book
        ("shr", "top", "in", 1, 0),
        ("and", "top", "top", 0x44444444, 0),
        ("or", "half", "top", 0x32103210, 0),  # byte k from the lower half's result (k) or the upper's
        ("shr", "index2", "index", 16, 0),
        ("shr", "half2", "half", 16, 0),
    ]
    # codes in nibble order: byte 0's low and high, byte 1's; then (shifted down) bytes 2 and 3
    for group, (index, half) in enumerate((("index", "half"), ("index2", "half2"))):
        for plane in ("low", "high"):
            code += [
                ("prmt", "a", f"{plane}0", f"{plane}1", index),
                ("prmt", "b", f"{plane}2", f"{plane}3", index),
                ("prmt", f"r{plane}", "a", "b", half),  # byte k: this plane's byte of code k's value
            ]
        if paired:  # byte k's pair: its high nibble's value (code 2k + 1) in the lower half
            code += [
                ("prmt", f"out{2 * group}", "rlow", "rhigh", 0x4051),
                ("prmt", f"out{2 * group + 1}", "rlow", "rhigh", 0x6273),
            ]
            continue
        # a byte's two values as bf16 pairs (low nibble's lower), then each as fp32 bits
        code += [("prmt", "pair0", "rlow", "rhigh", 0x5140), ("prmt", "pair1", "rlow", "rhigh", 0x7362)]
        for k, pair in enumerate(("pair0", "pair1")):
            byte = 2 * group + k
            code += [("and", f"out{byte}", pair, 0xFFFF0000, 0), ("shl", f"out{4 + byte}", pair, 16, 0)]
    return code


# Operand numbers of the scaled lookup's inline asm: its results, the packed bytes, then the
# eight planes, a register each for each of the call's `elements` (four bytes packed by Triton
# from four elements, whose block's planes must then be the same; or one word of four bytes).
def scaled_lookup_inputs(outputs: int = 8, elements: int = 4) -> dict[str, int]:
    return {"in": outputs} | {
        f"{plane}{q}": outputs + 1 + elements * (4 * side + q)
        for side, plane in enumerate(("low", "high"))
        for q in range(4)
    }


SCALED_LOOKUP_INPUTS = scaled_lookup_inputs(8)


def int8_program() -> list[Instruction]:
    """From `in` (four packed int8, byte k of element k) to `out0`..`out3`, each one's value as
    fp32 bits, exactly: its byte plus 128 (the sign bit flipped) placed under the exponent of
    2^23, then 2^23 + 128 taken away. A byte permute and a subtraction a value, where the
    compiler's conversion (`I2F`) runs at a quarter of the multiply-add rate on Hopper."""
    code: list[Instruction] = [("xor", "offset", "in", 0x80808080, 0), ("mov", "magic", 0x4B000000, 0, 0)]
    for k in range(4):  # bytes: value k, then 0, 0, 0x4B (byte 7 of magic:offset)
        code += [("prmt", f"biased{k}", "offset", "magic", 0x7550 | k), ("sub", f"out{k}", f"biased{k}", 0x4B000080, 0)]
    return code


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX `prmt.b32` in its default mode: output byte k is byte (selector nibble k & 7) of
    b:a, or that byte's sign replicated when the nibble's bit 3 is set."""
    pool = a | (b << 32)
    out = 0
    for k in range(4):
        nibble = (selector >> (4 * k)) & 0xF
        byte = (pool >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def emulate(code: list[Instruction], inputs: int | dict[str, int], outputs: int = 4) -> list[int]:
    """Run `code` on `inputs` (a 32-bit word as `in`, or each input register's bits by name);
    the bits of its `outputs` results `out0`, `out1`, ..."""
    regs: dict[str, int] = {"in": inputs} if isinstance(inputs, int) else dict(inputs)

    def value(operand: str | int) -> int:
        return operand if isinstance(operand, int) else regs[operand]

    for op, dst, a, b, c in code:
        if op == "mov":
            regs[dst] = value(a)
        elif op == "shr":
            regs[dst] = value(a) >> value(b)
        elif op == "shl":
            regs[dst] = value(a) << value(b)
        elif op == "and":
            regs[dst] = value(a) & value(b)
        elif op == "or":
            regs[dst] = value(a) | value(b)
        elif op == "xor":
            regs[dst] = value(a) ^ value(b)
        elif op == "sub":  # fp32, rounded to nearest even, as sub.rn.f32
            regs[dst] = _bits(float(np.float32(_float(value(a))) - np.float32(_float(value(b)))))
        elif op == "prmt":
            regs[dst] = _prmt(value(a), value(b), value(c))
        elif op == "mul":  # fp32, rounded to nearest even, as mul.rn.f32
            regs[dst] = _bits(float(np.float32(_float(value(a))) * np.float32(_float(value(b)))))
        elif op == "cvt":  # cvt.rn.bf16x2.f32: a's bf16 in the upper half, b's in the lower
            regs[dst] = (_bf16_bits(value(a)) << 16) | _bf16_bits(value(b))
        else:
            raise ValueError(op)
        regs[dst] &= 0xFFFFFFFF
    return [regs[f"out{k}"] for k in range(outputs)]


def _float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _bf16_bits(bits: int) -> int:
    """fp32 bits rounded to bf16 to nearest even (torch's conversion, as the GPU's cvt.rn)."""
    value = torch.tensor([bits & 0xFFFFFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)
    return int(value.to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def ptx(code: list[Instruction], outputs: int = 4, inputs: dict[str, int] | None = None) -> str:
    """`code` as the body of a Triton `inline_asm_elementwise` call: `outputs` 32-bit results
    ($0, $1, ...) and its inputs' operand numbers (by default one, `in` = ${outputs}: four
    packed bytes). A multiply's or subtraction's constant is fp32 bits."""
    inputs = {"in": outputs} if inputs is None else inputs
    names = sorted({dst for _, dst, *_ in code if not dst.startswith("out")})
    operands = {name: f"%nf4_{name}" for name in names} | {f"out{k}": f"${k}" for k in range(outputs)}
    operands |= {name: f"${index}" for name, index in inputs.items()}

    def text(operand: str | int, floating: bool = False) -> str:
        if isinstance(operand, str):
            return operands[operand]
        return f"0f{operand:08X}" if floating else f"0x{operand:X}"

    lines = ["{", "  .reg .b32 " + ", ".join(operands[name] for name in names) + ";"]
    for op, dst, a, b, c in code:
        if op == "mov":
            lines.append(f"  mov.b32 {text(dst)}, {text(a)};")
        elif op == "prmt":
            lines.append(f"  prmt.b32 {text(dst)}, {text(a)}, {text(b)}, {text(c)};")
        elif op in ("mul", "sub"):
            lines.append(f"  {op}.rn.f32 {text(dst)}, {text(a)}, {text(b, floating=True)};")
        elif op == "cvt":
            lines.append(f"  cvt.rn.bf16x2.f32 {text(dst)}, {text(a)}, {text(b)};")
        else:
            lines.append(f"  {op}.b32 {text(dst)}, {text(a)}, {text(b)};")
    lines.append("}")
    return "\n".join(lines)
