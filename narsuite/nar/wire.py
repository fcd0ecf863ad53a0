"""Wire codec for the NAR negotiation (section 3 of draft-montenegro-aatn-nar-01).

Pure functions, no I/O.  After NAR-MODE (a SOCKS5 request whose reply carries
the FLAG bits in the RSV byte), the control connection carries NAR commands::

    ICMP-ASSOCIATE    VER(1)=1  CMD(1)  ICMP.ID(2)
    IPSEC-ASSOCIATE   VER(1)=1  CMD(1)  IN.PROTOCOL(1)  IN.SPI(4)
    TUNNEL-ASSOCIATE  VER(1)=1  CMD(1)  ATYP(1)  LTUN.ADDR(var)  TUN.PROTOCOL(1)

Replies have the same format with CMD replaced by a SOCKS5 reply code.  The
draft leaves the command codes "TBD"; they are passed in (:class:`NarCommands`,
built from ``[nar.nar]``), never hard-wired.

:func:`parse_command` is incremental: it returns ``None`` while the buffer
holds only part of a message, and ``(message, consumed)`` otherwise.  The only
exception it raises is :class:`NarWireError`, whose ``code`` is the SOCKS reply
code to answer with; a wire error means the framing is lost (unknown VER or
CMD, unknown ATYP), so the caller answers :func:`encode_error` and closes.
Conditions that do not lose the framing (a DOMAINNAME or IPv6 LTUN.ADDR, an
unsupported IN.PROTOCOL) are parsed normally and refused by the session layer
with a reply in the command's own format.

A SOCKS5 request (VER 5) arriving after NAR-MODE is parsed too
(:class:`SocksRequest`) so the session layer can refuse it and keep the framing.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

from narsuite.nar import socks

__all__ = [
    "NAR_VERSION", "SOCKS_VERSION",
    "FLAG_TRANSLATED", "FLAG_GRE", "FLAG_L2TP",
    "ATYP_IPV4", "ATYP_DOMAIN", "ATYP_IPV6",
    "REP_SUCCEEDED", "REP_GENERAL_FAILURE", "REP_NOT_ALLOWED", "REP_NETWORK_UNREACHABLE",
    "REP_HOST_UNREACHABLE", "REP_CONNECTION_REFUSED", "REP_TTL_EXPIRED",
    "REP_COMMAND_NOT_SUPPORTED", "REP_ADDRESS_TYPE_NOT_SUPPORTED",
    "NarWireError", "NarCommands", "IcmpAssociate", "IpsecAssociate", "TunnelAssociate",
    "SocksRequest", "parse_command", "parse_reply", "parse_socks_request",
    "encode_icmp", "encode_ipsec", "encode_tunnel", "encode_message", "encode_socks_reply",
    "encode_socks_request", "encode_error", "MAX_MESSAGE",
]

NAR_VERSION = 1
SOCKS_VERSION = 5

#: FLAG bits of NAR-MODE (request and reply), carried in the SOCKS RSV byte.
FLAG_TRANSLATED = 0x01
FLAG_GRE = 0x02
FLAG_L2TP = 0x04

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

# SOCKS5 reply codes (RFC 1928 section 6).
REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

#: The longest message: TUNNEL-ASSOCIATE or SOCKS request with a 255-byte domain name.
MAX_MESSAGE = 4 + 1 + 255 + 2

_H = struct.Struct("!H")
_BI = struct.Struct("!BI")


class NarWireError(ValueError):
    """Malformed NAR input; ``code`` is the SOCKS reply code to answer before closing."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class NarCommands:
    """The NAR command codes in use (the draft says TBD; ours come from the config)."""

    icmp: int = 0x01
    ipsec: int = 0x02
    tunnel: int = 0x03

    @classmethod
    def from_options(cls, options) -> NarCommands:
        return cls(options.icmp_command, options.ipsec_command, options.tunnel_command)


@attrs.frozen
class IcmpAssociate:
    """ICMP-ASSOCIATE request or reply (``code`` = CMD, or REP in a reply)."""

    code: int
    icmp_id: int


@attrs.frozen
class IpsecAssociate:
    code: int
    protocol: int  # IN.PROTOCOL: 50 ESP, 51 AH
    spi: int  # IN.SPI; 0 = "none yet" in a request


