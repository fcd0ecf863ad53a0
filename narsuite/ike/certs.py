"""IKEv1 certificate authentication (RFC 2409 §5.1, auth method 3: RSA signatures).

Why this module exists: signature authentication is where an IKEv1 responder decides *who* the
peer is, and every piece of it is easy to get subtly wrong -- a chain accepted because a
non-CA certificate signed it, an ID payload that names someone other than the certificate, an
RSA signature in the TLS format (with DigestInfo) that no IKEv1 peer produces.  Keeping these
decisions here, pure (no network I/O, no logging; files are read only by the two ``load``
constructors) and tested against OpenSSL's command line, lets the exchange code stay about
message order.  See docs/ike-certs.md.

* :class:`Credentials` -- our certificate (+ intermediates) and private key, from PEM files;
  the IKE identity we send (:meth:`Credentials.our_id`), our CERT payloads, our signature.
* :class:`Trust` -- the CA certificates we accept peers from; :meth:`Trust.verify` checks a
  received chain; :meth:`Trust.cert_requests` gives the CR payloads we send.
* :func:`match_id` -- does the peer's ID payload name the holder of this certificate?
* :func:`sign` / :func:`verify_signature` -- the SIG payload: PKCS#1 v1.5 *without* DigestInfo
  over HASH_I/HASH_R for RSA (strongSwan ``SIGN_RSA_EMSA_PKCS1_NULL``), ECDSA r||s for
  auth methods 9-11 (``SIGN_ECDSA_WITH_NULL``).
* :func:`peer_chain` -- received CERT payloads to ``[end-entity DER, intermediates...]``;
  :func:`authenticate_peer` -- the whole check in the order the exchange code needs.

Errors: anything a peer controls that fails raises :class:`CertificateError` (a
``ValueError``) with ``kind`` (a short stable word for metrics), ``reason`` (a sentence for the
operator's log) and ``notify`` (the RFC 2408 notify type, should the role answer with one;
sending AUTHENTICATION-FAILED for all of them leaks less).  Configuration problems raise
:class:`CredentialsError` naming the file.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Union

import attrs
import service_identity
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from OpenSSL import crypto as ossl
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

from narsuite.ike import constants as C
from narsuite.ike import isakmp

__all__ = [
    "CertificateError", "CredentialsError", "Credentials", "Trust", "PrivateKey", "PublicKey",
    "match_id", "default_id", "names_equal", "sign", "verify_signature", "auth_method",
    "hash_for_auth_method", "cert_payloads", "peer_chain", "authenticate_peer",
    "select_credentials", "HAVE_NO_DIGEST_INFO", "MAX_PEER_CERTS",
]

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]
PublicKey = Union[rsa.RSAPublicKey, ec.EllipticCurvePublicKey]

#: cryptography >= 47 signs PKCS#1 v1.5 over raw data with ``NoDigestInfo``; older releases
#: cannot, and this module then does the RSA operation itself (see :func:`_rsa_sign_raw`).
HAVE_NO_DIGEST_INFO = hasattr(asym_utils, "NoDigestInfo")

#: More CERT payloads than this in one message is not a chain anyone needs; refusing them
#: bounds the parsing and path-building work a peer can cause before it is authenticated.
MAX_PEER_CERTS = 8


class CertificateError(ValueError):
    """A peer's certificate, ID or signature did not pass.

    ``kind`` is one of: ``unavailable``, ``unsupported-encoding``, ``malformed``, ``too-many``,
    ``untrusted``, ``expired``, ``not-yet-valid``, ``bad-signature``, ``not-a-ca``,
    ``path-length``, ``key-usage``, ``unsupported-key``, ``id-mismatch``, ``invalid-signature``,
    ``invalid`` (anything else OpenSSL reports).  ``reason`` names the certificate concerned.
    """

    def __init__(self, kind: str, reason: str, notify: int = C.AUTHENTICATION_FAILED) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason
        self.notify = notify


class CredentialsError(Exception):
    """Our own configuration is unusable (unreadable file, key not matching the certificate)."""


# ---------------------------------------------------------------------------------------------
# distinguished names


def _der_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """One DER TLV at ``pos``: (tag, value start, value end).  Definite lengths only."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


_STRING_CODECS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1A: "ascii",
                  0x1E: "utf-16-be", 0x1C: "utf-32-be"}


