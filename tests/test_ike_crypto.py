"""IKEv1 cryptography (narsuite.ike.crypto) against the RFC formulas, re-derived here.

Every known answer below is computed in this file with ``hmac``/``hashlib`` straight from the
RFC text (RFC 2409 §5, §5.5, Appendix B; RFC 3947 §3.2), written independently of the module,
so a transposed argument or a missing octet in either shows up as a mismatch.  The MODP primes
are recomputed from their defining formula (RFC 2409 §6.2, RFC 3526) and compared with a second,
independent copy (scapy's TLS group table).  The IV chain is checked against one long CBC run
(CBC over m1 || m2 under IV equals m1 under IV, then m2 under m1's last block).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from narsuite.ike import crypto as C
from narsuite.lab.pytest_plugin import need_tools

# ---------------------------------------------------------------------------------------------
# independent reference formulas (RFC text -> a few lines each)


def ref_prf(h: str, key: bytes, *parts: bytes) -> bytes:
    m = hmac.new(key, digestmod=h)
    for p in parts:
        m.update(p)
    return m.digest()


def ref_hash(h: str, *parts: bytes) -> bytes:
    m = hashlib.new(h)
    for p in parts:
        m.update(p)
    return m.digest()


def ref_appendix_b(h: str, skeyid_e: bytes, n: int) -> bytes:
    # "If the key length is longer than SKEYID_e, Ka = K1 | K2 | ..., K1 = prf(SKEYID_e, 0),
    # K2 = prf(SKEYID_e, K1) ..." -- otherwise the leading bytes of SKEYID_e.
    if n <= len(skeyid_e):
        return skeyid_e[:n]
    ks = [ref_prf(h, skeyid_e, bytes([0]))]
    while sum(map(len, ks)) < n:
        ks.append(ref_prf(h, skeyid_e, ks[-1]))
    return b"".join(ks)[:n]


def ref_keymat(h: str, skeyid_d: bytes, proto: int, spi: bytes, ni: bytes, nr: bytes, n: int, g=b"") -> bytes:
    # KEYMAT = K1 | K2 | ..., K1 = prf(SKEYID_d, [g(qm)^xy |] protocol | SPI | Ni_b | Nr_b),
    # K2 = prf(SKEYID_d, K1 | [g(qm)^xy |] protocol | SPI | Ni_b | Nr_b), ...
    tail = [g, bytes([proto]), spi, ni, nr]
    ks = [ref_prf(h, skeyid_d, *tail)]
    while sum(map(len, ks)) < n:
        ks.append(ref_prf(h, skeyid_d, ks[-1], *tail))
    return b"".join(ks)[:n]


def b(n: int, seed: int) -> bytes:
    """Deterministic, distinct test bytes."""
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(bytes([seed]) + i.to_bytes(4, "big")).digest()
        i += 1
    return out[:n]


HASH_NAMES = sorted(C.HASHES)
CKY_I, CKY_R = b(8, 1), b(8, 2)
NI, NR = b(32, 3), b(24, 4)
GXY = b(256, 5)
GXI, GXR = b(256, 6), b(256, 7)
SAI_B = b(52, 8)
IDII_B, IDIR_B = bytes([1, 17, 1, 244]) + bytes([192, 0, 2, 1]), bytes([1, 17, 1, 244]) + bytes([198, 51, 100, 7])


# ---------------------------------------------------------------------------------------------
# MODP primes


def _pi_times_2_to(bits: int) -> int:
    """floor(pi * 2^bits) by Machin's formula in integers (64 guard bits)."""
    guard = 64
    one = 1 << (bits + guard)

    def arctan_inv(x: int) -> int:
        total, term, k, sign = 0, one // x, 1, 1
        while term:
            total += sign * (term // k)
            term //= x * x
            k += 2
            sign = -sign
        return total

    return (16 * arctan_inv(5) - 4 * arctan_inv(239)) >> guard


# (group, bits, k) with p = 2^N - 2^(N-64) - 1 + 2^64 * ([2^(N-130) pi] + k)
OAKLEY = [(2, 1024, 129093), (5, 1536, 741804), (14, 2048, 124476), (15, 3072, 1690314), (16, 4096, 240904)]


@pytest.mark.parametrize("number,bits,k", OAKLEY)
def test_modp_prime_is_the_rfc_formula(number, bits, k):
    p = C.MODP_PRIMES[number]
    assert p == 2**bits - 2 ** (bits - 64) - 1 + 2**64 * (_pi_times_2_to(bits - 130) + k)
    assert p.bit_length() == bits
    assert p >> (bits - 64) == 2**64 - 1 and p & (2**64 - 1) == 2**64 - 1  # first and last 64 bits set
    assert pow(2, p - 1, p) == 1  # Fermat: (probably) prime
    q = (p - 1) // 2
    assert pow(3, q - 1, q) == 1  # and a safe prime: (p-1)/2 (probably) prime too
    assert C.group(number).public_length == bits // 8


def test_modp_primes_match_an_independent_copy():
    from scapy.layers.tls.crypto import groups as scapy_groups

    theirs = {2: scapy_groups.modp1024, 5: scapy_groups.modp1536, 14: scapy_groups.modp2048,
              15: scapy_groups.modp3072, 16: scapy_groups.modp4096}
    for number, params in theirs.items():
        assert C.MODP_PRIMES[number] == params.m, number
        assert params.g == 2


# ---------------------------------------------------------------------------------------------
# Diffie-Hellman


def test_supported_groups_and_unknown_group():
    assert set(C.SUPPORTED_GROUPS) >= {2, 5, 14, 19, 20}
    assert C.group(14) is C.group(14)
    for bad in (1, 3, 4, 24, 31, 0):
        with pytest.raises(ValueError, match="unsupported Diffie-Hellman group"):
            C.group(bad)


@pytest.mark.parametrize("number", C.SUPPORTED_GROUPS)
def test_both_sides_derive_the_same_secret(number):
    g = C.group(number)
    a, pa = g.generate()
    bb, pb = g.generate()
    assert len(pa) == len(pb) == g.public_length
    s1, s2 = g.shared(a, pb), g.shared(bb, pa)
    assert s1 == s2 and len(s1) == g.shared_length
    a2, pa2 = g.generate()
    assert pa2 != pa and g.shared(a2, pb) != s1  # fresh keys each time


@pytest.mark.parametrize("number", [n for n in C.SUPPORTED_GROUPS if n in C.MODP_PRIMES])
def test_modp_values_are_the_textbook_ones(number):
    g = C.group(number)
    p = C.MODP_PRIMES[number]
    a, pa = g.generate()
    bb, pb = g.generate()
    x = a.private_numbers().x
    y = bb.private_numbers().x
    assert int.from_bytes(pa, "big") == pow(2, x, p)
    assert g.shared(a, pb) == pow(2, x * y, p).to_bytes(g.public_length, "big")


def test_modp_secret_with_leading_zero_keeps_the_prime_length():
    """g^xy < 2^(N-8) happens once in 256 exchanges: it must still be N/8 bytes (strongSwan pads)."""
    g = C.group(14)
    a, _ = g.generate()
    x = a.private_numbers().x
    for _ in range(4000):
        _, pb = g.generate()
        if pow(int.from_bytes(pb, "big"), x, g.prime) < 2 ** (g.bits - 8):
            break
    else:  # pragma: no cover - (255/256)^4000 ~ 1.6e-7
        pytest.fail("no short shared secret found")
    out = g.shared(a, pb)
    assert len(out) == 256 and out[0] == 0
    assert out == pow(int.from_bytes(pb, "big"), x, g.prime).to_bytes(256, "big")


@pytest.mark.parametrize("number", [n for n in C.SUPPORTED_GROUPS if n not in C.MODP_PRIMES])
def test_ecp_encoding_is_x_y_and_secret_is_x(number):
    g = C.group(number)
    a, pa = g.generate()
    bb, pb = g.generate()
    n = g.field_bytes
    assert len(pa) == 2 * n
    # KE data is the uncompressed point without its 0x04 prefix (RFC 5903 §7)
    nums = a.public_key().public_numbers()
    assert pa == nums.x.to_bytes(n, "big") + nums.y.to_bytes(n, "big")
    # the secret is the x coordinate of (a*b)G (RFC 5903 §9), computed without ECDH
    order = {19: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551}.get(number)
    if order is not None:
        ab = a.private_numbers().private_value * bb.private_numbers().private_value % order
        joint = ec.derive_private_key(ab, g.curve).public_key().public_numbers()
        assert g.shared(a, pb) == joint.x.to_bytes(n, "big")
    assert g.shared(a, pb) == g.shared(bb, pa)


@pytest.mark.parametrize("number", [n for n in C.SUPPORTED_GROUPS if n in C.MODP_PRIMES])
def test_modp_rejects_degenerate_and_malformed_peer_values(number):
    g = C.group(number)
    p = C.MODP_PRIMES[number]
    a, pa = g.generate()
    L = g.public_length
    for y in (0, 1, p - 1, p, p + 1, 2 ** (8 * L) - 1):
        with pytest.raises(C.CryptoError, match="outside 1 < y < p-1"):
            g.check_peer(y.to_bytes(L, "big"))  # our own rule, whatever OpenSSL does later
        with pytest.raises(C.CryptoError):
            g.shared(a, y.to_bytes(L, "big"))
    for bad in (pa[1:], b"\0" + pa, b"", pa + b"\0"):
        with pytest.raises(C.CryptoError, match="bytes, must be"):
            g.shared(a, bad)
    with pytest.raises(C.CryptoError):
        g.shared(a, "not bytes")  # type: ignore[arg-type]
    g.shared(a, (2).to_bytes(L, "big"))  # 2 and p-2 are the boundaries that are fine
    g.shared(a, (p - 2).to_bytes(L, "big"))


@pytest.mark.parametrize("number", [n for n in C.SUPPORTED_GROUPS if n not in C.MODP_PRIMES])
def test_ecp_rejects_off_curve_and_malformed_points(number):
    g = C.group(number)
    a, pa = g.generate()
    n = g.field_bytes
    x, y = pa[:n], pa[n:]
    y_off = (int.from_bytes(y, "big") ^ 1).to_bytes(n, "big")
    for bad in (x + y_off, bytes(2 * n), b"\xff" * (2 * n), pa[:-1], pa + b"\0", b"\x04" + pa, pa[:n], b""):
        with pytest.raises(C.CryptoError):
            g.shared(a, bad)


def test_private_key_of_another_group_is_a_type_error():
    a14, _ = C.group(14).generate()
    _, p5 = C.group(5).generate()
    a19, _ = C.group(19).generate()
    _, p20 = C.group(20).generate()
    with pytest.raises(TypeError):
        C.group(5).shared(a14, p5)
    with pytest.raises(TypeError):
        C.group(20).shared(a19, p20)
    with pytest.raises(TypeError):
        C.group(19).shared(a14, C.group(19).generate()[1])


@settings(max_examples=60, deadline=None)
@given(number=st.sampled_from(C.SUPPORTED_GROUPS), data=st.binary(max_size=600))
def test_random_peer_values_raise_only_crypto_error(number, data):
    g = C.group(number)
    a, _ = g.generate() if number != 2 else _G2_KEY
    try:
        out = g.shared(a, data)
    except C.CryptoError:
        return
    assert len(out) == g.shared_length


_G2_KEY = C.group(2).generate()  # group 2 key generation is the slow one; reuse it

# ---------------------------------------------------------------------------------------------
# prf, SKEYID and friends (RFC 2409 §5)


@pytest.mark.parametrize("h", HASH_NAMES)
def test_prf_and_hash_are_hmac_and_plain_hash(h):
    assert C.prf(h, b"key", b"data") == ref_prf(h, b"key", b"data")
    assert C.digest(h, b"data") == ref_hash(h, b"data")
    assert len(C.prf(h, b"k", b"")) == C.HASHES[h]
    with pytest.raises(ValueError, match="unknown IKE hash"):
        C.prf("sha3", b"k", b"d")


@pytest.mark.parametrize("h", HASH_NAMES)
def test_skeyid_for_each_authentication_method(h):
    psk = b"a pre-shared secret"
    assert C.skeyid_psk(h, psk, NI, NR) == ref_prf(h, psk, NI, NR)
    assert C.skeyid_sig(h, NI, NR, GXY) == ref_prf(h, NI + NR, GXY)
    assert C.skeyid_pke(h, NI, NR, CKY_I, CKY_R) == ref_prf(h, ref_hash(h, NI, NR), CKY_I, CKY_R)
    # the nonces are not interchangeable
    assert C.skeyid_psk(h, psk, NR, NI) != C.skeyid_psk(h, psk, NI, NR)


@pytest.mark.parametrize("h", HASH_NAMES)
def test_skeyid_d_a_e(h):
    skeyid = ref_prf(h, b"psk", NI, NR)
    k = C.derive_phase1(h, skeyid, GXY, CKY_I, CKY_R)
    d = ref_prf(h, skeyid, GXY, CKY_I, CKY_R, b"\x00")
    a = ref_prf(h, skeyid, d, GXY, CKY_I, CKY_R, b"\x01")
    e = ref_prf(h, skeyid, a, GXY, CKY_I, CKY_R, b"\x02")
    assert (k.skeyid, k.skeyid_d, k.skeyid_a, k.skeyid_e) == (skeyid, d, a, e)
    assert k.hash_name == h
    text = repr(k)
    for secret in (skeyid, d, a, e):
        assert secret.hex() not in text and repr(secret) not in text


def test_cookies_must_be_eight_bytes():
    with pytest.raises(ValueError, match="8 bytes"):
        C.derive_phase1("sha1", b"s", GXY, CKY_I[:7], CKY_R)
    with pytest.raises(ValueError, match="8 bytes"):
        C.natd_hash("sha1", CKY_I, CKY_R + b"x", "192.0.2.1", 500)


# (hash, key length) -> whether Appendix B expansion happens
EXPANSION = [("md5", 16, False), ("md5", 24, True), ("md5", 32, True), ("sha1", 16, False),
             ("sha1", 24, True), ("sha1", 32, True), ("sha256", 16, False), ("sha256", 24, False),
             ("sha256", 32, False), ("sha384", 32, False), ("sha512", 32, False)]


@pytest.mark.parametrize("h,n,expands", EXPANSION)
def test_cipher_key_expansion(h, n, expands):
    skeyid_e = C.derive_phase1(h, b"skeyid", GXY, CKY_I, CKY_R).skeyid_e
    key = C.encryption_key(h, skeyid_e, n)
    assert len(key) == n
    assert key == ref_appendix_b(h, skeyid_e, n)
    assert (key[: min(n, len(skeyid_e))] != skeyid_e[:n]) == expands  # expansion never starts with SKEYID_e
    if expands:
        k1 = ref_prf(h, skeyid_e, b"\x00")
        assert key.startswith(k1[:n])
        if n > len(k1):
            assert key[len(k1):] == ref_prf(h, skeyid_e, k1)[: n - len(k1)]
    keys = C.Phase1Keys(h, b"", b"", b"", skeyid_e)
    assert keys.encryption_key(n) == key


def test_expansion_beyond_two_blocks():
    e = b(20, 9)
    assert C.encryption_key("sha1", e, 70) == ref_appendix_b("sha1", e, 70)
    with pytest.raises(ValueError):
        C.encryption_key("sha1", e, 0)


@pytest.mark.parametrize("h", HASH_NAMES)
def test_hash_i_and_hash_r(h):
    skeyid = b(C.HASHES[h], 10)
    hi = C.hash_i(h, skeyid, GXI, GXR, CKY_I, CKY_R, SAI_B, IDII_B)
    hr = C.hash_r(h, skeyid, GXI, GXR, CKY_I, CKY_R, SAI_B, IDIR_B)
    assert hi == ref_prf(h, skeyid, GXI, GXR, CKY_I, CKY_R, SAI_B, IDII_B)
    assert hr == ref_prf(h, skeyid, GXR, GXI, CKY_R, CKY_I, SAI_B, IDIR_B)
    assert hi != C.hash_i(h, skeyid, GXI, GXR, CKY_I, CKY_R, SAI_B, IDIR_B)


def test_constant_time_equal():
    assert C.constant_time_equal(b"abc", b"abc")
    assert not C.constant_time_equal(b"abc", b"abd")
    assert not C.constant_time_equal(b"abc", b"ab")


def test_nonces_and_cookies():
    assert len(C.random_nonce()) == 32 and len(C.random_nonce(8)) == 8
    assert C.random_nonce() != C.random_nonce()
    for bad in (7, 257):
        with pytest.raises(ValueError):
            C.random_nonce(bad)
    ck = C.random_cookie()
    assert len(ck) == 8 and any(ck)


# ---------------------------------------------------------------------------------------------
# CBC, padding, payload chains


CIPHER_CASES = [("aes-cbc", 16), ("aes-cbc", 24), ("aes-cbc", 32), ("3des-cbc", 24)]


@pytest.mark.parametrize("name,keylen", CIPHER_CASES)
def test_cbc_round_trip_and_padding(name, keylen):
    c = C.CBCCipher(name, b(keylen, 11))
    bs = c.block_size
    assert bs == C.block_size(name) == (16 if name == "aes-cbc" else 8)
    iv = b(bs, 12)
    for n in range(0, 3 * bs + 1):
        body = b(n, 13)
        ct = c.encrypt(iv, body)
        assert len(ct) % bs == 0 and bs >= len(ct) - n >= 1  # 1..bs bytes of padding, always
        pt = c.decrypt(iv, ct)
        assert pt == body + bytes(len(ct) - n)  # zero padding, returned as is
    # it is plain CBC: the same as cryptography's CBC over the zero-padded body
    alg = algorithms.AES(b(keylen, 11)) if name == "aes-cbc" else C._TripleDES(b(keylen, 11))
    enc = Cipher(alg, modes.CBC(iv)).encryptor()
    assert c.encrypt(iv, b"x" * 5) == enc.update(b"x" * 5 + bytes(bs - 5)) + enc.finalize()
    assert name in repr(c) and b(keylen, 11).hex() not in repr(c)


def test_cbc_rejects_bad_keys_ivs_and_lengths():
    with pytest.raises(ValueError, match="key must be"):
        C.CBCCipher("aes-cbc", b"k" * 20)
    with pytest.raises(ValueError, match="key must be"):
        C.CBCCipher("3des-cbc", b"k" * 16)
    with pytest.raises(ValueError, match="unknown IKE cipher"):
        C.CBCCipher("des-cbc", b"k" * 8)
    c = C.CBCCipher("aes-cbc", b"k" * 16)
    with pytest.raises(ValueError, match="IV must be"):
        c.encrypt(b"i" * 8, b"body")
    for n in (0, 1, 15, 17, 31):
        with pytest.raises(C.CryptoError):
            c.decrypt(b"i" * 16, bytes(n))


def _payload(next_payload: int, body: bytes) -> bytes:
    return struct.pack("!BBH", next_payload, 0, 4 + len(body)) + body


def test_payload_chain_strips_any_padding():
    chain = _payload(10, b"H" * 20) + _payload(11, b"nonce" * 4) + _payload(0, b"notify")  # HASH, NONCE, N
    for padding in (b"", bytes(1), bytes(16), bytes(range(1, 8)) + b"\x07", b"\xaa" * 40):
        payloads, rest = C.payload_chain(chain + padding, 8)
        assert payloads == chain and rest == padding
    assert C.payload_chain(b"anything", 0) == (b"", b"anything")
    for bad in (chain[:-1], chain[:3], _payload(0, b"")[:2] + b"\x00\x03", b""):
        with pytest.raises(C.CryptoError):
            C.payload_chain(bad, 8)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), name=st.sampled_from(["aes-cbc", "3des-cbc"]),
       mid=st.integers(0, 2**32 - 1), first=st.integers(0, 255))
