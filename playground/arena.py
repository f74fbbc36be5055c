"""Blind comparison votes: stored in SQLite with the whole comparison (prompt, both answers,
both variants, the vote, when, the prompt's tag and the demo session's name), exported and
imported as JSON or CSV so that several sessions' votes can be merged, and turned into ratings
by playground.ratings.

Each vote has a uid: importing a file twice, or a file that holds votes already here, adds
only the votes that are new.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from playground.config import describe_errors
from playground.errors import ConfigError
from playground.ratings import Leaderboard, bradley_terry, style_controlled
from playground.sqlite_store import begin_schema, opened

Outcome = Literal["a", "b", "tie", "both_bad"]
OUTCOMES: tuple[str, ...] = ("a", "b", "tie", "both_bad")
COLUMNS = ("uid", "t", "variant_a", "variant_b", "outcome", "prompt", "answer_a", "answer_b", "tag", "session")
MAX_IMPORT_BYTES = 50 * 2**20


@dataclass(frozen=True)
class Vote:
    variant_a: str
    variant_b: str
    outcome: str
    prompt: str = ""
    answer_a: str = ""
    answer_b: str = ""
    tag: str = ""  # the prompt's category, typed or picked when it was asked
    session: str = ""  # the demo session it was cast in
    t: float = 0.0
    uid: str = ""


class _VoteRow(BaseModel):
    """One imported vote, checked before anything is written."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    variant_a: str = Field(min_length=1)
    variant_b: str = Field(min_length=1)
    outcome: Outcome
    prompt: str = ""
    answer_a: str = ""
    answer_b: str = ""
    tag: str = ""
    session: str = ""
    t: float = 0.0
    uid: str = ""

    @model_validator(mode="after")
    def _two_variants(self) -> _VoteRow:
        if self.variant_a == self.variant_b:
            raise ValueError("a vote needs two different variants")
        return self


class VoteStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            begin_schema(db)
            db.execute(
                "CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, "
                "variant_a TEXT NOT NULL, variant_b TEXT NOT NULL, outcome TEXT NOT NULL, prompt TEXT NOT NULL)"
            )
            # Stores written before votes kept their answers, tags and uids gain the columns.
            have = {row[1] for row in db.execute("PRAGMA table_info(votes)")}
            for column in ("answer_a", "answer_b", "tag", "session", "uid"):
                if column not in have:
                    db.execute(f"ALTER TABLE votes ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            for (row_id,) in db.execute("SELECT id FROM votes WHERE uid = ''").fetchall():
                db.execute("UPDATE votes SET uid = ? WHERE id = ?", (uuid.uuid4().hex, row_id))
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS votes_uid ON votes(uid)")

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return opened(self.path, "the votes database", timeout_s=10)

    def record(
        self,
        variant_a: str,
        variant_b: str,
        outcome: str,
        prompt: str,
        *,
        answer_a: str = "",
        answer_b: str = "",
        tag: str = "",
        session: str = "",
    ) -> Vote:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        if variant_a == variant_b:
            raise ValueError("a vote needs two different variants")
        vote = Vote(variant_a, variant_b, outcome, prompt, answer_a, answer_b, tag.strip(), session.strip(),
                    time.time(), uuid.uuid4().hex)
        with self._lock, self._connect() as db:
            self._insert(db, vote)
        return vote

    @staticmethod
    def _insert(db: sqlite3.Connection, vote: Vote) -> bool:
        values = asdict(vote)
        cursor = db.execute(
            f"INSERT OR IGNORE INTO votes ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [values[c] for c in COLUMNS],
        )
        return cursor.rowcount == 1

    def votes(self, tag: str | None = None) -> list[Vote]:
        """Every vote in the order cast (imported ones where they were added); only `tag`'s if given."""
        query = f"SELECT {', '.join(COLUMNS)} FROM votes"
        args: tuple[str, ...] = ()
        if tag:
            query, args = query + " WHERE tag = ?", (tag,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [Vote(**dict(zip(COLUMNS, row, strict=True))) for row in rows]

    def version(self) -> tuple[int, int]:
        """(votes, highest row id): changes whenever a vote is added, here or by another process."""
        with self._connect() as db:
            count, last = db.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM votes").fetchone()
        return int(count), int(last)

    def tags(self) -> list[str]:
        with self._connect() as db:
            return [t for (t,) in db.execute("SELECT DISTINCT tag FROM votes WHERE tag != '' ORDER BY tag")]

    def leaderboard(self, tag: str | None = None, style: bool = False, n_resamples: int | None = None) -> Leaderboard:
        votes = self.votes(tag)
        if style:
            return style_controlled(votes, **({"n_resamples": n_resamples} if n_resamples else {}))
        return bradley_terry(votes, **({"n_resamples": n_resamples} if n_resamples else {}))

    # -- export and import ------------------------------------------------------------------
    def export_json(self) -> str:
        return json.dumps({"votes": [asdict(v) for v in self.votes()]}, indent=1, ensure_ascii=False)

    def export_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(Vote)])
        writer.writeheader()
        for vote in self.votes():
            writer.writerow(asdict(vote))
        return out.getvalue()

    def import_file(self, path: Path) -> tuple[int, int]:
        """Votes from a JSON or CSV export (this app's form), all checked before any is added.
        Returns (added, already here)."""
        rows = read_votes(path)
        added = 0
        with self._lock, self._connect() as db:
            for row in rows:
                vote = Vote(**row.model_dump() | {"uid": row.uid or uuid.uuid4().hex, "t": row.t or time.time()})
                added += self._insert(db, vote)
        return added, len(rows) - added


def read_votes(path: Path) -> list[_VoteRow]:
    """The votes of an export file, each checked; a bad one is named by its place in the file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_IMPORT_BYTES:
            raise ConfigError(f"{path.name} is larger than {MAX_IMPORT_BYTES // 2**20} MB: not a vote export")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ConfigError(f"{path.name} cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name} is not UTF-8 text") from None
    records: list[Any]
    if text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path.name}: not valid JSON ({err.msg}, line {err.lineno})") from None
        records = data.get("votes") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise ConfigError(f'{path.name}: expected {{"votes": [...]}} or a list of votes')
        where = "vote"
    else:
        try:
            records = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as err:
            raise ConfigError(f"{path.name}: not valid CSV ({err})") from None
        missing = {"variant_a", "variant_b", "outcome"} - set(records[0] if records else {})
        if missing:
            raise ConfigError(f"{path.name}: the CSV has no {', '.join(sorted(missing))} column")
        for record in records:  # CSV has no numbers: an empty time is no time
            record["t"] = record.get("t") or 0.0
        where = "row"
    rows = []
    for number, record in enumerate(records, start=1):
        try:
            rows.append(_VoteRow.model_validate(record))
        except ValidationError as err:
            raise ConfigError(f"{path.name}, {where} {number}: {describe_errors(err)}") from None
    if not rows:
        raise ConfigError(f"{path.name} holds no votes")
    return rows
