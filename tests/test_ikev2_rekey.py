"""CHILD SA rekeys the gateway starts (RFC 7296 §1.3.3, §2.8, §2.8.1): the responder
(narsuite.ike.v2) driven in-process with a Clock against ``tests/ikev2_peer.py`` (which
answers our CREATE_CHILD_SA and Deletes, and starts its own rekey to collide)."""

from __future__ import annotations

import ikev2_peer as P
import pytest
from test_ikev2_engine import SERVER, Harness

from narsuite import sadb
from narsuite.ike.common import grace
from narsuite.ike.config import IkeConfig
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import wire
from narsuite.schema import ConfigError, build

PSK = "v2 unit psk"
CLIENT_IP = "192.0.2.10"
LIFE = 60.0


def make(**peer) -> tuple[Harness, P.Initiator]:
    h = Harness(peer={"pool": "", "remote_ts": ["10.50.0.0/16"], "esp_lifetime": LIFE, "rekey_jitter": 0.0,
                      "esp": ["aes128-sha256"], **peer}, retransmit=[2.0, 4.0, 8.0])
    i = P.Initiator(PSK.encode(), "client.example", 19, "10.50.1.0/24", "10.1.0.0/24")
    pump(h, i, i.start())
    assert i.done
    return h, i


def pump(h: Harness, i: P.Initiator, out: P.Outgoing | None) -> None:
    """Carry datagrams both ways until both sides are quiet."""
    queue = [out] if out is not None else []
    while queue:
        o = queue.pop(0)
        data = o.data[4:] if o.port == P.NATT_PORT else o.data
        for d in h.deliver(data, (CLIENT_IP, o.port), o.port):
            queue += _to_peer(h, i, d)


def _to_peer(h: Harness, i: P.Initiator, d: bytes) -> list[P.Outgoing]:
    port = h.sent[-1][2] if h.sent else P.IKE_PORT
    back = i.receive(P.MARKER + d if port == P.NATT_PORT else d, port)
    return [back] if back is not None else []


def advance(h: Harness, i: P.Initiator, seconds: float, answer: bool = True) -> list[bytes]:
    """Let time pass; what the gateway sent meanwhile is answered by the peer (``answer``)."""
    n = len(h.sent)
    h.clock.advance(seconds)
    sent = [d for d, _a, _p in h.sent[n:]]
    if answer:
        for d in sent:
            for o in _to_peer(h, i, d):
                pump(h, i, o)
    return sent


def sas(h: Harness) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {"in": set(), "out": set()}
    for s in h.store.records(sadb.SA_KIND.name):
        out[s.direction].add(s.spi)
    return out


def _int(b: bytes) -> int:
    return int.from_bytes(b, "big")


def test_gateway_rekeys_a_child_at_its_soft_lifetime_and_deletes_the_old_one():
    h, i = make()
    (old,) = h.engine.sas[i.spi_r].children
    assert advance(h, i, LIFE - 1) == []  # nothing before our lifetime
    advance(h, i, 1)
    # our CREATE_CHILD_SA: REKEY_SA names our inbound SPI, new SPI and nonce, TSi ours / TSr the client's
    ex, ps = i.requests[0]
    assert ex == C.CREATE_CHILD_SA
    assert _int(wire.notifies(ps)[C.REKEY_SA].spi) == old.spi_in
    new_spi = _int(wire.find(ps, wire.SA).proposals[0].spi)
    assert new_spi != old.spi_in
    # the IKE_AUTH child had no PFS group: the IKE SA's (ecp256) is offered, and the same without
    assert wire.find(ps, wire.KE).group == 19
    assert [[t.id for t in p.transforms if t.type == C.TRANS_DH] for p in wire.find(ps, wire.SA).proposals] == [
        [19], [14], [15], [16], [20], [21], []]
    tsr = wire.find(ps, wire.TSr).selectors[0]
    assert (tsr.start, tsr.end) == (bytes([10, 50, 1, 0]), bytes([10, 50, 1, 255]))
    # ... then a Delete for the old pair, answered; only the new pair is left
    assert [e for e, _ in i.requests] == [C.CREATE_CHILD_SA, C.INFORMATIONAL]
    assert [_int(s) for s in wire.find(i.requests[1][1], wire.Delete).spis] == [old.spi_in]
    (new,) = h.engine.sas[i.spi_r].children
    assert new.spi_in == new_spi and new.peer == old.peer
    peer_spi = new.spi_out.to_bytes(4, "big")
    assert sas(h) == {"in": {new_spi}, "out": {new.spi_out}}
    # keys: we initiated this exchange, so what we send is keyed with the i->r half (§2.17)
    (ei, ai, er, ar), _ = i.child_keys[peer_spi]
    out_sa = h.store.get(sadb.SA_KIND.name, ("out", new.spi_out, new.peer))
    in_sa = h.store.get(sadb.SA_KIND.name, ("in", new.spi_in, new.peer))
    assert (out_sa.enc_key, out_sa.integ_key, in_sa.enc_key, in_sa.integ_key) == (ei, ai, er, ar)
    # our requests carry our own message IDs: 0 and 1
    assert h.engine.sas[i.spi_r].my_mid == 2
    c = h.engine.counters
    assert (c["rekey_sent"], c["child_rekeyed"], c["child_deleted"], c["rekey_failed"]) == (1, 1, 1, 0)
    # the old pair's hard expiry does not tear anything down; the new pair is rekeyed in turn
    advance(h, i, grace(LIFE) + 1)
    assert len(h.engine.sas[i.spi_r].children) == 1 and h.engine.sas[i.spi_r].state == "established"
    advance(h, i, LIFE)
    assert c["rekey_sent"] == 2 and c["ike_deleted"] == 0


