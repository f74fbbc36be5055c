"""Blind comparison votes: stored in SQLite, turned into Elo-style ratings.

Ratings are recomputed from the whole vote history in order (online Elo, K=32, start 1000), so
they never drift from the votes that are stored. A tie and "both bad" each count half a win for
both sides; "both bad" is counted apart in the table.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from playground.sqlite_store import opened

Outcome = Literal["a", "b", "tie", "both_bad"]
OUTCOMES: tuple[str, ...] = ("a", "b", "tie", "both_bad")
START_RATING = 1000.0
K_FACTOR = 32.0


@dataclass(frozen=True)
class Standing:
    variant: str
    rating: float
    votes: int
    wins: int
    losses: int
    ties: int
    both_bad: int


def elo(votes: list[tuple[str, str, str]]) -> list[Standing]:
    """Standings from (variant_a, variant_b, outcome) in the order the votes were cast."""
    rating: dict[str, float] = {}
    counts: dict[str, list[int]] = {}
    for a, b, outcome in votes:
        for v in (a, b):
            rating.setdefault(v, START_RATING)
            counts.setdefault(v, [0, 0, 0, 0, 0])
        expected_a = 1.0 / (1.0 + 10 ** ((rating[b] - rating[a]) / 400.0))
        score_a = {"a": 1.0, "b": 0.0}.get(outcome, 0.5)
        rating[a] += K_FACTOR * (score_a - expected_a)
        rating[b] += K_FACTOR * ((1.0 - score_a) - (1.0 - expected_a))
        for v, won in ((a, outcome == "a"), (b, outcome == "b")):
            c = counts[v]
            c[0] += 1
            if outcome in ("a", "b"):
                c[1 if won else 2] += 1
            elif outcome == "tie":
                c[3] += 1
            else:
                c[4] += 1
    table = [Standing(v, round(rating[v], 1), *counts[v]) for v in rating]
    return sorted(table, key=lambda s: (-s.rating, s.variant))


class VoteStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, "
                "variant_a TEXT NOT NULL, variant_b TEXT NOT NULL, outcome TEXT NOT NULL, prompt TEXT NOT NULL)"
            )

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return opened(self.path, "the votes database", timeout_s=10)

    def record(self, variant_a: str, variant_b: str, outcome: str, prompt: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        if variant_a == variant_b:
            raise ValueError("a vote needs two different variants")
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT INTO votes (t, variant_a, variant_b, outcome, prompt) VALUES (?, ?, ?, ?, ?)",
                (time.time(), variant_a, variant_b, outcome, prompt),
            )

    def votes(self) -> list[tuple[str, str, str]]:
        with self._connect() as db:
            return db.execute("SELECT variant_a, variant_b, outcome FROM votes ORDER BY id").fetchall()

    def leaderboard(self) -> list[Standing]:
        return elo(self.votes())
