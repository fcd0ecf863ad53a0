"""IKEv1 certificate authentication (narsuite.ike.certs) against a generated PKI and OpenSSL.

The PKI comes from ``narsuite.lab.pki`` (one per module: RSA key generation is the slow part).
The signature format is checked against an independent implementation, OpenSSL's command line:
``pkeyutl -sign -pkeyopt rsa_padding_mode:pkcs1`` over the raw hash must give exactly our bytes
(PKCS#1 v1.5 signing is deterministic) and ``pkeyutl -verifyrecover`` must recover the hash from
ours; the expected PKCS#1 block is also rebuilt here by hand from the RFC 8017 §9.2 layout.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from hypothesis import given, settings
from hypothesis import strategies as st

from narsuite.ike import certs, isakmp
from narsuite.ike import constants as C
from narsuite.lab import pki as labpki
from narsuite.lab.pytest_plugin import need_tools

DER = serialization.Encoding.DER
UTC = datetime.UTC


def der(c: x509.Certificate) -> bytes:
    return c.public_bytes(DER)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> labpki.LabPKI:
    return labpki.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def trust(lab) -> certs.Trust:
    return certs.Trust.load(lab.trust_dir)


@pytest.fixture(scope="module")
def gw(lab) -> certs.Credentials:
    return certs.Credentials.load(lab.gateway.cert_path, lab.gateway.key_path)


# ---------------------------------------------------------------------------------------------
# chain verification


def test_chain_ok_gateway_and_clients_without_eku(lab, trust):
    assert trust.verify([der(lab.gateway.cert)]) == lab.gateway.cert
    for ident in lab.clients.values():
        # client certificates carry no extendedKeyUsage at all: must still pass
        with pytest.raises(x509.ExtensionNotFound):
            ident.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert trust.verify([der(ident.cert)]) == ident.cert


def test_chain_with_intermediate_any_order(lab, trust):
    assert trust.verify([der(lab.chained.cert), der(lab.intermediate_cert)]) == lab.chained.cert
    payloads = [isakmp.Certificate(C.CERT_X509_SIGNATURE, der(lab.intermediate_cert)),
                isakmp.Certificate(C.CERT_X509_SIGNATURE, der(lab.chained.cert))]
    chain = certs.peer_chain(payloads)
    assert chain[0] == der(lab.chained.cert)
    assert trust.verify(chain) == lab.chained.cert


def test_chain_missing_intermediate_is_untrusted(lab, trust):
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(lab.chained.cert)])
    assert ei.value.kind == "untrusted"
    assert "carol@example.net" in ei.value.reason


def test_expired(lab, trust):
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(lab.expired.cert)])
    e = ei.value
    assert (e.kind, e.notify) == ("expired", C.INVALID_CERTIFICATE)
    assert "expired@example.net" in e.reason and "expired" in e.reason


def test_now_parameter(lab, trust):
    inside = lab.expired.cert.not_valid_before_utc + datetime.timedelta(days=2)
    assert trust.verify([der(lab.expired.cert)], now=inside) == lab.expired.cert
    # an aware datetime in another zone means the same instant
    tz = datetime.timezone(datetime.timedelta(hours=-11))
    assert trust.verify([der(lab.expired.cert)], now=inside.astimezone(tz)) == lab.expired.cert
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(lab.gateway.cert)], now=datetime.datetime.now(UTC) + datetime.timedelta(days=400))
    assert ei.value.kind == "expired"
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(lab.gateway.cert)], now=lab.gateway.cert.not_valid_before_utc - datetime.timedelta(hours=1))
    assert ei.value.kind == "not-yet-valid"


def test_untrusted_ca(lab, trust):
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(lab.untrusted.cert)])
    e = ei.value
    assert (e.kind, e.notify) == ("untrusted", C.INVALID_CERT_AUTHORITY)
    assert "mallory@example.net" in e.reason
    # sending the rogue CA along does not help: it is not a trust anchor
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(lab.untrusted.cert), der(lab.untrusted_ca_cert)])
    assert ei.value.kind == "untrusted"


def test_wrong_issuer_same_name_other_key(lab, trust):
    """A CA impostor with the trusted CA's exact name: its certificates must not pass."""
    fake_key = labpki.new_key()
    fake_ca = labpki.make_ca(lab.ca_cert.subject, fake_key)
    leaf = labpki.issue(labpki.name("eve@example.net"), labpki.new_key(), fake_ca, fake_key,
                        ids=("eve@example.net",))
    assert leaf.issuer == lab.ca_cert.subject
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(leaf)])
    assert ei.value.kind in ("bad-signature", "untrusted")
    # without the AKID hint OpenSSL reaches the real CA's key and the signature itself fails
    b = (x509.CertificateBuilder().subject_name(labpki.name("eve2@example.net")).issuer_name(lab.ca_cert.subject)
         .public_key(labpki.new_key().public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(datetime.datetime.now(UTC) - datetime.timedelta(days=1))
         .not_valid_after(datetime.datetime.now(UTC) + datetime.timedelta(days=1)))
    forged = b.sign(fake_key, hashes.SHA256())
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(forged)])
    assert ei.value.kind == "bad-signature"
    assert "wrong or forged issuer" in ei.value.reason