def _dn_key(der: bytes) -> tuple[tuple[tuple[bytes, object], ...], ...]:
    """A comparable form of a DER Name: per RDN, the sorted (OID, value) pairs, string values
    decoded whatever their ASN.1 string type, whitespace-collapsed and case-folded.

    This is RFC 5280 §7.1's "compare after normalising" in the form strongSwan's DN comparison
    effectively applies (case-insensitive, order of RDNs significant), so a peer whose ID says
    ``CN=Alice`` in a PrintableString matches a certificate saying ``cn=alice`` in UTF8String.
    Raises ``ValueError`` for bytes that are not a Name.
    """
    tag, start, end = _der_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a DER Name")
    rdns = []
    pos = start
    while pos < end:
        tag, s_start, s_end = _der_tlv(der, pos)
        if tag != 0x31:
            raise ValueError("RDN is not a SET")
        pairs = []
        p = s_start
        while p < s_end:
            tag, a_start, a_end = _der_tlv(der, p)
            if tag != 0x30:
                raise ValueError("AttributeTypeAndValue is not a SEQUENCE")
            otag, o_start, o_end = _der_tlv(der, a_start)
            if otag != 0x06:
                raise ValueError("attribute type is not an OID")
            vtag, v_start, v_end = _der_tlv(der, o_end)
            if v_end != a_end:
                raise ValueError("trailing bytes in AttributeTypeAndValue")
            raw = der[v_start:v_end]
            value: object = (vtag, raw)
            codec = _STRING_CODECS.get(vtag)
            if codec is not None:
                try:
                    value = " ".join(raw.decode(codec).split()).casefold()
                except UnicodeDecodeError:
                    pass
            pairs.append((der[o_start:o_end], value))
            p = a_end
        rdns.append(tuple(sorted(pairs, key=repr)))
        pos = s_end
    return tuple(rdns)


def _name_der(name: x509.Name | bytes) -> bytes:
    return name if isinstance(name, bytes) else name.public_bytes()


def names_equal(a: x509.Name | bytes, b: x509.Name | bytes) -> bool:
    """Are two distinguished names (``x509.Name`` or DER) the same name?  Byte-equal DER, or
    equal after normalisation (see :func:`_dn_key`).  Malformed DER is simply unequal."""
    da, db = _name_der(a), _name_der(b)
    if da == db:
        return True
    try:
        return _dn_key(da) == _dn_key(db)
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# identities


def default_id(cert: x509.Certificate) -> isakmp.Identification:
    """The ID strongSwan uses for a certificate holder with no ``id`` configured: ID_DER_ASN1_DN
    of the subject (so a strongSwan client with only ``certs = alice.pem`` sends this)."""
    return isakmp.Identification(C.ID_DER_ASN1_DN, cert.subject.public_bytes())


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def match_id(cert: x509.Certificate, id_type: int, id_data: bytes) -> bool:
    """Does the IKE identity (``id_type``, ``id_data`` from the ID payload) name this certificate?

    * ID_DER_ASN1_DN: the subject DN (:func:`names_equal`).
    * ID_FQDN: a dNSName SAN, RFC 6125 rules via service_identity (case-insensitive, a
      ``*.example.net`` SAN matches ``gw.example.net``).
    * ID_IPV4_ADDR / ID_IPV6_ADDR: an iPAddress SAN (service_identity).
    * ID_USER_FQDN: an rfc822Name SAN, compared case-insensitively (as strongSwan does).
    * ID_KEY_ID: the subjectKeyIdentifier, or the SHA-1 key id of the public key.
    * anything else (subnets, ranges, ID_DER_ASN1_GN): never -- a certificate cannot vouch for them.

    Peer-supplied bytes that do not decode simply do not match.  The subject CN is *not*
    consulted for FQDN/USER_FQDN: a CN is not a name the CA checked as such (RFC 6125 §6.4.4).
    """
    id_data = bytes(id_data)
    try:
        if id_type == C.ID_DER_ASN1_DN:
            return names_equal(cert.subject, id_data)
        if id_type == C.ID_FQDN:
            verify_certificate_hostname(cert, id_data.decode("ascii"))
            return True
        if id_type in (C.ID_IPV4_ADDR, C.ID_IPV6_ADDR):
            if len(id_data) != C.ID_FIXED_LENGTHS[id_type]:
                return False
            verify_certificate_ip_address(cert, str(ipaddress.ip_address(id_data)))
            return True
        if id_type == C.ID_USER_FQDN:
            want = id_data.decode("ascii").casefold()
            sans = _sans(cert)
            return sans is not None and any(
                want == e.casefold() for e in sans.get_values_for_type(x509.RFC822Name))
        if id_type == C.ID_KEY_ID:
            ids = [x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest]
            try:
                ids.append(cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest)
            except x509.ExtensionNotFound:
                pass
            return any(hmac.compare_digest(i, id_data) for i in ids)
    except (service_identity.VerificationError, service_identity.CertificateError, ValueError):
        return False
    return False


