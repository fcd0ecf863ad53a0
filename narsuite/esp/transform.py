"""ESP (RFC 4303) packet transforms: pure per-SA encapsulate/decapsulate, no I/O.

Why this module exists: the kernel on our hosts has no ESP support, so every ESP packet of the
`esp` role is built and opened in user space.  Scapy's ``SecurityAssociation`` is correct but
costs ~1.4 ms per 1400-byte packet; this module costs a few microseconds, close to the bare
``cryptography`` calls, because everything that can be built once per SA is built once:

* AES-GCM (RFC 4106): one ``AESGCM`` object per SA.  The explicit 8-byte IV is the 64-bit
  sequence number, which never repeats under one key (RFC 4106 §3.1 allows a counter).
* AES-CBC (RFC 3602): one *running* CBC encryptor and one running decryptor per SA instead of
  a ``Cipher`` per packet (which costs ~4 µs, more than the encryption itself).

  - Sending, the encryptor is fed ``R || plaintext`` where ``R = os.urandom(16)``.  Its first
    output block ``E_K(R xor C_prev)`` becomes the packet's IV and the rest is exactly the CBC
    encryption of the plaintext under that IV.  The IV is therefore uniformly random and
    unpredictable (R is fresh CSPRNG output and AES is a permutation): the IV generation
    method of NIST SP 800-38A Appendix C with a random nonce.
  - Receiving, the decryptor is fed ``IV || ciphertext`` (contiguous in the packet) and the
    first output block is dropped: every later block comes out as ``D_K(C_i) xor C_{i-1}``
    with ``C_0 = IV``, whatever the decryptor's previous state was.

  Both are fed whole blocks only (lengths are checked first), so no state leaks from one packet
  into the next.  An SA object is therefore not thread-safe; the reactor thread owns it.
* HMAC (RFC 2404, RFC 4868): one keyed ``cryptography`` HMAC per SA, ``copy()``-ed per packet,
  so the key's inner/outer pads are hashed once per SA, not per packet.  The truncated ICV is
  compared with ``hmac.compare_digest``.

Inbound processing follows RFC 4303 §3.4: length sanity, SPI, sequence number (with the
Appendix A2 inference of the high 32 bits when ESN is on), replay *check*, ICV, decryption,
padding (the monotonic 1, 2, 3... bytes of §2.4), next header, and only then the replay window
update, so a packet that fails authentication can never move the window.  Every rejection
raises a subclass of ``ESPError`` (a ``ValueError``) and bumps the matching counter on the SA;
no other exception escapes for any input bytes.

Keys are never kept as attributes or shown in ``repr``; they live only inside the
``cryptography`` objects (and the 4-byte GCM salt).
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable, Iterable
from hmac import compare_digest
from typing import ClassVar, Final

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ENC_AES_CBC",
    "ENC_AES_GCM_16",
    "ENC_NULL",
    "INTEG_HMAC_SHA1_96",
    "INTEG_HMAC_SHA256_128",
    "NEXT_HEADER_NONE",
    "TRANSFORMS",
    "AuthenticationFailed",
    "BadNextHeader",
    "BadPadding",
    "ESPError",
    "InboundSA",
    "OutboundSA",
    "ReplayWindow",
    "Replayed",
    "SequenceExhausted",
    "Transform",
    "Truncated",
    "UnknownSPI",
    "describe",
    "key_lengths",
    "peek_spi",
    "transform",
]

# -- names ----------------------------------------------------------------------------------

ENC_AES_GCM_16: Final = "aes-gcm-16"
ENC_AES_CBC: Final = "aes-cbc"
ENC_NULL: Final = "null"
INTEG_HMAC_SHA1_96: Final = "hmac-sha1-96"
INTEG_HMAC_SHA256_128: Final = "hmac-sha256-128"

#: Next header 59, "no next header": a dummy (traffic flow confidentiality) packet that the
#: receiver must discard silently (RFC 4303 §2.6).  ``decapsulate`` returns it like any other
#: authentic packet (it does advance the replay window); the caller drops it.
NEXT_HEADER_NONE: Final = 59

_M32: Final = 0xFFFFFFFF
_MAX_SEQ_32: Final = 0xFFFFFFFF
_MAX_SEQ_64: Final = 0xFFFFFFFFFFFFFFFF
_SPI_MIN: Final = 256  # 0 is reserved for local use, 1-255 are reserved by IANA (RFC 4303 §2.1)
_GCM_SALT_LEN: Final = 4
_GCM_IV_LEN: Final = 8
_GCM_ICV_LEN: Final = 16
_CBC_BLOCK: Final = 16
_ESP_HDR_LEN: Final = 8  # SPI + sequence number
_REPLAY_MAX: Final = 4096
_ESN_INFER_NO_WINDOW: Final = 1 << 31  # Appendix A2 assumes W <= 2**31
_ANY_NEXT_HEADER: Final = frozenset(range(255))  # every Next Header but 255 (reserved)

# internal kinds of encryption
_GCM: Final = 0
_CBC: Final = 1
_NULL: Final = 2

_ENC_KIND = {ENC_AES_GCM_16: _GCM, ENC_AES_CBC: _CBC, ENC_NULL: _NULL}
_ENC_BITS = {ENC_AES_GCM_16: (128, 256), ENC_AES_CBC: (128, 256), ENC_NULL: (0,)}
#: integrity name -> (hash class, key length, ICV length)
_INTEG: dict[str, tuple[Callable[[], hashes.HashAlgorithm], int, int]] = {
    INTEG_HMAC_SHA1_96: (hashes.SHA1, 20, 12),
    INTEG_HMAC_SHA256_128: (hashes.SHA256, 32, 16),
}

_S_II = struct.Struct("!II")
_S_III = struct.Struct("!III")
_S_IIQ = struct.Struct("!IIQ")
_S_NONCE = struct.Struct("!4sQ")  # RFC 4106 §4: salt | explicit IV
_S_I = struct.Struct("!I")
_pack_ii = _S_II.pack
_pack_iii = _S_III.pack
_pack_iiq = _S_IIQ.pack
_pack_nonce = _S_NONCE.pack
_pack_i = _S_I.pack
_unpack_ii = _S_II.unpack_from
_urandom = os.urandom

#: _PADS[n] is the RFC 4303 §2.4 default padding of length n: bytes 1, 2, ..., n.
_PADS: Final = tuple(bytes(range(1, n + 1)) for n in range(256))
#: _TRAILERS[(pad_len << 8) | next_header]: padding + Pad Length + Next Header, for the pad
#: lengths the sender produces (0-15), so building a trailer is one tuple index.
_TRAILERS: Final = tuple(_PADS[p] + bytes((p, nh)) for p in range(_CBC_BLOCK) for nh in range(256))


# -- errors ---------------------------------------------------------------------------------


class ESPError(ValueError):
    """Base of every ESP rejection; the only exception ``decapsulate`` raises for any bytes."""


class Truncated(ESPError):
    """Shorter than the transform's minimum, or a CBC ciphertext that is not whole blocks."""