def test_intermediate_that_is_not_a_ca(lab, trust):
    k = labpki.new_key()
    not_ca = labpki.make_ca(labpki.name("not a CA"), k, issuer=lab.ca_cert, issuer_key=lab.ca_key, ca=False)
    leaf = labpki.issue(labpki.name("dave@example.net"), labpki.new_key(), not_ca, k, ids=("dave@example.net",))
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(leaf), der(not_ca)])
    assert ei.value.kind == "not-a-ca"
    assert "not a CA" in ei.value.reason


def test_end_entity_key_usage_rfc4945(lab, trust):
    encipher_only = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=True, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
    bad = labpki.issue(labpki.name("ku@example.net"), labpki.new_key(), lab.ca_cert, lab.ca_key,
                       key_usage=encipher_only)
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(bad)])
    assert ei.value.kind == "key-usage"
    none = labpki.issue(labpki.name("noku@example.net"), labpki.new_key(), lab.ca_cert, lab.ca_key, key_usage=False)
    assert trust.verify([der(none)]) == none


def test_malformed_empty_and_too_many(lab, trust):
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([b"\x30\x03\x02\x01\x00"])
    assert (ei.value.kind, ei.value.notify) == ("malformed", C.INVALID_CERTIFICATE)
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([])
    assert ei.value.kind == "unavailable"
    with pytest.raises(certs.CertificateError) as ei:
        trust.verify([der(lab.gateway.cert)] * (certs.MAX_PEER_CERTS + 1))
    assert ei.value.kind == "too-many"


def test_trust_load_errors_and_forms(lab, tmp_path):
    with pytest.raises(certs.CredentialsError, match="no CA certificates found"):
        certs.Trust.load(tmp_path)
    (tmp_path / "ca.der").write_bytes(der(lab.ca_cert))
    both = tmp_path / "both.pem"
    labpki.write_cert(both, lab.ca_cert, lab.intermediate_cert)
    (tmp_path / ".hidden").write_bytes(b"junk")
    t = certs.Trust.load(tmp_path)
    assert len(t.cas) == 3 and len(t.authorities()) == 2
    assert t.ca_subjects_der() == t.authorities()
    # a config's tuple of paths, as the ike service passes it
    assert certs.Trust.load((lab.ca_path, lab.intermediate_path)).cas == (lab.ca_cert, lab.intermediate_cert)
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(certs.CredentialsError, match="junk.pem"):
        certs.Trust.load(tmp_path)
    with pytest.raises(certs.CredentialsError, match="nope.pem"):
        certs.Trust.load(tmp_path / "nope.pem")


# ---------------------------------------------------------------------------------------------
# received CERT payloads


def test_peer_chain_selection_and_errors(lab):
    crl = isakmp.Certificate(C.CERT_CRL, b"whatever")
    with pytest.raises(certs.CertificateError) as ei:
        certs.peer_chain([isakmp.Nonce(b"x" * 16)])
    assert (ei.value.kind, ei.value.notify) == ("unavailable", C.CERTIFICATE_UNAVAILABLE)
    with pytest.raises(certs.CertificateError) as ei:
        certs.peer_chain([crl])
    assert (ei.value.kind, ei.value.notify) == ("unsupported-encoding", C.CERT_TYPE_UNSUPPORTED)
    with pytest.raises(certs.CertificateError) as ei:
        certs.peer_chain([isakmp.Certificate(C.CERT_X509_SIGNATURE, b"\x01\x02")])
    assert ei.value.kind == "malformed"
    one = isakmp.Certificate(C.CERT_X509_SIGNATURE, der(lab.gateway.cert))
    assert certs.peer_chain([crl, one]) == [der(lab.gateway.cert)]
    # the CA sent first, the end-entity second: still end-entity first
    ca_first = [isakmp.Certificate(C.CERT_X509_SIGNATURE, der(lab.ca_cert)), one]
    assert certs.peer_chain(ca_first)[0] == der(lab.gateway.cert)


