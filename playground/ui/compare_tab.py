"""The Compare tab: load variants, send one prompt to 1-4 of them, watch them stream side by side.

Panels are built from a list; one handler streams every panel at once (ui.streaming), and each
panel's Stop ends only its own request. Metrics sit under every answer and feed the charts.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from playground.capabilities import capabilities
from playground.engine import Engine
from playground.export import Answer, Comparison
from playground.ui.access import Access
from playground.ui.charts import ReplyPoint, comparison_figure
from playground.ui.formatting import error_text, loaded_markdown, metrics_line, ordinal
from playground.ui.session import MAX_PANELS, Session, Sessions
from playground.ui.streaming import PanelRun, stream_panels

SETTINGS = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed")
DEFAULT_PANELS = ("smollm2-135m-gguf", "smollm2-135m-transformers")


def settings_widgets(prefix: str) -> list[gr.components.Component]:
    """The six generation settings; empty means 'the variant's own default'."""
    return [
        gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature", elem_id=f"{prefix}-temperature"),
        gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p", elem_id=f"{prefix}-top_p"),
        gr.Slider(0, 200, value=40, step=1, label="top-k (0: off)", elem_id=f"{prefix}-top_k"),
        gr.Slider(1, 2048, value=256, step=1, label="max new tokens", elem_id=f"{prefix}-max_new_tokens"),
        gr.Slider(0.8, 2.0, value=1.0, step=0.01, label="repetition penalty", elem_id=f"{prefix}-repetition_penalty"),
        gr.Number(value=None, precision=0, label="seed (empty: random)", elem_id=f"{prefix}-seed"),
    ]


@dataclass
class Panel:
    column: gr.Column
    variant: gr.Dropdown
    chatbot: gr.Chatbot
    metrics: gr.Markdown
    stop: gr.Button
    reload: gr.Button
    override: gr.Checkbox
    settings: list[gr.components.Component]


def _chat_view(history: list[dict[str, str]], user: str, text: str, status: str) -> list[dict[str, str]]:
    shown = text + ("▌" if status == "streaming" else "")
    return [*history, {"role": "user", "content": user}, {"role": "assistant", "content": shown}]


def _panel_status(run: PanelRun) -> str:
    if run.status == "loading":
        return f"Loading {run.variant_id}… {time.monotonic() - (run.load_started or time.monotonic()):.0f} s"
    if run.status == "failed":
        tail = " — the worker is gone: press Reload" if run.worker_lost else ""
        return f"⚠ {run.error}{tail}"
    if run.metrics is not None:
        return metrics_line(run.metrics)
    if run.status == "queued":
        return (
            f"⏳ queued for {run.variant_id}: {ordinal(run.queue_position or 1)} in line (other sessions are using it)"
        )
    if run.status == "streaming":
        return "streaming…"
    return "waiting for the variant…" if run.status == "waiting" else run.status


