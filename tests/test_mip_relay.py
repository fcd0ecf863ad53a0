"""The mipproxy registration relay and config, with Twisted fakes (Clock, memory store).

The requests are built by the independent test peer (tests/mip_peer.py: scapy headers,
hand-laid extensions, hmac), and what the relay sends is parsed by it too, so these
unit tests do not check the relay against its own codec.
"""

from __future__ import annotations

import importlib.util
import textwrap
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from narsuite import config as cfgmod
from narsuite.config import ConfigError
from narsuite.mipproxy.config import check_running
from narsuite.mipproxy.records import BINDING, KINDS, PENDING
from narsuite.mipproxy.registration import RegistrationRelay
from narsuite.store import MemoryBackend, Store

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("mip_peer_for_tests", HERE / "mip_peer.py")
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)  # type: ignore[union-attr]

PUB, PRIV, HA, HOME, COA = "203.0.113.1", "10.2.0.1", "10.2.0.2", "10.2.0.100", "198.51.100.7"
SPI, KEY = 4096, bytes(range(16))
KEYS = {SPI: KEY}


def config(extra: str = "", tmp: Path | None = None):
    text = textwrap.dedent(f"""
        [mipproxy]
        public_address = "{PUB}"
        private_address = "{PRIV}"
        home_agents = ["{HA}"]
        ha_pool = ["{HA}"]
        internal_networks = ["10.0.0.0/8"]
        data_path = false
        """) + extra + textwrap.dedent(f"""
        [[mipproxy.mobile_nodes]]
        spi = {SPI}
        key = "{KEY.hex()}"
        home_address = "{HOME}"
        """)
    return cfgmod.loads(text).role("mipproxy")


class Rig:
    def __init__(self, extra: str = "") -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = Store(MemoryBackend(), self.clock)
        for k in KINDS:
            self.store.register(k)
        self.store.open()
        self.store.start()
        self.to_mn: list[tuple[bytes, tuple[str, int]]] = []
        self.to_ha: list[tuple[bytes, tuple[str, int]]] = []
        self.relay = RegistrationRelay(
            config(extra), self.store, self.clock,
            send_public=lambda d, a: self.to_mn.append((d, a)),
            send_private=lambda d, a: self.to_ha.append((d, a)))

    def request(self, *, flags: str = "T", lifetime: int = 300, ha_param: str | None = HA,
                home: str = HOME, coa: str = COA, ident: int | None = None, extra: bytes = b"",
                key: bytes = KEY, src: tuple[str, int] = (COA, 40000)) -> int:
        f = sum(peer.FLAGS[c] for c in flags)
        ident = ident if ident is not None else peer.ntp_identification()
        exts = extra + (peer.ha_parameter(ha_param) if ha_param is not None else b"")
        msg = peer.with_auth(peer.request_bytes(f, lifetime, home, PUB, coa, ident, exts), SPI, key)
        self.relay.request_received(msg, src)
        return ident

    def ha_reply(self, n: int = -1, code: int = 0, lifetime: int | None = None, **kw) -> None:
        req = peer.parse(self.to_ha[n][0], KEYS)
        life = req["lifetime"] if lifetime is None else lifetime
        msg = peer.with_auth(peer.reply_bytes(code, life, kw.get("home", req["home"]), HA,
                                              req["id"], b""), SPI, KEY)
        self.relay.reply_received(msg, (HA, 434))

    def last_reply(self) -> dict:
        return peer.parse(self.to_mn[-1][0], KEYS)


