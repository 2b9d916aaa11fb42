"""One config system for every job: typed dataclasses, YAML, dotted overrides.

A job config is a ``@dataclass(kw_only=True)`` built from sub-configs. It is loaded with

    cfg = load_config(CurateConfig, "pipelines/configs/curate.yaml", ["resize.image_size=64"])

YAML gives an experiment, ``key.sub=value`` overrides (from the command line or from Tune)
use the same dotted keys, and unknown keys or wrong types raise ``ConfigError`` naming the
key, before any work starts. A field whose key is a Python keyword names its key in its
metadata: ``source: str = field(default="", metadata={"key": "from"})`` reads ``init.from``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, or a bad value."""


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> T:  # fmt: skip
    """Build ``cls`` from an optional YAML file, then ``values`` (dotted key → a value, as a
    job's flags give them), then ``a.b=c`` overrides (later wins)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    return from_dict(cls, apply_overrides(merge(data, values or {}), overrides))


def merge(data: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted key of ``values`` (``optim.lr``) set to its value;
    a value replaces what was there, a mapping included (``loss.terms``)."""
    out = _deep_copy(dict(data))
    for key, value in values.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
            node = child
        node[leaf] = _deep_copy(value) if isinstance(value, dict) else value
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=value", ...]`` → ``{"a.b": value}``, each value parsed as YAML."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: not a YAML value ({e})") from e
    return values


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b=value`` set."""
    return merge(data, parse_overrides(overrides))


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Validate ``data`` against dataclass ``cls`` recursively; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    fields = {_key(f): f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"unknown key(s){where}: {', '.join(prefix + k for k in unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        fields[key]: _check(hints[fields[key]], value, prefix + key) for key, value in data.items()
    }
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or 'config'}: {e}") from e
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e
    return obj


def replace(cfg: T, values: Mapping[str, Any]) -> T:
    """A validated copy of config ``cfg`` with the dotted keys of ``values`` set."""
    return from_dict(type(cfg), merge(to_dict(cfg), values))


def to_dict(cfg: Any) -> Any:
    """The resolved config as plain data (for YAML, JSON and MLflow), under its keys."""
    if dataclasses.is_dataclass(cfg):
        return {_key(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _key(field: dataclasses.Field) -> str:
    return field.metadata.get("key", field.name)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: the dotted keys that overrides use."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _check(item, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}
