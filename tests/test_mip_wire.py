"""Mobile IPv4 codec (narsuite.mipproxy.wire) against bytes laid out by hand from
RFC 5944 / 3519 / 2794 / 3024 and the draft's figure, against scapy's Mobile IP layer
(fixed parts), against an independent HMAC-MD5, plus fuzzing: only MIPError escapes."""

from __future__ import annotations

import hashlib
import hmac

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.mobileip import MobileIP, MobileIPRRP, MobileIPRRQ, MobileIPTunnelData

from narsuite.mipproxy import wire
from narsuite.mipproxy.wire import (
    AuthExtension,
    DraftNumbers,
    EncapsulatingDeliveryStyle,
    HAParameterExtension,
    MIPError,
    NAIExtension,
    RegistrationReply,
    RegistrationRequest,
    TunnelData,
    UDPTunnelReply,
    UDPTunnelRequest,
    UnknownExtension,
)

# Fixed part of a Registration Request, RFC 5944 3.3, field by field.
REQ_FIXED = bytes.fromhex(
    "01"  # type 1
    "02"  # flags: T only
    "0708"  # lifetime 1800
    "0a000005"  # home address 10.0.0.5
    "c0000201"  # home agent 192.0.2.1
    "c6336407"  # care-of address 198.51.100.7
    "0102030405060708"  # identification
)
REQ = RegistrationRequest(wire.FLAG_T, 1800, "10.0.0.5", "192.0.2.1", "198.51.100.7",
                          0x0102030405060708)
# Registration Reply, RFC 5944 3.4.
REP_FIXED = bytes.fromhex("03" "00" "0708" "0a000005" "c0000201" "0102030405060708")
REP = RegistrationReply(0, 1800, "10.0.0.5", "192.0.2.1", 0x0102030405060708)

KEY = bytes(range(16))
SPI = 0x1000


def independent_mn_ha(message: bytes, spi: int, key: bytes) -> bytes:
    """The MN-HA authentication extension computed here without the codec: HMAC-MD5
    over the message, prior extensions, and this extension's Type, Length and SPI."""
    head = bytes([32, 20]) + spi.to_bytes(4, "big")
    return head + hmac.new(key, message + head, hashlib.md5).digest()


# -- fixed parts ------------------------------------------------------------------------------


def test_request_fixed_part_matches_rfc_layout():
    assert wire.encode_request(REQ) == REQ_FIXED
    assert wire.decode_request(REQ_FIXED) == REQ
    assert wire.decode_message(REQ_FIXED) == REQ
    assert len(REQ_FIXED) == wire.REQUEST_LEN == 24


def test_reply_fixed_part_matches_rfc_layout():
    assert wire.encode_reply(REP) == REP_FIXED
    assert wire.decode_reply(REP_FIXED) == REP
    assert wire.decode_message(REP_FIXED) == REP
    assert REP.accepted and not RegistrationReply(64, 0, "0.0.0.0", "0.0.0.0", 0).accepted
    assert RegistrationReply(1, 0, "0.0.0.0", "0.0.0.0", 0).accepted


def test_request_flag_bits():
    # RFC 5944 3.3: S B D M G r T x from the most significant bit down.
    assert (wire.FLAG_S, wire.FLAG_B, wire.FLAG_D, wire.FLAG_M, wire.FLAG_G, wire.FLAG_R,
            wire.FLAG_T, wire.FLAG_X) == (0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01)
    names = ["s", "b", "d", "m", "g", None, "t", None]
    for bit, name in zip(range(7, -1, -1), names):
        raw = bytearray(REQ_FIXED)
        raw[1] = 1 << bit
        req = wire.decode_request(bytes(raw))
        assert req.flags == 1 << bit  # reserved r/x are kept for a relay to copy
        for other in ("s", "b", "d", "m", "g", "t"):
            assert getattr(req, other) == (other == name)
        assert wire.encode_request(req) == bytes(raw)


def test_tunnel_data_layout_and_next_headers():
    inner = bytes(IP(src="10.0.0.5", dst="203.0.113.9") / ICMP())
    for nh in (4, 47, 55):
        raw = bytes([4, nh, 0, 0]) + inner
        assert wire.encode_tunnel_data(TunnelData(nh, inner)) == raw
        assert wire.decode_message(raw) == TunnelData(nh, inner)
    # Reserved is ignored on receipt, zero on send.
    assert wire.decode_tunnel_data(b"\x04\x04\xff\xff" + inner) == TunnelData(4, inner)
    with pytest.raises(MIPError) as e:
        wire.decode_tunnel_data(b"\x04\x11\x00\x00" + inner)  # UDP is no tunnel next header
    assert e.value.code is None