# ---------------------------------------------------------------------------------------------
# signatures


def auth_method(key: PrivateKey | CertificatePublicKeyTypes) -> int:
    """The IKEv1 authentication method a key signs with: AUTH_RSA_SIG, or AUTH_ECDSA_256/384/521
    by curve (RFC 4754).  ``ValueError`` for other keys."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return C.AUTH_RSA_SIG
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        by_curve = {"secp256r1": C.AUTH_ECDSA_256, "secp384r1": C.AUTH_ECDSA_384,
                    "secp521r1": C.AUTH_ECDSA_521}
        if key.curve.name in by_curve:
            return by_curve[key.curve.name]
    raise ValueError(f"no IKEv1 signature method for {type(key).__name__}")


def hash_for_auth_method(method: int, negotiated: str) -> str:
    """The hash HASH_I/HASH_R are computed with (``narsuite.ike.crypto.hash_i``'s ``h``):
    the negotiated one, except ECDSA where strongSwan keys them with SHA-256/384/512 by curve."""
    return {C.AUTH_ECDSA_256: "sha256", C.AUTH_ECDSA_384: "sha384",
            C.AUTH_ECDSA_521: "sha512"}.get(method, negotiated)


def _rsa_bytes(n: int) -> int:
    return (n.bit_length() + 7) // 8


def _emsa_pkcs1_null(data: bytes, k: int) -> bytes:
    """EMSA-PKCS1-v1_5 block type 1 over ``data`` itself (no DigestInfo): 00 01 FF.. 00 data."""
    if len(data) > k - 11:
        raise ValueError(f"{len(data)} bytes too long for a {k * 8}-bit RSA key")
    return b"\x00\x01" + b"\xff" * (k - 3 - len(data)) + b"\x00" + data


def _rsa_sign_raw(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    """RSA PKCS#1 v1.5 signature without DigestInfo, by hand (cryptography < 47 only).

    Base blinding (m * r^e) hides the message from timing, exponent blinding (d + j*lambda(n),
    64-bit random j) varies the exponent per call, and the result is checked with the public
    key before it leaves (a fault in the private operation would otherwise leak a factor of n).
    Python's ``pow`` is not constant-time, which is what the blinding is for; prefer
    cryptography >= 47 where OpenSSL does this.
    """
    priv = key.private_numbers()
    n, e = priv.public_numbers.n, priv.public_numbers.e
    k = _rsa_bytes(n)
    m = int.from_bytes(_emsa_pkcs1_null(data, k), "big")
    lam = (priv.p - 1) * (priv.q - 1) // _gcd(priv.p - 1, priv.q - 1)
    while True:
        r = secrets.randbelow(n - 2) + 2
        if _gcd(r, n) == 1:
            break
    d = priv.d + (secrets.randbits(64) + 1) * lam
    s = (pow(m * pow(r, e, n) % n, d, n) * pow(r, -1, n)) % n
    if pow(s, e, n) != m:  # pragma: no cover - a hardware or arithmetic fault
        raise RuntimeError("RSA signature self-check failed")
    return s.to_bytes(k, "big")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


_PREHASHED: dict[int, Callable[[], hashes.HashAlgorithm]] = {
    20: hashes.SHA1, 28: hashes.SHA224, 32: hashes.SHA256, 48: hashes.SHA384, 64: hashes.SHA512}


def _ec_width(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> int:
    return (key.curve.key_size + 7) // 8


def _prehashed(hash_bytes: bytes) -> asym_utils.Prehashed:
    try:
        return asym_utils.Prehashed(_PREHASHED[len(hash_bytes)]())
    except KeyError:
        raise ValueError(f"no ECDSA digest of {len(hash_bytes)} bytes") from None


def sign(key: PrivateKey, hash_bytes: bytes) -> bytes:
    """The SIG payload data over HASH_I (initiator) or HASH_R (responder).

    RSA: PKCS#1 v1.5 block type 1 around the raw hash, *no* DigestInfo (RFC 2409 §5.1 signs
    "HASH_I", not a hash of it with an algorithm identifier; strongSwan's
    ``SIGN_RSA_EMSA_PKCS1_NULL``, ``openssl pkeyutl -sign -pkeyopt rsa_padding_mode:pkcs1``);
    deterministic, as long as the modulus.  ECDSA: the hash is signed as the digest itself
    (strongSwan ``SIGN_ECDSA_WITH_NULL``), output r || s each left-padded to the curve size.
    """
    hash_bytes = bytes(hash_bytes)
    if isinstance(key, rsa.RSAPrivateKey):
        _emsa_pkcs1_null(hash_bytes, _rsa_bytes(key.public_key().public_numbers().n))  # length check
        if HAVE_NO_DIGEST_INFO:
            return key.sign(hash_bytes, padding.PKCS1v15(), asym_utils.NoDigestInfo())
        return _rsa_sign_raw(key, hash_bytes)  # pragma: no cover - cryptography < 47
    if isinstance(key, ec.EllipticCurvePrivateKey):
        der = key.sign(hash_bytes, ec.ECDSA(_prehashed(hash_bytes)))
        r, s = asym_utils.decode_dss_signature(der)
        w = _ec_width(key)
        return r.to_bytes(w, "big") + s.to_bytes(w, "big")
    raise TypeError(f"cannot sign with {type(key).__name__}")


def verify_signature(public_key: CertificatePublicKeyTypes, hash_bytes: bytes, signature: bytes) -> bool:
    """Is ``signature`` (SIG payload data) the peer's signature over ``hash_bytes``?

    RSA: the signature must be exactly as long as the modulus and decode to the whole
    expected block ``00 01 FF..FF 00 || hash`` (no DigestInfo accepted, no shorter padding,
    no trailing bytes): anything looser invites Bleichenbacher-style forgeries with e = 3.
    ECDSA: r || s of twice the curve size.  Any other key: False.  Never raises for
    peer-controlled bytes.
    """
    hash_bytes, signature = bytes(hash_bytes), bytes(signature)
    if isinstance(public_key, rsa.RSAPublicKey):
        pub = public_key.public_numbers()
        k = _rsa_bytes(pub.n)
        if len(signature) != k:
            return False
        try:
            expected = _emsa_pkcs1_null(hash_bytes, k)
        except ValueError:
            return False
        s = int.from_bytes(signature, "big")
        if s >= pub.n:
            return False
        block = pow(s, pub.e, pub.n).to_bytes(k, "big")
        ok = hmac.compare_digest(block, expected)
        if ok and HAVE_NO_DIGEST_INFO:  # a second opinion from OpenSSL, for the same answer
            try:
                # cryptography's stub for verify() lacks NoDigestInfo (sign()'s has it); both take it.
                public_key.verify(signature, hash_bytes, padding.PKCS1v15(),
                                  asym_utils.NoDigestInfo())  # type: ignore[arg-type]
            except InvalidSignature:  # pragma: no cover - would mean our block is wrong
                return False
        return ok
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        w = _ec_width(public_key)
        if len(signature) != 2 * w:
            return False
        try:
            der = asym_utils.encode_dss_signature(
                int.from_bytes(signature[:w], "big"), int.from_bytes(signature[w:], "big"))
            public_key.verify(der, hash_bytes, ec.ECDSA(_prehashed(hash_bytes)))
        except (InvalidSignature, ValueError):
            return False
        return True
    return False


# ---------------------------------------------------------------------------------------------
# loading


def _read(path: os.PathLike | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CredentialsError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _load_certs(data: bytes, path: os.PathLike | str) -> list[x509.Certificate]:
    """Every certificate in a file: concatenated PEM, or one DER certificate."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise CredentialsError(f"{path}: not a PEM or DER X.509 certificate ({e})") from e


