"""Tests for narsuite.ike.isakmp, the ISAKMP/IKEv1 wire codec.

Three kinds of evidence:

* byte-exact layouts written out by hand from the RFC figures (RFC 2408 3.1-3.16, RFC 2407
  4.6, RFC 3947 3.2/5.1, RFC 3706, the mode-config and XAUTH drafts), parsed to the expected
  records and rebuilt to the same bytes;
* scapy's ISAKMP layer as an independent oracle where it is right (header, single-proposal
  SA, KE, nonce, vendor ID, hash) in both directions, and a demonstration of where it is
  wrong (several proposals with a non-zero SPI size);
* hypothesis: random records survive build -> parse unchanged; random bytes and mutated or
  truncated valid messages only ever raise ISAKMPError, and whatever parses re-builds to
  something that parses to the same records.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narsuite.ike import constants as C
from narsuite.ike import isakmp as I
from narsuite.lab.pytest_plugin import need_tools

PROPS = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

ICOOKIE = bytes.fromhex("0102030405060708")
RCOOKIE = bytes.fromhex("a1a2a3a4a5a6a7a8")


def h(text: str) -> bytes:
    """Hex with spaces, comments after '#', and line breaks, as the layouts below are written."""
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))


def header_hex(next_payload: int, exchange: int, flags: int, msgid: int, length: int) -> bytes:
    return ICOOKIE + RCOOKIE + bytes([next_payload, 0x10, exchange, flags]) + struct.pack("!II", msgid, length)


# -- vendor IDs -----------------------------------------------------------------------------

def md5(s: bytes) -> bytes:
    return hashlib.md5(s).digest()


@pytest.mark.parametrize(("vid", "expected"), [
    (C.VID_NATT_RFC3947, md5(b"RFC 3947")),
    (C.VID_NATT_DRAFT_02, md5(b"draft-ietf-ipsec-nat-t-ike-02")),
    (C.VID_NATT_DRAFT_02N, md5(b"draft-ietf-ipsec-nat-t-ike-02\n")),
    (C.VID_NATT_DRAFT_03, md5(b"draft-ietf-ipsec-nat-t-ike-03")),
    (C.VID_ESPTHRUNAT, md5(b"ESPThruNAT")),
    (C.VID_DPD, md5(b"CISCO-DEAD-PEER-DETECTION")[:14] + b"\x01\x00"),
    (C.VID_XAUTH, md5(b"draft-ietf-ipsra-isakmp-xauth-06.txt")[:8]),
    (C.VID_CISCO_UNITY, md5(b"CISCO-UNITY")[:14] + b"\x01\x00"),
    (C.VID_FRAGMENTATION, md5(b"FRAGMENTATION")),
])
def test_vendor_ids_are_the_digests_of_their_strings(vid, expected):
    assert vid == expected


def test_vendor_ids_match_platform_facts():
    # The values recorded in shared/notes/platform-facts.md (checked against two IKE stacks).
    assert C.VID_NATT_RFC3947.hex() == "4a131c81070358455c5728f20e95452f"
    assert C.VID_NATT_DRAFT_02N.hex() == "90cb80913ebb696e086381b5ec427b1f"
    assert C.VID_DPD.hex() == "afcad71368a1f1c96b8696fc77570100"
    assert C.VID_XAUTH.hex() == "09002689dfd6b712"
    assert set(C.NATT_VENDOR_IDS) == {C.VID_NATT_RFC3947, C.VID_NATT_DRAFT_02, C.VID_NATT_DRAFT_02N,
                                      C.VID_NATT_DRAFT_03}


def test_notify_names_cover_the_constants():
    assert C.NOTIFY_NAMES[C.PAYLOAD_MALFORMED] == "PAYLOAD-MALFORMED"
    assert C.NOTIFY_NAMES[C.DOI_NOT_SUPPORTED] == "DOI-NOT-SUPPORTED"
    assert C.NOTIFY_NAMES[C.R_U_THERE_ACK] == "R-U-THERE-ACK"
    assert sorted(k for k in C.NOTIFY_NAMES if k <= 30) == list(range(1, 31))
    assert (C.INITIAL_CONTACT, C.RESPONDER_LIFETIME, C.R_U_THERE, C.R_U_THERE_ACK) == (24578, 24576, 36136, 36137)


# -- header ---------------------------------------------------------------------------------

def test_header_byte_exact():
    raw = h("""
        0102030405060708 a1a2a3a4a5a6a7a8   # cookies
        0b 10 05 01                         # next N, version 1.0, informational, E
        deadbeef 00000024                   # message id, length 36
        01020304 05060708                   # 8 bytes of ciphertext
    """)
    msg = I.parse_message(raw)
    assert msg.header == I.Header(ICOOKIE, RCOOKIE, C.EXCH_INFORMATIONAL, C.FLAG_ENCRYPTION, 0xDEADBEEF,
                                  C.PT_NOTIFY, 36, 0x10)
    assert msg.header.encrypted
    assert msg.payloads == ()
    assert msg.ciphertext == bytes.fromhex("0102030405060708")
    assert I.build_message(msg.header, ciphertext=msg.ciphertext) == raw


def test_header_lengths_computed_and_verbatim():
    hdr = I.Header(ICOOKIE, RCOOKIE, C.EXCH_AGGRESSIVE, 0, 0)
    assert I.build_message(hdr) == header_hex(0, 4, 0, 0, 28)
    assert I.build_message(hdr, [I.Nonce(b"")]) == header_hex(10, 4, 0, 0, 32) + h("00 00 0004")
    crafted = I.Header(ICOOKIE, RCOOKIE, 4, 0, 0, next_payload=99, length=1000)
    assert I.build_message(crafted) == header_hex(99, 4, 0, 0, 1000)


@pytest.mark.parametrize(("raw", "notify"), [
    (b"", C.PAYLOAD_MALFORMED),
    (header_hex(0, 2, 0, 0, 28)[:27], C.PAYLOAD_MALFORMED),
    (header_hex(0, 2, 0, 0, 28).replace(b"\x00\x10\x02", b"\x00\x20\x02", 1), C.INVALID_MAJOR_VERSION),
    (header_hex(0, 2, 0, 0, 28).replace(b"\x00\x10\x02", b"\x00\x11\x02", 1), C.INVALID_MINOR_VERSION),
    (header_hex(0, 2, 0, 0, 27), C.PAYLOAD_MALFORMED),
    (header_hex(0, 2, 0, 0, 29), C.UNEQUAL_PAYLOAD_LENGTHS),
    (header_hex(0, 2, 0, 0, 30) + b"\0\0", C.PAYLOAD_MALFORMED),  # bytes after the (empty) chain
    (header_hex(10, 2, 0, 0, 28), C.PAYLOAD_MALFORMED),  # announces a payload it lacks
])
def test_header_errors(raw, notify):
    with pytest.raises(I.ISAKMPError) as exc:
        I.parse_message(raw)
    assert exc.value.notify == notify


def test_bytes_after_header_length_are_outside_the_message():
    raw = header_hex(13, 2, 0, 0, 36) + h("00 00 0008 cafebabe") + b"trailing"
    assert I.parse_message(raw).payloads == (I.VendorID(bytes.fromhex("cafebabe")),)


def test_error_is_a_value_error_naming_the_notify():
    with pytest.raises(ValueError, match="INVALID-MAJOR-VERSION"):
        I.parse_header(header_hex(0, 2, 0, 0, 28).replace(b"\x10", b"\x20", 1))


def test_encrypted_chain_is_parsed_separately_with_padding():
    chain = h("""
        0d 00 0018  0123456789abcdef0123456789abcdef01234567   # HASH(20), next VID
        00 00 0008  afcad713                                   # VID
    """)
    plaintext = chain + bytes(3) + b"\x03"  # RFC 2409 padding after the last payload
    assert I.parse_payloads(C.PT_HASH, plaintext, padded=True) == (
        I.Hash(bytes.fromhex("0123456789abcdef0123456789abcdef01234567")),
        I.VendorID(bytes.fromhex("afcad713")),
    )
    with pytest.raises(I.ISAKMPError) as exc:
        I.parse_payloads(C.PT_HASH, plaintext)
    assert exc.value.notify == C.PAYLOAD_MALFORMED
    hdr = I.Header(ICOOKIE, RCOOKIE, C.EXCH_QUICK, C.FLAG_ENCRYPTION, 7, next_payload=C.PT_HASH)
    raw = I.build_message(hdr, ciphertext=b"\xaa" * 32)
    parsed = I.parse_message(raw)
    assert (parsed.header.next_payload, parsed.header.length, parsed.ciphertext) == (8, 60, b"\xaa" * 32)


# -- SA payloads ----------------------------------------------------------------------------

# Main mode offer as strongSwan sends it for XAUTH with PSK: AES-CBC-256, SHA1, MODP2048.
PHASE1_SA = h("""
    0d 00 003c              # SA: next VID, length 60
    00000001 00000001       # DOI IPsec, SIT_IDENTITY_ONLY
    00 00 0030              # proposal: last, length 48
    01 01 00 01             # #1, PROTO_ISAKMP, SPI size 0, 1 transform
    00 00 0028              # transform: last, length 40
    01 01 0000              # #1, KEY_IKE
    8001 0007               # encryption AES-CBC (TV)
    800e 0100               # key length 256
    8002 0002               # hash SHA1
    8003 fde9               # auth XAUTHInitPreShared (65001)
    8004 000e               # group 14
    800b 0001               # life type seconds
    000c 0004 00007080      # life duration 28800 (TLV, 4 bytes)
