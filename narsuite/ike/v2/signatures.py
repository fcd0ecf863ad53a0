"""IKEv2 signature AUTH (RFC 7296 §3.8, RFC 4754, RFC 7427) over the signed octets.

Methods understood from peers: 1 (RSA, PKCS#1 v1.5 with SHA-1), 9/10/11 (ECDSA with
SHA-256/384/512, r||s), and 14, RFC 7427's "Digital Signature": a one-byte length, a DER
AlgorithmIdentifier naming key type and hash, then the signature (PKCS#1 v1.5 for RSA,
a DER ECDSA-Sig-Value for ECDSA).  We sign with method 14 when the peer announced
SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4) and with the classic methods otherwise.

Chains, identities and the trust anchors are IKEv1's (:mod:`narsuite.ike.certs`): a
certificate means the same whichever version carried it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from narsuite.ike.v2 import constants as C

__all__ = ["verify", "sign", "certreq_data", "SIGNATURE_HASHES", "announced_hashes"]

_HASH_CLASSES: dict[str, type[hashes.SHA1 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def _hash(name: str) -> hashes.HashAlgorithm:
    return _HASH_CLASSES[name]()

#: RFC 7427 Appendix A: DER AlgorithmIdentifiers -> (key type, hash)
_ALG_IDS: dict[bytes, tuple[str, str]] = {
    bytes.fromhex("300d06092a864886f70d0101050500"): ("rsa", "sha1"),
    bytes.fromhex("300d06092a864886f70d01010b0500"): ("rsa", "sha256"),
    bytes.fromhex("300d06092a864886f70d01010c0500"): ("rsa", "sha384"),
    bytes.fromhex("300d06092a864886f70d01010d0500"): ("rsa", "sha512"),
    bytes.fromhex("300906072a8648ce3d0401"): ("ecdsa", "sha1"),
    bytes.fromhex("300a06082a8648ce3d040302"): ("ecdsa", "sha256"),
    bytes.fromhex("300a06082a8648ce3d040303"): ("ecdsa", "sha384"),
    bytes.fromhex("300a06082a8648ce3d040304"): ("ecdsa", "sha512"),
}
_ALG_BY_KIND = {v: k for k, v in _ALG_IDS.items()}

#: RFC 7427 §7: hash algorithm numbers in SIGNATURE_HASH_ALGORITHMS
SIGNATURE_HASHES = {1: "sha1", 2: "sha256", 3: "sha384", 4: "sha512"}
_CLASSIC_ECDSA = {C.AUTH_ECDSA_256: ("secp256r1", "sha256"), C.AUTH_ECDSA_384: ("secp384r1", "sha384"),
                  C.AUTH_ECDSA_521: ("secp521r1", "sha512")}


def announced_hashes(data: bytes) -> list[str]:
    """The hashes a SIGNATURE_HASH_ALGORITHMS notify lists (unknown numbers skipped)."""
    out = []
    for i in range(0, len(data) - 1, 2):
        h = SIGNATURE_HASHES.get(int.from_bytes(data[i:i + 2], "big"))
        if h:
            out.append(h)
    return out


def _verify_with(key: Any, kind: str, hash_name: str, signature: bytes, octets: bytes) -> bool:
    h = _hash(hash_name)
    try:
        if kind == "rsa" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, octets, padding.PKCS1v15(), h)
            return True
        if kind == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, octets, ec.ECDSA(h))
            return True
    except (InvalidSignature, ValueError):
        return False
    return False


def verify(key: Any, method: int, data: bytes, octets: bytes) -> bool:
    """Does AUTH (``method``, ``data``) sign ``octets`` with ``key``?  Never raises on
    peer-controlled input."""
    if method == C.AUTH_DIGITAL_SIGNATURE:
        if not data:
            return False
        n = data[0]
        alg = _ALG_IDS.get(bytes(data[1:1 + n]))
        if alg is None:
            return False
        return _verify_with(key, alg[0], alg[1], bytes(data[1 + n:]), octets)
    if method == C.AUTH_RSA_SIG:
        return _verify_with(key, "rsa", "sha1", data, octets)
    if method in _CLASSIC_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
        curve, hash_name = _CLASSIC_ECDSA[method]
        if key.curve.name != curve or len(data) % 2:
            return False
        half = len(data) // 2
        der = encode_dss_signature(int.from_bytes(data[:half], "big"), int.from_bytes(data[half:], "big"))
        return _verify_with(key, "ecdsa", hash_name, der, octets)
    return False


def sign(key: Any, octets: bytes, peer_hashes: list[str]) -> tuple[int, bytes]:
    """Our AUTH (method, data): RFC 7427 when the peer announced hashes (SHA-256 if it can,
    else its first), the classic method of our key otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": C.AUTH_ECDSA_256, "secp384r1": C.AUTH_ECDSA_384, "secp521r1": C.AUTH_ECDSA_521}
        classic = by_curve[key.curve.name]
        curve_hash = _CLASSIC_ECDSA[classic][1]
        if peer_hashes:
            h = curve_hash if curve_hash in peer_hashes else peer_hashes[0]
            alg = _ALG_BY_KIND[("ecdsa", h)]
            return C.AUTH_DIGITAL_SIGNATURE, bytes([len(alg)]) + alg + key.sign(octets, ec.ECDSA(_hash(h)))
        r, s = decode_dss_signature(key.sign(octets, ec.ECDSA(_hash(curve_hash))))
        size = (key.curve.key_size + 7) // 8
        return classic, r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if peer_hashes:
        h = "sha256" if "sha256" in peer_hashes else peer_hashes[0]
        alg = _ALG_BY_KIND[("rsa", h)]
        return C.AUTH_DIGITAL_SIGNATURE, bytes([len(alg)]) + alg + key.sign(octets, padding.PKCS1v15(),
                                                                             _hash(h))
    return C.AUTH_RSA_SIG, key.sign(octets, padding.PKCS1v15(), hashes.SHA1())


def certreq_data(cas: Any) -> bytes:
    """CERTREQ's Certification Authority field (§3.7): SHA-1 of each trusted CA's
    SubjectPublicKeyInfo, concatenated."""
    out = b""
    for ca in cas:
        spki = ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        digest = hashlib.sha1(spki).digest()
        if digest not in out:
            out += digest
    return out