def _public_der(key: PrivateKey | CertificatePublicKeyTypes) -> bytes:
    pub = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@attrs.frozen
class Credentials:
    """Our end-entity certificate, the intermediates we send with it, and its private key."""

    certificate: x509.Certificate
    key: PrivateKey = attrs.field(repr=False)
    intermediates: tuple[x509.Certificate, ...] = ()

    def __attrs_post_init__(self) -> None:
        if _public_der(self.key) != _public_der(self.certificate.public_key()):
            raise CredentialsError(
                f"private key does not belong to certificate {self.certificate.subject.rfc4514_string()}")
        auth_method(self.key)  # ValueError for DSA/Ed25519/...: nothing IKEv1 method 3/9-11 signs with

    @classmethod
    def load(
        cls,
        cert_path: os.PathLike | str,
        key_path: os.PathLike | str,
        intermediates: Iterable[os.PathLike | str] = (),
        password: bytes | None = None,
    ) -> Credentials:
        """Load from PEM (or DER) files: ``cert_path`` holds our certificate, optionally
        followed by intermediates; ``key_path`` the key (PKCS#8, PKCS#1 or SEC1; encrypted
        with ``password``); ``intermediates`` more files of CA certificates to send along.
        Every error names the file."""
        certs = _load_certs(_read(cert_path, "certificate"), cert_path)
        chain = list(certs[1:])
        for p in intermediates:
            chain.extend(_load_certs(_read(p, "intermediate certificate"), p))
        key_data = _read(key_path, "private key")
        try:
            if b"-----BEGIN" in key_data:
                key = serialization.load_pem_private_key(key_data, password)
            else:
                key = serialization.load_der_private_key(key_data, password)
        except (ValueError, TypeError) as e:
            raise CredentialsError(f"{key_path}: cannot load private key ({e})") from e
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise CredentialsError(f"{key_path}: {type(key).__name__} keys cannot sign IKEv1 (RSA or ECDSA only)")
        try:
            return cls(certs[0], key, tuple(chain))
        except CredentialsError as e:
            raise CredentialsError(f"{key_path} / {cert_path}: {e}") from None
        except ValueError as e:
            raise CredentialsError(f"{key_path}: {e}") from None

    @property
    def private_key(self) -> PrivateKey:
        """Alias of ``key`` (the name the ike engine uses)."""
        return self.key

    @property
    def auth_method(self) -> int:
        """AUTH_RSA_SIG or AUTH_ECDSA_*: what our SA proposal/choice must say."""
        return auth_method(self.key)

    def our_id(self, kind: str = "dn", value: str | None = None) -> isakmp.Identification:
        """The ID payload we send, one the peer can match against our certificate.

        ``kind``: ``"dn"`` (ID_DER_ASN1_DN of the subject, strongSwan's default for a
        certificate), ``"fqdn"`` (a dNSName SAN), ``"ipv4"``/``"ipv6"`` (an iPAddress SAN),
        ``"email"`` (an rfc822Name SAN, ID_USER_FQDN).  Without ``value`` the first SAN of that
        kind is used; with it, ``value`` must be in the certificate (``CredentialsError``
        otherwise: a peer would refuse an ID our certificate does not carry).
        """
        cert = self.certificate
        if kind == "dn":
            ident = default_id(cert) if value is None else isakmp.Identification(
                C.ID_DER_ASN1_DN, _dn_from_text(value).public_bytes())
        else:
            sans = _sans(cert)
            sans_of = {
                "fqdn": (C.ID_FQDN, x509.DNSName, lambda v: v.encode("ascii")),
                "email": (C.ID_USER_FQDN, x509.RFC822Name, lambda v: v.encode("ascii")),
                "ipv4": (C.ID_IPV4_ADDR, x509.IPAddress, lambda v: ipaddress.IPv4Address(str(v)).packed),
                "ipv6": (C.ID_IPV6_ADDR, x509.IPAddress, lambda v: ipaddress.IPv6Address(str(v)).packed),
            }
            if kind not in sans_of:
                raise ValueError(f"unknown ID kind {kind!r} (dn, fqdn, ipv4, ipv6, email)")
            id_type, gn, encode = sans_of[kind]
            if value is None:
                candidates = []
                # get_values_for_type(gn), which mypy cannot pick an overload for with gn a variable
                for v in ([n.value for n in sans if isinstance(n, gn)] if sans is not None else []):
                    try:
                        candidates.append(encode(v))
                    except ValueError:  # an IPv6 SAN when asked for ipv4 and vice versa
                        continue
                if not candidates:
                    raise CredentialsError(
                        f"certificate {cert.subject.rfc4514_string()} has no {kind} subjectAltName")
                ident = isakmp.Identification(id_type, candidates[0])
            else:
                ident = isakmp.Identification(id_type, encode(value))
        if not match_id(cert, ident.id_type, ident.data):
            raise CredentialsError(
                f"ID {kind} {value!r} is not in certificate {cert.subject.rfc4514_string()}")
        return ident

    def cert_payloads(self, intermediates: bool = True) -> list[isakmp.Certificate]:
        """Our CERT payloads (encoding 4, X.509 signature): end-entity first, then intermediates."""
        return cert_payloads(self.certificate, self.intermediates if intermediates else ())

    def issuer_names(self) -> list[x509.Name]:
        """Every CA name our chain leads to: the issuers of each certificate we send (so the root
        above the last intermediate too) -- what a peer's CR may ask for."""
        names = [self.certificate.issuer]
        for c in self.intermediates:
            names.extend((c.subject, c.issuer))
        return names

    def satisfies(self, requests: Iterable[isakmp.CertificateRequest]) -> bool:
        """Does our chain answer the peer's CR payloads?  Yes when it sent no X.509 CR, or one
        with an empty authority (any CA), or one naming a CA our chain leads to."""
        wanted = [r.authority for r in requests if r.cert_type == C.CERT_X509_SIGNATURE]
        if not wanted or any(not a for a in wanted):
            return True
        return any(names_equal(n, a) for n in self.issuer_names() for a in wanted)

    def sign(self, hash_bytes: bytes) -> bytes:
        """SIG payload data over HASH_R/HASH_I with our key (:func:`sign`)."""
        return sign(self.key, hash_bytes)