def test_relayed_request_follows_2_2_and_reply_2_3() -> None:
    r = Rig()
    ident = r.request(flags="SBDGT", lifetime=5000)
    (data, addr), = r.to_ha
    assert addr == (HA, 434)
    req = peer.parse(data, KEYS)
    assert req["auth_ok"] and req["spi"] == SPI
    assert (req["home"], req["ha"], req["coa"], req["id"]) == (HOME, HA, PRIV, ident)
    assert req["lifetime"] == 1800  # capped by max_lifetime, <= the MN's 5000
    assert req["flags"] == peer.FLAGS["D"] | peer.FLAGS["G"] | peer.FLAGS["T"]
    assert [e[0] for e in req["exts"]] == [32]
    assert r.store.count(PENDING.name) == 1
    r.ha_reply(lifetime=900)
    rep = r.last_reply()
    assert r.to_mn[-1][1] == (COA, 40000)
    assert rep["auth_ok"] and rep["code"] == 1 and rep["ha"] == PUB and rep["id"] == ident
    assert rep["lifetime"] == 900 and dict(rep["exts"])[127] == "0000" + "0a020002"
    b = r.store.get(BINDING.name, (HOME, COA))
    assert b.lifetime == 900 and b.encapsulation == "gre" and b.src_ip == COA
    assert r.store.expires(BINDING.name, (HOME, COA)) == pytest.approx(r.clock.seconds() + 900)
    assert r.store.count(PENDING.name) == 0


def test_broadcast_supported_keeps_b_and_clears_d() -> None:
    r = Rig("broadcast = true\n")
    r.request(flags="BDT")
    req = peer.parse(r.to_ha[0][0], KEYS)
    assert req["flags"] == peer.FLAGS["B"] | peer.FLAGS["T"]


@pytest.mark.parametrize("case, code", [
    ("no_t", 138), ("no_ha_param", 200), ("unknown_ha", 136), ("dynamic_no_nai", 201),
    ("internal", 206), ("bad_key", 131), ("wrong_home", 131), ("m_and_g", 139),
])
def test_denials_are_authenticated_replies_and_nothing_reaches_the_ha(case: str, code: int) -> None:
    r = Rig()
    kw: dict = {
        "no_t": dict(flags=""), "no_ha_param": dict(ha_param=None),
        "unknown_ha": dict(ha_param="10.2.0.55"), "dynamic_no_nai": dict(ha_param="0.0.0.0"),
        "internal": dict(coa="10.9.9.9", src=("10.9.9.9", 434)), "bad_key": dict(key=b"x" * 16),
        "wrong_home": dict(home="10.2.0.101"), "m_and_g": dict(flags="MGT"),
    }[case]
    r.request(**kw)
    assert r.to_ha == []
    rep = r.last_reply()
    assert rep["code"] == code
    assert rep["ha"] == PUB and rep["lifetime"] == 0
    assert rep["auth_ok"]  # with the SA of the SPI used, whatever key the sender had
    assert r.relay.counters.denied == {code: 1}


def test_replay_and_stale_timestamp_answered_133_with_our_time() -> None:
    r = Rig()
    ident = r.request()
    assert len(r.to_ha) == 1
    r.request(ident=ident)  # the same identification again
    rep = r.last_reply()
    assert rep["code"] == 133 and len(r.to_ha) == 1
    assert rep["id"] & 0xFFFFFFFF == ident & 0xFFFFFFFF
    assert abs((rep["id"] >> 32) - (int(time.time()) + 2208988800)) <= 2
    r.request(ident=peer.ntp_identification(offset=-30))
    assert r.last_reply()["code"] == 133
    # after a restart (a new relay over the same store) the persisted binding's
    # identification is the floor
    r.ha_reply(n=0)
    again = RegistrationRelay(r.relay.cfg, r.store, r.clock, send_public=lambda d, a: r.to_mn.append((d, a)),
                              send_private=lambda d, a: r.to_ha.append((d, a)))
    r.relay = again
    r.request(ident=ident)
    assert r.last_reply()["code"] == 133


def test_extensions_after_the_authenticator_are_neither_read_nor_relayed() -> None:
    """An HA Parameter extension appended after the MN-HA authenticator is not
    authenticated: the request counts as having none (200)."""
    r = Rig()
    f = peer.FLAGS["T"]
    msg = peer.with_auth(peer.request_bytes(f, 300, HOME, PUB, COA, peer.ntp_identification(), b""),
                         SPI, KEY) + peer.ha_parameter(HA)
    r.relay.request_received(msg, (COA, 434))
    assert r.last_reply()["code"] == 200 and r.to_ha == []


