"""Reading JSONL data files with messages that name the file and line at fault."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from playground.errors import PlaygroundError


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line."""
    try:
        raw_lines = Path(path).read_bytes().splitlines()
    except OSError as err:
        raise PlaygroundError(f"{path}: cannot be read ({err.strerror})") from None
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PlaygroundError(
                f"{path}, line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1});"
                " save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise PlaygroundError(f"{path}, line {number}: not JSON ({err.msg})") from None
