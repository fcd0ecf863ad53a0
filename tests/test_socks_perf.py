"""The SOCKS server's hot-path shortcuts keep the behaviour they replace.

* ``write_now`` sends at once on a real TCP connection with an empty buffer, and
  falls back to ``transport.write`` otherwise (order kept);
* the decision cache answers only while the decision would not be logged;
* one timer per connection still gives each phase its own timeout;
* the UDP fast path (IPv4, FRAG 0) relays like the codec path;
* ``lose_now`` closes at once only when nothing is left to send;
* ``connect_tcp`` connects, fails and is abandoned the way ``connectTCP`` does,
  on a real epoll reactor and real sockets;
* the lean transports (``LeanServer`` for accepted connections, ``OutgoingConnection``)
  carry what Twisted's do, close with a FIN or RST without a ``shutdown`` call first,
  and the outbound socket is non-blocking from creation.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import error, protocol, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from narsuite import logs
from narsuite.nar import socks
from narsuite.nar.config import NarConfig, NarOptions, Rule
from narsuite.nar.fastio import (
    ClosingProducer,
    LeanConnector,
    LeanServer,
    OutgoingConnection,
    connect_tcp,
    lean_accepts,
    lose_now,
    shutdown_write_now,
    write_now,
)
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


class _Lost(protocol.Protocol):
    def __init__(self):
        self.lost = []

    def connectionLost(self, reason):
        self.lost.append(reason)


def test_lose_now_closes_at_once_when_nothing_is_buffered():
    conn, peer, r = _conn_pair()
    p = _Lost()
    conn.protocol = p
    lose_now(conn)
    assert len(p.lost) == 1 and p.lost[0].check(error.ConnectionDone)  # before lose_now returned
    assert not conn.connected and peer.recv(10) == b""  # the peer sees the close
    peer.close()


def test_lose_now_with_bytes_buffered_flushes_first():
    conn, peer, r = _conn_pair()
    p = _Lost()
    conn.protocol = p
    conn.write(b"pending")
    lose_now(conn)
    assert not p.lost and conn.disconnecting and conn in r.writers  # Twisted's loseConnection
    result = conn.doWrite()  # what the reactor does next: flush, then report the close
    assert isinstance(result, error.ConnectionDone)
    assert peer.recv(100) == b"pending"
    peer.close()


def test_closing_producer_closes_the_other_side_at_once():
    """What Twisted calls when the relay's other side is lost: stopProducing closes now."""
    conn, peer, r = _conn_pair()
    p = _Lost()
    conn.protocol = p
    ClosingProducer(conn).stopProducing()
    assert len(p.lost) == 1 and not conn.connected and peer.recv(10) == b""
    peer.close()


def test_lose_now_on_other_transports_is_loseConnection():
    tr = StringTransport()
    lose_now(tr)
    assert tr.disconnecting


class _Recorder(protocol.ClientFactory):
    noisy = False

    def __init__(self, reactor, then=None):
        self.reactor = reactor
        self.failed = []
        self.made = []
        self.then = then

    def buildProtocol(self, addr):
        f = self

        class P(protocol.Protocol):
            def connectionMade(self):
                f.made.append((addr, self.transport))
                if f.then:
                    f.then(self)

        return P()

    def clientConnectionFailed(self, connector, reason):
        self.failed.append((connector, reason))
        self.reactor.stop()


