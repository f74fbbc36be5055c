"""The variants a playground knows, apart from the workers that run them.

One catalogue is built from the settings (`config_dirs`, the variants jobs made, the allowed
roots, the variants allowed to run code from their folders) and handed to whoever needs it: the app, the command line and every job process build it
the same way, so a variant that shows in one resolves in all. A YAML file that does not validate
is listed as broken with its error; the other variants stay usable. This module starts no
process and imports no backend.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playground.config import DEFAULT_CONFIG_DIR, ModelConfig, load_config_file
from playground.errors import ConfigError, LoadError, PlaygroundError
from playground.settings import allowed_tree, get_settings


@dataclass(frozen=True)
class BrokenConfig:
    """A config file that could not be used, and why (one line)."""

    path: Path
    error: str


class Catalogue:
    """Variant configs by id, from config folders, the folder fine-tune jobs write, and paths
    added at run time."""

    def __init__(
        self,
        config_dirs: Sequence[Path] = (),
        made_dir: Path | None = None,
        remote_code_variants: Collection[str] = (),
    ) -> None:
        self.configs: dict[str, ModelConfig] = {}
        self.broken: list[BrokenConfig] = []
        self._origins: dict[str, Path] = {}
        self._typed_paths: dict[str, Path] = {}  # variants added from a path typed at run time
        self.config_dirs = [Path(d) for d in config_dirs]
        self.made_dir = made_dir
        # Ids the admin allows to run code from their model folders (trust_remote_code).
        self.remote_code_variants = frozenset(remote_code_variants)
        for directory in self.config_dirs:
            self._read_dir(directory)
        self.refresh_made_variants()

    @classmethod
    def from_settings(cls, made_dir: Path | None = None) -> Catalogue:
        """The catalogue every process of this playground sees: the configured folders (or the
        shipped one), the variants jobs made (in `made_dir`, default the jobs folder's) and the
        remote-code allow list."""
        from playground.paths import made_configs_dir

        settings = get_settings()
        return cls(
            settings.config_dirs or [DEFAULT_CONFIG_DIR],
            made_dir=made_dir or made_configs_dir(),
            remote_code_variants=settings.remote_code_variants,
        )

    # -- reading folders -----------------------------------------------------------------------
    def _read_dir(self, directory: Path) -> list[str]:
        """Add every valid `*.yaml` of `directory` not yet known; the ids added."""
        added = []
        for path in sorted(Path(directory).expanduser().glob("*.yaml")):
            if any(b.path == path for b in self.broken) or path in self._origins.values():
                continue
            try:
                config = load_config_file(path)
            except ConfigError as err:
                self.broken.append(BrokenConfig(path, str(err)))
                continue
            if config.id in self.configs:
                if self.configs[config.id] != config:
                    origin = self._origins.get(config.id, "a variant added earlier")
                    self.broken.append(BrokenConfig(path, f"{path}: id {config.id!r} is already used by {origin}"))
                continue
            self.configs[config.id] = config
            self._origins[config.id] = path
            added.append(config.id)
        return added

    def refresh_made_variants(self) -> list[str]:
        """Add the variants fine-tune jobs wrote since the catalogue was built; their ids."""
        if self.made_dir is None or not self.made_dir.is_dir():
            return []
        return self._read_dir(self.made_dir)

    # -- adding and finding --------------------------------------------------------------------
    def add(self, config: ModelConfig) -> ModelConfig:
        existing = self.configs.get(config.id)
        if existing is not None and existing != config:
            raise PlaygroundError(f"a different variant with id {config.id!r} already exists")
        self.configs[config.id] = config
        return config

    def add_path(self, path: str | Path, **overrides: Any) -> ModelConfig:
        """A variant from a local GGUF file, HF folder or state_dict, without YAML; only from
        inside the allowed roots, every file it holds included (a link out of them is refused)."""
        from playground.sources import config_from_path

        allowed_tree(path, "model path")
        config = self.add(config_from_path(path, **overrides))
        self._typed_paths[config.id] = Path(path)
        return config

    def check_before_load(self, variant_id: str) -> ModelConfig:
        """What must hold before any process loads a variant; its config. Weights that are not
        here and cannot be downloaded are refused. A variant that asks to
        run code from its folder needs the admin's leave (settings: remote_code_variants), and
        one added from a typed path is checked again, so a link put in its folder since then
        cannot reach outside the allowed roots."""
        config = self.get(variant_id)
        if config.trust_remote_code and config.id not in self.remote_code_variants:
            raise LoadError(
                f"{config.display_name} runs code from its model folder (trust_remote_code); "
                "the admin has not allowed it: add its id to PLAYGROUND_REMOTE_CODE_VARIANTS"
            )
        if variant_id in self._typed_paths:
            allowed_tree(self._typed_paths[variant_id], "model path")
        from playground.sources import check_obtainable

        check_obtainable(config)  # offline with the weights absent: said now, not by a worker later
        return config

    def draft_of(self, config: ModelConfig) -> ModelConfig | None:
        """The draft variant a speculative variant loads beside it (config `speculative`), checked
        as its own load would be; None for a variant without one."""
        spec = config.speculative
        if spec is None or spec.draft_variant is None:
            return None
        try:
            draft = self.check_before_load(spec.draft_variant)
        except PlaygroundError as err:
            raise LoadError(f"{config.display_name}'s draft variant {spec.draft_variant!r} cannot load: {err}") from None
        if draft.backend != config.backend:
            raise LoadError(
                f"{config.display_name}'s draft variant {draft.id} is a {draft.backend} variant; "
                f"a draft model runs in the same {config.backend} worker"
            )
        return draft

    def get(self, variant_id: str) -> ModelConfig:
        if variant_id not in self.configs:
            self.refresh_made_variants()  # a job may have made it since
        try:
            return self.configs[variant_id]
        except KeyError:
            known = ", ".join(sorted(self.configs)) or "none"
            broken = [b for b in self.broken if b.path.stem == variant_id]
            why = f" ({broken[0].error})" if broken else ""
            raise PlaygroundError(f"unknown variant {variant_id!r}{why}; known: {known}") from None

    def resolve(self, id_or_path: str) -> ModelConfig:
        """A known id, or else a local path turned into a variant."""
        if id_or_path in self.configs or id_or_path in self.refresh_made_variants():
            return self.configs[id_or_path]
        if Path(id_or_path).expanduser().exists() or "/" in id_or_path or id_or_path.endswith(".gguf"):
            return self.add_path(id_or_path)
        return self.get(id_or_path)

    def __contains__(self, variant_id: object) -> bool:
        return variant_id in self.configs

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.configs))

    def __len__(self) -> int:
        return len(self.configs)
