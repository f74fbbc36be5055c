"""Route decisions that do not depend on a small model writing valid JSON.

A router variant (a config with a `router` section) is asked as its card says: its system
prompt, then the user's request. The decision is *scored*: the answer is forced to begin with
`{"route": "` and the model's own token probabilities of each allowed route (closed by its
quote) are compared; P(escalate) is the escalation route's share. Separately the model writes
its whole answer (under a JSON grammar where the backend has one), which gives the reason and
shows whether its free output is valid; an invalid answer is reported as invalid and never
turned into a route. As in RouteLLM, a router is a score and a threshold.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from playground.capabilities import capabilities
from playground.config import ModelConfig, RouterSpec
from playground.engine import Engine
from playground.errors import PlaygroundError
from playground.jsonl import read_jsonl
from playground.router_calibration import Calibration, Method, fit_calibration, load_calibration, save_calibration
from playground.settings import allowed_path
from playground.workers import Finished

ROUTE_PREFIX = '{"route": "'
# What follows a route in a valid answer. Scored with the route because BPE tokenizers merge
# the closing quote with the comma (SmolLM2: `",` is one token): a route scored as `self"`
# asks for a token the model never writes there, after any fine-tune on real answers.
ROUTE_END = '",'
# A reason of at most 60 characters is at most 60 tokens; with the JSON around it the answer
# closes within 100 tokens (at 100 characters and 60 tokens, 8% of OOD answers were cut open).
REASON_MAX_CHARS = 60
ANSWER_TOKENS = 100


@dataclass
class RouteDecision:
    route: str
    escalated: bool
    p_escalate: float
    threshold: float
    route_probs: dict[str, float]
    valid_json: bool
    reason: str | None
    model_route: str | None  # what the model itself wrote, when its answer was valid
    raw_output: str
    latency_s: float  # scoring and writing the answer, as the user waits for both
    score_latency_s: float
    grammar: bool  # whether the answer was written under a JSON grammar
    p_escalate_raw: float | None = None  # before the router's calibration, when it has one
    calibration: str | None = None  # which calibration was applied
    # As the caller waits: until the route is known (scoring, calibration, threshold), and then
    # writing the reason (None when it was not asked for).
    decision_latency_s: float = 0.0
    reason_latency_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_route_json(text: str, routes: list[str]) -> tuple[bool, str | None, str | None, str]:
    """(valid, route, reason, why) for a router's raw answer. Valid means: one JSON object with a
    `route` among `routes` and a string `reason`, and nothing else but whitespace around it."""
    stripped = text.strip()
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as err:
        return False, None, None, f"not valid JSON ({err.msg} at character {err.pos})"
    if not isinstance(data, dict):
        return False, None, None, "not a JSON object"
    route, reason = data.get("route"), data.get("reason")
    if route not in routes:
        return False, None, None, f"route {route!r} is not one of {routes}"
    if not isinstance(reason, str):
        return False, None, None, "no string `reason`"
    return True, route, reason, "valid"


def answer_schema(routes: list[str]) -> dict[str, Any]:
    # maxLength: without it a small model can repeat itself until the token limit and never
    # close the string (seen with the embedded 135M).
    return {
        "type": "object",
        "properties": {
            "route": {"type": "string", "enum": routes},
            "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
        },
        "required": ["route", "reason"],
        "additionalProperties": False,
    }


def router_spec(config: ModelConfig) -> RouterSpec:
    if config.router is None:
        raise PlaygroundError(f"{config.display_name} has no router section: it cannot route")
    return config.router


def route_probabilities(routes: list[str], logprobs: list[float]) -> dict[str, float]:
    """Each route's probability from its scored tokens' log-probability, normalized over the routes."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return {r: w / total for r, w in zip(routes, weights, strict=True)}


