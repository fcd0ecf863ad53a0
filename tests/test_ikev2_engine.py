"""The IKEv2 responder (narsuite.ike.v2.engine) driven in-process: a Clock, a memory store
with a pool, and a small initiator built here from the codec and key schedule (the lab
tests are where an independent initiator, strongSwan, checks those).  What is checked:
message IDs and the window of one, a retransmitted request answered with the stored
response and never processed again, stateless answers, half-open limits, AUTH failure,
Delete, liveness."""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from narsuite import sadb
from narsuite.ike import records
from narsuite.ike.config import IkeConfig
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire
from narsuite.ike.v2.engine import IkeV2Engine
from narsuite.schema import build
from narsuite.store import MemoryBackend, Store

SERVER = "198.51.100.1"
CLIENT = ("192.0.2.10", 500)
PSK = "v2 unit psk"


class Harness:
    def __init__(self, **ike: Any) -> None:
        peer = {"name": "rw2", "versions": [2], "psk": PSK, "local_id": "gw.example", "pool": "ra",
                "local_ts": ["10.1.0.0/24"], **ike.pop("peer", {})}
        self.cfg = build(IkeConfig, {"address": SERVER, "peers": [peer], **ike}, "ike")
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = Store(MemoryBackend(), self.clock)
        self.store.add_pool("ra", IPv4Network("10.8.0.0/29"), [IPv4Address("10.8.0.1")])
        for k in (*sadb.KINDS, *records.KINDS):
            self.store.register(k)
        self.store.open()
        self.store.start()
        self.sent: list[tuple[bytes, tuple[str, int], int]] = []
        self.engine = IkeV2Engine(self.cfg, self.store, self.clock,
                                  send=lambda d, a, p: self.sent.append((d, a, p)))

    def deliver(self, data: bytes, addr: tuple[str, int] = CLIENT, port: int = 500) -> list[bytes]:
        n = len(self.sent)
        self.engine.received(data, addr, port)
        return [d for d, _a, _p in self.sent[n:]]


