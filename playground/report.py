"""The quantization report: what each variant of a set costs in quality and buys in speed and
memory, measured, in one table.

Per variant: weights bytes and load time (its worker's own figures), peak memory and decode
speed and TTFT while answering the prompt set, the check pass rate, held-out perplexity, mean KL
and top-1 agreement against the reference over the prompt set (the reference's answers read
teacher-forced, as in playground.divergence), and whether two runs with one seed give the same
tokens. Pareto fronts (quality against speed and against memory) say which variants no other
beats on both.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from playground.divergence import diff
from playground.engine import Engine
from playground.errors import GenerationError, PlaygroundError
from playground.evals.corpus import documents, limited
from playground.evals.perplexity import perplexity
from playground.matrix import Cell, PromptCase, answer_case, answered_cell
from playground.workers import Finished

Progress = Callable[[str, int, int], None]  # message, steps done, steps in all
REPRODUCIBILITY_SEED = 1234


@dataclass
class VariantReport:
    variant: str
    backend: str = ""
    dtype: str = ""
    weights_bytes: int | None = None
    load_s: float | None = None
    peak_mem_bytes: int | None = None  # the largest of its answers' peaks (GPU, else process RSS)
    decode_tok_s: float | None = None  # mean over the prompt set
    ttft_s: float | None = None
    pass_rate: float | None = None
    perplexity: float | None = None
    mean_kl: float | None = None  # token-weighted over the prompt set; 0 for the reference
    top1_agreement: float | None = None
    compared_tokens: int = 0
    reproducible: str = ""  # "reproducible", or "differs at token N"
    notes: list[str] = field(default_factory=list)


@dataclass
class QuantReport:
    reference: str
    prompts: int
    max_new_tokens: int
    corpus: str
    variants: list[VariantReport]
    pareto_speed: list[str]  # on the front of (lower KL, higher decode tok/s)
    pareto_memory: list[str]  # on the front of (lower KL, lower peak memory)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose (a, b) no other point beats on both, lower being better for each."""
    front = []
    for name, (a, b) in points.items():
        beaten = any(
            (a2 <= a and b2 <= b) and (a2 < a or b2 < b) for other, (a2, b2) in points.items() if other != name
        )
        if not beaten:
            front.append(name)
    return front


def reproducibility(engine: Engine, variant: str, case: PromptCase, max_new_tokens: int) -> str:
    """Two sampled answers with one seed: the same tokens, or where they part."""
    runs = []
    for _ in range(2):
        request = engine.request(
            variant, prompt=case.prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=REPRODUCIBILITY_SEED
        )
        finished = next(e for e in engine.generate(variant, request) if isinstance(e, Finished))
        runs.append(finished.token_ids if finished.token_ids is not None else tuple(finished.text))
    first, second = runs
    at = next((i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b), None)
    if at is None and len(first) != len(second):
        at = min(len(first), len(second))
    return "reproducible" if at is None else f"differs at token {at}"


