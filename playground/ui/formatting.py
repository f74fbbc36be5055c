"""Plain text for the UI: metrics, load states and errors. No Gradio here, so it is easy to test."""

from __future__ import annotations

from playground.errors import PlaygroundError
from playground.metrics import GenerationMetrics

MiB = 1 << 20


def _num(value: float | None, fmt: str, unit: str) -> str:
    return "n/a" if value is None else f"{value:{fmt}} {unit}"


def metrics_line(m: GenerationMetrics) -> str:
    prompt = "?" if m.prompt_tokens is None else str(m.prompt_tokens)
    parts = [
        f"TTFT {_num(m.ttft_s, '.3f', 's')}",
        f"decode {_num(m.decode_tok_s, '.1f', 'tok/s')}",
        f"prefill {_num(m.prefill_tok_s, '.0f', 'tok/s')}",
        f"tokens {prompt} in / {m.completion_tokens} out",
        f"peak mem {m.peak_mem_bytes / MiB:.0f} MiB",
        f"{m.backend} on {m.device}",
        f"finish: {m.finish_reason}",
    ]
    text = " · ".join(parts)
    for warning in m.warnings:
        text += f"\n⚠ {warning}"
    return text


def error_text(err: BaseException) -> str:
    """What the user sees for a failure: our own messages as they are, anything else labelled."""
    if isinstance(err, PlaygroundError):
        return f"⚠ {err}"
    return f"⚠ unexpected {err.__class__.__name__}: {err}"