@pytest.mark.parametrize("raw", [b"", b"\x01", REQ_FIXED[:23], REP_FIXED[:19], b"\x04\x04\x00",
                                 b"\x02" + bytes(30), b"\x07" + bytes(30)])
def test_short_or_unknown_messages_are_dropped_not_answered(raw):
    with pytest.raises(MIPError) as e:
        wire.decode_message(raw)
    assert e.value.code is None and e.value.header is None


def test_decoders_refuse_each_others_types():
    for fn, raw in ((wire.decode_request, REP_FIXED + bytes(4)), (wire.decode_reply, REQ_FIXED),
                    (wire.decode_tunnel_data, REQ_FIXED)):
        with pytest.raises(MIPError) as e:
            fn(raw)
        assert e.value.code is None


# -- scapy as an independent oracle for the fixed parts ----------------------------------------


def test_scapy_reads_our_request_reply_and_tunnel_data():
    req = RegistrationRequest(0xA2, 600, "10.1.2.3", "192.0.2.44", "198.51.100.200", 2**64 - 2)
    p = MobileIP(wire.encode_request(req))
    assert p.type == 1
    rrq = p[MobileIPRRQ]
    assert (rrq.flags, rrq.lifetime, rrq.homeaddr, rrq.haaddr, rrq.coaddr, rrq.id) == (
        0xA2, 600, "10.1.2.3", "192.0.2.44", "198.51.100.200", 2**64 - 2)

    rep = RegistrationReply(136, 0, "10.1.2.3", "192.0.2.44", 77)
    rrp = MobileIP(wire.encode_reply(rep))[MobileIPRRP]
    assert (rrp.code, rrp.lifetime, rrp.homeaddr, rrp.haaddr, rrp.id) == (
        136, 0, "10.1.2.3", "192.0.2.44", 77)

    inner = IP(src="10.1.2.3", dst="203.0.113.1") / ICMP(id=7)
    td = MobileIP(wire.encode_tunnel_data(TunnelData(4, bytes(inner))))
    assert td.type == 4 and td[MobileIPTunnelData].nexthdr == 4 and td[MobileIPTunnelData].res == 0
    assert td[IP].dst == "203.0.113.1" and td[ICMP].id == 7


def test_we_read_scapys_request_reply_and_tunnel_data():
    raw = bytes(MobileIP(type=1) / MobileIPRRQ(flags=0x5A, lifetime=65535, homeaddr="10.9.8.7",
                                                haaddr="192.0.2.2", coaddr="0.0.0.0", id=12345))
    assert wire.decode_request(raw) == RegistrationRequest(
        0x5A, 65535, "10.9.8.7", "192.0.2.2", "0.0.0.0", 12345)

    raw = bytes(MobileIP(type=3) / MobileIPRRP(code=131, lifetime=5, homeaddr="10.9.8.7",
                                                haaddr="192.0.2.2", id=2**63))
    assert wire.decode_reply(raw) == RegistrationReply(131, 5, "10.9.8.7", "192.0.2.2", 2**63)

    inner = IP(src="10.9.8.7", dst="203.0.113.1") / ICMP()
    raw = bytes(MobileIP(type=4) / MobileIPTunnelData(nexthdr=4) / inner)
    assert wire.decode_message(raw) == TunnelData(4, bytes(inner))


def test_scapy_over_udp_434_sees_our_request_with_extensions_as_payload():
    msg = wire.encode_request(attrs_evolve_ext(REQ, NAIExtension(b"mn@example.com")))
    pkt = IP(bytes(IP(src="198.51.100.7", dst="192.0.2.1") / UDP(sport=434, dport=434) / msg))
    assert pkt[MobileIPRRQ].coaddr == "198.51.100.7"
    assert bytes(pkt[UDP].payload) == msg


def attrs_evolve_ext(msg, *exts):
    return attrs.evolve(msg, extensions=msg.extensions + exts)


# -- extensions, byte-exact --------------------------------------------------------------------

