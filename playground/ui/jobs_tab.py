"""The Jobs tab: start fine-tune and eval jobs, watch them (state, progress, ETA, log tail, loss
and metric plots), cancel or resume them, put what a fine-tune made next to its base, and
compare variants across evals. Jobs run in their own processes (playground.jobs); this tab only
reads their records, every two seconds."""

from __future__ import annotations

import html
import json
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
from playground.ui.charts import loss_figure, metric_bars, needle_figure, quant_compare_figure, router_eval_figure
from playground.ui.formatting import error_text


def _perplexity_by_document(result: dict[str, Any]) -> Any:
    documents = result.get("documents") or []
    by_document = {d["document"]: d["perplexity"] for d in documents[:30]}
    return metric_bars(by_document, "Perplexity by document") if by_document else None


def _format_rates(result: dict[str, Any]) -> Any:
    values = {k: v for k, v in result.items() if isinstance(v, float)}
    return metric_bars(values, "Format checks (share passed)") if values else None


# A kind's record names its result plot (JobKind.plot); each name is drawn here.
RESULT_PLOTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "needle": needle_figure,
    "router-curve": lambda r: (
        router_eval_figure(r["curve"], r["confusion"], r["threshold"]) if r.get("curve") else None
    ),
    "perplexity-by-document": _perplexity_by_document,
    "quant-compare": lambda r: quant_compare_figure(r["rows"]),
    "format-rates": _format_rates,
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
    def __init__(self, engine: Engine, manager: JobManager, access: Access) -> None:
        self.engine = engine
        self.manager = manager
        self.access = access
        self._n_dropdowns = 0
        self._has_router_dropdown = False

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
            loss_plot = gr.Plot(elem_id="job-loss")
            result_plot = gr.Plot(elem_id="job-result-plot")
        log = gr.Textbox(label="Log (latest events)", lines=10, interactive=False, elem_id="job-log")
        gr.Markdown("### Variants across evals (latest result of each)")
        results = gr.Dataframe(interactive=False, elem_id="job-results")

        kind.change(kind_help, kind, help_text)
        submit.click(self.submit, [kind, model, options], [submit_status, selected])
        cancel.click(self.cancel, selected, action_status)
        resume.click(self.resume, selected, action_status)
        add_variants.click(self.add_variants, None, [action_status, model, *variant_dropdowns])
        outputs = [table, selected, detail, loss_plot, result_plot, log, results]
        gr.Timer(2.0).tick(self.refresh, selected, outputs, show_progress="hidden")
        selected.change(self.refresh, selected, outputs, show_progress="hidden")

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
            return f"⚠ {error_text(err)}", gr.update()
        return f"Started {kind} on {model}: job `{job.id}` ({job.state})", gr.update(value=job.id)

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
            return f"⚠ {error_text(err)}"

    def add_variants(self) -> tuple[Any, ...]:
        added = self.engine.catalogue.refresh_made_variants()
        choices = sorted(self.engine.catalogue.configs)
        panel_choices = [(c.display_name, c.id) for c in self.engine.catalogue.configs.values()]
        message = f"Added: {', '.join(added)}" if added else "No new variants since the last look"
        routers = [(c.display_name, c.id) for c in self.engine.catalogue.configs.values() if c.router is not None]
        updates = [gr.update(choices=panel_choices)] * self._n_dropdowns
        if self._has_router_dropdown:
            updates.append(gr.update(choices=routers))
        return (message, gr.update(choices=choices), *updates)

    # -- the view --------------------------------------------------------------------------
    def refresh(self, selected: str | None) -> tuple[Any, ...]:
        jobs = self.manager.store.list()
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
        ids = [j.id for j in jobs]
        chosen = selected if selected in ids else (ids[0] if ids else None)
        detail, loss, plot, log = "", None, None, ""
        if chosen:
            job = next(j for j in jobs if j.id == chosen)
            events = self.manager.store.events(job.id)
            detail = self._detail_html(job)
            loss = self._loss(events)
            plot = self._result_plot(job)
            log = self._log(events, job)
        table = rows or [[""] * len(TABLE_HEADERS)]
        return (table, gr.update(choices=ids, value=chosen), detail, loss, plot, log, results_rows(jobs))

    @staticmethod
    def _detail_html(job: Job) -> str:
        bar = f'<progress value="{job.step}" max="{job.total}" style="width:60%"></progress>' if job.total else ""
        parts = [
            f"<b>{job.kind}</b> on <code>{html.escape(str(job.options.get('model', '')))}</code>: "
            f"<b class='job-state'>{job.state}</b>",
            f"{bar} {_progress(job)}",
            f"elapsed {_duration(job.elapsed_s()) or '–'}, ETA {_duration(job.eta_s()) or '–'}",
        ]
        if job.error:
            parts.append(f"<span style='color:#c9302c'>Error: {html.escape(job.error)}</span>")
        if job.result:
            summary = {k: v for k, v in job.result.items() if isinstance(v, int | float | str) and len(str(v)) < 120}
            parts.append("Result: <code>" + html.escape(json.dumps(summary)[:600]) + "</code>")
        table = KINDS[job.kind].table if job.kind in KINDS else None
        if job.result and table is not None:
            headers, rows = table(job.result)
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            parts.append(f"<table class='result-table'><tr>{head}</tr>{body}</table>")
        if job.kind in KINDS and job_kind(job.kind).resumes and job.state in ("interrupted", "failed", "cancelled"):
            parts.append("This fine-tune can be resumed from its last checkpoint.")
        return "<div class='job-detail'>" + "<br>".join(parts) + "</div>"

    @staticmethod
    def _loss(events: list[tuple[int, float, dict[str, Any]]]) -> Any:
        points = [(e["step"], e["loss"]) for _, _, e in events if "loss" in e]
        if not points:
            return None
        return loss_figure([s for s, _ in points], [v for _, v in points])

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
