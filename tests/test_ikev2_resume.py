"""A cluster standby carries on a dead node's IKEv2 SA from its sealed state (narsuite.ike.v2.resume,
docs/cluster.md level 2), driven in-process: node g1 negotiates with the small initiator of
tests/test_ikev2_engine.py and seals; g2 adopts the twins (what ``narctl cluster adopt`` does)
and, under the same SPIs and keys, resynchronises the message IDs with the peer (RFC 6311) or
accepts its next request a little ahead, answers its requests, sends its own, and rekeys and
deletes CHILD SAs.  The lab test (tests/test_cluster_lab.py) does it against strongSwan."""

from __future__ import annotations

import os
import secrets
import struct
from typing import Any

from test_ikev2_engine import PSK, Harness, Initiator

from narsuite import sadb
from narsuite.ike.records import IKEV2_STATE
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire
from narsuite.ike.v2.resume import MID_MARGIN, MID_WINDOW, STATE_INTERVAL
from narsuite.store.sealed import SEALED, ClusterKey, Sealer

KINDS = ["esp.sa", "esp.peer", "ike.isakmp", "ike.v2sa"]


def establish(h: Harness, mid_sync: bool) -> Initiator:
    """IKE_SA_INIT + IKE_AUTH (PSK, CP, one CHILD SA), announcing RFC 6311 or not."""
    i = Initiator(h)
    (resp,) = h.deliver(i.init_request())
    i.take_init_response(resp)
    idi = wire.IDi(C.ID_FQDN, b"client.example")
    body = bytes([idi.id_type, 0, 0, 0]) + idi.data
    octets = keys.signed_octets(i.req1, i.nr, "sha256", i.k.sk_pi, body)
    i.spi_child = secrets.token_bytes(4)
    ps: list[Any] = [idi, wire.Auth(C.AUTH_SHARED_KEY, keys.psk_auth("sha256", PSK.encode(), octets))]
    if mid_sync:
        ps.append(wire.Notify(C.IKEV2_MESSAGE_ID_SYNC_SUPPORTED))
    ps += [wire.CP(C.CFG_REQUEST, (wire.CfgAttribute(C.INTERNAL_IP4_ADDRESS),)),
           wire.SA((wire.Proposal(1, C.PROTO_ESP, i.spi_child, (
               wire.Transform(C.TRANS_ENCR, C.ENCR_AES_GCM_16, 128), wire.Transform(C.TRANS_ESN, 0))),)),
           wire.TSi((wire.ts_range("0.0.0.0/0"),)), wire.TSr((wire.ts_range("0.0.0.0/0"),))]
    (resp,) = h.deliver(i.protected(C.IKE_AUTH, ps, mid=1))
    hdr, answer = i.open(resp)
    assert hdr.message_id == 1 and wire.find(answer, wire.Auth) is not None
    assert (C.IKEV2_MESSAGE_ID_SYNC_SUPPORTED in wire.notifies(answer)) == mid_sync  # announced back only if asked
    i.auth_response = answer
    i.mid = 2
    return i


def liveness(h: Harness, i: Initiator, mid: int) -> list[bytes]:
    return h.deliver(i.protected(C.INFORMATIONAL, [], mid=mid))


