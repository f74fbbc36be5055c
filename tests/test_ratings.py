"""Ratings from votes: checked against a direct maximum-likelihood fit, and by simulation with
known strengths (the order is recovered and the intervals hold the truth at about their rate)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy.optimize import minimize

from playground.ratings import (
    INIT_RATING,
    PRIOR_TIES,
    bradley_terry,
    separation_notes,
    style_controlled,
    style_features,
    win_rates,
)


@dataclass(frozen=True)
class V:
    variant_a: str
    variant_b: str
    outcome: str
    answer_a: str = ""
    answer_b: str = ""


def simulate(truth: dict[str, float], n: int, rng: np.random.Generator, tie_rate: float = 0.0) -> list[V]:
    names = sorted(truth)
    votes = []
    for _ in range(n):
        a, b = (names[i] for i in rng.choice(len(names), 2, replace=False))
        p_a = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
        r = rng.random()
        votes.append(V(a, b, "tie" if r < tie_rate else "a" if rng.random() < p_a else "b"))
    return votes


def anchored(truth: dict[str, float]) -> dict[str, float]:
    mean = np.mean(list(truth.values()))
    return {k: INIT_RATING + v - mean for k, v in truth.items()}


def test_bradley_terry_is_the_maximum_likelihood_fit_with_ties_as_half_wins():
    votes = [V("x", "y", "a")] * 5 + [V("y", "x", "a")] * 2 + [V("x", "z", "tie")] * 3 + [V("z", "y", "b")] * 1
    votes += [V("y", "z", "both_bad"), V("z", "x", "a")]
    names = ["x", "y", "z"]
    # Direct: maximize sum of w·log σ(θ_i − θ_j) over (winner i, loser j, weight w), a tie being half a win each
    # way, plus the prior's one tie for each pair; θ in natural log-odds, then to the Elo scale.
    points = []
    for v in votes:
        a, b = names.index(v.variant_a), names.index(v.variant_b)
        if v.outcome == "a":
            points.append((a, b, 1.0))
        elif v.outcome == "b":
            points.append((b, a, 1.0))
        else:
            points += [(a, b, 0.5), (b, a, 0.5)]
    points += [(i, j, PRIOR_TIES / 2) for i in range(3) for j in range(3) if i != j]

    def negative_log_likelihood(theta: np.ndarray) -> float:
        return -sum(w * -np.logaddexp(0, -(theta[i] - theta[j])) for i, j, w in points)

    theta = minimize(negative_log_likelihood, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    direct = INIT_RATING + 400 / math.log(10) * (theta - theta.mean())
    board = bradley_terry(votes, n_resamples=200)
    fitted = {r.variant: r.rating for r in board.ratings}
    assert [fitted[n] for n in names] == pytest.approx(direct, abs=0.05)
    x = next(r for r in board.ratings if r.variant == "x")
    assert (x.votes, x.wins, x.losses, x.ties) == (11, 5, 3, 3)
    assert all(r.low <= r.rating <= r.high for r in board.ratings)


def test_one_vote_gives_finite_ratings_and_an_open_interval():
    board = bradley_terry([V("a", "b", "a")])
    a, b = board.ratings
    assert a.variant == "a" and math.isfinite(a.rating) and a.rating > b.rating
    assert (a.low, a.high) == (-math.inf, math.inf)  # one vote: nothing to resample
    assert board.notes and "not separated yet" in board.notes[0]


def test_simulated_votes_recover_the_order_and_the_intervals_hold_the_truth_at_about_their_rate():
    truth = {"m1": 1250.0, "m2": 1150.0, "m3": 1100.0, "m4": 1000.0, "m5": 900.0}
    rng = np.random.default_rng(7)
    inside, total = 0, 0
    for _ in range(20):
        votes = simulate(truth, 1500, rng)
        board = bradley_terry(votes, n_resamples=300, seed=int(rng.integers(1 << 30)))
        assert [r.variant for r in board.ratings] == sorted(truth, key=truth.get, reverse=True) or any(
            "not separated yet" in n for n in board.notes
        )
        target = anchored(truth)
        for r in board.ratings:
            inside += r.low <= target[r.variant] <= r.high
            total += 1
    # 100 intervals at 95% (correlated within one simulation through the anchoring): allow
    # about four binomial standard deviations below (200 intervals gave 92% when this was written).
    assert 0.86 <= inside / total <= 1.0, inside / total
    # And with many votes the far ends are separated: no note on m1 against m5 order.
    assert board.ratings[0].variant == "m1" and board.ratings[-1].variant == "m5"


def test_style_control_credits_length_and_markdown_instead_of_the_variant():
    rng = np.random.default_rng(3)
    votes = []
    for _ in range(1500):
        # Equal in substance; "verbose" writes long Markdown half the time, and voters favour long answers.
        verbose_long = rng.random() < 0.5
        long = "## Answer\n" + "- **point** " * 30
        answers = {"verbose": long if verbose_long else "short answer", "plain": "short answer"}
        if rng.random() < 0.5:
            a, b = "verbose", "plain"
        else:
            a, b = "plain", "verbose"
        p_a = 0.5 + (0.3 if answers[a] == long else -0.3 if answers[b] == long else 0.0)
        votes.append(V(a, b, "a" if rng.random() < p_a else "b", answers[a], answers[b]))
    plain = {r.variant: r for r in bradley_terry(votes, n_resamples=100).ratings}
    controlled = style_controlled(votes, n_resamples=100)
    styled = {r.variant: r for r in controlled.ratings}
    gap, controlled_gap = (b["verbose"].rating - b["plain"].rating for b in (plain, styled))
    assert gap > 50  # style shows up as strength...
    assert abs(controlled_gap) < gap / 3, (gap, controlled_gap)  # ...until it is controlled for
    assert plain["verbose"].low > plain["plain"].high  # plainly apart without style control
    assert sum(controlled.style_coefficients.values()) > 50 and controlled.method.endswith("style control")


def test_style_features_count_length_and_markdown():
    text = "# Title\n\nSome **bold** and __more__ words.\n\n- one\n- two\n1. first\n## Sub"
    assert style_features(text) == {"length": 15.0, "headers": 2.0, "list_items": 3.0, "bold": 2.0}


def test_win_rates_count_ties_as_half_and_leave_unmet_pairs_empty():
    votes = [V("a", "b", "a"), V("b", "a", "tie"), V("a", "b", "b"), V("b", "c", "a")]
    names, rates, games = win_rates(votes)
    assert names == ["a", "b", "c"]
    assert rates[0, 1] == pytest.approx(1.5 / 3) and rates[1, 0] == pytest.approx(1.5 / 3)
    assert rates[1, 2] == 1.0 and rates[2, 1] == 0.0 and games[0, 1] == 3
    assert math.isnan(rates[0, 2]) and games[0, 2] == 0


def test_neighbours_with_overlapping_intervals_are_named():
    from playground.ratings import Rating

    ratings = [Rating("a", 1100, 1050, 1150), Rating("b", 1080, 1020, 1120), Rating("c", 900, 850, 950)]
    notes = separation_notes(ratings, [V("a", "b", "a"), V("b", "a", "b")])
    assert len(notes) == 1 and notes[0].startswith("a and b are not separated yet") and "2 head-to-head votes" in notes[0]
