"""Load test: several people prompting one shared variant through the app's HTTP interface (issue 8).

Starts the real app (`python app.py`) on 127.0.0.1 with its embedded default, waits until that
variant is loaded, then runs N gradio_client clients for a fixed time. Each client is its own
Gradio session and sends prompts one after another through the Compare tab's `/run` endpoint
(one panel, the embedded default), streaming each reply. Every prompt carries its client's
marker, so a reply drawn in the wrong session would show: each reply's chat must hold exactly
its own client's prompts, in order.

Written down: errors, replies, time to first token as a client sees it (submit -> first text
of its panel), the app's own decode tok/s, total completion tokens per second over the run,
and how often a client saw its place in line.

  python -m benchmarks.load.many_sessions --clients 8 --seconds 60 --out benchmarks/results/load_8x60.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.browser import running_app

VARIANT = "smollm2-135m-gguf"
TOKENS = re.compile(r"tokens (\d+) in / (\d+) out")
DECODE = re.compile(r"decode ([\d.]+) tok/s")
# Compare tab inputs: prompt, mode, panels, the six shared settings, then per panel (4): the
# variant, "own settings", and its six settings (playground/ui/compare_tab.py).
SETTINGS = [0.7, 0.95, 40, 48, 1.0, None]
# Its outputs as gradio_client returns them (buttons left out): status, notice, loaded list, plot,
# then per panel its chat and its metrics line.
CHAT, METRICS = 4, 5


@dataclass
class Reply:
    client: int
    submitted_s: float  # since the run started
    ttft_s: float | None
    total_s: float
    prompt_tokens: int | None  # the session's chat so far: it grows with every turn
    completion_tokens: int | None
    decode_tok_s: float | None
    saw_queue: bool
    error: str | None = None


@dataclass
class ClientLog:
    replies: list[Reply] = field(default_factory=list)
    crossed: list[str] = field(default_factory=list)


def app_environment(work: Path, ui_concurrency: int) -> dict[str, str]:
    return {
        "PLAYGROUND_HOST": "127.0.0.1",
        "PLAYGROUND_DATA_DIR": str(work / "data"),
        "PLAYGROUND_JOBS_DIR": str(work / "jobs"),
        "PLAYGROUND_UI_CONCURRENCY": str(ui_concurrency),
    }


def run_args(prompt: str) -> list[Any]:
    args: list[Any] = [prompt, "chat", 1, *SETTINGS]
    for panel in range(4):
        args += [VARIANT if panel == 0 else None, False, *SETTINGS]
    return args


def chat_text(chat: Any) -> list[tuple[str, str]]:
    """(role, text) of each message of a Chatbot value as gradio_client hands it over."""
    messages = []
    for message in chat or []:
        content = message.get("content")
        if isinstance(content, list):  # Gradio 6: a list of typed parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        messages.append((message.get("role"), str(content or "")))
    return messages


def client_loop(url: str, index: int, start: float, stop_at: float, log: ClientLog, once: bool = False) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False)
    asked: list[str] = []
    n = 0
    while time.monotonic() < stop_at or (once and n == 0):
        n += 1
        prompt = f"[client {index} prompt {n}] Name one colour."
        submitted = time.monotonic()
        first: float | None = None
        saw_queue = False
        error = None
        final: Any = None
        try:
            job = client.submit(*run_args(prompt), api_name="/run")
            for outputs in job:
                chat, metrics = outputs[CHAT], outputs[METRICS]
                if "queued for" in str(metrics):
                    saw_queue = True
                messages = chat_text(chat)
                if first is None and messages and messages[-1][0] == "assistant" and messages[-1][1].strip("▌ "):
                    first = time.monotonic()
                final = outputs
            if final is None:
                final = job.outputs()[-1]
        except Exception as err:  # written down as an error of this reply, the run goes on
            error = f"{err.__class__.__name__}: {err}"
        done = time.monotonic()
        tokens = decode = prompt_tokens = None
        if final is not None and error is None:
            metrics = str(final[METRICS])
            asked.append(prompt)
            users = [text for role, text in chat_text(final[CHAT]) if role == "user"]
            if users != asked:
                log.crossed.append(f"client {index}: chat holds {users!r}, asked {asked!r}")
            if match := TOKENS.search(metrics):
                prompt_tokens, tokens = int(match.group(1)), int(match.group(2))
            else:
                error = f"no metrics line: {metrics[:200]!r}"
            if match := DECODE.search(metrics):
                decode = float(match.group(1))
        log.replies.append(
            Reply(
                client=index,
                submitted_s=submitted - start,
                ttft_s=(first - submitted) if first else None,
                total_s=done - submitted,
                prompt_tokens=prompt_tokens,
                completion_tokens=tokens,
                decode_tok_s=decode,
                saw_queue=saw_queue,
                error=error,
            )
        )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ui-concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.seconds <= 3600:
        parser.error("1-64 clients, 1-3600 seconds")
    work = Path(tempfile.mkdtemp(prefix="load-"))
    # The end-to-end tests' way of starting the real app: a free port, wait until it answers.
    with running_app(work / "app.log", app_environment(work, args.ui_concurrency)) as url:
        # The app loads its default at start; wait until a first reply comes back whole.
        warm = ClientLog()
        client_loop(url, 0, time.monotonic(), time.monotonic(), warm, once=True)
        if warm.replies[0].error:
            raise RuntimeError(f"the warm-up reply failed: {warm.replies[0].error}")
        logs = [ClientLog() for _ in range(args.clients)]
        start = time.monotonic()
        stop_at = start + args.seconds
        threads = [
            threading.Thread(target=client_loop, args=(url, i + 1, start, stop_at, logs[i]), daemon=True)
            for i in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.seconds + 300)
        elapsed = time.monotonic() - start
    replies = [r for log in logs for r in log.replies]
    good = [r for r in replies if r.error is None]
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    tokens = sum(r.completion_tokens or 0 for r in good)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.load.many_sessions", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} cpus",
        "clients": args.clients,
        "seconds": args.seconds,
        "elapsed_s": elapsed,
        "variant": VARIANT,
        "max_new_tokens": SETTINGS[3],
        "replies": len(replies),
        "errors": [f"client {r.client}: {r.error}" for r in replies if r.error],
        "crossed": [c for log in logs for c in log.crossed],
        "unfinished_threads": sum(thread.is_alive() for thread in threads),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "completion_tokens": tokens,
        "prompt_tokens_median": statistics.median(r.prompt_tokens for r in good if r.prompt_tokens) if good else None,
        "reply_s_median": statistics.median(r.total_s for r in good) if good else None,
        "tokens_per_s": tokens / elapsed,
        "decode_tok_s_median": statistics.median(r.decode_tok_s for r in good if r.decode_tok_s) if good else None,
        "replies_per_client": {i + 1: len(log.replies) for i, log in enumerate(logs)},
        "replies_that_saw_their_place_in_line": sum(r.saw_queue for r in good),
        "per_reply": [asdict(r) for r in replies],
    }
    args.out.write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report.items() if k not in ("per_reply",)}
    print(json.dumps(summary, indent=1))
    ok = not report["errors"] and not report["crossed"] and not report["unfinished_threads"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
