"""Builds the Variant Playground UI and launches it; the embedded default starts loading at once.

Every setting comes from playground/settings.py (PLAYGROUND_* variables, or the YAML file named by
PLAYGROUND_SETTINGS_FILE).
"""

from __future__ import annotations

import signal
import sys

from playground.arena import VoteStore
from playground.engine import Engine
from playground.errors import ConfigError
from playground.jobs.manager import JobManager
from playground.jobs.store import JobStore
from playground.monitor import SystemMonitor
from playground.paths import data_dir, jobs_dir
from playground.settings import get_settings
from playground.ui import build_app
from playground.ui.access import Access
from playground.ui.app import CSS

DEFAULT_VARIANT = "smollm2-135m-gguf"


def main() -> None:
    try:
        settings = get_settings()
    except ConfigError as err:  # a bad setting stops the start with its name, never a traceback
        sys.exit(f"Variant Playground: {err}")
    host, warning = settings.bind_host()
    if warning:
        print(warning, file=sys.stderr, flush=True)
    engine = Engine.from_settings()
    engine.start_load(DEFAULT_VARIANT)
    monitor = SystemMonitor(engine).start()
    jobs = JobManager(
        JobStore(jobs_dir() / "jobs.sqlite"),
        jobs_dir() / "logs",
        max_cpu_jobs=settings.max_cpu_jobs,
        catalogue=engine.catalogue,
    ).start()
    access = Access(settings)
    demo = build_app(engine, monitor, VoteStore(data_dir() / "votes.sqlite"), jobs, access)
    # SIGTERM (docker stop, systemd, a test's terminate) ends the app through the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        demo.queue(default_concurrency_limit=settings.ui_concurrency).launch(
            server_name=host,
            server_port=settings.port,
            auth=access.login if settings.auth_enabled else None,
            max_file_size=f"{settings.max_upload_mb}mb",
            max_threads=settings.ui_max_events,
            css=CSS,
            # Gradio would keep every run's inputs and outputs in the browser's localStorage,
            # read and rewritten whole with each streamed frame: a page that had run many
            # answers spent a fifth of its time there and fell behind the stream (CI, Blind
            # tab); prompts and answers left on a shared demo laptop are unwanted too.
            run_history=False,
        )
    finally:
        jobs.stop()  # its running jobs end and show as interrupted; fine-tunes can resume
        monitor.stop()
        engine.shutdown()


if __name__ == "__main__":
    main()