@attrs.frozen
class TunnelAssociate:
    """``addr`` is dotted-quad (ATYP 1), compressed IPv6 (ATYP 4), or the domain name
    decoded as latin-1 (ATYP 3; any byte string round-trips)."""

    code: int
    atyp: int
    addr: str
    protocol: int  # TUN.PROTOCOL: 4 IP-in-IP, 47 GRE


@attrs.frozen
class SocksRequest:
    """A SOCKS5 request (RFC 1928 section 4); ``flags`` is the RSV byte (NAR's FLAG)."""

    cmd: int
    flags: int
    atyp: int
    addr: str
    port: int


# -- parsing ---------------------------------------------------------------------------------


def _parse_addr(buf: bytes, at: int) -> tuple[int, str, int] | None:
    """(atyp, addr, end) of ATYP + address at ``at``; None if incomplete.

    Unlike the SOCKS codec's ``parse_address`` this accepts any domain-name bytes
    (decoded as latin-1): a NAR command carrying an odd LTUN.ADDR is answered 0x08
    with its framing kept, where the SOCKS server closes the connection."""
    if len(buf) <= at:
        return None
    atyp = buf[at]
    if atyp == ATYP_IPV4:
        end = at + 5
        if len(buf) < end:
            return None
        return atyp, ".".join(str(b) for b in buf[at + 1 : end]), end
    if atyp == ATYP_IPV6:
        end = at + 17
        if len(buf) < end:
            return None
        return atyp, str(ipaddress.IPv6Address(bytes(buf[at + 1 : end]))), end
    if atyp == ATYP_DOMAIN:
        if len(buf) < at + 2:
            return None
        end = at + 2 + buf[at + 1]
        if len(buf) < end:
            return None
        return atyp, bytes(buf[at + 2 : end]).decode("latin-1"), end
    raise NarWireError(REP_ADDRESS_TYPE_NOT_SUPPORTED, f"unknown ATYP {atyp}")


def parse_socks_request(buf: bytes) -> tuple[SocksRequest, int] | None:
    """A SOCKS5 request at the start of ``buf``: ``(request, consumed)`` or None."""
    if len(buf) < 4:
        return None
    if buf[0] != SOCKS_VERSION:
        raise NarWireError(REP_GENERAL_FAILURE, f"not a SOCKS5 request: VER {buf[0]}")
    a = _parse_addr(buf, 3)
    if a is None:
        return None
    atyp, addr, end = a
    if len(buf) < end + 2:
        return None
    return SocksRequest(buf[1], buf[2], atyp, addr, _H.unpack_from(buf, end)[0]), end + 2


def parse_command(
    buf: bytes | bytearray, commands: NarCommands = NarCommands()
) -> tuple[IcmpAssociate | IpsecAssociate | TunnelAssociate | SocksRequest, int] | None:
    """The first message in ``buf`` (a NAR command, VER 1, or a SOCKS5 request, VER 5).

    Returns ``(message, bytes consumed)``, or None if more bytes are needed.
    Raises :class:`NarWireError` (only) when the framing is lost: unknown VER
    (code 0x01), unknown NAR CMD (0x07), unknown ATYP (0x08).  Replies carry a
    reply code instead of CMD, so a client reads them with :func:`parse_reply`.
    """
    buf = bytes(buf)
    if not buf:
        return None
    ver = buf[0]
    if ver == SOCKS_VERSION:
        return parse_socks_request(buf)
    if ver != NAR_VERSION:
        raise NarWireError(REP_GENERAL_FAILURE, f"unknown version {ver} (expected 1 or 5)")
    if len(buf) < 2:
        return None
    return _parse_body(buf, buf[1], _kind_of(buf[1], commands))


def _kind_of(cmd: int, commands: NarCommands) -> str:
    if cmd == commands.icmp:
        return "icmp"
    if cmd == commands.ipsec:
        return "ipsec"
    if cmd == commands.tunnel:
        return "tunnel"
    raise NarWireError(REP_COMMAND_NOT_SUPPORTED, f"unknown NAR command {cmd:#04x}")


def _parse_body(buf: bytes, code: int, kind: str):
    if kind == "icmp":
        if len(buf) < 4:
            return None
        return IcmpAssociate(code, _H.unpack_from(buf, 2)[0]), 4
    if kind == "ipsec":
        if len(buf) < 7:
            return None
        proto, spi = _BI.unpack_from(buf, 2)
        return IpsecAssociate(code, proto, spi), 7
    a = _parse_addr(buf, 2)
    if a is None:
        return None
    atyp, addr, end = a
    if len(buf) < end + 1:
        return None
    return TunnelAssociate(code, atyp, addr, buf[end]), end + 1