def test_decrypting_random_bytes_raises_only_crypto_error(data, name, mid, first):
    sa = C.ISAKMPCrypto(name, b"k" * 24, "sha1", GXI, GXR)
    try:
        plain = sa.decrypt(mid, data)
    except C.CryptoError:
        return
    assert len(plain) == len(data)
    try:
        payloads, rest = C.payload_chain(plain, first)
    except C.CryptoError:
        return
    assert payloads + rest == plain


# ---------------------------------------------------------------------------------------------
# IVs (RFC 2409 Appendix B)


@pytest.mark.parametrize("h", HASH_NAMES)
@pytest.mark.parametrize("bs", [8, 16])
def test_initial_and_phase2_iv(h, bs):
    assert C.initial_iv(h, GXI, GXR, bs) == ref_hash(h, GXI, GXR)[:bs]
    last = b(bs, 14)
    assert C.phase2_iv(h, last, 0x01020304, bs) == ref_hash(h, last, b"\x01\x02\x03\x04")[:bs]
    assert C.phase2_iv(h, last, 7, bs) == ref_hash(h, last, struct.pack("!I", 7))[:bs]
    with pytest.raises(ValueError):
        C.phase2_iv(h, last, 2**32, bs)


def _cbc(key: bytes, iv: bytes, data: bytes) -> bytes:
    e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return e.update(data) + e.finalize()


