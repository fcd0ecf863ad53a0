"""IKE identities (RFC 2407 §4.6.2): how we print, compare and build them.

Operators write identities as strongSwan does: an address, an FQDN, ``user@fqdn``, a
distinguished name ``"C=CH, O=org, CN=host"`` or ``%any``.  One rendering function
serves logs, narctl and policy matching, so what the log shows is what the config
must say.
"""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509

from narsuite.ike import constants as C
from narsuite.ike.isakmp import Identification

__all__ = ["name_from_der", "dn_text", "id_text", "id_matches", "identification_for", "selector", "selector_text"]


def name_from_der(der: bytes) -> x509.Name:
    """A DER-encoded Name (ID_DER_ASN1_DN) as an ``x509.Name``.

    cryptography has no public loader for a bare Name, so the DER is walked by hand:
    SEQUENCE OF SET OF SEQUENCE { OID, value }.  ``ValueError`` on anything malformed.
    """
    attrs_out = []
    pos, seq_len, pos = _tlv(der, 0, 0x30)
    end = pos + seq_len
    while pos < end:
        _, set_len, set_pos = _tlv(der, pos, 0x31)
        rdn = []
        p = set_pos
        while p < set_pos + set_len:
            _, atv_len, atv_pos = _tlv(der, p, 0x30)
            _, oid_len, oid_pos = _tlv(der, atv_pos, 0x06)
            oid = _oid(der[oid_pos:oid_pos + oid_len])
            vtag = der[oid_pos + oid_len]
            _, vlen, vpos = _tlv(der, oid_pos + oid_len, vtag)
            raw = der[vpos:vpos + vlen]
            value = raw.decode("utf-16-be") if vtag == 0x1E else raw.decode("utf-8", "replace")
            rdn.append(x509.NameAttribute(x509.ObjectIdentifier(oid), value))
            p = atv_pos + atv_len
        attrs_out.append(x509.RelativeDistinguishedName(rdn))
        pos = set_pos + set_len
    return x509.Name(attrs_out)


def _tlv(der: bytes, pos: int, tag: int) -> tuple[int, int, int]:
    if pos >= len(der) or der[pos] != tag:
        raise ValueError(f"DER: expected tag {tag:#x} at {pos}")
    n = der[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 3:
            raise ValueError("DER: bad length")
        n = int.from_bytes(der[pos:pos + k], "big")
        pos += k
    if pos + n > len(der):
        raise ValueError("DER: truncated")
    return tag, n, pos


def _oid(b: bytes) -> str:
    if not b:
        raise ValueError("DER: empty OID")
    parts = [b[0] // 40, b[0] % 40]
    v = 0
    for byte in b[1:]:
        v = (v << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(v)
            v = 0
    return ".".join(map(str, parts))


_SHORT = {"2.5.4.6": "C", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.3": "CN", "2.5.4.7": "L",
          "2.5.4.8": "ST", "1.2.840.113549.1.9.1": "E", "2.5.4.5": "serialNumber", "0.9.2342.19200300.100.1.25": "DC"}


def dn_text(der: bytes) -> str:
    """``C=CH, O=org, CN=host`` in encoding order, as strongSwan prints DNs."""
    name = name_from_der(der)
    return ", ".join(f"{_SHORT.get(a.oid.dotted_string, a.oid.dotted_string)}={a.value!s}" for a in name)


def id_text(ident: Identification) -> str:
    t, d = ident.id_type, ident.data
    try:
        if t == C.ID_IPV4_ADDR:
            return str(ipaddress.IPv4Address(d))
        if t == C.ID_IPV6_ADDR:
            return str(ipaddress.IPv6Address(d))
        if t in (C.ID_FQDN, C.ID_USER_FQDN, C.ID_KEY_ID):
            return d.decode("utf-8", "replace") if t != C.ID_KEY_ID else "keyid:" + d.hex()
        if t == C.ID_IPV4_ADDR_SUBNET:
            return str(ipaddress.IPv4Network((ipaddress.IPv4Address(d[:4]), str(ipaddress.IPv4Address(d[4:]))),
                                             strict=False))
        if t == C.ID_IPV4_ADDR_RANGE:
            return f"{ipaddress.IPv4Address(d[:4])}-{ipaddress.IPv4Address(d[4:])}"
        if t == C.ID_DER_ASN1_DN:
            return dn_text(d)
    except (ValueError, IndexError, UnicodeDecodeError):
        pass
    return f"id{t}:{d.hex()}"


def _norm(text: str) -> str:
    return re.sub(r"\s*([,=])\s*", r"\1", text.strip()).lower()


def id_matches(pattern: str, ident: Identification) -> bool:
    """Policy ``id`` vs a received identity: ``%any``, exact text, ``*@domain`` / ``*.domain``."""
    if pattern in ("%any", "", "*"):
        return True
    text = id_text(ident)
    if pattern.startswith("*"):
        return text.lower().endswith(pattern[1:].lower())
    return _norm(pattern) == _norm(text)


def identification_for(text: str, fallback_ip: str) -> Identification:
    """Our ID payload from the config's ``local_id`` (empty: our address)."""
    if not text:
        return Identification(C.ID_IPV4_ADDR, ipaddress.IPv4Address(fallback_ip).packed)
    try:
        return Identification(C.ID_IPV4_ADDR, ipaddress.IPv4Address(text).packed)
    except ValueError:
        pass
    if "=" in text:
        return Identification(C.ID_DER_ASN1_DN, x509.Name.from_rfc4514_string(
            ",".join(reversed([p.strip() for p in text.split(",")]))).public_bytes())
    if "@" in text:
        return Identification(C.ID_USER_FQDN, text.encode())
    return Identification(C.ID_FQDN, text.encode())


def selector(ident: Identification | None, fallback_ip: str) -> tuple[ipaddress.IPv4Network, int, int]:
    """A Quick Mode ID as (network, protocol, port); absent IDs mean the phase-1 address."""
    if ident is None:
        return ipaddress.IPv4Network(fallback_ip + "/32"), 0, 0
    d = ident.data
    if ident.id_type == C.ID_IPV4_ADDR and len(d) == 4:
        net = ipaddress.IPv4Network(ipaddress.IPv4Address(d))
    elif ident.id_type == C.ID_IPV4_ADDR_SUBNET and len(d) == 8:
        try:
            net = ipaddress.IPv4Network((ipaddress.IPv4Address(d[:4]), str(ipaddress.IPv4Address(d[4:]))))
        except ValueError:
            raise ValueError(f"subnet {ipaddress.IPv4Address(d[:4])}/{ipaddress.IPv4Address(d[4:])} has host bits "
                             "or a non-contiguous mask") from None
    elif ident.id_type == C.ID_IPV4_ADDR_RANGE and len(d) == 8:
        lo, hi = ipaddress.IPv4Address(d[:4]), ipaddress.IPv4Address(d[4:])
        nets = list(ipaddress.summarize_address_range(lo, hi)) if lo <= hi else []
        if len(nets) != 1:
            raise ValueError(f"range {lo}-{hi} is not one subnet")
        net = nets[0]
    else:
        raise ValueError(f"selector of ID type {ident.id_type} is not supported (IPv4 address, subnet or range)")
    return net, ident.protocol, ident.port


def selector_text(sel: tuple[ipaddress.IPv4Network, int, int]) -> str:
    net, proto, port = sel
    extra = f"[{proto}/{port}]" if proto or port else ""
    return f"{net}{extra}"
