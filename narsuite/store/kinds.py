"""Record kinds: what the store holds and how it finds it.

A *kind* is an attrs record class plus the functions that index it.  Roles
declare their kinds (``nar.mapping``, ``esp.sa``, ``mip.binding``...) with
:class:`KindSpec`; the store keeps one dict per index so every demultiplexing
lookup on the packet path is a single ``dict.get``.

Persistence encodes records as tagged JSON so that ``bytes``, addresses and
tuples come back as the types they were; a field whose metadata says
``persist=False`` (key material) is never written and comes back as its
default after a restart.
"""

from __future__ import annotations

import base64
import enum
import functools
import ipaddress
import json
import typing
from collections.abc import Callable, Hashable
from typing import Any

import attrs

__all__ = [
    "Index",
    "KindSpec",
    "Lease",
    "LEASE",
    "secret",
    "encode_value",
    "decode_value",
    "format_key",
]


def secret(**kw: Any) -> Any:
    """An attrs field that is never persisted nor shown by narctl (key material)."""
    meta = dict(kw.pop("metadata", {}) or {})
    meta["persist"] = False
    meta["secret"] = True
    kw.setdefault("repr", False)
    return attrs.field(metadata=meta, **kw)


@attrs.frozen
class Index:
    """A lookup path into a kind: ``key(record)`` -> value (None: not indexed).

    ``many``: ``key(record)`` returns an iterable of values and the record is found under
    each (non-unique only): how a record with several networks is indexed by all of them
    (:mod:`narsuite.sadb`'s space networks)."""

    name: str
    key: Callable[[Any], Any]
    unique: bool = True
    many: bool = False

    def __attrs_post_init__(self) -> None:
        if self.many and self.unique:
            raise ValueError(f"index {self.name!r}: many=True needs unique=False")


@attrs.frozen
class KindSpec:
    name: str
    record: type
    key: Callable[[Any], Hashable]
    indexes: tuple[Index, ...] = ()
    #: False for kinds that must never reach disk (whole SAs with their keys).
    persist: bool = True
    #: Columns narctl shows by default (all fields when empty).
    columns: tuple[str, ...] = ()
    description: str = ""

    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in attrs.fields(self.record))

    def public_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in attrs.fields(self.record) if not f.metadata.get("secret"))

    # -- persistence -------------------------------------------------------
    def dump(self, record: Any) -> str:
        # (every store write of a persisted kind comes through here: the field list is cached
        # and one encoder reused; json.dumps with options builds a new encoder per call)
        return _encode_json({name: encode_value(getattr(record, name))
                             for name, _enum in _persisted_fields(self.record)})

    def load(self, text: str) -> Any:
        data = json.loads(text)
        kwargs = {}
        for name, enum_type in _persisted_fields(self.record):
            if name in data:
                value = decode_value(data[name])
                if enum_type is not None and not isinstance(value, enum_type):
                    value = enum_type(value)
                kwargs[name] = value
        return self.record(**kwargs)

    def as_row(self, record: Any) -> dict[str, Any]:
        """Plain JSON-friendly dict of the public fields, for narctl."""
        return {name: display_value(getattr(record, name)) for name in self.public_fields()}


@attrs.frozen
class Lease:
    """A value held by an owner in a store-wide namespace.

    Uniqueness across the whole store (SPIs, ports, ICMP identifiers, pool
    addresses) is the uniqueness of lease keys: every role allocates through
    the store's allocators, which create leases.  A lease goes when it
    expires, when it is released, or when its owner is dropped.
    """

    namespace: str
    value: Any
    holder: str = ""


LEASE = KindSpec(
    name="store.lease",
    record=Lease,
    key=lambda r: (r.namespace, r.value),
    indexes=(Index("holder", lambda r: r.holder or None, unique=False),),
    columns=("namespace", "value", "holder"),
    description="values allocated from store-wide namespaces (SPIs, ports, pool addresses)",
)


#: types that are their own JSON value (exact types: an IntEnum is an int but stored by value)
_PLAIN = frozenset({str, int, float, bool, type(None)})


def encode_value(value: Any) -> Any:
    if type(value) in _PLAIN:  # the common case first: every store write passes here
        return value
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, enum.Enum):
            return value.value
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return {"$ip": str(value)}
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return {"$net": str(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return {"$t": [encode_value(v) for v in value]}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, frozenset):
        return {"$fs": [encode_value(v) for v in value]}
    if isinstance(value, dict):
        return {"$d": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    raise TypeError(f"cannot persist a {type(value).__name__}: {value!r}")


def decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if not isinstance(value, dict):
        return value
    ((tag, inner),) = value.items()
    if tag == "$b":
        return base64.b64decode(inner)
    if tag == "$ip":
        return ipaddress.ip_address(inner)
    if tag == "$net":
        return ipaddress.ip_network(inner)
    if tag == "$t":
        return tuple(decode_value(v) for v in inner)
    if tag == "$fs":
        return frozenset(decode_value(v) for v in inner)
    if tag == "$d":
        return {decode_value(k): decode_value(v) for k, v in inner}
    raise ValueError(f"unknown tag {tag!r} in a stored record")


@functools.cache
def _persisted_fields(cls: type) -> tuple[tuple[str, type | None], ...]:
    """(name, enum class or None) of every persisted field; enums get their class
    back on load because JSON keeps only their value."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in attrs.fields(cls):
        if not f.metadata.get("persist", True):
            continue
        hint = hints.get(f.name)
        is_enum = isinstance(hint, type) and issubclass(hint, enum.Enum)
        out.append((f.name, hint if is_enum else None))
    return tuple(out)


#: the stored JSON's one form (compact, sorted keys): :meth:`KindSpec.dump` and :func:`key_text`
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)

#: json's own C encoder with _ENCODER's settings, made once: JSONEncoder.encode makes a new one for
#: every call that is not a plain string (2 us of the 3-5 us a record's JSON took).  The same text
#: as _ENCODER.encode (tests/test_store.py checks it); None where json has no C accelerator.
_C_ENCODER = None if json.encoder.c_make_encoder is None else json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, True)

_quote = json.encoder.encode_basestring_ascii


def _encode_json(obj: Any) -> str:
    if _C_ENCODER is None:
        return _ENCODER.encode(obj)
    return "".join(_C_ENCODER(obj, 0))


def key_text(key: Any) -> str:
    """Stable text form of a primary key, used as the SQLite row key (and in Redis's keys).

    Integers, strings and tuples of them (most keys: SPIs, names, (namespace, value) leases)
    are written directly, in exactly the encoder's form."""
    t = type(key)
    if t is int:
        return int.__repr__(key)
    if t is str:
        return _quote(key)
    if t is tuple:
        parts = []
        for v in key:
            tv = type(v)
            if tv is int:
                parts.append(int.__repr__(v))
            elif tv is str:
                parts.append(_quote(v))
            else:
                return _encode_json(encode_value(key))
        return '{"$t":[' + ",".join(parts) + "]}"
    return _encode_json(encode_value(key))


def key_from_text(text: str) -> Any:
    return decode_value(json.loads(text))


def display_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, (tuple, list, frozenset)):
        return [display_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def format_key(key: Any) -> str:
    """The human form of a key, as ``narctl show KIND KEY`` takes it."""
    if isinstance(key, tuple):
        return "/".join(format_key(k) for k in key)
    if isinstance(key, (bytes, bytearray)):
        return key.hex()
    return str(display_value(key))
