"""Mobile IPv4 wire codec: registration messages, their extensions, RFC 3519 tunnel data.

Pure functions over bytes, no I/O, no scapy (it is ~100 times slower and has no
extensions).  Everything the mipproxy role reads or writes on UDP 434 goes through here::

    Registration Request (RFC 5944 3.3)        Registration Reply (RFC 5944 3.4)
      type=1 |S B D M G r T x| lifetime(2)       type=3 | code | lifetime(2)
      home address | home agent | care-of        home address | home agent
      identification(8) | extensions...          identification(8) | extensions...

    MIP tunnel data (RFC 3519 3.3): type=4 | next header | reserved(2) | tunnelled packet

Extensions are Type-Length-Value with a one-byte Length that excludes Type and
Length (RFC 5944 1.9).  Types 0-127 are *non-skippable*: a message carrying one we
do not know cannot be processed; types 128-255 are *skippable* and are kept as
:class:`UnknownExtension` so a relay can pass them on.  RFC 5944 also defines a
"long" format (Type, Sub-Type, 16-bit Length) used by some non-skippable types we
do not implement (36 generalized authentication, 38 CVSE): they are refused as
unknown non-skippable extensions, which is also the only safe answer because we
could not find where they end.

Errors: decoding never raises anything but :class:`MIPError`, whose ``code`` is the
registration reply code to answer with (None: drop silently) and whose ``header``
is the fixed part that was parsed, when there is one, so the caller can address
the denial (home address, home agent, identification).  Encoding a record with
out-of-range fields raises plain ``ValueError``: that is a programming error.

The draft behind the role (draft-adrangi-mobileip-vpn-traversal-02) never got
numbers for its HA Parameter extension nor, from IANA, for its reply codes
200-206; they live in :class:`DraftNumbers` (defaults documented in
docs/mip-wire.md) and are passed in, never hard-wired.
"""

from __future__ import annotations

import hmac
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Union

import attrs

__all__ = [
    "MIP_PORT", "MSG_REGISTRATION_REQUEST", "MSG_REGISTRATION_REPLY", "MSG_TUNNEL_DATA",
    "REQUEST_LEN", "REPLY_LEN", "TUNNEL_HEADER_LEN",
    "FLAG_S", "FLAG_B", "FLAG_D", "FLAG_M", "FLAG_G", "FLAG_R", "FLAG_T", "FLAG_X",
    "NEXT_HEADER_IPIP", "NEXT_HEADER_GRE", "NEXT_HEADER_MINIMAL", "NEXT_HEADERS",
    "EXT_MN_HA_AUTH", "EXT_MN_FA_AUTH", "EXT_FA_HA_AUTH", "AUTH_TYPES",
    "EXT_UDP_TUNNEL_REPLY", "EXT_ENCAP_DELIVERY", "EXT_NAI", "EXT_UDP_TUNNEL_REQUEST",
    "UDP_TUNNEL_F", "UDP_TUNNEL_R", "UDP_TUNNEL_REPLY_F",
    "UDP_TUNNEL_ACCEPTED", "UDP_TUNNEL_DECLINED",
    "RESERVED_SPI_MAX", "HMAC_MD5_LEN",
    "REPLY_CODE_NAMES", "reply_code_name",
    "MIPError", "DraftNumbers", "DEFAULT_NUMBERS",
    "AuthExtension", "NAIExtension", "UDPTunnelRequest", "UDPTunnelReply",
    "EncapsulatingDeliveryStyle", "HAParameterExtension", "UnknownExtension", "Extension",
    "RegistrationRequest", "RegistrationReply", "TunnelData", "Message",
    "decode_message", "decode_request", "decode_reply", "decode_tunnel_data",
    "encode_message", "encode_request", "encode_reply", "encode_tunnel_data",
    "encode_extension", "encode_extensions", "pack_request", "pack_reply",
    "split_extensions", "decode_extensions", "raw_extension", "find_auth", "auth_header",
    "AuthKey",
    "authenticated_extensions", "compute_authenticator",
    "add_auth", "add_mn_ha_auth", "verify_auth", "verify_mn_ha_auth", "verify_fa_ha_auth",
]

#: Well-known port of Mobile IP signalling, and of RFC 3519 UDP-tunnelled data.
MIP_PORT = 434

MSG_REGISTRATION_REQUEST = 1
MSG_REGISTRATION_REPLY = 3
MSG_TUNNEL_DATA = 4  # RFC 3519

REQUEST_LEN = 24
REPLY_LEN = 20
TUNNEL_HEADER_LEN = 4

# Registration Request flags (RFC 5944 3.3; T from RFC 3024).  r and x are
# reserved: sent as zero, ignored on receipt -- but kept in ``flags`` so a relay
# can copy them (the draft, 2.2.1, lets the proxy keep "rsv" bits).
FLAG_S = 0x80  # simultaneous bindings
FLAG_B = 0x40  # broadcast datagrams
FLAG_D = 0x20  # decapsulation by the mobile node (co-located care-of address)
FLAG_M = 0x10  # minimal encapsulation
FLAG_G = 0x08  # GRE encapsulation
FLAG_R = 0x04  # reserved ("r")
FLAG_T = 0x02  # reverse tunnelling requested (RFC 3024)
FLAG_X = 0x01  # reserved ("x")

# RFC 3519 tunnel data "next header" (IP protocol numbers of what follows).
NEXT_HEADER_IPIP = 4
NEXT_HEADER_GRE = 47
NEXT_HEADER_MINIMAL = 55
NEXT_HEADERS = frozenset({NEXT_HEADER_IPIP, NEXT_HEADER_GRE, NEXT_HEADER_MINIMAL})

