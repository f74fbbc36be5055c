"""Prompt-set jobs in the Jobs tab: a form that starts a `matrix` or `report` job over the bundled
prompt set or an uploaded JSONL file, and the view of a finished quantization report (its
table, its Pareto charts of quality against speed and memory, its notes and exports)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from playground.errors import PlaygroundError
from playground.jobs.manager import JobManager
from playground.jobs.store import Job
from playground.matrix import PROMPT_SETS, keep_prompt_file
from playground.report import REPORT_HEADERS, report_csv, report_markdown, report_rows
from playground.ui.access import Access
from playground.ui.charts import pareto_figure
from playground.ui.formatting import error_text
from playground.ui.live import LivePage, VariantView
from playground.ui.session import Session, Sessions


class PromptSetJobs:
    """The form: a reference (or first column), the variants, a prompt set, and two buttons."""

    def __init__(self, manager: JobManager, access: Access, sessions: Sessions, variant_ids: list[str]) -> None:
        self.manager = manager
        self.access = access
        self.sessions = sessions
        self.variant_ids = variant_ids

    def build(self) -> None:
        gr.Markdown(
            "### Compare variants over a prompt set\n"
            "The **matrix** answers every prompt with every variant (a grid with speed and checks); the "
            "**report** measures each variant against the reference: memory, speed, perplexity, mean KL "
            "and top-1 agreement, check pass rate, reproducibility."
        )
        default = "smollm2-135m-transformers" if "smollm2-135m-transformers" in self.variant_ids else None
        others = ["smollm2-135m-gguf"] if "smollm2-135m-gguf" in self.variant_ids else []
        with gr.Row():
            self.reference = gr.Dropdown(
                self.variant_ids, value=default, label="reference (the matrix's first column)", elem_id="ps-reference"
            )
            self.variants = gr.Dropdown(
                self.variant_ids, value=others, multiselect=True, label="variants", elem_id="ps-variants"
            )
        with gr.Row():
            self.prompts = gr.Dropdown(
                list(PROMPT_SETS),
                value="mixed-50",
                label="prompt set (bundled, uploaded, or a path)",
                allow_custom_value=True,
                elem_id="ps-prompts",
                scale=2,
            )
            upload = gr.UploadButton(
                "Upload a prompt file (JSONL)", file_types=[".jsonl", ".json", ".txt"], elem_id="ps-upload"
            )
            self.limit = gr.Number(12, label="first N prompts (empty: all)", precision=0, elem_id="ps-limit")
            self.max_tokens = gr.Number(48, label="max tokens per answer", precision=0, elem_id="ps-max-tokens")
        with gr.Row():
            matrix = gr.Button("Run matrix", elem_id="ps-matrix")
            report = gr.Button("Run report", variant="primary", elem_id="ps-report")
        self.status = gr.Markdown(elem_id="ps-status")
        fields = [self.reference, self.variants, self.prompts, self.limit, self.max_tokens]
        upload.upload(self.upload, upload, [self.prompts, self.status])
        matrix.click(self.start_matrix, fields, self.status)
        report.click(self.start_report, fields, self.status)

    def upload(self, file: Any) -> tuple[Any, str]:
        """The uploaded file checked line by line and kept; a bad one is named, nothing changes."""
        if file is None:
            return gr.update(), ""
        path = Path(file if isinstance(file, str) else file.name)
        shown = getattr(file, "orig_name", None) or path.name
        try:
            kept, cases = keep_prompt_file(path, shown)
        except PlaygroundError as err:
            return gr.update(), error_text(PlaygroundError(str(err).replace(str(path), shown)))
        except OSError as err:
            return gr.update(), f"⚠ {shown} could not be kept: {err.strerror or err}"
        checked = sum(1 for c in cases if c.checks)
        choices = [*PROMPT_SETS, str(kept)]
        return (
            gr.update(choices=choices, value=str(kept)),
            f"{len(cases)} prompts from {shown} ({checked} with checks): pick Run matrix or Run report.",
        )

    def _options(
        self, reference: str | None, variants: list[str] | None, prompts: str | None, limit: float | None,
        max_tokens: float | None,
    ) -> dict[str, Any]:
        options: dict[str, Any] = {"model": reference or "", "variants": list(variants or []),
                                   "prompts": (prompts or "mixed-50").strip()}
        options["limit"] = int(limit) if limit else None  # empty: the whole set
        if max_tokens:
            options["max_new_tokens"] = int(max_tokens)
        return options

    def _start(self, kind: str, options: dict[str, Any], request: gr.Request) -> str:
        if refusal := self.access.refusal(request, "start jobs"):
            return refusal
        if not options["model"]:
            return "⚠ Pick a reference variant."
        try:
            job = self.manager.submit(kind, options)
        except PlaygroundError as err:
            return error_text(err)
        session = self.sessions.get(request)
        session.submitted_job = session.selected_job = job.id
        return f"Started {kind} job `{job.id}` ({job.state}): its progress is in the jobs table below."

    def start_matrix(
        self, reference: str | None, variants: list[str] | None, prompts: str | None, limit: float | None,
        max_tokens: float | None, request: gr.Request,
    ) -> str:
        return self._start("matrix", self._options(reference, variants, prompts, limit, max_tokens), request)

    def start_report(
        self, reference: str | None, variants: list[str] | None, prompts: str | None, limit: float | None,
        max_tokens: float | None, request: gr.Request,
    ) -> str:
        if not variants:
            return "⚠ Pick at least one variant to measure against the reference."
        return self._start("report", self._options(reference, variants, prompts, limit, max_tokens), request)


class ReportView:
    """A finished `report` job: one table, the Pareto charts, the notes, exports."""

    def __init__(self, read_jobs: Callable[[], list[Job]]) -> None:
        self.read_jobs = read_jobs

    def _report(self, job_id: str | None) -> dict[str, Any] | None:
        job = next((j for j in self.read_jobs() if j.id == job_id), None)
        if job is None or job.kind != "report" or job.state != "succeeded" or not job.result:
            return None
        return job.result

    def build(self) -> None:
        gr.Markdown("### Quantization report (a finished `report` job)")
        with gr.Row():
            self.job = gr.Dropdown([], label="report job", elem_id="report-job", scale=2)
            export = gr.Button("Export CSV, JSON, Markdown", elem_id="report-export", scale=1)
        files = gr.File(label="exports", file_count="multiple", elem_id="report-files", visible=False)
        self.summary = gr.Markdown(elem_id="report-summary")
        self.table = gr.Dataframe(headers=REPORT_HEADERS, interactive=False, elem_id="report-table")
        self.plot = gr.Plot(elem_id="report-pareto", show_label=False)
        self.job.change(self.show, self.job, [self.summary, self.table, self.plot])
        export.click(self.export, self.job, files)

    def follow_live(self, live: LivePage) -> None:
        """The report jobs that have finished, newest first, as they finish."""

        def jobs(_session: Session, _views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            done = [j.id for j in self.read_jobs() if j.kind == "report" and j.state == "succeeded"]
            return [(tuple(done), gr.update(choices=done, value=done[0] if done else None))]

        live.add([self.job], jobs)

    def show(self, job_id: str | None) -> list[Any]:
        report = self._report(job_id)
        if report is None:
            return ["" if not job_id else "⚠ not a finished report job", gr.update(value=None), None]
        notes = [f"- {v['variant']}: {note}" for v in report["variants"] for note in v["notes"]]
        summary = "\n".join([
            f"Reference **{report['reference']}**: {report['prompts']} prompts, greedy answers of at most "
            f"{report['max_new_tokens']} tokens, perplexity on `{report['corpus']}`.",
            f"On the Pareto front (no other variant has both lower KL and more speed): "
            f"**{', '.join(report['pareto_speed']) or '–'}**; (lower KL and less memory): "
            f"**{', '.join(report['pareto_memory']) or '–'}**.",
            *(["", "Notes:", *notes] if notes else []),
        ])
        table = {"headers": REPORT_HEADERS, "data": report_rows(report)}
        return [summary, gr.update(value=table), pareto_figure(report)]

    def export(self, job_id: str | None) -> Any:
        report = self._report(job_id)
        if report is None:
            return gr.update(visible=False)
        folder = Path(tempfile.mkdtemp(prefix="report-"))
        (folder / f"{job_id}.csv").write_text(report_csv(report))
        (folder / f"{job_id}.json").write_text(json.dumps(report, indent=1))
        (folder / f"{job_id}.md").write_text(report_markdown(report))
        return gr.update(value=[str(folder / f"{job_id}.{ext}") for ext in ("csv", "json", "md")], visible=True)
