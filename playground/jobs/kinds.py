"""The kinds of job, one record each: its options model (validated before any process starts),
the function that runs it inside the job process, where it runs and what GPU memory it asks
for, whether it resumes, and how its result is summarised and plotted. Everyone (manager, job
process, Jobs tab, CLI) reads these records; nobody branches on a kind's name. Runners load
lazily, so reading the records imports neither torch nor peft.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from playground.config import ModelConfig, describe_errors
from playground.errors import ConfigError, PlaygroundError
from playground.evals.corpus import BUNDLED as CORPORA
from playground.settings import named_or_allowed

if TYPE_CHECKING:
    from playground.catalogue import Catalogue
    from playground.engine import Engine

Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class JobContext:
    """What a running job is given: its id, its own folder for what it writes, the catalogue of
    variants (the same one the app and the CLI see) and where its events go."""

    job_id: str
    folder: Path
    catalogue: Catalogue
    emit: Emit


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterEvalOptions(_Options):
    model: str
    data: str = "ood"  # ood, ood2, in_distribution, or a JSONL path
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    limit: Annotated[int, Field(ge=1)] | None = None
    explain: bool = True  # False: routes only, no written answers (no JSON validity; much faster)

    @field_validator("data")
    @classmethod
    def _readable(cls, value: str) -> str:
        from playground.router import DATASETS

        return named_or_allowed(value, DATASETS, "router data file")


@contextmanager
def loaded_variant(ctx: JobContext, model: str, context_length: int | None = None) -> Iterator[tuple[Engine, str]]:
    """The one load/run/shutdown path of the eval kinds: an engine in the job process with
    `model` loaded in its own worker, shut down however the eval ends."""
    from playground.engine import Engine

    engine = Engine(ctx.catalogue)
    try:
        config = ctx.catalogue.resolve(model)
        if context_length is not None:
            config = ctx.catalogue.add(
                config.model_copy(update={"context_length": context_length, "id": f"{config.id}-ctx{context_length}"})
            )
        engine.load(config.id)
        yield engine, config.id
    finally:
        engine.shutdown()


def _progress(ctx: JobContext) -> Callable[[int, int], None]:
    return lambda done, total: ctx.emit({"step": done, "total": total})


def run_router_eval(options: RouterEvalOptions, ctx: JobContext) -> dict[str, Any]:
    from playground.engine import Engine
    from playground.router import evaluate_router_file

    def progress(done: int, total: int) -> None:
        ctx.emit(
            {"step": done, "total": total} | ({"message": f"{total} rows from {options.data}"} if not done else {})
        )

    engine = Engine(ctx.catalogue)  # the router loads on its first decision, after its rows are read
    try:
        result = evaluate_router_file(
            engine, options.model, options.data, options.threshold, options.limit, progress, explain=options.explain
        )
    finally:
        engine.shutdown()
    summary = result.to_dict()
    summary.pop("rows")
    metrics = {"accuracy": result.accuracy, "json_validity": result.json_validity}
    ctx.emit({"metrics": {k: v for k, v in metrics.items() if v is not None}})
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


def run_perplexity(options: PerplexityOptions, ctx: JobContext) -> dict[str, Any]:
    from playground.evals.corpus import documents, limited
    from playground.evals.perplexity import perplexity

    docs = limited(documents(options.corpus), options.max_chars)
    ctx.emit({"message": f"{len(docs)} documents from {options.corpus}", "step": 0, "total": len(docs)})
    with loaded_variant(ctx, options.model) as (engine, variant):
        window, stride = options.window, options.stride
        context = engine.context_length(variant)
        if window > context:  # a window cannot exceed what the variant reads at once
            window, stride = context, min(stride, context)
            ctx.emit({"message": f"window capped at the variant's context: {window} tokens, stride {stride}"})
        result = perplexity(engine, variant, docs, window, stride, _progress(ctx))
    ctx.emit({"metrics": {"perplexity": result["perplexity"], "bits_per_byte": result.get("bits_per_byte")}})
    return result | {"corpus": options.corpus}


def run_needle(options: NeedleOptions, ctx: JobContext) -> dict[str, Any]:
    from playground.evals.needle import needle_grid

    total = len(options.lengths) * len(options.depths)
    ctx.emit({"message": f"{total} cells", "step": 0, "total": total})
    with loaded_variant(ctx, options.model, options.context_length) as (engine, variant):
        result = needle_grid(
            engine, variant, sorted(options.lengths), sorted(options.depths), options.seed, _progress(ctx)
        )
    ctx.emit({"metrics": {f"pass@{k}": v for k, v in result["pass_rate_by_length"].items() if v is not None}})
    return result


def run_format_checks(options: FormatCheckOptions, ctx: JobContext) -> dict[str, Any]:
    from playground.evals import format_checks

    cases = format_checks.read_cases(Path(options.data) if options.data else format_checks.CASES)[: options.limit]
    ctx.emit({"message": f"{len(cases)} cases", "step": 0, "total": len(cases)})
    with loaded_variant(ctx, options.model) as (engine, variant):
        result = format_checks.run_format_checks(engine, variant, cases, options.max_new_tokens, _progress(ctx))
    ctx.emit({"metrics": {k: v for k, v in result.items() if k not in ("rows",) and isinstance(v, float)}})
    return result


def run_lm_eval(options: LmEvalOptions, ctx: JobContext) -> dict[str, Any]:
    from playground.evals.lm_eval_adapter import run_lm_eval as evaluate

    ctx.emit({"message": f"lm-eval tasks: {', '.join(options.tasks)}"})
    with loaded_variant(ctx, options.model) as (engine, variant):
        result = evaluate(
            engine,
            variant,
            options.tasks,
            options.include_path,
            options.limit,
            options.num_fewshot,
            lambda done: ctx.emit({"step": done, "total": 0}) if done % 10 == 0 else None,
        )
    ctx.emit({"metrics": lm_eval_metrics(result)})
    return result


def comma_list(value: Any) -> Any:
    """A list option given as "a,b" on the command line."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


