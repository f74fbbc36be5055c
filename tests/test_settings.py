"""Settings from the environment and a file, logins and roles, and the safe-by-default rules:
typed paths inside the allowed roots, binding to 127.0.0.1 without logins, no secret echoed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from browser import REPO, free_port, running_app
from conftest import run_job

from playground.config import load_config_dir
from playground.engine import Engine
from playground.errors import ConfigError
from playground.jobs.manager import JobManager
from playground.settings import PathNotAllowed, allowed_path, get_settings


@pytest.fixture
def env(monkeypatch):
    """Set PLAYGROUND_* variables for one test (settings are read again when they change)."""

    def put(**values: object) -> None:
        for key, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value)
            monkeypatch.setenv(f"PLAYGROUND_{key.upper()}", text)

    return put


def test_defaults_are_local_and_open_only_to_this_machine(monkeypatch):
    for key in list(os.environ):
        if key.startswith("PLAYGROUND_"):
            monkeypatch.delenv(key)
    settings = get_settings()
    assert (settings.host, settings.port, settings.auth_enabled) == ("127.0.0.1", 7860, False)
    assert settings.roots[:2] == [Path.home().resolve(), Path.cwd().resolve()]
    assert settings.jobs_folder == settings.data_dir / "jobs"


def test_environment_beats_the_file_and_unknown_keys_are_refused(env, tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("port: 8000\nui_concurrency: 2\nmax_cpu_jobs: 3\n")
    env(settings_file=str(file), port="9000")
    settings = get_settings()
    assert (settings.port, settings.ui_concurrency, settings.max_cpu_jobs) == (9000, 2, 3)
    file.write_text("port: 8000\nprot: 1\n")
    env(port="9001")  # a changed variable makes the settings be read again
    with pytest.raises(ConfigError, match="prot: unknown setting"):
        get_settings()
    env(settings_file=str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        get_settings()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("port", "99999", "port: Input should be less than or equal to 65535"),
        ("ui_concurrency", "0", "ui_concurrency: Input should be greater than or equal to 1"),
        ("users", '[{"name": "ann", "password": "hunter2"}]', "at least 8 characters"),
        ("users", "not json", "users"),
    ],
)
def test_bad_values_are_named_and_secrets_are_not_echoed(env, key, value, message):
    env(**{key: value})
    with pytest.raises(ConfigError, match=message) as caught:
        get_settings()
    assert "hunter2" not in str(caught.value)


def test_logins_give_roles(env):
    env(
        users=[
            {"name": "ann", "password": "ann-password", "role": "admin"},
            {"name": "bob", "password": "bob-password"},
        ],
        viewer_token="demo-token-123",
    )
    settings = get_settings()
    assert settings.role_of("ann", "ann-password") == "admin"
    assert settings.role_of("bob", "bob-password") == "viewer"
    assert settings.role_of("carol", "demo-token-123") == "viewer"
    assert settings.role_of("ann", "bob-password") is None
    assert settings.role_of("bob", "") is None
    assert "ann-password" not in repr(settings) and "demo-token-123" not in repr(settings)


def test_binding_elsewhere_needs_logins(env):
    env(host="0.0.0.0")
    host, warning = get_settings().bind_host()
    assert host == "127.0.0.1" and "no logins are set" in warning
    env(admin_token="admin-token-123")
    assert get_settings().bind_host() == ("0.0.0.0", "")


def test_typed_paths_stay_inside_the_allowed_roots(env, tmp_path):
    root = tmp_path / "models"
    (root / "tiny").mkdir(parents=True)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.gguf").write_text("not a model")
    (root / "link").symlink_to(outside)
    env(allowed_roots=[str(root)])
    assert allowed_path(root / "tiny") == (root / "tiny").resolve()
    for bad in [root / ".." / "private" / "secret.gguf", root / "link" / "secret.gguf", Path("/etc/passwd")]:
        with pytest.raises(PathNotAllowed, match="outside the folders this playground may read"):
            allowed_path(bad, "model path")
    engine = Engine()
    with pytest.raises(PathNotAllowed, match="model path"):
        engine.catalogue.add_path(str(root / "../private/secret.gguf"))
    assert all(not c.id.startswith("secret") for c in engine.catalogue.configs.values())


def test_job_options_with_paths_outside_the_roots_are_refused_before_a_process_starts(jobs, env, tmp_path):
    env(allowed_roots=[str(tmp_path / "models")])
    for kind, options, field in [
        ("eval-router", {"model": "smollm2-135m-gguf", "data": "/etc/passwd"}, "data"),
        ("eval-perplexity", {"model": "smollm2-135m-gguf", "corpus": "../../etc/passwd"}, "corpus"),
        ("lora-sft", {"model": "smollm2-135m-transformers", "data": "/etc/shadow"}, "data"),
        ("eval-lm", {"model": "smollm2-135m-gguf", "tasks": ["x"], "include_path": "/etc"}, "include_path"),
    ]:
        with pytest.raises(ConfigError, match=f"{field}.*outside the folders"):
            jobs.submit(kind, options)
    assert jobs.store.list() == []
    # The bundled names and files are always allowed.
    job = run_job(jobs, "eval-router", {"model": "smollm2-135m-router", "data": "ood", "limit": 1})
    assert job.state == "succeeded"


def app_start(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Start app.py and stop it once it has said how it listens (or it exits by itself)."""
    environment = os.environ | {"PYTHONUNBUFFERED": "1", "PLAYGROUND_PORT": str(free_port())} | env
    return subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout
    )


