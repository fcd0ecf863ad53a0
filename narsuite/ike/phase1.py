"""Phase 1: Main Mode and Aggressive Mode (RFC 2409 §5), NAT detection (RFC 3947 §3).

* Main Mode: MM1 SA -> MM2; MM3 KE,Ni,NAT-D -> MM4; MM5 ID,HASH_I|SIG (encrypted)
  -> MM6.  With a PSK the peer's identity is only known after MM5 is decrypted, so
  every PSK a policy allows for the source address is tried (the HASH_I that
  verifies names the policy): two road warriors behind one NAT with one group PSK
  need nothing more.
* Aggressive Mode: AM1 SA,KE,Ni,ID -> AM2 (authenticated); AM3 HASH_I.

The first message of an exchange (no responder cookie) enters at
:meth:`Phase1.first_message`.  A Main Mode first message creates no SA: MM2 carries a
responder cookie that is a keyed hash of the initiator's address, port and cookie
(RFC 2408 §2.5.3, :mod:`narsuite.ike.cookies`), and the SA is made by
:meth:`Phase1.from_cookie` when MM3 brings that cookie back, i.e. once the initiator
has shown it receives our packets; spoofed MM1 floods cost an HMAC and an answer.
Aggressive Mode must do its DH at once: it creates its SA at AM1 within its own,
smaller half-open budget.  Both budgets are per source and in total, checked before
any Diffie-Hellman work.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import TYPE_CHECKING, Any

import attrs

from narsuite.ike import constants as C
from narsuite.ike import crypto, ids, isakmp, natt, proposals
from narsuite.ike.common import Drop, body, grace, nonce
from narsuite.ike.config import PeerPolicy
from narsuite.ike.cookies import CookieJar, FirstMessages, HalfOpenBudget, ParkedFirst
from narsuite.ike.isakmp import (
    Certificate,
    CertificateRequest,
    Hash,
    Identification,
    ISAKMPError,
    KeyExchange,
    NatD,
    Nonce,
    Notification,
    SecurityAssociation,
    Signature,
    VendorID,
)
from narsuite.ike.sa import IkeSA
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.ike.engine import IkeEngine

__all__ = ["Phase1"]

log = logger()

FirstKey = tuple[bytes, str, int]


@attrs.frozen
class _Decided:
    """What a Main Mode first message decided, parked until its MM3 (no SA before that)."""

    choice: Any
    candidates: list[PeerPolicy]
    variant: Any
    peer_dpd: bool
    peer_unity: bool
    local_ip: str
    #: MM1's digest and our MM2: a late MM1 retransmission is answered from the SA
    mm1_digest: bytes
    mm2: bytes


class Phase1:
    """Main and Aggressive Mode for one engine (the engine is this part's transport)."""

    def __init__(self, engine: IkeEngine) -> None:
        self.engine = engine
        cfg = engine.cfg
        #: exchanges in progress (an SA exists: Main Mode after a valid MM3, Aggressive Mode after AM1)
        self.half_open: dict[FirstKey, IkeSA] = {}
        self.main_budget = HalfOpenBudget(cfg.half_open_total, cfg.half_open_per_source)
        self.aggressive_budget = HalfOpenBudget(cfg.half_open_aggressive, cfg.half_open_per_source)
        #: (CKY-I, address, port) of every live SA's first message: a late retransmission
        #: of MM1/AM1 is answered from the SA, not taken for a new exchange
        self.first_messages: dict[FirstKey, IkeSA] = {}
        self.cookies = CookieJar(engine.clock, cfg.cookie_slot)
        self.parked = FirstMessages(cfg.first_messages_max)

    @property
    def half_open_by_ip(self) -> Counter[str]:
        return self.main_budget.by_source + self.aggressive_budget.by_source

    def _budget(self, exchange: int) -> HalfOpenBudget:
        return self.aggressive_budget if exchange == C.EXCH_AGGRESSIVE else self.main_budget

    # ------------------------------------------------------------------ the first message
    def first_message(self, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int) -> None:
        """MM1 (answered without state) or AM1 (an SA within the Aggressive Mode budget)."""
        e = self.engine
        cfg = e.cfg
        if header.exchange not in (C.EXCH_MAIN, C.EXCH_AGGRESSIVE) or header.message_id or header.encrypted:
            name = C.EXCHANGE_NAMES.get(header.exchange, header.exchange)
            raise Drop("unexpected", f"{name} without a responder cookie")
        key = (header.icookie, addr[0], addr[1])
        digest = hashlib.sha256(data).digest()[:16]
        existing = self.half_open.get(key) or self.first_messages.get(key)
        if existing is not None:
            if e.answer_retransmission(existing, digest):
                return
            raise Drop("duplicate", "a different first message with a cookie already in use")
        aggressive = header.exchange == C.EXCH_AGGRESSIVE
        if aggressive:
            why = self.aggressive_budget.refuse(addr[0])
            if why is not None:
                raise Drop("half_open_dropped", f"aggressive mode: {why}")
        msg = isakmp.parse_message(data)
        policies = [p for p in cfg.peers if p.allows_remote(addr[0])]
        if aggressive:
            policies = [p for p in policies if p.aggressive]
        if not policies:
            e.count("no_policy")
            e.note("no_policy", "ike: no [[ike.peers]] entry accepts {ip}", ip=addr[0])
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
                e.count("no_policy")
                raise ISAKMPError(C.INVALID_ID_INFORMATION, f"no policy for identity {ids.id_text(ident)!r}")
        try:
            choice, candidates = proposals.choose_phase1(offer, policies)
        except ISAKMPError as err:
            if err.notify == C.NO_PROPOSAL_CHOSEN:
                e.count("no_proposal")
                e.note("no_proposal", "ike: no acceptable phase 1 proposal from {ip}: {detail}", ip=addr[0],
                       detail=err.detail)
            raise
        vids = [v.data for v in isakmp.find_all(msg.payloads, VendorID)]
        modes = cfg.espthrunat_modes  # exactly two: the config check says so
        variant = natt.choose_variant(vids, e.natt_variants, (modes[0], modes[1]))
        response_sa = proposals.phase1_response(offer, choice)
        if not aggressive:
            self._mm1_stateless(header, addr, local_port, digest, offer, response_sa, choice, candidates,
                                variant, vids)
            return
        now = e.now()
        sa = IkeSA(icky=header.icookie, rcky=crypto.random_cookie(), exchange=header.exchange, remote=addr,
                   local_port=local_port, local_ip=e.local_address(addr[0]), created=now, candidates=candidates,
                   choice=choice, sai_b=body(offer), variant=variant, peer_dpd=C.VID_DPD in vids,
                   peer_unity=C.VID_CISCO_UNITY in vids,
                   last_rx=now)
        self._open(sa, key)
        try:
            self._am1(sa, msg, response_sa, self._our_vids(sa), digest)
        except Exception:
            e.delete_ike(sa, notify_peer=False, reason="bad first aggressive mode message")
            raise
        e.publish(sa)

    def _open(self, sa: IkeSA, key: FirstKey) -> None:
        """The SA exists from now on: table, half-open slot, first-message key, timeout."""
        e = self.engine
        e.sas[sa.key] = sa
        self.half_open[key] = sa
        self.first_messages[key] = sa
        sa.first_key = key
        self._budget(sa.exchange).take(key[1])
        sa.timer = e.clock.callLater(e.cfg.half_open_timeout, self._half_open_expired, sa)

    def _mm1_stateless(self, header: isakmp.Header, addr: tuple[str, int], local_port: int, digest: bytes,
                       offer: SecurityAssociation, response_sa: SecurityAssociation, choice: Any,
                       candidates: list[PeerPolicy], variant: Any, vids: list[bytes]) -> None:
        """MM2 under a keyed-hash responder cookie; MM1's decisions parked for MM3, no SA.

        Everything in MM2 is a function of MM1, the address and the cookie, so a
        retransmitted MM1 in the same cookie slot gets the same MM2 byte for byte."""
        e = self.engine
        rcky = self.cookies.cookie(addr, header.icookie)
        local_ip = e.local_address(addr[0])
        payloads: list[Any] = [response_sa, *self._vids_for(variant, choice)]
        if variant is not None and variant.name == "espthrunat":
            payloads.append(NatD(natt.espthrunat_hash(addr, (local_ip, local_port)), C.PT_NAT_D_DRAFT))
        mm2 = isakmp.build_message(isakmp.Header(header.icookie, rcky, C.EXCH_MAIN), payloads)
        evicted = self.parked.evicted
        self.parked.park(header.icookie, rcky, ParkedFirst(
            body(offer), _Decided(choice, candidates, variant, C.VID_DPD in vids, C.VID_CISCO_UNITY in vids,
                                  local_ip, digest, mm2), local_port))
        if self.parked.evicted != evicted:
            e.count("first_message_evicted", self.parked.evicted - evicted)
        e.count("cookie_sent")
        e.send(None, mm2, addr, local_port)

    def from_cookie(self, header: isakmp.Header, addr: tuple[str, int], local_port: int) -> IkeSA:
        """MM3 for no SA we hold: create the SA if it brings back a cookie of ours.

        The cookie proves the sender received our MM2 at ``addr``: only now is state
        created and a half-open slot taken (RFC 2408 §2.5.3)."""
        e = self.engine
        if header.exchange != C.EXCH_MAIN or header.message_id or header.encrypted:
            raise Drop("unknown_cookie", f"cookies {header.icookie.hex()}/{header.rcookie.hex()}")
        if not self.cookies.valid(addr, header.icookie, header.rcookie):
            raise Drop("bad_cookie", f"cookies {header.icookie.hex()}/{header.rcookie.hex()}: "
                       "not a responder cookie we gave this address (spoofed, or older than two slots)")
        parked = self.parked.peek(header.icookie, header.rcookie)
        if parked is None:
            raise Drop("first_message_gone", "a valid cookie whose first message was pushed out of memory "
                       "(raise first_messages_max)")
        why = self.main_budget.refuse(addr[0])
        if why is not None:
            raise Drop("half_open_dropped", why)
        self.parked.take(header.icookie, header.rcookie)
        d: _Decided = parked.decided
        now = e.now()
        sa = IkeSA(icky=header.icookie, rcky=header.rcookie, exchange=C.EXCH_MAIN, remote=addr,
                   local_port=parked.local_port, local_ip=d.local_ip, created=now, candidates=d.candidates,
                   choice=d.choice, sai_b=parked.sai_b, variant=d.variant, peer_dpd=d.peer_dpd,
                   peer_unity=d.peer_unity, last_rx=now, state="mm2")
        sa.replies[d.mm1_digest] = [d.mm2]
        self._open(sa, (header.icookie, addr[0], addr[1]))
        e.count("cookie_verified")
        e.publish(sa)
        return sa

    def _our_vids(self, sa: IkeSA) -> list[VendorID]:
        return self._vids_for(sa.variant, sa.choice)

    @staticmethod
    def _vids_for(variant: Any, choice: Any) -> list[VendorID]:
        out = []
        if variant is not None:
            out.append(VendorID(variant.vid))
        out.append(VendorID(C.VID_DPD))
        if choice is not None and choice.xauth:
            out.append(VendorID(C.VID_XAUTH))
        return out

    def _plain(self, sa: IkeSA, exchange: int, payloads: list[Any]) -> bytes:
        return isakmp.build_message(isakmp.Header(sa.icky, sa.rcky, exchange), payloads)

    def _half_open_expired(self, sa: IkeSA) -> None:
        sa.timer = None
        if sa.state != "established":
            log.info("ike: phase 1 with {peer} did not complete in {t:.0f} s", peer=f"{sa.remote[0]}:{sa.remote[1]}",
                     t=self.engine.cfg.half_open_timeout)
            self.engine.count("expired")
            self.engine.delete_ike(sa, notify_peer=False, reason="half-open timeout")

    def leave_half_open(self, sa: IkeSA) -> None:
        key = sa.first_key
        if key is not None and self.half_open.get(key) is sa:
            del self.half_open[key]
            self._budget(sa.exchange).give_back(key[1])

    def forget(self, sa: IkeSA) -> None:
        """A deleted SA: its first message may start a new exchange again."""
        if sa.first_key is not None and self.first_messages.get(sa.first_key) is sa:
            del self.first_messages[sa.first_key]

    # ------------------------------------------------------------------ NAT detection
    def detect_nat(self, sa: IkeSA, natds: list[NatD], addr: tuple[str, int], local_port: int) -> None:
        """RFC 3947 §3.2: the first hash is us as the peer addressed us, the rest are the
        peer's own addresses; the 004 draft has one hash over both ends.  ``addr`` and
        ``local_port`` are those of the message that carries the hashes."""
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
        except crypto.CryptoError as err:
            raise ISAKMPError(C.INVALID_KEY_INFORMATION, str(err)) from None
        sa.gxi, sa.gxr = ke.data, public

    def mm3(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
            digest: bytes) -> None:
        msg = isakmp.parse_message(data)
        isakmp.require_known(msg.payloads)
        sa.ni = nonce(msg.payloads)
        self._dh(sa, isakmp.find(msg.payloads, KeyExchange))
        sa.nr = crypto.random_nonce(32)
        self.detect_nat(sa, isakmp.find_all(msg.payloads, NatD), sa.remote, sa.local_port)
        payloads: list[Any] = [KeyExchange(sa.gxr), Nonce(sa.nr), *self._our_natds(sa, sa.remote, sa.local_port)]
        if any(p.auth == "rsa" for p in sa.candidates) and self.engine.trust is not None:
            payloads += [CertificateRequest(C.CERT_X509_SIGNATURE, dn) for dn in self.engine.trust.ca_subjects_der()]
        sa.state = "mm4"
        self.engine.reply(sa, digest, [self._plain(sa, C.EXCH_MAIN, payloads)])

    def _phase1_crypto(self, sa: IkeSA, skeyid: bytes) -> tuple[crypto.Phase1Keys, crypto.ISAKMPCrypto]:
        assert sa.choice is not None
        ch = sa.choice
        keys = crypto.derive_phase1(ch.hash, skeyid, sa.gxy, sa.icky, sa.rcky)
        return keys, crypto.ISAKMPCrypto(ch.cipher, keys.encryption_key(ch.key_len), ch.hash, sa.gxi, sa.gxr)

    def mm5(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
            digest: bytes) -> None:
        e = self.engine
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
                    ct, chain, payloads = e.open(cr, header, data)
                    ident = isakmp.find(payloads, Identification)
                    got = isakmp.find(payloads, Hash)
                except (crypto.CryptoError, ISAKMPError):
                    continue
                if ident is None or got is None:
                    continue
                expect = crypto.hash_i(ch.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, body(ident))
                if not crypto.constant_time_equal(expect, got.data):
                    continue
                matching = [p for p in pols if ids.id_matches(p.id, ident)]
                if not matching:
                    e.count("no_policy")
                    raise ISAKMPError(C.INVALID_ID_INFORMATION, f"no policy with this PSK for {ids.id_text(ident)!r}")
                cr.accept(0, ct)
                sa.keys, sa.crypto, sa.policy = keys, cr, matching[0]
                self._peer_identity(sa, ident, payloads)
                idr = self._our_id(sa)
                hr = crypto.hash_r(ch.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, body(idr))
                e.follow(sa, addr, local_port)
                reply = self._encrypted_phase1(sa, C.EXCH_MAIN, [idr, Hash(hr)])
                self._done(sa, digest, [reply])
                return
            log.warn("ike: Main Mode from {ip}: HASH_I did not verify with any of {n} pre-shared key(s) "
                     "allowed for this address (wrong PSK?)", ip=addr[0], n=tried)
            e.delete_ike(sa, notify_peer=False, reason="authentication failed")
            raise Drop("auth_failed", "no PSK verified")
        # RSA signatures: SKEYID needs no secret, the certificate names the policy.
        skeyid = crypto.skeyid_sig(ch.hash, sa.ni, sa.nr, sa.gxy)
        keys, cr = self._phase1_crypto(sa, skeyid)
        ct, chain, payloads = e.open(cr, header, data)
        ident = isakmp.find(payloads, Identification)
        sig = isakmp.find(payloads, Signature)
        if ident is None or sig is None:
            raise ISAKMPError(C.PAYLOAD_MALFORMED, "MM5 without ID and SIG (wrong key?)")
        policy = self._verify_signature(sa, ident, payloads, sig, skeyid, initiator=True)
        cr.accept(0, ct)
        sa.keys, sa.crypto, sa.policy = keys, cr, policy
        self._peer_identity(sa, ident, payloads)
        e.follow(sa, addr, local_port)
        reply = self._encrypted_phase1(sa, C.EXCH_MAIN, self._our_auth_payloads(sa, skeyid))
        self._done(sa, digest, [reply])

    def _verify_signature(self, sa: IkeSA, ident: Identification, payloads: tuple, sig: Signature, skeyid: bytes,
                          initiator: bool) -> PeerPolicy:
        from narsuite.ike import certs

        e = self.engine
        assert sa.choice is not None
        if e.trust is None:
            raise ISAKMPError(C.AUTHENTICATION_FAILED, "no CA configured")
        chain = [c.data for c in isakmp.find_all(payloads, Certificate) if c.encoding == C.CERT_X509_SIGNATURE]
        if not chain:
            raise ISAKMPError(C.CERTIFICATE_UNAVAILABLE, "the peer sent no X.509 certificate")
        try:
            cert = e.trust.verify(chain, now=None)
        except certs.CertificateError as err:
            e.count("auth_failed")
            log.warn("ike: certificate from {ip} refused: {why}", ip=sa.remote[0], why=str(err))
            raise ISAKMPError(C.INVALID_CERTIFICATE, str(err)) from None
        if not certs.match_id(cert, ident.id_type, ident.data):
            e.count("auth_failed")
            raise ISAKMPError(C.INVALID_ID_INFORMATION, f"ID {ids.id_text(ident)!r} is not in the certificate")
        h = crypto.hash_i if initiator else crypto.hash_r
        expect = h(sa.choice.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, body(ident))
        if not certs.verify_signature(cert.public_key(), expect, sig.data):
            e.count("auth_failed")
            raise ISAKMPError(C.INVALID_SIGNATURE, "signature did not verify")
        matching = [p for p in sa.candidates if p.auth == "rsa" and ids.id_matches(p.id, ident)]
        if not matching:
            e.count("no_policy")
            raise ISAKMPError(C.INVALID_ID_INFORMATION, f"no rsa policy for {ids.id_text(ident)!r}")
        sa.peer_cert_subject = cert.subject.rfc4514_string()
        return matching[0]

    def _our_id(self, sa: IkeSA) -> Identification:
        assert sa.policy is not None
        text = sa.policy.local_id
        if text == "%cert" and self.engine.credentials is not None:
            return self.engine.credentials.our_id()
        return ids.identification_for(text, sa.local_ip)

    def _our_auth_payloads(self, sa: IkeSA, skeyid: bytes) -> list[Any]:
        """IDir, our CERT(s), SIG_R for RSA authentication."""
        from narsuite.ike import certs

        credentials = self.engine.credentials
        assert sa.choice is not None and credentials is not None
        idr = self._our_id(sa) if sa.policy and sa.policy.local_id else credentials.our_id()
        hr = crypto.hash_r(sa.choice.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, body(idr))
        return [idr, *credentials.cert_payloads(), Signature(certs.sign(credentials.private_key, hr))]

    def _peer_identity(self, sa: IkeSA, ident: Identification, payloads: tuple) -> None:
        sa.peer_id = ident
        sa.peer_id_text = ids.id_text(ident)
        sa.initial_contact = any(n.notify_type == C.INITIAL_CONTACT for n in isakmp.find_all(payloads, Notification))

    def _encrypted_phase1(self, sa: IkeSA, exchange: int, payloads: list[Any]) -> bytes:
        assert sa.crypto is not None
        data = isakmp.build_payloads(payloads)
        ct = sa.crypto.encrypt(0, data)
        h = isakmp.Header(sa.icky, sa.rcky, exchange, C.FLAG_ENCRYPTION, 0, payloads[0].payload_type)
        return isakmp.build_message(h, ciphertext=ct)

    def _done(self, sa: IkeSA, digest: bytes, replies: list[bytes]) -> None:
        e = self.engine
        assert sa.choice is not None and sa.policy is not None
        now = e.now()
        sa.state = "established"
        sa.established = now
        sa.expires = now + sa.choice.lifetime
        sa.last_rx = now
        self.leave_half_open(sa)
        if sa.timer is not None and sa.timer.active():
            sa.timer.cancel()
        sa.timer = e.clock.callLater(sa.choice.lifetime + grace(sa.choice.lifetime), self._expired, sa)
        sa.dh_private = None
        e.count("ike_established")
        log.info("ike: {name} established with {peer} ({id}) policy {policy}: {alg}, NAT {nat}, {variant}",
                 name=sa.name, peer=f"{sa.remote[0]}:{sa.remote[1]}", id=sa.peer_id_text, policy=sa.policy.name,
                 alg=sa.choice.describe(),
                 nat=" and ".join(w for w, on in (("peer", sa.nat_peer), ("local", sa.nat_local)) if on) or "none",
                 variant=sa.variant.name if sa.variant else "no NAT-T")
        e.reply(sa, digest, replies)
        if sa.initial_contact and not sa.choice.xauth:
            e.informational.initial_contact(sa)
        if not sa.choice.xauth:
            e.children.adopt_orphans(sa)
        if sa.choice.xauth or e.transactions.wanted(sa.policy):
            e.transactions.start(sa)
        e.publish(sa)
        if e.on_established is not None:
            e.on_established(sa)

    def _expired(self, sa: IkeSA) -> None:
        sa.timer = None
        self.engine.count("expired")
        log.info("ike: {name}: ISAKMP SA lifetime over", name=sa.name)
        self.engine.delete_ike(sa, notify_peer=True, reason="lifetime")

    # ------------------------------------------------------------------ Aggressive Mode
    def _am1(self, sa: IkeSA, msg: isakmp.Message, response_sa: SecurityAssociation, our_vids: list[VendorID],
             digest: bytes) -> None:
        assert sa.choice is not None
        ch = sa.choice
        sa.ni = nonce(msg.payloads)
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
            hr = crypto.hash_r(ch.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, body(idr))
            payloads += [idr, Hash(hr)]
        else:
            payloads += self._our_auth_payloads(sa, skeyid)
        payloads += [*our_vids, *self._our_natds(sa, sa.remote, sa.local_port)]
        sa.state = "am2"
        self.engine.reply(sa, digest, [self._plain(sa, C.EXCH_AGGRESSIVE, payloads)])

    def am3(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
            digest: bytes) -> None:
        e = self.engine
        assert sa.choice is not None and sa.keys is not None and sa.crypto is not None and sa.peer_id is not None
        ch = sa.choice
        ct = b""
        if header.encrypted:
            ct, _chain, payloads = e.open(sa.crypto, header, data)
        else:
            payloads = isakmp.parse_message(data).payloads
        skeyid = sa.keys.skeyid
        if ch.base_auth == C.AUTH_PSK:
            got = isakmp.find(payloads, Hash)
            expect = crypto.hash_i(ch.hash, skeyid, sa.gxi, sa.gxr, sa.icky, sa.rcky, sa.sai_b, body(sa.peer_id))
            if got is None or not crypto.constant_time_equal(expect, got.data):
                log.warn("ike: Aggressive Mode from {ip} ({id}): HASH_I did not verify (wrong PSK?)",
                         ip=addr[0], id=sa.peer_id_text)
                e.delete_ike(sa, notify_peer=False, reason="authentication failed")
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
        # RFC 3947 §3.2: the hashes describe the addresses and ports of the message that
        # carries them -- AM3 itself, which comes on 4500 when the peer floated first
        # (strongSwan does), not AM1's port-500 addresses
        self.detect_nat(sa, isakmp.find_all(payloads, NatD), addr, local_port)
        e.follow(sa, addr, local_port)
        e.remember(sa, digest)
        self._done(sa, digest, [])
