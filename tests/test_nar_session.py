"""NarHandler (narsuite.nar.session): NAR-MODE policy and the NAR commands, with a memory
store, a task.Clock and a fake control connection."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet import task

from narsuite.nar import wire
from narsuite.nar.config import NarOptions
from narsuite.nar.records import KINDS
from narsuite.nar.session import NarHandler, grant_flags
from narsuite.store import MemoryBackend, Store

NB, XA, XA2, YB = "192.0.2.1", "10.0.0.10", "10.0.0.11", "192.0.2.10"


@attrs.define
class FakeConn:
    session_id: str
    client: str = XA
    user: str = ""
    written: list = attrs.field(factory=list)
    closed: bool = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = b"".join(self.written)
        self.written.clear()
        return out


@attrs.frozen
class Req:
    cmd: int = 0x80
    flags: int = 0
    atyp: int = 1
    addr: str = YB
    port: int = 0


def make(**opts):
    clock = task.Clock()
    store = Store(MemoryBackend(), clock)
    for k in KINDS:
        store.register(k)
    options = NarOptions(lent_address=NB, **opts)
    return NarHandler(options, store, clock), store


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


def enter(h, sid="s1", flags=0, client=XA):
    conn = FakeConn(sid, client)
    reply = result(h.nar_mode(conn, Req(flags=flags)))
    assert reply[:2] == b"\x05\x00", reply
    return conn, reply


# ------------------------------------------------------------------------------ NAR-MODE

@pytest.mark.parametrize("translated, gre, requested, granted", [
    ("allow", "allow", 0, 0),
    ("allow", "allow", 1, 1),
    ("allow", "allow", 1 | 2 | 4, 1),  # translated: the other bits are irrelevant
    ("allow", "allow", 2, 2),
    ("allow", "allow", 4, 0),  # L2TP alone: refused, IP-in-IP
    ("allow", "allow", 2 | 4, 2),
    ("refuse", "allow", 1, 0),  # TRANSLATED refused: end-to-end imposed
    ("refuse", "allow", 1 | 2, 2),
    ("impose", "allow", 0, 1),
    ("allow", "refuse", 2, 0),
    ("allow", "impose", 0, 2),
    ("refuse", "impose", 1, 2),
])
def test_flag_policy(translated, gre, requested, granted):
    assert grant_flags(requested, translated, gre) == granted
    h, store = make(translated=translated, gre=gre)
    conn, reply = enter(h, flags=requested)
    assert reply == wire.encode_socks_reply(0, granted, NB, 0)
    s = store.get("nar.session", "s1")
    assert (s.client, s.remote, s.lent) == (XA, YB, NB)
    assert (s.translated, s.gre, s.l2tp) == (bool(granted & 1), bool(granted & 2), False)
    assert store.owner_of("nar.session", "s1") == "s1"


@pytest.mark.parametrize("req, rep", [
    (Req(port=500), 0x01),
    (Req(atyp=3, addr="y.example"), 0x08),
    (Req(atyp=4, addr="::1"), 0x08),
    (Req(addr="0.0.0.0"), 0x01),
])
def test_nar_mode_refusals(req, rep):
    h, store = make()
    reply = result(h.nar_mode(FakeConn("s1"), req))
    assert reply == wire.encode_socks_reply(rep)
    assert store.count("nar.session") == 0
    assert h.counters["mode_refused"] == 1


def test_nar_mode_with_the_socks_servers_request():
    from narsuite.nar import socks

    h, store = make()
    req = socks.Request(cmd=0x80, atyp=1, host=YB, port=0, flags=wire.FLAG_GRE)
    reply = result(h.nar_mode(FakeConn("s1"), req))
    assert reply == wire.encode_socks_reply(0, wire.FLAG_GRE, NB, 0)
    assert store.get("nar.session", "s1").remote == YB


def test_nar_mode_disabled():
    clock = task.Clock()
    store = Store(MemoryBackend(), clock)
    h = NarHandler(NarOptions(enabled=False), store, clock)
    assert result(h.nar_mode(FakeConn("s1"), Req())) == wire.encode_socks_reply(0x07)


# -------------------------------------------------------------------------- ICMP-ASSOCIATE

def test_icmp_id_confirmed_then_overridden():
    h, store = make()
    a, _ = enter(h, "a")
    h.nar_data(a, wire.encode_icmp(1, 0x1234))
    assert a.take() == wire.encode_icmp(0, 0x1234)
    m = store.lookup("nar.mapping", "icmp", (NB, YB, 0x1234))
    assert (m.session, m.client, m.proto, m.translated) == ("a", XA, 1, False)
    # another client asks for the same id toward the same Yb: a different one is assigned
    b, _ = enter(h, "b", client=XA2)
    h.nar_data(b, wire.encode_icmp(1, 0x1234))
    reply, used = wire.parse_reply(b.take(), "icmp")
    assert reply.code == 0 and reply.icmp_id != 0x1234 and 1 <= reply.icmp_id <= 65535
    assert store.lookup("nar.mapping", "icmp", (NB, YB, reply.icmp_id)).client == XA2
    # no proposal (0, outside the default range 1-65535): assigned
    h.nar_data(b, wire.encode_icmp(1, 0))
    r2, _ = wire.parse_reply(b.take(), "icmp")
    assert r2.code == 0 and r2.icmp_id not in (0, 0x1234, reply.icmp_id)


def test_icmp_range_exhausted():
    h, store = make(icmp_ids=(100, 101))
    a, _ = enter(h, "a")
    h.nar_data(a, wire.encode_icmp(1, 0) * 3)
    out = a.take()
    replies = [out[i:i + 4] for i in range(0, 12, 4)]
    assert {wire.parse_reply(r, "icmp")[0].icmp_id for r in replies[:2]} == {100, 101}
    assert replies[2] == wire.encode_icmp(0x01, 0)
    assert store.count("nar.mapping") == 2


# ------------------------------------------------------------------------- IPSEC-ASSOCIATE

def test_spi_assignment_overrides_client_and_is_unique():
    h, store = make()
    conns = [enter(h, f"s{i}")[0] for i in range(20)]
    spis = []
    for c in conns:
        h.nar_data(c, wire.encode_ipsec(2, 50, 0x1234) + wire.encode_ipsec(2, 51, 0))
        out = c.take()
        r1, n = wire.parse_reply(out, "ipsec")
        r2, _ = wire.parse_reply(out[n:], "ipsec")
        assert (r1.code, r1.protocol, r2.code, r2.protocol) == (0, 50, 0, 51)
        assert r1.spi != 0x1234
        spis += [r1.spi, r2.spi]
    assert all(255 < s < 2**32 for s in spis)
    assert len(set(spis)) == len(spis)
    assert h.counters["client_spi_overridden"] == 20
    for s in spis:
        assert store.holds("spi", s) is not None  # leased store-wide (shared with the ESP role)


def test_ipsec_translated_esp_but_never_ah():
    """Issue 12: AH in a translated session was delivered end-to-end, to a client with no
    decapsulator; it is refused 0x07 (AH cannot be translated), ESP is translated."""
    h, store = make()
    c, _ = enter(h, flags=wire.FLAG_TRANSLATED)
    c.take()
    h.nar_data(c, wire.encode_ipsec(2, 50, 0) + wire.encode_ipsec(2, 51, 0))
    out = c.take()
    assert out[:3] == b"\x01\x00\x32" and out[7:] == wire.encode_ipsec(0x07, 51, 0)
    ms = {m.proto: m for m in store.records("nar.mapping")}
    assert set(ms) == {50} and ms[50].translated is True
    assert store.lookup("nar.mapping", "ipsec", (50, ms[50].spi, NB)) is ms[50]
    assert not c.closed
    # end-to-end sessions get AH
    c2, _ = enter(h, sid="s2")
    h.nar_data(c2, wire.encode_ipsec(2, 51, 0))
    assert [m.translated for m in store.records("nar.mapping") if m.proto == 51] == [False]


def test_ipsec_bad_protocol():
    h, store = make()
    c, _ = enter(h)
    h.nar_data(c, wire.encode_ipsec(2, 17, 77))
    assert c.take() == wire.encode_ipsec(0x07, 17, 0)
    assert not c.closed and store.count("nar.mapping") == 0


def test_gre_session_gives_gre_encap():
    h, store = make()
    c, _ = enter(h, flags=wire.FLAG_GRE)
    h.nar_data(c, wire.encode_ipsec(2, 50, 0))
    (m,) = store.records("nar.mapping")
    assert m.encap == "gre" and not m.translated


# ------------------------------------------------------------------------ TUNNEL-ASSOCIATE

def test_tunnel_and_conflicts():
    h, store = make()
    a, _ = enter(h, "a")
    b, _ = enter(h, "b", client=XA2)
    h.nar_data(a, wire.encode_tunnel(3, 1, "172.16.0.5", 4))
    assert a.take() == wire.encode_tunnel(0, 1, "172.16.0.5", 4)
    m = store.lookup("nar.mapping", "tunnel", (YB, "172.16.0.5", NB))
    assert (m.client, m.proto, m.inner) == (XA, 4, "172.16.0.5")
    # the same tuple for another client: refused with 0x05, the first mapping intact
    h.nar_data(b, wire.encode_tunnel(3, 1, "172.16.0.5", 47))
    assert b.take() == wire.encode_tunnel(0x05, 1, "172.16.0.5", 47)
    assert store.lookup("nar.mapping", "tunnel", (YB, "172.16.0.5", NB)).client == XA
    # the same client again: confirmed, no second record
    h.nar_data(a, wire.encode_tunnel(3, 1, "172.16.0.5", 4))
    assert a.take() == wire.encode_tunnel(0, 1, "172.16.0.5", 4)
    assert store.count("nar.mapping") == 1
    # an IPv6 inner address needs GRE (IP-in-IP is IPv4 in IPv4); other protocols: 0x07
    h.nar_data(b, wire.encode_tunnel(3, 4, "2001:db8::5", 4)
               + wire.encode_tunnel(3, 1, "172.16.0.6", 17))
    assert b.take() == (wire.encode_tunnel(0x08, 4, "2001:db8::5", 4)
                        + wire.encode_tunnel(0x07, 1, "172.16.0.6", 17))
    assert not b.closed


def test_tunnel_associate_with_a_domain_name_and_an_ipv6_address():
    """Issue 12: ATYP 3 and 4 (both defined in 3.4) were refused 0x08."""
    from twisted.internet import defer

    h, store = make()
    names = {"home.example": "172.16.0.8"}
    h.resolve = lambda name: (defer.succeed(names[name]) if name in names
                              else defer.fail(OSError("NXDOMAIN")))
    c, _ = enter(h)
    h.nar_data(c, wire.encode_tunnel(3, 3, "home.example", 4)
               + wire.encode_tunnel(3, 4, "2001:db8::5", 47)
               + wire.encode_tunnel(3, 3, "nowhere.example", 4))
    assert c.take() == (wire.encode_tunnel(0, 3, "home.example", 4)  # the name, confirmed
                        + wire.encode_tunnel(0, 4, "2001:db8::5", 47)
                        + wire.encode_tunnel(0x04, 3, "nowhere.example", 4))
    assert store.lookup("nar.mapping", "tunnel", (YB, "172.16.0.8", NB)).proto == 4
    assert store.lookup("nar.mapping", "tunnel", (YB, "2001:db8::5", NB)).proto == 47
    assert not c.closed


def test_l2tp_is_refused_at_nar_mode_by_the_reply_flags():
    """3.1: the server grants by setting bits in its reply; L2TP (0x04) is never set, so a
    client asking for it is told IP-in-IP (or GRE, if it asked for that too)."""
    h, store = make()
    _, reply = enter(h, flags=wire.FLAG_L2TP)
    assert reply[2] == 0 and h.counters["mode_l2tp_refused"] == 1
    _, reply = enter(h, sid="s2", flags=wire.FLAG_L2TP | wire.FLAG_GRE)
    assert reply[2] == wire.FLAG_GRE


# ------------------------------------------------------------------- close, limits, garbage

def test_mappings_dropped_on_close():
    h, store = make()
    c, _ = enter(h)
    h.nar_data(c, wire.encode_icmp(1, 7) + wire.encode_ipsec(2, 50, 0)
               + wire.encode_tunnel(3, 1, "172.16.0.5", 47))
    assert store.count("nar.mapping") == 3
    spi = next(m.spi for m in store.records("nar.mapping") if m.kind == "ipsec")
    n = result(h.nar_closed(c))
    assert n >= 4  # session + 3 mappings (+ leases)
    assert store.count("nar.mapping") == 0 and store.count("nar.session") == 0
    assert store.lookup("nar.mapping", "ipsec", (50, spi, NB)) is None
    assert store.holds("spi", spi) is None
    assert store.holds(f"nar.icmp:{NB}:{YB}", 7) is None
    # the id is free again for the next client
    d, _ = enter(h, "d", client=XA2)
    h.nar_data(d, wire.encode_icmp(1, 7))
    assert d.take() == wire.encode_icmp(0, 7)


def test_limit():
    h, store = make(max_mappings_per_session=2)
    c, _ = enter(h)
    h.nar_data(c, wire.encode_icmp(1, 1) + wire.encode_icmp(1, 2) + wire.encode_icmp(1, 3))
    assert c.take()[8:] == wire.encode_icmp(0x01, 3)
    assert h.counters["limit_reached"] == 1 and store.count("nar.mapping") == 2


def test_socks_request_after_nar_mode():
    h, store = make()
    c, _ = enter(h)
    h.nar_data(c, wire.encode_socks_request(1, 0, 1, "192.0.2.10", 80) + wire.encode_icmp(1, 9))
    assert c.take() == wire.encode_socks_reply(0x07) + wire.encode_icmp(0, 9)
    assert not c.closed


@pytest.mark.parametrize("garbage, code", [
    (b"GET / HTTP/1.1\r\n", 0x01), (b"\x01\x77\x00\x00", 0x07), (b"\x01\x03\x09", 0x08)])
def test_garbage_answered_and_closed(garbage, code):
    h, store = make()
    c, _ = enter(h)
    h.nar_data(c, wire.encode_icmp(1, 5) + garbage + wire.encode_icmp(1, 6))
    assert c.take() == wire.encode_icmp(0, 5) + wire.encode_error(code)
    assert c.closed and h.counters["garbage"] == 1
    assert store.count("nar.mapping") == 1  # until nar_closed
    result(h.nar_closed(c))
    assert store.count("nar.mapping") == 0


def test_byte_by_byte():
    h, store = make()
    c, _ = enter(h)
    for b in wire.encode_tunnel(3, 1, "172.16.0.9", 4):
        h.nar_data(c, bytes((b,)))
    assert c.take() == wire.encode_tunnel(0, 1, "172.16.0.9", 4)


def test_slow_store_keeps_order_and_close_during_write():
    """With a backend whose writes complete later (the ICMP id lease), replies keep their order, and a
    connection closed while a write is pending leaves nothing behind."""
    from twisted.internet import defer

    class Slow(MemoryBackend):
        persistent = True  # leases are written; nar kinds are never persisted

        def __init__(self):
            self.pending = []

        def submit(self, writes):
            d = defer.Deferred()
            self.pending.append(d)
            return d

        def flush(self):
            while self.pending:
                self.pending.pop(0).callback(None)

    clock = task.Clock()
    backend = Slow()
    store = Store(backend, clock)
    for k in KINDS:
        store.register(k)
    h = NarHandler(NarOptions(lent_address=NB), store, clock)
    c = FakeConn("s1")
    d = h.nar_mode(c, Req())
    backend.flush()
    assert result(d)[:2] == b"\x05\x00"
    h.nar_data(c, wire.encode_icmp(1, 11) + wire.encode_icmp(1, 12))
    assert c.written == []
    backend.flush()
    backend.flush()
    backend.flush()
    assert c.take() == wire.encode_icmp(0, 11) + wire.encode_icmp(0, 12)
    h.nar_data(c, wire.encode_icmp(1, 13))
    h.nar_closed(c)
    c.closed = True
    for _ in range(4):
        backend.flush()
    assert store.count("nar.mapping") == 0 and store.count("nar.session") == 0
    assert store.holds(f"nar.icmp:{NB}:{YB}", 13) is None


def test_through_the_socks_server():
    """The real SOCKS5 server (narsuite.nar.server) in front of NarHandler: greeting,
    NAR-MODE, pipelined NAR commands, close -> the mappings are gone."""
    from twisted.internet import error
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.python.failure import Failure

    from narsuite.nar.config import NarConfig, Rule
    from narsuite.nar.server import SocksFactory

    reactor = MemoryReactorClock()
    store = Store(MemoryBackend(), reactor)
    options = NarOptions(lent_address=NB)
    h = NarHandler(options, store, reactor)
    cfg = NarConfig(methods=("none",), rules=(Rule("pass"),), nar=options)
    f = SocksFactory(cfg, None, None, reactor, h)
    p = f.buildProtocol(IPv4Address("TCP", XA, 40000))
    tr = StringTransport(hostAddress=IPv4Address("TCP", "10.0.0.1", 1080),
                         peerAddress=IPv4Address("TCP", XA, 40000))
    p.makeConnection(tr)
    p.dataReceived(b"\x05\x01\x00" + wire.encode_socks_request(0x80, wire.FLAG_TRANSLATED, 1, YB, 0)
                   + wire.encode_icmp(1, 0x77) + wire.encode_ipsec(2, 50, 0))
    out = tr.value()
    assert out[:2] == b"\x05\x00"
    assert out[2:12] == wire.encode_socks_reply(0, wire.FLAG_TRANSLATED, NB, 0)
    assert out[12:16] == wire.encode_icmp(0, 0x77)
    r, _ = wire.parse_reply(out[16:], "ipsec")
    assert r.code == 0 and r.spi > 255
    assert {m.kind for m in store.records("nar.mapping")} == {"icmp", "ipsec"}
    assert all(m.translated and m.client == XA for m in store.records("nar.mapping"))
    p.connectionLost(Failure(error.ConnectionDone()))
    assert store.count("nar.mapping") == 0 and store.count("nar.session") == 0


# ------------------------------------------------------- TCP/UDP: BIND and UDP ASSOCIATE

@attrs.define
class FakeInstaller:
    """The data plane's side: port reservations on N and the kernel's maps."""

    busy: set = attrs.field(factory=set)  # (proto, port) used by programs on N
    held: set = attrs.field(factory=set)
    installed: list = attrs.field(factory=list)
    fail: bool = False

    def reserve_port(self, proto, port):
        if (proto, port) in self.busy or (proto, port) in self.held:
            return False
        self.held.add((proto, port))
        return True

    def release_port(self, proto, port):
        self.held.discard((proto, port))

    def install_mapping(self, m):
        from twisted.internet import defer

        if self.fail:
            return defer.fail(RuntimeError("nft: Operation not permitted"))
        self.installed.append(m)
        return defer.succeed(None)


def make_tcpudp(**opts):
    h, store = make(**opts)
    h._installer = FakeInstaller()
    return h, store, h._installer


def socks_reply(data):
    from narsuite.nar import socks

    r, n = socks.parse_reply(data)
    return r, data[n:]


BIND = 2
UDP = 3


@pytest.mark.parametrize("flags", [0, wire.FLAG_TRANSLATED])
def test_bind_makes_a_tcp_mapping(flags):
    h, store, inst = make_tcpudp()
    c, _ = enter(h, flags=flags)
    h.nar_data(c, wire.encode_socks_request(BIND, 0, 1, YB, 5555)
               + wire.encode_socks_request(BIND, 0, 1, "0.0.0.0", 0))
    r1, rest = socks_reply(c.take())
    r2, rest = socks_reply(rest)
    assert rest == b"" and not c.closed  # one reply per BIND, no second one in NAR mode
    assert (r1.rep, r1.host, r2.rep, r2.host) == (0, NB, 0, NB)
    assert r1.port != r2.port and all(20000 <= r.port <= 32767 for r in (r1, r2))
    m1 = store.lookup("nar.mapping", "tcp", (NB, r1.port, YB, 5555))
    m2 = store.lookup("nar.mapping", "tcp", (NB, r2.port, YB, 0))  # any Y port
    assert m1.kind == m2.kind == "tcp" and m1.proto == 6 and m1.client == XA
    assert m1.translated is bool(flags) and store.owner_of("nar.mapping", m1.id) == "s1"
    assert inst.installed == [m1, m2] and inst.held == {(6, r1.port), (6, r2.port)}
    assert store.holds(f"nar.tcp:{NB}", r1.port) == "s1"


def test_udp_associate_honours_a_free_port_and_assigns_otherwise():
    h, store, inst = make_tcpudp()
    inst.busy.add((17, 5000))  # a program on N has it
    a, _ = enter(h, "a")
    b, _ = enter(h, "b", client=XA2)
    h.nar_data(a, wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 5353))
    ra, _ = socks_reply(a.take())
    assert (ra.rep, ra.host, ra.port) == (0, NB, 5353)
    h.nar_data(a, wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 5353))  # again: confirmed
    assert socks_reply(a.take())[0].port == 5353 and store.count("nar.mapping") == 1
    h.nar_data(b, wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 5353))  # held by a
    rb, _ = socks_reply(b.take())
    assert rb.rep == 0 and rb.port != 5353 and 20000 <= rb.port <= 32767
    h.nar_data(b, wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 5000))  # used on N
    rc, _ = socks_reply(b.take())
    assert rc.rep == 0 and rc.port not in (5000, 5353)
    assert store.lookup("nar.mapping", "udp", (NB, 5353)).session == "a"
    assert store.lookup("nar.mapping", "udp", (NB, rb.port)).client == XA2
    assert store.holds(f"nar.udp:{NB}", 5000) is None  # the lease was given back
    assert h.counters["udp_port_confirmed"] == 1 and h.counters["udp_port_assigned"] == 2
    assert h.counters["port_in_use_on_n"] == 1


@pytest.mark.parametrize("req, rep", [
    (wire.encode_socks_request(BIND, 0, 1, "192.0.2.99", 0), 0x02),  # not this session's Yb
    (wire.encode_socks_request(BIND, 0, 3, "y.example", 0), 0x08),
    (wire.encode_socks_request(1, 0, 1, YB, 80), 0x07),  # CONNECT stays unsupported
])
def test_tcpudp_refusals(req, rep):
    h, store, inst = make_tcpudp()
    c, _ = enter(h)
    h.nar_data(c, req + wire.encode_icmp(1, 9))
    assert c.take() == wire.encode_socks_reply(rep) + wire.encode_icmp(0, 9)
    assert {m.kind for m in store.records("nar.mapping")} == {"icmp"} and not inst.held


def test_tcpudp_without_data_plane_or_when_nft_fails():
    h, store = make()  # no installer, no running data plane for this store
    c, _ = enter(h)
    h.nar_data(c, wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 0))
    assert c.take() == wire.encode_socks_reply(0x07)
    assert h.counters["tcpudp_unavailable"] == 1
    h2, store2, inst = make_tcpudp()
    inst.fail = True
    c2, _ = enter(h2)
    h2.nar_data(c2, wire.encode_socks_request(BIND, 0, 1, YB, 0))
    assert c2.take() == wire.encode_socks_reply(0x01) and not c2.closed
    assert store2.count("nar.mapping") == 0 and not inst.held
    assert not [k for k in store2.owned_by("s1") if k[0] != "nar.session"]  # no lease left


def test_port_exhaustion_and_limit():
    h, store, inst = make_tcpudp(max_mappings_per_session=3)
    h.port_range = (21000, 21001)
    c, _ = enter(h)
    h.nar_data(c, wire.encode_socks_request(BIND, 0, 1, YB, 0) * 3)
    r1, rest = socks_reply(c.take())
    r2, rest = socks_reply(rest)
    r3, rest = socks_reply(rest)
    assert (r1.rep, r2.rep, r3.rep) == (0, 0, 0x01) and {r1.port, r2.port} == {21000, 21001}
    h.nar_data(c, wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 0))
    h.nar_data(c, wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 0))
    r4, rest = socks_reply(c.take())
    r5, _ = socks_reply(rest)
    assert r4.rep == 0 and r5.rep == 0x01 and h.counters["limit_reached"] == 1


def test_tcpudp_mappings_dropped_on_close():
    h, store, inst = make_tcpudp()
    c, _ = enter(h)
    h.nar_data(c, wire.encode_socks_request(BIND, 0, 1, YB, 0)
               + wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 22222))
    rt, rest = socks_reply(c.take())
    ru, _ = socks_reply(rest)
    assert store.count("nar.mapping") == 2
    result(h.nar_closed(c))
    assert store.count("nar.mapping") == 0
    assert store.holds(f"nar.tcp:{NB}", rt.port) is None
    assert store.holds(f"nar.udp:{NB}", 22222) is None
    d, _ = enter(h, "d", client=XA2)  # the port is free again for the next client
    inst.held.clear()  # (the data plane releases reservations on the store's delete)
    h.nar_data(d, wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 22222))
    assert socks_reply(d.take())[0].port == 22222


def test_tcpudp_mappings_answer_to_the_socks_rules():
    """NAR-MODE passed the "nar" rules; BIND and UDP mappings are checked as bind/udp towards Yb."""
    from narsuite.nar.config import Rule
    from narsuite.nar.rules import RuleSet

    h, store, inst = make_tcpudp()
    h.rules = RuleSet((Rule("block", commands=("bind",)), Rule("pass")), "debug")
    c, _ = enter(h)
    h.nar_data(c, wire.encode_socks_request(BIND, 0, 1, YB, 0)
               + wire.encode_socks_request(UDP, 0, 1, "0.0.0.0", 5000))
    r1, rest = socks_reply(c.take())
    r2, rest = socks_reply(rest)
    assert r1.rep == wire.REP_NOT_ALLOWED and r2.rep == 0
    assert [m.kind for m in store.records("nar.mapping")] == ["udp"]
    assert h.counters["rule_blocks"] == 1 and not c.closed


def _socks_nar(max_mappings=64, **opts):
    """The real SOCKS5 server in front of NarHandler, on a StringTransport, in NAR mode."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from narsuite.nar.config import NarConfig, Rule
    from narsuite.nar.server import SocksFactory

    reactor = MemoryReactorClock()
    store = Store(MemoryBackend(), reactor)
    options = NarOptions(lent_address=NB, max_mappings_per_session=max_mappings, **opts)
    h = NarHandler(options, store, reactor)
    h.reactor_for_tests = reactor
    f = SocksFactory(NarConfig(methods=("none",), rules=(Rule("pass"),), nar=options), None, None,
                     reactor, h)
    p = f.buildProtocol(IPv4Address("TCP", XA, 40000))
    tr = StringTransport(hostAddress=IPv4Address("TCP", "10.0.0.1", 1080),
                         peerAddress=IPv4Address("TCP", XA, 40000))
    p.makeConnection(tr)
    p.dataReceived(b"\x05\x01\x00" + wire.encode_socks_request(0x80, 0, 1, YB, 0))
    assert tr.value()[2:4] == b"\x05\x00"
    tr.clear()
    return h, store, p, tr


