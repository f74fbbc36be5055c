"""Run one prompt on several variants at once and watch them as one stream of snapshots.

Each panel's request runs in its own thread (loading the variant first if needed); the caller
gets a snapshot of every panel at most every `interval_s`, so a fast model cannot flood the
browser, while the tokens/s figures still come from the worker's own timing. The pace is set
by the browser's cost per frame, not by the model: Gradio's page refreshes the loading state of
every component that any event has touched with each frame it gets, so a page that has run many
events spends tens of milliseconds on one frame (a used page in the browser tests: 76% of a
core at 10 frames/s during a blind round, and it fell behind on a slower machine). A panel's Stop
sets its cancel event: only that request ends, at once, and the others stream on.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from playground.backends.base import Request, ScoredToken
from playground.engine import Engine, VariantStatus
from playground.errors import PlaygroundError, WorkerDied, WorkerHung
from playground.metrics import GenerationMetrics
from playground.request_queue import Queued
from playground.workers import Finished, Started, TextDelta

PanelStatus = Literal["waiting", "loading", "queued", "streaming", "done", "cancelled", "failed"]


@dataclass
class PanelRun:
    panel: int
    variant_id: str
    request: Request
    cancel: threading.Event = field(default_factory=threading.Event)
    status: PanelStatus = "waiting"
    text: str = ""
    metrics: GenerationMetrics | None = None
    error: str | None = None
    worker_lost: bool = False  # the worker died or hung: the panel offers a reload
    loading: VariantStatus | None = None  # while its variant loads: elapsed time, download
    session: str = "local"  # whose turn this is in the variant's fair queue
    queue_position: int | None = None  # while queued: 1 is next
    # Once finished, where the backend has them: what the token view scores.
    prompt_ids: tuple[int, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    scored: tuple[ScoredToken, ...] | None = None  # a server's own token probabilities

    @property
    def finished(self) -> bool:
        return self.status in ("done", "cancelled", "failed")


def _drive(engine: Engine, run: PanelRun, changed: threading.Event) -> None:
    try:
        for loading in engine.loading(run.variant_id):
            run.status, run.loading = "loading", loading
            changed.set()
            if run.cancel.is_set():  # Stop while it loads: this panel gives up, the load goes on
                return
        run.status, run.loading = "streaming", None
        changed.set()
        for event in engine.generate(run.variant_id, run.request, run.cancel, session=run.session):
            if isinstance(event, Queued):
                run.status, run.queue_position = "queued", event.position
            elif isinstance(event, Started):
                run.status, run.queue_position = "streaming", None
            elif isinstance(event, TextDelta):
                run.text += event.text
            elif isinstance(event, Finished):
                run.text, run.metrics = event.text, event.metrics
                run.prompt_ids, run.token_ids, run.scored = event.prompt_ids, event.token_ids, event.scored
                run.status = "cancelled" if event.metrics.finish_reason in ("cancelled", "unloaded") else "done"
            changed.set()
    except (WorkerDied, WorkerHung) as err:
        run.status, run.error, run.worker_lost = "failed", str(err), True
    except PlaygroundError as err:
        run.status, run.error = "failed", str(err)
    except Exception as err:  # shown in the panel, never as a traceback
        run.status, run.error = "failed", f"unexpected {err.__class__.__name__}: {err}"
    finally:
        if not run.finished:
            run.status = "cancelled" if run.cancel.is_set() else "done"
        changed.set()


FRAME_S = 0.25


def stream_panels(engine: Engine, runs: list[PanelRun], interval_s: float = FRAME_S) -> Iterator[list[PanelRun]]:
    """Yield copies of all runs as they progress, the last copy once every run has finished."""
    changed = threading.Event()
    threads = [threading.Thread(target=_drive, args=(engine, run, changed), daemon=True) for run in runs]
    for thread in threads:
        thread.start()
    last = 0.0
    while any(thread.is_alive() for thread in threads):
        changed.wait(interval_s)
        now = time.monotonic()
        if now - last >= interval_s:
            changed.clear()
            last = now
            yield [dataclasses.replace(run) for run in runs]
    yield [dataclasses.replace(run) for run in runs]