def test_iv_chain_through_main_mode_quick_mode_and_informational():
    """Responder's view: MM5 in, MM6 out, QM1 in, QM2 out, QM3 in, an informational out."""
    h, key = "sha1", b(16, 15)
    init = C.ISAKMPCrypto("aes-cbc", key, h, GXI, GXR)  # the initiator's state
    resp = C.ISAKMPCrypto("aes-cbc", key, h, GXI, GXR)
    iv0 = ref_hash(h, GXI, GXR)[:16]
    assert resp.ivs.iv(0) == iv0

    mm5, mm6 = b(40, 16), b(70, 17)
    c5 = init.encrypt(0, mm5)
    assert c5 == _cbc(key, iv0, C.pad(mm5, 16))
    assert resp.decrypt(0, c5) == C.pad(mm5, 16)
    assert resp.ivs.iv(0) == iv0  # not moved until accepted
    resp.accept(0, c5)
    c6 = resp.encrypt(0, mm6)
    # chaining is one CBC run over both messages (next IV = last ciphertext block)
    assert c5 + c6 == _cbc(key, iv0, C.pad(mm5, 16) + C.pad(mm6, 16))
    init.accept(0, c6)
    assert init.decrypt(0, c6) != C.pad(mm6, 16)  # after accept the chain has moved on
    phase1_last = c6[-16:]
    assert resp.ivs.phase1_iv == init.ivs.phase1_iv == phase1_last

    mid = 0xCAFEF00D
    qiv = ref_hash(h, phase1_last, struct.pack("!I", mid))[:16]
    qm1, qm2, qm3 = b(100, 18), b(90, 19), b(30, 20)
    c1 = init.encrypt(mid, qm1)
    assert c1 == _cbc(key, qiv, C.pad(qm1, 16))
    assert resp.decrypt(mid, c1) == C.pad(qm1, 16)
    resp.accept(mid, c1)
    c2 = resp.encrypt(mid, qm2)
    init.accept(mid, c2)
    c3 = init.encrypt(mid, qm3)
    assert c1 + c2 + c3 == _cbc(key, qiv, C.pad(qm1, 16) + C.pad(qm2, 16) + C.pad(qm3, 16))
    assert resp.decrypt(mid, c3) == C.pad(qm3, 16)

    # a second exchange starts from the phase-1 block again, not from the Quick Mode's
    info_mid = 0x11111111
    ci = resp.encrypt(info_mid, b"N" * 12)
    assert ci == _cbc(key, ref_hash(h, phase1_last, struct.pack("!I", info_mid))[:16], C.pad(b"N" * 12, 16))
    assert init.decrypt(info_mid, ci) == C.pad(b"N" * 12, 16)
    assert resp.ivs.phase1_iv == phase1_last  # phase 2 never moves phase 1's IV


