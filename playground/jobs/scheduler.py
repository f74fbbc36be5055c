"""The scheduler process: `python -m playground.jobs.scheduler STORE`, for jobs with no app.

A job submitted from the command line must run and end without the app. Whoever submits
(`ensure_scheduler`) starts this process unless someone already watches the store (the app's
manager, or another scheduler, holding the store's watch lock). It runs scheduling passes once
a second while any job is queued or running, so queued jobs start as room frees and a job
whose process died is marked at the next pass; then it leaves. Jobs are their own process
groups: stopping the scheduler ends none of them, and the next one adopts them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from playground.jobs.manager import JobManager, try_lock, watch_lock_path
from playground.jobs.store import JobStore

IDLE_PASSES_BEFORE_LEAVING = 3


def ensure_scheduler(store_path: Path, logs_dir: Path) -> bool:
    """Start a scheduler process for the store unless one (or the app) watches it; True if
    one was started. Call it after recording the job, so a scheduler about to leave sees it."""
    held = try_lock(watch_lock_path(store_path))
    if held is None:
        return False
    os.close(held)
    logs_dir.mkdir(parents=True, exist_ok=True)
    with (logs_dir / "scheduler.log").open("ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "playground.jobs.scheduler", str(store_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return True


def main(store_path: str) -> int:
    from playground.settings import get_settings

    path = Path(store_path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    manager = JobManager(JobStore(path), path.parent / "logs", max_cpu_jobs=get_settings().max_cpu_jobs)
    if not manager.hold_watch():
        return 0  # another scheduler or the app got there first
    idle = 0
    while True:
        idle = 0 if manager.schedule() else idle + 1
        if idle >= IDLE_PASSES_BEFORE_LEAVING:
            # Let go first, then look once more: a job recorded in between found the lock held
            # and started no scheduler, so this one must stay for it.
            manager.release_watch()
            if not manager.has_work() or not manager.hold_watch():
                return 0
            idle = 0
        time.sleep(1.0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
