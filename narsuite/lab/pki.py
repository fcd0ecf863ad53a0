"""A throw-away test PKI for IKEv1 certificate authentication (``narsuite.ike.certs``, the lab).

Why: the ``ike`` role's RSA-signature tests need a CA, a gateway certificate and client
certificates that *both* our code and strongSwan load, plus the certificates an operator gets
wrong in real life (expired, issued by a CA nobody trusts).  Generating them per test run with
``cryptography`` keeps keys out of the repository and the dates always valid.

Files are written in the layout ``swanctl --load-creds`` reads under ``/etc/swanctl``::

    DIR/x509ca/ca.pem            trusted root CA (PEM)
    DIR/intermediate/ca.pem      intermediate CA signed by the root: *not* a trust anchor, the
                                 client it issued must send it along (tests chain building)
    DIR/x509/<name>.pem          end-entity certificates (PEM)
    DIR/private/<name>.pem       their keys, unencrypted PKCS#8 PEM (``key_format="pkcs8"``)
    DIR/rsa/<name>.pem           ... or PKCS#1 "RSA PRIVATE KEY" PEM (``key_format="pkcs1"``)
    DIR/untrusted/...            the rogue CA and its certificate: deliberately *not* in x509ca

Everything is RSA 2048 with SHA-256 signatures (what strongSwan's ``pki --gen``/``--issue``
produce by default).  The building blocks (:func:`new_key`, :func:`make_ca`, :func:`issue`,
:func:`write_cert`, :func:`write_key`) are public so tests can make the odd certificate
(wrong issuer key, an intermediate without CA rights) without another generator.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

__all__ = [
    "IPSEC_IKE_EKU", "Identity", "LabPKI", "make_pki", "new_key", "make_ca", "issue", "name",
    "write_cert", "write_key", "subject_alt_names",
]

#: id-kp-ipsecIKE (RFC 4945 5.1.3.12): what strongSwan's ``pki --flag ikeIntermediate``
#: does not set but Windows/macOS gateways are often issued with; included on the gateway.
IPSEC_IKE_EKU = ObjectIdentifier("1.3.6.1.5.5.7.3.17")

_ORG = "narsuite lab"


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A fresh RSA key (public exponent 65537)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def name(common_name: str, org: str = _ORG, country: str = "CH") -> x509.Name:
    """``C=<country>, O=<org>, CN=<common_name>``: the DN shape strongSwan's examples use."""
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, country),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def subject_alt_names(ids: Iterable[str]) -> list[x509.GeneralName]:
    """SAN entries for IKE identities: an IP literal -> iPAddress, ``a@b`` -> rfc822Name,
    anything else -> dNSName (the three forms ID_IPV4_ADDR/ID_USER_FQDN/ID_FQDN match)."""
    out: list[x509.GeneralName] = []
    for i in ids:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(i)))
            continue
        except ValueError:
            pass
        out.append(x509.RFC822Name(i) if "@" in i else x509.DNSName(i))
    return out


def _builder(subject: x509.Name, issuer: x509.Name, public_key, not_before, not_after):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    *,
    issuer: x509.Certificate | None = None,
    issuer_key: rsa.RSAPrivateKey | None = None,
    ca: bool = True,
    days: int = 3650,
    not_before: datetime.datetime | None = None,
) -> x509.Certificate:
    """A CA certificate: self-signed unless ``issuer``/``issuer_key`` are given (intermediate).

    ``ca=False`` makes the broken "intermediate" the negative tests need: same keyUsage,
    but basicConstraints CA:FALSE, which a verifier must refuse as an issuer.
    """
    start = not_before or _utcnow() - datetime.timedelta(days=1)
    signer_name = issuer.subject if issuer is not None else subject
    signer_key = issuer_key if issuer_key is not None else key
    b = _builder(subject, signer_name, key.public_key(), start, start + datetime.timedelta(days=days))
    b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    b = b.add_extension(x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False), critical=True)
    if issuer is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
    return b.sign(signer_key, hashes.SHA256())


