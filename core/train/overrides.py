"""`--config FILE` and `--set KEY=VALUE`: typed values for the fields of settings dataclasses.

pretrain, finetune and align read their settings here, so a key means the same, takes the same values
and fails with the same message in every command. A value is converted to the type its field declares
(bool, int, float, str, tuple, dict, Optional of those), never guessed from how it looks; every
problem is one line that names the key.

The layers, lowest priority first, are the command's base (a preset, or the command's defaults), the
config file (a flat JSON object of field: value), the `--set` pairs in order, then named flags; the
commands apply the last layer, since only they know which flags were given.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path

from glm_cli.core.errors import UsageError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def field_types(*classes) -> dict[str, object]:
    """{field name: its resolved type hint} over the given dataclasses (a name in two: the first wins)."""
    out: dict[str, object] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, hints[f.name])
    return out


def type_name(hint) -> str:
    """How a type reads in a message: int, float, true/false, a tuple of 2 floats, int or none."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"comma-separated {type_name(args[0])}s"
        return f"{len(args)} comma-separated {type_name(args[0]) if len(set(args)) == 1 else 'values'}s"
    if hint is bool:
        return "true/false"
    return getattr(origin or hint, "__name__", str(hint))


def convert(hint, value):
    """`value` (text from --set, or a JSON value) as `hint`; ValueError when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise ValueError
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value)
            except ValueError:
                continue
        raise ValueError
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    if origin is tuple:
        items = [x for x in value.strip("()[] ").split(",") if x.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], x) for x in items)
        if len(items) != len(args):
            raise ValueError
        return tuple(convert(a, x) for a, x in zip(args, items, strict=True))
    if origin is dict or hint is dict:
        parsed = json.loads(value) if isinstance(value, str) else value
        if not isinstance(parsed, dict):
            raise ValueError
        return parsed
    return value


def _known(key: str, fields: Mapping[str, object], where: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(fields)}"
    return f"{where}: unknown setting {key!r} ({hint})"


def _typed(key: str, value, fields: Mapping[str, object], where: str, problems: list[str], out: dict) -> None:
    if key not in fields:
        problems.append(_known(key, fields, where))
        return
    try:
        out[key] = convert(fields[key], value)
    except (ValueError, TypeError):
        problems.append(f"{where} {key}={value!r}: expected {type_name(fields[key])}")


def read_config(path: str | Path, fields: Mapping[str, object], problems: list[str]) -> dict:
    """The typed settings of a config file: one flat JSON object of field: value."""
    where = f"--config {path}"
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        problems.append(f"{where}: {e.strerror or e}")
        return {}
    except ValueError as e:
        problems.append(f"{where}: not valid JSON ({e})")
        return {}
    if not isinstance(loaded, dict):
        problems.append(f"{where}: expected a JSON object of setting: value")
        return {}
    out: dict = {}
    for key, value in loaded.items():
        _typed(str(key).replace("-", "_"), value, fields, where, problems, out)
    return out


def read_sets(sets: Iterable[str], fields: Mapping[str, object], problems: list[str]) -> dict:
    """The typed settings of `--set KEY=VALUE` pairs, later pairs winning."""
    out: dict = {}
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE")
            continue
        _typed(key, value.strip(), fields, "--set", problems, out)
    return out


def read_overrides(fields: Mapping[str, object], config_file: str | Path | None, sets: Iterable[str] | None,
                   problems: list[str]) -> dict:
    """--config, then --set over it: {key: typed value} of every key the user gave. Problems are appended
    (one line each) so a command can report all of them together."""
    out = read_config(config_file, fields, problems) if config_file else {}
    out.update(read_sets(sets or [], fields, problems))
    return out


def apply(base, overrides: Mapping, problems: list[str]):
    """`base` (a dataclass instance) with the overrides that name its fields, or None after a problem."""
    names = {f.name for f in dataclasses.fields(base)}
    try:
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if k in names})
    except (TypeError, ValueError, UsageError) as e:
        problems.append(str(e))
        return None


def raise_problems(problems: list[str]) -> None:
    """One UsageError, one line: every problem, separated by semicolons."""
    if problems:
        raise UsageError("; ".join(problems))
