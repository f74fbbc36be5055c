"""The prompt-set matrix: every prompt of a set answered by every variant, one cell each (the
answer, its tokens, TTFT and decode speed), with optional checks per prompt and a pass rate per
variant. Variants run one after the other, each alone in its worker, so one's speed is not
another's contention.

A prompt file is JSONL, one object per line: `prompt` (required), `id`, `category`, and
`checks`, a list of {"kind": contains | regex | valid_json | json_schema | max_words | equals,
"value": ...}. The bundled set is assets/prompts/mixed-50.jsonl.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from playground.config import REPO_ROOT, describe_errors
from playground.engine import Engine
from playground.errors import ConfigError, PlaygroundError
from playground.evals.format_checks import strip_fences
from playground.paths import uploads_dir
from playground.workers import Finished

PROMPT_SETS = {"mixed-50": REPO_ROOT / "assets" / "prompts" / "mixed-50.jsonl"}
CheckKind = Literal["contains", "regex", "valid_json", "json_schema", "max_words", "equals"]


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: CheckKind
    value: Any = None

    @model_validator(mode="after")
    def _value_fits_kind(self) -> Check:
        if self.kind in ("contains", "equals") and not isinstance(self.value, str):
            raise ValueError(f"a {self.kind} check needs a text value")
        if self.kind == "regex":
            if not isinstance(self.value, str):
                raise ValueError("a regex check needs a pattern")
            try:
                re.compile(self.value)
            except re.error as err:
                raise ValueError(f"regex {self.value!r} does not compile: {err}") from None
        if self.kind == "max_words" and (not isinstance(self.value, int) or self.value < 1):
            raise ValueError("a max_words check needs a whole number of at least 1")
        if self.kind == "json_schema":
            from jsonschema import SchemaError, validators

            try:
                validators.validator_for(self.value).check_schema(self.value)
            except SchemaError as err:
                raise ValueError(f"not a valid JSON schema: {err.message}") from None
        return self

    def passes(self, answer: str) -> bool:
        text = answer.strip()
        if self.kind == "contains":
            return self.value.lower() in text.lower()
        if self.kind == "equals":
            return text.rstrip(".").strip().lower() == self.value.strip().lower()
        if self.kind == "regex":
            return re.search(self.value, text, flags=re.M) is not None
        if self.kind == "max_words":
            return len(text.split()) <= self.value
        try:
            data = json.loads(strip_fences(text))
        except json.JSONDecodeError:
            return False
        if self.kind == "valid_json":
            return True
        from jsonschema import validate
        from jsonschema.exceptions import ValidationError as SchemaMismatch

        try:
            validate(data, self.value)
        except SchemaMismatch:
            return False
        return True

    def describe(self) -> str:
        return self.kind if self.value is None else f"{self.kind} {json.dumps(self.value)[:60]}"


class PromptCase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    prompt: str
    category: str = ""
    checks: list[Check] = []


def read_prompts(source: str | Path) -> list[PromptCase]:
    """A prompt set by name (mixed-50) or a JSONL file; any bad line is named with its number."""
    path = PROMPT_SETS.get(str(source), Path(source))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    cases: list[PromptCase] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, line {number}: expected an object with a `prompt`, got {type(row).__name__}")
        row.setdefault("id", f"p{number:03d}")
        try:
            case = PromptCase.model_validate(row)
        except ValidationError as err:
            raise ConfigError(f"{path}, line {number}: {describe_errors(err)}") from None
        if not case.prompt.strip():
            raise ConfigError(f"{path}, line {number}: the prompt is empty")
        cases.append(case)
    if not cases:
        raise ConfigError(f"{path}: holds no prompts")
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise ConfigError(f"{path}: the id {case.id!r} is used twice")
        seen.add(case.id)
    return cases


def keep_prompt_file(upload: Path, name: str | None = None) -> tuple[Path, list[PromptCase]]:
    """An uploaded prompt file checked (every line, as `read_prompts` does) and copied where
    jobs may read it, named by its content so the same file kept twice is one file."""
    cases = read_prompts(upload)
    data = upload.read_bytes()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name or upload.name).stem).strip("-.") or "prompts"
    folder = uploads_dir() / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / f"{stem[:60]}-{hashlib.sha256(data).hexdigest()[:10]}.jsonl"
    if not kept.exists():
        kept.write_bytes(data)
    return kept, cases


@dataclass
class Cell:
    prompt_id: str
    variant: str
    answer: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0  # 0 where the backend does not count them (remote servers may not)
    ttft_s: float | None = None
    decode_tok_s: float | None = None
    peak_mem_bytes: int = 0
    finish_reason: str = ""
    checks: dict[str, bool] = field(default_factory=dict)  # check description -> passed
    error: str | None = None


@dataclass
class MatrixResult:
    variants: list[str]
    prompts: list[dict[str, Any]]
    cells: list[Cell]
    max_new_tokens: int

    def cell(self, prompt_id: str, variant: str) -> Cell:
        return next(c for c in self.cells if c.prompt_id == prompt_id and c.variant == variant)

    def pass_rates(self) -> dict[str, float | None]:
        """Share of all checks passed, per variant (None where no prompt has checks)."""
        rates: dict[str, float | None] = {}
        for variant in self.variants:
            results = [ok for c in self.cells if c.variant == variant for ok in c.checks.values()]
            rates[variant] = sum(results) / len(results) if results else None
        return rates

    def to_dict(self) -> dict[str, Any]:
        return {
            "variants": self.variants,
            "prompts": self.prompts,
            "max_new_tokens": self.max_new_tokens,
            "pass_rate": self.pass_rates(),
            "cells": [asdict(c) for c in self.cells],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MatrixResult:
        return cls(data["variants"], data["prompts"], [Cell(**c) for c in data["cells"]], data["max_new_tokens"])


def run_matrix(
    engine: Engine,
    variants: list[str],
    cases: list[PromptCase],
    max_new_tokens: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> MatrixResult:
    """Every case answered greedily by every variant, one variant loaded at a time."""
    cells: list[Cell] = []
    total, done = len(cases) * len(variants), 0
    for variant in variants:
        engine.load(variant)
        try:
            for case in cases:
                cells.append(answer_case(engine, variant, case, max_new_tokens))
                done += 1
                if progress:
                    progress(done, total)
        finally:
            engine.unload(variant)
    prompts = [{"id": c.id, "category": c.category, "prompt": c.prompt} for c in cases]
    return MatrixResult(variants, prompts, cells, max_new_tokens)


def answer_case(engine: Engine, variant: str, case: PromptCase, max_new_tokens: int) -> Cell:
    """One cell: `case` answered greedily by `variant` (loaded), with its speed and checks."""
    cell = Cell(case.id, variant)
    try:
        request = engine.request(variant, prompt=case.prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        finished = next(e for e in engine.generate(variant, request) if isinstance(e, Finished))
    except PlaygroundError as err:  # one failed cell is a cell, not a failed matrix
        cell.error = str(err)
        return cell
    return answered_cell(case, variant, finished)


def answered_cell(case: PromptCase, variant: str, finished: Finished) -> Cell:
    """The cell of `case` from `variant`'s finished answer: its text, speed and checks."""
    cell = Cell(case.id, variant)
    m = finished.metrics
    cell.answer, cell.completion_tokens, cell.finish_reason = finished.text, m.completion_tokens, m.finish_reason
    cell.prompt_tokens = m.prompt_tokens or 0
    cell.ttft_s, cell.decode_tok_s, cell.peak_mem_bytes = m.ttft_s, m.decode_tok_s, m.peak_mem_bytes
    cell.checks = {check.describe(): check.passes(finished.text) for check in case.checks}
    return cell


