"""Launch shapes picked by timing, kept on disk for the next load of the same model on the same
kind of GPU.

Timing the Triton kernels' launch shapes took 53-72 s for the 1.7B shape's NF4 layers on the
H200, whose whole loads took 60-100 s (benchmarks/RESULTS.md), and the same code meeting the
same weights' shapes on the same kind of GPU picks the same shapes up to timing noise. A pick
is stored under a hash of everything it depends on: the GPU's name, compute capability and
multiprocessor count (a MIG slice differs from the whole GPU), torch's and Triton's versions,
the kernel and picker code itself, and the layers' shapes and weight formats. Anything else,
including a file that cannot be read, times afresh. Delete `<cache_dir>/launch-shapes` to time
again with unchanged code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from playground.backends.triton_kernels import AttentionConfig, MatvecConfig

# The code whose change may change a pick: the kernels, their launch ops, the picker.
SOURCES = ("triton_source.py", "triton_kernels.py", "triton_layers.py", "nf4_permute.py")
KINDS = {"MatvecConfig": MatvecConfig, "AttentionConfig": AttentionConfig}


def folder() -> Path:
    from playground.paths import cache_dir

    return cache_dir() / "launch-shapes"


def key(description: dict[str, Any]) -> str:
    """The cache key of picks made for `description` (the model's layers and the options the
    caller timed with) by this code on this torch and Triton."""
    import torch
    import triton

    here = Path(__file__).parent
    code = hashlib.sha256()
    for name in SOURCES:
        code.update((here / name).read_bytes())
    whole = {"torch": torch.__version__, "triton": triton.__version__, "code": code.hexdigest(), **description}
    return hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(cache_key: str, names: set[str]) -> dict[str, Any] | None:
    """The picks stored under `cache_key`, if a readable file holds one for each of `names`;
    None otherwise (then the caller times, and `store`s over it)."""
    path = folder() / f"{cache_key}.json"
    try:
        stored = json.loads(path.read_text())
        picks = {name: _config(stored["picks"][name]) for name in names}
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or written by something else
        return None
    return picks


def store(cache_key: str, picks: dict[str, Any], description: dict[str, Any]) -> None:
    """Keep `picks` under `cache_key` (with what they were made for, for a reader). Written to
    a temporary file and renamed, so a load running beside it reads a whole file or none; a
    folder that cannot be written leaves the next load to time again."""
    target = folder() / f"{cache_key}.json"
    body = {"made_for": description, "picks": {name: _plain(config) for name, config in picks.items()}}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(body, indent=1, sort_keys=True, default=str))
        temporary.replace(target)
    except OSError:
        return


def forget(cache_key: str) -> None:
    """Drop the picks under `cache_key` (a load with them failed: the next one times again)."""
    (folder() / f"{cache_key}.json").unlink(missing_ok=True)


def _plain(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    return {"kind": type(config).__name__, **dataclasses.asdict(config)}


def _config(stored: dict[str, Any] | None) -> Any:
    """A stored pick as its config; TypeError, KeyError or ValueError if it is not one."""
    if stored is None:
        return None
    values = dict(stored)
    kind = KINDS[values.pop("kind")]
    types = {"int": int, "bool": bool, "str": str}
    for field in dataclasses.fields(kind):
        # bool is an int to isinstance: compare the types themselves
        if field.name in values and type(values[field.name]) is not types[str(field.type)]:
            raise ValueError(f"{field.name}: {values[field.name]!r}")
    return kind(**values)