class UnknownSPI(ESPError):
    """The packet's SPI is not the SA's (or, for the role, matches no SA)."""


class Replayed(ESPError):
    """Sequence number already received or left of the replay window."""


class AuthenticationFailed(ESPError):
    """ICV (HMAC or GCM tag) did not verify."""


class BadPadding(ESPError):
    """Authentic packet whose padding is not 1, 2, 3... or whose pad length exceeds it."""


class BadNextHeader(ESPError):
    """Authentic packet whose Next Header is 255 (reserved) or not one the SA accepts."""


class SequenceExhausted(ESPError):
    """The outbound sequence number would pass 2**32-1 (2**64-1 with ESN): rekey.

    An ``ESPError`` so that a data path that drops and counts on ``ESPError`` also drops here;
    the role should have rekeyed already when ``OutboundSA.needs_rekey`` became true.
    """


# -- transforms -----------------------------------------------------------------------------


@attrs.frozen
class Transform:
    """One supported (encryption, integrity, key size) combination and its wire sizes."""

    enc: str
    integ: str | None
    enc_key_bits: int
    enc_key_len: int  #: bytes of keying material for encryption, GCM salt included
    integ_key_len: int
    iv_len: int
    icv_len: int
    block_size: int  #: alignment of the encrypted part (padding target)


