"""The Compare tab: load variants, send one prompt to 1-4 of them, watch them stream side by side.

Panels are built from a list; one handler streams every panel at once (ui.streaming), and each
panel's Stop ends only its own request. Metrics sit under every answer and feed the charts.
"""

from __future__ import annotations

import html
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from playground.capabilities import capabilities
from playground.config import setting_error
from playground.engine import Engine
from playground.errors import PlaygroundError
from playground.export import Answer, Comparison, PanelRecord, SessionRecord, Turn, load_session
from playground.ui.access import Access
from playground.ui.charts import ReplyPoint, comparison_figure
from playground.ui.diff_view import DiffView
from playground.ui.formatting import error_text, load_progress, loaded_markdown, metrics_line, ordinal, preformatted
from playground.ui.live import LivePage, VariantView, picker_choices
from playground.ui.session import MAX_PANELS, Session, Sessions
from playground.ui.streaming import PanelRun, stream_panels
from playground.ui.tokens import probability_html

SETTINGS = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed")
DEFAULT_PANELS = ("smollm2-135m-gguf", "smollm2-135m-transformers")
# A send's outputs: Send, status, notice, loaded list and figure, then each panel's chat,
# metrics, Reload and token view.
HEAD_OUTPUTS, PANEL_OUTPUTS = 5, 4


SETTING_LABELS = {
    "temperature": "temperature (0 to 5; 0: greedy)",
    "top_p": "top-p (above 0, up to 1)",
    "top_k": "top-k (0: off)",
    "max_new_tokens": "max new tokens (1 to 32768)",
    "repetition_penalty": "repetition penalty (0.5 to 3)",
    "seed": "seed (empty: random)",
}


def settings_widgets(prefix: str) -> list[gr.components.Component]:
    """The six generation settings as plain number fields: a value out of bounds is shown as an
    error at its field and nothing is sent (a slider would clamp it silently). Empty means
    'the variant's own default' (for the seed: a random one)."""
    defaults = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "max_new_tokens": 256, "repetition_penalty": 1.0}
    fields: list[gr.components.Component] = [
        gr.Number(value=defaults[name], label=SETTING_LABELS[name], elem_id=f"{prefix}-{name}", min_width=120)
        for name in SETTINGS
        if name != "seed"
    ]
    # A text field: an empty number field reads as 0, and 0 is a seed.
    fields.append(
        gr.Textbox(
            value="", placeholder="random", label=SETTING_LABELS["seed"], elem_id=f"{prefix}-seed", min_width=120
        )
    )
    return fields


