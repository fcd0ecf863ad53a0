"""Registrations relayed by a foreign agent (RFC 5944 3.5.4, 3.7.2, 3.8.2-3.8.3), with fakes.

The FA's side -- keeping the MN's request up to its MN-HA extension, appending the
FA-HA authenticator, checking the one on the reply -- is the independent test peer's
(tests/mip_peer.py), so the relay is not checked against its own codec.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_mip_relay import COA, HA, HOME, KEY, KEYS, PUB, SPI, Rig, peer

from narsuite import config as cfgmod
from narsuite.config import ConfigError
from narsuite.mipproxy import wire
from narsuite.mipproxy.records import BINDING, PENDING

FA, FA_SPI, FA_KEY = "198.51.100.1", 5000, bytes(range(100, 116))
FA_COA = COA  # the FA's care-of address; the FA sends from FA, another of its addresses


def fa_rig(tmp_path: Path, extra: str = "", *, sa: bool = True) -> Rig:
    text = extra
    if sa:
        key = tmp_path / "fa.key"
        key.write_text(FA_KEY.hex() + "\n")
        os.chmod(key, 0o600)
        text += f'\n[[mipproxy.foreign_agents]]\naddress = "{FA}"\nspi = {FA_SPI}\nkey_file = "{key}"\n'
    return Rig(text)


def mn_request(*, extra: bytes = b"", key: bytes = KEY, ident: int | None = None) -> tuple[bytes, int]:
    ident = ident if ident is not None else peer.ntp_identification()
    exts = extra + peer.udp_tunnel_request() + peer.ha_parameter(HA)
    msg = peer.with_auth(peer.request_bytes(peer.FLAGS["T"], 300, HOME, PUB, FA_COA, ident, exts),
                         SPI, key)
    return msg, ident


def from_fa(r: Rig, data: bytes) -> None:
    r.relay.request_received(data, (FA, 434))


def test_fa_relayed_request_is_checked_relayed_and_answered_to_the_fa(tmp_path: Path) -> None:
    r = fa_rig(tmp_path)
    msg, ident = mn_request()
    # an MN-FA extension after the MN-HA one is the FA's: it never reaches the HA
    relayed = peer.fa_relay_request(msg + peer.ext(peer.EXT_MN_FA, bytes(20)), FA_SPI, FA_KEY)
    from_fa(r, relayed)
    (data, addr), = r.to_ha
    req = peer.parse(data, KEYS)
    assert req["auth_ok"] and req["coa"] != FA_COA
    assert [e[0] for e in req["exts"]] == [32]  # neither the UDP request's FA nor FA-HA
    assert r.relay.counters.values["fa_relayed"] == 1
    r.ha_reply()
    out, dst = r.to_mn[-1]
    assert dst == (FA, 434)  # RFC 5944 3.8.3: back to the request's source address and port
    assert peer.parse(out, KEYS)["auth_ok"]
    assert [t for t, _o, _b in peer.split_extensions(out, 20)][-2:] == [32, 34]
    ok, for_mn = peer.fa_check_reply(out, FA_SPI, FA_KEY)
    assert ok
    rep = peer.parse(for_mn, KEYS)
    assert rep["auth_ok"] and rep["code"] == 0 and rep["id"] == ident
    # the FA's source differs from the CoA: that is the FA, not a NAT (no UDP tunnel
    # although the request asked for one unforced); data goes to FA-COA by IP-in-IP
    b = r.store.get(BINDING.name, (HOME, FA_COA))
    assert b.src_ip == FA_COA and b.encapsulation == "ipip" and b.src_port == 0
    assert [e[0] for e in rep["exts"]] == [127, 32]
    # the binding records the FA the registration came through (its source address)
    assert b.foreign_agent == FA


def test_co_located_binding_names_no_foreign_agent(tmp_path: Path) -> None:
    r = fa_rig(tmp_path)
    r.request()  # from the CoA itself, no FA extensions: a co-located MN
    assert r.store.records(PENDING.name).__next__().foreign_agent == ""
    r.ha_reply()
    b = r.store.get(BINDING.name, (HOME, COA))
    assert b is not None and b.foreign_agent == ""


@pytest.mark.parametrize("how", ["missing", "corrupt", "wrong_spi", "before_mn_ha"])
def test_fa_ha_authentication_failure_is_132(tmp_path: Path, how: str) -> None:
    r = fa_rig(tmp_path)
    msg, ident = mn_request()
    if how == "missing":
        data = peer.fa_relay_request(msg, None, FA_KEY)
    elif how == "corrupt":
        data = peer.fa_relay_request(msg, FA_SPI, FA_KEY, corrupt=True)
    elif how == "wrong_spi":
        data = peer.fa_relay_request(msg, FA_SPI + 1, FA_KEY)
    else:  # an FA-HA extension the MN-HA authenticator does not follow covers too little
        body = peer.request_bytes(peer.FLAGS["T"], 300, HOME, PUB, FA_COA, ident,
                                  peer.ha_parameter(HA))
        data = peer.with_auth(peer.with_fa_ha(body, FA_SPI, FA_KEY), SPI, KEY)
    from_fa(r, data)
    assert r.to_ha == [] and r.store.count(PENDING.name) == 0
    out, dst = r.to_mn[-1]
    assert dst == (FA, 434)
    ok, for_mn = peer.fa_check_reply(out, FA_SPI, FA_KEY)
    rep = peer.parse(for_mn, KEYS)
    assert ok and rep["auth_ok"] and rep["code"] == 132 and rep["id"] == ident
    assert r.relay.counters.values["fa_auth_failed"] == 1
    assert r.relay.counters.denied == {132: 1}


def test_mn_ha_is_checked_before_fa_ha(tmp_path: Path) -> None:
    r = fa_rig(tmp_path)
    msg, _ = mn_request(key=bytes(16))
    from_fa(r, peer.fa_relay_request(msg, FA_SPI, FA_KEY))
    rep = peer.parse(peer.fa_check_reply(r.to_mn[-1][0], FA_SPI, FA_KEY)[1], KEYS)
    assert rep["code"] == 131 and r.relay.counters.values["fa_auth_failed"] == 0


def test_unknown_fa_refused_by_default_accepted_when_configured(tmp_path: Path) -> None:
    r = fa_rig(tmp_path, sa=False)
    msg, _ = mn_request()
    from_fa(r, peer.fa_relay_request(msg, FA_SPI, FA_KEY))
    assert r.to_ha == [] and peer.parse(r.to_mn[-1][0], KEYS)["code"] == 132
    assert r.relay.counters.values["fa_auth_failed"] == 1

    r = fa_rig(tmp_path, "require_fa_sa = false\n", sa=False)
    msg, _ = mn_request()
    from_fa(r, peer.fa_relay_request(msg, FA_SPI, FA_KEY))
    (data, _), = r.to_ha
    assert [e[0] for e in peer.parse(data, KEYS)["exts"]] == [32]
    r.ha_reply()
    out, dst = r.to_mn[-1]
    assert dst == (FA, 434)
    # no SA with this FA: nothing to authenticate the reply with
    assert [t for t, _o, _b in peer.split_extensions(out, 20)][-1] == 32
    b = r.store.get(BINDING.name, (HOME, FA_COA))
    assert b.encapsulation == "ipip" and b.foreign_agent == FA


def test_unknown_fa_marked_by_mn_fa_unless_from_the_coa(tmp_path: Path) -> None:
    """An MN-FA extension after the MN-HA one from a source that is not the CoA: an FA we
    have no SA with (132); from the CoA itself: a co-located MN, relayed (without it)."""
    mn_fa = peer.ext(peer.EXT_MN_FA, bytes(20))
    r = fa_rig(tmp_path, sa=False)
    msg, _ = mn_request()
    from_fa(r, msg + mn_fa)
    assert r.to_ha == [] and peer.parse(r.to_mn[-1][0], KEYS)["code"] == 132
    r = fa_rig(tmp_path, sa=False)
    msg, _ = mn_request()
    r.relay.request_received(msg + mn_fa, (FA_COA, 434))
    (data, _), = r.to_ha
    assert [e[0] for e in peer.parse(data, KEYS)["exts"]] == [32]


def test_co_located_replies_carry_no_fa_ha(tmp_path: Path) -> None:
    r = fa_rig(tmp_path)
    r.request()
    r.ha_reply()
    out, dst = r.to_mn[-1]
    assert dst == (COA, 40000)
    assert [t for t, _o, _b in peer.split_extensions(out, 20)][-1] == 32


def test_foreign_agent_config_errors_name_the_key(tmp_path: Path) -> None:
    key = tmp_path / "fa.key"
    key.write_text(FA_KEY.hex())
    base = '[mipproxy]\n[[mipproxy.foreign_agents]]\naddress = "192.0.2.1"\n'
    with pytest.raises(ConfigError, match=r"mipproxy.foreign_agents\[0\].spi: .*reserved"):
        cfgmod.loads(base + f'spi = 255\nkey_file = "{key}"\n')
    with pytest.raises(ConfigError, match=r"mipproxy.foreign_agents\[0\].key_file: set the file"):
        cfgmod.loads(base + 'spi = 300\n')
    with pytest.raises(ConfigError, match=r"mipproxy.foreign_agents\[0\].key_file: .* chmod 600"):
        cfgmod.loads(base + f'spi = 300\nkey_file = "{key}"\n')
    os.chmod(key, 0o600)
    with pytest.raises(ConfigError, match=r"mipproxy.foreign_agents\[0\].key\b"):
        cfgmod.loads(base + f'spi = 300\nkey_file = "{key}"\nkey = "00"\n')
    twice = base + f'spi = 300\nkey_file = "{key}"\n'
    twice += twice.removeprefix("[mipproxy]\n")
    with pytest.raises(ConfigError, match=r"mipproxy.foreign_agents\[1\].address: .* two FA-HA"):
        cfgmod.loads(twice)
    cfg = cfgmod.loads(base + f'spi = 300\nkey_file = "{key}"\n').role("mipproxy")
    assert FA_KEY.hex() not in repr(cfg) and cfg.foreign_agents[0].secret() == FA_KEY


def test_verify_fa_ha_auth_wants_it_after_mn_ha() -> None:
    body = peer.request_bytes(2, 300, HOME, PUB, FA_COA, 1, b"")
    good = peer.with_fa_ha(peer.with_auth(body, SPI, KEY), FA_SPI, FA_KEY)
    keys = {FA_SPI: FA_KEY}.get
    assert wire.verify_fa_ha_auth(good, keys) == (FA_SPI, True)
    assert wire.verify_fa_ha_auth(peer.with_auth(peer.with_fa_ha(body, FA_SPI, FA_KEY), SPI, KEY),
                                  keys) == (None, False)
    assert wire.verify_fa_ha_auth(peer.with_auth(body, SPI, KEY), keys) == (None, False)


def test_fa_udp_tunnel_request_tunnels_to_the_fa(tmp_path: Path) -> None:
    """RFC 3519 3.1: an FA (with an SA here) adds its own UDP Tunnel Request after the MN-HA
    extension; relaying from another address than its care-of address (a NAT's mapping
    as far as the proxy can tell) it gets UDP tunnelling to where its request came from,
    and the UDP Tunnel Reply after the MN-HA extension, under its FA-HA authenticator;
    the MN's part of the reply carries none."""
    r = fa_rig(tmp_path)
    msg, ident = mn_request()
    from_fa(r, peer.fa_relay_request(msg, FA_SPI, FA_KEY,
                                     fa_exts=peer.udp_tunnel_request(encap=47)))
    (data, _), = r.to_ha
    assert [e[0] for e in peer.parse(data, KEYS)["exts"]] == [32]
    r.ha_reply()
    out, dst = r.to_mn[-1]
    assert dst == (FA, 434)
    assert [t for t, _o, _b in peer.split_extensions(out, 20)][-3:] == [32, 44, 34]
    ok, for_mn = peer.fa_check_reply(out, FA_SPI, FA_KEY)
    assert ok and peer.fa_udp_tunnel_reply(out) == {"code": 0, "keepalive": 110, "forced": False}
    rep = peer.parse(for_mn, KEYS)
    assert rep["auth_ok"] and rep["code"] == 0 and [e[0] for e in rep["exts"]] == [127, 32]
    b = r.store.get(BINDING.name, (HOME, FA_COA))
    assert (b.encapsulation, b.udp_next_header, b.src_ip, b.src_port, b.foreign_agent) == (
        "udp", 47, FA, 434, FA)


