"""Starts queued jobs as resources allow, watches their processes, cancels and resumes them.

CPU jobs run at most `max_cpu_jobs` at a time. A GPU job starts only when the GPU's free memory
(as nvml reports it, so loaded variants and other programs count) covers what it needs on top
of what the GPU jobs already running were said to need. Each job is a new process group started
without a shell; Cancel ends the group (the job's own workers included). A job process records
its own end in the store; one that dies without recording it (SIGKILL, OOM) is marked failed.

Several processes may hold a manager of one store at once (the app, command-line submits, the
scheduler process of jobs/scheduler.py). A scheduling pass runs under a file lock beside the
store and counts every running job in the store, whoever started it, so no job starts twice and
no limit is passed. Each pass also looks at every running job's process, so a job that died
unwatched is marked at the next pass. Stopping the app's manager ends the running jobs, which
then show as interrupted.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from pydantic import BaseModel

from playground.errors import ConfigError, PlaygroundError
from playground.jobs.kinds import job_kind, placement, validate_options
from playground.jobs.store import Job, JobStore
from playground.sqlite_store import StoreError
from playground.workers import describe_exit

if TYPE_CHECKING:
    from playground.catalogue import Catalogue

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


def free_gpu_bytes() -> list[int] | None:
    """Each GPU's free memory (nvml's order); None where there is no GPU."""
    from playground.memory import gpu_memory

    gpus = gpu_memory()
    return [free for free, _ in gpus] or None


def choose_gpu(device: str, need: int, room: list[int]) -> tuple[int | None, str]:
    """The GPU a job goes to: its pinned one (`cuda:N`), else the one with the most room;
    None, with why, while none has `need` bytes free."""
    pinned = int(device.split(":", 1)[1]) if device.startswith("cuda:") else None
    if pinned is not None and pinned >= len(room):
        return None, f"its variant is pinned to GPU {pinned}, and {len(room)} GPU(s) are visible"
    candidates = [pinned] if pinned is not None else list(range(len(room)))
    best = max(candidates, key=lambda i: (room[i], -i))
    if room[best] >= need:
        return best, ""
    free = ", ".join(f"GPU {i} {max(room[i], 0) / GiB:.1f} GiB" for i in candidates)
    return None, f"needs {need / GiB:.1f} GiB of GPU memory; free: {free}"


def stored_options(options: BaseModel) -> dict[str, Any]:
    """What a job record keeps: every option with its value, None left out unless given
    explicitly (an explicit None can mean "no limit" where the default is a number; dropped,
    the worker's own check would put the default back)."""
    return {k: v for k, v in options.model_dump().items() if v is not None or k in options.model_fields_set}


class JobManager:
    def __init__(
        self,
        store: JobStore,
        logs_dir: Path,
        max_cpu_jobs: int = 1,
        gpu_free: Callable[[], list[int] | None] = free_gpu_bytes,
        catalogue: Catalogue | None = None,
    ) -> None:
        from playground.catalogue import Catalogue

        self.store = store
        self.logs_dir = Path(logs_dir)
        try:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"the jobs folder {self.logs_dir} cannot be written: {err.strerror}") from None
        self.max_cpu_jobs = max_cpu_jobs
        self.gpu_free = gpu_free
        # The variants job options may name: the same catalogue the job process will build.
        self.catalogue = catalogue or Catalogue.from_settings(made_dir=store.path.parent / "model_configs")
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        # Jobs this manager is ending on purpose, with the state and reason to record: the
        # watcher thread may see the process end before the ending call records it.
        self._ending: dict[str, tuple[str, str | None]] = {}
        self._waiting_said: dict[str, str] = {}  # the last "waiting for ..." event of each queued job
        self._lock = threading.Lock()
        self._pass_lock_path = store.path.with_name(store.path.name + ".schedule.lock")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch_lock: int | None = None
        watched = try_lock(watch_lock_path(store.path))
        if watched is not None:  # nobody watches this store: what died meanwhile was interrupted
            with self._passing():
                self._look_at_running_jobs(interrupted=True)
            os.close(watched)

    @contextmanager
    def _passing(self) -> Iterator[None]:
        """One scheduling pass at a time over this store, across processes."""
        with self._lock:
            handle = _open_lock_file(self._pass_lock_path)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
                yield
            finally:
                os.close(handle)  # closing releases the lock

    def _look_at_running_jobs(self, jobs: list[Job] | None = None, interrupted: bool = False) -> list[Job]:
        """The jobs (of `jobs`, default all) that really run now. One marked running whose
        process is gone is ended: `interrupted` when a manager starts (nobody watched it), failed
        otherwise."""
        running = []
        for job in self.store.list() if jobs is None else jobs:
            if job.state != "running":
                continue
            own = self._processes.get(job.id)
            if own is not None and own.poll() is not None:
                self._processes.pop(job.id, None)
                self._record_end(job.id, f"the job process {describe_exit(own.returncode)}", own.pid)
            elif own is None and not _job_process_alive(job):
                if interrupted:
                    if self.store.finish_if_running(
                        job.id, "interrupted", "the job stopped while no manager watched it", job.pid
                    ):
                        self.store.add_event(
                            job.id, {"message": "interrupted: its process ended without recording a result"}
                        )
                else:
                    self._record_end(job.id, "the job process ended without recording a result", job.pid or 0)
            else:
                running.append(job)
        return running

    # -- submitting ------------------------------------------------------------------------
    def submit(self, kind: str, options: dict[str, Any], *, start: bool = True) -> Job:
        """Record a job (options checked, its variant resolved, its place decided) and, with
        `start`, run a scheduling pass here; without, a scheduler process starts it."""
        validated = validate_options(kind, options)  # refuse bad options before any process
        device, gpu_bytes = placement(kind, validated, self.catalogue)
        if device.startswith("cuda") and not self.gpu_free():
            raise ConfigError(f"this {kind} job needs a GPU, and none is visible here")
        job = self.store.create(kind, stored_options(validated), device, gpu_bytes)
        if start:
            self.schedule()
        return self.store.get(job.id)

    def schedule(self) -> bool:
        """Start queued jobs, oldest first, while there is room for each; whether any job is
        still queued or running (the store is read once per pass)."""
        with self._passing():
            jobs = self.store.list()
            running = self._look_at_running_jobs(jobs)
            cpu_running = sum(job.device == "cpu" for job in running)
            queued = sorted((job for job in jobs if job.state == "queued"), key=lambda j: j.created)
            room: list[int] | None = None
            for job in queued:
                gpu = None
                if job.device.startswith("cuda"):
                    if room is None:
                        free = self.gpu_free()
                        if not free:
                            self._say_waiting(job, "waiting: no GPU is visible")
                            continue
                        # Conservative: memory a running job already took is counted again in
                        # its promise, so a GPU job may wait longer than it must, but never
                        # overfills its GPU. A job from before GPUs were told apart is on GPU 0.
                        room = list(free)
                        for other in running:
                            if other.device.startswith("cuda") and (other.gpu or 0) < len(room):
                                room[other.gpu or 0] -= other.gpu_bytes
                    gpu, why = choose_gpu(job.device, job.gpu_bytes, room)
                    if gpu is None:
                        self._say_waiting(job, f"waiting: {why}")
                        continue
                    room[gpu] -= job.gpu_bytes
                elif cpu_running >= self.max_cpu_jobs:
                    self._say_waiting(job, f"waiting for a CPU slot ({self.max_cpu_jobs} at a time)")
                    continue
                else:
                    cpu_running += 1
                self._start(job, gpu)
            return bool(running or queued)

    def has_work(self) -> bool:
        """Whether any job is queued or running (the scheduler process stays while there is)."""
        return any(job.state in ("queued", "running") for job in self.store.list())

    def _say_waiting(self, job: Job, message: str) -> None:
        if self._waiting_said.get(job.id) != message:
            self._waiting_said[job.id] = message
            self.store.add_event(job.id, {"message": message})

    def _start(self, job: Job, gpu: int | None = None) -> None:
        self._waiting_said.pop(job.id, None)
        log = (self.logs_dir / f"{job.id}.log").open("ab")
        environment = None
        if gpu is not None:  # the job and the workers it starts see that GPU only, as cuda
            environment = os.environ | {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(gpu)}
        process = subprocess.Popen(
            [sys.executable, "-m", "playground.jobs.run", str(self.store.path), job.id],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=environment,
        )
        log.close()
        self.store.update(job.id, state="running", pid=process.pid, started=time.time(), gpu=gpu)
        self._processes[job.id] = process
        threading.Thread(target=self._watch, args=(job.id, process), daemon=True).start()

    def _watch(self, job_id: str, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        try:
            # Recorded before it leaves the table, so a pass never takes it for an unwatched death.
            self._record_end(job_id, f"the job process {describe_exit(code)}", process.pid)
            self._processes.pop(job_id, None)
            if not self._stop.is_set():
                self.schedule()
        except PlaygroundError as err:  # the store went away (a removed folder, a full disk)
            print(f"jobs: could not record the end of {job_id}: {err}", file=sys.stderr, flush=True)

    def _record_end(self, job_id: str, failure: str, pid: int) -> None:
        """After job process `pid` ended: its final state, unless it recorded one itself."""
        if job_id in self._ending:
            state, reason = self._ending[job_id]
            self.store.finish_if_running(job_id, state, reason, pid)
        elif self.store.finish_if_running(job_id, "failed", failure, pid):
            self.store.add_event(job_id, {"message": failure})

    # -- the background loop (the app runs one) ------------------------------------------
    def start(self) -> JobManager:
        """Schedule in a background thread, once a second (the app does this)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.hold_watch()
                self.schedule()
            except Exception:  # a failed pass must not end the scheduler
                continue

    def hold_watch(self) -> bool:
        """Take the store's watch lock if it is free, and keep it: it tells command-line submits
        that someone schedules this store, so they need not start a scheduler process."""
        if self._watch_lock is None:
            self._watch_lock = try_lock(watch_lock_path(self.store.path))
        return self._watch_lock is not None

    def release_watch(self) -> None:
        if self._watch_lock is not None:
            os.close(self._watch_lock)
            self._watch_lock = None

    def stop(self, end_jobs: bool = True) -> None:
        """Stop scheduling; with `end_jobs`, end the running jobs (they show as interrupted and
        fine-tunes can be resumed) rather than leave them unwatched."""
        self._stop.set()
        self.release_watch()
        if not end_jobs:
            return
        for job in self.store.list():
            if job.state != "running":
                continue
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

    def resume(self, job_id: str, *, start: bool = True) -> Job:
        """Queue an interrupted, failed or cancelled fine-tune again; it goes on from its last
        checkpoint (the job keeps its id, options and events)."""
        job = self.store.get(job_id)
        resumes = job_kind(job.kind).resumes
        if job.state not in ("interrupted", "failed", "cancelled") or not resumes:
            why = f"{job.kind} jobs do not resume (they keep no checkpoints)" if not resumes else f"it is {job.state}"
            raise PlaygroundError(f"job {job_id} cannot be resumed: {why}")
        self._ending.pop(job_id, None)
        self.store.update(job_id, state="queued", error=None, ended=None, pid=None)
        self.store.add_event(job_id, {"message": "resume requested"})
        if start:
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


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise StoreError(f"the jobs folder {path.parent} cannot be written: {err.strerror}") from None


def watch_lock_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".watch.lock")


def try_lock(path: Path) -> int | None:
    """An exclusive lock on `path` if no process holds it (the open file, kept to hold it)."""
    handle = _open_lock_file(path)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        return None
    return handle
