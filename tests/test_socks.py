"""SOCKS5 (RFC 1928/1929): codec against RFC byte strings, auth, rules, and the server over
Twisted fakes (StringTransport, MemoryReactorClock).  No root needed.

scapy's SOCKS layer encodes ATYP 3 wrongly, so the expected bytes are written by hand from the RFCs.
"""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from narsuite.metrics import Metrics
from narsuite.nar import socks
from narsuite.nar.auth import PasswordChecker, check_hash_format, hash_password, verify_password
from narsuite.nar.config import NarConfig, NarOptions, Rule
from narsuite.nar.rules import RuleSet
from narsuite.nar.server import SocksFactory, connect_error_code
from narsuite.schema import ConfigError

# ------------------------------------------------------------------ codec

METHODS = b"\x05\x02\x00\x02"  # VER NMETHODS=2 {no auth, username/password}
CONNECT_V4 = b"\x05\x01\x00\x01\xc0\x00\x02\x0a\x00\x50"  # CONNECT 192.0.2.10:80
CONNECT_NAME = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"  # CONNECT example.com:443
CONNECT_V6 = b"\x05\x01\x00\x04" + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01" + b"\x00\x16"  # [2001:db8::1]:22
AUTH = b"\x01\x05alice\x06secret"  # RFC 1929: VER ULEN UNAME PLEN PASSWD


def prefixes_need_more(parse, msg: bytes) -> None:
    for i in range(len(msg)):
        assert parse(msg[:i]) is None, (msg[:i], "should need more bytes")


def test_reply_code_constants_match_rfc1928_section6():
    assert [socks.SUCCEEDED, socks.GENERAL_FAILURE, socks.NOT_ALLOWED, socks.NETWORK_UNREACHABLE,
            socks.HOST_UNREACHABLE, socks.CONNECTION_REFUSED, socks.TTL_EXPIRED,
            socks.COMMAND_NOT_SUPPORTED, socks.ADDRESS_TYPE_NOT_SUPPORTED] == list(range(9))
    assert socks.reply_name(2) == "not_allowed" and socks.reply_name(9) == "unassigned_0x09"


def test_method_selection():
    assert socks.parse_method_request(METHODS + b"tail") == (socks.MethodRequest((0, 2)), 4)
    prefixes_need_more(socks.parse_method_request, METHODS[:0] + METHODS)
    assert socks.encode_method_request([0, 2]) == METHODS
    assert socks.encode_method_reply(0xFF) == b"\x05\xff"
    with pytest.raises(socks.SocksError):
        socks.parse_method_request(b"\x04\x01\x00")


def test_rfc1929_subnegotiation():
    msg, n = socks.parse_password_request(AUTH)
    assert (msg.username, msg.password, n) == (b"alice", b"secret", len(AUTH))
    prefixes_need_more(socks.parse_password_request, AUTH)
    assert socks.encode_password_request(b"alice", b"secret") == AUTH
    assert socks.encode_password_reply(True) == b"\x01\x00"
    assert socks.encode_password_reply(False) == b"\x01\x01"
    for bad in (b"\x05\x05alice\x06secret", b"\x01\x00\x06secret", b"\x01\x05alice\x00"):
        with pytest.raises(socks.SocksError):
            socks.parse_password_request(bad)
    assert "secret" not in repr(msg)


@pytest.mark.parametrize("raw, host, atyp, port", [
    (CONNECT_V4, "192.0.2.10", socks.ATYP_IPV4, 80),
    (CONNECT_NAME, "example.com", socks.ATYP_DOMAIN, 443),
    (CONNECT_V6, "2001:db8::1", socks.ATYP_IPV6, 22),
])
def test_request_parse_encode(raw, host, atyp, port):
    req, n = socks.parse_request(raw + b"extra")
    assert (req.cmd, req.atyp, req.host, req.port, req.flags, n) == (1, atyp, host, port, 0, len(raw))
    prefixes_need_more(socks.parse_request, raw)
    assert socks.encode_request(1, host, port) == raw


def test_request_keeps_flags_and_unknown_commands():
    req, _ = socks.parse_request(b"\x05\x80\x2a\x01\x0a\x00\x00\x01\x00\x00")
    assert (req.cmd, req.flags, req.host) == (0x80, 0x2A, "10.0.0.1")


