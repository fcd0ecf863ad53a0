"""An established IKEv2 SA as a record (``ike.v2sa``), and back: how a standby carries on a
dead node's IKEv2 SAs (docs/cluster.md, level 2).

The engine writes :func:`state_of` an SA when it publishes it (established, a CHILD SA
installed, rekeyed or deleted, the peer moved, an IKE SA rekey) and, at most every
:data:`STATE_INTERVAL` seconds, when only its message IDs moved.  With ``[cluster]
key_file`` the Sealer keeps that record in the shared store sealed under the cluster key;
``narctl cluster adopt`` on the standby opens the twins and puts them into its view under
``cluster:adopted:<node>``, and the engine, which sees that put through its store
subscription (roles meet only in the store), calls :func:`resume`: an established SA under
the same SPIs and keys (SK_d, SK_a*, SK_e*, SK_p*), transforms, peer, NAT state, EAP user,
virtual IP and CHILD SAs.

Message IDs (RFC 7296 §2.3, window 1 both ways) are the hard part: the sealed ones may be
behind the dead node's, by the exchanges since the last write.  A peer checks our requests'
IDs exactly (strongSwan ignores any other ID), so a guess is not enough:

* The peer announced IKEV2_MESSAGE_ID_SYNC_SUPPORTED in IKE_AUTH and we answered it (RFC
  6311; strongSwan announces it always): the standby's first act is an INFORMATIONAL with
  message ID 0 holding IKEV2_MESSAGE_ID_SYNC (a 4-byte nonce, M1 = our sealed next ID plus
  :data:`MID_MARGIN`, P1 = the peer's sealed next ID).  The peer takes the larger of each
  pair and its own values (§5.1), answers them (M2: the ID of its next request, P2: of ours)
  and resends a request it had in flight under its new ID (strongSwan requeues it).  Its
  requests are dropped (``resyncing``) until the answer: they were for the dead node.
  This is what strongSwan's HA plugin cannot lean on (it syncs every request's ID between
  the nodes instead, which needs a message per exchange); here the peer tells us.
* Otherwise the peer's next request is accepted once at any ID up to :data:`MID_WINDOW`
  ahead of the sealed one (after it authenticated: a replay of a request the dead node
  already answered is possible only inside that window), and our own requests continue at
  the sealed ID (correct unless the dead node sent a request after the last write).
"""

from __future__ import annotations

import hmac
import secrets
import struct
from typing import TYPE_CHECKING, Any

from narsuite.ike.common import grace
from narsuite.ike.records import IkeV2State
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import wire
from narsuite.ike.v2.keys import IkeKeys, SKCipher
from narsuite.ike.v2.proposals import EspChoice, IkeChoice
from narsuite.ike.v2.sa import ChildV2, IkeSAv2
from narsuite.logs import logger
from narsuite.sadb import SA_KIND

if TYPE_CHECKING:
    from narsuite.ike.v2.engine import IkeV2Engine

__all__ = ["state_of", "resume", "STATE_INTERVAL", "MID_MARGIN", "MID_WINDOW"]

log = logger()

#: a write of the state for message IDs alone waits at least this long after the last one
#: (a client's liveness checks every few seconds cost one write each, a burst of exchanges one)
STATE_INTERVAL = 0.5
#: M1 of our RFC 6311 sync: this far past our sealed next ID (the dead node may have sent
#: requests after the last write; the peer ignores a sync whose M1 is below what it saw)
MID_MARGIN = 1 << 16
#: without RFC 6311: the peer's next request is accepted this far ahead of the sealed ID
MID_WINDOW = 64


