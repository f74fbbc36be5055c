"""The Diff view (in Compare): a reference answers the prompt, the other variants read that
answer teacher-forced, and each shows where it departs from the reference, token by token."""

from __future__ import annotations

import html
from collections.abc import Iterator
from typing import Any

import gradio as gr

from playground.divergence import diff
from playground.engine import Engine
from playground.ui.access import Access
from playground.ui.formatting import error_text, load_progress
from playground.ui.live import LivePage, VariantView, picker_choices
from playground.ui.session import Session
from playground.ui.tokens import diff_summary_markdown, diff_tokens_html

DEFAULT_REFERENCE = "smollm2-135m-transformers"
MAX_DIFF_TOKENS = 512


class DiffView:
    def __init__(self, engine: Engine, access: Access) -> None:
        self.engine = engine
        self.access = access

    def build(self, prompt: gr.Textbox, mode: gr.Radio) -> None:
        ids = list(self.engine.catalogue.configs)
        with gr.Accordion("Diff: where variants depart from a reference, token by token", open=False):
            gr.Markdown(
                "The reference answers the prompt above; each variant reads that same answer in one "
                "forward pass. Per token: KL(reference ‖ variant) (redder is further, on a log scale from "
                "0.001 to 0.5 nats), top-1 agreement "
                "(a wavy underline where the top tokens differ). Hover a token for its numbers."
            )
            with gr.Row():
                self.reference = gr.Dropdown(
                    [(i, i) for i in ids],
                    value=DEFAULT_REFERENCE if DEFAULT_REFERENCE in ids else None,
                    label="reference",
                    elem_id="diff-reference",
                    scale=2,
                )
                self.variants = gr.Dropdown(
                    [(i, i) for i in ids],
                    value=[v for v in ("smollm2-135m-gguf",) if v in ids],
                    multiselect=True,
                    label="variants",
                    elem_id="diff-variants",
                    scale=3,
                )
                max_tokens = gr.Number(48, label="answer tokens", precision=0, elem_id="diff-max-tokens", scale=1)
                scored_after = gr.Radio(
                    [("its own prompt ids", "own"), ("the reference's", "reference")],
                    value="own",
                    label="each variant reads the answer after",
                    elem_id="diff-scored-after",
                    scale=2,
                )
            run = gr.Button("Diff", elem_id="diff-run")
            status = gr.Markdown(elem_id="diff-status")
            summary = gr.Markdown(elem_id="diff-summary")
            tokens = gr.HTML(elem_id="diff-tokens")
        run.click(
            self.run, [self.reference, self.variants, prompt, mode, max_tokens, scored_after], [status, summary, tokens]
        )

    def follow_live(self, live: LivePage) -> None:
        def choices(_session: Session, views: dict[str, VariantView]) -> list[tuple[Any, Any]]:
            listed = picker_choices(views)
            return [(tuple(listed), gr.update(choices=listed))] * 2

        live.add([self.reference, self.variants], choices)

    def run(
        self,
        reference: str | None,
        variants: list[str] | None,
        prompt: str,
        mode: str,
        max_tokens: float | None,
        scored_after: str,
        request: gr.Request,
    ) -> Iterator[tuple[str, Any, Any]]:
        others = [v for v in variants or [] if v != reference]
        if not reference or not others:
            yield "⚠ Pick a reference and at least one other variant.", gr.update(), gr.update()
            return
        if not prompt or not prompt.strip():
            yield "⚠ Type a prompt above first.", gr.update(), gr.update()
            return
        if max_tokens is None or not 1 <= max_tokens <= MAX_DIFF_TOKENS:
            yield f"⚠ answer tokens must be in 1..{MAX_DIFF_TOKENS}.", gr.update(), gr.update()
            return
        try:
            for variant_id in [reference, *others]:
                if self.engine.status(variant_id).state != "ready" and (
                    refusal := self.access.refusal(request, "load variants")
                ):
                    yield f"{refusal} ({variant_id} is not loaded)", gr.update(), gr.update()
                    return
                for loading in self.engine.loading(variant_id):
                    yield f"⏳ Loading {variant_id}… {load_progress(loading)}", gr.update(), gr.update()
            yield "⏳ The reference answers, then each variant reads its answer…", "", ""
            asked = self.engine.request(
                reference, prompt=prompt, mode=mode, max_new_tokens=int(max_tokens), temperature=0.0
            )
            result = diff(self.engine, reference, others, asked, scored_after=scored_after)  # type: ignore[arg-type]
        except Exception as err:  # shown in the view, never as a traceback
            yield error_text(err), "", ""
            return
        answer = html.escape(result.answer)
        yield (
            f"Reference answer (greedy, {result.answer_tokens} tokens): <code>{answer}</code>",
            diff_summary_markdown(result),
            diff_tokens_html(result),
        )
