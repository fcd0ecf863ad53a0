"""The IKEv2 responder's controller: datagrams in, datagrams and store writes out.

The service hands every IKE datagram whose header says major version 2 to
:meth:`IkeV2Engine.received`.  This module owns what every exchange shares -- the SA
table (by our SPI), message IDs with a window of one (§2.3), the stored response that
answers a retransmitted request without processing it again (§2.1), the Encrypted
payload and RFC 7383 fragments, our own requests and their retransmission, SA
deletion, the summary record in the store -- and decides which exchange handles a
request, in one table, :data:`ROUTES`:

* :mod:`.sa_init` -- IKE_SA_INIT: proposals, INVALID_KE_PAYLOAD, COOKIE (§2.6), NAT
  detection (§2.23), half-open limits.
* :mod:`.auth` -- IKE_AUTH: identities, PSK and certificate AUTH, EAP, the
  configuration payload, the first CHILD SA.
* :mod:`.create_child` -- CREATE_CHILD_SA: new children, child rekey, IKE SA rekey.
* :mod:`.informational` -- INFORMATIONAL: liveness both ways, Delete, MOBIKE.
* :mod:`.children` -- the esp role's records.
* :mod:`.resume` -- an established SA as an ``ike.v2sa`` record and back: a cluster's
  standby carries on a dead node's SAs, message IDs resynchronised (docs/cluster.md).

Every drop is counted by reason and logged; peer-controlled input raises only
:class:`~narsuite.ike.v2.wire.IKEv2Error` (answered with its notify when the message
authenticated), :class:`~narsuite.ike.crypto.CryptoError` (dropped) or :class:`Drop`.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from narsuite.ike.common import Drop, grace
from narsuite.ike.config import IkeConfig, PeerPolicy
from narsuite.ike.cookies import CookieJar, HalfOpenBudget
from narsuite.ike.crypto import CryptoError
from narsuite.ike.records import IKE_SA, IKEV2_STATE, IkeSaRecord
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire
from narsuite.ike.v2.rekey import Rekey
from narsuite.ike.v2.resume import MID_WINDOW, STATE_INTERVAL, resume, state_of
from narsuite.ike.v2.sa import IkeSAv2, Request
from narsuite.ike.v2.wire import IKEv2Error
from narsuite.logs import Aggregator, logger
from narsuite.packet.routing import SourceAddresses
from narsuite.ratelimit import TokenBucket

__all__ = ["IkeV2Engine", "ROUTES", "COUNTERS", "FRAGMENT_SIZE"]

log = logger()

COUNTERS = (
    "rx", "tx", "sa_init_answered", "malformed", "unknown_spi", "retransmit_answered", "bad_message_id", "busy",
    "no_policy", "no_proposal", "invalid_ke_sent", "cookie_sent", "cookie_bad", "half_open_dropped", "auth_failed",
    "decrypt_failed", "ike_established", "ike_deleted", "ike_rekeyed", "child_installed", "child_rekeyed",
    "child_deleted", "child_refused", "ts_refused", "ts_conflict", "address_failed", "liveness_sent",
    "liveness_answered",
    "peer_dead", "delete_rx", "peer_moved", "mobike_update", "mobike_checked", "mobike_check_failed",
    "fragments_rx", "fragmented_tx", "unexpected", "internal_error", "store_failed", "error_notify_rx",
    "notify_rate_limited", "rekey_sent", "rekey_failed", "rekey_collision_won", "rekey_collision_lost",
    # a dead node's sealed IKE SA carried on here (cluster adopt), or not; its message IDs
    # resynchronised (RFC 6311), or not; the peer's requests dropped while they are
    "ike_resumed", "resume_failed", "mid_synced", "mid_sync_failed", "resyncing",
)

#: (exchange type, IKE SA state) -> (part, method): the one dispatch table for requests.
#: Anything missing is "unexpected" (dropped).
ROUTES: dict[tuple[int, str], tuple[str, str]] = {
    (C.IKE_AUTH, "init"): ("auth", "received"),
    (C.IKE_AUTH, "auth"): ("auth", "eap_received"),
    (C.CREATE_CHILD_SA, "established"): ("create_child", "received"),
    (C.INFORMATIONAL, "established"): ("informational", "received"),
}

#: IKE messages larger than this go out as RFC 7383 fragments when the peer supports
#: them (§2.5.1: 1280 bytes of IP datagram for IPv4 is a safe choice)
FRAGMENT_SIZE = 1280
_IP_UDP = 20 + 8 + 4  # IPv4 + UDP + the non-ESP marker
MAX_FRAGMENTS = 64


Result = list[Any] | defer.Deferred


class IkeV2Engine:
    """The IKEv2 SA table and what every exchange shares; see the module docstring."""

    def __init__(self, cfg: IkeConfig, store: Any, clock: Any, *,
                 send: Callable[[bytes, tuple[str, int], int], None],
                 local_address: Callable[[str], str] | None = None,
                 credentials: Any = None, trust: Any = None,
                 check_password: Callable[[str, bytes], defer.Deferred] | None = None,
                 users: Any = None, metrics: Any = None) -> None:
        from narsuite.ike.v2.auth import Auth
        from narsuite.ike.v2.children import Children
        from narsuite.ike.v2.create_child import CreateChild
        from narsuite.ike.v2.informational import Informational
        from narsuite.ike.v2.sa_init import SaInit

        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.send_raw = send
        self.local_address = local_address or self._route_source
        self.credentials = credentials
        self.trust = trust
        self.check_password = check_password
        self.users = users if users is not None else cfg.users
        self.sas: dict[bytes, IkeSAv2] = {}
        self.half_open: dict[tuple[bytes, str, int], IkeSAv2] = {}
        self.budget = HalfOpenBudget(cfg.half_open_total, cfg.half_open_per_source)
        self.cookies = CookieJar(clock, slot_seconds=60.0)
        #: what bad input makes us log, aggregated (a flood costs O(1) lines per interval)
        self.drops = Aggregator(log, "ikev2 drops", clock)
        #: unprotected error answers to IKE_SA_INIT go to unauthenticated sources: limited
        self.notify_bucket = TokenBucket(cfg.unauthenticated_notify_rate, cfg.unauthenticated_notify_burst,
                                         clock)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._sources = SourceAddresses()
        self.sa_init = SaInit(self)
        self.auth = Auth(self)
        self.create_child = CreateChild(self)
        self.informational = Informational(self)
        self.children = Children(self)
        self.rekey = Rekey(self)
        #: write each established SA's ``ike.v2sa`` state (what a standby resumes); the ike
        #: service turns it off where no cluster seals that kind
        self.keep_state = True
        # a dead node's IKE SAs reach this node's view only through the store (cluster adopt)
        self._unsubscribe_state = store.subscribe(self._state_changed, kinds=[IKEV2_STATE.name])
        if metrics is not None:
            metrics.watch_counters("ikev2", "events", "IKEv2 responder events by kind", "event",
                                   lambda: self.counters)

    # ------------------------------------------------------------------ plumbing
    def policies(self) -> list[PeerPolicy]:
        return [p for p in self.cfg.peers if 2 in p.versions]

    def _route_source(self, peer_ip: str) -> str:
        if self.cfg.address:
            return self.cfg.address
        if self.cfg.listen:
            return self.cfg.listen
        return self._sources(peer_ip)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def now(self) -> float:
        return self.clock.seconds()

    def send(self, data: bytes, remote: tuple[str, int], local_port: int) -> None:
        self.count("tx")
        self.send_raw(data, remote, local_port)

    def drop(self, reason: str, addr: tuple[str, int], detail: str, sa: IkeSAv2 | None = None) -> None:
        """Count a dropped message; log it through the aggregator (the sender chooses how many)."""
        self.count(reason)
        self.drops.event(reason, "ikev2: dropped from {addr}: {reason} {detail}", addr=f"{addr[0]}:{addr[1]}",
                         detail=detail, ike_sa=sa.name if sa else "")

    def new_spi(self) -> bytes:
        while True:
            spi = secrets.token_bytes(8)
            if any(spi) and spi not in self.sas:
                return spi

    # ------------------------------------------------------------------ entry point
    def received(self, data: bytes, addr: tuple[str, int], local_port: int) -> None:
        """One IKEv2 datagram (marker stripped) from ``addr`` on our ``local_port``."""
        self.count("rx")
        sa: IkeSAv2 | None = None
        try:
            header = wire.parse_header(data)
            if header.length != len(data):
                raise IKEv2Error(C.INVALID_SYNTAX, f"header says {header.length} bytes, datagram has {len(data)}")
        except IKEv2Error as e:
            self.drop("malformed", addr, str(e))
            return
        try:
            if header.exchange == C.IKE_SA_INIT and not header.response:
                self.sa_init.request(header, data, addr, local_port)
                return
            sa = self.sas.get(header.spi_r)
            if sa is None or sa.spi_i != header.spi_i or sa.state == "deleted":
                raise Drop("unknown_spi", f"SPIs {header.spi_i.hex()}/{header.spi_r.hex()}")
            if header.response:
                self.informational.response(sa, header, data, addr, local_port)
            else:
                self.request(sa, header, data, addr, local_port)
        except Drop as d:
            self.drop(d.reason, addr, d.detail, sa)
        except IKEv2Error as e:
            self.drop("malformed" if e.notify == C.INVALID_SYNTAX else "unexpected", addr, str(e), sa)
        except CryptoError as e:
            self.drop("decrypt_failed", addr, str(e), sa)
        except Exception:
            self.count("internal_error")
            log.failure("ikev2: processing a message from {addr}", addr=f"{addr[0]}:{addr[1]}")

    def request(self, sa: IkeSAv2, header: wire.Header, data: bytes, addr: tuple[str, int], local_port: int) -> None:
        """A request under an existing SA: retransmission, window, decryption, dispatch."""
        mid = header.message_id
        if mid == sa.peer_mid - 1 and sa.last_response:
            # §2.1: a retransmitted request gets the stored response and is not processed;
            # a fragmented request is answered once, on its first fragment (RFC 7383 §2.6.1)
            if header.next_payload == C.PT_SKF and struct.unpack_from("!H", data, 32)[0] != 1:
                raise Drop("retransmit_answered", "later fragment of an answered request")
            self.count("retransmit_answered")
            for datagram in sa.last_response:
                self.send(datagram, addr, local_port)
            return
        if sa.resync == "sync":
            # carried on from a dead node, our RFC 6311 sync outstanding: the peer sends this
            # again under the ID it agrees to
            raise Drop("resyncing", f"message ID {mid} before the message ID sync completed")
        # carried on without RFC 6311: the peer's first request may be a little ahead of the
        # sealed ID (accepted once it authenticates)
        ahead = sa.resync == "window" and sa.peer_mid < mid < sa.peer_mid + MID_WINDOW
        if mid != sa.peer_mid and not ahead:
            raise Drop("bad_message_id", f"message ID {mid}, expected {sa.peer_mid}")
        if sa.busy:
            raise Drop("busy", f"message ID {mid} arrived again while it is being processed")
        route = ROUTES.get((header.exchange, sa.state))
        if route is None:
            raise Drop("unexpected", f"{C.EXCHANGE_NAMES.get(header.exchange, header.exchange)} request in "
                                     f"state {sa.state}")
        payloads = self.open(sa, header, data)
        if payloads is None:
            return  # more fragments to come
        if sa.resync:
            sa.peer_mid, sa.resync = mid, ""
        sa.last_rx = self.now()
        if sa.state == "established" and not sa.mobike:
            self.follow(sa, addr, local_port)
        part, method = route
        sa.busy = True
        d = defer.maybeDeferred(getattr(getattr(self, part), method), sa, header, payloads, addr, local_port)
        d.addCallbacks(self._answer, self._handler_failed, callbackArgs=(sa, header, addr, local_port),
                       errbackArgs=(sa, header, addr, local_port))

    def _answer(self, out: list[Any] | None, sa: IkeSAv2, header: wire.Header, addr: tuple[str, int],
                local_port: int) -> None:
        sa.busy = False
        if out is None:
            return  # the handler answered (or dropped) itself
        self.respond(sa, header, out, addr, local_port)

    def _handler_failed(self, f: Any, sa: IkeSAv2, header: wire.Header, addr: tuple[str, int],
                        local_port: int) -> None:
        sa.busy = False
        if f.check(IKEv2Error):
            e = f.value
            self.drop("refused" if e.notify != C.INVALID_SYNTAX else "malformed", addr, e.detail, sa)
            self.respond(sa, header, [wire.Notify(e.notify, e.data)], addr, local_port)
            if header.exchange == C.IKE_AUTH:
                self.delete_ike(sa, notify_peer=False, reason=e.detail)
            return
        if f.check(Drop):
            self.drop(f.value.reason, addr, f.value.detail, sa)
            return
        self.count("internal_error")
        log.failure("ikev2: {name}: handling a request", f, name=sa.name)
        self.respond(sa, header, [wire.Notify(C.TEMPORARY_FAILURE)] if header.exchange != C.IKE_AUTH
                     else [wire.Notify(C.AUTHENTICATION_FAILED)], addr, local_port)
        if header.exchange == C.IKE_AUTH:
            self.delete_ike(sa, notify_peer=False, reason="internal error")

    # ------------------------------------------------------------------ protection
    def open(self, sa: IkeSAv2, header: wire.Header, data: bytes) -> tuple[Any, ...] | None:
        """The inner payloads of a protected message, reassembled from RFC 7383 fragments
        (None until the last one arrives).  Every fragment is verified on its own."""
        assert sa.rx is not None
        outer = wire.parse_payloads(header.next_payload, data[C.HEADER_LEN:])
        last = outer[-1] if outer else None
        if isinstance(last, wire.SK):
            plain = keys.open_encrypted(data, header.length, last, sa.rx)
            return wire.parse_payloads(last.first, plain)
        if isinstance(last, wire.SKF):
            if not sa.frag_ok:
                raise IKEv2Error(C.INVALID_SYNTAX, "fragment from a peer that did not announce fragmentation")
            if last.total > MAX_FRAGMENTS:
                raise Drop("malformed", f"{last.total} fragments")
            plain = keys.open_encrypted(data, header.length, last, sa.rx)
            self.count("fragments_rx")
            if sa.fragments_total != last.total:
                sa.fragments, sa.fragments_total = {}, last.total
            sa.fragments[last.number] = plain
            if last.number == 1:
                sa.fragments[0] = bytes([last.first])
            if len(sa.fragments) < last.total + 1:
                return None
            first = sa.fragments.pop(0)[0]
            whole = b"".join(sa.fragments[i] for i in range(1, last.total + 1))
            sa.fragments, sa.fragments_total = {}, 0
            return wire.parse_payloads(first, whole)
        raise IKEv2Error(C.INVALID_SYNTAX, "protected exchange without an Encrypted payload")

    def seal(self, sa: IkeSAv2, exchange: int, mid: int, payloads: list[Any], response: bool) -> list[bytes]:
        """Our message, as one datagram or (peer supports it, too big) RFC 7383 fragments."""
        assert sa.tx is not None
        h = wire.Header(sa.spi_i, sa.spi_r, exchange, sa.flags | (C.FLAG_RESPONSE if response else 0), mid)
        one = keys.seal(h, payloads, sa.tx)
        limit = FRAGMENT_SIZE - _IP_UDP
        if len(one) <= limit or not sa.frag_ok or exchange == C.IKE_SA_INIT:
            return [one]
        self.count("fragmented_tx")
        room = limit - C.HEADER_LEN - 8 - sa.tx.overhead(limit)
        return keys.seal_fragments(h, payloads, sa.tx, max(64, room))

    def respond(self, sa: IkeSAv2, header: wire.Header, payloads: list[Any], addr: tuple[str, int],
                local_port: int) -> None:
        """Answer the request ``header`` and keep the answer for its retransmissions."""
        datagrams = self.seal(sa, header.exchange, header.message_id, payloads, response=True)
        sa.last_response = datagrams
        sa.peer_mid = header.message_id + 1
        for d in datagrams:
            self.send(d, addr, local_port)
        self.mids_moved(sa)

    # ------------------------------------------------------------------ our requests
    def send_request(self, sa: IkeSAv2, exchange: int, payloads: list[Any], kind: str,
                     on_answer: Callable[[IkeSAv2, tuple[Any, ...]], None] | None = None,
                     mid: int | None = None) -> None:
        """A request of ours; one at a time (window 1), resent on the configured schedule,
        and the SA deleted when it is never answered.  ``mid``: outside the sequence (RFC
        6311's sync is message ID 0 and does not move ours)."""
        if sa.state == "deleted":
            return
        if sa.outstanding is not None:
            sa.queue.append((exchange, payloads, kind, on_answer, mid))
            return
        if mid is None:
            mid = sa.my_mid
            sa.my_mid += 1
        req = Request(mid, self.seal(sa, exchange, mid, payloads, response=False), kind, on_answer=on_answer)
        sa.outstanding = req
        for d in req.datagrams:
            self.send(d, sa.remote, sa.local_port)
        self._arm(sa, req)
        self.mids_moved(sa)

    def _arm(self, sa: IkeSAv2, req: Request) -> None:
        delays = self.cfg.retransmit
        if req.tries < len(delays):
            req.timer = self.clock.callLater(delays[req.tries], self._resend, sa, req)

    def _resend(self, sa: IkeSAv2, req: Request) -> None:
        if sa.state == "deleted" or sa.outstanding is not req:
            return
        req.tries += 1
        if req.tries >= len(self.cfg.retransmit):
            self.count("peer_dead")
            log.warn("ikev2: {name}: no answer to our {kind} request: deleting", name=sa.name, kind=req.kind)
            self.delete_ike(sa, notify_peer=False, reason=f"{req.kind} unanswered")
            return
        for d in req.datagrams:
            self.send(d, sa.remote, sa.local_port)
        self._arm(sa, req)

    def answered(self, sa: IkeSAv2, payloads: tuple[Any, ...]) -> None:
        """The peer answered our outstanding request: run its callback, send the next one."""
        req = sa.outstanding
        assert req is not None
        if req.timer is not None and req.timer.active():
            req.timer.cancel()
        sa.outstanding = None
        if req.on_answer is not None:
            req.on_answer(sa, payloads)
        if sa.queue and sa.state != "deleted":
            exchange, ps, kind, on_answer, mid = sa.queue.pop(0)
            self.send_request(sa, exchange, ps, kind, on_answer, mid)

    # ------------------------------------------------------------------ the peer's address
    def follow(self, sa: IkeSAv2, addr: tuple[str, int], local_port: int) -> None:
        """§2.23: behind a NAT, the peer's mapping may change; authenticated messages tell
        us where it is now (MOBIKE peers move only with UPDATE_SA_ADDRESSES)."""
        if (addr, local_port) == (sa.remote, sa.local_port) or not sa.nat_peer:
            return
        self.move(sa, addr, local_port)

    def move(self, sa: IkeSAv2, addr: tuple[str, int], local_port: int) -> None:
        self.count("peer_moved")
        log.info("ikev2: {name} moved to {new}", name=sa.name, new=f"{addr[0]}:{addr[1]}")
        sa.remote, sa.local_port = addr, local_port
        self.children.peer_moved(sa)
        self.publish(sa)

    # ------------------------------------------------------------------ lifecycle
    def established(self, sa: IkeSAv2, publish: bool = True) -> None:
        """IKE_AUTH completed: the half-open slot goes back, the lifetime starts.
        ``publish`` False: the caller writes the SA's record once it is complete."""
        self.leave_half_open(sa)
        sa.state = "established"
        sa.established = self.now()
        assert sa.policy is not None
        life = sa.policy.ike_lifetime
        sa.expires = sa.established + life
        if sa.timer is not None and sa.timer.active():
            sa.timer.cancel()
        sa.timer = self.clock.callLater(life + grace(life), self._expired, sa)
        self.count("ike_established")
        if publish:
            self.publish(sa)

    def _expired(self, sa: IkeSAv2) -> None:
        if sa.state != "deleted":
            self.delete_ike(sa, notify_peer=True, reason="lifetime expired")

    def leave_half_open(self, sa: IkeSAv2) -> None:
        if sa.half_open_key is not None:
            if self.half_open.get(sa.half_open_key) is sa:
                del self.half_open[sa.half_open_key]
                self.budget.give_back(sa.half_open_key[1])
            sa.half_open_key = None

    def delete(self, name: str) -> bool:
        """Operator-initiated delete (narctl)."""
        for sa in list(self.sas.values()):
            if sa.name == name or sa.name.startswith(name):
                self.delete_ike(sa, notify_peer=True, reason="deleted by the operator")
                return True
        return False

    def delete_ike(self, sa: IkeSAv2, notify_peer: bool = True, reason: str = "",
                   children_to: IkeSAv2 | None = None) -> None:
        """Delete an IKE SA and (unless ``children_to``, an IKE SA rekey) its CHILD SAs."""
        if sa.state == "deleted":
            return
        was = sa.state
        if notify_peer and was == "established":
            # a Delete for the IKE SA implicitly closes its children (§1.4.1); sent once,
            # not waited for: the SA is gone on our side at once
            datagrams = self.seal(sa, C.INFORMATIONAL, sa.my_mid, [wire.Delete(C.PROTO_IKE)], response=False)
            for d in datagrams:
                self.send(d, sa.remote, sa.local_port)
        sa.state = "deleted"
        self.leave_half_open(sa)
        for timer in (sa.timer, sa.state_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if sa.outstanding is not None and sa.outstanding.timer is not None and sa.outstanding.timer.active():
            sa.outstanding.timer.cancel()
        if children_to is None:
            for child in list(sa.children):
                self.children.remove(sa, child)
            self.children.release(sa)
        else:
            self.children.transfer(sa, children_to)
        self.sas.pop(sa.spi_r, None)
        if was == "established":
            self.count("ike_deleted")
            log.info("ikev2: {name} deleted ({reason})", name=sa.name, reason=reason)
        self.store_write(self.store.delete(IKE_SA.name, sa.name), sa, "removing the IKE SA record")
        if self.store.get(IKEV2_STATE.name, (sa.spi_i + sa.spi_r).hex()) is not None:
            self.store_write(self.store.delete(IKEV2_STATE.name, (sa.spi_i + sa.spi_r).hex()), sa,
                             "removing the IKE SA state")

    def close(self) -> None:
        self._unsubscribe_state()
        for sa in list(self.sas.values()):
            self.delete_ike(sa, notify_peer=True, reason="shutdown")
        self.sa_init.dh.clear()
        self.drops.stop()

    # ------------------------------------------------------------------ the store
    def owner(self, sa: IkeSAv2) -> str:
        """``ike:sa:`` is a volatile owner prefix (the role's ``volatile_owners``): what an
        SA held on disk is dropped at the next start after a crash."""
        return f"ike:sa:{sa.name}"

    def lease_owner(self, sa: IkeSAv2) -> str:
        """Who holds a pool address: the EAP user (a client re-authenticating gets its
        address back), else the identity at its (NAT-mapped) address and port -- so two
        clients behind one NAT with one identity still get two addresses."""
        assert sa.policy is not None
        if sa.eap_user:
            return f"ike:lease:{sa.policy.name}:user:{sa.eap_user}"
        return f"ike:lease:{sa.policy.name}:{sa.peer_id_text}@{sa.remote[0]}:{sa.remote[1]}"

    def store_write(self, d: defer.Deferred, sa: IkeSAv2 | None, what: str) -> defer.Deferred:
        def failed(f: Any) -> None:
            self.count("store_failed")
            log.failure("ikev2: {name}: store write failed: {what}", f, name=sa.name if sa else "-", what=what)
        return d.addErrback(failed)

    def publish(self, sa: IkeSAv2) -> None:
        if sa.state == "deleted":
            return
        rec = IkeSaRecord(
            name=sa.name, remote_ip=sa.remote[0], remote_port=sa.remote[1], local_port=sa.local_port,
            state=sa.state, exchange="ikev2", policy=sa.policy.name if sa.policy else "", peer_id=sa.peer_id_text,
            algorithms=sa.choice.describe() if sa.choice else "", natt="rfc7296" if sa.natted else "",
            nat=("peer" if sa.nat_peer else "") + ("+local" if sa.nat_local else ""), xauth_user=sa.eap_user,
            address=sa.address, children=len(sa.children), established=sa.established, expires=sa.expires)
        self.store_write(self.store.put(rec, owner=self.owner(sa)), sa, "the IKE SA record")
        self.write_state(sa)

    def write_state(self, sa: IkeSAv2) -> None:
        """What a standby needs to carry the SA on (sealed by a cluster's Sealer; memory only
        otherwise); it lives as long as the SA may."""
        if sa.state_timer is not None and sa.state_timer.active():
            sa.state_timer.cancel()
        sa.state_timer = None
        state = state_of(sa) if self.keep_state else None
        if state is None or sa.state == "deleted":
            return
        sa.state_written = self.now()
        life = sa.policy.ike_lifetime if sa.policy else 0.0
        ttl = max(1.0, sa.expires + grace(life) - sa.state_written)
        self.store_write(self.store.put(state, owner=self.owner(sa), ttl=ttl), sa, "the IKE SA state")

    def mids_moved(self, sa: IkeSAv2) -> None:
        """The message IDs moved (a request answered, one of ours sent): the state is written
        again, at most once per :data:`STATE_INTERVAL` (the standby resynchronises whatever
        moved since, see :mod:`.resume`)."""
        if not self.keep_state or sa.state != "established" or (
                sa.state_timer is not None and sa.state_timer.active()):
            return
        wait = sa.state_written + STATE_INTERVAL - self.now()
        if wait <= 0:
            self.write_state(sa)
        else:
            sa.state_timer = self.clock.callLater(wait, self.write_state, sa)

    def _state_changed(self, change: Any) -> None:
        """An ``ike.v2sa`` record this engine did not write: a dead node's SA that ``narctl
        cluster adopt`` put into this node's view -- carry it on."""
        if change.op != "put" or change.reason == "remote":
            return
        try:
            spi_r = bytes.fromhex(change.record.spis[16:])
        except ValueError:
            return
        if spi_r in self.sas:
            return  # our own SA (publish)
        owner = self.store.owner_of(IKEV2_STATE.name, change.key) or ""
        if owner.startswith("cluster:adopted:"):
            resume(self, change.record)

    # ------------------------------------------------------------------ liveness (the service's timer)
    def dpd_tick(self) -> None:
        self.informational.tick()