def test_reply_lifetime_zero_retires_binding_and_bad_replies_are_dropped() -> None:
    r = Rig()
    r.request()
    r.ha_reply()
    assert r.store.count(BINDING.name) == 1
    r.request(lifetime=0)
    # a reply from elsewhere, and one with a wrong authenticator, change nothing
    req = peer.parse(r.to_ha[-1][0], KEYS)
    forged = peer.with_auth(peer.reply_bytes(0, 0, HOME, HA, req["id"], b""), SPI, b"y" * 16)
    r.relay.reply_received(forged, (HA, 434))
    good = peer.with_auth(peer.reply_bytes(0, 0, HOME, HA, req["id"], b""), SPI, KEY)
    r.relay.reply_received(good, ("10.2.0.66", 434))
    c = r.relay.counters.values
    assert c["drop_reply_auth_failed"] == 1 and c["drop_reply_wrong_source"] == 1
    assert r.store.count(BINDING.name) == 1 and len(r.to_mn) == 1
    r.ha_reply(lifetime=0)
    assert r.store.count(BINDING.name) == 0 and r.last_reply()["code"] == 0


def test_pending_list_is_bounded_and_expires() -> None:
    r = Rig("max_pending = 2\n")
    for i in range(3):
        r.request(ident=peer.ntp_identification(low=i + 1))
    assert len(r.to_ha) == 2 and r.last_reply()["code"] == 130
    r.store.subscribe(r.relay.store_changed)
    r.clock.advance(8)  # pending_timeout is 7 s
    assert r.store.count(PENDING.name) == 0
    assert r.relay.counters.values["pending_expired"] == 2


def test_garbage_never_raises_and_is_counted() -> None:
    r = Rig()
    for junk in (b"", b"\x01", b"\x01" * 23, b"\x01" + b"\x00" * 23 + b"\x20\xff",
                 b"\x03" * 5, b"\x03" + b"\x00" * 19 + b"\x7f\x01"):
        if junk[:1] == b"\x03":
            r.relay.reply_received(junk, (HA, 434))
        else:
            r.relay.request_received(junk, (COA, 434))
    c = r.relay.counters.values
    assert c["drop_short"] == 3 and c["drop_reply_malformed"] == 2
    assert r.relay.counters.denied == {134: 1}  # broken chain: answered as an HA would


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mipproxy.mobile_nodes\[0\].key: set exactly one"):
        cfgmod.loads('[mipproxy]\n[[mipproxy.mobile_nodes]]\nspi = 300\nhome_address = "10.0.0.1"\n')
    with pytest.raises(ConfigError, match=r"mipproxy.mobile_nodes\[1\].spi: SPI 4096 is used twice"):
        cfgmod.loads(f'[mipproxy]\n[[mipproxy.mobile_nodes]]\nspi = {SPI}\nkey = "00"\nnai = "x@y"\n'
                     f'[[mipproxy.mobile_nodes]]\nspi = {SPI}\nkey = "00"\nnai = "x@z"\n')
    with pytest.raises(ConfigError, match=r"mipproxy.numbers.missing_ha_parameter"):
        cfgmod.loads("[mipproxy.numbers]\nmissing_ha_parameter = 131\n")
    with pytest.raises(ConfigError, match=r"mipproxy.internal_networks\[0\]"):
        cfgmod.loads('[mipproxy]\ninternal_networks = ["nonsense"]\n')
    with pytest.raises(ConfigError, match="mipproxy.mobile_nodes: no mobile node"):
        check_running(cfgmod.loads(f'[mipproxy]\npublic_address = "{PUB}"\n'
                                   f'private_address = "{PRIV}"\n').role("mipproxy"))
    key = tmp_path / "k"
    key.write_text("00112233\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mipproxy.mobile_nodes\[0\].key_file: .* chmod 600"):
        cfgmod.loads(f'[mipproxy]\n[[mipproxy.mobile_nodes]]\nspi = 300\nkey_file = "{key}"\n'
                     'home_address = "10.0.0.1"\n')
    # keys are never in a repr (logs, manhole, tracebacks)
    assert KEY.hex() not in repr(config())


