"""The IKEv1 responder's controller: datagrams in, datagrams and store writes out.

The service frames (ports 500 and 4500, the non-ESP marker) and calls
:meth:`IkeEngine.received`; this module decides.  Exchanges, by the RFC that
defines them:

* Main Mode (RFC 2409 §5): MM1 SA -> MM2; MM3 KE,Ni,NAT-D -> MM4; MM5 ID,HASH_I|SIG
  (encrypted) -> MM6.  With a PSK the peer's identity is only known after MM5 is
  decrypted, so every PSK a policy allows for the source address is tried (the
  HASH_I that verifies names the policy): two road warriors behind one NAT with one
  group PSK need nothing more.
* Aggressive Mode: AM1 SA,KE,Ni,ID -> AM2 (authenticated); AM3 HASH_I.
* Quick Mode (§5.5), informational (§5.7: Delete, INITIAL-CONTACT, DPD RFC 3706),
  transaction (XAUTH, mode-config; :mod:`narsuite.ike.modecfg`).
* NAT-T (RFC 3947, drafts 02/02\\n/03, the 004 draft): :mod:`narsuite.ike.natt`.

Rules that hold everywhere: a retransmitted request is answered with the stored
reply and never processed again; the IV chain moves only on messages whose HASH
verified; half-open phase-1 state is bounded per source and in total, and excess
MM1/AM1 are dropped before any Diffie-Hellman work; every drop is counted and
logged with its reason.  Negotiated ESP SAs go to the store as ``esp.peer`` /
``esp.sa`` records (:mod:`narsuite.sadb`), where the esp role picks them up.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from narsuite.ike import constants as C
from narsuite.ike import crypto, ids, isakmp, natt, proposals
from narsuite.ike.config import IkeConfig, PeerPolicy, network
from narsuite.ike.isakmp import (
    AttributePayload,
    Certificate,
    CertificateRequest,
    Delete,
    Hash,
    Identification,
    ISAKMPError,
    KeyExchange,
    NatD,
    NatOA,
    Nonce,
    Notification,
    SecurityAssociation,
    Signature,
    VendorID,
)
from narsuite.ike.records import IKE_SA, IkeSaRecord
from narsuite.ike.sa import Child, IkeSA, Pending, QuickMode
from narsuite.logs import logger
from narsuite.sadb import PEER, SA, SA_KIND, Peer

__all__ = ["IkeEngine", "COUNTERS"]

log = logger()

ZERO8 = bytes(8)
#: how long ESP SAs outlive an ISAKMP SA the peer deleted, waiting for its successor
ORPHAN_GRACE = 60.0

COUNTERS = (
    "rx", "tx", "malformed", "unknown_cookie", "retransmit_answered", "duplicate", "no_policy",
    "no_proposal", "half_open_dropped", "auth_failed", "bad_hash", "decrypt_failed", "ike_established",
    "ike_deleted", "child_installed", "child_deleted", "quick_refused", "ts_refused", "dpd_sent",
    "dpd_answered", "dpd_dead", "xauth_ok", "xauth_failed", "modecfg_done", "notify_rx", "delete_rx",
    "internal_error", "initial_contact", "expired", "unexpected", "peer_moved", "refused",
)

_ESP_KEYS = {("aes-gcm-16", 128): 20, ("aes-gcm-16", 256): 36, ("aes-cbc", 128): 16, ("aes-cbc", 256): 32}
_INTEG_KEYS = {None: 0, "hmac-sha1-96": 20, "hmac-sha256-128": 32}


class Drop(Exception):
    """Drop the message: counted under ``reason``, logged with ``detail``, nothing sent."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def _grace(lifetime: float) -> float:
    """How long past the negotiated lifetime we keep an SA.  The initiator rekeys or
    re-authenticates *at* the lifetime it proposed (strongSwan proposes its rekey time);
    deleting at that very second would race its new SA.  The initiator is the one that
    rekeys in IKEv1, so the responder waits a little longer."""
    return min(max(30.0, lifetime * 0.1), 600.0)


def _body(p: Any) -> bytes:
    """A payload's body (no generic header): what HASH_I/SAi_b/IDii_b cover."""
    return isakmp.build_payloads([p])[4:]


