"""CHILD SA rekeys we start (RFC 7296 §1.3.3, §2.8): the gateway enforces its own lifetimes.

A CHILD SA's soft lifetime is the policy's ``esp_lifetime`` less a random part of
``rekey_jitter`` (strongSwan's rekey_time and rand_time); its hard lifetime, as before,
``esp_lifetime`` plus :func:`~narsuite.ike.common.grace`.  At the soft lifetime, unless
the client rekeyed first, we send CREATE_CHILD_SA with N(REKEY_SA) for our inbound SPI,
a new SPI, a new nonce and, when the child has a PFS group (or the policy requires one), a
new KE; with our own message ID, resent on ``[ike] retransmit`` (the engine's request
window).  On the answer the new pair is written (the new outbound SA replaces the old at
once) and an INFORMATIONAL Delete for the old one follows; the old inbound SA stays until
the client's answer to it (§2.8).

Collisions (§2.8.1): the client asked to rekey the same CHILD SA while ours was on its way.
Both exchanges complete; of the two new SAs the one whose exchange holds the lowest of the
four nonces is redundant and is deleted by whoever created it, and the one who started the
surviving rekey deletes the old SA.  A client request to rekey a CHILD SA we are already
deleting gets TEMPORARY_FAILURE (§2.25).  An answer of TEMPORARY_FAILURE makes us try again
a few seconds later (before the hard lifetime); other errors leave the SA to expire.
"""

from __future__ import annotations

import random
import secrets
from typing import TYPE_CHECKING, Any

import attrs

from narsuite.ike.crypto import CryptoError
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire
from narsuite.ike.v2.children import _ts
from narsuite.ike.v2.proposals import EspChoice
from narsuite.ike.v2.sa import ChildV2, IkeSAv2
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.ike.v2.engine import IkeV2Engine

__all__ = ["Rekey", "Pending"]

log = logger()

#: after TEMPORARY_FAILURE (the client is busy, §2.25), try again this many seconds later
RETRY = (2.0, 10.0)


@attrs.define(eq=False)
class Pending:
    """Our CREATE_CHILD_SA rekeying a CHILD SA, until its answer."""

    spi_in: int
    ni: bytes = attrs.field(repr=False)
    dh: int  # the group of our KE, 0 without
    #: what we offered, by proposal number
    offered: dict[int, EspChoice] = attrs.field(factory=dict, repr=False)
    private: Any = attrs.field(default=None, repr=False)
    ke_retried: bool = False