def test_iv_chain_3des_md5_and_aggressive_mode_phase1_iv():
    # aggressive mode may finish phase 1 without an encrypted message: phase 2 then starts
    # from hash(g^xi | g^xr) itself
    sa = C.ISAKMPCrypto("3des-cbc", b(24, 21), "md5", GXI, GXR)
    iv0 = ref_hash("md5", GXI, GXR)[:8]
    assert sa.ivs.phase1_iv == iv0
    assert sa.ivs.iv(5) == ref_hash("md5", iv0, struct.pack("!I", 5))[:8]


def test_iv_chain_is_bounded_and_forgets():
    chain = C.IVChain("sha1", 16, bytes(16), max_exchanges=4)
    for mid in range(1, 10):
        chain.iv(mid)
        chain.iv(6)  # used again and again: never the least recently used
    assert len(chain._ivs) == 4 and set(chain._ivs) == {6, 7, 8, 9}
    chain.iv(10)
    assert set(chain._ivs) == {6, 8, 9, 10}
    chain.update(7, b"c" * 32)
    assert chain.iv(7) == b"c" * 16
    chain.forget(7)
    chain.forget(12345)
    assert chain.iv(7) == C.phase2_iv("sha1", bytes(16), 7, 16)
    with pytest.raises(ValueError):
        chain.update(7, b"c" * 15)
    with pytest.raises(ValueError):
        C.IVChain("sha1", 16, bytes(8))


