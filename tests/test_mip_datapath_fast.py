"""The data path's fast paths (per-home routes, plain GRE inline, minimal encapsulation with
RFC 1624 incremental checksums, the inline cache hits) give the bytes of the reference codec
functions, which scapy reads with correct checksums; bad packets on those paths are still
dropped and counted by reason.  Every packet goes through twice: once filling the caches,
once hitting them."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from narsuite.packet import codec as C
from tests.test_mip_datapath import COA, GW, HOME, PUB, Rig

A = socket.inet_aton


def _ip_ok(b: bytes) -> bool:
    """scapy's own checksum of the header equals the one on the wire."""
    p = IP(b)
    want = p.chksum
    del p.chksum
    return IP(bytes(p)).chksum == want


inner_fields = st.fixed_dictionaries({
    "tos": st.integers(0, 255), "id": st.integers(0, 0xFFFF), "ttl": st.integers(1, 255),
    "df": st.booleans(), "size": st.integers(0, 1400),
    "opts": st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x94\x04\x00\x00" * 2]),
    "src": st.sampled_from([HOME, "10.2.0.101", PUB]),
})


def _packet(f: dict, src: str, dst: str, proto: int = 50) -> bytes:
    return C.build_ipv4(A(src), A(dst), proto, bytes([f["size"] % 251]) * f["size"], tos=f["tos"],
                        ident=f["id"], ttl=f["ttl"], flags=C.IP_DF if f["df"] else 0,
                        options=f["opts"])


@settings(max_examples=150, deadline=None)
@given(inner_fields)
def test_codec_fast_tunnels_equal_the_reference_functions(f: dict) -> None:
    inner = _packet(f, f["src"], GW)
    mt = C.MinimalTunnel(A(PUB), A(COA))
    gre = C.TunnelHeader(A(PUB), A(COA), protocol=C.PROTO_GRE)
    ref_min = C.minimal_encapsulate(inner, A(PUB), A(COA))
    ref_gre = C.gre_encapsulate(inner, A(PUB), A(COA))
    cache: dict = {}
    for _ in range(2):  # a miss, then a hit
        assert mt.encapsulate(inner) == ref_min
        assert gre.gre(inner) == ref_gre
        assert C.minimal_decapsulate_cached(ref_min, cache) == C.minimal_decapsulate(ref_min) == inner
    assert _ip_ok(ref_min) and _ip_ok(ref_gre)


@settings(max_examples=100, deadline=None)
@given(inner_fields, st.sampled_from(["ipip", "gre", "minimal", "udp4", "udp47", "udp55"]))
def test_gateway_to_mn_bytes_equal_the_reference_codec(f: dict, encap: str) -> None:
    r = Rig()
    if encap.startswith("udp"):
        r.bind("udp", ("203.0.113.2", 40000), int(encap[3:]))
    else:
        r.bind(encap)
    pkt = _packet(f, GW, HOME)
    if encap == "ipip":
        want = C.ipip_encapsulate(pkt, A(PUB), A(COA))
    elif encap == "gre":
        want = C.gre_encapsulate(pkt, A(PUB), A(COA))
    elif encap == "minimal":
        want = C.minimal_encapsulate(pkt, A(PUB), A(COA))
    else:
        want = {4: b"\x04\x04\0\0" + pkt, 47: b"\x04\x2f\0\0\0\0\x08\0" + pkt,
                55: b"\x04\x37\0\0" + C.minimal_forwarding(pkt, A(PUB))}[int(encap[3:])]
    for _ in range(2):
        r.dp.from_tun(pkt)
    sent = [p for p, _ in r.raw] if r.raw else [d for d, a in r.udp]
    assert sent == [want, want]
    assert r.dp.counters["gateway_to_mn"] == 2 and not r.drops()
    if not encap.startswith("udp"):
        assert _ip_ok(want)


@settings(max_examples=100, deadline=None)
@given(inner_fields, st.sampled_from(["ipip", "gre", "minimal", "udp4", "udp47", "udp55"]))
def test_mn_to_gateway_inner_bytes_equal_the_reference_codec(f: dict, encap: str) -> None:
    r = Rig()
    nat = ("203.0.113.2", 40000)
    inner = _packet(f, HOME, GW)
    if encap.startswith("udp"):
        nh = int(encap[3:])
        r.bind("udp", nat, nh)
        data = {4: b"\x04\x04\0\0" + inner, 47: b"\x04\x2f\0\0\0\0\x08\0" + inner,
                55: b"\x04\x37\0\0" + C.minimal_forwarding(inner, A(COA))}[nh]
        # next header 55: the UDP socket hands over no TTL, TOS or ID (RFC 2004 rebuilds them)
        want = C.minimal_restore(data[4:], A(nat[0]), A(PUB)) if nh == 55 else inner
        for _ in range(2):
            r.dp.udp_received(data, nat)
    else:
        r.bind(encap)
        outer = {"ipip": C.ipip_encapsulate, "gre": C.gre_encapsulate,
                 "minimal": C.minimal_encapsulate}[encap](inner, A(COA), A(PUB))
        want = C.decapsulate(outer)[2]
        for _ in range(2):
            r.dp.raw_received(outer, COA)
    assert r.tun == [want, want] and not r.drops()
    assert _ip_ok(want)