def state_of(sa: IkeSAv2) -> IkeV2State | None:
    """What a standby needs of ``sa``; None until it is established (an SA in IKE_AUTH or
    EAP is not carried on: the peer starts again against the standby)."""
    if sa.state != "established" or sa.keys is None or sa.choice is None or sa.policy is None:
        return None
    ch, k = sa.choice, sa.keys
    children = tuple(
        (c.peer, c.spi_in, c.spi_out, c.expires,
         (c.choice.enc, c.choice.key_bits, c.choice.integ or "", c.choice.esn, c.choice.dh, c.choice.number),
         c.tsi, c.tsr, tuple(map(tuple, c.remote)), tuple(map(tuple, c.local)), c.rekey_at, c.rekeyed)
        for c in sa.children)
    return IkeV2State(
        spis=(sa.spi_i + sa.spi_r).hex(), name=sa.name, remote_ip=sa.remote[0], remote_port=sa.remote[1],
        local_ip=sa.local_ip, local_port=sa.local_port, policy=sa.policy.name,
        encr=ch.encr, key_bits=ch.key_bits, integ=ch.integ, prf=ch.prf, dh=ch.dh, we_initiated=sa.we_initiated,
        nat_peer=sa.nat_peer, nat_local=sa.nat_local, frag_ok=sa.frag_ok, mobike=sa.mobike, mid_sync=sa.mid_sync,
        peer_id_text=sa.peer_id_text, peer_id_body=sa.peer_id_body, peer_cert_subject=sa.peer_cert_subject,
        eap_user=sa.eap_user, address=sa.address, established=sa.established, expires=sa.expires,
        peer_mid=sa.peer_mid, my_mid=sa.my_mid, children=children,
        sk_d=k.sk_d, sk_ai=k.sk_ai, sk_ar=k.sk_ar, sk_ei=k.sk_ei, sk_er=k.sk_er, sk_pi=k.sk_pi, sk_pr=k.sk_pr)


def resume(engine: IkeV2Engine, rec: IkeV2State) -> IkeSAv2 | None:
    """The established SA ``rec`` describes, in ``engine``'s table, with its CHILD SAs, and
    its message IDs being resynchronised; None (counted ``resume_failed``, logged) when this
    node cannot carry it on."""
    e = engine
    now = e.now()
    policy = next((p for p in e.policies() if p.name == rec.policy), None)
    why = ""
    try:
        spi_i, spi_r = bytes.fromhex(rec.spis[:16]), bytes.fromhex(rec.spis[16:])
        choice = IkeChoice(rec.encr, rec.key_bits, rec.integ, rec.prf, rec.dh)
        k = IkeKeys(choice.prf_name, rec.sk_d, rec.sk_ai, rec.sk_ar, rec.sk_ei, rec.sk_er, rec.sk_pi, rec.sk_pr)
        ciphers = (SKCipher(choice.encr, k.sk_ei, choice.integ, k.sk_ai),
                   SKCipher(choice.encr, k.sk_er, choice.integ, k.sk_ar))
    except (ValueError, KeyError) as err:
        why = f"its state does not open into an IKE SA ({err})"
    if why:
        pass
    elif policy is None:
        why = f"no IKEv2 [[ike.peers]] entry named {rec.policy!r} on this node"
    elif rec.expires + grace(policy.ike_lifetime) <= now:
        why = "its lifetime is over"
    elif len(spi_i) != 8 or len(spi_r) != 8 or spi_r in e.sas:
        why = "its SPIs are taken on this node"
    if why or policy is None:
        e.count("resume_failed")
        log.warn("ikev2: cannot carry on IKE SA {name} of {peer}: {why}", name=rec.name,
                 peer=f"{rec.remote_ip}:{rec.remote_port}", why=why)
        return None
    sa = IkeSAv2(spi_i, spi_r, (rec.remote_ip, rec.remote_port), rec.local_port, rec.local_ip, now,
                 state="established", candidates=[policy], policy=policy, choice=choice, keys=k,
                 we_initiated=rec.we_initiated, nat_peer=rec.nat_peer, nat_local=rec.nat_local, frag_ok=rec.frag_ok,
                 mobike=rec.mobike, mid_sync=rec.mid_sync, peer_id_text=rec.peer_id_text,
                 peer_id_body=rec.peer_id_body, peer_cert_subject=rec.peer_cert_subject, eap_user=rec.eap_user,
                 address=rec.address, established=rec.established, expires=rec.expires,
                 # the peer was alive when its node died: liveness counts from now
                 last_rx=now, peer_mid=rec.peer_mid, my_mid=rec.my_mid)
    # what the original initiator sends is protected with SK_ei/SK_ai (§2.14)
    sa.tx, sa.rx = ciphers if rec.we_initiated else ciphers[::-1]
    sa.timer = e.clock.callLater(max(0.0, rec.expires - now) + grace(policy.ike_lifetime), e._expired, sa)
    e.sas[spi_r] = sa
    for (peer, spi_in, spi_out, expires, (enc, bits, integ, esn, dh, number), tsi, tsr, remote, local,
         rekey_at, rekeyed) in rec.children:
        if e.store.get(SA_KIND.name, ("in", spi_in, peer)) is None:
            continue  # deleted or expired since it was sealed (or its twin did not open)
        esp = EspChoice(enc, bits, integ or None, esn, dh, spi_out.to_bytes(4, "big"), number)
        child = ChildV2(peer, spi_in, spi_out, expires, esp, tsi, tsr, rekeyed=rekeyed,
                        remote=[(lo, hi) for lo, hi in remote], local=[(lo, hi) for lo, hi in local])
        child.timer = e.clock.callLater(max(0.0, expires - now) + grace(policy.esp_lifetime),
                                        e.children._expired, sa, child)
        sa.children.append(child)
        if not rekeyed:
            e.rekey.schedule(sa, child, at=max(rekey_at, now + 1.0) if rekey_at else None)
    e.count("ike_resumed")
    log.info("ikev2: {name} carried on from sealed state: {peer} ({id}) policy {policy}, user {user}, virtual IP "
             "{address}, {n} CHILD SA(s), message IDs {pm}/{mm} sealed; no new IKE_SA_INIT", name=sa.name,
             peer=f"{rec.remote_ip}:{rec.remote_port}", id=rec.peer_id_text, policy=policy.name,
             user=rec.eap_user or "-", address=rec.address or "-", n=len(sa.children), pm=rec.peer_mid,
             mm=rec.my_mid)
    e.publish(sa)
    if sa.mid_sync:
        sync(e, sa)
    else:
        sa.resync = "window"
    return sa