def test_cert_payloads_round_trip_through_codec(lab, trust):
    cred = certs.Credentials.load(lab.chained.cert_path, lab.chained.key_path, [lab.intermediate_path])
    ps = cred.cert_payloads()
    assert [p.encoding for p in ps] == [C.CERT_X509_SIGNATURE] * 2
    assert ps[0].data == der(lab.chained.cert) and ps[1].data == der(lab.intermediate_cert)
    assert cred.cert_payloads(intermediates=False) == ps[:1]
    parsed = isakmp.parse_payloads(C.PT_CERT, isakmp.build_payloads(ps))
    assert trust.verify(certs.peer_chain(parsed)) == lab.chained.cert


# ---------------------------------------------------------------------------------------------
# identities


def _tlv(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([tag, len(body)]) + body


def _dn(*rdns: tuple[str, int, bytes]) -> bytes:
    """A DER Name by hand: (dotted OID of a 2.5.4.x attribute, string tag, value) per RDN."""
    out = b""
    for oid, tag, value in rdns:
        arc = int(oid.rsplit(".", 1)[1])
        out += _tlv(0x31, _tlv(0x30, _tlv(0x06, bytes([0x55, 0x04, arc])) + _tlv(tag, value)))
    return _tlv(0x30, out)


def test_match_id_dn(lab):
    cert = lab.gateway.cert
    assert certs.match_id(cert, C.ID_DER_ASN1_DN, cert.subject.public_bytes())
    assert certs.default_id(cert) == isakmp.Identification(C.ID_DER_ASN1_DN, cert.subject.public_bytes())
    # semantically equal: other case, other string type, extra inner whitespace
    # (C is a PrintableString, O and CN UTF8String in the certificate)
    assert cert.subject.public_bytes() == _dn(("2.5.4.6", 0x13, b"CH"), ("2.5.4.10", 0x0C, b"narsuite lab"),
                                              ("2.5.4.3", 0x0C, b"gw.example.net"))
    same = _dn(("2.5.4.6", 0x13, b"ch"), ("2.5.4.10", 0x13, b"NARSUITE   lab"),
               ("2.5.4.3", 0x1E, "GW.example.net".encode("utf-16-be")))
    assert same != cert.subject.public_bytes()
    assert certs.match_id(cert, C.ID_DER_ASN1_DN, same)
    assert certs.names_equal(cert.subject, same)
    assert not certs.match_id(cert, C.ID_DER_ASN1_DN, _dn(("2.5.4.6", 0x13, b"CH"), ("2.5.4.10", 0x0C, b"narsuite"),
                                                          ("2.5.4.3", 0x0C, b"gw.example.net")))
    other = labpki.name("gw2.example.net")
    assert not certs.match_id(cert, C.ID_DER_ASN1_DN, other.public_bytes())
    reordered = x509.Name(list(reversed(list(cert.subject))))
    assert not certs.match_id(cert, C.ID_DER_ASN1_DN, reordered.public_bytes())
    shorter = x509.Name(list(cert.subject)[:2])
    assert not certs.match_id(cert, C.ID_DER_ASN1_DN, shorter.public_bytes())
    for junk in (b"", b"\x30", b"\x30\x00\x00", b"gw.example.net", cert.subject.public_bytes() + b"\x00"):
        assert not certs.match_id(cert, C.ID_DER_ASN1_DN, junk)


def test_match_id_fqdn(lab):
    cert = lab.gateway.cert
    assert certs.match_id(cert, C.ID_FQDN, b"gw.example.net")
    assert certs.match_id(cert, C.ID_FQDN, b"GW.Example.NET")
    assert not certs.match_id(cert, C.ID_FQDN, b"other.example.net")
    assert not certs.match_id(cert, C.ID_FQDN, b"example.net")
    assert not certs.match_id(cert, C.ID_FQDN, b"gw.example.net\xff")
    assert not certs.match_id(cert, C.ID_FQDN, b"")
    assert not certs.match_id(cert, C.ID_FQDN, b"198.51.100.1")
    # the CN alone is not an FQDN identity; a client with only an email SAN has none
    alice = lab.clients["alice@example.net"].cert
    assert not certs.match_id(alice, C.ID_FQDN, b"alice@example.net")
    bob = lab.clients["bob.example.net"].cert
    assert certs.match_id(bob, C.ID_FQDN, b"bob.example.net")
    nosan = labpki.issue(labpki.name("cn-only.example.net"), labpki.new_key(), lab.ca_cert, lab.ca_key)
    assert not certs.match_id(nosan, C.ID_FQDN, b"cn-only.example.net")
    wild = labpki.issue(labpki.name("wild"), labpki.new_key(), lab.ca_cert, lab.ca_key, ids=("*.vpn.example.net",))
    assert certs.match_id(wild, C.ID_FQDN, b"a.vpn.example.net")
    assert not certs.match_id(wild, C.ID_FQDN, b"a.b.vpn.example.net")


def test_match_id_ip(lab):
    cert = lab.gateway.cert
    assert certs.match_id(cert, C.ID_IPV4_ADDR, bytes([198, 51, 100, 1]))
    assert not certs.match_id(cert, C.ID_IPV4_ADDR, bytes([198, 51, 100, 2]))
    assert not certs.match_id(cert, C.ID_IPV4_ADDR, bytes([198, 51, 100]))
    assert not certs.match_id(cert, C.ID_IPV4_ADDR, b"198.51.100.1")
    assert not certs.match_id(lab.clients["alice@example.net"].cert, C.ID_IPV4_ADDR, bytes([198, 51, 100, 1]))
    v6 = labpki.issue(labpki.name("v6"), labpki.new_key(), lab.ca_cert, lab.ca_key, ids=("2001:db8::1",))
    assert certs.match_id(v6, C.ID_IPV6_ADDR, ipaddress.IPv6Address("2001:db8::1").packed)
    assert not certs.match_id(v6, C.ID_IPV6_ADDR, ipaddress.IPv6Address("2001:db8::2").packed)
    assert not certs.match_id(v6, C.ID_IPV4_ADDR, bytes(4))
    # a subnet ID never matches a certificate, even one covering the address
    assert not certs.match_id(cert, C.ID_IPV4_ADDR_SUBNET, bytes([198, 51, 100, 1, 255, 255, 255, 255]))


def test_match_id_user_fqdn(lab):
    alice = lab.clients["alice@example.net"].cert
    assert certs.match_id(alice, C.ID_USER_FQDN, b"alice@example.net")
    assert certs.match_id(alice, C.ID_USER_FQDN, b"Alice@Example.NET")
    assert not certs.match_id(alice, C.ID_USER_FQDN, b"bob@example.net")
    assert not certs.match_id(alice, C.ID_USER_FQDN, b"alice@example.net.evil")
    assert not certs.match_id(alice, C.ID_USER_FQDN, b"\xe4lice@example.net")
    assert not certs.match_id(lab.gateway.cert, C.ID_USER_FQDN, b"gw.example.net")
    # and alice's subject DN, strongSwan's default ID for her, matches too
    assert certs.match_id(alice, C.ID_DER_ASN1_DN, alice.subject.public_bytes())


def test_match_id_key_id_and_others(lab):
    cert = lab.gateway.cert
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert certs.match_id(cert, C.ID_KEY_ID, ski)
    assert not certs.match_id(cert, C.ID_KEY_ID, bytes(20))
    for t in (C.ID_IPV4_ADDR_RANGE, C.ID_IPV6_ADDR_SUBNET, C.ID_DER_ASN1_GN, 200):
        assert not certs.match_id(cert, t, cert.subject.public_bytes())


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=80))
def test_match_id_never_raises(id_type, data):
    cert = _HYP_CERT
    assert certs.match_id(cert, id_type, data) in (True, False)


