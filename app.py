"""Builds the Variant Playground UI and launches it; the embedded default starts loading at once."""

from __future__ import annotations

import os

from playground.arena import VoteStore
from playground.engine import Engine
from playground.monitor import SystemMonitor
from playground.paths import data_dir
from playground.ui import build_app
from playground.ui.app import CSS

DEFAULT_VARIANT = "smollm2-135m-gguf"


def main() -> None:
    engine = Engine()
    engine.start_load(DEFAULT_VARIANT)
    monitor = SystemMonitor(engine).start()
    demo = build_app(engine, monitor, VoteStore(data_dir() / "votes.sqlite"))
    try:
        demo.queue(default_concurrency_limit=8).launch(
            server_name=os.environ.get("PLAYGROUND_HOST", "127.0.0.1"),
            server_port=int(os.environ.get("PLAYGROUND_PORT", "7860")),
            css=CSS,
        )
    finally:
        monitor.stop()
        engine.shutdown()


if __name__ == "__main__":
    main()
