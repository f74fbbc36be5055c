"""The playground as a person uses it: the real app in its own process, Debian's headless Chromium.

One app serves the whole module (starting it and loading the embedded default in both backends
is the slow part); each test drives one feature.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import factories
import httpx
import pytest
from browser import REPO, browser_page, running_app
from conftest import serving_gguf
from fake_hub import serving_hub
from playwright.sync_api import expect

pytestmark = pytest.mark.e2e
# Screenshots refresh docs/ only when asked (UPDATE_SCREENSHOTS=1), so a test run leaves the tree clean.
DOCS = (
    Path(__file__).resolve().parent.parent / "docs"
    if os.environ.get("UPDATE_SCREENSHOTS")
    else Path(tempfile.mkdtemp(prefix="screens-"))
)
METRICS = re.compile(
    r"TTFT \d+\.\d+ s · decode [\d.]+ tok/s · prefill \d+ tok/s · tokens \d+ in / \d+ out · peak mem \d+ MiB"
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub on 127.0.0.1 with one repo: a tiny Llama padded to ~26 MB, sent at ~5 MB/s so its
    download can be watched (the shipped variants' hub stays unreachable, as offline)."""
    folder = factories.make_hf_folder(tmp_path_factory.mktemp("hub") / "tiny", "llama", spare_rows=50_000)
    with serving_hub({"playground-tests/tiny-llama": folder}, chunk_bytes=256 * 1024, pause_s=0.05) as (url, _hub):
        yield url


@pytest.fixture(scope="module")
def page(tmp_path_factory, hub):
    tmp = tmp_path_factory.mktemp("app")
    extra = tmp / "more-configs"  # beside the shipped ones: a file that does not validate
    extra.mkdir()
    (extra / "half-written.yaml").write_text("id: half-written\ndisplay_name: [unclosed\n")
    (extra / "tiny-from-hub.yaml").write_text(
        "id: tiny-from-hub\ndisplay_name: Tiny Llama from a hub\nbackend: transformers\ndtype: fp32\n"
        f"source:\n  repo: playground-tests/tiny-llama\n  endpoint: {hub}\n"
    )
    # A router served by llama-cpp-python's server: a tiny GGUF whose prompts begin with BOS (its
    # prompt log-probabilities pass the self-check), its own file named as the tokenizer.
    served = factories.make_gguf(tmp / "tiny-bos.gguf", add_bos=True)
    env = {
        "PLAYGROUND_DATA_DIR": str(tmp / "data"),
        "PLAYGROUND_CONFIG_DIRS": json.dumps([str(REPO / "model_configs"), str(extra)]),
        "HF_HUB_CACHE": str(tmp / "hf-cache"),
    }
    with serving_gguf(served, "tiny-bos") as server_url:
        (extra / "tiny-remote-router.yaml").write_text(
            json.dumps(
                {
                    "id": "tiny-remote-router",
                    "display_name": "Tiny router on a server",
                    "backend": "openai",
                    "endpoint": {"base_url": server_url},
                    "tokenizer": {"path": str(served)},
                    "prompt_format": "raw",
                    "context_length": 256,
                    "role": "router",
                    "router": {
                        "routes": ["self", "npc_fin"],
                        "escalate_route": "npc_fin",
                        "system_prompt": "Route the request: self or npc_fin. Answer in JSON.",
                        "system_prompt_source": "written for the tests",
                    },
                }
            )
        )
        with running_app(tmp / "app.log", env) as url, browser_page() as page:
            page.goto(url)
            yield page


@pytest.fixture(autouse=True)
def no_answer_left_streaming(request):
    """A test that fails mid-answer must not leave the next one a busy Send button."""
    yield
    if "page" not in request.fixturenames:
        return
    page = request.getfixturevalue("page")
    for stop in page.locator("[id^=panel-][id$=-stop]").all():
        if stop.is_visible():
            stop.click()
    page.locator("#send:not([disabled])").wait_for(state="attached", timeout=30_000)


def wait_text(locator, pattern: str, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = locator.inner_text()
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} did not appear; last text: {text!r}")


