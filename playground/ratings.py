"""Ratings from blind votes, the way leaderboards the field trusts compute them.

- **Bradley–Terry** over all votes at once (evalica), a tie or "both bad" counting half a win
  each way, shown on the Elo-like scale: 1000 + 400·log10(strength), strengths anchored at a
  geometric mean of 1 (a 100-point gap means the higher one wins 64% of the time).
- A **prior of one tie between every two variants** keeps ratings finite with few votes (the
  maximum-likelihood fit has no finite answer while a variant has only wins or only losses, or
  the comparisons fall apart into groups); with hundreds of votes its pull is negligible.
- **95% intervals** by bootstrap (scipy, percentile method): the votes are resampled and the
  model refitted, the prior kept in every refit.
- **Style control** as lmarena does it: a logistic regression (scikit-learn) of the outcome on
  the variants (+1 for A, −1 for B) and the normalized differences of answer length and
  Markdown elements (headers, list items, bold), so a variant's rating is what remains once
  longer or more decorated answers are credited to their style.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import evalica
import numpy as np
import pandas as pd
from scipy.stats import bootstrap
from sklearn.linear_model import LogisticRegression

INIT_RATING = 1000.0
SCALE = 400.0  # Elo points per factor of 10 in strength
PRIOR_TIES = 1.0  # virtual ties between every two variants
CONFIDENCE = 0.95
STYLE_ELEMENTS = ("length", "headers", "list_items", "bold")


class VoteLike(Protocol):
    variant_a: str
    variant_b: str
    outcome: str  # a, b, tie, both_bad
    answer_a: str
    answer_b: str


@dataclass
class Rating:
    variant: str
    rating: float
    low: float  # the interval at CONFIDENCE
    high: float
    votes: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0


@dataclass
class Leaderboard:
    ratings: list[Rating]  # best first
    method: str  # "Bradley–Terry" or "Bradley–Terry with style control"
    votes: int
    notes: list[str] = field(default_factory=list)  # pairs too close to separate, and why
    style_coefficients: dict[str, float] = field(default_factory=dict)  # Elo points per standard deviation


def _winner(outcome: str) -> evalica.Winner:
    return {"a": evalica.Winner.X, "b": evalica.Winner.Y}.get(outcome, evalica.Winner.Draw)


def _counts(votes: Sequence[VoteLike], variants: list[str]) -> dict[str, list[int]]:
    counts = {v: [0, 0, 0, 0, 0] for v in variants}  # votes, wins, losses, ties, both bad
    for vote in votes:
        for side, variant in (("a", vote.variant_a), ("b", vote.variant_b)):
            c = counts[variant]
            c[0] += 1
            if vote.outcome in ("a", "b"):
                c[1 if vote.outcome == side else 2] += 1
            else:
                c[3 if vote.outcome == "tie" else 4] += 1
    return counts


def _bt_elo(xs: np.ndarray, ys: np.ndarray, winners: list[evalica.Winner], n: int) -> np.ndarray:
    """Bradley–Terry strengths of variants 0..n-1 (codes in `xs`, `ys`) on the Elo-like scale,
    with the prior ties added."""
    first, second = np.triu_indices(n, k=1)
    result = evalica.bradley_terry(
        np.concatenate([xs, first]),
        np.concatenate([ys, second]),
        [*winners, *[evalica.Winner.Draw] * len(first)],
        weights=np.concatenate([np.ones(len(xs)), np.full(len(first), PRIOR_TIES)]),
        index=pd.RangeIndex(n),
    )
    logs = np.log10(result.scores.reindex(range(n)).to_numpy(dtype=float))
    return INIT_RATING + SCALE * (logs - logs.mean())


def _interval(
    statistic: Callable[[np.ndarray], np.ndarray], n: int, seed: int, n_resamples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the vector `statistic(indices)` over `n` votes."""
    if n < 2:  # nothing to resample: the interval is unknown, not zero-wide
        size = len(statistic(np.arange(n)))
        return np.full(size, -math.inf), np.full(size, math.inf)
    result = bootstrap(
        (np.arange(n),),
        lambda idx: statistic(idx.astype(int)),
        vectorized=False,
        n_resamples=n_resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        random_state=seed,
    )
    return result.confidence_interval.low, result.confidence_interval.high


def _variants(votes: Sequence[VoteLike]) -> list[str]:
    return sorted({str(v) for vote in votes for v in (vote.variant_a, vote.variant_b)})


def bradley_terry(votes: Sequence[VoteLike], n_resamples: int = 1000, seed: int = 0) -> Leaderboard:
    """Ratings with intervals from all `votes`."""
    variants = _variants(votes)
    if not variants:
        return Leaderboard([], "Bradley–Terry", 0)
    code = {v: i for i, v in enumerate(variants)}
    xs = np.array([code[str(vote.variant_a)] for vote in votes], dtype=np.int64)
    ys = np.array([code[str(vote.variant_b)] for vote in votes], dtype=np.int64)
    winners = [_winner(vote.outcome) for vote in votes]
    n = len(variants)
    point = _bt_elo(xs, ys, winners, n)
    low, high = _interval(
        lambda idx: _bt_elo(xs[idx], ys[idx], [winners[i] for i in idx], n), len(votes), seed, n_resamples
    )
    return _board(votes, variants, point, low, high, "Bradley–Terry")


def style_features(answer: str) -> dict[str, float]:
    """What lmarena controls for: the answer's length (words) and its Markdown elements."""
    return {
        "length": float(len(answer.split())),
        "headers": float(len(re.findall(r"^\s{0,3}#{1,6}\s", answer, flags=re.M))),
        "list_items": float(len(re.findall(r"^\s*(?:[-*+]|\d+[.)])\s", answer, flags=re.M))),
        "bold": float(len(re.findall(r"\*\*[^*\n]+\*\*|__[^_\n]+__", answer))),
    }