class Initiator:
    """Just enough of an IKEv2 initiator: ecp256, AES-CBC-128/HMAC-SHA2-256, PSK, a CP
    request and one CHILD SA."""

    def __init__(self, h: Harness, group: int = 19) -> None:
        self.h = h
        self.spi_i = secrets.token_bytes(8)
        self.spi_r = b"\0" * 8
        self.group = group
        self.ni = secrets.token_bytes(32)
        self.mid = 1

    def init_request(self, cookie: bytes | None = None, group: int | None = None) -> bytes:
        g = group or self.group
        self.priv, pub = keys.group(g).generate()
        sa = wire.SA((wire.Proposal(1, C.PROTO_IKE, b"", (
            wire.Transform(C.TRANS_ENCR, C.ENCR_AES_CBC, 128), wire.Transform(C.TRANS_PRF, C.PRF_HMAC_SHA2_256),
            wire.Transform(C.TRANS_INTEG, C.AUTH_HMAC_SHA2_256_128), wire.Transform(C.TRANS_DH, 19),
            wire.Transform(C.TRANS_DH, 14))),))
        ps: list[Any] = [wire.Notify(C.COOKIE, cookie)] if cookie else []
        ps += [sa, wire.KE(g, pub), wire.Nonce(self.ni)]
        self.req1 = wire.build_message(wire.Header(self.spi_i, b"\0" * 8, C.IKE_SA_INIT, C.FLAG_INITIATOR, 0), ps)
        return self.req1

    def take_init_response(self, data: bytes) -> tuple[Any, ...]:
        hdr, ps = wire.parse_message(data)
        self.resp1 = data
        self.spi_r = hdr.spi_r
        ke, nr = wire.find(ps, wire.KE), wire.find(ps, wire.Nonce)
        gir = keys.group(ke.group).shared(self.priv, ke.data)
        self.nr = nr.data
        seed = keys.skeyseed("sha256", self.ni, self.nr, gir)
        self.k = keys.derive_ike_keys("sha256", seed, self.ni, self.nr, self.spi_i, self.spi_r, 16, 32)
        self.tx = keys.SKCipher(C.ENCR_AES_CBC, self.k.sk_ei, C.AUTH_HMAC_SHA2_256_128, self.k.sk_ai)
        self.rx = keys.SKCipher(C.ENCR_AES_CBC, self.k.sk_er, C.AUTH_HMAC_SHA2_256_128, self.k.sk_ar)
        return ps

    def protected(self, exchange: int, payloads: list[Any], mid: int | None = None, response: bool = False) -> bytes:
        m = self.mid if mid is None else mid
        flags = C.FLAG_INITIATOR | (C.FLAG_RESPONSE if response else 0)
        return keys.seal(wire.Header(self.spi_i, self.spi_r, exchange, flags, m), payloads, self.tx)

    def auth_request(self, psk: str = PSK, tsi: str = "0.0.0.0/0") -> bytes:
        idi = wire.IDi(C.ID_FQDN, b"client.example")
        body = bytes([idi.id_type, 0, 0, 0]) + idi.data
        octets = keys.signed_octets(self.req1, self.nr, "sha256", self.k.sk_pi, body)
        self.spi_child = secrets.token_bytes(4)
        return self.protected(C.IKE_AUTH, [
            idi, wire.Auth(C.AUTH_SHARED_KEY, keys.psk_auth("sha256", psk.encode(), octets)),
            wire.CP(C.CFG_REQUEST, (wire.CfgAttribute(C.INTERNAL_IP4_ADDRESS),)),
            wire.SA((wire.Proposal(1, C.PROTO_ESP, self.spi_child, (
                wire.Transform(C.TRANS_ENCR, C.ENCR_AES_GCM_16, 128), wire.Transform(C.TRANS_ESN, 0))),)),
            wire.TSi((wire.ts_range(tsi),)), wire.TSr((wire.ts_range("0.0.0.0/0"),))])

    def child_request(self, tsi: str, rekey_spi: bytes | None = None) -> bytes:
        """CREATE_CHILD_SA for a new CHILD SA (or a rekey of ``rekey_spi``), no PFS."""
        ps: list[Any] = [wire.Notify(C.REKEY_SA, b"", C.PROTO_ESP, rekey_spi)] if rekey_spi else []
        ps += [wire.SA((wire.Proposal(1, C.PROTO_ESP, secrets.token_bytes(4), (
                   wire.Transform(C.TRANS_ENCR, C.ENCR_AES_GCM_16, 128), wire.Transform(C.TRANS_ESN, 0))),)),
               wire.Nonce(secrets.token_bytes(32)),
               wire.TSi((wire.ts_range(tsi),)), wire.TSr((wire.ts_range("0.0.0.0/0"),))]
        data = self.protected(C.CREATE_CHILD_SA, ps)
        self.mid += 1
        return data

    def open(self, data: bytes) -> tuple[wire.Header, tuple[Any, ...]]:
        hdr, outer = wire.parse_message(data)
        return hdr, wire.parse_payloads(outer[-1].first, keys.open_encrypted(data, hdr.length, outer[-1], self.rx))


def establish(h: Harness, tsi: str = "0.0.0.0/0", addr: tuple[str, int] = CLIENT) -> Initiator:
    i = Initiator(h)
    (resp,) = h.deliver(i.init_request(), addr)
    i.take_init_response(resp)
    (resp,) = h.deliver(i.auth_request(tsi=tsi), addr)
    hdr, ps = i.open(resp)
    assert hdr.response and hdr.message_id == 1 and wire.find(ps, wire.Auth) is not None
    i.mid = 2
    i.auth_response = ps
    return i


def test_psk_auth_cp_and_child_in_the_store():
    h = Harness()
    i = establish(h)
    cp = wire.find(i.auth_response, wire.CP)
    addr = next(a.value for a in cp.attributes if a.type == C.INTERNAL_IP4_ADDRESS)
    assert IPv4Address(addr) in IPv4Network("10.8.0.0/29")
    tsi = wire.find(i.auth_response, wire.TSi)
    assert tsi.selectors[0].start == tsi.selectors[0].end == addr
    tsr = wire.find(i.auth_response, wire.TSr)
    assert (IPv4Address(tsr.selectors[0].start), IPv4Address(tsr.selectors[0].end)) == (
        IPv4Address("10.1.0.0"), IPv4Address("10.1.0.255"))
    (peer,) = list(h.store.records(sadb.PEER.name))
    assert peer.inner == str(IPv4Address(addr)) and peer.policy == "address"
    assert {s.direction for s in h.store.records(sadb.SA_KIND.name)} == {"in", "out"}
    assert h.engine.counters["ike_established"] == 1 and h.engine.counters["child_installed"] == 1