def stays_without(locator, text: str, seconds: float) -> None:
    """`text` stays out of the locator's text for `seconds` (a late update would bring it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert text not in locator.inner_text()
        time.sleep(0.2)


def ask_one_panel(page, prompt: str, max_new_tokens: int) -> None:
    """One panel, a token limit, one prompt sent and answered to its end."""
    set_number(page, "n-panels", 1)
    open_shared_settings(page)
    set_number(page, "shared-max_new_tokens", max_new_tokens)
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#send").click()
    wait_text(page.locator("#panel-0-metrics"), "finish: (length|stop)", 120)


def upload(page, elem_id: str, path: Path) -> None:
    """Choose a file through an upload button, as a person does."""
    with page.expect_file_chooser() as chooser:
        page.locator(f"#{elem_id}").click()
    chooser.value.set_files(str(path))


def open_shared_settings(page) -> None:
    """Open the shared settings (a click on a shown accordion would close it)."""
    if not page.locator("#shared-max_new_tokens").is_visible():
        page.get_by_text("Generation settings (all panels)").click()
    page.locator("#shared-max_new_tokens").wait_for(timeout=10_000)


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_the_startup_load_shows_live_and_every_picker_marks_state_and_disk(page):
    """No reload anywhere: the page follows the engine (ui.live)."""
    loaded = page.locator("#loaded")
    wait_text(loaded, r"smollm2-135m-gguf\)`?: loading\s+\d+ s", 30)
    assert loaded.locator("progress.load-progress").count() == 1  # a bar, with no guessed percentage
    wait_text(loaded, r"smollm2-135m-gguf\)`?: ready", 120)
    # Its picker follows within a second (a live part of its own).
    picker = page.locator("#panel-0-variant input")
    page.wait_for_function("e => e.value.includes('ready')", arg=picker.element_handle(), timeout=5_000)
    # The pickers say what is on disk and what would need a download, with its size.
    page.locator("#model input").click()
    options = [o.inner_text() for o in page.get_by_role("option").all()]
    page.get_by_text("Small language models side by side").click()  # closes the list
    assert "NPC Fast 1.7B (bf16) · needs a download (~3.4 GB)" in options
    assert "SmolLM2-135M-Instruct Q4_1 dequantized (transformers) · on disk" in options
    # Offline, a variant whose weights are absent is refused in seconds, saying how to get them.
    choose(page, "model", "NPC Nano 0.5B v2-math (base)")
    page.locator("#load").click()
    wait_text(page.locator("#load-status"), r"are not on this machine.*hf download ramankrishna10/npc-nano", 20)
    wait_text(loaded, r"npc-nano-0\.5b-v2-math\)`?: ⚠ failed", 5)
    choose(page, "model", "SmolLM2-135M-Instruct Q4_1 (llama.cpp)")
    wait_text(page.locator("#load-status"), r"^\s*$", 5)  # a new choice clears the old message
    # Panels 3 and 4 start on a loaded variant.
    set_number(page, "n-panels", 4)
    page.locator("#panel-3-variant input").wait_for(timeout=10_000)
    assert page.locator("#panel-3-variant input").input_value().startswith("SmolLM2-135M-Instruct Q4_1")
    set_number(page, "n-panels", 2)


def test_a_download_shows_its_bytes_while_it_loads_then_the_variant_is_on_disk(page):
    """Online (a hub on 127.0.0.1): the status line and the loaded list show the bytes received
    of the total with a bar, while it happens; then ready, and the picker says on disk."""
    choose(page, "model", "Tiny Llama from a hub · needs a download")
    page.locator("#load").click()
    wait_text(page.locator("#load-status"), r"downloading 0\.0 MB of 26\.\d MB", 30)  # the total, before a byte
    status = wait_text(page.locator("#load-status"), r"downloading [1-9]\d*\.\d MB of 26\.\d MB", 30)
    assert page.locator("#load-status progress.load-progress[max]").count() == 1, status
    wait_text(page.locator("#loaded"), r"tiny-from-hub\)`?: loading .*downloading [1-9]\d*\.\d MB of 26\.\d MB", 10)
    page.screenshot(path=str(DOCS / "download.png"), full_page=True)
    wait_text(page.locator("#load-status"), r"✅ tiny-from-hub loaded", 60)
    wait_option(page, "model", "Tiny Llama from a hub · ● ready")
    page.locator("#unload").click()
    wait_text(page.locator("#load-status"), "tiny-from-hub unloaded", 20)
    choose(page, "model", "Tiny Llama from a hub · on disk")


def test_both_backends_stream_side_by_side_with_metrics_and_export(page):
    page.get_by_text("Before loading:").wait_for(timeout=30_000)
    # Short answers: on a 2-core CI machine a sampled 256-token answer from the transformers
    # panel (loading first) took over two minutes.
    open_shared_settings(page)
    set_number(page, "shared-max_new_tokens", 64)
    page.locator("#prompt textarea").fill("What is the capital of France?")
    page.locator("#send").click()
    # While it streams the button is busy; then each panel shows its own metrics.
    first = wait_text(page.locator("#panel-0-metrics"), METRICS.pattern, 120)
    second = wait_text(page.locator("#panel-1-metrics"), METRICS.pattern, 120)
    assert "llamacpp on cpu" in first and "transformers on cpu" in second
    assert page.locator("#panel-0-chat").get_by_text("What is the capital of France?").count() == 1
    # The loaded list says how each transformers variant decodes (plain generate on a CPU, and why).
    wait_text(page.locator("#loaded"), r"smollm2-135m-transformers.*ready.*plain generate \(the fast path is for CUDA")
    page.locator("#comparison-plot").get_by_text("decode tok/s by reply").wait_for(timeout=20_000)
    page.screenshot(path=str(DOCS / "compare.png"), full_page=True)
    page.locator("#export").click()
    link = page.locator('#export-json a[download="comparison.json"]')
    link.wait_for(timeout=20_000)
    exported = httpx.get(link.get_attribute("href"), timeout=10).json()
    assert exported["prompt"] == "What is the capital of France?"
    assert [a["variant_id"] for a in exported["answers"]] == ["smollm2-135m-gguf", "smollm2-135m-transformers"]
    assert all(a["metrics"]["completion_tokens"] >= 1 for a in exported["answers"])
    assert page.locator('#export-md a[download="comparison.md"]').count() == 1
    # No run kept in the browser: Gradio's run history would rewrite it with every frame, and
    # keep prompts and answers on a shared laptop.
    kept = page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('gradio:run-history'))")
    assert kept == [], kept


def test_stop_frees_one_panel_while_the_other_streams_on(page):
    open_shared_settings(page)
    set_number(page, "shared-max_new_tokens", 600)
    # Panel 2 (transformers, the slower one on a 2-core CPU) ends on its own sooner.
    page.locator("#panel-1").get_by_text("Settings for this panel").click()
    page.locator("#panel-1-override input[type=checkbox]").check()
    set_number(page, "panel-1-max_new_tokens", 96)
    page.locator("#prompt textarea").fill("Write a long story about a lighthouse keeper.")
    page.locator("#send").click()
    wait_text(page.locator("#panel-0-chat"), r"lighthouse keeper\.[\s\S]+\w", 60)
    # A second prompt while this one streams is refused, not mixed into the panels.
    page.locator("#prompt textarea").fill("Another question")
    page.locator("#prompt textarea").press("Shift+Enter")  # submits a multi-line box
    wait_text(page.locator("#send-notice"), "Still answering the last prompt", 10)
    assert page.locator("#panel-0-chat").get_by_text("Another question").count() == 0
    page.locator("#panel-0-stop").click()
    stopped = wait_text(page.locator("#panel-0-metrics"), "finish: cancelled", 10)
    assert METRICS.search(stopped)
    # The other panel is not stopped: it ends on its own (limit or end of text).
    other = wait_text(page.locator("#panel-1-metrics"), "finish: (length|stop)", 240)
    assert "cancelled" not in other
    assert re.search(r"/ (\d+) out", other) and int(re.search(r"/ (\d+) out", other).group(1)) <= 96


def test_impossible_settings_are_refused_at_their_field_and_an_empty_seed_is_random(page):
    open_shared_settings(page)
    set_number(page, "n-panels", 1)
    page.locator("#prompt textarea").fill("Name a colour.")
    for field, value, message in [
        ("max_new_tokens", -5, "max new tokens must be greater than or equal to 1"),
        ("temperature", -1, "temperature must be greater than or equal to 0"),
        ("top_p", 7, "top-p must be less than or equal to 1"),
    ]:
        set_number(page, f"shared-{field}", value)
        page.locator("#send").click()
        page.locator(f"#shared-{field}").get_by_text(message).wait_for(timeout=10_000)
        assert page.locator(f"#shared-{field} input").input_value() == str(value)  # never changed silently
        set_number(page, f"shared-{field}", {"max_new_tokens": 8, "temperature": 1.2, "top_p": 1}[field])
    time.sleep(1)
    assert page.locator("#panel-0-chat").get_by_text("Name a colour.").count() == 0  # nothing was sent
    # The seed field starts empty, and empty means random: the same prompt twice, two answers.
    assert page.locator("#shared-seed textarea, #shared-seed input").first.input_value() == ""
    answers = []
    for _ in range(2):
        page.locator("#clear").click()
        page.locator("#send").click()
        wait_text(page.locator("#panel-0-metrics"), "finish:", 120)
        answers.append(page.locator("#panel-0-chat").inner_text())
    assert answers[0] != answers[1]
    set_number(page, "shared-max_new_tokens", 256)
    set_number(page, "shared-temperature", 0.7)
    set_number(page, "shared-top_p", 0.95)
    set_number(page, "n-panels", 2)
    page.locator("#clear").click()


def test_completion_output_is_shown_as_written(page):
    page.get_by_role("radio", name="completion").check()
    ask_one_panel(page, "# fibonacci_30\ndef fib(n):\n    ", 48)
    chat = page.locator("#panel-0-chat")
    assert chat.locator("h1").count() == 0  # the comment is not a heading
    assert "# fibonacci_30\ndef fib(n):" in chat.locator("pre").first.inner_text()
    set_number(page, "shared-max_new_tokens", 256)
    page.get_by_role("radio", name="chat").check()
    set_number(page, "n-panels", 2)
    page.locator("#clear").click()


def test_a_speculative_variant_says_under_its_reply_what_its_drafts_bought(page):
    """The embedded model with prompt lookup: a greedy reply shows the drafts kept and the
    speed-up over its own first plain steps; a sampled one says it decoded plainly."""
    set_number(page, "n-panels", 1)
    choose(page, "panel-0-variant", "SmolLM2-135M-Instruct Q4_1 + prompt lookup (llama.cpp)")
    # The panel may still show an earlier test's reply, whose metrics would pass for this one's.
    # (30 s: on a loaded machine the clear waited behind the reply's last updates once.)
    page.locator("#clear").click()
    wait_text(page.locator("#panel-0-metrics"), r"^(?![\s\S]*finish:)", 30)
    open_shared_settings(page)
    set_number(page, "shared-temperature", 0)
    try:
        ask_one_panel(page, "Repeat this list exactly: red, green, blue, red, green, blue, red, green, blue.", 32)
        metrics = page.locator("#panel-0-metrics").inner_text()
        found = re.search(r"speculative \(prompt-lookup\): (\d+) of (\d+) drafted tokens kept \((\d+) %\)", metrics)
        assert found and int(found.group(1)) <= int(found.group(2)) > 0, metrics
        assert re.search(r"×\d+\.\d\d decode speed against its first plain steps", metrics), metrics
        page.locator("#clear").click()
        wait_text(page.locator("#panel-0-metrics"), r"^(?![\s\S]*finish:)", 30)
        set_number(page, "shared-temperature", 0.7)
        ask_one_panel(page, "Name a colour.", 8)
        assert "speculative decoding off: it is for greedy replies" in page.locator(
            "#panel-0-metrics"
        ).inner_text()
    finally:
        set_number(page, "shared-temperature", 0.7)
        set_number(page, "shared-max_new_tokens", 256)
        choose(page, "panel-0-variant", "SmolLM2-135M-Instruct Q4_1 (llama.cpp)")
        set_number(page, "n-panels", 2)
        page.locator("#clear").click()


def test_clear_while_an_answer_streams_stops_it_and_starts_a_new_conversation(page):
    """Clear mid-answer: the answer stops, its last frames do not draw it back, and the next
    prompt is the first of a new conversation."""
    set_number(page, "n-panels", 1)
    open_shared_settings(page)
    set_number(page, "shared-max_new_tokens", 600)
    try:
        page.locator("#prompt textarea").fill("Write a long story about a lighthouse keeper.")
        page.locator("#send").click()
        wait_text(page.locator("#panel-0-chat"), r"lighthouse keeper\.[\s\S]+\w", 60)
        page.locator("#clear").click()
        page.locator("#send:not([disabled])").wait_for(state="attached", timeout=30_000)
        assert "lighthouse" not in page.locator("#panel-0-chat").inner_text()
        assert "finish:" not in page.locator("#panel-0-metrics").inner_text()
        assert "⏳" not in page.locator("#send-status").inner_text()
        ask_one_panel(page, "Say hi.", 16)
        chat = page.locator("#panel-0-chat").inner_text()
        assert "Say hi." in chat and "lighthouse" not in chat, chat
    finally:
        set_number(page, "shared-max_new_tokens", 256)
        set_number(page, "n-panels", 2)
        page.locator("#clear").click()


def test_unloading_a_variant_while_it_answers_says_so_in_its_panel(page):
    set_number(page, "n-panels", 1)
    open_shared_settings(page)
    set_number(page, "shared-max_new_tokens", 600)
    page.locator("#prompt textarea").fill("Write a long story about a lighthouse keeper.")
    page.locator("#send").click()
    wait_text(page.locator("#panel-0-chat"), r"lighthouse keeper\.[\s\S]+\w", 60)
    choose(page, "model", "SmolLM2-135M-Instruct Q4_1 (llama.cpp)")
    page.locator("#unload").click()
    wait_text(page.locator("#panel-0-metrics"), "finish: unloaded while answering", 30)
    page.locator("#load").click()
    wait_text(page.locator("#load-status"), "loaded in", 120)
    set_number(page, "shared-max_new_tokens", 256)
    set_number(page, "n-panels", 2)
    page.locator("#clear").click()


def test_a_session_exports_every_turn_loads_back_and_a_link_preselects(page, tmp_path):
    page.locator("#clear").click()  # a session of its own, from here
    ask_one_panel(page, "Say hi.", 16)
    set_number(page, "shared-max_new_tokens", 600)
    page.locator("#prompt textarea").fill("Write a long story about a lighthouse keeper.")
    page.locator("#send").click()
    wait_text(page.locator("#panel-0-chat"), r"lighthouse keeper\.[\s\S]+\w", 60)
    page.locator("#panel-0-stop").click()
    wait_text(page.locator("#panel-0-metrics"), "finish: cancelled", 20)
    link = page.locator('#export-json a[download="comparison.json"]')
    # an earlier test's export may still be on the page: wait for this one's link
    earlier = link.get_attribute("href") if link.count() else None
    page.locator("#export").click()
    if earlier is None:
        link.wait_for(timeout=20_000)
    else:
        expect(link).not_to_have_attribute("href", earlier, timeout=20_000)
    saved = httpx.get(link.get_attribute("href"), timeout=10).text
    turns = json.loads(saved)["panels"][0]["turns"]
    assert [t["prompt"] for t in turns] == ["Say hi.", "Write a long story about a lighthouse keeper."]
    assert turns[0]["settings"]["max_new_tokens"] == 16 and turns[1]["settings"]["max_new_tokens"] == 600
    assert turns[1]["metrics"]["finish_reason"] == "cancelled"
    markdown = httpx.get(page.locator('#export-md a[download="comparison.md"]').get_attribute("href"), timeout=10).text
    assert "cancelled by Stop (the answer is incomplete)" in markdown and "> Say hi." in markdown
    # Loaded back while another answer streams: that answer stops, and the conversation and
    # the settings return and stay (the answer's last frame does not draw over them).
    page.locator("#clear").click()
    set_number(page, "shared-max_new_tokens", 256)
    page.locator("#prompt textarea").fill("Write a long story about a dragon.")
    page.locator("#send").click()
    wait_text(page.locator("#panel-0-chat"), r"dragon\.[\s\S]+\w", 60)
    session_file = tmp_path / "session.json"
    session_file.write_text(saved)
    upload(page, "load-session", session_file)
    wait_text(page.locator("#send-status"), r"Loaded the session of .*: 1 panel\(s\), 2 answer\(s\)", 40)
    page.locator("#send:not([disabled])").wait_for(state="attached", timeout=30_000)
    chat = wait_text(page.locator("#panel-0-chat"), r"Say hi\.[\s\S]*lighthouse keeper", 10)
    assert "about a dragon" not in chat
    assert page.locator("#shared-max_new_tokens input").input_value() == "600"
    # A file that is not a session is refused with the reason, and nothing changes.
    (tmp_path / "other.json").write_text('{"hello": 1}')
    upload(page, "load-session", tmp_path / "other.json")
    wait_text(page.locator("#send-status"), r"not a saved session: no `?format`? field", 20)
    set_number(page, "shared-max_new_tokens", 256)
    page.locator("#clear").click()
    set_number(page, "n-panels", 2)
    # A link chooses the variants, the mode and the prompt.
    context = page.context.browser.new_context(viewport={"width": 1400, "height": 1000})
    shared = context.new_page()
    try:
        query = "variants=smollm2-135m-transformers,no-such-variant&mode=completion&prompt=Once%20upon%20a%20time"
        shared.goto(page.url.split("?")[0] + "?" + query)
        shared.locator("#prompt textarea").wait_for(timeout=30_000)
        wait_text(shared.locator("#send-notice"), "does not have: no-such-variant", 20)
        assert shared.locator("#panel-0-variant input").input_value().startswith("SmolLM2-135M-Instruct Q4_1 dequantized")
        assert shared.locator("#prompt textarea").input_value() == "Once upon a time"
        assert shared.get_by_role("radio", name="completion").is_checked()
    finally:
        context.close()


def test_four_panels_keep_names_readable_and_show_the_newest_answer(page):
    set_number(page, "n-panels", 4)
    open_shared_settings(page)
    set_number(page, "shared-max_new_tokens", 24)
    for question in ("Name a colour.", "Name a tree."):
        page.locator("#prompt textarea").fill(question)
        page.locator("#send").click()
        wait_text(page.locator("#send-status"), "⏳", 30)  # busy, then done: every panel answered
        wait_text(page.locator("#send-status"), r"^(?!⏳)\d panel", 240)
    for i in range(4):
        picker = page.locator(f"#panel-{i}-variant input")
        # The whole label (name and state) fits its box.
        assert picker.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), picker.input_value()
        chat = page.locator(f"#panel-{i}-chat")
        assert chat.get_by_text("Name a tree.").is_visible()
        # Scrolled to the newest answer: the scrolling box is at its bottom.
        assert chat.evaluate(
            """e => [...e.querySelectorAll('*')].filter(x => x.scrollHeight > x.clientHeight + 4
                   && getComputedStyle(x).overflowY !== 'visible')
                 .every(x => x.scrollHeight - x.scrollTop - x.clientHeight < 8)"""
        )
        # No toolbar sits over the messages: every button in the chat is clear of every message.
        assert chat.evaluate(
            """e => { const boxes = s => [...e.querySelectorAll(s)].map(x => x.getBoundingClientRect());
                 const hit = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
                 const texts = boxes('.message-content, .prose');
                 return boxes('button').every(b => texts.every(t => !hit(b, t))); }"""
        )
    page.screenshot(path=str(DOCS / "compare-4.png"), full_page=True)
    set_number(page, "shared-max_new_tokens", 256)
    set_number(page, "n-panels", 2)
    page.locator("#clear").click()


def test_the_token_view_shows_each_tokens_probability_and_alternatives(page):
    page.locator("#token-view input").check()
    try:
        ask_one_panel(page, "Name three colours.", 12)
        out = int(re.search(r"/ (\d+) out", page.locator("#panel-0-metrics").inner_text()).group(1))
        tokens = page.locator("#panel-0-tokens span.tok")
        tokens.first.wait_for(timeout=30_000)
        assert tokens.count() == out > 0
        tip = tokens.first.get_attribute("title")
        assert re.search(r"p = [01]\.\d{3} · (rank \d|not in the top 5)", tip) and "top 5: " in tip, tip
        assert 0 <= float(tokens.first.get_attribute("data-p")) <= 1
        assert "hsl(" in tokens.first.get_attribute("style")  # coloured by its probability
        assert re.search(r"scored in \d+\.\d\d s after the answer", page.locator("#panel-0-tokens").inner_text())
        page.locator("#panel-0").screenshot(path=str(DOCS / "tokens.png"))
    finally:
        page.locator("#token-view input").uncheck()
        set_number(page, "n-panels", 2)
        open_shared_settings(page)
        set_number(page, "shared-max_new_tokens", 256)
        page.locator("#clear").click()


def test_the_diff_view_colours_the_reference_answer_by_divergence(page):
    page.get_by_text("Diff: where variants depart from a reference").click()
    page.locator("#prompt textarea").fill("What is the capital of France?")
    set_number(page, "diff-max-tokens", 12)
    page.locator("#diff-run").click()
    summary = wait_text(page.locator("#diff-summary"), r"smollm2-135m-gguf\s+[\d.]+\s+[\d.]+%", 120)
    assert re.search(r"smollm2-135m-gguf.*equal", summary), summary  # the same prompt token ids
    answered = int(re.search(r"greedy, (\d+) tokens", page.locator("#diff-status").inner_text()).group(1))
    tokens = page.locator('#diff-tokens .diff-variant[data-variant="smollm2-135m-gguf"] span.tok')
    assert tokens.count() == answered and 0 < answered <= 12
    kls = [float(t.get_attribute("data-kl")) for t in tokens.all()]
    assert all(k >= 0 for k in kls) and any(k > 0 for k in kls)
    assert "KL(reference ‖ variant)" in tokens.first.get_attribute("title")
    page.screenshot(path=str(DOCS / "diff.png"), full_page=True)
    # Nothing to compare with: said in the view, nothing runs.
    page.locator("#diff-variants").get_by_role("button", name=re.compile("Remove|×")).first.click()
    page.locator("#diff-run").click()
    wait_text(page.locator("#diff-status"), "Pick a reference and at least one other variant", 10)


def test_a_bad_path_gets_a_clear_message(page, tmp_path):
    page.get_by_text("Add a variant from a local path").click()
    path_box = page.locator("#add-path textarea, #add-path input").first
    path_box.fill(str(tmp_path / "nowhere" / "model.gguf"))
    page.locator("#add").click()
    wait_text(page.locator("#add-status"), "does not exist", 20)
    (tmp_path / "notes.txt").write_text("not a model")
    path_box.fill(str(tmp_path / "notes.txt"))
    page.locator("#add").click()
    wait_text(page.locator("#add-status"), "unknown weights format", 20)
    # Outside the allowed roots (settings), even through .. : refused before anything is read.
    path_box.fill(str(tmp_path) + "/.." * 12 + "/etc/passwd")
    page.locator("#add").click()
    wait_text(page.locator("#add-status"), "outside the folders this playground may read", 20)
    # A folder whose config.json is not JSON: named at once, with the place, and not added.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama",')
    path_box.fill(str(broken))
    wait_text(page.locator("#add-status"), r"^\s*$", 5)  # a new path clears the old message
    page.locator("#add").click()
    status = wait_text(page.locator("#add-status"), r"config\.json: not valid JSON \(line 1, column \d+\)", 20)
    assert status.count("⚠") == 1 and "Added" not in status


def test_a_killed_worker_marks_its_panel_failed_and_offers_reload(page):
    loaded = page.locator("#loaded").inner_text()
    pid = int(re.search(r"smollm2-135m-gguf\).*?pid (\d+)", loaded).group(1))
    page.locator("#prompt textarea").fill("Tell me about the sea, at length.")
    page.locator("#send").click()
    wait_text(page.locator("#panel-0-chat"), r"at length\.[\s\S]+\w", 60)
    os.kill(pid, signal.SIGKILL)
    wait_text(page.locator("#panel-0-metrics"), "killed by SIGKILL.*Reload", 20)
    wait_text(page.locator("#loaded"), r"smollm2-135m-gguf\)`?: ⚠ dead", 5)
    wait_text(page.locator("#panel-1-metrics"), "finish: (length|stop)", 240)  # the other panel streamed on
    page.locator("#panel-0-reload").click()
    wait_text(page.locator("#panel-0-metrics"), r"Reloaded in", 60)


def test_a_stopped_worker_shows_as_hung_and_ready_again_and_broken_configs_are_listed(page):
    """SIGSTOP while idle: no request is running to notice; the heartbeat does, and the page
    says so, then says ready once the worker answers again."""
    page.get_by_role("tab", name="Compare").click()
    loaded = page.locator("#loaded")
    # The whole parser message stays in its list item (its caret line once broke the list).
    item = loaded.locator("li", has_text="half-written.yaml").inner_text()
    assert re.search(r"broken config `?half-written.yaml`?: .*not valid YAML.*but got", item), item
    wait_text(loaded, r"smollm2-135m-gguf\)`?: ready", 60)
    pid = int(re.search(r"smollm2-135m-gguf\).*?pid (\d+)", loaded.inner_text()).group(1))
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_text(loaded, r"smollm2-135m-gguf\)`?: ⚠ hung.*stopped answering: no heartbeat", 30)
        picker = page.locator("#panel-0-variant input").element_handle()
        page.wait_for_function("e => e.value.endsWith('⚠ hung')", arg=picker, timeout=5_000)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_text(loaded, r"smollm2-135m-gguf\)`?: ready", 30)


def test_monitor_moves_every_second(page):
    page.get_by_role("tab", name="Monitor").click()
    summary = page.locator("#monitor-summary")
    first = wait_text(summary, r"CPU \d+%", 20)
    assert "No NVIDIA GPU" in page.locator("#gpu-note").inner_text()
    deadline = time.monotonic() + 15
    while summary.inner_text() == first and time.monotonic() < deadline:
        time.sleep(0.3)
    assert summary.inner_text() != first, "the monitor did not refresh"
    page.locator("#monitor-plot").get_by_text("CPU (%)").wait_for(timeout=10_000)
    # The shipped 32B partner's server (127.0.0.1:8000 by default) is not running here.
    wait_text(summary, r"npc-fin-32b-endpoint → http://127\.0\.0\.1:8000/v1: unreachable \(ConnectError\)", 10)
    page.screenshot(path=str(DOCS / "monitor.png"), full_page=True)


def test_blind_vote_updates_the_leaderboard(page, tmp_path):
    page.get_by_role("tab", name="Compare").click()
    if not re.search(
        r"transformers\).*ready[\s\S]*gguf\).*ready|gguf\).*ready[\s\S]*transformers\).*ready",
        page.locator("#loaded").inner_text(),
    ):
        # Run on its own, this test first loads both default panels the way a person would: by sending.
        page.locator("#prompt textarea").fill("Hi")
        page.locator("#send").click()
        wait_text(page.locator("#panel-1-metrics"), "finish:", 180)
    page.get_by_role("tab", name="Blind").click()
    wait_text(page.locator("#leaderboard"), "No votes yet", 10)
    page.locator("#arena-new").click()
    wait_text(page.locator("#arena-info"), "new pair is ready", 20)
    page.locator("#arena-prompt textarea, #arena-prompt input").first.fill("Say hello.")
    page.locator("#arena-tag input").fill("greetings")  # a new category, typed
    page.locator("#arena-send").click()
    wait_text(page.locator("#arena-info"), "Which is better", 180)
    page.locator("#vote-a").click()
    reveal = wait_text(page.locator("#arena-reveal"), "Model A was", 20)
    assert "SmolLM2-135M" in reveal
    # The rendered table reads as tab-separated cells: rank, variant, rating, interval, votes, wins,
    # losses. One vote and the prior's one tie: 1.5 of 2 points, strengths 3:1, ±95 on the Elo scale.
    board = wait_text(page.locator("#leaderboard"), r"1\tsmollm2-135m-\S+\t1095\t\? – \?\t1\t1\t0", 20)
    assert re.search(r"2\tsmollm2-135m-\S+\t905\t\? – \?\t1\t0\t1", board)
    notes = wait_text(page.locator("#leaderboard-notes"), r"Bradley–Terry over 1 vote", 10)
    assert "not separated yet" in notes
    assert "100% (1)" in page.locator("#winrate").inner_text()
    # Style control: the same votes with length and Markdown as covariates.
    page.locator("#style-control input").check()
    wait_text(page.locator("#leaderboard-notes"), r"with style control over 1 vote[\s\S]*Style effects", 30)
    page.locator("#style-control input").uncheck()
    # The category typed with the prompt is offered as a filter.
    choose(page, "leaderboard-tag", "greetings")
    wait_text(page.locator("#leaderboard-notes"), r"Only votes tagged 'greetings'", 20)
    choose(page, "leaderboard-tag", "all categories")
    # Votes out as JSON and CSV; another session's votes merged in.
    page.locator("#votes-export").click()
    wait_text(page.locator("#votes-files"), r"votes-\S+\s*\.json[\s\S]*votes-\S+\s*\.csv", 20)
    other = tmp_path / "other-session.csv"
    a, b = re.findall(r"smollm2-135m-\S+(?=\t)", board)[:2]
    other.write_text(
        "variant_a,variant_b,outcome,prompt,answer_a,answer_b,tag,session\n"
        f"{a},{b},b,Name a colour.,Red.,Blue,colours,demo 2\n{b},{a},tie,Count to 3.,1 2 3,1 2 3,,demo 2\n"
    )
    upload(page, "votes-import", other)
    wait_text(page.locator("#votes-status"), r"Imported 2 votes from other-session\.csv\.", 20)
    wait_text(page.locator("#leaderboard-notes"), r"Bradley–Terry over 3 votes", 10)  # live, no reload
    broken = tmp_path / "broken.json"
    broken.write_text('{"votes": [{"variant_a": "x", "variant_b": "y", "outcome": "sideways"}]}')
    upload(page, "votes-import", broken)
    wait_text(page.locator("#votes-status"), r"broken\.json, vote 1: outcome", 20)
    page.screenshot(path=str(DOCS / "blind.png"), full_page=True)
    # New pair while a round is answered: the round stops, and its answers do not come back
    # over the new pair, nor its vote buttons.
    page.locator("#arena-prompt textarea, #arena-prompt input").first.fill("Write a long story about a lighthouse keeper.")
    page.locator("#arena-send").click()
    wait_text(page.locator("#arena-a"), r"lighthouse keeper\.[\s\S]+\w", 60)
    page.locator("#arena-new").click()
    wait_text(page.locator("#arena-info"), "new pair is ready", 40)
    stays_without(page.locator("#arena-a"), "lighthouse", 3)
    expect(page.locator("#vote-a")).to_be_disabled()


def test_router_view_decides_answers_and_evaluates(page, tmp_path):
    page.get_by_role("tab", name="Router").click()
    wait_text(page.locator("#router-state"), r"not loaded \(it loads when you send a request\)", 10)
    answer_tokens = page.locator("#router-answer-tokens input[type='number']")
    answer_tokens.fill("24")  # short answers here; the Stop below gets a long one
    answer_tokens.press("Tab")
    page.locator("#router-prompt textarea").fill("Build a DCF for TSLA with 3 scenarios.")
    page.locator("#router-go").click()
    wait_text(page.locator("#router-decision"), r"Loading the router…\s+\d+ s", 30)  # a bar, then seconds
    wait_text(page.locator("#router-state"), r"loading the router…\s+\d+ s", 10)
    card = wait_text(page.locator("#router-decision"), r"Route: (self|npc_fin)", 90)
    assert re.search(r"P\(escalate\) 0\.\d{3}", card) and re.search(r"Route decided in \d+ ms \(scoring \d+ ms\); its reason written in [\d.]+ s", card)
    assert "Reason:" in card  # llama.cpp writes under a JSON grammar: a valid answer with a reason
    # No partner chosen: the router answers itself, streamed, with the usual metrics.
    wait_text(page.locator("#router-metrics"), METRICS.pattern, 90)
    assert "answered by" in card
    wait_text(page.locator("#router-trail"), r"Build a DCF for TSLA", 10)
    wait_text(page.locator("#router-state"), r": ready", 5)
    # A long answer is stopped from its own button.
    answer_tokens.fill("400")
    answer_tokens.press("Tab")
    page.locator("#router-prompt textarea").fill("Write a long story about a lighthouse keeper, please.")
    page.locator("#router-go").click()
    wait_text(page.locator("#router-metrics"), "streaming…", 60)
    page.locator("#router-stop").click()
    metrics = wait_text(page.locator("#router-metrics"), "finish: cancelled", 20)
    assert int(re.search(r"/ (\d+) out", metrics).group(1)) < 400
    answer_tokens.fill("24")
    answer_tokens.press("Tab")
    page.get_by_text("Evaluate the router").click()
    # The in-page eval can be cancelled.
    page.locator("#eval-run").click()
    wait_text(page.locator("#eval-status"), r"⏳ [1-9]\d*/\d+ rows", 60)
    page.locator("#eval-cancel").click()
    wait_text(page.locator("#eval-status"), r"cancelled after \d+ of \d+ rows", 60)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"prompt": "Hello there", "route": "self"}\n{"prompt": "Value Apple with a DCF", "route": "npc_fin"}\n'
    )
    page.get_by_role("radio", name="file").check()
    page.locator("#eval-path textarea, #eval-path input").first.fill(str(rows))
    page.locator("#eval-run").click()
    result = wait_text(page.locator("#eval-status"), r"2 rows.*accuracy", 120)
    assert "JSON valid 1.000" in result
    assert re.search(r"AUROC [01]\.\d{3}, ECE [01]\.\d{3}, Brier [01]\.\d{3}; route decided in p50 \d+ ms, p95 \d+ ms; with the written reason p50 [\d.]+ s", result)
    page.locator("#eval-plot").get_by_text("escalation rate and accuracy by threshold").wait_for(timeout=20_000)
    page.locator("#eval-plot").get_by_text("reliability: observed against predicted").wait_for(timeout=5_000)
    # A calibration fitted on the same rows (both routes) is stored and every decision then uses it.
    page.get_by_role("radio", name="isotonic").check()
    page.locator("#calibrate-run").click()
    wait_text(page.locator("#eval-status"), r"Calibrated: isotonic on \S+rows\.jsonl \(2 rows\)\. ECE", 120)
    page.locator("#router-prompt textarea").fill("Hello there!")
    page.locator("#router-go").click()
    wait_text(page.locator("#router-decision"), r"\(calibrated, isotonic on \S+ \(2 rows\); raw 0\.\d{3}\)", 60)
    wait_text(page.locator("#router-metrics"), "finish:", 90)
    page.locator("#calibrate-remove").click()
    wait_text(page.locator("#eval-status"), "Calibration removed", 10)
    page.screenshot(path=str(DOCS / "router.png"), full_page=True)
    # The same eval as a background job (the Jobs tab test sees it end).
    page.locator("#eval-background").click()
    wait_text(page.locator("#eval-status"), r"Started job \S+ \((running|queued)\)", 20)
    page.get_by_role("tab", name="Jobs").click()
    wait_text(page.locator("#job-table"), r"eval-router\s+smollm2-135m-router\s+succeeded\s+2/2", 120)


def test_cost_quality_curves_of_several_routers_share_one_chart_and_table(page, tmp_path):
    """A quality file drawn for two routers at once: one table with each router's APGR and CPTs,
    one chart with the baselines; a router whose weights are not here is named in the table while
    the others are drawn; a malformed file is refused before any router loads."""
    page.get_by_role("tab", name="Router").click()
    page.get_by_text("Cost against quality").click()
    bad = tmp_path / "bad-quality.jsonl"
    bad.write_text('{"prompt": "Hello", "weak_quality": "good", "strong_quality": 1}\n')
    page.locator("#curve-path textarea, #curve-path input").first.fill(str(bad))
    page.locator("#curve-run").click()
    wait_text(page.locator("#curve-status"), r"line 1: \"weak_quality\" and \"strong_quality\" must both be numbers", 20)
    quality = tmp_path / "quality.jsonl"
    rows = [
        ("Say hi to my team.", 1, 1), ("What is 2 + 2?", 1, 1), ("Translate 'good morning' into French.", 1, 0),
        ("Build a DCF for TSLA with 3 scenarios.", 0, 1),
        ("Price a 5-year interest rate swap and explain its DV01.", 0, 1),
    ]  # fmt: skip
    quality.write_text("".join(json.dumps({"prompt": q, "weak_quality": w, "strong_quality": st}) + "\n" for q, w, st in rows))
    choose(page, "curve-routers", "SmolLM2-135M-Instruct as router (transformers, dequantized)")
    choose(page, "curve-routers", "NPC Fast 1.7B (bf16)")  # its weights are not on this machine
    page.get_by_text("Small language models side by side").click()  # closes the list
    page.locator("#curve-path textarea, #curve-path input").first.fill(str(quality))
    page.locator("#curve-run").click()
    wait_text(page.locator("#curve-status"), r"⏳ \d+/15 rows", 60)
    table = wait_text(page.locator("#curve-status"), r"APGR.*\n(.*\n)*.*oracle APGR", 240)
    for name in ("SmolLM2-135M-Instruct Q4_1 as router (llama.cpp)", "SmolLM2-135M-Instruct as router (transformers, dequantized)"):
        assert re.search(re.escape(name) + r"\s+-?\d\.\d{3}\s+(\d+\.\d%|never)\s+(\d+\.\d%|never)\s+5", table), table
    assert re.search(r"NPC Fast 1\.7B \(bf16\) could not score: ⚠ .*not on this machine", table)
    assert "Router's own answers only: quality 0.600; partner only: 0.800" in table
    for legend in ("Answer quality against cost", "random routing", "oracle", "as router (transformers, dequantized)"):
        page.locator("#curve-plot").get_by_text(legend).first.wait_for(timeout=20_000)
    page.locator("#curve-plot").scroll_into_view_if_needed()
    page.screenshot(path=str(DOCS / "router-cost-quality.png"), full_page=True)


def wait_option(page, elem_id: str, label: str, timeout_s: float = 10) -> None:
    """Open a dropdown until it offers `label` (pickers follow the engine within a second)."""
    deadline = time.monotonic() + timeout_s
    options: list[str] = []
    while time.monotonic() < deadline:
        page.locator(f"#{elem_id} input").click()
        options = [o.inner_text().split("\n")[-1] for o in page.get_by_role("option").all()]  # less the ✓
        page.get_by_text("Small language models side by side").click()  # closes the list
        if label in options:
            return
        time.sleep(0.3)
    raise AssertionError(f"{label!r} is not offered; offered: {options}")


def choose(page, elem_id: str, value: str) -> None:
    """Pick `value` in a Gradio dropdown as a person does: open it, type, click the option. An
    option whose label adds a state (`name · ready`) is picked by its name."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    page.get_by_role("option", name=re.compile(rf"^{re.escape(value)}( · .*)?$")).first.click()