def parse_reply(buf: bytes, kind: str):
    """A NAR reply of ``kind`` ("icmp", "ipsec", "tunnel"): (message, consumed) or None.

    A client needs this (it knows which command it sent); the server never
    parses replies.  Short error replies (:func:`encode_error`) are not
    recognised here: they end the connection."""
    buf = bytes(buf)
    if not buf:
        return None
    if buf[0] != NAR_VERSION:
        raise NarWireError(REP_GENERAL_FAILURE, f"unknown version {buf[0]}")
    if len(buf) < 2:
        return None
    return _parse_body(buf, buf[1], kind)


# -- encoding ----------------------------------------------------------------------------------


def _byte(value: int, name: str) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} {value} does not fit in a byte")
    return value


def encode_icmp(code: int, icmp_id: int) -> bytes:
    """ICMP-ASSOCIATE request (code = CMD) or reply (code = REP)."""
    return bytes((NAR_VERSION, _byte(code, "code"))) + _H.pack(icmp_id)


def encode_ipsec(code: int, protocol: int, spi: int) -> bytes:
    """IPSEC-ASSOCIATE request or reply."""
    return bytes((NAR_VERSION, _byte(code, "code"))) + _BI.pack(protocol, spi)


def _encode_addr(atyp: int, addr: str) -> bytes:
    if atyp == ATYP_IPV4:
        return bytes((atyp,)) + ipaddress.IPv4Address(addr).packed
    if atyp == ATYP_IPV6:
        return bytes((atyp,)) + ipaddress.IPv6Address(addr).packed
    if atyp == ATYP_DOMAIN:
        raw = addr.encode("latin-1")
        if len(raw) > 255:
            raise ValueError(f"domain name of {len(raw)} bytes (at most 255)")
        return bytes((atyp, len(raw))) + raw
    raise ValueError(f"unknown ATYP {atyp}")


def encode_tunnel(code: int, atyp: int, addr: str, protocol: int) -> bytes:
    """TUNNEL-ASSOCIATE request or reply."""
    return (bytes((NAR_VERSION, _byte(code, "code"))) + _encode_addr(atyp, addr)
            + bytes((_byte(protocol, "TUN.PROTOCOL"),)))


def encode_message(msg) -> bytes:
    """Encode a parsed message again (requests and replies share their layout)."""
    if isinstance(msg, IcmpAssociate):
        return encode_icmp(msg.code, msg.icmp_id)
    if isinstance(msg, IpsecAssociate):
        return encode_ipsec(msg.code, msg.protocol, msg.spi)
    if isinstance(msg, TunnelAssociate):
        return encode_tunnel(msg.code, msg.atyp, msg.addr, msg.protocol)
    if isinstance(msg, SocksRequest):
        return encode_socks_request(msg.cmd, msg.flags, msg.atyp, msg.addr, msg.port)
    raise TypeError(f"not a NAR message: {msg!r}")


def encode_socks_request(cmd: int, flags: int, atyp: int, addr: str, port: int) -> bytes:
    """A SOCKS5 request (NAR-MODE: cmd = mode_command, flags = FLAG bits, port 0)."""
    return (bytes((SOCKS_VERSION, _byte(cmd, "CMD"), _byte(flags, "FLAG")))
            + _encode_addr(atyp, addr) + _H.pack(port))


def encode_socks_reply(rep: int, flags: int = 0, addr: str = "0.0.0.0", port: int = 0) -> bytes:
    """A SOCKS5 reply with ATYP 1: VER 5, REP, RSV (= NAR FLAG), BND.ADDR, BND.PORT.

    The NAR-MODE reply is ``encode_socks_reply(0, granted_flags, Nb, 0)``."""
    ipaddress.IPv4Address(addr)  # NAR-MODE replies carry IPv4 (Nb)
    return socks.encode_reply(_byte(rep, "REP"), addr, port, _byte(flags, "FLAG"))


def encode_error(code: int) -> bytes:
    """The answer to input whose framing is lost: VER 1 and the reply code, then close.

    The draft has no format for a reply to an unparseable command; two bytes
    (VER, REP) are the common prefix of every NAR reply."""
    return bytes((NAR_VERSION, _byte(code, "code")))
