"""The Gradio UI. It calls the engine and renders what comes back; the engine never imports it."""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so the UI's text helpers (formatting) load where gradio is absent:
    # the lent GPU machine's test of the Compare list's "on GPU N".
    if name == "build_app":
        from playground.ui.app import build_app

        return build_app
    raise AttributeError(name)