def quantization_report(
    engine: Engine,
    reference: str,
    variants: list[str],
    cases: list[PromptCase],
    *,
    max_new_tokens: int = 48,
    corpus: str = "python-docs-heldout",
    corpus_chars: int = 4000,
    progress: Progress | None = None,
) -> QuantReport:
    """Every variant (the reference first) loaded side by side, measured on `cases`."""
    names = list(dict.fromkeys([reference, *variants]))
    others = [n for n in names if n != reference]
    # Loads, the reference's answers (each read by every other), the others' own answers,
    # then a perplexity and a reproducibility run per variant.
    total, done = len(names) + len(cases) * len(names) + 2 * len(names), 0

    def say(message: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(message, done, total)

    reports = {name: VariantReport(name) for name in names}
    for name in names:
        info = engine.load(name)
        row = reports[name]
        row.backend, row.dtype, row.weights_bytes, row.load_s = info.backend, info.dtype, info.weights_bytes, info.load_s
        say(f"loaded {name}")
    kl_sums = {name: 0.0 for name in names}
    agreements = {name: 0 for name in names}
    cells: dict[str, list[Cell]] = {name: [] for name in names}
    for number, case in enumerate(cases, start=1):
        say(f"{reference}: prompt {number}/{len(cases)}, read by the others")
        request = engine.request(reference, prompt=case.prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        try:  # the reference's answer is its cell and the text the others read: generated once
            finished = next(e for e in engine.generate(reference, request) if isinstance(e, Finished))
        except PlaygroundError as err:
            cells[reference].append(Cell(case.id, reference, error=str(err)))
            continue
        cells[reference].append(answered_cell(case, reference, finished))
        try:
            result = diff(engine, reference, others, request, answer=finished)
        except GenerationError as err:  # the reference answered nothing here: no tokens to compare
            reports[reference].notes.append(f"{case.id}: {err}")
            continue
        for outcome in result.variants:
            row = reports[outcome.variant_id]
            if outcome.refusal:
                if outcome.refusal not in row.notes:
                    row.notes.append(outcome.refusal)
                continue
            kl_sums[outcome.variant_id] += sum(r.kl for r in outcome.rows)
            agreements[outcome.variant_id] += sum(r.top1_agrees for r in outcome.rows)
            row.compared_tokens += len(outcome.rows)
        reports[reference].compared_tokens += result.answer_tokens
    kl_sums[reference], agreements[reference] = 0.0, reports[reference].compared_tokens
    docs = limited(documents(corpus), corpus_chars)
    for name in names:
        row = reports[name]
        if row.compared_tokens:
            row.mean_kl = kl_sums[name] / row.compared_tokens
            row.top1_agreement = agreements[name] / row.compared_tokens
        if name != reference:
            for number, case in enumerate(cases, start=1):
                cells[name].append(answer_case(engine, name, case, max_new_tokens))
                say(f"{name}: prompt {number}/{len(cases)}")
        answered = [c for c in cells[name] if c.error is None]
        speeds = [c.decode_tok_s for c in answered if c.decode_tok_s is not None]
        ttfts = [c.ttft_s for c in answered if c.ttft_s is not None]
        row.decode_tok_s = float(np.mean(speeds)) if speeds else None
        row.ttft_s = float(np.mean(ttfts)) if ttfts else None
        checks = [ok for c in answered for ok in c.checks.values()]
        row.pass_rate = sum(checks) / len(checks) if checks else None
        row.peak_mem_bytes = max((c.peak_mem_bytes for c in answered if c.peak_mem_bytes), default=None)
        row.notes += [f"{c.prompt_id}: {c.error}" for c in cells[name] if c.error]
        try:
            window = min(512, engine.context_length(name))
            row.perplexity = perplexity(engine, name, docs, window, window // 2)["perplexity"]
        except PlaygroundError as err:
            row.notes.append(f"no perplexity: {err}")
        say(f"{name}: perplexity on {corpus}")
        row.reproducible = reproducibility(engine, name, cases[0], min(max_new_tokens, 32))
        say(f"{name}: reproducibility")
    measured = [r for r in reports.values() if r.mean_kl is not None]
    speed = {r.variant: (r.mean_kl, -r.decode_tok_s) for r in measured if r.decode_tok_s is not None}
    memory = {r.variant: (r.mean_kl, float(r.peak_mem_bytes)) for r in measured if r.peak_mem_bytes}
    return QuantReport(
        reference=reference,
        prompts=len(cases),
        max_new_tokens=max_new_tokens,
        corpus=corpus,
        variants=list(reports.values()),
        pareto_speed=pareto_front(speed),
        pareto_memory=pareto_front(memory),
    )


REPORT_HEADERS = [
    "variant", "backend", "weights MiB", "peak MiB", "load s", "decode tok/s", "TTFT s", "checks passed",
    "perplexity", "mean KL", "top-1 agree", "reproducible",
]


def report_rows(report: dict[str, Any]) -> list[list[str]]:
    """The report as table cells (from its dict, as a job's result holds it)."""

    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    def mib(size: int | None) -> float | None:
        return None if size is None else size / 2**20

    rows = []
    for v in report["variants"]:
        rows.append([
            v["variant"] + (" (reference)" if v["variant"] == report["reference"] else ""),
            f"{v['backend']} {v['dtype']}",
            num(mib(v["weights_bytes"]), ".0f"),
            num(mib(v["peak_mem_bytes"]), ".0f"),
            num(v["load_s"], ".1f"),
            num(v["decode_tok_s"], ".1f"),
            num(v["ttft_s"], ".3f"),
            num(v["pass_rate"], ".1%"),
            num(v["perplexity"], ".2f"),
            num(v["mean_kl"], ".4f"),
            num(v["top1_agreement"], ".1%"),
            v["reproducible"],
        ])
    return rows


def report_csv(report: dict[str, Any]) -> str:
    """The report's table as CSV, with the raw figures (bytes, nats, rates) rather than rounded."""
    out = io.StringIO()
    fields = [f for f in VariantReport.__dataclass_fields__ if f != "notes"]
    writer = csv.writer(out)
    writer.writerow([*fields, "reference", "pareto_speed", "pareto_memory", "notes"])
    for v in report["variants"]:
        writer.writerow([
            *["" if v[f] is None else v[f] for f in fields],
            v["variant"] == report["reference"],
            v["variant"] in report["pareto_speed"],
            v["variant"] in report["pareto_memory"],
            "; ".join(v["notes"]),
        ])
    return out.getvalue()


def report_markdown(report: dict[str, Any]) -> str:
    """The report's table as Markdown, with what it was measured on and its Pareto fronts."""
    lines = [
        f"Reference: {report['reference']}; {report['prompts']} prompts, greedy answers of at most "
        f"{report['max_new_tokens']} tokens; perplexity on {report['corpus']}.",
        "",
        "| " + " | ".join(REPORT_HEADERS) + " |",
        "| " + " | ".join("---" if i < 2 or h == "reproducible" else "---:" for i, h in enumerate(REPORT_HEADERS)) + " |",
        *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in report_rows(report)],
        "",
        f"Pareto front, KL against decode speed: {', '.join(report['pareto_speed']) or '–'}",
        f"Pareto front, KL against peak memory: {', '.join(report['pareto_memory']) or '–'}",
    ]
    notes = [f"- {v['variant']}: {note}" for v in report["variants"] for note in v["notes"]]
    return "\n".join(lines + (["", "Notes:", *notes] if notes else []))
