"""The GGUF export job: a transformers Llama-family variant (fine-tuned or not) written as an F16
GGUF by playground.gguf_export, then quantized by llama.cpp's own quantizer; each file becomes a
llama.cpp variant next to the others.

The tokenizer and chat template come from the GGUF the variant descends from when there is one
(the embedded model's file, through the fine-tune records), so the export tokenizes exactly as
the original; otherwise they are built from the HF tokenizer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator

from playground.capabilities import capabilities, with_capability
from playground.config import ModelConfig
from playground.errors import PlaygroundError
from playground.evals.corpus import BUNDLED as CORPORA
from playground.jobs.kinds import Emit, JobContext, _Options
from playground.jobs.lora import save_variant_config
from playground.settings import named_or_allowed

if TYPE_CHECKING:
    from playground.catalogue import Catalogue

QuantType = Literal["Q4_K_M", "Q4_1", "Q8_0", "Q4_0", "Q5_K_M", "Q6_K", "F16"]


class ExportOptions(_Options):
    model: str
    types: Annotated[list[QuantType], Field(min_length=1)] = ["Q4_K_M", "Q4_1", "Q8_0"]
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._\-]*$", max_length=60)] | None = None


def source_gguf(catalogue: Catalogue, config: ModelConfig) -> Path | None:
    """The GGUF file `config` was made from, following fine-tune records back to their base."""
    from playground.sources import locate

    seen: set[str] = set()
    current: ModelConfig | None = config
    while current is not None and current.id not in seen:
        seen.add(current.id)
        if current.source is not None:
            weights = locate(current)
            if weights.kind == "gguf" and weights.present:
                return weights.path
        current = catalogue.configs.get(current.finetune.base) if current.finetune else None
    return None


def export_variant(
    catalogue: Catalogue, config: ModelConfig, folder: Path, types: list[str], emit: Emit | None = None
) -> tuple[dict[str, Path], Path | None]:
    """F16 GGUF of `config` in `folder`, and one file per quantization type: ({type: path}, the
    GGUF whose tokenizer was copied, if any)."""
    import torch

    from playground.backends.transformers_backend import TransformersBackend
    from playground.gguf_export import write_gguf
    from playground.gguf_types import quantize_gguf

    if not capabilities(config.backend).exports_gguf or config.quantization.method != "none" or config.adapter:
        raise PlaygroundError(
            f"GGUF export takes an unquantized, merged variant of the {', '.join(with_capability('exports_gguf'))} "
            f"backend; {config.id} is not"
        )
    backend = TransformersBackend(config.model_copy(update={"dtype": "fp32", "device": "cpu"}))
    backend.load()
    model = backend.model
    if model.config.model_type not in ("llama", "mistral"):
        raise PlaygroundError(f"the GGUF export writes Llama-family models, not {model.config.model_type}")
    folder.mkdir(parents=True, exist_ok=True)
    source = source_gguf(catalogue, config)
    f16 = folder / f"{config.id}-F16.gguf"
    with torch.no_grad():
        write_gguf(model, backend.codec.tokenizer, f16, dtype="f16", name=config.id, tokenizer_from=source)
    del model, backend
    if emit:
        emit({"message": f"wrote {f16.name}" + (f" with the tokenizer of {source.name}" if source else "")})
    files = {"F16": f16}
    for quant_type in types:
        if quant_type == "F16":
            continue
        started = time.perf_counter()
        files[quant_type] = quantize_gguf(f16, folder / f"{config.id}-{quant_type}.gguf", quant_type)
        if emit:
            emit({"message": f"quantized to {quant_type} in {time.perf_counter() - started:.1f} s"})
    return files, source


def run_export(options: ExportOptions, ctx: JobContext) -> dict[str, Any]:
    emit, job_id = ctx.emit, ctx.job_id
    base = ctx.catalogue.resolve(options.model)
    emit({"message": f"exporting {base.id} to {', '.join(options.types)}", "step": 0, "total": len(options.types) + 1})
    files, source = export_variant(ctx.catalogue, base, ctx.folder, list(options.types), emit)
    made = []
    stem = options.name or base.id[:60]
    for quant_type, path in files.items():
        if quant_type not in options.types:
            continue
        variant_id = f"{stem}-{quant_type.lower().replace('_', '-')}"
        config = {
            "id": variant_id,
            "display_name": f"{base.display_name} → GGUF {quant_type}",
            "backend": "llamacpp",
            "source": {"path": str(path)},
            "prompt_format": base.prompt_format,
            "context_length": base.context_length,
            "generation": base.generation.model_dump(exclude_none=True),
            "role": base.role,
            "finetune": {"base": base.id, "data": "", "job_id": job_id, "options": options.model_dump()},
        }
        if base.router is not None:
            config["router"] = base.router.model_dump()
        save_variant_config(config, ctx.catalogue)
        made.append({"variant_id": variant_id, "type": quant_type, "path": str(path), "bytes": path.stat().st_size})
    emit({"step": len(options.types) + 1, "total": len(options.types) + 1})
    return {"files": made, "tokenizer_from": str(source or "the HF tokenizer")}


class QuantCompareOptions(_Options):
    """Base vs QAT (and optionally a no-QAT fine-tune of the same length): each exported and
    quantized the same way, then measured in llama.cpp on held-out text."""

    model: str  # the base variant
    qat: str  # the variant the QAT job made
    control: str | None = None  # the variant a `schedule: none` run made, to separate QAT from training
    types: Annotated[list[QuantType], Field(min_length=1)] = ["Q4_K_M", "Q4_1", "Q8_0"]
    corpus: str = "python-docs-heldout"
    max_chars: Annotated[int, Field(ge=1000)] | None = 30_000

    @field_validator("corpus")
    @classmethod
    def _readable(cls, value: str) -> str:
        return named_or_allowed(value, CORPORA, "corpus file")

    window: Annotated[int, Field(ge=16, le=131_072)] = 512
    stride: Annotated[int, Field(ge=1, le=131_072)] = 256


def run_quant_compare(options: QuantCompareOptions, ctx: JobContext) -> dict[str, Any]:
    from playground.engine import Engine
    from playground.evals.corpus import documents, limited
    from playground.evals.perplexity import perplexity

    emit, job_id = ctx.emit, ctx.job_id
    roles = {"base": options.model, "qat": options.qat} | ({"control": options.control} if options.control else {})
    configs = {role: ctx.catalogue.resolve(variant) for role, variant in roles.items()}
    docs = limited(documents(options.corpus), options.max_chars)
    types = ["F16", *[t for t in options.types if t != "F16"]]
    total, done, rows = len(configs) * (1 + len(types)), 0, []
    emit({"message": f"{len(configs)} variants x {len(types)} files, {len(docs)} documents", "step": 0, "total": total})
    engine = Engine(ctx.catalogue)
    for role, config in configs.items():
        files, _ = export_variant(ctx.catalogue, config, ctx.folder / role, types, emit)
        done += 1
        emit({"step": done, "total": total})
        for quant_type in types:
            path = files[quant_type]
            measured = ctx.catalogue.add_path(path, id=f"{role}-{quant_type.lower().replace('_', '-')}-{job_id[-6:]}")
            engine.load(measured.id, check_memory=False)
            try:
                result = perplexity(engine, measured.id, docs, options.window, options.stride)
            finally:
                engine.unload(measured.id)
            rows.append(
                {
                    "role": role,
                    "variant": config.id,
                    "type": quant_type,
                    "perplexity": result["perplexity"],
                    "bits_per_byte": result["bits_per_byte"],
                    "tokens": result["tokens"],
                    "bytes": path.stat().st_size,
                }
            )
            done += 1
            emit(
                {"step": done, "total": total, "message": f"{role} {quant_type}: perplexity {result['perplexity']:.3f}"}
            )
    engine.shutdown()
    f16 = {r["role"]: r["perplexity"] for r in rows if r["type"] == "F16"}
    for row in rows:  # what quantization costs each variant, relative to its own F16
        row["increase_over_f16"] = row["perplexity"] / f16[row["role"]] - 1.0
    emit({"metrics": {f"{r['role']} {r['type']}": r["perplexity"] for r in rows}})
    return {"rows": rows, "corpus": options.corpus, "window": options.window, "stride": options.stride}
