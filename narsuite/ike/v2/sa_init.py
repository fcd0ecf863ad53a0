"""IKE_SA_INIT (RFC 7296 §1.2): proposals, Diffie-Hellman, nonces, NAT detection, COOKIE.

What it costs an attacker to make us do work is decided here, in this order:

1. a retransmitted first message (same SPIi, address, port, bytes) gets the stored
   answer -- no new state, no DH;
2. with ``[ike] ikev2_cookie_threshold`` exchanges half open, a request without our COOKIE
   gets one (§2.6): a stateless answer, a keyed hash of its nonce, address and SPIi;
3. half-open limits per source and in total (``half_open_per_source``/``_total``, shared
   meaning with IKEv1);
4. no acceptable proposal -> NO_PROPOSAL_CHOSEN; a KE of another group than the one we
   choose -> INVALID_KE_PAYLOAD naming ours (§1.2), both stateless;
5. only then: a DH key pair, the shared secret, the keys and an SA (half open until
   IKE_AUTH completes or ``half_open_timeout`` passes).
"""

from __future__ import annotations

import functools
import secrets
import struct
from typing import TYPE_CHECKING, Any

from twisted.logger import LogLevel

from narsuite import logs
from narsuite.ike.config import PeerPolicy
from narsuite.ike.crypto import CryptoError
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire
from narsuite.ike.v2.proposals import IkeProposal, choose_ike, parse_ike
from narsuite.ike.v2.sa import IkeSAv2
from narsuite.ike.v2.wire import IKEv2Error
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.ike.v2.engine import IkeV2Engine

__all__ = ["SaInit", "DhValues", "allowed_proposals"]

log = logger()

ZERO_SPI = b"\0" * 8


@functools.lru_cache(maxsize=256)
def allowed_proposals(policies: tuple[PeerPolicy, ...]) -> tuple[IkeProposal, ...]:
    """The IKE proposals of these policies, parsed once."""
    return tuple(parse_ike(p) for pol in policies for p in pol.ikev2_proposals)