def g1_then_g2(mid_sync: bool) -> tuple[Harness, Harness, Initiator, Any, Any]:
    """g1 negotiates and seals, exchanges go on past the last state write, g1 dies; g2 adopts."""
    key = ClusterKey(os.urandom(32))
    h1 = Harness()
    s1 = Sealer(h1.store, key, "g1", KINDS)
    i = establish(h1, mid_sync)
    (sa1,) = h1.engine.sas.values()
    h1.clock.advance(STATE_INTERVAL)
    for mid in (2, 3):  # the client's liveness checks, answered
        (resp,) = liveness(h1, i, mid)
        assert i.open(resp)[0].message_id == mid
    h1.clock.advance(STATE_INTERVAL)
    # one of ours (g1 liveness), answered: our next ID is 1
    h1.engine.send_request(sa1, C.INFORMATIONAL, [], "liveness")
    hdr, _ = i.open(h1.sent[-1][0])
    assert hdr.message_id == 0 and not hdr.response
    h1.deliver(i.protected(C.INFORMATIONAL, [], mid=0, response=True))
    assert sa1.outstanding is None and sa1.my_mid == 1
    h1.clock.advance(STATE_INTERVAL)
    (state,) = h1.store.records(IKEV2_STATE.name)
    assert (state.peer_mid, state.my_mid) == (4, 1)
    # bounded rate: three more requests at once, one write at most (the next is due later)
    written = s1.stats["sealed"]
    for mid in (4, 5, 6):
        liveness(h1, i, mid)
    assert s1.stats["sealed"] - written <= 1
    (state,) = h1.store.records(IKEV2_STATE.name)
    sealed_peer_mid = state.peer_mid
    assert sealed_peer_mid < 7  # ... so the state lags: g1 dies before its next write
    twins = list(h1.store.records(SEALED.name))
    assert {t.kind for t in twins} == {"esp.sa", "esp.peer", "ike.v2sa"} and s1.stats["failed"] == 0
    assert not h1.store.kind(IKEV2_STATE.name).persist
    for t in twins:  # the keys only sealed
        for k in (state.sk_d, state.sk_ei, state.sk_er, state.sk_ai, state.sk_ar, state.sk_pi):
            assert k not in t.blob
    # g2 shares the store (here: the twins copied into its view, as Redis would bring them)
    h2 = Harness()
    s2 = Sealer(h2.store, key, "g2", KINDS)
    for t in twins:
        h2.store.put(t, owner="cluster:sealed:g1", ttl=3600)
    i.h = h2
    done = s2.adopt("g1", seq_margin=1 << 24)
    assert done == {"esp.peer": 1, "esp.sa": 2, "ike.v2sa": 1}, done
    return h1, h2, i, sa1, sealed_peer_mid


