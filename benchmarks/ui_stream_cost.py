"""Where the CPU goes while two panels stream: the app, the model workers, the browser.

    .venv/bin/python -m benchmarks.ui_stream_cost --out benchmarks/results/ui_stream_cost.json

The app starts on its own (as `python app.py`), headless Chromium opens it, both default panels
(llama.cpp and transformers) are loaded by a first short prompt; then the CPU seconds of each
process group are read over 10 idle seconds, and over 15 seconds while a long answer streams in
both panels. On a 2-core machine every CPU second the page costs is taken from the decode being
measured. The script uses the test helpers (tests/browser.py), so it runs on any commit that has
them: the same command measures the app before and after a change.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from browser import browser_page, running_app  # noqa: E402


def cpu_seconds_by_group() -> dict[str, float]:
    groups: dict[str, float] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            command = " ".join(process.info["cmdline"] or [])
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if command.endswith("app.py"):
            group = "app"
        elif "spawn_main" in command:
            group = "model workers"
        elif "chromium" in command:
            group = "browser"
        else:
            continue
        groups[group] = groups.get(group, 0.0) + times.user + times.system
    return groups


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {group: round(after[group] - before.get(group, 0.0), 2) for group in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ui-cost-"))
    with running_app(folder / "app.log", {"PLAYGROUND_DATA_DIR": str(folder / "data")}) as url, browser_page() as page:
        page.goto(url)
        page.locator("#prompt textarea").fill("Hi")
        page.locator("#send").click()
        page.locator("#panel-1-metrics").get_by_text("finish:").wait_for(timeout=300_000)
        time.sleep(3)
        before = cpu_seconds_by_group()
        time.sleep(10)
        idle = spent(before, cpu_seconds_by_group())
        page.locator("#prompt textarea").fill("Write a long story about a lighthouse keeper.")
        page.locator("#send").click()
        time.sleep(3)
        before = cpu_seconds_by_group()
        time.sleep(15)
        streaming = spent(before, cpu_seconds_by_group())
        panels = [page.locator(f"#panel-{i}-metrics").inner_text() for i in range(2)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"commit": commit, "cpu_s_idle_10s": idle, "cpu_s_streaming_15s": streaming, "panels_after": panels}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
