"""The Monitor tab: CPU, RAM, each variant's memory and VRAM per GPU, refreshed every second;
below them each remote variant's server (reachable, round trip, queue), looked at every 3 s.

The sampling happens in the engine's SystemMonitor thread; the timer here only draws the
buffer, so it never waits on a generation, and it runs only while the tab is shown.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from playground.monitor import SystemMonitor
from playground.ui.charts import monitor_figure, monitor_summary


class MonitorTab:
    def __init__(self, monitor: SystemMonitor) -> None:
        self.monitor = monitor

    def build(self) -> None:
        gr.Markdown(self.monitor.gpu_note or "NVIDIA GPUs found: VRAM is read through nvml.", elem_id="gpu-note")
        summary = gr.Markdown(elem_id="monitor-summary")
        plot = gr.Plot(elem_id="monitor-plot", show_label=False)
        self.timer = gr.Timer(1.0, active=False)  # the app turns it on while this tab is shown
        self.timer.tick(self.refresh, None, [summary, plot], show_progress="hidden")

    def refresh(self) -> tuple[str, Any]:
        samples = self.monitor.recent()
        return monitor_summary(samples[-1] if samples else None, self.monitor.remote), monitor_figure(samples)