_HYP_KEY = ec.generate_private_key(ec.SECP256R1())
_HYP_CERT = (x509.CertificateBuilder().subject_name(labpki.name("h")).issuer_name(labpki.name("h"))
             .public_key(_HYP_KEY.public_key()).serial_number(1)
             .not_valid_before(datetime.datetime(2020, 1, 1)).not_valid_after(datetime.datetime(2040, 1, 1))
             .add_extension(x509.SubjectAlternativeName([x509.DNSName("h.example"), x509.RFC822Name("h@x")]),
                            critical=False)
             .sign(_HYP_KEY, hashes.SHA256()))


def test_our_id(gw, lab):
    assert gw.our_id() == certs.default_id(lab.gateway.cert)
    assert gw.our_id("fqdn") == isakmp.Identification(C.ID_FQDN, b"gw.example.net")
    assert gw.our_id("ipv4") == isakmp.Identification(C.ID_IPV4_ADDR, bytes([198, 51, 100, 1]))
    assert gw.our_id("ipv4", "198.51.100.1") == gw.our_id("ipv4")
    assert gw.our_id("dn", "C=CH, O=narsuite lab, CN=gw.example.net") == gw.our_id()
    with pytest.raises(certs.CredentialsError, match="no email"):
        gw.our_id("email")
    with pytest.raises(certs.CredentialsError, match="no ipv6"):
        gw.our_id("ipv6")
    with pytest.raises(certs.CredentialsError, match="not in certificate"):
        gw.our_id("fqdn", "other.example.net")
    with pytest.raises(ValueError):
        gw.our_id("keyid")
    alice = certs.Credentials.load(lab.clients["alice@example.net"].cert_path,
                                   lab.clients["alice@example.net"].key_path)
    assert alice.our_id("email") == isakmp.Identification(C.ID_USER_FQDN, b"alice@example.net")