def issue(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ids: Sequence[str] = (),
    days: int = 365,
    not_before: datetime.datetime | None = None,
    eku: Sequence[ObjectIdentifier] = (),
    key_usage: bool | x509.KeyUsage = True,
) -> x509.Certificate:
    """An end-entity certificate for ``key`` signed by ``issuer_key``.

    ``ids`` become subjectAltNames (see :func:`subject_alt_names`); ``eku`` is empty by
    default because IPsec client certificates often carry none (and our verifier must not
    demand TLS ones).  keyUsage digitalSignature+keyEncipherment, as ``pki --issue`` sets;
    ``key_usage=False`` leaves the extension out, an ``x509.KeyUsage`` replaces it.
    """
    start = not_before or _utcnow() - datetime.timedelta(days=1)
    b = _builder(subject, issuer.subject, key.public_key(), start, start + datetime.timedelta(days=days))
    b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
    b = b.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if isinstance(key_usage, x509.KeyUsage):
        b = b.add_extension(key_usage, critical=False)
    elif key_usage:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=False)
    if ids:
        b = b.add_extension(x509.SubjectAlternativeName(subject_alt_names(ids)), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def write_cert(path: Path, *certs: x509.Certificate) -> Path:
    """Write one or more certificates as concatenated PEM (creating the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def write_key(path: Path, key: rsa.RSAPrivateKey, key_format: str = "pkcs8") -> Path:
    """Write an unencrypted private key, PKCS#8 (``private/``) or PKCS#1 (``rsa/``), mode 0600."""
    fmt = {"pkcs8": serialization.PrivateFormat.PKCS8,
           "pkcs1": serialization.PrivateFormat.TraditionalOpenSSL}[key_format]
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@attrs.frozen
class Identity:
    """One end entity: its IKE identity string, certificate and key, and where they were written."""

    id: str
    cert: x509.Certificate
    key: rsa.RSAPrivateKey = attrs.field(repr=False)
    cert_path: Path
    key_path: Path
    #: intermediate certificates to send along (empty when issued by the root directly)
    chain: tuple[x509.Certificate, ...] = ()


@attrs.frozen
class LabPKI:
    """What :func:`make_pki` wrote.  ``trust_dir`` is the swanctl ``x509ca`` directory."""

    root: Path
    ca_cert: x509.Certificate
    ca_key: rsa.RSAPrivateKey = attrs.field(repr=False)
    ca_path: Path
    trust_dir: Path
    intermediate_cert: x509.Certificate
    intermediate_key: rsa.RSAPrivateKey = attrs.field(repr=False)
    intermediate_path: Path
    gateway: Identity
    clients: dict[str, Identity]
    #: a client whose certificate expired yesterday (same trusted CA)
    expired: Identity
    #: a client issued by the intermediate CA (chain of two)
    chained: Identity
    #: a CA that is *not* in trust_dir, and a client certificate it issued
    untrusted_ca_cert: x509.Certificate
    untrusted_ca_path: Path
    untrusted: Identity


def make_pki(
    directory: os.PathLike | str,
    gateway_ids: Sequence[str] = ("gw.example.net", "198.51.100.1"),
    client_ids: Sequence[str] = ("alice@example.net", "bob.example.net"),
    *,
    key_format: str = "pkcs8",
    bits: int = 2048,
) -> LabPKI:
    """Generate and write the whole lab PKI under ``directory``; see the module docstring.

    The gateway's subject is ``C=CH, O=narsuite lab, CN=<first gateway id>``, its SANs all of
    ``gateway_ids`` and its EKU serverAuth + ipsecIKE (what Windows/macOS clients want).  Each
    client's subject is ``C=CH, O=narsuite lab, CN=<id>`` with the id as its only SAN, no EKU.
    """
    root = Path(directory)
    key_dir = root / ("private" if key_format == "pkcs8" else "rsa")

    def entity(ident: str, file: str, issuer, issuer_key, ids, chain=(), **kw) -> Identity:
        k = new_key(bits)
        c = issue(name(ident), k, issuer, issuer_key, ids=ids, **kw)
        return Identity(ident, c, k, write_cert(root / "x509" / f"{file}.pem", c),
                        write_key(key_dir / f"{file}.pem", k, key_format), tuple(chain))

    # CAs from a year back, so the expired certificate lies inside their validity.
    ca_start = _utcnow() - datetime.timedelta(days=365)
    ca_key = new_key(bits)
    ca = make_ca(name("narsuite lab root CA"), ca_key, not_before=ca_start)
    ca_path = write_cert(root / "x509ca" / "ca.pem", ca)
    im_key = new_key(bits)
    im = make_ca(name("narsuite lab intermediate CA"), im_key, issuer=ca, issuer_key=ca_key, not_before=ca_start)
    im_path = write_cert(root / "intermediate" / "ca.pem", im)

    gw = entity(gateway_ids[0], "gateway", ca, ca_key, gateway_ids,
                eku=(ExtendedKeyUsageOID.SERVER_AUTH, IPSEC_IKE_EKU))
    clients = {cid: entity(cid, f"client-{i}", ca, ca_key, (cid,)) for i, cid in enumerate(client_ids)}
    past = _utcnow() - datetime.timedelta(days=30)
    expired = entity("expired@example.net", "expired", ca, ca_key, ("expired@example.net",),
                     not_before=past, days=29)
    chained = entity("carol@example.net", "chained", im, im_key, ("carol@example.net",), chain=(im,))

    rogue_key = new_key(bits)
    rogue = make_ca(name("narsuite lab root CA", org="rogue"), rogue_key)
    rogue_path = write_cert(root / "untrusted" / "rogue-ca.pem", rogue)
    k = new_key(bits)
    c = issue(name("mallory@example.net"), k, rogue, rogue_key, ids=("mallory@example.net",))
    untrusted = Identity("mallory@example.net", c, k, write_cert(root / "untrusted" / "mallory.pem", c),
                         write_key(root / "untrusted" / "mallory.key", k, key_format))
    return LabPKI(root, ca, ca_key, ca_path, root / "x509ca", im, im_key, im_path, gw, clients,
                  expired, chained, rogue, rogue_path, untrusted)