# Extension types (IANA "Mobile IPv4 Numbers").
EXT_MN_HA_AUTH = 32  # Mobile-Home Authentication (RFC 5944 3.5.2)
EXT_MN_FA_AUTH = 33  # Mobile-Foreign Authentication (RFC 5944 3.5.3)
EXT_FA_HA_AUTH = 34  # Foreign-Home Authentication (RFC 5944 3.5.4)
AUTH_TYPES = frozenset({EXT_MN_HA_AUTH, EXT_MN_FA_AUTH, EXT_FA_HA_AUTH})
EXT_UDP_TUNNEL_REPLY = 44  # RFC 3519 3.2 (non-skippable: a reply the MN must understand)
EXT_ENCAP_DELIVERY = 130  # Encapsulating Delivery Style (RFC 3024)
EXT_NAI = 131  # Mobile Node NAI (RFC 2794)
EXT_UDP_TUNNEL_REQUEST = 144  # RFC 3519 3.1 (skippable: an HA without NAT-T ignores it)

# UDP Tunnel Request flags (one byte) and Reply flags (16 bits, F on top).
UDP_TUNNEL_F = 0x80  # Force: tunnel over UDP even if no NAT is detected
UDP_TUNNEL_R = 0x40  # Registration through the FA required
UDP_TUNNEL_REPLY_F = 0x8000  # Forced: the HA tunnels over UDP because F was set
UDP_TUNNEL_ACCEPTED = 0  # UDP Tunnel Reply code: will do tunnelling
UDP_TUNNEL_DECLINED = 64  # UDP Tunnel Reply code: tunnelling declined, reason unspecified

#: SPIs 0..255 are reserved (RFC 5944 3.5.1): never valid in a security association.
RESERVED_SPI_MAX = 255
#: Authenticator length of the default algorithm, HMAC-MD5 (RFC 5944 3.5.1).
HMAC_MD5_LEN = 16

# -- registration reply codes ---------------------------------------------------------------

REG_ACCEPTED = 0
REG_ACCEPTED_NO_SIMULTANEOUS = 1
# Denied by the foreign agent (the proxy answers these when it relays like an FA).
REG_FA_UNSPECIFIED = 64
REG_FA_ADMIN_PROHIBITED = 65
REG_FA_INSUFFICIENT_RESOURCES = 66
REG_FA_MN_FAILED_AUTH = 67
REG_FA_HA_FAILED_AUTH = 68
REG_FA_LIFETIME_TOO_LONG = 69
REG_FA_POORLY_FORMED_REQUEST = 70
REG_FA_POORLY_FORMED_REPLY = 71
REG_FA_ENCAPSULATION_UNAVAILABLE = 72
REG_FA_VJ_UNAVAILABLE = 73
REG_FA_REVERSE_TUNNEL_UNAVAILABLE = 74  # RFC 3024
REG_FA_REVERSE_TUNNEL_MANDATORY = 75  # RFC 3024: T bit not set
REG_FA_MN_TOO_DISTANT = 76  # RFC 3024
REG_FA_INVALID_COA = 77
REG_FA_TIMEOUT = 78
REG_FA_DELIVERY_STYLE_UNSUPPORTED = 79  # RFC 3024
REG_FA_HOME_NETWORK_UNREACHABLE = 80
REG_FA_HA_HOST_UNREACHABLE = 81
REG_FA_HA_PORT_UNREACHABLE = 82
REG_FA_HA_UNREACHABLE = 88
REG_FA_NONZERO_HOME_ADDRESS_REQUIRED = 96  # RFC 2794
REG_FA_MISSING_NAI = 97  # RFC 2794
REG_FA_MISSING_HOME_AGENT = 98  # RFC 2794
REG_FA_MISSING_HOME_ADDRESS = 99  # RFC 2794
# Denied by the home agent (the proxy is the mobile node's surrogate home agent).
REG_HA_UNSPECIFIED = 128
REG_HA_ADMIN_PROHIBITED = 129
REG_HA_INSUFFICIENT_RESOURCES = 130
REG_HA_MN_FAILED_AUTH = 131
REG_HA_FA_FAILED_AUTH = 132
REG_HA_IDENTIFICATION_MISMATCH = 133
REG_HA_POORLY_FORMED_REQUEST = 134
REG_HA_TOO_MANY_BINDINGS = 135
REG_HA_UNKNOWN_HA_ADDRESS = 136
REG_HA_REVERSE_TUNNEL_UNAVAILABLE = 137  # RFC 3024
REG_HA_REVERSE_TUNNEL_MANDATORY = 138  # RFC 3024: T bit not set
REG_HA_ENCAPSULATION_UNAVAILABLE = 139  # RFC 3024
REG_HA_UDP_ENCAPSULATION_UNAVAILABLE = 142  # RFC 3519

#: code -> name, for logs and narctl.  The draft's codes come from DraftNumbers.
REPLY_CODE_NAMES: dict[int, str] = {
    value: name[4:].lower().replace("_", "-")
    for name, value in list(globals().items())
    if name.startswith("REG_") and isinstance(value, int)
}

__all__ += [n for n in list(globals()) if n.startswith("REG_")]

