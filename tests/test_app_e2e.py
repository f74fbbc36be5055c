"""The first page, driven in headless Chromium the way a person uses it."""

from __future__ import annotations

import re

import pytest
from browser import browser_page, running_app

pytestmark = pytest.mark.e2e


def test_prompt_the_embedded_default_and_see_metrics(tmp_path):
    with running_app(tmp_path / "app.log") as url, browser_page() as page:
        page.goto(url)
        page.get_by_text("Memory estimate:").wait_for(timeout=30_000)
        page.locator("#prompt textarea").fill("What is the capital of France?")
        page.locator("#send").click()
        metrics = page.locator("#metrics")
        metrics.get_by_text("decode").wait_for(timeout=90_000)
        text = metrics.inner_text()
        assert re.search(r"TTFT \d+\.\d+ s", text) and "llamacpp on cpu" in text
        assert page.locator("#reply textarea").input_value().strip()
        # Load shows the variant ready in the loaded list.
        page.locator("#load").click()
        page.locator("#loaded").get_by_text("ready").wait_for(timeout=30_000)
        page.screenshot(path="/tmp/first-page.png")
