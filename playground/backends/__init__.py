"""A lazy registry of backends: the heavy libraries load only when their backend is used."""

from __future__ import annotations

import importlib

from playground.backends.base import Backend
from playground.config import ModelConfig

BACKENDS: dict[str, str] = {
    "transformers": "playground.backends.transformers_backend:TransformersBackend",
    "llamacpp": "playground.backends.llamacpp_backend:LlamaCppBackend",
    "scratch_gpt": "playground.backends.scratch_gpt:ScratchGptBackend",
    "openai": "playground.backends.openai_backend:OpenAIBackend",
}


def backend_class(name: str) -> type[Backend]:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(sorted(BACKENDS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def create_backend(config: ModelConfig) -> Backend:
    return backend_class(config.backend)(config)
