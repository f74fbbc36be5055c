"""The CPUs a process may use: cgroup quotas read from real files, and the thread counts the
torch and llama.cpp backends take from them."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
from conftest import variant

from playground.cpus import cgroup_cpu_quota, usable_cpus


def _cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return tmp_path


def test_cgroup_quotas_v2_and_v1(tmp_path):
    assert cgroup_cpu_quota(_cgroup(tmp_path / "a", {"cpu.max": "250000 100000"})) == 2.5
    assert cgroup_cpu_quota(_cgroup(tmp_path / "b", {"cpu.max": "max 100000"})) is None
    v1 = {"cpu,cpuacct/cpu.cfs_quota_us": "150000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}
    assert cgroup_cpu_quota(_cgroup(tmp_path / "c", v1)) == 1.5
    unlimited = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}
    assert cgroup_cpu_quota(_cgroup(tmp_path / "d", unlimited)) is None
    assert cgroup_cpu_quota(_cgroup(tmp_path / "e", {"cpu.max": "garbage"})) is None
    assert cgroup_cpu_quota(tmp_path / "no-such-folder") is None


def test_usable_cpus_is_the_fewest_of_affinity_quota_and_physical_cores(tmp_path):
    schedulable = len(os.sched_getaffinity(0))
    physical = psutil.cpu_count(logical=False) or schedulable
    assert usable_cpus(tmp_path / "none") == min(schedulable, physical)
    # A quota of 0.5 CPU still runs one thread; 1.2 CPUs run two where there are two.
    assert usable_cpus(_cgroup(tmp_path / "half", {"cpu.max": "50000 100000"})) == 1
    assert usable_cpus(_cgroup(tmp_path / "more", {"cpu.max": "120000 100000"})) == min(2, schedulable, physical)


def _torch_threads_after_limit(env: dict[str, str]) -> str:
    code = (
        "import torch; torch.set_num_threads(64); from playground.cpus import limit_torch_threads;"
        "print(limit_torch_threads(), torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_torch_threads_are_lowered_to_the_usable_cpus_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    n = usable_cpus()
    assert _torch_threads_after_limit(env) == f"{n} {n}"
    # OMP_NUM_THREADS is the user's choice (here torch's own 64 stands for it): left alone.
    assert _torch_threads_after_limit(env | {"OMP_NUM_THREADS": "3"}) == "64 64"


def test_llamacpp_runs_one_thread_per_usable_cpu_for_decode_and_prompt(tiny_gguf):
    from playground.backends.llamacpp_backend import LlamaCppBackend

    backend = LlamaCppBackend(variant(id="tiny-gguf", backend="llamacpp", source={"path": str(tiny_gguf)}))
    backend.load()
    try:
        assert backend.llm.n_threads == backend.llm.n_threads_batch == usable_cpus()
    finally:
        backend.unload()
    chosen = LlamaCppBackend(
        variant(id="tiny-gguf-1", backend="llamacpp", source={"path": str(tiny_gguf)}, llamacpp={"n_threads": 1})
    )
    chosen.load()
    try:
        assert chosen.llm.n_threads == chosen.llm.n_threads_batch == 1
    finally:
        chosen.unload()