def _dn_from_text(text: str) -> x509.Name:
    """``"C=CH, O=narsuite lab, CN=gw"`` (strongSwan's order, most significant first) -> Name."""
    oids = {"C": x509.NameOID.COUNTRY_NAME, "ST": x509.NameOID.STATE_OR_PROVINCE_NAME,
            "L": x509.NameOID.LOCALITY_NAME, "O": x509.NameOID.ORGANIZATION_NAME,
            "OU": x509.NameOID.ORGANIZATIONAL_UNIT_NAME, "CN": x509.NameOID.COMMON_NAME,
            "E": x509.NameOID.EMAIL_ADDRESS, "EMAIL": x509.NameOID.EMAIL_ADDRESS,
            "DC": x509.NameOID.DOMAIN_COMPONENT, "SN": x509.NameOID.SERIAL_NUMBER}
    attrs_ = []
    for part in text.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep or k.strip().upper() not in oids:
            raise ValueError(f"cannot parse DN component {part.strip()!r}")
        attrs_.append(x509.NameAttribute(oids[k.strip().upper()], v.strip()))
    return x509.Name(attrs_)


def select_credentials(
    candidates: Sequence[Credentials], requests: Iterable[isakmp.CertificateRequest]
) -> Credentials | None:
    """The first of our credentials whose chain satisfies the peer's CRs, or ``None``."""
    requests = list(requests)
    return next((c for c in candidates if c.satisfies(requests)), None)