def test_our_rekey_with_pfs_sends_a_ke_and_the_keys_include_the_dh_secret():
    h, i = make(pfs="required", pfs_groups=[19])
    advance(h, i, LIFE)
    ex, ps = i.requests[0]
    assert ex == C.CREATE_CHILD_SA and wire.find(ps, wire.KE).group == 19
    (new,) = h.engine.sas[i.spi_r].children
    assert new.choice.dh == 19
    (ei, ai, er, ar), _ = i.child_keys[new.spi_out.to_bytes(4, "big")]
    assert h.store.get(sadb.SA_KIND.name, ("out", new.spi_out, new.peer)).enc_key == ei


def test_a_client_without_pfs_picks_the_proposal_without_and_pfs_never_offers_none():
    h, i = make()
    i.child_pfs = 0
    advance(h, i, LIFE)
    (new,) = h.engine.sas[i.spi_r].children
    assert new.choice.dh == 0 and h.engine.counters["child_rekeyed"] == 1
    (ei, _ai, _er, _ar), _ = i.child_keys[new.spi_out.to_bytes(4, "big")]
    assert h.store.get(sadb.SA_KIND.name, ("out", new.spi_out, new.peer)).enc_key == ei
    h, i = make(pfs="never")
    advance(h, i, LIFE)
    _ex, ps = i.requests[0]
    assert wire.find(ps, wire.KE) is None and len(wire.find(ps, wire.SA).proposals) == 1


def test_invalid_ke_payload_is_answered_with_a_rekey_in_the_asked_group():
    h, i = make(pfs_groups=[14, 19, 20])
    i.child_pfs = 20
    advance(h, i, LIFE)
    assert [wire.find(ps, wire.KE).group for ex, ps in i.requests if ex == C.CREATE_CHILD_SA] == [19, 20]
    (new,) = h.engine.sas[i.spi_r].children
    assert new.choice.dh == 20 and h.engine.counters["child_rekeyed"] == 1


def test_our_rekey_request_is_resent_with_backoff_and_the_same_bytes():
    h, i = make()
    first = advance(h, i, LIFE, answer=False)
    assert len(first) == 1
    assert advance(h, i, 1.9, answer=False) == []
    assert advance(h, i, 0.1, answer=False) == first  # retransmit[0] = 2 s
    assert advance(h, i, 3.9, answer=False) == []
    assert advance(h, i, 0.1, answer=False) == first  # retransmit[1] = 4 s
    for o in _to_peer(h, i, first[0]):  # answered late: the rekey completes
        pump(h, i, o)
    assert h.engine.counters["child_rekeyed"] == 1


def test_unanswered_rekey_deletes_the_ike_sa_as_dead():
    h, i = make()
    advance(h, i, LIFE, answer=False)
    for _ in range(2 + 4 + 8):
        advance(h, i, 1, answer=False)
    assert h.engine.counters["peer_dead"] == 1 and not list(h.store.records(sadb.SA_KIND.name))


