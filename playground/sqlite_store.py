"""The one way the playground opens its SQLite files (jobs, votes): WAL, a busy timeout for the
several processes that share a store, the connection closed after each use, and any SQLite
failure (a corrupt file, a read-only folder, a full disk) turned into one readable sentence that
names the file."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playground.errors import PlaygroundError


class StoreError(PlaygroundError):
    """A store's SQLite file cannot be read or written."""


@contextmanager
def opened(path: Path, what: str, timeout_s: float = 30.0) -> Iterator[sqlite3.Connection]:
    """A connection to `path` as one transaction: committed on success, rolled back on error,
    closed either way. `what` names the store in messages ("the jobs database").

    Where the folder cannot be written (a read-only mount), the file is opened read-only and as
    immutable, so what it holds can still be read (a WAL store otherwise needs to write its
    shared-memory file even to read); a write then fails with a message that says why."""
    read_only = path.exists() and not os.access(path.parent, os.W_OK)
    try:
        if read_only:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, timeout=timeout_s)
        else:
            db = sqlite3.connect(path, timeout=timeout_s)
    except sqlite3.Error as err:
        raise StoreError(f"{what} {path} cannot be opened: {_why(err, read_only)}") from None
    try:
        with db:
            if not read_only:
                _write_ahead_log(db, timeout_s)
            yield db
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{what} {path} cannot be used: {_why(err, read_only)}") from None
    finally:
        db.close()


def _write_ahead_log(db: sqlite3.Connection, timeout_s: float) -> None:
    """Put the store in WAL mode. Switching a new file can meet another connection's lock, and
    SQLite answers "database is locked" there without its busy handler (seen with eight
    connections opening one new store), so the switch is tried again until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def begin_schema(db: sqlite3.Connection) -> None:
    """Take the store's write lock before reading and changing its schema. Processes that open a
    new store at once (several command lines, say) then set it up one after another, and each
    later one sees the tables and columns the first made instead of adding them again (seen:
    "duplicate column name"). The connection's busy timeout waits for the lock."""
    db.execute("BEGIN IMMEDIATE")


def _why(err: sqlite3.Error, read_only: bool) -> str:
    text = str(err)
    if "not a database" in text or "malformed" in text:
        return f"{text} (the file is damaged: move it aside and a new one is made)"
    if read_only or "readonly" in text or "read-only" in text:
        return f"{text} (the file or its folder cannot be written; it can only be read)"
    if "full" in text:
        return f"{text} (free some disk space)"
    return text
