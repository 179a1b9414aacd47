"""Config values coerced to the types of the config dataclasses, and sections built from mappings.

Generic: it knows the types a config field may have (``int``, ``float``, ``str``, ``bool``,
``None``, ``Literal``, unions, lists, dicts) and nothing of what the sections mean; the checks
of values are in :mod:`._config_validate`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from ._config_schema import ConfigError, _suggest


def origin_of(origins: Mapping[str, str], key: str) -> str | None:
    """The file (or folder) recorded for ``key``: that of its deepest recorded prefix."""
    parts = key.split(".")
    for i in range(len(parts), -1, -1):
        k = ".".join(parts[:i])
        if k in origins:
            return origins[k]
    return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (arg,) = get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true/false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or raise :class:`_Mismatch`."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        # exact type first (1 stays an int for `int | float`)
        for a in args:
            if a is not type(None) and get_origin(a) is None and type(value) is a:
                return value
        for a in args:
            try:
                return _coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin is list:
        (arg,) = get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return [_coerce(v, arg) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover


def section(cls: type, data: Any, key: str, origins: Mapping[str, str]) -> Any:
    """The dataclass ``cls`` of the section ``key`` from its mapping, every value coerced to its type.

    Raises :class:`ConfigError` for a section that is not a mapping, an unknown key (with a
    suggestion) or a value of the wrong type.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"must be a mapping of options, received {data!r}.", key=key, file=origin_of(origins, key)
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{key}.{k}"
        if k not in names:
            raise ConfigError(
                f"unknown key {k!r} in `{key}`{_suggest(str(k), names)} (valid keys: {', '.join(names)})",
                key=full,
                file=origin_of(origins, full),
            )
        try:
            kwargs[k] = _coerce(v, hints[k])
        except _Mismatch:
            raise ConfigError(
                f"must be {_type_name(hints[k])}, received {v!r}{_literal_hint(v, hints[k])}.",
                key=full,
                file=origin_of(origins, full),
            ) from None
    return cls(**kwargs)


def _literal_hint(value: Any, tp: Any) -> str:
    """A "did you mean" for a misspelt choice."""
    choices: list[str] = []
    stack = [tp]
    while stack:
        t = stack.pop()
        if get_origin(t) is Literal:
            choices += [a for a in get_args(t) if isinstance(a, str)]
        elif get_origin(t) in (typing.Union, types.UnionType, list):
            stack += list(get_args(t))
    if isinstance(value, str) and choices:
        return _suggest(value, choices)
    if isinstance(value, list) and choices:
        bad = [v for v in value if v not in choices]
        if bad and isinstance(bad[0], str):
            return f" ({bad[0]!r} is not one of them{_suggest(bad[0], choices)})"
    return ""