EXT_CASES = [
    # RFC 5944 3.5.2: Type 32, Length 4+16, SPI, authenticator.
    (AuthExtension(32, 0x12345678, bytes(range(16))),
     bytes.fromhex("2014" "12345678") + bytes(range(16))),
    (AuthExtension(33, 256, b"\xaa" * 16), bytes.fromhex("2114" "00000100") + b"\xaa" * 16),
    (AuthExtension(34, 2**32 - 1, b""), bytes.fromhex("2204" "ffffffff")),
    # RFC 2794: Type 131, Length, NAI (no terminator).
    (NAIExtension(b"joe@corp.example"), b"\x83\x10joe@corp.example"),
    # RFC 3519 3.1: Type 144, Length 6, Sub-Type 0, Reserved 1, F|R|Reserved 2, Encapsulation, Reserved 3.
    (UDPTunnelRequest(4), bytes.fromhex("9006" "00" "00" "00" "04" "0000")),
    (UDPTunnelRequest(47, force=True), bytes.fromhex("9006" "00" "00" "80" "2f" "0000")),
    (UDPTunnelRequest(55, fa_required=True), bytes.fromhex("9006" "00" "00" "40" "37" "0000")),
    # RFC 3519 3.2: Type 44, Length 6, Sub-Type, Reply Code, F|Reserved (16), Keepalive Interval.
    (UDPTunnelReply(0, 110), bytes.fromhex("2c06" "00" "00" "0000" "006e")),
    (UDPTunnelReply(64, 0, forced=True), bytes.fromhex("2c06" "00" "40" "8000" "0000")),
    # RFC 3024: Type 130, Length 0.
    (EncapsulatingDeliveryStyle(), bytes.fromhex("8200")),
    # Draft 2.5.3 with our default numbers: Type 127, Length 6, Sub-Type 0, Reserved, HA address.
    (HAParameterExtension("10.20.30.40"), bytes.fromhex("7f06" "00" "00" "0a141e28")),
    (HAParameterExtension("0.0.0.0"), bytes.fromhex("7f06" "00" "00" "00000000")),
    # Skippable extensions we do not know are kept, byte for byte.
    (UnknownExtension(200, b"\x01\x02\x03"), bytes.fromhex("c803010203")),
    (UnknownExtension(255, b""), bytes.fromhex("ff00")),
]


@pytest.mark.parametrize("ext,raw", EXT_CASES, ids=lambda x: type(x).__name__ if not isinstance(x, bytes) else None)
def test_extension_layout_and_round_trip(ext, raw):
    assert wire.encode_extension(ext) == raw
    for template, fixed, decode in ((REQ, REQ_FIXED, wire.decode_request),
                                    (REP, REP_FIXED, wire.decode_reply)):
        got = decode(fixed + raw)
        assert got.extensions == (ext,)
        assert wire.encode_message(got) == fixed + raw
        assert got == attrs_evolve_ext(template, ext)


def test_extension_chain_in_order():
    exts = tuple(e for e, _ in EXT_CASES)
    raw = REQ_FIXED + b"".join(r for _, r in EXT_CASES)
    assert wire.decode_request(raw).extensions == exts
    assert wire.encode_request(attrs_evolve_ext(REQ, *exts)) == raw


def test_reserved_fields_ignored_on_receipt():
    utrq = bytes.fromhex("9006" "00" "ff" "ff" "04" "ffff")  # all reserved bits set, F and R too
    assert wire.decode_request(REQ_FIXED + utrq).extensions == (UDPTunnelRequest(4, True, True),)
    utrp = bytes.fromhex("2c06" "00" "00" "7fff" "0005")  # reserved set, F clear
    assert wire.decode_reply(REP_FIXED + utrp).extensions == (UDPTunnelReply(0, 5, False),)
    hap = bytes.fromhex("7f06" "00" "ee" "c0000201")
    assert wire.decode_request(REQ_FIXED + hap).extensions == (HAParameterExtension("192.0.2.1"),)


