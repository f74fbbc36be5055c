"""Variant Playground: load several variants of small language models side by side and compare them.

The engine lives here; the UI (playground.ui, app.py) calls it and is never imported by it.
"""

__version__ = "0.1.0"
