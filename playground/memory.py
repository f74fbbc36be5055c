"""How much memory a variant will need before it is loaded, and whether that fits.

weights: from the files on disk (GGUF tensor sizes, safetensors headers, state_dict shapes),
scaled to the dtype the variant loads in; from the config's `shape` hint when the weights are
not downloaded yet. KV cache: 2 (K and V) x layers x KV heads x head size x context x bytes.
Runtime: what an idle worker of that backend holds (measured: torch + transformers ~400 MiB,
llama.cpp ~60 MiB), plus 10% of the weights for activations. An estimate, shown as one.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from playground.capabilities import capabilities
from playground.config import ModelConfig
from playground.gguf_types import CONVERTED_BYTES_PER_WEIGHT, converted_type, gguf_file_type
from playground.sources import (
    Weights,
    check_hf_folder,
    gguf_architecture,
    locate,
    read_gguf_header,
    safetensors_header,
)

MiB = 1 << 20
GiB = 1 << 30
RUNTIME_BYTES = {"transformers": 400 * MiB, "scratch_gpt": 400 * MiB, "llamacpp": 60 * MiB, "openai": 60 * MiB}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# bitsandbytes: NF4 packs two weights a byte plus one scale per 64; int8 one byte plus scales.
QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0 + 4 / 4096}


@dataclass(frozen=True)
class ModelShape:
    n_params: int
    n_layers: int | None
    n_kv_heads: int | None
    head_dim: int | None
    file_bytes: int | None = None  # bytes as stored (GGUF) or as the model card gives them
    # What bitsandbytes leaves unquantized (it quantizes every Linear layer except the LM head):
    # the token embedding and an untied head (tensors of a row per vocabulary entry) and their
    # rows; vectors (norms, biases) and any `keep_modules`. None: not known.
    embedding_params: int | None = None
    embedding_rows: int | None = None
    other_kept_params: int = 0


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    runtime_bytes: int
    device: str
    available_bytes: int | None
    basis: str
    gpu: int | None = None  # the GPU it goes to (the pinned one, or the one with most free memory)
    refusal: str | None = None  # why it cannot go where it asks (a GPU this machine lacks)
    rooms: str = ""  # each GPU's room within the GPU budget, where one is set

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.refusal is None and (self.available_bytes is None or self.total_bytes <= self.available_bytes)

    def describe(self) -> str:
        if self.refusal:
            return self.refusal
        where = f"GPU {self.gpu}" if self.gpu is not None else self.device
        text = (
            f"~{self.total_bytes / GiB:.2f} GiB on {where} (weights {self.weights_bytes / GiB:.2f}, "
            f"KV cache {self.kv_cache_bytes / GiB:.2f}, runtime {self.runtime_bytes / GiB:.2f}; from {self.basis})"
        )
        if self.available_bytes is not None:
            text += f"; {self.available_bytes / GiB:.2f} GiB available"
        if self.rooms:
            text += f" ({self.rooms})"
        return text


# -- shapes read from files ------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _gguf_metadata(path: str, _mtime: float) -> dict[str, int]:
    reader = read_gguf_header(Path(path))  # a cut-short or corrupt file: its problem, not the reader's error
    arch = gguf_architecture(reader, Path(path))

    def field(name: str) -> object:
        found = reader.fields.get(name)
        return found.contents() if found is not None else None

    heads = int(field(f"{arch}.attention.head_count") or 1)
    width = int(field(f"{arch}.embedding_length") or 0)
    return {
        "n_params": sum(int(t.n_elements) for t in reader.tensors),
        "n_layers": int(field(f"{arch}.block_count") or 0),
        "n_kv_heads": int(field(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": int(field(f"{arch}.attention.key_length") or (width // heads if heads else 0)),
        "context_length": int(field(f"{arch}.context_length") or 0) or None,
        "file_bytes": Path(path).stat().st_size,
    }


def gguf_metadata(path: str | Path) -> dict[str, int]:
    """Sizes from a GGUF file's header (cached per file and modification time)."""
    path = Path(path)
    return _gguf_metadata(str(path), path.stat().st_mtime)


