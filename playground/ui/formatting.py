"""Plain text for the UI: metrics, load states and errors. No Gradio here, so it is easy to test."""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING, Protocol

from playground.errors import PlaygroundError
from playground.metrics import GenerationMetrics

if TYPE_CHECKING:
    from playground.engine import Engine

MiB = 1 << 20
MB, GB = 10**6, 10**9  # download sizes in the hub's own units


def _num(value: float | None, fmt: str, unit: str) -> str:
    return "n/a" if value is None else f"{value:{fmt}} {unit}"


# Finish reasons said in words where the bare reason would mislead.
FINISH_WORDS = {"unloaded": "unloaded while answering"}


def metrics_line(m: GenerationMetrics) -> str:
    prompt = "?" if m.prompt_tokens is None else str(m.prompt_tokens)
    parts = [
        f"TTFT {_num(m.ttft_s, '.3f', 's')}",
        f"decode {_num(m.decode_tok_s, '.1f', 'tok/s')}",
        f"prefill {_num(m.prefill_tok_s, '.0f', 'tok/s')}",
        f"tokens {prompt} in / {m.completion_tokens} out",
        f"peak mem {m.peak_mem_bytes / MiB:.0f} MiB",
        f"{m.backend} on {m.device}",
        f"finish: {FINISH_WORDS.get(m.finish_reason, m.finish_reason)}",
    ]
    text = " · ".join(parts)
    if m.speculation:
        text += "\n" + speculation_line(m)
    for warning in m.warnings:
        text += f"\n⚠ {warning}"
    return text


def speculation_line(m: GenerationMetrics) -> str:
    """How a speculative variant's reply went: drafts kept, and the speed-up over plain steps."""
    if m.speculation is None or m.speculation.startswith("off: "):
        return f"speculative decoding {m.speculation or 'off'}"
    rate = _num(None if m.draft_accept_rate is None else 100 * m.draft_accept_rate, ".0f", "%")
    speedup = "n/a" if m.spec_speedup is None else f"×{m.spec_speedup:.2f}"
    paused = (
        f" · drafting paused for {m.spec_paused_tokens} tokens, where passes came slower than plain steps"
        if m.spec_paused_tokens
        else ""
    )
    return (
        f"speculative ({m.speculation}): {m.accepted_tokens} of {m.draft_tokens} drafted tokens kept ({rate}) · "
        f"{max(m.completion_tokens - 1, 0)} tokens after the first in {m.spec_passes} passes · {speedup} decode speed against its first plain steps"
        f"{paused}"
    )


def preformatted(text: str) -> str:
    """Markdown that shows `text` exactly as written (completion output, raw router answers): a
    fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def error_text(err: BaseException) -> str:
    """What the user sees for a failure: our own messages as they are, anything else labelled."""
    if isinstance(err, PlaygroundError):
        return f"⚠ {err}"
    return f"⚠ unexpected {err.__class__.__name__}: {err}"


class LoadTiming(Protocol):
    """What a load in progress shows (engine.VariantStatus and live.VariantView both have it)."""

    loading_s: float | None
    expected_load_s: float | None
    download_bytes: int | None
    download_total: int | None


def _bytes(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"


def load_progress(load: LoadTiming) -> str:
    """A bar and words for a load in progress. While the weights download: bytes received of
    the total. Else the elapsed time, measured against this variant's last load here when there
    was one, or a bar that only says 'busy' (no guessed percentage)."""
    elapsed = load.loading_s or 0.0
    done, total = load.download_bytes, load.download_total
    if done is not None and (total is None or done < total):
        if total:
            bar = f'<progress class="load-progress" value="{done}" max="{total}"></progress>'
            return f"{bar} downloading {_bytes(done)} of {_bytes(total)} · {elapsed:.0f} s"
        return f'<progress class="load-progress"></progress> downloading {_bytes(done)} · {elapsed:.0f} s'
    downloaded = f" (downloaded {_bytes(total)})" if total else ""
    if load.expected_load_s:
        share = min(elapsed / load.expected_load_s, 0.99)
        bar = f'<progress class="load-progress" value="{share:.2f}" max="1"></progress>'
        return f"{bar} {elapsed:.0f} s (its last load took {load.expected_load_s:.0f} s){downloaded}"
    return f'<progress class="load-progress"></progress> {elapsed:.0f} s{downloaded}'


def loaded_markdown(engine: Engine) -> str:
    """The variants that have a worker, with state and memory, and the config files that could
    not be read."""
    rows = []
    for status in engine.loaded_statuses():
        # No memory figure here (the Monitor tab draws it): the list is sent to every page
        # whenever its text changes, and redrawing it moves the page under an open dropdown.
        rss = f" · pid {status.pid}" if status.pid else ""
        where = ""
        if status.info:
            on_gpu = status.info.device == "cuda" and status.gpu is not None
            where = f" · {status.info.backend} on {f'GPU {status.gpu}' if on_gpu else status.info.device}"
        if status.info and status.info.decode:
            where += f" · {status.info.decode}"
        if status.config.trust_remote_code and status.info:  # said of a loaded one, not a refused one
            where += " · ⚠ runs code from its model folder (trust_remote_code)"
        detail = f" · {status.error}" if status.error else ""
        state = f"⚠ {status.state}" if status.state in ("hung", "dead", "failed") else status.state
        if status.state == "loading":
            state += " " + load_progress(status)
        rows.append(f"- **{status.config.display_name}** (`{status.config.id}`): {state}{where}{rss}{detail}")
    # On one line and escaped: a parser's message has a caret line and names "<unicode string>",
    # which broke the list and was swallowed as a tag.
    rows += [
        f"- ⚠ broken config `{b.path.name}`: {html.escape(' '.join(b.error.split()))}" for b in engine.catalogue.broken
    ]
    return "\n".join(rows) or "No variant loaded yet."


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
