"""The Jobs tab: start fine-tune and eval jobs, watch them (state, progress, ETA, log tail, loss
and metric plots), cancel or resume them, put what a fine-tune made next to its base, and
compare variants across evals. Jobs run in their own processes (playground.jobs); this tab only
reads their records, through the page's live loop (ui.live): a view is sent when it changed."""

from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import gradio as gr

from playground.engine import Engine
from playground.errors import PlaygroundError
from playground.jobs.kinds import KINDS, job_kind
from playground.jobs.manager import JobManager
from playground.jobs.store import Job
from playground.ui.access import Access
from playground.ui.charts import (
    loss_figure,
    metric_bars,
    needle_figure,
    pareto_figure,
    quant_compare_figure,
    router_eval_figure,
)
from playground.ui.formatting import error_text
from playground.ui.live import LivePage, VariantView
from playground.ui.matrix_view import MatrixView
from playground.ui.report_view import PromptSetJobs, ReportView
from playground.ui.session import Session, Sessions


def _perplexity_by_document(result: dict[str, Any]) -> Any:
    documents = result.get("documents") or []
    by_document = {d["document"]: d["perplexity"] for d in documents[:30]}
    return metric_bars(by_document, "Perplexity by document", "perplexity") if by_document else None


def _format_rates(result: dict[str, Any]) -> Any:
    values = {k: v for k, v in result.items() if isinstance(v, float)}
    return metric_bars(values, "Format checks (share passed)", "share passed") if values else None


# A kind's record names its result plot (JobKind.plot); each name is drawn here.
RESULT_PLOTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "needle": needle_figure,
    "router-curve": lambda r: (
        router_eval_figure(r["curve"], r["confusion"], r["threshold"], r.get("reliability", ())) if r.get("curve") else None
    ),
    "perplexity-by-document": _perplexity_by_document,
    "quant-compare": lambda r: quant_compare_figure(r["rows"]),
    "format-rates": _format_rates,
    "pareto": pareto_figure,
}

TABLE_HEADERS = ["job", "kind", "variant", "state", "progress", "elapsed", "ETA", "error"]
LOG_EVENTS = 40


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _progress(job: Job) -> str:
    return f"{job.step}/{job.total} ({job.step / job.total:.0%})" if job.total else (str(job.step) if job.step else "")


# Units by the ending of a result's name; the rest are plain numbers.
UNITS = (("_tok_s", "tok/s"), ("_s", "s"), ("_bytes", "bytes"), ("_mib", "MiB"), ("_gib", "GiB"), ("_ms", "ms"))


def result_value(name: str, value: Any) -> str:
    """One result figure for people: 4 significant digits, with its unit, shares as percent."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if name.endswith("_bytes"):
        return f"{value / 2**20:,.1f} MiB"
    unit = next((u for suffix, u in UNITS if name.endswith(suffix)), "")
    if isinstance(value, int):
        text = f"{value:,}"
    elif (
        unit == ""
        and 0 <= value <= 1
        and any(w in name for w in ("accuracy", "rate", "recall", "precision", "share", "validity"))
    ):
        return f"{value:.1%}"
    else:
        text = f"{value:.4g}"
    return f"{text} {unit}".rstrip()


def kind_help(kind: str) -> str:
    """The options of a kind, with their defaults, from its options model."""
    if kind not in KINDS:
        return ""
    record = KINDS[kind]
    schema = record.options.model_json_schema()
    lines = [f"**{kind}**: {record.description}. Options (JSON; `model` comes from the dropdown):"]
    for name, field in schema["properties"].items():
        if name == "model":
            continue
        default = f" = `{json.dumps(field['default'])}`" if "default" in field else " (required)"
        lines.append(f"- `{name}`{default}")
    return "\n".join(lines)


def preset_choices(kind: str) -> Any:
    """The kind's named option sets, shown only where it has some."""
    presets = KINDS[kind].presets if kind in KINDS else {}
    choices = [(f"{name}: {about}", name) for name, (about, _) in presets.items()]
    return gr.update(choices=choices, value=None, visible=bool(choices))


def preset_options(kind: str, name: str | None) -> Any:
    """The Options box filled with a preset's options, as JSON a person can edit before starting."""
    presets = KINDS[kind].presets if kind in KINDS else {}
    if name not in presets:
        return gr.update()
    return json.dumps(presets[name][1])


