"""Starts queued jobs as resources allow, watches their processes, cancels and resumes them.

CPU jobs run at most `max_cpu_jobs` at a time. A GPU job starts only when the GPU's free memory
(as nvml reports it, so loaded variants and other programs count) covers what it needs on top
of what the GPU jobs already running were said to need. Each job is a new process group started
without a shell; Cancel ends the group (the job's own workers included). A job process records
its own end in the store; one that dies without recording it (SIGKILL, OOM) is marked failed
with the signal named. A job process still alive from an earlier manager (a command-line submit,
an app that was killed) is adopted and watched; one that is gone without an end is marked
interrupted. Stopping the app's manager ends its jobs, which then show as interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from playground.errors import ConfigError, PlaygroundError
from playground.jobs.kinds import RESUMABLE_KINDS, placement, validate_options
from playground.jobs.store import Job, JobStore
from playground.workers import describe_exit

GiB = 1024**3


def _job_process_alive(job: Job) -> bool:
    """Whether `job`'s own process runs (a reused pid of another program does not count)."""
    if not job.pid:
        return False
    try:
        process = psutil.Process(job.pid)
        return process.status() != psutil.STATUS_ZOMBIE and job.id in process.cmdline()
    except psutil.Error:
        return False


def free_gpu_bytes() -> int | None:
    from playground.memory import gpu_memory

    gpus = gpu_memory()
    return gpus[0][0] if gpus else None