@pytest.mark.parametrize("raw, code", [
    (b"\x05\x01\x00\x05\x00\x00", socks.ADDRESS_TYPE_NOT_SUPPORTED),
    (b"\x04\x01\x00\x01\x00\x00\x00\x00\x00\x00", socks.GENERAL_FAILURE),
    (b"\x05\x01\x00\x03\x00\x00\x50", socks.GENERAL_FAILURE),
    (b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", socks.HOST_UNREACHABLE),
])
def test_request_errors_carry_reply_code(raw, code):
    with pytest.raises(socks.SocksError) as e:
        socks.parse_request(raw)
    assert e.value.code == code


def test_reply_encoding_and_parse():
    assert socks.encode_reply(0, "10.0.0.1", 1080) == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x04\x38"
    assert socks.encode_reply(5) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    assert socks.encode_reply(0, "::1", 1) == b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x01"
    rep, n = socks.parse_reply(b"\x05\x00\x00\x03\x04nbox\x00\x07")
    assert (rep.rep, rep.host, rep.port, n) == (0, "nbox", 7, 11)


def test_udp_header():
    raw = b"\x00\x00\x00\x01\xc0\x00\x02\x0a\x00\x35" + b"query"
    dg = socks.parse_udp(raw)
    assert (dg.frag, dg.host, dg.port, dg.data) == (0, "192.0.2.10", 53, b"query")
    assert socks.encode_udp("192.0.2.10", 53, b"query") == raw
    named = b"\x00\x00\x01\x03\x04ybox\x00\x07" + b"x"
    dg = socks.parse_udp(named)
    assert (dg.frag, dg.atyp, dg.host, dg.port, dg.data) == (1, 3, "ybox", 7, b"x")
    assert socks.encode_udp("ybox", 7, b"x", frag=1) == named
    for bad in (b"\x00\x00", raw[:9], b"\x00\x00\x00\x09\x01\x02"):
        with pytest.raises(socks.SocksError):
            socks.parse_udp(bad)


# ------------------------------------------------------------------ auth

def sync_run(f, *args):
    return defer.maybeDeferred(f, *args)


def test_hash_formats_verify():
    b = hash_password("s3cret", cost=4)
    assert b.startswith("$2b$04$") and verify_password(b, b"s3cret") and not verify_password(b, b"x")
    s = hash_password("s3cret", "scrypt", cost=4)
    assert re.fullmatch(r"\$scrypt\$ln=4,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}", s)
    assert verify_password(s, b"s3cret") and not verify_password(s, b"s3cres")
    check_hash_format(b)
    check_hash_format(s)
    for bad in ("plain", "$2b$04$short", "$scrypt$ln=x$a$b"):
        with pytest.raises(ValueError):
            check_hash_format(bad)
    assert not verify_password("garbage", b"s3cret")


def test_checker_caches_success_only_and_never_runs_in_caller_without_runner():
    calls = []

    def run(f, *args):
        calls.append(args)
        return defer.maybeDeferred(f, *args)

    c = PasswordChecker({"alice": hash_password("pw", cost=4)}, run=run)
    assert c.check(b"alice", b"pw").result is True
    assert c.check(b"alice", b"pw").result is True
    assert len(calls) == 1 and c.stats["cache_hits"] == 1  # repeat login: HMAC only
    assert c.check(b"alice", b"bad").result is False
    assert c.check(b"alice", b"bad").result is False
    assert len(calls) == 3  # failures are never cached
    assert c.check(b"bob", b"pw").result is False  # unknown user: still a (dummy) verification
    assert len(calls) == 4


def test_checker_is_asynchronous_and_coalesces():
    pending = []

    def run(f, *args):
        d = defer.Deferred()
        pending.append((d, f, args))
        return d

    c = PasswordChecker({"alice": hash_password("pw", cost=4)}, run=run)
    d1, d2 = c.check(b"alice", b"pw"), c.check(b"alice", b"pw")
    assert not d1.called and len(pending) == 1  # nothing ran in the caller; one shared verification
    d, f, args = pending[0]
    d.callback(f(*args))
    assert d1.result is True and d2.result is True


# ------------------------------------------------------------------ rules

def test_rules_first_match_default_deny_and_logging():
    events = []
    rs = RuleSet([
        Rule("block", ports=("25",), log="warn"),
        Rule("pass", clients=("10.0.0.0/24",), commands=("connect",), to=("192.0.2.0/24",),
             ports=("1-1024", "8080")),
        Rule("pass", users=("alice",)),
    ], "debug", log=Logger(observer=events.append))
    assert not rs.check("10.0.0.10", "", "connect", "192.0.2.10", 25).allowed
    assert events[-1]["log_level"] == LogLevel.warn and events[-1]["rule"] == 0
    d = rs.check("10.0.0.10", "", "connect", "192.0.2.10", 80)
    assert d.allowed and d.index == 1 and events[-1]["log_level"] == LogLevel.debug
    assert events[-1]["client"] == "10.0.0.10" and events[-1]["command"] == "connect"
    assert events[-1]["dest"] == "192.0.2.10" and events[-1]["port"] == 80
    assert rs.check("10.0.0.10", "", "connect", "192.0.2.10", 8080).allowed
    assert not rs.check("10.0.0.10", "", "connect", "192.0.2.10", 9000).allowed
    assert events[-1]["rule"] == -1  # default deny
    assert not rs.check("10.0.1.10", "", "connect", "192.0.2.10", 80).allowed
    assert not rs.check("10.0.0.10", "", "bind", "192.0.2.10", 80).allowed
    assert rs.check("10.0.1.10", "alice", "udp", "198.51.100.1", 53).allowed
    assert rs.check("::ffff:10.0.0.10", "", "connect", "192.0.2.10", 80).allowed  # v4-mapped
    assert rs.may_pass("10.0.0.10", "alice", "udp") and not rs.may_pass("10.0.0.10", "", "udp")


# ------------------------------------------------------------------ server over fakes

CLIENT = ("10.0.0.10", 40000)
SERVER = ("10.0.0.1", 1080)


class Handler:
    def __init__(self, reply=None):
        self.calls = []
        self.data = []
        self.closed = []
        self.reply = reply

    def nar_mode(self, conn, request):
        self.calls.append((conn, request))
        if self.reply is not None:
            return self.reply
        return socks.encode_reply(0, "192.0.2.1", 0, request.flags)

    def nar_data(self, conn, data):
        self.data.append(data)

    def nar_closed(self, conn):
        self.closed.append(conn)


class FakeUDP:
    def __init__(self, proto, host, port=5000):
        self.proto, self.host, self.port, self.sent, self.stopped = proto, host, port, [], False
        proto.makeConnection(self)

    def write(self, data, addr):
        self.sent.append((data, addr))

    def getHost(self):
        return IPv4Address("UDP", self.host, self.port)

    def stopListening(self):
        self.stopped = True
        self.proto.doStop()


def make(rules=(Rule("pass"),), methods=("none",), users=None, resolver=None, nar_handler=None,
         nar=None, metrics=None, **kw):
    cfg = NarConfig(methods=methods, users=users or {}, rules=tuple(rules),
                    nar=nar or NarOptions(enabled=False), **kw)
    reactor = MemoryReactorClock()
    udp = []

    def listenUDP(port, proto, interface="", maxPacketSize=8192):
        udp.append(FakeUDP(proto, interface))
        return udp[-1]

    reactor.listenUDP = listenUDP
    reactor.udp = udp
    checker = PasswordChecker(cfg.users, reactor, run=sync_run)
    f = SocksFactory(cfg, None, metrics, reactor, nar_handler, resolver=resolver, checker=checker)
    return f, reactor


def open_conn(f, peer=CLIENT):
    p = f.buildProtocol(IPv4Address("TCP", *peer))
    tr = StringTransport(hostAddress=IPv4Address("TCP", *SERVER), peerAddress=IPv4Address("TCP", *peer))
    p.makeConnection(tr)
    return p, tr


def take(tr):
    v = tr.value()
    tr.clear()
    return v


def complete_connect(reactor, local=("192.0.2.1", 33333)):
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    out = StringTransport(hostAddress=IPv4Address("TCP", *local), peerAddress=IPv4Address("TCP", host, port))
    proto.makeConnection(out)
    return out


def test_connect_ipv4_relays_with_flow_control():
    f, reactor = make()
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00")
    assert take(tr) == b"\x05\x00"
    p.dataReceived(CONNECT_V4 + b"GET / HTTP/1.0\r\n")  # pipelined data is kept for the relay
    host, port, _, timeout, _ = reactor.tcpClients[-1]
    # no per-attempt DelayedCall: the connect phase's own timer bounds the attempt
    assert (host, port, timeout) == ("192.0.2.10", 80, None)
    out = complete_connect(reactor)
    assert take(tr) == b"\x05\x00\x00\x01\xc0\x00\x02\x01\x82\x35"  # BND = 192.0.2.1:33333
    assert out.value() == b"GET / HTTP/1.0\r\n"
    p.dataReceived(b"more")
    assert out.value().endswith(b"more")
    p.outbound.dataReceived(b"HTTP/1.0 200 OK\r\n")
    assert tr.value() == b"HTTP/1.0 200 OK\r\n"
    # each side is the other's producer: a full buffer on one pauses reading on the other
    assert tr.producer.transport is out and tr.streaming and out.producer.transport is tr
    tr.producer.pauseProducing()
    assert out.producerState == "paused"
    tr.producer.resumeProducing()
    assert out.producerState == "producing"
    assert f.counters["bytes_up"] == 20 and f.counters["bytes_down"] == 17
    assert f.counters["reply_succeeded"] == 1
    p.outbound.transport.loseConnection()
    p.outbound.connectionLost(Failure(error.ConnectionDone()))
    assert tr.disconnecting


def test_connect_domain_resolved_then_checked_by_rules():
    asked = []

    def resolver(name, port):
        asked.append(name)
        return defer.succeed(["192.0.2.10"])

    f, reactor = make(rules=[Rule("pass", to=("192.0.2.0/24",))], resolver=resolver)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + CONNECT_NAME)
    assert asked == ["example.com"] and reactor.tcpClients[-1][:2] == ("192.0.2.10", 443)

    f, reactor = make(rules=[Rule("pass", to=("198.51.100.0/24",))], resolver=resolver)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + CONNECT_NAME)
    assert take(tr)[2:4] == b"\x05\x02" and not reactor.tcpClients and tr.disconnecting


