"""SQLite record of jobs and their events; survives restarts of the app."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from playground.sqlite_store import StoreError, begin_schema, opened

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")


@dataclass
class Job:
    id: str
    kind: str
    options: dict[str, Any]
    state: str
    created: float
    started: float | None
    ended: float | None
    pid: int | None
    error: str | None
    result: dict[str, Any] | None
    step: int
    total: int
    device: str = "cpu"  # where it runs: "cpu", "cuda" (any GPU) or "cuda:N" (its variant is pinned to GPU N)
    gpu_bytes: int = 0  # the GPU memory it needs to start
    gpu: int | None = None  # the GPU it was started on (nvml's index)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def elapsed_s(self, now: float | None = None) -> float | None:
        if self.started is None:
            return None
        return (self.ended or now or time.time()) - self.started

    def eta_s(self, now: float | None = None) -> float | None:
        elapsed = self.elapsed_s(now)
        if self.finished or not elapsed or not self.step or not self.total:
            return None
        return elapsed / self.step * (self.total - self.step)


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, options TEXT NOT NULL, state TEXT NOT NULL,
        created REAL NOT NULL, started REAL, ended REAL, pid INTEGER, error TEXT, result TEXT,
        step INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, t REAL NOT NULL, data TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS events_by_job ON events (job, seq)",
)


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"the jobs folder {self.path.parent} cannot be made: {err.strerror}") from None
        self._lock = threading.Lock()
        with self._db() as db:
            begin_schema(db)
            for statement in SCHEMA:
                db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in (
                ("device", "TEXT NOT NULL DEFAULT 'cpu'"),
                ("gpu_bytes", "INTEGER NOT NULL DEFAULT 0"),
                ("gpu", "INTEGER"),
            ):
                if name not in columns:  # a store written before jobs were placed (on one GPU of several)
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return opened(self.path, "the jobs database")

    def create(self, kind: str, options: dict[str, Any], device: str = "cpu", gpu_bytes: int = 0) -> Job:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        with self._lock, self._db() as db:
            db.execute(
                "INSERT INTO jobs (id, kind, options, state, created, device, gpu_bytes)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                (job_id, kind, json.dumps(options), time.time(), device, gpu_bytes),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._db() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def list(self) -> list[Job]:
        with self._db() as db:
            return [_job(row) for row in db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY created DESC")]

    def update(self, job_id: str, **fields: Any) -> None:
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self._lock, self._db() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def finish_if_running(self, job_id: str, state: str, error: str | None, pid: int | None = None) -> bool:
        """Set a final state unless the job already recorded one itself; True if set. With `pid`,
        only while that process is the job's (a resumed job has a new one)."""
        query = "UPDATE jobs SET state = ?, error = ?, ended = ? WHERE id = ? AND state IN ('queued', 'running')"
        values: tuple[Any, ...] = (state, error, time.time(), job_id)
        if pid is not None:
            query, values = query + " AND pid = ?", (*values, pid)
        with self._lock, self._db() as db:
            return db.execute(query, values).rowcount == 1

    def add_event(self, job_id: str, data: dict[str, Any]) -> None:
        with self._lock, self._db() as db:
            db.execute("INSERT INTO events (job, t, data) VALUES (?, ?, ?)", (job_id, time.time(), json.dumps(data)))
            if "step" in data:
                db.execute(
                    "UPDATE jobs SET step = ?, total = ? WHERE id = ?",
                    (int(data["step"]), int(data.get("total", 0)), job_id),
                )

    def events(self, job_id: str, after: int = 0) -> list[tuple[int, float, dict[str, Any]]]:
        with self._db() as db:
            rows = db.execute(
                "SELECT seq, t, data FROM events WHERE job = ? AND seq > ? ORDER BY seq", (job_id, after)
            ).fetchall()
        return [(seq, t, json.loads(data)) for seq, t, data in rows]


_COLUMNS = "id, kind, options, state, created, started, ended, pid, error, result, step, total, device, gpu_bytes, gpu"


def _job(row: tuple[Any, ...]) -> Job:
    (job_id, kind, options, state, created, started, ended, pid, error, result, step, total, device, gpu_bytes, gpu) = row
    return Job(
        job_id,
        kind,
        json.loads(options),
        state,
        created,
        started,
        ended,
        pid,
        error,
        json.loads(result) if result else None,
        step,
        total,
        device,
        gpu_bytes,
        gpu,
    )
