"""The kinds of job: each has an options model (validated before any process starts) and a
function that runs inside the job process. Kinds are named in one dict, loaded lazily."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from playground.errors import ConfigError, PlaygroundError
from playground.evals.corpus import BUNDLED as CORPORA
from playground.settings import named_or_allowed

Emit = Callable[[dict[str, Any]], None]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterEvalOptions(_Options):
    model: str
    data: str = "ood"  # ood, in_distribution, or a JSONL path
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    limit: Annotated[int, Field(ge=1)] | None = None

    @field_validator("data")
    @classmethod
    def _readable(cls, value: str) -> str:
        from playground.router import DATASETS

        return named_or_allowed(value, DATASETS, "router data file")


def run_router_eval(options: RouterEvalOptions, emit: Emit) -> dict[str, Any]:
    from pathlib import Path

    from playground.engine import Engine
    from playground.router import DATASETS, evaluate_router, read_router_data

    rows = read_router_data(DATASETS.get(options.data, Path(options.data)))[: options.limit]
    emit({"message": f"{len(rows)} rows from {options.data}", "step": 0, "total": len(rows)})
    engine = Engine()
    try:
        result = evaluate_router(
            engine, options.model, rows, options.threshold, lambda done, total: emit({"step": done, "total": total})
        )
    finally:
        engine.shutdown()
    summary = result.to_dict()
    summary.pop("rows")
    emit({"metrics": {"accuracy": result.accuracy, "json_validity": result.json_validity}})
    return summary


class PerplexityOptions(_Options):
    model: str
    corpus: str = "python-docs-heldout"  # python-docs, python-docs-train, python-docs-heldout, or a text file
    window: Annotated[int, Field(ge=16, le=131_072)] = 512
    stride: Annotated[int, Field(ge=1, le=131_072)] = 256
    max_chars: Annotated[int, Field(ge=100)] | None = 20_000  # keeps a CPU run to minutes; None: all

    @field_validator("corpus")
    @classmethod
    def _readable(cls, value: str) -> str:
        return named_or_allowed(value, CORPORA, "corpus file")

    @model_validator(mode="after")
    def _stride_fits(self) -> PerplexityOptions:
        if self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        return self


class NeedleOptions(_Options):
    model: str
    lengths: Annotated[list[Annotated[int, Field(ge=64, le=1_048_576)]], Field(min_length=1, max_length=16)] = [
        512,
        1024,
        2048,
    ]
    depths: Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], Field(min_length=1, max_length=21)] = [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
    ]
    seed: int = 0
    # Run past the variant's configured context (as the NPC Fast card's 32K+ cells did).
    context_length: Annotated[int, Field(ge=64, le=1_048_576)] | None = None


class FormatCheckOptions(_Options):
    model: str
    data: str | None = None  # a JSONL of cases; default: the bundled ones
    limit: Annotated[int, Field(ge=1)] | None = None
    max_new_tokens: Annotated[int, Field(ge=8, le=4096)] = 160

    @field_validator("data")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        return named_or_allowed(value, (), "format cases file")


class LmEvalOptions(_Options):
    model: str
    tasks: Annotated[list[str], Field(min_length=1)]
    include_path: str | None = None  # a folder of task YAML files, or "tiny" for the bundled local tasks

    @field_validator("include_path")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        return named_or_allowed(value, ("tiny",), "lm-eval task folder")

    limit: Annotated[int, Field(ge=1)] | None = None
    num_fewshot: Annotated[int, Field(ge=0, le=64)] | None = None


def _loaded(model: str, context_length: int | None = None) -> tuple[Any, str]:
    """An engine in the job process with `model` loaded in its own worker."""
    from playground.engine import Engine

    engine = Engine()
    config = engine.resolve(model)
    if context_length is not None:
        config = engine.add(
            config.model_copy(update={"context_length": context_length, "id": f"{config.id}-ctx{context_length}"})
        )
    engine.load(config.id)
    return engine, config.id


def run_perplexity(options: PerplexityOptions, emit: Emit) -> dict[str, Any]:
    from playground.evals.corpus import documents, limited
    from playground.evals.perplexity import perplexity

    docs = limited(documents(options.corpus), options.max_chars)
    emit({"message": f"{len(docs)} documents from {options.corpus}", "step": 0, "total": len(docs)})
    engine, variant = _loaded(options.model)
    window, stride = options.window, options.stride
    context = engine.status(variant).info.context_length
    if window > context:  # a window cannot exceed what the variant reads at once
        window, stride = context, min(stride, context)
        emit({"message": f"window capped at the variant's context: {window} tokens, stride {stride}"})
    try:
        result = perplexity(engine, variant, docs, window, stride, lambda d, t: emit({"step": d, "total": t}))
    finally:
        engine.shutdown()
    emit({"metrics": {"perplexity": result["perplexity"], "bits_per_byte": result.get("bits_per_byte")}})
    return result | {"corpus": options.corpus}


def run_needle(options: NeedleOptions, emit: Emit) -> dict[str, Any]:
    from playground.evals.needle import needle_grid

    total = len(options.lengths) * len(options.depths)
    emit({"message": f"{total} cells", "step": 0, "total": total})
    engine, variant = _loaded(options.model, options.context_length)
    try:
        result = needle_grid(
            engine,
            variant,
            sorted(options.lengths),
            sorted(options.depths),
            options.seed,
            lambda d, t: emit({"step": d, "total": t}),
        )
    finally:
        engine.shutdown()
    emit({"metrics": {f"pass@{k}": v for k, v in result["pass_rate_by_length"].items() if v is not None}})
    return result


def run_format_checks(options: FormatCheckOptions, emit: Emit) -> dict[str, Any]:
    from pathlib import Path

    from playground.evals import format_checks

    cases = format_checks.read_cases(Path(options.data) if options.data else format_checks.CASES)[: options.limit]
    emit({"message": f"{len(cases)} cases", "step": 0, "total": len(cases)})
    engine, variant = _loaded(options.model)
    try:
        result = format_checks.run_format_checks(
            engine, variant, cases, options.max_new_tokens, lambda d, t: emit({"step": d, "total": t})
        )
    finally:
        engine.shutdown()
    emit({"metrics": {k: v for k, v in result.items() if k not in ("rows",) and isinstance(v, float)}})
    return result


def run_lm_eval(options: LmEvalOptions, emit: Emit) -> dict[str, Any]:
    from playground.evals.lm_eval_adapter import run_lm_eval as evaluate

    emit({"message": f"lm-eval tasks: {', '.join(options.tasks)}"})
    engine, variant = _loaded(options.model)
    try:
        result = evaluate(
            engine,
            variant,
            options.tasks,
            options.include_path,
            options.limit,
            options.num_fewshot,
            lambda done: emit({"step": done, "total": 0}) if done % 10 == 0 else None,
        )
    finally:
        engine.shutdown()
    metrics = {
        f"{task}/{name.split(',')[0]}": value
        for task, values in result["results"].items()
        for name, value in values.items()
        if isinstance(value, float) and "stderr" not in name
    }
    emit({"metrics": metrics})
    return result


def _job_folder_kind(module: str, function: str) -> Callable[[Any, Emit], dict[str, Any]]:
    """A kind whose function also takes the job's id and its artifacts folder (told to the job
    process by playground.jobs.run)."""

    def run(options: Any, emit: Emit) -> dict[str, Any]:
        import importlib
        import os
        from pathlib import Path

        target = getattr(importlib.import_module(module), function)
        return target(options, emit, os.environ["PLAYGROUND_JOB_ID"], Path(os.environ["PLAYGROUND_JOBS_DIR"]))

    return run


def _options_of(module: str, name: str) -> Callable[[], type[_Options]]:
    def load() -> type[_Options]:
        import importlib

        return getattr(importlib.import_module(module), name)

    return load


KINDS: dict[str, tuple[Callable[[], type[_Options]], Callable[[Any, Emit], dict[str, Any]]]] = {
    "eval-router": (lambda: RouterEvalOptions, run_router_eval),
    "eval-perplexity": (lambda: PerplexityOptions, run_perplexity),
    "eval-needle": (lambda: NeedleOptions, run_needle),
    "eval-format": (lambda: FormatCheckOptions, run_format_checks),
    "eval-lm": (lambda: LmEvalOptions, run_lm_eval),
    "lora-sft": (
        _options_of("playground.jobs.lora", "LoraOptions"),
        _job_folder_kind("playground.jobs.lora", "run_lora"),
    ),
    "lora-router": (
        _options_of("playground.jobs.lora", "RouterLoraOptions"),
        _job_folder_kind("playground.jobs.lora", "run_lora"),
    ),
    "qat": (_options_of("playground.jobs.qat", "QatOptions"), _job_folder_kind("playground.jobs.qat", "run_qat")),
    "export-gguf": (
        _options_of("playground.jobs.export", "ExportOptions"),
        _job_folder_kind("playground.jobs.export", "run_export"),
    ),
    "qat-compare": (
        _options_of("playground.jobs.export", "QuantCompareOptions"),
        _job_folder_kind("playground.jobs.export", "run_quant_compare"),
    ),
}


def placement(kind: str, options: _Options) -> tuple[str, int]:
    """Where a job will run ("cpu" or "cuda") and the GPU memory it needs there, in bytes.

    Every kind here works on one variant (`options.model`): it runs where that variant would,
    unless the options pin a device. Training adds the gradients, optimizer state and
    activations of the LoRA weights, taken here as half the model's own footprint again.
    """
    from playground.config import ModelConfig
    from playground.engine import Engine
    from playground.memory import estimate

    if kind in ("export-gguf", "qat-compare"):  # conversion on the CPU; llama.cpp places itself
        return "cpu", 0
    pinned = getattr(options, "device", "auto")
    config = Engine().resolve(options.model)  # type: ignore[attr-defined]
    if config.backend == "openai" or pinned == "cpu":
        return "cpu", 0
    update: dict[str, Any] = {} if pinned == "auto" else {"device": pinned}
    if getattr(options, "quantize", "none") == "nf4":
        update |= {"device": "cuda", "quantization": {"method": "nf4"}}
    try:
        need = estimate(ModelConfig.model_validate(config.model_dump() | update))
    except PlaygroundError:  # weights not there yet: the job itself will say so
        return "cpu", 0
    if need.device != "cuda":
        return "cpu", 0
    # LoRA adds little; QAT trains every block weight (gradients and two Adam moments each).
    factor = {"qat": 4.0}.get(kind, 1.5 if kind in RESUMABLE_KINDS else 1.0)
    return "cuda", int(need.total_bytes * factor)


# Kinds that write checkpoints and so can go on after an interruption.
RESUMABLE_KINDS = frozenset({"lora-sft", "lora-router"})


def validate_options(kind: str, options: dict[str, Any]) -> _Options:
    if kind not in KINDS:
        raise ConfigError(f"unknown job kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    try:
        return KINDS[kind][0]().model_validate(options)
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid options for {kind}: {details}") from None
