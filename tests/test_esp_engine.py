"""The esp engine with Twisted's Clock and a memory store: no root, no sockets."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from twisted.internet.task import Clock

from narsuite.esp import transform
from narsuite.esp.engine import EspEngine
from narsuite.esp.records import KINDS, SA, NaptEntry, Peer
from narsuite.store import MemoryBackend, Store

KEY_IN = bytes(range(20))
KEY_OUT = bytes(range(20, 40))


class World:
    def __init__(self, **engine_kw) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = Store(MemoryBackend(), self.clock)
        for k in KINDS:
            self.store.register(k)
        self.store.start()
        self.engine = EspEngine(self.store, self.clock, **engine_kw)
        self.tun: list[bytes] = []
        self.sent: list[tuple[bytes, str, int]] = []
        self.engine.tun_write = lambda p: self.tun.append(p) or True
        send = lambda d, ip, port: self.sent.append((d, ip, port)) or True  # noqa: E731
        self.engine.senders = {"udp": send, "keepalive": send}

    def add_peer(self, name: str = "r1", spi: int = 0x1001, **kw) -> tuple[transform.OutboundSA,
                                                                              transform.InboundSA]:
        kw.setdefault("remote_ip", "198.51.100.101")
        kw.setdefault("remote_port", 4500)
        self.store.put(Peer(name=name, **kw))
        self.store.put(SA(spi, "in", name, "aes-gcm-16", None, KEY_IN))
        self.store.put(SA(spi + 0x1000, "out", name, "aes-gcm-16", None, KEY_OUT))
        # the remote end's view: its outbound is our inbound
        return (transform.OutboundSA(spi, "aes-gcm-16", KEY_IN),
                transform.InboundSA(spi + 0x1000, "aes-gcm-16", KEY_OUT))


def icmp(src: str, dst: str, ident: int = 7, reply: bool = False) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident, seq=1) / b"ping")


def test_tunnel_address_policy_checks_the_inner_source():
    w = World()
    remote_out, _ = w.add_peer(policy="address", inner="10.8.0.2")
    ok = remote_out.encapsulate(icmp("10.8.0.2", "10.1.0.10"), 4)
    bad = remote_out.encapsulate(icmp("10.8.0.66", "10.1.0.10"), 4)
    w.engine.esp_received(ok, ("198.51.100.101", 4500), "udp")
    w.engine.esp_received(bad, ("198.51.100.101", 4500), "udp")
    assert len(w.tun) == 1 and IP(w.tun[0]).src == "10.8.0.2"
    assert w.engine.counters.values["policy_drop"] == 1


def test_space_policy():
    w = World()
    remote_out, _ = w.add_peer(policy="space", allowed=("172.16.0.0/12",))
    for src in ("172.20.1.1", "172.32.0.1"):
        w.engine.esp_received(remote_out.encapsulate(icmp(src, "10.1.0.10"), 4),
                              ("198.51.100.101", 4500), "udp")
    assert [IP(p).src for p in w.tun] == ["172.20.1.1"]
    # outbound: a destination in the allowed space finds the peer
    w.engine.packet_from_tun(icmp("10.1.0.10", "172.20.1.1", reply=True))
    assert len(w.sent) == 1


def test_outbound_by_assigned_address_goes_to_the_nat_mapped_endpoint():
    w = World()
    _, remote_in = w.add_peer(policy="address", inner="10.8.0.2", remote_port=31337)
    w.engine.packet_from_tun(icmp("10.1.0.10", "10.8.0.2", reply=True))
    (data, ip, port), = w.sent
    assert (ip, port) == ("198.51.100.101", 31337)
    nh, inner = remote_in.decapsulate(data)
    assert nh == 4 and IP(inner).dst == "10.8.0.2"
    w.engine.packet_from_tun(icmp("10.1.0.10", "10.8.0.99", reply=True))
    assert w.engine.counters.values["no_route"] == 1


def test_peer_moves_only_on_authenticated_packets():
    w = World()
    remote_out, _ = w.add_peer(policy="address", inner="10.8.0.2")
    forged = remote_out.encapsulate(icmp("10.8.0.2", "10.1.0.10"), 4)
    forged = forged[:-1] + bytes([forged[-1] ^ 1])
    w.engine.esp_received(forged, ("203.0.113.9", 9999), "udp")
    assert w.store.get("esp.peer", "r1").remote_ip == "198.51.100.101"
    w.engine.esp_received(remote_out.encapsulate(icmp("10.8.0.2", "10.1.0.10"), 4),
                          ("203.0.113.9", 9999), "udp")
    peer = w.store.get("esp.peer", "r1")
    assert (peer.remote_ip, peer.remote_port) == ("203.0.113.9", 9999)
    assert w.engine.counters.values["auth_failed"] == 1


def test_napt_keeps_two_hosts_with_one_address_apart():
    w = World(napt_address="10.9.0.1", napt_ports=(40000, 40009))
    r1_out, r1_in = w.add_peer("r1", 0x1001, policy="napt")
    r2_out, r2_in = w.add_peer("r2", 0x1002, policy="napt", remote_ip="198.51.100.102")
    for out in (r1_out, r2_out):
        seg = IP(src="192.168.1.10", dst="10.1.0.10") / UDP(sport=5000, dport=53) / b"q"
        w.engine.esp_received(out.encapsulate(bytes(seg), 4), ("198.51.100.10x", 4500), "udp")
    a, b = (IP(p) for p in w.tun)
    assert a.src == b.src == "10.9.0.1"
    assert a[UDP].sport != b[UDP].sport
    assert all(40000 <= p[UDP].sport <= 40009 for p in (a, b))
    # replies come back to the right host with the original address and port
    for translated, remote_in in ((a, r1_in), (b, r2_in)):
        reply = IP(src="10.1.0.10", dst="10.9.0.1") / UDP(sport=53, dport=translated[UDP].sport) / b"a"
        w.sent.clear()
        w.engine.packet_from_tun(bytes(reply))
        (data, _ip, _port), = w.sent
        _, inner = remote_in.decapsulate(data)
        back = IP(inner)
        assert (back.dst, back[UDP].dport) == ("192.168.1.10", 5000)
        chk = back[UDP].chksum
        del back[UDP].chksum
        assert IP(bytes(back))[UDP].chksum == chk
    # NAPT state expires with its lifetime
    assert w.store.count("esp.napt") == 2
    w.clock.advance(301)
    assert w.store.count("esp.napt") == 0


def test_napt_exhaustion_is_counted():
    w = World(napt_address="10.9.0.1", napt_ports=(40000, 40000))
    out, _ = w.add_peer(policy="napt")
    for sport in (1, 2):
        seg = IP(src="192.168.1.10", dst="10.1.0.10") / UDP(sport=sport, dport=53)
        w.engine.esp_received(out.encapsulate(bytes(seg), 4), ("198.51.100.101", 4500), "udp")
    assert len(w.tun) == 1 and w.engine.counters.values["napt_exhausted"] == 1


def test_napt_peer_without_g_i_is_dropped_and_counted():
    """A napt peer can reach the store from another role while no napt_address (G_i) is
    configured (the config check covers static peers only): its packets are dropped as a
    policy drop, with no NAPT state made, rather than raising on the packet path."""
    w = World(napt_ports=(40000, 40009))
    out, _ = w.add_peer(policy="napt")
    seg = IP(src="192.168.1.10", dst="10.1.0.10") / UDP(sport=5000, dport=53) / b"q"
    w.engine.esp_received(out.encapsulate(bytes(seg), 4), ("198.51.100.101", 4500), "udp")
    assert w.tun == []
    assert w.engine.counters.values["policy_drop"] == 1
    assert w.store.count("esp.napt") == 0


def test_keepalives_after_m_seconds_of_silence_and_for_n_after_the_last_sa():
    w = World(keepalive_interval=20, keepalive_linger=300)
    w.add_peer(policy="address", inner="10.8.0.2", keepalive=True)
    w.add_peer("quiet", 0x1003, policy="address", inner="10.8.0.3", keepalive=False)
    for _ in range(19):
        w.clock.advance(1)
        w.engine.keepalive_tick()
    assert w.sent == []
    w.clock.advance(1)
    w.engine.keepalive_tick()
    assert w.sent == [(b"\xff", "198.51.100.101", 4500)]
    # traffic to the peer postpones the next keepalive
    w.clock.advance(10)
    w.engine.packet_from_tun(icmp("10.1.0.10", "10.8.0.2", reply=True))
    w.sent.clear()
    w.clock.advance(15)
    w.engine.keepalive_tick()
    assert w.sent == []
    # the SAs go: keepalives continue for N seconds, then stop
    for sa in list(w.store.lookup_all("esp.sa", "peer", "r1")):
        w.store.delete("esp.sa", (sa.direction, sa.spi, sa.peer))
    w.sent.clear()
    w.clock.advance(290)
    w.engine.keepalive_tick()
    assert len(w.sent) == 1
    w.clock.advance(20)
    w.sent.clear()
    w.engine.keepalive_tick()
    assert w.sent == []


def test_transport_conflict_detection():
    w = World()
    w.store.put(Peer(name="a", mode="transport", remote_ip="198.51.100.101", local_ip="198.51.100.1",
                     selector_proto=17, selector_port=7777))
    b = Peer(name="b", mode="transport", local_ip="198.51.100.1", selector_proto=17, selector_port=7777)
    assert w.engine.transport_conflict(b, "198.51.100.101").name == "a"
    c = Peer(name="c", mode="transport", local_ip="198.51.100.1", selector_proto=6)
    assert w.engine.transport_conflict(c, "198.51.100.101") is None


@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize("policy", ["incremental", "recompute"])
def test_transport_checksum_fixed_for_the_natted_addresses(proto, policy):
    """The peer computed its checksum with its private address; G sees the NAT's."""
    w = World()
    remote_out, _ = w.add_peer(mode="transport", local_ip="198.51.100.1", nat_oa_remote="192.168.1.10",
                               checksum=policy)
    l4 = UDP(sport=34567, dport=7777) if proto == "udp" else TCP(sport=34567, dport=7777, flags="S")
    original = IP(src="192.168.1.10", dst="198.51.100.1") / l4 / b"hello"
    raw = bytes(original)
    segment = raw[20:]
    w.engine.esp_received(remote_out.encapsulate(segment, 17 if proto == "udp" else 6),
                          ("198.51.100.101", 4500), "udp")
    (delivered,) = w.tun
    got = IP(delivered)
    assert (got.src, got.dst) == ("198.51.100.101", "198.51.100.1")
    layer = got[UDP] if proto == "udp" else got[TCP]
    chk = layer.chksum
    del layer.chksum
    assert IP(bytes(got))[type(layer)].chksum == chk


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_never_raises_and_never_reaches_the_tun(data):
    w = World()
    w.add_peer(policy="address", inner="10.8.0.2")
    w.engine.esp_received(data, ("198.51.100.101", 4500), "udp")
    w.engine.esp_received(b"\x00\x00\x10\x01" + data, ("198.51.100.101", 4500), "udp")
    w.engine.packet_from_tun(data)
    assert w.tun == []
    assert sum(w.engine.counters.values.values()) >= 2