# Runs app.main with Gradio's launch replaced by a probe that prints where it would listen,
# so the test sees the decision without serving anything.
_PROBE = """
import gradio, app
def launch(self, **kw):
    print("LAUNCH", kw["server_name"], kw["auth"] is not None, kw["max_file_size"])
    raise SystemExit(0)
gradio.Blocks.launch = launch
app.main()
"""


def test_the_app_refuses_to_listen_everywhere_without_logins(tmp_path):
    data = {"PLAYGROUND_DATA_DIR": str(tmp_path)}
    open_everywhere = app_start(data | {"PLAYGROUND_HOST": "0.0.0.0"})
    assert "LAUNCH 127.0.0.1 False 200mb" in open_everywhere.stdout
    assert "no logins are set" in open_everywhere.stderr
    with_login = app_start(data | {"PLAYGROUND_HOST": "0.0.0.0", "PLAYGROUND_ADMIN_TOKEN": "admin-token-123"})
    assert "LAUNCH 0.0.0.0 True" in with_login.stdout
    bad = app_start(data | {"PLAYGROUND_PORT": "seventy", "PLAYGROUND_ADMIN_TOKEN": "admin-token-123"})
    assert bad.returncode != 0 and "invalid settings: port" in bad.stderr
    assert "Traceback" not in bad.stderr and "admin-token-123" not in bad.stderr


def test_yaml_that_asks_to_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    evil = f'!!python/object/apply:os.system ["touch {marker}"]\n'
    variants = tmp_path / "variants"
    variants.mkdir()
    (variants / "evil.yaml").write_text(f"id: {evil}display_name: x\nbackend: llamacpp\n")
    with pytest.raises(ConfigError, match="evil.yaml: not valid YAML"):
        load_config_dir(variants)
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(f"port: {evil}")
    started = app_start({"PLAYGROUND_DATA_DIR": str(tmp_path), "PLAYGROUND_SETTINGS_FILE": str(settings_file)})
    assert started.returncode != 0 and "LAUNCH" not in started.stdout
    assert "Traceback" not in started.stderr and "is not valid YAML at line 1" in started.stderr
    assert not marker.exists()


def test_uploads_over_the_limit_are_refused(tmp_path):
    with running_app(
        tmp_path / "app.log", {"PLAYGROUND_DATA_DIR": str(tmp_path), "PLAYGROUND_MAX_UPLOAD_MB": "1"}
    ) as url:
        small = httpx.post(f"{url}/gradio_api/upload", files={"files": ("a.txt", b"x" * 1000)}, timeout=30)
        large = httpx.post(f"{url}/gradio_api/upload", files={"files": ("b.txt", b"x" * 2_000_000)}, timeout=30)
    assert small.status_code == 200
    assert large.status_code == 413