def test_retransmitted_request_gets_the_stored_response_and_is_not_processed_again():
    h = Harness()
    i = Initiator(h)
    req1 = i.init_request()
    (r1,) = h.deliver(req1)
    assert h.deliver(req1) == [r1]  # IKE_SA_INIT: the same bytes again, one SA
    assert len(h.engine.sas) == 1
    i.take_init_response(r1)
    auth = i.auth_request()
    (r2,) = h.deliver(auth)
    installed = h.engine.counters["child_installed"]
    assert h.deliver(auth) == [r2]
    assert h.engine.counters["child_installed"] == installed
    assert h.engine.counters["retransmit_answered"] == 2
    assert len(list(h.store.records(sadb.SA_KIND.name))) == 2


def test_message_ids_outside_the_window_are_dropped():
    h = Harness()
    i = establish(h)
    assert h.deliver(i.protected(C.INFORMATIONAL, [], mid=5)) == []
    assert h.engine.counters["bad_message_id"] == 1
    (resp,) = h.deliver(i.protected(C.INFORMATIONAL, [], mid=2))  # liveness check from the peer
    hdr, ps = i.open(resp)
    assert hdr.message_id == 2 and ps == ()


def test_wrong_psk_is_authentication_failed_and_the_sa_is_gone():
    h = Harness()
    i = Initiator(h)
    (resp,) = h.deliver(i.init_request())
    i.take_init_response(resp)
    (resp,) = h.deliver(i.auth_request(psk="wrong"))
    _hdr, ps = i.open(resp)
    assert [p.type for p in ps] == [C.AUTHENTICATION_FAILED]
    assert not h.engine.sas and not h.engine.half_open and h.engine.budget.open == 0
    assert h.engine.counters["auth_failed"] == 1
    assert not list(h.store.records(sadb.SA_KIND.name))


def test_invalid_ke_and_cookie_are_stateless():
    h = Harness(ikev2_cookie_threshold=0)
    i = Initiator(h)
    (resp,) = h.deliver(i.init_request(group=14))
    hdr, ps = wire.parse_message(resp)
    (cookie,) = ps
    assert cookie.type == C.COOKIE and hdr.spi_r == b"\0" * 8 and not h.engine.sas
    (resp,) = h.deliver(i.init_request(cookie=cookie.data, group=14))
    _hdr, (ke,) = wire.parse_message(resp)
    assert ke.type == C.INVALID_KE_PAYLOAD and ke.data == b"\x00\x13" and not h.engine.sas
    (resp,) = h.deliver(i.init_request(cookie=cookie.data, group=19))
    i.take_init_response(resp)
    assert len(h.engine.sas) == 1
    # a forged cookie is answered with a fresh one, no state
    j = Initiator(h)
    (resp,) = h.deliver(j.init_request(cookie=b"\x00" * 8))
    assert wire.parse_message(resp)[1][0].type == C.COOKIE and len(h.engine.sas) == 1
    assert h.engine.counters["cookie_bad"] == 1


def test_half_open_per_source_limit():
    h = Harness(half_open_per_source=2, ikev2_cookie_threshold=1000)
    for _ in range(2):
        assert len(h.deliver(Initiator(h).init_request())) == 1
    assert h.deliver(Initiator(h).init_request()) == []
    assert h.engine.counters["half_open_dropped"] == 1
    h.clock.advance(h.cfg.half_open_timeout + 1)
    assert not h.engine.sas and h.engine.budget.open == 0
    assert len(h.deliver(Initiator(h).init_request())) == 1


def test_delete_from_the_peer_removes_everything():
    h = Harness()
    i = establish(h)
    (resp,) = h.deliver(i.protected(C.INFORMATIONAL, [wire.Delete(C.PROTO_IKE)]))
    assert i.open(resp)[1] == ()
    assert not h.engine.sas and not list(h.store.records(sadb.SA_KIND.name))
    assert not list(h.store.records(sadb.PEER.name))
    assert not list(h.store.records(records.IKE_SA.name))


def test_liveness_unanswered_deletes_the_sa():
    h = Harness(dpd_delay=10, retransmit=[1, 1, 1])
    establish(h)
    h.clock.advance(11)
    n = len(h.sent)
    h.engine.dpd_tick()
    assert len(h.sent) == n + 1 and h.engine.counters["liveness_sent"] == 1
    for _ in range(4):
        h.clock.advance(1.1)
    assert not h.engine.sas and h.engine.counters["peer_dead"] == 1
    assert not list(h.store.records(sadb.SA_KIND.name))


