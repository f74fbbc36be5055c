"""What a router buys: answer quality against the share of requests sent to the strong partner.

Given each request's P(escalate) from the router and the quality of the weak model's answer
(the router answering itself) and of the strong partner's, every threshold is a point: the
requests scoring above it go to the partner. The curve is drawn against the share of partner
calls, or against money or seconds when both variants carry a `cost` section. It is compared
with the weak-only and strong-only points, random routing (the straight line between them) and
the oracle (the partner only where it does better, largest gains first).

The summary numbers are RouteLLM's (arXiv 2406.18665): PGR, the performance gap recovered,
(quality - weak) / (strong - weak); APGR, its average over the partner-call share from 0 to 1
(areas by scikit-learn's trapezoid `auc`); CPT(x%), the smallest partner-call share whose
quality recovers x% of the gap, interpolated between the curve's points.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import auc

from playground.errors import PlaygroundError
from playground.jsonl import read_jsonl


@dataclass
class CurvePoint:
    strong_share: float  # of the requests, sent to the partner
    quality: float  # mean over the requests
    usd: float | None = None  # all requests' answers together, when both variants have a cost
    seconds: float | None = None


@dataclass
class CostQualityCurve:
    n: int
    weak_quality: float
    strong_quality: float
    router: list[CurvePoint]
    oracle: list[CurvePoint]
    apgr: float | None  # None where the partner is no better than the weak model on these requests
    cpt50: float | None  # None where the curve never recovers that share of the gap
    cpt80: float | None
    oracle_apgr: float | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QualityRow:
    """One request: the router's score and how good each side's answer was (0..1 or any scale
    shared by both), with optional token counts for the money axis."""

    prompt: str
    weak_quality: float
    strong_quality: float
    weak_tokens: tuple[float, float] | None = None  # (input, output)
    strong_tokens: tuple[float, float] | None = None


def read_quality_data(path: Path) -> list[QualityRow]:
    """JSONL of {"prompt", "weak_quality", "strong_quality"} with, optionally, "weak_tokens" and
    "strong_tokens" as [input, output]. A bad line is named with what it lacks."""
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PlaygroundError(f'{path}, line {number}: each line needs a string "prompt"')
        try:
            weak, strong = float(row["weak_quality"]), float(row["strong_quality"])
        except (KeyError, TypeError, ValueError):
            raise PlaygroundError(
                f'{path}, line {number}: "weak_quality" and "strong_quality" must both be numbers'
            ) from None
        tokens = []
        for key in ("weak_tokens", "strong_tokens"):
            value = row.get(key)
            if value is None:
                tokens.append(None)
                continue
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)):
                raise PlaygroundError(f'{path}, line {number}: "{key}" must be [input tokens, output tokens]')
            tokens.append((float(value[0]), float(value[1])))
        rows.append(QualityRow(row["prompt"], weak, strong, tokens[0], tokens[1]))
    if not rows:
        raise PlaygroundError(f"{path} holds no rows")
    return rows


def quality_rows_from_matrix(result: dict[str, Any], weak: str, strong: str) -> list[QualityRow]:
    """Quality rows from a finished matrix job's result: each prompt with checks that both
    columns answered without error, its quality the share of its checks each answer passed, and
    each side's (prompt, completion) tokens where the cells counted them."""
    from playground.matrix import Cell, MatrixResult

    matrix = MatrixResult.from_dict(result)
    for variant in (weak, strong):
        if variant not in matrix.variants:
            raise PlaygroundError(f"{variant} is not a column of this matrix (its columns: {', '.join(matrix.variants)})")

    def quality(cell: Cell) -> float:
        return sum(cell.checks.values()) / len(cell.checks)

    def tokens(cell: Cell) -> tuple[float, float] | None:
        return (float(cell.prompt_tokens), float(cell.completion_tokens)) if cell.prompt_tokens else None

    rows = []
    for prompt in matrix.prompts:
        a, b = matrix.cell(prompt["id"], weak), matrix.cell(prompt["id"], strong)
        if a.error or b.error or not a.checks or not b.checks:
            continue
        rows.append(QualityRow(prompt["prompt"], quality(a), quality(b), tokens(a), tokens(b)))
    if not rows:
        raise PlaygroundError(f"no prompt of this matrix has checks that both {weak} and {strong} answered")
    return rows


def write_quality_data(rows: list[QualityRow], path: Path) -> None:
    """The rows as the JSONL `read_quality_data` reads."""
    lines = []
    for row in rows:
        item: dict[str, Any] = {"prompt": row.prompt, "weak_quality": row.weak_quality, "strong_quality": row.strong_quality}
        if row.weak_tokens and row.strong_tokens:
            item |= {"weak_tokens": list(row.weak_tokens), "strong_tokens": list(row.strong_tokens)}
        lines.append(json.dumps(item) + "\n")
    path.write_text("".join(lines))


def _points(
    order: np.ndarray,
    cuts: list[int],
    weak: np.ndarray,
    strong: np.ndarray,
    weak_usd: np.ndarray | None,
    strong_usd: np.ndarray | None,
    weak_s: float | None,
    strong_s: float | None,
) -> list[CurvePoint]:
    """A point per cut: the first `k` requests of `order` go to the partner."""
    n = len(weak)
    points = []
    for k in cuts:
        escalated = np.zeros(n, dtype=bool)
        escalated[order[:k]] = True
        quality = float(np.where(escalated, strong, weak).mean())
        usd = float(np.where(escalated, strong_usd, weak_usd).sum()) if weak_usd is not None else None
        seconds = k * strong_s + (n - k) * weak_s if weak_s is not None and strong_s is not None else None
        points.append(CurvePoint(k / n, quality, usd, seconds))
    return points