def key_lengths(enc: str, integ: str | None, enc_key_bits: int | None) -> tuple[int, int]:
    """Keying material the combination needs: ``(encryption key incl. GCM salt, integrity key)``.

    Raises ``ValueError`` naming the bad value and the accepted ones.  ``enc_key_bits`` is the
    cipher's key size (128 or 256 for AES, 0 or None for null).
    """
    if enc not in _ENC_KIND:
        raise ValueError(f"unknown ESP encryption algorithm {enc!r}; supported: {', '.join(_ENC_KIND)}")
    if integ is not None and integ not in _INTEG:
        raise ValueError(
            f"unknown ESP integrity algorithm {integ!r}; supported: {', '.join(_INTEG)} (or None with aes-gcm-16)"
        )
    if enc == ENC_AES_GCM_16:
        if integ is not None:
            raise ValueError(
                f"aes-gcm-16 authenticates by itself (RFC 4106): integ must be None, not {integ!r}"
            )
    elif integ is None:
        raise ValueError(
            f"{enc} without an integrity algorithm is not allowed: use {INTEG_HMAC_SHA1_96!r} or "
            f"{INTEG_HMAC_SHA256_128!r}, or aes-gcm-16"
        )
    bits = 0 if enc_key_bits is None else enc_key_bits
    if type(bits) is not int or bits not in _ENC_BITS[enc]:
        allowed = " or ".join(str(b) for b in _ENC_BITS[enc])
        raise ValueError(f"{enc} key size must be {allowed} bits, got {enc_key_bits!r}")
    enc_len = bits // 8 + (_GCM_SALT_LEN if enc == ENC_AES_GCM_16 else 0)
    return enc_len, (_INTEG[integ][1] if integ is not None else 0)


def describe(enc: str, integ: str | None, enc_key: bytes) -> str:
    """An SA's transform for operators, with the key size as strongSwan shows it
    (``AES_GCM_16_128``): ``aes-gcm-16-128/-``, ``aes-cbc-256/hmac-sha256-128``."""
    kind = _ENC_KIND.get(enc)
    if kind == _GCM:
        name = f"{enc}-{(len(enc_key) - _GCM_SALT_LEN) * 8}"
    elif kind == _CBC:
        name = f"{enc}-{len(enc_key) * 8}"
    else:
        name = enc
    return f"{name}/{integ or '-'}"


@functools.lru_cache(maxsize=64, typed=True)  # typed: 128.0 must still be refused
def transform(enc: str, integ: str | None, enc_key_bits: int | None) -> Transform:
    """The ``Transform`` record for a combination (validated like ``key_lengths``); cached
    (a handful of valid combinations, built per SA install otherwise: 10 us of the ~25 an
    SA's construction costs).  Invalid ones raise every time (exceptions are not cached)."""
    enc_len, integ_len = key_lengths(enc, integ, enc_key_bits)
    kind = _ENC_KIND[enc]
    if kind == _GCM:
        iv, icv, block = _GCM_IV_LEN, _GCM_ICV_LEN, 4
    else:
        assert integ is not None  # key_lengths refuses CBC and null without integrity
        if kind == _CBC:
            iv, icv, block = _CBC_BLOCK, _INTEG[integ][2], _CBC_BLOCK
        else:
            iv, icv, block = 0, _INTEG[integ][2], 4
    return Transform(enc, integ, enc_key_bits or 0, enc_len, integ_len, iv, icv, block)


#: Every supported combination, with its key lengths.
TRANSFORMS: Final[tuple[Transform, ...]] = tuple(
    [transform(ENC_AES_GCM_16, None, b) for b in (128, 256)]
    + [transform(ENC_AES_CBC, i, b) for b in (128, 256) for i in _INTEG]
    + [transform(ENC_NULL, i, 0) for i in _INTEG]
)


