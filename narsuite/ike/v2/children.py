"""CHILD SAs of IKEv2 SAs as the esp role sees them: ``esp.peer`` and ``esp.sa`` records
(:mod:`narsuite.sadb`), written exactly as the IKEv1 side and the static config write them.

Also here: traffic-selector narrowing (§2.9) -- the peer's side becomes its virtual IP
when it has one, our side the intersection of what it asked with the policy's
``local_ts`` -- and the CHILD SA's keys (§2.17).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import TYPE_CHECKING, Any

from narsuite import sadb
from narsuite.ike.common import grace
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire
from narsuite.ike.v2.proposals import EspChoice
from narsuite.ike.v2.sa import ChildV2, IkeSAv2
from narsuite.ike.v2.wire import IKEv2Error, TrafficSelector
from narsuite.logs import logger
from narsuite.sadb import PEER, SA, SA_KIND, Peer

if TYPE_CHECKING:
    from narsuite.ike.v2.engine import IkeV2Engine

__all__ = ["Children", "narrow"]

log = logger()

Range = tuple[int, int]

#: how a CHILD SA shows in the log (fields: :meth:`Children.log_fields`)
CHILD_LOG = "ESP {desc} {tsi} <-> {tsr} in {spi_in} out {spi_out} ({encap} to {peer})"


def _ranges(selectors: tuple[TrafficSelector, ...]) -> list[Range]:
    return [(int.from_bytes(s.start, "big"), int.from_bytes(s.end, "big")) for s in selectors
            if s.ts_type == C.TS_IPV4_ADDR_RANGE and s.start <= s.end]


@functools.lru_cache(maxsize=256)
def _net_range(text: str) -> Range:
    """A policy's network ("10.1.0.0/24") as a range; cached: only config strings come here."""
    n = ipaddress.IPv4Network(text, strict=False)
    return int(n.network_address), int(n.broadcast_address)


def narrow(proposed: tuple[TrafficSelector, ...], allowed: list[str]) -> list[Range]:
    """The parts of the proposed IPv4 ranges inside the allowed networks (§2.9)."""
    out = []
    for lo, hi in _ranges(proposed):
        for a_lo, a_hi in map(_net_range, allowed):
            s, e = max(lo, a_lo), min(hi, a_hi)
            if s <= e and (s, e) not in out:
                out.append((s, e))
    return out


def _ts(r: Range) -> TrafficSelector:
    return TrafficSelector(C.TS_IPV4_ADDR_RANGE, 0, 0, 0xFFFF, r[0].to_bytes(4, "big"), r[1].to_bytes(4, "big"))


def _networks(r: Range) -> list[str]:
    """The range as the fewest CIDR networks (``ipaddress.summarize_address_range`` in
    integers: it ran four times per CHILD SA and cost more than the rest of the install)."""
    lo, hi = r
    out = []
    while lo <= hi:
        size = lo & -lo or 1 << 32  # the largest block aligned at lo ...
        while lo + size - 1 > hi:    # ... that ends inside the range
            size >>= 1
        out.append(f"{socket.inet_ntoa(lo.to_bytes(4, 'big'))}/{33 - size.bit_length()}")
        lo += size
    return out