def test_connect_name_not_found_is_host_unreachable():
    f, reactor = make(resolver=lambda n, p: defer.fail(error.DNSLookupError(n)))
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + CONNECT_NAME)
    assert tr.value()[2:4] == b"\x05\x04" and tr.disconnecting


def test_connect_ipv6_uses_ipv6_endpoint():
    f, reactor = make()
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + CONNECT_V6)
    assert reactor.tcpClients[-1][:2] == ("2001:db8::1", 22)


@pytest.mark.parametrize("exc, code", [
    (error.ConnectionRefusedError(), socks.CONNECTION_REFUSED),
    (error.NoRouteError(101, "Network is unreachable"), socks.NETWORK_UNREACHABLE),
    (error.ConnectError(113, "No route to host"), socks.HOST_UNREACHABLE),
    (error.TCPTimedOutError(110, "timed out"), socks.TTL_EXPIRED),
    (error.TimeoutError(), socks.TTL_EXPIRED),
    (error.DNSLookupError("x"), socks.HOST_UNREACHABLE),
    (RuntimeError("?"), socks.GENERAL_FAILURE),
])
def test_connect_failures_map_to_reply_codes(exc, code):
    assert connect_error_code(Failure(exc)) == code
    if isinstance(exc, RuntimeError):
        return
    f, reactor = make()
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + CONNECT_V4)
    take(tr)
    reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(exc))
    assert tr.value() == socks.encode_reply(code) and tr.disconnecting
    assert f.counters["reply_" + socks.reply_name(code)] == 1


