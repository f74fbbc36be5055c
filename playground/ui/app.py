"""A first page: pick a variant, load it, prompt it, watch the reply stream with its metrics.

The side-by-side comparison, monitor and blind mode come with the UI issue; this page already
goes through the same engine calls they will use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import gradio as gr

from playground.engine import Engine
from playground.ui.formatting import error_text, metrics_line
from playground.workers import Finished, TextDelta

# Push text to the browser at most this often; the worker's own timing is unaffected.
STREAM_INTERVAL_S = 0.08


def _loaded_summary(engine: Engine) -> str:
    rows = []
    for status in engine.statuses():
        if status.state == "not loaded":
            continue
        rss = f", {status.rss_bytes / 2**20:.0f} MiB RSS" if status.rss_bytes else ""
        detail = f": {status.error}" if status.error else ""
        rows.append(f"- **{status.config.display_name}**: {status.state}{rss}{detail}")
    return "\n".join(rows) or "No variant loaded."


def build_app(engine: Engine) -> gr.Blocks:
    choices = [(c.display_name, c.id) for c in engine.configs.values()]
    default = "smollm2-135m-gguf" if "smollm2-135m-gguf" in engine.configs else (choices[0][1] if choices else None)

    with gr.Blocks(title="Variant Playground") as demo:
        gr.Markdown("# Variant Playground")
        with gr.Row():
            variant = gr.Dropdown(choices=choices, value=default, label="Variant", elem_id="variant")
            load_button = gr.Button("Load", elem_id="load")
            unload_button = gr.Button("Unload", elem_id="unload")
        estimate = gr.Markdown(elem_id="estimate")
        loaded = gr.Markdown(_loaded_summary(engine), elem_id="loaded")
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
        with gr.Row():
            send_button = gr.Button("Send", variant="primary", elem_id="send")
            stop_button = gr.Button("Stop", elem_id="stop")
        reply = gr.Textbox(label="Reply", lines=8, interactive=False, elem_id="reply")
        metrics = gr.Markdown(elem_id="metrics")

        def show_estimate(variant_id: str) -> str:
            try:
                return f"Memory estimate: {engine.estimate(variant_id).describe()}"
            except Exception as err:  # an estimate must never break the page
                return error_text(err)

        def load(variant_id: str) -> Iterator[tuple[str, str]]:
            started = time.monotonic()
            try:
                worker = engine.start_load(variant_id)
                while not worker.settled(0.5):
                    yield f"Loading… {time.monotonic() - started:.0f} s", _loaded_summary(engine)
                info = engine.load(variant_id)
                yield (
                    f"Loaded in {info.load_s:.1f} s ({info.backend}, {info.device}, {info.dtype})",
                    _loaded_summary(engine),
                )
            except Exception as err:
                yield error_text(err), _loaded_summary(engine)

        def unload(variant_id: str) -> str:
            engine.unload(variant_id)
            return _loaded_summary(engine)

        def send(variant_id: str, text: str) -> Iterator[tuple[str, str]]:
            reply_text = ""
            try:
                if engine.status(variant_id).state != "ready":
                    yield "", "Loading the variant first…"
                    engine.load(variant_id)
                request = engine.request(variant_id, prompt=text)
                last_push = 0.0
                for event in engine.generate(variant_id, request):
                    if isinstance(event, TextDelta):
                        reply_text += event.text
                        if time.monotonic() - last_push >= STREAM_INTERVAL_S:
                            last_push = time.monotonic()
                            yield reply_text, "…"
                    elif isinstance(event, Finished):
                        yield event.text, metrics_line(event.metrics)
            except Exception as err:
                yield reply_text, error_text(err)

        variant.change(show_estimate, variant, estimate)
        demo.load(show_estimate, variant, estimate)
        load_button.click(load, variant, [estimate, loaded])
        unload_button.click(unload, variant, loaded)
        sending = send_button.click(send, [variant, prompt], [reply, metrics])
        prompt.submit(send, [variant, prompt], [reply, metrics])
        stop_button.click(lambda v: engine.stop(v), variant, None, cancels=[sending])
    return demo
