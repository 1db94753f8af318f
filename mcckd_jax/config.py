"""Typed configs: nested frozen dataclasses loaded from YAML with dotted `key=value` overrides.

Loaded once at an entry point; nothing downstream reads YAML or dicts. An unknown key is an
error that lists the close matches; a value of the wrong type names its dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from mcckd_jax import files

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclasses."""


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _convert(kind, value, key: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {kind.__name__}, got {value!r}")
        return from_dict(kind, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[-1] if len(errors) == 1 else
                          f"{key}: {value!r} fits none of {', '.join(map(_type_name, args))}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or kind in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and _is_float(value):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if kind in (int, float, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {kind}")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unknown_key(cls, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else (
        f"; {cls.__name__} has {', '.join(names)}")
    return ConfigError(f"unknown config key {prefix}{key}{hint}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """An instance of dataclass `cls` from a (nested) mapping; missing keys keep defaults."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise _unknown_key(cls, key, prefix)
        values[key] = _convert(hints[key], value, prefix + key)
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from error


def to_dict(config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML or JSON."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(config)


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """`config` with dotted `a.b.c=value` overrides applied (values parsed as YAML)."""
    data = to_dict(config)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
        node, cls, parts = data, type(config), key.split(".")
        for depth, part in enumerate(parts):
            prefix = ".".join(parts[:depth])
            prefix = f"{prefix}." if prefix else ""
            if cls is not dict:  # a free-form mapping field takes any key
                if cls is None or not dataclasses.is_dataclass(cls):
                    raise ConfigError(f"override {key}: {prefix.rstrip('.')} is not a section")
                if part not in {f.name for f in dataclasses.fields(cls)}:
                    raise _unknown_key(cls, part, prefix)
            if depth == len(parts) - 1:
                try:
                    node[part] = yaml.safe_load(raw)
                except yaml.YAMLError as error:
                    raise ConfigError(f"override {override!r}: {key}: not valid YAML "
                                      f"{yaml_problem(error, lines=False)}") from None
            else:
                cls = dict if cls is dict else _section_of(typing.get_type_hints(cls)[part])
                node[part] = node.get(part) if isinstance(node.get(part), dict) else {}
                node = node[part]
    return from_dict(type(config), data)


def yaml_problem(error: yaml.YAMLError, lines: bool = True) -> str:
    """Where (1-based; the column alone for a one-line value) and what, on one line.

    PyYAML's own message spans several lines and quotes the input with a caret under it.
    """
    what = ", ".join(part for part in (getattr(error, "context", None),
                                       getattr(error, "problem", None)) if part)
    what = " ".join((what or str(error)).split())
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return f"({what})"
    where = f"line {mark.line + 1} column {mark.column + 1}" if lines else (
        f"column {mark.column + 1}")
    return f"at {where}: {what}"


def _section_of(kind):
    """The dataclass (or dict) that a field's value is, for descending into it."""
    if dataclasses.is_dataclass(kind):
        return kind
    if kind is dict or typing.get_origin(kind) in (dict, Mapping):
        return dict
    candidates = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)]
    return candidates[0] if candidates else None


def load(cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """Config from a YAML file (or defaults when path is None) plus overrides."""
    data: Mapping[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML {yaml_problem(error, lines=True)}"
                              ) from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = from_dict(cls, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    return apply_overrides(config, overrides)


def save(config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML, atomically (`files.write_atomically`)."""
    files.write_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False))