_REQ = struct.Struct("!BBH4s4s4sQ")
_REP = struct.Struct("!BBH4s4sQ")
_TUN = struct.Struct("!BBH")
_TL = struct.Struct("!BB")
_TLI = struct.Struct("!BBI")
_I = struct.Struct("!I")
_UTRQ = struct.Struct("!BBBBH")
_UTRP = struct.Struct("!BBHH")
_HAP = struct.Struct("!BB4s")


class MIPError(ValueError):
    """Input that cannot be processed.

    ``code`` is the registration reply code to answer with, or None when the
    message must just be dropped (too short to answer, not a message we handle,
    a reply we cannot relay).  ``header`` is the fixed part parsed before the
    problem (a request or reply with no extensions), or None.
    """

    def __init__(
        self,
        reason: str,
        code: int | None = None,
        header: RegistrationRequest | RegistrationReply | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.header = header


def _uint(bits: int) -> Callable[[object, attrs.Attribute, int], None]:
    """attrs validator: an unsigned integer that fits ``bits`` bits."""
    limit = 1 << bits

    def check(_inst: object, attr: attrs.Attribute, value: int) -> None:
        if type(value) is int and 0 <= value < limit:  # the common case, one test
            return
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
            raise ValueError(f"{attr.name} must be an integer in 0..{limit - 1}, not {value!r}")

    return check


@attrs.frozen
class DraftNumbers:
    """The numbers draft-adrangi-mobileip-vpn-traversal-02 left "to be assigned".

    One place, so the role's config can override every one of them.  Defaults:
    the HA Parameter extension is non-skippable (the draft says so, 2.5.3) and
    takes type 127, the top of the non-skippable range, far from the low numbers
    IANA assigns from; the reply codes keep the draft's own values 200-206 (2.4.1)
    so an MN built from the draft understands them.  See docs/mip-wire.md.
    """

    ha_parameter_type: int = attrs.field(default=127, validator=_uint(8))
    ha_parameter_subtype: int = attrs.field(default=0, validator=_uint(8))
    missing_ha_parameter: int = attrs.field(default=200, validator=_uint(8))
    nonzero_ha_required: int = attrs.field(default=201, validator=_uint(8))
    ha_unreachable: int = attrs.field(default=202, validator=_uint(8))
    missing_nai: int = attrs.field(default=203, validator=_uint(8))
    missing_home_address: int = attrs.field(default=204, validator=_uint(8))
    missing_home_agent: int = attrs.field(default=205, validator=_uint(8))
    assigned_home_agent: int = attrs.field(default=206, validator=_uint(8))

    def __attrs_post_init__(self) -> None:
        taken = AUTH_TYPES | {EXT_UDP_TUNNEL_REPLY, EXT_ENCAP_DELIVERY, EXT_NAI,
                              EXT_UDP_TUNNEL_REQUEST}
        if self.ha_parameter_type in taken:
            raise ValueError(
                f"ha_parameter_type {self.ha_parameter_type} is already a known extension type")
        codes = self.codes()
        if len(set(codes.values())) != len(codes):
            raise ValueError(f"draft reply codes must be distinct: {codes}")
        clash = {c for c in codes.values() if c in REPLY_CODE_NAMES}
        if clash:
            raise ValueError(f"draft reply codes {sorted(clash)} clash with RFC reply codes")

    def codes(self) -> dict[str, int]:
        """The draft's reply codes by name (section 2.4.1)."""
        return {
            "missing-ha-parameter": self.missing_ha_parameter,
            "nonzero-ha-required": self.nonzero_ha_required,
            "ha-unreachable": self.ha_unreachable,
            "missing-nai": self.missing_nai,
            "missing-home-address": self.missing_home_address,
            "missing-home-agent": self.missing_home_agent,
            "assigned-home-agent": self.assigned_home_agent,
        }


DEFAULT_NUMBERS = DraftNumbers()


def reply_code_name(code: int, numbers: DraftNumbers = DEFAULT_NUMBERS) -> str:
    """A readable name for a reply code (RFC or draft), for logs; never raises."""
    name = REPLY_CODE_NAMES.get(code)
    if name is not None:
        return name
    for draft_name, value in numbers.codes().items():
        if value == code:
            return "draft-" + draft_name
    if code < 64:
        return f"accepted-{code}"
    return f"denied-{'fa' if code < 128 else 'ha'}-{code}"


# -- addresses --------------------------------------------------------------------------------


def _addr_to_bytes(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, addr)


_pton = socket.inet_pton
_AF_INET = socket.AF_INET


def _addr(_inst: object, attr: attrs.Attribute, value: str) -> None:
    """attrs validator: a dotted-quad IPv4 address (checked once, so encoding cannot fail).

    ``inet_pton`` (strict dotted quad, in C) rather than ``ipaddress``: every message the
    relay decodes or builds passes here several times, and ``IPv4Address`` was a third of
    the relay's CPU per registration (bench/bench_mip.py)."""
    try:
        _pton(_AF_INET, value)
    except (OSError, TypeError) as e:
        raise ValueError(f"{attr.name} must be an IPv4 address, not {value!r}") from e


_ntoa = socket.inet_ntoa


# -- extensions -------------------------------------------------------------------------------


@attrs.frozen
class AuthExtension:
    """MN-HA (32), MN-FA (33) or FA-HA (34) authentication: SPI + authenticator.

    Built by :func:`add_auth`, which computes the authenticator; decoded as is.
    """

    type: int = attrs.field(validator=attrs.validators.in_(AUTH_TYPES))
    spi: int = attrs.field(validator=_uint(32))
    authenticator: bytes = attrs.field(converter=bytes)

    @authenticator.validator
    def _check_len(self, _attr: attrs.Attribute, value: bytes) -> None:
        if len(value) > 251:
            raise ValueError("authenticator longer than 251 bytes does not fit the Length byte")


@attrs.frozen
class NAIExtension:
    """Mobile Node NAI (RFC 2794): ``nai`` is the raw identifier (user@realm), kept as
    bytes because it is a lookup key and must round-trip whatever its encoding."""

    nai: bytes = attrs.field(converter=bytes)

    @nai.validator
    def _check_len(self, _attr: attrs.Attribute, value: bytes) -> None:
        if len(value) > 255:
            raise ValueError("NAI longer than 255 bytes")


@attrs.frozen
class UDPTunnelRequest:
    """RFC 3519 UDP Tunnel Request (144): the MN asks for tunnelling inside UDP 434.

    ``encapsulation`` is what the MN will put in the tunnel (4, 47, 55: the same
    numbers as the tunnel data next header); the reserved fields are zero on send
    and ignored on receipt.
    """

    encapsulation: int = attrs.field(default=NEXT_HEADER_IPIP, validator=_uint(8))
    force: bool = False
    fa_required: bool = False
    sub_type: int = attrs.field(default=0, validator=_uint(8))


@attrs.frozen
class UDPTunnelReply:
    """RFC 3519 UDP Tunnel Reply (44): 0 = will tunnel over UDP, 64 = declined;
    ``keepalive`` is the interval in seconds the MN must keep the NAT binding with."""

    reply_code: int = attrs.field(default=UDP_TUNNEL_ACCEPTED, validator=_uint(8))
    keepalive: int = attrs.field(default=110, validator=_uint(16))
    forced: bool = False
    sub_type: int = attrs.field(default=0, validator=_uint(8))


@attrs.frozen
class EncapsulatingDeliveryStyle:
    """RFC 3024 Encapsulating Delivery Style (130): no data; the MN wants its reverse
    tunnelled packets to the FA encapsulated."""


@attrs.frozen
class HAParameterExtension:
    """The draft's HA Parameter extension (2.5.3): the actual home agent behind the
    proxy; 0.0.0.0 asks the proxy to pick one (dynamic HA assignment)."""

    home_agent: str = attrs.field(validator=_addr)


@attrs.frozen
class UnknownExtension:
    """An extension we do not interpret.  Decoding yields it only for skippable types
    (>= 128), which a relay must pass on untouched; encoding accepts any type."""

    type: int = attrs.field(validator=_uint(8))
    data: bytes = attrs.field(converter=bytes)

    @data.validator
    def _check_len(self, _attr: attrs.Attribute, value: bytes) -> None:
        if len(value) > 255:
            raise ValueError("extension data longer than 255 bytes")


Extension = Union[
    AuthExtension, NAIExtension, UDPTunnelRequest, UDPTunnelReply,
    EncapsulatingDeliveryStyle, HAParameterExtension, UnknownExtension,
]


def _extensions(items: Iterable[Extension]) -> tuple[Extension, ...]:
    """The messages' ``extensions`` converter (a bare ``tuple`` leaves mypy's attrs plugin
    without the element type: every caller would fail with ``Iterable[_T_co]``)."""
    return tuple(items)


def encode_extension(ext: Extension, numbers: DraftNumbers = DEFAULT_NUMBERS) -> bytes:
    """One extension as Type, Length, data."""
    if isinstance(ext, AuthExtension):
        return _TLI.pack(ext.type, 4 + len(ext.authenticator), ext.spi) + ext.authenticator
    if isinstance(ext, NAIExtension):
        return _TL.pack(EXT_NAI, len(ext.nai)) + ext.nai
    if isinstance(ext, UDPTunnelRequest):
        flags = (UDP_TUNNEL_F if ext.force else 0) | (UDP_TUNNEL_R if ext.fa_required else 0)
        body = _UTRQ.pack(ext.sub_type, 0, flags, ext.encapsulation, 0)
        return _TL.pack(EXT_UDP_TUNNEL_REQUEST, len(body)) + body
    if isinstance(ext, UDPTunnelReply):
        body = _UTRP.pack(ext.sub_type, ext.reply_code,
                          UDP_TUNNEL_REPLY_F if ext.forced else 0, ext.keepalive)
        return _TL.pack(EXT_UDP_TUNNEL_REPLY, len(body)) + body
    if isinstance(ext, EncapsulatingDeliveryStyle):
        return _TL.pack(EXT_ENCAP_DELIVERY, 0)
    if isinstance(ext, HAParameterExtension):
        body = _HAP.pack(numbers.ha_parameter_subtype, 0, _addr_to_bytes(ext.home_agent))
        return _TL.pack(numbers.ha_parameter_type, len(body)) + body
    if isinstance(ext, UnknownExtension):
        return _TL.pack(ext.type, len(ext.data)) + ext.data
    raise TypeError(f"not a Mobile IP extension: {ext!r}")


def encode_extensions(exts: tuple[Extension, ...], numbers: DraftNumbers = DEFAULT_NUMBERS) -> bytes:
    return b"".join(encode_extension(e, numbers) for e in exts)


def _split_extensions(data: bytes, start: int) -> list[tuple[int, int, bytes]] | str:
    """``[(type, offset, data)]`` of the chain from ``start`` to the end, or the reason
    the chain is broken (a string, so callers choose the error's reply code)."""
    out = []
    off = start
    end = len(data)
    while off < end:
        if end - off < 2:
            return f"truncated extension header at offset {off}"
        ext_type = data[off]
        ext_end = off + 2 + data[off + 1]
        if ext_end > end:
            return f"extension {ext_type} at offset {off} runs {ext_end - end} bytes past the end"
        out.append((ext_type, off, data[off + 2 : ext_end]))
        off = ext_end
    return out


def _decode_extension(ext_type: int, body: bytes, numbers: DraftNumbers) -> Extension | str:
    """One extension, or the reason it cannot be accepted."""
    n = len(body)
    if ext_type in AUTH_TYPES:
        if n < 4:
            return f"authentication extension {ext_type} shorter than its SPI"
        return AuthExtension(ext_type, _I.unpack_from(body)[0], body[4:])
    if ext_type == EXT_NAI:
        return NAIExtension(body)
    if ext_type == EXT_UDP_TUNNEL_REQUEST:
        if n != _UTRQ.size:
            return f"UDP Tunnel Request length {n}, expected {_UTRQ.size}"
        sub, _r1, flags, encap, _r3 = _UTRQ.unpack(body)
        return UDPTunnelRequest(encap, bool(flags & UDP_TUNNEL_F), bool(flags & UDP_TUNNEL_R), sub)
    if ext_type == EXT_UDP_TUNNEL_REPLY:
        if n != _UTRP.size:
            return f"UDP Tunnel Reply length {n}, expected {_UTRP.size}"
        sub, code, flags, keepalive = _UTRP.unpack(body)
        return UDPTunnelReply(code, keepalive, bool(flags & UDP_TUNNEL_REPLY_F), sub)
    if ext_type == EXT_ENCAP_DELIVERY:
        if n:
            return f"Encapsulating Delivery Style extension with {n} data bytes, expected none"
        return EncapsulatingDeliveryStyle()
    if ext_type == numbers.ha_parameter_type and n >= 1 and body[0] == numbers.ha_parameter_subtype:
        if n != _HAP.size:
            return f"HA Parameter extension length {n}, expected {_HAP.size}"
        return HAParameterExtension(_ntoa(body[2:6]))
    if ext_type >= 128:
        return UnknownExtension(ext_type, body)
    return f"unrecognised non-skippable extension type {ext_type}"


def split_extensions(data: bytes, start: int) -> list[tuple[int, int, bytes]] | str:
    """The extension chain from ``start``: ``[(type, offset, body)]``, or the reason it is
    broken.  A relay splits a message once and hands the chain to :func:`find_auth` and
    :func:`decode_extensions` (each of :func:`verify_auth` and :func:`decode_request` would
    split it again)."""
    return _split_extensions(data, start)


def decode_extensions(
    chain: list[tuple[int, int, bytes]], numbers: DraftNumbers = DEFAULT_NUMBERS,
    code: int | None = None, *, auth_records: bool = True,
) -> list[Extension | None]:
    """The extensions of a split chain (what :func:`decode_request` checks, in the same
    order); MIPError(reason, ``code``) for the first that cannot be accepted.

    ``auth_records=False``: an authentication extension is checked (long enough for its
    SPI) but yields None -- a relay that verified it through :func:`find_auth` reads
    nothing else from it, and a record per message is a microsecond it need not pay."""
    out: list[Extension | None] = []
    for ext_type, _off, body in chain:
        if not auth_records and ext_type in AUTH_TYPES:
            if len(body) < 4:
                raise MIPError(f"authentication extension {ext_type} shorter than its SPI", code)
            out.append(None)
            continue
        ext = _decode_extension(ext_type, body, numbers)
        if isinstance(ext, str):
            raise MIPError(ext, code)
        out.append(ext)
    return out


def raw_extension(data: bytes, entry: tuple[int, int, bytes]) -> bytes:
    """An entry of a split chain as it is on the wire (Type, Length, data): what a relay
    copies instead of encoding a decoded record again."""
    return data[entry[1]: entry[1] + 2 + len(entry[2])]


def _decode_chain(
    data: bytes, start: int, numbers: DraftNumbers, code: int | None,
    header: Callable[[], RegistrationRequest | RegistrationReply],
) -> tuple[Extension, ...]:
    """The extensions from ``start``; ``header()`` builds the fixed part for an error (only
    then: one record per decoded message is what the relay can afford per registration)."""
    chain = _split_extensions(data, start)
    if isinstance(chain, str):
        raise MIPError(chain, code, header())
    exts = []
    for ext_type, _off, body in chain:
        ext = _decode_extension(ext_type, body, numbers)
        if isinstance(ext, str):
            raise MIPError(ext, code, header())
        exts.append(ext)
    return tuple(exts)


# -- messages ---------------------------------------------------------------------------------


@attrs.frozen
class RegistrationRequest:
    """Registration Request (RFC 5944 3.3).  ``flags`` is the whole flag byte; the
    properties read single bits.  ``identification`` is the 64-bit replay-protection
    value the reply must echo."""

    flags: int = attrs.field(validator=_uint(8))
    lifetime: int = attrs.field(validator=_uint(16))
    home_address: str = attrs.field(validator=_addr)
    home_agent: str = attrs.field(validator=_addr)
    care_of_address: str = attrs.field(validator=_addr)
    identification: int = attrs.field(validator=_uint(64))
    extensions: tuple[Extension, ...] = attrs.field(default=(), converter=_extensions)

    s = property(lambda self: bool(self.flags & FLAG_S), doc="simultaneous bindings")
    b = property(lambda self: bool(self.flags & FLAG_B), doc="broadcast datagrams")
    d = property(lambda self: bool(self.flags & FLAG_D), doc="MN decapsulates (co-located COA)")
    m = property(lambda self: bool(self.flags & FLAG_M), doc="minimal encapsulation")
    g = property(lambda self: bool(self.flags & FLAG_G), doc="GRE encapsulation")
    t = property(lambda self: bool(self.flags & FLAG_T), doc="reverse tunnelling (RFC 3024)")


@attrs.frozen
class RegistrationReply:
    """Registration Reply (RFC 5944 3.4)."""

    code: int = attrs.field(validator=_uint(8))
    lifetime: int = attrs.field(validator=_uint(16))
    home_address: str = attrs.field(validator=_addr)
    home_agent: str = attrs.field(validator=_addr)
    identification: int = attrs.field(validator=_uint(64))
    extensions: tuple[Extension, ...] = attrs.field(default=(), converter=_extensions)

    @property
    def accepted(self) -> bool:
        """Codes 0-63 accept the registration (RFC 5944 3.4)."""
        return self.code < 64


@attrs.frozen
class TunnelData:
    """RFC 3519 MIP tunnel data message: ``payload`` is the tunnelled packet, an IP
    header (4), a GRE header (47) or a minimal encapsulation header (55)."""

    next_header: int = attrs.field(validator=_uint(8))
    payload: bytes = attrs.field(converter=bytes)


Message = Union[RegistrationRequest, RegistrationReply, TunnelData]


def encode_request(msg: RegistrationRequest, numbers: DraftNumbers = DEFAULT_NUMBERS) -> bytes:
    return _REQ.pack(
        MSG_REGISTRATION_REQUEST, msg.flags, msg.lifetime, _addr_to_bytes(msg.home_address),
        _addr_to_bytes(msg.home_agent), _addr_to_bytes(msg.care_of_address), msg.identification,
    ) + encode_extensions(msg.extensions, numbers)


def encode_reply(msg: RegistrationReply, numbers: DraftNumbers = DEFAULT_NUMBERS) -> bytes:
    return _REP.pack(
        MSG_REGISTRATION_REPLY, msg.code, msg.lifetime, _addr_to_bytes(msg.home_address),
        _addr_to_bytes(msg.home_agent), msg.identification,
    ) + encode_extensions(msg.extensions, numbers)


def _four(*addrs: bytes) -> None:
    for a in addrs:
        if len(a) != 4:
            raise ValueError(f"an IPv4 address is 4 bytes, not {len(a)}")


def pack_request(flags: int, lifetime: int, home: bytes, ha: bytes, coa: bytes,
                 identification: int, extensions: tuple[Extension, ...] = (),
                 numbers: DraftNumbers = DEFAULT_NUMBERS) -> bytes:
    """:func:`encode_request` from the fields, addresses as 4 bytes: a relay that has them
    as bytes already (the message it answers, its own addresses) builds no record and
    converts no address.  ``struct`` refuses an integer out of its field's range."""
    _four(home, ha, coa)
    return _REQ.pack(MSG_REGISTRATION_REQUEST, flags, lifetime, home, ha, coa,
                     identification) + encode_extensions(extensions, numbers)


def pack_reply(code: int, lifetime: int, home: bytes, ha: bytes, identification: int,
               extensions: tuple[Extension, ...] = (),
               numbers: DraftNumbers = DEFAULT_NUMBERS) -> bytes:
    """:func:`encode_reply` from the fields, addresses as 4 bytes (see :func:`pack_request`)."""
    _four(home, ha)
    return _REP.pack(MSG_REGISTRATION_REPLY, code, lifetime, home, ha,
                     identification) + encode_extensions(extensions, numbers)


def encode_tunnel_data(msg: TunnelData) -> bytes:
    return _TUN.pack(MSG_TUNNEL_DATA, msg.next_header, 0) + msg.payload


def encode_message(msg: Message, numbers: DraftNumbers = DEFAULT_NUMBERS) -> bytes:
    if isinstance(msg, RegistrationRequest):
        return encode_request(msg, numbers)
    if isinstance(msg, RegistrationReply):
        return encode_reply(msg, numbers)
    if isinstance(msg, TunnelData):
        return encode_tunnel_data(msg)
    raise TypeError(f"not a Mobile IP message: {msg!r}")


def decode_request(
    data: bytes,
    numbers: DraftNumbers = DEFAULT_NUMBERS,
    *,
    poorly_formed_code: int | None = REG_HA_POORLY_FORMED_REQUEST,
) -> RegistrationRequest:
    """A Registration Request, extensions included.

    A request too short for its fixed part cannot be answered (no identification
    to echo): MIPError with code None.  A broken extension chain, a recognised
    extension with the wrong length, or an unknown non-skippable extension raise
    with ``poorly_formed_code`` -- 134, as the surrogate home agent; pass 70 when
    answering as a foreign agent, or None to drop (RFC 5944 1.9's "silently
    discard" for unknown non-skippable extensions; see docs/mip-wire.md).
    """
    data = bytes(data)
    if len(data) < REQUEST_LEN:
        raise MIPError(f"registration request of {len(data)} bytes, need {REQUEST_LEN}")
    if data[0] != MSG_REGISTRATION_REQUEST:
        raise MIPError(f"message type {data[0]} is not a registration request")
    _t, flags, lifetime, home, ha, coa, ident = _REQ.unpack_from(data)
    fields = (flags, lifetime, _ntoa(home), _ntoa(ha), _ntoa(coa), ident)
    exts = _decode_chain(data, REQUEST_LEN, numbers, poorly_formed_code,
                         lambda: RegistrationRequest(*fields))
    return RegistrationRequest(*fields, exts)


def decode_reply(
    data: bytes,
    numbers: DraftNumbers = DEFAULT_NUMBERS,
    *,
    poorly_formed_code: int | None = None,
) -> RegistrationReply:
    """A Registration Reply, extensions included.

    Errors carry ``poorly_formed_code``, None by default: a reply is never
    answered, and the proxy (the home agent's surrogate mobile node) drops what it
    cannot relay; pass 71 (poorly formed reply) to tell the MN instead.
    """
    data = bytes(data)
    if len(data) < REPLY_LEN:
        raise MIPError(f"registration reply of {len(data)} bytes, need {REPLY_LEN}")
    if data[0] != MSG_REGISTRATION_REPLY:
        raise MIPError(f"message type {data[0]} is not a registration reply")
    _t, code, lifetime, home, ha, ident = _REP.unpack_from(data)
    fields = (code, lifetime, _ntoa(home), _ntoa(ha), ident)
    exts = _decode_chain(data, REPLY_LEN, numbers, poorly_formed_code,
                         lambda: RegistrationReply(*fields))
    return RegistrationReply(*fields, exts)


def decode_tunnel_data(data: bytes) -> TunnelData:
    """An RFC 3519 tunnel data message.  Unknown next headers are dropped (code None):
    the draft (5.3) silently drops what the proxy cannot decapsulate."""
    data = bytes(data)
    if len(data) < TUNNEL_HEADER_LEN:
        raise MIPError(f"tunnel data message of {len(data)} bytes, need {TUNNEL_HEADER_LEN}")
    if data[0] != MSG_TUNNEL_DATA:
        raise MIPError(f"message type {data[0]} is not tunnel data")
    if data[1] not in NEXT_HEADERS:
        raise MIPError(f"tunnel data next header {data[1]} is not 4, 47 or 55")
    return TunnelData(data[1], data[TUNNEL_HEADER_LEN:])


def decode_message(data: bytes, numbers: DraftNumbers = DEFAULT_NUMBERS) -> Message:
    """Whatever arrived on UDP 434, by its first byte; other types: MIPError(code None)."""
    data = bytes(data)
    if not data:
        raise MIPError("empty datagram")
    if data[0] == MSG_REGISTRATION_REQUEST:
        return decode_request(data, numbers)
    if data[0] == MSG_REGISTRATION_REPLY:
        return decode_reply(data, numbers)
    if data[0] == MSG_TUNNEL_DATA:
        return decode_tunnel_data(data)
    raise MIPError(f"unsupported Mobile IP message type {data[0]}")


def authenticated_extensions(msg: RegistrationRequest | RegistrationReply) -> tuple[Extension, ...]:
    """The extensions the MN-HA authenticator covers: those before the first MN-HA
    authentication extension (empty if there is none).  Extensions after it (for an
    FA, RFC 5944 3.6.1.3) may have been added by anyone on the path."""
    for i, ext in enumerate(msg.extensions):
        if isinstance(ext, AuthExtension) and ext.type == EXT_MN_HA_AUTH:
            return msg.extensions[:i]
    return ()


# -- authentication ---------------------------------------------------------------------------


#: one-shot HMAC in C (``hmac.digest``'s own fast path, without its Python frame)
try:
    from _hashlib import hmac_digest as _hmac_digest
except ImportError:  # pragma: no cover - a Python without OpenSSL's _hashlib
    _hmac_digest = hmac.digest  # type: ignore[assignment]


try:
    from _hashlib import hmac_new as _hmac_new
except ImportError:  # pragma: no cover - a Python without OpenSSL's _hashlib
    _hmac_new = hmac.new  # type: ignore[assignment]


class AuthKey:
    """An SA's HMAC-MD5 key with its keyed state prepared once (the hashes of the padded
    key, RFC 2104): an authenticator is then a copy of that state and the message, ~0.8 µs
    against ~1.3 µs for the one-shot, which hashes the two padded key blocks each time.
    A relay computes four per registration.  The key never shows in a repr."""

    __slots__ = ("key", "_state")

    def __init__(self, key: bytes) -> None:
        self.key = bytes(key)
        self._state = _hmac_new(self.key, digestmod="md5")

    def __repr__(self) -> str:
        return "AuthKey(<secret>)"

    def mac(self, covered: bytes) -> bytes:
        h = self._state.copy()
        h.update(covered)
        return h.digest()


def compute_authenticator(key: bytes | AuthKey, covered: bytes) -> bytes:
    """HMAC-MD5 (RFC 2104), the default Mobile IP algorithm (RFC 5944 3.5.1), over
    ``covered``: the UDP payload up to and including this extension's SPI."""
    if isinstance(key, AuthKey):
        return key.mac(covered)
    return _hmac_digest(key, covered, "md5")  # one-shot, in C: a third of hmac.new's cost


def auth_header(ext_type: int, spi: int) -> bytes:
    """Type, Length and SPI of an authentication extension: what :func:`add_auth` appends
    before the authenticator, for a sender that signs many messages under one SA (its
    ``covered`` is the message plus these bytes)."""
    if ext_type not in AUTH_TYPES:
        raise ValueError(f"{ext_type} is not an authentication extension type")
    if not RESERVED_SPI_MAX < spi < 1 << 32:
        raise ValueError(f"SPI {spi} is reserved or out of range (256..2**32-1)")
    return _TLI.pack(ext_type, 4 + HMAC_MD5_LEN, spi)


def add_auth(message: bytes, ext_type: int, spi: int, key: bytes) -> bytes:
    """``message`` (a request or reply with its extensions so far) followed by an
    authentication extension of ``ext_type`` computed with HMAC-MD5 under ``key``."""
    if ext_type not in AUTH_TYPES:
        raise ValueError(f"{ext_type} is not an authentication extension type")
    if not RESERVED_SPI_MAX < spi < 1 << 32:
        raise ValueError(f"SPI {spi} is reserved or out of range (256..2**32-1)")
    covered = bytes(message) + _TLI.pack(ext_type, 4 + HMAC_MD5_LEN, spi)
    return covered + compute_authenticator(key, covered)


def add_mn_ha_auth(message: bytes, spi: int, key: bytes) -> bytes:
    """``message`` with its Mobile-Home Authentication extension appended."""
    return add_auth(message, EXT_MN_HA_AUTH, spi, key)


def _auth_chain(message: bytes) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """The bytes of a registration request or reply and its extension chain
    (``(type, offset, body)`` each), for the authenticator checks; MIPError (code None)
    if it is neither or its chain does not walk."""
    data = bytes(message)
    if not data or data[0] not in (MSG_REGISTRATION_REQUEST, MSG_REGISTRATION_REPLY):
        raise MIPError("not a registration request or reply")
    start = REQUEST_LEN if data[0] == MSG_REGISTRATION_REQUEST else REPLY_LEN
    if len(data) < start:
        raise MIPError(f"registration message of {len(data)} bytes, need {start}")
    chain = _split_extensions(data, start)
    if isinstance(chain, str):
        raise MIPError(chain)
    return data, chain


def verify_auth(
    message: bytes, ext_type: int, key_lookup: Callable[[int], bytes | None]
) -> tuple[int | None, bool]:
    """Check the first authentication extension of ``ext_type`` in ``message``.

    Returns ``(spi, ok)``; ``(None, False)`` when the message has no such extension.
    ``ok`` is False for a reserved SPI, an SPI ``key_lookup`` does not know (it
    returns None), an authenticator that is not HMAC-MD5-sized, or a mismatch
    (compared in constant time).  Raises MIPError (code None) if ``message`` is not
    a request or reply with a walkable extension chain; decode it first to learn
    the reply code for that.
    """
    data, chain = _auth_chain(message)
    spi, ok, _i = find_auth(data, chain, ext_type, key_lookup)
    return spi, ok


def find_auth(
    data: bytes, chain: list[tuple[int, int, bytes]], ext_type: int,
    key_lookup: Callable[[int], bytes | AuthKey | None],
) -> tuple[int | None, bool, int]:
    """:func:`verify_auth` over a chain already split (:func:`split_extensions` of
    ``data``): ``(spi, ok, index)``, ``index`` the extension's place in the chain (-1 when
    there is none), so the caller knows which extensions the authenticator covers.
    ``key_lookup`` may answer an :class:`AuthKey` (prepared) or the key's bytes."""
    for i, (t, off, body) in enumerate(chain):
        if t != ext_type:
            continue
        if len(body) < 4:
            return None, False, i
        spi = _I.unpack_from(body)[0]
        if spi <= RESERVED_SPI_MAX or len(body) != 4 + HMAC_MD5_LEN:
            return spi, False, i
        key = key_lookup(spi)
        if key is None:
            return spi, False, i
        expected = compute_authenticator(key, data[: off + 6])
        return spi, hmac.compare_digest(expected, body[4:]), i
    return None, False, -1


def verify_mn_ha_auth(
    message: bytes, key_lookup: Callable[[int], bytes | None]
) -> tuple[int | None, bool]:
    """:func:`verify_auth` for the Mobile-Home Authentication extension (32); a
    failure is answered 131 (mobile node failed authentication) by a home agent."""
    return verify_auth(message, EXT_MN_HA_AUTH, key_lookup)


def verify_fa_ha_auth(
    message: bytes, key_lookup: Callable[[int], bytes | None]
) -> tuple[int | None, bool]:
    """The Foreign-Home Authentication extension (34, RFC 5944 3.5.4) of a request a
    foreign agent relayed: the first one *after* the Mobile-Home Authentication
    extension, whose authenticator (3.5.1) covers the message, the MN-HA extension and
    whatever the MN and the FA put between them (an MN-FA extension, 3.5.3), up to its
    own SPI.  An FA-HA extension before the MN-HA one would not cover the MN's
    authenticator and is refused, as is a missing one: ``(None, False)``.  A home
    agent answers a failure with 132 (foreign agent failed authentication)."""
    data, chain = _auth_chain(message)
    after_mn_ha = False
    for t, off, body in chain:
        if t == EXT_MN_HA_AUTH:
            after_mn_ha = True
        elif t == EXT_FA_HA_AUTH and after_mn_ha:
            if len(body) != 4 + HMAC_MD5_LEN:
                return (_I.unpack_from(body)[0] if len(body) >= 4 else None), False
            spi = _I.unpack_from(body)[0]
            key = None if spi <= RESERVED_SPI_MAX else key_lookup(spi)
            if key is None:
                return spi, False
            expected = compute_authenticator(key, data[: off + 6])
            return spi, hmac.compare_digest(expected, body[4:])
    return None, False