# ---------------------------------------------------------------------------------------------
# Quick Mode, informational, transaction HASHes; KEYMAT (RFC 2409 §5.5, §5.7)


@pytest.mark.parametrize("h", HASH_NAMES)
def test_quick_mode_hashes(h):
    ska = b(C.HASHES[h], 22)
    mid = 0x0A0B0C0D
    m = b"\x0a\x0b\x0c\x0d"
    rest1, rest2 = b(120, 23), b(110, 24)
    assert C.qm_hash1(h, ska, mid, rest1) == ref_prf(h, ska, m, rest1)
    assert C.qm_hash2(h, ska, mid, NI, rest2) == ref_prf(h, ska, m, NI, rest2)
    assert C.qm_hash3(h, ska, mid, NI, NR) == ref_prf(h, ska, b"\x00", m, NI, NR)
    assert C.informational_hash(h, ska, mid, rest1) == ref_prf(h, ska, m, rest1)
    assert C.transaction_hash(h, ska, mid, rest2) == ref_prf(h, ska, m, rest2)
    assert C.qm_hash1(h, ska, mid + 1, rest1) != C.qm_hash1(h, ska, mid, rest1)


# ESP key lengths as narsuite.esp.transform.key_lengths gives them
ESP_LENGTHS = [(20, 0), (36, 0), (16, 20), (32, 20), (16, 32), (32, 32), (24, 24)]


