"""IKE_AUTH (RFC 7296 §1.2, §2.15-2.16): identities, AUTH, the configuration payload and
the first CHILD SA.

The policy is chosen in two steps: IKE_SA_INIT left the candidates the peer's address may
use; here the peer's identity narrows them (``id``, matched as for IKEv1 by
:func:`narsuite.ike.ids.id_matches`) and the AUTH payload picks the one whose secret (or
certificate) it proves.  A failed AUTH is answered AUTHENTICATION_FAILED and the SA is
gone (§2.21.2).  The CHILD SA's failure does not fail the IKE SA (§1.2): its error
notify goes in the response and the IKE SA stands.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from narsuite.ike import certs, ids, isakmp
from narsuite.ike.config import PeerPolicy
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import eap, keys, signatures, wire
from narsuite.ike.v2.children import CHILD_LOG
from narsuite.ike.v2.proposals import choose_esp
from narsuite.ike.v2.sa import IkeSAv2
from narsuite.ike.v2.wire import IKEv2Error
from narsuite.logs import logger
from narsuite.passwords import nt_hash

if TYPE_CHECKING:
    from narsuite.ike.v2.engine import IkeV2Engine

__all__ = ["Auth", "id_body"]

log = logger()

#: policy ``auth`` values that mean "the peer signs with a certificate"
CERT_AUTH = ("rsa", "pubkey")


def id_body(p: wire.IDi | wire.IDr) -> bytes:
    """RestOfInitIDPayload / RestOfRespIDPayload (§2.15): the ID payload after its generic header."""
    return bytes([p.id_type, 0, 0, 0]) + p.data


def _v1_id(p: wire.IDi | wire.IDr) -> isakmp.Identification:
    """The identity in IKEv1's record, to share rendering and matching (the ID type numbers
    of RFC 2407 and RFC 7296 agree for addresses, FQDN, user@FQDN, DN and key IDs)."""
    return isakmp.Identification(p.id_type, p.data)


class Auth:
    def __init__(self, engine: IkeV2Engine) -> None:
        self.engine = engine

    def init_extras(self, sa: IkeSAv2, ns: dict[int, wire.Notify]) -> list[Any]:
        """What IKE_SA_INIT's response adds for authentication: CERTREQ naming our CAs, and
        the hashes we sign with when the peer announced RFC 7427 support."""
        e = self.engine
        out: list[Any] = []
        if e.trust is not None:
            out.append(wire.CertReq(C.CERT_X509_SIGNATURE, signatures.certreq_data(e.trust.cas)))
        hashes = ns.get(C.SIGNATURE_HASH_ALGORITHMS)
        if hashes is not None:
            sa.peer_hashes = signatures.announced_hashes(hashes.data)
            out.append(wire.Notify(C.SIGNATURE_HASH_ALGORITHMS, bytes.fromhex("000200030004")))
        return out

    # ------------------------------------------------------------------ IKE_AUTH
    def received(self, sa: IkeSAv2, header: wire.Header, payloads: tuple[Any, ...], addr: tuple[str, int],
                 local_port: int) -> list[Any] | defer.Deferred:
        e = self.engine
        assert sa.keys is not None and sa.choice is not None
        idi = wire.find(payloads, wire.IDi)
        if idi is None:
            raise IKEv2Error(C.INVALID_SYNTAX, "IKE_AUTH without IDi")
        # the request arrived protected: the peer (and its NAT mapping, after the float to
        # 4500) is where this message came from
        sa.remote, sa.local_port = addr, local_port
        ident = _v1_id(idi)
        sa.peer_id_text = ids.id_text(ident)
        sa.peer_id_body = id_body(idi)
        ns = wire.notifies(payloads)
        # RFC 4555: with MOBIKE the peer moves the SA only by UPDATE_SA_ADDRESSES
        sa.mobike = C.MOBIKE_SUPPORTED in ns
        candidates = [p for p in sa.candidates if ids.id_matches(p.id, ident)]
        auth = wire.find(payloads, wire.Auth)
        if auth is None:
            return self.eap_start(sa, payloads, [p for p in candidates if p.auth in ("eap-mschapv2", "eap-tls")])
        prf = sa.choice.prf_name
        octets = keys.signed_octets(sa.init_request, sa.nr, prf, sa.keys.sk_pi, sa.peer_id_body)
        policy: PeerPolicy | None = None
        if auth.method == C.AUTH_SHARED_KEY:
            for p in candidates:
                if p.auth == "psk" and hmac.compare_digest(keys.psk_auth(prf, p.secret, octets), auth.data):
                    policy = p
                    break
        elif any(p.auth in CERT_AUTH for p in candidates):
            policy = self.verify_certificate(sa, idi, auth, octets, payloads,
                                             [p for p in candidates if p.auth in CERT_AUTH])
        if policy is None:
            e.count("auth_failed")
            log.warn("ikev2: {name}: {who} at {addr}: authentication failed (method {m}, {n} candidate policies)",
                     name=sa.name, who=sa.peer_id_text, addr=f"{addr[0]}:{addr[1]}", m=auth.method,
                     n=len(candidates))
            raise IKEv2Error(C.AUTHENTICATION_FAILED, f"{sa.peer_id_text}: AUTH did not verify")
        sa.policy = policy
        out = self.our_auth(sa, policy)
        if sa.mobike:
            out.append(wire.Notify(C.MOBIKE_SUPPORTED))
        return self.finish(sa, payloads, out, ns)

    def uses_certificate(self, policy: PeerPolicy) -> bool:
        return self.engine.credentials is not None and (policy.auth not in ("psk",) or policy.local_id == "%cert")

    def our_id(self, sa: IkeSAv2, policy: PeerPolicy) -> wire.IDr:
        if policy.local_id == "%cert" and self.engine.credentials is not None:
            v1 = self.engine.credentials.our_id("dn")
        else:
            v1 = ids.identification_for(policy.local_id, sa.local_ip)
        return wire.IDr(v1.id_type, v1.data)

    def our_auth(self, sa: IkeSAv2, policy: PeerPolicy, msk: bytes | None = None) -> list[Any]:
        """IDr, our CERTs and AUTH: a signature with our certificate when the policy
        authenticates by certificates or EAP (or names "%cert"), else the PSK."""
        assert sa.keys is not None and sa.choice is not None
        idr = self.our_id(sa, policy)
        prf = sa.choice.prf_name
        octets = keys.signed_octets(sa.init_response, sa.ni, prf, sa.keys.sk_pr, id_body(idr))
        if self.uses_certificate(policy):
            cred = self.engine.credentials
            method, data = signatures.sign(cred.private_key, octets, sa.peer_hashes)
            certs_out = [wire.Cert(C.CERT_X509_SIGNATURE, c.data) for c in cred.cert_payloads()]
            return [idr, *certs_out, wire.Auth(method, data)]
        return [idr, wire.Auth(C.AUTH_SHARED_KEY, keys.psk_auth(prf, policy.secret, octets))]

    def verify_certificate(self, sa: IkeSAv2, idi: wire.IDi, auth: wire.Auth, octets: bytes,
                           payloads: tuple[Any, ...], candidates: list[PeerPolicy]) -> PeerPolicy | None:
        """The peer's chain against our CAs, its identity in the certificate, the signature
        (RFC 7427 or the classic methods): the first candidate policy, or None."""
        e = self.engine
        if e.trust is None:
            return None
        chain = [p.data for p in payloads if isinstance(p, wire.Cert) and p.encoding == C.CERT_X509_SIGNATURE]
        try:
            leaf = e.trust.verify(chain)
        except certs.CertificateError as err:
            log.warn("ikev2: {name}: {who}: certificate refused: {why}", name=sa.name, who=sa.peer_id_text,
                     why=str(err))
            return None
        if not certs.match_id(leaf, idi.id_type, idi.data):
            log.warn("ikev2: {name}: identity {who} is not in the certificate of {subject}", name=sa.name,
                     who=sa.peer_id_text, subject=leaf.subject.rfc4514_string())
            return None
        if not signatures.verify(leaf.public_key(), auth.method, auth.data, octets):
            log.warn("ikev2: {name}: {who}: signature (method {m}) does not verify", name=sa.name,
                     who=sa.peer_id_text, m=auth.method)
            return None
        sa.peer_cert_subject = leaf.subject.rfc4514_string()
        return candidates[0]

    # ------------------------------------------------------------------ EAP (§2.16)
    def eap_start(self, sa: IkeSAv2, payloads: tuple[Any, ...], candidates: list[PeerPolicy]) -> list[Any]:
        """No AUTH from the peer: it wants EAP.  We authenticate with our certificate and
        ask for its identity; the rest of this first request (CP, SA, TS) waits for the end."""
        e = self.engine
        if not candidates or e.credentials is None:
            e.count("auth_failed")
            raise IKEv2Error(C.AUTHENTICATION_FAILED, f"{sa.peer_id_text}: EAP requested, no EAP policy matches")
        sa.policy = candidates[0]
        users = e.users

        def lookup(user: str) -> bytes | None:
            hashed = users.get(user)
            return nt_hash(hashed) if hashed else None

        def names(cert: Any, identity: str) -> bool:
            kind = C.ID_RFC822_ADDR if "@" in identity else C.ID_FQDN
            return certs.match_id(cert, kind, identity.encode())
        if sa.policy.auth == "eap-tls":
            if e.trust is None:
                raise IKEv2Error(C.AUTHENTICATION_FAILED, "EAP-TLS needs cacerts")
            sa.eap = eap.EapTlsServer(e.credentials, e.trust, names)
        else:
            sa.eap = eap.MschapV2Server(lookup)
        sa.auth_request = payloads
        sa.state = "auth"
        out = self.our_auth(sa, sa.policy)
        sa.our_id_body = id_body(out[0])
        return [*out, wire.EAP(sa.eap.start())]

    def eap_received(self, sa: IkeSAv2, header: wire.Header, payloads: tuple[Any, ...], addr: tuple[str, int],
                     local_port: int) -> list[Any] | defer.Deferred | None:
        """The EAP conversation, then the peer's AUTH keyed with the MSK (§2.16)."""
        e = self.engine
        assert sa.policy is not None and sa.keys is not None and sa.choice is not None
        prf = sa.choice.prf_name
        message = wire.find(payloads, wire.EAP)
        if message is not None and sa.eap is not None and sa.eap.state not in ("done", "failed"):
            try:
                outcome = sa.eap.received(message.data)
            except eap.EapError as err:
                raise IKEv2Error(C.AUTHENTICATION_FAILED, f"EAP: {err}") from None
            if outcome.done and not outcome.success:
                e.count("auth_failed")
                log.warn("ikev2: {name}: {who}: EAP failed: {why}", name=sa.name, who=sa.peer_id_text,
                         why=outcome.reason)
                e.respond(sa, header, [wire.EAP(outcome.reply)], addr, local_port)
                e.delete_ike(sa, notify_peer=False, reason="EAP failed")
                return None
            if outcome.success:
                sa.eap_user = outcome.user
                sa.msk = outcome.msk
                log.info("ikev2: {name}: EAP user {user} authenticated ({method})", name=sa.name, user=sa.eap_user,
                         method=sa.policy.auth)
            return [wire.EAP(outcome.reply)]
        auth = wire.find(payloads, wire.Auth)
        if auth is None or not sa.msk:
            raise IKEv2Error(C.AUTHENTICATION_FAILED, "IKE_AUTH after EAP without an AUTH payload")
        octets = keys.signed_octets(sa.init_request, sa.nr, prf, sa.keys.sk_pi, sa.peer_id_body)
        if auth.method != C.AUTH_SHARED_KEY or not hmac.compare_digest(keys.psk_auth(prf, sa.msk, octets), auth.data):
            e.count("auth_failed")
            raise IKEv2Error(C.AUTHENTICATION_FAILED, f"{sa.eap_user}: AUTH with the MSK did not verify")
        octets_r = keys.signed_octets(sa.init_response, sa.ni, prf, sa.keys.sk_pr, sa.our_id_body)
        out: list[Any] = [wire.Auth(C.AUTH_SHARED_KEY, keys.psk_auth(prf, sa.msk, octets_r))]
        if sa.mobike:
            out.append(wire.Notify(C.MOBIKE_SUPPORTED))
        first = sa.auth_request
        sa.auth_request = None
        return self.finish(sa, first, out, wire.notifies(first))

    # ------------------------------------------------------------------ CP + first CHILD SA
    def finish(self, sa: IkeSAv2, payloads: tuple[Any, ...], out: list[Any],
               ns: dict[int, wire.Notify]) -> defer.Deferred:
        """The peer is authenticated: its address from the pool (if it asks), the first
        CHILD SA, and the IKE SA is established."""
        e = self.engine
        assert sa.policy is not None
        p = sa.policy
        if C.IKEV2_MESSAGE_ID_SYNC_SUPPORTED in ns:
            # RFC 6311: both announce it; a cluster's standby that carries this SA on
            # resynchronises the message IDs with the peer (v2/resume.py)
            sa.mid_sync = True
            out.append(wire.Notify(C.IKEV2_MESSAGE_ID_SYNC_SUPPORTED))
        cp = wire.find(payloads, wire.CP)
        wants_cp = cp is not None and cp.cfg_type == C.CFG_REQUEST
        d: defer.Deferred = defer.succeed(None)
        if wants_cp and p.pool:
            prefer = None
            for a in cp.attributes:  # type: ignore[union-attr]
                if a.type == C.INTERNAL_IP4_ADDRESS and len(a.value) == 4 and any(a.value):
                    prefer = ipaddress.IPv4Address(a.value)
            d = e.store.lease_address(p.pool, e.lease_owner(sa), prefer=prefer)

            def no_address(f: Any) -> None:
                e.count("address_failed")
                log.warn("ikev2: {name}: no address from pool {pool}: {why}", name=sa.name, pool=p.pool,
                         why=f.getErrorMessage())
                return None
            d.addErrback(no_address)

        def leased(address: Any) -> list[Any]:
            if sa.state == "deleted":
                return out
            failed = wants_cp and bool(p.pool) and address is None
            if wants_cp and not failed:
                asked = frozenset(a.type for a in cp.attributes) if cp is not None else frozenset()
                out.append(self.cp_reply(sa, address, asked))  # sets sa.address before older SAs go
            e.established(sa, publish=False)  # one record write, at the end
            if ns.get(C.INITIAL_CONTACT) is not None:
                self.initial_contact(sa)
            if failed:
                out.append(wire.Notify(C.INTERNAL_ADDRESS_FAILURE))
                log.info("ikev2: {name}: {who} established without a CHILD SA (no address)", name=sa.name,
                         who=sa.peer_id_text)
                e.publish(sa)
                return out
            out.extend(self.first_child(sa, payloads, ns))
            # one line per client: the IKE SA and its first CHILD SA (two lines cost 5 % of an exchange)
            child = sa.children[-1] if sa.children else None
            fields = e.children.log_fields(sa, child) if child is not None else {}
            log.info("ikev2: {name}: {who} at {addr} established ({alg}){vip}"
                     + ("; " + CHILD_LOG if child is not None else ""), name=sa.name, who=sa.peer_id_text,
                     addr=f"{sa.remote[0]}:{sa.remote[1]}", alg=sa.choice.describe() if sa.choice else "",
                     vip=f", virtual IP {sa.address}" if sa.address else "", **fields)
            e.publish(sa)
            return out
        return d.addCallback(leased)

    def cp_reply(self, sa: IkeSAv2, address: Any, asked: frozenset[int] = frozenset()) -> wire.CP:
        """CFG_REPLY (§3.15): INTERNAL_IP4_ADDRESS/NETMASK from the pool, DNS and SUBNET from
        the policy."""
        e = self.engine
        assert sa.policy is not None
        p = sa.policy
        attrs_out = []
        if address is not None:
            sa.address = str(address)
            attrs_out.append(wire.CfgAttribute(C.INTERNAL_IP4_ADDRESS, ipaddress.IPv4Address(address).packed))
            pool = e.store.pools().get(p.pool)
            # only when asked: strongSwan and Libreswan complain about an unrequested netmask
            if pool is not None and C.INTERNAL_IP4_NETMASK in asked:
                attrs_out.append(wire.CfgAttribute(C.INTERNAL_IP4_NETMASK, pool.network.netmask.packed))
        for dns in p.dns:
            attrs_out.append(wire.CfgAttribute(C.INTERNAL_IP4_DNS, ipaddress.IPv4Address(dns).packed))
        for net in p.split_include:
            n = ipaddress.IPv4Network(net, strict=False)
            attrs_out.append(wire.CfgAttribute(C.INTERNAL_IP4_SUBNET, n.network_address.packed + n.netmask.packed))
        return wire.CP(C.CFG_REPLY, tuple(attrs_out))

    def first_child(self, sa: IkeSAv2, payloads: tuple[Any, ...], ns: dict[int, wire.Notify]) -> list[Any]:
        """The CHILD SA of IKE_AUTH (keyed from the IKE_SA_INIT nonces, no PFS, §2.17);
        its failure is a notify in the response, the IKE SA stays."""
        e = self.engine
        assert sa.policy is not None
        sa_p = wire.find(payloads, wire.SA)
        if sa_p is None:
            return []  # childless (RFC 6023)
        from narsuite.ike.config import parse_esp
        choice = choose_esp(sa_p, tuple(parse_esp(x) for x in sa.policy.esp), pfs_groups=None)
        if choice is None:
            e.count("no_proposal")
            return [wire.Notify(C.NO_PROPOSAL_CHOSEN)]
        try:
            return e.children.install(sa, choice, sa.ni, sa.nr, None, payloads, publish=False, log_it=False)
        except IKEv2Error as err:
            e.count("child_refused")
            # aggregated: an authenticated client can ask again and again
            e.drops.event("child_refused", "ikev2: {name}: CHILD SA refused: {why}", name=sa.name, why=err.detail)
            return [wire.Notify(err.notify, err.data)]

    def initial_contact(self, sa: IkeSAv2) -> None:
        """INITIAL_CONTACT (§2.4): older IKE SAs of this identity and policy from the same
        address and port are stale (another client behind the same NAT, even with the same
        identity, is not touched)."""
        e = self.engine
        for other in list(e.sas.values()):
            if (other is not sa and other.state == "established" and other.policy is sa.policy
                    and other.peer_id_text == sa.peer_id_text and other.remote == sa.remote
                    and other.eap_user == sa.eap_user):
                log.info("ikev2: {name}: INITIAL_CONTACT: deleting the older {old}", name=sa.name, old=other.name)
                e.delete_ike(other, notify_peer=False, reason="INITIAL_CONTACT")
