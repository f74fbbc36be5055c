"""llama.cpp's weight types: a GGUF file's type, llama.cpp's own quantizer, and weights converted
at load to a type whose CPU kernels process prompts faster.

A route decision is all prompt processing, and llama.cpp's matrix-matrix kernels differ by weight
type and CPU: the embedded router's Q4_1 file decided in 125 ms p50 on an AVX-512 CPU where its
BF16 conversion took 75 ms, and in 278 ms on an AVX2 CPU where F16 took 171 ms
(benchmarks/router_formats.py, benchmarks/RESULTS.md). No torch here: llama.cpp workers import
this module, and torch's CUDA libraries beside llama.cpp's have crashed a worker.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from pathlib import Path
from typing import Literal

# llama.cpp's file types for the quantizer (llama_ftype); the names as its tools spell them.
QUANT_TYPES = {"Q4_K_M": 15, "Q4_1": 3, "Q8_0": 7, "Q4_0": 2, "Q5_K_M": 17, "Q6_K": 18, "F16": 1, "BF16": 32}

ConvertWeights = Literal["no", "auto", "F16", "BF16", "Q8_0"]
# Bytes per weight of the types weights may be converted to (Q8_0: 32 int8 and an f16 scale).
CONVERTED_BYTES_PER_WEIGHT = {"F16": 2.0, "BF16": 2.0, "Q8_0": 34 / 32}


def quantize_gguf(
    source: Path, target: Path, quant_type: str, threads: int = 0, allow_requantize: bool = False
) -> Path:
    """llama.cpp's own quantizer (through llama-cpp-python), from an F32/F16 GGUF or, with
    `allow_requantize`, from a quantized one (dequantized first: a conversion to F16, BF16 or
    Q8_0 keeps a 4-bit file's values to within that type's rounding)."""
    import llama_cpp

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {quant_type!r}; known: {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant_type]
    params.nthread = threads
    params.allow_requantize = allow_requantize
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0 or not Path(target).exists():
        raise RuntimeError(f"llama.cpp could not quantize {source.name} to {quant_type} (code {code})")
    return target


def gguf_file_type(path: Path) -> str:
    """The file's weight type as llama.cpp's tools name it (Q4_1, Q4_K_M, F16, ...), or
    'unknown' where the file does not say. Kept per file version: every memory estimate asks,
    and reading the header parses every tensor's entry."""
    stat = path.stat()
    return _stored_file_type(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _stored_file_type(path: str, mtime_ns: int, size: int) -> str:
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "unknown"
    raw = int(field.parts[field.data[0]][0])
    try:
        return LlamaFileType(raw).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type {raw}"


def is_low_bit(file_type: str) -> bool:
    """A 2- to 6-bit type (legacy, k- or i-quants), whose CPU prompt kernels are the slow ones."""
    return file_type.startswith(("Q", "IQ", "TQ")) and file_type != "Q8_0"


def converted_type(choice: ConvertWeights, stored: str, on_gpu: bool, cpu_features: str) -> str | None:
    """The type a llama.cpp variant's weights are converted to at load, None to keep them.

    `auto` converts only a low-bit file running on the CPU: to BF16 where llama.cpp was built
    with AVX512_BF16 (or AMX) dot products, else to F16; a named type is always honoured.
    `cpu_features` is llama.cpp's system info ("AVX512_BF16 = 1 | ...")."""
    if choice == "no" or choice == stored:
        return None
    if choice != "auto":
        return choice
    if on_gpu or not is_low_bit(stored):
        return None
    bf16_units = any(f"{flag} = 1" in cpu_features for flag in ("AVX512_BF16", "AMX_BF16"))
    return "BF16" if bf16_units else "F16"


def cpu_repack_wanted(choice: str, cpu_features: str) -> bool:
    """Whether llama.cpp may repack a variant's CPU weights into its extra layouts (AMX tiles,
    AVX or Arm interleavings). `auto`: not where llama.cpp was built with AMX ("AMX_INT8 = 1"
    in its system info): on such a CPU (a Xeon with AMX) the embedded 135M's first prompt of
    more than one token crashed the worker in the AMX matmul, as llama.cpp issue 20824 and
    DSPy's CI saw with other models."""
    if choice != "auto":
        return choice == "on"
    return "AMX_INT8 = 1" not in cpu_features


def converted_gguf(source: Path, quant_type: str, folder: Path) -> tuple[Path, bool]:
    """`source` converted to `quant_type` in `folder`: (path, made_now).

    Keyed by the source's path, size and modification time, so a changed file is converted
    again; written under a temporary name and renamed, so a crash or a full disk leaves no half
    file that a later load would take."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = folder / f"{source.stem}-{key}.{quant_type}.gguf"
    if target.exists():
        return target, False
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".staging-{os.getpid()}-{target.name}"
    try:
        quantize_gguf(source, staging, quant_type, allow_requantize=True)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target, True
