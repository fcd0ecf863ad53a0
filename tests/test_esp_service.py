"""The esp service without root: static peers into the store, releases, rekey events."""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock

from narsuite import config as cfgmod
from narsuite.esp import transform
from narsuite.esp.service import EspService
from narsuite.metrics import Metrics
from narsuite.packet.udp import UDPPorts
from narsuite.service import RoleContext
from narsuite.store import MemoryBackend, Store

GCM = ("11" * 16 + "aabbccdd", "22" * 16 + "eeff0011")


def make(text: str) -> tuple[EspService, Store, Clock]:
    cfg = cfgmod.loads("[esp]\n" + text)
    clock = Clock()
    clock.advance(1000)
    store = Store(MemoryBackend(), clock)
    store.add_pool("ra", ipaddress.IPv4Network("10.8.0.0/29"), [ipaddress.IPv4Address("10.8.0.1")])
    from narsuite.esp.records import KINDS

    for k in KINDS:
        store.register(k)
    store.start()
    ctx = RoleContext("esp", cfg, cfg.role("esp"), store, Metrics(), clock, {}, UDPPorts(clock))
    return EspService(ctx), store, clock


def peer(name: str, spi: int, **extra: str) -> str:
    lines = [f'[[esp.peers]]\nname = "{name}"\nspi_in = {spi}\nspi_out = {spi + 0x1000}',
             f'enc = "aes-gcm-16"\nenc_key_in = "{GCM[0]}"\nenc_key_out = "{GCM[1]}"']
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def test_static_peers_lease_and_release_their_pool_address():
    svc, store, _ = make(peer("r1", 0x1001, pool="ra") + peer("r2", 0x1002, pool="ra"))
    for pc in svc.cfg.peers:
        svc._install_static(pc)
    inner = {p.name: p.inner for p in store.records("esp.peer")}
    assert sorted(inner.values()) == ["10.8.0.2", "10.8.0.3"]
    assert store.holds("spi", 0x1001) == "esp:peer:r1"
    svc._unsubscribe = store.subscribe(svc._peer_changed, kinds=["esp.peer", "esp.sa"])
    for sa in list(store.lookup_all("esp.sa", "peer", "r1")):
        store.delete("esp.sa", (sa.direction, sa.spi, sa.peer))
    # r1's last SA went: its pool address and SPI lease are free again; r2 keeps its own
    assert store.holds("pool:ra", ipaddress.IPv4Address(inner["r1"])) is None
    assert store.holds("spi", 0x1001) is None
    assert store.holds("pool:ra", ipaddress.IPv4Address(inner["r2"])) == "esp:peer:r2"


def test_address_outside_the_free_pool_is_refused():
    svc, store, _ = make(peer("r2", 0x1002, pool="ra", address="10.8.0.2"))
    # someone else (an IKE client's lease) holds the address the static peer names
    store.lease_address("ra", "ike:sa:other", prefer=ipaddress.IPv4Address("10.8.0.2"))
    failures = []
    svc._install_static(svc.cfg.peers[0]).addErrback(failures.append)
    assert failures and "not free in pool ra" in str(failures[0].value)
    assert list(store.records("esp.peer")) == []


def test_sequence_exhaustion_raises_a_rekey_event_in_the_store():
    svc, store, _ = make(peer("r1", 0x1001, address="10.8.0.2", remote="198.51.100.101"))
    svc._install_static(svc.cfg.peers[0])
    engine = svc.engine
    engine.senders["udp"] = lambda data, ip, port: True
    # push the outbound SA to the end of its 32-bit sequence space
    old = engine.outbound_sa("r1")
    engine._outbound["r1"] = transform.OutboundSA(old.spi, "aes-gcm-16", bytes.fromhex(GCM[1]),
                                                  initial_seq=2**32 - 2)
    from scapy.layers.inet import ICMP, IP

    pkt = bytes(IP(src="10.1.0.10", dst="10.8.0.2") / ICMP())
    assert engine.send_esp(store.get("esp.peer", "r1"), pkt, 4)  # seq 2**32-1: the last one
    assert not engine.send_esp(store.get("esp.peer", "r1"), pkt, 4)
    (event,) = store.records("esp.rekey")
    assert (event.peer, event.spi, event.exhausted) == ("r1", 0x2001, True)
    assert engine.counters.values["seq_exhausted"] == 1
    assert engine.counters.values["rekey_needed"] == 1


def test_config_errors_name_the_peer_key():
    import pytest

    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.loads('[esp]\n[[esp.peers]]\nname = "x"\nspi_in = 4097\nspi_out = 8193\n'
                     'enc = "aes-gcm-16"\nenc_key_in = "00"\nenc_key_out = "00"\naddress = "10.8.0.2"\n')
    assert e.value.key == "esp.peers[0].enc_key_in"
    assert "20 or 36 bytes" in str(e.value)
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.loads('[esp]\n[[esp.peers]]\nname = "x"\nspi_in = 7\nspi_out = 8193\n'
                     'enc = "null"\nenc_key_in = ""\nenc_key_out = ""\n')
    assert e.value.key == "esp.peers[0].spi_in"