def test_temporary_failure_makes_us_try_again_later():
    h, i = make()
    i.refuse_child = C.TEMPORARY_FAILURE
    advance(h, i, LIFE)
    assert h.engine.counters["rekey_failed"] == 1 and h.engine.counters["child_rekeyed"] == 0
    i.refuse_child = None
    for _ in range(10):
        advance(h, i, 1.0)
    assert h.engine.counters["rekey_sent"] == 2 and h.engine.counters["child_rekeyed"] == 1
    assert len(h.engine.sas[i.spi_r].children) == 1


def _collide(h: Harness, i: P.Initiator, ours_lowest: bool) -> tuple[object, bytes]:
    """The gateway's rekey and the client's cross: the client's request reaches the
    gateway before its answer to ours (§2.8.1)."""
    (old,) = h.engine.sas[i.spi_r].children
    (ours,) = advance(h, i, LIFE, answer=False)
    low, high = b"\0" * 32, b"\xff" * 32
    i.nonce = lambda: high if ours_lowest else low  # the client's own rekey's nonce
    theirs = i.rekey_child()
    pump(h, i, theirs)  # the gateway answers the client's rekey (a second new pair, B)
    b_spi = _int(i.answers[-1][1][0].proposals[0].spi)
    i.nonce = lambda: low if ours_lowest else high  # the client's nonce in its answer to ours
    for o in _to_peer(h, i, ours):
        pump(h, i, o)
    return old, b_spi.to_bytes(4, "big")


def test_collision_the_clients_new_sa_is_redundant():
    """The client's exchange holds the lowest nonce: its new SA is redundant (the client
    deletes it); ours survives and we delete the old one."""
    h, i = make()
    old, b_spi = _collide(h, i, ours_lowest=False)
    assert h.engine.counters["rekey_collision_won"] == 1
    children = h.engine.sas[i.spi_r].children
    ours_spi = _int(i.requests[0][1][1].proposals[0].spi)
    (a,) = [c for c in children if c.spi_in == ours_spi]
    # we sent Delete for the old pair (not for B), and our outbound SA is A's
    deletes = [_int(s) for ex, ps in i.requests if ex == C.INFORMATIONAL
               for p in ps if isinstance(p, wire.Delete) for s in p.spis]
    assert deletes == [old.spi_in]
    assert old not in children
    (out,) = [s for s in h.store.records(sadb.SA_KIND.name) if s.direction == "out"]
    assert out.spi == a.spi_out
    # the client then deletes its redundant B
    pump(h, i, i._send(C.INFORMATIONAL, [wire.Delete(C.PROTO_ESP, (i.my_rekey[0],))], i.mid, response=False))
    assert [c.spi_in for c in h.engine.sas[i.spi_r].children] == [a.spi_in]


def test_collision_our_new_sa_is_redundant_and_we_delete_it():
    h, i = make()
    old, b_spi = _collide(h, i, ours_lowest=True)
    assert h.engine.counters["rekey_collision_lost"] == 1
    # we deleted ours (its SPI, never written to the store), not the old one (the client's job)
    ours_spi = _int(i.requests[0][1][1].proposals[0].spi)
    deletes = [_int(s) for ex, ps in i.requests if ex == C.INFORMATIONAL
               for p in ps if isinstance(p, wire.Delete) for s in p.spis]
    assert deletes == [ours_spi]
    assert h.store.holds("spi", ours_spi) is None
    children = h.engine.sas[i.spi_r].children
    assert old in children and ours_spi not in {c.spi_in for c in children}
    # the client's new pair B carries our traffic once the client deleted the old pair
    # (before, the client may not have our answer to its rekey, so B's inbound side)
    assert sas(h)["out"] == {old.spi_out}
    _client_deletes(h, i, old)
    assert sas(h) == {"in": {_int(b_spi)}, "out": {_int(i.my_rekey[0])}}


def _client_deletes(h: Harness, i: P.Initiator, child) -> None:
    mid, i.mid = i.mid, i.mid + 1
    pump(h, i, i._send(C.INFORMATIONAL, [wire.Delete(C.PROTO_ESP, (child.spi_out.to_bytes(4, "big"),))], mid,
                       response=False))


