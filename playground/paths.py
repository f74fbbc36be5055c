"""Where the playground keeps its data: votes, jobs, their artifacts and the variants they make."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    return Path(os.environ.get("PLAYGROUND_DATA_DIR", Path.home() / ".local" / "share" / "variant-playground"))


def jobs_dir() -> Path:
    return data_dir() / "jobs"


def made_configs_dir() -> Path:
    """Variant configs written by fine-tune jobs."""
    return jobs_dir() / "model_configs"