def _key_transform(enc: str, enc_key: bytes, integ: str | None, integ_key: bytes | None) -> Transform:
    """Validate actual keys against the combination and return its Transform."""
    if enc not in _ENC_KIND:
        key_lengths(enc, integ, 0)  # raises the unknown-algorithm message
    for name, key in (("enc_key", enc_key), ("integ_key", integ_key)):
        if key is not None and not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError(f"{name} must be bytes, got {type(key).__name__}")
    enc_key = bytes(enc_key or b"")
    if enc == ENC_AES_GCM_16:
        bits = (len(enc_key) - _GCM_SALT_LEN) * 8
        need = "20 or 36 bytes (a 16- or 32-byte AES key followed by the 4-byte salt, RFC 4106 §8.1)"
    elif enc == ENC_AES_CBC:
        bits = len(enc_key) * 8
        need = "16 or 32 bytes"
    else:
        bits = 0 if not enc_key else -1
        need = "empty (null encryption has no key)"
    try:
        tr = transform(enc, integ, bits)
    except ValueError as e:
        if str(e).startswith(f"{enc} key size"):
            raise ValueError(f"{enc} key must be {need}, got {len(enc_key)} bytes") from None
        raise
    got = len(integ_key or b"")
    if got != tr.integ_key_len:
        raise ValueError(
            f"{integ or 'no integrity algorithm'} needs a {tr.integ_key_len}-byte integrity key, got {got} bytes"
        )
    return tr


def _check_spi(spi: int) -> int:
    if type(spi) is not int or not _SPI_MIN <= spi <= _M32:
        raise ValueError(f"SPI must be an integer from {_SPI_MIN} to {_M32} (RFC 4303 §2.1), got {spi!r}")
    return spi


def peek_spi(packet: bytes) -> int:
    """The SPI of an ESP packet (first 4 bytes), to find its SA; raises ``Truncated``."""
    if len(packet) < 4:
        raise Truncated(f"ESP packet of {len(packet)} bytes has no complete SPI")
    return _S_I.unpack_from(packet)[0]


# -- replay window --------------------------------------------------------------------------


class ReplayWindow:
    """RFC 4303 §3.4.3 sliding window over (64-bit) sequence numbers, as a bitmap in an int.

    ``top`` is the highest sequence number accepted so far; bit ``i`` of ``bitmap`` is set when
    ``top - i`` has been accepted.  ``check`` only looks; ``update`` (after authentication)
    records.  Size 0 disables the checks but ``top`` is still tracked (ESN inference, state).
    """

    __slots__ = ("_infer_w", "_mask", "bitmap", "size", "top")

    def __init__(self, size: int = 128) -> None:
        if type(size) is not int or size < 0 or size > _REPLAY_MAX or size % 32:
            raise ValueError(
                f"replay_window must be 0 (disabled) or a multiple of 32 from 32 to {_REPLAY_MAX}, got {size!r}"
            )
        self.size = size
        self.top = 0
        self.bitmap = 0
        self._mask = (1 << size) - 1
        self._infer_w = size or _ESN_INFER_NO_WINDOW

    def check(self, seq: int) -> bool:
        """True if ``seq`` is new: right of the window, or inside it and not yet seen."""
        size = self.size
        if not size:
            return True
        top = self.top
        if seq > top:
            return True
        diff = top - seq
        if diff >= size or seq == 0:
            return False
        return not (self.bitmap >> diff) & 1

    def update(self, seq: int) -> None:
        """Record ``seq`` as received (slides the window when it is a new top)."""
        top = self.top
        if seq > top:
            shift = seq - top
            self.bitmap = ((self.bitmap << shift) | 1) & self._mask if shift < self.size else 1 & self._mask
            self.top = seq
        else:
            diff = top - seq
            if diff < self.size:
                self.bitmap |= 1 << diff

    def infer_esn(self, seql: int) -> int:
        """Full 64-bit sequence number for a received low half (RFC 4303 Appendix A2.2).

        With the window disabled the inference uses W = 2**31, the largest the algorithm allows.
        """
        top = self.top
        th = top >> 32
        tl = top & _M32
        w = self._infer_w
        if tl >= w - 1:  # Case A: window within one subspace
            seqh = th if seql >= tl - w + 1 else th + 1
        else:  # Case B: window spans two subspaces
            if seql >= (tl - w + 1) & _M32:
                seqh = th - 1 if th else 0
            else:
                seqh = th
        return (seqh << 32) | seql

    def state(self) -> dict[str, int | str]:
        """``top``, ``window`` (size) and ``bitmap`` as zero-padded hex, bit 0 standing for ``top``."""
        return {"top": self.top, "window": self.size, "bitmap": format(self.bitmap, f"0{max(self.size // 4, 1)}x")}

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, top={self.top})"