class IkeEngine:
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
        self.half_open: dict[tuple[bytes, str, int], IkeSA] = {}
        self.half_open_by_ip: Counter[str] = Counter()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        #: NAT-T variants we answer (the service drops the 004 draft when no esp role
        #: carries its ESP on UDP 500)
        self.natt_variants: tuple[str, ...] = tuple(cfg.natt)
        self._route_cache: dict[str, str] = {}
        self.children_by_out: dict[int, tuple[IkeSA, Child]] = {}
        #: (CKY-I, address, port) of every live SA's first message: a late retransmission
        #: of MM1/AM1 is answered from the SA, not taken for a new exchange
        self.first_messages: dict[tuple[bytes, str, int], IkeSA] = {}
        #: principal -> a deleted ISAKMP SA whose ESP SAs wait for its successor
        self.orphans: dict[tuple[str, str, str], IkeSA] = {}
        self.on_established: Callable[[IkeSA], None] | None = None
        if metrics is not None:
            metrics.watch_counters("ike", "events", "IKE responder events by kind", "event",
                                   lambda: self.counters)

    # ------------------------------------------------------------------ plumbing
    def _route_source(self, peer_ip: str) -> str:
        """Our address towards ``peer_ip`` as the kernel would choose it (for NAT-D and
        IDs when the config gives none): a connected UDP socket sends nothing."""
        if self.cfg.address:
            return self.cfg.address
        if self.cfg.listen:
            return self.cfg.listen
        cached = self._route_cache.get(peer_ip)
        if cached is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.connect((peer_ip, 9))
                cached = s.getsockname()[0]
            except OSError:
                cached = "0.0.0.0"
            finally:
                s.close()
            if len(self._route_cache) > 4096:
                self._route_cache.clear()
            self._route_cache[peer_ip] = cached
        return cached

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _send(self, sa: IkeSA | None, data: bytes, remote: tuple[str, int], local_port: int) -> None:
        self._count("tx")
        self.send_raw(data, remote, local_port)

    def _reply(self, sa: IkeSA, digest: bytes, datagrams: list[bytes]) -> None:
        sa.replies[digest] = datagrams
        if len(sa.replies) > 16:
            sa.replies.pop(next(iter(sa.replies)))
        for d in datagrams:
            self._send(sa, d, sa.remote, sa.local_port)

    def _now(self) -> float:
        return self.clock.seconds()

    # ------------------------------------------------------------------ entry point
    def _answer_retransmission(self, sa: IkeSA, digest: bytes) -> bool:
        """A message we already answered (same digest): send the same answer again, True."""
        cached = sa.replies.get(digest)
        if cached is None:
            return False
        self._count("retransmit_answered")
        for d in cached:
            self._send(sa, d, sa.remote, sa.local_port)
        return True

    def received(self, data: bytes, addr: tuple[str, int], local_port: int) -> None:
        """One IKE datagram (marker stripped) from ``addr`` on our ``local_port``."""
        self._count("rx")
        try:
            header = isakmp.parse_header(data)
        except ISAKMPError as e:
            self._drop("malformed", addr, str(e))
            return
        sa: IkeSA | None = None
        try:
            if header.rcookie == ZERO8:
                self._phase1_start(header, data, addr, local_port)
                return
            sa = self.sas.get(header.icookie + header.rcookie)
            if sa is None or sa.state == "deleted":
                raise Drop("unknown_cookie", f"cookies {header.icookie.hex()}/{header.rcookie.hex()}")
            digest = hashlib.sha256(data).digest()[:16]
            if self._answer_retransmission(sa, digest):
                return
            if digest in sa.seen:
                raise Drop("duplicate", "retransmission of a message that needs no answer")
            self._dispatch(sa, header, data, addr, local_port, digest)
        except Drop as d:
            self._drop(d.reason, addr, d.detail, sa)
        except ISAKMPError as e:
            self._drop("malformed" if e.notify in (C.PAYLOAD_MALFORMED, C.INVALID_PAYLOAD_TYPE) else "refused",
                       addr, str(e), sa)
            self._notify_error(sa, header, addr, local_port, e.notify)
        except crypto.CryptoError as e:
            self._drop("decrypt_failed", addr, str(e), sa)
        except Exception:
            self._count("internal_error")
            log.failure("ike: processing a message from {addr}", addr=f"{addr[0]}:{addr[1]}")

    def _drop(self, reason: str, addr: tuple[str, int], detail: str, sa: IkeSA | None = None) -> None:
        self._count(reason)
        log.info("ike: dropped from {addr}: {reason} {detail}", addr=f"{addr[0]}:{addr[1]}", reason=reason,
                 detail=detail, ike_sa=sa.name if sa else "")

    def _notify_error(self, sa: IkeSA | None, header: isakmp.Header, addr: tuple[str, int], local_port: int,
                      notify: int) -> None:
        """Tell the peer why (unprotected before phase 1 completes, protected after)."""
        n = Notification(notify, C.PROTO_ISAKMP, header.icookie + header.rcookie)
        if sa is not None and sa.state == "established":
            self._send_informational(sa, [n])
            return
        msg = isakmp.build_message(isakmp.Header(header.icookie, header.rcookie, C.EXCH_INFORMATIONAL), [n])
        self._send(sa, msg, addr, local_port)

    def _dispatch(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
                  digest: bytes) -> None:
        ex = header.exchange
        if ex == C.EXCH_MAIN and header.message_id == 0 and sa.exchange == C.EXCH_MAIN:
            if sa.state == "mm2" and not header.encrypted:
                self._mm3(sa, header, data, digest)
            elif sa.state == "mm4" and header.encrypted:
                self._mm5(sa, header, data, addr, local_port, digest)
            else:
                raise Drop("unexpected", f"main mode message in state {sa.state}")
        elif ex == C.EXCH_AGGRESSIVE and header.message_id == 0 and sa.exchange == C.EXCH_AGGRESSIVE:
            if sa.state != "am2":
                raise Drop("unexpected", f"aggressive mode message in state {sa.state}")
            self._am3(sa, header, data, addr, local_port, digest)
        elif sa.state != "established":
            if ex == C.EXCH_INFORMATIONAL and not header.encrypted:
                msg = isakmp.parse_message(data)
                for n in isakmp.find_all(msg.payloads, Notification):
                    self._count("notify_rx")
                    log.warn("ike: {peer} says {what} during phase 1", peer=f"{addr[0]}:{addr[1]}",
                             what=C.NOTIFY_NAMES.get(n.notify_type, n.notify_type))
                self._delete_ike(sa, notify_peer=False, reason="peer gave up during phase 1")
                return
            raise Drop("unexpected", f"exchange {C.EXCHANGE_NAMES.get(ex, ex)} before phase 1 completed")
        elif not header.encrypted:
            raise Drop("unexpected", "unencrypted message after phase 1")
        elif ex == C.EXCH_QUICK:
            self._quick(sa, header, data, addr, local_port, digest)
        elif ex == C.EXCH_INFORMATIONAL:
            self._informational(sa, header, data, addr, local_port, digest)
        elif ex == C.EXCH_TRANSACTION:
            self._transaction(sa, header, data, addr, local_port, digest)
        else:
            raise ISAKMPError(C.UNSUPPORTED_EXCHANGE_TYPE, f"exchange {ex}")

    # ------------------------------------------------------------------ phase 1 start
    def _phase1_start(self, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int) -> None:
        if header.exchange not in (C.EXCH_MAIN, C.EXCH_AGGRESSIVE) or header.message_id or header.encrypted:
            name = C.EXCHANGE_NAMES.get(header.exchange, header.exchange)
            raise Drop("unexpected", f"{name} without a responder cookie")
        key = (header.icookie, addr[0], addr[1])
        existing = self.half_open.get(key) or self.first_messages.get(key)
        if existing is not None:
            if self._answer_retransmission(existing, hashlib.sha256(data).digest()[:16]):
                return
            raise Drop("duplicate", "a different first message with a cookie already in use")
        if self.half_open_by_ip[addr[0]] >= self.cfg.half_open_per_source:
            raise Drop("half_open_dropped", f"{addr[0]} has {self.cfg.half_open_per_source} phase 1 exchanges open")
        if len(self.half_open) >= self.cfg.half_open_total:
            raise Drop("half_open_dropped", f"{self.cfg.half_open_total} phase 1 exchanges open in all")
        msg = isakmp.parse_message(data)
        policies = [p for p in self.cfg.peers if p.allows_remote(addr[0])]
        if header.exchange == C.EXCH_AGGRESSIVE:
            policies = [p for p in policies if p.aggressive]
        if not policies:
            self._count("no_policy")
            log.warn("ike: no [[ike.peers]] entry accepts {ip}", ip=addr[0])
            raise ISAKMPError(C.NO_PROPOSAL_CHOSEN, f"no policy for {addr[0]}")
        isakmp.require_known(msg.payloads)
        offer = isakmp.find(msg.payloads, SecurityAssociation)
        if offer is None:
            raise ISAKMPError(C.PAYLOAD_MALFORMED, "first message without an SA payload")
        if header.exchange == C.EXCH_AGGRESSIVE:
            ident = isakmp.find(msg.payloads, Identification)
            if ident is None:
                raise ISAKMPError(C.PAYLOAD_MALFORMED, "aggressive mode without an ID")
            policies = [p for p in policies if ids.id_matches(p.id, ident)]
            if not policies:
                self._count("no_policy")
                raise ISAKMPError(C.INVALID_ID_INFORMATION, f"no policy for identity {ids.id_text(ident)!r}")
        try:
            choice, candidates = proposals.choose_phase1(offer, policies)
        except ISAKMPError as e:
            if e.notify == C.NO_PROPOSAL_CHOSEN:
                self._count("no_proposal")
                log.warn("ike: no acceptable phase 1 proposal from {ip}: {detail}", ip=addr[0], detail=e.detail)
            raise
        vids = [v.data for v in isakmp.find_all(msg.payloads, VendorID)]
        variant = natt.choose_variant(vids, self.natt_variants, tuple(self.cfg.espthrunat_modes))  # type: ignore[arg-type]
        now = self._now()
        sa = IkeSA(icky=header.icookie, rcky=crypto.random_cookie(), exchange=header.exchange, remote=addr,
                   local_port=local_port, local_ip=self.local_address(addr[0]), created=now, candidates=candidates,
                   choice=choice, sai_b=_body(offer), variant=variant, peer_dpd=C.VID_DPD in vids,
                   peer_unity=C.VID_CISCO_UNITY in vids,
                   last_rx=now)
        self.sas[sa.key] = sa
        self.half_open[key] = sa
        self.first_messages[key] = sa
        sa.first_key = key
        self.half_open_by_ip[addr[0]] += 1
        sa.timer = self.clock.callLater(self.cfg.half_open_timeout, self._half_open_expired, sa, key)
        digest = hashlib.sha256(data).digest()[:16]
        our_vids = self._our_vids(sa)
        response_sa = proposals.phase1_response(offer, choice)
        if header.exchange == C.EXCH_MAIN:
            payloads: list[Any] = [response_sa, *our_vids]
            if variant is not None and variant.name == "espthrunat":
                payloads.append(NatD(natt.espthrunat_hash(addr, (sa.local_ip, local_port)), C.PT_NAT_D_DRAFT))
            sa.state = "mm2"
            self._reply(sa, digest, [self._plain(sa, C.EXCH_MAIN, payloads)])
        else:
            try:
                self._am1(sa, msg, response_sa, our_vids, digest)
            except Exception:
                self._delete_ike(sa, notify_peer=False, reason="bad first aggressive mode message")
                raise
        self._publish(sa)

    def _our_vids(self, sa: IkeSA) -> list[VendorID]:
        out = []
        if sa.variant is not None:
            out.append(VendorID(sa.variant.vid))
        out.append(VendorID(C.VID_DPD))
        if sa.choice is not None and sa.choice.xauth:
            out.append(VendorID(C.VID_XAUTH))
        return out

    def _plain(self, sa: IkeSA, exchange: int, payloads: list[Any]) -> bytes:
        return isakmp.build_message(isakmp.Header(sa.icky, sa.rcky, exchange), payloads)

    def _half_open_expired(self, sa: IkeSA, key: tuple[bytes, str, int]) -> None:
        sa.timer = None
        if sa.state != "established":
            log.info("ike: phase 1 with {peer} did not complete in {t:.0f} s", peer=f"{sa.remote[0]}:{sa.remote[1]}",
                     t=self.cfg.half_open_timeout)
            self._count("expired")
            self._delete_ike(sa, notify_peer=False, reason="half-open timeout")

    def _leave_half_open(self, sa: IkeSA) -> None:
        key = sa.first_key
        if key is not None and self.half_open.get(key) is sa:
            del self.half_open[key]
            self.half_open_by_ip[key[1]] -= 1
            if self.half_open_by_ip[key[1]] <= 0:
                del self.half_open_by_ip[key[1]]

    # ------------------------------------------------------------------ NAT detection
    def _detect_nat(self, sa: IkeSA, natds: list[NatD], addr: tuple[str, int], local_port: int) -> None:
        """RFC 3947 §3.2: the first hash is us as the peer addressed us, the rest are the
        peer's own addresses; the 004 draft has one hash over both ends."""
        v = sa.variant
        if v is None:
            return
        want = v.natd_type
        natds = [n for n in natds if n.payload_type == want]
        if not natds:
            return  # the peer announced NAT-T but sent no NAT-D: treat as no NAT
        if v.name == "espthrunat":
            ours = natt.espthrunat_hash(addr, (sa.local_ip, local_port))
            sa.nat_peer = not crypto.constant_time_equal(ours, natds[0].hash)
            return
        assert sa.choice is not None
        h = sa.choice.hash
        us = crypto.natd_hash(h, sa.icky, sa.rcky, sa.local_ip, local_port)
        them = crypto.natd_hash(h, sa.icky, sa.rcky, addr[0], addr[1])
        sa.nat_local = natds[0].hash != us
        sa.nat_peer = not any(n.hash == them for n in natds[1:])

    def _our_natds(self, sa: IkeSA, addr: tuple[str, int], local_port: int) -> list[NatD]:
        v = sa.variant
        if v is None:
            return []
        if v.name == "espthrunat":
            return [NatD(natt.espthrunat_hash(addr, (sa.local_ip, local_port)), C.PT_NAT_D_DRAFT)]
        assert sa.choice is not None
        remote, local = natt.natd_hashes(sa.choice.hash, sa.icky, sa.rcky, addr, (sa.local_ip, local_port))
        return [NatD(remote, v.natd_type), NatD(local, v.natd_type)]

    # ------------------------------------------------------------------ Main Mode
    def _dh(self, sa: IkeSA, ke: KeyExchange | None) -> None:
        """Our DH value and g^xy; the peer's KE checked first (INVALID-KEY-INFORMATION)."""
        assert sa.choice is not None
        if ke is None:
            raise ISAKMPError(C.PAYLOAD_MALFORMED, "no KE payload")
        group = crypto.group(sa.choice.group)
        private, public = group.generate()
        try:
            sa.gxy = group.shared(private, ke.data)  # validates the peer's value first
        except crypto.CryptoError as e:
            raise ISAKMPError(C.INVALID_KEY_INFORMATION, str(e)) from None
        sa.gxi, sa.gxr = ke.data, public

    def _nonce(self, payloads: tuple[Any, ...]) -> bytes:
        n = isakmp.find(payloads, Nonce)
        if n is None or not 8 <= len(n.data) <= 256:
            raise ISAKMPError(C.PAYLOAD_MALFORMED, "nonce missing or not 8..256 bytes")
        return n.data

    def _mm3(self, sa: IkeSA, header: isakmp.Header, data: bytes, digest: bytes) -> None:
        msg = isakmp.parse_message(data)
        isakmp.require_known(msg.payloads)
        sa.ni = self._nonce(msg.payloads)
        self._dh(sa, isakmp.find(msg.payloads, KeyExchange))
        sa.nr = crypto.random_nonce(32)
        self._detect_nat(sa, isakmp.find_all(msg.payloads, NatD), sa.remote, sa.local_port)
        payloads: list[Any] = [KeyExchange(sa.gxr), Nonce(sa.nr), *self._our_natds(sa, sa.remote, sa.local_port)]
        if any(p.auth == "rsa" for p in sa.candidates) and self.trust is not None:
            payloads += [CertificateRequest(C.CERT_X509_SIGNATURE, dn) for dn in self.trust.ca_subjects_der()]
        sa.state = "mm4"
        self._reply(sa, digest, [self._plain(sa, C.EXCH_MAIN, payloads)])

    def _phase1_crypto(self, sa: IkeSA, skeyid: bytes) -> tuple[crypto.Phase1Keys, crypto.ISAKMPCrypto]:
        assert sa.choice is not None
        ch = sa.choice
        keys = crypto.derive_phase1(ch.hash, skeyid, sa.gxy, sa.icky, sa.rcky)
        return keys, crypto.ISAKMPCrypto(ch.cipher, keys.encryption_key(ch.key_len), ch.hash, sa.gxi, sa.gxr)

    def _open(self, cr: crypto.ISAKMPCrypto, header: isakmp.Header, data: bytes) -> tuple[bytes, bytes, tuple]:
        """Decrypt (without moving the IV): (ciphertext, payload chain bytes, payloads)."""
        ct = bytes(data[C.HEADER_LEN:header.length])
        plain = cr.decrypt(header.message_id, ct)
        chain, _pad = crypto.payload_chain(plain, header.next_payload)
        return ct, chain, isakmp.parse_payloads(header.next_payload, chain)

    def _mm5(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
             digest: bytes) -> None:
        assert sa.choice is not None
        ch = sa.choice
        tried = 0
        if ch.base_auth == C.AUTH_PSK:
            secrets_seen: dict[bytes, list[PeerPolicy]] = {}
            for p in sa.candidates:
                if p.auth == "psk":
                    secrets_seen.setdefault(p.secret, []).append(p)
            for psk, pols in secrets_seen.items():
                skeyid = crypto.skeyid_psk(ch.hash, psk, sa.ni, sa.nr)
                keys, cr = self._phase1_crypto(sa, skeyid)
                tried += 1
                try:
                    ct, chain, payloads = self._open(cr, header, data)
                    ident = isakmp.find(payloads, Identification)
                    got = isakmp.find(payloads, Hash)
                except (crypto.CryptoError, ISAKMPError):
                    continue
                if ident is None or got is None:
                    continue
                expect = crypto.hash_i(ch.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, _body(ident))
                if not crypto.constant_time_equal(expect, got.data):
                    continue
                matching = [p for p in pols if ids.id_matches(p.id, ident)]
                if not matching:
                    self._count("no_policy")
                    raise ISAKMPError(C.INVALID_ID_INFORMATION, f"no policy with this PSK for {ids.id_text(ident)!r}")
                cr.accept(0, ct)
                sa.keys, sa.crypto, sa.policy = keys, cr, matching[0]
                self._peer_identity(sa, ident, payloads)
                idr = self._our_id(sa)
                hr = crypto.hash_r(ch.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, _body(idr))
                self._float(sa, addr, local_port)
                reply = self._encrypted_phase1(sa, C.EXCH_MAIN, [idr, Hash(hr)])
                self._phase1_done(sa, digest, [reply])
                return
            log.warn("ike: Main Mode from {ip}: HASH_I did not verify with any of {n} pre-shared key(s) "
                     "allowed for this address (wrong PSK?)", ip=addr[0], n=tried)
            self._delete_ike(sa, notify_peer=False, reason="authentication failed")
            raise Drop("auth_failed", "no PSK verified")
        # RSA signatures: SKEYID needs no secret, the certificate names the policy.
        skeyid = crypto.skeyid_sig(ch.hash, sa.ni, sa.nr, sa.gxy)
        keys, cr = self._phase1_crypto(sa, skeyid)
        ct, chain, payloads = self._open(cr, header, data)
        ident = isakmp.find(payloads, Identification)
        sig = isakmp.find(payloads, Signature)
        if ident is None or sig is None:
            raise ISAKMPError(C.PAYLOAD_MALFORMED, "MM5 without ID and SIG (wrong key?)")
        policy = self._verify_signature(sa, ident, payloads, sig, skeyid, initiator=True)
        cr.accept(0, ct)
        sa.keys, sa.crypto, sa.policy = keys, cr, policy
        self._peer_identity(sa, ident, payloads)
        self._float(sa, addr, local_port)
        reply = self._encrypted_phase1(sa, C.EXCH_MAIN, self._our_auth_payloads(sa, skeyid))
        self._phase1_done(sa, digest, [reply])

    def _verify_signature(self, sa: IkeSA, ident: Identification, payloads: tuple, sig: Signature, skeyid: bytes,
                          initiator: bool) -> PeerPolicy:
        from narsuite.ike import certs

        assert sa.choice is not None
        if self.trust is None:
            raise ISAKMPError(C.AUTHENTICATION_FAILED, "no CA configured")
        chain = [c.data for c in isakmp.find_all(payloads, Certificate) if c.encoding == C.CERT_X509_SIGNATURE]
        if not chain:
            raise ISAKMPError(C.CERTIFICATE_UNAVAILABLE, "the peer sent no X.509 certificate")
        try:
            cert = self.trust.verify(chain, now=None)
        except certs.CertificateError as e:
            self._count("auth_failed")
            log.warn("ike: certificate from {ip} refused: {why}", ip=sa.remote[0], why=str(e))
            raise ISAKMPError(C.INVALID_CERTIFICATE, str(e)) from None
        if not certs.match_id(cert, ident.id_type, ident.data):
            self._count("auth_failed")
            raise ISAKMPError(C.INVALID_ID_INFORMATION, f"ID {ids.id_text(ident)!r} is not in the certificate")
        h = crypto.hash_i if initiator else crypto.hash_r
        expect = h(sa.choice.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, _body(ident))
        if not certs.verify_signature(cert.public_key(), expect, sig.data):
            self._count("auth_failed")
            raise ISAKMPError(C.INVALID_SIGNATURE, "signature did not verify")
        matching = [p for p in sa.candidates if p.auth == "rsa" and ids.id_matches(p.id, ident)]
        if not matching:
            self._count("no_policy")
            raise ISAKMPError(C.INVALID_ID_INFORMATION, f"no rsa policy for {ids.id_text(ident)!r}")
        sa.peer_cert_subject = cert.subject.rfc4514_string()
        return matching[0]

    def _our_id(self, sa: IkeSA) -> Identification:
        assert sa.policy is not None
        text = sa.policy.local_id
        if text == "%cert" and self.credentials is not None:
            return self.credentials.our_id()
        return ids.identification_for(text, sa.local_ip)

    def _our_auth_payloads(self, sa: IkeSA, skeyid: bytes) -> list[Any]:
        """IDir, our CERT(s), SIG_R for RSA authentication."""
        from narsuite.ike import certs

        assert sa.choice is not None and self.credentials is not None
        idr = self._our_id(sa) if sa.policy and sa.policy.local_id else self.credentials.our_id()
        hr = crypto.hash_r(sa.choice.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, _body(idr))
        return [idr, *self.credentials.cert_payloads(), Signature(certs.sign(self.credentials.private_key, hr))]

    def _peer_identity(self, sa: IkeSA, ident: Identification, payloads: tuple) -> None:
        sa.peer_id = ident
        sa.peer_id_text = ids.id_text(ident)
        sa.initial_contact = any(n.notify_type == C.INITIAL_CONTACT for n in isakmp.find_all(payloads, Notification))

    def _encrypted_phase1(self, sa: IkeSA, exchange: int, payloads: list[Any]) -> bytes:
        assert sa.crypto is not None
        body = isakmp.build_payloads(payloads)
        ct = sa.crypto.encrypt(0, body)
        h = isakmp.Header(sa.icky, sa.rcky, exchange, C.FLAG_ENCRYPTION, 0, payloads[0].payload_type)
        return isakmp.build_message(h, ciphertext=ct)

    def _float(self, sa: IkeSA, addr: tuple[str, int], local_port: int) -> None:
        """Follow the peer to where its authenticated message came from (port 4500 after
        NAT-T floating, or a new NAT mapping: RFC 3947 §7)."""
        if (addr, local_port) != (sa.remote, sa.local_port):
            if sa.state == "established":
                self._count("peer_moved")
                log.info("ike: {name} moved from {old} to {new}", name=sa.name, old=f"{sa.remote[0]}:{sa.remote[1]}",
                         new=f"{addr[0]}:{addr[1]}")
            sa.remote, sa.local_port = addr, local_port
            if sa.state == "established":
                for child in sa.children:
                    peer = self.store.get(PEER.name, child.peer)
                    if peer is not None and peer.encap == "udp" and sa.natted:
                        self.store.update(PEER.name, child.peer, remote_ip=addr[0], remote_port=addr[1])
                self._publish(sa)

    def _phase1_done(self, sa: IkeSA, digest: bytes, replies: list[bytes]) -> None:
        assert sa.choice is not None and sa.policy is not None
        now = self._now()
        sa.state = "established"
        sa.established = now
        sa.expires = now + sa.choice.lifetime
        sa.last_rx = now
        self._leave_half_open(sa)
        if sa.timer is not None and sa.timer.active():
            sa.timer.cancel()
        sa.timer = self.clock.callLater(sa.choice.lifetime + _grace(sa.choice.lifetime), self._ike_expired, sa)
        sa.dh_private = None
        self._count("ike_established")
        log.info("ike: {name} established with {peer} ({id}) policy {policy}: {alg}, NAT {nat}, {variant}",
                 name=sa.name, peer=f"{sa.remote[0]}:{sa.remote[1]}", id=sa.peer_id_text, policy=sa.policy.name,
                 alg=sa.choice.describe(),
                 nat=" and ".join(w for w, on in (("peer", sa.nat_peer), ("local", sa.nat_local)) if on) or "none",
                 variant=sa.variant.name if sa.variant else "no NAT-T")
        self._reply(sa, digest, replies)
        if sa.initial_contact and not sa.choice.xauth:
            self._initial_contact(sa)
        if not sa.choice.xauth:
            self._adopt_orphans(sa)
        if sa.choice.xauth or sa.policy.pool:
            self._start_transaction(sa)
        self._publish(sa)
        if self.on_established is not None:
            self.on_established(sa)

    # ------------------------------------------------------------------ Aggressive Mode
    def _am1(self, sa: IkeSA, msg: isakmp.Message, response_sa: SecurityAssociation, our_vids: list[VendorID],
             digest: bytes) -> None:
        assert sa.choice is not None
        ch = sa.choice
        sa.ni = self._nonce(msg.payloads)
        ident = isakmp.find(msg.payloads, Identification)
        assert ident is not None
        self._dh(sa, isakmp.find(msg.payloads, KeyExchange))
        sa.nr = crypto.random_nonce(32)
        self._peer_identity(sa, ident, msg.payloads)
        sa.policy = sa.candidates[0]
        if ch.base_auth == C.AUTH_PSK:
            skeyid = crypto.skeyid_psk(ch.hash, sa.policy.secret, sa.ni, sa.nr)
        else:
            skeyid = crypto.skeyid_sig(ch.hash, sa.ni, sa.nr, sa.gxy)
        sa.keys, sa.crypto = self._phase1_crypto(sa, skeyid)
        payloads: list[Any] = [response_sa, KeyExchange(sa.gxr), Nonce(sa.nr)]
        if ch.base_auth == C.AUTH_PSK:
            idr = self._our_id(sa)
            hr = crypto.hash_r(ch.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, _body(idr))
            payloads += [idr, Hash(hr)]
        else:
            payloads += self._our_auth_payloads(sa, skeyid)
        payloads += [*our_vids, *self._our_natds(sa, sa.remote, sa.local_port)]
        sa.state = "am2"
        self._reply(sa, digest, [self._plain(sa, C.EXCH_AGGRESSIVE, payloads)])

    def _am3(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
             digest: bytes) -> None:
        assert sa.choice is not None and sa.keys is not None and sa.crypto is not None and sa.peer_id is not None
        ch = sa.choice
        ct = b""
        if header.encrypted:
            ct, _chain, payloads = self._open(sa.crypto, header, data)
        else:
            payloads = isakmp.parse_message(data).payloads
        skeyid = sa.keys.skeyid
        if ch.base_auth == C.AUTH_PSK:
            got = isakmp.find(payloads, Hash)
            expect = crypto.hash_i(ch.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, _body(sa.peer_id))
            if got is None or not crypto.constant_time_equal(expect, got.data):
                log.warn("ike: Aggressive Mode from {ip} ({id}): HASH_I did not verify (wrong PSK?)",
                         ip=addr[0], id=sa.peer_id_text)
                self._delete_ike(sa, notify_peer=False, reason="authentication failed")
                raise Drop("auth_failed", "AM3 HASH_I")
        else:
            sig = isakmp.find(payloads, Signature)
            if sig is None:
                raise ISAKMPError(C.PAYLOAD_MALFORMED, "AM3 without SIG")
            sa.policy = self._verify_signature(sa, sa.peer_id, payloads, sig, skeyid, initiator=True)
        if ct:  # (an unencrypted AM3 leaves the phase-1 IV at the initial one)
            sa.crypto.accept(0, ct)
        sa.initial_contact = sa.initial_contact or any(
            n.notify_type == C.INITIAL_CONTACT for n in isakmp.find_all(payloads, Notification))
        # the NAT-D hashes describe the addresses of the exchange's start (AM3 may already
        # come on 4500 after floating)
        self._detect_nat(sa, isakmp.find_all(payloads, NatD), sa.remote, sa.local_port)
        self._float(sa, addr, local_port)
        self._remember(sa, digest)
        self._phase1_done(sa, digest, [])

    # ------------------------------------------------------------------ protected exchanges
    def _open_protected(self, sa: IkeSA, header: isakmp.Header, data: bytes,
                        hash_fn: Callable[[bytes], bytes]) -> tuple[bytes, tuple]:
        """Decrypt, check the leading HASH (``hash_fn`` of the payloads after it), return
        (ciphertext, payloads after the HASH).  The IV moves only if the HASH verified."""
        assert sa.crypto is not None
        ct, chain, payloads = self._open(sa.crypto, header, data)
        if not payloads or not isinstance(payloads[0], Hash):
            raise Drop("bad_hash", "protected message without a leading HASH")
        hlen = 4 + len(payloads[0].data)
        if not crypto.constant_time_equal(hash_fn(chain[hlen:]), payloads[0].data):
            raise Drop("bad_hash", f"{C.EXCHANGE_NAMES.get(header.exchange)} HASH did not verify")
        sa.crypto.accept(header.message_id, ct)
        return ct, payloads[1:]

    def _seal(self, sa: IkeSA, exchange: int, mid: int, payloads: list[Any],
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

    def _new_mid(self, sa: IkeSA) -> int:
        while True:
            mid = secrets.randbits(32)
            if mid and mid not in sa.used_mids:
                sa.used_mids.add(mid)
                return mid

    def _send_informational(self, sa: IkeSA, payloads: list[Any]) -> bytes:
        assert sa.keys is not None
        mid = self._new_mid(sa)
        h, a = sa.choice.hash, sa.keys.skeyid_a  # type: ignore[union-attr]
        data = self._seal(sa, C.EXCH_INFORMATIONAL, mid, payloads,
                          lambda rest: crypto.informational_hash(h, a, mid, rest))
        sa.crypto.ivs.forget(mid)  # type: ignore[union-attr]
        self._send(sa, data, sa.remote, sa.local_port)
        return data

    def _informational(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
                       digest: bytes) -> None:
        assert sa.keys is not None and sa.choice is not None
        h, a, mid = sa.choice.hash, sa.keys.skeyid_a, header.message_id
        _ct, payloads = self._open_protected(sa, header, data, lambda rest: crypto.informational_hash(h, a, mid, rest))
        sa.crypto.ivs.forget(mid)  # type: ignore[union-attr]
        self._remember(sa, digest)
        sa.last_rx = self._now()
        self._float(sa, addr, local_port)
        for p in payloads:
            if isinstance(p, Notification):
                self._count("notify_rx")
                self._notification(sa, p)
            elif isinstance(p, Delete):
                self._count("delete_rx")
                self._delete_payload(sa, p)
                if sa.state == "deleted":
                    return

    def _notification(self, sa: IkeSA, n: Notification) -> None:
        if n.notify_type == C.R_U_THERE:
            if n.spi != sa.key or len(n.data) != 4:
                raise Drop("malformed", "R-U-THERE with a wrong SPI or sequence number")
            seq = int.from_bytes(n.data, "big")
            sa.dpd_peer_seq = seq
            self._count("dpd_answered")
            self._send_informational(sa, [Notification(C.R_U_THERE_ACK, C.PROTO_ISAKMP, sa.key, n.data)])
        elif n.notify_type == C.R_U_THERE_ACK:
            if n.spi == sa.key and len(n.data) == 4 and int.from_bytes(n.data, "big") == sa.dpd_seq:
                sa.dpd_sent = 0.0
        elif n.notify_type == C.INITIAL_CONTACT:
            sa.initial_contact = True
            self._initial_contact(sa)
        else:
            log.info("ike: {name}: peer notifies {what}", name=sa.name,
                     what=C.NOTIFY_NAMES.get(n.notify_type, n.notify_type))

    @staticmethod
    def _same_principal(a: IkeSA, b: IkeSA) -> bool:
        """May ``b`` speak for ``a``'s SAs (Delete, INITIAL-CONTACT)?  Same policy, identity
        and XAUTH user -- and, without XAUTH, the same address: a group PSK and a shared
        identity must not let one road warrior delete another's tunnel."""
        if a.policy is not b.policy or a.peer_id_text != b.peer_id_text or a.xauth_user != b.xauth_user:
            return False
        return bool(a.xauth_user) or a.remote[0] == b.remote[0]

    def _delete_payload(self, sa: IkeSA, d: Delete) -> None:
        if d.protocol == C.PROTO_ISAKMP:
            for spi in d.spis:
                other = self.sas.get(bytes(spi))
                if other is not None and self._same_principal(other, sa):
                    log.info("ike: {name}: peer deleted the ISAKMP SA", name=other.name)
                    self._delete_ike(other, notify_peer=False, reason="deleted by the peer", keep_children=True)
        elif d.protocol == C.PROTO_IPSEC_ESP:
            # the child may belong to an older ISAKMP SA of the same peer (after a phase 1
            # rekey the old children are deleted through the new SA)
            for spi in d.spis:
                value = int.from_bytes(spi, "big")
                owner_child = self.children_by_out.get(value)
                if owner_child is None:
                    continue
                owner, child = owner_child
                if owner is sa or self._same_principal(owner, sa):
                    log.info("ike: {name}: peer deleted ESP SA {spi:#010x}", name=sa.name, spi=value)
                    self._remove_child(owner, child, notify_peer=False)

    # ------------------------------------------------------------------ Quick Mode
    def _quick(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
               digest: bytes) -> None:
        assert sa.keys is not None and sa.choice is not None and sa.policy is not None
        h, a, mid = sa.choice.hash, sa.keys.skeyid_a, header.message_id
        qm = sa.quick.get(mid)
        if qm is not None:
            ni, nr = qm.ni, qm.nr
            self._open_protected(sa, header, data, lambda rest: crypto.qm_hash3(h, a, mid, ni, nr))
            self._remember(sa, digest)
            del sa.quick[mid]
            sa.crypto.ivs.forget(mid)  # type: ignore[union-attr]
            self._float(sa, addr, local_port)
            self._install_child(sa, qm)
            return
        if mid in sa.used_mids:
            raise Drop("duplicate", f"Quick Mode message ID {mid:#x} already used")
        if not sa.ready_for_quick_mode:
            raise Drop("unexpected", "Quick Mode before XAUTH completed")
        if len(sa.quick) >= 16:
            raise Drop("unexpected", "16 Quick Modes of this peer wait for their third message")
        _ct, payloads = self._open_protected(sa, header, data, lambda rest: crypto.qm_hash1(h, a, mid, rest))
        sa.used_mids.add(mid)
        sa.last_rx = self._now()
        self._float(sa, addr, local_port)
        try:
            self._quick1(sa, mid, payloads, digest)
        except ISAKMPError as e:
            self._count("quick_refused")
            log.warn("ike: {name}: Quick Mode refused: {why}", name=sa.name, why=str(e))
            self._send_informational(sa, [Notification(e.notify, C.PROTO_IPSEC_ESP, b"")])
            sa.crypto.ivs.forget(mid)  # type: ignore[union-attr]

    def _quick1(self, sa: IkeSA, mid: int, payloads: tuple, digest: bytes) -> None:
        assert sa.policy is not None and sa.choice is not None
        policy = sa.policy
        isakmp.require_known(payloads)
        offer = isakmp.find(payloads, SecurityAssociation)
        if offer is None:
            raise ISAKMPError(C.PAYLOAD_MALFORMED, "Quick Mode without SA")
        ni = self._nonce(payloads)
        ke = isakmp.find(payloads, KeyExchange)
        idents = isakmp.find_all(payloads, Identification)
        if len(idents) not in (0, 2):
            raise ISAKMPError(C.INVALID_ID_INFORMATION, "Quick Mode needs both IDs or none")
        udp_modes = sa.variant.udp_modes if sa.variant is not None and sa.natted else None
        choice = proposals.choose_phase2(offer, policy, udp_modes=udp_modes, pfs_offered=ke is not None)
        try:
            remote_sel = ids.selector(idents[0] if idents else None, sa.remote[0])
            local_sel = ids.selector(idents[1] if idents else None, sa.local_ip)
        except ValueError as e:
            raise ISAKMPError(C.INVALID_ID_INFORMATION, str(e)) from None
        self._check_selectors(sa, remote_sel, local_sel, bool(idents))
        gqm_xy = None
        ke_out = None
        if ke is not None:
            group = crypto.group(choice.pfs_group)  # type: ignore[arg-type]
            try:
                private, public = group.generate()
                gqm_xy = group.shared(private, ke.data)
            except crypto.CryptoError as e:
                raise ISAKMPError(C.INVALID_KEY_INFORMATION, str(e)) from None
            ke_out = KeyExchange(public)
        nat_oa = [p for p in payloads if isinstance(p, NatOA)]
        for oa in nat_oa:
            if oa.id_type != C.ID_IPV4_ADDR or len(oa.address) != 4:
                raise ISAKMPError(C.INVALID_ID_INFORMATION, f"NAT-OA of ID type {oa.id_type}: IPv4 addresses only")
        oa_remote = str(ipaddress.IPv4Address(nat_oa[0].address)) if nat_oa else ""
        oa_local = str(ipaddress.IPv4Address(nat_oa[1].address)) if len(nat_oa) > 1 else ""
        nr = crypto.random_nonce(32)
        spi_out = int.from_bytes(choice.proposal.spi, "big")
        try:
            spi_in = self.store.reserve_spi(self._owner(sa))
        except Exception as e:  # the SPI space is (nearly) full
            raise ISAKMPError(C.NO_PROPOSAL_CHOSEN, f"no SPI: {e}") from None
        sa.quick[mid] = QuickMode(mid, choice, spi_in, spi_out, ni, nr, gqm_xy,
                                  (str(remote_sel[0]), remote_sel[1], remote_sel[2]),
                                  (str(local_sel[0]), local_sel[1], local_sel[2]), oa_remote, oa_local)
        # a QM2 never answered by HASH(3) does not stay forever
        self.clock.callLater(self.cfg.half_open_timeout, lambda: sa.quick.pop(mid, None))
        resp = [SecurityAssociation((isakmp.Proposal(choice.proposal.number, C.PROTO_IPSEC_ESP,
                                                     spi_in.to_bytes(4, "big"), choice.proposal.transforms),),
                                    doi=offer.doi, situation=offer.situation),
                Nonce(nr)]
        if ke_out is not None:
            resp.append(ke_out)
        resp += idents
        if not choice.tunnel and choice.udp and sa.variant is not None:
            resp += [NatOA(C.ID_IPV4_ADDR, ipaddress.IPv4Address(sa.remote[0]).packed, sa.variant.natoa_type),
                     NatOA(C.ID_IPV4_ADDR, ipaddress.IPv4Address(sa.local_ip).packed, sa.variant.natoa_type)]
        assert sa.keys is not None
        h, a = sa.choice.hash, sa.keys.skeyid_a
        reply = self._seal(sa, C.EXCH_QUICK, mid, resp, lambda rest: crypto.qm_hash2(h, a, mid, ni, rest))
        self._reply(sa, digest, [reply])

    def _check_selectors(self, sa: IkeSA, remote_sel: tuple, local_sel: tuple, explicit: bool) -> None:
        assert sa.policy is not None
        policy = sa.policy
        rnet, lnet = remote_sel[0], local_sel[0]
        if not any(lnet.subnet_of(network(n)) for n in policy.local_ts):
            self._count("ts_refused")
            raise ISAKMPError(C.INVALID_ID_INFORMATION,
                              f"local selector {ids.selector_text(local_sel)} is outside local_ts "
                              f"{list(policy.local_ts)}")
        if policy.mode == "transport":
            return
        if policy.pool:
            if not sa.address or rnet != ipaddress.IPv4Network(sa.address + "/32"):
                self._count("ts_refused")
                raise ISAKMPError(C.INVALID_ID_INFORMATION, f"remote selector {ids.selector_text(remote_sel)} is not "
                                  f"the client's mode-config address {sa.address or '(none yet)'}")
            return
        if policy.remote_ts:
            if not any(rnet.subnet_of(network(n)) for n in policy.remote_ts):
                self._count("ts_refused")
                raise ISAKMPError(C.INVALID_ID_INFORMATION, f"remote selector {ids.selector_text(remote_sel)} is "
                                  f"outside remote_ts {list(policy.remote_ts)}")
            return
        if rnet.prefixlen != 32:
            self._count("ts_refused")
            raise ISAKMPError(C.INVALID_ID_INFORMATION, f"remote selector {ids.selector_text(remote_sel)}: this "
                              "policy allows a single host (set remote_ts for networks)")
        # The peer's own address: the one we see, or -- behind a NAT, where we cannot see it
        # -- a private address outside what we protect (else a client could claim the
        # address of an internal server and have its traffic routed into its tunnel).
        if rnet.network_address != ipaddress.IPv4Address(sa.remote[0]):
            # (a local_ts of 0.0.0.0/0 says nothing about what is internal: then only the
            # esp role's one-peer-per-inner-address rule stands; pools are the safe choice)
            if not sa.nat_peer or any(rnet.overlaps(network(n)) for n in policy.local_ts
                                      if network(n).prefixlen):
                self._count("ts_refused")
                raise ISAKMPError(C.INVALID_ID_INFORMATION,
                                  f"remote selector {ids.selector_text(remote_sel)} is neither the peer's address "
                                  f"{sa.remote[0]} nor (behind its NAT) outside local_ts; set remote_ts or a pool")

    def _owner(self, sa: IkeSA) -> str:
        return f"ike:{sa.name}"

    def _lease_owner(self, sa: IkeSA) -> str:
        """Who holds a mode-config address: the XAUTH user (so a re-authenticating
        client gets its address back), else the identity at its NAT mapping."""
        assert sa.policy is not None
        t = sa.transaction
        user = t.user if t is not None and t.user else ""
        if user:
            return f"ike:lease:{sa.policy.name}:user:{user}"
        return f"ike:lease:{sa.policy.name}:{sa.peer_id_text}@{sa.remote[0]}:{sa.remote[1]}"

    def _child_name(self, sa: IkeSA, qm: QuickMode) -> str:
        assert sa.policy is not None
        # the XAUTH user, else the identity at its (NAT) address: two clients sharing an
        # identity and a private address behind different NATs must not share a child
        who = sa.xauth_user or f"{sa.peer_id_text}@{sa.remote[0]}"
        return f"ike:{sa.policy.name}:{who}:{qm.remote_ts[0]}"

    def _install_child(self, sa: IkeSA, qm: QuickMode) -> None:
        """HASH(3) verified: the pair of ESP SAs and the peer record go to the store."""
        assert sa.keys is not None and sa.choice is not None and sa.policy is not None
        ch = qm.choice
        enc_len = _ESP_KEYS[(ch.enc, ch.key_bits)]
        integ_len = _INTEG_KEYS[ch.integ]
        h, d = sa.choice.hash, sa.keys.skeyid_d
        ek_in, ik_in = crypto.esp_keys(h, d, qm.spi_in, qm.ni, qm.nr, enc_len, integ_len, qm.gqm_xy)
        ek_out, ik_out = crypto.esp_keys(h, d, qm.spi_out, qm.ni, qm.nr, enc_len, integ_len, qm.gqm_xy)
        name = self._child_name(sa, qm)
        if not ch.udp:
            encap = "esp"
        else:
            encap = sa.variant.encap if sa.variant is not None else "udp"
        remote_net = ipaddress.IPv4Network(qm.remote_ts[0])
        if ch.tunnel:
            if sa.address:
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
        hard = ch.lifetime + _grace(ch.lifetime)
        ttl_in = hard + 5.0  # the timer below deletes first (and tells the peer); this is a safety net
        sa_in = SA(spi=qm.spi_in, direction="in", peer=name, enc=ch.enc, integ=ch.integ, enc_key=ek_in,
                   integ_key=ik_in, esn=ch.esn)
        sa_out = SA(spi=qm.spi_out, direction="out", peer=name, enc=ch.enc, integ=ch.integ, enc_key=ek_out,
                    integ_key=ik_out, esn=ch.esn)
        try:
            existing = self.store.get(PEER.name, name)
            if existing is None:
                conflict = inner and self.store.lookup(PEER.name, "inner", socket.inet_aton(inner))
                if conflict:
                    raise ISAKMPError(C.INVALID_ID_INFORMATION,
                                      f"inner address {inner} is already used by {conflict.name}")
            self.store.put(peer, owner=owner)
            old_out = self.store.lookup(SA_KIND.name, "out_peer", name)
            if old_out is not None:
                self.store.delete(SA_KIND.name, (old_out.direction, old_out.spi, old_out.peer))
            self.store.put(sa_in, ttl=ttl_in, owner=owner)
            self.store.put(sa_out, ttl=hard + 5.0, owner=owner)
        except ISAKMPError as e:
            self._count("quick_refused")
            log.warn("ike: {name}: child refused: {why}", name=sa.name, why=e.detail)
            self._send_informational(sa, [Delete(C.PROTO_IPSEC_ESP, 4, (qm.spi_in.to_bytes(4, "big"),))])
            self.store.release("spi", qm.spi_in)
            return
        # a rekeyed child (same name) from this or an older IKE SA: the old pair stays until
        # the peer deletes it or it expires; only one outbound SA per peer is current.
        now = self._now()
        child = Child(name, qm.spi_in, qm.spi_out, now + ch.lifetime, ch.describe())
        sa.children.append(child)
        child.timer = self.clock.callLater(hard, self._child_expired, sa, child)
        self.children_by_out[qm.spi_out] = (sa, child)
        self._count("child_installed")
        log.info("ike: {name}: ESP {desc} {rsel} <-> {lsel} in {spi_in:#010x} out {spi_out:#010x} ({encap} to "
                 "{peer})", name=sa.name, desc=ch.describe(), rsel=qm.remote_ts[0], lsel=qm.local_ts[0],
                 spi_in=qm.spi_in, spi_out=qm.spi_out, encap=encap, peer=f"{sa.remote[0]}:{sa.remote[1]}")
        self._publish(sa)

    def _child_expired(self, sa: IkeSA, child: Child) -> None:
        if child in sa.children:
            self._remove_child(sa, child, notify_peer=sa.state == "established")

    def _remove_child(self, sa: IkeSA, child: Child, notify_peer: bool) -> None:
        if child in sa.children:
            sa.children.remove(child)
        if child.timer is not None and child.timer.active():
            child.timer.cancel()
        self.children_by_out.pop(child.spi_out, None)
        self.store.delete(SA_KIND.name, ("in", child.spi_in, child.peer))
        out = self.store.get(SA_KIND.name, ("out", child.spi_out, child.peer))
        if out is not None:
            self.store.delete(SA_KIND.name, ("out", child.spi_out, child.peer))
        self.store.release("spi", child.spi_in)
        if not self.store.lookup_all(SA_KIND.name, "peer", child.peer):
            self.store.delete(PEER.name, child.peer)
        self._count("child_deleted")
        if notify_peer and sa.state == "established":
            self._send_informational(sa, [Delete(C.PROTO_IPSEC_ESP, 4, (child.spi_in.to_bytes(4, "big"),))])
        self._publish(sa)

    # ------------------------------------------------------------------ transaction (XAUTH, mode-config)
    def _start_transaction(self, sa: IkeSA) -> None:
        from narsuite.ike import modecfg

        assert sa.policy is not None and sa.choice is not None
        p = sa.policy
        policy = modecfg.RemoteAccessPolicy(
            xauth=sa.choice.xauth, pool=p.pool, dns=tuple(p.dns), split_include=tuple(p.split_include),
            push=p.modecfg_push, xauth_retries=self.cfg.xauth_retries)
        def lease(prefer: Any = None) -> defer.Deferred:
            return self.store.lease_address(p.pool, self._lease_owner(sa), prefer=prefer)

        def check(user: str, password: bytes) -> defer.Deferred:
            if self.check_password is None:
                return defer.succeed(False)
            return self.check_password(user, password)

        pool = self.store.pools().get(p.pool) if p.pool else None
        sa.transaction = modecfg.TransactionServer(
            policy, lease=lease, check_password=check, peer_name=sa.name,
            pool_network=pool.network if pool is not None else None, unity=sa.peer_unity, count=self._count)

        def first(out: list[AttributePayload]) -> None:
            for payload in out:
                self._send_request(sa, C.EXCH_TRANSACTION, [payload], kind="transaction")
            if sa.transaction.state == "failed":  # e.g. a pushed config and an empty pool
                log.warn("ike: {name}: remote access refused: {why}", name=sa.name,
                         why=sa.transaction.failure_reason)
                self._schedule_delete(sa, "remote access refused")

        sa.transaction.start().addCallbacks(first, self._transaction_failed, errbackArgs=(sa,))

    def _send_request(self, sa: IkeSA, exchange: int, payloads: list[Any], kind: str) -> None:
        """A request we start (new message ID), resent on our schedule until answered."""
        assert sa.keys is not None and sa.choice is not None
        mid = self._new_mid(sa)
        h, a = sa.choice.hash, sa.keys.skeyid_a
        fn = crypto.transaction_hash if exchange == C.EXCH_TRANSACTION else crypto.informational_hash
        data = self._seal(sa, exchange, mid, payloads, lambda rest: fn(h, a, mid, rest))
        pending = Pending(mid, data, kind=kind)
        sa.pending[mid] = pending
        self._send(sa, data, sa.remote, sa.local_port)
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
            self._delete_ike(sa, notify_peer=True, reason=f"{pending.kind} unanswered")
            return
        self._send(sa, pending.data, sa.remote, sa.local_port)
        self._arm(sa, pending)

    def _transaction(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
                     digest: bytes) -> None:
        assert sa.keys is not None and sa.choice is not None
        h, a, mid = sa.choice.hash, sa.keys.skeyid_a, header.message_id
        if sa.transaction is None:
            raise Drop("unexpected", "transaction exchange without XAUTH or mode-config configured")
        _ct, payloads = self._open_protected(sa, header, data, lambda rest: crypto.transaction_hash(h, a, mid, rest))
        sa.last_rx = self._now()
        self._float(sa, addr, local_port)
        attr = isakmp.find(payloads, AttributePayload)
        if attr is None:
            raise ISAKMPError(C.PAYLOAD_MALFORMED, "transaction without an attribute payload")
        answered = sa.pending.pop(mid, None)
        if answered is not None and answered.timer is not None and answered.timer.active():
            answered.timer.cancel()
        if answered is None:
            sa.used_mids.add(mid)
        from narsuite.ike.modecfg import TransactionError

        try:
            d = sa.transaction.received(attr)
        except TransactionError as e:
            raise Drop("unexpected", f"transaction: {e}") from None
        self._remember(sa, digest)  # processed: a retransmission of it is a duplicate
        d.addCallback(self._transaction_out, sa, mid, digest, answered is None)
        d.addErrback(self._transaction_failed, sa)

    def _transaction_out(self, out: list[AttributePayload], sa: IkeSA, mid: int, digest: bytes,
                         peer_request: bool) -> None:
        if sa.state != "established":
            return
        assert sa.keys is not None and sa.choice is not None
        h, a = sa.choice.hash, sa.keys.skeyid_a
        for payload in out:
            if payload.cfg_type in (C.CFG_REPLY, C.CFG_ACK) and peer_request:
                reply = self._seal(sa, C.EXCH_TRANSACTION, mid, [payload],
                                   lambda rest: crypto.transaction_hash(h, a, mid, rest))
                self._reply(sa, digest, [reply])
            else:
                self._send_request(sa, C.EXCH_TRANSACTION, [payload], kind="transaction")
        if not peer_request:
            sa.crypto.ivs.forget(mid)  # type: ignore[union-attr]
        t = sa.transaction
        if t.user and not sa.xauth_user:
            sa.xauth_user = t.user
        if t.state == "failed":
            log.warn("ike: {name}: remote access refused: {why}", name=sa.name, why=t.failure_reason)
            self._schedule_delete(sa, "remote access refused")
        elif t.address is not None and not sa.address:
            sa.address = str(t.address)
            self._count("modecfg_done")
            log.info("ike: {name}: mode-config address {addr} for {who}", name=sa.name, addr=sa.address,
                     who=sa.xauth_user or sa.peer_id_text)
        if t.state in ("config", "done") and sa.choice.xauth and not sa.xauth_done:
            sa.xauth_done = True
            log.info("ike: {name}: XAUTH user {user} authenticated", name=sa.name, user=sa.xauth_user)
            if sa.initial_contact:
                self._initial_contact(sa)
            self._adopt_orphans(sa)
        self._publish(sa)

    def _schedule_delete(self, sa: IkeSA, reason: str) -> None:
        """Delete soon, once: the last message (XAUTH status FAIL) goes out first."""
        if not sa.delete_scheduled:
            sa.delete_scheduled = True
            self.clock.callLater(1.0, self._delete_ike, sa, True, reason)

    def _remember(self, sa: IkeSA, digest: bytes) -> None:
        """A processed message that needs no stored reply: its retransmissions are duplicates."""
        sa.seen.add(digest)
        if len(sa.seen) > 512:
            sa.seen.clear()

    def _transaction_failed(self, f: Any, sa: IkeSA) -> None:
        self._count("internal_error")
        log.failure("ike: {name}: transaction exchange", f, name=sa.name)
        self._delete_ike(sa, notify_peer=True, reason="transaction error")

    # ------------------------------------------------------------------ INITIAL-CONTACT, DPD, lifetimes
    def _initial_contact(self, sa: IkeSA) -> None:
        """The peer rebooted: its older IKE SAs (same policy, identity and XAUTH user) and
        their children are stale."""
        self._count("initial_contact")
        for other in list(self.sas.values()):
            if other is sa or other.state != "established" or other.policy is not sa.policy:
                continue
            if self._same_principal(other, sa):
                log.info("ike: {name}: INITIAL-CONTACT from {id} replaces {old}", name=sa.name, id=sa.peer_id_text,
                         old=other.name)
                self._delete_ike(other, notify_peer=False, reason="replaced (INITIAL-CONTACT)")

    def dpd_tick(self) -> None:
        """Probe idle peers (RFC 3706 §5.3), clear the dead ones."""
        if not self.cfg.dpd_delay:
            return
        now = self._now()
        for sa in list(self.sas.values()):
            if sa.state != "established" or not sa.peer_dpd:
                continue
            idle = now - sa.last_rx
            if sa.dpd_sent and now - sa.last_rx >= self.cfg.dpd_timeout:
                self._count("dpd_dead")
                log.warn("ike: {name}: {peer} is dead (no answer for {t:.0f} s): clearing its SAs", name=sa.name,
                         peer=f"{sa.remote[0]}:{sa.remote[1]}", t=idle)
                self._delete_ike(sa, notify_peer=False, reason="dead peer")
                continue
            if idle >= self.cfg.dpd_delay and (not sa.dpd_sent or now - sa.dpd_sent >= self.cfg.dpd_delay):
                if not sa.dpd_seq:
                    sa.dpd_seq = secrets.randbelow(0x7FFFFFFF) + 1
                else:
                    sa.dpd_seq = sa.dpd_seq % 0xFFFFFFFF + 1
                sa.dpd_sent = now
                self._count("dpd_sent")
                self._send_informational(sa, [Notification(C.R_U_THERE, C.PROTO_ISAKMP, sa.key,
                                                           sa.dpd_seq.to_bytes(4, "big"))])

    def _ike_expired(self, sa: IkeSA) -> None:
        sa.timer = None
        self._count("expired")
        log.info("ike: {name}: ISAKMP SA lifetime over", name=sa.name)
        self._delete_ike(sa, notify_peer=True, reason="lifetime")

    def delete(self, name: str) -> bool:
        """Operator-initiated delete (narctl): Delete payloads for the children and the SA."""
        for sa in list(self.sas.values()):
            if sa.name == name or sa.name.startswith(name):
                self._delete_ike(sa, notify_peer=True, reason="deleted by the operator")
                return True
        return False

    def _delete_ike(self, sa: IkeSA, notify_peer: bool = True, reason: str = "",
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
                self._remove_child(sa, child, notify_peer=True)
            self._send_informational(sa, [Delete(C.PROTO_ISAKMP, 16, (sa.key,))])
        if not keep_children:
            for child in list(sa.children):
                self._remove_child(sa, child, notify_peer=False)
        was = sa.state
        sa.state = "deleted"
        self._leave_half_open(sa)
        if sa.timer is not None and sa.timer.active():
            sa.timer.cancel()
        for p in sa.pending.values():
            if p.timer is not None and p.timer.active():
                p.timer.cancel()
        self.sas.pop(sa.key, None)
        if sa.first_key is not None and self.first_messages.get(sa.first_key) is sa:
            del self.first_messages[sa.first_key]
        if keep_children:
            key = self._principal_key(sa)
            old = self.orphans.pop(key, None)
            if old is not None:
                self._orphans_expired(old)
            self.orphans[key] = sa
            sa.timer = self.clock.callLater(ORPHAN_GRACE, self._orphans_expired, sa)
        else:
            self._release(sa)
        if was == "established":
            self._count("ike_deleted")
            log.info("ike: {name} deleted ({reason}){kept}", name=sa.name, reason=reason,
                     kept=f"; its {len(sa.children)} ESP SA pair(s) wait for a new ISAKMP SA" if keep_children else "")
        self.store.delete(IKE_SA.name, sa.name)

    def _release(self, sa: IkeSA) -> None:
        """Give back what the SA held in the store: SPI leases, its address (unless another
        live SA of the same user holds it)."""
        self.store.drop_owner(self._owner(sa))
        if sa.address and sa.policy is not None and not any(
                o.address == sa.address for o in self.sas.values() if o.state == "established"):
            self.store.drop_owner(self._lease_owner(sa))

    def _principal_key(self, sa: IkeSA) -> tuple[str, str, str]:
        return (sa.policy.name if sa.policy else "", sa.peer_id_text, sa.xauth_user or sa.remote[0])

    def _orphans_expired(self, sa: IkeSA) -> None:
        """No new ISAKMP SA came for these children: they go."""
        key = self._principal_key(sa)
        if self.orphans.get(key) is sa:
            del self.orphans[key]
        if sa.timer is not None and sa.timer.active():
            sa.timer.cancel()
        for child in list(sa.children):
            self._remove_child(sa, child, notify_peer=False)
        self._release(sa)

    def _adopt_orphans(self, sa: IkeSA) -> None:
        """A new ISAKMP SA of a principal whose old one the peer deleted: it takes over
        the old SA's ESP SAs (and their remaining lifetimes)."""
        old = self.orphans.pop(self._principal_key(sa), None)
        if old is None:
            return
        if old.timer is not None and old.timer.active():
            old.timer.cancel()
        now = self._now()
        for child in old.children:
            if child.timer is not None and child.timer.active():
                child.timer.cancel()
            child.timer = self.clock.callLater(max(0.0, child.expires - now + _grace(child.expires - now)),
                                               self._child_expired, sa, child)
            self.children_by_out[child.spi_out] = (sa, child)
            sa.children.append(child)
        log.info("ike: {name} adopts {n} ESP SA pair(s) of {old}", name=sa.name, n=len(old.children), old=old.name)
        old.children = []
        if not sa.address:
            sa.address = old.address
        self.store.drop_owner(self._owner(old))  # SPI leases: re-claimed below for the adopter
        for child in sa.children:
            self.store.claim("spi", child.spi_in, self._owner(sa)).addErrback(lambda f: None)
        self._publish(sa)

    def close(self) -> None:
        for sa in list(self.sas.values()):
            self._delete_ike(sa, notify_peer=True, reason="shutdown")

    # ------------------------------------------------------------------ the store's view
    def _publish(self, sa: IkeSA) -> None:
        if sa.state == "deleted":
            return
        rec = IkeSaRecord(
            name=sa.name, remote_ip=sa.remote[0], remote_port=sa.remote[1], local_port=sa.local_port,
            state=sa.state, exchange="main" if sa.exchange == C.EXCH_MAIN else "aggressive",
            policy=sa.policy.name if sa.policy else "", peer_id=sa.peer_id_text,
            algorithms=sa.choice.describe() if sa.choice else "", natt=sa.variant.name if sa.variant else "",
            nat=("peer" if sa.nat_peer else "") + ("+local" if sa.nat_local else ""), xauth_user=sa.xauth_user,
            address=sa.address, children=len(sa.children), established=sa.established, expires=sa.expires)
        self.store.put(rec, owner=self._owner(sa))