@pytest.mark.parametrize("h", HASH_NAMES)
@pytest.mark.parametrize("enc_len,integ_len", ESP_LENGTHS)
@pytest.mark.parametrize("pfs", [False, True])
def test_keymat_and_esp_key_split(h, enc_len, integ_len, pfs):
    skd = b(C.HASHES[h], 25)
    spi = bytes.fromhex("c0ffee01")
    g = b(256, 26) if pfs else None
    n = enc_len + integ_len
    expected = ref_keymat(h, skd, 3, spi, NI, NR, n, g or b"")
    assert C.keymat(h, skd, C.PROTO_IPSEC_ESP, spi, NI, NR, n, g) == expected
    enc, integ = C.esp_keys(h, skd, spi, NI, NR, enc_len, integ_len, g)
    assert (enc, integ) == (expected[:enc_len], expected[enc_len:])  # encryption key first
    assert C.esp_keys(h, skd, 0xC0FFEE01, NI, NR, enc_len, integ_len, g) == (enc, integ)  # SPI as int


def test_keymat_depends_on_spi_pfs_and_nonce_order():
    base = C.keymat("sha1", b"d" * 20, 3, 1000, NI, NR, 64)
    assert C.keymat("sha1", b"d" * 20, 3, 1001, NI, NR, 64) != base  # each direction its own keys
    assert C.keymat("sha1", b"d" * 20, 3, 1000, NR, NI, 64) != base
    assert C.keymat("sha1", b"d" * 20, 3, 1000, NI, NR, 64, b"g" * 256) != base
    assert C.keymat("sha1", b"d" * 20, 2, 1000, NI, NR, 64) != base
    assert C.keymat("sha1", b"d" * 20, 3, 1000, NI, NR, 20) == base[:20]  # a prefix, whatever the length
    for bad in ((3, 2**32, 16), (256, 1, 16), (3, 1, 0)):
        with pytest.raises(ValueError):
            C.keymat("sha1", b"d" * 20, bad[0], bad[1], NI, NR, bad[2])
    with pytest.raises(ValueError):
        C.esp_keys("sha1", b"d" * 20, 1, NI, NR, 0, 0)


def test_keymat_matches_narsuite_esp_key_lengths():
    from narsuite.esp.transform import key_lengths

    for enc, integ, bits in (("aes-gcm-16", None, 128), ("aes-cbc", "hmac-sha256-128", 256)):
        el, il = key_lengths(enc, integ, bits)
        e, i = C.esp_keys("sha256", b"d" * 32, 0x1234, NI, NR, el, il)
        assert (len(e), len(i)) == (el, il)


# ---------------------------------------------------------------------------------------------
# NAT-D (RFC 3947 §3.2)


@pytest.mark.parametrize("h", HASH_NAMES)
def test_natd_hash(h):
    v4 = C.natd_hash(h, CKY_I, CKY_R, "192.0.2.10", 4500)
    assert v4 == ref_hash(h, CKY_I, CKY_R, bytes([192, 0, 2, 10]), b"\x11\x94")
    assert C.natd_hash(h, CKY_I, CKY_R, ipaddress.ip_address("192.0.2.10"), 4500) == v4
    assert C.natd_hash(h, CKY_I, CKY_R, bytes([192, 0, 2, 10]), 4500) == v4
    assert C.natd_hash(h, CKY_I, CKY_R, "192.0.2.10", 500) != v4
    v6 = C.natd_hash(h, CKY_I, CKY_R, "2001:db8::1", 500)
    assert v6 == ref_hash(h, CKY_I, CKY_R, ipaddress.ip_address("2001:db8::1").packed, b"\x01\xf4")
    with pytest.raises(ValueError):
        C.natd_hash(h, CKY_I, CKY_R, b"\x01\x02\x03", 500)
    with pytest.raises(ValueError):
        C.natd_hash(h, CKY_I, CKY_R, "192.0.2.1", 70000)


