"""The container's files, checked outside Docker (no Docker here): the Dockerfile lints clean, the
settings it sets validate, and its entry script starts the app, answers the health check and
stops on SIGTERM; a bad setting stops the entry script with the setting named."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import REPO, free_port

ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"


def venv_env(**extra: str) -> dict[str, str]:
    """The test's environment with this interpreter's folder first on PATH (the image's python3
    is its venv's)."""
    return os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"} | extra


def dockerfile_env() -> dict[str, str]:
    """The PLAYGROUND_* values the Dockerfile's ENV lines set."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    values = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"(PLAYGROUND_\w+)=('[^']*'|\S+)", line):
                values[key] = value.strip("'")
    return values


def test_the_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_settings_validate_and_stay_local_without_a_login(tmp_path):
    settings = dockerfile_env()
    assert settings["PLAYGROUND_HOST"] == "0.0.0.0" and settings["PLAYGROUND_DATA_DIR"] == "/data"
    result = subprocess.run(
        [sys.executable, "-m", "playground", "settings"],
        cwd=REPO,
        env=venv_env(**settings),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["listening_on"] == "127.0.0.1" and "no logins are set" in result.stderr
    assert shown["allowed_roots"] == ["/models", "/data", "/app/assets"]


def test_the_entry_script_refuses_a_bad_setting_by_name():
    result = subprocess.run(
        [str(ENTRYPOINT)],
        env=venv_env(PLAYGROUND_USERS='[{"name": "ann", "password": "tiny"}]'),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "users.0.password" in result.stderr and "tiny" not in result.stderr
    assert "Traceback" not in result.stderr


def test_the_entry_script_starts_the_app_which_passes_the_health_check_and_stops_on_sigterm(tmp_path):
    port = str(free_port())
    env = venv_env(PLAYGROUND_PORT=port, PLAYGROUND_DATA_DIR=str(tmp_path / "data"))
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 90
        healthy = False
        while time.monotonic() < deadline and process.poll() is None:
            check = subprocess.run([sys.executable, str(REPO / "deploy" / "healthcheck.py")], env=env)
            if check.returncode == 0:
                healthy = True
                break
            time.sleep(1)
        assert healthy, (tmp_path / "app.log").read_text()[-2000:]
        # The script exec'd the app: the process Docker signals is the app itself.
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    stopped = subprocess.run([sys.executable, str(REPO / "deploy" / "healthcheck.py")], env=env, capture_output=True)
    assert stopped.returncode == 1


@pytest.mark.parametrize("key", ["sdk", "app_file"])
def test_the_readme_carries_the_space_front_matter(key):
    front = (REPO / "README.md").read_text().split("---")[1]
    assert {"sdk": "sdk: gradio", "app_file": "app_file: app.py"}[key] in front