def cert_payloads(cert: x509.Certificate, intermediates: Iterable[x509.Certificate] = ()) -> list[isakmp.Certificate]:
    """CERT payloads (encoding 4) for ``cert`` then ``intermediates``, in that order
    (strongSwan sends the end-entity first and reads it as such)."""
    return [isakmp.Certificate(C.CERT_X509_SIGNATURE, c.public_bytes(serialization.Encoding.DER))
            for c in (cert, *intermediates)]


def peer_chain(payloads: Iterable[isakmp.Payload]) -> list[bytes]:
    """From a message's payloads, the X.509 certificates as ``[end-entity, intermediates...]``
    (DER), ready for :meth:`Trust.verify`.

    The end-entity is the certificate that issued none of the others (so the order the peer
    sent them in does not matter); on a tie, the first received that is not a CA.  CERT
    payloads of other encodings (CRLs, PKCS#7) are ignored unless nothing else came.
    """
    certs = [p for p in payloads if isinstance(p, isakmp.Certificate)]
    x509s = [p.data for p in certs if p.encoding == C.CERT_X509_SIGNATURE]
    if not x509s:
        if certs:
            raise CertificateError(
                "unsupported-encoding",
                f"peer sent CERT payloads of encoding {sorted({p.encoding for p in certs})}, "
                "not X.509 signature (4)", C.CERT_TYPE_UNSUPPORTED)
        raise CertificateError("unavailable", "peer sent no certificate", C.CERTIFICATE_UNAVAILABLE)
    if len(x509s) > MAX_PEER_CERTS:
        raise CertificateError("too-many", f"peer sent {len(x509s)} certificates (at most {MAX_PEER_CERTS})",
                               C.INVALID_CERTIFICATE)
    parsed = [_parse_der(d, i) for i, d in enumerate(x509s)]
    issuers = [c.issuer.public_bytes() for c in parsed]

    def issued_others(i: int) -> bool:
        subj = parsed[i].subject.public_bytes()
        return any(j != i and issuers[j] == subj for j in range(len(parsed)))

    leaves = [i for i in range(len(parsed)) if not issued_others(i)] or list(range(len(parsed)))
    leaf = next((i for i in leaves if not _is_ca(parsed[i])), leaves[0])
    return [x509s[leaf]] + [d for i, d in enumerate(x509s) if i != leaf]