class JobManager:
    def __init__(
        self,
        store: JobStore,
        logs_dir: Path,
        max_cpu_jobs: int = 1,
        gpu_free: Callable[[], int | None] = free_gpu_bytes,
    ) -> None:
        self.store = store
        self.logs_dir = Path(logs_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.max_cpu_jobs = max_cpu_jobs
        self.gpu_free = gpu_free
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._adopted: dict[str, int] = {}  # job id -> pid of a job process we did not start
        # Jobs this manager is ending on purpose, with the state and reason to record: the
        # watcher thread may see the process end before the ending call records it.
        self._ending: dict[str, tuple[str, str | None]] = {}
        self._waiting_said: dict[str, str] = {}  # the last "waiting for ..." event of each queued job
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._take_over_running_jobs()

    def _take_over_running_jobs(self) -> None:
        for job in self.store.list():
            if job.state != "running":
                continue
            if _job_process_alive(job):
                self._adopted[job.id] = job.pid  # type: ignore[assignment]
            elif self.store.finish_if_running(job.id, "interrupted", "the job stopped while no manager watched it"):
                self.store.add_event(job.id, {"message": "interrupted: its process ended without recording a result"})

    # -- submitting ------------------------------------------------------------------------
    def submit(self, kind: str, options: dict[str, Any]) -> Job:
        validated = validate_options(kind, options)  # refuse bad options before any process
        device, gpu_bytes = placement(kind, validated)
        if device == "cuda" and self.gpu_free() is None:
            raise ConfigError(f"this {kind} job needs a GPU, and none is visible here")
        job = self.store.create(kind, validated.model_dump(exclude_none=True), device, gpu_bytes)
        self.schedule()
        return self.store.get(job.id)

    def _running_jobs(self) -> list[Job]:
        self._reap_adopted()
        ids = [job_id for job_id, p in self._processes.items() if p.poll() is None] + list(self._adopted)
        jobs = []
        for job_id in ids:
            try:
                jobs.append(self.store.get(job_id))
            except KeyError:
                continue
        return jobs

    def schedule(self) -> None:
        """Start queued jobs, oldest first, while there is room for each."""
        with self._lock:
            running = self._running_jobs()
            cpu_running = sum(job.device == "cpu" for job in running)
            gpu_promised = sum(job.gpu_bytes for job in running if job.device == "cuda")
            free = None
            for job in sorted(self.store.list(), key=lambda j: j.created):
                if job.state != "queued":
                    continue
                if job.device == "cuda":
                    if free is None:
                        free = self.gpu_free()
                    # Conservative: memory a running job already took is counted again in its
                    # promise, so a GPU job may wait longer than it must, but never overfills.
                    room = None if free is None else free - gpu_promised
                    if room is None or room < job.gpu_bytes:
                        why = (
                            "no GPU is visible"
                            if room is None
                            else f"needs {job.gpu_bytes / GiB:.1f} GiB of GPU memory, {max(room, 0) / GiB:.1f} free"
                        )
                        self._say_waiting(job, f"waiting: {why}")
                        continue
                    gpu_promised += job.gpu_bytes
                elif cpu_running >= self.max_cpu_jobs:
                    self._say_waiting(job, f"waiting for a CPU slot ({self.max_cpu_jobs} at a time)")
                    continue
                else:
                    cpu_running += 1
                self._start(job)

    def _say_waiting(self, job: Job, message: str) -> None:
        if self._waiting_said.get(job.id) != message:
            self._waiting_said[job.id] = message
            self.store.add_event(job.id, {"message": message})

    def _start(self, job: Job) -> None:
        self._waiting_said.pop(job.id, None)
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
        self._record_end(job_id, f"the job process {describe_exit(code)}", process.pid)
        self.schedule()

    def _reap_adopted(self) -> None:
        for job_id, pid in list(self._adopted.items()):
            job = self.store.get(job_id)
            if job.finished or job.pid != pid or not _job_process_alive(job):
                del self._adopted[job_id]
                self._record_end(job_id, "the job process ended without recording a result", pid)

    def _record_end(self, job_id: str, failure: str, pid: int) -> None:
        """After job process `pid` ended: its final state, unless it recorded one itself."""
        if job_id in self._ending:
            state, reason = self._ending[job_id]
            self.store.finish_if_running(job_id, state, reason, pid)
        elif self.store.finish_if_running(job_id, "failed", failure, pid):
            self.store.add_event(job_id, {"message": failure})

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

    def stop(self, end_jobs: bool = True) -> None:
        """Stop scheduling; with `end_jobs`, end the running jobs (they show as interrupted and
        fine-tunes can be resumed) rather than leave them unwatched."""
        self._stop.set()
        if not end_jobs:
            return
        for job in self._running_jobs():
            self._ending[job.id] = ("interrupted", "the app stopped while this job ran")
            self._end_group(job)
            self.store.finish_if_running(job.id, *self._ending[job.id])

    # -- control -------------------------------------------------------------------------
    def _end_group(self, job: Job) -> None:
        """SIGTERM to the job's process group (the job and its workers), SIGKILL after 5 s."""
        if not _job_process_alive(job):
            return
        try:
            os.killpg(job.pid, signal.SIGTERM)  # type: ignore[arg-type]
        except OSError:
            return
        deadline = time.monotonic() + 5
        while _job_process_alive(job) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _job_process_alive(job):
            try:
                os.killpg(job.pid, signal.SIGKILL)  # type: ignore[arg-type]
            except OSError:
                pass

    def cancel(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job.finished:
            raise PlaygroundError(f"job {job_id} has already ended ({job.state})")
        self._ending[job_id] = ("cancelled", None)
        if job.state == "running":
            self._end_group(job)
        # Recorded here, not only by the watcher, so the caller sees the final state at once.
        self.store.finish_if_running(job_id, "cancelled", None)
        return self.store.get(job_id)

    def resume(self, job_id: str) -> Job:
        """Queue an interrupted, failed or cancelled fine-tune again; it goes on from its last
        checkpoint (the job keeps its id, options and events)."""
        job = self.store.get(job_id)
        if job.state not in ("interrupted", "failed", "cancelled") or job.kind not in RESUMABLE_KINDS:
            why = "only fine-tunes resume" if job.kind not in RESUMABLE_KINDS else f"it is {job.state}"
            raise PlaygroundError(f"job {job_id} cannot be resumed: {why}")
        self._ending.pop(job_id, None)
        self.store.update(job_id, state="queued", error=None, ended=None, pid=None)
        self.store.add_event(job_id, {"message": "resume requested"})
        self.schedule()
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
