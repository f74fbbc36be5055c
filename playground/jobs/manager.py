"""Starts queued jobs as resources allow, watches their processes, cancels them.

CPU jobs run at most `max_cpu_jobs` at a time. Each job is a new process group started
without a shell; Cancel ends the group (the job's own workers included). A job process that
dies without recording an end (SIGKILL, OOM) is marked failed with the signal named. Jobs that
were running when an earlier manager went away are marked interrupted at start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from playground.errors import PlaygroundError
from playground.jobs.kinds import validate_options
from playground.jobs.store import Job, JobStore
from playground.workers import describe_exit


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class JobManager:
    def __init__(self, store: JobStore, logs_dir: Path, max_cpu_jobs: int = 1) -> None:
        self.store = store
        self.logs_dir = Path(logs_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.max_cpu_jobs = max_cpu_jobs
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mark_interrupted()

    def _mark_interrupted(self) -> None:
        for job in self.store.list():
            if job.state == "running":
                if _alive(job.pid):  # its manager is gone: end it rather than leave it unwatched
                    try:
                        os.killpg(job.pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.store.finish_if_running(job.id, "interrupted", "the app stopped while this job ran")

    # -- submitting ------------------------------------------------------------------------
    def submit(self, kind: str, options: dict[str, Any]) -> Job:
        validated = validate_options(kind, options)  # refuse bad options before any process
        job = self.store.create(kind, validated.model_dump(exclude_none=True))
        self.schedule()
        return self.store.get(job.id)

    def schedule(self) -> None:
        """Start queued jobs, oldest first, while there is room."""
        with self._lock:
            running = sum(1 for p in self._processes.values() if p.poll() is None)
            for job in sorted(self.store.list(), key=lambda j: j.created):
                if running >= self.max_cpu_jobs:
                    break
                if job.state == "queued":
                    self._start(job)
                    running += 1

    def _start(self, job: Job) -> None:
        log = (self.logs_dir / f"{job.id}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "playground.jobs.run", str(self.store.path), job.id],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.store.update(job.id, state="running", pid=process.pid, started=time.time())
        self._processes[job.id] = process
        threading.Thread(target=self._watch, args=(job.id, process), daemon=True).start()

    def _watch(self, job_id: str, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        with self._lock:
            self._processes.pop(job_id, None)
        if job_id in self._cancelled:
            self.store.finish_if_running(job_id, "cancelled", None)
        elif self.store.finish_if_running(job_id, "failed", f"the job process {describe_exit(code)}"):
            self.store.add_event(job_id, {"message": f"the job process {describe_exit(code)}"})
        self.schedule()

    # -- the background loop (the app runs one) ------------------------------------------
    def start(self) -> JobManager:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.schedule()
            except Exception:  # a failed pass must not end the scheduler
                continue

    def stop(self) -> None:
        self._stop.set()

    # -- control -------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job.finished:
            raise PlaygroundError(f"job {job_id} has already ended ({job.state})")
        self._cancelled.add(job_id)
        if job.state == "queued":
            self.store.finish_if_running(job_id, "cancelled", None)
            return self.store.get(job_id)
        pid = job.pid
        if pid and _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)  # the whole group: the job and its workers
            except OSError:
                pass
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        # Recorded here, not only by the watcher, so the caller sees the final state at once.
        self.store.finish_if_running(job_id, "cancelled", None)
        return self.store.get(job_id)

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 0.3) -> Job:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.store.get(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise PlaygroundError(f"job {job_id} still {job.state} after {timeout_s:.0f} s")
            self.schedule()
            time.sleep(poll_s)