class Children:
    def __init__(self, engine: IkeV2Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ negotiate + install
    def selectors(self, sa: IkeSAv2, payloads: tuple[Any, ...]) -> tuple[list[Range], list[Range]]:
        """(TSi, TSr) narrowed, or TS_UNACCEPTABLE."""
        assert sa.policy is not None
        tsi, tsr = wire.find(payloads, wire.TSi), wire.find(payloads, wire.TSr)
        if tsi is None or tsr is None:
            raise IKEv2Error(C.INVALID_SYNTAX, "CHILD SA request without TSi and TSr")
        p = sa.policy
        if sa.address:
            vip = int.from_bytes(socket.inet_aton(sa.address), "big")
            if not any(lo <= vip <= hi for lo, hi in _ranges(tsi.selectors)):
                raise IKEv2Error(C.TS_UNACCEPTABLE, f"TSi does not contain the virtual IP {sa.address}")
            remote = [(vip, vip)]
        elif p.remote_ts:
            remote = narrow(tsi.selectors, list(p.remote_ts))
        else:
            # no pool, no remote_ts: only the peer's own (inner) address, as for IKEv1
            singles = [(lo, hi) for lo, hi in _ranges(tsi.selectors) if lo == hi]
            peer = int.from_bytes(socket.inet_aton(sa.remote[0]), "big")
            if singles:
                remote = singles[:1]
            elif not sa.natted and any(lo <= peer <= hi for lo, hi in _ranges(tsi.selectors)):
                remote = [(peer, peer)]
            else:
                remote = []
        local = narrow(tsr.selectors, list(p.local_ts))
        if not remote or not local:
            self.engine.count("ts_refused")
            raise IKEv2Error(C.TS_UNACCEPTABLE, "no acceptable traffic selectors")
        return remote, local

    def name(self, sa: IkeSAv2, remote: list[Range]) -> str:
        assert sa.policy is not None
        who = sa.eap_user or f"{sa.peer_id_text}@{sa.remote[0]}:{sa.remote[1]}"
        return f"ike:{sa.policy.name}:{who}:{_networks(remote[0])[0]}"

    def install(self, sa: IkeSAv2, choice: EspChoice, ni: bytes, nr: bytes, gir: bytes | None,
                payloads: tuple[Any, ...], replaces: ChildV2 | None = None, publish: bool = True,
                log_it: bool = True, ours: tuple[int, list[Range], list[Range], str] | None = None) -> list[Any]:
        """Narrow, key and write one CHILD SA; the response's SA, TSi and TSr payloads.
        ``log_it`` False: the caller logs it (IKE_AUTH's one line per client).  ``ours``: we
        initiated the exchange (our rekey, :mod:`narsuite.ike.v2.rekey`): (our SPI, reserved
        with the request; the client-side and our ranges; the esp.peer name), and the
        initiator's keys are ours to send with (§2.17)."""
        e = self.engine
        store = e.store
        assert sa.policy is not None and sa.keys is not None and sa.choice is not None
        if ours is None:
            remote, local = self.selectors(sa, payloads)
            name = replaces.peer if replaces is not None else self.name(sa, remote)
        else:
            remote, local, name = ours[1], ours[2], ours[3]
        owner = f"ike:child:{name}"
        if ours is None:
            try:
                spi_in = store.reserve_spi(owner)
            except Exception as err:
                raise IKEv2Error(C.NO_PROPOSAL_CHOSEN, f"no SPI: {err}") from None
        else:
            spi_in = ours[0]
        spi_out = int.from_bytes(choice.peer_spi, "big")
        ei, ai, er, ar = keys.child_keymat(sa.choice.prf_name, sa.keys.sk_d, ni, nr, choice.enc_len,
                                           choice.integ_len, gir)
        if ours is not None:
            ei, ai, er, ar = er, ar, ei, ai  # we are the initiator: i->r is our outbound
        encap = "udp" if sa.natted else "esp"
        allowed: tuple[str, ...] = ()
        if sa.address:
            policy, inner = "address", sa.address
        elif remote == [(remote[0][0], remote[0][0])] and not sa.policy.remote_ts:
            policy, inner = "address", str(ipaddress.IPv4Address(remote[0][0]))
        else:
            policy, inner, allowed = "space", "", tuple(n for r in remote for n in _networks(r))
        peer = Peer(name=name, mode="tunnel", encap=encap, remote_ip=sa.remote[0],
                    remote_port=sa.remote[1] if encap == "udp" else 0, policy=policy, inner=inner,
                    pool=sa.policy.pool if sa.address else "", allowed=allowed,
                    keepalive=sa.nat_local and encap == "udp", local_ip=sa.local_ip)
        life = sa.policy.esp_lifetime
        hard = life + grace(life)
        sa_in = SA(spi=spi_in, direction="in", peer=name, enc=choice.enc, integ=choice.integ, enc_key=ei,
                   integ_key=ai, esn=choice.esn)
        sa_out = SA(spi=spi_out, direction="out", peer=name, enc=choice.enc, integ=choice.integ, enc_key=er,
                    integ_key=ar, esn=choice.esn)
        other = sadb.tunnel_conflict(store, peer)
        if other is not None:
            # 002 §5.1: the same inner address or space networks that overlap another
            # peer's (outbound would go to whichever the esp role finds first): the first stays
            store.release("spi", spi_in)
            e.count("ts_conflict")
            why = (f"inner address {inner} is already used by {other.name}" if inner else
                   f"traffic selectors {', '.join(allowed)} overlap those of {other.name}")
            e.drops.event("ts_conflict", "ikev2: {name}: CHILD SA refused (TS_UNACCEPTABLE): {why}",
                          name=sa.name, why=why)
            raise IKEv2Error(C.TS_UNACCEPTABLE, why)
        e.store_write(store.put(peer, owner=owner), sa, "the ESP peer record")
        e.store_write(store.put(sa_in, ttl=hard + 5.0, owner=owner), sa, "the inbound ESP SA")
        child = ChildV2(name, spi_in, spi_out, e.now() + life, choice, ", ".join(_networks(remote[0])),
                        ", ".join(n for r in local for n in _networks(r)), remote=remote, local=local,
                        nonces=(ni, nr))
        if replaces is not None and ours is None:
            # §2.8: we answer the client's rekey.  Until its Delete of the old pair shows it
            # has our answer (or the old pair expires), we keep sending on the old SA, as
            # strongSwan does as responder: the answer may be lost, the client then has no
            # inbound SA for the new one until its resend gets our answer again
            child.pending_out = (sa_out, e.now() + hard + 5.0)
        else:
            self._send_on(sa, sa_out, hard + 5.0, owner)
        if replaces is not None:
            replaces.successor = child
        child.timer = e.clock.callLater(hard, self._expired, sa, child)
        e.rekey.schedule(sa, child)
        sa.children.append(child)
        if replaces is not None:
            replaces.rekeyed = True
            e.count("child_rekeyed")
        e.count("child_installed")
        if log_it:
            log.info("ikev2: {name}: " + CHILD_LOG + "{rekey}", name=sa.name, **self.log_fields(sa, child),
                     rekey=f", rekeying {replaces.spi_in:#010x}" if replaces is not None else "")
        if publish:
            e.publish(sa)
        return [wire.SA((choice.proposal(spi_in.to_bytes(4, "big")),)), wire.TSi(tuple(map(_ts, remote))),
                wire.TSr(tuple(map(_ts, local)))]

    def _send_on(self, sa: IkeSAv2, sa_out: SA, ttl: float, owner: str) -> None:
        """Make ``sa_out`` the peer's outbound SA (the esp role sends on the one it finds)."""
        e = self.engine
        store = e.store
        old_out = store.lookup(SA_KIND.name, "out_peer", sa_out.peer)
        if old_out is not None:
            e.store_write(store.delete(SA_KIND.name, (old_out.direction, old_out.spi, old_out.peer)), sa,
                          "replacing the outbound SA")
        e.store_write(store.put(sa_out, ttl=ttl, owner=owner), sa, "the outbound ESP SA")

    @staticmethod
    def log_fields(sa: IkeSAv2, child: ChildV2) -> dict[str, str]:
        """:data:`CHILD_LOG`'s fields, as text (twisted's formatter parses a format spec such
        as ``#010x`` in Python, for every line)."""
        return {"desc": child.choice.describe(), "tsi": child.tsi, "tsr": child.tsr, "spi_in": f"{child.spi_in:#010x}",
                "spi_out": f"{child.spi_out:#010x}", "encap": "udp" if sa.natted else "esp",
                "peer": f"{sa.remote[0]}:{sa.remote[1]}"}

    # ------------------------------------------------------------------ remove
    def _expired(self, sa: IkeSAv2, child: ChildV2) -> None:
        if child in sa.children:
            if sa.state == "established":
                self.engine.send_request(sa, C.INFORMATIONAL,
                                         [wire.Delete(C.PROTO_ESP, (child.spi_in.to_bytes(4, "big"),))],
                                         "child delete")
            self.remove(sa, child)

    def by_out(self, sa: IkeSAv2, spi_out: int) -> ChildV2 | None:
        return next((c for c in sa.children if c.spi_out == spi_out), None)

    def remove(self, sa: IkeSAv2, child: ChildV2) -> None:
        e = self.engine
        store = e.store
        if child in sa.children:
            sa.children.remove(child)
        for timer in (child.timer, child.rekey_timer):
            if timer is not None and timer.active():
                timer.cancel()
        e.store_write(store.delete(SA_KIND.name, ("in", child.spi_in, child.peer)), sa, "removing an ESP SA")
        if store.get(SA_KIND.name, ("out", child.spi_out, child.peer)) is not None:
            e.store_write(store.delete(SA_KIND.name, ("out", child.spi_out, child.peer)), sa, "removing an ESP SA")
        e.store_write(store.release("spi", child.spi_in), sa, "releasing an SPI")
        succ = child.successor
        if succ is not None and succ.pending_out is not None and succ in sa.children:
            # the pair it replaced is gone: the client has the new one (see install)
            sa_out, until = succ.pending_out
            succ.pending_out = None
            self._send_on(sa, sa_out, max(1.0, until - e.now()), f"ike:child:{succ.peer}")
        if not store.lookup_all(SA_KIND.name, "peer", child.peer):
            e.store_write(store.delete(PEER.name, child.peer), sa, "removing the ESP peer")
        e.count("child_deleted")
        e.publish(sa)

    def release(self, sa: IkeSAv2) -> None:
        """What the SA held: its record; its pool address unless another live SA of the same
        holder has it (a rekeyed or re-authenticated SA)."""
        e = self.engine
        e.store_write(e.store.drop_owner(e.owner(sa)), sa, "dropping the IKE SA's records")
        if sa.address and sa.policy is not None and not any(
                o.address == sa.address for o in e.sas.values() if o is not sa and o.state != "deleted"):
            e.store_write(e.store.drop_owner(e.lease_owner(sa)), sa, "returning the pool address")

    def transfer(self, old: IkeSAv2, new: IkeSAv2) -> None:
        """An IKE SA rekey: the children belong to the new SA now (§2.18)."""
        for child in old.children:
            if child.timer is not None and child.timer.active():
                child.timer.cancel()
            child.timer = self.engine.clock.callLater(max(0.0, child.expires - self.engine.now())
                                                      + grace(new.policy.esp_lifetime if new.policy else 3600),
                                                      self._expired, new, child)
            at = child.rekey_at
            if child.rekeying is not None:
                # our rekey of it was a request of the old IKE SA, which is gone unanswered:
                # ask again on the new one (§2.18: the children are the new SA's now)
                e0 = self.engine
                e0.store_write(e0.store.release("spi", child.rekeying.spi_in), new, "releasing an SPI")
                child.rekeying, at = None, self.engine.now() + 1.0
            self.engine.rekey.schedule(new, child, at=at)
            new.children.append(child)
        old.children = []
        e = self.engine
        e.store_write(e.store.drop_owner(e.owner(old)), old, "dropping the rekeyed IKE SA's record")
        e.publish(new)

    # ------------------------------------------------------------------ the peer moved
    def peer_moved(self, sa: IkeSAv2) -> None:
        store = self.engine.store
        for child in sa.children:
            peer = store.get(PEER.name, child.peer)
            if peer is not None and peer.remote_ip != "":
                encap = "udp" if sa.natted else peer.encap
                self.engine.store_write(
                    store.update(PEER.name, child.peer, remote_ip=sa.remote[0],
                                 remote_port=sa.remote[1] if encap == "udp" else 0, encap=encap,
                                 keepalive=sa.nat_local and encap == "udp"),
                    sa, "moving the ESP peer")
