"""ISAKMP/IKEv1 wire codec: the header, the payload chain and every payload the ike role speaks.

Pure functions over ``bytes`` with ``struct``; no I/O, no crypto, no state.  Why our own
codec: scapy's ISAKMP layer is ~100x slower, has no NAT-D, NAT-OA, Certificate or Attribute
payloads, and mis-parses SA payloads holding several proposals with a non-zero SPI size
(every multi-proposal quick mode offer) -- see docs/ike-wire.md.

Layout (RFC 2408 3.1-3.2)::

    header (28)   ICOOKIE(8) RCOOKIE(8) NEXT(1) VERSION(1) EXCH(1) FLAGS(1) MSGID(4) LENGTH(4)
    payload       NEXT(1) RESERVED(1) LENGTH(2) body...        (LENGTH includes these 4 bytes)

Each payload names the type of the *next* one; the header names the first.  Records hold
only what carries meaning: builders compute every next-payload field, length, count and SPI
size, so a record cannot disagree with itself.  ``parse_message(build_message(h, ps))``
gives back ``ps`` and ``h`` with ``next_payload``/``length`` filled in.

Encrypted messages (FLAG_ENCRYPTION): :func:`parse_message` splits header and ciphertext and
parses nothing else (decryption is the exchange layer's job, with the phase-1 keys and IV);
after decrypting, that layer calls ``parse_payloads(header.next_payload, plaintext,
padded=True)`` because RFC 2409 pads the plaintext after the last payload.

Errors: every malformed input raises :class:`ISAKMPError` -- and nothing else -- whose
``notify`` is the RFC 2408 notify type to answer with (PAYLOAD-MALFORMED,
INVALID-MAJOR-VERSION, BAD-PROPOSAL-SYNTAX, ...).  Builders raise plain ``ValueError`` for
records that cannot be encoded (a 70000-byte payload, a 3-byte cookie): that is a bug in
the caller, not a peer to answer.

Deliberate leniencies (documented in docs/ike-wire.md): RESERVED fields are ignored on parse
and written as zero (they carry no meaning; refusing them would only cost interop);
unknown exchange types and flag bits are kept for the exchange layer to judge; payload
types the codec does not know are kept as :class:`UnknownPayload` -- the codec cannot know
which private-use types (128-255) a peer and the role have agreed on, so
:func:`require_known` is where the role turns them into INVALID-PAYLOAD-TYPE.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import ClassVar, TypeVar, Union

import attrs

from narsuite.ike import constants as C

__all__ = [
    "ISAKMPError", "Header", "Message", "Attribute", "Transform", "Proposal",
    "SecurityAssociation", "KeyExchange", "Identification", "Certificate", "CertificateRequest",
    "Hash", "Signature", "Nonce", "Notification", "Delete", "VendorID", "AttributePayload",
    "NatD", "NatOA", "UnknownPayload", "Payload", "KNOWN_PAYLOAD_CLASSES",
    "parse_header", "parse_message", "parse_payloads", "parse_attributes",
    "build_header", "build_message", "build_payloads", "build_attributes",
    "require_known", "find", "find_all",
]

_HEADER = struct.Struct("!8s8sBBBBII")
_GENERIC = struct.Struct("!BBH")
_HH = struct.Struct("!HH")
_SA = struct.Struct("!II")
_PROPOSAL = struct.Struct("!BBBB")
_TRANSFORM = struct.Struct("!BBH")
_ID = struct.Struct("!BBH")
_NOTIFY = struct.Struct("!IBBH")
_DELETE = struct.Struct("!IBBH")
_ATTRP = struct.Struct("!BBH")
_NATOA = struct.Struct("!BBH")

_AF_TV = 0x8000
_MAX_PAYLOAD = 0xFFFF


class ISAKMPError(ValueError):
    """Malformed ISAKMP input; ``notify`` is the notify message type to answer with.

    A ``ValueError`` so generic input-validation handlers catch it, but its own class so the
    exchange layer can answer (or, before a cookie is established, silently drop) with the
    right Notification instead of guessing from a message string.
    """

    def __init__(self, notify: int, detail: str, spi: bytes = b"") -> None:
        self.notify = notify
        self.detail = detail
        #: the SPI the notification names (INVALID-SPI: the offending one)
        self.spi = spi
        super().__init__(f"{C.NOTIFY_NAMES.get(notify, notify)}: {detail}")


def _err(notify: int, detail: str) -> ISAKMPError:
    return ISAKMPError(notify, detail)


# Converters for the records' tuple fields.  A bare ``converter=tuple`` leaves attrs' mypy
# plugin with an unbound element type (every caller then fails with "Iterable[_T_co]");
# these name it.
def _attributes(items: Iterable[Attribute]) -> tuple[Attribute, ...]:
    return tuple(items)


def _transforms(items: Iterable[Transform]) -> tuple[Transform, ...]:
    return tuple(items)


def _proposals(items: Iterable[Proposal]) -> tuple[Proposal, ...]:
    return tuple(items)


def _spis(items: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(items)


def _payloads(items: Iterable[Payload]) -> tuple[Payload, ...]:
    return tuple(items)


# -- records ---------------------------------------------------------------------------------

@attrs.frozen
class Header:
    """The 28-byte ISAKMP header.

    ``next_payload`` and ``length`` are ``None`` in a header given to :func:`build_message`
    when the builder should compute them; a parsed header carries the received values (an
    encrypted message needs ``next_payload`` to parse its decrypted chain).
    """

    icookie: bytes
    rcookie: bytes = bytes(8)
    exchange: int = C.EXCH_MAIN
    flags: int = 0
    message_id: int = 0
    next_payload: int | None = None
    length: int | None = None
    #: Major/minor version as one byte; parse refuses anything but 0x10.
    version: int = C.ISAKMP_VERSION

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & C.FLAG_ENCRYPTION)


@attrs.frozen
class Attribute:
    """A data attribute (RFC 2408 3.3), as used in transforms and Attribute payloads.

    The form follows the value's Python type: an ``int`` (0..65535) is the TV form (AF bit
    set), ``bytes`` is the TLV form.  Keeping the form in the record is what lets a parsed
    proposal be re-encoded byte for byte (peers differ in how they send, say, a life
    duration), and ``int_value`` reads either form when the meaning is numeric.
    """

    type: int
    value: int | bytes

    @property
    def is_tv(self) -> bool:
        return isinstance(self.value, int)

    @property
    def int_value(self) -> int:
        """The value as an unsigned integer, whichever form carried it."""
        if isinstance(self.value, int):
            return self.value
        return int.from_bytes(self.value, "big")

    @classmethod
    def of(cls, type: int, value: int) -> Attribute:
        """The shortest encoding of an integer: TV if it fits 16 bits, else a 4-byte TLV
        (8 bytes beyond 32 bits), which is what RFC 2409 expects for life durations."""
        if value < 0:
            raise ValueError(f"attribute {type}: negative value {value}")
        if value <= 0xFFFF:
            return cls(type, value)
        size = 4 if value <= 0xFFFFFFFF else (value.bit_length() + 7) // 8
        return cls(type, value.to_bytes(size, "big"))


@attrs.frozen
class Transform:
    """A Transform payload inside a proposal (RFC 2408 3.6)."""

    number: int
    transform_id: int
    attributes: tuple[Attribute, ...] = attrs.field(default=(), converter=_attributes)

    def get(self, type: int) -> Attribute | None:
        """The first attribute of ``type``, or None (attribute order carries no meaning)."""
        for a in self.attributes:
            if a.type == type:
                return a
        return None


@attrs.frozen
class Proposal:
    """A Proposal payload inside an SA (RFC 2408 3.5).

    Proposals sharing a ``number`` are one AND-ed offer (e.g. AH and ESP together); distinct
    numbers are alternatives.  The SA keeps them flat and in order; grouping is policy.
    """

    number: int
    protocol: int
    spi: bytes = b""
    transforms: tuple[Transform, ...] = attrs.field(default=(), converter=_transforms)


@attrs.frozen
class SecurityAssociation:
    """SA payload (RFC 2408 3.4) in the IPsec DOI (RFC 2407 4.6.1)."""

    payload_type: ClassVar[int] = C.PT_SA
    proposals: tuple[Proposal, ...] = attrs.field(converter=_proposals)
    doi: int = C.DOI_IPSEC
    situation: int = C.SIT_IDENTITY_ONLY


@attrs.frozen
class KeyExchange:
    """Key Exchange payload (RFC 2408 3.7): the DH public value."""

    payload_type: ClassVar[int] = C.PT_KE
    data: bytes


@attrs.frozen
class Identification:
    """Identification payload in the IPsec DOI layout (RFC 2407 4.6.2)."""

    payload_type: ClassVar[int] = C.PT_ID
    id_type: int
    data: bytes
    protocol: int = 0
    port: int = 0


@attrs.frozen
class Certificate:
    """Certificate payload (RFC 2408 3.9)."""

    payload_type: ClassVar[int] = C.PT_CERT
    encoding: int
    data: bytes


@attrs.frozen
class CertificateRequest:
    """Certificate Request payload (RFC 2408 3.10); ``authority`` may be empty."""

    payload_type: ClassVar[int] = C.PT_CR
    cert_type: int
    authority: bytes = b""


@attrs.frozen
class Hash:
    """Hash payload (RFC 2408 3.11)."""

    payload_type: ClassVar[int] = C.PT_HASH
    data: bytes


@attrs.frozen
class Signature:
    """Signature payload (RFC 2408 3.12)."""

    payload_type: ClassVar[int] = C.PT_SIG
    data: bytes


@attrs.frozen
class Nonce:
    """Nonce payload (RFC 2408 3.13)."""

    payload_type: ClassVar[int] = C.PT_NONCE
    data: bytes


@attrs.frozen
class Notification:
    """Notification payload (RFC 2408 3.14); DPD (RFC 3706) uses it with the cookies as SPI
    and a 4-byte sequence number as data."""

    payload_type: ClassVar[int] = C.PT_NOTIFY
    notify_type: int
    protocol: int = C.PROTO_ISAKMP
    spi: bytes = b""
    data: bytes = b""
    doi: int = C.DOI_IPSEC


@attrs.frozen
class Delete:
    """Delete payload (RFC 2408 3.15).

    ``spi_size`` is explicit because a Delete may carry zero SPIs; the builder refuses SPIs
    of another size.
    """

    payload_type: ClassVar[int] = C.PT_DELETE
    protocol: int
    spi_size: int
    spis: tuple[bytes, ...] = attrs.field(default=(), converter=_spis)
    doi: int = C.DOI_IPSEC


@attrs.frozen
class VendorID:
    """Vendor ID payload (RFC 2408 3.16): how NAT-T, DPD, XAUTH... are announced."""

    payload_type: ClassVar[int] = C.PT_VENDOR_ID
    data: bytes


@attrs.frozen
class AttributePayload:
    """Attribute payload (mode-config draft 3.2): mode-config and XAUTH exchanges.

    ``cfg_type`` is CFG_REQUEST/REPLY/SET/ACK; ``identifier`` pairs a reply with its request.
    """

    payload_type: ClassVar[int] = C.PT_ATTRIBUTE
    cfg_type: int
    identifier: int = 0
    attributes: tuple[Attribute, ...] = attrs.field(default=(), converter=_attributes)

    def get(self, type: int) -> Attribute | None:
        for a in self.attributes:
            if a.type == type:
                return a
        return None


def _nat_type(allowed: tuple[int, int]):
    def check(inst: object, attribute: attrs.Attribute, value: int) -> None:
        if value not in allowed:
            raise ValueError(f"{type(inst).__name__}.payload_type must be one of {allowed}, not {value}")
    return check


@attrs.frozen
class NatD:
    """NAT-D payload (RFC 3947 3.2): a hash of an address and port.

    ``payload_type`` is 20 (RFC) or 130 (drafts 01-03 and the 004 draft): the number a peer
    used is part of what it negotiated, so it travels with the record.
    """

    hash: bytes
    payload_type: int = attrs.field(default=C.PT_NAT_D, validator=_nat_type((C.PT_NAT_D, C.PT_NAT_D_DRAFT)))


@attrs.frozen
class NatOA:
    """NAT-OA payload (RFC 3947 5.1): the original address seen by the sender.

    ``id_type`` is ID_IPV4_ADDR (4-byte address) or ID_IPV6_ADDR (16 bytes);
    ``payload_type`` 21 (RFC) or 131 (drafts).
    """

    id_type: int
    address: bytes
    payload_type: int = attrs.field(default=C.PT_NAT_OA, validator=_nat_type((C.PT_NAT_OA, C.PT_NAT_OA_DRAFT)))


@attrs.frozen
class UnknownPayload:
    """A payload whose type this codec does not interpret: kept whole so the exchange layer
    can decide (answer INVALID-PAYLOAD-TYPE via :func:`require_known`, or ignore it).

    Building one with a known type writes ``body`` verbatim, which is how tests craft
    deliberately broken payloads.
    """

    payload_type: int
    body: bytes = b""


Payload = Union[
    SecurityAssociation, KeyExchange, Identification, Certificate, CertificateRequest, Hash,
    Signature, Nonce, Notification, Delete, VendorID, AttributePayload, NatD, NatOA,
    UnknownPayload,
]

#: Classes whose payloads the codec interprets (everything but UnknownPayload).
KNOWN_PAYLOAD_CLASSES = (
    SecurityAssociation, KeyExchange, Identification, Certificate, CertificateRequest, Hash,
    Signature, Nonce, Notification, Delete, VendorID, AttributePayload, NatD, NatOA,
)


@attrs.frozen
class Message:
    """A parsed message: the header and either the payloads or, when encrypted, the
    ciphertext (the bytes after the header up to ``header.length``)."""

    header: Header
    payloads: tuple[Payload, ...] = attrs.field(default=(), converter=_payloads)
    ciphertext: bytes | None = None


# -- parsing ---------------------------------------------------------------------------------

def parse_header(data: bytes) -> Header:
    """Parse and check the 28-byte header at the start of ``data``.

    Checks what RFC 2408 5.2 makes a header error regardless of state: the version
    (INVALID-MAJOR-VERSION for an IKEv2 packet, INVALID-MINOR-VERSION) and a length that
    cannot even hold the header.  Whether ``length`` matches the datagram is
    :func:`parse_message`'s business, so this also serves to peek at the first bytes.
    """
    if len(data) < C.HEADER_LEN:
        raise _err(C.PAYLOAD_MALFORMED, f"message of {len(data)} bytes is shorter than the 28-byte header")
    icookie, rcookie, nxt, version, exch, flags, mid, length = _HEADER.unpack_from(data, 0)
    if version >> 4 != 1:
        raise _err(C.INVALID_MAJOR_VERSION, f"major version {version >> 4}")
    if version & 0x0F != 0:
        raise _err(C.INVALID_MINOR_VERSION, f"minor version {version & 0x0F}")
    if length < C.HEADER_LEN:
        raise _err(C.PAYLOAD_MALFORMED, f"header length {length} < 28")
    return Header(icookie, rcookie, exch, flags, mid, nxt, length, version)


def parse_message(data: bytes) -> Message:
    """Parse a whole message (the UDP payload, non-ESP marker already stripped).

    ``header.length`` larger than ``data`` is UNEQUAL-PAYLOAD-LENGTHS; bytes beyond
    ``header.length`` are ignored (they are outside the message by definition, and some
    stacks pad datagrams).  An encrypted message comes back with ``ciphertext`` set and no
    payloads.  A plaintext chain must end exactly at ``header.length``.
    """
    header = parse_header(data)
    length, first = header.length, header.next_payload
    assert length is not None and first is not None  # parse_header sets both
    if length > len(data):
        raise _err(C.UNEQUAL_PAYLOAD_LENGTHS, f"header length {length} > datagram {len(data)}")
    body = bytes(data[C.HEADER_LEN:length])
    if header.flags & C.FLAG_ENCRYPTION:
        return Message(header, (), body)
    return Message(header, parse_payloads(first, body))


def parse_payloads(first_type: int, data: bytes, *, padded: bool = False) -> tuple[Payload, ...]:
    """Parse a payload chain whose first payload has type ``first_type``.

    ``padded=True`` accepts bytes after the last payload (next payload 0): the encryption
    padding of RFC 2409 appendix B.  Without it they are PAYLOAD-MALFORMED.  A Proposal or
    Transform payload outside an SA is INVALID-PAYLOAD-TYPE.
    """
    data = bytes(data)
    out: list[Payload] = []
    nxt, off, end = first_type, 0, len(data)
    while nxt != C.PT_NONE:
        if off + 4 > end:
            raise _err(C.PAYLOAD_MALFORMED, f"payload {nxt} header truncated at offset {off}")
        following, _reserved, length = _GENERIC.unpack_from(data, off)
        if length < 4 or off + length > end:
            raise _err(C.PAYLOAD_MALFORMED, f"payload {nxt} at offset {off}: length {length}, {end - off} bytes left")
        out.append(_parse_body(nxt, data[off + 4:off + length]))
        off += length
        nxt = following
    if off != end and not padded:
        raise _err(C.PAYLOAD_MALFORMED, f"{end - off} bytes after the last payload")
    return tuple(out)


def parse_attributes(data: bytes, notify: int = C.PAYLOAD_MALFORMED) -> tuple[Attribute, ...]:
    """Parse a run of data attributes filling ``data`` exactly; errors carry ``notify``."""
    out: list[Attribute] = []
    off, end = 0, len(data)
    while off < end:
        if off + 4 > end:
            raise _err(notify, f"attribute truncated at offset {off}")
        t, v = _HH.unpack_from(data, off)
        if t & _AF_TV:
            out.append(Attribute(t & 0x7FFF, v))
            off += 4
        else:
            if off + 4 + v > end:
                raise _err(notify, f"attribute {t}: TLV length {v}, {end - off - 4} bytes left")
            out.append(Attribute(t, bytes(data[off + 4:off + 4 + v])))
            off += 4 + v
    return tuple(out)


def _parse_sa(body: bytes) -> SecurityAssociation:
    if len(body) < 8:
        raise _err(C.PAYLOAD_MALFORMED, f"SA body of {len(body)} bytes")
    doi, situation = _SA.unpack_from(body, 0)
    if doi != C.DOI_IPSEC:
        raise _err(C.DOI_NOT_SUPPORTED, f"SA DOI {doi}")
    if situation & ~C.SIT_IDENTITY_ONLY:
        # Secrecy/integrity situations append labelled-domain data nobody implements.
        raise _err(C.SITUATION_NOT_SUPPORTED, f"situation {situation:#x}")
    proposals: list[Proposal] = []
    off, end = 8, len(body)
    while True:
        if off + 8 > end:
            raise _err(C.BAD_PROPOSAL_SYNTAX, f"proposal header truncated at offset {off}")
        following, _r, length = _GENERIC.unpack_from(body, off)
        number, protocol, spi_size, count = _PROPOSAL.unpack_from(body, off + 4)
        if length < 8 + spi_size or off + length > end:
            raise _err(C.BAD_PROPOSAL_SYNTAX, f"proposal {number}: length {length}, SPI size {spi_size}")
        spi = body[off + 8:off + 8 + spi_size]
        transforms = _parse_transforms(body[off + 8 + spi_size:off + length], number)
        if len(transforms) != count:
            raise _err(C.BAD_PROPOSAL_SYNTAX,
                       f"proposal {number}: {count} transforms announced, {len(transforms)} present")
        proposals.append(Proposal(number, protocol, spi, transforms))
        off += length
        if following == C.PT_NONE:
            break
        if following != C.PT_PROPOSAL:
            raise _err(C.BAD_PROPOSAL_SYNTAX, f"proposal {number}: next payload {following}")
    if off != end:
        raise _err(C.BAD_PROPOSAL_SYNTAX, f"{end - off} bytes after the last proposal")
    return SecurityAssociation(tuple(proposals), doi, situation)


def _parse_transforms(data: bytes, proposal: int) -> tuple[Transform, ...]:
    out: list[Transform] = []
    off, end = 0, len(data)
    if end == 0:
        raise _err(C.BAD_PROPOSAL_SYNTAX, f"proposal {proposal} has no transform")
    while True:
        if off + 8 > end:
            raise _err(C.BAD_PROPOSAL_SYNTAX, f"proposal {proposal}: transform header truncated")
        following, _r, length = _GENERIC.unpack_from(data, off)
        number, tid, _r2 = _TRANSFORM.unpack_from(data, off + 4)
        if length < 8 or off + length > end:
            raise _err(C.BAD_PROPOSAL_SYNTAX, f"proposal {proposal} transform {number}: length {length}")
        attributes = parse_attributes(data[off + 8:off + length], C.BAD_PROPOSAL_SYNTAX)
        out.append(Transform(number, tid, attributes))
        off += length
        if following == C.PT_NONE:
            break
        if following != C.PT_TRANSFORM:
            raise _err(C.BAD_PROPOSAL_SYNTAX, f"proposal {proposal} transform {number}: next payload {following}")
    if off != end:
        raise _err(C.BAD_PROPOSAL_SYNTAX, f"proposal {proposal}: {end - off} bytes after the last transform")
    return tuple(out)


def _parse_id(body: bytes) -> Identification:
    if len(body) < 4:
        raise _err(C.PAYLOAD_MALFORMED, f"ID body of {len(body)} bytes")
    id_type, protocol, port = _ID.unpack_from(body, 0)
    data = body[4:]
    want = C.ID_FIXED_LENGTHS.get(id_type)
    if want is not None and len(data) != want:
        raise _err(C.INVALID_ID_INFORMATION, f"ID type {id_type} with {len(data)} bytes, not {want}")
    return Identification(id_type, data, protocol, port)


def _parse_notify(body: bytes) -> Notification:
    if len(body) < 8:
        raise _err(C.PAYLOAD_MALFORMED, f"notification body of {len(body)} bytes")
    doi, protocol, spi_size, ntype = _NOTIFY.unpack_from(body, 0)
    if 8 + spi_size > len(body):
        raise _err(C.PAYLOAD_MALFORMED, f"notification SPI size {spi_size}, {len(body) - 8} bytes left")
    return Notification(ntype, protocol, body[8:8 + spi_size], body[8 + spi_size:], doi)


def _parse_delete(body: bytes) -> Delete:
    if len(body) < 8:
        raise _err(C.PAYLOAD_MALFORMED, f"delete body of {len(body)} bytes")
    doi, protocol, spi_size, count = _DELETE.unpack_from(body, 0)
    if len(body) - 8 != spi_size * count:
        raise _err(C.PAYLOAD_MALFORMED, f"delete: {count} SPIs of {spi_size} bytes in {len(body) - 8} bytes")
    spis = tuple(body[8 + i * spi_size:8 + (i + 1) * spi_size] for i in range(count))
    return Delete(protocol, spi_size, spis, doi)


def _parse_attribute_payload(body: bytes) -> AttributePayload:
    if len(body) < 4:
        raise _err(C.PAYLOAD_MALFORMED, f"attribute payload body of {len(body)} bytes")
    cfg_type, _r, identifier = _ATTRP.unpack_from(body, 0)
    return AttributePayload(cfg_type, identifier, parse_attributes(body[4:]))


def _parse_nat_oa(ptype: int, body: bytes) -> NatOA:
    if len(body) < 4:
        raise _err(C.PAYLOAD_MALFORMED, f"NAT-OA body of {len(body)} bytes")
    id_type = body[0]
    address = body[4:]
    want = {C.ID_IPV4_ADDR: 4, C.ID_IPV6_ADDR: 16}.get(id_type)
    if want is not None and len(address) != want:
        raise _err(C.PAYLOAD_MALFORMED, f"NAT-OA ID type {id_type} with {len(address)} bytes")
    return NatOA(id_type, address, ptype)


def _one_byte_then(body: bytes, what: str) -> tuple[int, bytes]:
    if len(body) < 1:
        raise _err(C.PAYLOAD_MALFORMED, f"empty {what} payload")
    return body[0], body[1:]


def _parse_body(ptype: int, body: bytes) -> Payload:
    if ptype == C.PT_SA:
        return _parse_sa(body)
    if ptype == C.PT_KE:
        return KeyExchange(body)
    if ptype == C.PT_ID:
        return _parse_id(body)
    if ptype == C.PT_CERT:
        return Certificate(*_one_byte_then(body, "certificate"))
    if ptype == C.PT_CR:
        return CertificateRequest(*_one_byte_then(body, "certificate request"))
    if ptype == C.PT_HASH:
        return Hash(body)
    if ptype == C.PT_SIG:
        return Signature(body)
    if ptype == C.PT_NONCE:
        return Nonce(body)
    if ptype == C.PT_NOTIFY:
        return _parse_notify(body)
    if ptype == C.PT_DELETE:
        return _parse_delete(body)
    if ptype == C.PT_VENDOR_ID:
        return VendorID(body)
    if ptype == C.PT_ATTRIBUTE:
        return _parse_attribute_payload(body)
    if ptype in (C.PT_NAT_D, C.PT_NAT_D_DRAFT):
        return NatD(body, ptype)
    if ptype in (C.PT_NAT_OA, C.PT_NAT_OA_DRAFT):
        return _parse_nat_oa(ptype, body)
    if ptype in (C.PT_PROPOSAL, C.PT_TRANSFORM):
        raise _err(C.INVALID_PAYLOAD_TYPE, f"payload type {ptype} outside an SA payload")
    return UnknownPayload(ptype, body)


# -- building --------------------------------------------------------------------------------

def build_attributes(attributes: Iterable[Attribute]) -> bytes:
    """Encode data attributes: TV for ``int`` values, TLV for ``bytes``."""
    parts: list[bytes] = []
    for a in attributes:
        if not 0 <= a.type <= 0x7FFF:
            raise ValueError(f"attribute type {a.type} does not fit 15 bits")
        if isinstance(a.value, int):
            if not 0 <= a.value <= 0xFFFF:
                raise ValueError(f"attribute {a.type}: TV value {a.value} does not fit 16 bits (use bytes)")
            parts.append(_HH.pack(a.type | _AF_TV, a.value))
        else:
            if len(a.value) > 0xFFFF:
                raise ValueError(f"attribute {a.type}: {len(a.value)}-byte value")
            parts.append(_HH.pack(a.type, len(a.value)) + bytes(a.value))
    return b"".join(parts)


def _chain(items: Sequence[tuple[int, bytes]]) -> bytes:
    """Join (type, body) pairs with generic headers, each naming the following type."""
    parts: list[bytes] = []
    for i, (_ptype, body) in enumerate(items):
        following = items[i + 1][0] if i + 1 < len(items) else C.PT_NONE
        length = len(body) + 4
        if length > _MAX_PAYLOAD:
            raise ValueError(f"payload of {length} bytes exceeds 65535")
        parts.append(_GENERIC.pack(following, 0, length) + body)
    return b"".join(parts)


def _build_sa(sa: SecurityAssociation) -> bytes:
    props: list[tuple[int, bytes]] = []
    for p in sa.proposals:
        transforms = _chain([
            (C.PT_TRANSFORM, _TRANSFORM.pack(t.number, t.transform_id, 0) + build_attributes(t.attributes))
            for t in p.transforms
        ])
        props.append((C.PT_PROPOSAL, _PROPOSAL.pack(p.number, p.protocol, len(p.spi), len(p.transforms))
                      + bytes(p.spi) + transforms))
    return _SA.pack(sa.doi, sa.situation) + _chain(props)


def _build_body(p: Payload) -> bytes:
    if isinstance(p, SecurityAssociation):
        return _build_sa(p)
    if isinstance(p, (KeyExchange, Hash, Signature, Nonce, VendorID)):
        return bytes(p.data)
    if isinstance(p, Identification):
        return _ID.pack(p.id_type, p.protocol, p.port) + bytes(p.data)
    if isinstance(p, Certificate):
        return bytes((p.encoding,)) + bytes(p.data)
    if isinstance(p, CertificateRequest):
        return bytes((p.cert_type,)) + bytes(p.authority)
    if isinstance(p, Notification):
        return _NOTIFY.pack(p.doi, p.protocol, len(p.spi), p.notify_type) + bytes(p.spi) + bytes(p.data)
    if isinstance(p, Delete):
        if any(len(s) != p.spi_size for s in p.spis):
            raise ValueError(f"delete: SPIs must all be {p.spi_size} bytes")
        return _DELETE.pack(p.doi, p.protocol, p.spi_size, len(p.spis)) + b"".join(p.spis)
    if isinstance(p, AttributePayload):
        return _ATTRP.pack(p.cfg_type, 0, p.identifier) + build_attributes(p.attributes)
    if isinstance(p, NatD):
        return bytes(p.hash)
    if isinstance(p, NatOA):
        return _NATOA.pack(p.id_type, 0, 0) + bytes(p.address)
    if isinstance(p, UnknownPayload):
        return bytes(p.body)
    raise TypeError(f"not an ISAKMP payload record: {p!r}")


def build_payloads(payloads: Iterable[Payload]) -> bytes:
    """Encode a payload chain; the first payload's type goes in the header (or in whatever
    precedes the chain), i.e. ``payloads[0].payload_type``."""
    try:
        return _chain([(p.payload_type, _build_body(p)) for p in payloads])
    except struct.error as exc:
        raise ValueError(f"cannot encode payload: {exc}") from exc


def build_header(header: Header, body_length: int, first_type: int = C.PT_NONE) -> bytes:
    """Encode the header for a body of ``body_length`` bytes.

    ``header.next_payload``/``header.length`` are used verbatim when set (for crafting
    broken messages); otherwise ``first_type`` and ``28 + body_length``.
    """
    if len(header.icookie) != 8 or len(header.rcookie) != 8:
        raise ValueError("cookies must be 8 bytes")
    nxt = first_type if header.next_payload is None else header.next_payload
    length = C.HEADER_LEN + body_length if header.length is None else header.length
    try:
        return _HEADER.pack(header.icookie, header.rcookie, nxt, header.version, header.exchange,
                            header.flags, header.message_id, length)
    except struct.error as exc:
        raise ValueError(f"cannot encode header: {exc}") from exc


def build_message(header: Header, payloads: Iterable[Payload] = (), *, ciphertext: bytes | None = None) -> bytes:
    """Encode a message: header + payload chain, or header + ``ciphertext``.

    With ``ciphertext`` the caller has already encoded, padded and encrypted the chain and
    must set ``header.next_payload`` to the type of its first payload (and FLAG_ENCRYPTION);
    ``payloads`` must then be empty.
    """
    payloads = tuple(payloads)
    if ciphertext is not None:
        if payloads:
            raise ValueError("give either payloads or ciphertext")
        if header.next_payload is None:
            raise ValueError("an encrypted message needs header.next_payload")
        return build_header(header, len(ciphertext)) + bytes(ciphertext)
    body = build_payloads(payloads)
    first = payloads[0].payload_type if payloads else C.PT_NONE
    return build_header(header, len(body), first) + body


# -- helpers for the exchange layer ----------------------------------------------------------

P = TypeVar("P")


def find(payloads: Iterable[Payload], cls: type[P]) -> P | None:
    """The first payload of class ``cls``, or None."""
    for p in payloads:
        if isinstance(p, cls):
            return p
    return None


def find_all(payloads: Iterable[Payload], cls: type[P]) -> list[P]:
    """All payloads of class ``cls``, in order (vendor IDs, notifications, NAT-D...)."""
    return [p for p in payloads if isinstance(p, cls)]


def require_known(payloads: Iterable[Payload], allow: Iterable[int] = ()) -> None:
    """Raise INVALID-PAYLOAD-TYPE (RFC 2408 5.3) for the first UnknownPayload whose type is
    not in ``allow`` -- the place where the role applies RFC 2408's rule, after deciding
    which private-use payloads it tolerates."""
    allowed = frozenset(allow)
    for p in payloads:
        if isinstance(p, UnknownPayload) and p.payload_type not in allowed:
            raise _err(C.INVALID_PAYLOAD_TYPE, f"payload type {p.payload_type}")
