"""Live resource samples: CPU, system RAM, each loaded variant's memory, and VRAM per GPU;
and the servers behind remote variants (playground.remote_health).

A background thread samples once a second into a ring buffer; readers (the UI's timer) only
copy the buffer, so watching never slows generation. GPU figures come from nvml (nvidia-ml-py),
including per-process GPU memory where the driver reports it; without a GPU, `gpus` is empty
and `gpu_note` says why.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psutil

from playground import remote_health
from playground.engine import Engine
from playground.memory import nvml_memory_info
from playground.remote_health import RemoteHealth


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    util_percent: int | None


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the epoch
    cpu_percent: float
    ram_used_bytes: int
    ram_total_bytes: int
    variant_rss: dict[str, int]  # variant id -> worker RSS
    variant_gpu: dict[str, int]  # variant id -> GPU memory of its worker, where reported
    gpus: list[GpuSample] = field(default_factory=list)
    variant_gpu_index: dict[str, int] = field(default_factory=dict)  # variant id -> the GPU it is on


class _Nvml:
    """nvml, opened once; `note` says why it is unavailable (no GPU, no driver)."""

    def __init__(self) -> None:
        self.module: Any = None
        self.note = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self.module = pynvml
            if pynvml.nvmlDeviceGetCount() == 0:
                self.note = "No NVIDIA GPU on this machine: showing CPU and RAM only."
        except Exception as err:  # NVMLError_LibraryNotFound where there is no driver
            self.note = f"No NVIDIA GPU on this machine ({err.__class__.__name__}): showing CPU and RAM only."

    def sample(self, pids: dict[int, str]) -> tuple[list[GpuSample], dict[str, int], dict[str, int]]:
        if self.module is None:
            return [], {}, {}
        nv = self.module
        gpus, per_variant, where = [], {}, {}
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            memory = nvml_memory_info(nv, handle)
            try:
                util = int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nv.NVMLError:
                util = None
            name = nv.nvmlDeviceGetName(handle)
            gpus.append(
                GpuSample(
                    index, name if isinstance(name, str) else name.decode(), int(memory.used), int(memory.total), util
                )
            )
            try:
                processes = nv.nvmlDeviceGetComputeRunningProcesses(handle)
            except nv.NVMLError:
                processes = []
            for proc in processes:
                variant = pids.get(proc.pid)
                if variant and proc.usedGpuMemory is not None:
                    per_variant[variant] = per_variant.get(variant, 0) + int(proc.usedGpuMemory)
                    where[variant] = index
        return gpus, per_variant, where


class SystemMonitor:
    def __init__(
        self, engine: Engine, interval_s: float = 1.0, keep_s: float = 300.0, remote_interval_s: float = 3.0
    ) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.remote_interval_s = remote_interval_s
        self.samples: deque[Sample] = deque(maxlen=int(keep_s / interval_s) + 1)
        # variant id -> its server's last look; checked in a thread of their own, so a server
        # that does not answer never delays the samples.
        self.remote: dict[str, RemoteHealth] = {}
        self._nvml = _Nvml()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._remote_thread: threading.Thread | None = None
        psutil.cpu_percent(None)  # the first call only sets the reference point

    @property
    def gpu_note(self) -> str:
        return self._nvml.note

    def sample_now(self) -> Sample:
        pids: dict[int, str] = {}
        rss: dict[str, int] = {}
        for variant_id, worker in list(self.engine.workers.items()):
            if worker.pid is not None:
                pids[worker.pid] = variant_id
                value = worker.rss_bytes()
                if value is not None:
                    rss[variant_id] = value
        gpus, per_variant, where = self._nvml.sample(pids)
        memory = psutil.virtual_memory()
        sample = Sample(
            time.time(),
            psutil.cpu_percent(None),
            memory.total - memory.available,
            memory.total,
            rss,
            per_variant,
            gpus,
            where,
        )
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_now()
            except Exception:  # a failed sample must never end the monitor
                continue

    def check_remotes(self) -> dict[str, RemoteHealth]:
        """Each remote variant's server, looked at now (loaded or not: whether it answers is
        worth knowing before a load)."""
        configs = [c for c in self.engine.catalogue.configs.values() if c.endpoint is not None]
        seen = {c.id: remote_health.check(c.endpoint) for c in configs if c.endpoint is not None}
        self.remote = seen
        return seen

    def _run_remote(self) -> None:
        while True:
            try:
                self.check_remotes()
            except Exception:  # a failed look must never end the monitor
                pass
            if self._stop.wait(self.remote_interval_s):
                return

    def start(self) -> SystemMonitor:
        if self._thread is None:
            self.sample_now()
            self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
            self._thread.start()
            self._remote_thread = threading.Thread(target=self._run_remote, name="monitor-remote", daemon=True)
            self._remote_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def recent(self) -> list[Sample]:
        return list(self.samples)