class Router:
    """One router variant of the engine: scores requests and decides against a threshold."""

    def __init__(self, engine: Engine, variant_id: str, session: str = "local", calibrated: bool = True) -> None:
        config = engine.catalogue.get(variant_id)
        self.engine = engine
        self.config: ModelConfig = config
        self.spec = router_spec(config)
        self.session = session  # whose turn its answers take in the router's fair queue
        # Its stored calibration (playground.router_calibration) maps raw P(escalate) to calibrated.
        self.calibration: Calibration | None = load_calibration(config.id) if calibrated else None

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.spec.system_prompt}, {"role": "user", "content": prompt}]

    def ensure_loaded(self) -> None:
        if self.engine.status(self.config.id).state != "ready":
            self.engine.load(self.config.id)

    def score(self, prompt: str) -> tuple[dict[str, float], float]:
        """Probability of each route (normalized over the allowed routes) and seconds taken."""
        request = self.engine.request(
            self.config.id, messages=self._messages(prompt), mode="chat", assistant_prefix=ROUTE_PREFIX
        )
        logprobs, seconds = self.engine.score(self.config.id, request, [r + ROUTE_END for r in self.spec.routes])
        return route_probabilities(self.spec.routes, logprobs), seconds

    def write_answer(self, prompt: str) -> tuple[str, bool]:
        """The model's own answer, greedy; under a JSON grammar when the backend has one."""
        backend_has_grammar = capabilities(self.config.backend).grammar
        request = self.engine.request(
            self.config.id,
            messages=self._messages(prompt),
            mode="chat",
            temperature=0.0,
            max_new_tokens=ANSWER_TOKENS,
            repetition_penalty=1.0,
            json_schema=answer_schema(self.spec.routes) if backend_has_grammar else None,
        )
        text = ""
        for event in self.engine.generate(self.config.id, request, session=self.session):
            if isinstance(event, Finished):
                text = event.text
        return text, backend_has_grammar

    def decide(self, prompt: str, threshold: float = 0.5, explain: bool = True) -> RouteDecision:
        if not 0.0 <= threshold <= 1.0:
            raise PlaygroundError(f"threshold must be between 0 and 1, not {threshold}")
        if not prompt.strip():
            raise PlaygroundError("the prompt is empty")
        self.ensure_loaded()
        started = time.perf_counter()
        probs, score_s = self.score(prompt)
        p_raw = probs[self.spec.escalate_route]
        p_escalate = float(self.calibration.apply(p_raw)) if self.calibration else p_raw
        others = [r for r in self.spec.routes if r != self.spec.escalate_route]
        route = self.spec.escalate_route if p_escalate > threshold else max(others, key=lambda r: probs[r])
        decided_s = time.perf_counter() - started
        raw, grammar = self.write_answer(prompt) if explain else ("", False)
        valid, model_route, reason, _ = parse_route_json(raw, self.spec.routes) if explain else (False, None, None, "")
        return RouteDecision(
            route=route,
            escalated=route == self.spec.escalate_route,
            p_escalate=p_escalate,
            threshold=threshold,
            route_probs=probs,
            valid_json=valid,
            reason=reason,
            model_route=model_route,
            raw_output=raw,
            latency_s=time.perf_counter() - started,
            score_latency_s=score_s,
            grammar=grammar,
            p_escalate_raw=p_raw if self.calibration else None,
            calibration=self.calibration.describe() if self.calibration else None,
            decision_latency_s=decided_s,
            reason_latency_s=time.perf_counter() - started - decided_s if explain else None,
        )


def answering_variant(decision: RouteDecision, router_id: str, partner_id: str | None) -> str:
    """Who answers: the partner when the request escalates and one is chosen, else the router."""
    return partner_id if decision.escalated and partner_id else router_id


# -- evaluation ------------------------------------------------------------------------------
@dataclass
class RouterEval:
    n: int
    threshold: float
    accuracy: float
    escalation_recall: float | None
    escalation_precision: float | None
    json_validity: float | None  # None when the eval asked for no written answers (explain=False)
    confusion: dict[str, dict[str, int]]  # gold route -> decided route -> count
    mean_latency_s: float
    curve: list[dict[str, float]]  # per threshold: escalation rate and accuracy
    rows: list[dict[str, Any]] = field(default_factory=list)
    # How well P(escalate) ranks and how honest it is as a probability (scikit-learn):
    # Wilson score interval of the accuracy at 95% (scipy's binomtest), over these n rows.
    accuracy_ci95: tuple[float, float] = (0.0, 1.0)
    auroc: float | None = None  # None while the gold routes hold one class only
    ece: float | None = None  # expected calibration error over RELIABILITY_BINS equal-width bins
    brier: float | None = None
    reliability: list[dict[str, float]] = field(default_factory=list)  # per non-empty bin
    latency_p50_s: float = 0.0  # of whole decisions, the written reason included
    latency_p95_s: float = 0.0
    # Until the route is known, without the reason (rows without the field count their latency_s).
    decision_latency_p50_s: float = 0.0
    decision_latency_p95_s: float = 0.0
    escalation_rate: float = 0.0  # decided at `threshold`
    # With a target escalation rate: the threshold that reaches it on the calibration data
    # (RouteLLM's calibration), and the rate it reached here.
    target_escalation_rate: float | None = None
    calibration_data: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_router_data(path: Path, routes: list[str] | None = None) -> list[dict[str, str]]:
    """JSONL of {"prompt", "route"}; any other keys are kept but not needed. With `routes`, a
    route outside them is refused with its line: counted, it would skew every metric."""
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("route"), str):
            raise PlaygroundError(f'{path}, line {number}: each line needs string "prompt" and "route" fields')
        if routes is not None and row["route"] not in routes:
            raise PlaygroundError(
                f"{path}, line {number}: route {row['route']!r} is not one this router knows ({', '.join(routes)})"
            )
        rows.append(row)
    if not rows:
        raise PlaygroundError(f"{path} holds no rows")
    return rows