def _parse_der(data: bytes, index: int = 0) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(bytes(data))
    except ValueError as e:
        raise CertificateError("malformed", f"certificate #{index + 1} is not DER X.509 ({e})",
                               C.INVALID_CERTIFICATE) from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
    except ValueError:
        return False


def _describe(cert: x509.Certificate) -> str:
    return f'"{cert.subject.rfc4514_string()}"'


# OpenSSL X509_V_ERR_* -> (kind, notify); the reason text is built from OpenSSL's message.
_OPENSSL_ERRORS = {
    2: ("untrusted", C.INVALID_CERT_AUTHORITY),   # unable to get issuer certificate
    18: ("untrusted", C.INVALID_CERT_AUTHORITY),  # self-signed, not a trust anchor
    19: ("untrusted", C.INVALID_CERT_AUTHORITY),  # self-signed certificate in chain
    20: ("untrusted", C.INVALID_CERT_AUTHORITY),  # unable to get local issuer certificate
    21: ("untrusted", C.INVALID_CERT_AUTHORITY),  # unable to verify the first certificate
    4: ("bad-signature", C.INVALID_CERTIFICATE),  # unable to decrypt certificate's signature
    7: ("bad-signature", C.INVALID_CERTIFICATE),  # certificate signature failure
    9: ("not-yet-valid", C.INVALID_CERTIFICATE),
    10: ("expired", C.INVALID_CERTIFICATE),
    13: ("malformed", C.INVALID_CERTIFICATE),     # bad notBefore
    14: ("malformed", C.INVALID_CERTIFICATE),     # bad notAfter
    22: ("path-length", C.INVALID_CERTIFICATE),   # chain too long
    25: ("path-length", C.INVALID_CERTIFICATE),
    32: ("not-a-ca", C.INVALID_CERTIFICATE),      # key usage does not include certificate signing
    79: ("not-a-ca", C.INVALID_CERTIFICATE),      # invalid CA certificate (24 before OpenSSL 3.0)
}
#: OpenSSL message texts for the codes whose numbers moved between OpenSSL releases.
_OPENSSL_MESSAGES = {"invalid CA certificate": ("not-a-ca", C.INVALID_CERTIFICATE)}

_HINTS = {
    "untrusted": "is not issued by a configured CA (missing intermediate, or add its CA to the trust)",
    "bad-signature": "has a signature its issuer's key does not verify (wrong or forged issuer)",
    "not-yet-valid": "is not valid yet (check the clocks)",
    "expired": "has expired",
    "not-a-ca": "signed another certificate but is not a CA (basicConstraints CA:FALSE or no keyCertSign)",
    "path-length": "is below a CA whose pathLenConstraint forbids it",
}


def _utc_naive(now: datetime.datetime) -> datetime.datetime:
    if now.tzinfo is not None:
        now = now.astimezone(datetime.UTC).replace(tzinfo=None)
    return now


