"""Every setting of a running playground, in one place: `PLAYGROUND_*` variables and a YAML file.

Order of precedence: environment variables, then the file named by `PLAYGROUND_SETTINGS_FILE`,
then the defaults here. Unknown keys and bad values are refused with the setting's name. Worker
and job processes inherit the environment, so they read the same settings. Secrets are held as
`SecretStr`: printing the settings or a validation error never shows them.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from playground.config import describe_errors
from playground.errors import ConfigError, PlaygroundError

Role = Literal["admin", "viewer"]
BUNDLED_DATA = Path(__file__).resolve().parent.parent / "assets"
SETTINGS_FILE_VARIABLE = "PLAYGROUND_SETTINGS_FILE"


class Account(BaseModel):
    """One login. Admins load and unload variants and run jobs; viewers prompt, compare, vote."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.@\-]+$")]
    password: SecretStr
    role: Role = "viewer"

    @field_validator("password")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 8:
            raise ValueError("a password needs at least 8 characters")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PLAYGROUND_", extra="forbid", frozen=True)

    # -- serving -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65_535)] = 7860
    # Logins: user/password pairs with roles, and/or tokens that work as the password of any name.
    users: list[Account] = []
    admin_token: SecretStr | None = None
    viewer_token: SecretStr | None = None
    # Gradio's own worker threads for events of all kinds.
    ui_concurrency: Annotated[int, Field(ge=1, le=256)] = 16
    # Gradio's cap on events running at once, server-wide (its max_threads, also its thread pool
    # for plain functions): each open page holds one for its live view (ui.live), so this bounds
    # the pages open at once with room left for their requests.
    ui_max_events: Annotated[int, Field(ge=8, le=4096)] = 256
    max_upload_mb: Annotated[int, Field(ge=1, le=100_000)] = 200

    # -- where things are ----------------------------------------------------------------------
    config_dirs: list[Path] = []  # empty: the model_configs/ folder shipped with the app
    # Model, dataset and corpus paths typed into the app must lie under one of these (after
    # symlinks are resolved). Empty: the home folder and the folder the app started in.
    allowed_roots: list[Path] = []
    data_dir: Path = Path.home() / ".local" / "share" / "variant-playground"
    cache_dir: Path = Path.home() / ".cache" / "variant-playground"
    jobs_dir: Path | None = None  # default: <data_dir>/jobs

    # -- what may run --------------------------------------------------------------------------
    # Variant ids whose model folders may run their own code (their configs must also ask for it).
    remote_code_variants: list[str] = []
    max_cpu_jobs: Annotated[int, Field(ge=1, le=64)] = 1
    # The most the loaded variants may take of each GPU, counted by their estimates (MiB); unset:
    # each GPU's free memory alone decides. For a GPU shared with other programs or people.
    gpu_budget_mib: Annotated[int, Field(ge=64, le=10_000_000)] | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        file = os.environ.get(SETTINGS_FILE_VARIABLE)
        if file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=Path(file)))
        return tuple(sources)

    # -- derived -------------------------------------------------------------------------------
    @property
    def auth_enabled(self) -> bool:
        return bool(self.users or self.admin_token or self.viewer_token)

    @property
    def jobs_folder(self) -> Path:
        return self.jobs_dir or self.data_dir / "jobs"

    @property
    def roots(self) -> list[Path]:
        chosen = self.allowed_roots or [Path.home(), Path.cwd()]
        # The data shipped with the app (bundled datasets, corpora, eval tasks) is always
        # readable, and so is what people uploaded through the UI (the app wrote it there).
        return [p.expanduser().resolve() for p in [*chosen, BUNDLED_DATA, self.data_dir / "uploads"]]

    def role_of(self, name: str, password: str) -> Role | None:
        """The role a login gets, or None when it is refused."""
        for account in self.users:
            if account.name == name and _same(account.password, password):
                return account.role
        if self.admin_token is not None and _same(self.admin_token, password):
            return "admin"
        if self.viewer_token is not None and _same(self.viewer_token, password):
            return "viewer"
        return None

    def bind_host(self) -> tuple[str, str]:
        """The address to listen on, and a warning when the one asked for was refused: without
        logins the app answers only on this machine."""
        if self.auth_enabled or _is_loopback(self.host):
            return self.host, ""
        return "127.0.0.1", (
            f"Not listening on {self.host}: no logins are set (PLAYGROUND_USERS, PLAYGROUND_ADMIN_TOKEN "
            "or PLAYGROUND_VIEWER_TOKEN), so the playground answers on 127.0.0.1 only."
        )