def test_fa_udp_tunnel_request_ignored_without_an_fa_sa_or_a_reason(tmp_path: Path) -> None:
    """Without an FA-HA SA here (require_fa_sa = false) the FA's extensions are anyone's:
    its UDP Tunnel Request is not taken; from its care-of address and unforced there is no
    NAT to cross: IP-in-IP to the care-of address, and no UDP Tunnel Reply."""
    r = fa_rig(tmp_path, "require_fa_sa = false\n", sa=False)
    msg, _ = mn_request()
    from_fa(r, peer.fa_relay_request(msg, FA_SPI, FA_KEY, fa_exts=peer.udp_tunnel_request()))
    r.ha_reply()
    assert r.store.get(BINDING.name, (HOME, FA_COA)).encapsulation == "ipip"

    key = tmp_path / "coa-fa.key"
    key.write_text(FA_KEY.hex() + "\n")
    os.chmod(key, 0o600)
    r = Rig(f'\n[[mipproxy.foreign_agents]]\naddress = "{FA_COA}"\nspi = {FA_SPI}\n'
            f'key_file = "{key}"\n')  # an FA that relays from its care-of address
    msg, _ = mn_request()
    r.relay.request_received(peer.fa_relay_request(msg, FA_SPI, FA_KEY,
                                                   fa_exts=peer.udp_tunnel_request()),
                             (FA_COA, 434))
    assert r.relay.counters.values["fa_relayed"] == 1
    r.ha_reply()
    b = r.store.get(BINDING.name, (HOME, FA_COA))
    assert b.encapsulation == "ipip" and 44 not in [
        t for t, _o, _b in peer.split_extensions(r.to_mn[-1][0], 20)]