def test_jobs_tab_runs_watches_cancels_and_puts_a_fine_tune_next_to_its_base(page, tmp_path):
    page.get_by_role("tab", name="Jobs").click()
    # A kind with presets offers them; picking one fills the options, to edit before starting.
    assert not page.locator("#job-preset").is_visible()
    choose(page, "job-kind", "lora-router")
    box = page.locator("#job-preset input")
    box.click()
    box.fill("quick")
    page.get_by_role("option", name=re.compile(r"^quick: early stop")).click()
    filled = page.locator("#job-options textarea")
    expect(filled).to_have_value('{"holdout": 50, "eval_every": 8, "stop_at": 0.96, "learning_rate": 0.001}')
    # Bad options are refused with a message, and nothing starts.
    choose(page, "job-kind", "eval-perplexity")
    expect(page.locator("#job-preset")).to_be_hidden()
    page.locator("#job-options textarea").fill('{"window": 256, "stride": 512}')
    page.locator("#job-submit").click()
    refused = wait_text(page.locator("#job-submit-status"), r"stride \(512\) must not exceed window \(256\)", 20)
    assert refused.count("⚠") == 1
    page.locator("#job-options textarea").fill("{not json")
    page.locator("#job-submit").click()
    wait_text(page.locator("#job-submit-status"), r"not valid JSON", 20)
    # A perplexity eval of the embedded model, watched to its end.
    page.locator("#job-options textarea").fill('{"max_chars": 1500, "window": 256, "stride": 128}')
    page.locator("#job-submit").click()
    wait_text(page.locator("#job-submit-status"), r"Started eval-perplexity on smollm2-135m-gguf", 20)
    wait_text(page.locator("#job-detail"), r"eval-perplexity.*succeeded", 180)
    wait_text(
        page.locator("#job-submit-status"), r"Started eval-perplexity on smollm2-135m-gguf: job \S+ \(succeeded\)", 5
    )
    detail = page.locator("#job-detail").inner_text()
    assert re.search(r"perplexity\s+\d+(\.\d{1,3})?\s", detail)  # a table of figures, 4 significant digits
    assert not re.search(r"\d\.\d{6,}", detail)
    assert not page.locator("#job-loss").is_visible()  # an eval has no loss curve
    assert not page.locator("#job-resume").is_visible()  # and cannot be resumed
    page.locator("#job-result-plot").get_by_text("Perplexity by document").wait_for(timeout=20_000)
    wait_text(page.locator("#job-results"), r"smollm2-135m-gguf\s+\d+\.\d+", 20)
    # A LoRA fine-tune of the embedded model's torch twin: its loss curve, then its variant in Compare.
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "Say hello.", "response": "Hello!"}\n' * 4)
    choose(page, "job-kind", "lora-sft")
    choose(page, "job-model", "smollm2-135m-transformers")
    page.locator("#job-options textarea").fill(f'{{"data": "{data}", "epochs": 2, "name": "ui-tuned"}}')
    page.locator("#job-submit").click()
    wait_text(page.locator("#job-detail"), r"lora-sft.*succeeded", 300)
    page.locator("#job-loss").get_by_text("Training loss").wait_for(timeout=20_000)
    page.locator("#job-add-variants").click()
    wait_text(page.locator("#job-action-status"), r"Added: ui-tuned", 20)
    page.screenshot(path=str(DOCS / "jobs.png"), full_page=True)
    # The new variant is offered in Compare, loads there next to its base, and says where it came from.
    page.get_by_role("tab", name="Compare").click()
    box = page.locator("#model input")
    box.click()
    box.fill("+ LoRA")
    page.get_by_role("option", name=re.compile(r"dequantized \(transformers\) \+ LoRA")).first.click()
    page.locator("#load").click()
    wait_text(page.locator("#loaded"), r"ui-tuned.*ready", 120)
    # Cancel: a long router eval, stopped from the tab; the app keeps serving.
    page.get_by_role("tab", name="Jobs").click()
    choose(page, "job-kind", "eval-router")
    choose(page, "job-model", "smollm2-135m-router")
    page.locator("#job-options textarea").fill("{}")
    page.locator("#job-submit").click()
    wait_text(page.locator("#job-detail"), r"eval-router on smollm2-135m-router: running\s+\d+/64", 120)
    page.locator("#job-cancel").click()
    wait_text(page.locator("#job-action-status"), r"is cancelled", 30)
    wait_text(page.locator("#job-table"), r"eval-router\s+smollm2-135m-router\s+cancelled", 20)