def accuracy_interval(correct: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of `correct` right out of `n` (scipy)."""
    interval = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def summarize(rows: list[dict[str, Any]], routes: list[str], escalate: str, threshold: float) -> RouterEval:
    """Metrics from per-row results (gold route, p_escalate, valid_json, latency_s)."""

    def decided(row: dict[str, Any], t: float) -> str:
        return escalate if row["p_escalate"] > t else row["best_other"]

    confusion = {g: {d: 0 for d in routes} for g in routes}
    for row in rows:
        confusion.setdefault(row["route"], {d: 0 for d in routes})[decided(row, threshold)] += 1
    correct = sum(decided(r, threshold) == r["route"] for r in rows)
    true_esc = confusion.get(escalate, {}).get(escalate, 0)
    gold_esc = sum(confusion.get(escalate, {}).values())
    said_esc = sum(c.get(escalate, 0) for c in confusion.values())
    curve = []
    for step in range(0, 21):
        t = step / 20
        curve.append(
            {
                "threshold": t,
                "escalation_rate": sum(decided(r, t) == escalate for r in rows) / len(rows),
                "accuracy": sum(decided(r, t) == r["route"] for r in rows) / len(rows),
            }
        )
    escalates = np.array([r["route"] == escalate for r in rows])
    scores = np.array([float(r["p_escalate"]) for r in rows])
    latencies = np.array([float(r["latency_s"]) for r in rows])
    decision_latencies = np.array([float(r.get("decision_latency_s", r["latency_s"])) for r in rows])
    auroc = float(roc_auc_score(escalates, scores)) if 0 < escalates.sum() < len(rows) else None
    return RouterEval(
        auroc=auroc,
        brier=float(brier_score_loss(escalates, scores, pos_label=True)),
        **reliability(escalates, scores),
        latency_p50_s=float(np.percentile(latencies, 50)),
        latency_p95_s=float(np.percentile(latencies, 95)),
        decision_latency_p50_s=float(np.percentile(decision_latencies, 50)),
        decision_latency_p95_s=float(np.percentile(decision_latencies, 95)),
        escalation_rate=said_esc / len(rows),
        n=len(rows),
        threshold=threshold,
        accuracy=correct / len(rows),
        accuracy_ci95=accuracy_interval(correct, len(rows)),
        escalation_recall=true_esc / gold_esc if gold_esc else None,
        escalation_precision=true_esc / said_esc if said_esc else None,
        json_validity=(
            sum(bool(r["valid_json"]) for r in written) / len(written)
            if (written := [r for r in rows if r["valid_json"] is not None])
            else None
        ),
        confusion=confusion,
        mean_latency_s=sum(r["latency_s"] for r in rows) / len(rows),
        curve=curve,
        rows=rows,
    )


RELIABILITY_BINS = 10


def reliability(escalates: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """The reliability diagram (scikit-learn's calibration curve over equal-width bins of
    P(escalate)) and the expected calibration error: the gap between each bin's observed
    escalation frequency and its mean P(escalate), weighted by the bin's share of rows."""
    frequency, confidence = calibration_curve(escalates, scores, n_bins=RELIABILITY_BINS, strategy="uniform")
    edges = np.linspace(0.0, 1.0, RELIABILITY_BINS + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], scores), minlength=RELIABILITY_BINS)  # the curve's own bins
    counts = counts[counts > 0]
    return {
        "ece": float(np.average(np.abs(frequency - confidence), weights=counts)),
        "reliability": [
            {"confidence": float(c), "frequency": float(f), "count": int(n)}
            for c, f, n in zip(confidence, frequency, counts, strict=True)
        ],
    }


def threshold_for_rate(scores: list[float], target_rate: float) -> float:
    """The threshold at which a share `target_rate` of `scores` lies above it (escalates), as
    RouteLLM calibrates its routers: the (1 − rate) quantile of the calibration scores."""
    if not 0.0 <= target_rate <= 1.0:
        raise PlaygroundError(f"a target escalation rate is a share in 0..1; got {target_rate}")
    return float(np.quantile(np.asarray(scores, dtype=float), 1.0 - target_rate))


def router_rows(data: str, routes: list[str], limit: int | None = None) -> list[dict[str, str]]:
    """The rows of `data`: a bundled set's name (DATASETS) or a JSONL file inside the allowed
    roots; the first `limit` only, when given."""
    path = DATASETS[data] if data in DATASETS else allowed_path(data, "router data file")
    rows = read_router_data(path, routes)
    return rows[:limit] if limit else rows