def test_answering_the_clients_rekey_we_send_on_the_old_sa_until_the_client_deletes_it():
    """§2.8: the client installs the new pair when our answer reaches it, and the answer
    may be lost (the client then resends its request).  Until the client's Delete of the
    old pair shows it has the answer, our traffic stays on the old outbound SA; the new
    inbound SA is there at once (strongSwan does the same as responder)."""
    h, i = make(rekey=False)
    (old,) = h.engine.sas[i.spi_r].children
    h.clock.advance(5.0)
    pump(h, i, i.rekey_child())
    (_, new) = h.engine.sas[i.spi_r].children
    assert new.spi_out == _int(i.my_rekey[0])
    assert sas(h) == {"in": {old.spi_in, new.spi_in}, "out": {old.spi_out}}
    _client_deletes(h, i, old)
    assert h.engine.sas[i.spi_r].children == [new]
    assert sas(h) == {"in": {new.spi_in}, "out": {new.spi_out}}


def test_without_the_clients_delete_the_new_outbound_sa_follows_the_old_pairs_expiry():
    h, i = make(rekey=False)
    (old,) = h.engine.sas[i.spi_r].children
    h.clock.advance(5.0)
    pump(h, i, i.rekey_child())
    (_, new) = h.engine.sas[i.spi_r].children
    advance(h, i, LIFE + grace(LIFE) - 5.0 - 0.5, answer=False)
    assert sas(h)["out"] == {old.spi_out}
    sent = advance(h, i, 1.0, answer=False)  # the old pair's hard lifetime: our Delete for it
    assert len(sent) == 1
    assert sas(h) == {"in": {new.spi_in}, "out": {new.spi_out}}
    assert h.engine.sas[i.spi_r].children == [new]


def test_a_client_rekey_of_a_child_we_are_deleting_gets_temporary_failure():
    h, i = make()
    (old,) = h.engine.sas[i.spi_r].children
    advance(h, i, LIFE, answer=False)
    (req,) = [d for d, _a, _p in h.sent[-1:]]
    out = _to_peer(h, i, req)  # the client answers our rekey ...
    data = out[0].data[4:]
    n = len(h.sent)
    h.engine.received(data, (CLIENT_IP, out[0].port), out[0].port)  # ... we install, send Delete (unanswered)
    assert old.deleting and len(h.sent) == n + 1
    pump(h, i, i.rekey_child())  # and the client rekeys the old one meanwhile
    assert C.TEMPORARY_FAILURE in {p.type for p in i.answers[-1][1] if isinstance(p, wire.Notify)}


def test_rekey_false_leaves_it_to_the_client():
    h, i = make(rekey=False)
    advance(h, i, LIFE)
    advance(h, i, grace(LIFE) - 1)
    assert h.engine.counters["rekey_sent"] == 0 and i.requests == []


def test_rekey_jitter_is_checked_naming_the_key():
    with pytest.raises(ConfigError) as e:
        build(IkeConfig, {"address": SERVER, "peers": [{"name": "x", "versions": [2], "psk": "k",
                                                         "rekey_jitter": 0.9}]}, "ike")
    assert e.value.key == "ike.peers[0].rekey_jitter"


def test_a_rekey_outstanding_when_the_client_rekeys_the_ike_sa_is_asked_again_on_the_new_one():
    """The children move to the new IKE SA (§2.18); our rekey request died with the old SA:
    its SPI goes back and the new SA asks again a second later."""
    import attrs

    h, i = make()
    old_sa = h.engine.sas[i.spi_r]
    (child,) = old_sa.children
    advance(h, i, LIFE, answer=False)
    pending = child.rekeying
    assert pending is not None and h.store.holds("spi", pending.spi_in)
    new_sa = attrs.evolve(old_sa, spi_r=b"\x01" * 8, children=[], my_mid=0, outstanding=None, queue=[])
    h.engine.sas[new_sa.spi_r] = new_sa
    h.engine.delete_ike(old_sa, notify_peer=False, reason="rekeyed", children_to=new_sa)
    assert child.rekeying is None and h.store.holds("spi", pending.spi_in) is None
    assert child.rekey_timer is not None and child.rekey_timer.getTime() == h.clock.seconds() + 1.0
    h.clock.advance(1.0)
    assert new_sa.outstanding is not None and new_sa.outstanding.kind == "child rekey"
    assert h.engine.counters["rekey_sent"] == 2