def test_draft_numbers_are_configurable():
    nums = DraftNumbers(ha_parameter_type=120, ha_parameter_subtype=3)
    raw = bytes.fromhex("7806" "03" "00" "0a000001")
    ext = HAParameterExtension("10.0.0.1")
    assert wire.encode_extension(ext, nums) == raw
    assert wire.decode_request(REQ_FIXED + raw, nums).extensions == (ext,)
    # Under the default numbers type 120 is an unknown non-skippable extension.
    with pytest.raises(MIPError) as e:
        wire.decode_request(REQ_FIXED + raw)
    assert e.value.code == 134
    # Right type, wrong sub-type: not ours, and non-skippable.
    with pytest.raises(MIPError):
        wire.decode_request(REQ_FIXED + bytes.fromhex("7f06" "01" "00" "0a000001"))
    # A skippable HA Parameter type still decodes when configured.
    nums = DraftNumbers(ha_parameter_type=250)
    assert wire.decode_request(REQ_FIXED + bytes.fromhex("fa06" "00" "00" "0a000001"),
                               nums).extensions == (ext,)


def test_draft_numbers_defaults_and_validation():
    n = wire.DEFAULT_NUMBERS
    assert (n.ha_parameter_type, n.ha_parameter_subtype) == (127, 0)
    assert list(n.codes().values()) == [200, 201, 202, 203, 204, 205, 206]
    assert wire.reply_code_name(206) == "draft-assigned-home-agent"
    assert wire.reply_code_name(210, DraftNumbers(assigned_home_agent=210)) == "draft-assigned-home-agent"
    assert wire.reply_code_name(134) == "ha-poorly-formed-request"
    assert wire.reply_code_name(142) == "ha-udp-encapsulation-unavailable"
    assert wire.reply_code_name(250) == "denied-ha-250"
    with pytest.raises(ValueError, match="already a known extension"):
        DraftNumbers(ha_parameter_type=131)
    with pytest.raises(ValueError, match="distinct"):
        DraftNumbers(missing_nai=200)
    with pytest.raises(ValueError, match="clash"):
        DraftNumbers(missing_nai=134)
    with pytest.raises(ValueError):
        DraftNumbers(ha_unreachable=256)


def test_reply_code_constants():
    assert (wire.REG_ACCEPTED, wire.REG_ACCEPTED_NO_SIMULTANEOUS) == (0, 1)
    assert (wire.REG_FA_POORLY_FORMED_REQUEST, wire.REG_FA_POORLY_FORMED_REPLY) == (70, 71)
    assert (wire.REG_FA_REVERSE_TUNNEL_MANDATORY, wire.REG_HA_REVERSE_TUNNEL_MANDATORY) == (75, 138)
    assert (wire.REG_HA_MN_FAILED_AUTH, wire.REG_HA_POORLY_FORMED_REQUEST) == (131, 134)
    assert wire.REG_HA_INSUFFICIENT_RESOURCES == 130
    assert wire.REG_HA_UDP_ENCAPSULATION_UNAVAILABLE == 142
    assert (wire.REG_FA_MISSING_NAI, wire.REG_FA_MISSING_HOME_ADDRESS) == (97, 99)


# -- what must be refused ----------------------------------------------------------------------


@pytest.mark.parametrize("ext_raw", [
    bytes.fromhex("2600"),  # 38 (CVSE, long format): non-skippable, unknown to us
    bytes.fromhex("0000"),  # 0
    bytes.fromhex("2401" "01"),  # 36 generalized authentication
    bytes.fromhex("9005" "0000000400"),  # UDP Tunnel Request of the wrong length
    bytes.fromhex("2c05" "0000000000"),  # UDP Tunnel Reply of the wrong length
    bytes.fromhex("8201" "00"),  # Encapsulating Delivery Style with data
    bytes.fromhex("7f05" "0000000000"),  # HA Parameter of the wrong length
    bytes.fromhex("2003" "000001"),  # auth extension without a whole SPI
    bytes.fromhex("83"),  # header cut after Type
    bytes.fromhex("8305" "616263"),  # data shorter than Length
])
def test_bad_extensions_answered_poorly_formed_request(ext_raw):
    raw = REQ_FIXED + ext_raw
    with pytest.raises(MIPError) as e:
        wire.decode_request(raw)
    assert e.value.code == wire.REG_HA_POORLY_FORMED_REQUEST
    assert e.value.header == REQ  # enough to address the denial
    with pytest.raises(MIPError) as e:
        wire.decode_request(raw, poorly_formed_code=70)
    assert e.value.code == 70
    # A reply with the same defect is dropped by default, or answered 71 on request.
    with pytest.raises(MIPError) as e:
        wire.decode_reply(REP_FIXED + ext_raw)
    assert e.value.code is None and e.value.header == REP
    with pytest.raises(MIPError) as e:
        wire.decode_reply(REP_FIXED + ext_raw, poorly_formed_code=71)
    assert e.value.code == 71