def test_a_natted_client_is_followed_to_its_new_mapping_on_authenticated_messages():
    """§2.23: the client is behind a NAT (its NAT_DETECTION_SOURCE_IP does not match); a
    protected request from a new port moves the SA and the esp peer there; a forged
    (undecryptable) one from elsewhere moves nothing."""
    h = Harness()
    i = Initiator(h)
    req = i.init_request()
    # the client claims a source hash that cannot match: it is behind a NAT
    h_, ps = wire.parse_message(req)
    req = wire.build_message(h_, [*ps, wire.Notify(C.NAT_DETECTION_SOURCE_IP, b"\x01" * 20)])
    i.req1 = req
    (resp,) = h.deliver(req)
    i.take_init_response(resp)
    (resp,) = h.deliver(i.auth_request(), port=4500, addr=("192.0.2.10", 4500))
    i.mid = 2
    (sa,) = h.engine.sas.values()
    assert sa.nat_peer and sa.remote == ("192.0.2.10", 4500)
    bogus = bytearray(i.protected(C.INFORMATIONAL, []))
    bogus[-1] ^= 1
    assert h.deliver(bytes(bogus), addr=("203.0.113.9", 4500), port=4500) == []
    assert sa.remote == ("192.0.2.10", 4500) and h.engine.counters["decrypt_failed"] == 1
    (resp,) = h.deliver(i.protected(C.INFORMATIONAL, []), addr=("192.0.2.10", 31000), port=4500)
    assert sa.remote == ("192.0.2.10", 31000) and h.engine.counters["peer_moved"] == 1
    (peer,) = list(h.store.records(sadb.PEER.name))
    assert (peer.remote_ip, peer.remote_port, peer.encap) == ("192.0.2.10", 31000, "udp")
    assert h.sent[-1][1:] == (("192.0.2.10", 31000), 4500)  # answered where it came from


def test_garbage_under_a_live_sa_is_dropped_never_raised():
    """Random bytes behind a live SA's header (any exchange, flags, message ID): dropped and
    counted, the SA stays usable."""
    import random

    h = Harness()
    i = establish(h)
    (sa,) = h.engine.sas.values()
    rnd = random.Random(7)
    for _n in range(400):
        body = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 300)))
        hdr = wire.Header(i.spi_i, i.spi_r, rnd.choice([34, 35, 36, 37, 99]), rnd.choice([0, 8, 0x20, 0x28]),
                          rnd.choice([0, 1, 2, 3]), rnd.choice([0, 46, 53, 33, 41]))
        data = wire.build_header(hdr, 28 + len(body)) + body
        h.engine.received(data, CLIENT, 4500)
    assert h.engine.counters["internal_error"] == 0
    (resp,) = h.deliver(i.protected(C.INFORMATIONAL, []))
    assert i.open(resp)[0].message_id == 2 and sa.state == "established"


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_child_networks_are_the_summarized_range(a: int, b: int) -> None:
    """children._networks (integers) names the same networks as ipaddress's summarize."""
    from ipaddress import summarize_address_range

    from narsuite.ike.v2.children import _networks

    lo, hi = min(a, b), max(a, b)
    for r in ((lo, hi), (lo, lo), (0, hi), (lo, 2**32 - 1)):
        want = [str(n) for n in summarize_address_range(IPv4Address(r[0]), IPv4Address(r[1]))]
        assert _networks(r) == want


def test_ike_auth_logs_one_line_with_the_ike_sa_and_its_first_child():
    """One info line per client (the IKE SA and its CHILD SA's SPIs), not one per SA."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("narsuite.ike.v2") and event["log_level"] >= LogLevel.info:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        h = Harness()
        establish(h)
    finally:
        globalLogPublisher.removeObserver(observe)
    (spi_in,) = {s.spi for s in h.store.records(sadb.SA_KIND.name) if s.direction == "in"}
    assert len(events) == 1, [formatEvent(e) for e in events]
    text = formatEvent(events[0])
    assert "client.example at 192.0.2.10:500 established" in text and "virtual IP 10.8.0." in text
    assert "; ESP aes-gcm-16-128 10.8.0." in text and f"in {spi_in:#010x}" in text


def _init_ke(h: Harness, i: Initiator) -> bytes:
    (resp,) = h.deliver(i.init_request(), addr=("192.0.2.10", 500 + len(h.sent)))
    i.take_init_response(resp)
    _hdr, ps = wire.parse_message(resp)
    return wire.find(ps, wire.KE).data


def test_dh_value_is_reused_within_the_window_and_forgotten_after_it():
    """RFC 7296 §2.12: one IKE_SA_INIT value for [ike] ikev2_dh_reuse seconds, then a fresh
    one; the timer drops it even when no exchange comes; each SA's keys still work."""
    h = Harness(ikev2_dh_reuse=1.0)
    a, b, c = Initiator(h), Initiator(h), Initiator(h)
    ke_a, ke_b = _init_ke(h, a), _init_ke(h, b)
    assert ke_a == ke_b and h.engine.sa_init.dh.generated == 1
    assert a.k.sk_ei != b.k.sk_ei  # own nonces and SPIs: own keys
    h.clock.advance(1.0)
    assert not h.engine.sa_init.dh._values  # forgotten without waiting for the next exchange
    assert _init_ke(h, c) != ke_a and h.engine.sa_init.dh.generated == 2
    for i, port in ((a, 500 + 0), (b, 500 + 1), (c, 500 + 3)):
        (resp,) = h.deliver(i.auth_request(), addr=("192.0.2.10", port))
        hdr, ps = i.open(resp)
        assert wire.find(ps, wire.Auth) is not None, ps
    assert h.engine.counters["ike_established"] == 3