def _gguf_shape(path: Path) -> ModelShape:
    meta = gguf_metadata(path)
    return ModelShape(meta["n_params"], meta["n_layers"], meta["n_kv_heads"], meta["head_dim"], meta["file_bytes"])


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    return {name: entry["shape"] for name, entry in safetensors_header(path).items() if name != "__metadata__"}


def _kept_by(name: str, keep_modules: list[str]) -> bool:
    """Whether a tensor is in a module named in `keep_modules` (as bitsandbytes skips them)."""
    return any(f".{keep}." in f".{name}" for keep in keep_modules)


def _hf_folder_shape(folder: Path, keep_modules: list[str]) -> ModelShape:
    check_hf_folder(folder, needs_tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    heads = int(config.get("num_attention_heads", 1))
    vocab = int(config.get("vocab_size") or 0)
    params = embedding = rows = other_kept = 0
    files = sorted(folder.glob("*.safetensors"))
    for name, shape in (item for f in files for item in _safetensors_shapes(f).items()):
        count = math.prod(shape)
        params += count
        if len(shape) == 2 and shape[0] == vocab:  # the embedding, or an untied head
            embedding, rows = embedding + count, rows + shape[0]
        elif len(shape) < 2 or _kept_by(name, keep_modules):
            other_kept += count
    if not files:  # .bin checkpoints: assume the fp32 they are usually saved in
        params = sum(f.stat().st_size for f in folder.glob("*.bin")) // 4
    return ModelShape(
        n_params=params,
        n_layers=int(config.get("num_hidden_layers", 0)),
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config.get("hidden_size", 0) // heads),
        embedding_params=embedding if files and vocab else None,
        embedding_rows=rows if files and vocab else None,
        other_kept_params=other_kept,
    )


def _state_dict_shape(path: Path, config: ModelConfig) -> ModelShape:
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    else:  # mmap: shapes without reading the data
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        shapes = {k: list(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    params = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        params += count
    layers = {k.split(".")[1] for k in shapes if k.startswith("blocks.")}
    head_dim = config.scratch_gpt.head_dim
    kv_rows = next((s[0] for k, s in shapes.items() if k.endswith("blocks.0.attention.wk.weight")), head_dim)
    return ModelShape(n_params=params, n_layers=len(layers), n_kv_heads=max(1, kv_rows // head_dim), head_dim=head_dim)


def model_shape(config: ModelConfig, weights: Weights) -> tuple[ModelShape | None, str]:
    """The variant's sizes and where they came from."""
    if weights.present and weights.kind == "gguf":
        return _gguf_shape(weights.path), "the GGUF file"
    if weights.present and weights.kind == "hf_folder" and (weights.path / "config.json").exists():
        return _hf_folder_shape(weights.path, config.quantization.keep_modules), "config.json and weight files"
    if weights.present and weights.kind == "state_dict":
        return _state_dict_shape(weights.path, config), "the state_dict's tensor shapes"
    if config.shape is not None:
        hint = config.shape
        return (
            ModelShape(
                int(hint.n_params),
                hint.n_layers,
                hint.n_kv_heads,
                hint.head_dim,
                hint.weights_bytes,
                int(hint.embedding_params) if hint.embedding_params else None,
            ),
            "the config's shape hint (weights not downloaded)",
        )
    return None, "nothing (weights absent and no shape hint)"


# -- where it runs and what is free there ----------------------------------------------------
def gpu_memory() -> list[tuple[int, int]]:
    """(free, total) bytes of each NVIDIA GPU; empty where there is none or no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound on machines without a GPU
        return []
    try:
        result = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            info = nvml_memory_info(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
            result.append((int(info.free), int(info.total)))
        return result
    finally:
        pynvml.nvmlShutdown()


def nvml_memory_info(nv: Any, handle: Any) -> Any:
    """nvml's memory figures. Version 2 keeps the driver's reserved memory out of `used`, as
    nvidia-smi does; version 1 counts it as used (480 MiB more, measured on an H100)."""
    try:
        return nv.nvmlDeviceGetMemoryInfo(handle, version=nv.nvmlMemory_v2)
    except (AttributeError, TypeError, nv.NVMLError):
        return nv.nvmlDeviceGetMemoryInfo(handle)


def pinned_gpu(device: str) -> int | None:
    """N of a `cuda:N` device; None for any other."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else None


def pick_gpu(gpus: list[tuple[int, int]], pinned: int | None) -> tuple[int | None, str | None]:
    """The GPU a variant goes to, from each GPU's (room, total) bytes: the pinned one, else the
    one with the most room (the only one that can fit it if any can); and why none can be
    named (no GPU, or a pinned index this machine lacks)."""
    if not gpus:
        return None, None
    if pinned is not None:
        if pinned >= len(gpus):
            return (
                None,
                f"device cuda:{pinned} asks for GPU {pinned}, and this machine has {len(gpus)} (0-{len(gpus) - 1})",
            )
        return pinned, None
    return max(range(len(gpus)), key=lambda i: (gpus[i][0], -i)), None


@dataclass(frozen=True)
class GpuBudget:
    """The most the loaded variants may take of each GPU (`gpu_budget_mib`), and what each GPU's
    variants already take of it by their estimates (index: GPU)."""

    budget_bytes: int
    held_bytes: tuple[int, ...] = ()

    def room(self, gpu: int, free: int) -> int:
        held = self.held_bytes[gpu] if gpu < len(self.held_bytes) else 0
        return max(0, min(free, self.budget_bytes - held))


def gpu_rooms(gpus: list[tuple[int, int]], budget: GpuBudget | None) -> list[tuple[int, int]]:
    """Each GPU's (room, total): its free memory, within what the budget leaves it."""
    if budget is None:
        return gpus
    return [(budget.room(i, free), total) for i, (free, total) in enumerate(gpus)]


def planned_device(config: ModelConfig) -> str:
    caps = capabilities(config.backend)
    if caps.remote:
        return "remote"
    if config.device != "auto":
        return "cuda" if config.device.startswith("cuda") else config.device
    if not caps.runs_on_gpu or (caps.weights_as_file and config.llamacpp.n_gpu_layers == 0):
        return "cpu"
    return "cuda" if gpu_memory() else "cpu"


def estimate(
    config: ModelConfig, budget_bytes: int | None = None, gpu_budget: GpuBudget | None = None
) -> MemoryEstimate:
    """The memory `config` needs where it will run, and what is available there: free memory,
    within `budget_bytes` (host or GPU) and, on a GPU, within what `gpu_budget` leaves it."""
    device = planned_device(config)
    runtime = RUNTIME_BYTES[config.backend]
    if device == "remote":
        return MemoryEstimate(0, 0, runtime, "cpu", _available_ram(budget_bytes), "a remote server")
    gpu, refusal, available, rooms_note = None, None, None, ""
    if device == "cuda":
        gpus = gpu_rooms(gpu_memory(), gpu_budget)
        gpu, refusal = pick_gpu(gpus, pinned_gpu(config.device))
        available = _within_budget(gpus[gpu][0] if gpu is not None else None, budget_bytes)
        if gpu_budget is not None:
            rooms = ", ".join(f"GPU {i} {room / GiB:.2f} GiB" for i, (room, _) in enumerate(gpus))
            rooms_note = f"room within the {gpu_budget.budget_bytes / GiB:.2f} GiB budget per GPU: {rooms}"
    else:
        available = _available_ram(budget_bytes)
    weights = locate(config)
    shape, basis = model_shape(config, weights)
    if shape is None:
        return MemoryEstimate(0, 0, runtime, device, available, basis, gpu, refusal, rooms_note)
    dtype = config.dtype if config.dtype != "auto" else "bf16"
    from_hint = weights.kind == "hub_repo" or not weights.present
    if capabilities(config.backend).weights_as_file:
        weight_bytes = shape.file_bytes or shape.n_params
        converted = _converted_bytes_per_weight(config, weights, device)
        if converted:
            weight_bytes, basis = (
                int(shape.n_params * converted),
                basis + f"; weights converted ({config.llamacpp.convert_weights})",
            )
        kv_bytes_per = 2  # llama.cpp keeps an f16 KV cache by default
    elif from_hint and shape.file_bytes and config.quantization.method == "none":
        weight_bytes, kv_bytes_per = shape.file_bytes, DTYPE_BYTES[dtype]
    elif config.quantization.method != "none":
        weight_bytes, kv_bytes_per = _quantized_bytes(config, shape, dtype), DTYPE_BYTES[dtype]
        if shape.embedding_params is None:
            basis += "; embedding and head counted as quantized (their size unknown)"
    else:
        weight_bytes, kv_bytes_per = int(shape.n_params * DTYPE_BYTES[dtype]), DTYPE_BYTES[dtype]
    if shape.n_layers and shape.n_kv_heads and shape.head_dim:
        kv = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * config.context_length * kv_bytes_per
    else:
        kv, basis = 0, basis + "; KV cache unknown"
    return MemoryEstimate(
        weights_bytes=int(weight_bytes),
        kv_cache_bytes=kv,
        runtime_bytes=runtime + int(0.1 * weight_bytes),
        device=device,
        available_bytes=available,
        basis=basis,
        gpu=gpu,
        refusal=refusal,
        rooms=rooms_note,
    )


def _quantized_bytes(config: ModelConfig, shape: ModelShape, dtype: str) -> int:
    """A bitsandbytes variant's weights: its Linear layers at the method's bytes a weight; the
    embedding and head, vectors and `keep_modules` in the load dtype, or the embedding and head
    as int8 rows with an fp32 scale each (`quantization.head: int8`)."""
    embedding = shape.embedding_params or 0
    quantized = shape.n_params - embedding - shape.other_kept_params
    kept = shape.other_kept_params * DTYPE_BYTES[dtype]
    if config.quantization.head == "int8":
        kept += embedding + 4 * (shape.embedding_rows or 0)
    else:
        kept += embedding * DTYPE_BYTES[dtype]
    return int(quantized * QUANT_BYTES[config.quantization.method] + kept)


def _converted_bytes_per_weight(config: ModelConfig, weights: Weights, device: str) -> float | None:
    """Bytes per weight of the type a GGUF is converted to at load (gguf_types), None where it
    is kept as stored. `auto` may convert to BF16 or F16: both take 2 bytes a weight."""
    choice = config.llamacpp.convert_weights
    if choice == "no" or config.backend != "llamacpp":
        return None
    stored = gguf_file_type(weights.path) if weights.present and weights.kind == "gguf" else "unknown"
    target = converted_type(choice, stored, device != "cpu", cpu_features="")  # auto: F16 or BF16, alike here
    return CONVERTED_BYTES_PER_WEIGHT[target] if target else None


def _available_ram(budget_bytes: int | None) -> int | None:
    """Free system memory, within the budget (a GPU's free memory comes with pick_gpu's choice)."""
    return _within_budget(psutil.virtual_memory().available, budget_bytes)


def _within_budget(free: int | None, budget_bytes: int | None) -> int | None:
    if budget_bytes is not None:
        free = budget_bytes if free is None else min(free, budget_bytes)
    return free


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def weights_size(config: ModelConfig) -> int | None:
    """Bytes of the variant's weight files: measured on disk when they are here, else what a
    download would bring, from the config's shape hint (its `weights_bytes`, or 2 bytes per
    parameter, as checkpoints are mostly saved in bf16). None when unknown (remote servers,
    whole hub repos already cached)."""
    weights = locate(config)
    if weights.kind == "remote":
        return None
    if weights.present:
        path = Path(weights.location)
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(f.stat().st_size for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
        return None
    hint = config.shape
    if hint is None:
        return None
    return hint.weights_bytes or int(hint.n_params * 2)
