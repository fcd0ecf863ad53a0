"""An established ISAKMP SA as a record (``ike.isakmp``), and back: how a standby carries on
a dead node's IKEv1 SAs (docs/cluster.md, level 2).

The engine writes :func:`state_of` an SA whenever it publishes it (established, XAUTH and
mode-config done, a child installed or removed, the peer moved).  With ``[cluster]
key_file`` the Sealer keeps that record in the shared store sealed under the cluster key,
as it does the ESP SAs; ``narctl cluster adopt`` on the standby opens the twins and puts
them into its view under ``cluster:adopted:<node>``, and the engine, which sees that put
through its store subscription (roles meet only in the store), calls :func:`resume`:
an established SA under the same cookies and keys, with the last phase-1 CBC block as its
IV state (RFC 2409 Appendix B: every new exchange's IV is derived from that block and its
message ID), its children, its XAUTH user and mode-config address.  The peer sees nothing:
its DPD is answered, its Deletes and Quick Mode rekeys are accepted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from narsuite.ike import constants as C
from narsuite.ike import crypto
from narsuite.ike.common import grace
from narsuite.ike.isakmp import Identification, Transform
from narsuite.ike.natt import VARIANTS
from narsuite.ike.proposals import Phase1Choice
from narsuite.ike.records import IsakmpState
from narsuite.ike.sa import Child, IkeSA
from narsuite.logs import logger
from narsuite.sadb import SA_KIND

if TYPE_CHECKING:
    from narsuite.ike.engine import IkeEngine

__all__ = ["state_of", "resume", "MAX_MIDS"]

log = logger()

#: message IDs carried over (a replayed Quick Mode of an older ID is refused on the standby)
MAX_MIDS = 256


def state_of(sa: IkeSA) -> IsakmpState | None:
    """What a standby needs of ``sa``; None while there is nothing to carry on (phase 1 or
    XAUTH/mode-config still running: the peer starts again against the standby)."""
    if sa.state != "established" or not sa.ready_for_quick_mode or sa.keys is None or sa.crypto is None \
            or sa.choice is None or sa.policy is None:
        return None
    ch, keys = sa.choice, sa.keys
    pid = sa.peer_id
    return IsakmpState(
        cookies=sa.key.hex(), name=sa.name, exchange=sa.exchange, remote_ip=sa.remote[0], remote_port=sa.remote[1],
        local_ip=sa.local_ip, local_port=sa.local_port, policy=sa.policy.name,
        cipher=ch.cipher, key_len=ch.key_len, hash=ch.hash, group=ch.group, auth=ch.auth, lifetime=ch.lifetime,
        variant=sa.variant.name if sa.variant else "", nat_peer=sa.nat_peer, nat_local=sa.nat_local,
        peer_dpd=sa.peer_dpd, peer_unity=sa.peer_unity,
        peer_id_type=pid.id_type if pid else 0, peer_id_data=pid.data if pid else b"",
        peer_id_text=sa.peer_id_text, peer_cert_subject=sa.peer_cert_subject,
        xauth_user=sa.xauth_user, xauth_done=sa.xauth_done, address=sa.address,
        established=sa.established, expires=sa.expires, dpd_seq=sa.dpd_seq,
        used_mids=tuple(sorted(sa.used_mids)[-MAX_MIDS:]),
        children=tuple((c.peer, c.spi_in, c.spi_out, c.expires, c.description) for c in sa.children),
        skeyid_d=keys.skeyid_d, skeyid_a=keys.skeyid_a, skeyid_e=keys.skeyid_e,
        phase1_iv=sa.crypto.ivs.phase1_iv)


def resume(engine: IkeEngine, rec: IsakmpState) -> IkeSA | None:
    """The established SA ``rec`` describes, in ``engine``'s table, with its children; None
    (counted ``resume_failed``, logged) when this node cannot carry it on."""
    e = engine
    icky, rcky = bytes.fromhex(rec.cookies[:16]), bytes.fromhex(rec.cookies[16:])
    policy = next((p for p in e.cfg.peers if p.name == rec.policy), None)
    now = e.now()
    why = ""
    if policy is None:
        why = f"no [[ike.peers]] entry named {rec.policy!r} on this node"
    elif rec.expires + grace(rec.lifetime) <= now:
        why = "its lifetime is over"
    elif rec.variant and rec.variant not in VARIANTS:
        why = f"unknown NAT-T variant {rec.variant!r}"
    if why:
        e.count("resume_failed")
        log.warn("ike: cannot carry on ISAKMP SA {name} of {peer}: {why}", name=rec.name,
                 peer=f"{rec.remote_ip}:{rec.remote_port}", why=why)
        return None
    assert policy is not None
    choice = Phase1Choice(rec.cipher, rec.key_len, rec.hash, rec.group, rec.auth, rec.lifetime,
                          Transform(1, C.KEY_IKE))
    keys = crypto.Phase1Keys(rec.hash, b"", rec.skeyid_d, rec.skeyid_a, rec.skeyid_e)
    cr = crypto.ISAKMPCrypto.resume(rec.cipher, keys.encryption_key(rec.key_len), rec.hash, rec.phase1_iv)
    sa = IkeSA(icky=icky, rcky=rcky, exchange=rec.exchange, remote=(rec.remote_ip, rec.remote_port),
               local_port=rec.local_port, local_ip=rec.local_ip, created=now, state="established",
               policy=policy, choice=choice, keys=keys, crypto=cr,
               variant=VARIANTS[rec.variant] if rec.variant else None, nat_peer=rec.nat_peer,
               nat_local=rec.nat_local, peer_dpd=rec.peer_dpd, peer_unity=rec.peer_unity,
               peer_id=Identification(rec.peer_id_type, rec.peer_id_data) if rec.peer_id_type else None,
               peer_id_text=rec.peer_id_text, peer_cert_subject=rec.peer_cert_subject,
               established=rec.established, expires=rec.expires,
               # the peer was alive when its node died: DPD starts counting from now
               last_rx=now, xauth_user=rec.xauth_user, xauth_done=rec.xauth_done, address=rec.address,
               dpd_seq=rec.dpd_seq, used_mids=set(rec.used_mids))
    sa.timer = e.clock.callLater(max(0.0, rec.expires - now) + grace(rec.lifetime), e.phase1._expired, sa)
    e.sas[sa.key] = sa
    store = e.store
    for peer, spi_in, spi_out, expires, description in rec.children:
        if store.get(SA_KIND.name, ("in", spi_in, peer)) is None:
            continue  # deleted or expired since it was sealed (or its twin did not open)
        child = Child(peer, spi_in, spi_out, expires, description)
        left = max(0.0, expires - now)
        child.timer = e.clock.callLater(left + grace(left), e.children._expired, sa, child)
        sa.children.append(child)
        e.children.by_out[spi_out] = (sa, child)
        e.children.by_peer[peer] = sa
    e.count("ike_resumed")
    log.info("ike: {name} carried on from sealed state: {peer} ({id}) policy {policy}, user {user}, address "
             "{address}, {n} ESP SA pair(s); no new Main Mode", name=sa.name,
             peer=f"{rec.remote_ip}:{rec.remote_port}", id=rec.peer_id_text, policy=policy.name,
             user=rec.xauth_user or "-", address=rec.address or "-", n=len(sa.children))
    e.publish(sa)
    return sa
