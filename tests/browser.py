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
            # Which requests failed: a console error names only the status.
            page.on("response", lambda response: response.status >= 400 and page.errors_seen.append(_failed(response)))
            # The debugger, enabled now, can pause a page busy in JS at failure and say where it is.
            page.cdp = page.context.new_cdp_session(page)
            page.cdp.send("Debugger.enable")
            yield page
        finally:
            browser.close()


def _failed(response: object) -> str:
    """A failed request as the report lists it. A 422 on queue/join is Gradio's validation
    refusing an input (a number past its field's limits). The test of impossible settings
    causes three on purpose; the label keeps them from being read as faults."""
    line = f"response {response.status}: {response.request.method} {response.url}"
    if response.status == 422 and "/queue/join" in response.url:
        line += " (an input Gradio's validation refused)"
    return line


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
        lines += _paused_stack(page)
    lines += _busiest_processes()
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


def _paused_stack(page: object) -> list[str]:
    """Where a page busy in JS is: pause it through the debugger and read its stack."""
    cdp = getattr(page, "cdp", None)
    if cdp is None:
        return []
    paused: list[dict] = []
    cdp.once("Debugger.paused", lambda event: paused.append(event))
    try:
        cdp.send("Debugger.pause")
        deadline = time.monotonic() + 5
        while not paused and time.monotonic() < deadline:
            page.wait_for_timeout(100)  # lets the sync API deliver the event
    except Exception as err:
        return [f"no pause: {type(err).__name__}: {err}"[:300]]
    if not paused:
        return ["the debugger did not pause it in 5 s (busy outside JS: layout, paint, or the whole machine)"]
    lines = [f"paused, reason {paused[0].get('reason')}; its JS stack:"]
    for frame in paused[0].get("callFrames", [])[:25]:
        where = frame.get("location", {})
        lines.append(
            f"  {frame.get('functionName') or '(anonymous)'} {frame.get('url', '')[-80:]}:"
            f"{where.get('lineNumber', 0) + 1}:{where.get('columnNumber', 0) + 1}"
        )
    try:
        cdp.send("Debugger.resume")
    except Exception:
        pass
    return lines


def _busiest_processes() -> list[str]:
    """The machine's load and its busiest processes: a starved page looks hung too."""
    import psutil

    processes = list(psutil.process_iter(["pid", "cmdline", "memory_info"]))
    for process in processes:
        try:
            process.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1)
    rows = []
    for process in processes:
        try:
            rows.append((process.cpu_percent(None), process))
        except psutil.Error:
            continue
    memory = psutil.virtual_memory()
    lines = [
        f"load average {os.getloadavg()}, memory available {memory.available / 2**30:.1f} of "
        f"{memory.total / 2**30:.1f} GiB; busiest processes over 1 s:"
    ]
    for cpu, process in sorted(rows, key=lambda row: -row[0])[:8]:
        info = process.info
        rss = info["memory_info"].rss / 2**20 if info["memory_info"] else 0
        lines.append(f"  {cpu:5.0f}% {rss:7.0f} MiB pid {info['pid']}: {' '.join(info['cmdline'] or [])[:160]}")
    return lines
