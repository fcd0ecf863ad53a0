"""IKEv2 cryptography (RFC 7296 §2.13-2.15, §3.14; RFC 5282; RFC 8031): pure functions.

The Diffie-Hellman groups and the HMAC prf are IKEv1's (:mod:`narsuite.ike.crypto`): the
MODP and ECP encodings are the same in both versions.  IKEv2 adds group 31 (curve25519,
RFC 8031), prf+ and its key schedule, the Encrypted payload with an integrity check over
the whole message (AES-CBC + HMAC-SHA2) or AEAD (AES-GCM-16, RFC 5282), and the AUTH
payload's signed octets.

Anything a peer controls raises :class:`narsuite.ike.crypto.CryptoError` (a ``ValueError``)
and nothing else.  Secrets never show in ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
from typing import Any

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from narsuite.ike import crypto as v1
from narsuite.ike.crypto import CryptoError
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import wire

__all__ = ["CryptoError", "group", "SUPPORTED_GROUPS", "PRFS", "INTEGS", "prf", "prf_plus", "skeyseed",
           "IkeKeys", "derive_ike_keys", "rekey_skeyseed", "child_keymat", "SKCipher", "seal", "seal_fragments",
           "open_encrypted", "psk_auth", "signed_octets", "natd_hash"]

#: PRF transform ID -> hash name
PRFS: dict[int, str] = {C.PRF_HMAC_SHA1: "sha1", C.PRF_HMAC_SHA2_256: "sha256", C.PRF_HMAC_SHA2_384: "sha384",
                        C.PRF_HMAC_SHA2_512: "sha512"}
#: INTEG transform ID -> (hash name, key bytes, ICV bytes)
INTEGS: dict[int, tuple[str, int, int]] = {
    C.AUTH_HMAC_SHA1_96: ("sha1", 20, 12), C.AUTH_HMAC_SHA2_256_128: ("sha256", 32, 16),
    C.AUTH_HMAC_SHA2_384_192: ("sha384", 48, 24), C.AUTH_HMAC_SHA2_512_256: ("sha512", 64, 32)}


class Curve25519Group:
    """Group 31 (RFC 8031): KE data is the 32-byte X25519 public key; g^ir is the 32-byte
    X25519 output, refused when all zero (§2.2: a low-order peer point)."""

    kind = "curve25519"
    number = 31
    public_length = 32
    shared_length = 32

    def __repr__(self) -> str:
        return "<Curve25519Group 31>"

    def generate(self) -> tuple[Any, bytes]:
        private = x25519.X25519PrivateKey.generate()
        return private, private.public_key().public_bytes_raw()

    def shared(self, private: Any, peer_public: bytes) -> bytes:
        if len(peer_public) != 32:
            raise CryptoError(f"group 31: KE data is {len(peer_public)} bytes, must be 32")
        try:
            out = private.exchange(x25519.X25519PublicKey.from_public_bytes(bytes(peer_public)))
        except ValueError as e:  # OpenSSL refuses an all-zero result
            raise CryptoError(f"group 31: {e}") from None
        if not any(out):
            raise CryptoError("group 31: all-zero shared secret")
        return out


_X25519 = Curve25519Group()
SUPPORTED_GROUPS: tuple[int, ...] = (*v1.SUPPORTED_GROUPS, 31)


def group(number: int) -> Any:
    """The DH group with this transform ID (IKEv1's MODP/ECP groups, and curve25519)."""
    if number == 31:
        return _X25519
    return v1.group(number)


def prf(hash_name: str, key: bytes, data: bytes) -> bytes:
    return v1.prf(hash_name, key, data)


def prf_plus(hash_name: str, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+ (§2.13): T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n), up to 255 blocks."""
    out = b""
    t = b""
    n = 1
    while len(out) < length:
        if n > 255:
            raise ValueError("prf+ cannot produce that many bytes")
        t = hmac.digest(key, t + seed + bytes([n]), hash_name)
        out += t
        n += 1
    return out[:length]


def skeyseed(hash_name: str, ni: bytes, nr: bytes, gir: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) (§2.14)."""
    return hmac.digest(ni + nr, gir, hash_name)


def rekey_skeyseed(hash_name: str, old_sk_d: bytes, gir: bytes, ni: bytes, nr: bytes) -> bytes:
    """SKEYSEED of a rekeyed IKE SA: prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18)."""
    return hmac.digest(old_sk_d, gir + ni + nr, hash_name)


@attrs.frozen
class IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} (§2.14); SK_a* empty with AEAD."""

    prf: str
    sk_d: bytes = attrs.field(repr=False)
    sk_ai: bytes = attrs.field(repr=False)
    sk_ar: bytes = attrs.field(repr=False)
    sk_ei: bytes = attrs.field(repr=False)
    sk_er: bytes = attrs.field(repr=False)
    sk_pi: bytes = attrs.field(repr=False)
    sk_pr: bytes = attrs.field(repr=False)


def derive_ike_keys(prf_name: str, seed: bytes, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes,
                    enc_key_len: int, integ_key_len: int) -> IkeKeys:
    """The seven keys from SKEYSEED (§2.14); ``enc_key_len`` includes a GCM salt."""
    plen = v1.HASHES[prf_name]
    lens = (plen, integ_key_len, integ_key_len, enc_key_len, enc_key_len, plen, plen)
    stream = prf_plus(prf_name, seed, ni + nr + spi_i + spi_r, sum(lens))
    parts = []
    pos = 0
    for n in lens:
        parts.append(stream[pos:pos + n])
        pos += n
    return IkeKeys(prf_name, *parts)


def child_keymat(prf_name: str, sk_d: bytes, ni: bytes, nr: bytes, enc_len: int, integ_len: int,
                 gir: bytes | None = None) -> tuple[bytes, bytes, bytes, bytes]:
    """KEYMAT (§2.17): (enc i->r, integ i->r, enc r->i, integ r->i); with PFS g^ir first."""
    seed = (gir or b"") + ni + nr
    km = prf_plus(prf_name, sk_d, seed, 2 * (enc_len + integ_len))
    a = enc_len + integ_len
    return km[:enc_len], km[enc_len:a], km[a:a + enc_len], km[a + enc_len:2 * a]


# --------------------------------------------------------------------------------- SK payload
class SKCipher:
    """One direction's Encrypted-payload protection: AES-CBC + HMAC (§3.14) or AES-GCM-16
    (RFC 5282, 8-byte explicit IV, 4-byte salt at the end of SK_e)."""

    def __init__(self, encr: int, enc_key: bytes, integ: int, integ_key: bytes) -> None:
        self.encr = encr
        self.aead = encr == C.ENCR_AES_GCM_16
        if self.aead:
            self._gcm = AESGCM(enc_key[:-4])
            self._salt = enc_key[-4:]
            self.iv_len, self.icv_len, self.block = 8, 16, 1
        elif encr == C.ENCR_AES_CBC:
            self._key = enc_key
            self._hash, _klen, self.icv_len = INTEGS[integ]
            self._integ_key = integ_key
            self.iv_len = self.block = 16
        else:
            raise ValueError(f"unsupported IKE cipher {encr}")

    def __repr__(self) -> str:
        return f"<SKCipher {self.encr}>"

    def overhead(self, plain_len: int) -> int:
        """Bytes an SK payload body adds to ``plain_len`` bytes of inner payloads."""
        padded = plain_len + 1
        if self.block > 1:
            padded += (-padded) % self.block
        return self.iv_len + padded - plain_len + self.icv_len

    def seal(self, before: bytes, plain: bytes) -> bytes:
        """IV || ciphertext || ICV for ``plain``; ``before`` is the message up to and including
        the SK generic header, with the final lengths already in place (the AAD/ICV input)."""
        pad = 0 if self.block == 1 else (-(len(plain) + 1)) % self.block
        body = plain + b"\0" * pad + bytes([pad])
        iv = secrets.token_bytes(self.iv_len)
        if self.aead:
            return iv + self._gcm.encrypt(self._salt + iv, body, before)
        enc = Cipher(algorithms.AES(self._key), modes.CBC(iv)).encryptor()
        ct = iv + enc.update(body) + enc.finalize()
        return ct + hmac.digest(self._integ_key, before + ct, self._hash)[:self.icv_len]

    def open(self, before: bytes, data: bytes) -> bytes:
        """The inner payload bytes (padding removed); CryptoError if it does not verify."""
        if len(data) < self.iv_len + self.icv_len + 1:
            raise CryptoError("Encrypted payload too short")
        iv = data[:self.iv_len]
        if self.aead:
            try:
                body = self._gcm.decrypt(self._salt + iv, data[self.iv_len:], before)
            except InvalidTag:
                raise CryptoError("Encrypted payload: ICV does not verify") from None
        else:
            ct = data[self.iv_len:-self.icv_len]
            icv = data[-self.icv_len:]
            expected = hmac.digest(self._integ_key, before + data[:-self.icv_len], self._hash)[:self.icv_len]
            if not hmac.compare_digest(expected, icv):
                raise CryptoError("Encrypted payload: ICV does not verify")
            if not ct or len(ct) % self.block:
                raise CryptoError("Encrypted payload: ciphertext is not whole blocks")
            dec = Cipher(algorithms.AES(self._key), modes.CBC(iv)).decryptor()
            body = dec.update(ct) + dec.finalize()
        pad = body[-1]
        if pad + 1 > len(body):
            raise CryptoError("Encrypted payload: pad length longer than the plaintext")
        return body[:-1 - pad]


def seal(header: wire.Header, inner: list[Any], cipher: SKCipher) -> bytes:
    """A whole protected message: header, SK{inner}."""
    plain = wire.build_payloads(inner)
    first = inner[0].payload_type if inner else C.PT_NONE
    sk_len = 4 + len(plain) + cipher.overhead(len(plain))
    total = C.HEADER_LEN + sk_len
    h = attrs.evolve(header, next_payload=C.PT_SK)
    before = wire.build_header(h, total) + struct.pack("!BBH", first, 0, sk_len)
    out = before + cipher.seal(before, plain)
    assert len(out) == total
    return out


def seal_fragments(header: wire.Header, inner: list[Any], cipher: SKCipher, max_plain: int) -> list[bytes]:
    """RFC 7383 §2.5: the inner payloads cut into SKF fragments of ``max_plain`` bytes each,
    each fragment sealed on its own (its AAD/ICV cover its own header and SKF header)."""
    plain = wire.build_payloads(inner)
    first = inner[0].payload_type if inner else C.PT_NONE
    chunks = [plain[i:i + max_plain] for i in range(0, len(plain), max_plain)] or [b""]
    out = []
    h = attrs.evolve(header, next_payload=C.PT_SKF)
    for n, chunk in enumerate(chunks, 1):
        skf_len = 8 + len(chunk) + cipher.overhead(len(chunk))
        total = C.HEADER_LEN + skf_len
        before = (wire.build_header(h, total) + struct.pack("!BBH", first if n == 1 else 0, 0, skf_len)
                  + struct.pack("!HH", n, len(chunks)))
        out.append(before + cipher.seal(before, chunk))
    return out


def open_encrypted(data: bytes, length: int, encrypted: wire.SK | wire.SKF, cipher: SKCipher) -> bytes:
    """The inner bytes of the SK or SKF payload that ends a ``length``-byte message: the
    message up to its IV is the AAD (GCM) or the start of the ICV input (CBC).  CryptoError
    when it does not verify."""
    start = length - len(encrypted.data)
    return cipher.open(bytes(data[:start]), encrypted.data)


# --------------------------------------------------------------------------------- AUTH
_KEY_PAD = b"Key Pad for IKEv2"


def signed_octets(message: bytes, peer_nonce: bytes, prf_name: str, sk_p: bytes, id_body: bytes) -> bytes:
    """<Initiator|Responder>SignedOctets (§2.15): RealMessage | Nonce | prf(SK_p, ID body)."""
    return message + peer_nonce + prf(prf_name, sk_p, id_body)


def psk_auth(prf_name: str, secret: bytes, octets: bytes) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>) (§2.15); with
    EAP the MSK is the shared secret (§2.16)."""
    return prf(prf_name, prf(prf_name, secret, _KEY_PAD), octets)


# --------------------------------------------------------------------------------- NAT detection
def natd_hash(spi_i: bytes, spi_r: bytes, ip: str, port: int) -> bytes:
    """SHA-1(SPIi | SPIr | IP | Port) (§2.23); SPIr is zero in the IKE_SA_INIT request."""
    return hashlib.sha1(spi_i + spi_r + socket.inet_aton(ip) + struct.pack("!H", port)).digest()