def test_connect_timeout_gives_ttl_expired():
    f, reactor = make(connect_timeout=5.0)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + CONNECT_V4)
    take(tr)
    connector = reactor.connectors[-1]
    reactor.advance(4.9)
    assert tr.value() == b""
    reactor.advance(0.1)
    assert tr.value() == socks.encode_reply(socks.TTL_EXPIRED) and tr.disconnecting
    assert f.counters["timeouts_connect"] == 1
    assert connector.stoppedConnecting  # the pending attempt is abandoned, not left to run


def test_negotiation_and_idle_timeouts():
    f, reactor = make(negotiation_timeout=2.0, idle_timeout=10.0)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01")
    reactor.advance(2.0)
    assert tr.disconnecting and f.counters["timeouts_negotiation"] == 1

    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + CONNECT_V4)
    complete_connect(reactor)
    reactor.advance(6)
    p.dataReceived(b"x")  # activity pushes the deadline
    reactor.advance(6)
    assert not tr.disconnecting
    reactor.advance(4.5)
    assert tr.disconnecting and f.counters["timeouts_idle"] == 1


def test_rules_block_gives_not_allowed():
    f, reactor = make(rules=[Rule("block", ports=("80",)), Rule("pass")])
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + CONNECT_V4)
    assert tr.value() == b"\x05\x00" + socks.encode_reply(socks.NOT_ALLOWED)
    assert tr.disconnecting and not reactor.tcpClients and f.counters["rule_blocks"] == 1


def test_default_deny_without_rules():
    f, reactor = make(rules=())
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + CONNECT_V4)
    assert tr.value()[2:4] == b"\x05\x02"


def test_password_auth_success_and_user_rules():
    users = {"alice": hash_password("secret", cost=4)}
    f, reactor = make(methods=("password",), users=users, rules=[Rule("pass", users=("alice",))])
    p, tr = open_conn(f)
    p.dataReceived(METHODS + AUTH + CONNECT_V4)
    assert take(tr) == b"\x05\x02\x01\x00"
    assert p.user == "alice" and reactor.tcpClients[-1][:2] == ("192.0.2.10", 80)


def test_password_auth_failure_closes():
    users = {"alice": hash_password("other", cost=4)}
    f, reactor = make(methods=("password",), users=users)
    p, tr = open_conn(f)
    p.dataReceived(METHODS + AUTH + CONNECT_V4)
    assert tr.value() == b"\x05\x02\x01\x01" and tr.disconnecting
    assert not reactor.tcpClients and f.counters["auth_failures"] == 1


def test_method_preference_and_no_acceptable():
    users = {"alice": hash_password("secret", cost=4)}
    f, _ = make(methods=("password", "none"), users=users)
    p, tr = open_conn(f)
    p.dataReceived(METHODS)
    assert tr.value() == b"\x05\x02"
    f, _ = make(methods=("password",), users=users)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00")
    assert tr.value() == b"\x05\xff" and tr.disconnecting


