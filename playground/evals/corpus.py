"""Text to measure on: the Python documentation's topic texts, read from the standard library
itself (`pydoc_data.topics`, under the PSF license), so nothing is downloaded or copied here.

The topics are split by name into a training part and a held-out part (every fifth topic), so
a fine-tune (e.g. the QAT job) can train on one and be measured on the other.
"""

from __future__ import annotations

from pathlib import Path

from playground.errors import PlaygroundError

BUNDLED = {"python-docs": "all", "python-docs-train": "train", "python-docs-heldout": "heldout"}


def documents(name: str) -> list[tuple[str, str]]:
    """(title, text) of each document of a bundled corpus or of a UTF-8 text file (split on
    blank lines into documents of a few thousand characters)."""
    if name in BUNDLED:
        from pydoc_data.topics import topics

        names = sorted(topics)
        part = BUNDLED[name]
        chosen = [n for i, n in enumerate(names) if part == "all" or (i % 5 == 4) == (part == "heldout")]
        return [(n, topics[n].strip()) for n in chosen if topics[n].strip()]
    path = Path(name).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err.__class__.__name__
        raise PlaygroundError(
            f"corpus {name!r} is neither bundled ({', '.join(BUNDLED)}) nor a readable UTF-8 file ({reason})"
        ) from None
    docs, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph)
        if size >= 4000:
            docs.append((f"{path.name} part {len(docs) + 1}", "\n\n".join(current).strip()))
            current, size = [], 0
    if current and "\n\n".join(current).strip():
        docs.append((f"{path.name} part {len(docs) + 1}", "\n\n".join(current).strip()))
    if not docs:
        raise PlaygroundError(f"corpus {path} is empty")
    return docs


def limited(docs: list[tuple[str, str]], max_chars: int | None) -> list[tuple[str, str]]:
    """The first documents, up to about `max_chars` characters in all (the last one cut)."""
    if max_chars is None:
        return docs
    out, used = [], 0
    for title, text in docs:
        if used >= max_chars:
            break
        out.append((title, text[: max_chars - used]))
        used += len(out[-1][1])
    return out