class CompareTab:
    def __init__(self, engine: Engine, sessions: Sessions, access: Access) -> None:
        self.engine = engine
        self.sessions = sessions
        self.access = access
        self.panels: list[Panel] = []

    # -- building ------------------------------------------------------------------------
    def choices(self) -> list[tuple[str, str]]:
        return [(c.display_name, c.id) for c in self.engine.catalogue.configs.values()]

    def build(self) -> None:
        engine = self.engine
        with gr.Accordion("Variants", open=True):
            with gr.Row():
                self.model = gr.Dropdown(
                    self.choices(), value=DEFAULT_PANELS[0], label="Variant", elem_id="model", scale=3
                )
                load = gr.Button("Load", elem_id="load", scale=1)
                unload = gr.Button("Unload", elem_id="unload", scale=1)
            self.estimate = gr.Markdown(elem_id="estimate")
            self.load_status = gr.Markdown(elem_id="load-status")
            self.loaded = gr.Markdown(loaded_markdown(engine), elem_id="loaded")
            with gr.Accordion("Add a variant from a local path", open=False):
                with gr.Row():
                    path = gr.Textbox(label="GGUF file, HF model folder or state_dict", elem_id="add-path", scale=4)
                    fmt = gr.Dropdown(
                        ["auto", "chat_template", "alpaca", "raw"],
                        value="auto",
                        label="prompt format",
                        elem_id="add-format",
                        scale=1,
                    )
                    add = gr.Button("Add", elem_id="add", scale=1)
                add_status = gr.Markdown(elem_id="add-status")

        with gr.Row():
            self.n_panels = gr.Slider(1, MAX_PANELS, value=2, step=1, label="panels", elem_id="n-panels", scale=1)
            self.mode = gr.Radio(
                ["chat", "completion"],
                value="chat",
                label="mode",
                elem_id="mode",
                scale=1,
                info="completion sends raw text (Alpaca variants wrap it in their format)",
            )
        with gr.Accordion("Generation settings (all panels)", open=False):
            with gr.Row():
                self.shared = settings_widgets("shared")
        with gr.Row():
            for i in range(MAX_PANELS):
                self.panels.append(self._build_panel(i))
        self.prompt = gr.Textbox(
            label="Prompt", lines=3, elem_id="prompt", placeholder="One prompt, sent to every panel (Shift+Enter sends)"
        )
        with gr.Row():
            self.send = gr.Button("Send", variant="primary", elem_id="send")
            clear = gr.Button("Clear", elem_id="clear")
            export = gr.Button("Export comparison", elem_id="export")
        self.status = gr.Markdown(elem_id="send-status")
        self.notice = gr.Markdown(elem_id="send-notice")
        with gr.Row():
            export_md = gr.File(label="Markdown", elem_id="export-md", visible=False, height=80)
            export_json = gr.File(label="JSON", elem_id="export-json", visible=False, height=80)
        self.plot = gr.Plot(label="Comparison of the last replies", elem_id="comparison-plot")

        # -- wiring ----------------------------------------------------------------------
        self.model.change(self.show_estimate, self.model, self.estimate)
        load.click(self.load, self.model, [self.load_status, self.loaded])
        unload.click(self.unload, self.model, [self.load_status, self.loaded])
        add.click(self.add_path, [path, fmt], [add_status, self.model, *[p.variant for p in self.panels]])
        self.n_panels.change(
            lambda n: [gr.update(visible=i < n) for i in range(MAX_PANELS)],
            self.n_panels,
            [p.column for p in self.panels],
        )
        inputs = [self.prompt, self.mode, self.n_panels, *self.shared]
        for p in self.panels:
            inputs += [p.variant, p.override, *p.settings]
        outputs = [self.send, self.status, self.notice, self.loaded, self.plot]
        for p in self.panels:
            outputs += [p.chatbot, p.metrics, p.reload]
        self.send.click(self.run, inputs, outputs)
        self.prompt.submit(self.run, inputs, outputs)
        clear.click(self.clear, None, [p.chatbot for p in self.panels] + [p.metrics for p in self.panels])
        export.click(self.export, None, [export_md, export_json, self.status])
        # The engine's state (loading, ready, hung, dead) reaches the list within a second.
        for i, p in enumerate(self.panels):
            p.stop.click(self._stopper(i), None, None, queue=False)
            p.reload.click(self._reloader(i), p.variant, [p.metrics, p.reload, self.loaded])

    def _build_panel(self, i: int) -> Panel:
        default = DEFAULT_PANELS[i] if i < len(DEFAULT_PANELS) else None
        with gr.Column(visible=i < 2, elem_id=f"panel-{i}", min_width=280) as column:
            variant = gr.Dropdown(self.choices(), value=default, label=f"Panel {i + 1}", elem_id=f"panel-{i}-variant")
            chatbot = gr.Chatbot(height=320, show_label=False, elem_id=f"panel-{i}-chat", feedback_options=None)
            metrics = gr.Markdown(elem_id=f"panel-{i}-metrics")
            with gr.Row():
                stop = gr.Button("Stop", size="sm", elem_id=f"panel-{i}-stop")
                reload = gr.Button("Reload", size="sm", visible=False, elem_id=f"panel-{i}-reload")
            with gr.Accordion("Settings for this panel", open=False):
                override = gr.Checkbox(False, label="override the shared settings", elem_id=f"panel-{i}-override")
                settings = settings_widgets(f"panel-{i}")
        return Panel(column, variant, chatbot, metrics, stop, reload, override, settings)

    # -- variants --------------------------------------------------------------------------
    def refresh_loaded(self) -> str:
        return loaded_markdown(self.engine)

    def show_estimate(self, variant_id: str | None) -> str:
        if not variant_id:
            return ""
        try:
            return f"Before loading: {self.engine.estimate(variant_id).describe()}"
        except Exception as err:  # an estimate must never break the page
            return error_text(err)

    def load(self, variant_id: str | None, request: gr.Request) -> Iterator[tuple[str, str]]:
        if refusal := self.access.refusal(request, "load variants"):
            yield refusal, loaded_markdown(self.engine)
            return
        if not variant_id:
            yield "Pick a variant first.", loaded_markdown(self.engine)
            return
        started = time.monotonic()
        try:
            worker = self.engine.start_load(variant_id)
            while not worker.settled(0.5):
                yield f"⏳ Loading {variant_id}… {time.monotonic() - started:.0f} s", loaded_markdown(self.engine)
            info = self.engine.load(variant_id)
            yield (
                f"✅ {variant_id} loaded in {info.load_s:.1f} s ({info.backend}, {info.device}, {info.dtype})"
                + (f" · {info.decode}" if info.decode else ""),
                loaded_markdown(self.engine),
            )
        except Exception as err:
            yield error_text(err), loaded_markdown(self.engine)

    def unload(self, variant_id: str | None, request: gr.Request) -> tuple[str, str]:
        if refusal := self.access.refusal(request, "unload variants"):
            return refusal, loaded_markdown(self.engine)
        if variant_id:
            self.engine.unload(variant_id)
        return (f"{variant_id} unloaded." if variant_id else ""), loaded_markdown(self.engine)

    def add_path(self, path: str, fmt: str, request: gr.Request) -> list[Any]:
        unchanged = [gr.update()] * (1 + MAX_PANELS)
        if refusal := self.access.refusal(request, "add variants"):
            return [refusal, *unchanged]
        if not path or not path.strip():
            return ["⚠ Type the path of a GGUF file, an HF model folder or a state_dict.", *unchanged]
        try:
            overrides = {} if fmt == "auto" else {"prompt_format": fmt}
            config = self.engine.catalogue.add_path(path.strip(), **overrides)
        except Exception as err:
            return [error_text(err), *unchanged]
        choices = self.choices()
        return [
            f"✅ Added {config.display_name} ({config.backend}) as `{config.id}`.",
            gr.update(choices=choices, value=config.id),
            *[gr.update(choices=choices)] * MAX_PANELS,
        ]

    # -- generation ------------------------------------------------------------------------
    def _stopper(self, i: int):
        def stop(request: gr.Request) -> None:
            self.sessions.get(request).cancels[i].set()

        return stop

    def _reloader(self, i: int):
        def reload(variant_id: str | None, request: gr.Request) -> Iterator[tuple[Any, Any, str]]:
            if refusal := self.access.refusal(request, "reload variants"):
                yield refusal, gr.update(), loaded_markdown(self.engine)
                return
            if not variant_id:
                yield "Pick a variant for this panel.", gr.update(), loaded_markdown(self.engine)
                return
            self.engine.unload(variant_id)
            yield f"Reloading {variant_id}…", gr.update(visible=False), loaded_markdown(self.engine)
            try:
                info = self.engine.load(variant_id)
                yield f"Reloaded in {info.load_s:.1f} s.", gr.update(visible=False), loaded_markdown(self.engine)
            except Exception as err:
                yield error_text(err), gr.update(visible=True), loaded_markdown(self.engine)

        return reload

    def _requests(self, session: Session, prompt: str, mode: str, n: int, values: tuple[Any, ...]) -> list[Any]:
        """One entry per active panel: a PanelRun, or the error text that prevents one."""
        shared = dict(zip(SETTINGS, values[: len(SETTINGS)], strict=True))
        per_panel = len(SETTINGS) + 2
        runs: list[Any] = []
        for i in range(n):
            chunk = values[len(SETTINGS) + i * per_panel : len(SETTINGS) + (i + 1) * per_panel]
            variant_id, override, own = chunk[0], chunk[1], dict(zip(SETTINGS, chunk[2:], strict=True))
            if not variant_id:
                runs.append("Pick a variant for this panel.")
                continue
            params = own if override else shared
            params = {
                k: (int(v) if k in ("top_k", "max_new_tokens", "seed") and v is not None else v)
                for k, v in params.items()
            }
            session.cancels[i] = threading.Event()
            try:
                messages = [*session.histories[i], {"role": "user", "content": prompt}]
                request = self.engine.request(variant_id, prompt=prompt, messages=messages, mode=mode, **params)
                runs.append(PanelRun(i, variant_id, request, cancel=session.cancels[i], session=session.key))
            except Exception as err:
                runs.append(error_text(err))
        return runs

    def run(self, request: gr.Request, prompt: str, mode: str, n: float, *values: Any) -> Iterator[list[Any]]:
        session = self.sessions.get(request)
        n = int(n)
        if not prompt or not prompt.strip():
            yield self._notice("⚠ Type a prompt first.")
            return
        if session.busy:
            yield self._notice("⚠ Still answering the last prompt: wait for it, or press Stop in its panels.")
            return
        session.busy = True
        try:
            yield from self._run(session, prompt, mode, n, values)
        finally:
            session.busy = False

    def _notice(self, text: str) -> list[Any]:
        """Outputs that change nothing but the notice line."""
        return [gr.update(), gr.update(), text, gr.update(), gr.update()] + [gr.update()] * (3 * MAX_PANELS)

    def _run(self, session: Session, prompt: str, mode: str, n: int, values: tuple[Any, ...]) -> Iterator[list[Any]]:
        entries = self._requests(session, prompt, mode, n, values)
        runs = [e for e in entries if isinstance(e, PanelRun)]
        started = time.monotonic()

        def frame(snapshot: list[PanelRun], final: bool) -> list[Any]:
            by_panel = {r.panel: r for r in snapshot}
            busy = not final
            local = sum(
                1 for r in snapshot if not capabilities(self.engine.catalogue.configs[r.variant_id].backend).remote
            )
            note = " · panels on one machine share its CPU/GPU, so each runs slower than alone" if local > 1 else ""
            head = [
                gr.update(interactive=not busy, value="Generating…" if busy else "Send"),
                f"{'⏳ ' if busy else ''}{len(runs)} panel(s), {time.monotonic() - started:.1f} s{note}",
                gr.update() if busy else "",
                loaded_markdown(self.engine) if final else gr.update(),
                gr.update(),
            ]
            cells: list[Any] = []
            for i in range(MAX_PANELS):
                if i >= n:
                    cells += [gr.update(), gr.update(), gr.update()]
                elif i in by_panel:
                    r = by_panel[i]
                    cells += [
                        _chat_view(session.histories[i], prompt, r.text, r.status),
                        _panel_status(r),
                        gr.update(visible=r.worker_lost),
                    ]
                else:
                    cells += [gr.update(), f"⚠ {entries[i].removeprefix('⚠ ')}", gr.update()]
            return head + cells

        snapshot: list[PanelRun] = []
        for snapshot in stream_panels(self.engine, runs):
            yield frame(snapshot, final=False)
        last = frame(snapshot, final=True)  # drawn before the histories take this turn in
        self._remember(session, prompt, mode, values, snapshot)
        last[4] = comparison_figure(session.points[-40:]) if session.points else gr.update()
        yield last

    def _remember(
        self, session: Session, prompt: str, mode: str, values: tuple[Any, ...], runs: list[PanelRun]
    ) -> None:
        session.replies += 1
        comparison = Comparison(
            prompt=prompt, mode=mode, settings=dict(zip(SETTINGS, values[: len(SETTINGS)], strict=True))
        )
        for r in runs:
            name = self.engine.catalogue.configs[r.variant_id].display_name
            if mode == "chat" and r.status != "failed":
                session.histories[r.panel] += [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": r.text},
                ]
            m = r.metrics
            comparison.answers.append(Answer(r.variant_id, name, r.text, m.to_dict() if m else None, r.error))
            if m is not None:
                session.points.append(
                    ReplyPoint(
                        session.replies,
                        r.variant_id,
                        m.ttft_s,
                        m.decode_tok_s,
                        m.prefill_tok_s,
                        m.peak_mem_bytes / 2**20,
                    )
                )
        session.last = comparison

    def clear(self, request: gr.Request) -> list[Any]:
        session = self.sessions.get(request)
        session.histories = [[] for _ in range(MAX_PANELS)]
        return [[] for _ in range(MAX_PANELS)] + ["" for _ in range(MAX_PANELS)]

    def export(self, request: gr.Request) -> tuple[Any, Any, str]:
        session = self.sessions.get(request)
        if session.last is None:
            return gr.update(), gr.update(), "⚠ Nothing to export yet: send a prompt first."
        folder = Path(tempfile.mkdtemp(prefix="comparison-"))
        md = folder / "comparison.md"
        js = folder / "comparison.json"
        md.write_text(session.last.to_markdown())
        js.write_text(session.last.to_json())
        return (
            gr.update(value=str(md), visible=True),
            gr.update(value=str(js), visible=True),
            "Exported the last comparison.",
        )