def test_bad_hash_in_config_names_the_key():
    with pytest.raises(ConfigError, match="nar.users.bob"):
        make(methods=("password",), users={"bob": "plaintext"})


@pytest.mark.parametrize("request_bytes, code", [
    (b"\x05\x09\x00\x01\x01\x02\x03\x04\x00\x50", socks.COMMAND_NOT_SUPPORTED),
    (b"\x05\x01\x00\x07\x01\x02\x03\x04\x00\x50", socks.ADDRESS_TYPE_NOT_SUPPORTED),
    (b"\x04\x01\x00\x01\x01\x02\x03\x04\x00\x50", socks.GENERAL_FAILURE),
])
def test_bad_requests_get_their_reply_code(request_bytes, code):
    f, _ = make()
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + request_bytes)
    assert tr.value() == b"\x05\x00" + socks.encode_reply(code) and tr.disconnecting


def test_bad_version_in_method_selection_closes_silently():
    f, _ = make()
    p, tr = open_conn(f)
    p.dataReceived(b"\x04\x01\x00\x50")
    assert tr.value() == b"" and tr.disconnecting and f.counters["malformed"] == 1


def test_max_connections():
    f, _ = make(max_connections=2)
    open_conn(f)
    p2, tr2 = open_conn(f)
    assert f.buildProtocol(IPv4Address("TCP", *CLIENT)) is None
    assert f.counters["connections_refused_max"] == 1
    p2.connectionLost(Failure(error.ConnectionDone()))
    assert f.buildProtocol(IPv4Address("TCP", *CLIENT)) is not None


def test_bind_two_replies_and_only_expected_peer():
    f, reactor = make()
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x02\x00\x01\xc0\x00\x02\x0a\x00\x15")  # BIND, peer 192.0.2.10
    port, factory, _, interface = reactor.tcpServers[-1]
    assert port == 0
    # first reply: where we listen (not yet the peer)
    assert take(tr)[:6] == b"\x05\x00" + b"\x05\x00\x00\x01"
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.99", 20)) is None
    assert f.counters["bind_unexpected_peer"] == 1
    peer = factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 20))
    ptr = StringTransport(hostAddress=IPv4Address("TCP", "192.0.2.1", 4444),
                          peerAddress=IPv4Address("TCP", "192.0.2.10", 20))
    peer.makeConnection(ptr)
    assert take(tr) == socks.encode_reply(0, "192.0.2.10", 20)  # second reply: the peer
    peer.dataReceived(b"data")
    assert tr.value() == b"data"
    p.dataReceived(b"back")
    assert ptr.value() == b"back"


def test_bind_timeout():
    f, reactor = make(connect_timeout=3.0)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x02\x00\x01\xc0\x00\x02\x0a\x00\x15")
    take(tr)
    reactor.advance(3.0)
    assert tr.value() == socks.encode_reply(socks.TTL_EXPIRED) and tr.disconnecting


def test_udp_associate_relay():
    f, reactor = make(rules=[Rule("block", commands=("udp",), ports=("9",)), Rule("pass")],
                      udp_idle_timeout=30.0)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    assert tr.value() == b"\x05\x00" + socks.encode_reply(0, "10.0.0.1", 5000)
    udp = reactor.udp[-1]
    relay = udp.proto
    relay.datagramReceived(socks.encode_udp("192.0.2.10", 7, b"ping"), ("10.0.0.10", 5555))
    assert udp.sent[-1] == (b"ping", ("192.0.2.10", 7))
    relay.datagramReceived(b"pong", ("192.0.2.10", 7))
    assert udp.sent[-1] == (socks.encode_udp("192.0.2.10", 7, b"pong"), ("10.0.0.10", 5555))
    # a second datagram to the same destination takes the fast path (raw address lookup)
    relay.datagramReceived(socks.encode_udp("192.0.2.10", 7, b"ping2"), ("10.0.0.10", 5555))
    assert udp.sent[-1] == (b"ping2", ("192.0.2.10", 7))
    n = len(udp.sent)
    relay.datagramReceived(socks.encode_udp("192.0.2.10", 7, b"x", frag=1), ("10.0.0.10", 5555))
    relay.datagramReceived(socks.encode_udp("192.0.2.10", 7, b"x"), ("10.0.0.99", 5555))  # not the client
    relay.datagramReceived(socks.encode_udp("192.0.2.10", 7, b"x"), ("10.0.0.10", 6666))  # other port
    relay.datagramReceived(b"unsolicited", ("192.0.2.11", 7))
    relay.datagramReceived(socks.encode_udp("192.0.2.10", 9, b"x"), ("10.0.0.10", 5555))  # blocked port
    relay.datagramReceived(socks.encode_udp("192.0.2.10", 9, b"y"), ("10.0.0.10", 5555))  # still blocked
    relay.datagramReceived(b"\x00\x00", ("10.0.0.10", 5555))  # malformed
    assert len(udp.sent) == n
    assert f.counters["udp_fragments_dropped"] == 1 and f.counters["udp_malformed"] == 1
    assert f.counters["udp_dropped"] == 5 and f.counters["rule_blocks"] == 1
    assert f.counters["udp_datagrams_out"] == 2 and f.counters["udp_datagrams_in"] == 1
    p.connectionLost(Failure(error.ConnectionDone()))  # the association ends with the TCP connection
    assert udp.stopped


