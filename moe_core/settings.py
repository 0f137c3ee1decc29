"""Typed service settings, defined once, read from command-line flags and `MOE_*` environment variables.

A settings class is a dataclass whose fields are declared with `setting(...)`. Each field becomes a flag
(`max_num_seqs` -> `--max-num-seqs`) and an environment variable (`MOE_MAX_NUM_SEQS`); a flag beats the
environment, which beats the default. Values are converted by the field's type and checked by the
class's `validate()`; any problem is a `SettingsError` naming the flag and the variable.

    @dataclass
    class Example:
        port: int = setting(8000, "TCP port to listen on (0 picks a free one)")

    settings = parse_settings(Example, argv)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from moe_core.errors import MoeServeError

T = TypeVar("T")
ENV_PREFIX = "MOE_"


class SettingsError(MoeServeError):
    """A setting has a bad or missing value."""


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[str] | None = None,
            required: bool = False) -> Any:
    """A dataclass field that is also a documented flag and environment variable."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "required": required}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=None if default is dataclasses.MISSING else default, metadata=metadata)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(element type, is_list) of a field annotation such as `int`, `str | None`, `list[str]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _convert(kind: type, raw: str, where: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{where}: expected a boolean (true/false), got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{where}: expected {kind.__name__}, got {raw!r}") from None


def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.metadata.get("help") is not None]


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    for f, kind, is_list in _fields(cls):
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}]"
        if f.metadata.get("required"):
            help_text += " (required)"
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if default not in (None, [], ""):
                help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif is_list:
            kwargs.update(action="append", metavar=kind.__name__.upper())
        else:
            kwargs.update(metavar=kind.__name__.upper(), type=str)
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag_name(f.name), **kwargs)
    return parser


def parse_settings(cls: type[T], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                   prog: str | None = None) -> T:
    """Flags beat `MOE_*` variables beat defaults; exits with status 2 and a clear message on a bad value."""
    parser = build_parser(cls, prog)
    namespace = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return settings_from(cls, vars(namespace), os.environ if env is None else env)
    except SettingsError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def settings_from(cls: type[T], flags: Mapping[str, Any], env: Mapping[str, str]) -> T:
    values: dict[str, Any] = {}
    for f, kind, is_list in _fields(cls):
        where = f"{flag_name(f.name)} / {env_name(f.name)}"
        if f.name in flags:
            raw = flags[f.name]
        elif env_name(f.name) in env:
            raw = env[env_name(f.name)]
            raw = [part for part in raw.split(",") if part] if is_list else raw
        else:
            if f.metadata.get("required"):
                raise SettingsError(f"{where} is required")
            continue
        if is_list:
            values[f.name] = [_convert(kind, item, where) for item in raw]
        elif isinstance(raw, bool) or (kind is not bool and not isinstance(raw, str)):
            values[f.name] = raw
        else:
            values[f.name] = _convert(kind, raw, where)
        choices = f.metadata.get("choices")
        if choices and values[f.name] not in choices:
            raise SettingsError(f"{where}: {values[f.name]!r} is not one of {', '.join(choices)}")
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def check(condition: bool, field_name: str, message: str) -> None:
    """For `validate()` methods: raise SettingsError naming the flag and the variable."""
    if not condition:
        raise SettingsError(f"{flag_name(field_name)} / {env_name(field_name)}: {message}")


def as_argv(settings: Any) -> list[str]:
    """The flags that reproduce `settings` (used to start a service as a process)."""
    argv: list[str] = []
    for f, kind, is_list in _fields(type(settings)):
        value = getattr(settings, f.name)
        if value is None:
            continue
        if is_list:
            for item in value:
                argv += [flag_name(f.name), str(item)]
        elif kind is bool:
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag_name(f.name), str(value)]
    return argv