def _run(r, seconds=5.0):
    r.callLater(seconds, r.stop)  # bound the test
    r.run(installSignalHandlers=False)


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_connect_tcp_connects_to_a_real_listener(family, host):
    srv = socket.socket(family)
    srv.bind((host, 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    r = EPollReactor()
    seen = {}

    def made(p):
        tr = p.transport
        peer, peer_addr = srv.accept()
        peer.settimeout(5)
        seen.update(connected=tr.connected, kind=type(tr), host=(tr.getHost().host, tr.getHost().port),
                    peer=(tr.getPeer().host, tr.getPeer().port), accepted_from=peer_addr[:2])
        tr.write(b"hello")  # Twisted's queued write, sent by the loop

        def check():
            seen["got"] = peer.recv(10)
            lose_now(tr)
            seen["after_close"] = peer.recv(10)
            peer.close()
            r.stop()

        r.callLater(0.05, check)

    f = _Recorder(r, made)
    c = connect_tcp(r, host, port, f)
    assert isinstance(c, LeanConnector) and not f.made  # asynchronous, like connectTCP
    _run(r)
    srv.close()
    assert not f.failed and len(f.made) == 1
    addr = f.made[0][0]
    assert (addr.host, addr.port) == (host, port)
    assert seen["connected"] and seen["kind"] is OutgoingConnection
    assert seen["peer"] == (host, port) and seen["host"] == seen["accepted_from"]
    assert seen["got"] == b"hello" and seen["after_close"] == b""


def test_connect_tcp_refused_reports_connectTCPs_error_type():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    r = EPollReactor()
    f = _Recorder(r)
    c = connect_tcp(r, "127.0.0.1", port, f)
    assert not f.failed  # never from inside the call
    _run(r)
    assert len(f.failed) == 1 and f.failed[0][0] is c
    assert f.failed[0][1].check(error.ConnectionRefusedError) and not f.made
    assert c.socket is None and c.state == "failed"


def test_connect_tcp_immediate_error_is_reported_one_turn_later():
    r = EPollReactor()
    f = _Recorder(r)
    c = connect_tcp(r, "127.0.0.1", 0, f)  # port 0: refused by the kernel
    assert not f.failed
    _run(r)
    assert len(f.failed) == 1 and f.failed[0][0] is c
    assert f.failed[0][1].check(error.ConnectError)


def test_connect_tcp_stopped_attempt_is_abandoned_silently():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    r = EPollReactor()
    f = _Recorder(r)
    c = connect_tcp(r, "127.0.0.1", srv.getsockname()[1], f)
    sock = c.socket
    fd = sock.fileno()
    assert fd in r._selectables  # waiting for writability
    c.stopConnecting()
    _run(r, 0.2)
    srv.close()
    assert not f.made and not f.failed and c.state == "stopped" and c.socket is None
    assert fd not in r._selectables and sock.fileno() == -1  # unregistered and closed


def test_connect_tcp_on_other_reactors_is_connectTCP_without_timeout():
    r = MemoryReactorClock()
    f = protocol.ClientFactory()
    connect_tcp(r, "192.0.2.1", 80, f)
    host, port, factory, timeout, bind = r.tcpClients[-1]
    assert (host, port, factory, timeout) == ("192.0.2.1", 80, f, None)


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

    def listenUDP(port, proto, interface="", maxPacketSize=8192):
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


# ---------------------------------------------------------------- the CONNECT path on a real reactor

#: The two CONNECT paths: Twisted's transports (other reactors, several workers) and
#: narsuite.nar.lean's (the role's default under narsuite's reactor).
PATHS = ["twisted", "lean"]


def _socks_server_thread(config: NarConfig, path: str = "twisted"):
    """The SOCKS server on a fresh epoll reactor in a thread; returns (reactor, factory, port, thread).

    ``path`` "twisted": Twisted's epoll reactor and port, as the role listens with several
    workers (accepted connections are LeanServers); "lean": narsuite's reactor and the
    lean CONNECT relay's port, as the role listens by default."""
    import threading

    from narsuite import reactor as lean_reactor
    from narsuite.nar.lean import LeanSocksPort

    if path == "lean":
        r = lean_reactor.NarsuiteEPollReactor()
        f = SocksFactory(config, reactor=r)
        lp = LeanSocksPort(r, f, "127.0.0.1", 0)
        lp.startListening()
        port = lp.getHost().port
    else:
        r = EPollReactor()
        f = SocksFactory(config, reactor=r)
        port = lean_accepts(r.listenTCP(0, f, interface="127.0.0.1")).getHost().port
    t = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False}, daemon=True)
    t.start()
    return r, f, port, t


