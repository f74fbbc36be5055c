"""The Gradio UI. It calls the engine and renders what comes back; the engine never imports it."""

from playground.ui.app import build_app

__all__ = ["build_app"]
