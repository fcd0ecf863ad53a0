"""Typed, validated configuration sections built from TOML tables.

Every section of the config file is an immutable attrs class.  Its fields
carry their own documentation and checks in ``metadata``; :func:`build`
walks a TOML table into such a class and raises :class:`ConfigError` naming
the dotted key, the value found and what was expected.  Roles describe their
own sections with the same helpers, so every error in the whole file reads
the same way and is raised before anything binds a port.
"""

from __future__ import annotations

import collections.abc
import ipaddress
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "ConfigError",
    "setting",
    "build",
    "one_of",
    "in_range",
    "ip_address",
    "describe_type",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range.

    The message always starts with the dotted key so an operator can find
    the line in the file, then says what was found and what is expected.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


Check = Callable[[str, Any], None]


def setting(
    default: Any = attrs.NOTHING,
    *,
    doc: str = "",
    check: Check | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare one config key: its default, its documentation, an extra check."""
    meta = {"doc": doc, "check": check}
    if factory is not None:
        return attrs.field(factory=factory, metadata=meta)
    return attrs.field(default=default, metadata=meta)


def one_of(*choices: Any) -> Check:
    def check(key: str, value: Any) -> None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(key, f"got {value!r}; expected one of {allowed}")

    return check


def in_range(low: float | None = None, high: float | None = None) -> Check:
    def check(key: str, value: Any) -> None:
        if (low is not None and value < low) or (high is not None and value > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise ConfigError(key, f"got {value!r}; expected a number in [{lo}, {hi}]")

    return check


def ip_address(version: int | None = None) -> Check:
    """Check an address string (empty allowed: "not set"); ``version`` 4 or 6 restricts it."""
    want = {4: "an IPv4 address", 6: "an IPv6 address"}.get(version or 0, "an IP address")

    def check(key: str, value: str) -> None:
        if not value:
            return
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            ip = None
        if ip is None or (version is not None and ip.version != version):
            example = '"2001:db8::1"' if version == 6 else '"192.0.2.1"'
            raise ConfigError(key, f"got {value!r}; expected {want} such as {example}")

    return check


def describe_type(tp: Any) -> str:
    """Human wording for a field type, used in error messages."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if origin in (dict, Mapping, collections.abc.Mapping):
        return f"a table of {describe_type(typing.get_args(tp)[1])}"
    if attrs.has(tp):
        return "a table"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        Path: "a file path (string)",
        type(None): "nothing",
        ipaddress.IPv4Address: "an IPv4 address like \"192.0.2.1\"",
        ipaddress.IPv4Network: "an IPv4 network like \"10.8.0.0/24\"",
        ipaddress.IPv4Interface: "an IPv4 interface address like \"10.8.0.1/24\"",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(key: str, tp: Any, value: Any, base: Path | None) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, arg, value, base)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(key, f"got {value!r}; expected {describe_type(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(key, f"got {value!r}; expected {describe_type(tp)}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(f"{key}[{i}]", inner, v, base) for i, v in enumerate(value)]
        return tuple(items)
    if origin in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(key, f"got {value!r}; expected {describe_type(tp)}")
        _, inner = typing.get_args(tp)
        return types.MappingProxyType(
            {k: _convert(f"{key}.{k}", inner, v, base) for k, v in value.items()}
        )
    if attrs.has(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"got {value!r}; expected a table ([{key}])")
        return build(tp, value, key, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"got {value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"got {value!r}; expected a string")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"got {value!r}; expected a file path (string)")
        path = Path(value).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        return path
    if tp in (ipaddress.IPv4Address, ipaddress.IPv4Network, ipaddress.IPv4Interface):
        try:
            if not isinstance(value, str):
                raise ValueError
            return tp(value)
        except ValueError:
            raise ConfigError(key, f"got {value!r}; expected {describe_type(tp)}") from None
    raise TypeError(f"schema for {key} uses unsupported type {tp!r}")


def build(cls: type, table: Mapping[str, Any], prefix: str, base: Path | None = None) -> Any:
    """Build the attrs class ``cls`` from a TOML table, validating every key.

    ``prefix`` is the dotted name of the table (``"store"``); ``base`` is the
    directory relative paths are resolved against (the config file's).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        known = ", ".join(sorted(fields)) or "(none)"
        raise ConfigError(key, f"unknown key; the keys of [{prefix}] are: {known}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in table:
            value = _convert(key, hints[name], table[name], base)
        elif field.default is attrs.NOTHING:
            raise ConfigError(key, f"missing; expected {describe_type(hints[name])}")
        else:
            continue
        check = field.metadata.get("check")
        if check is not None:
            check(key, value)
        kwargs[name] = value
    obj = cls(**kwargs)
    post = getattr(obj, "__validate__", None)
    if post is not None:
        post(prefix)
    return obj