def test_a_matrix_job_shows_its_grid_filters_to_differing_rows_diffs_and_exports(page, tmp_path):
    prompts = tmp_path / "three.jsonl"
    prompts.write_text(
        '{"id": "france", "prompt": "What is the capital of France?", "checks": [{"kind": "contains", "value": "Paris"}]}\n'
        '{"id": "hello", "prompt": "Say hello."}\n'
        '{"id": "sum", "prompt": "What is 2 + 2?"}\n'
    )
    page.get_by_role("tab", name="Jobs").click()
    choose(page, "job-kind", "matrix")
    choose(page, "job-model", "smollm2-135m-gguf")
    # One token each: the two forms of the embedded model agree on most first tokens, not on France's.
    options = {"variants": ["smollm2-135m-transformers"], "prompts": str(prompts), "max_new_tokens": 1}
    page.locator("#job-options textarea").fill(json.dumps(options))
    page.locator("#job-submit").click()
    wait_text(page.locator("#job-detail"), r"matrix.*succeeded", 240)
    grid = page.locator("#matrix-grid")
    wait_text(grid, r"3 of 3 prompts", 20)
    assert grid.locator("td.cell").count() == 6
    # One token: no decode phase, so no decode speed (shown as –, never invented).
    assert re.search(r"1 tok · – tok/s · TTFT [\d.]+ s", grid.inner_text())
    answers = {
        row.get_attribute("data-prompt"): {c.inner_text() for c in row.locator("td.cell .answer").all()}
        for row in grid.locator("tr[data-prompt]").all()
    }
    differ = sorted(p for p, texts in answers.items() if len(texts) > 1)
    assert "france" in differ and len(differ) < 3, answers
    page.locator("#matrix-differing input").check()
    wait_text(grid, rf"{len(differ)} of 3 prompts \(answers differ\)", 10)
    assert sorted(r.get_attribute("data-prompt") for r in grid.locator("tr[data-prompt]").all()) == differ
    # A word diff between the two cells of one prompt.
    page.locator("#matrix-diff-run").click()
    wait_text(page.locator("#matrix-word-diff"), r"smollm2-135m-gguf → smollm2-135m-transformers", 10)
    assert page.locator("#matrix-word-diff del, #matrix-word-diff ins").count() >= 1
    page.locator("#matrix-export").click()
    files = page.locator("#matrix-files")
    wait_text(files, r"\.csv[\s\S]*\.json[\s\S]*\.md", 20)
    page.locator("#matrix-differing input").uncheck()


