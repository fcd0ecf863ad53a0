"""SOCKS5 wire codec (RFC 1928, RFC 1929): pure functions, no I/O.

Stream messages (method selection, username/password sub-negotiation,
requests) are parsed incrementally: ``parse_*(buf)`` returns
``(message, bytes_consumed)`` when ``buf`` starts with a whole message, or
``None`` when more bytes are needed.  Malformed input raises
:class:`SocksError` whose ``code`` is the RFC 1928 reply code a server should
answer with (for the stages that have no reply code, the server closes).

The RSV byte of a request is kept as ``flags``: the NAR draft reuses it as a
FLAG byte for NAR-MODE, and RFC 1928 only says it is reserved.

UDP datagrams (section 7) are parsed whole with :func:`parse_udp`.

scapy's SOCKS layer encodes ATYP 3 (domain names) wrongly, so the tests
check this module against byte strings written from the RFC.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import attrs

__all__ = [
    "VERSION", "AUTH_VERSION",
    "METHOD_NONE", "METHOD_GSSAPI", "METHOD_PASSWORD", "METHOD_NO_ACCEPTABLE",
    "CMD_CONNECT", "CMD_BIND", "CMD_UDP_ASSOCIATE",
    "ATYP_IPV4", "ATYP_DOMAIN", "ATYP_IPV6",
    "SUCCEEDED", "GENERAL_FAILURE", "NOT_ALLOWED", "NETWORK_UNREACHABLE", "HOST_UNREACHABLE",
    "CONNECTION_REFUSED", "TTL_EXPIRED", "COMMAND_NOT_SUPPORTED", "ADDRESS_TYPE_NOT_SUPPORTED",
    "REPLY_NAMES", "reply_name",
    "SocksError", "MethodRequest", "PasswordRequest", "Request", "Reply", "UdpDatagram",
    "parse_method_request", "encode_method_request", "parse_method_reply", "encode_method_reply",
    "parse_password_request", "encode_password_request", "parse_password_reply",
    "encode_password_reply",
    "parse_request", "encode_request", "parse_reply", "encode_reply",
    "parse_udp", "encode_udp", "encode_address", "parse_address",
]

VERSION = 0x05
AUTH_VERSION = 0x01  # RFC 1929 sub-negotiation version

METHOD_NONE = 0x00
METHOD_GSSAPI = 0x01
METHOD_PASSWORD = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

#: RFC 1928 section 6 names, also used as counter names ("reply_<name>").
REPLY_NAMES = {
    SUCCEEDED: "succeeded",
    GENERAL_FAILURE: "general_failure",
    NOT_ALLOWED: "not_allowed",
    NETWORK_UNREACHABLE: "network_unreachable",
    HOST_UNREACHABLE: "host_unreachable",
    CONNECTION_REFUSED: "connection_refused",
    TTL_EXPIRED: "ttl_expired",
    COMMAND_NOT_SUPPORTED: "command_not_supported",
    ADDRESS_TYPE_NOT_SUPPORTED: "address_type_not_supported",
}


def reply_name(code: int) -> str:
    return REPLY_NAMES.get(code, f"unassigned_{code:#04x}")


class SocksError(Exception):
    """Malformed SOCKS input; ``code`` is the RFC 1928 reply code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reply_name(code)}: {reason}")
        self.code = code
        self.reason = reason


# ------------------------------------------------------------------ addresses

def encode_address(host: str) -> bytes:
    """ATYP + DST.ADDR for an IPv4/IPv6 literal or a domain name (ATYP 3: length byte + name)."""
    try:  # every reply carries an IPv4 BND.ADDR: the strict dotted quad without ipaddress
        return bytes((ATYP_IPV4,)) + socket.inet_pton(socket.AF_INET, host)
    except (OSError, TypeError, ValueError):
        pass
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna") if not host.isascii() else host.encode("ascii")
        if not 1 <= len(name) <= 255:
            raise ValueError(f"domain name of {len(name)} bytes; SOCKS5 takes 1 to 255") from None
        return bytes((ATYP_DOMAIN, len(name))) + name
    if ip.version == 4:
        return bytes((ATYP_IPV4,)) + ip.packed
    return bytes((ATYP_IPV6,)) + ip.packed


