"""A comparison (prompt, settings, each variant's answer and metrics) as Markdown and JSON, and
a whole Compare session (every panel's conversation) to export and to load back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from playground.config import describe_errors
from playground.errors import PlaygroundError


@dataclass
class Answer:
    variant_id: str
    display_name: str
    text: str
    metrics: dict[str, Any] | None
    error: str | None = None


@dataclass
class Comparison:
    prompt: str
    mode: str
    settings: dict[str, Any]
    answers: list[Answer] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(
            {
                "created": self.created,
                "prompt": self.prompt,
                "mode": self.mode,
                "settings": self.settings,
                "answers": [a.__dict__ for a in self.answers],
            },
            indent=2,
        )

    def to_markdown(self) -> str:
        lines = [f"# Comparison ({self.created})", "", "## Prompt", "", self.prompt, "", f"Mode: {self.mode}", ""]
        lines += ["## Settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in self.settings.items()]
        lines += [
            "",
            "## Metrics",
            "",
            "| variant | TTFT (s) | decode tok/s | prefill tok/s | tokens in/out | peak MiB |",
            "| --- | ---: | ---: | ---: | --- | ---: |",
        ]
        for a in self.answers:
            m = a.metrics
            if m is None:
                lines.append(f"| {a.display_name} | failed | | | | |")
                continue
            lines.append(
                f"| {a.display_name} | {_f(m.get('ttft_s'), 3)} | {_f(m.get('decode_tok_s'), 1)} | "
                f"{_f(m.get('prefill_tok_s'), 0)} | {m.get('prompt_tokens')}/{m.get('completion_tokens')} | "
                f"{m['peak_mem_bytes'] / 2**20:.0f} |"
            )
        for a in self.answers:
            lines += ["", f"## {a.display_name}", ""]
            lines += [f"**Error:** {a.error}"] if a.error else [a.text]
        return "\n".join(lines) + "\n"


def _f(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# -- a whole Compare session: every panel's conversation, to export and to load back ----------
class Turn(BaseModel):
    """One prompt to one panel and its answer, with the settings it ran under."""

    prompt: str
    mode: str
    settings: dict[str, Any] = {}
    answer: str = ""
    metrics: dict[str, Any] | None = None
    error: str | None = None

    @property
    def finish_reason(self) -> str:
        if self.error:
            return "failed"
        return str((self.metrics or {}).get("finish_reason", "unknown"))


class PanelRecord(BaseModel):
    variant_id: str | None = None
    display_name: str = ""
    override: bool = False  # this panel's own settings were used instead of the shared ones
    settings: dict[str, Any] = {}
    turns: list[Turn] = []


class SessionRecord(BaseModel):
    """What a saved session holds; `load_session` reads it back (a comparison export is one)."""

    format: Literal["variant-playground-session"] = "variant-playground-session"
    version: Literal[1] = 1
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    n_panels: int = Field(2, ge=1, le=4)
    mode: Literal["chat", "completion"] = "chat"
    settings: dict[str, Any] = {}
    panels: list[PanelRecord] = []
    # The last prompt's answers side by side (what "Export comparison" gave before sessions).
    prompt: str = ""
    answers: list[dict[str, Any]] = []

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def to_markdown(self) -> str:
        lines = [f"# Variant Playground session ({self.created})", "", f"Mode: {self.mode}", ""]
        lines += ["## Shared settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {'(default)' if v is None else v} |" for k, v in self.settings.items()]
        for number, panel in enumerate(self.panels[: self.n_panels], start=1):
            lines += ["", f"## Panel {number}: {panel.display_name or panel.variant_id or '(none)'}", ""]
            if panel.override:
                lines.append("Own settings: " + ", ".join(f"{k}={v}" for k, v in panel.settings.items()))
            for turn in panel.turns:
                lines += ["", f"**Prompt** ({turn.mode}):", "", _quoted(turn.prompt), ""]
                if turn.error:
                    lines.append(f"**Error:** {turn.error}")
                    continue
                lines += [f"**Answer** — finish: {FINISH_NOTES.get(turn.finish_reason, turn.finish_reason)}", ""]
                lines.append(turn.answer)
                if turn.metrics:
                    m = turn.metrics
                    lines += [
                        "",
                        f"_TTFT {_f(m.get('ttft_s'), 3)} s · decode {_f(m.get('decode_tok_s'), 1)} tok/s · "
                        f"tokens {m.get('prompt_tokens')} in / {m.get('completion_tokens')} out_",
                    ]
        return "\n".join(lines) + "\n"


# An answer cut short must not read as complete.
FINISH_NOTES = {
    "cancelled": "cancelled by Stop (the answer is incomplete)",
    "unloaded": "unloaded while answering (the answer is incomplete)",
    "length": "length (the token limit cut it)",
}


def _quoted(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines()) or ">"


def load_session(text: str | bytes) -> SessionRecord:
    """A saved session read back; a file that is not one is refused with what is wrong."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlaygroundError(f"not a saved session: the file is not JSON ({err.__class__.__name__})") from None
    if not isinstance(data, dict) or "format" not in data:
        raise PlaygroundError("not a saved session: no `format` field (save one with Export session)")
    try:
        return SessionRecord.model_validate(data)
    except ValidationError as err:
        raise PlaygroundError(f"not a saved session: {describe_errors(err)}") from None