def _udp_associate(port: int) -> tuple[socket.socket, tuple[str, int]]:
    """A UDP ASSOCIATE (no auth, DST 0.0.0.0:0) with the server on 127.0.0.1:``port``: the
    control connection and the relay's address."""
    ctrl = socket.create_connection(("127.0.0.1", port), timeout=5)
    ctrl.sendall(b"\x05\x01\x00")
    assert ctrl.recv(2) == b"\x05\x00"
    ctrl.sendall(socks.encode_request(socks.CMD_UDP_ASSOCIATE, "0.0.0.0", 0))
    rep = ctrl.recv(10)
    assert rep[1] == 0
    return ctrl, ("127.0.0.1", int.from_bytes(rep[8:10], "big"))


def _socks_connect(port: int, host: str, dport: int) -> tuple[socket.socket, int, str, int]:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    if ":" in host:
        s.sendall(b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, host) + dport.to_bytes(2, "big"))
    else:
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + dport.to_bytes(2, "big"))
    head = s.recv(4)
    alen = 16 if head[3:4] == b"\x04" else 4
    rest = b""
    while len(rest) < alen + 2:
        chunk = s.recv(alen + 2 - len(rest))
        if not chunk:
            break
        rest += chunk
    fam = socket.AF_INET6 if alen == 16 else socket.AF_INET
    return s, head[1], socket.inet_ntop(fam, rest[:alen]), int.from_bytes(rest[alen:alen + 2], "big")


def _settle(f, seconds: float = 5.0) -> None:
    """Wait until the server has closed every connection (it reads the last FIN after the client's close)."""
    import time as _time

    deadline = _time.monotonic() + seconds
    while f.active and _time.monotonic() < deadline:
        _time.sleep(0.01)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_socks_connect_relays_and_passes_the_close_on_a_real_reactor(host, path):
    """CONNECT through the lean connector: reply with the outbound socket's address, bytes both
    ways, the target's close passed on at once (lose_now), no connection left behind."""
    target = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    target.bind((host, 0))
    target.listen(4)
    cfg = NarConfig(listen="127.0.0.1", methods=["none"], rules=[Rule(action="pass")])
    r, f, port, t = _socks_server_thread(cfg, path)
    try:
        s, rep, bnd_host, bnd_port = _socks_connect(port, host, target.getsockname()[1])
        conn, from_addr = target.accept()
        conn.settimeout(5)
        assert rep == 0 and (bnd_host, bnd_port) == from_addr[:2]
        s.sendall(b"up" * 8)
        assert conn.recv(100) == b"up" * 8
        conn.sendall(b"down")
        assert s.recv(100) == b"down"
        conn.close()  # the target closes: the client must see the close
        assert s.recv(100) == b""
        s.close()
        _settle(f)
    finally:
        r.callFromThread(r.stop)
        t.join(10)
        target.close()
    assert f.active == 0 and f.counters["reply_succeeded"] == 1 and f.counters["connections"] == 1
    assert "lean_handovers" not in f.counters  # the lean path relayed it itself