# ---------------------------------------------------------------------------------------------
# one whole responder-side derivation, both ends computed separately


@pytest.mark.parametrize("group_no,h,keylen", [(14, "sha1", 16), (19, "sha256", 32), (20, "sha1", 32), (5, "md5", 24)])
def test_full_phase1_and_quick_mode_between_two_ends(group_no, h, keylen):
    g = C.group(group_no)
    xi, gxi = g.generate()
    xr, gxr = g.generate()
    psk = b"lab secret"
    ni, nr = C.random_nonce(), C.random_nonce(20)
    cki, ckr = C.random_cookie(), C.random_cookie()
    ends = []
    for priv, peer in ((xi, gxr), (xr, gxi)):
        gxy = g.shared(priv, peer)
        keys = C.derive_phase1(h, C.skeyid_psk(h, psk, ni, nr), gxy, cki, ckr)
        ends.append((gxy, keys, C.ISAKMPCrypto("aes-cbc", keys.encryption_key(keylen), h, gxi, gxr)))
    (gxy, ki, si), (_, kr, sr) = ends
    assert ki == kr
    # the reference end: everything from the RFC formulas
    skeyid = ref_prf(h, psk, ni, nr)
    d = ref_prf(h, skeyid, gxy, cki, ckr, b"\0")
    a = ref_prf(h, skeyid, d, gxy, cki, ckr, b"\1")
    e = ref_prf(h, skeyid, a, gxy, cki, ckr, b"\2")
    assert (ki.skeyid_d, ki.skeyid_a, ki.skeyid_e) == (d, a, e)
    key = ref_appendix_b(h, e, keylen)
    body = _payload(8, IDII_B) + _payload(0, C.hash_i(h, skeyid, gxi, gxr, cki, ckr, SAI_B, IDII_B))
    c5 = si.encrypt(0, body)
    assert c5 == _cbc(key, ref_hash(h, gxi, gxr)[:16], C.pad(body, 16))
    payloads, _ = C.payload_chain(sr.decrypt(0, c5), 5)
    assert payloads == body
    received = payloads[-C.HASHES[h]:]
    assert C.constant_time_equal(C.hash_i(h, kr.skeyid, gxi, gxr, cki, ckr, SAI_B, IDII_B), received)
    # Quick Mode with PFS in the same group
    qi, qgi = g.generate()
    qr, qgr = g.generate()
    gqm = g.shared(qi, qgr)
    assert gqm == g.shared(qr, qgi)
    ours = C.esp_keys(h, kr.skeyid_d, 0xABCD0001, ni, nr, 16, 20, gqm)
    km = ref_keymat(h, d, 3, bytes.fromhex("abcd0001"), ni, nr, 36, gqm)
    assert ours == (km[:16], km[16:])


# ---------------------------------------------------------------------------------------------
# Independent oracle: Wireshark's IKEv1 decryption (tshark), given only the cipher key


def _tv(attr: int, value: int) -> bytes:
    return struct.pack("!HH", 0x8000 | attr, value)


def _sa(next_payload: int, protocol: int, spi: bytes, transform_id: int, attrs: bytes) -> bytes:
    t = _payload(0, bytes([1, transform_id, 0, 0]) + attrs)
    p = _payload(0, bytes([1, protocol, len(spi), 1]) + spi + t)
    return _payload(next_payload, struct.pack("!II", 1, 1) + p)


