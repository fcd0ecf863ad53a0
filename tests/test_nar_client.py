"""NarClient against the real SocksFactory + NarHandler, over Twisted's in-memory
loopback (iosim): the client library's state machine without any root or sockets."""

from __future__ import annotations

import bcrypt
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from narsuite.nar import wire
from narsuite.nar.client import NarClient, NarRefused
from narsuite.nar.config import NarConfig, NarOptions, Rule
from narsuite.nar.server import SocksFactory
from narsuite.nar.session import NarHandler
from narsuite.store import MemoryBackend, Store

NB, XA, YB = "192.0.2.1", "10.0.0.10", "192.0.2.10"
HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


def pair(methods=("password",), user="alice", password="pw", translated="allow"):
    reactor = MemoryReactorClock()
    store = Store(MemoryBackend(), reactor)
    options = NarOptions(lent_address=NB, translated=translated)
    cfg = NarConfig(methods=methods, users={"alice": HASH}, rules=(Rule("pass"),), nar=options)

    def run_inline(fn, *a, **kw):  # the password check, normally in a thread
        from twisted.internet import defer

        return defer.maybeDeferred(fn, *a, **kw)

    from narsuite.nar.auth import PasswordChecker

    factory = SocksFactory(cfg, store, None, reactor, NarHandler(options, store, reactor),
                           checker=PasswordChecker(cfg.users, reactor, run=run_inline))
    server = factory.buildProtocol(IPv4Address("TCP", XA, 40000))
    client = NarClient(user=user, password=password)
    s_tr = iosim.FakeTransport(server, isServer=True,
                               hostAddress=IPv4Address("TCP", "10.0.0.1", 1080),
                               peerAddress=IPv4Address("TCP", XA, 40000))
    c_tr = iosim.FakeTransport(client, isServer=False,
                               hostAddress=IPv4Address("TCP", XA, 40000),
                               peerAddress=IPv4Address("TCP", "10.0.0.1", 1080))
    pump = iosim.connect(server, s_tr, client, c_tr)
    return client, pump, store


def result(d, pump):
    pump.flush()
    out = []
    d.addBoth(out.append)
    pump.flush()
    assert out, "no answer"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_negotiates_mappings_and_they_go_with_the_connection():
    client, pump, store = pair()
    assert result(client.ready, pump) is client
    lent, flags = result(client.nar_mode(YB, wire.FLAG_TRANSLATED), pump)
    assert lent == NB and flags == wire.FLAG_TRANSLATED
    assert result(client.icmp_associate(4242), pump) == 4242
    spi = result(client.ipsec_associate(50), pump)
    assert spi > 255
    assert result(client.tunnel_associate("10.2.0.100", 47), pump) == "10.2.0.100"
    kinds = sorted(m.kind for m in store.records("nar.mapping"))
    assert kinds == ["icmp", "ipsec", "tunnel"]
    client.transport.loseConnection()
    pump.flush()
    assert store.count("nar.mapping") == 0 and store.count("nar.session") == 0


def test_wrong_password_fails_ready():
    client, pump, _ = pair(password="nope")
    pump.flush()
    failures = []
    client.ready.addErrback(failures.append)
    pump.flush()
    assert failures and failures[0].check(NarRefused, ConnectionError)


def test_refused_translation_is_reported_as_granted_flags():
    client, pump, _ = pair(translated="refuse")
    result(client.ready, pump)
    lent, flags = result(client.nar_mode(YB, wire.FLAG_TRANSLATED), pump)
    assert flags & wire.FLAG_TRANSLATED == 0  # end-to-end imposed


def test_refused_command_raises_with_the_reply_code():
    client, pump, _ = pair()
    result(client.ready, pump)
    result(client.nar_mode(YB), pump)
    d = client.tunnel_associate("10.2.0.100", 99)  # TUN.PROTOCOL neither 4 nor 47
    pump.flush()
    failures = []
    d.addErrback(failures.append)
    pump.flush()
    assert failures and failures[0].check(NarRefused)
    assert failures[0].value.code == 0x07


def test_tunnel_associate_sends_atyp_3_and_4():
    from narsuite.nar.client import _tunnel_arg

    client, pump, store = pair()
    result(client.ready, pump)
    result(client.nar_mode(YB, 0), pump)
    assert result(client.tunnel_associate("2001:db8::5", 47), pump) == "2001:db8::5"
    m = store.lookup("nar.mapping", "tunnel", (YB, "2001:db8::5", NB))
    assert m is not None and m.proto == 47
    assert _tunnel_arg("[2001:db8::4]:47") == ("2001:db8::4", "47")
    assert _tunnel_arg("2001:db8::4") == ("2001:db8::4", "")
    assert _tunnel_arg("10.2.0.1:47") == ("10.2.0.1", "47")
    assert _tunnel_arg("home.lab") == ("home.lab", "")
