"""The pages' live loop (ui.live): one per page, updates only for views that changed, a failing
part isolated, and many open pages leaving the server free to answer (in a real app)."""

from __future__ import annotations

import gradio as gr
from browser import browser_page, running_app

from playground.ui.live import LivePage
from playground.ui.session import Session, Sessions


class Views:
    """Stands in for LiveState: the live parts here read their own keys, not the engine."""

    look_s = 0.01

    def variants(self) -> dict:
        return {}


def test_only_changed_parts_are_sent_and_a_failing_part_is_left_as_it_was(capsys):
    keys = {"a": 1, "b": 1}
    page = LivePage(Views(), Sessions())  # type: ignore[arg-type]
    a, b1, b2, c = gr.Markdown(), gr.Markdown(), gr.Markdown(), gr.Markdown()
    page.add([a], lambda _s, _v: [(keys["a"], f"a{keys['a']}")])
    page.add([b1, b2], lambda _s, _v: [(keys["b"], f"b{keys['b']}"), ("fixed", "still")])

    def broken(_s, _v):
        raise RuntimeError("store being replaced")

    page.add([c], broken)
    assert page.outputs == [a, b1, b2, c]
    session = Session()
    sent = [[object()] * len(p.outputs) for p in page.parts]
    updates, sent = page.page_changes(session, sent)
    assert updates == ["a1", "b1", "still", gr.update()]  # the broken part: nothing sent
    assert "live view: RuntimeError: store being replaced" in capsys.readouterr().err
    assert page.page_changes(session, sent)[0] is None  # nothing changed: nothing to send
    keys["b"] = 2
    updates, sent = page.page_changes(session, sent)
    assert updates == [gr.update(), "b2", gr.update(), gr.update()]


def test_many_open_pages_leave_the_server_free_to_answer(tmp_path):
    """Every open page holds one running event; with a loop per live part (14), three pages took
    all of Gradio's 40 and a prompt waited in its queue for ever (seen with four). Eight pages
    here under the same cap of 40, then a prompt on the last one is answered."""
    env = {"PLAYGROUND_DATA_DIR": str(tmp_path / "data"), "PLAYGROUND_UI_MAX_EVENTS": "40"}
    with running_app(tmp_path / "app.log", env) as url, browser_page() as first:
        # A browser context each, as eight people would be: one context opens at most six
        # connections to a host, and each page keeps one open for its events.
        contexts = [first.context.browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(7)]
        try:
            pages = [first] + [context.new_page() for context in contexts]
            for page in pages:
                page.goto(url)
            last = pages[-1]
            last.get_by_text("smollm2-135m-gguf").first.wait_for(timeout=60_000)
            box = last.locator("#n-panels input[type=number]")
            box.fill("1")
            box.press("Enter")
            last.get_by_text("Generation settings (all panels)").click()
            tokens = last.locator("#shared-max_new_tokens input[type=number]")
            tokens.fill("8")
            tokens.press("Enter")
            last.locator("#prompt textarea").fill("Say hello.")
            last.locator("#send").click()
            last.locator("#panel-0-metrics").get_by_text("finish:").wait_for(timeout=120_000)
        finally:
            for context in contexts:
                context.close()