def _udp_association(**kw):
    f, reactor = make(**kw)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    udp = reactor.udp[-1]
    return f, udp, udp.proto


def test_udp_relay_past_max_cache_destinations_every_answer_reaches_the_client():
    """A client that talks to more destinations than the relay's cache holds (a DHT node, a DNS
    crawler) over one association: MAX_CACHE + 500 destinations, each answering its request,
    and one long-lived peer the client keeps talking to (through the relay's shortcut) all the
    while.  Every answer reaches the client; the state stays bounded; evictions are counted.
    (Until 2026-12 the cache stopped taking destinations once full: the 500 answers were dropped.)"""
    f, udp, relay = _udp_association(udp_offload="off")
    cl = ("10.0.0.10", 5555)
    old = ("192.0.2.1", 4000)
    n = relay.MAX_CACHE + 500
    relay.datagramReceived(socks.encode_udp(*old, b"hello"), cl)
    relay.datagramReceived(b"hi", old)
    for i in range(n):
        dest = (f"10.{1 + i // 250 // 250}.{i // 250 % 250}.{i % 250 + 1}", 6881)
        relay.datagramReceived(socks.encode_udp(*dest, b"q%d" % i), cl)
        assert udp.sent[-1] == (b"q%d" % i, dest)
        relay.datagramReceived(b"a%d" % i, dest)
        assert udp.sent[-1] == (socks.encode_udp(*dest, b"a%d" % i), cl), i
        if i % 1000 == 0:
            relay.datagramReceived(socks.encode_udp(*old, b"still there?"), cl)
            relay.datagramReceived(b"yes", old)
            assert udp.sent[-1] == (socks.encode_udp(*old, b"yes"), cl), i
    assert f.counters["udp_dropped"] == 0
    assert f.counters["udp_datagrams_in"] == f.counters["udp_datagrams_out"] == n + 1 + 5
    assert len(relay.peers) == relay.MAX_CACHE and old in relay.peers
    assert f.counters["udp_peers_evicted"] == n + 1 - relay.MAX_CACHE
    assert set(relay._allowed_v4.values()) <= set(relay.peers) and set(relay.decisions) <= set(relay.peers)
    # the least recently used was forgotten: its late answer is dropped, counted
    sent = len(udp.sent)
    relay.datagramReceived(b"late", ("10.1.0.1", 6881))
    assert f.counters["udp_dropped"] == 1 and len(udp.sent) == sent
    # ... and the client sending to it again makes it a destination again
    relay.datagramReceived(socks.encode_udp("10.1.0.1", 6881, b"again"), cl)
    relay.datagramReceived(b"back", ("10.1.0.1", 6881))
    assert udp.sent[-1] == (socks.encode_udp("10.1.0.1", 6881, b"back"), cl)


def test_udp_relay_eviction_walks_a_bounded_part_of_a_cache_in_use():
    """Every one of MAX_CACHE destinations has been sent to twice (each holds the shortcut, the
    relay's sign of use): a new destination then costs at most EVICT_SCAN second chances, not a
    walk of the whole cache on the shared reactor -- and the one forgotten is the oldest left."""
    f, udp, relay = _udp_association(udp_offload="off")
    cl = ("10.0.0.10", 5555)
    dests = [(f"10.{1 + i // 250 // 250}.{i // 250 % 250}.{i % 250 + 1}", 6881) for i in range(relay.MAX_CACHE)]
    for _ in range(2):
        for d in dests:
            relay.datagramReceived(socks.encode_udp(*d, b"q"), cl)
    assert len(relay._allowed_v4) == relay.MAX_CACHE
    relay.datagramReceived(socks.encode_udp("192.0.2.7", 53, b"new"), cl)
    # EVICT_SCAN second chances taken (shortcuts dropped), then the next oldest forgotten
    assert len(relay._allowed_v4) == relay.MAX_CACHE - relay.EVICT_SCAN - 1
    assert f.counters["udp_peers_evicted"] == 1
    assert dests[relay.EVICT_SCAN] not in relay.peers and all(d in relay.peers for d in dests[:relay.EVICT_SCAN])
    assert len(relay.peers) == relay.MAX_CACHE and ("192.0.2.7", 53) in relay.peers


