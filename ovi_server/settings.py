"""The settings object: `ServerConfig` (config.py) built once per command from, lowest first,
its defaults → a config file (`--config PATH` / `OVI_CONFIG`, TOML or JSON) → `OVI_*` environment
variables → command-line flags.

Each field made with `config.setting(...)` names its flag, env var, help, group and the commands that take
it; `add_options` turns those into argparse options and `load` resolves them. So a default lives once
(in the dataclass), and a new flag is one new field.

Why not pydantic-settings: its CLI source brings its own parser, whose flag names and subcommand layout
differ from the ones README, tests and deployed env files use (`--weights` ↔ `OVI_WEIGHTS_DIR`,
`--retention-hours` ↔ `output_retention_hours`), and a merged validation cannot say which source gave
a bad value. Argparse + field metadata + pydantic's `TypeAdapter` for coercion is the same precedence in
one screen, and an error names the option and where its value came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovi_server.config import EngineConfig, LogConfig, ServerConfig
from ovi_server.errors import ConfigError

# ServerConfig's sub-objects: (attribute, class); the rest of its settings are its own fields.
_PARTS: tuple[tuple[str | None, type], ...] = (
    ("engine", EngineConfig),
    ("log", LogConfig),
    (None, ServerConfig),
)


@dataclass(frozen=True)
class Option:
    """One setting: a field of EngineConfig, LogConfig or ServerConfig carrying `setting()` metadata."""

    part: str | None  # "engine", "log" or None (ServerConfig itself)
    name: str  # the field name
    flag: str  # "--port"; a config file's key is the flag without dashes ("port", "retention-hours")
    env: str
    help: str
    group: str
    commands: tuple[str, ...]
    annotation: Any
    parse: Any
    field: dataclasses.Field

    @property
    def dest(self) -> str:
        return f"{self.part}.{self.name}" if self.part else self.name

    @property
    def is_switch(self) -> bool:
        return self.annotation is bool

    def default(self, overrides: dict[str, Any]) -> Any:
        if self.name in overrides:
            return overrides[self.name]
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default


def options(command: str | None = None) -> Iterator[Option]:
    """Every setting, or those `command` takes, in field order."""
    for part, cls in _PARTS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "flag" in meta and (command is None or command in meta["commands"]):
                yield Option(
                    part, f.name, meta["flag"], meta["env"], meta["help"], meta["group"],
                    meta["commands"], hints[f.name], meta["parse"], f,
                )  # fmt: skip


def add_options(
    parser: argparse.ArgumentParser, command: str, defaults: dict[str, Any] | None = None
) -> None:
    """The command's settings as flags, grouped, each help naming its env var and default.

    defaults: per-command defaults by field name (`weights` looks in ./weights, the benchmark runs on CPU).
    Flags default to SUPPRESS so `load` sees only the flags actually given.
    """
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="settings file (TOML or JSON; keys are the flag names: port = 8080); flags and OVI_* "
        "variables win over it [env OVI_CONFIG]",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in options(command):
        group = groups.get(opt.group) or groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        default = opt.default(defaults or {})
        shown = (
            "" if default in (None, ()) else f" (default: {'off' if default is False else _text(default)})"
        )
        help = f"{opt.help} [env {opt.env}]{shown}".replace("%", "%%")
        if opt.is_switch:
            group.add_argument(opt.flag, dest=opt.dest, action="store_const", const=True, default=argparse.SUPPRESS, help=help)  # fmt: skip
        else:
            choices = (
                typing.get_args(opt.annotation)
                if typing.get_origin(opt.annotation) is typing.Literal
                else None
            )
            metavar = (
                "{" + ",".join(choices) + "}" if choices else opt.flag.lstrip("-").upper().replace("-", "_")
            )
            group.add_argument(opt.flag, dest=opt.dest, default=argparse.SUPPRESS, metavar=metavar, help=help)


def load(args: argparse.Namespace, command: str, defaults: dict[str, Any] | None = None) -> ServerConfig:
    """The settings of `command`: defaults → config file → environment → flags. Raises ConfigError
    naming the option and the source of a bad value."""
    given = vars(args)
    config_path = given.get("config") or os.environ.get("OVI_CONFIG") or None
    file_values = _read_file(Path(config_path)) if config_path else {}
    values: dict[str | None, dict[str, Any]] = {part: {} for part, _ in _PARTS}
    for opt in options(command):
        key = opt.flag.lstrip("-")
        if opt.dest in given:
            raw, source = given[opt.dest], opt.flag
        elif os.environ.get(opt.env, "") != "":
            raw, source = os.environ[opt.env], f"{opt.env} (environment)"
        elif key in file_values:
            raw, source = file_values[key], f"{key} in {config_path}"
        else:
            if defaults and opt.name in defaults:
                values[opt.part][opt.name] = defaults[opt.name]
            continue
        values[opt.part][opt.name] = _convert(opt, raw, source)
    return ServerConfig(
        engine=EngineConfig(**values["engine"]), log=LogConfig(**values["log"]), **values[None]
    )


def to_argv(config: ServerConfig, command: str) -> list[str]:
    """Flags that give `command` these settings (how `serve` starts its workers); `load` reads them back."""
    argv: list[str] = []
    for opt in options(command):
        value = getattr(getattr(config, opt.part) if opt.part else config, opt.name)
        if opt.is_switch:
            argv += [opt.flag] if value else []
        elif value is not None:
            argv += [opt.flag, _text(value)]
    return argv


def _text(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _convert(opt: Option, raw: Any, source: str) -> Any:
    import pydantic

    try:
        if opt.parse is not None:
            return opt.parse(raw)
        if isinstance(raw, str) and opt.is_switch and raw.strip() == "":
            return False
        return pydantic.TypeAdapter(opt.annotation).validate_python(raw)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, pydantic.ValidationError):
            reason = "; ".join(e["msg"] for e in exc.errors())
        else:
            reason = str(exc)
        raise ConfigError(f"{opt.flag}: bad value {raw!r} from {source}: {reason}") from None


def _read_file(path: Path) -> dict[str, Any]:
    """A flat table of flag names (dashes or underscores) → values; unknown keys are an error."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config / OVI_CONFIG: cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings (key = value)")
    known = {opt.flag.lstrip("-") for opt in options()}
    table = {str(k).replace("_", "-"): v for k, v in data.items()}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown settings {unknown}; the keys are the flag names, e.g. port, data-dir"
        )
    return table