def parse_address(buf: bytes | bytearray, offset: int) -> tuple[int, str, int] | None:
    """Parse ATYP, ADDR at ``offset``; return (atyp, host, end offset) or None if incomplete.

    IP addresses come back in their canonical text form; domain names as
    ASCII text (anything else is malformed: clients send IDNA/punycode).
    """
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    if atyp == ATYP_IPV4:
        end = offset + 5
        if len(buf) < end:
            return None
        return atyp, socket.inet_ntoa(bytes(buf[offset + 1:end])), end
    if atyp == ATYP_IPV6:
        end = offset + 17
        if len(buf) < end:
            return None
        return atyp, str(ipaddress.IPv6Address(bytes(buf[offset + 1:end]))), end
    if atyp == ATYP_DOMAIN:
        if len(buf) < offset + 2:
            return None
        n = buf[offset + 1]
        end = offset + 2 + n
        if len(buf) < end:
            return None
        if n == 0:
            raise SocksError(GENERAL_FAILURE, "empty domain name")
        raw = bytes(buf[offset + 2:end])
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise SocksError(HOST_UNREACHABLE, "domain name is not ASCII") from None
        if not name.isprintable() or " " in name:
            raise SocksError(HOST_UNREACHABLE, f"invalid domain name {name!r}")
        return atyp, name, end
    raise SocksError(ADDRESS_TYPE_NOT_SUPPORTED, f"ATYP {atyp:#04x}")


# ------------------------------------------------------------ method selection

@attrs.frozen
class MethodRequest:
    methods: tuple[int, ...]


def parse_method_request(buf: bytes | bytearray) -> tuple[MethodRequest, int] | None:
    """VER NMETHODS METHODS (section 3).  A wrong VER raises (the server closes)."""
    if not buf:
        return None
    if buf[0] != VERSION:
        raise SocksError(GENERAL_FAILURE, f"version {buf[0]:#04x} in method selection; expected 5")
    if len(buf) < 2:
        return None
    end = 2 + buf[1]
    if len(buf) < end:
        return None
    return MethodRequest(tuple(buf[2:end])), end


def encode_method_request(methods: tuple[int, ...] | list[int]) -> bytes:
    return bytes((VERSION, len(methods))) + bytes(methods)


def encode_method_reply(method: int) -> bytes:
    return bytes((VERSION, method))