def test_mip_error_is_a_value_error():
    assert issubclass(MIPError, ValueError)


@pytest.mark.parametrize("make", [
    lambda: RegistrationRequest(256, 0, "0.0.0.0", "0.0.0.0", "0.0.0.0", 0),
    lambda: RegistrationRequest(0, 65536, "0.0.0.0", "0.0.0.0", "0.0.0.0", 0),
    lambda: RegistrationRequest(0, 0, "1.2.3", "0.0.0.0", "0.0.0.0", 0),
    lambda: RegistrationRequest(0, 0, 5, "0.0.0.0", "0.0.0.0", 0),
    lambda: RegistrationReply(0, 0, "0.0.0.0", "0.0.0.0", 2**64),
    lambda: AuthExtension(35, 300, b""),
    lambda: AuthExtension(32, 300, bytes(252)),
    lambda: NAIExtension(bytes(256)),
    lambda: UDPTunnelReply(keepalive=70000),
    lambda: HAParameterExtension("::1"),
    lambda: UnknownExtension(256, b""),
    lambda: TunnelData(300, b""),
])
def test_records_refuse_values_the_wire_cannot_carry(make):
    with pytest.raises(ValueError):
        make()


# -- authentication ---------------------------------------------------------------------------


def test_hmac_md5_is_rfc_2104():
    # RFC 2202 test case 1 for HMAC-MD5.
    assert wire.compute_authenticator(b"\x0b" * 16, b"Hi There").hex() == \
        "9294727a3638bb1c13f48ef8158bfc9d"


def test_add_mn_ha_auth_matches_independent_computation():
    body = wire.encode_request(attrs_evolve_ext(REQ, NAIExtension(b"mn@corp"), UDPTunnelRequest()))
    signed = wire.add_mn_ha_auth(body, SPI, KEY)
    assert signed == body + independent_mn_ha(body, SPI, KEY)
    msg = wire.decode_request(signed)
    assert msg.extensions[-1] == AuthExtension(32, SPI, independent_mn_ha(body, SPI, KEY)[6:])
    assert wire.verify_mn_ha_auth(signed, {SPI: KEY}.get) == (SPI, True)
    # Replies too.
    rbody = wire.encode_reply(REP)
    rsigned = wire.add_mn_ha_auth(rbody, 0xFFFFFFFF, KEY)
    assert rsigned == rbody + independent_mn_ha(rbody, 0xFFFFFFFF, KEY)
    assert wire.verify_mn_ha_auth(rsigned, {0xFFFFFFFF: KEY}.get) == (0xFFFFFFFF, True)


def test_other_auth_types_use_the_same_rule():
    body = wire.add_mn_ha_auth(wire.encode_request(REQ), SPI, KEY)
    signed = wire.add_auth(body, wire.EXT_MN_FA_AUTH, 999, b"fa-key")
    head = bytes([33, 20]) + (999).to_bytes(4, "big")
    assert signed == body + head + hmac.new(b"fa-key", body + head, hashlib.md5).digest()
    assert wire.verify_auth(signed, 33, {999: b"fa-key"}.get) == (999, True)
    # The MN-FA extension after the MN-HA one does not disturb the MN-HA check...
    assert wire.verify_mn_ha_auth(signed, {SPI: KEY}.get) == (SPI, True)
    # ...and is not among the extensions the MN-HA authenticator covers.
    msg = wire.decode_request(signed)
    assert len(msg.extensions) == 2 and wire.authenticated_extensions(msg) == ()
    with pytest.raises(ValueError):
        wire.add_auth(body, wire.EXT_NAI, 999, b"k")