def _style_matrix(votes: Sequence[VoteLike]) -> np.ndarray:
    """Per vote, (A − B) / (A + B + 1) of each style element, then standardized over the votes."""
    rows = []
    for vote in votes:
        a, b = style_features(vote.answer_a), style_features(vote.answer_b)
        rows.append([(a[k] - b[k]) / (a[k] + b[k] + 1.0) for k in STYLE_ELEMENTS])
    diffs = np.array(rows, dtype=float).reshape(len(votes), len(STYLE_ELEMENTS))
    spread = diffs.std(axis=0)
    return (diffs - diffs.mean(axis=0)) / np.where(spread > 0, spread, 1.0)


def _style_fit(
    votes: Sequence[VoteLike], style: np.ndarray, idx: np.ndarray, variants: list[str]
) -> np.ndarray:
    """Ratings (Elo-like scale) then the style coefficients, from the votes at `idx`."""
    column = {v: i for i, v in enumerate(variants)}
    pairs = [(a, b) for i, a in enumerate(variants) for b in variants[i + 1 :]]
    features, outcomes, weights = [], [], []

    def add(row: np.ndarray, outcome: str, weight: float) -> None:
        if outcome in ("a", "b"):
            labels = [(1 if outcome == "a" else 0, weight)]
        else:  # a tie (or both bad) is both outcomes at half weight
            labels = [(1, weight / 2), (0, weight / 2)]
        for label, w in labels:
            features.append(row)
            outcomes.append(label)
            weights.append(w)

    for i in idx:
        vote = votes[i]
        row = np.zeros(len(variants) + len(STYLE_ELEMENTS))
        row[column[vote.variant_a]], row[column[vote.variant_b]] = 1.0, -1.0
        row[len(variants) :] = style[i]
        add(row, vote.outcome, 1.0)
    for a, b in pairs:  # the same prior as the plain fit: one tie per pair, no style difference
        row = np.zeros(len(variants) + len(STYLE_ELEMENTS))
        row[column[a]], row[column[b]] = 1.0, -1.0
        add(row, "tie", PRIOR_TIES)
    model = LogisticRegression(fit_intercept=False, C=1e6, max_iter=1000, tol=1e-8)
    model.fit(np.array(features), np.array(outcomes), sample_weight=np.array(weights))
    coef = model.coef_[0] * SCALE / math.log(10)  # log-odds to Elo points
    strengths = coef[: len(variants)]
    return np.concatenate([INIT_RATING + strengths - strengths.mean(), coef[len(variants) :]])


def style_controlled(votes: Sequence[VoteLike], n_resamples: int = 300, seed: int = 0) -> Leaderboard:
    """Ratings with answer length and Markdown elements as covariates."""
    variants = _variants(votes)
    method = "Bradley–Terry with style control"
    if not variants:
        return Leaderboard([], method, 0)
    style = _style_matrix(votes)
    point = _style_fit(votes, style, np.arange(len(votes)), variants)
    low, high = _interval(lambda idx: _style_fit(votes, style, idx, variants), len(votes), seed, n_resamples)
    n = len(variants)
    board = _board(votes, variants, point[:n], low[:n], high[:n], method)
    board.style_coefficients = dict(zip(STYLE_ELEMENTS, (float(c) for c in point[n:]), strict=True))
    return board


def _board(
    votes: Sequence[VoteLike], variants: list[str], point: np.ndarray, low: np.ndarray, high: np.ndarray, method: str
) -> Leaderboard:
    counts = _counts(votes, variants)
    ratings = [
        Rating(v, float(point[i]), float(low[i]), float(high[i]), *counts[v]) for i, v in enumerate(variants)
    ]
    ratings.sort(key=lambda r: (-r.rating, r.variant))
    return Leaderboard(ratings, method, len(votes), separation_notes(ratings, votes))


def head_to_head(votes: Sequence[VoteLike], a: str, b: str) -> int:
    return sum(1 for v in votes if {v.variant_a, v.variant_b} == {a, b})


def separation_notes(ratings: list[Rating], votes: Sequence[VoteLike]) -> list[str]:
    """Neighbours on the board whose intervals overlap: their order is not settled yet."""
    notes = []
    for upper, lower in zip(ratings, ratings[1:], strict=False):
        if lower.high >= upper.low:
            met = head_to_head(votes, upper.variant, lower.variant)
            notes.append(
                f"{upper.variant} and {lower.variant} are not separated yet: their {CONFIDENCE:.0%} intervals "
                f"overlap ({met} head-to-head vote{'s' if met != 1 else ''}); more votes would settle the order."
            )
    return notes


def win_rates(votes: Sequence[VoteLike]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Observed share of points (a tie half) of each row variant against each column variant,
    and the number of votes behind each cell (NaN where two variants never met)."""
    variants = sorted({v for vote in votes for v in (vote.variant_a, vote.variant_b)})
    at = {v: i for i, v in enumerate(variants)}
    points = np.zeros((len(variants), len(variants)))
    games = np.zeros_like(points)
    for vote in votes:
        i, j = at[vote.variant_a], at[vote.variant_b]
        score = {"a": 1.0, "b": 0.0}.get(vote.outcome, 0.5)
        points[i, j] += score
        points[j, i] += 1.0 - score
        games[i, j] += 1
        games[j, i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(games > 0, points / games, np.nan)
    return variants, rates, games