def results_rows(jobs: list[Job]) -> dict[str, Any]:
    """Variant × eval: the latest succeeded result of each eval for each variant, as the
    Dataframe's value (headers and rows)."""
    table: dict[str, dict[str, Any]] = {}
    for job in sorted(jobs, key=lambda j: j.created):
        summary = KINDS[job.kind].summary if job.kind in KINDS else None
        if job.state != "succeeded" or not job.result or summary is None:
            continue
        for variant, cells in summary(job.options, job.result).items():
            table.setdefault(variant, {}).update(cells)
    columns = sorted({c for row in table.values() for c in row})
    rows = [
        [variant, *[("" if row.get(c) is None else round(row[c], 4)) for c in columns]]
        for variant, row in sorted(table.items())
        if row
    ]
    return {"headers": ["variant", *columns], "data": rows or [[""] * (1 + len(columns))]}


class JobsTab:
    def __init__(self, engine: Engine, manager: JobManager, access: Access, sessions: Sessions | None = None) -> None:
        self.engine = engine
        self.manager = manager
        self.access = access
        self.sessions = sessions or Sessions()
        self._n_dropdowns = 0
        self._has_router_dropdown = False
        # The store is read at most once a second, however many pages watch it.
        self._read_lock = threading.Lock()
        self._read_at = 0.0
        self._jobs: list[Job] = []
        self._events: dict[str, tuple[float, list[tuple[int, float, dict[str, Any]]]]] = {}

    def build(self, variant_dropdowns: list[gr.Dropdown], router_dropdown: gr.Dropdown | None = None) -> None:
        """`variant_dropdowns` (and the Router tab's `router_dropdown`): pickers of other tabs,
        refreshed when a fine-tune has made a new variant."""
        self._n_dropdowns = len(variant_dropdowns)
        self._has_router_dropdown = router_dropdown is not None
        if router_dropdown is not None:
            variant_dropdowns = [*variant_dropdowns, router_dropdown]
        with gr.Row():
            kind = gr.Dropdown(sorted(KINDS), value="eval-perplexity", label="Job kind", elem_id="job-kind")
            model = gr.Dropdown(
                sorted(self.engine.catalogue.configs),
                value="smollm2-135m-gguf",
                label="Variant (or the path of a model folder or GGUF file)",
                elem_id="job-model",
                allow_custom_value=True,
            )
        preset = gr.Dropdown([], label="Preset (fills the options)", elem_id="job-preset", visible=False)
        options = gr.Textbox(value="{}", label="Options (JSON)", lines=2, elem_id="job-options")
        help_text = gr.Markdown(kind_help("eval-perplexity"), elem_id="job-help")
        submit = gr.Button("Start job", variant="primary", elem_id="job-submit")
        submit_status = gr.Markdown(elem_id="job-submit-status")
        gr.Markdown("### Jobs")
        table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="job-table")
        with gr.Row():
            selected = gr.Dropdown([], label="Job", elem_id="job-selected", allow_custom_value=True)
            cancel = gr.Button("Cancel", elem_id="job-cancel")
            resume = gr.Button("Resume", elem_id="job-resume")
            add_variants = gr.Button("Put new variants in Compare", elem_id="job-add-variants")
        action_status = gr.Markdown(elem_id="job-action-status")
        detail = gr.HTML(elem_id="job-detail")
        with gr.Row():
            # No block label: the chart's own title says what it is (a label would cover it).
            loss_plot = gr.Plot(elem_id="job-loss", show_label=False, visible=False)
            result_plot = gr.Plot(elem_id="job-result-plot", show_label=False)
        log = gr.Textbox(label="Log (latest events)", lines=10, interactive=False, elem_id="job-log")
        gr.Markdown("### Variants across evals (latest result of each)")
        results = gr.Dataframe(interactive=False, elem_id="job-results")
        self.prompt_sets = PromptSetJobs(self.manager, self.access, self.sessions, sorted(self.engine.catalogue.configs))
        self.prompt_sets.build()
        self.matrix = MatrixView(self._read_jobs)
        self.matrix.build()
        self.report = ReportView(self._read_jobs)
        self.report.build()

        kind.change(kind_help, kind, help_text)
        kind.change(preset_choices, kind, preset)
        preset.input(preset_options, [kind, preset], options)
        submit.click(self.submit, [kind, model, options], [submit_status, selected])
        cancel.click(self.cancel, selected, action_status)
        resume.click(self.resume, selected, action_status)
        pickers = [self.prompt_sets.reference, self.prompt_sets.variants]
        add_variants.click(self.add_variants, None, [action_status, model, *pickers, *variant_dropdowns])
        self.view_outputs = [table, selected, detail, loss_plot, result_plot, log, results, resume]
        self.submit_status = submit_status
        # A person picking a job: shown at once (the live loop shows it from then on).
        selected.input(self.pick, selected, self.view_outputs, show_progress="hidden")

    def follow_live(self, live: LivePage) -> None:
        """The table, the chosen job and the start message follow the store; each is its own
        part, so the job picker is not redrawn when only an elapsed time moved."""

        def chosen_job(session: Session) -> tuple[list[Job], Job | None]:
            jobs = self._read_jobs()
            chosen = self._chosen(session, jobs)
            return jobs, next((j for j in jobs if j.id == chosen), None)

        def tables(_session: Session, _views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            jobs = self._read_jobs()
            rows = self._rows(jobs)
            return [(repr(rows), rows), (repr(jobs), lambda: results_rows(jobs))]

        def picker(session: Session, _views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            jobs, job = chosen_job(session)
            ids = [j.id for j in jobs]
            chosen = job.id if job else None
            return [((tuple(ids), chosen), gr.update(choices=ids, value=chosen))]

        def detail(session: Session, _views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            _, job = chosen_job(session)
            events = self._read_events(job.id) if job else []
            key = repr((job, len(events)))
            return [
                (key, lambda: self._detail_html(job) if job else ""),
                (key, lambda: self._loss_update(events)),
                (key, lambda: self._result_plot(job) if job else None),
                (key, lambda: self._log(events, job) if job else ""),
                (repr((job.kind, job.state) if job else None), lambda: gr.update(visible=self._resumable(job))),
            ]

        def started(session: Session, _views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            submitted = next((j for j in self._read_jobs() if j.id == session.submitted_job), None)
            text = self._started_text(submitted) if submitted else None
            return [(text, text if text is not None else gr.update())]

        table, selected, detail_html, loss, result_plot, log, results, resume = self.view_outputs
        live.add([table, results], tables)
        live.add([selected], picker)
        live.add([detail_html, loss, result_plot, log, resume], detail)
        live.add([self.submit_status], started)
        self.matrix.follow_live(live)
        self.report.follow_live(live)

    # -- actions ---------------------------------------------------------------------------
    def submit(self, kind: str, model: str, options_text: str, request: gr.Request) -> tuple[str, Any]:
        if refusal := self.access.refusal(request, "start jobs"):
            return refusal, gr.update()
        try:
            options = json.loads(options_text or "{}")
        except json.JSONDecodeError as err:
            return f"⚠ Options are not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})", gr.update()
        if not isinstance(options, dict):
            return '⚠ Options must be a JSON object, e.g. {"limit": 10}', gr.update()
        try:
            job = self.manager.submit(kind, {"model": model, **options})
        except PlaygroundError as err:
            return error_text(err), gr.update()
        session = self.sessions.get(request)
        session.submitted_job = session.selected_job = job.id
        return self._started_text(job), gr.update(value=job.id)

    @staticmethod
    def _started_text(job: Job) -> str:
        """The start message, kept up to date until the job ends."""
        model = job.options.get("model", "")
        text = f"Started {job.kind} on {model}: job `{job.id}` ({job.state})"
        if job.state == "failed" and job.error:
            text += f": {job.error}"
        return text

    def cancel(self, job_id: str | None, request: gr.Request) -> str:
        refusal = self.access.refusal(request, "cancel jobs")
        return refusal or self._control(self.manager.cancel, job_id, "")

    def resume(self, job_id: str | None, request: gr.Request) -> str:
        refusal = self.access.refusal(request, "resume jobs")
        return refusal or self._control(self.manager.resume, job_id, " again, from its last checkpoint")

    @staticmethod
    def _control(action: Any, job_id: str | None, note: str) -> str:
        try:
            return f"Job `{job_id}` is {action(job_id or '').state}{note}"
        except KeyError:
            return "⚠ Choose a job first"
        except PlaygroundError as err:
            return error_text(err)

    def add_variants(self) -> tuple[Any, ...]:
        added = self.engine.catalogue.refresh_made_variants()
        choices = sorted(self.engine.catalogue.configs)
        panel_choices = [(c.display_name, c.id) for c in self.engine.catalogue.configs.values()]
        message = f"Added: {', '.join(added)}" if added else "No new variants since the last look"
        routers = [(c.display_name, c.id) for c in self.engine.catalogue.configs.values() if c.router is not None]
        updates = [gr.update(choices=panel_choices)] * self._n_dropdowns
        if self._has_router_dropdown:
            updates.append(gr.update(choices=routers))
        return (message, gr.update(choices=choices), gr.update(choices=choices), gr.update(choices=choices), *updates)

    # -- the view --------------------------------------------------------------------------
    def _read_jobs(self) -> list[Job]:
        with self._read_lock:
            if time.monotonic() - self._read_at >= 1.0:
                self._jobs, self._read_at = self.manager.store.list(), time.monotonic()
            return self._jobs

    def _read_events(self, job_id: str) -> list[tuple[int, float, dict[str, Any]]]:
        with self._read_lock:
            read_at, events = self._events.get(job_id, (0.0, []))
            if time.monotonic() - read_at >= 1.0:
                events = self.manager.store.events(job_id)
                self._events[job_id] = (time.monotonic(), events)
            return events

    @staticmethod
    def _chosen(session: Session, jobs: list[Job]) -> str | None:
        ids = [j.id for j in jobs]
        return session.selected_job if session.selected_job in ids else (ids[0] if ids else None)

    @staticmethod
    def _rows(jobs: list[Job]) -> list[list[str]]:
        rows = [
            [
                j.id,
                j.kind,
                j.options.get("model", ""),
                j.state,
                _progress(j),
                _duration(j.elapsed_s()),
                _duration(j.eta_s()),
                (j.error or "")[:120],
            ]
            for j in jobs
        ]
        return rows or [[""] * len(TABLE_HEADERS)]

    def pick(self, selected: str | None, request: gr.Request) -> tuple[Any, ...]:
        session = self.sessions.get(request)
        session.selected_job = selected
        return self.refresh(selected)

    def refresh(self, selected: str | None) -> tuple[Any, ...]:
        """Every view of the tab for the job `selected` (the newest when none)."""
        jobs = self.manager.store.list()
        ids = [j.id for j in jobs]
        chosen = selected if selected in ids else (ids[0] if ids else None)
        job = next((j for j in jobs if j.id == chosen), None)
        events = self.manager.store.events(job.id) if job else []
        return (
            self._rows(jobs),
            gr.update(choices=ids, value=chosen),
            self._detail_html(job) if job else "",
            self._loss_update(events),
            self._result_plot(job) if job else None,
            self._log(events, job) if job else "",
            results_rows(jobs),
            gr.update(visible=self._resumable(job)),
        )

    @staticmethod
    def _resumable(job: Job | None) -> bool:
        return (
            job is not None
            and job.kind in KINDS
            and job_kind(job.kind).resumes
            and job.state in ("interrupted", "failed", "cancelled")
        )

    @staticmethod
    def _detail_html(job: Job) -> str:
        bar = f'<progress value="{job.step}" max="{job.total}" style="width:60%"></progress>' if job.total else ""
        parts = [
            f"<b>{job.kind}</b> on <code>{html.escape(str(job.options.get('model', '')))}</code>: "
            f"<b class='job-state'>{job.state}</b>" + (f" on GPU {job.gpu}" if job.gpu is not None else ""),
            f"{bar} {_progress(job)}",
            f"elapsed {_duration(job.elapsed_s()) or '–'}, ETA {_duration(job.eta_s()) or '–'}",
        ]
        if job.error:
            parts.append(f"<span style='color:#c9302c'>Error: {html.escape(job.error)}</span>")
        if job.result:
            figures = [(k, v) for k, v in job.result.items() if isinstance(v, int | float | str) and len(str(v)) < 120]
            if figures:
                cells = "".join(
                    f"<tr><td>{html.escape(k)}</td><td>{html.escape(result_value(k, v))}</td></tr>" for k, v in figures
                )
                parts.append(f"<table class='result-figures'><tr><th>result</th><th>value</th></tr>{cells}</table>")
        table = KINDS[job.kind].table if job.kind in KINDS else None
        if job.result and table is not None:
            headers, rows = table(job.result)
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            parts.append(f"<table class='result-table'><tr>{head}</tr>{body}</table>")
        if JobsTab._resumable(job):
            parts.append("This fine-tune can be resumed from its last checkpoint.")
        return "<div class='job-detail'>" + "<br>".join(parts) + "</div>"

    @staticmethod
    def _loss_update(events: list[tuple[int, float, dict[str, Any]]]) -> Any:
        """The loss curve of a training job; hidden for jobs that report no loss (evals)."""
        points = [(e["step"], e["loss"]) for _, _, e in events if "loss" in e]
        if not points:
            return gr.update(value=None, visible=False)
        return gr.update(value=loss_figure([s for s, _ in points], [v for _, v in points]), visible=True)

    @staticmethod
    def _result_plot(job: Job) -> Any:
        plot = KINDS[job.kind].plot if job.kind in KINDS else None
        if not job.result or plot is None:
            return None
        return RESULT_PLOTS[plot](job.result)

    @staticmethod
    def _log(events: list[tuple[int, float, dict[str, Any]]], job: Job) -> str:
        lines = []
        for _, t, event in events[-LOG_EVENTS:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(t))
            text = " ".join(f"{k}={v}" for k, v in event.items() if k != "message")
            message = event.get("message", "")
            lines.append(f"{stamp} {message} {text}".rstrip())
        return "\n".join(lines)
