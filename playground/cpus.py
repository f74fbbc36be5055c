"""How many CPUs this process may really use, and the thread counts that follow from it.

Torch and llama.cpp count the host's cores. A container limited by a CPU quota (docker
`--cpus`, a Kubernetes limit, a Hugging Face Space) or pinned to a few cores then runs many more
threads than it has CPUs, and every small op waits for threads that are not scheduled: decode
and fine-tune steps become several times slower. Torch backends call `limit_torch_threads` at
load (a worker's and a job's models both load through them); llama.cpp's default thread count
is `usable_cpus`.
Knows nothing of models.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs the cgroup's quota allows (2.5 for 250 ms per 100 ms), or None without a quota.
    Reads cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The fewest of: the CPUs this process may be scheduled on, the cgroup quota rounded up,
    and the physical cores (a second hyperthread adds little to matrix work). At least 1."""
    import psutil

    counts = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1]
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        counts.append(math.ceil(quota))
    physical = psutil.cpu_count(logical=False)
    if physical:
        counts.append(physical)
    return max(1, min(counts))


def limit_torch_threads() -> int:
    """Lower torch's intra-op threads to `usable_cpus` (never raise them) unless the user chose
    a count with OMP_NUM_THREADS; returns the count in force."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = min(torch.get_num_threads(), usable_cpus())
    torch.set_num_threads(threads)
    return threads
