"""What each browser session keeps: chat histories, Stop switches, reply history, blind pairs.

Loaded variants are shared by everyone; these are not. Sessions are keyed by Gradio's session
hash and held by the app object built in ui.app (no module-global state).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from playground.export import Comparison, Turn
from playground.ui.charts import ReplyPoint

MAX_PANELS = 4


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class Session:
    key: str = "local"  # Gradio's session hash: this session's turn in the variants' fair queues
    histories: list[list[dict[str, str]]] = field(default_factory=lambda: [[] for _ in range(MAX_PANELS)])
    # Every turn of each panel (completion prompts and failed answers too), for export and save.
    turns: list[list[Turn]] = field(default_factory=lambda: [[] for _ in range(MAX_PANELS)])
    cancels: list[threading.Event] = field(default_factory=lambda: [threading.Event() for _ in range(MAX_PANELS)])
    points: list[ReplyPoint] = field(default_factory=list)
    replies: int = 0
    # Set while no prompt is being answered: a second one is refused, never interleaved, and
    # Clear waits for the answer it stops to send its last frame.
    idle: threading.Event = field(default_factory=_set_event)
    replaced: int = 0  # panels emptied or loaded: an answer this stopped leaves them the status line
    last: Comparison | None = None
    # Blind comparison: the hidden pair (A, B), the prompt asked, and whether it was voted on.
    arena_pair: tuple[str, str] | None = None
    arena_prompt: str = ""
    arena_voted: bool = False
    arena_answers: tuple[str, str] = ("", "")  # kept with the vote
    arena_tag: str = ""  # the category of the prompt asked
    board_tag: str = ""  # the leaderboard's category filter ("" = all votes)
    board_style: bool = False  # the leaderboard with style control
    router_trail: list[str] = field(default_factory=list)  # rows of the Router tab's decision table
    router_id: str | None = None  # the router picked in the Router tab (its state is shown live)
    router_cancel: threading.Event = field(default_factory=threading.Event)  # Stop for the routed answer
    eval_cancel: threading.Event = field(default_factory=threading.Event)  # Cancel for the in-page eval
    selected_job: str | None = None  # the Jobs tab's chosen job (None: the newest)
    submitted_job: str | None = None  # the last job started from this page: its start message follows it
    arena_cancels: list[threading.Event] = field(default_factory=lambda: [threading.Event(), threading.Event()])
    arena_idle: threading.Event = field(default_factory=_set_event)  # set while no blind round is being answered
    arena_round: int = 0  # pairs drawn: a round's answers stop drawing once a new pair replaced it
    token_view: bool = False  # each answer also drawn token by token, with probabilities


class Sessions:
    def __init__(self) -> None:
        self._by_hash: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, request: Any) -> Session:
        key = getattr(request, "session_hash", None) or "local"
        with self._lock:
            return self._by_hash.setdefault(key, Session(key=key))
