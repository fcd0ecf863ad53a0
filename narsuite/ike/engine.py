"""The IKEv1 responder's controller: datagrams in, datagrams and store writes out.

The service frames (ports 500 and 4500, the non-ESP marker) and calls
:meth:`IkeEngine.received`; this module decides which exchange handles a message
and owns what every exchange shares -- the SA table, counters, retransmission
answers, the protected-message seal, SA deletion.  The exchanges themselves live
in one module each, split along the protocol the way twisted.conch splits
transport, userauth and connection:

* :mod:`narsuite.ike.phase1` -- Main Mode (RFC 2409 §5) and Aggressive Mode, NAT
  detection (RFC 3947 and the 004 draft, :mod:`narsuite.ike.natt`).
* :mod:`narsuite.ike.quick` -- Quick Mode (§5.5): proposals, traffic selectors.
* :mod:`narsuite.ike.informational` -- informational exchanges (§5.7): Delete,
  INITIAL-CONTACT, DPD (RFC 3706).
* :mod:`narsuite.ike.transaction` -- XAUTH and mode-config
  (:mod:`narsuite.ike.modecfg`).
* :mod:`narsuite.ike.children` -- the ESP SAs in the store (``esp.peer`` /
  ``esp.sa``, :mod:`narsuite.sadb`), orphans, and what the esp role reports back.
* :mod:`narsuite.ike.resume` -- an established SA as an ``ike.isakmp`` record and
  back: a cluster's standby carries on a dead node's SAs (docs/cluster.md, level 2).

Which handler a message reaches is decided in one place, :data:`ROUTES`: (exchange
type, SA state) -> handler.  Rules that hold everywhere: a retransmitted request is
answered with the stored reply and never processed again; the IV chain moves only on
messages whose HASH verified; a Main Mode first message creates no state (stateless
responder cookies, :mod:`narsuite.ike.cookies`), half-open phase-1 state is bounded per
source and in total (Aggressive Mode in a budget of its own) before any Diffie-Hellman
work; every drop is counted and logged with its reason through an aggregator (the
first few per reason and interval in full, then one summary line), and unprotected
notifications to unauthenticated sources are rate-limited.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer

from narsuite.ike import constants as C
from narsuite.ike import crypto, isakmp
from narsuite.ike.children import ORPHAN_GRACE, Children
from narsuite.ike.common import Drop, grace
from narsuite.ike.config import IkeConfig
from narsuite.ike.informational import Informational
from narsuite.ike.isakmp import Delete, ISAKMPError, Notification
from narsuite.ike.phase1 import Phase1
from narsuite.ike.quick import QuickModeResponder
from narsuite.ike.records import IKE_SA, ISAKMP_STATE, IkeSaRecord
from narsuite.ike.resume import resume, state_of
from narsuite.ike.sa import IkeSA, Pending
from narsuite.ike.transaction import Transactions
from narsuite.logs import Aggregator, logger
from narsuite.packet.markers import ZERO_COOKIE
from narsuite.packet.routing import SourceAddresses
from narsuite.ratelimit import TokenBucket

__all__ = ["IkeEngine", "COUNTERS", "ROUTES", "Route", "ORPHAN_GRACE", "Drop"]

log = logger()

COUNTERS = (
    "rx", "tx", "malformed", "unknown_cookie", "retransmit_answered", "duplicate", "no_policy",
    "no_proposal", "half_open_dropped", "auth_failed", "bad_hash", "decrypt_failed", "ike_established",
    "ike_deleted", "child_installed", "child_deleted", "quick_refused", "ts_refused", "dpd_sent",
    "dpd_answered", "dpd_dead", "xauth_ok", "xauth_failed", "modecfg_done", "notify_rx", "delete_rx",
    "internal_error", "initial_contact", "expired", "unexpected", "peer_moved", "refused",
    # anti-clogging (narsuite.ike.cookies) and the unprotected-notification limit
    "cookie_sent", "cookie_verified", "bad_cookie", "first_message_gone", "first_message_evicted",
    "notify_rate_limited",
    # a store write failed (Conflict, backend error): logged with what it was
    "store_failed",
    # a dead node's sealed ISAKMP SA carried on here (cluster adopt), or not
    "ike_resumed", "resume_failed",
)

#: kept for callers of the pre-split module
_grace = grace


@attrs.frozen
class Route:
    """Where a message of one exchange type goes in one SA state.

    ``part`` names the engine attribute holding the exchange's handler object and
    ``method`` the method on it; ``encrypted`` is what the message must be (None:
    either, as AM3 may be); ``phase1`` messages must carry message ID 0."""

    part: str
    method: str
    encrypted: bool | None
    phase1: bool = False


_PHASE1_STATES = ("start", "mm2", "mm4", "am2")

#: (exchange type, SA state) -> handler: the one dispatch table.  Anything missing is
#: "unexpected" (dropped), except an encrypted exchange of a type we do not run on an
#: established SA, which is answered UNSUPPORTED-EXCHANGE-TYPE.
ROUTES: dict[tuple[int, str], Route] = {
    (C.EXCH_MAIN, "mm2"): Route("phase1", "mm3", encrypted=False, phase1=True),
    (C.EXCH_MAIN, "mm4"): Route("phase1", "mm5", encrypted=True, phase1=True),
    (C.EXCH_AGGRESSIVE, "am2"): Route("phase1", "am3", encrypted=None, phase1=True),
    **{(C.EXCH_INFORMATIONAL, s): Route("informational", "phase1_notification", encrypted=False)
       for s in _PHASE1_STATES},
    (C.EXCH_QUICK, "established"): Route("quick", "received", encrypted=True),
    (C.EXCH_INFORMATIONAL, "established"): Route("informational", "received", encrypted=True),
    (C.EXCH_TRANSACTION, "established"): Route("transactions", "received", encrypted=True),
}


class IkeEngine:
    """The ISAKMP SA table and what every exchange shares; see the module docstring."""

    def __init__(self, cfg: IkeConfig, store: Any, clock: Any, *,
                 send: Callable[[bytes, tuple[str, int], int], None],
                 local_address: Callable[[str], str] | None = None,
                 credentials: Any = None, trust: Any = None,
                 check_password: Callable[[str, bytes], defer.Deferred] | None = None,
                 metrics: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.send_raw = send
        self.local_address = local_address or self._route_source
        self.credentials = credentials
        self.trust = trust
        self.check_password = check_password
        self.sas: dict[bytes, IkeSA] = {}
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        #: NAT-T variants we answer (the service drops the 004 draft when no esp role
        #: carries its ESP on UDP 500)
        self.natt_variants: tuple[str, ...] = tuple(cfg.natt)
        self._sources = SourceAddresses()
        self.on_established: Callable[[IkeSA], None] | None = None
        #: what bad input makes us log, aggregated (a flood costs O(1) lines per interval)
        self.drops = Aggregator(log, "ike drops", clock)
        #: unprotected notifications answer sources nobody has authenticated: limited
        self.notify_bucket = TokenBucket(cfg.unauthenticated_notify_rate, cfg.unauthenticated_notify_burst,
                                         clock)
        # the exchanges, each with this engine as its transport
        self.phase1 = Phase1(self)
        self.quick = QuickModeResponder(self)
        self.informational = Informational(self)
        self.transactions = Transactions(self)
        self.children = Children(self)
        #: write each established SA's ``ike.isakmp`` state (what a standby resumes); the ike
        #: service turns it off where no cluster seals that kind: nobody else reads it
        self.keep_state = True
        # a dead node's ISAKMP SAs reach this node's view only through the store (cluster adopt)
        self._unsubscribe_state = store.subscribe(self._state_changed, kinds=[ISAKMP_STATE.name])
        if metrics is not None:
            metrics.watch_counters("ike", "events", "IKE responder events by kind", "event",
                                   lambda: self.counters)

    @property
    def parts(self) -> tuple[Any, ...]:
        """The exchange handlers (their timers are the engine's too)."""
        return (self.phase1, self.quick, self.informational, self.transactions, self.children)

    # half-open bookkeeping lives with phase 1; these names are what tests and narctl read
    @property
    def half_open(self) -> dict[tuple[bytes, str, int], IkeSA]:
        return self.phase1.half_open

    @property
    def half_open_by_ip(self) -> Counter[str]:
        return self.phase1.half_open_by_ip

    # ------------------------------------------------------------------ plumbing
    def _route_source(self, peer_ip: str) -> str:
        """Our address towards ``peer_ip`` (for NAT-D and IDs): the configured one, else
        the kernel's choice."""
        if self.cfg.address:
            return self.cfg.address
        if self.cfg.listen:
            return self.cfg.listen
        return self._sources(peer_ip)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def send(self, sa: IkeSA | None, data: bytes, remote: tuple[str, int], local_port: int) -> None:
        self.count("tx")
        self.send_raw(data, remote, local_port)

    def reply(self, sa: IkeSA, digest: bytes, datagrams: list[bytes]) -> None:
        """Send our answer to the message with ``digest`` and keep it for its retransmissions."""
        sa.replies[digest] = datagrams
        if len(sa.replies) > 16:
            sa.replies.pop(next(iter(sa.replies)))
        for d in datagrams:
            self.send(sa, d, sa.remote, sa.local_port)

    def now(self) -> float:
        return self.clock.seconds()

    _now = now  # narctl's name

    def answer_retransmission(self, sa: IkeSA, digest: bytes) -> bool:
        """A message we already answered (same digest): send the same answer again, True."""
        cached = sa.replies.get(digest)
        if cached is None:
            return False
        self.count("retransmit_answered")
        for d in cached:
            self.send(sa, d, sa.remote, sa.local_port)
        return True

    def remember(self, sa: IkeSA, digest: bytes) -> None:
        """A processed message that needs no stored reply: its retransmissions are duplicates."""
        sa.seen.add(digest)
        if len(sa.seen) > 512:
            sa.seen.clear()

    # ------------------------------------------------------------------ entry point
    def received(self, data: bytes, addr: tuple[str, int], local_port: int) -> None:
        """One IKE datagram (marker stripped) from ``addr`` on our ``local_port``."""
        self.count("rx")
        try:
            header = isakmp.parse_header(data)
        except ISAKMPError as e:
            self.drop("malformed", addr, str(e))
            return
        sa: IkeSA | None = None
        try:
            if header.rcookie == ZERO_COOKIE:
                self.phase1.first_message(header, data, addr, local_port)
                return
            sa = self.sas.get(header.icookie + header.rcookie)
            if sa is None:
                sa = self.phase1.from_cookie(header, addr, local_port)  # MM3, or Drop
            elif sa.state == "deleted":
                raise Drop("unknown_cookie", f"cookies {header.icookie.hex()}/{header.rcookie.hex()}")
            digest = hashlib.sha256(data).digest()[:16]
            if self.answer_retransmission(sa, digest):
                return
            if digest in sa.seen:
                raise Drop("duplicate", "retransmission of a message that needs no answer")
            self.dispatch(sa, header, data, addr, local_port, digest)
        except Drop as d:
            self.drop(d.reason, addr, d.detail, sa)
        except ISAKMPError as e:
            self.drop("malformed" if e.notify in (C.PAYLOAD_MALFORMED, C.INVALID_PAYLOAD_TYPE) else "refused",
                      addr, str(e), sa)
            self.notify_error(sa, header, addr, local_port, e.notify)
        except crypto.CryptoError as e:
            self.drop("decrypt_failed", addr, str(e), sa)
        except Exception:
            self.count("internal_error")
            log.failure("ike: processing a message from {addr}", addr=f"{addr[0]}:{addr[1]}")

    def dispatch(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
                 digest: bytes) -> None:
        """Hand a message of a known SA to its exchange, by :data:`ROUTES`."""
        ex = header.exchange
        route = ROUTES.get((ex, sa.state))
        if route is None or (route.phase1 and header.message_id):
            if route is None and sa.state == "established" and header.encrypted \
                    and ex not in (C.EXCH_MAIN, C.EXCH_AGGRESSIVE):
                raise ISAKMPError(C.UNSUPPORTED_EXCHANGE_TYPE, f"exchange {ex}")
            raise Drop("unexpected", f"{C.EXCHANGE_NAMES.get(ex, ex)} message in state {sa.state}")
        if route.encrypted is not None and header.encrypted != route.encrypted:
            raise Drop("unexpected", f"{'an encrypted' if header.encrypted else 'an unencrypted'} "
                       f"{C.EXCHANGE_NAMES.get(ex, ex)} message in state {sa.state}")
        getattr(getattr(self, route.part), route.method)(sa, header, data, addr, local_port, digest)

    def drop(self, reason: str, addr: tuple[str, int], detail: str, sa: IkeSA | None = None) -> None:
        """Count a dropped message; log it through the aggregator (the sender chooses how many)."""
        self.count(reason)
        self.drops.event(reason, "ike: dropped from {addr}: {reason} {detail}", addr=f"{addr[0]}:{addr[1]}",
                         detail=detail, ike_sa=sa.name if sa else "")

    def note(self, reason: str, format: str, **kw: Any) -> None:
        """Log something an unauthenticated sender can make us say, aggregated like drops."""
        self.drops.event(reason, format, **kw)

    def notify_error(self, sa: IkeSA | None, header: isakmp.Header, addr: tuple[str, int], local_port: int,
                     notify: int) -> None:
        """Tell the peer why (unprotected before phase 1 completes, protected after).

        An unprotected answer goes to an address nobody has authenticated (a spoofed
        source makes us a reflector): at most ``unauthenticated_notify_rate`` per second
        (burst ``unauthenticated_notify_burst``); the rest are counted, not sent."""
        n = Notification(notify, C.PROTO_ISAKMP, header.icookie + header.rcookie)
        if sa is not None and sa.state == "established":
            self.send_informational(sa, [n])
            return
        if not self.notify_bucket.take():
            self.count("notify_rate_limited")
            return
        msg = isakmp.build_message(isakmp.Header(header.icookie, header.rcookie, C.EXCH_INFORMATIONAL), [n])
        self.send(sa, msg, addr, local_port)

    # ------------------------------------------------------------------ protected messages
    def open(self, cr: crypto.ISAKMPCrypto, header: isakmp.Header, data: bytes) -> tuple[bytes, bytes, tuple]:
        """Decrypt (without moving the IV): (ciphertext, payload chain bytes, payloads)."""
        first = header.next_payload
        assert first is not None  # a parsed header carries it
        ct = bytes(data[C.HEADER_LEN:header.length])
        plain = cr.decrypt(header.message_id, ct)
        chain, _pad = crypto.payload_chain(plain, first)
        return ct, chain, isakmp.parse_payloads(first, chain)

    def open_protected(self, sa: IkeSA, header: isakmp.Header, data: bytes,
                       hash_fn: Callable[[bytes], bytes]) -> tuple[bytes, tuple]:
        """Decrypt, check the leading HASH (``hash_fn`` of the payloads after it), return
        (ciphertext, payloads after the HASH).  The IV moves only if the HASH verified."""
        assert sa.crypto is not None
        ct, chain, payloads = self.open(sa.crypto, header, data)
        if not payloads or not isinstance(payloads[0], isakmp.Hash):
            raise Drop("bad_hash", "protected message without a leading HASH")
        hlen = 4 + len(payloads[0].data)
        if not crypto.constant_time_equal(hash_fn(chain[hlen:]), payloads[0].data):
            raise Drop("bad_hash", f"{C.EXCHANGE_NAMES.get(header.exchange)} HASH did not verify")
        sa.crypto.accept(header.message_id, ct)
        return ct, payloads[1:]

    def seal(self, sa: IkeSA, exchange: int, mid: int, payloads: list[Any],
             hash_fn: Callable[[bytes], bytes]) -> bytes:
        """HASH + payloads, encrypted under the exchange's IV."""
        assert sa.crypto is not None and sa.keys is not None
        rest = isakmp.build_payloads(payloads) if payloads else b""
        digest = hash_fn(rest)
        # the HASH payload's generic header names the first following payload
        nxt = payloads[0].payload_type if payloads else C.PT_NONE
        ct = sa.crypto.encrypt(mid, struct.pack("!BBH", nxt, 0, 4 + len(digest)) + digest + rest)
        hdr = isakmp.Header(sa.icky, sa.rcky, exchange, C.FLAG_ENCRYPTION, mid, C.PT_HASH)
        return isakmp.build_message(hdr, ciphertext=ct)

    def new_mid(self, sa: IkeSA) -> int:
        while True:
            mid = secrets.randbits(32)
            if mid and mid not in sa.used_mids:
                sa.used_mids.add(mid)
                return mid

    def send_informational(self, sa: IkeSA, payloads: list[Any]) -> bytes:
        """A protected informational message of ours (no answer expected)."""
        assert sa.keys is not None and sa.choice is not None and sa.crypto is not None
        mid = self.new_mid(sa)
        h, a = sa.choice.hash, sa.keys.skeyid_a
        data = self.seal(sa, C.EXCH_INFORMATIONAL, mid, payloads,
                         lambda rest: crypto.informational_hash(h, a, mid, rest))
        sa.crypto.ivs.forget(mid)
        self.send(sa, data, sa.remote, sa.local_port)
        return data

    def send_request(self, sa: IkeSA, exchange: int, payloads: list[Any], kind: str) -> None:
        """A request we start (new message ID), resent on our schedule until answered."""
        assert sa.keys is not None and sa.choice is not None
        mid = self.new_mid(sa)
        h, a = sa.choice.hash, sa.keys.skeyid_a
        fn = crypto.transaction_hash if exchange == C.EXCH_TRANSACTION else crypto.informational_hash
        data = self.seal(sa, exchange, mid, payloads, lambda rest: fn(h, a, mid, rest))
        pending = Pending(mid, data, kind=kind)
        sa.pending[mid] = pending
        self.send(sa, data, sa.remote, sa.local_port)
        self._arm(sa, pending)

    def _arm(self, sa: IkeSA, pending: Pending) -> None:
        delays = self.cfg.retransmit
        if pending.tries < len(delays):
            pending.timer = self.clock.callLater(delays[pending.tries], self._resend, sa, pending)

    def _resend(self, sa: IkeSA, pending: Pending) -> None:
        if sa.state != "established" or sa.pending.get(pending.message_id) is not pending:
            return
        pending.tries += 1
        if pending.tries > len(self.cfg.retransmit):
            return
        if pending.tries == len(self.cfg.retransmit):
            log.warn("ike: {name}: no answer to our {kind} request: deleting", name=sa.name, kind=pending.kind)
            self.delete_ike(sa, notify_peer=True, reason=f"{pending.kind} unanswered")
            return
        self.send(sa, pending.data, sa.remote, sa.local_port)
        self._arm(sa, pending)

    # ------------------------------------------------------------------ the peer's address
    def follow(self, sa: IkeSA, addr: tuple[str, int], local_port: int) -> None:
        """Follow the peer to where its authenticated message came from (port 4500 after
        NAT-T floating, or a new NAT mapping: RFC 3947 §7)."""
        if (addr, local_port) == (sa.remote, sa.local_port):
            return
        if sa.state == "established":
            self.count("peer_moved")
            log.info("ike: {name} moved from {old} to {new}", name=sa.name, old=f"{sa.remote[0]}:{sa.remote[1]}",
                     new=f"{addr[0]}:{addr[1]}")
        sa.remote, sa.local_port = addr, local_port
        if sa.state == "established":
            self.children.peer_moved(sa)
            self.publish(sa)

    # ------------------------------------------------------------------ lifecycle
    def schedule_delete(self, sa: IkeSA, reason: str) -> None:
        """Delete soon, once: the last message (XAUTH status FAIL) goes out first."""
        if not sa.delete_scheduled:
            sa.delete_scheduled = True
            self.clock.callLater(1.0, self.delete_ike, sa, True, reason)

    def delete(self, name: str) -> bool:
        """Operator-initiated delete (narctl): Delete payloads for the children and the SA."""
        for sa in list(self.sas.values()):
            if sa.name == name or sa.name.startswith(name):
                self.delete_ike(sa, notify_peer=True, reason="deleted by the operator")
                return True
        return False

    def delete_ike(self, sa: IkeSA, notify_peer: bool = True, reason: str = "",
                   keep_children: bool = False) -> None:
        """Delete an ISAKMP SA.  ``keep_children``: the peer deleted only the ISAKMP SA
        (RFC 2409 phase 2 SAs do not depend on it; strongSwan re-authenticates this way and
        moves its CHILD_SAs to the new SA): the children live on as orphans until a new SA
        of the same principal adopts them, or ``ORPHAN_GRACE`` passes."""
        if sa.state == "deleted":
            return
        keep_children = keep_children and bool(sa.children)
        if notify_peer and sa.state == "established":
            for child in list(sa.children):
                self.children.remove(sa, child, notify_peer=True)
            self.send_informational(sa, [Delete(C.PROTO_ISAKMP, 16, (sa.key,))])
        if not keep_children:
            for child in list(sa.children):
                self.children.remove(sa, child, notify_peer=False)
        was = sa.state
        sa.state = "deleted"
        self.phase1.leave_half_open(sa)
        if sa.timer is not None and sa.timer.active():
            sa.timer.cancel()
        for p in sa.pending.values():
            if p.timer is not None and p.timer.active():
                p.timer.cancel()
        self.sas.pop(sa.key, None)
        self.phase1.forget(sa)
        if keep_children:
            self.children.orphan(sa)
        else:
            self.children.release(sa)
        if was == "established":
            self.count("ike_deleted")
            log.info("ike: {name} deleted ({reason}){kept}", name=sa.name, reason=reason,
                     kept=f"; its {len(sa.children)} ESP SA pair(s) wait for a new ISAKMP SA" if keep_children else "")
        self.store_write(self.store.delete(IKE_SA.name, sa.name), sa, "removing the ISAKMP SA record")
        self.store_write(self.store.delete(ISAKMP_STATE.name, sa.key.hex()), sa, "removing the ISAKMP SA state")

    def close(self) -> None:
        self._unsubscribe_state()
        for sa in list(self.sas.values()):
            self.delete_ike(sa, notify_peer=True, reason="shutdown")
        self.children.close()
        self.drops.stop()

    # ------------------------------------------------------------------ the store
    def owner(self, sa: IkeSA) -> str:
        """The store owner of what one ISAKMP SA holds (its record, SPI leases).

        ``ike:sa:`` is a volatile owner prefix (the role's ``volatile_owners``): an SA
        lives in memory only, so what it held on disk is dropped after a crash."""
        return f"ike:sa:{sa.name}"

    def store_write(self, d: defer.Deferred, sa: IkeSA | None, what: str) -> defer.Deferred:
        """Every store write's failure is seen: counted (``store_failed``) and logged.

        Writes whose failure changes what we answer the peer are checked where they are
        made; this is for the rest (bookkeeping: records, releases), whose failure the
        operator must see but the peer need not."""
        def failed(f: Any) -> None:
            self.count("store_failed")
            log.failure("ike: {name}: store write failed: {what}", f, name=sa.name if sa else "-", what=what)
        return d.addErrback(failed)

    def publish(self, sa: IkeSA) -> None:
        """The SA's summary to the store (narctl, metrics, other processes)."""
        if sa.state == "deleted":
            return
        rec = IkeSaRecord(
            name=sa.name, remote_ip=sa.remote[0], remote_port=sa.remote[1], local_port=sa.local_port,
            state=sa.state, exchange="main" if sa.exchange == C.EXCH_MAIN else "aggressive",
            policy=sa.policy.name if sa.policy else "", peer_id=sa.peer_id_text,
            algorithms=sa.choice.describe() if sa.choice else "", natt=sa.variant.name if sa.variant else "",
            nat=("peer" if sa.nat_peer else "") + ("+local" if sa.nat_local else ""), xauth_user=sa.xauth_user,
            address=sa.address, children=len(sa.children), established=sa.established, expires=sa.expires)
        self.store_write(self.store.put(rec, owner=self.owner(sa)), sa, "the ISAKMP SA record")
        state = state_of(sa) if self.keep_state else None
        if state is not None:
            # what a standby needs to carry the SA on (sealed by a cluster's Sealer; memory only
            # otherwise); it lives as long as the SA may
            ttl = max(1.0, sa.expires + grace(sa.choice.lifetime if sa.choice else 0.0) - self.now())
            self.store_write(self.store.put(state, owner=self.owner(sa), ttl=ttl), sa, "the ISAKMP SA state")

    def _state_changed(self, change: Any) -> None:
        """An ``ike.isakmp`` record this engine did not write: a dead node's SA that
        ``narctl cluster adopt`` put into this node's view -- carry it on."""
        if change.op != "put" or change.reason == "remote":
            return
        rec = change.record
        try:
            key = bytes.fromhex(rec.cookies)
        except ValueError:
            return
        if key in self.sas:
            return  # our own SA (publish)
        owner = self.store.owner_of(ISAKMP_STATE.name, change.key) or ""
        if owner.startswith("cluster:adopted:"):
            resume(self, rec)

    # ------------------------------------------------------------------ DPD (the service's timer)
    def dpd_tick(self) -> None:
        self.informational.dpd_tick()
