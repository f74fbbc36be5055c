"""Where the playground keeps its data: votes, jobs, their artifacts and the variants they make."""

from __future__ import annotations

from pathlib import Path

from playground.settings import get_settings


def data_dir() -> Path:
    return get_settings().data_dir.expanduser()


def jobs_dir() -> Path:
    return get_settings().jobs_folder.expanduser()


def cache_dir() -> Path:
    """Derived files that can be made again (dequantized GGUF folders)."""
    return get_settings().cache_dir.expanduser()


def made_configs_dir() -> Path:
    """Variant configs written by fine-tune jobs."""
    return jobs_dir() / "model_configs"


def uploads_dir() -> Path:
    """Files people upload through the UI (prompt sets), kept where jobs may read them."""
    return data_dir() / "uploads"
