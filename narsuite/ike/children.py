"""The ESP SAs an ISAKMP SA negotiated, as the esp role sees them: ``esp.peer`` and
``esp.sa`` records in the store (:mod:`narsuite.sadb`).

This part writes them after Quick Mode, removes them on Delete or expiry, keeps a
deleted ISAKMP SA's children alive as *orphans* until a new ISAKMP SA of the same
principal adopts them (strongSwan re-authenticates that way), and moves their peer
address when the ISAKMP SA moves.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from narsuite import sadb
from narsuite.ike import constants as C
from narsuite.ike import crypto
from narsuite.ike.common import ESP_KEY_BYTES, INTEG_KEY_BYTES, grace
from narsuite.ike.isakmp import Delete
from narsuite.ike.sa import Child, IkeSA, QuickMode
from narsuite.logs import logger
from narsuite.sadb import ACTIVITY, PEER, SA, SA_KIND, Peer

if TYPE_CHECKING:
    from narsuite.ike.engine import IkeEngine

__all__ = ["Children", "ORPHAN_GRACE"]

log = logger()

#: how long ESP SAs outlive an ISAKMP SA the peer deleted, waiting for its successor
ORPHAN_GRACE = 60.0

Principal = tuple[str, str, str]


class Children:
    """The esp role's records for one engine's ISAKMP SAs."""

    def __init__(self, engine: IkeEngine) -> None:
        self.engine = engine
        #: outbound SPI -> (the ISAKMP SA, the child): Delete payloads name it
        self.by_out: dict[int, tuple[IkeSA, Child]] = {}
        #: esp.peer name -> the ISAKMP SA whose child it is (the newest): what the esp
        #: role reports about a peer reaches its SA in one lookup
        self.by_peer: dict[str, IkeSA] = {}
        #: principal -> a deleted ISAKMP SA whose ESP SAs wait for its successor
        self.orphans: dict[Principal, IkeSA] = {}
        # what the esp role learns from authenticated ESP reaches us through the store only
        self._unsubscribe = engine.store.subscribe(self._esp_changed, kinds=[PEER.name, ACTIVITY.name])

    # ------------------------------------------------------------------ install
    def name(self, sa: IkeSA, qm: QuickMode) -> str:
        assert sa.policy is not None
        # the XAUTH user, else the identity at its (NAT) address: two clients sharing an
        # identity and a private address behind different NATs must not share a child
        who = sa.xauth_user or f"{sa.peer_id_text}@{sa.remote[0]}"
        return f"ike:{sa.policy.name}:{who}:{qm.remote_ts[0]}"

    def install(self, sa: IkeSA, qm: QuickMode) -> None:
        """HASH(3) verified: the pair of ESP SAs and the peer record go to the store."""
        e = self.engine
        store = e.store
        assert sa.keys is not None and sa.choice is not None and sa.policy is not None
        ch = qm.choice
        enc_len = ESP_KEY_BYTES[(ch.enc, ch.key_bits)]
        integ_len = INTEG_KEY_BYTES[ch.integ]
        h, d = sa.choice.hash, sa.keys.skeyid_d
        ek_in, ik_in = crypto.esp_keys(h, d, qm.spi_in, qm.ni, qm.nr, enc_len, integ_len, qm.gqm_xy)
        ek_out, ik_out = crypto.esp_keys(h, d, qm.spi_out, qm.ni, qm.nr, enc_len, integ_len, qm.gqm_xy)
        name = self.name(sa, qm)
        if not ch.udp:
            encap = "esp"
        else:
            encap = sa.variant.encap if sa.variant is not None else "udp"
        remote_net = ipaddress.IPv4Network(qm.remote_ts[0])
        allowed: tuple[str, ...]
        if ch.tunnel:
            if sa.policy.napt:
                policy, inner, allowed = "napt", "", ()
            elif sa.address:
                policy, inner, allowed = "address", sa.address, ()
            elif remote_net.prefixlen == 32 and not sa.policy.remote_ts:
                policy, inner, allowed = "address", str(remote_net.network_address), ()
            else:
                policy, inner, allowed = "space", "", (str(remote_net),)
        else:
            policy, inner, allowed = "space", "", ()
        peer = Peer(name=name, mode="tunnel" if ch.tunnel else "transport", encap=encap, remote_ip=sa.remote[0],
                    remote_port=sa.remote[1] if encap != "esp" else 0, policy=policy, inner=inner,
                    pool=sa.policy.pool if sa.address else "", allowed=allowed,
                    keepalive=sa.nat_local and encap == "udp", local_ip=sa.local_ip,
                    nat_oa_remote=qm.nat_oa_remote, nat_oa_local=qm.nat_oa_local,
                    selector_proto=qm.local_ts[1], selector_port=qm.local_ts[2])
        owner = f"ike:child:{name}"
        hard = ch.lifetime + grace(ch.lifetime)
        ttl_in = hard + 5.0  # the timer below deletes first (and tells the peer); this is a safety net
        sa_in = SA(spi=qm.spi_in, direction="in", peer=name, enc=ch.enc, integ=ch.integ, enc_key=ek_in,
                   integ_key=ik_in, esn=ch.esn)
        sa_out = SA(spi=qm.spi_out, direction="out", peer=name, enc=ch.enc, integ=ch.integ, enc_key=ek_out,
                    integ_key=ik_out, esn=ch.esn)
        other = sadb.conflict(store, peer)
        if other is not None:
            # 002 §5.1 (tunnel: the same inner address or overlapping networks) and §5.2
            # (transport: overlapping selectors behind one NAT address): the first stays
            self._refuse(sa, qm, self._conflict_text(peer, other))
            return
        now = e.now()
        child = Child(name, qm.spi_in, qm.spi_out, now + ch.lifetime, ch.describe())
        refused: list[str] = []

        def failed(f: Failure, what: str) -> None:
            """A write the store refused (a Conflict, a backend error): the child cannot
            carry traffic.  Now (the write failed at once): it is refused; later (a durable
            backend failed): it is removed and the peer told."""
            e.count("store_failed")
            log.failure("ike: {name}: the store refused {what} of {child}", f, name=sa.name, what=what, child=name)
            if child in sa.children:
                self.remove(sa, child, notify_peer=True)
            else:
                refused.append(f"the store refused {what}: {f.getErrorMessage()}")

        store.put(peer, owner=owner).addErrback(failed, "the peer record")
        if not refused:
            # a rekeyed child (same name) from this or an older IKE SA: the old pair stays until
            # the peer deletes it or it expires; only one outbound SA per peer is current.
            old_out = store.lookup(SA_KIND.name, "out_peer", name)
            if old_out is not None:
                e.store_write(store.delete(SA_KIND.name, (old_out.direction, old_out.spi, old_out.peer)), sa,
                              "removing the superseded outbound SA")
            store.put(sa_in, ttl=ttl_in, owner=owner).addErrback(failed, "the inbound SA")
            store.put(sa_out, ttl=hard + 5.0, owner=owner).addErrback(failed, "the outbound SA")
        if refused:
            self._delete_records(sa, child)
            self._refuse(sa, qm, refused[0], release=False)
            return
        sa.children.append(child)
        child.timer = e.clock.callLater(hard, self._expired, sa, child)
        self.by_out[qm.spi_out] = (sa, child)
        self.by_peer[name] = sa
        e.count("child_installed")
        log.info("ike: {name}: ESP {desc} {rsel} <-> {lsel} in {spi_in:#010x} out {spi_out:#010x} ({encap} to "
                 "{peer})", name=sa.name, desc=ch.describe(), rsel=qm.remote_ts[0], lsel=qm.local_ts[0],
                 spi_in=qm.spi_in, spi_out=qm.spi_out, encap=encap, peer=f"{sa.remote[0]}:{sa.remote[1]}")
        e.publish(sa)

    def _refuse(self, sa: IkeSA, qm: QuickMode, why: str, release: bool = True) -> None:
        """The Quick Mode completed but its child may not exist: Delete its SA for the peer."""
        e = self.engine
        e.count("quick_refused")
        log.warn("ike: {name}: child refused: {why}", name=sa.name, why=why)
        e.send_informational(sa, [Delete(C.PROTO_IPSEC_ESP, 4, (qm.spi_in.to_bytes(4, "big"),))])
        if release:
            e.store_write(e.store.release("spi", qm.spi_in), sa, f"releasing SPI {qm.spi_in:#x}")

    @staticmethod
    def _conflict_text(peer: Peer, other: Peer) -> str:
        if peer.mode == "transport":
            return (f"transport selector overlaps {other.name}, behind the same address {peer.remote_ip} "
                    "(002 §5.2)")
        if peer.inner:
            return f"inner address {peer.inner} is already used by {other.name} (002 §5.1)"
        return f"networks {', '.join(peer.allowed)} overlap those of {other.name} (002 §5.1)"

    # ------------------------------------------------------------------ remove
    def _expired(self, sa: IkeSA, child: Child) -> None:
        if child in sa.children:
            self.remove(sa, child, notify_peer=sa.state == "established")

    def remove(self, sa: IkeSA, child: Child, notify_peer: bool) -> None:
        e = self.engine
        if child in sa.children:
            sa.children.remove(child)
        if child.timer is not None and child.timer.active():
            child.timer.cancel()
        self.by_out.pop(child.spi_out, None)
        if self.by_peer.get(child.peer) is sa and not any(c.peer == child.peer for c in sa.children):
            del self.by_peer[child.peer]
        self._delete_records(sa, child)
        e.count("child_deleted")
        if notify_peer and sa.state == "established":
            e.send_informational(sa, [Delete(C.PROTO_IPSEC_ESP, 4, (child.spi_in.to_bytes(4, "big"),))])
        e.publish(sa)
        if sa.state == "deleted" and not sa.children and self.orphans.get(self.principal(sa)) is sa:
            self._orphans_expired(sa)  # its last child went: nothing left to wait with

    def _delete_records(self, sa: IkeSA, child: Child) -> None:
        """A child's SAs, SPI lease and (with its last SA) peer record leave the store."""
        e = self.engine
        store = e.store
        e.store_write(store.delete(SA_KIND.name, ("in", child.spi_in, child.peer)), sa, "removing an inbound SA")
        if store.get(SA_KIND.name, ("out", child.spi_out, child.peer)) is not None:
            e.store_write(store.delete(SA_KIND.name, ("out", child.spi_out, child.peer)), sa,
                          "removing an outbound SA")
        e.store_write(store.release("spi", child.spi_in), sa, f"releasing SPI {child.spi_in:#x}")
        if not store.lookup_all(SA_KIND.name, "peer", child.peer):
            e.store_write(store.delete(PEER.name, child.peer), sa, f"removing peer {child.peer}")

    def release(self, sa: IkeSA) -> None:
        """Give back what the SA held in the store: SPI leases, its address (unless another
        live SA of the same user holds it)."""
        e = self.engine
        e.store_write(e.store.drop_owner(e.owner(sa)), sa, "releasing its SPI leases")
        if sa.address and sa.policy is not None and not any(
                o.address == sa.address for o in e.sas.values() if o.state == "established") and not any(
                o.address == sa.address and o.children for o in self.orphans.values() if o is not sa):
            e.store_write(e.store.drop_owner(e.transactions.lease_owner(sa)), sa, f"releasing address {sa.address}")

    # ------------------------------------------------------------------ the peer moved
    def peer_moved(self, sa: IkeSA) -> None:
        """The ISAKMP SA follows its peer to a new address: so do its UDP-encapsulated ESP SAs."""
        store = self.engine.store
        for child in sa.children:
            peer = store.get(PEER.name, child.peer)
            if peer is not None and peer.encap == "udp" and sa.natted:
                self.engine.store_write(
                    store.update(PEER.name, child.peer, remote_ip=sa.remote[0], remote_port=sa.remote[1]), sa,
                    f"moving peer {child.peer}")

    # ------------------------------------------------------------------ what the esp role saw
    def _owner_of(self, peer_name: str) -> IkeSA | None:
        """The established ISAKMP SA whose child the esp peer is (the newest, after a rekey):
        one dict lookup, as esp.activity arrives every few seconds per active peer."""
        sa = self.by_peer.get(peer_name)
        return sa if sa is not None and sa.state == "established" else None

    def _esp_changed(self, change: Any) -> None:
        """Authenticated ESP from a peer, as the esp role reports it in the store.

        * ``esp.peer`` moved (the esp role follows authenticated packets only): the NAT
          rebound the client's mapping.  IKE and ESP share the mapping on port 4500
          (RFC 3947 §7): the ISAKMP SA follows, so DPD and Deletes reach the client.
        * ``esp.activity``: ESP arrived -- traffic, so the peer is alive (RFC 3706 probes
          idle peers only; DPD must not clear a tunnel that carries packets).
        """
        if change.op != "put":
            return
        rec = change.record
        if change.kind == ACTIVITY.name:
            sa = self._owner_of(rec.peer)
            if sa is not None and rec.last_rx > sa.last_rx:
                sa.last_rx = rec.last_rx
                sa.dpd_sent = 0.0
            return
        old = change.old
        if old is None or (old.remote_ip, old.remote_port) == (rec.remote_ip, rec.remote_port):
            return
        if rec.encap != "udp" or not rec.remote_ip:
            return
        sa = self._owner_of(rec.name)
        if sa is None or not sa.natted or sa.local_port != self.engine.cfg.natt_port:
            return
        new = (rec.remote_ip, rec.remote_port)
        if new != sa.remote:
            log.info("ike: {name}: authenticated ESP from {new}: the ISAKMP SA follows (RFC 3947 §7)",
                     name=sa.name, new=f"{new[0]}:{new[1]}")
            self.engine.follow(sa, new, sa.local_port)

    # ------------------------------------------------------------------ orphans
    def principal(self, sa: IkeSA) -> Principal:
        return (sa.policy.name if sa.policy else "", sa.peer_id_text, sa.xauth_user or sa.remote[0])

    def orphan(self, sa: IkeSA) -> None:
        """The peer deleted ``sa`` but not its children: they wait for a successor -- or go
        to it at once when it is already there (strongSwan re-authenticates by a new ISAKMP
        SA first, then deletes the old one)."""
        key = self.principal(sa)
        old = self.orphans.pop(key, None)
        if old is not None:
            self._orphans_expired(old)
        self.orphans[key] = sa
        sa.timer = self.engine.clock.callLater(ORPHAN_GRACE, self._orphans_expired, sa)
        successors = [s for s in self.engine.sas.values() if s.state == "established" and s is not sa
                      and self.principal(s) == key and (s.choice is None or not s.choice.xauth or s.xauth_done)]
        if successors:
            self.adopt_orphans(max(successors, key=lambda s: s.established))

    def _orphans_expired(self, sa: IkeSA) -> None:
        """No new ISAKMP SA came for these children: they go."""
        key = self.principal(sa)
        if self.orphans.get(key) is sa:
            del self.orphans[key]
        if sa.timer is not None and sa.timer.active():
            sa.timer.cancel()
        for child in list(sa.children):
            self.remove(sa, child, notify_peer=False)
        self.release(sa)

    def adopt_orphans(self, sa: IkeSA) -> None:
        """A new ISAKMP SA of a principal whose old one the peer deleted: it takes over
        the old SA's ESP SAs (and their remaining lifetimes)."""
        e = self.engine
        old = self.orphans.pop(self.principal(sa), None)
        if old is None:
            return
        if old.timer is not None and old.timer.active():
            old.timer.cancel()
        now = e.now()
        for child in old.children:
            if child.timer is not None and child.timer.active():
                child.timer.cancel()
            child.timer = e.clock.callLater(max(0.0, child.expires - now + grace(child.expires - now)),
                                            self._expired, sa, child)
            self.by_out[child.spi_out] = (sa, child)
            self.by_peer[child.peer] = sa
            sa.children.append(child)
        log.info("ike: {name} adopts {n} ESP SA pair(s) of {old}", name=sa.name, n=len(old.children), old=old.name)
        adopted, old.children = old.children, []
        # (the adopter's address is the one its own mode-config leases -- for the same XAUTH
        # user the same one; taking the old SA's here, before that lease, would make the
        # adopter refuse a Quick Mode for the address it is about to hand out)
        # SPI leases: re-claimed for the adopter
        e.store_write(e.store.drop_owner(e.owner(old)), old, "releasing the orphaned SPI leases")
        for child in adopted:
            e.store_write(e.store.claim("spi", child.spi_in, e.owner(sa)), sa, f"claiming SPI {child.spi_in:#x}")
        e.publish(sa)

    def close(self) -> None:
        self._unsubscribe()
        for sa in list(self.orphans.values()):
            self._orphans_expired(sa)