def test_dh_reuse_zero_draws_a_fresh_value_per_exchange_and_bad_values_are_refused_anyway():
    h = Harness(ikev2_dh_reuse=0)
    assert _init_ke(h, Initiator(h)) != _init_ke(h, Initiator(h))
    assert h.engine.sa_init.dh.generated == 2 and not h.engine.sa_init.dh._values
    # with a value held for reuse, a peer value that is not a point on the curve is still refused
    h = Harness(ikev2_dh_reuse=1.0)
    _init_ke(h, Initiator(h))
    bad = Initiator(h)
    bad.init_request()
    hdr, ps = wire.parse_message(bad.req1)
    ps = tuple(wire.KE(19, b"\x01" * 64) if isinstance(p, wire.KE) else p for p in ps)
    (resp,) = h.deliver(wire.build_message(hdr, list(ps)), addr=("192.0.2.11", 500))
    _hdr, out = wire.parse_message(resp)
    assert [n.type for n in out if isinstance(n, wire.Notify)] == [C.INVALID_SYNTAX]
    assert h.engine.counters["malformed"] == 1


def _notifies(ps: tuple[Any, ...]) -> set[int]:
    return {p.type for p in ps if isinstance(p, wire.Notify)}


def test_overlapping_space_children_are_refused_with_ts_unacceptable():
    """002 §5.1 for IKEv2: a CHILD SA whose (space) traffic selectors overlap another
    client's is refused with TS_UNACCEPTABLE -- in IKE_AUTH (the IKE SA stays, childless)
    and in CREATE_CHILD_SA -- counted, and nothing of it reaches the store; disjoint
    networks and a rekey of one's own CHILD SA are accepted."""
    h = Harness(peer={"pool": "", "remote_ts": ["10.50.0.0/16"]})
    a = establish(h, tsi="10.50.1.0/24", addr=("192.0.2.10", 500))
    assert wire.find(a.auth_response, wire.TSi) is not None
    (first,) = list(h.store.records(sadb.PEER.name))
    assert first.policy == "space" and first.allowed == ("10.50.1.0/24",)
    # a second client asks for a network inside the first one's
    b = establish(h, tsi="10.50.1.128/25", addr=("192.0.2.11", 500))
    assert C.TS_UNACCEPTABLE in _notifies(b.auth_response)
    assert wire.find(b.auth_response, wire.TSi) is None
    assert [p.name for p in h.store.records(sadb.PEER.name)] == [first.name]
    assert h.engine.counters["ts_conflict"] == 1 and h.engine.counters["ike_established"] == 2
    # the same client, with a CREATE_CHILD_SA, for a network containing the first one's
    addr_b = ("192.0.2.11", 500)
    (resp,) = h.deliver(b.child_request("10.50.0.0/20"), addr_b)
    hdr, ps = b.open(resp)
    assert hdr.response and C.TS_UNACCEPTABLE in _notifies(ps)
    assert h.engine.counters["ts_conflict"] == 2
    assert len(list(h.store.records(sadb.SA_KIND.name))) == 2  # only the first client's pair
    # a disjoint network is fine
    (resp,) = h.deliver(b.child_request("10.50.2.0/24"), addr_b)
    hdr, ps = b.open(resp)
    assert wire.find(ps, wire.TSi) is not None and C.TS_UNACCEPTABLE not in _notifies(ps)
    # and the first client rekeys its own CHILD SA (its own networks do not conflict)
    (resp,) = h.deliver(a.child_request("10.50.1.0/24", rekey_spi=a.spi_child), ("192.0.2.10", 500))
    hdr, ps = a.open(resp)
    assert wire.find(ps, wire.TSi) is not None, _notifies(ps)
    assert h.engine.counters["child_rekeyed"] == 1 and h.engine.counters["ts_conflict"] == 2