def test_ip_helpers_roundtrip():
    assert socket.inet_aton("10.9.0.1") == bytes([10, 9, 0, 1])
    assert NaptEntry(17, 40000, "r1", "192.168.1.10", 5000).port == 40000


def test_counters_reach_prometheus_at_scrape_time():
    from narsuite.metrics import Metrics

    m = Metrics()
    w = World(metrics=m)
    w.engine.esp_received(b"\x00\x00\x99\x99" + bytes(40), ("198.51.100.101", 4500), "udp")
    body = m.render().decode()
    assert 'narsuite_esp_events_total{event="unknown_spi"} 1.0' in body


def test_a_changed_peer_record_takes_effect_on_the_next_packet():
    """The receive path keeps a per-peer view; a store change must not leave it stale."""
    w = World()
    remote_out, _ = w.add_peer(policy="address", inner="10.8.0.2")
    addr = ("198.51.100.101", 4500)
    w.engine.esp_received(remote_out.encapsulate(icmp("10.8.0.2", "10.1.0.10"), 4), addr)
    assert len(w.tun) == 1
    w.store.update("esp.peer", "r1", inner="10.8.0.3")  # e.g. a new pool lease
    w.engine.esp_received(remote_out.encapsulate(icmp("10.8.0.2", "10.1.0.10"), 4), addr)
    w.engine.esp_received(remote_out.encapsulate(icmp("10.8.0.3", "10.1.0.10"), 4), addr)
    assert [IP(p).src for p in w.tun] == ["10.8.0.2", "10.8.0.3"]
    assert w.engine.counters.values["policy_drop"] == 1
    w.store.delete("esp.peer", "r1")
    w.engine.esp_received(remote_out.encapsulate(icmp("10.8.0.3", "10.1.0.10"), 4), addr)
    assert len(w.tun) == 2 and w.engine.counters.values["no_route"] == 1


