"""The kinds of job: each has an options model (validated before any process starts) and a
function that runs inside the job process. Kinds are named in one dict, loaded lazily."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from playground.errors import ConfigError

Emit = Callable[[dict[str, Any]], None]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterEvalOptions(_Options):
    model: str
    data: str = "ood"  # ood, in_distribution, or a JSONL path
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    limit: Annotated[int, Field(ge=1)] | None = None


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


def _lora_options() -> type[_Options]:
    from playground.jobs.lora import LoraOptions

    return LoraOptions


def run_lora_sft(options: Any, emit: Emit) -> dict[str, Any]:
    import os
    from pathlib import Path

    from playground.jobs.lora import run_lora

    # The job process is told its id and where artifacts go by the runner (playground.jobs.run).
    return run_lora(options, emit, os.environ["PLAYGROUND_JOB_ID"], Path(os.environ["PLAYGROUND_JOBS_DIR"]))


KINDS: dict[str, tuple[Callable[[], type[_Options]], Callable[[Any, Emit], dict[str, Any]]]] = {
    "eval-router": (lambda: RouterEvalOptions, run_router_eval),
    "lora-sft": (_lora_options, run_lora_sft),
}


def validate_options(kind: str, options: dict[str, Any]) -> _Options:
    if kind not in KINDS:
        raise ConfigError(f"unknown job kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    try:
        return KINDS[kind][0]().model_validate(options)
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid options for {kind}: {details}") from None
