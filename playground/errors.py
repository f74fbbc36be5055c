"""Errors meant for people: each message is one readable sentence, shown as-is in the UI and CLI.

Anything else that escapes is a bug; the UI and CLI still catch it, but show it as such.
"""


class PlaygroundError(Exception):
    """A problem the user can act on (bad input, missing file, not enough memory...)."""


class ConfigError(PlaygroundError):
    """A model config file or a parameter set that does not validate."""


class LoadError(PlaygroundError):
    """A variant could not be loaded (missing file, corrupt weights, refused remote code...)."""


class InsufficientMemory(LoadError):
    """The memory estimate for a variant exceeds what is available."""


class GenerationError(PlaygroundError):
    """A generation request failed (prompt too long, worker gone, backend error...)."""


class WorkerDied(GenerationError):
    """The worker process of a variant ended unexpectedly (crash, kill, out of memory)."""


class WorkerHung(GenerationError):
    """The worker process of a variant stopped producing output for too long."""
