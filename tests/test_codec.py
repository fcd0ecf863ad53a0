"""Tests for narsuite.packet.codec, with scapy as the independent oracle.

Property tests build the same packet with our codec and with scapy and require identical bytes
(checksums included), parse each other's output into equal fields, check the RFC 1624
incremental updates against a full recomputation by scapy, and feed random, truncated and
corrupted bytes to every entry point, which may only raise CodecError.
"""

from __future__ import annotations

import socket
import struct

import attrs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.l2 import GRE
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from narsuite.packet import codec as C

# No example database: the tree is shared and the tests must not leave files behind.
PROPS = settings(
    max_examples=120, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ = settings(max_examples=300, deadline=None, database=None)


def ntoa(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, b)


# -- strategies -----------------------------------------------------------------------------

addrs = st.binary(min_size=4, max_size=4)
payloads = st.binary(max_size=48)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

# IP option numbers (low 5 bits) that scapy has no special class for: it keeps their value
# raw, so any length round-trips and scapy is a fair oracle for the generic TLV grammar.
_UNREGISTERED_IP_OPT = [5, 6, 10, 13, 14, 15, 16, 17, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]


@st.composite
def ip_option(draw) -> C.Option:
    which = draw(st.sampled_from(["nop", "rr", "ts", "tsaddr", "ra", "raw"]))
    if which == "nop":
        return C.Option(1)
    if which == "rr":  # Record Route: pointer + room for n addresses
        n = draw(st.integers(1, 4))
        filled = draw(st.integers(0, n))
        return C.Option(7, bytes([4 + 4 * filled]) + draw(st.binary(min_size=4 * n, max_size=4 * n)))
    if which == "ts":  # Timestamp, flag 0, one slot
        return C.Option(68, bytes([draw(st.sampled_from([5, 9]))]) + bytes([draw(st.integers(0, 15)) << 4])
                        + draw(st.binary(min_size=4, max_size=4)))
    if which == "tsaddr":  # Timestamp, flag 1: address + timestamp
        return C.Option(68, bytes([draw(st.sampled_from([5, 13])), 1])
                        + draw(st.binary(min_size=8, max_size=8)))
    if which == "ra":  # Router Alert
        return C.Option(148, b"\x00\x00")
    number = draw(st.sampled_from(_UNREGISTERED_IP_OPT))
    kind = (draw(st.integers(0, 1)) << 7) | (draw(st.integers(0, 3)) << 5) | number
    return C.Option(kind, draw(st.binary(max_size=10)))


def _fits(opts) -> bool:
    return len(C.build_options(opts)) <= 40


ip_options = st.tuples(st.lists(ip_option(), max_size=5), st.booleans()).map(
    lambda t: tuple(t[0]) + ((C.Option(0),) if t[1] else ())
).filter(_fits)


@st.composite
def tcp_option(draw) -> C.Option:
    which = draw(st.sampled_from(["nop", "mss", "ws", "sackok", "sack", "ts", "raw"]))
    if which == "nop":
        return C.Option(1)
    if which == "mss":
        return C.Option(2, draw(st.binary(min_size=2, max_size=2)))
    if which == "ws":
        return C.Option(3, draw(st.binary(min_size=1, max_size=1)))
    if which == "sackok":
        return C.Option(4)
    if which == "sack":
        n = draw(st.integers(1, 3))
        return C.Option(5, draw(st.binary(min_size=8 * n, max_size=8 * n)))
    if which == "ts":
        return C.Option(8, draw(st.binary(min_size=8, max_size=8)))
    return C.Option(draw(st.integers(35, 254)), draw(st.binary(max_size=8)))


tcp_options = st.tuples(st.lists(tcp_option(), max_size=5), st.booleans()).map(
    lambda t: tuple(t[0]) + ((C.Option(0),) if t[1] else ())
).filter(_fits)


def enc(o: C.Option) -> bytes:
    """One option's bytes, without padding."""
    return bytes([o.kind]) if o.kind in (0, 1) else bytes([o.kind, 2 + len(o.data)]) + o.data


def until_eol(opts) -> tuple:
    out = []
    for o in opts:
        out.append(o)
        if o.kind == 0:
            break
    return tuple(out)


def scapy_ip_options(pkt) -> tuple:
    """scapy's option list as Options, cut after the first End of List as ours is."""
    out = []
    for o in pkt.options:
        b = bytes(o)
        out.append(C.Option(b[0]) if b[0] in (0, 1) else C.Option(b[0], b[2 : b[1]]))
    return until_eol(out)


_TCP_OPT_FIELD = TCP().get_field("options")


def scapy_tcp_options(opts) -> tuple:
    out = []
    for name, val in opts:
        b = _TCP_OPT_FIELD.i2m(None, [(name, val)])
        out.append(C.Option(b[0]) if b[0] in (0, 1) else C.Option(b[0], b[2 : b[1]]))
    return tuple(out)


# Protocols scapy would dissect: keep IPv4-layer tests on opaque payloads.
other_protocols = st.integers(0, 255).filter(lambda p: p not in (1, 4, 6, 17, 41, 47, 50, 51, 58, 132))


@st.composite
def ipv4_fields(draw) -> dict:
    return dict(
        src=draw(addrs), dst=draw(addrs), protocol=draw(other_protocols), tos=draw(st.integers(0, 255)),
        ident=draw(u16), flags=draw(st.integers(0, 7)), frag_offset=draw(st.integers(0, 0x1FFF)),
        ttl=draw(st.integers(0, 255)),
    )


def scapy_ip(f: dict, opts=(), **kw) -> IP:
    return IP(src=ntoa(f["src"]), dst=ntoa(f["dst"]), proto=f["protocol"], tos=f["tos"],
              id=f["ident"], flags=f["flags"], frag=f["frag_offset"], ttl=f["ttl"],
              options=[IPOption(enc(o)) for o in opts], **kw)


def assert_ip_equal(h: C.IPv4Header, s: IP) -> None:
    assert (h.version, h.ihl, h.tos, h.total_length, h.ident, h.flags, h.frag_offset, h.ttl,
            h.protocol, h.checksum, ntoa(h.src), ntoa(h.dst)) == (
        s.version, s.ihl, s.tos, s.len, s.id, int(s.flags), s.frag, s.ttl, s.proto, s.chksum,
        s.src, s.dst)
    assert until_eol(C.parse_ipv4_options(h.options)) == scapy_ip_options(s)


# -- checksums ------------------------------------------------------------------------------


@PROPS
@given(st.binary(max_size=1500))
def test_internet_checksum_matches_scapy(data):
    assert C.internet_checksum(data) == scapy_checksum(data)
    # a buffer carrying its own checksum sums to "zero"
    if len(data) % 2 == 0:
        assert C.internet_checksum(data + struct.pack("!H", C.internet_checksum(data))) == 0


def test_internet_checksum_known_values():
    # RFC 1071 section 3 example: words 0001 f203 f4f5 f6f7 sum to ddf2 -> checksum 220d
    assert C.internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert C.internet_checksum(b"") == 0xFFFF
    assert C.internet_checksum(b"\xff\xff") == 0x0000  # a non-zero sum folds to 0xFFFF, not 0
    assert C.internet_checksum(b"\x01") == 0xFEFF  # odd byte padded on the right


@PROPS
@given(st.binary(min_size=2, max_size=200).map(lambda b: b[: len(b) & ~1]), st.data())
def test_checksum_update16_equals_full_recomputation(data, draw):
    i = draw.draw(st.integers(0, len(data) // 2 - 1)) * 2
    new = draw.draw(u16)
    changed = data[:i] + struct.pack("!H", new) + data[i + 2 :]
    assume(any(changed))  # all-zero data: both zeros of one's complement are "right"
    old = struct.unpack_from("!H", data, i)[0]
    assert C.checksum_update16(C.internet_checksum(data), old, new) == C.internet_checksum(changed)


@PROPS
@given(st.binary(min_size=4, max_size=200).map(lambda b: b[: len(b) & ~1]), addrs, st.data())
def test_checksum_update32_equals_full_recomputation(data, new, draw):
    i = draw.draw(st.integers(0, len(data) // 2 - 2)) * 2
    changed = data[:i] + new + data[i + 4 :]
    assume(any(changed))
    incremental = C.checksum_update32(C.internet_checksum(data), data[i : i + 4], new)
    assert incremental == C.internet_checksum(changed)


# -- IPv4 -----------------------------------------------------------------------------------


@PROPS
@given(ipv4_fields(), ip_options, payloads)
def test_ipv4_build_equals_scapy(f, opts, payload):
    ours = C.build_ipv4(payload=payload, options=C.build_options(opts), **f)
    theirs = bytes(scapy_ip(f, opts) / Raw(payload))
    assert ours == theirs
    assert C.ipv4_header_ok(ours)


@PROPS
@given(ipv4_fields(), ip_options, payloads, st.booleans())
def test_ipv4_parse_scapy_bytes(f, opts, payload, padded):
    theirs = bytes(scapy_ip(f, opts) / Raw(payload))
    wire = theirs + (b"\x00" * 6 if padded else b"")  # link-layer padding is ignored
    h, p = C.parse_ipv4(wire)
    assert_ip_equal(h, IP(theirs))
    assert p == payload
    # padding after the last option reads as End of Option List
    padded_opts = tuple(opts) + ((C.Option(0),) if sum(map(len, map(enc, opts))) % 4 else ())
    assert C.parse_ipv4_options(h.options) == until_eol(padded_opts)
    assert h.header_length == 20 + len(C.build_options(opts))
    # record fields are the builder's keywords: byte-exact round trip
    assert C.build_ipv4(payload=p, **attrs.asdict(h)) == theirs


def test_ipv4_explicit_values_used_verbatim():
    src, dst = C.addr_to_bytes("10.1.2.3"), C.addr_to_bytes("10.3.2.1")
    pkt = C.build_ipv4(src, dst, 17, b"abcd", total_length=999, checksum=0x1234, ihl=5)
    s = IP(pkt)
    assert (s.len, s.chksum, s.ihl) == (999, 0x1234, 5)
    assert not C.ipv4_header_ok(pkt)
    with pytest.raises(C.CodecError, match="total length 999"):
        C.parse_ipv4(pkt)


def test_ipv4_properties_and_addresses():
    h, _ = C.parse_ipv4(C.build_ipv4(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 6, flags=C.IP_MF))
    assert h.is_fragment and h.header_length == 20
    assert C.addr_to_str(h.src) == "1.2.3.4" and C.addr_to_bytes("5.6.7.8") == h.dst
    for bad in ("1.2.3", "1", "300.1.1.1", "::1"):
        with pytest.raises(C.CodecError):
            C.addr_to_bytes(bad)


# -- UDP / TCP ------------------------------------------------------------------------------


@PROPS
@given(addrs, addrs, u16, u16, u16, payloads)
def test_udp_build_and_parse_vs_scapy(src, dst, sport, dport, ident, payload):
    ours = C.build_ipv4(src, dst, C.PROTO_UDP, C.build_udp(sport, dport, payload, src=src, dst=dst),
                        ident=ident)
    theirs = bytes(IP(src=ntoa(src), dst=ntoa(dst), id=ident) / UDP(sport=sport, dport=dport) / Raw(payload))
    assert ours == theirs
    s = IP(theirs)
    ih, seg = C.parse_ipv4(theirs)
    assert_ip_equal(ih, s)
    uh, p = C.parse_udp(seg)
    su = s[UDP]
    assert (uh.sport, uh.dport, uh.length, uh.checksum) == (su.sport, su.dport, su.len, su.chksum)
    assert uh.checksum != 0 and p == payload
    assert C.transport_checksum_ok(theirs)
    assert C.build_udp(payload=p, src=src, dst=dst, **attrs.asdict(uh)) == seg


def _udp_payload_with_zero_checksum(src: bytes, dst: bytes, sport: int, dport: int, base: bytes) -> bytes:
    """A payload for which the computed UDP checksum is 0 (sent as 0xFFFF)."""
    base = base + b"\x00" * (len(base) % 2)
    seg = C.build_udp(sport, dport, base + b"\x00\x00", src=src, dst=dst, checksum=0)
    c = C.transport_checksum(src, dst, C.PROTO_UDP, seg)
    return base + struct.pack("!H", c)


@PROPS
@given(addrs, addrs, u16, u16, payloads)
def test_udp_computed_zero_is_sent_as_ffff(src, dst, sport, dport, base):
    payload = _udp_payload_with_zero_checksum(src, dst, sport, dport, base)
    seg = C.build_udp(sport, dport, payload, src=src, dst=dst)
    assert seg[6:8] == b"\xff\xff"
    theirs = bytes(IP(src=ntoa(src), dst=ntoa(dst)) / UDP(sport=sport, dport=dport) / Raw(payload))
    assert theirs[20:] == seg
    assert C.transport_checksum_ok(C.build_ipv4(src, dst, 17, seg))


@PROPS
@given(addrs, addrs, u16, u16, u32, u32, st.integers(0, 0x1FF), st.integers(0, 7), u16, u16,
       tcp_options, payloads)
def test_tcp_build_and_parse_vs_scapy(src, dst, sport, dport, seq, ack, flags, reserved, window,
                                      urgent, opts, payload):
    seg = C.build_tcp(sport, dport, payload, src=src, dst=dst, seq=seq, ack=ack, flags=flags,
                      reserved=reserved, window=window, urgent=urgent, options=C.build_options(opts))
    ours = C.build_ipv4(src, dst, C.PROTO_TCP, seg)
    theirs = bytes(IP(src=ntoa(src), dst=ntoa(dst), id=0)
                   / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, reserved=reserved,
                         window=window, urgptr=urgent, options=[(o.kind, o.data) for o in opts])
                   / Raw(payload))
    assert ours == theirs
    s = IP(theirs)[TCP]
    th, p = C.parse_tcp(C.parse_ipv4(theirs)[1])
    assert (th.sport, th.dport, th.seq, th.ack, th.data_offset, th.reserved, th.flags, th.window,
            th.checksum, th.urgent) == (s.sport, s.dport, s.seq, s.ack, s.dataofs, s.reserved,
                                        int(s.flags), s.window, s.chksum, s.urgptr)
    padded_opts = tuple(opts) + ((C.Option(0),) if sum(map(len, map(enc, opts))) % 4 else ())
    assert C.parse_tcp_options(th.options) == scapy_tcp_options(s.options) == until_eol(padded_opts)
    assert p == payload
    assert C.transport_checksum_ok(theirs)
    assert C.build_tcp(payload=p, src=src, dst=dst, **attrs.asdict(th)) == seg


# -- ICMP -----------------------------------------------------------------------------------


@PROPS
@given(u16, u16, payloads, st.booleans())
def test_icmp_echo_vs_scapy(ident, seq, data, reply):
    ours = C.build_icmp_echo(ident, seq, data, reply=reply)
    theirs = bytes(ICMP(type=0 if reply else 8, id=ident, seq=seq) / Raw(data))
    assert ours == theirs
    m, body = C.parse_icmp(theirs)
    s = ICMP(theirs)
    assert (m.type, m.code, m.checksum, m.ident, m.seq) == (s.type, s.code, s.chksum, s.id, s.seq)
    assert body == data and not m.is_error
    assert C.internet_checksum(ours) == 0


@PROPS
@given(ipv4_fields(), ip_options, st.binary(min_size=0, max_size=40),
       st.sampled_from([(3, 1), (3, 3), (3, 4), (11, 0), (12, 0), (5, 1), (4, 0)]), u16)
def test_icmp_error_quotes_offending_header(f, opts, payload, type_code, mtu):
    offending = C.build_ipv4(payload=payload, options=C.build_options(opts), **f)
    t, code = type_code
    rest = mtu if (t, code) == (3, 4) else 0
    ours = C.build_icmp_error(t, code, offending, rest=rest)
    hl = len(offending) - len(payload)
    theirs = bytes(ICMP(type=t, code=code, nexthopmtu=mtu) / Raw(offending[: hl + 8])) if rest else \
        bytes(ICMP(type=t, code=code) / Raw(offending[: hl + 8]))
    assert ours == theirs
    m, body = C.parse_icmp(ours)
    assert m.is_error and m.type == t and m.code == code
    if rest:
        assert m.next_hop_mtu == mtu
    quoted, leading = C.parse_icmp_error(body)
    assert_ip_equal(quoted, IP(offending))
    assert leading == payload[:8]


def test_icmp_error_rejects_non_error_type():
    with pytest.raises(C.CodecError, match="not an error"):
        C.build_icmp_error(8, 0, C.build_ipv4(b"\0\0\0\1", b"\0\0\0\2", 17))


# -- GRE ------------------------------------------------------------------------------------

gre_protocols = u16.filter(lambda p: p != 0x880B)  # scapy dispatches 0x880b to PPTP GRE


@PROPS
@given(gre_protocols, st.booleans(), st.one_of(st.none(), u32), st.one_of(st.none(), u32),
       st.integers(0, 0x7F), u16, payloads)
def test_gre_vs_scapy(proto, csum, key, seq, reserved0, reserved1, payload):
    r1 = reserved1 if csum else 0
    ours = C.build_gre(proto, payload, checksum_present=csum, key=key, seq=seq,
                       reserved0=reserved0, reserved1=r1)
    g = GRE(chksum_present=int(csum), key_present=int(key is not None),
            seqnum_present=int(seq is not None), recursion_control=reserved0 >> 5,
            flags=reserved0 & 0x1F, proto=proto, key=key, sequence_number=seq,
            offset=r1 if csum else None)
    theirs = bytes(g / Raw(payload))
    assert ours == theirs
    h, p = C.parse_gre(theirs)
    s = GRE(theirs)
    assert (h.protocol, h.checksum_present, h.checksum, h.key, h.seq, h.reserved0, h.reserved1) == (
        s.proto, bool(s.chksum_present), s.chksum if csum else None, s.key if key is not None else None,
        s.sequence_number if seq is not None else None, ((s.recursion_control & 3) << 5) | s.flags,
        s.offset if csum else 0)
    assert p == payload
    assert C.gre_checksum_ok(theirs)
    assert C.build_gre(payload=p, **attrs.asdict(h)) == theirs
    if csum:
        bad = bytearray(theirs)
        bad[4] ^= 0x01
        assert not C.gre_checksum_ok(bytes(bad))


@PROPS
@given(addrs, addrs, addrs, addrs, st.one_of(st.none(), u32), st.one_of(st.none(), u32),
       st.booleans(), u16, payloads, st.booleans())
def test_gre_encapsulate_vs_scapy(isrc, idst, osrc, odst, key, seq, csum, ident, payload, df):
    inner = C.build_ipv4(isrc, idst, 17, C.build_udp(1, 2, payload, src=isrc, dst=idst),
                         tos=0x10, flags=C.IP_DF if df else 0)
    ours = C.gre_encapsulate(inner, osrc, odst, key=key, seq=seq, checksum=csum, ident=ident)
    theirs = bytes(IP(src=ntoa(osrc), dst=ntoa(odst), id=ident, tos=0x10, flags="DF" if df else 0)
                   / GRE(chksum_present=int(csum), key_present=int(key is not None),
                         seqnum_present=int(seq is not None), key=key, sequence_number=seq,
                         proto=0x0800)
                   / Raw(inner))
    assert ours == theirs
    assert C.gre_decapsulate(ours) == (0x0800, key, seq, inner)
    assert C.decapsulate(ours) == (C.PROTO_GRE, key, inner)
    assert bytes(IP(ours)[GRE].payload) == inner


def test_gre_rejects_rfc1701_layouts_and_bad_checksum():
    with pytest.raises(C.CodecError, match="routing"):
        C.parse_gre(b"\x40\x00\x08\x00" + b"\x00" * 8)
    with pytest.raises(C.CodecError, match="version 1"):
        C.parse_gre(b"\x20\x01\x88\x0b" + b"\x00" * 8)
    with pytest.raises(C.CodecError, match="truncated GRE header"):
        C.parse_gre(b"\x30\x00\x08\x00" + b"\x00" * 4)  # K and S need 8 more bytes
    src, dst = b"\x01\x01\x01\x01", b"\x02\x02\x02\x02"
    inner = C.build_ipv4(src, dst, 17)
    pkt = bytearray(C.gre_encapsulate(inner, src, dst, checksum=True))
    pkt[-1] ^= 0xFF
    with pytest.raises(C.CodecError, match="GRE checksum"):
        C.gre_decapsulate(bytes(pkt))
    non_ip = C.build_ipv4(src, dst, 47, C.build_gre(0x6558, b"\x00" * 30))
    assert C.gre_decapsulate(non_ip)[0] == 0x6558
    with pytest.raises(C.CodecError, match="not IPv4"):
        C.decapsulate(non_ip)


# -- IP-in-IP -------------------------------------------------------------------------------


@PROPS
@given(addrs, addrs, addrs, addrs, ip_options, payloads, st.integers(0, 255), u16,
       st.integers(1, 255), st.booleans())
def test_ipip_roundtrip_vs_scapy(isrc, idst, osrc, odst, opts, payload, tos, ident, ttl, df):
    inner = C.build_ipv4(isrc, idst, C.PROTO_UDP, C.build_udp(7, 9, payload, src=isrc, dst=idst),
                         options=C.build_options(opts), tos=tos, flags=C.IP_DF if df else 0)
    ours = C.ipip_encapsulate(inner, osrc, odst, ttl=ttl, ident=ident)
    theirs = bytes(IP(src=ntoa(osrc), dst=ntoa(odst), proto=4, tos=tos, id=ident, ttl=ttl,
                      flags="DF" if df else 0) / Raw(inner))
    assert ours == theirs  # TOS and DF copied from the inner header (RFC 2003 3.1)
    assert C.ipip_decapsulate(ours) == inner
    assert C.decapsulate(ours) == (C.PROTO_IPIP, None, inner)
    assert bytes(IP(ours)[IP:2]) == inner
    outer, body = C.parse_ipv4(ours)
    assert (outer.protocol, outer.src, outer.dst, body) == (4, osrc, odst, inner)


@PROPS
@given(addrs, addrs, addrs, addrs, ip_options, payloads, st.integers(0, 255), st.integers(1, 255),
       st.booleans())
def test_tunnel_header_is_ipip_encapsulate_with_its_constants_summed_once(
        isrc, idst, osrc, odst, opts, payload, tos, ttl, df):
    """TunnelHeader.ipip (the mipproxy's per-care-of-address header) builds the very bytes
    ipip_encapsulate builds with identification 0, and scapy agrees on the checksum."""
    inner = C.build_ipv4(isrc, idst, C.PROTO_UDP, C.build_udp(7, 9, payload, src=isrc, dst=idst),
                         options=C.build_options(opts), tos=tos, flags=C.IP_DF if df else 0)
    ours = C.TunnelHeader(osrc, odst, ttl=ttl).ipip(inner)
    assert ours == C.ipip_encapsulate(inner, osrc, odst, ttl=ttl)
    assert ours == bytes(IP(src=ntoa(osrc), dst=ntoa(odst), proto=4, tos=tos, id=0, ttl=ttl,
                            flags="DF" if df else 0) / Raw(inner))


def test_tunnel_header_refuses_what_ipip_encapsulate_refuses():
    src, dst = b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02"
    with pytest.raises(C.CodecError, match="4-byte"):
        C.TunnelHeader(src[:3], dst)
    with pytest.raises(C.CodecError, match="too long"):
        C.TunnelHeader(src, dst).ipip(C.build_ipv4(src, dst, 17, b"\x00" * 65500))


def test_ipip_explicit_tos_df_and_errors():
    src, dst = b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02"
    inner = C.build_ipv4(src, dst, 17, b"x" * 8, tos=0xB8, flags=C.IP_DF)
    outer, _ = C.parse_ipv4(C.ipip_encapsulate(inner, dst, src, tos=0, df=False, ident=77))
    assert (outer.tos, outer.flags, outer.ident) == (0, 0, 77)
    with pytest.raises(C.CodecError, match="not IPv4"):
        C.ipip_encapsulate(b"\x60" + b"\x00" * 39, src, dst)
    frag = C.build_ipv4(src, dst, 4, inner, flags=C.IP_MF)
    with pytest.raises(C.CodecError, match="fragment"):
        C.ipip_decapsulate(frag)
    with pytest.raises(C.CodecError, match="expected 4"):
        C.ipip_decapsulate(C.build_ipv4(src, dst, 17, inner))
    with pytest.raises(C.CodecError, match="not a tunnel"):
        C.decapsulate(C.build_ipv4(src, dst, 17, inner))
    with pytest.raises(C.CodecError, match="not IPv4"):
        C.ipip_decapsulate(C.build_ipv4(src, dst, 4, b"\x60" + b"\x00" * 39))
    with pytest.raises(C.CodecError, match="too long"):
        C.ipip_encapsulate(C.build_ipv4(src, dst, 17, b"\x00" * 65500), src, dst)


# -- fast helpers: peek, rewrite, TTL -------------------------------------------------------


@st.composite
def transport_packet(draw):
    """(kind, scapy packet) with kind in tcp / udp / udp0 (no checksum) / icmp / other."""
    kind = draw(st.sampled_from(["tcp", "udp", "udp0", "icmp", "other"]))
    opts = draw(ip_options)
    ip = IP(src=ntoa(draw(addrs)), dst=ntoa(draw(addrs)), id=draw(u16), ttl=draw(st.integers(1, 255)),
            options=[IPOption(enc(o)) for o in opts], **({"proto": 99} if kind == "other" else {}))
    payload = Raw(draw(payloads))
    if kind == "tcp":
        pkt = ip / TCP(sport=draw(u16), dport=draw(u16), seq=draw(u32), flags="PA") / payload
    elif kind == "udp":
        pkt = ip / UDP(sport=draw(u16), dport=draw(u16)) / payload
    elif kind == "udp0":
        pkt = ip / UDP(sport=draw(u16), dport=draw(u16), chksum=0) / payload
    elif kind == "icmp":
        pkt = ip / ICMP(type=8, id=draw(u16), seq=draw(u16)) / payload
    else:
        pkt = ip / payload
    return kind, IP(bytes(pkt))


def scapy_rewritten(kind: str, pkt: IP, field: str, new: bytes) -> bytes:
    p = pkt.copy()
    setattr(p, field, ntoa(new))
    del p.chksum
    if kind == "tcp":
        del p[TCP].chksum
    elif kind == "udp":
        del p[UDP].chksum
    return bytes(p)


@PROPS
@given(transport_packet(), addrs, st.sampled_from(["src", "dst"]))
def test_rewrite_equals_full_recomputation(kp, new, field):
    kind, pkt = kp
    raw = bytes(pkt)
    fn = C.rewrite_ipv4_dst if field == "dst" else C.rewrite_ipv4_src
    out = fn(raw, new)
    assert out == scapy_rewritten(kind, pkt, field, new)
    assert C.ipv4_header_ok(out)
    if kind in ("tcp", "udp", "udp0"):
        assert C.transport_checksum_ok(out)
    if kind == "udp0":
        assert out[-len(pkt[UDP]) + 6 :][:2] == b"\x00\x00"
    # the input is not modified, also when it is a bytearray
    buf = bytearray(raw)
    assert fn(buf, new) == out and buf == raw


@PROPS
@given(addrs, addrs, u16, u16, payloads, st.sampled_from(["src", "dst"]), st.sampled_from(["udp", "tcp"]))
def test_rewrite_hits_zero_checksum(src, dst, sport, dport, payload, field, kind):
    """Pick the new address so that the new transport sum is 0xFFFF (computed checksum 0):
    UDP must send 0xFFFF, TCP 0 -- both must equal scapy's full recomputation."""
    if kind == "udp":
        pkt = IP(src=ntoa(src), dst=ntoa(dst)) / UDP(sport=sport, dport=dport) / Raw(payload)
        cs_at = 20 + 6
    else:
        pkt = IP(src=ntoa(src), dst=ntoa(dst)) / TCP(sport=sport, dport=dport) / Raw(payload)
        cs_at = 20 + 16
    raw = bytes(pkt)
    c = struct.unpack_from("!H", raw, cs_at)[0]
    old = src if field == "src" else dst
    w = struct.unpack("!H", old[2:])[0]
    # current sum S = ~c; adding (w' - w) == c makes it 0 mod 0xFFFF
    new = old[:2] + struct.pack("!H", (w + c) % 0xFFFF)
    assume(new != old)
    fn = C.rewrite_ipv4_dst if field == "dst" else C.rewrite_ipv4_src
    out = fn(raw, new)
    assert out == scapy_rewritten(kind, IP(raw), field, new)
    assert out[cs_at : cs_at + 2] == (b"\xff\xff" if kind == "udp" else b"\x00\x00")
    # and back again from the 0xFFFF / 0 value
    assert fn(out, old) == raw


def test_rewrite_fragments():
    src, dst, new = b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", b"\xc0\xa8\x00\x09"
    full = bytes(IP(src=ntoa(src), dst=ntoa(dst), id=5) / UDP(sport=1, dport=2) / Raw(b"z" * 40))
    udp = full[20:]
    first = C.build_ipv4(src, dst, 17, udp[:16], ident=5, flags=C.IP_MF)
    later = C.build_ipv4(src, dst, 17, udp[16:], ident=5, frag_offset=2)
    expect_udp = bytes(IP(src=ntoa(src), dst=ntoa(new), id=5) / UDP(sport=1, dport=2) / Raw(b"z" * 40))[20:]
    out_first = C.rewrite_ipv4_dst(first, new)
    assert out_first[20:] == expect_udp[:16]  # first fragment: transport checksum fixed
    out_later = C.rewrite_ipv4_dst(later, new)
    assert out_later[20:] == udp[16:]  # non-first fragment: payload untouched
    assert C.ipv4_header_ok(out_first) and C.ipv4_header_ok(out_later)
    tiny = C.build_ipv4(src, dst, 6, b"\x00" * 8, flags=C.IP_MF)  # TCP checksum is in fragment 2
    with pytest.raises(C.CodecError, match="reassemble"):
        C.rewrite_ipv4_dst(tiny, new)


@PROPS
@given(transport_packet())
def test_decrement_ttl_and_peek(kp):
    kind, pkt = kp
    raw = bytes(pkt)
    out = C.decrement_ttl(raw)
    p = pkt.copy()
    p.ttl -= 1
    del p.chksum
    assert out == bytes(p)
    assert C.ipv4_header_ok(out)
    assert C.peek_ipv4(raw) == (pkt.ihl * 4, pkt.proto, C.addr_to_bytes(pkt.src), C.addr_to_bytes(pkt.dst))
    if kind in ("tcp", "udp", "udp0"):
        assert C.peek_ports(memoryview(raw)) == (pkt.sport, pkt.dport)
    else:
        with pytest.raises(C.CodecError, match="no ports"):
            C.peek_ports(raw)


def test_decrement_ttl_to_zero_then_refuse():
    pkt = C.build_ipv4(b"\x01\x02\x03\x04", b"\x04\x03\x02\x01", 17, ttl=1)
    out = C.decrement_ttl(pkt)
    assert out[8] == 0 and C.ipv4_header_ok(out)
    with pytest.raises(C.CodecError, match="TTL"):
        C.decrement_ttl(out)


def _header_checksum_lands_on_zero(ttl: int) -> bytes:
    """A UDP packet whose IPv4 header checksum is 0 when its TTL is ``ttl`` (the ident word
    is chosen to bring the header sum to 0xFFFF)."""
    src, dst = b"\x0a\x01\x02\x03", b"\xc0\xa8\x07\x08"
    c = C.parse_ipv4(C.build_ipv4(src, dst, 17, C.build_udp(1, 2, src=src, dst=dst), ttl=ttl))[0].checksum
    pkt = C.build_ipv4(src, dst, 17, C.build_udp(1, 2, src=src, dst=dst), ttl=ttl, ident=c)
    assert pkt[10:12] == b"\x00\x00"
    return pkt


def test_incremental_header_checksum_landing_on_zero():
    """The RFC 1624 eqn. 3 corner: the new header checksum is 0x0000, never 0xFFFF."""
    target = _header_checksum_lands_on_zero(ttl=63)
    before = bytearray(target)
    before[8] = 64
    before[10:12] = struct.pack("!H", C.internet_checksum(bytes(before[:10]) + bytes(before[12:20])))
    assert C.decrement_ttl(bytes(before)) == target
    other = b"\x01\x01\x01\x01"
    moved = IP(target)
    moved.dst = ntoa(other)
    del moved.chksum, moved[UDP].chksum
    assert C.rewrite_ipv4_dst(bytes(moved), target[16:20]) == target


def test_ipv4_header_ok_detects_any_single_byte_change():
    pkt = C.build_ipv4(b"\x01\x02\x03\x04", b"\x04\x03\x02\x01", 17, b"data",
                       options=C.build_options([C.Option(7, b"\x04" + b"\x00" * 8)]))
    assert C.ipv4_header_ok(pkt)
    hl = C.peek_ipv4(pkt)[0]
    for i in range(hl):
        for x in (0x01, 0x80, 0xFF):
            bad = bytearray(pkt)
            bad[i] ^= x
            assert not C.ipv4_header_ok(bytes(bad)), (i, x)


# -- malformed input ------------------------------------------------------------------------

A, B = b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02"
GOOD = C.build_ipv4(A, B, 17, C.build_udp(1, 2, b"payload", src=A, dst=B))


def _hdr(**kw) -> bytes:
    return C.build_ipv4(A, B, 17, b"\x00" * 8, **kw)


@pytest.mark.parametrize(
    "fn, data, message",
    [
        (C.parse_ipv4, GOOD[:19], "truncated IPv4 header: 19 bytes"),
        (C.parse_ipv4, b"\x65" + GOOD[1:], "version 6"),
        (C.parse_ipv4, _hdr(ihl=4), "bad IHL 4"),
        (C.parse_ipv4, _hdr(ihl=15), "IHL says 60 bytes"),
        (C.parse_ipv4, _hdr(total_length=12), "smaller than the header length"),
        (C.parse_ipv4, GOOD[:-1], "truncated IPv4 packet"),
        (C.parse_ipv4, _hdr(options=b"\x07\x09\x04\x00"), "runs past the header"),
        (C.parse_ipv4, _hdr(options=b"\x01\x01\x01\x07"), "no length byte"),
        (C.parse_ipv4, _hdr(options=b"\x83\x01\x00\x00"), "bad length 1"),
        (C.parse_udp, b"\x00" * 7, "truncated UDP header"),
        (C.parse_udp, b"\x00\x01\x00\x02\x00\x07\x00\x00", "bad UDP length 7"),
        (C.parse_udp, b"\x00\x01\x00\x02\x00\x10\x00\x00", "length field 16"),
        (C.parse_tcp, b"\x00" * 19, "truncated TCP header"),
        (C.parse_tcp, b"\x00" * 12 + b"\x40" + b"\x00" * 7, "bad TCP data offset 4"),
        (C.parse_tcp, b"\x00" * 12 + b"\x60" + b"\x00" * 7, "data offset says 24"),
        (C.parse_tcp, b"\x00" * 12 + b"\x60" + b"\x00" * 7 + b"\x02\x05\x00\x00", "runs past"),
        (C.parse_icmp, b"\x08\x00\x00", "truncated ICMP"),
        (C.parse_icmp_error, b"\x45" + b"\x00" * 10, "truncated IPv4 header"),
        (C.parse_gre, b"\x00\x00\x08", "truncated GRE"),
        (C.peek_ipv4, b"\x46" + GOOD[1:20], "bad IHL"),
        (C.decrement_ttl, b"\x35" + GOOD[1:], "version 3"),
        (C.ipip_decapsulate, C.build_ipv4(A, B, 4, b"\x45" + b"\x00" * 10), "truncated IPv4 header"),
        (C.decapsulate, C.build_ipv4(A, B, 47, b"\x00\x00"), "truncated GRE"),
        (C.gre_decapsulate, C.build_ipv4(A, B, 47, b"\x20\x00\x08\x00\x00"), "truncated GRE key"),
        (C.gre_decapsulate, C.build_ipv4(A, B, 47, b"\x10\x00\x08\x00\x00"), "truncated GRE sequence"),
        (C.gre_decapsulate, C.build_ipv4(A, B, 47, b"\x80\x00\x08\x00\x00"), "truncated GRE checksum"),
        (C.peek_ports, C.build_ipv4(A, B, 17, b"\x00\x01"), "no ports"),
    ],
)
def test_malformed_input_raises_codec_error(fn, data, message):
    with pytest.raises(C.CodecError, match=message) as ei:
        fn(data)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize(
    "call",
    [
        lambda: C.build_ipv4(A, B, 256),
        lambda: C.build_ipv4(A, b"\x00" * 5, 17),
        lambda: C.build_ipv4(A, B, 17, ttl=-1),
        lambda: C.build_ipv4(A, B, 17, frag_offset=0x2000),
        lambda: C.build_ipv4(A, B, 17, options=b"\x01" * 44),
        lambda: C.build_udp(70000, 1, src=A, dst=B),
        lambda: C.build_tcp(1, 1, src=A, dst=B, flags=0x200),
        lambda: C.build_icmp(256, 0),
        lambda: C.build_gre(0x10000),
        lambda: C.build_gre(0x800, key=2**32),
        lambda: C.build_options([C.Option(1, b"x")]),
        lambda: C.rewrite_ipv4_dst(GOOD, b"\x01\x02\x03"),
        lambda: C.ipip_encapsulate(GOOD, A, B, ttl=300),
    ],
)
def test_bad_build_arguments_raise_codec_error(call):
    with pytest.raises(C.CodecError):
        call()


def _every_entry_point(data: bytes) -> list[str]:
    """Call every parser/helper on ``data``; returns what went wrong: any exception other than
    CodecError, any check that answered other than a bool (the callers assert it is empty)."""
    calls = [
        C.parse_ipv4, C.parse_udp, C.parse_tcp, C.parse_icmp, C.parse_icmp_error, C.parse_gre,
        C.parse_ipv4_options, C.parse_tcp_options, C.peek_ipv4, C.peek_ports, C.decrement_ttl,
        C.ipip_decapsulate, C.gre_decapsulate, C.decapsulate,
        lambda d: C.rewrite_ipv4_dst(d, A), lambda d: C.rewrite_ipv4_src(d, B),
        lambda d: C.ipip_encapsulate(d, A, B), lambda d: C.gre_encapsulate(d, A, B, key=1),
        lambda d: C.build_icmp_error(3, 1, d),
    ]
    wrong = []
    for fn in calls:
        for arg in (data, bytearray(data), memoryview(data)):
            try:
                fn(arg)
            except C.CodecError:
                pass
            except Exception as e:  # what the fuzz tests look for
                wrong.append(f"{getattr(fn, '__name__', fn)}({type(arg).__name__}): {e!r}")
    for check in (C.ipv4_header_ok, C.transport_checksum_ok, C.gre_checksum_ok):
        answer = check(data)
        if answer not in (True, False):
            wrong.append(f"{check.__name__} answered {answer!r}")
    return wrong


ipv4ish = st.one_of(
    st.binary(max_size=100),
    st.builds(lambda b0, rest: bytes([b0]) + rest, st.integers(0x40, 0x4F), st.binary(max_size=100)),
    # a valid outer header around random bytes reaches the transport and tunnel parsers
    st.builds(lambda proto, frag, body: C.build_ipv4(A, B, proto, body, frag_offset=frag),
              st.sampled_from([1, 4, 6, 17, 47, 99]), st.sampled_from([0, 0, 0, 1]),
              st.binary(max_size=60)),
)


@FUZZ
@given(ipv4ish)
def test_random_bytes_only_raise_codec_error(data):
    """Fails on any exception but CodecError, or a checksum check that is not a bool."""
    assert _every_entry_point(data) == []


def _valid_packets(payload: bytes, opts: bytes) -> list[bytes]:
    inner = C.build_ipv4(A, B, 17, C.build_udp(5, 6, payload, src=A, dst=B), options=opts)
    return [
        inner,
        C.build_ipv4(A, B, 6, C.build_tcp(5, 6, payload, src=A, dst=B, options=b"\x02\x04\x05\xb4"),
                     options=opts),
        C.build_ipv4(A, B, 1, C.build_icmp_error(3, 3, inner)),
        C.ipip_encapsulate(inner, B, A),
        C.gre_encapsulate(inner, B, A, key=3, seq=4, checksum=True),
    ]


@FUZZ
@given(payloads, ip_options, st.integers(0, 4), st.data())
def test_truncated_packets_raise_codec_error(payload, opts, which, data):
    pkt = _valid_packets(payload, C.build_options(opts))[which]
    cut = data.draw(st.integers(0, len(pkt) - 1))
    short = pkt[:cut]
    with pytest.raises(C.CodecError):
        C.parse_ipv4(short)
    if which >= 3:
        with pytest.raises(C.CodecError):
            C.decapsulate(short)
    assert _every_entry_point(short) == []


@FUZZ
@given(payloads, ip_options, st.integers(0, 4), st.data())
def test_corrupted_packets_only_raise_codec_error(payload, opts, which, data):
    """Valid packets with 1-3 bytes changed: as above, only CodecError may escape."""
    pkt = bytearray(_valid_packets(payload, C.build_options(opts))[which])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(pkt) - 1))
        pkt[i] = data.draw(st.integers(0, 255))
    assert _every_entry_point(bytes(pkt)) == []


# ---------------------------------------------------------------- NAPT rewrite
_addr = st.binary(min_size=4, max_size=4)


@settings(max_examples=150, deadline=None)
@given(proto=st.sampled_from(["tcp", "udp", "icmp"]), src=_addr, dst=_addr, new=_addr,
       sport=st.integers(0, 65535), dport=st.integers(0, 65535), new_port=st.integers(0, 65535),
       source=st.booleans(), payload=st.binary(max_size=64))
def test_napt_rewrite_equals_scapy_recomputation(proto, src, dst, new, sport, dport, new_port,
                                                 source, payload):
    ip = IP(src=socket.inet_ntoa(src), dst=socket.inet_ntoa(dst), id=7)
    if proto == "tcp":
        pkt = ip / TCP(sport=sport, dport=dport) / Raw(payload)
    elif proto == "udp":
        pkt = ip / UDP(sport=sport, dport=dport) / Raw(payload)
    else:
        pkt = ip / ICMP(type=8 if source else 0, id=sport, seq=dport) / Raw(payload)
    original = bytes(pkt)
    got = C.napt_rewrite(original, new, new_port, source=source)
    expect = IP(original)
    if source:
        expect.src = socket.inet_ntoa(new)
    else:
        expect.dst = socket.inet_ntoa(new)
    layer = expect.payload
    if proto == "icmp":
        layer.id = new_port
    elif source:
        layer.sport = new_port
    else:
        layer.dport = new_port
    del expect.chksum
    del layer.chksum
    want = bytes(expect)
    if proto == "udp" and want[26:28] == b"\x00\x00":
        want = want[:26] + b"\xff\xff" + want[28:]  # a computed 0 is sent as 0xFFFF
    assert got == want


def test_napt_rewrite_refuses_what_has_no_port():
    frag = bytes(IP(src="10.0.0.1", dst="10.0.0.2", frag=10) / UDP())
    with pytest.raises(C.CodecError, match="fragment"):
        C.napt_rewrite(frag, b"\x01\x02\x03\x04", 5, source=True)
    gre = bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / (b"\x00" * 8))
    with pytest.raises(C.CodecError, match="no ports"):
        C.napt_rewrite(gre, b"\x01\x02\x03\x04", 5, source=True)
    unreachable = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=3, code=1) / (b"x" * 28))
    with pytest.raises(C.CodecError, match="echo"):
        C.napt_rewrite(unreachable, b"\x01\x02\x03\x04", 5, source=True)