def test_tampering_anywhere_is_detected():
    body = wire.encode_request(attrs_evolve_ext(REQ, NAIExtension(b"mn@corp"),
                                                HAParameterExtension("10.0.0.1")))
    signed = wire.add_mn_ha_auth(body, SPI, KEY)
    keys = {SPI: KEY, SPI ^ 1: KEY}.get  # a flipped SPI bit still finds a key: the MAC must catch it
    for i in range(len(signed)):
        for bit in (0x01, 0x80):
            bad = bytearray(signed)
            bad[i] ^= bit
            try:
                spi, ok = wire.verify_mn_ha_auth(bytes(bad), keys)
            except MIPError:
                continue  # the flip broke the framing (type or length byte): refused anyway
            assert not ok, (i, bit)


def test_verification_failures():
    body = wire.encode_request(REQ)
    signed = wire.add_mn_ha_auth(body, SPI, KEY)
    assert wire.verify_mn_ha_auth(signed, {SPI: b"other key"}.get) == (SPI, False)
    assert wire.verify_mn_ha_auth(signed, {}.get) == (SPI, False)
    assert wire.verify_mn_ha_auth(body, {SPI: KEY}.get) == (None, False)  # no extension at all
    # Reserved SPI: refused even if a key is configured for it.
    reserved = body + independent_mn_ha(body, 255, KEY)
    assert wire.verify_mn_ha_auth(reserved, {255: KEY}.get) == (255, False)
    # Not HMAC-MD5-sized: refused.
    short = body + bytes([32, 12]) + SPI.to_bytes(4, "big") + bytes(8)
    assert wire.verify_mn_ha_auth(short, {SPI: KEY}.get) == (SPI, False)
    # Truncated authenticator makes the chain unwalkable.
    with pytest.raises(MIPError):
        wire.verify_mn_ha_auth(signed[:-1], {SPI: KEY}.get)
    with pytest.raises(MIPError):
        wire.verify_mn_ha_auth(b"\x04\x04\x00\x00", {SPI: KEY}.get)
    for spi in (0, 255, 2**32):
        with pytest.raises(ValueError):
            wire.add_mn_ha_auth(body, spi, KEY)


def test_verifier_uses_constant_time_comparison(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(wire.hmac, "compare_digest", spy)
    signed = wire.add_mn_ha_auth(wire.encode_request(REQ), SPI, KEY)
    assert wire.verify_mn_ha_auth(signed, {SPI: KEY}.get) == (SPI, True)
    assert len(calls) == 1


def test_authenticated_extensions_are_those_before_mn_ha():
    body = wire.encode_request(attrs_evolve_ext(REQ, NAIExtension(b"x@y")))
    signed = wire.add_mn_ha_auth(body, SPI, KEY) + wire.encode_extension(UDPTunnelRequest())
    msg = wire.decode_request(signed)
    assert wire.authenticated_extensions(msg) == (NAIExtension(b"x@y"),)
    assert isinstance(msg.extensions[-1], UDPTunnelRequest)  # present, but not covered
    assert wire.authenticated_extensions(REQ) == ()


# -- properties -------------------------------------------------------------------------------

addrs = st.integers(0, 2**32 - 1).map(lambda n: ".".join(str(b) for b in n.to_bytes(4, "big")))
u8, u16, u32, u64 = (st.integers(0, 2**b - 1) for b in (8, 16, 32, 64))
exts = st.one_of(
    st.builds(AuthExtension, st.sampled_from(sorted(wire.AUTH_TYPES)), u32, st.binary(max_size=40)),
    st.builds(NAIExtension, st.binary(max_size=255)),
    st.builds(UDPTunnelRequest, u8, st.booleans(), st.booleans(), u8),
    st.builds(UDPTunnelReply, u8, u16, st.booleans(), u8),
    st.just(EncapsulatingDeliveryStyle()),
    st.builds(HAParameterExtension, addrs),
    st.builds(UnknownExtension, st.integers(128, 255).filter(
        lambda t: t not in (wire.EXT_ENCAP_DELIVERY, wire.EXT_NAI, wire.EXT_UDP_TUNNEL_REQUEST)),
        st.binary(max_size=255)),
)
ext_lists = st.lists(exts, max_size=6).map(tuple)
requests = st.builds(RegistrationRequest, u8, u16, addrs, addrs, addrs, u64, ext_lists)
replies = st.builds(RegistrationReply, u8, u16, addrs, addrs, u64, ext_lists)
tunnels = st.builds(TunnelData, st.sampled_from(sorted(wire.NEXT_HEADERS)), st.binary(max_size=64))


@settings(max_examples=300, deadline=None)
@given(st.one_of(requests, replies, tunnels))
def test_round_trip(msg):
    raw = wire.encode_message(msg)
    assert wire.decode_message(raw) == msg
    assert wire.encode_message(wire.decode_message(raw)) == raw


@settings(max_examples=100, deadline=None)
@given(requests, st.binary(min_size=1, max_size=32), u32.filter(lambda s: s > 255))
def test_round_trip_signed(msg, key, spi):
    signed = wire.add_mn_ha_auth(wire.encode_message(msg), spi, key)
    assert wire.verify_mn_ha_auth(signed, {spi: key}.get) == (spi, True) or any(
        isinstance(e, AuthExtension) and e.type == 32 for e in msg.extensions)
    assert wire.decode_message(signed).extensions[len(msg.extensions):] == (
        AuthExtension(32, spi, independent_mn_ha(wire.encode_message(msg), spi, key)[6:]),)


def _only_mip_errors(fn, *args):
    try:
        fn(*args)
    except MIPError as e:
        assert e.code is None or 0 <= e.code <= 255


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_random_bytes(data):
    """Fails on any exception but MIPError, or a MIPError with a code outside 0-255
    (the assertion is _only_mip_errors')."""
    _only_mip_errors(wire.decode_message, data)
    _only_mip_errors(wire.verify_mn_ha_auth, data, {SPI: KEY}.get)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([1, 3, 4]), st.binary(min_size=19, max_size=80))