def setting_value(name: str, raw: Any) -> Any:
    """A field's value as the engine takes it: the seed's text as a whole number, empty as None."""
    if name != "seed":
        return raw
    text = str(raw or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text  # refused by the check with its reason


def _shown_setting(name: str, value: Any) -> Any:
    """A saved setting as its field shows it (the seed as text, empty for 'random')."""
    if name == "seed":
        return "" if value is None else str(value)
    return value


def setting_validation(name: str, raw: Any) -> dict[str, Any]:
    value = setting_value(name, raw)
    problem = "Input should be a whole number" if isinstance(value, str) else setting_error(name, value)
    label = SETTING_LABELS[name].split(" (")[0]
    message = problem.replace("Input should be", f"{label} must be") if problem else ""
    return gr.validate(problem is None, message)


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
    tokens: gr.HTML


def _chat_view(
    history: list[dict[str, str]], user: str, text: str, status: str, mode: str = "chat"
) -> list[dict[str, str]]:
    """A panel's conversation: chat answers as Markdown; completion prompts and output exactly
    as written (a '# comment' in code is not a heading)."""
    shown = text + ("▌" if status == "streaming" else "")
    if mode == "completion":
        user, shown = preformatted(user), preformatted(shown)
    return [*history, {"role": "user", "content": user}, {"role": "assistant", "content": shown}]


def _send_button(busy: bool) -> Any:
    """Send while nothing is answered; greyed as "Generating…" while an answer streams."""
    return gr.update(interactive=not busy, value="Generating…" if busy else "Send")


def _panel_status(run: PanelRun) -> str:
    if run.status == "loading" and run.loading is not None:
        return f"Loading {run.variant_id}… {load_progress(run.loading)}"
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
            self.token_view = gr.Checkbox(
                False,
                label="token view",
                info="each answer token by token: probability and top-5 on hover",
                elem_id="token-view",
                scale=1,
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
            export = gr.Button("Export session", elem_id="export")
            load_session_button = gr.UploadButton(
                "Load a saved session", file_types=[".json"], elem_id="load-session", size="md"
            )
        self.status = gr.Markdown(elem_id="send-status")
        self.notice = gr.Markdown(elem_id="send-notice")
        with gr.Row():
            export_md = gr.File(label="Markdown", elem_id="export-md", visible=False, height=80)
            export_json = gr.File(label="JSON", elem_id="export-json", visible=False, height=80)
        # The figure carries its own title; a block label would sit on top of it.
        self.plot = gr.Plot(elem_id="comparison-plot", show_label=False)
        self.diff = DiffView(engine, self.access)
        self.diff.build(self.prompt, self.mode)

        # -- wiring ----------------------------------------------------------------------
        self.model.change(self.show_estimate, self.model, self.estimate)
        # A message belongs to the choice it answered: a new choice clears it.
        self.model.input(lambda: "", None, self.load_status, queue=False)
        path.change(lambda: "", None, add_status, queue=False)
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
            outputs += [p.chatbot, p.metrics, p.reload, p.tokens]
        # No progress overlays: the status line and each panel say where they are, and the
        # overlays' animation kept the browser busy on a 2-core CPU, taking from the very decode
        # being measured (benchmarks/RESULTS.md, "what the page costs while it streams").
        for submit in (self.send.click, self.prompt.submit):
            submit(self.run, inputs, outputs, validator=self.check_settings, show_progress="hidden")
        clear.click(
            self.clear,
            None,
            [p.chatbot for p in self.panels]
            + [p.metrics for p in self.panels]
            + [p.tokens for p in self.panels]
            + [self.status],
        )
        self.token_view.change(self.set_token_view, self.token_view, None, queue=False)
        view_inputs = [self.n_panels, self.mode, *self.shared]
        for p in self.panels:
            view_inputs += [p.variant, p.override, *p.settings]
        export.click(self.export, view_inputs, [export_md, export_json, self.status])
        restored = [self.n_panels, self.mode, *self.shared]
        for p in self.panels:
            restored += [p.variant, p.override, *p.settings, p.chatbot]
        self.restored_outputs = restored
        load_session_button.upload(self.load_session, load_session_button, [*restored, self.status])
        # The engine's state (loading, ready, hung, dead) reaches the list within a second.
        for i, p in enumerate(self.panels):
            p.stop.click(self._stopper(i), None, None, queue=False)
            p.reload.click(self._reloader(i), p.variant, [p.metrics, p.reload, self.loaded])

    def _build_panel(self, i: int) -> Panel:
        default = DEFAULT_PANELS[i] if i < len(DEFAULT_PANELS) else None
        with gr.Column(visible=i < 2, elem_id=f"panel-{i}", min_width=520) as column:
            variant = gr.Dropdown(self.choices(), value=default, label=f"Panel {i + 1}", elem_id=f"panel-{i}-variant")
            # A copy button under each message, no toolbar over the text; the newest answer in view.
            chatbot = gr.Chatbot(
                height=320,
                show_label=False,
                elem_id=f"panel-{i}-chat",
                feedback_options=None,
                buttons=["copy"],
                autoscroll=True,
            )
            metrics = gr.Markdown(elem_id=f"panel-{i}-metrics")
            tokens = gr.HTML(elem_id=f"panel-{i}-tokens")
            with gr.Row():
                stop = gr.Button("Stop", size="sm", elem_id=f"panel-{i}-stop")
                reload = gr.Button("Reload", size="sm", visible=False, elem_id=f"panel-{i}-reload")
            with gr.Accordion("Settings for this panel", open=False):
                override = gr.Checkbox(False, label="override the shared settings", elem_id=f"panel-{i}-override")
                settings = settings_widgets(f"panel-{i}")
        return Panel(column, variant, chatbot, metrics, stop, reload, override, settings, tokens)

    # -- variants --------------------------------------------------------------------------
    def follow_live(self, live: LivePage) -> None:
        """The loaded list and every picker follow the engine (states, on disk or not)."""
        pickers = [self.model, *[p.variant for p in self.panels]]

        def loaded(_session: Session, _views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            text = loaded_markdown(self.engine)
            return [(text, text)]

        def choices(_session: Session, views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            listed = picker_choices(views)
            return [(tuple(listed), gr.update(choices=listed))] * len(pickers)

        live.add([self.loaded], loaded)
        live.add(pickers, choices)
        self.diff.follow_live(live)

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
        try:
            for loading in self.engine.loading(variant_id):
                yield f"⏳ Loading {variant_id}… {load_progress(loading)}", loaded_markdown(self.engine)
            info = self.engine.status(variant_id).info
            assert info is not None  # the loop ends only once the variant is ready
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
    def set_token_view(self, shown: bool, request: gr.Request) -> None:
        self.sessions.get(request).token_view = bool(shown)

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
            params = {k: setting_value(k, v) for k, v in params.items()}
            params = {
                k: (int(v) if k in ("top_k", "max_new_tokens", "seed") and v is not None else v)
                for k, v in params.items()
            }
            session.cancels[i] = threading.Event()
            try:
                messages = [*session.histories[i], {"role": "user", "content": prompt}]
                # A server sends its token probabilities with the answer, if asked for them.
                top = 5 if session.token_view else 0
                request = self.engine.request(
                    variant_id, prompt=prompt, messages=messages, mode=mode, top_logprobs=top, **params
                )
                runs.append(PanelRun(i, variant_id, request, cancel=session.cancels[i], session=session.key))
            except Exception as err:
                runs.append(error_text(err))
        return runs

    def check_settings(self, prompt: str, mode: str, n: float, *values: Any) -> list[dict[str, Any]]:
        """Before a send: every setting in use within its bounds, or the error at its field."""
        ok = gr.validate(True, "")
        checks = [ok, ok, ok] + [setting_validation(k, v) for k, v in zip(SETTINGS, values, strict=False)]
        per_panel = len(SETTINGS) + 2
        for i in range(MAX_PANELS):
            chunk = values[len(SETTINGS) + i * per_panel : len(SETTINGS) + (i + 1) * per_panel]
            used = i < int(n) and bool(chunk[1])
            checks += [ok, ok] + [
                setting_validation(k, v) if used else ok for k, v in zip(SETTINGS, chunk[2:], strict=True)
            ]
        return checks

    def run(self, request: gr.Request, prompt: str, mode: str, n: float, *values: Any) -> Iterator[list[Any]]:
        session = self.sessions.get(request)
        n = int(n)
        if not prompt or not prompt.strip():
            yield self._notice("⚠ Type a prompt first.")
            return
        if not session.idle.is_set():
            yield self._notice("⚠ Still answering the last prompt: wait for it, or press Stop in its panels.")
            return
        session.idle.clear()
        try:
            yield from self._run(session, prompt, mode, n, values)
        finally:
            session.idle.set()

    def _notice(self, text: str) -> list[Any]:
        """Outputs that change nothing but the notice line."""
        return [gr.update(), gr.update(), text, gr.update(), gr.update()] + [gr.update()] * (PANEL_OUTPUTS * MAX_PANELS)

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
                _send_button(busy),
                f"{'⏳ ' if busy else ''}{len(runs)} panel(s), {time.monotonic() - started:.1f} s{note}",
                gr.update() if busy else "",
                loaded_markdown(self.engine) if final else gr.update(),
                gr.update(),
            ]
            cells: list[Any] = []
            for i in range(MAX_PANELS):
                if i >= n:
                    cells += [gr.update(), gr.update(), gr.update(), gr.update()]
                elif i in by_panel:
                    r = by_panel[i]
                    cells += [
                        _chat_view(session.histories[i], prompt, r.text, r.status, mode),
                        _panel_status(r),
                        gr.update(visible=r.worker_lost),
                        self._token_view(r) if final and session.token_view else ("" if final else gr.update()),
                    ]
                else:
                    cells += [gr.update(), f"⚠ {entries[i].removeprefix('⚠ ')}", gr.update(), ""]
            return head + cells

        snapshot: list[PanelRun] = []
        shown: list[Any] = []
        replaced = session.replaced
        for snapshot in stream_panels(self.engine, runs):
            if session.replaced == replaced:  # else stopped by Clear or a loaded session: see below
                shown = frame(snapshot, final=False)
                yield shown
        if session.replaced != replaced:
            # Clear or a loaded session draw the panels themselves, and this answer's frames from
            # its stop on could reach the page after theirs (seen: the stopped story back, with
            # "finish: cancelled", in a cleared panel and over a loaded session). So none is
            # sent but a last one that only gives Send back. Nor is its token view scored.
            self._remember(session, prompt, mode, values, snapshot)
            yield [_send_button(busy=False)] + [gr.update()] * (len(shown) - 1)
            return
        last = frame(snapshot, final=True)  # drawn before the histories take this turn in
        # A chat or metrics line the page already shows is not sent again: Gradio sends an
        # event's last frame again, whole, with the event's end (blocks.py,
        # handle_streaming_diffs), which came after a loaded session sent since and drew the
        # stopped answer back (seen in the browser test).
        for index in range(HEAD_OUTPUTS, len(last), PANEL_OUTPUTS):
            for cell in (index, index + 1):  # the panel's chat and metrics
                if shown and last[cell] == shown[cell]:
                    last[cell] = gr.update()
        self._remember(session, prompt, mode, values, snapshot)
        last[4] = comparison_figure(session.points[-40:]) if session.points else gr.update()
        yield last

    def _token_view(self, run: PanelRun) -> str:
        """The answer token by token, scored teacher-forced after it ended (decode itself is
        untouched), or why there is none."""
        if run.status == "failed":
            return ""
        if run.scored:  # a server's own probabilities, sent with the answer
            return probability_html(run.scored) + (
                '<p class="token-note">as the server reported them while it decoded: compare its decode tok/s with '
                "the token view off (llama-cpp-python's server decoded 5.6× slower when asked, benchmarks/RESULTS.md)</p>"
            )
        if run.prompt_ids is None:
            return "<p>⚠ no token view: this server sent no token probabilities (logprobs)</p>"
        if not run.token_ids:
            return ""
        try:
            scored = self.engine.score_answer(run.variant_id, list(run.prompt_ids), list(run.token_ids), top_k=5)
        except Exception as err:  # the answer stays; only its token view is missing
            return f"<p>{html.escape(error_text(err))}</p>"
        return (
            probability_html(scored.tokens)
            + f'<p class="token-note">scored in {scored.seconds:.2f} s after the answer</p>'
        )

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
            session.turns[r.panel].append(
                Turn(
                    prompt=prompt,
                    mode=mode,
                    settings=r.request.params.model_dump(),
                    answer=r.text,
                    metrics=m.to_dict() if m else None,
                    error=r.error,
                )
            )
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

    @staticmethod
    def _stop_answers(session: Session) -> None:
        """Stop the answers still streaming and wait for their last frame: drawn after their
        text ended, it would otherwise come after what replaces the panels and draw over it."""
        session.replaced += 1
        for cancel in session.cancels:
            cancel.set()
        session.idle.wait(timeout=30)

    def clear(self, request: gr.Request) -> list[Any]:
        """Empty panels and a new conversation (an answer streaming is stopped first)."""
        session = self.sessions.get(request)
        self._stop_answers(session)
        session.histories = [[] for _ in range(MAX_PANELS)]
        session.turns = [[] for _ in range(MAX_PANELS)]
        return [[] for _ in range(MAX_PANELS)] + ["" for _ in range(2 * MAX_PANELS)] + [""]

    def export(self, request: gr.Request, n: float, mode: str, *values: Any) -> tuple[Any, Any, str]:
        """The whole session: every panel's conversation with the settings and finish reason of
        each answer, as Markdown and JSON (the JSON loads back with "Load a saved session")."""
        session = self.sessions.get(request)
        if not any(session.turns):
            return gr.update(), gr.update(), "⚠ Nothing to export yet: send a prompt first."
        record = self._record(session, int(n), mode, values)
        folder = Path(tempfile.mkdtemp(prefix="comparison-"))
        md = folder / "comparison.md"
        js = folder / "comparison.json"
        md.write_text(record.to_markdown())
        js.write_text(record.to_json())
        return (
            gr.update(value=str(md), visible=True),
            gr.update(value=str(js), visible=True),
            "Exported this session: every panel's conversation.",
        )

    def _record(self, session: Session, n: int, mode: str, values: tuple[Any, ...]) -> SessionRecord:
        shared = {k: setting_value(k, v) for k, v in zip(SETTINGS, values[: len(SETTINGS)], strict=True)}
        per_panel = len(SETTINGS) + 2
        panels = []
        for i in range(MAX_PANELS):
            chunk = values[len(SETTINGS) + i * per_panel : len(SETTINGS) + (i + 1) * per_panel]
            variant_id = chunk[0] or None
            config = self.engine.catalogue.configs.get(variant_id) if variant_id else None
            panels.append(
                PanelRecord(
                    variant_id=variant_id,
                    display_name=config.display_name if config else "",
                    override=bool(chunk[1]),
                    settings={k: setting_value(k, v) for k, v in zip(SETTINGS, chunk[2:], strict=True)},
                    turns=session.turns[i],
                )
            )
        last = session.last
        return SessionRecord(
            n_panels=n,
            mode=mode if mode in ("chat", "completion") else "chat",
            settings=shared,
            panels=panels,
            prompt=last.prompt if last else "",
            answers=[a.__dict__ for a in last.answers] if last else [],
        )

    def load_session(self, file: Any, request: gr.Request) -> list[Any]:
        """Panels, variants, settings and conversations back from a saved session."""
        unchanged = [gr.update()] * len(self.restored_outputs)
        try:
            path = Path(file if isinstance(file, str) else file.name)
            record = load_session(path.read_bytes())
        except (OSError, PlaygroundError) as err:
            return [*unchanged, error_text(err)]
        session = self.sessions.get(request)
        self._stop_answers(session)  # the loaded conversations replace the one being answered
        missing = [p.variant_id for p in record.panels if p.variant_id and p.variant_id not in self.engine.catalogue]
        updates: list[Any] = [record.n_panels, record.mode]
        updates += [_shown_setting(k, record.settings.get(k)) for k in SETTINGS]
        panels = [*record.panels, *[PanelRecord()] * MAX_PANELS][:MAX_PANELS]
        for i, panel in enumerate(panels):
            known = panel.variant_id if panel.variant_id in self.engine.catalogue else None
            session.turns[i] = list(panel.turns)
            session.histories[i] = [
                message
                for turn in panel.turns
                if turn.mode == "chat" and not turn.error
                for message in ({"role": "user", "content": turn.prompt}, {"role": "assistant", "content": turn.answer})
            ]
            view: list[dict[str, str]] = []
            for turn in panel.turns:
                view = _chat_view(
                    view, turn.prompt, turn.answer if not turn.error else f"⚠ {turn.error}", "done", turn.mode
                )
            updates += [gr.update(value=known), panel.override]
            updates += [_shown_setting(k, panel.settings.get(k)) for k in SETTINGS]
            updates.append(view)
        turns = sum(len(p.turns) for p in record.panels)
        note = f"Loaded the session of {record.created}: {record.n_panels} panel(s), {turns} answer(s)."
        if missing:
            note += f" ⚠ Not in this playground: {', '.join(missing)} (those panels are empty)."
        return [*updates, note]

    def opening(self, request: gr.Request) -> list[Any]:
        """At page load: a shared link's choices (`?variants=a,b&panels=2&mode=chat&prompt=...`),
        else panels 3 and 4 on a variant that is loaded (or loading)."""
        params = dict(getattr(request, "query_params", {}) or {})
        usable = [v for v, w in list(self.engine.workers.items()) if w.state in ("ready", "loading")]
        fallback = usable[0] if usable else None
        picks: list[Any] = [
            gr.update() if i < len(DEFAULT_PANELS) else gr.update(value=fallback) for i in range(MAX_PANELS)
        ]
        notes = []
        wanted = [v.strip() for v in params.get("variants", "").split(",") if v.strip()]
        unknown = [v for v in wanted if v not in self.engine.catalogue]
        if unknown:
            notes.append(f"⚠ The link names variants this playground does not have: {', '.join(unknown)}")
        known = [v for v in wanted if v in self.engine.catalogue][:MAX_PANELS]
        for i, variant_id in enumerate(known):
            picks[i] = gr.update(value=variant_id)
        n_panels: Any = gr.update(value=len(known)) if known else gr.update()
        if params.get("panels", "").isdigit() and 1 <= int(params["panels"]) <= MAX_PANELS:
            n_panels = gr.update(value=int(params["panels"]))
        mode = gr.update(value=params["mode"]) if params.get("mode") in ("chat", "completion") else gr.update()
        prompt = gr.update(value=params["prompt"]) if params.get("prompt") else gr.update()
        return [n_panels, mode, prompt, *picks, "\n".join(notes)]