def test_pipelined_commands_get_back_pressure_not_a_cut_off():
    """Issue 12: 3,000 pipelined commands in one write were answered 01 01 and a close."""
    h, store, p, tr = _socks_nar()
    cmds = [wire.encode_ipsec(2, 50, 0) for _ in range(3000)]
    p.dataReceived(b"".join(cmds))  # 21,000 bytes
    out = tr.value()
    assert not tr.disconnecting
    replies = []
    while out:
        r, n = wire.parse_reply(out, "ipsec")
        replies.append(r.code)
        out = out[n:]
    assert len(replies) == 3000
    assert replies[:64] == [0] * 64 and set(replies[64:]) == {wire.REP_GENERAL_FAILURE}
    assert store.count("nar.mapping") == 64
    assert tr.producerState == "producing"  # paused while over the high-water mark, read again


def test_pipelining_pauses_reading_while_the_store_is_slow():
    from twisted.internet import defer

    from narsuite.nar.session import HIGH_WATER

    h, store, p, tr = _socks_nar(max_mappings=10000)
    gate = []
    real = store.allocate_spi

    def slow(owner):
        d = defer.Deferred()
        gate.append(lambda: real(owner).chainDeferred(d))
        return d

    store.allocate_spi = slow
    n = HIGH_WATER // 7 + 100
    p.dataReceived(wire.encode_ipsec(2, 50, 0) * n)
    assert tr.producerState == "paused" and not tr.disconnecting
    while gate:
        gate.pop(0)()
    assert tr.producerState == "producing"
    out, codes = tr.value(), []
    while out:
        r, k = wire.parse_reply(out, "ipsec")
        codes.append(r.code)
        out = out[k:]
    assert codes == [0] * n


