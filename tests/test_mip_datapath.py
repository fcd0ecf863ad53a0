"""The mipproxy data path's decisions with fakes (memory store, Clock, I/O captured), and
what it sends read back by scapy."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
from scapy.layers.inet import GRE, IP, UDP
from scapy.packet import Raw
from twisted.internet.task import Clock

from narsuite import config as cfgmod
from narsuite.mipproxy.datapath import DataPath
from narsuite.mipproxy.records import BINDING, KINDS, Binding
from narsuite.store import MemoryBackend, Store

_spec = importlib.util.spec_from_file_location("mip_peer_for_dp_tests",
                                               Path(__file__).resolve().parent / "mip_peer.py")
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)  # type: ignore[union-attr]

PUB, PRIV, HA, GW, HOME = "203.0.113.1", "10.2.0.1", "10.2.0.2", "10.2.0.3", "10.2.0.100"
COA = "192.168.10.10"


class Rig:
    def __init__(self, next_hop: str = "") -> None:
        extra = f'vpn_gateway_next_hop = "{next_hop}"\n' if next_hop else ""
        cfg = cfgmod.loads(f'[mipproxy]\npublic_address = "{PUB}"\nprivate_address = "{PRIV}"\n'
                           f'home_agents = ["{HA}"]\nvpn_gateways = ["{GW}"]\n' + extra).role("mipproxy")
        self.clock = Clock()
        self.store = Store(MemoryBackend(), self.clock)
        for k in KINDS:
            self.store.register(k)
        self.store.open()
        self.tun: list[bytes] = []
        self.raw: list[tuple[bytes, str | None]] = []
        self.udp: list[tuple[bytes, tuple[str, int]]] = []
        self.dp = DataPath(cfg, self.store, self.clock, send_udp=lambda d, a: self.udp.append((d, a)))
        self.dp.tun_write = self.tun.append
        self.dp.send_raw = lambda p, nh=None: self.raw.append((p, nh))
        self.store.subscribe(self.dp.store_changed)

    def bind(self, encap: str = "ipip", src: tuple[str, int] = (COA, 0), nh: int = 4) -> None:
        self.store.put(Binding(HOME, COA, HA, 1, 600, 4096, src[0], src[1], encapsulation=encap,
                               udp_next_header=nh), ttl=600)

    def drops(self) -> dict[str, int]:
        return {k: v for k, v in self.dp.counters.items() if k.startswith("drop_") and v}


def esp(src: str = HOME, dst: str = GW) -> bytes:
    return bytes(IP(src=src, dst=dst, proto=50) / Raw(b"\x00\x00\x10\x01" + b"e" * 40))


def test_udp_tunnel_data_follows_the_binding_when_the_nat_mapping_changes() -> None:
    """The per-home cache must not outlive the binding: after a re-registration from a new NAT
    port, packets from the old port are refused and from the new one accepted."""
    r = Rig()
    r.bind("udp", ("203.0.113.2", 40000))
    r.dp.udp_received(b"\x04\x04\x00\x00" + esp(), ("203.0.113.2", 40000))
    assert r.tun == [esp()]
    r.bind("udp", ("203.0.113.2", 40001))  # the MN moved: same CoA key, new mapping
    r.dp.udp_received(b"\x04\x04\x00\x00" + esp(), ("203.0.113.2", 40000))
    assert r.drops() == {"drop_wrong_tunnel_source": 1}
    r.dp.udp_received(b"\x04\x04\x00\x00" + esp(), ("203.0.113.2", 40001))
    assert len(r.tun) == 2
    r.dp.from_tun(esp(GW, HOME))
    (data, addr), = r.udp
    assert addr == ("203.0.113.2", 40001) and data == b"\x04\x04\x00\x00" + esp(GW, HOME)
    r.store.delete(BINDING.name, (HOME, COA))
    r.dp.from_tun(esp(GW, HOME))
    assert r.drops()["drop_no_binding"] == 1 and len(r.udp) == 1


@pytest.mark.parametrize("nh", [4, 47, 55])
def test_udp_tunnel_data_in_the_registered_next_header_both_ways(nh: int) -> None:
    """RFC 3519 tunnel data with next header 4, 47 or 55 (built and read back by the
    independent peer): the MN's ESP reaches the gateway, and the gateway's ESP goes back in
    the next header the MN registered."""
    r = Rig()
    nat = ("203.0.113.2", 40000)
    r.bind("udp", nat, nh=nh)
    r.dp.udp_received(peer.udp_tunnel_body(nh, esp(), COA), nat)
    (got,) = r.tun
    g = IP(got)
    # next header 55 lost the original TTL/ID with the outer header: the restored packet has
    # our defaults, and a right header checksum
    assert (g.src, g.dst, g.proto, bytes(g.payload)) == (HOME, GW, 50, bytes(IP(esp()).payload))
    assert peer.ones_complement(got[:20]) == 0 and g.len == len(got)
    if nh != 55:
        assert got == esp()
    assert r.drops() == {}
    back = esp(GW, HOME)
    r.dp.from_tun(back)
    (data, addr), = r.udp
    assert addr == nat and data[:4] == bytes([4, nh, 0, 0])
    read = peer.from_udp_tunnel(data, PUB)
    assert (read["src"], read["dst"], read["proto"]) == (GW, HOME, 50)
    assert read["payload"] == bytes(IP(back).payload).hex()
    if nh == 55:
        assert read["s_bit"]  # the gateway is not the encapsulator: its address travels


def test_udp_minimal_without_s_bit_takes_the_datagram_source_and_bad_headers_drop() -> None:
    """A forwarding header without the S bit names no source: the UDP datagram's (the NAT's
    address) stands for it -- no binding has that home address, so it is dropped; a broken
    checksum and a truncated header are bad encapsulation, and an unknown next header unsupported."""
    r = Rig()
    nat = ("203.0.113.2", 40000)
    r.bind("udp", nat, nh=55)
    body = peer.udp_tunnel_body(55, esp(), HOME)  # encapsulator == inner source: no S bit
    assert body[5] & 0x80 == 0
    r.dp.udp_received(body, nat)
    assert r.drops() == {"drop_no_binding": 1} and r.tun == []
    good = peer.udp_tunnel_body(55, esp(), COA)
    r.dp.udp_received(good[:6] + bytes([good[6] ^ 1]) + good[7:], nat)
    r.dp.udp_received(good[:10], nat)
    assert r.drops()["drop_bad_encapsulation"] == 2
    r.dp.udp_received(b"\x04\x29\x00\x00" + esp(), nat)
    assert r.drops()["drop_unsupported_encapsulation"] == 1 and r.tun == []
    r.dp.udp_received(good, nat)
    assert len(r.tun) == 1


@pytest.mark.parametrize("encap", ["ipip", "gre", "minimal"])
def test_gateway_packets_tunnelled_to_the_coa_in_the_mn_s_encapsulation(encap: str) -> None:
    r = Rig()
    r.bind(encap)
    inner = esp(GW, HOME)
    r.dp.from_tun(inner)
    (out, nh), = r.raw
    o = IP(out)
    assert (o.src, o.dst) == (PUB, COA) and nh is None
    if encap == "ipip":
        assert o.proto == 4 and bytes(o.payload) == inner
    elif encap == "gre":
        assert o.proto == 47 and o[GRE].proto == 0x0800 and bytes(o[GRE].payload) == inner
    else:
        assert o.proto == 55  # scapy has no RFC 2004 layer: the codec's own test checks it
    # and back: the MN's packets in the same encapsulation reach the gateway
    from narsuite.packet import codec

    mn = {"ipip": codec.ipip_encapsulate, "gre": codec.gre_encapsulate,
          "minimal": codec.minimal_encapsulate}[encap](esp(), socket.inet_aton(COA),
                                                       socket.inet_aton(PUB))
    r.dp.raw_received(mn, COA)
    assert r.tun == [esp()]


def test_5_3_checks_drop_and_count() -> None:
    r = Rig()
    r.bind()
    cases = [
        (bytes(IP(src=COA, dst=PUB, proto=4) / IP(src=HOME, dst=HA, proto=50) / Raw(b"x" * 8)),
         "drop_inner_dst_not_vpn_gateway"),
        (bytes(IP(src=COA, dst=PUB, proto=4) / IP(src=HOME, dst=GW) / UDP(dport=53)),
         "drop_not_esp"),
        (bytes(IP(src=COA, dst=PUB, proto=4) / IP(src="10.2.0.77", dst=GW, proto=50) / Raw(b"x")),
         "drop_no_binding"),
        (bytes(IP(src="198.51.100.9", dst=PUB, proto=4) / IP(src=HOME, dst=GW, proto=50)),
         "drop_wrong_tunnel_source"),
        (bytes(IP(src=COA, dst=PUB, proto=4) / Raw(b"\x45\x00")), "drop_bad_encapsulation"),
        # the outer header checked inline: a fragment, a total length past the end, IHL < 5
        (bytes(IP(src=COA, dst=PUB, proto=4, flags="MF") / IP(src=HOME, dst=GW, proto=50)),
         "drop_bad_encapsulation"),
        (bytes(IP(src=COA, dst=PUB, proto=4, len=200) / IP(src=HOME, dst=GW, proto=50)),
         "drop_bad_encapsulation"),
        (b"\x44" + bytes(IP(src=COA, dst=PUB, proto=4) / IP(src=HOME, dst=GW, proto=50))[1:],
         "drop_bad_encapsulation"),
    ]
    for pkt, reason in cases:
        before = r.dp.counters[reason]
        r.dp.raw_received(pkt, IP(pkt).src)
        assert r.dp.counters[reason] == before + 1, reason
    # IKE through the tunnel is let through (the SA to the gateway is set up this way)
    ike = bytes(IP(src=COA, dst=PUB, proto=4) / IP(src=HOME, dst=GW) / UDP(sport=500, dport=500))
    r.dp.raw_received(ike, COA)
    assert r.tun == [ike[20:]]
    # a tunnel addressed to neither of our addresses is another role's
    r.dp.raw_received(bytes(IP(src=COA, dst="10.9.9.9", proto=4) / IP(src=HOME, dst=GW)), COA)
    assert r.dp.counters["other_destination"] == 1


def test_home_agent_tunnel_two_box_goes_to_the_gateway_next_hop() -> None:
    r = Rig(next_hop=GW)
    r.bind()
    inner = bytes(IP(src="10.2.0.3", dst=HOME) / UDP(sport=7, dport=7) / Raw(b"hi"))
    r.dp.raw_received(bytes(IP(src=HA, dst=PRIV, proto=4) / Raw(inner)), HA)
    assert r.raw == [(inner, GW)] and r.tun == []
    r.dp.raw_received(bytes(IP(src="10.2.0.66", dst=PRIV, proto=4) / Raw(inner)), "10.2.0.66")
    assert r.drops() == {"drop_not_from_home_agent": 1}


def test_binding_rules_go_through_policy_routes_not_a_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """A binding's policy rules follow a store callback on the reactor thread: they must be
    handed to the netlink worker (numeric protocols, no /etc/protocols), never run as
    `ip rule` child processes there; and they go when the last binding of the home goes."""
    import subprocess

    from narsuite.packet.policyroute import Rule

    def no_subprocess(*a, **kw):
        raise AssertionError(f"subprocess on the reactor thread: {a}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    r = Rig()
    changes: list[tuple[list, list]] = []

    class Policy:
        def change(self, remove=(), add=(), default_route=None):
            changes.append((list(remove), list(add)))

    r.dp.tun = object()  # started (the rules need the TUN's table)
    r.dp._policy = Policy()
    r.bind()
    table = r.dp.cfg.route_table
    expected = [Rule(900, f"{HOME}/32", table, 50), Rule(900, f"{HOME}/32", table, 17, 500),
                Rule(900, f"{HOME}/32", table, 17, 4500)]
    assert changes == [([], expected)]
    r.bind()  # a re-registration: nothing new
    assert len(changes) == 1
    # a move: the old binding goes and the new one comes in the same turn -- the rules stay
    r.store.delete(BINDING.name, (HOME, COA))
    r.store.put(Binding(HOME, "192.168.20.20", HA, 2, 600, 4096, "192.168.20.20", 0), ttl=600)
    r.clock.advance(0)
    assert len(changes) == 1
    r.store.delete(BINDING.name, (HOME, "192.168.20.20"))  # the last binding of the home
    r.clock.advance(0)
    assert changes[-1] == (expected, [])


def test_gateway_side_refuses_what_is_not_ipv4_ipsec_and_tunnels_by_cached_header() -> None:
    """from_tun's inline header checks: IPv6, a truncated header, an IHL past the end are not
    the gateway's IPsec; the IP-in-IP header built from the per-CoA cache is the codec's own
    (scapy reads it), and a new binding for the home address takes a new care-of address."""
    from narsuite.packet import codec

    r = Rig()
    r.bind()
    for bad in (b"\x60" + bytes(39), esp(GW, HOME)[:19], b"\x4f" + esp(GW, HOME)[1:40]):
        r.dp.from_tun(bad)
    assert r.drops() == {"drop_tun_not_ipsec": 3} and r.raw == []
    inner = esp(GW, HOME)
    r.dp.from_tun(inner)
    assert r.raw[-1][0] == codec.ipip_encapsulate(inner, socket.inet_aton(PUB), socket.inet_aton(COA))
    r.store.delete(BINDING.name, (HOME, COA))
    r.store.put(Binding(HOME, "192.168.20.20", HA, 2, 600, 4096, "192.168.20.20", 0), ttl=600)
    r.dp.from_tun(inner)
    o = IP(r.raw[-1][0])
    assert (o.src, o.dst, bytes(o.payload)) == (PUB, "192.168.20.20", inner)