# -- security associations ------------------------------------------------------------------


class _SA:
    """Shared construction: validated transform and prebuilt cryptographic objects."""

    __slots__ = ("_aead", "_dec", "_enc", "_icv_len", "_kind", "_mac", "_open", "_salt", "_seal", "esn", "spi",
                 "transform")

    # Set by __init__ only for the SA's own kind (GCM: _aead, _seal, _open; CBC: _enc when
    # outbound, _dec when inbound; with an integrity algorithm: _mac) and read only on that
    # kind's packet path: typed without None, so the per-packet code needs no checks.
    _outbound: ClassVar[bool] = False
    _aead: AESGCM
    _seal: Callable[[bytes, bytes, bytes | None], bytes]
    _open: Callable[[bytes, bytes, bytes | None], bytes]
    _enc: CipherContext
    _dec: CipherContext
    _mac: crypto_hmac.HMAC

    def __init__(self, spi: int, enc: str, enc_key: bytes, integ: str | None, integ_key: bytes | None,
                 esn: bool) -> None:
        tr = _key_transform(enc, enc_key, integ, integ_key)
        self.spi = _check_spi(spi)
        self.transform = tr
        self.esn = bool(esn)
        self._kind = _ENC_KIND[enc]
        self._icv_len = tr.icv_len
        self._salt = b""
        key = bytes(enc_key or b"")
        if self._kind == _GCM:
            self._aead = AESGCM(key[:-_GCM_SALT_LEN])
            self._salt = key[-_GCM_SALT_LEN:]
            self._seal = self._aead.encrypt  # bound once: one attribute lookup less per packet
            self._open = self._aead.decrypt
        elif self._kind == _CBC:
            # A running CBC context, the one this direction uses (a context is 6-8 us to
            # make); its initial IV is irrelevant (see the module docstring).
            aes = algorithms.AES(key)
            if self._outbound:
                self._enc = Cipher(aes, modes.CBC(_urandom(_CBC_BLOCK))).encryptor()
            else:
                self._dec = Cipher(aes, modes.CBC(bytes(_CBC_BLOCK))).decryptor()
        if integ is not None:
            self._mac = crypto_hmac.HMAC(bytes(integ_key or b""), _INTEG[integ][0]())

    def __repr__(self) -> str:
        t = self.transform
        return (f"{type(self).__name__}(spi=0x{self.spi:08x}, enc={t.enc!r}/{t.enc_key_bits}, integ={t.integ!r}, "
                f"esn={self.esn})")