def _exchange_pcap(path, h: str, cipher: str, keybits: int, group_no: int):
    """Main Mode (PSK), Quick Mode and a DPD informational, every encrypted message built here.

    Returns (initiator cookie, ISAKMP SA key, QM nonces).  tshark computes the IVs itself
    (hash(g^xi | g^xr), CBC chaining, hash(last phase-1 block | M-ID)) from the KE payloads.
    """
    from scapy.all import IP, UDP, Raw, wrpcap

    g = C.group(group_no)
    xi, gxi = g.generate()
    xr, gxr = g.generate()
    ni, nr = C.random_nonce(), C.random_nonce()
    cki, ckr = C.random_cookie(), C.random_cookie()
    keys = C.derive_phase1(h, C.skeyid_psk(h, b"psk", ni, nr), g.shared(xr, gxi), cki, ckr)
    key = keys.encryption_key(keybits // 8)
    ini = C.ISAKMPCrypto(cipher, key, h, gxi, gxr)
    res = C.ISAKMPCrypto(cipher, key, h, gxi, gxr)
    i_addr, r_addr = "192.0.2.1", "198.51.100.7"
    pkts = []

    def send(from_initiator, np, exch, mid, body, encrypted, responder_cookie=True):
        sender, receiver = (ini, res) if from_initiator else (res, ini)
        if encrypted:
            data = sender.encrypt(mid, body)
            assert C.payload_chain(receiver.decrypt(mid, data), np)[0] == body
            receiver.accept(mid, data)
        else:
            data = body
        hdr = cki + (ckr if responder_cookie else bytes(8))
        hdr += struct.pack("!BBBBII", np, 0x10, exch, int(encrypted), mid, 28 + len(data))
        src, dst = (i_addr, r_addr) if from_initiator else (r_addr, i_addr)
        pkts.append(IP(src=src, dst=dst) / UDP(sport=500, dport=500) / Raw(hdr + data))

    hash_id = {"md5": 1, "sha1": 2, "sha256": 4}[h]
    enc_attrs = _tv(1, 7) + _tv(14, keybits) if cipher == "aes-cbc" else _tv(1, 5)
    sa = _sa(0, 1, b"", 1, enc_attrs + _tv(2, hash_id) + _tv(4, group_no) + _tv(3, 1) + _tv(11, 1) + _tv(12, 28800))
    send(True, 1, 2, 0, sa, False, responder_cookie=False)
    send(False, 1, 2, 0, sa, False)
    send(True, 4, 2, 0, _payload(10, gxi) + _payload(0, ni), False)
    send(False, 4, 2, 0, _payload(10, gxr) + _payload(0, nr), False)
    idi, idr = bytes([1, 17, 1, 244, 10, 1, 2, 3]), bytes([1, 17, 1, 244, 10, 9, 8, 7])
    hi = C.hash_i(h, keys.skeyid, gxi, gxr, cki, ckr, sa[4:], idi)
    send(True, 5, 2, 0, _payload(8, idi) + _payload(0, hi), True)
    hr = C.hash_r(h, keys.skeyid, gxi, gxr, cki, ckr, sa[4:], idr)
    send(False, 5, 2, 0, _payload(8, idr) + _payload(0, hr), True)
    mid, qni, qnr = 0x5EED0001, C.random_nonce(), C.random_nonce()
    qsa = _sa(10, 3, bytes.fromhex("c0ffee01"), 12, _tv(1, 1) + _tv(4, 1) + _tv(5, 2) + _tv(6, 128))
    rest1, rest2 = qsa + _payload(0, qni), qsa + _payload(0, qnr)
    send(True, 8, 32, mid, _payload(1, C.qm_hash1(h, keys.skeyid_a, mid, rest1)) + rest1, True)
    send(False, 8, 32, mid, _payload(1, C.qm_hash2(h, keys.skeyid_a, mid, qni, rest2)) + rest2, True)
    send(True, 8, 32, mid, _payload(0, C.qm_hash3(h, keys.skeyid_a, mid, qni, qnr)), True)
    imid = 0x0BADCAFE
    dpd = _payload(0, struct.pack("!IBBH", 1, 1, 16, 36136) + cki + ckr + struct.pack("!I", 77))  # R-U-THERE
    send(False, 8, 5, imid, _payload(11, C.informational_hash(h, keys.skeyid_a, imid, dpd)) + dpd, True)
    wrpcap(str(path), pkts)
    return cki, key, qni, qnr


def _tshark_fields(pcap, cookie: bytes, key: bytes) -> list[list[str]]:
    import subprocess

    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-o", f"uat:ikev1_decryption_table:{cookie.hex()},{key.hex()}",
         "-T", "fields", "-e", "isakmp.id.data.ipv4_addr", "-e", "isakmp.nonce",
         "-e", "isakmp.notify.data.dpd.are_you_there"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return [line.split("\t") for line in out.splitlines()]


@pytest.mark.parametrize("h,cipher,keybits,group_no", [
    ("sha1", "aes-cbc", 128, 14), ("sha256", "aes-cbc", 256, 19), ("md5", "aes-cbc", 192, 5),
    ("sha1", "3des-cbc", 192, 20),
])
def test_tshark_decrypts_our_main_mode_quick_mode_and_informational(tmp_path, h, cipher, keybits, group_no):
    """Wireshark derives every IV on its own from the KE payloads and message IDs (Appendix B);
    it reads our IDs, Quick Mode nonces and DPD sequence number only if each IV is right."""

    need_tools("tshark")
    pcap = tmp_path / "ike.pcap"
    cookie, key, qni, qnr = _exchange_pcap(pcap, h, cipher, keybits, group_no)
    rows = _tshark_fields(pcap, cookie, key)
    assert [r[0] for r in rows[4:6]] == ["10.1.2.3", "10.9.8.7"]  # MM5, MM6: phase-1 IV and chain
    assert [r[1] for r in rows[6:8]] == [qni.hex(), qnr.hex()]  # QM1, QM2: hash(last block | M-ID), chain
    assert rows[9][2] == "77"  # informational: its own M-ID from the phase-1 block
    # control: with a wrong key tshark reads none of it
    wrong = bytes([key[0] ^ 2]) + key[1:]  # not bit 0: that is a DES parity bit, ignored
    rows = _tshark_fields(pcap, cookie, wrong)
    assert "10.1.2.3" not in rows[4] and qni.hex() not in rows[6][1] and rows[9][2] != "77"