@pytest.mark.parametrize("path", PATHS)
def test_socks_connect_refused_and_fallback_to_the_next_address_on_a_real_reactor(path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()[1]
    closed.close()
    live = socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen(1)
    cfg = NarConfig(listen="127.0.0.1", methods=["none"], rules=[Rule(action="pass")])
    r, f, port, t = _socks_server_thread(cfg, path)
    tries = []

    def resolve(name, p):  # a name with a dead address first (nothing on 127.0.0.2), then a live one
        from twisted.internet import defer
        tries.append(name)
        return defer.succeed(["127.0.0.2", "127.0.0.1"])

    try:
        s, rep, _, _ = _socks_connect(port, "127.0.0.1", dead)
        assert rep == socks.CONNECTION_REFUSED and s.recv(10) == b""  # REP 5, then closed
        s.close()
        f.resolve = resolve
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x03\x07example" + live.getsockname()[1].to_bytes(2, "big"))
        assert s.recv(4)[1] == 0  # the second address connected
        conn, _ = live.accept()
        conn.close()
        s.close()
    finally:
        r.callFromThread(r.stop)
        t.join(10)
        live.close()
    assert tries == ["example"] and f.counters["reply_connection_refused"] == 1
    assert f.counters["reply_succeeded"] == 1
    # the lean path refuses an address literal itself and hands a name over to the protocol
    assert f.counters.get("lean_handovers", 0) == (1 if path == "lean" else 0)


@pytest.mark.parametrize("path", PATHS)
def test_udp_associate_on_a_real_reactor_relays_both_ways_without_truncating(path):
    """The relay socket (_RelayPort, one datagram per event): small and 60,000-byte datagrams
    both ways, intact (Twisted's listenUDP default would truncate at 8192 bytes)."""
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(5)
    cfg = NarConfig(listen="127.0.0.1", methods=["none"], rules=[Rule(action="pass")])
    r, f, port, t = _socks_server_thread(cfg, path)
    try:
        ctrl, relay = _udp_associate(port)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        u.bind(("127.0.0.1", 0))
        u.settimeout(5)
        header = socks.encode_udp("127.0.0.1", echo.getsockname()[1], b"")
        for body in (b"ping", b"z" * 60000, b"pong"):
            u.sendto(header + body, relay)
            got, src = echo.recvfrom(65535)
            assert got == body and src[1] == relay[1]
            echo.sendto(body[::-1], src)
            back, _ = u.recvfrom(65535)
            assert back == header + body[::-1]
        u.close()
        ctrl.close()
    finally:
        r.callFromThread(r.stop)
        t.join(10)
        echo.close()
    assert f.counters["udp_datagrams_out"] == 3 and f.counters["udp_datagrams_in"] == 3
    assert f.counters["bytes_up"] == f.counters["bytes_down"] == 60008
    assert f.counters.get("lean_handovers", 0) == (1 if path == "lean" else 0)


# ---------------------------------------------------------------- splice(2) bulk relay

@pytest.mark.parametrize("reactor_cls", ["epoll", "lean", "lean-path"])
def test_bulk_relay_goes_over_to_splice_with_flow_control_and_half_close(reactor_cls):
    """A stream past SPLICE_AFTER is relayed by splice(2): every byte both ways in order, a
    slow reader holds the sender back (bounded pipes), a FIN passes on with the other
    direction still open, then both close and the counters are exact."""
    import hashlib
    import os
    import threading

    from narsuite import reactor as lean
    from narsuite.nar.server import SPLICE_AFTER

    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(4)
    cfg = NarConfig(listen="127.0.0.1", methods=["none"], rules=[Rule(action="pass")])
    if reactor_cls == "lean-path":  # the role's default: narsuite.nar.lean's relay
        r, f, port, t = _socks_server_thread(cfg, "lean")
    else:
        r = EPollReactor() if reactor_cls == "epoll" else lean.NarsuiteEPollReactor()
        f = SocksFactory(cfg, reactor=r)
        # as the role listens (SocksTCPServer / ReusePortServer): accepted connections are LeanServers
        port = lean_accepts(r.listenTCP(0, f, interface="127.0.0.1")).getHost().port
        t = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False}, daemon=True)
        t.start()
    up = os.urandom(3 * 1024 * 1024)
    down = os.urandom(5 * 1024 * 1024)
    try:
        s, rep, _, _ = _socks_connect(port, "127.0.0.1", target.getsockname()[1])
        conn, _ = target.accept()
        assert rep == 0
        for x in (s, conn):
            x.settimeout(20)
            x.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        got_up = bytearray()

        def read_up():
            while True:
                b = conn.recv(65536)
                if not b:
                    break
                got_up.extend(b)

        reader = threading.Thread(target=read_up)
        reader.start()
        s.sendall(up)
        s.shutdown(socket.SHUT_WR)  # half-close: the target must see EOF ...
        reader.join(20)
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
        # ... and can still answer; the client reads slowly (flow control through the pipes)
        sender = threading.Thread(target=lambda: (conn.sendall(down), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        got_down = bytearray()
        import time as _time
        _time.sleep(0.3)  # the client reads late: the sender waits on full pipes and buffers
        while True:
            b = s.recv(65536)
            if not b:
                break
            got_down.extend(b)
        sender.join(20)
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
        s.close()
        conn.close()
        deadline = _time.monotonic() + 5
        while f.active and _time.monotonic() < deadline:
            _time.sleep(0.05)
    finally:
        r.callFromThread(r.stop)
        t.join(10)
        target.close()
    c = f.counters
    assert c["relays_spliced"] == 1, c
    assert c["bytes_up"] == len(up) and c["bytes_down"] == len(down)
    assert f.active == 0
    assert len(up) > SPLICE_AFTER


def test_shutdown_write_now_and_close_now_on_a_real_connection():
    """A FIN passed on at once (no loop pass) when nothing is queued, and a half-closed
    connection closed at once; with bytes queued both wait for Twisted's flush."""
    from narsuite.nar.fastio import close_now, shutdown_write_now

    class P(protocol.Protocol):
        lost = None
        write_lost = False

        def connectionLost(self, reason):
            self.lost = reason

        def writeConnectionLost(self):
            self.write_lost = True

    conn, peer, r = _conn_pair()
    conn.protocol = p = P()
    shutdown_write_now(conn)
    assert peer.recv(10) == b"" and r.writers == []  # FIN now, nothing registered
    peer.sendall(b"still open")
    assert conn.socket.recv(100) == b"still open"  # the other direction works
    close_now(conn)
    assert p.lost is not None and not conn.connected
    # bytes queued: Twisted's path (register for writing, flush, then FIN)
    conn2, peer2, r2 = _conn_pair()
    conn2.protocol = P()
    conn2.dataBuffer, conn2.offset = b"queued", 0
    shutdown_write_now(conn2)
    assert conn2._writeDisconnecting and r2.writers == [conn2]


# ---------------------------------------------------------------- lean transports


class _CountingSocket(socket.socket):
    """A socket that counts shutdown() calls (the system call the lean transports save)."""

    shutdowns = 0

    def shutdown(self, how):
        type(self).shutdowns += 1
        return super().shutdown(how)


def _counting_pair():
    a, b = socket.socketpair()
    ca = _CountingSocket(a.family, a.type, a.proto, fileno=a.detach())
    ca.setblocking(False)
    b.settimeout(5)
    return ca, b


class _Port:
    _realPortNumber = 1080


@implementer(IHalfCloseableProtocol)
class _HalfClose(protocol.Protocol):
    def readConnectionLost(self):
        pass

    def writeConnectionLost(self):
        pass


def _tcp_pair():
    """(accepted, client) TCP sockets on loopback."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname(), timeout=5)
    acc, _ = srv.accept()
    srv.close()
    return acc, cli


def test_lean_server_has_every_attribute_twisteds_server_sets():
    """LeanServer re-does tcp.Server.__init__ minus two strings: a Twisted that adds an
    attribute there must fail here, not in a relay."""
    a, b = _tcp_pair()
    c, d = _tcp_pair()
    try:
        theirs = tcp.Server(a, protocol.Protocol(), ("10.0.0.10", 40000), _Port(), 7, _Reactor())
        ours = LeanServer(c, protocol.Protocol(), ("10.0.0.10", 40000), _Port(), 7, _Reactor())
        assert set(vars(theirs)) - {"logstr", "repstr"} <= set(vars(ours))
        assert ours.logPrefix() == theirs.logPrefix() == "Protocol,7,10.0.0.10"
        assert repr(ours) == repr(theirs) == "<Protocol #7 on 1080>"
        assert ours.getPeer() == theirs.getPeer() == IPv4Address("TCP", "10.0.0.10", 40000)
        assert ours.getHost() == IPv4Address("TCP", *c.getsockname())
        assert ours.connected and ours._addressType is IPv4Address
    finally:
        for s in (a, b, c, d):
            s.close()


def _eof(tr):
    """What the reactor does when a half-closeable connection reads EOF."""
    why = tr.doRead()
    assert why is not None and why.__class__.__name__ == "ConnectionDone"
    tr.readConnectionLost(Failure(why))


def test_lean_transports_close_without_shutdown_once_the_fin_is_read():
    """After the peer's FIN was read (how relayed connections end) close() alone sends our
    FIN: the peer reads the last bytes and EOF, and no shutdown() call was made."""
    _CountingSocket.shutdowns = 0
    a, peer_a = _counting_pair()
    b, peer_b = _counting_pair()
    try:
        server = LeanServer(a, _HalfClose(), ("127.0.0.1", 1), None, 0, _Reactor())
        server.protocol.makeConnection(server)
        out = OutgoingConnection(b, _HalfClose(), _Reactor(), ("127.0.0.1", 2))
        out.protocol.makeConnection(out)
        for tr, peer in ((server, peer_a), (out, peer_b)):
            peer.shutdown(socket.SHUT_WR)
            _eof(tr)
            write_now(tr, b"bye")
            lose_now(tr)
            assert peer.recv(10) == b"bye" and peer.recv(10) == b""
        assert _CountingSocket.shutdowns == 0
    finally:
        for s in (peer_a, peer_b):
            s.close()


def test_lean_transports_close_without_shutdown_after_their_own_fin():
    _CountingSocket.shutdowns = 0
    a, peer_a = _counting_pair()
    try:
        server = LeanServer(a, _HalfClose(), ("127.0.0.1", 1), None, 0, _Reactor())
        server.protocol.makeConnection(server)
        shutdown_write_now(server)  # the relay passes a FIN on: the one shutdown(SHUT_WR)
        assert peer_a.recv(10) == b""
        lose_now(server)
        assert _CountingSocket.shutdowns == 1
    finally:
        peer_a.close()


def test_a_lean_close_before_any_fin_keeps_twisteds_order_fin_then_reset():
    """Unread bytes and no FIN either way: shutdown() first as Twisted does, so the peer reads
    EOF before the reset (close() alone would reset at once)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname(), timeout=5)
    acc, _ = srv.accept()
    acc.setblocking(False)
    try:
        server = LeanServer(acc, protocol.Protocol(), ("127.0.0.1", 1), None, 0, _Reactor())
        server.protocol.makeConnection(server)
        cli.sendall(b"never read")
        import time

        time.sleep(0.05)
        lose_now(server)
        assert cli.recv(10) == b""
    finally:
        cli.close()
        srv.close()


def test_lean_accepts_only_changes_twisteds_tcp_ports():
    r = EPollReactor()
    port = r.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
    try:
        assert lean_accepts(port) is port and port.transport is LeanServer
        fake = object()
        assert lean_accepts(fake) is fake
    finally:
        port.stopListening()
        r._poller.close()


def test_the_outbound_socket_is_non_blocking_from_creation():
    """No setblocking() ioctl: the socket is made with SOCK_NONBLOCK (and Python knows it)."""
    import os

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    r = EPollReactor()
    try:
        c = LeanConnector(r, "127.0.0.1", srv.getsockname()[1], _Recorder(r, lambda p: None))
        assert c.socket is not None
        assert c.socket.gettimeout() == 0.0 and not os.get_blocking(c.socket.fileno())
        c.stopConnecting()
    finally:
        srv.close()
        r._poller.close()


def test_the_role_listens_with_lean_transports():
    from narsuite.nar.role import SocksTCPServer

    r = EPollReactor()
    svc = SocksTCPServer(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1",
                         reactor=r)
    svc.startService()
    try:
        assert svc._port.transport is LeanServer
    finally:
        svc.stopService()
        r._poller.close()


def test_the_shared_close_failure_checks_like_twisteds():
    """lose_now's Failure answers check() as Failure.check does (classes by isinstance,
    names as strings by Twisted's own rule), without building qualified names."""
    from twisted.internet import main

    from narsuite.nar import fastio

    ours, theirs = fastio._DONE, Failure(main.CONNECTION_DONE)
    asked = [(error.ConnectionAborted,), (error.ConnectionDone,), (error.ConnectionClosed,),
             (Exception,), (KeyError, error.ConnectionDone), (ValueError,),
             ("twisted.internet.error.ConnectionDone",), ("builtins.ValueError",), ()]
    for types in asked:
        assert ours.check(*types) == theirs.check(*types), types
