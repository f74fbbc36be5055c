"""Builds the whole page from its tabs; each tab is its own module and calls the engine only."""

from __future__ import annotations

import gradio as gr

from playground.arena import VoteStore
from playground.engine import Engine
from playground.jobs.manager import JobManager
from playground.monitor import SystemMonitor
from playground.settings import get_settings
from playground.ui.access import Access
from playground.ui.arena_tab import ArenaTab
from playground.ui.compare_tab import CompareTab
from playground.ui.jobs_tab import JobsTab
from playground.ui.live import LivePage, LiveState
from playground.ui.monitor_tab import MonitorTab
from playground.ui.router_tab import RouterTab
from playground.ui.session import Sessions

CSS = """
#send-status, #load-status { min-height: 1.5em; }
progress.load-progress { width: 8em; vertical-align: middle; }
/* Panels are at least 520 px wide (four wrap into two rows), so a variant's name and state
   stay readable in its picker. */
[id^=panel-][id$=-variant] input { text-overflow: ellipsis; }
/* Token and diff views: tokens side by side, whitespace kept, the numbers in each tooltip. */
.token-view { font-family: ui-monospace, monospace; font-size: 0.85em; line-height: 1.9; white-space: pre-wrap; }
.token-view .tok { padding: 1px 0; border-right: 1px solid #fff; cursor: help; }
.token-view .tok.disagrees { text-decoration: underline wavy #b00; }
.token-note { font-size: 0.8em; color: #666; }
table.matrix { border-collapse: collapse; font-size: 0.85em; }
table.matrix th, table.matrix td { border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; max-width: 28em; }
table.matrix .answer { white-space: pre-wrap; }
table.matrix .cell-metrics { color: #666; font-size: 0.85em; margin-top: 2px; }
.word-diff del { background: #fdd; } .word-diff ins { background: #dfd; text-decoration: none; }
"""


def build_app(
    engine: Engine, monitor: SystemMonitor, votes: VoteStore, jobs: JobManager, access: Access | None = None
) -> gr.Blocks:
    sessions = Sessions()
    access = access or Access(get_settings())
    live = LivePage(LiveState(engine), sessions)
    with gr.Blocks(title="Variant Playground") as demo:
        gr.Markdown("# Variant Playground\nSmall language models side by side: one prompt, live speed and memory.")
        signed_in = gr.Markdown(elem_id="signed-in")
        with gr.Tabs():
            with gr.Tab("Compare", id="compare") as compare_tab:
                compare = CompareTab(engine, sessions, access)
                compare.build()
            with gr.Tab("Monitor", id="monitor") as monitor_tab:
                monitor_view = MonitorTab(monitor)
                monitor_view.build()
            with gr.Tab("Router", id="router") as router_tab:
                router = RouterTab(engine, sessions, access, jobs)
                router.build()
            with gr.Tab("Blind", id="blind") as blind_tab:
                arena = ArenaTab(engine, sessions, votes)
                arena.build()
            with gr.Tab("Jobs", id="jobs") as jobs_tab:
                jobs_view = JobsTab(engine, jobs, access, sessions)
                jobs_view.build([compare.model, *[p.variant for p in compare.panels]], router.router)
        for view in (compare, router, arena, jobs_view):
            view.follow_live(live)
        # The Monitor's charts are drawn only while its tab is shown.
        monitor_tab.select(lambda: gr.Timer(active=True), None, monitor_view.timer)
        for tab in (compare_tab, router_tab, blind_tab, jobs_tab):
            tab.select(lambda: gr.Timer(active=False), None, monitor_view.timer)
        demo.load(compare.show_estimate, compare.model, compare.estimate)
        demo.load(access.banner, None, signed_in)
        demo.load(
            compare.opening,
            None,
            [compare.n_panels, compare.mode, compare.prompt, *[p.variant for p in compare.panels], compare.notice],
        )
        # One loop per page keeps every view of the engine's state current (ui.live).
        live.attach(demo)
    return demo
