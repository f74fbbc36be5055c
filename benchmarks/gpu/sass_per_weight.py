"""Machine instructions per NF4 weight in a matvec kernel's main loop, with no GPU.

Compiles `triton_source.nf4_matvec_kernel` for Hopper (sm_90) with Triton's own ptxas, disassembles
it with the wheel's cuobjdump, finds the longest backward-branch loop (the K loop) and divides its
instruction count by the weights one thread decodes a loop step. Decoding is what bounds NF4
decode on the H200 (a gate/up call runs at about a fifth of the copy rate), so this count is the
first thing to look at before spending device time on a kernel change.

    python3 -m benchmarks.gpu.sass_per_weight [--only TEXT] [--extra NAME=VALUE ...]

`--extra` adds compile-time constants the kernel takes (e.g. `DOT=1` for tensor cores, with
`--shape 64,256,4`: 64 rows a program for Hopper's wgmma).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.compiler import ASTSource

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import hopper_compile  # noqa: E402  (the tests' sm_90 signatures)

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def nf4_case(columns: int, parts: int, gated: bool, block_n: int, block_k: int, lookup: int, **flags) -> tuple:
    """A layer's NF4 matvec: q/k/v (3 parts, norm), gate/up (2, norm, gated) or o/down (1, residual)."""
    kernel, signature, constants = hopper_compile.nf4(
        parts,
        nested=flags.pop("nested", False),
        norm=parts > 1,
        bias=False,
        gated=gated,
        residual=parts == 1,
        lookup=lookup,
    )
    constants.update(K=columns, BLOCK_N=block_n, BLOCK_K=block_k, TILE_BLOCKS=block_k // 64, **flags)
    return kernel, signature, constants


# (label, case, warps): SmolLM2-1.7B's projections (K 2048, down 8192) in the launch shapes the
# H200's picker chose for the scaled lookup (LOOKUP 3).
CASES = [
    ("qkv 8x512, 4 warps", nf4_case(2048, 3, False, 8, 512, 3), 4),
    ("gate/up 8x512, 4 warps", nf4_case(2048, 2, True, 8, 512, 3), 4),
    ("down 8x1024, 8 warps", nf4_case(8192, 1, False, 8, 1024, 3), 8),
]


def compile_sm90(kernel, signature: dict, constants: dict, warps: int):
    order = [name for name in kernel.arg_names if name not in constants]
    signature = {name: signature[name] for name in order} | {name: "constexpr" for name in constants}
    names = list(signature)
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in order if signature[n].startswith("*")}
    source = ASTSource(kernel, signature, constants, aligned)
    return triton.compile(source, target=hopper_compile.HOPPER, options={"num_warps": warps})


def loop_counts(sass: str) -> collections.Counter:
    """Opcode counts in the longest loop (a branch to an earlier address), else the whole kernel."""
    lines = [(int(m.group(1), 16), m.group(2), text) for text in sass.splitlines() if (m := INSTRUCTION.match(text))]
    addresses = [address for address, _, _ in lines]
    best = (0, 0, len(lines) - 1)
    for index, (address, opcode, text) in enumerate(lines):
        target = re.search(r"BRA (?:\S+ )?0x([0-9a-f]+)", text)
        if opcode == "BRA" and target and int(target.group(1), 16) < address:
            start = addresses.index(int(target.group(1), 16))
            best = max(best, (index - start + 1, start, index))
    _, start, end = best
    return collections.Counter(opcode.split(".")[0] for _, opcode, _ in lines[start : end + 1])


def weights_per_thread(constants: dict, warps: int) -> float:
    return constants["BLOCK_N"] * constants["BLOCK_K"] * (2 if constants["GATED"] else 1) / (32 * warps)


def report(label: str, case: tuple, warps: int) -> str:
    kernel, signature, constants = case
    compiled = compile_sm90(kernel, signature, constants, warps)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True, check=True)
    registers = re.search(r"REG:(\d+)", usage.stdout)
    counts = loop_counts(sass)
    total = sum(counts.values())
    top = ", ".join(f"{opcode} {n}" for opcode, n in counts.most_common(8))
    per_weight = total / weights_per_thread(constants, warps)
    regs = registers.group(1) if registers else "?"
    return f"| {label} | {per_weight:.1f} | {total} | {regs} | {top} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="cases whose label contains this text")
    parser.add_argument("--extra", action="append", default=[], help="NAME=VALUE compile-time constants")
    parser.add_argument("--shape", action="append", default=[], help="BLOCK_N,BLOCK_K,warps: also these shapes")
    args = parser.parse_args()
    extra = {name: int(value) for name, value in (item.split("=", 1) for item in args.extra)}
    print("| case | instructions a weight | loop instructions | registers | most frequent |")
    print("| --- | ---: | ---: | ---: | --- |")
    cases = list(CASES)
    for shape in args.shape:
        block_n, block_k, warps = map(int, shape.split(","))
        cases += [
            (f"qkv {block_n}x{block_k}, {warps} warps", nf4_case(2048, 3, False, block_n, block_k, 3), warps),
            (f"gate/up {block_n}x{block_k}, {warps} warps", nf4_case(2048, 2, True, block_n, block_k, 3), warps),
            (f"down {block_n}x{block_k}, {warps} warps", nf4_case(8192, 1, False, block_n, block_k, 3), warps),
        ]
    for label, (kernel, signature, constants), warps in cases:
        if args.only in label:
            print(report(label, (kernel, signature, constants | extra), warps), flush=True)


if __name__ == "__main__":
    main()