def test_unread_replies_stop_reading_commands():
    """The client does not read its replies: Twisted's write buffer fills and we stop reading."""
    h, store, p, tr = _socks_nar()
    assert tr.producer is not None and tr.streaming
    tr.producer.pauseProducing()  # what Twisted does when the write buffer is over bufferSize
    assert tr.producerState == "paused"
    tr.producer.resumeProducing()
    assert tr.producerState == "producing"


def test_session_idle_limit_counts_control_bytes_and_data_plane_packets():
    h, store, p, tr = _socks_nar(session_idle_timeout=10.0)
    reactor = h.reactor_for_tests
    seen = {"t": 0.0}
    h.last_activity = lambda conn: seen["t"]
    reactor.advance(6)
    p.dataReceived(wire.encode_icmp(1, 5))  # control traffic at t=6
    reactor.advance(9)
    assert not tr.disconnecting
    seen["t"] = reactor.seconds()  # a packet of its mappings at t=15
    reactor.advance(9)
    assert not tr.disconnecting
    reactor.advance(2)  # t=26 > 15 + 10
    assert tr.disconnecting


def test_shared_store_unreachable_refuses_new_allocations_with_0x01_and_counts(deferred_errors):
    """store.backend = "redis" and Redis away: the lease writes fail with StoreUnavailable; ICMP,
    IPSEC and UDP-ASSOCIATE are refused with SOCKS general failure (0x01), counted as
    store_unavailable (not as exhaustion); once the store is back they are granted again."""
    from twisted.internet import defer

    from narsuite.store.redis import StoreUnavailable

    class Down(MemoryBackend):
        persistent = True
        down = True

        def submit(self, writes):
            if self.down:
                return defer.fail(StoreUnavailable("the shared store is unreachable"))
            return defer.succeed(None)

    clock = task.Clock()
    backend = Down()
    store = Store(backend, clock)
    for k in KINDS:
        store.register(k)
    h = NarHandler(NarOptions(lent_address=NB), store, clock)
    a, _ = enter(h, "a")
    h.nar_data(a, wire.encode_icmp(1, 0x1234) + wire.encode_ipsec(2, 50, 0))
    out = a.take()
    assert out[:4] == wire.encode_icmp(0x01, 0x1234)
    assert wire.parse_reply(out[4:], "ipsec")[0].code == 0x01
    assert h.counters["store_unavailable"] == 2 and h.counters["exhausted"] == 0
    assert store.count("store.lease") == 0 and store.count("nar.mapping") == 0
    backend.down = False
    h.nar_data(a, wire.encode_icmp(1, 0x1234))
    assert a.take() == wire.encode_icmp(0, 0x1234)


def test_refusals_are_logged_in_aggregate():
    """Thousands of refused pipelined commands: the first 5 in full, then one summary."""
    from twisted.logger import globalLogPublisher

    seen = []

    def observer(event):
        if event.get("log_namespace") == "narsuite.nar.session":
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        h, store, p, tr = _socks_nar(max_mappings=1)
        p.dataReceived(wire.encode_ipsec(2, 50, 0) * 2000)
        refusals = [e for e in seen if e.get("reason") == "refused_0x01"]
        assert h.counters["commands_refused"] == 1999 and len(refusals) == 5
        h.events.stop()
        assert seen[-1]["counts"]["refused_0x01"] == 1999
    finally:
        globalLogPublisher.removeObserver(observer)