def test_fast_path_drops_are_counted_by_reason() -> None:
    """Bad packets after the caches are warm (the inline hits) are still dropped and counted."""
    r = Rig()
    r.bind("minimal")
    good = C.minimal_encapsulate(C.build_ipv4(A(HOME), A(GW), 50, b"e" * 40), A(COA), A(PUB))
    r.dp.raw_received(good, COA)  # warms the restore cache
    assert len(r.tun) == 1

    def case(pkt: bytes, reason: str, src: str = COA) -> None:
        before = r.dp.counters[reason]
        r.dp.raw_received(pkt, src)
        assert r.dp.counters[reason] == before + 1, reason

    frag = bytearray(good)
    frag[6] |= 0x20  # MF on the outer header
    frag[10:12] = b"\0\0"
    frag[10:12] = C.internet_checksum(bytes(frag[:20])).to_bytes(2, "big")
    case(bytes(frag), "drop_bad_encapsulation")
    bad_mh = bytearray(good)
    bad_mh[24] ^= 1  # the original destination, under the forwarding header's checksum
    case(bytes(bad_mh), "drop_bad_encapsulation")
    case(good[:26], "drop_bad_encapsulation")  # truncated forwarding header (total length past the end)
    case(bytes(IP(src=COA, dst=PUB, proto=55) / Raw(b"\x32\x80\0\0")), "drop_bad_encapsulation")
    # the restored packet's own §5.3 checks, from a cached forwarding header too
    for _ in range(2):
        case(C.minimal_encapsulate(C.build_ipv4(A(HOME), A("10.9.9.9"), 50, b"e" * 8), A(COA), A(PUB)),
             "drop_inner_dst_not_vpn_gateway")
        case(C.minimal_encapsulate(bytes(IP(src=HOME, dst=GW) / UDP(dport=53)), A(COA), A(PUB)),
             "drop_not_esp")
        case(C.minimal_encapsulate(C.build_ipv4(A(HOME), A(GW), 50, b"e" * 8), A("198.51.100.9"), A(PUB)),
             "drop_wrong_tunnel_source", "198.51.100.9")
        case(C.minimal_encapsulate(C.build_ipv4(A("10.2.0.77"), A(GW), 50, b"e"), A(COA), A(PUB)),
             "drop_no_binding")
    # plain GRE inline: a bad outer header, GRE with a non-IPv4 payload
    r2 = Rig()
    r2.bind("gre")
    g = C.gre_encapsulate(C.build_ipv4(A(HOME), A(GW), 50, b"e" * 40), A(COA), A(PUB))
    r2.dp.raw_received(g, COA)
    assert len(r2.tun) == 1
    r2.dp.raw_received(g[:2] + (len(g) + 8).to_bytes(2, "big") + g[4:], COA)
    r2.dp.raw_received(C.gre_encapsulate(b"\x86\xdd" + b"\0" * 40, A(COA), A(PUB), protocol=0x86DD), COA)
    assert r2.dp.counters["drop_bad_encapsulation"] == 2 and len(r2.tun) == 1
    # the gateway side: a fragment to a minimal-encapsulation binding after a cache hit
    r3 = Rig()
    r3.bind("minimal")
    to_mn = C.build_ipv4(A(GW), A(HOME), 50, b"e" * 40)
    r3.dp.from_tun(to_mn)
    r3.dp.from_tun(C.build_ipv4(A(GW), A(HOME), 50, b"e" * 40, flags=C.IP_MF))
    assert r3.dp.counters["drop_bad_encapsulation"] == 1 and len(r3.raw) == 1


def test_route_follows_the_binding_change() -> None:
    """The per-home route must not outlive its binding: an MN that re-registers with another
    encapsulation (same care-of address, the binding replaced) gets the new one at once."""
    r = Rig()
    r.bind("minimal")
    to_mn = C.build_ipv4(A(GW), A(HOME), 50, b"e" * 40)
    r.dp.from_tun(to_mn)
    r.bind("gre")
    r.dp.from_tun(to_mn)
    r.bind("udp", ("203.0.113.2", 40000), 55)
    r.dp.from_tun(to_mn)
    assert [p[9] for p, _ in r.raw] == [55, 47]
    assert [(d[:2], a) for d, a in r.udp] == [(b"\x04\x37", ("203.0.113.2", 40000))]
