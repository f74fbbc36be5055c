"""What the job benchmarks share: a job manager under PLAYGROUND_DATA_DIR (a fresh temporary
folder unless set), a `run` that waits for a job and stops the benchmark if it fails, and the
machine line every result file starts with."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any


def job_runner(prefix: str) -> tuple[Callable[[str, dict[str, Any]], dict[str, Any]], dict[str, Any]]:
    os.environ.setdefault("PLAYGROUND_DATA_DIR", tempfile.mkdtemp(prefix=prefix))
    from playground.jobs.manager import JobManager
    from playground.jobs.store import JobStore
    from playground.paths import jobs_dir

    manager = JobManager(JobStore(jobs_dir() / "jobs.sqlite"), jobs_dir() / "logs")

    def run(kind: str, options: dict[str, Any]) -> dict[str, Any]:
        job = manager.wait(manager.submit(kind, options).id)
        if job.state != "succeeded":
            raise SystemExit(f"{kind} {job.id} {job.state}: {job.error}")
        print(kind, json.dumps({k: v for k, v in job.result.items() if k != "curve"})[:600], flush=True)
        return job.result | {"job_wall_s": round(job.ended - job.started, 1)}

    header = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    return run, header