def sync(engine: IkeV2Engine, sa: IkeSAv2) -> None:
    """RFC 6311 §4: INFORMATIONAL, message ID 0, IKEV2_MESSAGE_ID_SYNC(nonce, M1, P1)."""
    e = engine
    nonce = secrets.token_bytes(4)
    m1 = (sa.my_mid + MID_MARGIN) & 0xFFFFFFFF
    p1 = sa.peer_mid
    sa.resync = "sync"

    def answered(sa2: IkeSAv2, payloads: tuple[Any, ...]) -> None:
        n = wire.notifies(payloads).get(C.IKEV2_MESSAGE_ID_SYNC)
        if n is None or len(n.data) != 12 or not hmac.compare_digest(n.data[:4], nonce):
            # not understood after all (its IDs did not move): carry on as with a peer without
            # RFC 6311 -- our next request at the sealed ID, its next one accepted a little ahead
            e.count("mid_sync_failed")
            log.warn("ikev2: {name}: the peer's answer to our message ID sync has no matching "
                     "IKEV2_MESSAGE_ID_SYNC; accepting its next request a little ahead", name=sa2.name)
            sa2.resync = "window"
            return
        # the peer's answer (RFC 6311 §4.2): M2 the ID of its next request, P2 of ours
        m2, p2 = struct.unpack("!II", n.data[4:])
        sa2.peer_mid, sa2.my_mid, sa2.resync = m2, p2, ""
        e.count("mid_synced")
        log.info("ikev2: {name}: message IDs synchronised with the peer (RFC 6311): its next request {m2}, "
                 "ours {p2}", name=sa2.name, m2=m2, p2=sa2.my_mid)
        e.mids_moved(sa2)

    e.send_request(sa, C.INFORMATIONAL, [wire.Notify(C.IKEV2_MESSAGE_ID_SYNC, nonce + struct.pack("!II", m1, p1))],
                   "message id sync", answered, mid=0)