class OutboundSA(_SA):
    """Sending side of one SA: ``encapsulate`` numbers, pads, encrypts and authenticates.

    ``seq`` is the last sequence number used (the first packet carries ``initial_seq + 1``).
    ``needs_rekey`` turns true once ``seq`` reaches ``soft_limit`` (default: 90% of the space)
    so the role can rekey before ``SequenceExhausted``; the counter never wraps.
    """

    __slots__ = ("_max_seq", "bytes", "packets", "seq", "soft_limit")
    _outbound = True

    def __init__(self, spi: int, enc: str, enc_key: bytes, integ: str | None = None,
                 integ_key: bytes | None = None, esn: bool = False, initial_seq: int = 0,
                 soft_limit: int | None = None) -> None:
        super().__init__(spi, enc, enc_key, integ, integ_key, esn)
        self._max_seq = _MAX_SEQ_64 if self.esn else _MAX_SEQ_32
        if type(initial_seq) is not int or not 0 <= initial_seq <= self._max_seq:
            raise ValueError(f"initial_seq must be from 0 to {self._max_seq}, got {initial_seq!r}")
        if soft_limit is None:
            soft_limit = self._max_seq // 10 * 9
        elif type(soft_limit) is not int or not 0 < soft_limit <= self._max_seq:
            raise ValueError(f"soft_limit must be from 1 to {self._max_seq}, got {soft_limit!r}")
        self.soft_limit = soft_limit
        self.seq = initial_seq
        self.packets = 0
        self.bytes = 0

    @property
    def needs_rekey(self) -> bool:
        """True once the sequence number reached ``soft_limit``."""
        return self.seq >= self.soft_limit

    @property
    def exhausted(self) -> bool:
        """True when no sequence number is left: the next ``encapsulate`` raises."""
        return self.seq >= self._max_seq

    def encapsulate(self, payload: bytes, next_header: int) -> bytes:
        """ESP packet ``SPI | seq | IV | ciphertext(payload, padding, pad length, next header) | ICV``.

        ``payload`` is the inner IP packet (tunnel mode, next header 4) or the transport
        segment (transport mode).  Raises ``SequenceExhausted`` at the end of the sequence space
        and ``ValueError`` for a next header outside 0-255.
        """
        seq = self.seq + 1
        if seq > self._max_seq:
            raise SequenceExhausted(
                f"SPI 0x{self.spi:08x}: sequence number space exhausted at {self.seq}; the SA must be rekeyed"
            )
        if not 0 <= next_header <= 255:
            raise ValueError(f"next header must be 0-255, got {next_header!r}")
        n = len(payload)
        kind = self._kind
        spi = self.spi
        seql = seq & _M32
        if kind == _GCM:
            hdr = _pack_iiq(spi, seql, seq)  # SPI | seq low | IV = 64-bit sequence number
            aad = _pack_iii(spi, seq >> 32, seql) if self.esn else hdr[:8]
            out = hdr + self._seal(
                _pack_nonce(self._salt, seq), payload + _TRAILERS[((-n - 2) & 3) << 8 | next_header], aad
            )
        else:
            hdr = _pack_ii(spi, seql)
            if kind == _CBC:
                # IV = first output block for a fresh random block (module docstring).
                body = self._enc.update(
                    b"".join((_urandom(_CBC_BLOCK), payload, _TRAILERS[((-n - 2) & 15) << 8 | next_header]))
                )
            else:
                body = b"".join((payload, _TRAILERS[((-n - 2) & 3) << 8 | next_header]))
            mac = self._mac.copy()
            mac.update(hdr)
            mac.update(body)
            if self.esn:
                mac.update(_pack_i(seq >> 32))  # RFC 4303 §2.2.1: high bits after the trailer
            out = b"".join((hdr, body, mac.finalize()[: self._icv_len]))
        self.seq = seq
        self.packets += 1
        self.bytes += n
        return out