def test_the_standby_resyncs_message_ids_by_rfc6311_and_carries_the_sa_on():
    h1, h2, i, sa1, sealed_peer_mid = g1_then_g2(mid_sync=True)
    e = h2.engine
    (sa2,) = e.sas.values()
    assert e.counters["ike_resumed"] == 1 and e.counters["ike_established"] == 0
    assert (sa2.spi_i, sa2.spi_r, sa2.address, sa2.peer_id_text) == (sa1.spi_i, sa1.spi_r, sa1.address,
                                                                     sa1.peer_id_text)
    assert sa2.keys == sa1.keys and sa2.choice == sa1.choice
    assert [(c.spi_in, c.spi_out, c.choice) for c in sa2.children] == [(c.spi_in, c.spi_out, c.choice)
                                                                       for c in sa1.children]
    # its ESP SAs: outbound sequence numbers continue seq_margin past the sealed ones (the esp role
    # starts its inbound replay window empty), the inbound SPI leased to g2's adoption
    (out1,) = [x for x in h1.store.records(sadb.SA_KIND.name) if x.direction == "out"]
    (out2,) = [x for x in h2.store.records(sadb.SA_KIND.name) if x.direction == "out"]
    assert (out2.spi, out2.enc_key, out2.seq_start) == (out1.spi, out1.enc_key, out1.seq_start + (1 << 24))
    assert sa2.children[0].rekey_timer is not None or not sa2.policy.rekey  # our own rekey stays due
    # its first act: INFORMATIONAL, message ID 0, IKEV2_MESSAGE_ID_SYNC(nonce, M1, P1)
    hdr, ps = i.open(h2.sent[-1][0])
    assert (hdr.exchange, hdr.message_id, hdr.response) == (C.INFORMATIONAL, 0, False)
    (n,) = ps
    assert n.type == C.IKEV2_MESSAGE_ID_SYNC and len(n.data) == 12
    m1, p1 = struct.unpack("!II", n.data[4:])
    assert (m1, p1) == (1 + MID_MARGIN, sealed_peer_mid)
    # the client's retransmission to the dead node meanwhile: dropped, not answered
    assert liveness(h2, i, 7) == [] and e.counters["resyncing"] == 1
    # the client answers as RFC 6311 §4.2 says (strongSwan's ike_mid_sync): M2 its next request
    # (the larger of P1 and its own), P2 the larger of M1 and what it expects from us
    h2.deliver(i.protected(C.INFORMATIONAL, [wire.Notify(C.IKEV2_MESSAGE_ID_SYNC, n.data[:4] + struct.pack(
        "!II", 7, max(m1, 1)))], mid=0, response=True))
    assert e.counters["mid_synced"] == 1 and (sa2.peer_mid, sa2.my_mid, sa2.resync) == (7, m1, "")
    # its requests under the agreed IDs are answered (and only those)
    (resp,) = liveness(h2, i, 7)
    assert i.open(resp)[0].message_id == 7
    assert liveness(h2, i, 9) == [] and e.counters["bad_message_id"] == 1
    # a CHILD SA rekey under the carried-on SA, then the client deletes the old pair
    i.mid = 8
    (resp,) = h2.deliver(i.child_request(f"{sa2.address}/32", rekey_spi=i.spi_child))
    hdr, ps = i.open(resp)
    assert hdr.message_id == 8 and wire.find(ps, wire.SA) is not None, ps
    assert e.counters["child_installed"] == 1 and len(sa2.children) == 2
    old = sa2.children[0]
    (resp,) = h2.deliver(i.protected(C.INFORMATIONAL, [wire.Delete(C.PROTO_ESP, (i.spi_child,))], mid=9))
    assert e.counters["child_deleted"] == 1 and old not in sa2.children
    assert h2.store.get(sadb.SA_KIND.name, ("in", old.spi_in, old.peer)) is None
    # our own request (liveness) goes out under the ID the client expects, P2
    h2.clock.advance(h2.cfg.dpd_delay + 1)
    e.dpd_tick()
    hdr, _ = i.open(h2.sent[-1][0])
    assert (hdr.message_id, hdr.response) == (m1, False)
    h2.deliver(i.protected(C.INFORMATIONAL, [], mid=m1, response=True))
    assert e.counters["liveness_answered"] == 1 and sa2.my_mid == m1 + 1
    # resealed as g2's: a second failover carries it on again, from the IDs it has now
    h2.clock.advance(STATE_INTERVAL)
    (state,) = h2.store.records(IKEV2_STATE.name)
    assert (state.peer_mid, state.my_mid, len(state.children)) == (10, m1 + 1, 1)
    assert {t.node for t in h2.store.records(SEALED.name) if t.kind == "ike.v2sa"} == {"g2"}
    # the client deletes the IKE SA: its state and sealed twin go with it
    h2.deliver(i.protected(C.INFORMATIONAL, [wire.Delete(C.PROTO_IKE)], mid=10))
    assert not e.sas and not list(h2.store.records(IKEV2_STATE.name))
    assert not [t for t in h2.store.records(SEALED.name) if t.kind == "ike.v2sa"]
    assert e.counters["decrypt_failed"] == e.counters["resume_failed"] == e.counters["mid_sync_failed"] == 0


def test_without_rfc6311_the_peers_next_request_is_accepted_a_little_ahead_once():
    h1, h2, i, sa1, sealed_peer_mid = g1_then_g2(mid_sync=False)
    e = h2.engine
    (sa2,) = e.sas.values()
    assert not [d for d, _a, _p in h2.sent]  # no sync request: the peer did not announce RFC 6311
    assert sa2.resync == "window" and sa2.my_mid == 1
    # beyond the window: dropped; a forged message inside it: dropped, the window stays open
    assert liveness(h2, i, sealed_peer_mid + MID_WINDOW) == [] and e.counters["bad_message_id"] == 1
    forged = bytearray(i.protected(C.INFORMATIONAL, [], mid=7))
    forged[-1] ^= 1
    assert h2.deliver(bytes(forged)) == [] and e.counters["decrypt_failed"] == 1 and sa2.resync == "window"
    # the client's real next request (7, ahead of the sealed ID) is answered; then only 8 is next
    (resp,) = liveness(h2, i, 7)
    assert i.open(resp)[0].message_id == 7 and sa2.resync == "" and sa2.peer_mid == 8
    assert liveness(h2, i, 9) == [] and e.counters["bad_message_id"] == 2
    (resp,) = liveness(h2, i, 8)
    assert i.open(resp)[0].message_id == 8


