"""A comparison (prompt, settings, each variant's answer and metrics) as Markdown and JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


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
