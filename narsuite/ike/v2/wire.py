"""IKEv2 wire codec (RFC 7296 §3, RFC 7383 §2.5): the header, the payload chain, every payload.

Pure functions over ``bytes`` with ``struct``; no I/O, no crypto, no state.  The SK and SKF
payloads are kept as opaque bodies here: opening and sealing them is :mod:`.keys`' job, after
which :func:`parse_payloads` reads the inner chain.

Layout::

    header (28)   SPIi(8) SPIr(8) NEXT(1) VERSION(1) EXCH(1) FLAGS(1) MSGID(4) LENGTH(4)
    payload       NEXT(1) C|RESERVED(1) LENGTH(2) body...   (LENGTH includes these 4 bytes)

Records hold only what carries meaning: builders compute every next-payload field, length,
count and SPI size.  ``parse_payloads(t, build_payloads(ps))`` gives ``ps`` back.

Errors: malformed input raises :class:`IKEv2Error` -- and nothing else -- whose ``notify`` is
the notify type to answer with (INVALID_SYNTAX, INVALID_MAJOR_VERSION,
UNSUPPORTED_CRITICAL_PAYLOAD with the payload type as data).  Builders raise ``ValueError``
for records that cannot be encoded: that is a bug in the caller, not a peer to answer.

Leniencies: RESERVED bits are ignored on parse and written as zero (§2.5: "MUST be ignored");
a payload type we do not know is kept as :class:`Unknown` unless its critical bit is set
(§2.5: then UNSUPPORTED_CRITICAL_PAYLOAD).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import attrs

from narsuite.ike.v2 import constants as C

__all__ = [
    "IKEv2Error", "Header", "Transform", "Proposal", "SA", "KE", "IDi", "IDr", "Cert", "CertReq", "Auth",
    "Nonce", "Notify", "Delete", "VendorID", "TrafficSelector", "TSi", "TSr", "SK", "SKF", "CfgAttribute",
    "CP", "EAP", "Unknown", "Payload", "parse_header", "parse_payloads", "parse_message", "build_header",
    "build_payloads", "build_message", "find", "find_all", "notifies", "ts_range",
]

_HEADER = struct.Struct("!8s8sBBBBII")
_GENERIC = struct.Struct("!BBH")
_PROPOSAL = struct.Struct("!BBHBBBB")
_TRANSFORM = struct.Struct("!BBHBBH")
_NOTIFY = struct.Struct("!BBH")
_TS = struct.Struct("!BBHHH")
_MAX = 0xFFFF
Buf = bytes | memoryview


class IKEv2Error(ValueError):
    """Malformed IKEv2 input; ``notify`` (and ``data``) is what to answer with."""

    def __init__(self, notify: int, detail: str, data: bytes = b"") -> None:
        super().__init__(detail)
        self.notify = notify
        self.detail = detail
        self.data = data


def _syntax(detail: str) -> IKEv2Error:
    return IKEv2Error(C.INVALID_SYNTAX, detail)


# --------------------------------------------------------------------------------- records
@attrs.frozen
class Header:
    spi_i: bytes
    spi_r: bytes
    exchange: int
    flags: int = 0
    message_id: int = 0
    next_payload: int = 0
    length: int = 0
    version: int = C.VERSION

    @property
    def response(self) -> bool:
        return bool(self.flags & C.FLAG_RESPONSE)

    @property
    def initiator(self) -> bool:
        """Sent by the original initiator of the IKE SA (§3.1 "I" flag)."""
        return bool(self.flags & C.FLAG_INITIATOR)


@attrs.frozen
class Transform:
    type: int
    id: int
    key_length: int | None = None
    #: attributes other than Key Length (type, value): none are defined; §3.3.6 says a
    #: transform with an unknown attribute makes the proposal unacceptable
    other: tuple[tuple[int, bytes], ...] = ()


@attrs.frozen
class Proposal:
    number: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]

    def of_type(self, ttype: int) -> tuple[Transform, ...]:
        return tuple(t for t in self.transforms if t.type == ttype)


@attrs.frozen
class SA:
    payload_type: ClassVar[int] = C.PT_SA
    proposals: tuple[Proposal, ...]


@attrs.frozen
class KE:
    payload_type: ClassVar[int] = C.PT_KE
    group: int
    data: bytes


@attrs.frozen
class IDi:
    payload_type: ClassVar[int] = C.PT_IDI
    id_type: int
    data: bytes


@attrs.frozen
class IDr:
    payload_type: ClassVar[int] = C.PT_IDR
    id_type: int
    data: bytes


@attrs.frozen
class Cert:
    payload_type: ClassVar[int] = C.PT_CERT
    encoding: int
    data: bytes


@attrs.frozen
class CertReq:
    payload_type: ClassVar[int] = C.PT_CERTREQ
    encoding: int
    data: bytes  # concatenated SHA-1 hashes of CA public keys (X.509)


@attrs.frozen
class Auth:
    payload_type: ClassVar[int] = C.PT_AUTH
    method: int
    data: bytes


@attrs.frozen
class Nonce:
    payload_type: ClassVar[int] = C.PT_NONCE
    data: bytes


@attrs.frozen
class Notify:
    payload_type: ClassVar[int] = C.PT_NOTIFY
    type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""

    @property
    def error(self) -> bool:
        return self.type < C.ERROR_TYPES_END


@attrs.frozen
class Delete:
    payload_type: ClassVar[int] = C.PT_DELETE
    protocol: int
    spis: tuple[bytes, ...] = ()


@attrs.frozen
class VendorID:
    payload_type: ClassVar[int] = C.PT_VENDOR
    data: bytes


@attrs.frozen
class TrafficSelector:
    """An IPv4 (type 7) or IPv6 (type 8) range: protocol 0 = any, ports 0-65535 = any."""

    ts_type: int
    protocol: int
    start_port: int
    end_port: int
    start: bytes
    end: bytes


@attrs.frozen
class TSi:
    payload_type: ClassVar[int] = C.PT_TSI
    selectors: tuple[TrafficSelector, ...]


@attrs.frozen
class TSr:
    payload_type: ClassVar[int] = C.PT_TSR
    selectors: tuple[TrafficSelector, ...]


@attrs.frozen
class SK:
    """The Encrypted payload: ``first`` names the first inner payload, ``data`` is IV ||
    ciphertext || ICV (opened by :mod:`.keys`)."""

    payload_type: ClassVar[int] = C.PT_SK
    first: int
    data: bytes


@attrs.frozen
class SKF:
    """RFC 7383 Encrypted Fragment: ``first`` is non-zero only in fragment 1."""

    payload_type: ClassVar[int] = C.PT_SKF
    first: int
    number: int
    total: int
    data: bytes


@attrs.frozen
class CfgAttribute:
    type: int
    value: bytes = b""


@attrs.frozen
class CP:
    payload_type: ClassVar[int] = C.PT_CP
    cfg_type: int
    attributes: tuple[CfgAttribute, ...] = ()


@attrs.frozen
class EAP:
    payload_type: ClassVar[int] = C.PT_EAP
    data: bytes  # one EAP message (RFC 3748 §4)


@attrs.frozen
class Unknown:
    payload_type: int
    data: bytes
    critical: bool = False


Payload = (SA | KE | IDi | IDr | Cert | CertReq | Auth | Nonce | Notify | Delete | VendorID | TSi | TSr | SK | SKF
           | CP | EAP | Unknown)

# The payload lookups are IKEv1's (they only test classes): one copy for both versions.
from narsuite.ike.isakmp import find, find_all  # noqa: E402


def notifies(payloads: Iterable[Any]) -> dict[int, Notify]:
    """Notify payloads by type (the first of each type)."""
    out: dict[int, Notify] = {}
    for p in payloads:
        if isinstance(p, Notify) and p.type not in out:
            out[p.type] = p
    return out


def ts_range(network: str, protocol: int = 0, start_port: int = 0, end_port: int = 0xFFFF) -> TrafficSelector:
    """An IPv4 selector covering ``network`` ("10.1.0.0/24" or an address)."""
    net = ipaddress.IPv4Network(network, strict=False)
    return TrafficSelector(C.TS_IPV4_ADDR_RANGE, protocol, start_port, end_port, net.network_address.packed,
                           net.broadcast_address.packed)


# --------------------------------------------------------------------------------- parse
def parse_header(data: bytes) -> Header:
    """The 28-byte header; INVALID_MAJOR_VERSION for anything but major version 2."""
    if len(data) < C.HEADER_LEN:
        raise _syntax(f"{len(data)} bytes: shorter than the IKE header")
    spi_i, spi_r, nxt, version, exch, flags, mid, length = _HEADER.unpack_from(data, 0)
    if version >> 4 != 2:
        raise IKEv2Error(C.INVALID_MAJOR_VERSION, f"major version {version >> 4}")
    if length < C.HEADER_LEN:
        raise _syntax(f"header length {length} < 28")
    return Header(spi_i, spi_r, exch, flags, mid, nxt, length, version)


def parse_message(data: bytes) -> tuple[Header, tuple[Any, ...]]:
    """Header and the payload chain; the header's length must be the datagram's."""
    h = parse_header(data)
    if h.length != len(data):
        raise _syntax(f"header says {h.length} bytes, datagram has {len(data)}")
    return h, parse_payloads(h.next_payload, data[C.HEADER_LEN:])


def _transforms(body: Buf, count: int) -> tuple[Transform, ...]:
    out = []
    pos = 0
    for i in range(count):
        if len(body) - pos < 8:
            raise _syntax("transform truncated")
        last, _r, tlen, ttype, _r2, tid = _TRANSFORM.unpack_from(body, pos)
        if tlen < 8 or pos + tlen > len(body):
            raise _syntax(f"transform length {tlen}")
        if (last == 0) != (i == count - 1) or last not in (0, 3):
            raise _syntax("transform last/more flag disagrees with the count")
        key_length = None
        other = []
        a = pos + 8
        while a < pos + tlen:
            if pos + tlen - a < 4:
                raise _syntax("transform attribute truncated")
            atype, aval = struct.unpack_from("!HH", body, a)
            if atype & 0x8000:
                if atype & 0x7FFF == C.ATTR_KEY_LENGTH:
                    key_length = aval
                else:
                    other.append((atype & 0x7FFF, aval.to_bytes(2, "big")))
                a += 4
            else:
                if a + 4 + aval > pos + tlen:
                    raise _syntax("transform attribute overruns its transform")
                other.append((atype, bytes(body[a + 4:a + 4 + aval])))
                a += 4 + aval
        out.append(Transform(ttype, tid, key_length, tuple(other)))
        pos += tlen
    if pos != len(body):
        raise _syntax("bytes after the last transform")
    return tuple(out)


def _sa(body: Buf) -> SA:
    proposals = []
    pos = 0
    while pos < len(body):
        if len(body) - pos < 8:
            raise _syntax("proposal truncated")
        last, _r, plen, num, proto, spi_size, count = _PROPOSAL.unpack_from(body, pos)
        if plen < 8 + spi_size or pos + plen > len(body):
            raise _syntax(f"proposal length {plen}")
        if last not in (0, 2) or (last == 0) != (pos + plen == len(body)):
            raise _syntax("proposal last/more flag disagrees with the payload length")
        spi = bytes(body[pos + 8:pos + 8 + spi_size])
        proposals.append(Proposal(num, proto, spi, _transforms(body[pos + 8 + spi_size:pos + plen], count)))
        pos += plen
    if not proposals:
        raise _syntax("SA payload without proposals")
    return SA(tuple(proposals))


def _selectors(body: Buf) -> tuple[TrafficSelector, ...]:
    if len(body) < 4:
        raise _syntax("TS payload truncated")
    count = body[0]
    pos = 4
    out = []
    for _ in range(count):
        if len(body) - pos < 8:
            raise _syntax("traffic selector truncated")
        ts_type, proto, slen, sport, eport = _TS.unpack_from(body, pos)
        alen = {C.TS_IPV4_ADDR_RANGE: 4, C.TS_IPV6_ADDR_RANGE: 16}.get(ts_type)
        if alen is None:
            raise IKEv2Error(C.TS_UNACCEPTABLE, f"traffic selector type {ts_type}")
        if slen != 8 + 2 * alen or pos + slen > len(body):
            raise _syntax(f"traffic selector length {slen}")
        start = bytes(body[pos + 8:pos + 8 + alen])
        end = bytes(body[pos + 8 + alen:pos + slen])
        out.append(TrafficSelector(ts_type, proto, sport, eport, start, end))
        pos += slen
    if pos != len(body) or not out:
        raise _syntax("TS payload: selector count disagrees with its length")
    return tuple(out)


def _cp(body: Buf) -> CP:
    if len(body) < 4:
        raise _syntax("CP payload truncated")
    attrs_out = []
    pos = 4
    while pos < len(body):
        if len(body) - pos < 4:
            raise _syntax("configuration attribute truncated")
        atype, alen = struct.unpack_from("!HH", body, pos)
        if pos + 4 + alen > len(body):
            raise _syntax("configuration attribute overruns the payload")
        attrs_out.append(CfgAttribute(atype & 0x7FFF, bytes(body[pos + 4:pos + 4 + alen])))
        pos += 4 + alen
    return CP(body[0], tuple(attrs_out))


def _payload(ptype: int, body: Buf, critical: bool, nxt: int) -> Any:
    n = len(body)
    if ptype == C.PT_SA:
        return _sa(body)
    if ptype == C.PT_KE:
        if n < 4:
            raise _syntax("KE payload truncated")
        return KE(int.from_bytes(body[:2], "big"), bytes(body[4:]))
    if ptype in (C.PT_IDI, C.PT_IDR):
        if n < 4:
            raise _syntax("ID payload truncated")
        return (IDi if ptype == C.PT_IDI else IDr)(body[0], bytes(body[4:]))
    if ptype in (C.PT_CERT, C.PT_CERTREQ):
        if n < 1:
            raise _syntax("CERT payload truncated")
        return (Cert if ptype == C.PT_CERT else CertReq)(body[0], bytes(body[1:]))
    if ptype == C.PT_AUTH:
        if n < 4:
            raise _syntax("AUTH payload truncated")
        return Auth(body[0], bytes(body[4:]))
    if ptype == C.PT_NONCE:
        return Nonce(bytes(body))
    if ptype == C.PT_NOTIFY:
        if n < 4:
            raise _syntax("Notify payload truncated")
        proto, spi_size, ntype = _NOTIFY.unpack_from(body, 0)
        if 4 + spi_size > n:
            raise _syntax("Notify SPI overruns the payload")
        return Notify(ntype, bytes(body[4 + spi_size:]), proto, bytes(body[4:4 + spi_size]))
    if ptype == C.PT_DELETE:
        if n < 4:
            raise _syntax("Delete payload truncated")
        proto, spi_size, count = _NOTIFY.unpack_from(body, 0)
        if n != 4 + spi_size * count or (spi_size == 0 and count):
            raise _syntax("Delete payload: SPI count disagrees with its length")
        return Delete(proto, tuple(bytes(body[4 + i * spi_size:4 + (i + 1) * spi_size]) for i in range(count)))
    if ptype == C.PT_VENDOR:
        return VendorID(bytes(body))
    if ptype in (C.PT_TSI, C.PT_TSR):
        return (TSi if ptype == C.PT_TSI else TSr)(_selectors(body))
    if ptype == C.PT_SK:
        return SK(nxt, bytes(body))
    if ptype == C.PT_SKF:
        if n < 4:
            raise _syntax("SKF payload truncated")
        number, total = struct.unpack_from("!HH", body, 0)
        if not 1 <= number <= total:
            raise _syntax(f"fragment {number} of {total}")
        return SKF(nxt, number, total, bytes(body[4:]))
    if ptype == C.PT_CP:
        return _cp(body)
    if ptype == C.PT_EAP:
        if n < 4:
            raise _syntax("EAP payload truncated")
        if int.from_bytes(body[2:4], "big") != n:
            raise _syntax("EAP length disagrees with the payload's")
        return EAP(bytes(body))
    if critical:
        raise IKEv2Error(C.UNSUPPORTED_CRITICAL_PAYLOAD, f"critical payload type {ptype}", bytes([ptype]))
    return Unknown(ptype, bytes(body), critical)


def parse_payloads(first: int, data: bytes) -> tuple[Any, ...]:
    """The payload chain starting with type ``first``.  An SK or SKF payload ends the chain
    (§3.14: it is always last); its ``first`` is the type its generic header names."""
    out = []
    nxt = first
    pos = 0
    mv = memoryview(data)
    while nxt != C.PT_NONE:
        if len(data) - pos < 4:
            raise _syntax(f"payload {nxt} truncated")
        following, flags, plen = _GENERIC.unpack_from(data, pos)
        if plen < 4 or pos + plen > len(data):
            raise _syntax(f"payload {nxt} length {plen}")
        p = _payload(nxt, mv[pos + 4:pos + plen], bool(flags & 0x80), following)
        out.append(p)
        pos += plen
        if nxt in (C.PT_SK, C.PT_SKF):
            if pos != len(data):
                raise _syntax("bytes after the Encrypted payload")
            return tuple(out)
        nxt = following
    if pos != len(data):
        raise _syntax(f"{len(data) - pos} bytes after the last payload")
    return tuple(out)


# --------------------------------------------------------------------------------- build
def _attr_bytes(t: Transform) -> bytes:
    out = b""
    if t.key_length is not None:
        out += struct.pack("!HH", 0x8000 | C.ATTR_KEY_LENGTH, t.key_length)
    for atype, value in t.other:
        out += struct.pack("!HH", atype, len(value)) + value
    return out


def _body(p: Any) -> bytes:
    if isinstance(p, SA):
        parts = []
        for i, prop in enumerate(p.proposals):
            tbytes = []
            for j, t in enumerate(prop.transforms):
                a = _attr_bytes(t)
                tbytes.append(_TRANSFORM.pack(0 if j == len(prop.transforms) - 1 else 3, 0, 8 + len(a), t.type, 0,
                                              t.id) + a)
            tb = b"".join(tbytes)
            parts.append(_PROPOSAL.pack(0 if i == len(p.proposals) - 1 else 2, 0, 8 + len(prop.spi) + len(tb),
                                        prop.number, prop.protocol, len(prop.spi), len(prop.transforms))
                         + prop.spi + tb)
        return b"".join(parts)
    if isinstance(p, KE):
        return struct.pack("!HH", p.group, 0) + p.data
    if isinstance(p, (IDi, IDr, Auth)):
        return bytes([p.id_type if not isinstance(p, Auth) else p.method, 0, 0, 0]) + p.data
    if isinstance(p, (Cert, CertReq)):
        return bytes([p.encoding]) + p.data
    if isinstance(p, (Nonce, VendorID, EAP)):
        return p.data
    if isinstance(p, Notify):
        return _NOTIFY.pack(p.protocol, len(p.spi), p.type) + p.spi + p.data
    if isinstance(p, Delete):
        size = len(p.spis[0]) if p.spis else 0
        if any(len(s) != size for s in p.spis):
            raise ValueError("Delete SPIs of different sizes")
        return _NOTIFY.pack(p.protocol, size, len(p.spis)) + b"".join(p.spis)
    if isinstance(p, (TSi, TSr)):
        out = bytes([len(p.selectors), 0, 0, 0])
        for s in p.selectors:
            out += _TS.pack(s.ts_type, s.protocol, 8 + len(s.start) + len(s.end), s.start_port, s.end_port)
            out += s.start + s.end
        return out
    if isinstance(p, CP):
        return bytes([p.cfg_type, 0, 0, 0]) + b"".join(
            struct.pack("!HH", a.type & 0x7FFF, len(a.value)) + a.value for a in p.attributes)
    if isinstance(p, SK):
        return p.data
    if isinstance(p, SKF):
        return struct.pack("!HH", p.number, p.total) + p.data
    if isinstance(p, Unknown):
        return p.data
    raise TypeError(f"not an IKEv2 payload: {p!r}")


def _next_of(p: Any) -> int:
    return p.payload_type


def build_payloads(payloads: Sequence[Any]) -> bytes:
    """The chain's bytes; each generic header names the next payload's type (SK/SKF: the
    first inner one)."""
    out = []
    for i, p in enumerate(payloads):
        body = _body(p)
        if len(body) + 4 > _MAX:
            raise ValueError(f"payload {p.payload_type} too long ({len(body)} bytes)")
        if isinstance(p, (SK, SKF)):
            nxt = p.first
        else:
            nxt = _next_of(payloads[i + 1]) if i + 1 < len(payloads) else C.PT_NONE
        flags = 0x80 if isinstance(p, Unknown) and p.critical else 0
        out.append(_GENERIC.pack(nxt, flags, 4 + len(body)) + body)
    return b"".join(out)


def build_header(h: Header, length: int) -> bytes:
    return _HEADER.pack(h.spi_i, h.spi_r, h.next_payload, h.version, h.exchange, h.flags, h.message_id, length)


def build_message(h: Header, payloads: Sequence[Any]) -> bytes:
    """Header (next payload and length filled in) and payloads."""
    body = build_payloads(payloads)
    first = payloads[0].payload_type if payloads else C.PT_NONE
    return build_header(attrs.evolve(h, next_payload=first), C.HEADER_LEN + len(body)) + body