""")

PHASE1_RECORD = I.SecurityAssociation([I.Proposal(1, C.PROTO_ISAKMP, b"", [I.Transform(1, C.KEY_IKE, [
    I.Attribute(C.P1_ENCRYPTION, C.ENC_AES_CBC),
    I.Attribute(C.P1_KEY_LENGTH, 256),
    I.Attribute(C.P1_HASH, C.HASH_SHA1),
    I.Attribute(C.P1_AUTH_METHOD, C.AUTH_XAUTH_INIT_PSK),
    I.Attribute(C.P1_GROUP_DESC, C.GROUP_MODP_2048),
    I.Attribute(C.P1_LIFE_TYPE, C.LIFE_SECONDS),
    I.Attribute(C.P1_LIFE_DURATION, (28800).to_bytes(4, "big")),
])])])

# Quick mode offer: two alternative ESP proposals, each with its own 4-byte SPI.
QUICK_SA = h("""
    0a 00 0058              # SA: next NONCE, length 88
    00000001 00000001
    02 00 0028              # proposal: more follow, length 40
    01 03 04 01             # #1, ESP, SPI size 4, 1 transform
    c0ffee01                # SPI
    00 00 001c              # transform: last, length 28
    01 0c 0000              # #1, ESP_AES_CBC
    8004 0003               # encapsulation mode UDP-Tunnel (RFC 3947)
    8005 0002               # auth HMAC-SHA1
    8006 0080               # key length 128
    8001 0001               # SA life type seconds
    8002 0e10               # SA life duration 3600 (TV)
    00 00 0024              # proposal: last, length 36
    02 03 04 01             # #2, ESP, SPI size 4, 1 transform
    c0ffee02
    00 00 0018              # transform: last, length 24
    01 03 0000              # #1, ESP_3DES
    8004 f003               # encapsulation mode UDP-Tunnel (drafts, 61443)
    8005 0002
    8001 0001
    8002 0e10