def test_fuzz_valid_type_byte(msg_type, rest):
    """As above, past the type byte: every decoder and the authenticator check."""
    data = bytes([msg_type]) + rest
    _only_mip_errors(wire.decode_message, data)
    _only_mip_errors(wire.decode_request, data)
    _only_mip_errors(wire.decode_reply, data)
    _only_mip_errors(wire.decode_tunnel_data, data)
    _only_mip_errors(wire.verify_auth, data, 33, {SPI: KEY}.get)


@settings(max_examples=200, deadline=None)
@given(st.one_of(requests, replies), st.data())
def test_fuzz_truncations_and_flips(msg, data):
    raw = wire.add_mn_ha_auth(wire.encode_message(msg), SPI, KEY)
    cut = data.draw(st.integers(0, len(raw)))
    _only_mip_errors(wire.decode_message, raw[:cut])
    _only_mip_errors(wire.verify_mn_ha_auth, raw[:cut], {SPI: KEY}.get)
    i = data.draw(st.integers(0, len(raw) - 1))
    flipped = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
    _only_mip_errors(wire.decode_message, flipped)
    try:
        spi, ok = wire.verify_mn_ha_auth(flipped, {SPI: KEY}.get)
    except MIPError:
        return
    if i < len(raw) - 22 and ok:
        # Only a flip that left the covered bytes identical could still verify: impossible.
        pytest.fail(f"flip at {i} not detected")


def test_pack_request_and_reply_are_the_encoders_bytes_from_fields():
    """The relay's field-level encoders: byte-equal to encode_request/encode_reply (read by
    scapy too), addresses must be 4 bytes, integers out of range refused by struct."""
    import socket
    import struct

    a = socket.inet_aton
    exts = (wire.NAIExtension(b"mn@example.com"), wire.HAParameterExtension("10.2.0.2"))
    req = wire.RegistrationRequest(0x22, 600, "10.2.0.100", "10.2.0.2", "10.2.0.1", 7 << 32, exts)
    packed = wire.pack_request(0x22, 600, a("10.2.0.100"), a("10.2.0.2"), a("10.2.0.1"), 7 << 32, exts)
    assert packed == wire.encode_request(req)
    assert MobileIP(packed)[MobileIPRRQ].coaddr == "10.2.0.1"
    rep = wire.RegistrationReply(1, 300, "10.2.0.100", "203.0.113.1", 9, exts)
    assert wire.pack_reply(1, 300, a("10.2.0.100"), a("203.0.113.1"), 9, exts) == wire.encode_reply(rep)
    with pytest.raises(ValueError, match="4 bytes"):
        wire.pack_reply(1, 300, b"\x0a\x02\x00", a("203.0.113.1"), 9)
    with pytest.raises(struct.error):
        wire.pack_request(0x22, 70000, a("10.2.0.100"), a("10.2.0.2"), a("10.2.0.1"), 1)