def test_example_config_loads(tmp_path: Path) -> None:
    example = (HERE.parent / "etc" / "mipproxy.toml").read_text()
    for name in ("mn-alice.key", "mn-bob.key", "fa-visited.key"):
        (tmp_path / name).write_text("00112233445566778899aabbccddeeff\n")
        (tmp_path / name).chmod(0o600)
        example = example.replace(f"/etc/narsuite/{name}", str(tmp_path / name))
    cfg = cfgmod.loads(example).role("mipproxy")
    check_running(cfg)
    assert cfg.numbers.draft_numbers().assigned_home_agent == 206
    assert cfg.require_fa_sa and cfg.foreign_agents[0].spi == 8192


def test_shared_store_unreachable_denies_new_registrations_130_and_counts() -> None:
    """store.backend = "redis" and Redis away: a new registration cannot be recorded for the
    other nodes, so it is denied 130 (insufficient resources), counted, and nothing reaches the
    HA; once the store is back requests are relayed again."""
    r = Rig()
    r.store.backend.available = False  # type: ignore[attr-defined]  # what RedisBackend says while Redis is away
    r.request()
    assert r.to_ha == [] and r.last_reply()["code"] == 130
    assert r.relay.counters.values["store_unavailable"] == 1
    r.store.backend.available = True  # type: ignore[attr-defined]
    r.request(ident=peer.ntp_identification(offset=1.0))
    assert len(r.to_ha) == 1, r.last_reply()


def test_simultaneous_bindings_lifetime_rule_2_6_2() -> None:
    """With simultaneous bindings on, an S request is relayed without S and with the longest
    of the remaining lifetimes and its own; the new binding gets the lesser of the accepted
    and the requested lifetime; the first binding stays."""
    r = Rig("simultaneous_bindings = true\n")
    r.request(lifetime=600)
    r.ha_reply()
    r.clock.advance(100)
    second = "198.51.100.8"
    r.request(flags="ST", lifetime=100, coa=second, src=(second, 434))
    req = peer.parse(r.to_ha[-1][0], KEYS)
    assert req["flags"] & peer.FLAGS["S"] == 0
    assert req["lifetime"] == 500  # max(600 - 100 remaining, 100)
    r.ha_reply()  # the HA accepts the 500 it was asked for
    assert r.last_reply()["code"] == 0  # S supported: plain acceptance
    assert r.store.get(BINDING.name, (HOME, second)).lifetime == 100  # min(500, 100)
    assert r.store.get(BINDING.name, (HOME, COA)) is not None
    # without simultaneous bindings the new care-of address replaces the old one, code 1
    r = Rig()
    r.request(lifetime=600)
    r.ha_reply()
    r.request(flags="ST", lifetime=100, coa=second, src=(second, 434))
    assert peer.parse(r.to_ha[-1][0], KEYS)["lifetime"] == 100
    r.ha_reply()
    assert r.last_reply()["code"] == 1
    assert [b.care_of_address for b in r.store.records(BINDING.name)] == [second]


def test_location_detection_by_interface_2_6_1() -> None:
    """#2: the interface the source is routed through decides, not the addresses."""
    r = Rig('location_detection = "interface"\ninternal_interfaces = ["int0"]\n')
    routes = {"10.9.9.9": "int0", COA: "ext0"}
    r.relay._route_device = routes.get
    r.request(coa="10.9.9.9", src=("10.9.9.9", 434))  # internal_networks would say internal too
    assert r.last_reply()["code"] == 206
    r.request()  # from outside: relayed
    assert len(r.to_ha) == 1
    r.request(coa="10.9.9.10", src=(COA, 434))  # NATed behind an outside address: relayed
    assert len(r.to_ha) == 2
    with pytest.raises(ConfigError, match="mipproxy.internal_interfaces"):
        config('location_detection = "interface"\n')