class _PromptSetOptions(_Options):
    """A prompt set across variants: what the matrix and the report are given."""

    model: str  # the first column (matrix) or the reference (report); where the job runs
    variants: list[str] = []  # the others; "a,b" from the command line
    prompts: str = "mixed-50"  # mixed-50 (bundled), or a JSONL file
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    limit: Annotated[int, Field(ge=1)] | None = None  # only the first N prompts

    @field_validator("variants", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("prompts")
    @classmethod
    def _readable(cls, value: str) -> str:
        from playground.matrix import PROMPT_SETS

        return named_or_allowed(value, PROMPT_SETS, "prompt file")


class MatrixOptions(_PromptSetOptions):
    pass


def run_matrix_job(options: MatrixOptions, ctx: JobContext) -> dict[str, Any]:
    from playground.engine import Engine
    from playground.matrix import read_prompts, run_matrix

    cases = read_prompts(options.prompts)[: options.limit]
    variants = list(dict.fromkeys([ctx.catalogue.resolve(v).id for v in [options.model, *options.variants]]))
    ctx.emit({"message": f"{len(cases)} prompts × {len(variants)} variants", "step": 0, "total": len(cases) * len(variants)})
    engine = Engine(ctx.catalogue)
    try:
        result = run_matrix(engine, variants, cases, options.max_new_tokens, _progress(ctx))
    finally:
        engine.shutdown()
    rates = result.pass_rates()
    ctx.emit({"metrics": {f"checks passed {v}": r for v, r in rates.items() if r is not None}})
    return result.to_dict()


class ReportOptions(_PromptSetOptions):
    variants: Annotated[list[str], Field(min_length=1)]
    limit: Annotated[int, Field(ge=1)] | None = 12  # the whole set takes a while on a CPU
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 48
    corpus: str = "python-docs-heldout"
    corpus_chars: Annotated[int, Field(ge=100)] = 4000

    @field_validator("corpus")
    @classmethod
    def _readable_corpus(cls, value: str) -> str:
        return named_or_allowed(value, CORPORA, "corpus file")


def run_report(options: ReportOptions, ctx: JobContext) -> dict[str, Any]:
    from playground.engine import Engine
    from playground.matrix import read_prompts
    from playground.report import quantization_report

    cases = read_prompts(options.prompts)[: options.limit]
    reference = ctx.catalogue.resolve(options.model).id
    variants = [ctx.catalogue.resolve(v).id for v in options.variants]
    engine = Engine(ctx.catalogue)
    try:
        report = quantization_report(
            engine, reference, variants, cases, max_new_tokens=options.max_new_tokens, corpus=options.corpus,
            corpus_chars=options.corpus_chars, progress=lambda message, done, total: ctx.emit({"message": message, "step": done, "total": total}),
        )
    finally:
        engine.shutdown()
    return report.to_dict()


def lm_eval_metrics(result: dict[str, Any]) -> dict[str, float]:
    """`task/metric` -> value of an lm-eval result, standard errors left out."""
    return {
        f"{task}/{name.split(',')[0]}": value
        for task, values in result["results"].items()
        for name, value in values.items()
        if isinstance(value, float) and "stderr" not in name
    }


# -- how results are summarised (one row per variant in the Jobs tab's table) ----------------
Summary = dict[str, dict[str, float | None]]  # variant -> column -> value


def _summary_router(options: dict[str, Any], result: dict[str, Any]) -> Summary:
    data = options.get("data", "ood")
    return {
        options["model"]: {
            f"router accuracy ({data})": result.get("accuracy"),
            f"router AUROC ({data})": result.get("auroc"),
            f"router ECE ({data})": result.get("ece"),
        }
    }


def _summary_perplexity(options: dict[str, Any], result: dict[str, Any]) -> Summary:
    return {
        options["model"]: {
            f"perplexity ({result.get('corpus')})": result.get("perplexity"),
            "bits per byte": result.get("bits_per_byte"),
        }
    }


def _summary_needle(options: dict[str, Any], result: dict[str, Any]) -> Summary:
    ran = [c for c in result["cells"] if "passed" in c]
    return {options["model"]: {"needle pass": sum(c["passed"] for c in ran) / len(ran) if ran else None}}


def _summary_format(options: dict[str, Any], result: dict[str, Any]) -> Summary:
    return {
        options["model"]: {
            "tool-call arguments": result.get("tool_arguments"),
            "instructions passed": result.get("instruction_pass"),
        }
    }


def _summary_lm_eval(options: dict[str, Any], result: dict[str, Any]) -> Summary:
    return {options["model"]: {name.replace("/", " "): v for name, v in lm_eval_metrics(result).items()}}


def _summary_quant_compare(options: dict[str, Any], result: dict[str, Any]) -> Summary:
    table: Summary = {}
    for row in result["rows"]:
        table.setdefault(row["variant"], {})[f"llama.cpp perplexity {row['type']}"] = row["perplexity"]
    return table


def _matrix_means(result: dict[str, Any], variant: str) -> dict[str, float | None]:
    cells = [c for c in result["cells"] if c["variant"] == variant and not c["error"]]

    def mean(key: str) -> float | None:
        values = [c[key] for c in cells if c[key] is not None]
        return sum(values) / len(values) if values else None

    return {"checks passed": result["pass_rate"].get(variant), "decode tok/s": mean("decode_tok_s"), "TTFT s": mean("ttft_s")}


def _summary_matrix(options: dict[str, Any], result: dict[str, Any]) -> Summary:
    return {variant: _matrix_means(result, variant) for variant in result["variants"]}


def _table_matrix(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["variant", "checks passed", "mean decode tok/s", "mean TTFT", "answers", "failed"]
    rows = []
    for variant in result["variants"]:
        means = _matrix_means(result, variant)
        cells = [c for c in result["cells"] if c["variant"] == variant]
        passed, speed, ttft = means["checks passed"], means["decode tok/s"], means["TTFT s"]
        rows.append([
            variant,
            "–" if passed is None else f"{passed:.1%}",
            "–" if speed is None else f"{speed:.1f}",
            "–" if ttft is None else f"{ttft:.3f} s",
            str(len(cells)),
            str(sum(1 for c in cells if c["error"])),
        ])
    return headers, rows


def _summary_report(options: dict[str, Any], result: dict[str, Any]) -> Summary:
    return {
        v["variant"]: {"mean KL to the reference": v["mean_kl"], "top-1 agreement": v["top1_agreement"],
                       "decode tok/s": v["decode_tok_s"], "perplexity (held out)": v["perplexity"]}
        for v in result["variants"]
    }


def _table_report(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    from playground.report import REPORT_HEADERS, report_rows

    return REPORT_HEADERS, report_rows(result)


def _table_quant_compare(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["role", "variant", "file", "perplexity", "vs its F16", "MiB"]
    rows = [
        [
            r["role"],
            r["variant"],
            r["type"],
            f"{r['perplexity']:.3f}",
            f"{r['increase_over_f16']:+.2%}",
            f"{r['bytes'] / 2**20:.1f}",
        ]
        for r in result["rows"]
    ]
    return headers, rows


# -- the records -----------------------------------------------------------------------------
# What the Jobs tab draws from a result; the tab maps each name to a chart.
ResultPlot = Literal["needle", "router-curve", "perplexity-by-document", "quant-compare", "format-rates", "pareto"]


@dataclass(frozen=True)
class JobKind:
    id: str
    options_ref: str  # "module:Class" of its options model
    runner_ref: str  # "module:function" taking (options, JobContext), returning the result
    description: str
    # "model": where its variant would run (a GPU if the variant goes there); "cpu": always.
    device: Literal["model", "cpu"] = "model"
    # GPU memory asked for, as a multiple of the variant's own estimate: training adds gradients,
    # optimizer state and activations.
    gpu_memory_factor: float = 1.0
    resumes: bool = False  # writes checkpoints, so an interrupted run can go on
    summary: Callable[[dict[str, Any], dict[str, Any]], Summary] | None = None
    plot: ResultPlot | None = None
    # A result as a table of text cells (headers, rows), shown with the job's details.
    table: Callable[[dict[str, Any]], tuple[list[str], list[list[str]]]] | None = None
    plots_loss: bool = False  # emits a loss per step
    # Named option sets offered beside the options (Jobs tab, `jobs submit --preset`): name ->
    # (what it is, its options).
    presets: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def options(self) -> type[_Options]:
        return _load(self.options_ref)

    @property
    def runner(self) -> Callable[[Any, JobContext], dict[str, Any]]:
        return _load(self.runner_ref)


def _load(reference: str) -> Any:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


_HERE = "playground.jobs.kinds"
KINDS: dict[str, JobKind] = {
    kind.id: kind
    for kind in (
        JobKind(
            "eval-router",
            f"{_HERE}:RouterEvalOptions",
            f"{_HERE}:run_router_eval",
            "route a labelled set and score the decisions",
            summary=_summary_router,
            plot="router-curve",
        ),
        JobKind(
            "eval-perplexity",
            f"{_HERE}:PerplexityOptions",
            f"{_HERE}:run_perplexity",
            "strided perplexity on a corpus",
            summary=_summary_perplexity,
            plot="perplexity-by-document",
        ),
        JobKind(
            "eval-needle",
            f"{_HERE}:NeedleOptions",
            f"{_HERE}:run_needle",
            "needle-in-a-haystack grid over lengths and depths",
            summary=_summary_needle,
            plot="needle",
        ),
        JobKind(
            "eval-format",
            f"{_HERE}:FormatCheckOptions",
            f"{_HERE}:run_format_checks",
            "tool-call and instruction format checks",
            summary=_summary_format,
            plot="format-rates",
        ),
        JobKind(
            "eval-lm",
            f"{_HERE}:LmEvalOptions",
            f"{_HERE}:run_lm_eval",
            "lm-evaluation-harness tasks through the engine",
            summary=_summary_lm_eval,
        ),
        JobKind(
            "matrix",
            f"{_HERE}:MatrixOptions",
            f"{_HERE}:run_matrix_job",
            "a prompt set answered by several variants: answers, speed, check pass rates",
            summary=_summary_matrix,
            table=_table_matrix,
        ),
        JobKind(
            "report",
            f"{_HERE}:ReportOptions",
            f"{_HERE}:run_report",
            "the quantization report: memory, speed, perplexity, KL and agreement against a reference",
            summary=_summary_report,
            plot="pareto",
            table=_table_report,
        ),
        JobKind(
            "lora-sft",
            "playground.jobs.lora:LoraOptions",
            "playground.jobs.lora:run_lora",
            "LoRA or QLoRA supervised fine-tune",
            gpu_memory_factor=1.5,
            resumes=True,
            plots_loss=True,
        ),
        JobKind(
            "lora-router",
            "playground.jobs.lora:RouterLoraOptions",
            "playground.jobs.lora:run_lora",
            "teach a router its routes (the NPC Fast recipe)",
            gpu_memory_factor=1.5,
            resumes=True,
            plots_loss=True,
            presets={
                "card": ("the NPC Fast card's recipe: 3 epochs, 189 steps (41-47 min on a 2-core CPU)", {}),
                # benchmarks/RESULTS.md, "Router LoRA in under 10 minutes": stopped at step 48 of
                # 171, 603 s for the job; OOD 63/64 and 59/61 right afterwards.
                "quick": (
                    "early stop: 50 rows held out and routed every 8 steps, lr 1e-3 "
                    "(the embedded router in 10 min on a 2-core CPU)",
                    {"holdout": 50, "eval_every": 8, "stop_at": 0.96, "learning_rate": 1e-3},
                ),
            },
        ),
        JobKind(
            "qat",
            "playground.jobs.qat:QatOptions",
            "playground.jobs.qat:run_qat",
            "quantization-aware fine-tune on a corpus",
            # Every block weight trains: gradients and two Adam moments each.
            gpu_memory_factor=4.0,
            plots_loss=True,
        ),
        JobKind(
            "export-gguf",
            "playground.jobs.export:ExportOptions",
            "playground.jobs.export:run_export",
            "write a variant as GGUF files (llama.cpp quantizer)",
            device="cpu",  # conversion on the CPU; llama.cpp places itself
        ),
        JobKind(
            "qat-compare",
            "playground.jobs.export:QuantCompareOptions",
            "playground.jobs.export:run_quant_compare",
            "base vs QAT vs control, quantized and measured in llama.cpp",
            device="cpu",
            summary=_summary_quant_compare,
            plot="quant-compare",
            table=_table_quant_compare,
        ),
    )
}


def job_kind(kind: str) -> JobKind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown job kind {kind!r}; known: {', '.join(sorted(KINDS))}") from None


def placement(kind: str, options: _Options, catalogue: Catalogue) -> tuple[str, int]:
    """Where a job will run ("cpu", "cuda", or "cuda:N" for a variant pinned to GPU N) and the
    GPU memory it needs there, in bytes.

    Every kind works on one variant (`options.model`): it runs where that variant would,
    unless the options pin a device or the kind runs on the CPU. A variant that cannot be
    resolved is refused here, before any process starts.
    """
    from playground.capabilities import capabilities
    from playground.memory import estimate, pinned_gpu

    record = job_kind(kind)
    pinned = getattr(options, "device", "auto")
    config = catalogue.resolve(options.model)  # type: ignore[attr-defined]
    if record.device == "cpu" or not capabilities(config.backend).runs_on_gpu or pinned == "cpu":
        return "cpu", 0
    update: dict[str, Any] = {} if pinned == "auto" else {"device": pinned}
    if getattr(options, "quantize", "none") == "nf4":
        update |= {"device": "cuda", "quantization": {"method": "nf4"}}
    try:
        need = estimate(ModelConfig.model_validate(config.model_dump() | update))
    except PlaygroundError:  # weights not there yet (a hub variant): the job downloads, then says
        return "cpu", 0
    if need.device != "cuda":
        return "cpu", 0
    pinned_to = pinned_gpu(config.device) if pinned == "auto" else None
    where = "cuda" if pinned_to is None else f"cuda:{pinned_to}"
    return where, int(need.total_bytes * record.gpu_memory_factor)


def validate_options(kind: str, options: dict[str, Any]) -> _Options:
    try:
        return job_kind(kind).options.model_validate(options)
    except ValidationError as err:
        raise ConfigError(f"invalid options for {kind}: {describe_errors(err, 'unknown option')}") from None
