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