""")

QUICK_RECORD = I.SecurityAssociation([
    I.Proposal(1, C.PROTO_IPSEC_ESP, bytes.fromhex("c0ffee01"), [I.Transform(1, C.ESP_AES_CBC, [
        I.Attribute(C.P2_ENCAP_MODE, C.ENCAP_UDP_TUNNEL), I.Attribute(C.P2_AUTH_ALG, C.AUTH_ALG_HMAC_SHA1),
        I.Attribute(C.P2_KEY_LENGTH, 128), I.Attribute(C.P2_SA_LIFE_TYPE, C.LIFE_SECONDS),
        I.Attribute(C.P2_SA_LIFE_DURATION, 3600)])]),
    I.Proposal(2, C.PROTO_IPSEC_ESP, bytes.fromhex("c0ffee02"), [I.Transform(1, C.ESP_3DES, [
        I.Attribute(C.P2_ENCAP_MODE, C.ENCAP_UDP_TUNNEL_DRAFT), I.Attribute(C.P2_AUTH_ALG, C.AUTH_ALG_HMAC_SHA1),
        I.Attribute(C.P2_SA_LIFE_TYPE, C.LIFE_SECONDS), I.Attribute(C.P2_SA_LIFE_DURATION, 3600)])]),
])


def test_phase1_sa_byte_exact():
    vid = I.VendorID(C.VID_XAUTH)
    raw = header_hex(1, 2, 0, 0, 28 + len(PHASE1_SA) + 12) + PHASE1_SA + h("00 00 000c") + C.VID_XAUTH
    msg = I.parse_message(raw)
    assert msg.payloads == (PHASE1_RECORD, vid)
    assert I.build_message(I.Header(ICOOKIE, RCOOKIE, C.EXCH_MAIN), [PHASE1_RECORD, vid]) == raw
    t = msg.payloads[0].proposals[0].transforms[0]
    assert t.get(C.P1_LIFE_DURATION).int_value == 28800
    assert not t.get(C.P1_LIFE_DURATION).is_tv and t.get(C.P1_AUTH_METHOD).is_tv
    assert t.get(C.P1_PRF) is None


def test_multi_proposal_nonzero_spi_byte_exact():
    nonce = I.Nonce(b"N" * 16)
    raw = header_hex(1, 32, 0, 0x01020304, 28 + len(QUICK_SA) + 20) + QUICK_SA + h("00 00 0014") + b"N" * 16
    msg = I.parse_message(raw)
    assert msg.payloads == (QUICK_RECORD, nonce)
    assert I.build_message(I.Header(ICOOKIE, RCOOKIE, C.EXCH_QUICK, 0, 0x01020304), [QUICK_RECORD, nonce]) == raw


def test_scapy_misparses_multi_proposal_nonzero_spi():
    """The bug we work around: scapy reads (length - 8) transform bytes *after* the SPI, so
    the first proposal swallows 4 bytes of the second and the second is read misaligned."""
    from scapy.layers.isakmp import ISAKMP, ISAKMP_payload_Proposal
    raw = header_hex(1, 32, 0, 0, 28 + len(QUICK_SA)) + QUICK_SA.replace(b"\x0a\x00\x00\x58", b"\x00\x00\x00\x58", 1)
    pkt = ISAKMP(raw)
    props = []
    p = pkt["ISAKMP SA"].prop
    while isinstance(p, ISAKMP_payload_Proposal):
        props.append(p)
        p = p.payload
    assert len(props) == 2
    assert props[0].SPI == bytes.fromhex("c0ffee01")  # the first is still right...
    assert (props[1].proposal, props[1].SPI) != (2, bytes.fromhex("c0ffee02"))  # ...the second is garbage
    # while ours reads both correctly
    assert I.parse_message(raw).payloads == (QUICK_RECORD,)


@pytest.mark.parametrize(("sa_body", "notify"), [
    ("00000000 00000001 00000010 01010001 00000008 01010000", C.DOI_NOT_SUPPORTED),  # DOI 0
    ("00000001 00000002", C.SITUATION_NOT_SUPPORTED),
    ("00000001 00000001", C.BAD_PROPOSAL_SYNTAX),  # no proposal at all
    ("00000001 00000001 0000000c 01010001 00000008", C.BAD_PROPOSAL_SYNTAX),  # truncated transform
    ("00000001 00000001 00000008 01010000", C.BAD_PROPOSAL_SYNTAX),  # proposal without transform
    ("00000001 00000001 00000010 01010002 00000008 01010000", C.BAD_PROPOSAL_SYNTAX),  # count 2, one present
    ("00000001 00000001 05000010 01010001 00000008 01010000", C.BAD_PROPOSAL_SYNTAX),  # next after proposal 5
    ("00000001 00000001 00000010 01010001 05000008 01010000", C.BAD_PROPOSAL_SYNTAX),  # next after transform 5
    ("00000001 00000001 00000014 01010001 0000000c 01010000 800e", C.BAD_PROPOSAL_SYNTAX),  # cut attribute
    ("00000001 00000001 00000014 01010001 0000000c 01010000 000c0004", C.BAD_PROPOSAL_SYNTAX),  # TLV overrun
    ("00000001 00000001 00000010 01040401 00000008 01010000", C.BAD_PROPOSAL_SYNTAX),  # SPI overruns
    ("00000001 00000001 00000010 01010001 00000008 01010000 00", C.BAD_PROPOSAL_SYNTAX),  # trailing
    ("00000001 00000001 0000000f 01010001 00000008 01010000 00", C.BAD_PROPOSAL_SYNTAX),  # transform overrun
    ("000000", C.PAYLOAD_MALFORMED),
])
def test_sa_errors(sa_body, notify):
    body = bytes.fromhex(sa_body.replace(" ", ""))
    with pytest.raises(I.ISAKMPError) as exc:
        I.parse_payloads(C.PT_SA, struct.pack("!BBH", 0, 0, 4 + len(body)) + body)
    assert exc.value.notify == notify


def test_proposals_sharing_a_number_are_kept_in_order():
    sa = I.SecurityAssociation([
        I.Proposal(1, C.PROTO_IPSEC_AH, b"\0\0\0\1", [I.Transform(1, C.AH_SHA)]),
        I.Proposal(1, C.PROTO_IPSEC_ESP, b"\0\0\0\2", [I.Transform(1, C.ESP_AES_CBC), I.Transform(2, C.ESP_3DES)]),
    ])
    raw = I.build_payloads([sa])
    assert raw[12:20] == h("02 00 0014 01 02 04 01")  # first proposal says "more follow"
    assert I.parse_payloads(C.PT_SA, raw) == (sa,)


# -- the other payloads, byte-exact ---------------------------------------------------------

CASES = [
    ("KE", h("00 00 000c 0102030405060708"), I.KeyExchange(bytes.fromhex("0102030405060708"))),
    ("ID ipv4", h("00 00 000c 01 11 01f4 c0a80001"),
     I.Identification(C.ID_IPV4_ADDR, bytes([192, 168, 0, 1]), 17, 500)),
    ("ID fqdn", h("00 00 0013 02 00 0000") + b"vpn.example",
     I.Identification(C.ID_FQDN, b"vpn.example")),
    ("ID user fqdn", h("00 00 000d 03 00 0000") + b"a@b.c", I.Identification(C.ID_USER_FQDN, b"a@b.c")),
    ("ID subnet", h("00 00 0010 04 00 0000 0a000000 ffffff00"),
     I.Identification(C.ID_IPV4_ADDR_SUBNET, bytes.fromhex("0a000000ffffff00"))),
    ("ID DN", h("00 00 000b 09 00 0000 300130"), I.Identification(C.ID_DER_ASN1_DN, bytes.fromhex("300130"))),
    ("CERT", h("00 00 0008 04 308201"), I.Certificate(C.CERT_X509_SIGNATURE, bytes.fromhex("308201"))),
    ("CR", h("00 00 0005 04"), I.CertificateRequest(C.CERT_X509_SIGNATURE)),
    ("CR with CA", h("00 00 0007 04 3000"), I.CertificateRequest(C.CERT_X509_SIGNATURE, b"\x30\x00")),
    ("HASH", h("00 00 0008 aabbccdd"), I.Hash(bytes.fromhex("aabbccdd"))),
    ("SIG", h("00 00 0007 010203"), I.Signature(bytes.fromhex("010203"))),
    ("NONCE", h("00 00 0008 6e6f6e63"), I.Nonce(b"nonc")),
    ("N no-proposal-chosen", h("00 00 000c 00000001 01 00 000e"), I.Notification(C.NO_PROPOSAL_CHOSEN)),
    ("N R-U-THERE", h("""
        00 00 0020
        00000001 01 10 8d28                    # DOI, ISAKMP, SPI size 16, R-U-THERE
        0102030405060708 a1a2a3a4a5a6a7a8      # SPI = the cookies (RFC 3706)
        00000007                               # sequence number
     """), I.Notification(C.R_U_THERE, C.PROTO_ISAKMP, ICOOKIE + RCOOKIE, b"\0\0\0\x07")),
    ("N INITIAL-CONTACT", h("00 00 001c 00000001 01 10 6002 0102030405060708 a1a2a3a4a5a6a7a8"),
     I.Notification(C.INITIAL_CONTACT, C.PROTO_ISAKMP, ICOOKIE + RCOOKIE)),
    ("N RESPONDER-LIFETIME", h("00 00 0018 00000001 03 04 6000 c0ffee01 800b0001 80020e10"),
     I.Notification(C.RESPONDER_LIFETIME, C.PROTO_IPSEC_ESP, bytes.fromhex("c0ffee01"),
                    bytes.fromhex("800b000180020e10"))),
    ("D esp", h("00 00 0014 00000001 03 04 0002 c0ffee01 c0ffee02"),
     I.Delete(C.PROTO_IPSEC_ESP, 4, [bytes.fromhex("c0ffee01"), bytes.fromhex("c0ffee02")])),
    ("D isakmp", h("00 00 001c 00000001 01 10 0001 0102030405060708 a1a2a3a4a5a6a7a8"),
     I.Delete(C.PROTO_ISAKMP, 16, [ICOOKIE + RCOOKIE])),
    ("D none", h("00 00 000c 00000001 03 04 0000"), I.Delete(C.PROTO_IPSEC_ESP, 4, [])),
    ("VID", h("00 00 0014") + C.VID_DPD, I.VendorID(C.VID_DPD)),
    ("XAUTH request", h("""
        00 00 0014
        01 00 04d2                 # CFG_REQUEST, identifier 1234
        c088 0000                  # XAUTH-TYPE generic (TV)
        4089 0000                  # XAUTH-USER-NAME, empty (TLV)
        408a 0000                  # XAUTH-USER-PASSWORD, empty
     """), I.AttributePayload(C.CFG_REQUEST, 1234, [
        I.Attribute(C.XAUTH_TYPE, C.XAUTH_TYPE_GENERIC), I.Attribute(C.XAUTH_USER_NAME, b""),
        I.Attribute(C.XAUTH_USER_PASSWORD, b"")])),
    ("XAUTH status", h("00 00 000c 03 00 0001 c08f 0001"),
     I.AttributePayload(C.CFG_SET, 1, [I.Attribute(C.XAUTH_STATUS, C.XAUTH_STATUS_OK)])),
    ("mode-config reply", h("""
        00 00 001c
        02 00 0007                 # CFG_REPLY, identifier 7
        0001 0004 0a000001         # INTERNAL_IP4_ADDRESS 10.0.0.1
        0002 0004 ffffff00         # INTERNAL_IP4_NETMASK
        0003 0000                  # INTERNAL_IP4_DNS, none
     """), I.AttributePayload(C.CFG_REPLY, 7, [
        I.Attribute(C.INTERNAL_IP4_ADDRESS, bytes([10, 0, 0, 1])),
        I.Attribute(C.INTERNAL_IP4_NETMASK, bytes([255, 255, 255, 0])),
        I.Attribute(C.INTERNAL_IP4_DNS, b"")])),
    ("NAT-D", h("00 00 0018 000102030405060708090a0b0c0d0e0f10111213"), I.NatD(bytes(range(20)))),
    ("NAT-OA ipv4", h("00 00 000c 01 000000 c0a80001"), I.NatOA(C.ID_IPV4_ADDR, bytes([192, 168, 0, 1]))),
    ("NAT-OA ipv6", h("00 00 0018 05 000000 20010db8000000000000000000000001"),
     I.NatOA(C.ID_IPV6_ADDR, bytes.fromhex("20010db8000000000000000000000001"))),
    ("unknown private", h("00 00 0007 abcdef"), I.UnknownPayload(200, bytes.fromhex("abcdef"))),
    ("unknown reserved", h("00 00 0004"), I.UnknownPayload(15)),
]


@pytest.mark.parametrize(("raw", "record"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_payload_byte_exact(raw, record):
    assert I.parse_payloads(record.payload_type, raw) == (record,)
    assert I.build_payloads([record]) == raw


@pytest.mark.parametrize(("ptype", "cls"), [(20, I.NatD), (130, I.NatD), (21, I.NatOA), (131, I.NatOA)])
def test_nat_payload_numbers_rfc_and_draft(ptype, cls):
    body = h("01 000000 0a000001") if cls is I.NatOA else b"x" * 16
    (p,) = I.parse_payloads(ptype, struct.pack("!BBH", 0, 0, 4 + len(body)) + body)
    assert isinstance(p, cls) and p.payload_type == ptype
    assert I.build_message(I.Header(ICOOKIE), [p])[16] == ptype  # header names it as the first payload
    with pytest.raises(ValueError):
        cls(b"x", payload_type=22) if cls is I.NatD else cls(1, b"x", payload_type=20)


def test_chain_of_every_payload_type_round_trips():
    records = [c[2] for c in CASES] + [PHASE1_RECORD, QUICK_RECORD, I.NatD(b"y" * 16, C.PT_NAT_D_DRAFT),
                                       I.NatOA(1, b"\1\2\3\4", C.PT_NAT_OA_DRAFT)]
    raw = I.build_message(I.Header(ICOOKIE, RCOOKIE, C.EXCH_AGGRESSIVE), records)
    msg = I.parse_message(raw)
    assert msg.payloads == tuple(records)
    assert msg.header.length == len(raw)
    # every next-payload field names the type of the payload after it
    off, types = 28, []
    while off < len(raw):
        types.append(raw[off])
        off += struct.unpack_from("!H", raw, off + 2)[0]
    assert types == [p.payload_type for p in records[1:]] + [0]
    assert raw[16] == records[0].payload_type


def test_reserved_bytes_are_ignored_on_parse_and_zero_on_build():
    raw = h("00 ff 0008 aabbccdd")
    assert I.parse_payloads(C.PT_HASH, raw) == (I.Hash(bytes.fromhex("aabbccdd")),)
    assert I.build_payloads(I.parse_payloads(C.PT_HASH, raw)) == h("00 00 0008 aabbccdd")


@pytest.mark.parametrize(("ptype", "raw", "notify"), [
    (C.PT_HASH, h("00 00 0003"), C.PAYLOAD_MALFORMED),  # length below the generic header
    (C.PT_HASH, h("00 00 0009 aabbccdd"), C.PAYLOAD_MALFORMED),  # length beyond the data
    (C.PT_HASH, h("00 00"), C.PAYLOAD_MALFORMED),  # cut generic header
    (C.PT_HASH, h("0a 00 0004"), C.PAYLOAD_MALFORMED),  # announces a nonce that is missing
    (C.PT_PROPOSAL, h("00 00 0004"), C.INVALID_PAYLOAD_TYPE),
    (C.PT_TRANSFORM, h("00 00 0004"), C.INVALID_PAYLOAD_TYPE),
    (C.PT_HASH, h("02 00 0004 00 00 0004"), C.INVALID_PAYLOAD_TYPE),
    (C.PT_ID, h("00 00 0007 010000"), C.PAYLOAD_MALFORMED),
    (C.PT_ID, h("00 00 000d 01 00 0000 c0a8000101"), C.INVALID_ID_INFORMATION),
    (C.PT_ID, h("00 00 000c 06 00 0000 c0a80001"), C.INVALID_ID_INFORMATION),
    (C.PT_CERT, h("00 00 0004"), C.PAYLOAD_MALFORMED),
    (C.PT_CR, h("00 00 0004"), C.PAYLOAD_MALFORMED),
    (C.PT_NOTIFY, h("00 00 000b 00000001 01 00 00"), C.PAYLOAD_MALFORMED),
    (C.PT_NOTIFY, h("00 00 000c 00000001 01 04 000e"), C.PAYLOAD_MALFORMED),  # SPI size beyond body
    (C.PT_DELETE, h("00 00 000b 00000001 03 04 00"), C.PAYLOAD_MALFORMED),
    (C.PT_DELETE, h("00 00 0010 00000001 03 04 0002 c0ffee01"), C.PAYLOAD_MALFORMED),  # count 2, one SPI
    (C.PT_DELETE, h("00 00 0011 00000001 03 04 0001 c0ffee0100"), C.PAYLOAD_MALFORMED),  # extra byte
    (C.PT_ATTRIBUTE, h("00 00 0007 010000"), C.PAYLOAD_MALFORMED),
    (C.PT_ATTRIBUTE, h("00 00 000a 01 00 0000 c088"), C.PAYLOAD_MALFORMED),  # cut attribute
    (C.PT_ATTRIBUTE, h("00 00 000c 01 00 0000 0001 0004"), C.PAYLOAD_MALFORMED),  # TLV overrun
    (C.PT_NAT_OA, h("00 00 0007 010000"), C.PAYLOAD_MALFORMED),
    (C.PT_NAT_OA, h("00 00 000b 01 000000 c0a800"), C.PAYLOAD_MALFORMED),
    (C.PT_NAT_OA_DRAFT, h("00 00 000c 05 000000 c0a80001"), C.PAYLOAD_MALFORMED),
])
def test_payload_errors(ptype, raw, notify):
    with pytest.raises(I.ISAKMPError) as exc:
        I.parse_payloads(ptype, raw)
    assert exc.value.notify == notify


def test_require_known():
    payloads = I.parse_payloads(C.PT_HASH, h("84 00 0008 aabbccdd 00 00 0005 99"))
    assert payloads == (I.Hash(bytes.fromhex("aabbccdd")), I.UnknownPayload(132, b"\x99"))
    I.require_known(payloads, allow={132})
    with pytest.raises(I.ISAKMPError) as exc:
        I.require_known(payloads)
    assert exc.value.notify == C.INVALID_PAYLOAD_TYPE
    I.require_known([I.Hash(b""), I.NatD(b"")])


def test_find_helpers():
    ps = [I.VendorID(b"a"), I.Nonce(b"n"), I.VendorID(b"b")]
    assert I.find(ps, I.Nonce) == I.Nonce(b"n")
    assert I.find(ps, I.Hash) is None
    assert I.find_all(ps, I.VendorID) == [I.VendorID(b"a"), I.VendorID(b"b")]


def test_attribute_of_picks_the_shortest_form():
    assert I.Attribute.of(12, 3600) == I.Attribute(12, 3600)
    assert I.Attribute.of(12, 0x10000) == I.Attribute(12, b"\x00\x01\x00\x00")
    assert I.Attribute.of(12, 1 << 40).value == b"\x01" + bytes(5)
    assert I.Attribute(12, b"\x01\x00").int_value == 256
    with pytest.raises(ValueError):
        I.Attribute.of(12, -1)


@pytest.mark.parametrize("call", [
    lambda: I.build_message(I.Header(b"short")),
    lambda: I.build_payloads([I.AttributePayload(1, 0, [I.Attribute(1, 0x10000)])]),
    lambda: I.build_payloads([I.AttributePayload(1, 0, [I.Attribute(0x8000, 1)])]),
    lambda: I.build_payloads([I.Nonce(bytes(0xFFFC))]),
    lambda: I.build_payloads([I.Delete(3, 4, [b"\0\0\0\1", b"\0\0\1"])]),
    lambda: I.build_payloads([I.Identification(1, b"\0\0\0\0", port=70000)]),
    lambda: I.build_message(I.Header(ICOOKIE, flags=1), ciphertext=b"x"),
    lambda: I.build_message(I.Header(ICOOKIE, next_payload=8), [I.Hash(b"")], ciphertext=b"x"),
])
def test_builders_refuse_unencodable_records(call):
    with pytest.raises(ValueError) as exc:
        call()
    assert not isinstance(exc.value, I.ISAKMPError)  # a caller bug, not a peer to answer


def test_largest_payload_fits():
    raw = I.build_payloads([I.Nonce(bytes(0xFFFB))])
    assert raw[:4] == h("00 00 ffff")
    assert I.parse_payloads(C.PT_NONCE, raw) == (I.Nonce(bytes(0xFFFB)),)


# -- scapy as the oracle --------------------------------------------------------------------

def test_scapy_reads_our_header_sa_ke_nonce_vid_hash():
    from scapy.layers.isakmp import ISAKMP
    ke, nonce = I.KeyExchange(b"K" * 256), I.Nonce(b"N" * 32)
    vid, hsh = I.VendorID(C.VID_NATT_RFC3947), I.Hash(b"H" * 20)
    # scapy encodes wide values in the fewest bytes, so give the life duration 3 bytes here
    sa = I.SecurityAssociation([I.Proposal(1, C.PROTO_ISAKMP, b"", [I.Transform(1, C.KEY_IKE, [
        I.Attribute(C.P1_ENCRYPTION, C.ENC_3DES_CBC), I.Attribute(C.P1_HASH, C.HASH_SHA1),
        I.Attribute(C.P1_AUTH_METHOD, C.AUTH_PSK), I.Attribute(C.P1_GROUP_DESC, C.GROUP_MODP_1024),
        I.Attribute(C.P1_LIFE_TYPE, C.LIFE_SECONDS), I.Attribute(C.P1_LIFE_DURATION, (86400).to_bytes(3, "big")),
    ])])])
    hdr = I.Header(ICOOKIE, RCOOKIE, C.EXCH_AGGRESSIVE, C.FLAG_COMMIT, 0x11223344)
    raw = I.build_message(hdr, [sa, ke, nonce, vid, hsh])
    pkt = ISAKMP(raw)
    assert (pkt.init_cookie, pkt.resp_cookie, pkt.next_payload, pkt.version) == (ICOOKIE, RCOOKIE, 1, 0x10)
    assert (pkt.exch_type, int(pkt.flags), pkt.id, pkt.length) == (4, 2, 0x11223344, len(raw))
    sa_p = pkt["ISAKMP SA"]
    assert (sa_p.doi, sa_p.situation, sa_p.length) == (1, 1, len(I.build_payloads([sa])))
    prop = sa_p.prop
    assert (prop.proposal, prop.proto, prop.SPIsize, prop.trans_nb) == (1, 1, 0, 1)
    trans = prop.trans
    assert (trans.transform_count, trans.transform_id) == (1, 1)
    assert trans.transforms == [("Encryption", "3DES-CBC"), ("Hash", "SHA"), ("Authentication", "PSK"),
                                ("GroupDesc", "1024MODPgr"), ("LifeType", "Seconds"), ("LifeDuration", 86400)]
    assert pkt["ISAKMP Key Exchange"].ke == ke.data
    assert pkt["ISAKMP Nonce"].nonce == nonce.data
    assert pkt["ISAKMP Vendor ID"].VendorID == vid.data
    assert pkt["ISAKMP Hash"].hash == hsh.data
    assert pkt["ISAKMP Hash"].next_payload == 0


def test_we_read_what_scapy_builds():
    from scapy.layers.isakmp import (
        ISAKMP,
        ISAKMP_payload_Hash,
        ISAKMP_payload_KE,
        ISAKMP_payload_Nonce,
        ISAKMP_payload_Proposal,
        ISAKMP_payload_SA,
        ISAKMP_payload_Transform,
        ISAKMP_payload_VendorID,
    )
    pkt = (
        ISAKMP(init_cookie=ICOOKIE, resp_cookie=RCOOKIE, exch_type=2, flags=0, id=0)
        / ISAKMP_payload_SA(prop=ISAKMP_payload_Proposal(
            proposal=1, proto=1, trans_nb=1,
            trans=ISAKMP_payload_Transform(transform_count=1, transform_id=1, transforms=[
                ("Encryption", "AES-CBC"), ("KeyLength", 128), ("Hash", "SHA2-256"),
                ("Authentication", "XAUTHInitPreShared"), ("GroupDesc", "2048MODPgr"),
                ("LifeType", "Seconds"), ("LifeDuration", 86400)])))
        / ISAKMP_payload_KE(ke=b"k" * 128)
        / ISAKMP_payload_Nonce(nonce=b"n" * 24)
        / ISAKMP_payload_VendorID(VendorID=C.VID_DPD)
        / ISAKMP_payload_Hash(hash=b"h" * 32)
    )
    raw = bytes(pkt)
    msg = I.parse_message(raw)
    assert msg.header == I.Header(ICOOKIE, RCOOKIE, C.EXCH_MAIN, 0, 0, C.PT_SA, len(raw))
    assert msg.payloads == (
        I.SecurityAssociation([I.Proposal(1, C.PROTO_ISAKMP, b"", [I.Transform(1, C.KEY_IKE, [
            I.Attribute(C.P1_ENCRYPTION, C.ENC_AES_CBC), I.Attribute(C.P1_KEY_LENGTH, 128),
            I.Attribute(C.P1_HASH, C.HASH_SHA2_256), I.Attribute(C.P1_AUTH_METHOD, C.AUTH_XAUTH_INIT_PSK),
            I.Attribute(C.P1_GROUP_DESC, C.GROUP_MODP_2048), I.Attribute(C.P1_LIFE_TYPE, C.LIFE_SECONDS),
            I.Attribute(C.P1_LIFE_DURATION, (86400).to_bytes(3, "big"))])])]),
        I.KeyExchange(b"k" * 128), I.Nonce(b"n" * 24), I.VendorID(C.VID_DPD), I.Hash(b"h" * 32),
    )
    # and we rebuild scapy's bytes exactly
    assert I.build_message(I.Header(ICOOKIE, RCOOKIE, C.EXCH_MAIN), msg.payloads) == raw


# -- properties -----------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
attribute = st.builds(I.Attribute, st.integers(0, 0x7FFF), st.one_of(u16, st.binary(max_size=12)))
attributes = st.lists(attribute, max_size=4).map(tuple)
transform = st.builds(I.Transform, u8, u8, attributes)
proposal = st.builds(I.Proposal, u8, u8, st.binary(max_size=16), st.lists(transform, min_size=1, max_size=3))
sa_payload = st.builds(I.SecurityAssociation, st.lists(proposal, min_size=1, max_size=3),
                       st.just(C.DOI_IPSEC), st.sampled_from([0, C.SIT_IDENTITY_ONLY]))
_fixed_id = st.sampled_from(sorted(C.ID_FIXED_LENGTHS.items())).flatmap(
    lambda kv: st.builds(I.Identification, st.just(kv[0]), st.binary(min_size=kv[1], max_size=kv[1]), u8, u16))
_free_id = st.builds(I.Identification, u8.filter(lambda t: t not in C.ID_FIXED_LENGTHS), st.binary(max_size=24),
                     u8, u16)
_delete = st.tuples(st.integers(0, 16), st.integers(0, 3)).flatmap(lambda t: st.builds(
    I.Delete, u8, st.just(t[0]), st.lists(st.binary(min_size=t[0], max_size=t[0]), min_size=t[1], max_size=t[1]), u32))
_nat_oa = st.one_of(
    st.builds(I.NatOA, st.just(1), st.binary(min_size=4, max_size=4), st.sampled_from([21, 131])),
    st.builds(I.NatOA, st.just(5), st.binary(min_size=16, max_size=16), st.sampled_from([21, 131])),
    st.builds(I.NatOA, u8.filter(lambda t: t not in (1, 5)), st.binary(max_size=20), st.sampled_from([21, 131])),
)
_KNOWN_TYPES = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 20, 21, 130, 131}
data = st.binary(max_size=40)
payload = st.one_of(
    sa_payload,
    st.builds(I.KeyExchange, data), _fixed_id, _free_id,
    st.builds(I.Certificate, u8, data), st.builds(I.CertificateRequest, u8, data),
    st.builds(I.Hash, data), st.builds(I.Signature, data), st.builds(I.Nonce, data),
    st.builds(I.Notification, u16, u8, st.binary(max_size=16), data, u32),
    _delete, st.builds(I.VendorID, data),
    st.builds(I.AttributePayload, u8, u16, attributes),
    st.builds(I.NatD, data, st.sampled_from([20, 130])), _nat_oa,
    st.builds(I.UnknownPayload, u8.filter(lambda t: t not in _KNOWN_TYPES), data),
)
header = st.builds(I.Header, st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=8), u8,
                   u8.map(lambda f: f & ~C.FLAG_ENCRYPTION), u32)
messages = st.tuples(header, st.lists(payload, max_size=6))


@PROPS
@given(messages)
def test_built_messages_reparse_to_equal_records(m):
    hdr, payloads = m
    raw = I.build_message(hdr, payloads)
    msg = I.parse_message(raw)
    assert msg.payloads == tuple(payloads)
    assert msg.ciphertext is None
    first = payloads[0].payload_type if payloads else 0
    assert msg.header == I.Header(hdr.icookie, hdr.rcookie, hdr.exchange, hdr.flags, hdr.message_id,
                                  first, len(raw))
    assert I.build_message(msg.header, msg.payloads) == raw


@PROPS
@given(st.lists(payload, min_size=1, max_size=5), st.binary(max_size=16))
def test_decrypted_chains_reparse_with_padding(payloads, padding):
    chain = I.build_payloads(payloads)
    assert I.parse_payloads(payloads[0].payload_type, chain + padding, padded=True) == tuple(payloads)


def _parse_only_isakmp_error(raw: bytes) -> None:
    """Parse; anything but ISAKMPError fails the test.  What parses must rebuild to bytes
    that parse to the same records."""
    try:
        msg = I.parse_message(raw)
    except I.ISAKMPError as exc:
        assert exc.notify in C.NOTIFY_NAMES
        return
    again = I.parse_message(I.build_message(msg.header, msg.payloads, ciphertext=msg.ciphertext))
    assert again == msg


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_isakmp_error(raw):
    _parse_only_isakmp_error(raw)


@FUZZ
@given(st.binary(min_size=28, max_size=28).map(lambda b: b[:17] + b"\x10" + b[18:]), st.binary(max_size=120))
def test_random_chains_behind_a_valid_header_only_raise_isakmp_error(hdr, body):
    raw = hdr[:24] + struct.pack("!I", 28 + len(body)) + body
    _parse_only_isakmp_error(raw)
    for first in (C.PT_SA, C.PT_ID, C.PT_NOTIFY, C.PT_DELETE, C.PT_ATTRIBUTE, C.PT_NAT_OA):
        try:
            I.parse_payloads(first, body, padded=bool(len(body) & 1))
        except I.ISAKMPError:
            pass


@FUZZ
@given(messages, st.lists(st.tuples(st.integers(0, 10_000), u8), min_size=1, max_size=4), st.integers(0, 10_000),
       st.booleans())
def test_mutated_and_truncated_messages_only_raise_isakmp_error(m, flips, cut, encrypt):
    hdr, payloads = m
    raw = bytearray(I.build_message(hdr, payloads))
    if encrypt:
        raw[19] |= C.FLAG_ENCRYPTION
    for pos, value in flips:
        raw[pos % len(raw)] = value
    _parse_only_isakmp_error(bytes(raw))
    _parse_only_isakmp_error(bytes(raw[:cut % (len(raw) + 1)]))
    _parse_only_isakmp_error(bytes(raw[:max(28, cut % (len(raw) + 1))]) + b"\0" * (cut % 5))


@FUZZ
@given(st.lists(payload, min_size=1, max_size=4), st.integers(0, 10_000), u8)
def test_mutated_sa_and_attribute_bodies_only_raise_isakmp_error(payloads, pos, value):
    chain = bytearray(I.build_payloads(payloads))
    chain[pos % len(chain)] = value
    try:
        I.parse_payloads(payloads[0].payload_type, bytes(chain))
    except I.ISAKMPError:
        pass


# -- tshark (Wireshark's ISAKMP dissector) as a second oracle, for what scapy cannot read ----

_TSHARK_FIELDS = [
    "isakmp.ispi", "isakmp.exchangetype", "isakmp.prop.number", "isakmp.spi", "isakmp.trans.id",
    "isakmp.ipsec.attr.encap_mode", "isakmp.ike.attr.authentication_method", "isakmp.ike.attr.life_duration",
    "isakmp.id.data.ipv4_subnet", "isakmp.ike.nat_hash", "isakmp.ike.nat_original_address_ipv4",
    "isakmp.cfg.type", "isakmp.cfg.identifier", "isakmp.cfg.attr.internal_ip4_address", "isakmp.cfg.attr.type",
    "isakmp.notify.data.dpd.are_you_there", "isakmp.delete.spi", "isakmp.vid_bytes",
    "_ws.malformed", "_ws.expert.severity",
]


def _tshark(tmp_path, *messages: bytes) -> list[dict[str, str]]:
    import subprocess

    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    need_tools("tshark")
    pcap = tmp_path / "isakmp.pcap"
    wrpcap(str(pcap), [IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=500, dport=500) / Raw(m) for m in messages])
    cmd = ["tshark", "-r", str(pcap), "-T", "fields", "-E", "aggregator=|"]
    for f in _TSHARK_FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [dict(zip(_TSHARK_FIELDS, line.split("\t"))) for line in out.splitlines()]


def test_tshark_reads_every_payload_we_build(tmp_path):
    quick = I.build_message(I.Header(ICOOKIE, RCOOKIE, C.EXCH_QUICK, 0, 5), [
        QUICK_RECORD, I.Nonce(b"N" * 16),
        I.Identification(C.ID_IPV4_ADDR_SUBNET, bytes([10, 0, 0, 0, 255, 255, 255, 0])),
        I.NatOA(C.ID_IPV4_ADDR, bytes([192, 168, 1, 2])),
    ])
    main = I.build_message(I.Header(ICOOKIE, RCOOKIE, C.EXCH_MAIN), [
        PHASE1_RECORD, I.NatD(b"D" * 20), I.NatD(b"E" * 20), I.VendorID(C.VID_DPD), I.VendorID(C.VID_NATT_RFC3947)])
    xauth = I.build_message(I.Header(ICOOKIE, RCOOKIE, C.EXCH_TRANSACTION, 0, 9), [
        I.AttributePayload(C.CFG_REPLY, 1234, [
            I.Attribute(C.INTERNAL_IP4_ADDRESS, bytes([10, 3, 0, 1])), I.Attribute(C.XAUTH_TYPE, 0),
            I.Attribute(C.XAUTH_USER_NAME, b"alice")])])
    info = I.build_message(I.Header(ICOOKIE, RCOOKIE, C.EXCH_INFORMATIONAL, 0, 11), [
        I.Notification(C.R_U_THERE, C.PROTO_ISAKMP, ICOOKIE + RCOOKIE, struct.pack("!I", 4242)),
        I.Delete(C.PROTO_IPSEC_ESP, 4, [bytes.fromhex("c0ffee01"), bytes.fromhex("c0ffee02")])])
    # control: the same quick mode with a transform count that lies -- tshark must notice
    broken = bytearray(quick)
    broken[28 + 12 + 7] = 2
    rows = _tshark(tmp_path, quick, main, xauth, info, bytes(broken))
    q, m, x, n, b = rows
    assert q["isakmp.ispi"] == ICOOKIE.hex() and q["isakmp.exchangetype"] == "32"
    assert q["isakmp.prop.number"] == "1|2"
    assert q["isakmp.spi"] == "c0ffee01|c0ffee02"
    assert q["isakmp.trans.id"] == "12|3"
    assert q["isakmp.ipsec.attr.encap_mode"] == "3|61443"
    assert q["isakmp.id.data.ipv4_subnet"] == "255.255.255.0"
    assert q["isakmp.ike.nat_original_address_ipv4"] == "192.168.1.2"
    assert m["isakmp.ike.attr.authentication_method"] == str(C.AUTH_XAUTH_INIT_PSK)
    assert m["isakmp.ike.attr.life_duration"] == "28800"
    assert m["isakmp.ike.nat_hash"] == f"{(b'D' * 20).hex()}|{(b'E' * 20).hex()}"
    assert m["isakmp.vid_bytes"] == f"{C.VID_DPD.hex()}|{C.VID_NATT_RFC3947.hex()}"
    assert (x["isakmp.cfg.type"], x["isakmp.cfg.identifier"]) == ("2", "1234")
    assert x["isakmp.cfg.attr.internal_ip4_address"] == "10.3.0.1"
    assert x["isakmp.cfg.attr.type"] == "1|16520|16521"
    assert n["isakmp.notify.data.dpd.are_you_there"] == "4242"
    assert n["isakmp.delete.spi"] == "c0ffee01|c0ffee02"
    for row in (q, m, x, n):
        assert row["_ws.malformed"] == "" and row["_ws.expert.severity"] == "", row
    assert b["_ws.malformed"] != "" or b["_ws.expert.severity"] != ""
    with pytest.raises(I.ISAKMPError) as exc:
        I.parse_message(bytes(broken))
    assert exc.value.notify == C.BAD_PROPOSAL_SYNTAX
