"""Wire codec for IPv4, UDP, TCP, ICMP, GRE and IP-in-IP: pure functions, no I/O.

Why this module exists: the kernel on our hosts has no ESP, IP-in-IP or GRE support and
Twisted's ``twisted.pair.ip`` parses IPv4 wrongly, so every tunnelled or rewritten packet
passes through user space.  Scapy is correct but costs ~75 us per parse and ~300 us per
build; the per-packet path needs about 1 us.  Everything here is ``struct`` plus integer
arithmetic on ``bytes``/``bytearray``/``memoryview``.

Two layers:

* Records and ``parse_*``/``build_*`` for control-plane code, tests and debugging.  Records
  are frozen attrs classes whose field names equal the keyword arguments of the matching
  builder, so ``build_ipv4(payload=p, **attrs.asdict(hdr))`` re-creates the original bytes.
  A builder computes lengths and checksums that are left as ``None`` and uses given values
  verbatim (which is how tests craft deliberately broken packets).
* Fast helpers (``peek_ipv4``, ``rewrite_ipv4_dst``, ``decrement_ttl``, ``ipip_encapsulate``,
  ``decapsulate``...) for the per-packet path.  They build no records, validate only what
  they touch, and fix checksums incrementally (RFC 1624).

Addresses are 4-byte ``bytes`` everywhere (never dotted-quad ``str``): ``struct`` yields and
takes them with ``4s`` at no conversion cost, and comparing or hashing 4 bytes (flow tables,
dict keys) is as cheap as it gets, while ``str`` would cost an ``inet_ntoa``/``inet_aton``
round trip (~0.2 us each) on every packet.  Convert at the edges (configuration, logs) with
``addr_to_bytes``/``addr_to_str``.

Every malformed input raises ``CodecError`` (a ``ValueError``) saying what was wrong; the
functions never leak ``IndexError`` or ``struct.error``.  Parsers do not verify checksums
(``ipv4_header_ok``, ``transport_checksum_ok`` and ``gre_checksum_ok`` do), because the
kernel has already checked the IPv4 header of anything read from a raw socket or TUN.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Union

import attrs

Buffer = Union[bytes, bytearray, memoryview]

__all__ = [
    "CodecError",
    # constants
    "PROTO_ICMP", "PROTO_IPIP", "PROTO_TCP", "PROTO_UDP", "PROTO_GRE", "PROTO_ESP",
    "PROTO_MINIMAL",
    "ETH_P_IP", "IP_MF", "IP_DF", "IP_EVIL",
    "TCP_FIN", "TCP_SYN", "TCP_RST", "TCP_PSH", "TCP_ACK", "TCP_URG", "TCP_ECE", "TCP_CWR",
    "TCP_NS",
    "ICMP_ECHO_REPLY", "ICMP_DEST_UNREACH", "ICMP_SOURCE_QUENCH", "ICMP_REDIRECT",
    "ICMP_ECHO_REQUEST", "ICMP_TIME_EXCEEDED", "ICMP_PARAMETER_PROBLEM", "ICMP_ERROR_TYPES",
    # records
    "Option", "IPv4Header", "UDPHeader", "TCPHeader", "ICMPMessage", "GREHeader",
    # addresses
    "addr_to_bytes", "addr_to_str",
    # checksums
    "internet_checksum", "transport_checksum", "checksum_update16", "checksum_update32",
    "ipv4_header_ok", "transport_checksum_ok", "gre_checksum_ok",
    # options
    "parse_ipv4_options", "parse_tcp_options", "build_options",
    # records: parse / build
    "parse_ipv4", "build_ipv4", "parse_udp", "build_udp", "parse_tcp", "build_tcp",
    "parse_icmp", "build_icmp", "build_icmp_echo", "build_icmp_error", "parse_icmp_error",
    "parse_gre", "build_gre",
    # fast per-packet helpers
    "peek_ipv4", "peek_ports", "rewrite_ipv4_src", "rewrite_ipv4_dst", "rewrite_icmp_error",
    "napt_rewrite", "decrement_ttl",
    "ipip_encapsulate", "ipip_decapsulate", "gre_encapsulate", "gre_decapsulate", "TunnelHeader",
    "minimal_encapsulate", "minimal_decapsulate", "minimal_forwarding", "minimal_restore",
    "minimal_forwarding_cached", "minimal_restore_cached", "MINIMAL_CACHE_SIZE",
    "decapsulate",
]


class CodecError(ValueError):
    """The bytes are not a well-formed packet (or a build argument is out of range).

    One class for every failure, so a packet loop needs a single ``except CodecError`` to
    drop garbage without also swallowing programming errors.
    """


# -- constants ------------------------------------------------------------------------------

PROTO_ICMP = 1
PROTO_IPIP = 4
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_GRE = 47
PROTO_ESP = 50
PROTO_MINIMAL = 55  # minimal encapsulation within IP (RFC 2004)

#: GRE protocol type (an EtherType) for an IPv4 payload.
ETH_P_IP = 0x0800

#: IPv4 flag bits as in the 3-bit ``flags`` field (same encoding as scapy's ``IP.flags``).
IP_MF = 0x1
IP_DF = 0x2
IP_EVIL = 0x4  # the reserved bit (RFC 3514)

TCP_FIN = 0x001
TCP_SYN = 0x002
TCP_RST = 0x004
TCP_PSH = 0x008
TCP_ACK = 0x010
TCP_URG = 0x020
TCP_ECE = 0x040
TCP_CWR = 0x080
TCP_NS = 0x100

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_SOURCE_QUENCH = 4
ICMP_REDIRECT = 5
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETER_PROBLEM = 12
#: ICMP types whose body is the offending IPv4 header plus leading payload bytes (RFC 792).
ICMP_ERROR_TYPES = frozenset(
    {ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_REDIRECT, ICMP_TIME_EXCEEDED,
     ICMP_PARAMETER_PROBLEM}
)

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_PEEK = struct.Struct("!B8xB2x4s4s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIHHHH")
_ICMP = struct.Struct("!BBHI")
_H = struct.Struct("!H")
_HH = struct.Struct("!HH")
_I = struct.Struct("!I")

# GRE first word (RFC 2784 / RFC 2890 bit numbering 0..15 from the most significant bit).
_GRE_C = 0x8000
_GRE_R = 0x4000  # RFC 1701 routing present: must be zero (RFC 2784 2.3)
_GRE_K = 0x2000  # RFC 2890 key present
_GRE_S = 0x1000  # RFC 2890 sequence number present
_GRE_MUST_BE_ZERO = 0x4000 | 0x0800 | 0x0400  # bits 1, 4, 5
_GRE_RESERVED0_SHIFT = 3  # bits 6..12 -> the ``reserved0`` field (7 bits)


# -- records --------------------------------------------------------------------------------


@attrs.frozen
class Option:
    """One IPv4 or TCP option (the two share the same type-length-value grammar).

    ``kind`` 0 (end of list) and 1 (no-op) are single bytes and have empty ``data``; for
    any other kind the length byte on the wire is ``2 + len(data)``.
    """

    kind: int
    data: bytes = b""


@attrs.frozen
class IPv4Header:
    """An IPv4 header (RFC 791).  ``options`` are the raw option bytes including padding,
    kept raw so that parse+build is byte-exact; decode them with ``parse_ipv4_options``."""

    version: int
    ihl: int
    tos: int
    total_length: int
    ident: int
    flags: int
    frag_offset: int
    ttl: int
    protocol: int
    checksum: int
    src: bytes
    dst: bytes
    options: bytes = b""

    @property
    def header_length(self) -> int:
        """Header length in bytes (``ihl * 4``)."""
        return self.ihl << 2

    @property
    def is_fragment(self) -> bool:
        """True for any fragment, first or not (MF set or non-zero offset)."""
        return bool(self.flags & IP_MF) or self.frag_offset != 0


@attrs.frozen
class UDPHeader:
    """A UDP header (RFC 768).  A checksum of 0 means "not computed"."""

    sport: int
    dport: int
    length: int
    checksum: int


@attrs.frozen
class TCPHeader:
    """A TCP header (RFC 9293).  ``flags`` holds the 9 flag bits (NS..FIN), ``reserved`` the
    3 bits between data offset and flags, ``options`` the raw option bytes with padding."""

    sport: int
    dport: int
    seq: int
    ack: int
    data_offset: int
    reserved: int
    flags: int
    window: int
    checksum: int
    urgent: int
    options: bytes = b""


@attrs.frozen
class ICMPMessage:
    """An ICMP header (RFC 792).  ``rest`` is the 32-bit "rest of header" word, whose
    meaning depends on the type; the properties name the usual interpretations."""

    type: int
    code: int
    checksum: int
    rest: int = 0

    @property
    def ident(self) -> int:
        """Echo identifier (echo request/reply)."""
        return self.rest >> 16

    @property
    def seq(self) -> int:
        """Echo sequence number (echo request/reply)."""
        return self.rest & 0xFFFF

    @property
    def next_hop_mtu(self) -> int:
        """Next-hop MTU of "fragmentation needed" (type 3 code 4, RFC 1191)."""
        return self.rest & 0xFFFF

    @property
    def pointer(self) -> int:
        """Octet pointer of a parameter problem (type 12)."""
        return self.rest >> 24

    @property
    def is_error(self) -> bool:
        """True if the body carries an offending IPv4 header (see ``parse_icmp_error``)."""
        return self.type in ICMP_ERROR_TYPES


@attrs.frozen
class GREHeader:
    """A GRE header (RFC 2784 with the RFC 2890 key and sequence number).

    ``key``/``seq`` are ``None`` when their K/S bit is clear.  ``checksum`` is ``None`` when
    the C bit is clear; ``reserved1`` is the 16 bits after the checksum (0 when absent).
    ``reserved0`` holds bits 6..12 of the first word (7 bits, should be zero).  Bits 1, 4, 5
    (RFC 1701 routing, strict route, recursion) and a version other than 0 are rejected:
    they change the header layout (RFC 2784 2.3; version 1 is PPTP's enhanced GRE).
    """

    protocol: int
    checksum_present: bool = False
    checksum: int | None = None
    key: int | None = None
    seq: int | None = None
    reserved0: int = 0
    reserved1: int = 0


# -- addresses ------------------------------------------------------------------------------


def addr_to_bytes(addr: str | bytes) -> bytes:
    """Dotted quad to 4 bytes (strict: ``inet_pton`` rejects ``"1"`` or ``"1.2.3"``).

    For configuration and tests; the packet path keeps addresses as bytes throughout."""
    if isinstance(addr, bytes):
        if len(addr) != 4:
            raise CodecError(f"IPv4 address must be 4 bytes, got {len(addr)}")
        return addr
    try:
        return socket.inet_pton(socket.AF_INET, addr)
    except (OSError, TypeError) as e:
        raise CodecError(f"not an IPv4 address: {addr!r}") from e


def addr_to_str(addr: Buffer) -> str:
    """4 bytes to a dotted quad, for logs and configuration output."""
    if len(addr) != 4:
        raise CodecError(f"IPv4 address must be 4 bytes, got {len(addr)}")
    return socket.inet_ntop(socket.AF_INET, bytes(addr))


# -- checksums ------------------------------------------------------------------------------
#
# The one's-complement sum of 16-bit words is computed as one big integer modulo 0xFFFF:
# 2**16 == 1 (mod 0xFFFF), so int.from_bytes(data) % 0xFFFF equals the word sum folded with
# end-around carry, except that a non-zero sum which folds to "0" must be reported as 0xFFFF
# (one's complement has two zeros and the fold of a non-zero sum is the negative one).
# Measured on 1400 bytes: 3.9 us, against 12 us for array('H') or memoryview.cast('H') and
# 13 us for struct.unpack + sum.  An odd trailing byte is padded with a zero byte, which is the
# same as multiplying the integer by 256 (no copy).


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """RFC 1071 checksum of ``data``; ``initial`` is added to the word sum first (any
    non-negative integer, e.g. an unfolded pseudo-header sum).

    Over data that already contains a correct checksum the result is 0."""
    s = int.from_bytes(data, "big")
    if len(data) & 1:
        s <<= 8
    s += initial
    r = s % 0xFFFF
    if r == 0 and s:
        r = 0xFFFF
    return r ^ 0xFFFF


def transport_checksum(src: Buffer, dst: Buffer, protocol: int, segment: Buffer) -> int:
    """TCP/UDP checksum over the IPv4 pseudo header and ``segment`` (checksum field as it is
    in ``segment``: zero it to compute, leave it to verify -- then 0 means correct).

    Returns the raw one's-complement value: for UDP a result of 0 must be sent as 0xFFFF
    (``build_udp`` does that), since 0 on the wire means "no checksum"."""
    n = len(segment)
    s = int.from_bytes(segment, "big")
    if n & 1:
        s <<= 8
    s += int.from_bytes(src, "big") + int.from_bytes(dst, "big") + protocol + n
    r = s % 0xFFFF
    if r == 0 and s:
        r = 0xFFFF
    return r ^ 0xFFFF


def checksum_update16(checksum: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: the checksum after one 16-bit word changed from ``old`` to ``new``.

    ``HC' = ~(~HC + ~m + m')``.  Unlike eqn. 2 (RFC 1141) this never yields 0xFFFF for data
    whose full checksum is 0, so it agrees with a full recomputation.  An incorrect input
    checksum stays incorrect (by the same amount), as it should for a forwarding device."""
    s = (checksum ^ 0xFFFF) + (old ^ 0xFFFF) + new
    return (s % 0xFFFF or 0xFFFF) ^ 0xFFFF


def checksum_update32(checksum: int, old: Buffer, new: Buffer) -> int:
    """RFC 1624 eqn. 3 for a changed 4-byte field (an address): both 16-bit halves at once.

    ``old``/``new`` are the 4-byte values (bytes-like).  The complement of a 32-bit value
    equals the complements of its two halves, and 2**16 == 1 (mod 0xFFFF) folds them."""
    s = (checksum ^ 0xFFFF) + (int.from_bytes(old, "big") ^ 0xFFFFFFFF) + int.from_bytes(
        new, "big"
    )
    return (s % 0xFFFF or 0xFFFF) ^ 0xFFFF


def ipv4_header_ok(packet: Buffer) -> bool:
    """True if ``packet`` starts with a structurally valid IPv4 header whose checksum is
    correct.  Never raises for malformed input (that is just "not ok")."""
    n = len(packet)
    if n < 20:
        return False
    b0 = packet[0]
    hl = (b0 & 0x0F) << 2
    if b0 >> 4 != 4 or hl < 20 or hl > n:
        return False
    s = int.from_bytes(packet[:hl], "big") % 0xFFFF
    return s == 0  # a correct header sums to 0xFFFF, which is 0 modulo 0xFFFF


def transport_checksum_ok(packet: Buffer) -> bool:
    """True if the TCP or UDP checksum of an unfragmented IPv4 packet is correct (a UDP
    checksum of 0, "not computed", counts as correct).  Other protocols, fragments and
    malformed packets give False.  Covers the payload up to the IPv4 total length."""
    try:
        hl, proto, src, dst = peek_ipv4(packet)
    except CodecError:
        return False
    tl = (packet[2] << 8) | packet[3]
    if tl < hl or tl > len(packet) or (packet[6] & 0x3F) or packet[7]:
        return False
    seg = packet[hl:tl]
    if proto == PROTO_UDP:
        if len(seg) < 8:
            return False
        if seg[6] == 0 and seg[7] == 0:
            return True
    elif proto == PROTO_TCP:
        if len(seg) < 20:
            return False
    else:
        return False
    return transport_checksum(src, dst, proto, seg) == 0


def gre_checksum_ok(gre: Buffer) -> bool:
    """True if a GRE packet (header + payload, no IPv4 header) has no checksum or a correct
    one.  Malformed input gives False."""
    if len(gre) < 4:
        return False
    if not gre[0] & 0x80:
        return True
    return len(gre) >= 8 and internet_checksum(gre) == 0


# -- options --------------------------------------------------------------------------------


def _walk_options(raw: Buffer, what: str) -> Iterator[tuple[int, int, int]]:
    """(kind, start, end) of each option up to End of Option List; raise if one runs past
    the area.  One walk shared by validation and parsing."""
    i = 0
    n = len(raw)
    while i < n:
        kind = raw[i]
        if kind == 0:
            yield 0, i, i + 1
            return  # end of option list: the rest is padding
        if kind == 1:
            yield 1, i, i + 1
            i += 1
            continue
        if i + 1 >= n:
            raise CodecError(f"{what} option {kind} at offset {i} has no length byte")
        olen = raw[i + 1]
        if olen < 2:
            raise CodecError(f"{what} option {kind} at offset {i} has bad length {olen}")
        if i + olen > n:
            raise CodecError(
                f"{what} option {kind} at offset {i} (length {olen}) runs past the header "
                f"({n} option bytes)"
            )
        yield kind, i, i + olen
        i += olen


def _check_options(raw: Buffer, what: str) -> None:
    """Walk an option area and raise if an option runs past it (no records built)."""
    for _ in _walk_options(raw, what):
        pass


def _parse_options(raw: Buffer, what: str) -> tuple[Option, ...]:
    return tuple(Option(kind) if kind in (0, 1) else Option(kind, bytes(raw[start + 2 : end]))
                 for kind, start, end in _walk_options(raw, what))


def parse_ipv4_options(raw: Buffer) -> tuple[Option, ...]:
    """Decode IPv4 option bytes (``IPv4Header.options``).  Stops after End of Option List;
    what follows it is padding and is not returned."""
    return _parse_options(raw, "IPv4")


def parse_tcp_options(raw: Buffer) -> tuple[Option, ...]:
    """Decode TCP option bytes (``TCPHeader.options``); same grammar as IPv4 options."""
    return _parse_options(raw, "TCP")


def build_options(options: Iterable[Option]) -> bytes:
    """Encode options and pad with zero bytes (End of Option List) to a multiple of 4."""
    out = bytearray()
    for o in options:
        if o.kind in (0, 1):
            if o.data:
                raise CodecError(f"option {o.kind} cannot carry data")
            out.append(o.kind)
            continue
        if not 0 <= o.kind <= 255 or len(o.data) > 253:
            raise CodecError(f"option {o.kind} with {len(o.data)} data bytes does not fit")
        out.append(o.kind)
        out.append(2 + len(o.data))
        out += o.data
    out += bytes(-len(out) % 4)
    return bytes(out)


# -- IPv4 -----------------------------------------------------------------------------------


def _check_addr(addr: Buffer, name: str) -> None:
    if len(addr) != 4:
        raise CodecError(f"{name} must be a 4-byte IPv4 address, got {len(addr)} bytes")


def _parse_ipv4_header(data: Buffer) -> IPv4Header:
    """Header only, without checking total_length against the buffer (ICMP errors quote
    truncated packets)."""
    n = len(data)
    if n < 20:
        raise CodecError(f"truncated IPv4 header: {n} bytes, need at least 20")
    b0, tos, tl, ident, frag, ttl, proto, csum, src, dst = _IPV4.unpack_from(data)
    version = b0 >> 4
    if version != 4:
        raise CodecError(f"not IPv4: version {version}")
    ihl = b0 & 0x0F
    if ihl < 5:
        raise CodecError(f"bad IHL {ihl} (minimum 5)")
    hl = ihl << 2
    if hl > n:
        raise CodecError(f"truncated IPv4 header: IHL says {hl} bytes, only {n} present")
    if tl < hl:
        raise CodecError(f"IPv4 total length {tl} is smaller than the header length {hl}")
    options = bytes(data[20:hl])
    if options:
        _check_options(options, "IPv4")
    return IPv4Header(4, ihl, tos, tl, ident, frag >> 13, frag & 0x1FFF, ttl, proto, csum,
                      src, dst, options)


def parse_ipv4(data: Buffer) -> tuple[IPv4Header, bytes]:
    """Parse an IPv4 packet into (header, payload).

    The payload ends at the total length; bytes beyond it (link-layer padding) are ignored.
    Raises ``CodecError`` for a short buffer, version other than 4, IHL < 5, a header or
    total length running past the buffer, a total length below the header length, or an
    option running past the header.  The header checksum is not verified (``ipv4_header_ok``).
    """
    h = _parse_ipv4_header(data)
    tl = h.total_length
    if tl > len(data):
        raise CodecError(f"truncated IPv4 packet: total length {tl}, only {len(data)} bytes")
    return h, bytes(data[h.ihl << 2 : tl])


def build_ipv4(
    src: Buffer,
    dst: Buffer,
    protocol: int,
    payload: Buffer = b"",
    *,
    version: int = 4,
    ihl: int | None = None,
    tos: int = 0,
    total_length: int | None = None,
    ident: int = 0,
    flags: int = 0,
    frag_offset: int = 0,
    ttl: int = 64,
    checksum: int | None = None,
    options: Buffer = b"",
) -> bytes:
    """Build an IPv4 packet.  ``options`` are raw option bytes (see ``build_options``) and are
    zero-padded to a multiple of 4; ``ihl``, ``total_length`` and ``checksum`` are computed
    when ``None`` and used verbatim otherwise."""
    _check_addr(src, "src")
    _check_addr(dst, "dst")
    options = bytes(options)
    if len(options) & 3:
        options += bytes(-len(options) % 4)
    if len(options) > 40:
        raise CodecError(f"IPv4 options too long: {len(options)} bytes (maximum 40)")
    hl = 20 + len(options)
    if ihl is None:
        ihl = hl >> 2
    if total_length is None:
        total_length = hl + len(payload)
    if not 0 <= version <= 15 or not 0 <= ihl <= 15:
        raise CodecError(f"version {version} / IHL {ihl} do not fit in 4 bits")
    if not 0 <= flags <= 7 or not 0 <= frag_offset <= 0x1FFF:
        raise CodecError(f"flags {flags} / fragment offset {frag_offset} out of range")
    try:
        hdr = _IPV4.pack(
            (version << 4) | ihl, tos, total_length, ident, (flags << 13) | frag_offset, ttl,
            protocol, 0 if checksum is None else checksum, src, dst,
        )
    except struct.error as e:
        raise CodecError(f"IPv4 field out of range: {e}") from None
    hdr += options
    if checksum is None:
        c = internet_checksum(hdr)
        hdr = hdr[:10] + _H.pack(c) + hdr[12:]
    return hdr + bytes(payload)


# -- UDP ------------------------------------------------------------------------------------


def parse_udp(segment: Buffer) -> tuple[UDPHeader, bytes]:
    """Parse a UDP datagram (IPv4 payload) into (header, payload ending at the UDP length).

    Raises ``CodecError`` if shorter than 8 bytes or if the length field is below 8 or runs
    past the buffer.  The checksum is not verified (``transport_checksum_ok``)."""
    n = len(segment)
    if n < 8:
        raise CodecError(f"truncated UDP header: {n} bytes, need 8")
    sport, dport, length, csum = _UDP.unpack_from(segment)
    if length < 8:
        raise CodecError(f"bad UDP length {length} (minimum 8)")
    if length > n:
        raise CodecError(f"truncated UDP datagram: length field {length}, only {n} bytes")
    return UDPHeader(sport, dport, length, csum), bytes(segment[8:length])


def build_udp(
    sport: int,
    dport: int,
    payload: Buffer = b"",
    *,
    src: Buffer,
    dst: Buffer,
    length: int | None = None,
    checksum: int | None = None,
) -> bytes:
    """Build a UDP datagram; ``src``/``dst`` are the IPv4 addresses of the pseudo header.

    A computed checksum of 0 is sent as 0xFFFF (RFC 768: 0 means "no checksum"); pass
    ``checksum=0`` to send none."""
    _check_addr(src, "src")
    _check_addr(dst, "dst")
    if length is None:
        length = 8 + len(payload)
    try:
        seg = _UDP.pack(sport, dport, length, 0 if checksum is None else checksum)
    except struct.error as e:
        raise CodecError(f"UDP field out of range: {e}") from None
    seg += payload
    if checksum is None:
        c = transport_checksum(src, dst, PROTO_UDP, seg) or 0xFFFF
        seg = seg[:6] + _H.pack(c) + seg[8:]
    return seg


# -- TCP ------------------------------------------------------------------------------------


def parse_tcp(segment: Buffer) -> tuple[TCPHeader, bytes]:
    """Parse a TCP segment (IPv4 payload) into (header, payload).

    Raises ``CodecError`` if shorter than 20 bytes, for a data offset below 5 or past the
    buffer, or an option running past the header.  The checksum is not verified."""
    n = len(segment)
    if n < 20:
        raise CodecError(f"truncated TCP header: {n} bytes, need at least 20")
    sport, dport, seq, ack, word, window, csum, urg = _TCP.unpack_from(segment)
    doff = word >> 12
    if doff < 5:
        raise CodecError(f"bad TCP data offset {doff} (minimum 5)")
    hl = doff << 2
    if hl > n:
        raise CodecError(f"truncated TCP header: data offset says {hl} bytes, only {n}")
    options = bytes(segment[20:hl])
    if options:
        _check_options(options, "TCP")
    hdr = TCPHeader(sport, dport, seq, ack, doff, (word >> 9) & 7, word & 0x1FF, window,
                    csum, urg, options)
    return hdr, bytes(segment[hl:])


def build_tcp(
    sport: int,
    dport: int,
    payload: Buffer = b"",
    *,
    src: Buffer,
    dst: Buffer,
    seq: int = 0,
    ack: int = 0,
    data_offset: int | None = None,
    reserved: int = 0,
    flags: int = 0,
    window: int = 8192,
    checksum: int | None = None,
    urgent: int = 0,
    options: Buffer = b"",
) -> bytes:
    """Build a TCP segment; ``src``/``dst`` are the IPv4 addresses of the pseudo header.
    ``options`` are raw bytes, zero-padded to a multiple of 4 (at most 40)."""
    _check_addr(src, "src")
    _check_addr(dst, "dst")
    options = bytes(options)
    if len(options) & 3:
        options += bytes(-len(options) % 4)
    if len(options) > 40:
        raise CodecError(f"TCP options too long: {len(options)} bytes (maximum 40)")
    if data_offset is None:
        data_offset = 5 + (len(options) >> 2)
    if not 0 <= data_offset <= 15 or not 0 <= reserved <= 7 or not 0 <= flags <= 0x1FF:
        raise CodecError(
            f"TCP data offset {data_offset} / reserved {reserved} / flags {flags:#x} out of range"
        )
    try:
        seg = _TCP.pack(
            sport, dport, seq, ack, (data_offset << 12) | (reserved << 9) | flags, window,
            0 if checksum is None else checksum, urgent,
        )
    except struct.error as e:
        raise CodecError(f"TCP field out of range: {e}") from None
    seg += options + bytes(payload)
    if checksum is None:
        c = transport_checksum(src, dst, PROTO_TCP, seg)
        seg = seg[:16] + _H.pack(c) + seg[18:]
    return seg


# -- ICMP -----------------------------------------------------------------------------------


def parse_icmp(data: Buffer) -> tuple[ICMPMessage, bytes]:
    """Parse an ICMP message (IPv4 payload) into (header, body).  For error types the body
    is the quoted packet: decode it with ``parse_icmp_error``."""
    if len(data) < 8:
        raise CodecError(f"truncated ICMP header: {len(data)} bytes, need 8")
    t, code, csum, rest = _ICMP.unpack_from(data)
    return ICMPMessage(t, code, csum, rest), bytes(data[8:])


def build_icmp(
    type: int, code: int, payload: Buffer = b"", *, rest: int = 0, checksum: int | None = None
) -> bytes:
    """Build an ICMP message; the checksum covers header and body (no pseudo header)."""
    try:
        msg = _ICMP.pack(type, code, 0 if checksum is None else checksum, rest) + payload
    except struct.error as e:
        raise CodecError(f"ICMP field out of range: {e}") from None
    if checksum is None:
        c = internet_checksum(msg)
        msg = msg[:2] + _H.pack(c) + msg[4:]
    return msg


def build_icmp_echo(ident: int, seq: int, data: Buffer = b"", *, reply: bool = False) -> bytes:
    """Build an echo request (or reply, ``reply=True``)."""
    if not 0 <= ident <= 0xFFFF or not 0 <= seq <= 0xFFFF:
        raise CodecError(f"echo ident {ident} / seq {seq} out of range")
    return build_icmp(ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST, 0, data,
                      rest=(ident << 16) | seq)


def build_icmp_error(
    type: int, code: int, offending: Buffer, *, rest: int = 0, quote: int = 8
) -> bytes:
    """Build an ICMP error quoting ``offending`` (an IPv4 packet): its header, options
    included, plus its first ``quote`` payload bytes (RFC 792 asks for 8; RFC 1812 allows
    more, up to 576 bytes of ICMP datagram).  ``rest`` is e.g. the next-hop MTU for
    type 3 code 4.  Deciding whether an error may be sent at all (never about an ICMP error,
    a broadcast or a non-first fragment, RFC 1812 4.3.2.7) is the caller's job."""
    if type not in ICMP_ERROR_TYPES:
        raise CodecError(f"ICMP type {type} is not an error message")
    hl = peek_ipv4(offending)[0]
    return build_icmp(type, code, bytes(offending[: hl + quote]), rest=rest)


def parse_icmp_error(body: Buffer) -> tuple[IPv4Header, bytes]:
    """Decode the body of an ICMP error: (offending IPv4 header, quoted payload bytes).

    The quoted packet is usually truncated, so its total length is not checked against the
    buffer; the header itself must be complete."""
    h = _parse_ipv4_header(body)
    return h, bytes(body[h.ihl << 2 :])


# -- GRE ------------------------------------------------------------------------------------


def parse_gre(data: Buffer) -> tuple[GREHeader, bytes]:
    """Parse a GRE packet (IPv4 payload, protocol 47) into (header, payload).  The checksum
    is not verified (``gre_checksum_ok``)."""
    n = len(data)
    if n < 4:
        raise CodecError(f"truncated GRE header: {n} bytes, need at least 4")
    word, proto = _HH.unpack_from(data)
    if word & _GRE_MUST_BE_ZERO:
        raise CodecError(f"GRE flags {word >> 8:#04x}: routing/strict-route/recursion bits set "
                         "(RFC 1701 layout not supported)")
    if word & 7:
        raise CodecError(f"GRE version {word & 7} not supported (only 0)")
    need = 4 + 4 * (bool(word & _GRE_C) + bool(word & _GRE_K) + bool(word & _GRE_S))
    if need > n:
        raise CodecError(f"truncated GRE header: flags need {need} bytes, only {n}")
    i = 4
    csum = None
    reserved1 = 0
    key = seq = None
    if word & _GRE_C:
        csum, reserved1 = _HH.unpack_from(data, 4)
        i = 8
    if word & _GRE_K:
        key = _I.unpack_from(data, i)[0]
        i += 4
    if word & _GRE_S:
        seq = _I.unpack_from(data, i)[0]
        i += 4
    hdr = GREHeader(proto, bool(word & _GRE_C), csum, key, seq,
                    (word >> _GRE_RESERVED0_SHIFT) & 0x7F, reserved1)
    return hdr, bytes(data[i:])


def build_gre(
    protocol: int,
    payload: Buffer = b"",
    *,
    checksum_present: bool = False,
    checksum: int | None = None,
    key: int | None = None,
    seq: int | None = None,
    reserved0: int = 0,
    reserved1: int = 0,
) -> bytes:
    """Build a GRE packet.  A checksum is included if ``checksum_present`` or a
    ``checksum`` value is given, and computed over header and payload when ``None``."""
    present = checksum_present or checksum is not None
    if not 0 <= reserved0 <= 0x7F:
        raise CodecError(f"GRE reserved0 {reserved0} does not fit in 7 bits")
    word = reserved0 << _GRE_RESERVED0_SHIFT
    parts = []
    try:
        if present:
            word |= _GRE_C
            parts.append(_HH.pack(0 if checksum is None else checksum, reserved1))
        if key is not None:
            word |= _GRE_K
            parts.append(_I.pack(key))
        if seq is not None:
            word |= _GRE_S
            parts.append(_I.pack(seq))
        head = _HH.pack(word, protocol)
    except struct.error as e:
        raise CodecError(f"GRE field out of range: {e}") from None
    pkt = head + b"".join(parts) + bytes(payload)
    if present and checksum is None:
        pkt = pkt[:4] + _H.pack(internet_checksum(pkt)) + pkt[6:]
    return pkt


# -- fast per-packet helpers ----------------------------------------------------------------


def peek_ipv4(packet: Buffer) -> tuple[int, int, bytes, bytes]:
    """(header length in bytes, protocol, src, dst) of an IPv4 packet, without a record.

    Checks only what it reads: length >= 20, version 4, 20 <= IHL*4 <= len(packet)."""
    n = len(packet)
    if n < 20:
        raise CodecError(f"truncated IPv4 header: {n} bytes, need at least 20")
    b0, proto, src, dst = _PEEK.unpack_from(packet)
    hl = (b0 & 0x0F) << 2
    if b0 >> 4 != 4:
        raise CodecError(f"not IPv4: version {b0 >> 4}")
    if hl < 20 or hl > n:
        raise CodecError(f"bad IHL {hl >> 2} for a {n}-byte packet")
    return hl, proto, src, dst


def peek_ports(packet: Buffer) -> tuple[int, int]:
    """(source port, destination port) of a TCP or UDP IPv4 packet (first fragment)."""
    hl, proto, _, _ = peek_ipv4(packet)
    if proto != PROTO_TCP and proto != PROTO_UDP:
        raise CodecError(f"protocol {proto} has no ports")
    if (packet[6] & 0x1F) | packet[7]:
        raise CodecError("non-first fragment has no transport header")
    if hl + 4 > len(packet):
        raise CodecError("truncated transport header: no ports")
    return _HH.unpack_from(packet, hl)


def _rewrite_address(packet: Buffer, new: Buffer, at: int, quoted: bool = False) -> bytes:
    n = len(packet)
    if n < 20:
        raise CodecError(f"truncated IPv4 header: {n} bytes, need at least 20")
    b0 = packet[0]
    hl = (b0 & 0x0F) << 2
    if b0 >> 4 != 4:
        raise CodecError(f"not IPv4: version {b0 >> 4}")
    if hl < 20 or hl > n:
        raise CodecError(f"bad IHL {hl >> 2} for a {n}-byte packet")
    if len(new) != 4:
        raise CodecError(f"new address must be 4 bytes, got {len(new)}")
    buf = bytearray(packet)
    old_i = int.from_bytes(buf[at : at + 4], "big")
    # ~m + m' for both 16-bit halves at once (see checksum_update32)
    d = (old_i ^ 0xFFFFFFFF) + int.from_bytes(new, "big")
    buf[at : at + 4] = new
    c = (buf[10] << 8) | buf[11]
    c = (((c ^ 0xFFFF) + d) % 0xFFFF or 0xFFFF) ^ 0xFFFF
    buf[10] = c >> 8
    buf[11] = c & 0xFF
    if (buf[6] & 0x1F) | buf[7]:
        return bytes(buf)  # non-first fragment: no transport header here
    proto = buf[9]
    if proto == PROTO_UDP:
        at = hl + 6
    elif proto == PROTO_TCP:
        at = hl + 16
    else:
        return bytes(buf)  # ICMP and others: no pseudo header
    if at + 2 > n:
        if quoted:  # the part of a packet an ICMP error quotes: nothing more to fix
            return bytes(buf)
        raise CodecError(
            f"transport checksum (offset {at}) not in this {n}-byte packet; "
            "reassemble before rewriting"
        )
    c = (buf[at] << 8) | buf[at + 1]
    if proto == PROTO_UDP and c == 0:
        return bytes(buf)  # no UDP checksum: stays absent
    c = (((c ^ 0xFFFF) + d) % 0xFFFF or 0xFFFF) ^ 0xFFFF
    if c == 0 and proto == PROTO_UDP:
        c = 0xFFFF
    buf[at] = c >> 8
    buf[at + 1] = c & 0xFF
    return bytes(buf)


def rewrite_ipv4_src(packet: Buffer, new_src: Buffer) -> bytes:
    """A copy of ``packet`` with source address ``new_src``, checksums fixed incrementally.

    The IPv4 header checksum and, in unfragmented packets and first fragments, the TCP or
    UDP checksum (pseudo header) are updated per RFC 1624; a UDP checksum of 0 stays 0; ICMP
    and other protocols have no pseudo header and keep theirs.  Checksums that were wrong
    stay wrong.  Raises ``CodecError`` for a bad header, or if a first fragment is too short
    to hold the transport checksum (it cannot be fixed without reassembly)."""
    return _rewrite_address(packet, new_src, 12)


def rewrite_ipv4_dst(packet: Buffer, new_dst: Buffer) -> bytes:
    """A copy of ``packet`` with destination ``new_dst``; see ``rewrite_ipv4_src``."""
    return _rewrite_address(packet, new_dst, 16)


def rewrite_icmp_error(packet: Buffer, *, outer_dst: Buffer | None = None,
                       inner_src: Buffer | None = None) -> bytes:
    """A copy of an ICMP error (IPv4 header + ICMP type 3/4/5/11/12 + quoted packet) with the
    outer destination and/or the quoted packet's source replaced -- what a NAT does to the
    errors of the flows it translates (RFC 3022 4.3).

    The quoted header's checksum and, when quoted, its TCP/UDP checksum are fixed
    incrementally; the ICMP checksum is computed again over the whole message.  Raises
    ``CodecError`` for a packet that is not an ICMP error with a quoted IPv4 header."""
    n = len(packet)
    if n < 20 or packet[0] >> 4 != 4 or packet[9] != PROTO_ICMP:
        raise CodecError("not an IPv4 ICMP packet")
    hl = (packet[0] & 0x0F) << 2
    if n < hl + 8 + 20 or packet[hl] not in (3, 4, 5, 11, 12):
        raise CodecError("not an ICMP error with a quoted IPv4 header")
    inner = bytes(packet[hl + 8:])
    if inner_src is not None:
        inner = _rewrite_address(inner, inner_src, 12, quoted=True)
    icmp = bytearray(packet[hl:hl + 8]) + inner
    icmp[2:4] = b"\x00\x00"
    c = internet_checksum(icmp)
    icmp[2] = c >> 8
    icmp[3] = c & 0xFF
    out = bytes(packet[:hl]) + bytes(icmp)
    if outer_dst is not None:
        out = _rewrite_address(out, outer_dst, 16)
    return out


def decrement_ttl(packet: Buffer) -> bytes:
    """A copy of ``packet`` with the TTL lowered by one and the header checksum fixed
    incrementally.  Raises ``CodecError`` if the TTL is already 0.  The caller drops the
    result (and may send time-exceeded) when its TTL is 0 (RFC 1812 5.3.1)."""
    n = len(packet)
    if n < 20:
        raise CodecError(f"truncated IPv4 header: {n} bytes, need at least 20")
    b0 = packet[0]
    if b0 >> 4 != 4:
        raise CodecError(f"not IPv4: version {b0 >> 4}")
    hl = (b0 & 0x0F) << 2
    if hl < 20 or hl > n:
        raise CodecError(f"bad IHL {hl >> 2} for a {n}-byte packet")
    ttl = packet[8]
    if ttl == 0:
        raise CodecError("TTL is already 0")
    buf = bytearray(packet)
    buf[8] = ttl - 1
    # word (ttl, proto) -> (ttl - 1, proto): ~m + m' == 0xFFFF - 0x100
    c = (buf[10] << 8) | buf[11]
    c = (((c ^ 0xFFFF) + 0xFEFF) % 0xFFFF or 0xFFFF) ^ 0xFFFF
    buf[10] = c >> 8
    buf[11] = c & 0xFF
    return bytes(buf)


def _outer_header(
    inner: Buffer, src: Buffer, dst: Buffer, protocol: int, extra: int, ttl: int, ident: int,
    tos: int | None, df: bool | None, inner_is_ip: bool,
) -> bytes:
    if len(src) != 4 or len(dst) != 4:
        raise CodecError("tunnel endpoints must be 4-byte IPv4 addresses")
    if inner_is_ip:
        if len(inner) < 20 or inner[0] >> 4 != 4:
            raise CodecError("inner packet is not IPv4")
        if tos is None:
            tos = inner[1]
        if df is None:
            df = bool(inner[6] & 0x40)
    tos = tos or 0
    frag = 0x4000 if df else 0
    tl = 20 + extra + len(inner)
    if tl > 0xFFFF:
        raise CodecError(f"encapsulated packet too long: {tl} bytes")
    if not 0 <= ttl <= 255 or not 0 <= ident <= 0xFFFF or not 0 <= tos <= 255:
        raise CodecError(f"ttl {ttl} / ident {ident} / tos {tos} out of range")
    # The header checksum is computed from the field values, so the header is packed once.
    s = (
        0x4500 + tos + tl + ident + frag + (ttl << 8) + protocol
        + int.from_bytes(src, "big") + int.from_bytes(dst, "big")
    )
    return _IPV4.pack(0x45, tos, tl, ident, frag, ttl, protocol,
                      (s % 0xFFFF or 0xFFFF) ^ 0xFFFF, src, dst)


_OUTER_FIXED = struct.Struct("!BBHHHBBH8s")


class TunnelHeader:
    """The outer IPv4 header of one tunnel (source, destination, protocol, TTL), with its
    constant words summed once: :meth:`ipip` then costs one pack and the checksum's fold per
    packet, not a header built and summed from scratch (the mipproxy data path sends every
    packet of a binding to the same care-of address).  Same bytes as
    :func:`ipip_encapsulate` with identification 0: TOS copied from the inner header, DF
    set if set inside (RFC 2003 3.1)."""

    __slots__ = ("_base", "_tail", "_ttl", "_protocol")

    def __init__(self, src: Buffer, dst: Buffer, *, protocol: int = PROTO_IPIP, ttl: int = 64) -> None:
        if len(src) != 4 or len(dst) != 4:
            raise CodecError("tunnel endpoints must be 4-byte IPv4 addresses")
        if not 0 <= ttl <= 255 or not 0 <= protocol <= 255:
            raise CodecError(f"ttl {ttl} / protocol {protocol} out of range")
        self._ttl = ttl
        self._protocol = protocol
        self._tail = bytes(src) + bytes(dst)
        self._base = (0x4500 + (ttl << 8) + protocol + int.from_bytes(src, "big")
                      + int.from_bytes(dst, "big"))

    def ipip(self, inner: Buffer) -> bytes:
        """``inner`` (an IPv4 packet its caller has checked, at least its first 20 bytes)
        behind this tunnel's header."""
        tos = inner[1]
        frag = 0x4000 if inner[6] & 0x40 else 0
        tl = 20 + len(inner)
        if tl > 0xFFFF:
            raise CodecError(f"encapsulated packet too long: {tl} bytes")
        s = self._base + tos + tl + frag
        return _OUTER_FIXED.pack(0x45, tos, tl, 0, frag, self._ttl, self._protocol,
                                 (s % 0xFFFF or 0xFFFF) ^ 0xFFFF, self._tail) + inner


    def gre(self, inner: Buffer) -> bytes:
        """``inner`` (a checked IPv4 packet) behind this tunnel's header and a plain 4-byte
        GRE header (no checksum, key or sequence; protocol type IPv4): the same bytes as
        :func:`gre_encapsulate` with its defaults, for a tunnel made with protocol 47."""
        tos = inner[1]
        frag = 0x4000 if inner[6] & 0x40 else 0
        tl = 24 + len(inner)
        if tl > 0xFFFF:
            raise CodecError(f"encapsulated packet too long: {tl} bytes")
        s = self._base + tos + tl + frag
        return b"".join((_OUTER_FIXED.pack(0x45, tos, tl, 0, frag, self._ttl, self._protocol,
                                           (s % 0xFFFF or 0xFFFF) ^ 0xFFFF, self._tail),
                         _GRE_PLAIN_IPV4, inner))


_GRE_PLAIN_IPV4 = b"\x00\x00\x08\x00"


def ipip_encapsulate(
    inner: Buffer,
    src: Buffer,
    dst: Buffer,
    ttl: int = 64,
    ident: int = 0,
    *,
    tos: int | None = None,
    df: bool | None = None,
) -> bytes:
    """IP-in-IP (RFC 2003): a 20-byte outer header, protocol 4, in front of ``inner``.

    ``tos`` and DF default to the inner header's values (RFC 2003 3.1: TOS is copied, DF
    MUST be set if set inside).  ``inner`` must be IPv4 (only its version is checked)."""
    return _outer_header(inner, src, dst, PROTO_IPIP, 0, ttl, ident, tos, df, True) + inner


def gre_encapsulate(
    inner: Buffer,
    src: Buffer,
    dst: Buffer,
    *,
    protocol: int = ETH_P_IP,
    key: int | None = None,
    seq: int | None = None,
    checksum: bool = False,
    ttl: int = 64,
    ident: int = 0,
    tos: int | None = None,
    df: bool | None = None,
) -> bytes:
    """GRE over IPv4: outer header (protocol 47) + GRE header + ``inner``.

    ``key``/``seq`` add the RFC 2890 fields, ``checksum=True`` the RFC 2784 checksum.  For
    an IPv4 payload ``tos``/DF default to the inner values like IP-in-IP, otherwise to 0."""
    gre = build_gre(protocol, inner, checksum_present=checksum, key=key, seq=seq)
    return _outer_header(inner, src, dst, PROTO_GRE, len(gre) - len(inner), ttl, ident, tos,
                         df, protocol == ETH_P_IP) + gre


def _outer_payload(packet: Buffer, expect: int) -> tuple[int, int]:
    """Validate the outer header of a tunnel packet; return (payload start, end)."""
    hl, proto, _, _ = peek_ipv4(packet)
    if proto != expect:
        raise CodecError(f"outer protocol {proto}, expected {expect}")
    tl = (packet[2] << 8) | packet[3]
    if tl < hl or tl > len(packet):
        raise CodecError(f"outer total length {tl} inconsistent with {len(packet)} bytes")
    if (packet[6] & 0x3F) | packet[7]:
        raise CodecError("outer packet is a fragment; reassemble before decapsulating")
    return hl, tl


def ipip_decapsulate(packet: Buffer) -> bytes:
    """The inner packet of an IP-in-IP packet (outer protocol 4, not a fragment).

    The inner packet must start with a plausible IPv4 header (version 4, IHL, length);
    the outer header checksum is not verified (the kernel did that for raw sockets)."""
    start, end = _outer_payload(packet, PROTO_IPIP)
    inner = bytes(packet[start:end])
    peek_ipv4(inner)
    return inner


def gre_decapsulate(packet: Buffer) -> tuple[int, int | None, int | None, bytes]:
    """(protocol type, key, seq, payload) of a GRE-over-IPv4 packet (outer protocol 47).

    A present GRE checksum is verified (no kernel GRE module did it) and a wrong one raises
    ``CodecError``."""
    start, end = _outer_payload(packet, PROTO_GRE)
    data = packet[start:end]
    n = end - start
    if n < 4:
        raise CodecError(f"truncated GRE header: {n} bytes, need at least 4")
    word, proto = _HH.unpack_from(data)
    if word & (_GRE_MUST_BE_ZERO | 7):
        raise CodecError(f"unsupported GRE flags/version {word:#06x}")
    i = 4
    key = seq = None
    if word & _GRE_C:
        if n < 8:
            raise CodecError("truncated GRE checksum")
        if internet_checksum(data) != 0:
            raise CodecError("bad GRE checksum")
        i = 8
    if word & _GRE_K:
        if n < i + 4:
            raise CodecError("truncated GRE key")
        key = _I.unpack_from(data, i)[0]
        i += 4
    if word & _GRE_S:
        if n < i + 4:
            raise CodecError("truncated GRE sequence number")
        seq = _I.unpack_from(data, i)[0]
        i += 4
    return proto, key, seq, bytes(data[i:])


def decapsulate(packet: Buffer) -> tuple[int, int | None, bytes]:
    """Decapsulate IP-in-IP, GRE-carrying-IPv4 or minimal encapsulation: (outer protocol 4,
    47 or 55, GRE key or None, inner IPv4 packet).  Anything else, including GRE with a
    non-IPv4 payload, raises ``CodecError``."""
    hl, proto, _, _ = peek_ipv4(packet)
    if proto == PROTO_IPIP:
        return PROTO_IPIP, None, ipip_decapsulate(packet)
    if proto == PROTO_MINIMAL:
        return PROTO_MINIMAL, None, minimal_decapsulate(packet)
    if proto == PROTO_GRE:
        ptype, key, _, inner = gre_decapsulate(packet)
        if ptype != ETH_P_IP:
            raise CodecError(f"GRE payload type {ptype:#06x} is not IPv4")
        peek_ipv4(inner)
        return PROTO_GRE, key, inner
    raise CodecError(f"protocol {proto} is not a tunnel (expected 4 or 47)")


_MIN = struct.Struct("!BBH4s")


def _minimal_header(inner: Buffer, src: Buffer) -> tuple[int, bytes]:
    """(inner header length, minimal forwarding header) for ``inner`` encapsulated by
    ``src``: original protocol, S bit, checksum, original destination and, when the
    source is not the encapsulator, the original source (RFC 2004 §3)."""
    if len(src) != 4:
        raise CodecError("tunnel endpoints must be 4-byte IPv4 addresses")
    hl, proto, osrc, odst = peek_ipv4(inner)
    if (inner[6] & 0x3F) | inner[7]:
        raise CodecError("minimal encapsulation of a fragment (RFC 2004 §3)")
    keep_src = bytes(src) == osrc
    mh = _MIN.pack(proto, 0 if keep_src else 0x80, 0, odst) + (b"" if keep_src else osrc)
    c = internet_checksum(mh)
    return hl, mh[:2] + _H.pack(c) + mh[4:]


def minimal_encapsulate(inner: Buffer, src: Buffer, dst: Buffer) -> bytes:
    """Minimal encapsulation (RFC 2004): the inner header becomes the outer one.

    Its protocol becomes 55, its destination ``dst``, its source ``src``; a minimal
    forwarding header (original protocol, S bit, checksum, original destination and,
    when the source changes, original source: 8 or 12 bytes) goes between the header and
    the payload.  RFC 2004 §3 forbids it for fragments (``CodecError``).  TTL and
    identification are the inner packet's; the IP header checksum is recomputed."""
    if len(dst) != 4:
        raise CodecError("tunnel endpoints must be 4-byte IPv4 addresses")
    hl, mh = _minimal_header(inner, src)
    tl = ((inner[2] << 8) | inner[3]) + len(mh)
    if tl > 0xFFFF:
        raise CodecError(f"encapsulated packet too long: {tl} bytes")
    hdr = bytearray(inner[:hl])
    hdr[2:4] = _H.pack(tl)
    hdr[9] = PROTO_MINIMAL
    hdr[10:12] = b"\0\0"
    hdr[12:16] = src
    hdr[16:20] = dst
    hdr[10:12] = _H.pack(internet_checksum(hdr))
    return bytes(hdr) + mh + bytes(inner[hl:])


def _fold(s: int) -> int:
    """The ones'-complement checksum of a word sum (internet_checksum's last step)."""
    r = s % 0xFFFF
    if r == 0 and s:
        r = 0xFFFF
    return r ^ 0xFFFF


def minimal_forwarding(inner: Buffer, src: Buffer) -> bytes:
    """What follows the outer IP header of a minimal encapsulation of ``inner`` by ``src``:
    the forwarding header and the inner payload.  RFC 3519 tunnel data with next header
    55 carries exactly this, the UDP datagram's IP header standing for the outer one; the
    inner packet's TTL, TOS and identification are lost with it (the UDP socket sets its
    own), which RFC 2004 tolerates: the decapsulator rebuilds them from its outer header.

    The same header as :func:`minimal_encapsulate`'s, packed once with its checksum summed
    from the fields (a per-packet step of the mipproxy data path)."""
    if len(src) != 4:
        raise CodecError("tunnel endpoints must be 4-byte IPv4 addresses")
    hl, proto, osrc, odst = peek_ipv4(inner)
    if (inner[6] & 0x3F) | inner[7]:
        raise CodecError("minimal encapsulation of a fragment (RFC 2004 §3)")
    end = (inner[2] << 8) | inner[3]
    if end < hl or end > len(inner):
        raise CodecError(f"total length {end} inconsistent with {len(inner)} bytes")
    if bytes(src) == osrc:
        return _MIN.pack(proto, 0, _fold((proto << 8) + int.from_bytes(odst, "big")),
                         odst) + bytes(inner[hl:end])
    c = _fold((proto << 8) + 0x80 + int.from_bytes(odst, "big") + int.from_bytes(osrc, "big"))
    return _MIN_S.pack(proto, 0x80, c, odst, osrc) + bytes(inner[hl:end])


def _minimal_restore(hdr: bytearray, body: Buffer) -> bytes:
    """The original packet from an outer header template (20+ bytes, any protocol and
    checksum) and the minimal forwarding header + payload that followed it."""
    n = len(body)
    if n < 8:
        raise CodecError("truncated minimal forwarding header")
    proto, sbit, _c, odst = _MIN.unpack_from(body)
    mlen = 12 if sbit & 0x80 else 8
    if n < mlen:
        raise CodecError("truncated minimal forwarding header (S bit set)")
    if internet_checksum(body[:mlen]) != 0:
        raise CodecError("bad minimal forwarding header checksum")
    tl = len(hdr) + n - mlen
    if tl > 0xFFFF:
        raise CodecError(f"restored packet too long: {tl} bytes")
    hdr[2:4] = _H.pack(tl)
    hdr[9] = proto
    hdr[10:12] = b"\0\0"
    if mlen == 12:
        hdr[12:16] = body[8:12]
    hdr[16:20] = odst
    hdr[10:12] = _H.pack(internet_checksum(hdr))
    return bytes(hdr) + bytes(body[mlen:])


def minimal_decapsulate(packet: Buffer) -> bytes:
    """The original packet of a minimal-encapsulated one (outer protocol 55): protocol,
    destination and (S bit) source restored from the forwarding header, whose checksum
    must be right; total length and header checksum recomputed."""
    start, end = _outer_payload(packet, PROTO_MINIMAL)
    return _minimal_restore(bytearray(packet[:start]), packet[start:end])


def minimal_restore(body: Buffer, outer_src: Buffer, outer_dst: Buffer, *, ttl: int = 64,
                    ident: int = 0, tos: int = 0) -> bytes:
    """The original packet of a minimal forwarding header + payload that arrived without
    its outer IP header (RFC 3519 tunnel data, next header 55: a UDP socket hands over
    neither TTL, TOS nor identification).  ``outer_src``/``outer_dst`` are the addresses
    the datagram came from and to; the original source is ``outer_src`` unless the S bit
    carries it.  TTL, identification and TOS are the given ones, no flags (RFC 2004 §3
    never carries a fragment)."""
    if len(outer_src) != 4 or len(outer_dst) != 4:
        raise CodecError("tunnel endpoints must be 4-byte IPv4 addresses")
    n = len(body)
    if n < 8:
        raise CodecError("truncated minimal forwarding header")
    proto, sbit, _c, odst = _MIN.unpack_from(body)
    if sbit & 0x80:
        if n < 12:
            raise CodecError("truncated minimal forwarding header (S bit set)")
        mlen = 12
        src = bytes(body[8:12])
        if _fold((proto << 8) + sbit + _c + int.from_bytes(odst, "big")
                 + int.from_bytes(src, "big")) != 0:
            raise CodecError("bad minimal forwarding header checksum")
    else:
        mlen = 8
        src = bytes(outer_src)
        if _fold((proto << 8) + sbit + _c + int.from_bytes(odst, "big")) != 0:
            raise CodecError("bad minimal forwarding header checksum")
    tl = 20 + n - mlen
    if tl > 0xFFFF:
        raise CodecError(f"restored packet too long: {tl} bytes")
    c = _fold(0x4500 + tos + tl + ident + (ttl << 8) + proto + int.from_bytes(src, "big")
              + int.from_bytes(odst, "big"))
    return _MIN_OUTER.pack(0x45, tos, tl, ident, 0, ttl, proto, c, src, odst) + bytes(body[mlen:])


_MIN_OUTER = struct.Struct("!BBHHHBBH4s4s")
_MIN_S = struct.Struct("!BBH4s4s")
#: entries a caller's minimal-encapsulation cache holds before it is emptied (the keys come
#: from the wire: bounded, whatever a peer sends)
MINIMAL_CACHE_SIZE = 1024


def minimal_forwarding_cached(inner: Buffer, src: Buffer, cache: dict[bytes, tuple[int, bytes]],
                              prefix: bytes = b"") -> bytes:
    """``prefix`` + :func:`minimal_forwarding`, the forwarding header looked up in ``cache``
    by the inner packet's source and destination (one tunnel's packets share them): per
    packet, the header and fragment checks and one copy.  ``cache`` belongs to one ``src``."""
    key = bytes(inner[12:20])
    hit = cache.get(key)
    if hit is None or len(inner) < 20 or hit[0] != inner[9]:
        mh_payload = minimal_forwarding(inner, src)
        if len(cache) >= MINIMAL_CACHE_SIZE:
            cache.clear()
        cache[key] = (inner[9], mh_payload[:12 if mh_payload[1] & 0x80 else 8])
        return prefix + mh_payload
    hl = (inner[0] & 0x0F) << 2
    end = (inner[2] << 8) | inner[3]
    if inner[0] >> 4 != 4 or hl < 20 or end < hl or end > len(inner):
        raise CodecError("bad IPv4 header")
    if (inner[6] & 0x3F) | inner[7]:
        raise CodecError("minimal encapsulation of a fragment (RFC 2004 §3)")
    return b"".join((prefix, hit[1], memoryview(inner)[hl:end]))


def minimal_restore_cached(body: Buffer, outer_src: bytes | str, outer_dst: Buffer,
                           cache: dict[bytes, tuple[int, int, bytes, bytes]]) -> bytes:
    """:func:`minimal_restore` (TTL 64, ID 0, TOS 0) with a forwarding header that carries
    its source (S bit) remembered in ``cache``: a header byte-equal to one already checked
    needs no checksum and its restored header's constant words are summed.  Without the S
    bit the source is the datagram's, and it goes the long way.  ``cache`` belongs to one
    ``outer_dst``; ``outer_src`` may be the dotted quad (converted only when needed)."""
    if len(body) >= 12 and body[1] & 0x80:
        key = bytes(body[:12])
        hit = cache.get(key)
        if hit is None:
            out = minimal_restore(body, addr_to_bytes(outer_src), outer_dst)
            if len(cache) >= MINIMAL_CACHE_SIZE:
                cache.clear()
            proto = body[0]
            cache[key] = (0x4500 + (64 << 8) + proto + int.from_bytes(body[8:12], "big")
                          + int.from_bytes(body[4:8], "big"), proto, key[8:12], key[4:8])
            return out
        base, proto, src, dst = hit
        tl = 8 + len(body)  # 20 + len(body) - 12
        if tl > 0xFFFF:
            raise CodecError(f"restored packet too long: {tl} bytes")
        c = (base + tl) % 0xFFFF  # _fold inline: base + tl is never 0
        return b"".join((_MIN_OUTER.pack(0x45, 0, tl, 0, 0, 64, proto, (c or 0xFFFF) ^ 0xFFFF,
                                         src, dst), memoryview(body)[12:]))
    return minimal_restore(body, addr_to_bytes(outer_src), outer_dst)



#: The incremental updates below (RFC 1624 eqn. 3) add up the changed words' ``~m + m'``
#: once per tunnel into a ``delta``; per packet the new checksum ``~((~HC + delta) folded)``
#: is computed as ``(HC - delta) % 0xFFFF``: the same value, since both are congruent to
#: ``HC - delta`` modulo 0xFFFF, lie in 0..0xFFFE, and are 0 together (eqn. 3 never yields
#: 0xFFFF).  Checked against full recomputation in tests/test_mip_minimal.py.


#: the restored or encapsulating header: first byte, TOS, total length, identification +
#: flags/offset + TTL (5 bytes as they were), protocol, checksum, source, destination
_MIN_HDR = struct.Struct("!BBH5sBH4s4s")
#: ... without options, the addresses and the forwarding header after them as one field
_MIN_ENC8 = struct.Struct("!BBH5sBH16s")
_MIN_ENC12 = struct.Struct("!BBH5sBH20s")


def minimal_decapsulate_cached(packet: Buffer,
                               cache: dict[bytes, tuple[int, int, bytes, bytes, int]]) -> bytes:
    """:func:`minimal_decapsulate` with the header checksum updated incrementally (RFC 1624
    eqn. 3) from the outer one, not summed again: the outer header becomes the original
    one by a constant change per tunnel (total length minus the forwarding header,
    protocol 55 -> the original, destination and, with the S bit, source), remembered in
    ``cache`` by outer source, destination and forwarding header.  A forwarding header
    byte-equal to one already checked needs no checksum.  Same bytes as
    :func:`minimal_decapsulate` when the outer header checksum is right, which the kernel
    has checked for a raw socket (``ip_rcv`` drops the rest); a wrong one stays wrong by
    the same amount, as a forwarding device leaves it.  ``cache`` is bounded."""
    if type(packet) is not bytes:
        packet = bytes(packet)
    n = len(packet)
    if n < 20:
        raise CodecError(f"truncated IPv4 header: {n} bytes, need at least 20")
    b0 = packet[0]
    hl = (b0 & 0x0F) << 2
    tl = (packet[2] << 8) | packet[3]
    if b0 >> 4 != 4 or hl < 20 or tl < hl or tl > n:
        raise CodecError("bad outer IPv4 header")
    if packet[9] != PROTO_MINIMAL:
        raise CodecError(f"outer protocol {packet[9]}, expected {PROTO_MINIMAL}")
    if (packet[6] & 0x3F) | packet[7]:
        raise CodecError("outer packet is a fragment; reassemble before decapsulating")
    if tl - hl < 8:
        raise CodecError("truncated minimal forwarding header")
    mlen = 12 if packet[hl + 1] & 0x80 else 8
    if tl - hl < mlen:
        raise CodecError("truncated minimal forwarding header (S bit set)")
    # outer source, destination and the forwarding header: one slice without options
    key = packet[12:20 + mlen] if hl == 20 else packet[12:20] + packet[hl:hl + mlen]
    hit = cache.get(key)
    if hit is None:
        mh = key[8:]
        if internet_checksum(mh) != 0:
            raise CodecError("bad minimal forwarding header checksum")
        proto = mh[0]
        src = mh[8:12] if mlen == 12 else key[:4]
        dst = mh[4:8]
        # ~m + m' per changed word: total length (-mlen), protocol (55 -> proto), addresses
        delta = (0xFFFF - mlen) + (0xFFFF - PROTO_MINIMAL + proto) \
            + (int.from_bytes(key[4:8], "big") ^ 0xFFFFFFFF) + int.from_bytes(dst, "big")
        if mlen == 12:
            delta += (int.from_bytes(key[:4], "big") ^ 0xFFFFFFFF) + int.from_bytes(src, "big")
        if len(cache) >= MINIMAL_CACHE_SIZE:
            cache.clear()
        hit = cache[key] = (delta, proto, src, dst, mlen)
    delta, proto, src, dst, mlen = hit
    # RFC 1624 eqn. 3, ~(~HC + delta) folded, is (HC - delta) mod 0xFFFF (see above _MIN_HDR)
    hdr = _MIN_HDR.pack(b0, packet[1], tl - mlen, packet[4:9], proto,
                        (((packet[10] << 8) | packet[11]) - delta) % 0xFFFF, src, dst)
    if hl == 20:
        return hdr + packet[20 + mlen:tl]
    return b"".join((hdr, packet[20:hl], packet[hl + mlen:tl]))


class MinimalTunnel:
    """Minimal encapsulation (RFC 2004) from ``src`` to ``dst`` with the inner header's
    checksum updated incrementally (RFC 1624 eqn. 3), not summed again: the forwarding
    header and the checksum's change are remembered per inner source, destination and
    protocol (one tunnel's packets share them; bounded).  Same bytes as
    :func:`minimal_encapsulate` when the inner header checksum is right -- the mipproxy's
    inner packets come from the kernel's TUN, which has checked it (``ip_rcv``)."""

    __slots__ = ("_src", "_tail", "cache", "addresses")

    def __init__(self, src: Buffer, dst: Buffer) -> None:
        if len(src) != 4 or len(dst) != 4:
            raise CodecError("tunnel endpoints must be 4-byte IPv4 addresses")
        self._src = bytes(src)
        self._tail = (int.from_bytes(src, "big"), int.from_bytes(dst, "big"), bytes(src), bytes(dst))
        #: inner source + destination -> (inner protocol, forwarding header, checksum
        #: change, its length, the outer addresses + forwarding header, the pack of a header
        #: without options ending with them): read by the mipproxy's inline copy of
        #: :meth:`encapsulate`'s hit
        self.cache: dict[bytes, tuple[int, bytes, int, int, bytes, Callable[..., bytes]]] = {}
        self.addresses = bytes(src) + bytes(dst)

    def encapsulate(self, inner: Buffer) -> bytes:
        """``inner`` minimal-encapsulated: :func:`minimal_encapsulate` (``src``, ``dst``)."""
        if type(inner) is not bytes:
            inner = bytes(inner)
        n = len(inner)
        if n < 20:
            raise CodecError(f"truncated IPv4 header: {n} bytes, need at least 20")
        b0 = inner[0]
        hl = (b0 & 0x0F) << 2
        if b0 >> 4 != 4 or hl < 20 or hl > n:
            raise CodecError("bad IPv4 header")
        if (inner[6] & 0x3F) | inner[7]:
            raise CodecError("minimal encapsulation of a fragment (RFC 2004 §3)")
        key = inner[12:20]
        hit = self.cache.get(key)
        if hit is None or hit[0] != inner[9]:
            _hl, mh = _minimal_header(inner, self._src)
            src32, dst32, _s, _d = self._tail
            proto = inner[9]
            delta = len(mh) + (0xFFFF - proto + PROTO_MINIMAL) \
                + (int.from_bytes(key[:4], "big") ^ 0xFFFFFFFF) + src32 \
                + (int.from_bytes(key[4:], "big") ^ 0xFFFFFFFF) + dst32
            if len(self.cache) >= MINIMAL_CACHE_SIZE:
                self.cache.clear()
            hit = self.cache[key] = (proto, mh, delta, len(mh), self.addresses + mh,
                                     _MIN_ENC8.pack if len(mh) == 8 else _MIN_ENC12.pack)
        _p, mh, delta, mlen, tail, pack = hit
        tl = ((inner[2] << 8) | inner[3]) + mlen
        if tl > 0xFFFF:
            raise CodecError(f"encapsulated packet too long: {tl} bytes")
        c = (((inner[10] << 8) | inner[11]) - delta) % 0xFFFF  # RFC 1624 (see above _MIN_HDR)
        if hl == 20:
            return pack(0x45, inner[1], tl, inner[4:9], PROTO_MINIMAL, c, tail) + inner[20:]
        _s32, _d32, src, dst = self._tail
        hdr = _MIN_HDR.pack(b0, inner[1], tl, inner[4:9], PROTO_MINIMAL, c, src, dst)
        return b"".join((hdr, inner[20:hl], mh, inner[hl:]))


def napt_rewrite(packet: Buffer, new_addr: Buffer, new_port: int, *, source: bool) -> bytes:
    """NAPT in one step: a copy of ``packet`` with the source (or destination) address and
    the port on the same side replaced, every checksum fixed incrementally (RFC 1624).

    The "port" of an ICMP echo request or reply is its identifier (RFC 3022 §2.2), in the
    same place whichever side is rewritten.  Non-first fragments and other protocols carry
    no port: ``CodecError``, as for a truncated transport header."""
    buf = bytearray(_rewrite_address(packet, new_addr, 12 if source else 16))
    if (buf[6] & 0x1F) | buf[7]:
        raise CodecError("non-first fragment: no port to translate (reassemble first)")
    hl = (buf[0] & 0x0F) << 2
    proto = buf[9]
    if proto == PROTO_TCP or proto == PROTO_UDP:
        at = hl if source else hl + 2
        csum_at = hl + (16 if proto == PROTO_TCP else 6)
    elif proto == PROTO_ICMP:
        if hl + 8 > len(buf) or buf[hl] not in (0, 8):
            raise CodecError("only ICMP echo request/reply can be port-translated")
        at, csum_at = hl + 4, hl + 2
    else:
        raise CodecError(f"protocol {proto} has no ports to translate")
    if csum_at + 2 > len(buf) or at + 2 > len(buf):
        raise CodecError("truncated transport header: cannot translate its port")
    old = (buf[at] << 8) | buf[at + 1]
    if old == new_port:
        return bytes(buf)
    buf[at] = new_port >> 8
    buf[at + 1] = new_port & 0xFF
    c = (buf[csum_at] << 8) | buf[csum_at + 1]
    if not (proto == PROTO_UDP and c == 0):
        c = checksum_update16(c, old, new_port)
        if c == 0 and proto == PROTO_UDP:
            c = 0xFFFF
        buf[csum_at] = c >> 8
        buf[csum_at + 1] = c & 0xFF
    return bytes(buf)
