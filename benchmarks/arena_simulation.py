"""Do the arena's ratings recover known strengths, and do their 95% intervals hold the truth
95% of the time? Synthetic votes from a Bradley–Terry model with known Elo-scale strengths.

    .venv/bin/python -m benchmarks.arena_simulation --out benchmarks/results/arena_simulation.json [--runs 40]

Per number of votes: the share of runs whose ranking is exactly the true order, the share of
(run, variant) intervals that hold the true (mean-anchored) rating, the mean interval width, the
mean absolute error of the ratings, and the seconds a fit with its bootstrap takes here. Style
control is checked apart: voters who favour long Markdown answers from a variant that writes
them half the time, equal in substance otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from playground.ratings import INIT_RATING, bradley_terry, style_controlled

TRUTH = {"m1": 1250.0, "m2": 1150.0, "m3": 1100.0, "m4": 1000.0, "m5": 900.0}


@dataclass(frozen=True)
class Vote:
    variant_a: str
    variant_b: str
    outcome: str
    answer_a: str = ""
    answer_b: str = ""


def simulate(n: int, rng: np.random.Generator) -> list[Vote]:
    names = sorted(TRUTH)
    votes = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p_a = 1 / (1 + 10 ** ((TRUTH[b] - TRUTH[a]) / 400))
        votes.append(Vote(a, b, "a" if rng.random() < p_a else "b"))
    return votes


def style_votes(n: int, rng: np.random.Generator) -> list[Vote]:
    long = "## Answer\n" + "- **point** " * 30
    votes = []
    for _ in range(n):
        answers = {"verbose": long if rng.random() < 0.5 else "short answer", "plain": "short answer"}
        a, b = ("verbose", "plain") if rng.random() < 0.5 else ("plain", "verbose")
        p_a = 0.5 + (0.3 if answers[a] == long else -0.3 if answers[b] == long else 0.0)
        votes.append(Vote(a, b, "a" if rng.random() < p_a else "b", answers[a], answers[b]))
    return votes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    mean = np.mean(list(TRUTH.values()))
    target = {k: INIT_RATING + v - mean for k, v in TRUTH.items()}
    order = sorted(TRUTH, key=TRUTH.get, reverse=True)
    rng = np.random.default_rng(2026)
    results: dict = {
        "command": f"python -m benchmarks.arena_simulation --out {args.out} --runs {args.runs} --resamples {args.resamples}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "truth": TRUTH, "by_votes": {},
    }
    for n in (300, 1000, 3000):
        exact, inside, total, widths, errors, seconds = 0, 0, 0, [], [], []
        for _ in range(args.runs):
            votes = simulate(n, rng)
            started = time.perf_counter()
            board = bradley_terry(votes, n_resamples=args.resamples, seed=int(rng.integers(1 << 30)))
            seconds.append(time.perf_counter() - started)
            exact += [r.variant for r in board.ratings] == order
            for r in board.ratings:
                inside += r.low <= target[r.variant] <= r.high
                total += 1
                widths.append(r.high - r.low)
                errors.append(abs(r.rating - target[r.variant]))
        results["by_votes"][n] = {
            "runs": args.runs, "exact_order": exact / args.runs, "coverage_95": inside / total,
            "intervals": total, "mean_width": statistics.mean(widths), "mean_abs_error": statistics.mean(errors),
            "fit_and_bootstrap_s_median": statistics.median(seconds),
        }
        print(n, results["by_votes"][n], flush=True)
    gaps = []
    for _ in range(10):
        votes = style_votes(1500, rng)
        plain = {r.variant: r.rating for r in bradley_terry(votes, n_resamples=100).ratings}
        styled = {r.variant: r.rating for r in style_controlled(votes, n_resamples=100).ratings}
        gaps.append((plain["verbose"] - plain["plain"], styled["verbose"] - styled["plain"]))
    results["style_control"] = {
        "runs": len(gaps), "votes": 1500, "gap_without_control_mean": statistics.mean(g for g, _ in gaps),
        "gap_with_control_mean": statistics.mean(c for _, c in gaps),
        "gap_with_control_sd": statistics.stdev(c for _, c in gaps),
    }
    print(results["style_control"], flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