def test_an_accepting_reply_waits_until_the_data_path_carries_the_home_address() -> None:
    """The MN's first packets follow the reply at once: the reply goes out only when the data
    path says the home address's policy rules are in (a denial goes out at once)."""
    from twisted.internet import defer

    r = Rig()
    asked: list[str] = []
    ready: defer.Deferred = defer.Deferred()

    def before_reply(home: str) -> defer.Deferred:
        asked.append(home)
        return ready

    r.relay.before_reply = before_reply
    r.request()
    r.ha_reply()
    assert asked == [HOME] and r.to_mn == []          # held
    assert r.store.get(BINDING.name, (HOME, COA)) is not None
    ready.callback(None)
    assert r.last_reply()["code"] == 0 and r.last_reply()["auth_ok"]
    r.request(ident=1)  # a stale identification: denied 133, not held
    assert r.last_reply()["code"] == 133 and asked == [HOME]


@pytest.mark.parametrize("encap", [4, 47, 55])
def test_udp_tunnel_request_encapsulation_is_the_binding_s_next_header(encap: int) -> None:
    """RFC 3519 3.1.4: the UDP Tunnel Request's Encapsulation field is what the MN sends in
    the tunnel and what it gets back: it lands in the pending entry and the binding."""
    r = Rig()
    nat = ("203.0.113.2", 40000)  # not the CoA: NATed
    r.request(extra=peer.udp_tunnel_request(encap=encap), src=nat)
    (p,) = r.store.records(PENDING.name)
    assert p.udp_tunnel and p.udp_next_header == encap
    r.ha_reply()
    rep = r.last_reply()
    assert rep["code"] == 0 and dict(rep["exts"])[44][:4] == "0000"  # UDP Tunnel Reply: accepted
    b = r.store.get(BINDING.name, (HOME, COA))
    assert (b.encapsulation, b.udp_next_header, b.src_ip, b.src_port) == ("udp", encap, *nat)


def test_udp_tunnel_encapsulation_we_cannot_carry_is_refused_142() -> None:
    """An Encapsulation other than 4, 47, 55 with UDP tunnelling agreed: RFC 3519's own
    code 142 (UDP encapsulation unavailable), nothing relayed; without a NAT (and no F bit)
    the request asks for no UDP tunnel, so the field does not matter."""
    r = Rig()
    r.request(extra=peer.udp_tunnel_request(encap=41), src=("203.0.113.2", 40000))
    assert r.to_ha == [] and r.last_reply()["code"] == 142 and r.last_reply()["auth_ok"]
    assert r.relay.counters.denied == {142: 1}
    r.request(extra=peer.udp_tunnel_request(encap=41), src=(COA, 40000))
    assert len(r.to_ha) == 1
    (p,) = r.store.records(PENDING.name)
    assert not p.udp_tunnel


def test_a_store_write_failing_later_is_counted_and_an_answered_one_costs_no_errback() -> None:
    """A write the backend answers later (a persistent or shared store) keeps its errback:
    its failure is counted as store_errors, never left unhandled; a write already answered
    (the memory store) needs none."""
    from twisted.internet import defer

    r = Rig()
    pending: list[defer.Deferred] = []
    real_put = r.store.put

    def slow_put(record, **kw):
        real_put(record, **kw)
        d: defer.Deferred = defer.Deferred()
        pending.append(d)
        return d

    r.store.put = slow_put  # type: ignore[method-assign]
    r.request()
    (d,) = pending
    d.errback(RuntimeError("disk full"))
    assert r.relay.counters.values["store_errors"] == 1
    done = defer.succeed(None)
    r.relay._stored(done, "x")
    assert done.called and r.relay.counters.values["store_errors"] == 1