def test_a_misspelt_variable_stops_the_start_with_the_nearest_setting(tmp_path):
    """A typo of PLAYGROUND_ALLOWED_ROOTS would leave the default roots in force unseen."""
    typo = app_start({"PLAYGROUND_DATA_DIR": str(tmp_path), "PLAYGROUND_ALLOWED_ROOT": '["/srv/models"]'})
    assert typo.returncode != 0 and "LAUNCH" not in typo.stdout and "Traceback" not in typo.stderr
    assert "unknown setting PLAYGROUND_ALLOWED_ROOT: did you mean PLAYGROUND_ALLOWED_ROOTS?" in typo.stderr
    result = subprocess.run(
        [sys.executable, "-m", "playground", "settings"],
        env=os.environ | {"PLAYGROUND_MAX_CPU_JOB": "2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "did you mean PLAYGROUND_MAX_CPU_JOBS?" in result.stderr


def test_a_variable_that_is_not_json_is_named(env):
    env(allowed_roots="/srv/models")  # a list setting given as a bare path
    with pytest.raises(ConfigError) as refused:
        get_settings()
    message = str(refused.value)
    assert message.startswith("PLAYGROUND_ALLOWED_ROOTS (setting allowed_roots) cannot be read: its value must be JSON")
    assert "None" not in message


def test_links_inside_an_allowed_folder_cannot_reach_outside(env, tmp_path, jobs, tiny_gguf):
    """Every file opened is checked, not only the path typed: a GGUF linked into a model folder,
    a data file linked into the roots, a task folder with a link out."""
    root, outside = tmp_path / "models", tmp_path / "private"
    (root / "folder").mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret.gguf"
    secret.write_bytes(b"GGUF")
    (root / "folder" / "model.gguf").symlink_to(secret)
    (outside / "rows.jsonl").write_text('{"prompt": "hi", "route": "self"}\n')
    (root / "rows.jsonl").symlink_to(outside / "rows.jsonl")
    (root / "tasks").mkdir()
    (root / "tasks" / "task.yaml").symlink_to(outside / "rows.jsonl")
    env(allowed_roots=[str(root)])
    engine = Engine()
    with pytest.raises(PathNotAllowed, match=r"model.gguf in the model path .* links to .*secret.gguf, outside"):
        engine.catalogue.add_path(root / "folder")
    with pytest.raises(ConfigError, match="data: .*outside the folders"):
        jobs.submit("eval-router", {"model": "smollm2-135m-router", "data": str(root / "rows.jsonl")})
    with pytest.raises(ConfigError, match="include_path: .*task.yaml .* links to"):
        jobs.submit("eval-lm", {"model": "smollm2-135m-gguf", "tasks": ["x"], "include_path": str(root / "tasks")})
    # A folder checked when added is checked again when it loads: a link put in since is refused.
    clean = root / "clean"
    clean.mkdir()
    real = root / "real.gguf"
    shutil.copy(tiny_gguf, real)
    (clean / "model.gguf").symlink_to(real)
    added = engine.catalogue.add_path(clean)
    (clean / "model.gguf").unlink()
    (clean / "model.gguf").symlink_to(secret)
    with pytest.raises(PathNotAllowed, match="links to"):
        engine.start_load(added.id, check_memory=False)
    assert added.id not in engine.workers


def test_remote_code_needs_the_admins_leave_in_jobs_too(env, jobs, tmp_path, remote_code_folder):
    """The allow list is the catalogue's, so a fine-tune job (which loads in its own process,
    without a worker) is held to it as a load from the Compare tab is."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "remote-asks.yaml").write_text(
        f"id: remote-asks\ndisplay_name: remote asks\nbackend: transformers\nsource: {{path: {remote_code_folder}}}\n"
        "dtype: fp32\ntrust_remote_code: true\n"
    )
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "Name a colour.", "response": "Blue."}) + "\n")
    env(config_dirs=[str(configs)])
    jobs = JobManager(jobs.store, jobs.logs_dir)  # built as the CLI builds it, after its settings
    options = {"model": "remote-asks", "data": str(data), "device": "cpu"}
    refused = jobs.wait(jobs.submit("lora-sft", options).id, timeout_s=240)
    assert refused.state == "failed" and "the admin has not allowed it" in refused.error
    env(remote_code_variants=["remote-asks"])
    assert run_job(jobs, "lora-sft", options | {"name": "remote-allowed"}).result["steps"] >= 1
