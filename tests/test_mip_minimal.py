"""Minimal encapsulation within IP (RFC 2004) in narsuite.packet.codec, checked field by
field against the RFC's layout, with scapy building the inner packets and checking the
header checksums."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from narsuite.packet import codec as C

A = socket.inet_aton


def _inner(**kw) -> bytes:
    return bytes(IP(src="10.2.0.100", dst="203.0.113.1", ttl=33, id=0x1234, **kw)
                 / UDP(sport=500, dport=500) / Raw(b"x" * 40))


def _ones_ok(b: bytes) -> bool:
    return C.internet_checksum(b) == 0


@pytest.mark.parametrize("src, sbit", [("10.2.0.100", False), ("198.51.100.1", True)])
def test_layout_of_rfc_2004_section_3(src: str, sbit: bool) -> None:
    inner = _inner()
    out = C.minimal_encapsulate(inner, A(src), A("192.0.2.7"))
    o = IP(out)
    mlen = 12 if sbit else 8
    assert o.proto == 55 and o.dst == "192.0.2.7" and o.src == src
    assert o.len == len(inner) + mlen == len(out)
    assert o.ttl == 33 and o.id == 0x1234
    assert _ones_ok(out[:20])  # the outer header checksum
    mh = out[20:20 + mlen]
    assert mh[0] == 17  # the original protocol
    assert mh[1] == (0x80 if sbit else 0)
    assert mh[4:8] == A("203.0.113.1")  # the original destination
    if sbit:
        assert mh[8:12] == A("10.2.0.100")  # the original source
    assert _ones_ok(mh)  # the forwarding header's own checksum
    assert out[20 + mlen:] == inner[20:]
    back = C.minimal_decapsulate(out)
    assert back == inner
    assert C.decapsulate(out) == (C.PROTO_MINIMAL, None, inner)


def test_fragments_and_corruption_refused() -> None:
    frag = _inner(flags="MF")
    with pytest.raises(C.CodecError, match="fragment"):
        C.minimal_encapsulate(frag, A("1.1.1.1"), A("2.2.2.2"))
    out = bytearray(C.minimal_encapsulate(_inner(), A("1.1.1.1"), A("2.2.2.2")))
    out[25] ^= 1  # inside the forwarding header
    with pytest.raises(C.CodecError, match="checksum"):
        C.minimal_decapsulate(bytes(out))
    with pytest.raises(C.CodecError):
        C.minimal_decapsulate(bytes(out[:24]))
    ipip = C.ipip_encapsulate(_inner(), A("1.1.1.1"), A("2.2.2.2"))
    with pytest.raises(C.CodecError, match="expected 55"):
        C.minimal_decapsulate(ipip)


def test_scapy_reads_the_restored_packet() -> None:
    inner = _inner()
    back = IP(C.minimal_decapsulate(C.minimal_encapsulate(inner, A("1.1.1.1"), A("2.2.2.2"))))
    # The payload by offset, not back[Raw]: once any test has loaded scapy's ISAKMP layer,
    # UDP port 500 dissects as ISAKMP and there is no Raw layer.
    assert back[UDP].sport == 500 and bytes(back)[back.ihl * 4 + 8:] == b"x" * 40
    assert back.chksum == IP(inner).chksum
    assert struct.unpack("!H", bytes(back)[2:4])[0] == len(inner)


def test_cached_forwarding_and_restore_are_the_plain_functions_bytes() -> None:
    """The data path's caches (RFC 3519 next header 55) change no byte: forwarding headers
    by source/destination, restored headers by a forwarding header already checked; a
    fragment is refused on the cached path too; a corrupted header is not a cached one and
    fails its checksum; the caches stay bounded whatever arrives."""
    pub, nat = A("203.0.113.1"), A("203.0.113.2")
    fwd_cache: dict = {}
    rst_cache: dict = {}
    for i in range(3):
        inner = bytes(IP(src="10.2.0.3", dst="10.2.0.100", proto=50, id=i) / Raw(b"e" * (40 + i)))
        plain = C.minimal_forwarding(inner, pub)
        assert C.minimal_forwarding_cached(inner, pub, fwd_cache, b"\x04\x37\0\0") == b"\x04\x37\0\0" + plain
        back = C.minimal_restore(plain, nat, pub)
        assert C.minimal_restore_cached(plain, "203.0.113.2", pub, rst_cache) == back
        assert IP(back).src == "10.2.0.3" and bytes(IP(back).payload) == b"e" * (40 + i)
    assert len(fwd_cache) == 1 and len(rst_cache) == 1
    frag = bytes(IP(src="10.2.0.3", dst="10.2.0.100", proto=50, flags="MF") / Raw(b"e" * 40))
    with pytest.raises(C.CodecError, match="fragment"):
        C.minimal_forwarding_cached(frag, pub, fwd_cache)
    bad = bytearray(C.minimal_forwarding(
        bytes(IP(src="10.2.0.3", dst="10.2.0.100", proto=50) / Raw(b"e" * 40)), pub))
    bad[4] ^= 1  # the original destination, under the checksum
    with pytest.raises(C.CodecError, match="checksum"):
        C.minimal_restore_cached(bytes(bad), "203.0.113.2", pub, rst_cache)
    for n in range(C.MINIMAL_CACHE_SIZE + 10):
        inner = bytes(IP(src="10.2.0.3", dst=f"10.{n >> 8}.{n & 255}.1", proto=50) / Raw(b"e" * 8))
        C.minimal_restore_cached(C.minimal_forwarding(inner, pub), "203.0.113.2", pub, rst_cache)
        C.minimal_forwarding_cached(inner, pub, fwd_cache)
    assert len(rst_cache) <= C.MINIMAL_CACHE_SIZE and len(fwd_cache) <= C.MINIMAL_CACHE_SIZE