# ---------------------------------------------------------------------------------------------
# credentials


def test_credentials_load_errors(lab, tmp_path):
    g = lab.gateway
    with pytest.raises(certs.CredentialsError, match="missing.pem"):
        certs.Credentials.load(tmp_path / "missing.pem", g.key_path)
    with pytest.raises(certs.CredentialsError, match="missing.key"):
        certs.Credentials.load(g.cert_path, tmp_path / "missing.key")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a certificate")
    with pytest.raises(certs.CredentialsError, match="junk.pem"):
        certs.Credentials.load(junk, g.key_path)
    with pytest.raises(certs.CredentialsError, match="junk.pem"):
        certs.Credentials.load(g.cert_path, junk)
    with pytest.raises(certs.CredentialsError, match="does not belong") as ei:
        certs.Credentials.load(g.cert_path, lab.clients["alice@example.net"].key_path)
    assert str(lab.clients["alice@example.net"].key_path) in str(ei.value)


def test_credentials_key_forms(lab, tmp_path):
    k = lab.gateway.key
    pkcs1 = labpki.write_key(tmp_path / "rsa.pem", k, "pkcs1")
    assert pkcs1.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert oct(pkcs1.stat().st_mode & 0o777) == "0o600"
    assert certs.Credentials.load(lab.gateway.cert_path, pkcs1).key.private_numbers() == k.private_numbers()
    enc = tmp_path / "enc.pem"
    enc.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(b"s3cret")))
    assert certs.Credentials.load(lab.gateway.cert_path, enc, password=b"s3cret").auth_method == C.AUTH_RSA_SIG
    with pytest.raises(certs.CredentialsError, match="enc.pem"):
        certs.Credentials.load(lab.gateway.cert_path, enc)
    dkey = tmp_path / "key.der"
    dkey.write_bytes(k.private_bytes(DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    dcert = tmp_path / "cert.der"
    dcert.write_bytes(der(lab.gateway.cert))
    assert certs.Credentials.load(dcert, dkey).certificate == lab.gateway.cert
    # certificate file followed by its intermediate
    bundle = labpki.write_cert(tmp_path / "bundle.pem", lab.chained.cert, lab.intermediate_cert)
    cred = certs.Credentials.load(bundle, lab.chained.key_path)
    assert cred.intermediates == (lab.intermediate_cert,)
    assert "key" not in repr(cred).replace("Key", "")
    assert cred.private_key is cred.key


# ---------------------------------------------------------------------------------------------
# certificate requests


def test_cert_requests_and_satisfies(lab, trust, gw):
    crs = trust.cert_requests()
    assert crs == [isakmp.CertificateRequest(C.CERT_X509_SIGNATURE, lab.ca_cert.subject.public_bytes())]
    # CR payloads survive the codec
    assert isakmp.parse_payloads(C.PT_CR, isakmp.build_payloads(crs)) == tuple(crs)
    assert gw.satisfies(crs)
    assert gw.satisfies([])
    assert gw.satisfies([isakmp.CertificateRequest(C.CERT_X509_SIGNATURE)])  # any CA
    assert gw.satisfies([isakmp.CertificateRequest(C.CERT_PKCS7, b"zzz")])  # no X.509 CR: no preference
    rogue_cr = [isakmp.CertificateRequest(C.CERT_X509_SIGNATURE, lab.untrusted_ca_cert.subject.public_bytes())]
    assert not gw.satisfies(rogue_cr)
    assert gw.satisfies(rogue_cr + crs)
    # a CR whose DN differs only in case/encoding still selects us
    loud = x509.Name([x509.NameAttribute(a.oid, a.value.upper()) for a in lab.ca_cert.subject])
    assert gw.satisfies([isakmp.CertificateRequest(C.CERT_X509_SIGNATURE, loud.public_bytes())])
    # chained: satisfies a CR for the root (through its intermediate) and for the intermediate
    chained = certs.Credentials.load(lab.chained.cert_path, lab.chained.key_path, [lab.intermediate_path])
    assert chained.satisfies(crs)
    assert chained.satisfies([isakmp.CertificateRequest(C.CERT_X509_SIGNATURE,
                                                        lab.intermediate_cert.subject.public_bytes())])
    mallory = certs.Credentials.load(lab.untrusted.cert_path, lab.untrusted.key_path)
    assert certs.select_credentials([mallory, gw], crs) is gw
    assert certs.select_credentials([mallory, gw], rogue_cr) is mallory
    assert certs.select_credentials([gw], [isakmp.CertificateRequest(C.CERT_X509_SIGNATURE, b"\x30\x00")]) is None


# ---------------------------------------------------------------------------------------------
# signatures


HASH_LENGTHS = (16, 20, 32, 48, 64)


def pkcs1_null_block(h: bytes, k: int) -> bytes:
    """RFC 8017 §9.2 step 5 with T = H (no DigestInfo), written out independently."""
    return bytes([0, 1]) + bytes([0xFF]) * (k - len(h) - 3) + bytes([0]) + h


@pytest.mark.parametrize("n", HASH_LENGTHS)
def test_rsa_sign_verify_round_trip(gw, n):
    h = os.urandom(n)
    sig = gw.sign(h)
    pub = gw.certificate.public_key()
    assert len(sig) == 256
    assert certs.verify_signature(pub, h, sig)
    assert sig == gw.sign(h)  # deterministic
    # the decoded block is exactly 00 01 FF.. 00 || hash
    n_, e = pub.public_numbers().n, pub.public_numbers().e
    assert pow(int.from_bytes(sig, "big"), e, n_).to_bytes(256, "big") == pkcs1_null_block(h, 256)
    assert not certs.verify_signature(pub, h[:-1] + bytes([h[-1] ^ 1]), sig)
    assert not certs.verify_signature(pub, h + b"\x00", sig)
    assert not certs.verify_signature(pub, h, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not certs.verify_signature(pub, h, sig[1:])
    assert not certs.verify_signature(pub, h, b"\x00" + sig)


def test_rsa_rejects_digestinfo_and_other_keys(gw, lab):
    h = os.urandom(32)
    pub = gw.certificate.public_key()
    # the TLS/X.509 form: DigestInfo(SHA-256) || hash -- not what IKEv1 signs
    with_di = gw.key.sign(h, padding.PKCS1v15(), asym_utils.Prehashed(hashes.SHA256()))
    assert not certs.verify_signature(pub, h, with_di)
    assert not certs.verify_signature(lab.clients["alice@example.net"].cert.public_key(), h, gw.sign(h))
    n = pub.public_numbers().n
    assert not certs.verify_signature(pub, h, n.to_bytes(256, "big"))  # s >= n
    assert not certs.verify_signature(pub, os.urandom(250), gw.sign(h))  # hash longer than k-11
    with pytest.raises(ValueError):
        gw.sign(os.urandom(250))
    with pytest.raises(TypeError):
        certs.sign(object(), h)  # type: ignore[arg-type]
    assert not certs.verify_signature(object(), h, b"")  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=80))
def test_verify_never_raises(sig, h):
    assert certs.verify_signature(_HYP_RSA_PUB, h, sig) is False
    assert certs.verify_signature(_HYP_KEY.public_key(), h, sig) is False


_HYP_RSA_PUB = labpki.new_key(1024).public_key()


def test_raw_fallback_matches_openssl(gw, lab, monkeypatch):
    """The cryptography < 47 path (hand-made RSA with blinding) gives the same bytes."""
    if not certs.HAVE_NO_DIGEST_INFO:
        pytest.skip("cryptography < 47: the OpenSSL comparison is test_rsa_signature_is_openssl_pkeyutl_pkcs1")
    for key in (gw.key, lab.clients["alice@example.net"].key, labpki.new_key(1024), labpki.new_key(3072)):
        for n in (20, 32, 64):
            h = os.urandom(n)
            assert certs._rsa_sign_raw(key, h) == key.sign(h, padding.PKCS1v15(), asym_utils.NoDigestInfo())
    monkeypatch.setattr(certs, "HAVE_NO_DIGEST_INFO", False)
    h = os.urandom(20)
    sig = certs.sign(gw.key, h)
    assert certs.verify_signature(gw.certificate.public_key(), h, sig)
    assert not certs.verify_signature(gw.certificate.public_key(), os.urandom(20), sig)


@pytest.fixture
def _openssl_command() -> None:
    need_tools("openssl")


openssl = pytest.mark.usefixtures("_openssl_command")


def _run(*args: str | Path) -> bytes:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=30).stdout