def test_transport_peer_rules_go_through_pyroute2_off_the_store_callback(monkeypatch):
    """A transport peer appearing in the store (an IKE Quick Mode, from a store callback)
    gets its policy rules through narsuite.packet.policyroute -- netlink in a worker
    thread, in order -- and never through a subprocess on the reactor thread."""
    import subprocess

    from narsuite.esp.records import Peer
    from narsuite.packet.policyroute import MAIN_TABLE, Rule

    def no_subprocess(*a, **kw):
        raise AssertionError(f"subprocess from the esp service: {a}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    svc, store, _ = make("transport_table = 220\n")
    changes: list = []
    monkeypatch.setattr(svc.policy_routes, "change",
                        lambda remove=(), add=(), default_route=None: changes.append(
                            (list(remove), list(add), default_route)))

    class Tun:
        ifname = "esp0"

    svc.tun = Tun()
    svc._unsubscribe = store.subscribe(svc._peer_changed, kinds=["esp.peer", "esp.sa"])
    p = Peer(name="host", mode="transport", encap="udp", remote_ip="198.51.100.7", remote_port=4500,
             policy="space", local_ip="198.51.100.1", selector_proto=17, selector_port=53)
    store.put(p)
    to = "198.51.100.7/32"
    keep = [Rule(1000, to, MAIN_TABLE, 17, 500), Rule(1000, to, MAIN_TABLE, 17, 4500), Rule(1000, to, MAIN_TABLE, 50)]
    assert changes == [([], [*keep, Rule(1001, to, 220, 17, 53)], (220, "esp0"))]
    # the peer moves (a NAT rebinding): the old rules go, the new ones come, in one change
    store.update("esp.peer", "host", remote_ip="198.51.100.9")
    old_rules = changes[0][1]
    assert changes[1][0] == old_rules and changes[1][2] is None
    assert {r.to for r in changes[1][1]} == {"198.51.100.9/32"}
    svc._unroute_transport()
    assert changes[2] == (changes[1][1], [], None)


def test_static_peer_installs_again_after_a_restart_with_its_lease_on_disk(tmp_path):
    """esp.sa is never persisted but the static peer's SPI lease is: the next start must
    find its own lease (same owner) and install the SAs again, not fail with a Conflict."""
    from narsuite.store import SqliteBackend

    path = tmp_path / "s.sqlite"
    for run in range(2):
        svc, store, _ = make(peer("r1", 0x1001, pool="ra"))
        store.backend = SqliteBackend(path)
        store.open()
        failures: list = []
        svc._install_static(svc.cfg.peers[0]).addErrback(failures.append)
        assert not failures, (run, failures[0].value if failures else None)
        assert store.holds("spi", 0x1001) == "esp:peer:r1"
        assert {(sa.direction, sa.spi) for sa in store.records("esp.sa")} == {("in", 0x1001), ("out", 0x2001)}
        store.backend._db.close()


def test_static_tunnel_peers_with_overlapping_spaces_are_a_config_error():
    """002 §5.1 for static peers: the error names the second peer's key."""
    import pytest

    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.loads("[esp]\n" + peer("a", 0x1001, policy="space", remote="198.51.100.1")
                     + 'allowed = ["10.20.0.0/16"]\n'
                     + peer("b", 0x1002, policy="space", remote="198.51.100.2")
                     + 'allowed = ["10.30.0.0/16", "10.20.5.0/24"]\n')
    assert e.value.key == "esp.peers[1].allowed"
    assert "10.20.5.0/24 overlaps" in str(e.value) and "'a'" in str(e.value)
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.loads("[esp]\n" + peer("a", 0x1001, address="10.9.0.5") + peer("b", 0x1002, address="10.9.0.5"))
    assert e.value.key == "esp.peers[1].address"
    # disjoint spaces load
    cfgmod.loads("[esp]\n" + peer("a", 0x1001, policy="space") + 'allowed = ["10.20.0.0/16"]\n'
                 + peer("b", 0x1002, policy="space") + 'allowed = ["10.21.0.0/16"]\n')


def test_static_tunnel_peer_overlapping_a_negotiated_peer_is_refused():
    """A peer already in the store (here one the ike role negotiated) keeps its space; the
    static peer is refused, counted, and writes nothing."""
    from narsuite.esp.records import Peer

    svc, store, _ = make(peer("static", 0x1001, policy="space", remote="198.51.100.1")
                         + 'allowed = ["10.20.0.0/24"]\n')
    store.put(Peer(name="ike-client", mode="tunnel", encap="udp", remote_ip="203.0.113.9", remote_port=4500,
                   policy="space", allowed=("10.20.0.128/25",)), owner="ike:child:x")
    failures = []
    svc._install_static(svc.cfg.peers[0]).addErrback(failures.append)
    assert failures and "overlap those of 'ike-client'" in str(failures[0].value)
    assert [p.name for p in store.records("esp.peer")] == ["ike-client"]
    assert store.holds("spi", 0x1001) is None
    assert svc.engine.counters.values["tunnel_conflict"] == 1


def test_tunnel_conflict_is_ipaddress_overlap():
    """sadb.tunnel_conflict (the store's space indexes) finds a conflict exactly when
    ipaddress says some other peer's space networks overlap, host bits ignored, and what
    it names is such a peer."""
    import ipaddress
    import random

    from narsuite import sadb
    from narsuite.esp.records import Peer
    from narsuite.store import Store

    rng = random.Random(7)

    def net() -> str:
        plen = rng.choice((8, 16, 20, 24, 28, 32))
        return f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}/{plen}"

    store = Store()
    for k in sadb.KINDS:
        store.register(k)
    others = [Peer(name=f"p{i}", mode="tunnel", policy="space", allowed=(net(), net())) for i in range(40)]
    for o in others:
        store.put(o)

    def overlaps(a: Peer, b: Peer) -> bool:
        return any(ipaddress.IPv4Network(x, strict=False).overlaps(ipaddress.IPv4Network(y, strict=False))
                   for x in a.allowed for y in b.allowed)

    for _ in range(300):
        mine = Peer(name="me", mode="tunnel", policy="space", allowed=(net(),))
        want = [o for o in others if overlaps(mine, o)]
        got = sadb.tunnel_conflict(store, mine)
        assert (got is None) == (not want)
        assert got is None or got in want