def test_a_report_runs_from_an_uploaded_prompt_file_and_shows_its_table_and_pareto_charts(page, tmp_path):
    page.get_by_role("tab", name="Jobs").click()
    # A malformed prompt file is named with its line, and the prompt set stays as it was.
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Say hi."}\n{"prompt": "Say bye."\n')
    upload(page, "ps-upload", broken)
    wait_text(page.locator("#ps-status"), r"broken\.jsonl, line 2: not valid JSON", 20)
    assert page.locator("#ps-prompts input").input_value() == "mixed-50"
    prompts = tmp_path / "two.jsonl"
    prompts.write_text(
        '{"id": "france", "prompt": "What is the capital of France?", "checks": [{"kind": "contains", "value": "Paris"}]}\n'
        '{"id": "sum", "prompt": "What is 2 + 2?", "checks": [{"kind": "contains", "value": "4"}]}\n'
    )
    upload(page, "ps-upload", prompts)
    wait_text(page.locator("#ps-status"), r"2 prompts from two\.jsonl \(2 with checks\)", 20)
    assert re.search(r"uploads/prompts/two-[0-9a-f]{10}\.jsonl$", page.locator("#ps-prompts input").input_value())
    # The form's defaults: the dequantized twin as the reference, the Q4_1 file as the variant.
    assert page.locator("#ps-reference input").input_value() == "smollm2-135m-transformers"
    assert "smollm2-135m-gguf" in page.locator("#ps-variants").inner_text()
    page.locator("#ps-max-tokens input").fill("8")
    page.locator("#ps-report").click()
    started = wait_text(page.locator("#ps-status"), r"Started report job \S+ \((running|queued)\)", 20)
    job_id = re.search(r"job (\S+) \(", started).group(1)
    wait_text(page.locator("#job-table"), rf"{job_id}\s+report\s+smollm2-135m-transformers\s+succeeded", 400)
    # The finished report is picked in its own section as it finishes (live, no reload).
    page.wait_for_function(
        "id => document.querySelector('#report-job input')?.value === id", arg=job_id, timeout=10_000
    )
    summary = wait_text(page.locator("#report-summary"), r"2 prompts, greedy answers of at most 8 tokens", 20)
    assert "Pareto front" in summary
    table = wait_text(page.locator("#report-table"), r"smollm2-135m-gguf", 10)
    assert "smollm2-135m-transformers (reference)" in table and "llamacpp" in table
    # The reference against itself: no divergence, full agreement (the table reads one cell a line:
    # backend, weights, peak, load, decode, TTFT, checks, perplexity, then mean KL and top-1 agreement).
    assert re.search(r"\(reference\)\n(?:[^\n]*\n){8}0\.0000\n100\.0%", table), table
    assert re.search(r"smollm2-135m-gguf\nllamacpp Q4_1\n(?:[^\n]*\n){7}0\.\d{4}\n\d+\.\d%", table), table
    page.locator("#report-pareto").get_by_text("KL against decode speed").wait_for(timeout=20_000)
    page.locator("#report-pareto").get_by_text("KL against peak memory").wait_for(timeout=5_000)
    page.locator("#report-export").click()
    wait_text(page.locator("#report-files"), r"\.csv[\s\S]*\.json[\s\S]*\.md", 20)
    page.screenshot(path=str(DOCS / "report.png"), full_page=True)


