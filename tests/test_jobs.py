"""Jobs in real processes: they run, persist, queue, cancel, and die without taking the app."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from playground.errors import ConfigError
from playground.jobs.manager import JobManager
from playground.jobs.store import JobStore

SHORT = {"model": "smollm2-135m-router", "data": "ood", "limit": 2}
LONG = {"model": "smollm2-135m-router", "data": "ood"}  # 64 rows: about a minute


@pytest.fixture
def manager(tmp_path):
    return JobManager(JobStore(tmp_path / "jobs.sqlite"), tmp_path / "logs", max_cpu_jobs=1)


def wait_for_progress(manager: JobManager, job_id: str, step: int = 1, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while manager.store.get(job_id).step < step:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.2)


def test_a_job_runs_in_its_own_process_and_its_record_survives_a_restart(manager, tmp_path):
    job = manager.submit("eval-router", SHORT)
    assert job.state == "running" and job.pid != os.getpid()
    done = manager.wait(job.id, timeout_s=120)
    assert done.state == "succeeded" and done.step == done.total == 2
    assert done.result["n"] == 2 and len(done.result["curve"]) == 21
    events = [e for _, _, e in manager.store.events(job.id)]
    assert events[0]["message"].startswith("2 rows") and any("metrics" in e for e in events)
    reopened = JobStore(tmp_path / "jobs.sqlite")
    assert [j.id for j in reopened.list()] == [job.id] and reopened.get(job.id).state == "succeeded"


def test_cpu_jobs_queue_behind_the_limit(manager):
    first = manager.submit("eval-router", SHORT)
    second = manager.submit("eval-router", SHORT)
    assert (first.state, second.state) == ("running", "queued")
    assert manager.wait(second.id, timeout_s=240).state == "succeeded"
    assert manager.store.get(first.id).state == "succeeded"


def test_cancel_ends_the_job_and_its_workers(manager):
    job = manager.submit("eval-router", LONG)
    wait_for_progress(manager, job.id)
    group = [p.pid for p in psutil.Process(job.pid).children(recursive=True)] + [job.pid]
    assert len(group) >= 2  # the job process and the router's worker
    assert manager.cancel(job.id).state == "cancelled"
    time.sleep(0.5)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in group)
    queued = manager.store.create("eval-router", SHORT)
    # A queued job cancels without ever starting.
    manager.max_cpu_jobs = 0
    assert manager.cancel(queued.id).state == "cancelled" and manager.store.get(queued.id).pid is None


def test_sigkill_marks_the_job_failed_and_the_manager_goes_on(manager):
    job = manager.submit("eval-router", LONG)
    wait_for_progress(manager, job.id)
    os.kill(job.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while manager.store.get(job.id).state == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    failed = manager.store.get(job.id)
    assert failed.state == "failed" and "SIGKILL" in failed.error
    assert manager.wait(manager.submit("eval-router", SHORT).id, timeout_s=120).state == "succeeded"


def test_jobs_left_running_by_a_dead_app_show_as_interrupted(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create("eval-router", SHORT)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.update(job.id, state="running", pid=gone.pid, started=time.time())  # as a crashed app left it
    JobManager(store, tmp_path / "logs")
    assert store.get(job.id).state == "interrupted"


def test_bad_options_are_refused_before_any_process(manager):
    with pytest.raises(ConfigError, match="threshold"):
        manager.submit("eval-router", {"model": "x", "threshold": 7})
    with pytest.raises(ConfigError, match="unknown job kind 'train-everything'"):
        manager.submit("train-everything", {"model": "x"})
    assert manager.store.list() == []


def test_a_failing_job_records_its_error(manager, tmp_path):
    job = manager.submit("eval-router", {"model": "smollm2-135m-router", "data": str(tmp_path / "none.jsonl")})
    done = manager.wait(job.id, timeout_s=60)
    assert done.state == "failed" and "cannot be read" in done.error


def test_cli_jobs(tmp_path):
    env = os.environ | {"PLAYGROUND_DATA_DIR": str(tmp_path)}

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "playground", "jobs", *a],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )

    out = run("submit", "eval-router", "--model", "smollm2-135m-router", "--option", "limit=2", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["state"] == "succeeded" and job["result"]["n"] == 2
    shown = json.loads(run("show", job["id"], "--json").stdout)
    assert shown["events"] and shown["options"]["limit"] == 2
    listed = json.loads(run("list", "--json").stdout)
    assert [j["id"] for j in listed] == [job["id"]]
    bad = run("submit", "eval-router", "--model", "m", "--option", "threshold=9")
    assert bad.returncode == 2 and "invalid options for eval-router" in bad.stderr and "Traceback" not in bad.stderr
    assert run("cancel", "nope").returncode == 2


def test_lora_fine_tune_makes_a_variant_that_loads_and_generates(tmp_path, llama_folder, monkeypatch):
    monkeypatch.setenv("PLAYGROUND_DATA_DIR", str(tmp_path / "data"))
    data = tmp_path / "sft.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say the word number {i}."},
                {"role": "assistant", "content": "Paris is the capital of France."},
            ]
        }
        for i in range(6)
    ]
    rows.append({"instruction": "What is the capital of France?", "response": "Paris."})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = JobStore(tmp_path / "data" / "jobs" / "jobs.sqlite")
    jobs = JobManager(store, tmp_path / "data" / "jobs" / "logs")
    job = jobs.submit(
        "lora-sft",
        {
            "model": str(llama_folder),
            "data": str(data),
            "epochs": 3,
            "batch_size": 4,
            "learning_rate": 0.01,
            "rank": 4,
            "name": "tiny-lora",
        },
    )
    done = jobs.wait(job.id, timeout_s=240)
    assert done.state == "succeeded", done.error
    losses = [e["loss"] for _, _, e in store.events(job.id) if "loss" in e]
    assert len(losses) == done.total == 6 and losses[-1] < losses[0]
    from playground.engine import Engine
    from playground.workers import Finished

    engine = Engine()  # sees the shipped configs and the one the job wrote
    try:
        made = engine.get("tiny-lora")
        assert made.finetune.job_id == job.id and made.finetune.options["rank"] == 4
        engine.load("tiny-lora")
        request = engine.request(
            "tiny-lora", prompt="What is the capital of France?", mode="chat", max_new_tokens=8, temperature=0
        )
        finished = [e for e in engine.generate("tiny-lora", request) if isinstance(e, Finished)][0]
        assert finished.metrics.completion_tokens >= 1
    finally:
        engine.shutdown()