class InboundSA(_SA):
    """Receiving side of one SA: ``decapsulate`` checks, authenticates, decrypts, unpads.

    Counters (plain ints): ``packets`` and ``bytes`` (payload) accepted; ``truncated``,
    ``unknown_spi``, ``replayed``, ``auth_failed``, ``bad_padding``, ``bad_next_header``
    rejected.  ``allowed_next_headers`` restricts the Next Header values accepted (e.g.
    ``{4, 59}`` for an IPv4 tunnel); by default any value but 255 (reserved) is.
    """

    __slots__ = ("_allowed_nh", "_fixed", "_min_len", "auth_failed", "bad_next_header", "bad_padding", "bytes",
                 "packets", "replayed", "truncated", "unknown_spi", "window")

    def __init__(self, spi: int, enc: str, enc_key: bytes, integ: str | None = None,
                 integ_key: bytes | None = None, esn: bool = False, replay_window: int = 128,
                 allowed_next_headers: Iterable[int] | None = None) -> None:
        super().__init__(spi, enc, enc_key, integ, integ_key, esn)
        self.window = ReplayWindow(replay_window)
        if allowed_next_headers is None:
            self._allowed_nh = _ANY_NEXT_HEADER
        else:
            allowed = frozenset(allowed_next_headers)
            if not allowed or any(type(v) is not int or not 0 <= v <= 254 for v in allowed):
                raise ValueError(f"allowed_next_headers must be a non-empty set of 0-254, got {sorted(allowed)!r}")
            self._allowed_nh = allowed
        tr = self.transform
        # bytes around the encrypted data: header, IV, ICV
        self._fixed = _ESP_HDR_LEN + tr.iv_len + tr.icv_len
        # smallest encrypted part: the trailer (2 bytes), or one whole block for CBC
        self._min_len = self._fixed + (_CBC_BLOCK if self._kind == _CBC else 2)
        self.packets = self.bytes = 0
        self.truncated = self.unknown_spi = self.replayed = 0
        self.auth_failed = self.bad_padding = self.bad_next_header = 0

    def decapsulate(self, packet: bytes) -> tuple[int, bytes]:
        """``(next_header, payload)`` of an ESP packet starting at the SPI.

        Raises a subclass of ``ESPError`` (and counts it) for anything that is not an authentic,
        fresh, well-padded packet of this SA; the replay window only moves for packets that pass
        every check.
        """
        if packet.__class__ is not bytes:
            packet = bytes(memoryview(packet))  # bytearray/memoryview welcome; int or str are not bytes
        n = len(packet)
        kind = self._kind
        if n < self._min_len or (kind == _CBC and (n - self._fixed) % _CBC_BLOCK):
            self.truncated += 1
            if n < self._min_len:
                raise Truncated(f"ESP packet of {n} bytes is shorter than the {self._min_len}-byte minimum "
                                f"for {self.transform.enc}")
            raise Truncated(f"ESP packet of {n} bytes: the {self.transform.enc} ciphertext is not whole "
                            f"{_CBC_BLOCK}-byte blocks")
        spi, seql = _unpack_ii(packet)
        if spi != self.spi:
            self.unknown_spi += 1
            raise UnknownSPI(f"SPI 0x{spi:08x} is not this SA's (0x{self.spi:08x})")
        window = self.window
        esn = self.esn
        seq = window.infer_esn(seql) if esn else seql
        if seq <= window.top and not window.check(seq):  # right of the window: new, no call
            self.replayed += 1
            raise Replayed(f"SPI 0x{spi:08x}: sequence number {seq} replayed or left of the window "
                           f"(top {window.top}, size {window.size})")
        if kind == _GCM:
            if esn:
                if seq > _MAX_SEQ_64:  # inferred past the end of the space: nobody can send it
                    self.auth_failed += 1
                    raise AuthenticationFailed(f"SPI 0x{spi:08x}: sequence number beyond 2**64-1")
                aad = _pack_iii(spi, seq >> 32, seql)
            else:
                aad = packet[:8]
            try:
                plain = self._open(self._salt + packet[8:16], packet[16:], aad)
            except InvalidTag:
                self.auth_failed += 1
                raise AuthenticationFailed(f"SPI 0x{spi:08x} seq {seq}: GCM tag mismatch") from None
        else:
            icv_len = self._icv_len
            body = packet[:-icv_len]
            mac = self._mac.copy()
            mac.update(body)
            if esn:
                if seq > _MAX_SEQ_64:
                    self.auth_failed += 1
                    raise AuthenticationFailed(f"SPI 0x{spi:08x}: sequence number beyond 2**64-1")
                mac.update(_pack_i(seq >> 32))
            if not compare_digest(mac.finalize()[:icv_len], packet[-icv_len:]):
                self.auth_failed += 1
                raise AuthenticationFailed(f"SPI 0x{spi:08x} seq {seq}: ICV mismatch")
            if kind == _CBC:
                plain = self._dec.update(body[_ESP_HDR_LEN:])[_CBC_BLOCK:]
            else:
                plain = body[_ESP_HDR_LEN:]
        pad_len = plain[-2]
        end = len(plain) - 2 - pad_len
        if end < 0 or plain[end:-2] != _PADS[pad_len]:
            self.bad_padding += 1
            raise BadPadding(f"SPI 0x{spi:08x} seq {seq}: pad length {pad_len} with "
                             f"{'too few bytes' if end < 0 else 'padding other than 1, 2, 3...'}")
        nh = plain[-1]
        if nh not in self._allowed_nh:
            self.bad_next_header += 1
            raise BadNextHeader(f"SPI 0x{spi:08x} seq {seq}: next header {nh} not accepted")
        window.update(seq)
        self.packets += 1
        self.bytes += end
        return nh, plain[:end]

    def replay_state(self) -> dict[str, int | str | bool]:
        """Window state for ``narctl``: top sequence number, size, bitmap (hex, bit 0 = top)."""
        state: dict[str, int | str | bool] = dict(self.window.state())
        state["esn"] = self.esn
        return state

    def counters(self) -> dict[str, int]:
        """Every counter by name (for metrics)."""
        return {name: getattr(self, name) for name in (
            "packets", "bytes", "truncated", "unknown_spi", "replayed", "auth_failed", "bad_padding",
            "bad_next_header")}
