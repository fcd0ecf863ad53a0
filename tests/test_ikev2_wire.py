"""The IKEv2 wire codec and the Encrypted payload: round trips, the errors it answers with,
and a hypothesis fuzz (any bytes: parsed or refused with IKEv2Error, nothing else)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narsuite.ike.crypto import CryptoError
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire
from narsuite.ike.v2.wire import IKEv2Error

SPI_I, SPI_R = bytes.fromhex("0102030405060708"), bytes.fromhex("1112131415161718")

SAMPLE = [
    wire.SA((wire.Proposal(1, C.PROTO_IKE, b"", (
        wire.Transform(C.TRANS_ENCR, C.ENCR_AES_CBC, 256), wire.Transform(C.TRANS_PRF, C.PRF_HMAC_SHA2_256),
        wire.Transform(C.TRANS_INTEG, C.AUTH_HMAC_SHA2_256_128), wire.Transform(C.TRANS_DH, 19))),
        wire.Proposal(2, C.PROTO_ESP, b"\x01\x02\x03\x04", (
            wire.Transform(C.TRANS_ENCR, C.ENCR_AES_GCM_16, 128), wire.Transform(C.TRANS_ESN, 0))))),
    wire.KE(19, b"\x42" * 64),
    wire.Nonce(b"n" * 32),
    wire.Notify(C.NAT_DETECTION_SOURCE_IP, b"h" * 20),
    wire.Notify(C.REKEY_SA, b"", C.PROTO_ESP, b"\xaa\xbb\xcc\xdd"),
    wire.IDi(C.ID_FQDN, b"client.example"),
    wire.IDr(C.ID_IPV4_ADDR, b"\xc0\x00\x02\x01"),
    wire.Auth(C.AUTH_SHARED_KEY, b"a" * 32),
    wire.Cert(C.CERT_X509_SIGNATURE, b"\x30\x00"),
    wire.CertReq(C.CERT_X509_SIGNATURE, b"k" * 20),
    wire.CP(C.CFG_REQUEST, (wire.CfgAttribute(C.INTERNAL_IP4_ADDRESS), wire.CfgAttribute(C.INTERNAL_IP4_DNS))),
    wire.TSi((wire.ts_range("10.8.0.2/32"),)),
    wire.TSr((wire.ts_range("10.1.0.0/24"), wire.ts_range("0.0.0.0/0", 6, 80, 80))),
    wire.Delete(C.PROTO_ESP, (b"\x00\x00\x10\x00", b"\x00\x00\x20\x00")),
    wire.Delete(C.PROTO_IKE),
    wire.VendorID(b"strongSwan"),
    wire.EAP(bytes([C.EAP_REQUEST, 7, 0, 5, C.EAP_IDENTITY])),
    wire.Unknown(200, b"private"),
]


def test_every_payload_round_trips():
    h = wire.Header(SPI_I, SPI_R, C.IKE_SA_INIT, C.FLAG_INITIATOR, 0)
    data = wire.build_message(h, SAMPLE)
    h2, payloads = wire.parse_message(data)
    assert payloads == tuple(SAMPLE)
    assert (h2.spi_i, h2.spi_r, h2.exchange, h2.flags, h2.version, h2.length) == (
        SPI_I, SPI_R, C.IKE_SA_INIT, C.FLAG_INITIATOR, 0x20, len(data))
    assert h2.initiator and not h2.response


def test_ikev1_header_is_invalid_major_version():
    data = SPI_I + SPI_R + bytes([0, 0x10, 2, 0]) + struct.pack("!II", 0, 28)
    with pytest.raises(IKEv2Error) as e:
        wire.parse_header(data)
    assert e.value.notify == C.INVALID_MAJOR_VERSION


def test_unknown_critical_payload_is_refused_with_its_type():
    chain = struct.pack("!BBH", 0, 0x80, 6) + b"xy"
    with pytest.raises(IKEv2Error) as e:
        wire.parse_payloads(201, chain)
    assert e.value.notify == C.UNSUPPORTED_CRITICAL_PAYLOAD and e.value.data == bytes([201])
    assert wire.parse_payloads(201, struct.pack("!BBH", 0, 0, 6) + b"xy") == (wire.Unknown(201, b"xy"),)


@pytest.mark.parametrize("bad", [
    struct.pack("!BBH", 0, 0, 3),  # length below the generic header
    struct.pack("!BBH", 0, 0, 9) + b"abc",  # overruns
    struct.pack("!BBH", 0, 0, 8) + struct.pack("!BBBB", 0, 0, 0, 0),  # SA: proposal truncated
])
def test_malformed_chains_are_invalid_syntax(bad):
    with pytest.raises(IKEv2Error) as e:
        wire.parse_payloads(C.PT_SA, bad)
    assert e.value.notify == C.INVALID_SYNTAX


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.sampled_from(sorted(C.PAYLOAD_NAMES) + [0, 1, 99, 200]))
def test_fuzz_payload_chain_only_raises_ikev2error(data, first):
    try:
        wire.parse_payloads(first, data)
    except IKEv2Error:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(SAMPLE), min_size=1, max_size=8), st.data())
def test_fuzz_mutated_messages_only_raise_ikev2error(payloads, data):
    msg = bytearray(wire.build_message(wire.Header(SPI_I, SPI_R, C.IKE_AUTH, 0, 1), payloads))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(msg) - 1))
        msg[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(msg)))
    try:
        wire.parse_message(bytes(msg[:cut]))
    except IKEv2Error:
        pass


@given(st.lists(st.sampled_from(SAMPLE), max_size=10))
def test_fuzz_round_trip(payloads):
    assert wire.parse_payloads(payloads[0].payload_type if payloads else 0, wire.build_payloads(payloads)) \
        == tuple(payloads)


# ------------------------------------------------------------------------------ keys
@pytest.mark.parametrize("encr, key_len, integ", [(C.ENCR_AES_CBC, 16, C.AUTH_HMAC_SHA2_256_128),
                                                  (C.ENCR_AES_CBC, 32, C.AUTH_HMAC_SHA2_512_256),
                                                  (C.ENCR_AES_GCM_16, 20, 0), (C.ENCR_AES_GCM_16, 36, 0)])
def test_encrypted_payload_round_trip_and_tamper(encr, key_len, integ):
    ik = b"i" * (keys.INTEGS[integ][1] if integ else 0)
    cipher = keys.SKCipher(encr, b"k" * key_len, integ, ik)
    h = wire.Header(SPI_I, SPI_R, C.IKE_AUTH, C.FLAG_INITIATOR, 1)
    inner = [wire.IDi(C.ID_FQDN, b"x.example"), wire.Auth(C.AUTH_SHARED_KEY, b"a" * 32)]
    msg = keys.seal(h, inner, cipher)
    h2, outer = wire.parse_message(msg)
    (sk,) = outer
    assert isinstance(sk, wire.SK) and sk.first == C.PT_IDI
    assert wire.parse_payloads(sk.first, keys.open_encrypted(msg, h2.length, sk, cipher)) == tuple(inner)
    for pos in (5, 40, len(msg) - 1):  # header (authenticated), IV/ciphertext, ICV
        bad = bytearray(msg)
        bad[pos] ^= 1
        with pytest.raises(CryptoError):
            keys.open_encrypted(bytes(bad), h2.length, wire.parse_message(bytes(bad))[1][0], cipher)


def test_fragments_reassemble():
    cipher = keys.SKCipher(C.ENCR_AES_CBC, b"k" * 16, C.AUTH_HMAC_SHA2_256_128, b"i" * 32)
    h = wire.Header(SPI_I, SPI_R, C.IKE_AUTH, C.FLAG_RESPONSE, 1)
    inner = [wire.Cert(C.CERT_X509_SIGNATURE, bytes(range(256)) * 12), wire.Auth(14, b"s" * 300)]
    frags = keys.seal_fragments(h, inner, cipher, 500)
    assert len(frags) > 3 and all(len(f) < 600 for f in frags)
    plain = b""
    first = 0
    for f in frags:
        h2, (skf,) = wire.parse_message(f)
        assert isinstance(skf, wire.SKF) and skf.total == len(frags)
        first = first or skf.first
        plain += keys.open_encrypted(f, h2.length, skf, cipher)
    assert wire.parse_payloads(first, plain) == tuple(inner)


def test_prf_plus_is_the_rfc_iteration():
    import hmac
    k, s = b"key", b"seed"
    t1 = hmac.digest(k, s + b"\x01", "sha256")
    t2 = hmac.digest(k, t1 + s + b"\x02", "sha256")
    t3 = hmac.digest(k, t2 + s + b"\x03", "sha256")
    assert keys.prf_plus("sha256", k, s, 80) == (t1 + t2 + t3)[:80]


def test_curve25519_agrees_and_refuses_low_order_points():
    g = keys.group(31)
    a, pa = g.generate()
    b, pb = g.generate()
    assert g.shared(a, pb) == g.shared(b, pa) and len(pa) == 32
    with pytest.raises(CryptoError):
        g.shared(a, b"\0" * 32)
    with pytest.raises(CryptoError):
        g.shared(a, b"\1" * 31)
