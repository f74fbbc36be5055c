"""Helpers for the end-to-end tests: the real app in its own process, Debian's Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# What a failed browser test reports (conftest's hook): the newest app's log and the page's own errors.
LAST_APP_LOG: list[Path] = []
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start `python app.py` on a free port; yield its URL once it answers."""
    port = free_port()
    environment = os.environ | {"PLAYGROUND_PORT": str(port), "PYTHONUNBUFFERED": "1"} | (env or {})
    LAST_APP_LOG[:] = [log_path]
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=environment, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"app exited early:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError("app did not answer in 90 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def browser_page() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.errors_seen = []  # the page's uncaught errors and console errors, newest last
            page.on("pageerror", lambda error: page.errors_seen.append(f"uncaught: {error}"))
            page.on(
                "console",
                lambda message: message.type == "error" and page.errors_seen.append(f"console: {message.text}"),
            )
            yield page
        finally:
            browser.close()


def page_at_failure(page: object, shots: Path) -> str:
    """What a failed test's page showed: whether it still answers, its selected tab, its errors,
    a screenshot, and the app's log tail. Every look has a timeout, so a hung page cannot hang
    the run."""
    lines = []
    started = time.monotonic()
    try:
        tab = page.locator("[role=tab][aria-selected=true]").first.inner_text(timeout=5_000)
        lines.append(f"{page.url}: selected tab {tab!r}, read in {time.monotonic() - started:.1f} s")
        # It answers, so these reads return: Gradio's toasts (a lost connection says so in one).
        toasts = page.locator("[data-testid='toast-body']").all_inner_texts()
        lines.append(f"toasts: {[' '.join(t.split())[:200] for t in toasts]}")
    except Exception as err:  # the page may be hung: say so and go on
        lines.append(f"the page did not answer in {time.monotonic() - started:.1f} s: {type(err).__name__}")
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / f"failure-{time.strftime('%H%M%S')}.png"
    try:
        page.screenshot(path=str(shot), full_page=True, timeout=10_000)
        lines.append(f"screenshot: {shot}")
    except Exception as err:
        lines.append(f"no screenshot: {type(err).__name__}")
    errors = getattr(page, "errors_seen", [])
    lines.append(f"{len(errors)} page error(s)" + (", the last ones:" if errors else ""))
    lines += [f"  {e[:500]}" for e in errors[-10:]]
    if LAST_APP_LOG and LAST_APP_LOG[0].exists():
        lines.append(f"the app's log, last lines ({LAST_APP_LOG[0]}):")
        lines += ["  " + line for line in LAST_APP_LOG[0].read_text(errors="replace").splitlines()[-40:]]
    return "\n".join(lines)