@attrs.frozen
class Trust:
    """The CA certificates a peer's certificate must chain to (swanctl's ``x509ca``)."""

    cas: tuple[x509.Certificate, ...]

    def __attrs_post_init__(self) -> None:
        if not self.cas:
            raise CredentialsError("no CA certificates configured")

    @classmethod
    def load(cls, *paths: os.PathLike | str | Sequence[os.PathLike | str]) -> Trust:
        """CA certificates from files (PEM, several per file, or DER) and/or directories (every
        regular file in them, sorted; dot-files skipped).  A list/tuple of paths counts as its
        elements (so a config's ``cacerts`` tuple can be passed as is).  Errors name the file."""
        flat: list[os.PathLike | str] = []
        for p in paths:
            if isinstance(p, (str, os.PathLike)):
                flat.append(p)
            else:
                flat.extend(p)
        cas: list[x509.Certificate] = []
        for entry in flat:
            p = Path(entry)
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
            for f in files:
                cas.extend(_load_certs(_read(f, "CA certificate"), f))
        if not cas:
            raise CredentialsError(f"no CA certificates found in {', '.join(map(str, flat)) or '(nothing)'}")
        return cls(tuple(cas))

    def authorities(self) -> list[bytes]:
        """DER subject names of our CAs, once each: the authority field of our CR payloads
        (strongSwan's IKEv1 CR carries exactly this)."""
        out: list[bytes] = []
        for c in self.cas:
            der = c.subject.public_bytes()
            if der not in out:
                out.append(der)
        return out

    def ca_subjects_der(self) -> list[bytes]:
        """Alias of :meth:`authorities` (the name the ike engine uses)."""
        return self.authorities()

    def cert_requests(self) -> list[isakmp.CertificateRequest]:
        """One CR payload per trusted CA (cert type 4, X.509 signature)."""
        return [isakmp.CertificateRequest(C.CERT_X509_SIGNATURE, a) for a in self.authorities()]

    def verify(self, chain_der: Sequence[bytes], now: datetime.datetime | None = None) -> x509.Certificate:
        """Check the peer's chain and return its end-entity certificate.

        ``chain_der[0]`` is the end-entity (:func:`peer_chain` puts it there), the rest are
        untrusted intermediates in any order.  OpenSSL's X509_verify_cert with no purpose set
        builds the path to one of our CAs and checks every signature, validity date (at
        ``now``, default the current time), basicConstraints CA and keyUsage keyCertSign on
        each issuer and path lengths; no extended key usage is required (IPsec client
        certificates rarely carry a TLS one).  Then, like strongSwan (RFC 4945 §5.1.3.2), the
        end-entity's keyUsage, if present, must allow digitalSignature or nonRepudiation, and
        its key must be RSA or ECDSA.  Raises :class:`CertificateError`.
        """
        if not chain_der:
            raise CertificateError("unavailable", "peer sent no certificate", C.CERTIFICATE_UNAVAILABLE)
        if len(chain_der) > MAX_PEER_CERTS:
            raise CertificateError("too-many", f"peer sent {len(chain_der)} certificates", C.INVALID_CERTIFICATE)
        certs = [_parse_der(d, i) for i, d in enumerate(chain_der)]
        leaf = certs[0]
        store = ossl.X509Store()
        for ca in self.cas:
            store.add_cert(ossl.X509.from_cryptography(ca))
        if now is not None:
            store.set_time(_utc_naive(now))
        ctx = ossl.X509StoreContext(store, ossl.X509.from_cryptography(leaf),
                                    [ossl.X509.from_cryptography(c) for c in certs[1:]])
        try:
            ctx.verify_certificate()
        except ossl.X509StoreContextError as e:
            code = e.errors[0] if e.errors else -1
            message = e.errors[2] if len(e.errors) > 2 else str(e)
            kind, notify = _OPENSSL_ERRORS.get(
                code, _OPENSSL_MESSAGES.get(str(message), ("invalid", C.INVALID_CERTIFICATE)))
            bad = _describe(e.certificate.to_cryptography()) if e.certificate is not None else "certificate"
            hint = _HINTS.get(kind, "failed verification")
            raise CertificateError(kind, f"{bad} {hint} [OpenSSL: {message}]", notify) from None
        try:
            ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            ku = None
        if ku is not None and not (ku.digital_signature or ku.content_commitment):
            raise CertificateError(
                "key-usage", f"{_describe(leaf)} has keyUsage without digitalSignature/nonRepudiation "
                "(RFC 4945 5.1.3.2; strongSwan refuses it too)", C.INVALID_CERTIFICATE)
        try:
            auth_method(leaf.public_key())
        except (ValueError, TypeError):
            raise CertificateError("unsupported-key", f"{_describe(leaf)} has a key IKEv1 cannot verify "
                                   "(RSA or ECDSA P-256/384/521 only)", C.INVALID_CERTIFICATE) from None
        return leaf


def authenticate_peer(
    trust: Trust,
    payloads: Iterable[isakmp.Payload],
    identification: isakmp.Identification,
    hash_bytes: bytes,
    signature: bytes,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """The whole RSA/ECDSA-signature check of a peer's MM5 (or AM1/AM3): chain, ID, signature.

    ``payloads`` are the message's payloads (its CERT payloads are used), ``identification``
    its ID payload, ``hash_bytes`` the HASH_I (or HASH_R) we computed from that ID payload's
    body, ``signature`` the SIG payload data.  Order matters for the error an operator sees:
    an untrusted certificate is reported as such, not as a bad signature.  Returns the
    verified end-entity certificate; raises :class:`CertificateError`.
    """
    leaf = trust.verify(peer_chain(payloads), now)
    if not match_id(leaf, identification.id_type, identification.data):
        raise CertificateError(
            "id-mismatch", f"peer's ID (type {identification.id_type}) is not in certificate {_describe(leaf)}",
            C.INVALID_ID_INFORMATION)
    if not verify_signature(leaf.public_key(), hash_bytes, signature):
        raise CertificateError("invalid-signature", f"signature does not verify with {_describe(leaf)}'s key",
                               C.INVALID_SIGNATURE)
    return leaf
