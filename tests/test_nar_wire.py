"""NAR negotiation codec (narsuite.nar.wire) against byte strings built by hand from the
draft's figures (section 3), plus fuzzing: nothing but NarWireError ever escapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from narsuite.nar import wire
from narsuite.nar.wire import (
    IcmpAssociate,
    IpsecAssociate,
    NarCommands,
    NarWireError,
    SocksRequest,
    TunnelAssociate,
)

CMDS = NarCommands(icmp=1, ipsec=2, tunnel=3)


def test_nar_mode_reply_is_a_socks_reply_with_flags_and_nb():
    # VER 5, REP 0, RSV = FLAG (TRANSLATED|GRE), ATYP 1, BND.ADDR Nb, BND.PORT 0
    got = wire.encode_socks_reply(0, wire.FLAG_TRANSLATED | wire.FLAG_GRE, "192.0.2.1", 0)
    assert got == b"\x05\x00\x03\x01\xc0\x00\x02\x01\x00\x00"
    assert (wire.FLAG_TRANSLATED, wire.FLAG_GRE, wire.FLAG_L2TP) == (0x01, 0x02, 0x04)


def test_nar_mode_request_encoding():
    got = wire.encode_socks_request(0x80, wire.FLAG_L2TP, 1, "192.0.2.10", 0)
    assert got == b"\x05\x80\x04\x01\xc0\x00\x02\x0a\x00\x00"
    assert wire.parse_command(got, CMDS) == (SocksRequest(0x80, 4, 1, "192.0.2.10", 0), 10)


def test_icmp_associate():
    raw = b"\x01\x01\x12\x34"  # VER 1, CMD ICMP-ASSOCIATE, ICMP.ID 0x1234
    assert wire.parse_command(raw, CMDS) == (IcmpAssociate(1, 0x1234), 4)
    assert wire.encode_icmp(1, 0x1234) == raw
    assert wire.encode_icmp(0, 0xBEEF) == b"\x01\x00\xbe\xef"  # reply: CMD -> REP
    assert wire.parse_reply(b"\x01\x00\xbe\xef", "icmp") == (IcmpAssociate(0, 0xBEEF), 4)


def test_ipsec_associate():
    raw = b"\x01\x02\x32\x00\x00\x00\x00"  # ESP, IN.SPI all zeros = none yet
    assert wire.parse_command(raw, CMDS) == (IpsecAssociate(2, 50, 0), 7)
    assert wire.encode_ipsec(2, 50, 0) == raw
    assert wire.encode_ipsec(0, 51, 0xDEADBEEF) == b"\x01\x00\x33\xde\xad\xbe\xef"


def test_tunnel_associate_ipv4_domain_ipv6():
    raw = b"\x01\x03\x01\xac\x10\x00\x05\x04"  # ATYP 1, LTUN.ADDR 172.16.0.5, IP-in-IP
    assert wire.parse_command(raw, CMDS) == (TunnelAssociate(3, 1, "172.16.0.5", 4), 8)
    assert wire.encode_tunnel(3, 1, "172.16.0.5", 4) == raw
    dom = b"\x01\x03\x03\x07home.xb\x2f"
    assert wire.parse_command(dom, CMDS) == (TunnelAssociate(3, 3, "home.xb", 47), len(dom))
    assert wire.encode_tunnel(3, 3, "home.xb", 47) == dom
    v6 = b"\x01\x03\x04" + bytes(15) + b"\x01" + b"\x04"
    assert wire.parse_command(v6, CMDS) == (TunnelAssociate(3, 4, "::1", 4), 20)
    assert wire.encode_tunnel(3, 4, "::1", 4) == v6


def test_configurable_codes():
    cmds = NarCommands(icmp=0x41, ipsec=0x42, tunnel=0x43)
    assert wire.parse_command(b"\x01\x42\x33\x00\x00\x01\x00", cmds) == (
        IpsecAssociate(0x42, 51, 256), 7)
    with pytest.raises(NarWireError) as e:
        wire.parse_command(b"\x01\x02\x33\x00\x00\x01\x00", cmds)
    assert e.value.code == wire.REP_COMMAND_NOT_SUPPORTED


@pytest.mark.parametrize("raw", [
    b"\x01\x01\x12\x34", b"\x01\x02\x32\x00\x00\x01\x00", b"\x01\x03\x01\xac\x10\x00\x05\x04",
    b"\x01\x03\x03\x07home.xb\x2f", b"\x05\x80\x00\x01\xc0\x00\x02\x0a\x00\x00",
    b"\x05\x01\x00\x03\x03abc\x00\x50",
])
def test_incremental(raw):
    for n in range(len(raw)):
        assert wire.parse_command(raw[:n], CMDS) is None, n
    msg, used = wire.parse_command(raw + b"\x01\x01", CMDS)
    assert used == len(raw)
    assert wire.encode_message(msg) == raw


@pytest.mark.parametrize("raw, code", [
    (b"\x04\x01\x00\x00", wire.REP_GENERAL_FAILURE),  # unknown VER
    (b"GET / HTTP/1.0\r\n", wire.REP_GENERAL_FAILURE),
    (b"\x01\x09\x00\x00", wire.REP_COMMAND_NOT_SUPPORTED),  # unknown NAR CMD
    (b"\x01\x03\x02\x00", wire.REP_ADDRESS_TYPE_NOT_SUPPORTED),  # unknown ATYP
    (b"\x05\x01\x00\x07", wire.REP_ADDRESS_TYPE_NOT_SUPPORTED),
])
def test_framing_errors(raw, code):
    with pytest.raises(NarWireError) as e:
        wire.parse_command(raw, CMDS)
    assert e.value.code == code
    assert wire.encode_error(code) == bytes((1, code))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_only_wire_error(data):
    try:
        r = wire.parse_command(data, CMDS)
    except NarWireError as e:
        assert 0 <= e.code <= 8
        return
    if r is not None:
        msg, used = r
        assert 0 < used <= len(data)
        if not (isinstance(msg, (TunnelAssociate, SocksRequest)) and msg.atyp == 4):
            assert wire.encode_message(msg) == data[:used]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.integers(0, 0xFFFF), st.integers(0, 255),
       st.integers(0, 2**32 - 1), st.ip_addresses(v=4).map(str), st.binary(max_size=255))
def test_round_trip(cmd, ident, proto, spi, addr, name):
    for raw in (wire.encode_icmp(1, ident), wire.encode_ipsec(2, proto, spi),
                wire.encode_tunnel(3, 1, addr, proto),
                wire.encode_tunnel(3, 3, name.decode("latin-1"), proto)):
        msg, used = wire.parse_command(raw, CMDS)
        assert used == len(raw) and wire.encode_message(msg) == raw