def test_a_state_that_cannot_be_carried_on_is_counted_and_left():
    """A sealed SA of a policy this node does not have: counted, logged, nothing installed."""
    h1, h2, i, sa1, _ = g1_then_g2(mid_sync=True)
    h3 = Harness(peer={"name": "other"})
    (state,) = h2.store.records(IKEV2_STATE.name)
    h3.store.put(state, owner="cluster:adopted:g1", ttl=60)
    assert h3.engine.counters["resume_failed"] == 1 and not h3.engine.sas


def test_a_sync_answer_without_the_notify_falls_back_to_the_window():
    """The client answers our message ID sync with an empty INFORMATIONAL (or a wrong nonce): its
    IDs did not move, so ours stay at the sealed one and its next request is accepted a little ahead."""
    h1, h2, i, sa1, sealed_peer_mid = g1_then_g2(mid_sync=True)
    e = h2.engine
    (sa2,) = e.sas.values()
    hdr, (n,) = i.open(h2.sent[-1][0])
    wrong = bytes(b ^ 0xFF for b in n.data[:4]) + n.data[4:]
    h2.deliver(i.protected(C.INFORMATIONAL, [wire.Notify(C.IKEV2_MESSAGE_ID_SYNC, wrong)], mid=0, response=True))
    assert e.counters["mid_sync_failed"] == 1 and e.counters["mid_synced"] == 0
    assert (sa2.resync, sa2.my_mid, sa2.peer_mid) == ("window", 1, sealed_peer_mid)
    (resp,) = liveness(h2, i, 7)
    assert i.open(resp)[0].message_id == 7 and sa2.peer_mid == 8 and sa2.resync == ""


def test_the_standby_rekeys_a_carried_on_child_at_its_soft_lifetime():
    """Our own CHILD SA rekey (policy ``rekey``) is due at the time the dead node set: the
    standby sends it then, under the carried-on SA, to the independent peer of
    tests/ikev2_peer.py (which did not announce RFC 6311: our IDs continue at the sealed one),
    and deletes the old pair when it is answered."""
    import ikev2_peer as P
    from test_ikev2_rekey import LIFE, advance, pump

    peer = {"pool": "", "remote_ts": ["10.50.0.0/16"], "esp_lifetime": LIFE, "rekey_jitter": 0.0,
            "esp": ["aes128-sha256"]}
    key = ClusterKey(os.urandom(32))
    h1 = Harness(peer=peer, retransmit=[2.0, 4.0, 8.0])
    Sealer(h1.store, key, "g1", KINDS)
    i = P.Initiator(PSK.encode(), "client.example", 19, "10.50.1.0/24", "10.1.0.0/24")
    pump(h1, i, i.start())
    assert i.done
    (old,) = h1.engine.sas[i.spi_r].children
    advance(h1, i, 10)
    h2 = Harness(peer=peer, retransmit=[2.0, 4.0, 8.0])
    s2 = Sealer(h2.store, key, "g2", KINDS)
    for t in h1.store.records(SEALED.name):
        h2.store.put(t, owner="cluster:sealed:g1", ttl=3600)
    h2.clock.advance(10)  # the same time on both nodes
    assert s2.adopt("g1")["ike.v2sa"] == 1
    (sa2,) = h2.engine.sas.values()
    assert sa2.resync == "window" and sa2.children[0].rekey_at == old.rekey_at
    assert advance(h2, i, LIFE - 10 - 1) == []  # nothing before the soft lifetime g1 set
    advance(h2, i, 1)
    assert [e for e, _ in i.requests] == [C.CREATE_CHILD_SA, C.INFORMATIONAL]
    assert int.from_bytes(wire.notifies(i.requests[0][1])[C.REKEY_SA].spi, "big") == old.spi_in
    (new,) = sa2.children
    assert new.spi_in != old.spi_in and new.peer == old.peer
    c = h2.engine.counters
    assert (c["rekey_sent"], c["child_rekeyed"], c["child_deleted"], c["rekey_failed"]) == (1, 1, 1, 0)
    assert {s.spi for s in h2.store.records(sadb.SA_KIND.name) if s.direction == "in"} == {new.spi_in}