@openssl
@pytest.mark.parametrize("n", (16, 20, 32, 48, 64))
def test_rsa_signature_is_openssl_pkeyutl_pkcs1(gw, lab, tmp_path, n):
    h = os.urandom(n)
    (tmp_path / "hash").write_bytes(h)
    ours = gw.sign(h)
    (tmp_path / "sig").write_bytes(ours)
    theirs = _run("openssl", "pkeyutl", "-sign", "-inkey", lab.gateway.key_path,
                  "-pkeyopt", "rsa_padding_mode:pkcs1", "-in", tmp_path / "hash")
    assert theirs == ours
    pub = tmp_path / "pub.pem"
    pub.write_bytes(gw.certificate.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    recovered = _run("openssl", "pkeyutl", "-verifyrecover", "-pubin", "-inkey", pub,
                     "-pkeyopt", "rsa_padding_mode:pkcs1", "-in", tmp_path / "sig")
    assert recovered == h
    # and straight from the certificate, as a peer would
    assert _run("openssl", "pkeyutl", "-verifyrecover", "-certin", "-inkey", lab.gateway.cert_path,
                "-in", tmp_path / "sig") == h


@openssl
def test_openssl_made_signature_verifies(lab, tmp_path):
    alice = lab.clients["alice@example.net"]
    h = os.urandom(20)
    (tmp_path / "hash").write_bytes(h)
    sig = _run("openssl", "pkeyutl", "-sign", "-inkey", alice.key_path, "-in", tmp_path / "hash")
    assert certs.verify_signature(alice.cert.public_key(), h, sig)


@pytest.mark.parametrize("curve,method,size,hash_name", [
    (ec.SECP256R1(), C.AUTH_ECDSA_256, 32, "sha256"),
    (ec.SECP384R1(), C.AUTH_ECDSA_384, 48, "sha384"),
    (ec.SECP521R1(), C.AUTH_ECDSA_521, 66, "sha512"),
])
def test_ecdsa_round_trip_and_openssl(tmp_path, curve, method, size, hash_name):
    key = ec.generate_private_key(curve)
    assert certs.auth_method(key) == method == certs.auth_method(key.public_key())
    assert certs.hash_for_auth_method(method, "sha1") == hash_name
    h = os.urandom({"sha256": 32, "sha384": 48, "sha512": 64}[hash_name])
    sig = certs.sign(key, h)
    assert len(sig) == 2 * size
    assert certs.verify_signature(key.public_key(), h, sig)
    assert not certs.verify_signature(key.public_key(), h, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not certs.verify_signature(key.public_key(), h, sig[1:])
    assert not certs.verify_signature(key.public_key(), bytes(len(h)), sig)
    # r || s -> DER and let OpenSSL verify it over the raw digest (no second hashing)
    if shutil.which("openssl"):
        r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
        (tmp_path / "hash").write_bytes(h)
        (tmp_path / "sig.der").write_bytes(asym_utils.encode_dss_signature(r, s))
        (tmp_path / "pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        out = _run("openssl", "pkeyutl", "-verify", "-pubin", "-inkey", tmp_path / "pub.pem",
                   "-in", tmp_path / "hash", "-sigfile", tmp_path / "sig.der")
        assert b"Success" in out


def test_auth_method_rsa_and_unsupported(gw):
    assert gw.auth_method == C.AUTH_RSA_SIG
    assert certs.hash_for_auth_method(C.AUTH_RSA_SIG, "sha1") == "sha1"
    with pytest.raises(ValueError):
        certs.auth_method(ec.generate_private_key(ec.SECP256K1()))


# ---------------------------------------------------------------------------------------------
# the whole check, as the exchange code will call it


def _mm5(cred: certs.Credentials, ident: isakmp.Identification, h: bytes, sig: bytes | None = None):
    payloads = [ident, *cred.cert_payloads(), isakmp.Signature(sig if sig is not None else cred.sign(h))]
    return isakmp.parse_payloads(C.PT_ID, isakmp.build_payloads(payloads))


def test_authenticate_peer(lab, trust):
    from narsuite.ike import crypto
    alice_i = lab.clients["alice@example.net"]
    alice = certs.Credentials.load(alice_i.cert_path, alice_i.key_path)
    ident = alice.our_id()
    gxi, gxr, cky_i, cky_r = os.urandom(256), os.urandom(256), os.urandom(8), os.urandom(8)
    skeyid = crypto.skeyid_sig("sha256", os.urandom(32), os.urandom(32), os.urandom(256))
    idii_b = isakmp.build_payloads([ident])[4:]
    h = crypto.hash_i("sha256", skeyid, gxi, gxr, cky_i, cky_r, b"sa-body", idii_b)
    payloads = _mm5(alice, ident, h)
    got_ident = isakmp.find(payloads, isakmp.Identification)
    sig = isakmp.find(payloads, isakmp.Signature).data
    assert certs.authenticate_peer(trust, payloads, got_ident, h, sig) == alice_i.cert
    email = alice.our_id("email")
    assert certs.authenticate_peer(trust, _mm5(alice, email, h), email, h, alice.sign(h)) == alice_i.cert

    with pytest.raises(certs.CertificateError) as ei:
        certs.authenticate_peer(trust, payloads, certs.default_id(lab.gateway.cert), h, sig)
    assert (ei.value.kind, ei.value.notify) == ("id-mismatch", C.INVALID_ID_INFORMATION)
    with pytest.raises(certs.CertificateError) as ei:
        certs.authenticate_peer(trust, payloads, got_ident, os.urandom(32), sig)
    assert (ei.value.kind, ei.value.notify) == ("invalid-signature", C.INVALID_SIGNATURE)
    mallory = certs.Credentials.load(lab.untrusted.cert_path, lab.untrusted.key_path)
    m_ident = mallory.our_id()
    with pytest.raises(certs.CertificateError) as ei:
        certs.authenticate_peer(trust, _mm5(mallory, m_ident, h), m_ident, h, mallory.sign(h))
    assert ei.value.kind == "untrusted"
    # a valid signature by the gateway key, sent with alice's certificate
    with pytest.raises(certs.CertificateError) as ei:
        certs.authenticate_peer(trust, payloads, got_ident, h, certs.sign(lab.gateway.key, h))
    assert ei.value.kind == "invalid-signature"


@pytest.mark.parametrize("openssl_opinion", (True, False))
def test_rsa_verify_wants_the_exact_block(gw, monkeypatch, openssl_opinion):
    """Signatures over almost-right PKCS#1 blocks (made with the raw private operation) fail,
    also when our own block comparison is the only check (cryptography < 47)."""
    monkeypatch.setattr(certs, "HAVE_NO_DIGEST_INFO", openssl_opinion and certs.HAVE_NO_DIGEST_INFO)
    priv = gw.key.private_numbers()
    n, d = priv.public_numbers.n, priv.d
    h = os.urandom(20)

    def raw_sign(block: bytes) -> bytes:
        assert len(block) == 256
        return pow(int.from_bytes(block, "big"), d, n).to_bytes(256, "big")

    assert certs.verify_signature(gw.certificate.public_key(), h, raw_sign(pkcs1_null_block(h, 256)))
    sha1_di = bytes.fromhex("3021300906052b0e03021a05000414")
    bad_blocks = [
        pkcs1_null_block(sha1_di + h, 256),                            # with DigestInfo
        b"\x00\x02" + pkcs1_null_block(h, 256)[2:],                    # block type 2
        b"\x00\x01" + b"\xff" * 200 + b"\x00" + os.urandom(33) + h,   # junk between padding and hash
        b"\x00\x01" + b"\xff" * 201 + b"\x01" + os.urandom(32) + h,   # no 00 separator
        pkcs1_null_block(h, 256)[:-1] + bytes([h[-1] ^ 1]),              # last hash byte wrong
    ]
    for block in bad_blocks:
        assert len(block) == 256
        assert not certs.verify_signature(gw.certificate.public_key(), h, raw_sign(block))
