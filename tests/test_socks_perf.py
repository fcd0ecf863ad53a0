"""The SOCKS server's hot-path shortcuts keep the behaviour they replace.

* ``write_now`` sends at once on a real TCP connection with an empty buffer, and
  falls back to ``transport.write`` otherwise (order kept);
* the decision cache answers only while the decision would not be logged;
* one timer per connection still gives each phase its own timeout;
* the UDP fast path (IPv4, FRAG 0) relays like the codec path.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel

from narsuite import logs
from narsuite.nar import socks
from narsuite.nar.config import NarConfig, NarOptions, Rule
from narsuite.nar.fastio import write_now
from narsuite.nar.rules import RuleSet
from narsuite.nar.server import SocksFactory, _Decisions

CLIENT = ("10.0.0.10", 40000)
SERVER = ("10.0.0.1", 1080)


class _Reactor:
    """Just enough reactor for a tcp.Connection that never reaches the loop."""

    def __init__(self):
        self.writers = []

    def addWriter(self, w):
        self.writers.append(w)

    def removeWriter(self, w):
        pass

    def addReader(self, r):
        pass

    def removeReader(self, r):
        pass


def _conn_pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    r = _Reactor()
    conn = tcp.Connection(a, None, r)
    conn.connected = 1
    return conn, b, r


def test_write_now_sends_at_once_on_an_idle_tcp_connection():
    conn, peer, r = _conn_pair()
    write_now(conn, b"hello")
    assert peer.recv(100) == b"hello" and not r.writers and not conn._tempDataLen
    conn.socket.close()
    peer.close()


def test_write_now_queues_behind_buffered_bytes_and_keeps_order():
    conn, peer, r = _conn_pair()
    conn.write(b"first")  # queued by Twisted: write_now must not overtake it
    write_now(conn, b"second")
    assert conn._tempDataBuffer == [b"first", b"second"] and conn in r.writers
    conn.doWrite()
    assert peer.recv(100) == b"firstsecond"
    conn.socket.close()
    peer.close()


def test_write_now_queues_what_the_kernel_does_not_take():
    conn, peer, r = _conn_pair()
    big = b"x" * (8 << 20)
    write_now(conn, big)
    assert 0 < conn._tempDataLen < len(big) and conn in r.writers
    conn.socket.close()
    peer.close()


def test_write_now_on_other_transports_is_write():
    tr = StringTransport()
    write_now(tr, b"abc")
    assert tr.value() == b"abc"


def test_decision_cache_only_while_not_logged():
    events = []

    class L:
        namespace = "narsuite.nar.rules"

        def emit(self, level, fmt, **kw):
            events.append((level, kw["action"]))

    rules = RuleSet((Rule("block", ports=("25",)), Rule("pass")), "debug", log=L())
    d = _Decisions(rules)
    logs.set_level("info")
    try:
        assert d.check("10.0.0.10", "", "connect", "192.0.2.1", 80) is True
        assert d.check("10.0.0.10", "", "connect", "192.0.2.1", 80) is True
        assert d.check("10.0.0.10", "", "connect", "192.0.2.1", 25) is False
        assert d.check("10.0.0.10", "", "connect", "192.0.2.1", 25) is False
        assert len(events) == 2  # debug decisions filtered out: answered from the cache
        logs.set_level("debug")
        d.check("10.0.0.10", "", "connect", "192.0.2.1", 80)
        d.check("10.0.0.10", "", "connect", "192.0.2.1", 80)
        assert events[2:] == [(LogLevel.debug, "pass")] * 2  # logged again, every time
    finally:
        logs.set_level("info")


def _make(**kw):
    cfg = NarConfig(methods=("none",), rules=(Rule("pass"),), nar=NarOptions(enabled=False), **kw)
    reactor = MemoryReactorClock()
    return SocksFactory(cfg, None, None, reactor), reactor


def _open(f):
    p = f.buildProtocol(IPv4Address("TCP", *CLIENT))
    tr = StringTransport(hostAddress=IPv4Address("TCP", *SERVER), peerAddress=IPv4Address("TCP", *CLIENT))
    p.makeConnection(tr)
    return p, tr


def test_one_timer_per_connection_through_the_phases():
    f, reactor = _make(negotiation_timeout=5.0, connect_timeout=20.0, idle_timeout=60.0)
    p, tr = _open(f)
    assert len(reactor.getDelayedCalls()) == 1
    p.dataReceived(b"\x05\x01\x00" + socks.encode_request(1, "192.0.2.10", 80))
    # our timer plus the connector's own per-attempt timeout
    assert len([c for c in reactor.getDelayedCalls() if c.func == p._timed_out]) == 1
    reactor.advance(19.0)
    assert not tr.disconnecting  # negotiation is over: the connect deadline applies
    reactor.advance(1.0)
    assert tr.value().endswith(socks.encode_reply(socks.TTL_EXPIRED)) and tr.disconnecting
    assert f.counters["timeouts_connect"] == 1 and f.counters["timeouts_negotiation"] == 0
    p.connectionLost()
    assert not [c for c in reactor.getDelayedCalls() if c.func == p._timed_out]


def test_negotiation_timeout_shorter_than_a_previous_phase_resets_the_timer():
    f, reactor = _make(negotiation_timeout=2.0, connect_timeout=1.0)
    p, tr = _open(f)
    p.dataReceived(b"\x05\x01\x00" + socks.encode_request(1, "192.0.2.10", 80))
    reactor.advance(1.0)
    assert tr.disconnecting and f.counters["timeouts_connect"] == 1


def test_udp_fast_path_and_codec_path_agree():
    f, reactor = _make()
    sent = []

    class UDP:
        def write(self, data, addr):
            sent.append((data, addr))

        def getHost(self):
            return IPv4Address("UDP", "0.0.0.0", 5000)

        def stopListening(self):
            pass

    def listenUDP(port, proto, interface=""):
        proto.transport = UDP()
        return proto.transport

    reactor.listenUDP = listenUDP
    p, tr = _open(f)
    p.dataReceived(b"\x05\x01\x00" + socks.encode_request(3, "0.0.0.0", 0))
    relay = p._udp
    relay.datagramReceived(socks.encode_udp("192.0.2.20", 7, b"ping"), (CLIENT[0], 4444))
    relay.datagramReceived(socks.encode_udp("2001:db8::7", 7, b"ping6"), (CLIENT[0], 4444))
    relay.datagramReceived(socks.encode_udp("192.0.2.20", 7, b"frag", frag=1), (CLIENT[0], 4444))
    assert sent == [(b"ping", ("192.0.2.20", 7)), (b"ping6", ("2001:db8::7", 7))]
    relay.datagramReceived(b"pong", ("192.0.2.20", 7))
    assert sent[-1] == (socks.encode_udp("192.0.2.20", 7, b"pong"), (CLIENT[0], 4444))
    relay.datagramReceived(b"stray", ("192.0.2.21", 7))
    c = f.counters
    assert (c["udp_datagrams_out"], c["udp_datagrams_in"], c["udp_fragments_dropped"], c["udp_dropped"]) \
        == (2, 1, 1, 1)
    assert c["bytes_up"] == 9 and c["bytes_down"] == 4