class Rekey:
    def __init__(self, engine: IkeV2Engine, rng: random.Random | None = None) -> None:
        self.engine = engine
        self.random = rng or random.Random()

    # ------------------------------------------------------------------ when
    def schedule(self, sa: IkeSAv2, child: ChildV2, at: float | None = None) -> None:
        """Arm the soft lifetime of a new CHILD SA (``at``: keep the time it had, an IKE SA
        rekey moving it)."""
        e = self.engine
        p = sa.policy
        if child.rekey_timer is not None and child.rekey_timer.active():
            child.rekey_timer.cancel()
        child.rekey_timer = None
        if p is None or not p.rekey:
            return
        if at is None or not at:
            at = e.now() + p.esp_lifetime * (1.0 - self.random.uniform(0.0, p.rekey_jitter))
        child.rekey_at = at
        child.rekey_timer = e.clock.callLater(max(0.0, at - e.now()), self.start, sa, child)

    # ------------------------------------------------------------------ the request
    def pfs_group(self, sa: IkeSAv2, child: ChildV2) -> int:
        """The group of our KE: the child's own PFS group; for a child without one (made in
        IKE_AUTH, §1.3.3 allows PFS in its rekey) the IKE SA's group if the policy accepts it,
        else the policy's first; 0 with ``pfs = "never"``."""
        p = sa.policy
        assert p is not None
        if p.pfs == "never":
            return 0
        if child.choice.dh:
            return child.choice.dh
        ike = sa.choice.dh if sa.choice is not None else 0
        groups = tuple(p.pfs_groups) + (31,)
        return ike if ike in groups else (p.pfs_groups[0] if p.pfs_groups else 0)

    def start(self, sa: IkeSAv2, child: ChildV2, dh: int | None = None) -> None:
        """Send the rekey (``dh``: the group the client asked for with INVALID_KE_PAYLOAD)."""
        e = self.engine
        child.rekey_timer = None
        if (sa.state != "established" or child not in sa.children or child.rekeyed or child.deleting
                or child.rekeying is not None or sa.policy is None):
            return
        p = sa.policy
        try:
            spi_in = e.store.reserve_spi(f"ike:child:{child.peer}")
        except Exception as err:  # the shared store is away: try again, the SA still has time
            log.warn("ikev2: {name}: no SPI for our rekey of {spi}: {why}", name=sa.name,
                     spi=f"{child.spi_in:#010x}", why=str(err))
            self._retry(sa, child)
            return
        group = self.pfs_group(sa, child) if dh is None else dh
        pending = Pending(spi_in, secrets.token_bytes(32), group, ke_retried=dh is not None)
        # the child's algorithms with our KE's group first; for a child made without PFS the
        # policy's other groups (a client wanting one of those answers INVALID_KE_PAYLOAD and
        # we send again with it) and, unless PFS is required, none (a client without PFS)
        groups = [group]
        if group and not child.choice.dh:
            groups += [g for g in p.pfs_groups if g != group]
            if p.pfs != "required":
                groups.append(0)
        for n, g in enumerate(groups, 1):
            pending.offered[n] = attrs.evolve(child.choice, dh=g, number=n)
        spi = spi_in.to_bytes(4, "big")
        payloads: list[Any] = [wire.Notify(C.REKEY_SA, b"", C.PROTO_ESP, child.spi_in.to_bytes(4, "big")),
                               wire.SA(tuple(c.proposal(spi) for c in pending.offered.values())),
                               wire.Nonce(pending.ni)]
        dh = group
        if dh:
            pending.private, public = keys.group(dh).generate()
            payloads.append(wire.KE(dh, public))
        # we are the initiator of this exchange: TSi is our side, TSr the client's
        payloads += [wire.TSi(tuple(map(_ts, child.local))), wire.TSr(tuple(map(_ts, child.remote)))]
        child.rekeying = pending
        e.count("rekey_sent")
        log.info("ikev2: {name}: rekeying CHILD SA in {spi} (our lifetime)", name=sa.name,
                 spi=f"{child.spi_in:#010x}")
        e.send_request(sa, C.CREATE_CHILD_SA, payloads, "child rekey",
                       lambda sa2, answer: self.answered(sa2, child, pending, answer))

    def _retry(self, sa: IkeSAv2, child: ChildV2) -> None:
        e = self.engine
        hard = child.timer
        when = self.random.uniform(*RETRY)
        if hard is not None and hard.active() and hard.getTime() - e.now() <= when:
            return  # it expires first
        child.rekey_timer = e.clock.callLater(when, self.start, sa, child)

    # ------------------------------------------------------------------ the answer
    def answered(self, sa: IkeSAv2, child: ChildV2, pending: Pending, answer: tuple[Any, ...]) -> None:
        e = self.engine
        child.rekeying = None
        try:
            self._answered(sa, child, pending, answer)
        except _Refused as err:
            e.store_write(e.store.release("spi", pending.spi_in), sa, "releasing an SPI")
            e.count("rekey_failed")
            log.warn("ikev2: {name}: our rekey of CHILD SA {spi} failed: {why}", name=sa.name,
                     spi=f"{child.spi_in:#010x}", why=str(err))
            if err.notify == C.TEMPORARY_FAILURE and child in sa.children and not child.rekeyed:
                self._retry(sa, child)
            elif err.notify == C.INVALID_KE_PAYLOAD and err.group and not pending.ke_retried and \
                    sa.policy is not None and err.group in tuple(sa.policy.pfs_groups) + (31,):
                self.start(sa, child, dh=err.group)  # §1.3.3: again, with the group it asks for
            elif err.notify == C.CHILD_SA_NOT_FOUND and child in sa.children:
                e.children.remove(sa, child)

    def _answered(self, sa: IkeSAv2, child: ChildV2, pending: Pending, answer: tuple[Any, ...]) -> None:
        e = self.engine
        errors = [p for p in answer if isinstance(p, wire.Notify) and p.error]
        if errors:
            group = int.from_bytes(errors[0].data[:2], "big") if errors[0].type == C.INVALID_KE_PAYLOAD else 0
            raise _Refused(errors[0].type, f"the client answered with error notify {errors[0].type}"
                           + (f" (group {group})" if group else ""), group)
        sa_p, nonce = wire.find(answer, wire.SA), wire.find(answer, wire.Nonce)
        if sa_p is None or nonce is None or len(sa_p.proposals) != 1 or not 16 <= len(nonce.data) <= 256:
            raise _Refused(0, "an answer without one SA proposal and a nonce")
        prop = sa_p.proposals[0]
        offered = pending.offered.get(prop.number)
        if offered is None or prop.protocol != C.PROTO_ESP or len(prop.spi) != 4 or \
                prop.transforms != offered.proposal(prop.spi).transforms:
            raise _Refused(0, "the client chose what we did not offer")
        gir = None
        if offered.dh:
            ke = wire.find(answer, wire.KE)
            if ke is None or ke.group != pending.dh:
                raise _Refused(0, f"no KE of group {pending.dh} in the answer")
            try:
                gir = keys.group(pending.dh).shared(pending.private, ke.data)
            except CryptoError as err:
                raise _Refused(0, str(err)) from None
        choice = attrs.evolve(offered, peer_spi=prop.spi)
        nr = nonce.data
        other = child.collided
        if other is not None and min(other.nonces) < min(pending.ni, nr):
            # §2.8.1: the client's new SA holds the lowest nonce: it is redundant and the
            # client deletes it; ours survives and we delete the old one
            pass
        elif other is not None:
            # ours holds the lowest nonce: redundant; we created it, we delete it (the
            # client's survives and the client deletes the old one).  It is never written.
            e.count("rekey_collision_lost")
            log.info("ikev2: {name}: rekey collision on {spi}: ours is redundant (§2.8.1), deleting it",
                     name=sa.name, spi=f"{child.spi_in:#010x}")
            spi = pending.spi_in

            def released(sa2: IkeSAv2, _answer: tuple[Any, ...]) -> None:
                e.store_write(e.store.release("spi", spi), sa2, "releasing an SPI")
            e.send_request(sa, C.INFORMATIONAL, [wire.Delete(C.PROTO_ESP, (spi.to_bytes(4, "big"),))],
                           "child delete", released)
            return
        e.children.install(sa, choice, pending.ni, nr, gir, (), replaces=child if child in sa.children else None,
                           ours=(pending.spi_in, child.remote, child.local, child.peer))
        if other is not None:
            e.count("rekey_collision_won")
            log.info("ikev2: {name}: rekey collision on {spi}: the client's is redundant (§2.8.1)", name=sa.name,
                     spi=f"{child.spi_in:#010x}")
        if child in sa.children:
            self.delete_old(sa, child)

    def delete_old(self, sa: IkeSAv2, child: ChildV2) -> None:
        """§2.8: the replaced pair goes; its inbound SA stays until the client answered."""
        e = self.engine
        child.deleting = True
        if child.rekey_timer is not None and child.rekey_timer.active():
            child.rekey_timer.cancel()

        def gone(sa2: IkeSAv2, _answer: tuple[Any, ...]) -> None:
            if child in sa2.children:
                e.children.remove(sa2, child)
        e.send_request(sa, C.INFORMATIONAL, [wire.Delete(C.PROTO_ESP, (child.spi_in.to_bytes(4, "big"),))],
                       "child delete", gone)


class _Refused(Exception):
    def __init__(self, notify: int, detail: str, group: int = 0) -> None:
        super().__init__(detail)
        self.notify = notify
        self.group = group
