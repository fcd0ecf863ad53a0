"""IKEv1 cryptography (RFC 2409): Diffie-Hellman, phase-1 and Quick Mode keys, CBC with IV chains.

Why this module exists: the ``ike`` role is an IKEv1 responder that must agree bit for bit with
strongSwan 5.9 on every derived value, and IKEv1 leaves little room for error -- a wrong byte in
SKEYID, an IV taken from the wrong block or KEYMAT cut in the wrong order shows up only as
"INVALID_HASH_INFORMATION" or silently dropped ESP.  Keeping every formula here, pure (no I/O,
no logging, no clock) and tested against the RFC text re-implemented independently, lets the
exchange code stay about *which* payloads go where.

Contents, each with the RFC section it implements:

* Diffie-Hellman groups (``group(n)``): MODP 2 (RFC 2409 §6.2), 5, 14, 15, 16 (RFC 3526) and
  ECP 19, 20, 21 (RFC 5903).  Public values are encoded as IKE carries them in the KE payload;
  a peer's value is validated before use (``CryptoError``).
* The prf (HMAC with the negotiated hash, RFC 2409 §5 / RFC 2104), SKEYID for the three
  authentication methods, SKEYID_d/_a/_e, the Appendix B cipher key expansion, HASH_I/HASH_R.
* CBC encryption of ISAKMP message bodies (AES-CBC, 3DES-CBC) and the Appendix B IV rules:
  ``initial_iv``, ``phase2_iv`` and ``IVChain``, which tracks the IV of phase 1 and of each
  phase-2/informational/transaction exchange by message ID.
* Quick Mode HASH(1)/(2)/(3), the informational and transaction (mode-config, XAUTH) HASH, and
  KEYMAT with and without PFS (RFC 2409 §5.5), split into ESP encryption || integrity keys.
* The NAT-D hash of RFC 3947 §3.2.

Errors: anything a *peer* controls (a public value, a ciphertext, a decrypted payload chain)
raises ``CryptoError`` (a ``ValueError``) and nothing else, so the role can drop the message and
count it.  Programming errors (unknown hash name, a 7-byte cookie) raise ``ValueError``/
``TypeError``.  Secrets (private keys, SKEYIDs, cipher keys) are never shown by ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import struct
import warnings
from collections import OrderedDict
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dh, ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

try:  # cryptography >= 43 keeps 3DES in "decrepit"; it leaves the primitives module in 48.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES as _TripleDES
except ImportError:  # pragma: no cover - older cryptography
    # For cryptography < 43 only; mypy sees the installed version's class there and
    # refuses to rebind a name that holds a class.
    _TripleDES = algorithms.TripleDES  # type: ignore[misc]

# cryptography marks finite-field DH deprecated (its module warns when the names are looked
# up).  MODP groups are still what IKEv1 peers commonly propose, so the names are looked up
# once, here, with that one warning silenced.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Diffie-Hellman over finite fields")
    _DHParameterNumbers = dh.DHParameterNumbers
    _DHPublicNumbers = dh.DHPublicNumbers
    _DHPrivateKey = dh.DHPrivateKey


class CryptoError(ValueError):
    """A peer's value is unusable: bad DH public value, bad ciphertext length, bad payload chain.

    The only exception that peer-controlled input can raise here; the role drops the message
    (or answers with the ISAKMP notification it chooses) and counts it.
    """


# --------------------------------------------------------------------------------------------
# Hashes and the prf (RFC 2409 §5: "prf ... the HMAC version of the negotiated hash")

#: negotiated hash name -> output length in bytes
HASHES: dict[str, int] = {"md5": 16, "sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
#: IKEv1 "Hash Algorithm" attribute values (RFC 2409 Appendix A, IANA for the SHA-2 ones)
HASH_BY_ATTRIBUTE: dict[int, str] = {1: "md5", 2: "sha1", 4: "sha256", 5: "sha384", 6: "sha512"}


def _check_hash(hash_name: str) -> None:
    if hash_name not in HASHES:
        raise ValueError(f"unknown IKE hash {hash_name!r}; supported: {', '.join(HASHES)}")


def digest(hash_name: str, data: bytes) -> bytes:
    """The plain negotiated hash: used for IVs (Appendix B) and NAT-D (RFC 3947), never keyed."""
    _check_hash(hash_name)
    return hashlib.new(hash_name, data).digest()


def prf(hash_name: str, key: bytes, data: bytes) -> bytes:
    """IKEv1's prf: HMAC (RFC 2104) with the negotiated hash, full output length.

    No separate PRF attribute is negotiated by strongSwan or by us, so RFC 2409 §5's default
    applies: the HMAC version of the hash algorithm.
    """
    _check_hash(hash_name)
    return hmac.digest(key, data, hash_name)


def constant_time_equal(expected: bytes, received: bytes) -> bool:
    """Compare a computed hash with a received one without leaking where they differ.

    Every HASH_I/HASH_R, HASH(1..3) and informational HASH a peer sends goes through here
    (``hmac.compare_digest``), so the timing of a rejection says nothing about the value.
    """
    return hmac.compare_digest(expected, received)


def random_nonce(length: int = 32) -> bytes:
    """A fresh nonce (Ni/Nr) from ``secrets``; RFC 2409 §5 wants 8..256 bytes, strongSwan sends 32."""
    if not 8 <= length <= 256:
        raise ValueError(f"IKE nonce length must be 8..256 bytes (RFC 2409 §5), got {length}")
    return secrets.token_bytes(length)


def random_cookie() -> bytes:
    """A fresh 8-byte ISAKMP cookie (CKY-R), never all zero (zero marks "no cookie yet")."""
    while True:
        cookie = secrets.token_bytes(8)
        if any(cookie):
            return cookie


# --------------------------------------------------------------------------------------------
# Diffie-Hellman groups

# The MODP primes are 2^N - 2^(N-64) - 1 + 2^64 * ([2^(N-130) pi] + k) (RFC 2409 §6.2, RFC 3526
# §2-5); the test suite recomputes them from that formula.  Generator 2 for all.
_MODP_HEX = {
    2: (
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE65381FFFFFFFFFFFFFFFF"
    ),
    5: (
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
        "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
        "9ED529077096966D670C354E4ABC9804F1746C08CA237327FFFFFFFFFFFFFFFF"
    ),
    14: (
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
        "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
        "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
        "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
        "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF"
    ),
    15: (
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
        "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
        "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
        "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
        "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
        "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
        "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
        "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
        "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF"
    ),
    16: (
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
        "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
        "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
        "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
        "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
        "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
        "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
        "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
        "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
        "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
        "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7"
        "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8"
        "DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D99B2964FA090C3A2"
        "233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9"
        "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF"
    ),
}

MODP_PRIMES: dict[int, int] = {n: int(h, 16) for n, h in _MODP_HEX.items()}


class ModpGroup:
    """A MODP group (g = 2): KE data is g^x big-endian, left-padded to the prime's length.

    RFC 2409 §5 and RFC 3526 want the public value padded to the length of the prime
    (strongSwan rejects a KE payload of any other length), and strongSwan pads g^xy the same
    way before it enters SKEYID; so do we.  The private key is a ``cryptography`` object, never
    an attribute of this (shared, per-group) object.
    """

    kind = "modp"

    def __init__(self, number: int, prime: int) -> None:
        self.number = number
        self.prime = prime
        self.bits = prime.bit_length()
        self.public_length = (self.bits + 7) // 8
        self.shared_length = self.public_length
        self._numbers = _DHParameterNumbers(prime, 2)
        self._parameters = self._numbers.parameters()

    def __repr__(self) -> str:
        return f"<ModpGroup {self.number} ({self.bits}-bit)>"

    def generate(self) -> tuple[Any, bytes]:
        """A fresh private key and the KE payload data for it (OpenSSL's CSPRNG picks x)."""
        private = self._parameters.generate_private_key()
        y = private.public_key().public_numbers().y
        return private, y.to_bytes(self.public_length, "big")

    def check_peer(self, peer_public: bytes) -> int:
        """The peer's g^y as an int, after RFC 2409-style validation: exact length, 1 < y < p-1.

        0, 1 and p-1 (and anything >= p) would force the shared secret into {0, 1, p-1}; the
        prime is safe, so every other value lies in a large subgroup.  ``cryptography`` builds
        public keys from all of these (OpenSSL refuses some only at exchange time), so the rule
        is checked here, first, whatever the backend does.
        """
        if not isinstance(peer_public, (bytes, bytearray, memoryview)):
            raise CryptoError(f"group {self.number}: KE data must be bytes")
        if len(peer_public) != self.public_length:
            raise CryptoError(
                f"group {self.number}: KE data is {len(peer_public)} bytes, must be {self.public_length}"
            )
        y = int.from_bytes(peer_public, "big")
        if not 1 < y < self.prime - 1:
            raise CryptoError(f"group {self.number}: peer public value outside 1 < y < p-1")
        return y

    def shared(self, private: Any, peer_public: bytes) -> bytes:
        """g^xy, left-padded to the prime's length; ``CryptoError`` for an invalid peer value."""
        y = self.check_peer(peer_public)
        if not isinstance(private, _DHPrivateKey) or private.key_size != self.bits:
            raise TypeError(f"group {self.number}: private key is not one of this group's")
        try:
            peer = _DHPublicNumbers(y, self._numbers).public_key()
            secret = private.exchange(peer)
        except ValueError as e:  # pragma: no cover - check_peer already excludes what OpenSSL rejects
            raise CryptoError(f"group {self.number}: peer public value refused: {e}") from None
        return secret.rjust(self.shared_length, b"\0")


class EcpGroup:
    """An ECP group of RFC 5903: KE data is x || y, each left-padded to the field size.

    RFC 5903 §7 encodes the point without the 0x04 prefix of SEC1/X9.62; §9 (changed from
    RFC 4753) makes the shared secret the x coordinate alone, which strongSwan 5.x uses.
    ``cryptography`` checks that the peer's point is on the curve.
    """

    kind = "ecp"

    def __init__(self, number: int, curve: ec.EllipticCurve, field_bytes: int) -> None:
        self.number = number
        self.curve = curve
        self.field_bytes = field_bytes
        self.public_length = 2 * field_bytes
        self.shared_length = field_bytes

    def __repr__(self) -> str:
        return f"<EcpGroup {self.number} ({self.curve.name})>"

    def generate(self) -> tuple[Any, bytes]:
        """A fresh private key and its KE payload data ``x || y``."""
        private = ec.generate_private_key(self.curve)
        point = private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return private, point[1:]

    def check_peer(self, peer_public: bytes) -> ec.EllipticCurvePublicKey:
        """The peer's point, if the KE data has the right length and lies on the curve."""
        if not isinstance(peer_public, (bytes, bytearray, memoryview)):
            raise CryptoError(f"group {self.number}: KE data must be bytes")
        if len(peer_public) != self.public_length:
            raise CryptoError(
                f"group {self.number}: KE data is {len(peer_public)} bytes, must be {self.public_length}"
            )
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(self.curve, b"\x04" + bytes(peer_public))
        except ValueError:
            raise CryptoError(f"group {self.number}: peer public value is not a point on {self.curve.name}") from None

    def shared(self, private: Any, peer_public: bytes) -> bytes:
        """The x coordinate of x*Y (RFC 5903 §9), ``field_bytes`` long."""
        peer = self.check_peer(peer_public)
        if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != self.curve.name:
            raise TypeError(f"group {self.number}: private key is not one of this group's")
        try:
            secret = private.exchange(ec.ECDH(), peer)
        except ValueError as e:  # pragma: no cover - from_encoded_point already validated the point
            raise CryptoError(f"group {self.number}: {e}") from None
        return secret.rjust(self.shared_length, b"\0")


DHGroup = ModpGroup | EcpGroup

_ECP = {19: (ec.SECP256R1, 32), 20: (ec.SECP384R1, 48), 21: (ec.SECP521R1, 66)}
#: the Diffie-Hellman group numbers (IKE "Group Description" values) ``group()`` accepts
SUPPORTED_GROUPS: tuple[int, ...] = tuple(sorted([*MODP_PRIMES, *_ECP]))
_groups: dict[int, DHGroup] = {}


def group(number: int) -> DHGroup:
    """The Diffie-Hellman group with this IKE number (built once, then shared: it holds no key)."""
    g = _groups.get(number)
    if g is None:
        if number in MODP_PRIMES:
            g = ModpGroup(number, MODP_PRIMES[number])
        elif number in _ECP:
            curve, size = _ECP[number]
            g = EcpGroup(number, curve(), size)
        else:
            raise ValueError(
                f"unsupported Diffie-Hellman group {number!r}; supported: {', '.join(map(str, SUPPORTED_GROUPS))}"
            )
        _groups[number] = g
    return g



# --------------------------------------------------------------------------------------------
# Phase 1 keys (RFC 2409 §5)

_COOKIE = 8


def _cookies(cky_i: bytes, cky_r: bytes) -> bytes:
    if len(cky_i) != _COOKIE or len(cky_r) != _COOKIE:
        raise ValueError(f"ISAKMP cookies are 8 bytes, got {len(cky_i)} and {len(cky_r)}")
    return bytes(cky_i) + bytes(cky_r)


def skeyid_psk(hash_name: str, psk: bytes, ni_b: bytes, nr_b: bytes) -> bytes:
    """SKEYID for pre-shared key authentication: ``prf(pre-shared-key, Ni_b | Nr_b)``.

    ``Ni_b``/``Nr_b`` are the nonce payload *bodies* (without the generic payload header).
    """
    return prf(hash_name, psk, ni_b + nr_b)


def skeyid_sig(hash_name: str, ni_b: bytes, nr_b: bytes, gxy: bytes) -> bytes:
    """SKEYID for signature authentication: ``prf(Ni_b | Nr_b, g^xy)`` (the nonces are the key)."""
    return prf(hash_name, ni_b + nr_b, gxy)


def skeyid_pke(hash_name: str, ni_b: bytes, nr_b: bytes, cky_i: bytes, cky_r: bytes) -> bytes:
    """SKEYID for public key encryption: ``prf(hash(Ni_b | Nr_b), CKY-I | CKY-R)`` (completeness)."""
    return prf(hash_name, digest(hash_name, ni_b + nr_b), _cookies(cky_i, cky_r))


@attrs.frozen
class Phase1Keys:
    """SKEYID and the three keys derived from it (RFC 2409 §5); ``repr`` shows no key.

    * ``skeyid_d``: seeds every phase-2 KEYMAT;
    * ``skeyid_a``: keys the phase-2, informational and transaction HASHes;
    * ``skeyid_e``: expanded into the ISAKMP SA's cipher key (``encryption_key``).
    """

    hash_name: str
    skeyid: bytes = attrs.field(repr=False)
    skeyid_d: bytes = attrs.field(repr=False)
    skeyid_a: bytes = attrs.field(repr=False)
    skeyid_e: bytes = attrs.field(repr=False)

    def encryption_key(self, length: int) -> bytes:
        """The ISAKMP SA cipher key of ``length`` bytes (Appendix B, see ``encryption_key``)."""
        return encryption_key(self.hash_name, self.skeyid_e, length)


def derive_phase1(hash_name: str, skeyid: bytes, gxy: bytes, cky_i: bytes, cky_r: bytes) -> Phase1Keys:
    """SKEYID_d, SKEYID_a, SKEYID_e from SKEYID (RFC 2409 §5)::

        SKEYID_d = prf(SKEYID, g^xy | CKY-I | CKY-R | 0)
        SKEYID_a = prf(SKEYID, SKEYID_d | g^xy | CKY-I | CKY-R | 1)
        SKEYID_e = prf(SKEYID, SKEYID_a | g^xy | CKY-I | CKY-R | 2)

    ``0``, ``1``, ``2`` are single octets; ``g^xy`` is the shared secret as ``group().shared``
    returns it (padded to the group's length).
    """
    cookies = _cookies(cky_i, cky_r)
    d = prf(hash_name, skeyid, gxy + cookies + b"\x00")
    a = prf(hash_name, skeyid, d + gxy + cookies + b"\x01")
    e = prf(hash_name, skeyid, a + gxy + cookies + b"\x02")
    return Phase1Keys(hash_name, skeyid, d, a, e)


def encryption_key(hash_name: str, skeyid_e: bytes, length: int) -> bytes:
    """The ISAKMP SA cipher key from SKEYID_e (RFC 2409 Appendix B).

    If SKEYID_e is at least ``length`` bytes, its first ``length`` bytes; otherwise
    ``Ka = K1 | K2 | ...`` truncated, with ``K1 = prf(SKEYID_e, 0)`` (one zero octet) and
    ``Kn = prf(SKEYID_e, K(n-1))``.  SKEYID_e itself is not part of Ka.  The expansion happens
    e.g. for AES-256 or 3DES with SHA-1 (20-byte SKEYID_e); strongSwan and every other
    implementation we know decide by the same length test.
    """
    if length <= 0:
        raise ValueError(f"cipher key length must be positive, got {length}")
    if len(skeyid_e) >= length:
        return skeyid_e[:length]
    out = block = prf(hash_name, skeyid_e, b"\x00")
    while len(out) < length:
        block = prf(hash_name, skeyid_e, block)
        out += block
    return out[:length]


def hash_i(
    hash_name: str, skeyid: bytes, gxi: bytes, gxr: bytes, cky_i: bytes, cky_r: bytes, sai_b: bytes, idii_b: bytes
) -> bytes:
    """HASH_I = ``prf(SKEYID, g^xi | g^xr | CKY-I | CKY-R | SAi_b | IDii_b)`` (RFC 2409 §5).

    ``g^xi``/``g^xr`` are the KE payload data as sent, ``SAi_b`` the body of the *initiator's*
    SA payload (without the generic header), ``IDii_b`` the body of the initiator's ID payload.
    """
    return prf(hash_name, skeyid, gxi + gxr + _cookies(cky_i, cky_r) + sai_b + idii_b)


def hash_r(
    hash_name: str, skeyid: bytes, gxi: bytes, gxr: bytes, cky_i: bytes, cky_r: bytes, sai_b: bytes, idir_b: bytes
) -> bytes:
    """HASH_R = ``prf(SKEYID, g^xr | g^xi | CKY-R | CKY-I | SAi_b | IDir_b)`` (RFC 2409 §5).

    Arguments in the same order as ``hash_i`` (initiator's values first); the swap the RFC
    makes is done here.  ``SAi_b`` is still the initiator's SA payload body.
    """
    return prf(hash_name, skeyid, gxr + gxi + _cookies(cky_r, cky_i) + sai_b + idir_b)


# --------------------------------------------------------------------------------------------
# CBC encryption of ISAKMP bodies and the IV rules (RFC 2409 Appendix B, RFC 2408 §3.1)

#: cipher name -> (block size, allowed key lengths in bytes)
CIPHERS: dict[str, tuple[int, tuple[int, ...]]] = {"aes-cbc": (16, (16, 24, 32)), "3des-cbc": (8, (24,))}
#: IKEv1 "Encryption Algorithm" attribute values (RFC 2409 Appendix A, RFC 3602 for AES)
CIPHER_BY_ATTRIBUTE: dict[int, str] = {5: "3des-cbc", 7: "aes-cbc"}


def block_size(cipher_name: str) -> int:
    """The cipher's block size, which is also the IV length."""
    try:
        return CIPHERS[cipher_name][0]
    except KeyError:
        raise ValueError(f"unknown IKE cipher {cipher_name!r}; supported: {', '.join(CIPHERS)}") from None


def pad(body: bytes, block: int) -> bytes:
    """``body`` followed by 1..block zero bytes up to a whole number of blocks.

    RFC 2409/2408 only require whole blocks; the payload chain (each payload's length, the last
    one's next-payload 0) tells the receiver where the payloads end.  strongSwan 5.9 does the
    same on sending (``bs - len % bs`` zero bytes, so a full block when already aligned) and
    ignores whatever follows the chain on receiving.  Zeros also read as "pad length 0" to
    the implementations that look at the last byte.
    """
    return body + bytes(block - len(body) % block)


class CBCCipher:
    """One ISAKMP SA's cipher: CBC encryption of message bodies under an explicit IV.

    The IV is not carried in IKEv1 messages: both sides derive it (``IVChain``).  A
    ``Cipher`` object is built per message; IKE messages are few, so simplicity wins here
    (the ESP data path is where contexts are reused).
    """

    def __init__(self, cipher_name: str, key: bytes) -> None:
        self.block_size = block_size(cipher_name)
        sizes = CIPHERS[cipher_name][1]
        if len(key) not in sizes:
            allowed = " or ".join(str(s) for s in sizes)
            raise ValueError(f"{cipher_name} key must be {allowed} bytes, got {len(key)}")
        self.name = cipher_name
        self._algorithm = algorithms.AES(bytes(key)) if cipher_name == "aes-cbc" else _TripleDES(bytes(key))

    def __repr__(self) -> str:
        return f"<CBCCipher {self.name}>"

    def _check_iv(self, iv: bytes) -> None:
        if len(iv) != self.block_size:
            raise ValueError(f"{self.name} IV must be {self.block_size} bytes, got {len(iv)}")

    def encrypt(self, iv: bytes, body: bytes) -> bytes:
        """The ciphertext of ``pad(body)``; its last block is the next message's IV."""
        self._check_iv(iv)
        enc = Cipher(self._algorithm, modes.CBC(bytes(iv))).encryptor()
        return enc.update(pad(bytes(body), self.block_size)) + enc.finalize()

    def decrypt(self, iv: bytes, ciphertext: bytes) -> bytes:
        """The plaintext, padding included (``payload_chain`` finds where the payloads end).

        ``CryptoError`` unless ``ciphertext`` is a non-empty whole number of blocks; any such
        bytes decrypt to *something*: authenticity comes from the HASH payloads, not from here.
        """
        self._check_iv(iv)
        if not ciphertext or len(ciphertext) % self.block_size:
            raise CryptoError(
                f"{self.name}: encrypted body is {len(ciphertext)} bytes, not a positive multiple of {self.block_size}"
            )
        dec = Cipher(self._algorithm, modes.CBC(bytes(iv))).decryptor()
        return dec.update(bytes(ciphertext)) + dec.finalize()


def payload_chain(plaintext: bytes, first_payload: int) -> tuple[bytes, bytes]:
    """Split a decrypted body into ``(payloads, padding)`` by walking the generic payload headers.

    Each ISAKMP payload starts ``next payload (1) | reserved (1) | length (2)`` (RFC 2408 §3.2);
    the chain ends after the payload whose next-payload is 0.  What follows is padding, of
    whatever length and content the peer chose (strongSwan: zeros, a full block when aligned).
    The payloads part is what Quick Mode and informational HASHes cover: the HASH payload
    and everything after it up to -- not including -- the padding.
    ``CryptoError`` for a length under 4 or past the end (the usual sign of a wrong key or IV).
    """
    data = bytes(plaintext)
    pos, nxt = 0, first_payload
    while nxt != 0:
        if pos + 4 > len(data):
            raise CryptoError(f"payload chain runs past the decrypted body at offset {pos}")
        nxt, length = data[pos], struct.unpack_from("!H", data, pos + 2)[0]
        if length < 4 or pos + length > len(data):
            raise CryptoError(f"payload at offset {pos} has invalid length {length} (decryption failed?)")
        pos += length
    return data[:pos], data[pos:]


def initial_iv(hash_name: str, gxi: bytes, gxr: bytes, block: int) -> bytes:
    """Phase 1's first IV: ``hash(g^xi | g^xr)`` truncated to the block size (Appendix B).

    ``g^xi``/``g^xr`` are the KE payload data as sent (initiator's first).
    """
    return _iv_from(digest(hash_name, gxi + gxr), block)


def phase2_iv(hash_name: str, last_phase1_block: bytes, message_id: int, block: int) -> bytes:
    """First IV of a phase-2, informational or transaction exchange (Appendix B).

    ``hash(last phase-1 CBC output block | M-ID)`` truncated to the block size, M-ID as four
    octets in network order.  The "last phase-1 CBC output block" is the phase-1 IV state
    after the last encrypted phase-1 message (``IVChain.phase1_iv``).
    """
    return _iv_from(digest(hash_name, bytes(last_phase1_block) + _mid(message_id)), block)


def _iv_from(h: bytes, block: int) -> bytes:
    if len(h) < block:  # pragma: no cover - every hash here is >= 16 bytes, every block <= 16
        raise ValueError(f"hash output ({len(h)} bytes) shorter than the block size {block}")
    return h[:block]


def _mid(message_id: int) -> bytes:
    if not 0 <= message_id <= 0xFFFFFFFF:
        raise ValueError(f"ISAKMP message ID must be 0..2^32-1, got {message_id}")
    return message_id.to_bytes(4, "big")


class IVChain:
    """The IV state of one ISAKMP SA (RFC 2409 Appendix B), by message ID.

    * Phase 1 (message ID 0) starts at ``initial_iv``; each encrypted phase-1 message's last
      ciphertext block is the IV of the next one.
    * Each exchange with a non-zero message ID (Quick Mode, informational, transaction) starts
      at ``phase2_iv(phase-1 IV state, M-ID)``, computed the first time the ID is used, then
      chains through its own messages the same way.

    Outgoing: ``iv(mid)``, encrypt, ``update(mid, ciphertext)``.  Incoming: decrypt with
    ``iv(mid)``, verify the HASH, and only then ``update`` -- a forged or corrupt message must
    not move the chain (strongSwan confirms its IV the same way).  At most ``max_exchanges``
    non-zero IDs are remembered (least recently used dropped), so a peer cannot grow this
    without bound; strongSwan keeps 3 (``charon.max_ikev1_exchanges``).
    """

    def __init__(self, hash_name: str, block: int, first_iv: bytes, max_exchanges: int = 32) -> None:
        _check_hash(hash_name)
        if len(first_iv) != block:
            raise ValueError(f"IV must be {block} bytes, got {len(first_iv)}")
        self.hash_name = hash_name
        self.block_size = block
        self.phase1_iv = bytes(first_iv)
        self.max_exchanges = max_exchanges
        self._ivs: OrderedDict[int, bytes] = OrderedDict()

    def __repr__(self) -> str:
        return f"<IVChain {self.hash_name} block={self.block_size} exchanges={len(self._ivs)}>"

    def iv(self, message_id: int) -> bytes:
        """The IV for the next message (either direction) of the exchange ``message_id``."""
        if message_id == 0:
            return self.phase1_iv
        iv = self._ivs.get(message_id)
        if iv is None:
            iv = phase2_iv(self.hash_name, self.phase1_iv, message_id, self.block_size)
        self._remember(message_id, iv)  # most recently used last, as strongSwan's list
        return iv

    def update(self, message_id: int, ciphertext: bytes) -> None:
        """Move the exchange's IV to the last block of a message sent, or received and verified."""
        if not ciphertext or len(ciphertext) % self.block_size:
            raise ValueError(f"ciphertext of {len(ciphertext)} bytes is not whole {self.block_size}-byte blocks")
        last = bytes(ciphertext[-self.block_size :])
        if message_id == 0:
            self.phase1_iv = last
        else:
            _mid(message_id)
            self._remember(message_id, last)

    def forget(self, message_id: int) -> None:
        """Drop a finished (or abandoned) exchange's IV; unknown IDs are ignored."""
        self._ivs.pop(message_id, None)

    def _remember(self, message_id: int, iv: bytes) -> None:
        self._ivs[message_id] = iv
        self._ivs.move_to_end(message_id)
        while len(self._ivs) > self.max_exchanges:
            self._ivs.popitem(last=False)


class ISAKMPCrypto:
    """A cipher plus its ``IVChain``: what one ISAKMP SA needs to seal and open message bodies.

    ``encrypt`` advances the chain (the message is ours, it will be sent); ``decrypt`` does
    not -- call ``accept`` with the same ciphertext once its HASH verified.  The body is
    everything after the 28-byte ISAKMP header.
    """

    def __init__(self, cipher_name: str, key: bytes, hash_name: str, gxi: bytes, gxr: bytes) -> None:
        self.cipher = CBCCipher(cipher_name, key)
        bs = self.cipher.block_size
        self.ivs = IVChain(hash_name, bs, initial_iv(hash_name, gxi, gxr, bs))

    @classmethod
    def resume(cls, cipher_name: str, key: bytes, hash_name: str, phase1_iv: bytes) -> ISAKMPCrypto:
        """An established SA's crypto from its cipher key and last phase-1 CBC block (a
        standby carrying on a dead node's SA): every later exchange's IV derives from that
        block and its message ID (Appendix B), so nothing else of the chain is needed."""
        self = cls.__new__(cls)
        self.cipher = CBCCipher(cipher_name, key)
        self.ivs = IVChain(hash_name, self.cipher.block_size, phase1_iv)
        return self

    def __repr__(self) -> str:
        return f"<ISAKMPCrypto {self.cipher.name} {self.ivs!r}>"

    def encrypt(self, message_id: int, body: bytes) -> bytes:
        """Encrypt an outgoing body (padded) and advance the exchange's IV past it."""
        ciphertext = self.cipher.encrypt(self.ivs.iv(message_id), body)
        self.ivs.update(message_id, ciphertext)
        return ciphertext

    def decrypt(self, message_id: int, ciphertext: bytes) -> bytes:
        """Decrypt an incoming body with the exchange's current IV; the chain does not move."""
        return self.cipher.decrypt(self.ivs.iv(message_id), ciphertext)

    def accept(self, message_id: int, ciphertext: bytes) -> None:
        """The incoming message was verified: its last block becomes the exchange's IV."""
        self.ivs.update(message_id, ciphertext)


# --------------------------------------------------------------------------------------------
# Phase 2: Quick Mode, informational, transaction (RFC 2409 §5.5, §5.7; mode-cfg draft)

#: protocol IDs in the KEYMAT formula (RFC 2407 §4.4.1)
PROTO_ISAKMP, PROTO_IPSEC_AH, PROTO_IPSEC_ESP, PROTO_IPCOMP = 1, 2, 3, 4


def qm_hash1(hash_name: str, skeyid_a: bytes, message_id: int, rest: bytes) -> bytes:
    """Quick Mode HASH(1) = ``prf(SKEYID_a, M-ID | SA | Ni [| KE] [| IDci | IDcr])``.

    ``rest`` is every payload after the HASH payload, generic headers included, padding not.
    """
    return prf(hash_name, skeyid_a, _mid(message_id) + rest)


def qm_hash2(hash_name: str, skeyid_a: bytes, message_id: int, ni_b: bytes, rest: bytes) -> bytes:
    """Quick Mode HASH(2) = ``prf(SKEYID_a, M-ID | Ni_b | SA | Nr [| KE] [| IDci | IDcr])``.

    ``Ni_b`` is the initiator's nonce body; ``rest`` the payloads after HASH(2) in message 2.
    """
    return prf(hash_name, skeyid_a, _mid(message_id) + ni_b + rest)


def qm_hash3(hash_name: str, skeyid_a: bytes, message_id: int, ni_b: bytes, nr_b: bytes) -> bytes:
    """Quick Mode HASH(3) = ``prf(SKEYID_a, 0 | M-ID | Ni_b | Nr_b)`` (``0`` one octet)."""
    return prf(hash_name, skeyid_a, b"\x00" + _mid(message_id) + ni_b + nr_b)


def informational_hash(hash_name: str, skeyid_a: bytes, message_id: int, rest: bytes) -> bytes:
    """Informational HASH(1) = ``prf(SKEYID_a, M-ID | N/D)`` (RFC 2409 §5.7).

    ``rest``: the Notification or Delete payload(s) after the HASH, generic headers included.
    Also for DPD R-U-THERE/ACK (RFC 3706), which are informational notifications.
    """
    return prf(hash_name, skeyid_a, _mid(message_id) + rest)


def transaction_hash(hash_name: str, skeyid_a: bytes, message_id: int, rest: bytes) -> bytes:
    """Transaction exchange HASH = ``prf(SKEYID_a, M-ID | ATTR)`` (mode-config, XAUTH).

    draft-dukes-ike-mode-cfg §3.2 / draft-beaulieu-ike-xauth: computed like an informational
    HASH over the attribute payload that follows it.
    """
    return prf(hash_name, skeyid_a, _mid(message_id) + rest)


def _spi(spi: bytes | int) -> bytes:
    if isinstance(spi, int):
        if not 0 <= spi <= 0xFFFFFFFF:
            raise ValueError(f"an IPsec SPI as int must be 0..2^32-1, got {spi}")
        return spi.to_bytes(4, "big")
    return bytes(spi)


def keymat(
    hash_name: str,
    skeyid_d: bytes,
    protocol: int,
    spi: bytes | int,
    ni_b: bytes,
    nr_b: bytes,
    length: int,
    gqm_xy: bytes | None = None,
) -> bytes:
    """Quick Mode KEYMAT of ``length`` bytes for one SA (RFC 2409 §5.5)::

        seed = [g(qm)^xy |] protocol | SPI | Ni_b | Nr_b
        K1   = prf(SKEYID_d, seed)
        Kn   = prf(SKEYID_d, K(n-1) | seed)
        KEYMAT = K1 | K2 | ...   (truncated to ``length``)

    ``g(qm)^xy`` only with PFS (the Quick Mode KE exchange's shared secret).  ``protocol`` is
    one octet (``PROTO_IPSEC_ESP`` = 3), ``spi`` the 4-byte SPI *of this SA*, i.e. the one
    its receiver chose: our inbound SA uses the SPI in our SA payload, our outbound SA the
    peer's.  ``Ni_b``/``Nr_b`` are the Quick Mode nonces (not phase 1's).
    """
    if not 0 <= protocol <= 255:
        raise ValueError(f"protocol ID is one octet, got {protocol}")
    if length <= 0:
        raise ValueError(f"KEYMAT length must be positive, got {length}")
    seed = (gqm_xy or b"") + bytes([protocol]) + _spi(spi) + ni_b + nr_b
    out = block = prf(hash_name, skeyid_d, seed)
    while len(out) < length:
        block = prf(hash_name, skeyid_d, block + seed)
        out += block
    return out[:length]


def esp_keys(
    hash_name: str,
    skeyid_d: bytes,
    spi: bytes | int,
    ni_b: bytes,
    nr_b: bytes,
    enc_key_len: int,
    integ_key_len: int,
    gqm_xy: bytes | None = None,
) -> tuple[bytes, bytes]:
    """``(encryption key, integrity key)`` for one ESP SA, cut from KEYMAT in that order.

    strongSwan (and the kernel's XFRM keying it feeds) take the encryption key first, the
    integrity key right after.  Lengths are what ``narsuite.esp.transform.key_lengths``
    returns: for aes-gcm-16 the 4-byte salt is part of the encryption key (key || salt) and the
    integrity key length is 0.
    """
    if enc_key_len < 0 or integ_key_len < 0 or enc_key_len + integ_key_len == 0:
        raise ValueError(f"bad ESP key lengths {enc_key_len}, {integ_key_len}")
    km = keymat(hash_name, skeyid_d, PROTO_IPSEC_ESP, spi, ni_b, nr_b, enc_key_len + integ_key_len, gqm_xy)
    return km[:enc_key_len], km[enc_key_len:]


# --------------------------------------------------------------------------------------------
# NAT-D (RFC 3947 §3.2)


def natd_hash(
    hash_name: str,
    cky_i: bytes,
    cky_r: bytes,
    address: str | ipaddress.IPv4Address | ipaddress.IPv6Address | bytes,
    port: int,
) -> bytes:
    """``HASH(CKY-I | CKY-R | IP | Port)`` with the negotiated hash (RFC 3947 §3.2).

    IP is 4 or 16 octets, port 2 octets, both network order.  The first NAT-D payload a side
    sends carries the hash of the *remote* address/port as it sees it, the next ones its own.
    The draft-02 NAT-D (payload 130) used by the legacy mode hashes the same way.
    """
    if isinstance(address, (bytes, bytearray)):
        if len(address) not in (4, 16):
            raise ValueError(f"a packed IP address is 4 or 16 bytes, got {len(address)}")
        packed = bytes(address)
    else:
        packed = ipaddress.ip_address(address).packed
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be 0..65535, got {port}")
    return digest(hash_name, _cookies(cky_i, cky_r) + packed + port.to_bytes(2, "big"))
