"""Builds the Variant Playground UI and launches it; the embedded default starts loading at once."""

from __future__ import annotations

import os
import signal
import sys

from playground.arena import VoteStore
from playground.engine import Engine
from playground.jobs.manager import JobManager
from playground.jobs.store import JobStore
from playground.monitor import SystemMonitor
from playground.paths import data_dir, jobs_dir
from playground.ui import build_app
from playground.ui.app import CSS

DEFAULT_VARIANT = "smollm2-135m-gguf"


def main() -> None:
    engine = Engine()
    engine.start_load(DEFAULT_VARIANT)
    monitor = SystemMonitor(engine).start()
    jobs = JobManager(
        JobStore(jobs_dir() / "jobs.sqlite"),
        jobs_dir() / "logs",
        max_cpu_jobs=int(os.environ.get("PLAYGROUND_MAX_CPU_JOBS", "1")),
    ).start()
    demo = build_app(engine, monitor, VoteStore(data_dir() / "votes.sqlite"), jobs)
    # SIGTERM (docker stop, systemd, a test's terminate) ends the app through the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        demo.queue(default_concurrency_limit=8).launch(
            server_name=os.environ.get("PLAYGROUND_HOST", "127.0.0.1"),
            server_port=int(os.environ.get("PLAYGROUND_PORT", "7860")),
            css=CSS,
        )
    finally:
        jobs.stop()  # its running jobs end and show as interrupted; fine-tunes can resume
        monitor.stop()
        engine.shutdown()


if __name__ == "__main__":
    main()