def parse_method_reply(buf: bytes | bytearray) -> tuple[int, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise SocksError(GENERAL_FAILURE, f"version {buf[0]:#04x} in method reply")
    return buf[1], 2


# ------------------------------------------------- username/password (RFC 1929)

@attrs.frozen
class PasswordRequest:
    username: bytes
    password: bytes = attrs.field(repr=False)


def parse_password_request(buf: bytes | bytearray) -> tuple[PasswordRequest, int] | None:
    """VER(1) ULEN UNAME PLEN PASSWD; ULEN and PLEN are 1 to 255."""
    if not buf:
        return None
    if buf[0] != AUTH_VERSION:
        raise SocksError(GENERAL_FAILURE, f"sub-negotiation version {buf[0]:#04x}; expected 1")
    if len(buf) < 2:
        return None
    ulen = buf[1]
    if ulen == 0:
        raise SocksError(GENERAL_FAILURE, "empty user name")
    if len(buf) < 3 + ulen:
        return None
    plen = buf[2 + ulen]
    if plen == 0:
        raise SocksError(GENERAL_FAILURE, "empty password")
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    return PasswordRequest(bytes(buf[2:2 + ulen]), bytes(buf[3 + ulen:end])), end


def encode_password_request(username: bytes, password: bytes) -> bytes:
    if not (1 <= len(username) <= 255 and 1 <= len(password) <= 255):
        raise ValueError("user name and password must be 1 to 255 bytes")
    return (bytes((AUTH_VERSION, len(username))) + username + bytes((len(password),)) + password)


def encode_password_reply(ok: bool) -> bytes:
    """STATUS 0x00 is success; anything else is failure and the server closes."""
    return bytes((AUTH_VERSION, 0x00 if ok else 0x01))


def parse_password_reply(buf: bytes | bytearray) -> tuple[int, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != AUTH_VERSION:
        raise SocksError(GENERAL_FAILURE, f"sub-negotiation version {buf[0]:#04x} in reply")
    return buf[1], 2


# ----------------------------------------------------------- requests/replies

@attrs.frozen
class Request:
    """VER CMD RSV ATYP DST.ADDR DST.PORT (section 4); RSV kept as ``flags``."""

    cmd: int
    atyp: int
    host: str
    port: int
    flags: int = 0

    @property
    def is_domain(self) -> bool:
        return self.atyp == ATYP_DOMAIN


@attrs.frozen
class Reply:
    """VER REP RSV ATYP BND.ADDR BND.PORT (section 6); RSV kept as ``flags``."""

    rep: int
    atyp: int
    host: str
    port: int
    flags: int = 0


def _parse_msg(buf: bytes | bytearray, what: str) -> tuple[int, int, int, str, int, int] | None:
    if not buf:
        return None
    if buf[0] != VERSION:
        raise SocksError(GENERAL_FAILURE, f"version {buf[0]:#04x} in {what}; expected 5")
    if len(buf) < 4:
        return None
    addr = parse_address(buf, 3)
    if addr is None:
        return None
    atyp, host, end = addr
    if len(buf) < end + 2:
        return None
    (port,) = struct.unpack_from("!H", buf, end)
    return buf[1], buf[2], atyp, host, port, end + 2


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """A request; any CMD is returned (the server decides what it supports)."""
    r = _parse_msg(buf, "request")
    if r is None:
        return None
    cmd, flags, atyp, host, port, n = r
    return Request(cmd, atyp, host, port, flags), n


def encode_request(cmd: int, host: str, port: int, flags: int = 0) -> bytes:
    return bytes((VERSION, cmd, flags)) + encode_address(host) + struct.pack("!H", port)


def parse_reply(buf: bytes | bytearray) -> tuple[Reply, int] | None:
    r = _parse_msg(buf, "reply")
    if r is None:
        return None
    rep, flags, atyp, host, port, n = r
    return Reply(rep, atyp, host, port, flags), n


def encode_reply(rep: int, host: str = "0.0.0.0", port: int = 0, flags: int = 0) -> bytes:
    return bytes((VERSION, rep, flags)) + encode_address(host) + struct.pack("!H", port)


# ------------------------------------------------------------- UDP (section 7)

@attrs.frozen
class UdpDatagram:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA."""

    frag: int
    atyp: int
    host: str
    port: int
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    rsv: int = 0


def parse_udp(datagram: bytes) -> UdpDatagram:
    """A whole UDP request header + data; raises SocksError if truncated or malformed."""
    if len(datagram) < 4:
        raise SocksError(GENERAL_FAILURE, f"UDP datagram of {len(datagram)} bytes")
    (rsv,) = struct.unpack_from("!H", datagram, 0)
    frag = datagram[2]
    addr = parse_address(datagram, 3)
    if addr is None:
        raise SocksError(GENERAL_FAILURE, "truncated UDP request header")
    atyp, host, end = addr
    if len(datagram) < end + 2:
        raise SocksError(GENERAL_FAILURE, "truncated UDP request header")
    (port,) = struct.unpack_from("!H", datagram, end)
    return UdpDatagram(frag, atyp, host, port, bytes(datagram[end + 2:]), rsv)


def encode_udp(host: str, port: int, data: bytes, frag: int = 0) -> bytes:
    return b"\x00\x00" + bytes((frag,)) + encode_address(host) + struct.pack("!H", port) + data