def _same(secret: SecretStr, given: str) -> bool:
    import hmac

    return hmac.compare_digest(secret.get_secret_value().encode(), given.encode())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def get_settings() -> Settings:
    """The settings of this process; read again only when a PLAYGROUND_* variable changes."""
    snapshot = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("PLAYGROUND_")))
    return _settings_for(snapshot)


@functools.lru_cache(maxsize=4)
def _settings_for(environment: tuple[tuple[str, str], ...]) -> Settings:
    _refuse_unknown_variables([name for name, _ in environment])
    file = os.environ.get(SETTINGS_FILE_VARIABLE)
    if file and not Path(file).is_file():
        raise ConfigError(f"the settings file {file} ({SETTINGS_FILE_VARIABLE}) does not exist")
    try:
        return Settings()
    except ValidationError as err:
        raise ConfigError(f"invalid settings: {describe_errors(err, unknown='unknown setting')}") from None
    except SettingsError as err:  # a variable whose value is not the JSON its field needs
        field = re.search(r'field "(\w+)"', str(err))
        if field is None:
            raise ConfigError(f"a PLAYGROUND_* variable cannot be read: {err}") from None
        name = f"{Settings.model_config['env_prefix']}{field.group(1).upper()}"
        raise ConfigError(f"{name} (setting {field.group(1)}) cannot be read: its value must be JSON") from None
    except yaml.YAMLError as err:  # safe YAML only: a tag such as !!python/object is refused here
        # Its position and problem, not the marked snippet: the line may hold a password.
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"the settings file {file} is not valid YAML{where}: {problem}") from None
    except (OSError, ValueError) as err:  # an unreadable or malformed settings file
        raise ConfigError(f"the settings file {file} ({SETTINGS_FILE_VARIABLE}) cannot be read: {err}") from None


def _refuse_unknown_variables(names: list[str]) -> None:
    """A misspelt variable would leave its default in force unseen (the allowed roots, say)."""
    prefix = Settings.model_config["env_prefix"]
    valid = sorted({f"{prefix}{field.upper()}" for field in Settings.model_fields} | {SETTINGS_FILE_VARIABLE})
    for name in names:
        if name.upper() not in valid:
            near = difflib.get_close_matches(name.upper(), valid, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else f"the settings are {', '.join(valid)}"
            raise ConfigError(f"unknown setting {name}: {hint}")


class PathNotAllowed(PlaygroundError):
    """A typed path that lies outside the allowed roots."""


def named_or_allowed(value: str | None, names: Collection[str], what: str) -> str | None:
    """For option validators: one of the bundled `names`, None, or a path the user may read
    (refused with a ValueError, which pydantic reports under the option's name)."""
    if value is None or value in names:
        return value
    try:
        allowed_tree(value, what)  # a folder (lm-eval tasks) is checked with everything in it
    except PathNotAllowed as err:
        raise ValueError(str(err)) from None
    return value


def allowed_path(path: str | Path, what: str = "path") -> Path:
    """`path` resolved (symlinks and `..` followed), if it lies under an allowed root."""
    resolved = Path(path).expanduser().resolve()
    roots = get_settings().roots
    if _inside(resolved, roots):
        return resolved
    shown = ", ".join(str(r) for r in roots)
    raise PathNotAllowed(f"the {what} {path} is outside the folders this playground may read ({shown})")


def allowed_tree(path: str | Path, what: str = "path", max_files: int = 10_000) -> Path:
    """Like `allowed_path`, and for a folder every file and folder under it too: a link inside
    an allowed folder that points out of the roots is refused, naming the link."""
    resolved = allowed_path(path, what)
    if not resolved.is_dir():
        return resolved
    roots = get_settings().roots
    for count, inner in enumerate(resolved.rglob("*")):
        if count >= max_files:
            raise PathNotAllowed(f"the {what} {path} holds more than {max_files} files: not a model folder")
        if inner.is_symlink() and not _inside(inner.resolve(), roots):
            shown = ", ".join(str(r) for r in roots)
            raise PathNotAllowed(
                f"{inner} in the {what} {path} links to {inner.resolve()}, outside the folders this "
                f"playground may read ({shown})"
            )
    return resolved


def _inside(resolved: Path, roots: list[Path]) -> bool:
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)
