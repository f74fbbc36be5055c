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
from playground.ui.monitor_tab import MonitorTab
from playground.ui.router_tab import RouterTab
from playground.ui.session import Sessions

CSS = """
#send-status, #load-status { min-height: 1.5em; }
"""


def build_app(
    engine: Engine, monitor: SystemMonitor, votes: VoteStore, jobs: JobManager, access: Access | None = None
) -> gr.Blocks:
    sessions = Sessions()
    access = access or Access(get_settings())
    with gr.Blocks(title="Variant Playground") as demo:
        gr.Markdown("# Variant Playground\nSmall language models side by side: one prompt, live speed and memory.")
        signed_in = gr.Markdown(elem_id="signed-in")
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                compare = CompareTab(engine, sessions, access)
                compare.build()
            with gr.Tab("Monitor", id="monitor"):
                MonitorTab(monitor).build()
            with gr.Tab("Router", id="router"):
                router = RouterTab(engine, sessions, access, jobs)
                router.build()
            with gr.Tab("Blind", id="blind"):
                ArenaTab(engine, sessions, votes).build()
            with gr.Tab("Jobs", id="jobs"):
                JobsTab(engine, jobs, access).build(
                    [compare.model, *[p.variant for p in compare.panels]], router.router
                )
        demo.load(compare.show_estimate, compare.model, compare.estimate)
        demo.load(access.banner, None, signed_in)
        demo.load(compare.refresh_loaded, None, compare.loaded)  # the list as it is now, not at start-up
    return demo