def test_qat_and_its_comparison_show_as_a_table_and_chart(page, tmp_path, llama_folder):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Hello world! This is a tiny corpus for a tiny tokenizer.\n\n" * 40)
    page.get_by_role("tab", name="Jobs").click()
    choose(page, "job-kind", "qat")
    box = page.locator("#job-model input")
    box.fill(str(llama_folder))
    box.press("Enter")
    page.locator("#job-options textarea").fill(
        f'{{"corpus": "{corpus}", "steps": 4, "seq_len": 32, "schedule": "step", "name": "ui-qat"}}'
    )
    page.locator("#job-submit").click()
    wait_text(page.locator("#job-detail"), r"qat on \S+tiny-llama: succeeded", 180)
    choose(page, "job-kind", "qat-compare")
    page.locator("#job-options textarea").fill(
        f'{{"qat": "ui-qat", "types": ["Q8_0"], "corpus": "{corpus}", "window": 64, "stride": 32}}'
    )
    page.locator("#job-submit").click()
    detail = wait_text(page.locator("#job-detail"), r"qat-compare on \S+: succeeded", 240)
    # The table: base and QAT, each as F16 and Q8_0, with perplexity, the change against F16 and size.
    assert re.search(r"base\s+\S*tiny-llama\S*\s+F16\s+\d+\.\d{3}\s+\+0\.00%", detail)
    assert re.search(r"qat\s+ui-qat\s+Q8_0\s+\d+\.\d{3}\s+[+-]\d+\.\d{2}%\s+\d+\.\d", detail)
    page.locator("#job-result-plot").get_by_text("Perplexity after export and quantization").wait_for(timeout=20_000)
    # The comparison joins the table of variants across evals.
    table = wait_text(page.locator("#job-results"), r"llama.cpp perplexity Q8_0", 20)
    assert re.search(r"ui-qat(\s+\S*)*\s+\d+\.\d+", table)
    page.screenshot(path=str(DOCS / "qat.png"), full_page=True)


