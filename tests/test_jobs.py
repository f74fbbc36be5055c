"""Jobs in real processes: they run, persist, queue, cancel, and die without taking the app."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import run_job, variant

from playground.config import REPO_ROOT
from playground.errors import ConfigError, PlaygroundError
from playground.jobs.kinds import KINDS
from playground.jobs.manager import JobManager, choose_gpu
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


@contextlib.contextmanager
def held_still(pid: int):
    """The job's process and its workers stopped (SIGSTOP) while the test acts on them, so that
    however fast the machine, the job cannot end first; SIGCONT afterwards to what still lives."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        process.suspend()
    try:
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()


def process_gone(pid: int) -> bool:
    """Ended: no such process, or a zombie about to be reaped (it can vanish between two looks)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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
    assert all(process_gone(pid) for pid in group)
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
    with pytest.raises(ConfigError, match="threshold: Input should be less than or equal to 1"):
        manager.submit("eval-router", {"model": "x", "threshold": 7})
    with pytest.raises(ConfigError, match="thresold: unknown option"):
        manager.submit("eval-router", {"model": "x", "thresold": 0.5})
    with pytest.raises(ConfigError, match="limit: ") as refused:  # the value is not echoed back
        manager.submit("eval-router", {"model": "x", "limit": "sk-not-a-number"})
    assert "sk-not-a-number" not in str(refused.value)
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
    # A preset's options, with --option on top; a preset the kind lacks is named as such.
    quick = run(
        "submit", "lora-router", "--model", "smollm2-135m-router-transformers", "--preset", "quick", "--option", "seed=3"
    )
    assert quick.returncode == 0, quick.stderr
    quick_id = quick.stdout.split()[0]
    run("cancel", quick_id)
    options = json.loads(run("show", quick_id, "--json").stdout)["options"]
    assert (options["seed"], options["holdout"], options["learning_rate"], options["stop_at"]) == (3, 50, 1e-3, 0.96)
    unknown = run("submit", "lora-router", "--model", "smollm2-135m-router", "--preset", "fast")
    assert unknown.returncode == 2 and "no preset 'fast' (its presets: card, quick)" in unknown.stderr


@pytest.mark.parametrize("kind", sorted(name for name, record in KINDS.items() if record.presets))
def test_every_preset_is_valid_options_of_its_kind(kind):
    for name, (about, options) in KINDS[kind].presets.items():
        assert about and KINDS[kind].options.model_validate({"model": "m", **options}), name


def _jobs_cli(data_dir, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "playground", "jobs", *args],
        capture_output=True,
        text=True,
        env=os.environ | {"PLAYGROUND_DATA_DIR": str(data_dir)},
        timeout=timeout,
    )


def _wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def _schedulers_of(store_path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "playground.jobs.scheduler" in cmdline and str(store_path) in cmdline:
            found.append(process)
    return found


def test_jobs_submitted_from_several_command_lines_run_and_end_with_no_app(tmp_path):
    """Three submits at once, none waiting, no app: every job runs once and ends, then the
    scheduler process leaves."""
    command = [sys.executable, "-m", "playground", "jobs", "submit", "eval-router", "--model", "smollm2-135m-router"]
    env = os.environ | {"PLAYGROUND_DATA_DIR": str(tmp_path)}
    submits = [
        subprocess.Popen([*command, "--option", "limit=2", "--json"], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    ids = [json.loads(p.communicate(timeout=120)[0])["id"] for p in submits]
    store = JobStore(tmp_path / "jobs" / "jobs.sqlite")
    assert len(set(ids)) == 3
    _wait_until(lambda: all(store.get(i).finished for i in ids), 400, "jobs left queued or running with no app")
    assert [store.get(i).state for i in ids] == ["succeeded"] * 3
    for job_id in ids:  # each ran exactly once
        starts = [e for _, _, e in store.events(job_id) if e.get("message", "").endswith("rows from ood")]
        assert len(starts) == 1
    assert len({store.get(i).pid for i in ids}) == 3
    _wait_until(lambda: not _schedulers_of(store.path), 15, "the scheduler process stayed with nothing to do")


def test_a_job_killed_with_no_app_is_marked_and_the_next_one_starts(tmp_path):
    long = _jobs_cli(tmp_path, "submit", "eval-router", "--model", "smollm2-135m-router", "--json")
    short = _jobs_cli(tmp_path, "submit", "eval-router", "--model", "smollm2-135m-router", "--option", "limit=1")
    assert long.returncode == 0 and short.returncode == 0, long.stderr + short.stderr
    killed_id, waiting_id = json.loads(long.stdout)["id"], short.stdout.split()[0]
    store = JobStore(tmp_path / "jobs" / "jobs.sqlite")
    _wait_until(lambda: store.get(killed_id).step >= 1, 120, "the first job never made progress")
    assert store.get(waiting_id).state == "queued"
    os.kill(store.get(killed_id).pid, signal.SIGKILL)
    _wait_until(lambda: store.get(killed_id).finished, 10, "a killed job still shows as running")
    assert store.get(killed_id).state == "failed" and "SIGKILL" in store.get(killed_id).error
    _wait_until(lambda: store.get(waiting_id).finished, 180, "the queued job never started")
    assert store.get(waiting_id).state == "succeeded"


def test_a_job_resolves_variants_from_the_configured_folders(tmp_path, monkeypatch):
    """The catalogue a job process builds is the one the app and the command line see."""
    folder = tmp_path / "my-configs"
    folder.mkdir()
    shipped = (REPO_ROOT / "model_configs" / "smollm2-135m-router.yaml").read_text()
    (folder / "my-router.yaml").write_text(shipped.replace("id: smollm2-135m-router", "id: my-router", 1))
    monkeypatch.setenv("PLAYGROUND_CONFIG_DIRS", json.dumps([str(folder)]))
    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), tmp_path / "logs")
    done = manager.wait(manager.submit("eval-router", {"model": "my-router", "limit": 1}).id, timeout_s=120)
    assert done.state == "succeeded", done.error
    # A variant nobody knows is refused at once, not placed on the CPU and failed later.
    with pytest.raises(PlaygroundError, match="unknown variant 'smollm2-135m-gguf'"):
        manager.submit("eval-perplexity", {"model": "smollm2-135m-gguf"})


def test_the_jobs_database_damaged_or_read_only_gets_one_line(tmp_path):
    damaged = tmp_path / "damaged"
    (damaged / "jobs").mkdir(parents=True)
    (damaged / "jobs" / "jobs.sqlite").write_bytes(os.urandom(8192))
    for args in (["list"], ["show", "x"], ["submit", "eval-router", "--model", "smollm2-135m-router"]):
        result = _jobs_cli(damaged, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "the jobs database" in result.stderr and "is damaged: move it aside" in result.stderr


def test_stores_opened_at_once_set_their_schema_up_once(tmp_path):
    """Several command lines opening a new store together (CI saw three `jobs submit` at once
    fail with "duplicate column name"): eight connections at a time, the jobs and the votes
    store, five times over; every open succeeds and the columns are there once."""
    import threading

    from playground.arena import VoteStore

    for trial in range(5):
        for store, name in ((JobStore, "jobs.sqlite"), (VoteStore, "votes.sqlite")):
            path = tmp_path / str(trial) / name
            start, errors = threading.Barrier(8), []

            def open_store(store=store, path=path, start=start, errors=errors) -> None:
                start.wait()
                try:
                    store(path)
                except Exception as err:  # noqa: BLE001 - collected for the assertion
                    errors.append(f"{type(err).__name__}: {err}")

            threads = [threading.Thread(target=open_store) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors, errors
    assert JobStore(tmp_path / "0" / "jobs.sqlite").list() == []


def test_a_read_only_jobs_folder_is_still_listed_and_a_submit_says_why(tmp_path, small_disk):
    JobStore(small_disk / "jobs" / "jobs.sqlite").create("eval-router", SHORT)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    listed = _jobs_cli(small_disk, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [j["state"] for j in json.loads(listed.stdout)] == ["queued"]
    refused = _jobs_cli(small_disk, "submit", "eval-router", "--model", "smollm2-135m-router")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "cannot be written" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: room for the store and a job's first files, not for a saved model."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"this machine cannot mount a small tmpfs: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_a_job_saves_fails_it_and_the_store_stays_readable(
    tmp_path, small_disk, monkeypatch, llama_folder
):
    monkeypatch.setenv("PLAYGROUND_DATA_DIR", str(small_disk))
    manager = JobManager(JobStore(small_disk / "jobs" / "jobs.sqlite"), tmp_path / "logs")
    # Leave room for the job's events, not for its merged model (~0.5 MB).
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 200_000))
    job = manager.submit("lora-sft", {"model": str(llama_folder), "data": str(_sft_file(tmp_path, n=2))})
    done = manager.wait(job.id, timeout_s=240)
    _wait_until(lambda: process_gone(done.pid), 30, "the job process outlived its record")
    assert done.state == "failed" and "No space left on device" in done.error, done.error
    assert not list((small_disk / "jobs" / job.id).glob("*.partial"))  # nothing half-written left
    listed = _jobs_cli(small_disk, "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["state"] == "failed"


def test_training_loads_the_base_unfused_even_where_fast_decode_fuses(tmp_path, llama_folder, jobs):
    """fast_decode fuses q/k/v and gate/up at load, and peft refuses fused layers: a GPU LoRA
    failed so. `fast_decode: on` does the same fusion on the CPU, so the CPU shows it too."""
    configs = tmp_path / "data" / "jobs" / "model_configs"
    configs.mkdir(parents=True)
    (configs / "tiny-fused.yaml").write_text(
        f"id: tiny-fused\ndisplay_name: tiny fused\nbackend: transformers\nsource: {{path: {llama_folder}}}\n"
        "dtype: fp32\nfast_decode: 'on'\n"
    )
    options = {"model": "tiny-fused", "data": str(_sft_file(tmp_path, n=2)), "name": "tiny-fused-lora"}
    done = run_job(jobs, "lora-sft", options)
    assert done.result["steps"] >= 1


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
        made = engine.catalogue.get("tiny-lora")
        assert made.finetune.job_id == job.id and made.finetune.options["rank"] == 4
        engine.load("tiny-lora")
        request = engine.request(
            "tiny-lora", prompt="What is the capital of France?", mode="chat", max_new_tokens=8, temperature=0
        )
        finished = [e for e in engine.generate("tiny-lora", request) if isinstance(e, Finished)][0]
        assert finished.metrics.completion_tokens >= 1
    finally:
        engine.shutdown()


def _reply(variant_id: str, **request) -> str:
    from playground.engine import Engine
    from playground.workers import Finished

    engine = Engine()
    try:
        engine.load(variant_id)
        finished = [
            e for e in engine.generate(variant_id, engine.request(variant_id, **request)) if isinstance(e, Finished)
        ]
        assert finished[0].metrics.completion_tokens >= 1
        return finished[0].text
    finally:
        engine.shutdown()


def test_router_lora_teaches_the_router_answer_and_the_result_is_a_router(tmp_path, llama_folder, jobs):
    data = tmp_path / "router.jsonl"
    rows = [{"prompt": f"Value this bond number {i}", "route": "npc_fin", "reason": "valuation"} for i in range(4)]
    rows += [{"prompt": f"Say hi number {i}", "route": "self", "reason": "chit-chat"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"model": str(llama_folder), "data": str(data), "epochs": 25, "batch_size": 4, "learning_rate": 0.01}
    options["max_length"] = 1024  # the tiny tokenizer spends about a token per character of the prompt
    job = jobs.submit("lora-router", options | {"name": "tiny-router"})
    done = jobs.wait(job.id, timeout_s=240)
    assert done.state == "succeeded", done.error
    losses = [e["loss"] for _, _, e in jobs.store.events(job.id) if "loss" in e]
    assert done.result["steps"] == len(losses) == 50 and losses[-1] < losses[0] - 0.5
    from playground.engine import Engine
    from playground.router import Router

    engine = Engine()
    try:
        made = engine.catalogue.get("tiny-router")
        assert made.role == "router" and made.router.escalate_route == "npc_fin"
        assert made.router.system_prompt.startswith("You are NPC Fast")  # the embedded router's prompt
        assert made.finetune.options["rank"] == 32 and made.finetune.data == str(data)  # the card's rank
        router = Router(engine, "tiny-router")
        router.ensure_loaded()
        # A random 64-wide model under a LoRA learns slowly, and `npc_fin",` is more tokens than
        # `self",`; what a router needs is that the score ranks the two kinds apart.
        escalate = {p["prompt"]: router.score(p["prompt"])[0]["npc_fin"] for p in rows}
        assert min(escalate[r["prompt"]] for r in rows[:4]) > max(escalate[r["prompt"]] for r in rows[4:])
    finally:
        engine.shutdown()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "route": "elsewhere"}) + "\n")
    failed = jobs.wait(jobs.submit("lora-router", options | {"data": str(bad)}).id, timeout_s=120)
    assert failed.state == "failed" and "'elsewhere' is not one of" in failed.error


@pytest.mark.parametrize("arch", ["llama", "qwen2", "remote_code"])
def test_a_shared_prompt_prefix_run_once_gives_the_loss_and_gradients_of_the_plain_pass(arch, request):
    """The LoRA step's shared-prefix pass (the system prompt once per batch, its keys and values
    repeated for each row) against the plain padded pass, in fp32, on each trainable architecture."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from playground.jobs.training import causal_lm_loss, unlabelled_prefix_length

    folder = request.getfixturevalue({"remote_code": "remote_code_folder"}.get(arch, f"{arch}_folder"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=arch == "remote_code")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in model.named_parameters():  # LoRA's B starts at zero: give it a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    prompt = list(range(5, 30))  # 25 shared prompt tokens, then each row's own prompt and answer
    rows = [
        (prompt + [40, 41, 42, 50, 51], [-100] * 28 + [50, 51]),
        (prompt + [43, 44, 52, 53, 54, 55], [-100] * 27 + [53, 54, 55]),
        (prompt + [45, 56, 57], [-100] * 26 + [57]),
    ]
    assert unlabelled_prefix_length(rows) == 25 and unlabelled_prefix_length(rows[:1]) == 0
    assert unlabelled_prefix_length(rows, least=26) == 0
    width = max(len(ids) for ids, _ in rows)
    inputs = {
        "input_ids": torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    passes = {}
    for shared in (0, 25):
        model.zero_grad()
        loss = causal_lm_loss(model, inputs, shared)
        loss.backward()
        passes[shared] = (loss.item(), [p.grad.clone() for p in trainable])
    assert passes[25][0] == pytest.approx(passes[0][0], rel=1e-5)
    for plain, shared in zip(passes[0][1], passes[25][1], strict=True):
        torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in passes[25][1])


def test_held_out_rows_are_scored_in_batches_as_the_router_scores_them_one_by_one(llama_folder):
    """The router LoRA's held-out check scores all rows in batches that share their prompt's
    start: each sum equals the backend's plain pass over that one sequence (fp32)."""
    import torch

    from playground.backends.transformers_backend import TransformersBackend
    from playground.jobs.training import sequence_logprobs
    from playground.router import ROUTE_END

    backend = TransformersBackend(variant(id="t", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32"))
    backend.load()
    system = backend.codec.encode("Route the request, self or npc_fin.\n", add_special_tokens=True)
    sequences, starts = [], []
    for request in ("Hi", "Value a bond with a 5% coupon", "What is 2 + 2?", "Price a swap", "Thanks"):
        prompt = system + backend.codec.encode(f"User: {request}\nRoute: ", add_special_tokens=False)
        for route in ("self", "npc_fin"):
            sequences.append(prompt + backend.codec.encode(route + ROUTE_END, add_special_tokens=False))
            starts.append(len(prompt))
    sequences.append(backend.codec.encode("A row of its own, sharing nothing", add_special_tokens=False))
    starts.append(3)
    batched = sequence_logprobs(backend.model, sequences, starts, pad=0, batch_size=4)
    with torch.inference_mode():
        one_by_one = [backend._score_plain([ids], start)[0] for ids, start in zip(sequences, starts, strict=True)]
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    assert len(set(batched)) == len(batched)


def test_length_grouped_batches_pad_less_and_keep_a_routers_routes_mixed():
    """A router's long rows are mostly one route: grouping by length alone made one-route batches."""
    import random

    from playground.jobs.lora import epoch_batches

    rng = random.Random(1)
    routes = ["npc_fin"] * 200 + ["self"] * 300
    lengths = [rng.randint(150, 300) if r == "npc_fin" else rng.randint(120, 200) for r in routes]

    def padded(batches):  # pad tokens in an epoch
        return sum(len(b) * max(lengths[i] for i in b) for b in batches) - sum(lengths)

    shuffled = epoch_batches(lengths, 8, random.Random(0), group_by_length=False)
    by_length = epoch_batches(lengths, 8, random.Random(0), group_by_length=True)
    by_length_mixed = epoch_batches(lengths, 8, random.Random(0), group_by_length=True, strata=routes)
    for batches in (shuffled, by_length, by_length_mixed):
        assert sorted(i for b in batches for i in b) == list(range(500))  # each row once an epoch
        assert sorted(len(b) for b in batches) == [4] + [8] * 62
    assert padded(by_length) < padded(by_length_mixed) < 0.6 * padded(shuffled)
    assert any(all(routes[i] == "npc_fin" for i in b) for b in by_length)  # the fault the strata mend
    escalating = [sum(routes[i] == "npc_fin" for i in b) for b in by_length_mixed if len(b) == 8]
    assert min(escalating) >= 2 and max(escalating) <= 5  # 3.2 of 8 in the data
    # The same seed gives the same batches: a resumed job replays its order.
    assert epoch_batches(lengths, 8, random.Random(0), True, routes) == by_length_mixed


def test_router_lora_stops_early_once_its_held_out_rows_route_right(tmp_path, llama_folder, jobs):
    """Rows held out of training (stratified by route) are routed every few steps; two checks in a
    row at the target accuracy stop the job, and the saved router routes them as the last check."""
    from playground.jobs.lora import read_router_rows, split_holdout

    data = tmp_path / "router.jsonl"
    rows = [{"prompt": f"Value this bond number {i}", "route": "npc_fin", "reason": "valuation"} for i in range(6)]
    rows += [{"prompt": f"Say hi number {i}", "route": "self", "reason": "chit-chat"} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {
        "model": str(llama_folder),
        "data": str(data),
        "epochs": 25,
        "batch_size": 4,
        "learning_rate": 0.01,
        "max_length": 1024,
        "holdout": 4,
        "eval_every": 2,
        "stop_at": 0.25,
        "name": "tiny-router-early",
    }
    done = jobs.wait(jobs.submit("lora-router", options).id, timeout_s=240)
    assert done.state == "succeeded", done.error
    result = done.result
    assert (result["holdout"], result["planned_steps"]) == (4, 50)  # 8 rows left to train on: 2 steps an epoch
    assert result["stopped_early_at"] == result["steps"] == 4
    assert [h["step"] for h in result["holdout_accuracy"]] == [2, 4]
    assert all(h["accuracy"] >= 0.25 for h in result["holdout_accuracy"])
    assert len([e for _, _, e in jobs.store.events(done.id) if "loss" in e]) == 4
    messages = [e["message"] for _, _, e in jobs.store.events(done.id) if "message" in e]
    assert any("4 rows held out, routed every 2 steps" in m for m in messages)
    assert any(m.startswith("step 4: held-out route accuracy") and m.endswith("stopping early") for m in messages)
    # The held-out rows are the stratified split's, none of them trained on; the saved router
    # routes them as the last check did.
    from playground.catalogue import Catalogue
    from playground.engine import Engine
    from playground.router import Router

    engine = Engine(Catalogue.from_settings())
    try:
        spec = engine.catalogue.get("tiny-router-early").router
        _, held = split_holdout(read_router_rows(data, spec), 4, 0)
        assert sorted(json.loads(a)["route"] for _, a in held) == ["npc_fin", "npc_fin", "self", "self"]
        router = Router(engine, "tiny-router-early", calibrated=False)
        router.ensure_loaded()
        right = [
            (router.score(m[-1]["content"])[0]["npc_fin"] > 0.5) == (json.loads(a)["route"] == "npc_fin")
            for m, a in held
        ]
        assert sum(right) / len(right) == result["holdout_accuracy"][-1]["accuracy"]
    finally:
        engine.shutdown()
    # A holdout as large as the data leaves no rows to train on.
    failed = jobs.wait(jobs.submit("lora-router", options | {"holdout": 12, "name": "x"}).id, timeout_s=120)
    assert failed.state == "failed" and "holdout (12) must be smaller than the 12 training rows" in failed.error


def _sft_file(tmp_path, n: int = 16):
    data = tmp_path / "sft.jsonl"
    rows = [{"instruction": f"Name a colour, number {i}.", "response": "Blue, as the sea."} for i in range(n)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_a_cancelled_fine_tune_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, llama_folder, jobs):
    options = {
        "model": str(llama_folder),
        "data": str(_sft_file(tmp_path)),
        "epochs": 8,  # 64 steps
        "batch_size": 2,
        "checkpoint_every": 4,
        "learning_rate": 0.01,
        "merge": False,
    }
    whole = jobs.wait(jobs.submit("lora-sft", options | {"name": "whole"}).id, timeout_s=240)
    assert whole.state == "succeeded", whole.error and whole.result["resumed_at"] == 0
    broken = jobs.submit("lora-sft", options | {"name": "broken"})
    wait_for_progress(jobs, broken.id, step=13)
    # Held still, the job ignores the SIGTERM and Cancel kills it after its grace: a kill
    # between checkpoints, at whatever step, however fast the machine.
    with held_still(broken.pid):
        assert jobs.cancel(broken.id).state == "cancelled"
    with pytest.raises(PlaygroundError, match="cannot be resumed"):
        jobs.resume(whole.id)  # it ended well
    assert jobs.resume(broken.id).state in ("queued", "running")
    resumed = jobs.wait(broken.id, timeout_s=240)
    assert resumed.state == "succeeded", resumed.error
    assert resumed.result["resumed_at"] >= 12 and resumed.result["steps"] == 64
    messages = [e.get("message", "") for _, _, e in jobs.store.events(broken.id)]
    assert any("resumed from the checkpoint at step" in m for m in messages)
    import torch
    from safetensors.torch import load_file

    def adapter(result):
        return load_file(f"{result['folder']}/adapter_model.safetensors")

    a, b = adapter(whole.result), adapter(resumed.result)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # The adapter-only variant loads as base + adapter and generates.
    assert _reply("broken", prompt="Name a colour.", mode="chat", max_new_tokens=4, temperature=0) is not None


def test_the_from_scratch_gpt_fine_tunes_and_keeps_its_tiktoken_tokenizer(tmp_path, gpt_files, tiktoken_file, jobs):
    configs = tmp_path / "data" / "jobs" / "model_configs"
    configs.mkdir(parents=True)
    (configs / "tiny-gpt.yaml").write_text(
        f"""id: tiny-gpt
display_name: tiny GPT
backend: scratch_gpt
source: {{path: {gpt_files["pt"]}}}
prompt_format: alpaca
tokenizer: {{file: {tiktoken_file}}}
scratch_gpt: {{head_dim: 16}}
"""
    )
    options = {"model": "tiny-gpt", "data": str(_sft_file(tmp_path, n=4)), "name": "tiny-gpt-sft", "epochs": 2}
    done = jobs.wait(jobs.submit("lora-sft", options).id, timeout_s=240)
    assert done.state == "succeeded", done.error
    from playground.catalogue import Catalogue

    made = Catalogue.from_settings().get("tiny-gpt-sft")
    assert made.backend == "transformers" and made.tokenizer.file == str(tiktoken_file)
    assert made.prompt_format == "alpaca"
    assert _reply("tiny-gpt-sft", prompt="Name a colour.", mode="chat", max_new_tokens=4, temperature=0) is not None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="tests the message on machines without a GPU")
def test_qlora_without_a_gpu_is_refused_with_a_reason(tmp_path, llama_folder, jobs):
    options = {"model": str(llama_folder), "data": str(_sft_file(tmp_path, n=2)), "quantize": "nf4"}
    with pytest.raises(ConfigError, match="cannot run with device: cpu"):
        jobs.submit("lora-sft", options | {"device": "cpu"})
    with pytest.raises(ConfigError, match="this lora-sft job needs a GPU, and none is visible here"):
        jobs.submit("lora-sft", options)
    assert jobs.store.list() == []


def test_a_new_manager_adopts_a_running_job_instead_of_killing_it(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    first = JobManager(store, tmp_path / "logs")
    job = first.submit("eval-router", LONG | {"limit": 3})
    wait_for_progress(first, job.id)
    with held_still(job.pid):  # still running, however fast the machine
        second = JobManager(store, tmp_path / "logs")  # e.g. `jobs list` run while the app works
        assert store.get(job.id).state == "running" and psutil.pid_exists(job.pid)
        # The adopted job counts against the CPU limit: a new one waits, and says why.
        queued = second.submit("eval-router", SHORT)
        assert queued.state == "queued"
        assert any("waiting for a CPU slot" in e.get("message", "") for _, _, e in store.events(queued.id))
    assert second.wait(job.id, timeout_s=180).state == "succeeded"
    assert second.wait(queued.id, timeout_s=180).state == "succeeded"


def test_a_gpu_job_waits_for_gpu_memory_and_says_so(tmp_path, llama_folder):
    # What nvml would report: each GPU's free bytes (the seam the manager reads them through).
    free: list[list[int] | None] = [[0]]
    jobs = JobManager(JobStore(tmp_path / "jobs.sqlite"), tmp_path / "logs", gpu_free=lambda: free[0])
    options = {"model": str(llama_folder), "data": str(_sft_file(tmp_path, n=2)), "device": "cuda"}
    job = jobs.submit("lora-sft", options)
    assert job.device == "cuda" and job.gpu_bytes > 0 and job.state == "queued"
    free[0] = [job.gpu_bytes - 1, job.gpu_bytes // 2]
    jobs.schedule()
    free[0] = None
    jobs.schedule()
    messages = [e["message"] for _, _, e in jobs.store.events(job.id)]
    assert re.fullmatch(r"waiting: needs \d+\.\d GiB of GPU memory; free: GPU 0 0\.0 GiB", messages[0])
    assert re.fullmatch(r"waiting: needs [\d.]+ GiB of GPU memory; free: GPU 0 [\d.]+ GiB, GPU 1 [\d.]+ GiB", messages[1])
    assert messages[-1] == "waiting: no GPU is visible" and len(messages) == 3
    # A CPU job is not held up behind it.
    cpu_job = jobs.submit("eval-router", SHORT)
    assert cpu_job.state == "running" and jobs.store.get(job.id).state == "queued"
    assert jobs.cancel(job.id).state == "cancelled"
    jobs.wait(cpu_job.id, timeout_s=120)


def test_stopping_the_app_manager_interrupts_its_jobs_and_a_fine_tune_resumes(tmp_path, llama_folder, jobs):
    options = {
        "model": str(llama_folder),
        "data": str(_sft_file(tmp_path)),
        "epochs": 12,
        "batch_size": 2,
    }  # 96 steps: long enough to stop mid-way
    job = jobs.submit("lora-sft", options | {"checkpoint_every": 2, "name": "stopped"})
    wait_for_progress(jobs, job.id, step=5)
    jobs.stop()
    stopped = jobs.store.get(job.id)
    assert stopped.state == "interrupted" and process_gone(stopped.pid)
    again = JobManager(jobs.store, jobs.logs_dir)
    assert again.wait(again.resume(job.id).id, timeout_s=240).result["resumed_at"] >= 4


def test_gpu_jobs_go_to_the_gpu_with_room_or_to_their_variants_pinned_one():
    """The scheduler's choice among GPUs, from each one's room (free memory less what running
    jobs were promised): the one with the most room that fits, the pinned one for a variant
    with device cuda:N, and a message naming each GPU's room while none fits."""
    gib = 2**30
    assert choose_gpu("cuda", 4 * gib, [3 * gib, 6 * gib]) == (1, "")
    assert choose_gpu("cuda", 4 * gib, [6 * gib, 6 * gib]) == (0, "")
    assert choose_gpu("cuda:0", 4 * gib, [3 * gib, 60 * gib]) == (None, "needs 4.0 GiB of GPU memory; free: GPU 0 3.0 GiB")
    assert choose_gpu("cuda:1", 4 * gib, [3 * gib, 6 * gib]) == (1, "")
    assert choose_gpu("cuda:2", gib, [6 * gib, 6 * gib]) == (None, "its variant is pinned to GPU 2, and 2 GPU(s) are visible")