class DhValues:
    """Our Diffie-Hellman value for IKE_SA_INIT, one per group, serving new exchanges for at
    most ``[ike] ikev2_dh_reuse`` seconds (RFC 7296 §2.12), then forgotten.

    Why: a modp2048 key pair costs about 0.24 ms, a sixth of what an exchange costs us; under
    load one pair then serves hundreds of exchanges.  Why it stays safe:

    * every peer value is checked before use, reuse or not (``keys.group(n).shared``): the
      tests RFC 6989 makes mandatory for reused values -- the point on the curve for ECP, and
      for the safe-prime MODP groups nothing beyond 1 < y < p-1 -- and RFC 8031's non-zero
      result for curve25519; so a peer learns nothing about our exponent from its own
      exchange, and each IKE SA's keys still come from its own fresh nonces and SPIs;
    * forward secrecy is lost only inside the window: the value is dropped by a timer when
      its seconds are up, even if no exchange comes (an IKE SA lives for hours; one deleted
      within a second of its creation stays recoverable from our memory for at most that
      second);
    * rekeys and PFS in CREATE_CHILD_SA always draw a fresh value (they are not under load).

    ``0`` draws a fresh value for every exchange, as strongSwan does.
    """

    def __init__(self, clock: Any, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self._values: dict[int, tuple[Any, bytes]] = {}
        self._timers: dict[int, Any] = {}
        #: fresh key pairs drawn (the rest of the exchanges reused one)
        self.generated = 0

    def take(self, number: int) -> tuple[Any, bytes]:
        """(private, public) for group ``number``."""
        value = self._values.get(number)
        if value is None:
            value = keys.group(number).generate()
            self.generated += 1
            if self.seconds > 0:
                self._values[number] = value
                self._timers[number] = self.clock.callLater(self.seconds, self._forget, number)
        return value

    def _forget(self, number: int) -> None:
        self._values.pop(number, None)
        self._timers.pop(number, None)

    def clear(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._values.clear()
        self._timers.clear()


class SaInit:
    def __init__(self, engine: IkeV2Engine) -> None:
        self.engine = engine
        self.dh = DhValues(engine.clock, engine.cfg.ikev2_dh_reuse)

    def unprotected(self, header: wire.Header, payloads: list[Any], addr: tuple[str, int], local_port: int,
                    limited: bool = True) -> None:
        """A stateless answer (COOKIE, INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN): SPIr zero.

        Error answers go to a source nobody has authenticated: they are held to
        ``unauthenticated_notify_rate`` (counted ``notify_rate_limited`` beyond it).  A
        COOKIE is not (``limited=False``): it is what lets real clients in during a flood."""
        if limited and not self.engine.notify_bucket.take():
            self.engine.count("notify_rate_limited")
            return
        h = wire.Header(header.spi_i, ZERO_SPI, C.IKE_SA_INIT, C.FLAG_RESPONSE, 0)
        self.engine.send(wire.build_message(h, payloads), addr, local_port)

    def request(self, header: wire.Header, data: bytes, addr: tuple[str, int], local_port: int) -> None:
        e = self.engine
        if header.message_id != 0 or header.spi_r != ZERO_SPI or not header.initiator:
            e.drop("unexpected", addr, "IKE_SA_INIT request with a message ID, an SPIr or without the I flag")
            return
        key = (header.spi_i, addr[0], addr[1])
        old = e.half_open.get(key)
        if old is not None:
            if old.init_request == data:
                e.count("retransmit_answered")
                e.send(old.init_response, addr, local_port)
            else:
                e.drop("unexpected", addr, "another IKE_SA_INIT with the SPIi of one in progress")
            return
        try:
            payloads = wire.parse_payloads(header.next_payload, data[C.HEADER_LEN:])
        except IKEv2Error as err:
            e.drop("malformed", addr, err.detail)
            self.unprotected(header, [wire.Notify(err.notify, err.data)], addr, local_port)
            return
        policies = tuple(p for p in e.policies() if p.allows_remote(addr[0]))
        if not policies:
            e.drop("no_policy", addr, "no IKEv2 policy for this address")
            self.unprotected(header, [wire.Notify(C.NO_PROPOSAL_CHOSEN)], addr, local_port)
            return
        sa_p = wire.find(payloads, wire.SA)
        ke = wire.find(payloads, wire.KE)
        nonce = wire.find(payloads, wire.Nonce)
        if sa_p is None or ke is None or nonce is None or not 16 <= len(nonce.data) <= 256:
            e.drop("malformed", addr, "IKE_SA_INIT without SA, KE or a 16..256-byte nonce")
            self.unprotected(header, [wire.Notify(C.INVALID_SYNTAX)], addr, local_port)
            return
        ns = wire.notifies(payloads)
        if len(e.half_open) >= e.cfg.ikev2_cookie_threshold:
            cookie = ns.get(C.COOKIE)
            who = (addr[0], 0)
            if cookie is None or not e.cookies.valid(who, header.spi_i + nonce.data, cookie.data):
                if cookie is not None:
                    e.count("cookie_bad")
                e.count("cookie_sent")
                self.unprotected(header, [wire.Notify(C.COOKIE, e.cookies.cookie(who, header.spi_i + nonce.data))],
                                 addr, local_port, limited=False)
                return
        refused = e.budget.refuse(addr[0])
        if refused:
            e.drop("half_open_dropped", addr, refused)
            return
        got = choose_ike(sa_p, allowed_proposals(policies))
        if got is None:
            e.drop("no_proposal", addr, "no acceptable IKE proposal")
            self.unprotected(header, [wire.Notify(C.NO_PROPOSAL_CHOSEN)], addr, local_port)
            return
        choice, number = got
        if ke.group != choice.dh:
            e.count("invalid_ke_sent")
            e.drops.event("invalid_ke_sent", "ikev2: {addr}: KE of group {got}, we chose {want}: INVALID_KE_PAYLOAD",
                          addr=f"{addr[0]}:{addr[1]}", got=ke.group, want=choice.dh)
            self.unprotected(header, [wire.Notify(C.INVALID_KE_PAYLOAD, struct.pack("!H", choice.dh))], addr,
                             local_port)
            return
        group = keys.group(choice.dh)
        private, public = self.dh.take(choice.dh)
        try:
            gir = group.shared(private, ke.data)
        except CryptoError as err:
            e.drop("malformed", addr, str(err))
            self.unprotected(header, [wire.Notify(C.INVALID_SYNTAX)], addr, local_port)
            return
        spi_r = e.new_spi()
        ni, nr = nonce.data, secrets.token_bytes(32)
        k = keys.derive_ike_keys(choice.prf_name, keys.skeyseed(choice.prf_name, ni, nr, gir), ni, nr,
                                 header.spi_i, spi_r, choice.enc_key_len, choice.integ_key_len)
        local_ip = e.local_address(addr[0])
        sa = IkeSAv2(header.spi_i, spi_r, addr, local_port, local_ip, e.now(), candidates=list(policies),
                     choice=choice, keys=k, ni=ni, nr=nr, init_request=bytes(data))
        sa.rx = keys.SKCipher(choice.encr, k.sk_ei, choice.integ, k.sk_ai)
        sa.tx = keys.SKCipher(choice.encr, k.sk_er, choice.integ, k.sk_ar)
        sa.peer_mid = 1
        out: list[Any] = [wire.SA((choice.proposal(number),)), wire.KE(choice.dh, public), wire.Nonce(nr)]
        sources = [p for p in payloads if isinstance(p, wire.Notify) and p.type == C.NAT_DETECTION_SOURCE_IP]
        dest = ns.get(C.NAT_DETECTION_DESTINATION_IP)
        if sources or dest:
            seen = keys.natd_hash(header.spi_i, ZERO_SPI, addr[0], addr[1])
            sa.nat_peer = not any(secrets.compare_digest(s.data, seen) for s in sources)
            ours = keys.natd_hash(header.spi_i, ZERO_SPI, local_ip, local_port)
            sa.nat_local = dest is not None and not secrets.compare_digest(dest.data, ours)
            out += [wire.Notify(C.NAT_DETECTION_SOURCE_IP, keys.natd_hash(header.spi_i, spi_r, local_ip, local_port)),
                    wire.Notify(C.NAT_DETECTION_DESTINATION_IP,
                                keys.natd_hash(header.spi_i, spi_r, addr[0], addr[1]))]
        out += e.auth.init_extras(sa, ns)
        if C.IKEV2_FRAGMENTATION_SUPPORTED in ns:
            sa.frag_ok = True
            out.append(wire.Notify(C.IKEV2_FRAGMENTATION_SUPPORTED))
        response = wire.build_message(wire.Header(header.spi_i, spi_r, C.IKE_SA_INIT, C.FLAG_RESPONSE, 0), out)
        sa.init_response = response
        e.sas[spi_r] = sa
        e.half_open[key] = sa
        sa.half_open_key = key
        e.budget.take(addr[0])
        e.count("sa_init_answered")
        sa.timer = e.clock.callLater(e.cfg.half_open_timeout, self._timeout, sa)
        e.send(response, addr, local_port)
        if logs.enabled(LogLevel.debug):  # Twisted's emit and filter: 1 % of an exchange, for nothing
            log.debug("ikev2: {name}: IKE_SA_INIT from {addr}: {alg}{nat}", name=sa.name,
                      addr=f"{addr[0]}:{addr[1]}",
                      alg=choice.describe(), nat=", peer behind NAT" if sa.nat_peer else "")

    def _timeout(self, sa: IkeSAv2) -> None:
        if sa.state in ("init", "auth"):
            self.engine.drop("half_open_dropped", sa.remote, "IKE_AUTH did not complete in time", sa)
            self.engine.delete_ike(sa, notify_peer=False, reason="half-open timeout")