def evaluate_router_file(
    engine: Engine,
    variant: str,
    data: str,
    threshold: float = 0.5,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    explain: bool = True,
) -> RouterEval:
    """The router eval of the CLI, the Router tab and the eval-router job: `data` read as
    `router_rows` says (a bad file is refused before the router loads), then every row routed.
    `variant` is an id or a path."""
    config = engine.catalogue.resolve(variant)
    rows = router_rows(data, router_spec(config).routes, limit)
    return evaluate_router(engine, config.id, rows, threshold, progress, cancel, explain=explain)


def evaluate_at_target_rate(
    engine: Engine,
    variant: str,
    data: str,
    target_rate: float,
    calibration_data: str = "in_distribution",
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> RouterEval:
    """The threshold that escalates `target_rate` of `calibration_data` (never the eval data:
    tuned there, the rate reached would be the target by construction), then `data` evaluated
    at it: its `escalation_rate` is the rate actually reached."""
    config = engine.catalogue.resolve(variant)
    spec = router_spec(config)
    rows = router_rows(data, spec.routes, limit)
    stored = load_calibration(config.id)
    if stored is not None and stored.data == calibration_data and stored.calibrated_scores:
        # The router's calibration kept its scores of that data: no need to route it again.
        scores, done_before, total = stored.calibrated_scores, 0, len(rows)
    else:
        calibration = router_rows(calibration_data, spec.routes)
        total = len(calibration) + len(rows)
        step = (lambda done, _n: progress(done, total)) if progress else None
        scores = [r["p_escalate"] for r in evaluate_router(engine, config.id, calibration, 0.5, step, cancel).rows]
        done_before = len(calibration)
    threshold = threshold_for_rate(scores, target_rate)
    shifted = (lambda done, _n: progress(done_before + done, total)) if progress else None
    result = evaluate_router(engine, config.id, rows, threshold, shifted, cancel)
    result.target_escalation_rate, result.calibration_data = target_rate, calibration_data
    return result


def evaluate_router(
    engine: Engine,
    variant_id: str,
    data: list[dict[str, str]],
    threshold: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    calibrated: bool = True,
    explain: bool = True,
) -> RouterEval:
    """Run the router on every row. `progress(done, total)` is called before the first row and
    after each; setting `cancel` ends the eval between rows with `EvalCancelled`. With
    `calibrated` (and a stored calibration) P(escalate) is the calibrated score. Without
    `explain` the router writes no answers: routes only, and no JSON validity."""
    router = Router(engine, variant_id, calibrated=calibrated)
    if progress is not None:
        progress(0, len(data))
    rows = []
    for i, item in enumerate(data):
        if cancel is not None and cancel.is_set():
            raise EvalCancelled(f"the router eval was cancelled after {i} of {len(data)} rows")
        d = router.decide(item["prompt"], threshold, explain=explain)
        others = {r: p for r, p in d.route_probs.items() if r != router.spec.escalate_route}
        rows.append(
            {
                "prompt": item["prompt"],
                "route": item["route"],
                "p_escalate": d.p_escalate,
                "p_escalate_raw": d.p_escalate if d.p_escalate_raw is None else d.p_escalate_raw,
                "best_other": max(others, key=others.get),
                "valid_json": d.valid_json if explain else None,
                "model_route": d.model_route,
                "latency_s": d.latency_s,
                "decision_latency_s": d.decision_latency_s,
                "raw_output": d.raw_output,
            }
        )
        if progress is not None:
            progress(i + 1, len(data))
    return summarize(rows, router.spec.routes, router.spec.escalate_route, threshold)


def calibrate_router(
    engine: Engine,
    variant: str,
    data: str = "in_distribution",
    method: Method = "platt",
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Calibration:
    """Route `data` with the raw scores, fit the calibration, store it with the router variant
    (every later decision and eval of that variant uses it) and return it."""
    config = engine.catalogue.resolve(variant)
    spec = router_spec(config)
    rows = router_rows(data, spec.routes, limit)
    raw = evaluate_router(engine, config.id, rows, 0.5, progress, cancel, calibrated=False)
    escalates = [r["route"] == spec.escalate_route for r in raw.rows]
    scores = [r["p_escalate"] for r in raw.rows]
    calibration = fit_calibration(config.id, scores, escalates, method, data)
    calibration.ece_before = raw.ece
    calibration.ece_after = reliability(np.array(escalates), np.array(calibration.calibrated_scores))["ece"]
    save_calibration(calibration)
    return calibration


class EvalCancelled(PlaygroundError):
    """A router eval stopped by its caller."""


ASSETS = Path(__file__).resolve().parent.parent / "assets" / "router"
# ood2: a second set written by hand later, after the router LoRA was trained and tuned on nothing of it.
DATASETS = {
    "ood": ASSETS / "ood.jsonl",
    "ood2": ASSETS / "ood2.jsonl",
    "in_distribution": ASSETS / "eval_in_distribution.jsonl",
}
