"""The engine: the known variants, their workers, and the requests sent to them.

This is the one object the UI and the command line talk to. It owns no model itself: each
loaded variant is a Worker (its own process). One Engine instance holds everything; there is
no module-global state.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playground.backends.base import LoadInfo, Request
from playground.config import DEFAULT_CONFIG_DIR, GenerationParams, Mode, ModelConfig, load_config_dir
from playground.errors import GenerationError, InsufficientMemory, LoadError, PlaygroundError
from playground.memory import MemoryEstimate, estimate
from playground.paths import made_configs_dir
from playground.settings import allowed_path
from playground.sources import config_from_path, locate
from playground.workers import Event, Worker


@dataclass(frozen=True)
class VariantStatus:
    config: ModelConfig
    weights_present: bool
    weights_location: str
    state: str  # not loaded / loading / ready / failed / dead
    error: str | None
    info: LoadInfo | None
    rss_bytes: int | None
    pid: int | None


class Engine:
    def __init__(
        self,
        config_dirs: list[Path] | None = None,
        *,
        memory_budget_bytes: int | None = None,
        stall_timeout_s: float = 300.0,
    ) -> None:
        self.configs: dict[str, ModelConfig] = {}
        if config_dirs is None:  # the shipped variants, and those fine-tune jobs made
            config_dirs = [DEFAULT_CONFIG_DIR] + ([made_configs_dir()] if made_configs_dir().is_dir() else [])
        for directory in config_dirs:
            for config in load_config_dir(directory).values():
                self.add(config)
        self.memory_budget_bytes = memory_budget_bytes
        self.stall_timeout_s = stall_timeout_s
        self.workers: dict[str, Worker] = {}
        self._lock = threading.Lock()

    # -- the catalogue -----------------------------------------------------------------------
    def add(self, config: ModelConfig) -> ModelConfig:
        existing = self.configs.get(config.id)
        if existing is not None and existing != config:
            raise PlaygroundError(f"a different variant with id {config.id!r} already exists")
        self.configs[config.id] = config
        return config

    def refresh_made_variants(self) -> list[str]:
        """Add the variants fine-tune jobs wrote since the engine started; their ids."""
        folder = made_configs_dir()
        if not folder.is_dir():
            return []
        added = []
        for config in load_config_dir(folder).values():
            if config.id not in self.configs:
                added.append(self.add(config).id)
        return added

    def add_path(self, path: str | Path, **overrides: Any) -> ModelConfig:
        """Add a variant from a local GGUF file, HF folder or state_dict, without YAML; only
        from inside the allowed roots (settings)."""
        allowed_path(path, "model path")
        return self.add(config_from_path(path, **overrides))

    def get(self, variant_id: str) -> ModelConfig:
        try:
            return self.configs[variant_id]
        except KeyError:
            known = ", ".join(sorted(self.configs)) or "none"
            raise PlaygroundError(f"unknown variant {variant_id!r}; known: {known}") from None

    def resolve(self, id_or_path: str) -> ModelConfig:
        """A known id, or else a local path turned into a variant."""
        if id_or_path in self.configs:
            return self.configs[id_or_path]
        if Path(id_or_path).expanduser().exists() or "/" in id_or_path or id_or_path.endswith(".gguf"):
            return self.add_path(id_or_path)
        return self.get(id_or_path)

    def status(self, variant_id: str) -> VariantStatus:
        config = self.get(variant_id)
        try:
            weights = locate(config)
            present, location = weights.present, weights.location
        except PlaygroundError as err:
            present, location = False, str(err)
        worker = self.workers.get(variant_id)
        return VariantStatus(
            config=config,
            weights_present=present,
            weights_location=location,
            state=worker.state if worker else "not loaded",
            error=worker.error if worker else None,
            info=worker.info if worker else None,
            rss_bytes=worker.rss_bytes() if worker else None,
            pid=worker.pid if worker else None,
        )

    def statuses(self) -> list[VariantStatus]:
        return [self.status(v) for v in self.configs]

    def estimate(self, variant_id: str) -> MemoryEstimate:
        return estimate(self.get(variant_id), self.memory_budget_bytes)

    # -- loading -------------------------------------------------------------------------
    def start_load(self, variant_id: str, *, check_memory: bool = True) -> Worker:
        """Start a variant's worker and return at once; `Worker.wait_ready` waits for it."""
        config = self.get(variant_id)
        with self._lock:
            current = self.workers.get(variant_id)
            if current is not None and current.state in ("loading", "ready"):
                return current
            if check_memory:
                needed = estimate(config, self.memory_budget_bytes)
                if not needed.fits:
                    raise InsufficientMemory(f"{config.display_name} will not fit: needs {needed.describe()}")
            if current is not None:
                current.unload()
            worker = Worker(config, stall_timeout_s=self.stall_timeout_s)
            self.workers[variant_id] = worker
            return worker

    def load(self, variant_id: str, *, check_memory: bool = True, timeout_s: float | None = 900) -> LoadInfo:
        worker = self.start_load(variant_id, check_memory=check_memory)
        try:
            return worker.wait_ready(timeout_s)
        except LoadError:
            if worker.state in ("failed", "dead"):
                self._forget(variant_id, worker)
            raise

    def _forget(self, variant_id: str, worker: Worker) -> None:
        worker.unload(timeout_s=2)
        with self._lock:
            if self.workers.get(variant_id) is worker:
                del self.workers[variant_id]

    def unload(self, variant_id: str) -> None:
        with self._lock:
            worker = self.workers.pop(variant_id, None)
        if worker is not None:
            worker.unload()

    def shutdown(self) -> None:
        for variant_id in list(self.workers):
            self.unload(variant_id)

    # -- generation ----------------------------------------------------------------------
    def request(
        self,
        variant_id: str,
        *,
        prompt: str = "",
        messages: list[dict[str, str]] | None = None,
        mode: Mode | None = None,
        assistant_prefix: str = "",
        json_schema: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Request:
        """A request for one variant: its default settings with `overrides` applied."""
        config = self.get(variant_id)
        params: GenerationParams = config.generation.merged(**overrides)
        mode = mode or config.default_mode
        if mode == "chat":
            chat = list(messages or [])
            if not chat:
                if not prompt:
                    raise GenerationError("the prompt is empty")
                chat = [{"role": "user", "content": prompt}]
            return Request(
                mode="chat",
                params=params,
                messages=tuple(chat),
                assistant_prefix=assistant_prefix,
                json_schema=json_schema,
            )
        if not prompt:
            raise GenerationError("the prompt is empty")
        return Request(
            mode="completion", params=params, text=prompt, assistant_prefix=assistant_prefix, json_schema=json_schema
        )

    def _loaded_worker(self, variant_id: str) -> Worker:
        worker = self.workers.get(variant_id)
        if worker is None:
            raise GenerationError(f"{self.get(variant_id).display_name} is not loaded")
        return worker

    def generate(
        self, variant_id: str, request: Request, cancel: threading.Event | None = None, *, session: str = "local"
    ) -> Iterator[Event]:
        """A request's events. Requests to one variant take turns fairly over `session`s: a
        caller sees `Queued` events (its place in line) until its turn."""
        return self._loaded_worker(variant_id).generate(request, cancel, session)

    def score(self, variant_id: str, request: Request, continuations: list[str]) -> tuple[list[float], float]:
        return self._loaded_worker(variant_id).score(request, continuations)

    def call(self, variant_id: str, method: str, *args: Any, timeout_s: float | None = None) -> tuple[Any, float]:
        """A backend scoring method (count_tokens, text_logprobs, pair_logprobs) in the variant's
        worker: its value and the seconds it took."""
        return self._loaded_worker(variant_id).call(method, *args, timeout_s=timeout_s)

    def stop(self, variant_id: str) -> None:
        worker = self.workers.get(variant_id)
        if worker is not None:
            worker.stop()