def _apgr(points: list[CurvePoint], weak: float, strong: float) -> float | None:
    if strong <= weak:
        return None
    shares = [p.strong_share for p in points]
    area = auc(shares, [p.quality for p in points])  # over shares 0..1, so the mean quality
    return (area - weak) / (strong - weak)


def _cpt(points: list[CurvePoint], weak: float, strong: float, recovered: float) -> float | None:
    """The smallest partner share at which the curve reaches weak + recovered * (strong - weak),
    linear between the point before and the first point reaching it."""
    if strong <= weak:
        return None
    target = weak + recovered * (strong - weak)
    shares = np.array([p.strong_share for p in points])
    qualities = np.array([p.quality for p in points])
    reached = np.flatnonzero(qualities >= target - 1e-12)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return float(shares[0])
    return float(np.interp(target, qualities[i - 1 : i + 1], shares[i - 1 : i + 1]))


def cost_quality_curve(
    p_escalate: list[float],
    rows: list[QualityRow],
    weak_cost: Any = None,
    strong_cost: Any = None,
) -> CostQualityCurve:
    """The router's curve and its baselines. `weak_cost`/`strong_cost` are the variants'
    `CostSpec`s (config `cost:`); with both, points carry money (from each row's tokens) and
    seconds (from each side's seconds per answer)."""
    if len(p_escalate) != len(rows) or not rows:
        raise PlaygroundError("the router's scores and the quality rows must be as many, and not none")
    weak = np.array([r.weak_quality for r in rows], dtype=float)
    strong = np.array([r.strong_quality for r in rows], dtype=float)
    scores = np.asarray(p_escalate, dtype=float)
    n = len(rows)
    notes: list[str] = []
    weak_usd = strong_usd = None
    weak_s = strong_s = None
    if weak_cost is not None and strong_cost is not None:
        if all(r.weak_tokens and r.strong_tokens for r in rows):
            weak_usd = np.array([weak_cost.usd(*r.weak_tokens) for r in rows])
            strong_usd = np.array([strong_cost.usd(*r.strong_tokens) for r in rows])
        else:
            notes.append("no money axis: some rows lack weak_tokens or strong_tokens")
        weak_s, strong_s = weak_cost.seconds_per_answer, strong_cost.seconds_per_answer
    # Highest P(escalate) first; a threshold cannot split equal scores, so cuts fall between them.
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    cuts = [0] + [k for k in range(1, n) if sorted_scores[k] != sorted_scores[k - 1]] + [n]
    router = _points(order, cuts, weak, strong, weak_usd, strong_usd, weak_s, strong_s)
    gains = strong - weak
    oracle_order = np.argsort(-gains, kind="stable")
    oracle = _points(oracle_order, list(range(n + 1)), weak, strong, weak_usd, strong_usd, weak_s, strong_s)
    weak_mean, strong_mean = float(weak.mean()), float(strong.mean())
    if strong_mean <= weak_mean:
        notes.append("the partner is no better than the router's own answers here: PGR, APGR and CPT are undefined")
    return CostQualityCurve(
        n=n,
        weak_quality=weak_mean,
        strong_quality=strong_mean,
        router=router,
        oracle=oracle,
        apgr=_apgr(router, weak_mean, strong_mean),
        cpt50=_cpt(router, weak_mean, strong_mean, 0.5),
        cpt80=_cpt(router, weak_mean, strong_mean, 0.8),
        oracle_apgr=_apgr(oracle, weak_mean, strong_mean),
        notes=notes,
    )


def partner_of(catalogue: Any, partner_id: str | None) -> Any:
    """The partner variant's config: the one named, else the catalogue's first with role
    partner, else None."""
    if partner_id:
        return catalogue.get(partner_id)
    return next((c for c in catalogue.configs.values() if c.role == "partner"), None)


def router_cost_quality(
    engine: Any,
    router_id: str,
    data: str,
    partner_id: str | None = None,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> CostQualityCurve:
    """Score every request of a quality file (inside the allowed roots) with the router, as its
    decision would (calibrated where it has a calibration), and draw the curve. `progress(done,
    total)` is told after each request; setting `cancel` ends it between requests with
    `EvalCancelled`."""
    from playground.router import EvalCancelled, Router
    from playground.settings import allowed_path

    rows = read_quality_data(allowed_path(data, "quality data file"))[: limit or None]
    router = Router(engine, router_id)
    scores = []
    for i, row in enumerate(rows):
        if cancel is not None and cancel.is_set():
            raise EvalCancelled(f"cancelled after {i} of {len(rows)} requests")
        scores.append(router.decide(row.prompt, explain=False).p_escalate)
        if progress is not None:
            progress(i + 1, len(rows))
    partner = partner_of(engine.catalogue, partner_id)
    curve = cost_quality_curve(scores, rows, router.config.cost, partner.cost if partner else None)
    if partner is None:
        curve.notes.append("no partner variant in the catalogue: no money or seconds axis")
    elif router.config.cost is None or partner.cost is None:
        curve.notes.append(f"no money or seconds axis: give {router_id} and {partner.id} a cost section")
    return curve
