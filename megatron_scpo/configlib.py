"""YAML -> typed dataclasses, strictly.

Every section of the experiment config is a plain dataclass with defaults. ``build`` walks the type
hints, so an unknown key, a wrong type or a value outside a ``Literal`` raises one ``ConfigError``
that names the dotted key path (and the file, when loaded from one) and the allowed values.
A dataclass may define ``validate(self)`` raising ``ValueError`` for cross-field checks; the message
is re-raised with the section's key path.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value: the message names the key path and what is allowed."""


def _fmt_path(path: str) -> str:
    return path or "<root>"


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{_fmt_path(path)}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{_fmt_path(path)}: null is not allowed")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_fmt_path(path)}: {value!r} fits none of {args}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{_fmt_path(path)}: expected a mapping (section {tp.__name__}), got {value!r}")
        return build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_fmt_path(path)}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_fmt_path(path)}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_fmt_path(path)}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(kt, k, f"{path}.{k}"): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_fmt_path(path)}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{_fmt_path(path)}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{_fmt_path(path)}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{_fmt_path(path)}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{_fmt_path(path)}: cannot read {value!r} as {tp}")


def build(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; allowed keys in {_fmt_path(path)}: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    obj = cls(**kwargs)
    validate_tree(obj, path)
    return obj


def check_min(obj: Any, minimum: float, *names: str, strict: bool = False) -> None:
    """Lower bounds for a section's ``validate()``: '<name> must be >= m, got v' ('> m' when strict)."""
    for name in names:
        v = getattr(obj, name)
        if v < minimum or (strict and v == minimum):
            raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {v}")


def validate_tree(obj: Any, path: str = "") -> None:
    """Run ``validate()`` of a dataclass, re-raising its ValueError with the key path."""
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{_fmt_path(path)}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings to a nested dict (creating sections as needed)."""
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; syntax errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def _names_key(msg: str, key: str) -> str | None:
    """How error ``msg`` relates to override key ``key`` (``a.b.c``): "key" when it names the key itself or an
    unknown parent section (``unknown key a``), "section" when it is the section's own check (``a.b: ...``)
    mentioning the field ``c`` (which may combine it with fields set in the file), else None."""
    if re.match(rf"(unknown key )?{re.escape(key)}[:;]", msg):
        return "key"
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        section = re.escape(".".join(parts[:i]))
        if re.match(rf"unknown key {section}[:;]", msg):
            return "key"
        if re.match(rf"{section}:", msg) and re.search(rf"\b{re.escape(parts[-1])}\b", msg):
            return "section"
    return None


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML file plus ``key=value`` overrides; errors name the file, or the override when the
    field they name was set on the command line."""
    overrides = list(overrides)
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return build(cls, data)
    except ConfigError as e:
        msg = str(e)
        hits = [(ov, how) for ov in overrides if (how := _names_key(msg, ov.split("=", 1)[0].strip()))]
        exact = [ov for ov, how in hits if how == "key"]
        if exact:  # the override alone is wrong
            raise ConfigError(f"override {exact[-1]}: {msg}") from None
        if hits:  # a section check over the file's and the overrides' values: name both
            where = f"{path} with override " if path else "override "
            raise ConfigError(f"{where}{', '.join(ov for ov, _ in hits)}: {msg}") from None
        raise ConfigError(f"{path}: {msg}" if path else msg) from None
