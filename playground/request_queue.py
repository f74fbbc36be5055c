"""Fair admission of generation requests to one loaded variant.

A variant is loaded once and shared by every session. Its worker decodes as many requests at once
as the variant's `concurrency` allows; the rest wait here. Waiting requests are admitted round
robin over the sessions that sent them, so one session sending many prompts (four panels of the
same variant, a script) delays another session by at most one request of its own per turn.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Queued:
    """A request waits for its variant: `position` 1 is next in line."""

    position: int
    running: int  # requests the variant is decoding now


@dataclass(eq=False)
class _Ticket:
    session: str
    admitted: bool = False


@dataclass
class FairQueue:
    slots: int
    _running: int = 0
    _waiting: dict[str, deque[_Ticket]] = field(default_factory=dict)
    _rotation: deque[str] = field(default_factory=deque)  # sessions with waiting tickets, next first
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("a queue needs at least one slot")

    def turn(self, session: str, cancel: threading.Event | None = None) -> Generator[Queued, None, bool]:
        """Wait for a slot, yielding a `Queued` each time the position changes (nothing if a slot is
        free at once). Returns True once admitted (the caller then owes a `release()`), False when
        `cancel` was set first. Closing the iterator early withdraws a waiting request."""
        ticket = _Ticket(session)
        with self._lock:
            self._waiting.setdefault(session, deque()).append(ticket)
            if session not in self._rotation:
                self._rotation.append(session)
            self._admit()
        shown: tuple[int, int] | None = None
        handed_over = False
        try:
            while True:
                with self._lock:
                    if ticket.admitted:
                        handed_over = True
                        return True
                    if cancel is not None and cancel.is_set():
                        self._withdraw(ticket)
                        return False
                    now = (self._position(ticket), self._running)
                    if now == shown:
                        self._lock.wait(0.2)
                        continue
                shown = now
                yield Queued(*now)
        finally:
            with self._lock:
                if not ticket.admitted:
                    self._withdraw(ticket)
                elif not handed_over:  # admitted while its waiter was closing: give the slot back
                    self._running -= 1
                    self._admit()

    def release(self) -> None:
        with self._lock:
            self._running -= 1
            self._admit()

    def snapshot(self) -> tuple[int, int]:
        """(running, waiting) now."""
        with self._lock:
            return self._running, sum(len(q) for q in self._waiting.values())

    # -- under the lock ------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._running < self.slots and self._rotation:
            session = self._rotation.popleft()
            tickets = self._waiting[session]
            ticket = tickets.popleft()
            if tickets:
                self._rotation.append(session)  # its next request waits for the others' turn
            else:
                del self._waiting[session]
            ticket.admitted = True
            self._running += 1
        self._lock.notify_all()

    def _withdraw(self, ticket: _Ticket) -> None:
        tickets = self._waiting.get(ticket.session)
        if tickets is not None and ticket in tickets:
            tickets.remove(ticket)
            if not tickets:
                del self._waiting[ticket.session]
                self._rotation.remove(ticket.session)
        self._lock.notify_all()

    def _position(self, ticket: _Ticket) -> int:
        """1-based place in the order the waiting tickets will be admitted: round by round, one
        ticket of each session in rotation order."""
        depth = self._waiting[ticket.session].index(ticket)  # the round it is admitted in
        ahead, after_mine = depth, False
        for session in self._rotation:
            if session == ticket.session:
                after_mine = True
                continue
            # Sessions before its own go first in its round too; those after it only in earlier ones.
            ahead += min(len(self._waiting[session]), depth if after_mine else depth + 1)
        return ahead + 1
