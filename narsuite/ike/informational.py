"""Informational exchanges (RFC 2409 §5.7): Delete, notifications, INITIAL-CONTACT, and
dead peer detection (RFC 3706)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from narsuite.ike import constants as C
from narsuite.ike import crypto, isakmp
from narsuite.ike.common import Drop
from narsuite.ike.isakmp import Delete, Notification
from narsuite.ike.sa import IkeSA
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.ike.engine import IkeEngine

__all__ = ["Informational", "same_principal"]

log = logger()


def same_principal(a: IkeSA, b: IkeSA) -> bool:
    """May ``b`` speak for ``a``'s SAs (Delete, INITIAL-CONTACT)?  Same policy, identity
    and XAUTH user -- and, without XAUTH, the same address: a group PSK and a shared
    identity must not let one road warrior delete another's tunnel."""
    if a.policy is not b.policy or a.peer_id_text != b.peer_id_text or a.xauth_user != b.xauth_user:
        return False
    return bool(a.xauth_user) or a.remote[0] == b.remote[0]


class Informational:
    """Informational exchanges and DPD for one engine (the engine is this part's transport)."""

    def __init__(self, engine: IkeEngine) -> None:
        self.engine = engine

    def phase1_notification(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int],
                            local_port: int, digest: bytes) -> None:
        """An unprotected notification during phase 1: the peer gives up (and says why)."""
        msg = isakmp.parse_message(data)
        for n in isakmp.find_all(msg.payloads, Notification):
            self.engine.count("notify_rx")
            log.warn("ike: {peer} says {what} during phase 1", peer=f"{addr[0]}:{addr[1]}",
                     what=C.NOTIFY_NAMES.get(n.notify_type, n.notify_type))
        self.engine.delete_ike(sa, notify_peer=False, reason="peer gave up during phase 1")

    def received(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
                 digest: bytes) -> None:
        e = self.engine
        assert sa.keys is not None and sa.choice is not None and sa.crypto is not None
        h, a, mid = sa.choice.hash, sa.keys.skeyid_a, header.message_id
        _ct, payloads = e.open_protected(sa, header, data, lambda rest: crypto.informational_hash(h, a, mid, rest))
        sa.crypto.ivs.forget(mid)
        e.remember(sa, digest)
        sa.last_rx = e.now()
        e.follow(sa, addr, local_port)
        for p in payloads:
            if isinstance(p, Notification):
                e.count("notify_rx")
                self._notification(sa, p)
            elif isinstance(p, Delete):
                e.count("delete_rx")
                self._delete_payload(sa, p)
                if sa.state == "deleted":
                    return

    def _notification(self, sa: IkeSA, n: Notification) -> None:
        e = self.engine
        if n.notify_type == C.R_U_THERE:
            if n.spi != sa.key or len(n.data) != 4:
                raise Drop("malformed", "R-U-THERE with a wrong SPI or sequence number")
            seq = int.from_bytes(n.data, "big")
            sa.dpd_peer_seq = seq
            e.count("dpd_answered")
            e.send_informational(sa, [Notification(C.R_U_THERE_ACK, C.PROTO_ISAKMP, sa.key, n.data)])
        elif n.notify_type == C.R_U_THERE_ACK:
            if n.spi == sa.key and len(n.data) == 4 and int.from_bytes(n.data, "big") == sa.dpd_seq:
                sa.dpd_sent = 0.0
        elif n.notify_type == C.INITIAL_CONTACT:
            sa.initial_contact = True
            self.initial_contact(sa)
        else:
            log.info("ike: {name}: peer notifies {what}", name=sa.name,
                     what=C.NOTIFY_NAMES.get(n.notify_type, n.notify_type))

    def _delete_payload(self, sa: IkeSA, d: Delete) -> None:
        e = self.engine
        if d.protocol == C.PROTO_ISAKMP:
            for spi in d.spis:
                other = e.sas.get(bytes(spi))
                if other is not None and same_principal(other, sa):
                    log.info("ike: {name}: peer deleted the ISAKMP SA", name=other.name)
                    e.delete_ike(other, notify_peer=False, reason="deleted by the peer", keep_children=True)
        elif d.protocol == C.PROTO_IPSEC_ESP:
            # the child may belong to an older ISAKMP SA of the same peer (after a phase 1
            # rekey the old children are deleted through the new SA)
            for spi in d.spis:
                value = int.from_bytes(spi, "big")
                owner_child = e.children.by_out.get(value)
                if owner_child is None:
                    continue
                owner, child = owner_child
                if owner is sa or same_principal(owner, sa):
                    log.info("ike: {name}: peer deleted ESP SA {spi:#010x}", name=sa.name, spi=value)
                    e.children.remove(owner, child, notify_peer=False)

    def initial_contact(self, sa: IkeSA) -> None:
        """The peer rebooted: its older IKE SAs (same policy, identity and XAUTH user) and
        their children are stale."""
        e = self.engine
        e.count("initial_contact")
        for other in list(e.sas.values()):
            if other is sa or other.state != "established" or other.policy is not sa.policy:
                continue
            if same_principal(other, sa):
                log.info("ike: {name}: INITIAL-CONTACT from {id} replaces {old}", name=sa.name, id=sa.peer_id_text,
                         old=other.name)
                e.delete_ike(other, notify_peer=False, reason="replaced (INITIAL-CONTACT)")

    def dpd_tick(self) -> None:
        """Probe idle peers (RFC 3706 §5.3), clear the dead ones."""
        e = self.engine
        cfg = e.cfg
        if not cfg.dpd_delay:
            return
        now = e.now()
        for sa in list(e.sas.values()):
            if sa.state != "established" or not sa.peer_dpd:
                continue
            idle = now - sa.last_rx
            if sa.dpd_sent and now - sa.last_rx >= cfg.dpd_timeout:
                e.count("dpd_dead")
                log.warn("ike: {name}: {peer} is dead (no answer for {t:.0f} s): clearing its SAs", name=sa.name,
                         peer=f"{sa.remote[0]}:{sa.remote[1]}", t=idle)
                e.delete_ike(sa, notify_peer=False, reason="dead peer")
                continue
            if idle >= cfg.dpd_delay and (not sa.dpd_sent or now - sa.dpd_sent >= cfg.dpd_delay):
                if not sa.dpd_seq:
                    sa.dpd_seq = secrets.randbelow(0x7FFFFFFF) + 1
                else:
                    sa.dpd_seq = sa.dpd_seq % 0xFFFFFFFF + 1
                sa.dpd_sent = now
                e.count("dpd_sent")
                e.send_informational(sa, [Notification(C.R_U_THERE, C.PROTO_ISAKMP, sa.key,
                                                       sa.dpd_seq.to_bytes(4, "big"))])