# -- views of a result -------------------------------------------------------------------------
def differing_prompts(result: MatrixResult) -> list[str]:
    """Prompt ids whose answers are not all the same text across the variants."""
    return [
        p["id"]
        for p in result.prompts
        if len({result.cell(p["id"], v).answer.strip() for v in result.variants}) > 1
    ]


def word_diff(a: str, b: str) -> list[tuple[Literal["same", "removed", "added"], str]]:
    """A word-level diff of two answers (difflib's opcodes over whitespace-split words)."""
    left, right = a.split(), b.split()
    pieces: list[tuple[Literal["same", "removed", "added"], str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=left, b=right, autojunk=False).get_opcodes():
        if op == "equal":
            pieces.append(("same", " ".join(left[i1:i2])))
            continue
        if i2 > i1:
            pieces.append(("removed", " ".join(left[i1:i2])))
        if j2 > j1:
            pieces.append(("added", " ".join(right[j1:j2])))
    return pieces


def to_csv(result: MatrixResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["prompt_id", "category", "prompt", "variant", "answer", "completion_tokens", "ttft_s",
                     "decode_tok_s", "finish_reason", "checks_passed", "checks_total", "error"])
    for prompt in result.prompts:
        for variant in result.variants:
            c = result.cell(prompt["id"], variant)
            writer.writerow([prompt["id"], prompt["category"], prompt["prompt"], variant, c.answer,
                             c.completion_tokens, c.ttft_s, c.decode_tok_s, c.finish_reason,
                             sum(c.checks.values()), len(c.checks), c.error or ""])
    return out.getvalue()


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(result: MatrixResult, only_differing: bool = False) -> str:
    rates = result.pass_rates()
    lines = [
        "| variant | checks passed |",
        "| --- | ---: |",
        *[f"| {v} | {'–' if rates[v] is None else f'{rates[v]:.1%}'} |" for v in result.variants],
        "",
        "| prompt | " + " | ".join(result.variants) + " |",
        "| --- | " + " | ".join("---" for _ in result.variants) + " |",
    ]
    keep = set(differing_prompts(result)) if only_differing else {p["id"] for p in result.prompts}
    for prompt in result.prompts:
        if prompt["id"] not in keep:
            continue
        cells = []
        for variant in result.variants:
            c = result.cell(prompt["id"], variant)
            shown = f"⚠ {c.error}" if c.error else c.answer.strip()
            passed = f" ({sum(c.checks.values())}/{len(c.checks)} checks)" if c.checks else ""
            cells.append(_md_cell(shown) + passed)
        lines.append(f"| {_md_cell(prompt['prompt'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