def sign_in(page, url: str, name: str, password: str) -> None:
    """Gradio's own login form, as a person fills it."""
    page.context.clear_cookies()
    page.goto(url)
    page.locator("input[type=text]").first.fill(name)
    page.locator("input[type=password]").fill(password)
    page.get_by_role("button", name="Login").click()


def test_viewers_prompt_and_compare_while_only_admins_load_and_run_jobs(page, tmp_path):
    users = [
        {"name": "ann", "password": "ann-password", "role": "admin"},
        {"name": "bob", "password": "bob-password"},
    ]
    env = {"PLAYGROUND_DATA_DIR": str(tmp_path / "data"), "PLAYGROUND_USERS": json.dumps(users)}
    # A second app, with logins, in its own browser context of the module's browser (Playwright's
    # sync API runs one instance at a time).
    context = page.context.browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    with running_app(tmp_path / "app.log", env) as url:
        sign_in(page, url, "bob", "wrong-password")
        page.get_by_text("Incorrect Credentials").wait_for(timeout=20_000)
        sign_in(page, url, "bob", "bob-password")
        wait_text(page.locator("#signed-in"), r"Signed in as bob \(viewer\)", 60)
        page.locator("#load").click()
        wait_text(page.locator("#load-status"), "Only an admin can load variants", 20)
        page.get_by_text("Add a variant from a local path").click()
        page.locator("#add-path textarea, #add-path input").first.fill(str(tmp_path))
        page.locator("#add").click()
        wait_text(page.locator("#add-status"), "Only an admin can add variants", 20)
        # A viewer prompts the variant the app loads at start (the list is drawn with the page).
        wait_text(page.locator("#loaded"), r"smollm2-135m-gguf.*ready", 180)  # live, no reload
        set_number(page, "n-panels", 1)
        page.locator("#prompt textarea").fill("Say hello.")
        page.locator("#send").click()
        wait_text(page.locator("#panel-0-metrics"), METRICS.pattern, 120)
        page.get_by_role("tab", name="Jobs").click()
        choose(page, "job-kind", "eval-format")
        page.locator("#job-submit").click()
        wait_text(page.locator("#job-submit-status"), "Only an admin can start jobs", 20)
        # The admin may.
        sign_in(page, url, "ann", "ann-password")
        wait_text(page.locator("#signed-in"), r"Signed in as ann \(admin\)", 60)
        page.locator("#unload").click()
        wait_text(page.locator("#load-status"), "unloaded", 20)
        shown = page.content()
    context.close()
    # No password reaches the page or the app's log, not even a wrong one.
    log = (tmp_path / "app.log").read_text()
    for secret in ("ann-password", "bob-password", "wrong-password"):
        assert secret not in shown and secret not in log


