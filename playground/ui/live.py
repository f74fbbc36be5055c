"""What the engine and the jobs store know, on every open page within about a second.

Each page runs one loop (an async generator started by the page's load event, ended by Gradio
when the page goes away). Every `LOOK_S` it asks each tab's live parts for their current view
and sends only the outputs whose view changed, so an idle page costs a few reads and the browser
nothing. The reads themselves are shared: `LiveState` takes one snapshot of the variants at most
every `LOOK_S`, however many pages are open.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from playground.capabilities import capabilities
from playground.engine import Engine, VariantStatus
from playground.errors import PlaygroundError
from playground.memory import weights_size
from playground.ui.session import Session, Sessions

LOOK_S = 0.4
GB = 1e9


@dataclass(frozen=True)
class VariantView:
    """One variant as the pages show it."""

    id: str
    name: str
    state: str  # not loaded / loading / ready / failed / dead / hung
    error: str | None
    on_disk: bool
    remote: bool
    size_bytes: int | None  # of its weights, on disk or to download, when known
    loading_s: float | None
    expected_load_s: float | None
    download_bytes: int | None = None
    download_total: int | None = None


class LiveState:
    """Snapshots of the variants' states, shared by every page and taken at most every `look_s`."""

    def __init__(self, engine: Engine, look_s: float = LOOK_S) -> None:
        self.engine = engine
        self.look_s = look_s
        self._lock = threading.Lock()
        self._taken = 0.0
        self._views: dict[str, VariantView] = {}
        self._sizes: dict[str, int | None] = {}

    def variants(self) -> dict[str, VariantView]:
        with self._lock:
            if time.monotonic() - self._taken >= self.look_s:
                self._views = {v: self._view(self.engine.status(v)) for v in self.engine.catalogue}
                self._taken = time.monotonic()
            return self._views

    def _view(self, status: VariantStatus) -> VariantView:
        config = status.config
        return VariantView(
            id=config.id,
            name=config.display_name,
            state=status.state,
            error=status.error,
            on_disk=status.weights_present,
            remote=capabilities(config.backend).remote,
            size_bytes=self._size(config.id, status.weights_present),
            loading_s=status.loading_s,
            expected_load_s=status.expected_load_s,
            download_bytes=status.download_bytes,
            download_total=status.download_total,
        )

    def _size(self, variant_id: str, present: bool) -> int | None:
        key = f"{variant_id}:{present}"  # read again once the weights arrive
        if key not in self._sizes:
            try:
                self._sizes[key] = weights_size(self.engine.catalogue.get(variant_id))
            except (PlaygroundError, OSError, ValueError):
                self._sizes[key] = None
        return self._sizes[key]


def state_mark(view: VariantView) -> str:
    """A variant's state in a few words, for pickers."""
    if view.state == "ready":
        return "● ready"
    if view.state == "loading":  # no seconds here: a picker redrawn every second is hard to use
        return "◌ loading"
    if view.state in ("failed", "dead", "hung"):
        return f"⚠ {view.state}"
    if view.remote:
        return "remote server"
    if view.on_disk:
        return "on disk"
    size = f" (~{view.size_bytes / GB:.1f} GB)" if view.size_bytes else ""
    return f"needs a download{size}"


def picker_choices(views: dict[str, VariantView], ids: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Dropdown choices for `ids` (default: every variant), in that order: the variant's name
    with its state; the value stays its id."""
    return [(f"{views[v].name} · {state_mark(views[v])}", v) for v in (views if ids is None else ids) if v in views]


# A live part: the outputs it owns and, per page, the view of each: a key to compare, and the
# update to send when the key changed (or a function making it, for views costly to build).
Render = Callable[[Session, dict[str, VariantView]], list[tuple[Hashable, Any]]]


@dataclass
class LivePart:
    outputs: list[gr.components.Component]
    render: Render


class LivePage:
    """One loop per open page over every tab's live parts. Gradio counts each running event
    against one cap for the whole server (its `max_threads`, 40 by default) and starts nothing
    new while the cap is reached: a loop per part (14 of them) let three open pages stop every
    Send in the app (e2e, 2026-11-30). A part whose view did not change gets an empty update,
    which Gradio skips; a page that sees no change for `HEARTBEAT_S` still gets one empty
    frame, because Gradio notices a closed page only when its loop yields."""

    HEARTBEAT_S = 5.0

    def __init__(self, state: LiveState, sessions: Sessions) -> None:
        self.state = state
        self.sessions = sessions
        self.parts: list[LivePart] = []

    def add(self, outputs: list[gr.components.Component], render: Render) -> None:
        self.parts.append(LivePart(outputs, render))

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [output for part in self.parts for output in part.outputs]

    def attach(self, demo: gr.Blocks) -> None:
        """Start the page's loop when it loads (inside the Blocks context)."""
        ids = [id(output) for output in self.outputs]
        assert len(ids) == len(set(ids)), "a component belongs to one live part only"
        demo.load(self._follow, None, self.outputs, show_progress="hidden", concurrency_limit=None)

    def changes(
        self, part: LivePart, session: Session, sent: list[Hashable]
    ) -> tuple[list[Any] | None, list[Hashable]]:
        """The updates of `part` for the views that changed since `sent` (None: nothing
        changed), and the keys now shown."""
        views = part.render(session, self.state.variants())
        assert len(views) == len(part.outputs), "a live part renders one view per output"
        changed = [key != before for (key, _), before in zip(views, sent, strict=True)]
        if not any(changed):
            return None, sent
        updates = [
            (update() if callable(update) else update) if c else gr.update()
            for (_, update), c in zip(views, changed, strict=True)
        ]
        return updates, [key for key, _ in views]

    def page_changes(
        self, session: Session, sent: list[list[Hashable]]
    ) -> tuple[list[Any] | None, list[list[Hashable]]]:
        """Every part's updates, in `outputs` order (None: nothing changed anywhere). A part
        whose look fails is left as it was and tried again at the next look."""
        updates: list[Any] = []
        now_sent: list[list[Hashable]] = []
        any_change = False
        for part, before in zip(self.parts, sent, strict=True):
            try:
                part_updates, keys = self.changes(part, session, before)
            except Exception as err:  # a failed look (a store being replaced) is tried again
                print(f"live view: {err.__class__.__name__}: {err}", file=sys.stderr, flush=True)
                part_updates, keys = None, before
            any_change = any_change or part_updates is not None
            updates += part_updates or [gr.update()] * len(part.outputs)
            now_sent.append(keys)
        return (updates if any_change else None), now_sent

    async def _follow(self, request: gr.Request) -> AsyncIterator[list[Any]]:
        """Gradio ends it when the page closes. The looking runs in a thread, so the server's
        event loop never waits on it."""
        session = self.sessions.get(request)
        sent: list[list[Hashable]] = [[object()] * len(part.outputs) for part in self.parts]  # nothing sent yet
        last_sent = time.monotonic()
        while True:
            updates, sent = await asyncio.to_thread(self.page_changes, session, sent)
            if updates is None and time.monotonic() - last_sent >= self.HEARTBEAT_S:
                updates = [gr.update()] * len(self.outputs)
            if updates is not None:
                yield updates
                last_sent = time.monotonic()
            await asyncio.sleep(self.state.look_s)