def test_udp_idle_timeout_closes_association():
    f, reactor = make(udp_idle_timeout=5.0)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    reactor.advance(5.0)
    assert tr.disconnecting and f.counters["timeouts_idle"] == 1


def test_nar_disabled_is_command_not_supported():
    h = Handler()
    f, _ = make(nar_handler=h)  # NarOptions(enabled=False)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x80\x00\x01\xc0\x00\x02\x0a\x00\x00")
    assert tr.value() == b"\x05\x00" + socks.encode_reply(socks.COMMAND_NOT_SUPPORTED)
    assert not h.calls
    f, _ = make(nar=NarOptions(enabled=True, lent_address="192.0.2.1"))  # enabled, no handler
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x80\x00\x01\xc0\x00\x02\x0a\x00\x00")
    assert tr.value()[2:4] == b"\x05\x07"


def test_nar_hook_called_and_every_further_byte_forwarded():
    h = Handler()
    f, _ = make(nar_handler=h, nar=NarOptions(enabled=True, lent_address="192.0.2.1", mode_command=0x90))
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x90\x03\x01\xc0\x00\x02\x0a\x00\x00" + b"\x01\x02")
    conn, req = h.calls[0]
    assert (req.cmd, req.flags, req.host) == (0x90, 3, "192.0.2.10")
    assert conn.client == "10.0.0.10" and conn.user == "" and isinstance(conn.session_id, str)
    assert tr.value() == b"\x05\x00" + socks.encode_reply(0, "192.0.2.1", 0, 3)
    p.dataReceived(b"\x05\x01\x00\x01")  # looks like SOCKS, but belongs to NAR now
    assert b"".join(h.data) == b"\x01\x02\x05\x01\x00\x01"
    conn.write(b"from-handler")
    assert tr.value().endswith(b"from-handler")
    p.connectionLost(Failure(error.ConnectionDone()))
    assert h.closed == [conn]


def test_nar_hook_deferred_and_rules():
    d = defer.Deferred()
    h = Handler(reply=d)
    f, _ = make(nar_handler=h, nar=NarOptions(enabled=True, lent_address="192.0.2.1"),
                rules=[Rule("pass", commands=("nar",), to=("192.0.2.0/24",))])
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x80\x00\x01\xc0\x00\x02\x0a\x00\x00")
    take(tr)
    p.dataReceived(b"early")
    assert h.data == []
    d.callback(socks.encode_reply(0, "192.0.2.1", 0))
    assert tr.value() == socks.encode_reply(0, "192.0.2.1", 0) and h.data == [b"early"]

    p, tr = open_conn(f)  # a NAR-MODE for a destination outside the rules
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x80\x00\x01\xc6\x33\x64\x01\x00\x00")
    assert tr.value()[2:4] == b"\x05\x02" and len(h.calls) == 1


def test_nar_handler_failure_is_general_failure():
    class Broken(Handler):
        def nar_mode(self, conn, request):
            raise RuntimeError("boom")

    f, _ = make(nar_handler=Broken(), nar=NarOptions(enabled=True, lent_address="192.0.2.1"))
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x80\x00\x01\xc0\x00\x02\x0a\x00\x00")
    assert tr.value()[2:4] == b"\x05\x01" and tr.disconnecting


def test_counters_exposed_to_prometheus():
    m = Metrics()
    f, _ = make(metrics=m)
    open_conn(f)
    text = m.render().decode()
    assert 'narsuite_nar_events_total{event="connections"} 1.0' in text
    assert 'narsuite_nar_events_total{event="reply_not_allowed"} 0.0' in text


# ------------------------------------------------------------------ fuzz

def _check_output(out: bytes, disconnected: bool) -> None:
    """What the server wrote is a sequence of well-formed SOCKS answers, and any refusal closes."""
    if not out:
        return
    r = socks.parse_method_reply(out)
    assert r is not None, out
    method, n = r
    rest = out[n:]
    if method == 0xFF:
        assert not rest and disconnected
        return
    if method == socks.METHOD_PASSWORD and rest:
        status, n = socks.parse_password_reply(rest)
        rest = rest[n:]
        if status != 0:
            assert not rest and disconnected
            return
    if rest:
        rep, n = socks.parse_reply(rest)
        assert rep.rep in socks.REPLY_NAMES
        if rep.rep != 0:
            assert disconnected


def _feed(chunks, methods=("none",), users=None):
    resolver = lambda name, port: defer.succeed(["192.0.2.10"])  # noqa: E731
    f, reactor = make(methods=methods, users=users, resolver=resolver, connect_timeout=1.0,
                      nar=NarOptions(enabled=True, lent_address="192.0.2.1"), nar_handler=Handler())
    p, tr = open_conn(f)
    for c in chunks:
        p.dataReceived(c)  # must never raise
    reactor.advance(1.0)
    return f, p, tr


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_fuzz_random_bytes(chunks):
    f, p, tr = _feed([b"\x05" + chunks[0]] + chunks[1:] if chunks else [])
    _check_output(tr.value(), tr.disconnecting)
    assert f.counters["errors"] == 0