def test_keepalive_on_udp_is_counted_and_other_short_datagrams_are_truncated():
    w = World()
    w.add_peer(policy="address", inner="10.8.0.2")
    w.engine.esp_received(b"\xff", ("198.51.100.101", 4500))
    w.engine.esp_received(b"\xff", ("198.51.100.101", 0), "esp")  # not a keepalive on raw ESP
    w.engine.esp_received(b"\x01\x02", ("198.51.100.101", 4500))
    v = w.engine.counters.values
    assert (v["keepalives_rx"], v["truncated"]) == (1, 2)
    assert w.engine.peer_state("r1").keepalives_rx == 1


@pytest.mark.parametrize("inner", [
    b"\x45" + b"\x00" * 10,  # shorter than an IPv4 header
    b"\x60" + b"\x00" * 39,  # IPv6 in an IPv4 tunnel
    b"\x44" + b"\x00" * 39,  # header length below 5 words
], ids=["short", "ipv6", "ihl4"])
def test_malformed_inner_packets_are_counted_and_never_reach_the_tun(inner):
    w = World()
    remote_out, _ = w.add_peer(policy="space", allowed=("0.0.0.0/0",))
    w.engine.esp_received(remote_out.encapsulate(inner, 4), ("198.51.100.101", 4500))
    assert w.tun == [] and w.engine.counters.values["bad_inner"] == 1
    assert w.engine.counters.values["rx_packets"] == 1  # authentic ESP, bad payload