def test_a_second_session_waits_its_turn_for_a_shared_variant_and_sees_its_place(page):
    """Two people, one loaded variant: while the first one's reply streams, the second one's
    panel says where it stands in line; it is answered once the first is stopped."""
    first = page
    first.reload()
    set_number(first, "n-panels", 1)
    open_shared_settings(first)
    set_number(first, "shared-max_new_tokens", 600)
    context = first.context.browser.new_context(viewport={"width": 1400, "height": 1000})
    second = context.new_page()
    try:
        second.goto(first.url)
        set_number(second, "n-panels", 1)
        first.locator("#prompt textarea").fill("Write a long story about a lighthouse keeper.")
        first.locator("#send").click()
        wait_text(first.locator("#panel-0-chat"), r"lighthouse keeper\.[\s\S]+\w", 60)
        second.locator("#prompt textarea").fill("Say hello.")
        second.locator("#send").click()
        wait_text(second.locator("#panel-0-metrics"), r"queued for smollm2-135m-gguf: 1st in line", 30)
        first.locator("#panel-0-stop").click()
        wait_text(first.locator("#panel-0-metrics"), "finish: cancelled", 10)
        wait_text(second.locator("#panel-0-metrics"), METRICS.pattern, 120)
        assert second.locator("#panel-0-chat").get_by_text("lighthouse").count() == 0  # nothing crossed
        assert first.locator("#panel-0-chat").get_by_text("Say hello.").count() == 0
    finally:
        context.close()


def test_a_router_on_a_server_decides_from_its_log_probabilities_and_the_monitor_sees_it(page):
    """A remote router variant: its route comes from the server's prompt log-probabilities
    (checked at load), its answer streams from the server, and the Monitor shows the server.
    Last in this file: it leaves the remote router loaded and chosen."""
    page.get_by_role("tab", name="Router").click()
    choose(page, "router-variant", "Tiny router on a server")
    page.locator("#router-prompt textarea").fill("Value a bond with a 5% coupon.")
    page.locator("#router-go").click()
    card = wait_text(page.locator("#router-decision"), r"Route: (self|npc_fin)", 60)
    assert re.search(r"P\(escalate\) 0\.\d{3}", card) and re.search(r"Route decided in \d+ ms", card)
    wait_text(page.locator("#router-metrics"), r"openai on remote", 60)
    page.get_by_role("tab", name="Monitor").click()
    wait_text(
        page.locator("#monitor-summary"),
        r"tiny-remote-router → http://127\.0\.0\.1:\d+/v1: reachable, \d+ ms; queue unknown: no queue figures",
        10,
    )