VALID = [
    b"\x05\x01\x00" + CONNECT_V4,
    b"\x05\x01\x00" + CONNECT_NAME,
    b"\x05\x01\x00" + CONNECT_V6,
    b"\x05\x02\x00\x02" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
    b"\x05\x01\x00" + b"\x05\x80\x01\x01\xc0\x00\x02\x0a\x00\x00" + b"nar bytes",
    b"\x05\x01\x00" + b"\x05\x02\x00\x01\xc0\x00\x02\x0a\x00\x15",
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.integers(0, 60), max_size=6), st.binary(max_size=4),
       st.integers(0, 60))
def test_fuzz_splits_of_valid_streams(stream, cuts, garbage, at):
    at = min(at, len(stream))
    stream = stream[:at] + garbage + stream[at:] if garbage and at > 20 else stream
    cuts = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    f, p, tr = _feed(chunks)
    _check_output(tr.value(), tr.disconnecting)
    assert f.counters["errors"] == 0
    if not garbage or at <= 20:  # an intact stream always gets a first reply
        assert tr.value()[:2] == b"\x05\x00"
        assert len(tr.value()) > 2


def test_fuzz_with_password_method():
    users = {"alice": hash_password("secret", cost=4)}
    for split in range(1, len(METHODS + AUTH + CONNECT_V4)):
        s = METHODS + AUTH + CONNECT_V4
        f, p, tr = _feed([s[:split], s[split:]], methods=("password",), users=users)
        assert tr.value()[:4] == b"\x05\x02\x01\x00"
        assert struct.unpack("!BB", tr.value()[4:6]) == (5, socks.TTL_EXPIRED)  # connect timed out


def test_nar_mode_that_never_answers_is_bounded_by_connect_timeout():
    h = Handler(reply=defer.Deferred())
    f, reactor = make(nar_handler=h, nar=NarOptions(enabled=True, lent_address="192.0.2.1"),
                      connect_timeout=4.0)
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x80\x00\x01\xc0\x00\x02\x0a\x00\x00")
    reactor.advance(4.0)
    assert tr.disconnecting and f.counters["timeouts_connect"] == 1
    p.connectionLost(Failure(error.ConnectionDone()))
    assert len(h.closed) == 1


def test_default_route_source_reads_the_routing_table(tmp_path):
    from narsuite.packet.routing import default_route_source

    table = tmp_path / "route"
    table.write_text("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
                     "lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n")
    assert default_route_source(str(table)) is None  # no default route
    assert default_route_source(str(tmp_path / "missing")) is None
    # default via 127.0.0.2 (little-endian hex, as the kernel writes it): our source towards it
    table.write_text(table.read_text() + "lo\t00000000\t0200007F\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert default_route_source(str(table)) == "127.0.0.1"


def test_bind_all_zeros_reports_external_not_the_client_facing_address():
    f, reactor = make(external="198.51.100.7")
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")  # BIND 0.0.0.0
    assert socks.parse_reply(take(tr)[2:])[0].host == "198.51.100.7"


def test_a_flood_of_bad_connections_is_logged_in_aggregate():
    """Issue 12: one info line per bad connection (16 MB in five minutes of flood).  Now:
    per reason and 10 s interval the first 5 in full, then one summary with the counts."""
    from twisted.logger import globalLogPublisher

    seen = []

    def observer(event):
        if event.get("log_namespace", "").startswith("narsuite.nar"):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        f, reactor = make(methods=("password",), users={"alice": hash_password("pw", cost=4)})
        for i in range(1000):
            p, tr = open_conn(f, ("10.0.0.%d" % (i % 250 + 1), 1000 + i))
            p.dataReceived(b"\x04\x01")  # SOCKS4: malformed method selection
            assert tr.disconnecting
            p.connectionLost(Failure(error.ConnectionDone()))
        for _ in range(1000):
            p, tr = open_conn(f)
            p.dataReceived(b"\x05\x01\x00")  # only "no auth": no acceptable method
            assert tr.disconnecting
            p.connectionLost(Failure(error.ConnectionDone()))
        assert f.counters["malformed"] == 1000 and f.counters["no_acceptable_method"] == 1000
        assert len(seen) == 10, [e["log_format"] for e in seen]  # 5 of each reason
        reactor.advance(10)
        assert len(seen) == 11
        summary = seen[-1]
        assert summary["counts"] == {"malformed": 1000, "no_acceptable_method": 1000}
        assert summary["suppressed"] == 1990
    finally:
        globalLogPublisher.removeObserver(observer)
