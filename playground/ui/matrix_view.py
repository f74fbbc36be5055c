"""The prompt matrix of a finished `matrix` job (in the Jobs tab): prompt × variant cells with
the answer, its tokens, TTFT and decode speed and the checks it passed; a filter to the rows
where answers differ; a word-level diff between two cells; CSV, JSON and Markdown exports."""

from __future__ import annotations

import html
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from playground.jobs.store import Job
from playground.matrix import MatrixResult, differing_prompts, to_csv, to_markdown, word_diff
from playground.ui.live import LivePage, VariantView
from playground.ui.session import Session


def _cell_html(result: MatrixResult, prompt_id: str, variant: str) -> str:
    c = result.cell(prompt_id, variant)
    if c.error:
        return f'<td class="cell failed">⚠ {html.escape(c.error)}</td>'
    passed = sum(c.checks.values())
    checks = f'<span class="checks">{"✓" if passed == len(c.checks) else "✗"} {passed}/{len(c.checks)}</span> ' if c.checks else ""
    speed = f"{c.decode_tok_s:.1f} tok/s" if c.decode_tok_s is not None else "– tok/s"
    ttft = f"TTFT {c.ttft_s:.2f} s" if c.ttft_s is not None else "TTFT –"
    return (
        f'<td class="cell" data-variant="{html.escape(variant)}"><div class="answer">{html.escape(c.answer.strip())}</div>'
        f'<div class="cell-metrics">{checks}{c.completion_tokens} tok · {speed} · {ttft}</div></td>'
    )


def grid_html(result: MatrixResult, only_differing: bool) -> str:
    keep = set(differing_prompts(result)) if only_differing else {p["id"] for p in result.prompts}
    rates = result.pass_rates()
    head = "".join(
        f"<th>{html.escape(v)}<br><small>checks passed: {'–' if rates[v] is None else f'{rates[v]:.0%}'}</small></th>"
        for v in result.variants
    )
    rows = [
        f'<tr data-prompt="{html.escape(p["id"])}"><th class="prompt">{html.escape(p["id"])}<br>'
        f'<small>{html.escape(p["prompt"])}</small></th>'
        + "".join(_cell_html(result, p["id"], v) for v in result.variants)
        + "</tr>"
        for p in result.prompts
        if p["id"] in keep
    ]
    shown = f"{len(rows)} of {len(result.prompts)} prompts" + (" (answers differ)" if only_differing else "")
    return (
        f'<p class="matrix-count">{shown}</p><table class="matrix"><tr><th>prompt</th>{head}</tr>'
        + "".join(rows)
        + "</table>"
    )


def word_diff_html(a: str, b: str) -> str:
    parts = []
    for kind, text in word_diff(a, b):
        shown = html.escape(text)
        parts.append({"same": shown, "removed": f"<del>{shown}</del>", "added": f"<ins>{shown}</ins>"}[kind])
    return f'<p class="word-diff">{" ".join(parts)}</p>'


class MatrixView:
    def __init__(self, read_jobs: Callable[[], list[Job]]) -> None:
        self.read_jobs = read_jobs

    def _result(self, job_id: str | None) -> MatrixResult | None:
        job = next((j for j in self.read_jobs() if j.id == job_id), None)
        if job is None or job.kind != "matrix" or job.state != "succeeded" or not job.result:
            return None
        return MatrixResult.from_dict(job.result)

    def build(self) -> None:
        gr.Markdown("### Prompt matrix (a finished `matrix` job)")
        with gr.Row():
            self.job = gr.Dropdown([], label="matrix job", elem_id="matrix-job", scale=2)
            self.differing = gr.Checkbox(False, label="only rows where answers differ", elem_id="matrix-differing")
            export = gr.Button("Export CSV, JSON, Markdown", elem_id="matrix-export", scale=1)
        files = gr.File(label="exports", file_count="multiple", elem_id="matrix-files", visible=False)
        self.grid = gr.HTML(elem_id="matrix-grid")
        with gr.Row():
            self.prompt = gr.Dropdown([], label="word diff: prompt", elem_id="matrix-diff-prompt")
            self.left = gr.Dropdown([], label="variant A", elem_id="matrix-diff-a")
            self.right = gr.Dropdown([], label="variant B", elem_id="matrix-diff-b")
            compare = gr.Button("Word diff", elem_id="matrix-diff-run")
        diffed = gr.HTML(elem_id="matrix-word-diff")
        self.job.change(self.show, [self.job, self.differing], [self.grid, self.prompt, self.left, self.right])
        self.differing.change(self.show, [self.job, self.differing], [self.grid, self.prompt, self.left, self.right])
        compare.click(self.word_diff, [self.job, self.prompt, self.left, self.right], diffed)
        export.click(self.export, [self.job, self.differing], files)

    def follow_live(self, live: LivePage) -> None:
        """The matrix jobs that have finished, newest first, as they finish."""

        def jobs(_session: Session, _views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            done = [j.id for j in self.read_jobs() if j.kind == "matrix" and j.state == "succeeded"]
            return [(tuple(done), gr.update(choices=done, value=done[0] if done else None))]

        live.add([self.job], jobs)

    def show(self, job_id: str | None, only_differing: bool) -> list[Any]:
        result = self._result(job_id)
        if result is None:
            return ["" if not job_id else "⚠ not a finished matrix job", gr.update(), gr.update(), gr.update()]
        prompts = [p["id"] for p in result.prompts]
        variants = result.variants
        return [
            grid_html(result, only_differing),
            gr.update(choices=prompts, value=prompts[0]),
            gr.update(choices=variants, value=variants[0]),
            gr.update(choices=variants, value=variants[-1]),
        ]

    def word_diff(self, job_id: str | None, prompt_id: str | None, a: str | None, b: str | None) -> str:
        result = self._result(job_id)
        if result is None or not prompt_id or not a or not b:
            return "<p>⚠ Pick a finished matrix job, a prompt and two variants.</p>"
        try:
            left, right = result.cell(prompt_id, a), result.cell(prompt_id, b)
        except StopIteration:
            return "<p>⚠ That prompt or variant is not in this matrix.</p>"
        return f"<p><b>{html.escape(a)}</b> → <b>{html.escape(b)}</b></p>" + word_diff_html(left.answer, right.answer)

    def export(self, job_id: str | None, only_differing: bool) -> Any:
        result = self._result(job_id)
        if result is None:
            return gr.update(visible=False)
        folder = Path(tempfile.mkdtemp(prefix="matrix-"))
        (folder / f"{job_id}.csv").write_text(to_csv(result))
        (folder / f"{job_id}.json").write_text(json.dumps(result.to_dict(), indent=1))
        (folder / f"{job_id}.md").write_text(to_markdown(result, only_differing))
        return gr.update(value=[str(folder / f"{job_id}.{ext}") for ext in ("csv", "json", "md")], visible=True)
