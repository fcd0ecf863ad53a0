"""The proxy with the narsuite esp role as the VPN gateway.

One-box (draft §4.1): ``twistd -n narsuite --role=mipproxy,ike,esp`` is the MIP proxy and the
VPN gateway.  The MN behind an nftables NAT runs the independent MIP peer's tunnel
(tests/mip_peer.py mn --tun, RFC 3519 UDP tunnelling) and, inside it, the independent
ESP peer (tests/esp_peer.py, scapy's SecurityAssociation) whose inner address is its home
address (§5.2).  The HA (tests/mip_peer.py ha --tunnel) tunnels the CN's packets for the
home address to MIPP-Priv.  Cases (f): ping and a TCP transfer MN <-> CN; (g): the MN moves
to a new care-of address mid-transfer, re-registers, and the transfer completes on the same
ESP SA (§5.5).  Two-box (§4.2): the proxy alone on MIPP, ``--role=esp`` on a separate host
of the same subnet (CN's), with the route §4.2.1 asks of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from labtraffic import ping, tcp_transfer
from test_mip_lab import KEY, PEER, SPI, proxy_config, start_ha

from narsuite.lab.daemon import NarsuiteDaemon

HERE = Path(__file__).resolve().parent
ESP_PEER = HERE / "esp_peer.py"
VPNGW = "203.0.113.5"  # VPNGW-Pub: a second address of the one box
GCM = ("11" * 16 + "aabbccdd", "22" * 16 + "eeff0011")
SECOND_MN_ADDR = "192.168.10.20"  # the MN's second care-of address (same foreign net)


def onebox_config(t, tmp: Path) -> Path:
    cfg = proxy_config(t, tmp)
    text = cfg.read_text().replace("data_path = false", "data_path = true")
    text = text.replace(f'vpn_gateways = ["{t.mipp_external}"]', f'vpn_gateways = ["{VPNGW}"]')
    text += textwrap.dedent(f"""
        [esp]
        raw_esp = false
        [[esp.peers]]
        name = "mn"
        spi_in = 4097
        spi_out = 8193
        enc = "aes-gcm-16"
        enc_key_in = "{GCM[0]}"
        enc_key_out = "{GCM[1]}"
        policy = "address"
        address = "{t.mn_home_addr}"
        """)
    cfg.write_text(text)
    return cfg


def setup(t, tmp: Path):
    t.mipp.ip("addr", "add", f"{VPNGW}/24", "dev", t.mipp_external_if)
    t.mipp.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
    # the HA intercepts the CN's packets for the MN (a route stands in for proxy ARP)
    t.cn.ip("route", "replace", f"{t.mn_home_addr}/32", "via", t.ha_addr)
    t.ha.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"])
    ha, log = start_ha(t, tmp, "--tunnel")
    d = NarsuiteDaemon(t.mipp, onebox_config(t, tmp), roles="mipproxy,ike,esp").start()
    move = tmp / "move.json"
    mn = t.mn.popen([sys.executable, str(PEER), "mn", "--proxy", t.mipp_external, "--home",
                     t.mn_home_addr, "--spi", str(SPI), "--key", KEY, "--ha-param", t.ha_addr,
                     "--udp-tunnel", "--tun", "--route", f"{VPNGW}/32", "--move-file", str(move),
                     "--stats-file", str(tmp / "mn.stats.json"), "--lifetime", "600"],
                    stdout=subprocess.PIPE, stderr=open(tmp / "mn.log", "w"), text=True)
    first = json.loads(mn.stdout.readline())
    assert first["replies"][0]["code"] == 0, first
    esp = t.mn.popen([sys.executable, str(ESP_PEER), "--gateway", VPNGW, "--spi-out", "4097",
                      "--spi-in", "8193", "--enc", "aes-gcm-16", "--enc-key-out", GCM[0],
                      "--enc-key-in", GCM[1], "--tun-addr", f"{t.mn_home_addr}/32",
                      "--route", f"{t.cn_addr}/32", "--tun-name", "esptun%d", "--tun-mtu", "1300",
                      "--stats-file", str(tmp / "esp.stats.json")],
                     stdout=subprocess.PIPE, stderr=open(tmp / "esp.log", "w"), text=True)
    assert "READY" in esp.stdout.readline(), (tmp / "esp.log").read_text()
    return d, ha, mn, esp, move


def stats(d) -> dict:
    return {r["counter"]: r["value"] for r in d.rows("mip", "stats")}


def test_onebox_ping_and_tcp_both_ways(mip_topo, tmp_path):
    """(f)/(h one-box): the MN's ESP reaches the esp role in the same process through the
    proxy's tunnel, the CN's answers come back through the real HA tunnel, the esp role and
    the proxy's policy routing; the MN's inner address is its home address."""
    t = mip_topo
    d, ha, mn, esp, _ = setup(t, tmp_path)
    try:
        assert ping(t.mn, t.cn_addr, count=3), (stats(d), d.log_text()[-3000:])
        assert tcp_transfer(t.cn, t.mn, t.cn_addr) == 300_000 // 256 * 256  # CN -> MN
        assert tcp_transfer(t.mn, t.cn, t.mn_home_addr) == 300_000 // 256 * 256  # MN -> CN
        s = stats(d)
        assert s["data.mn_to_gateway"] > 0 and s["data.gateway_to_mn"] > 0
        assert s["data.ha_to_gateway"] > 0  # CN -> MN went through the HA's tunnel
        peers = {r["peer"]: r for r in d.rows("esp", "peers")}
        assert peers["mn"]["remote"].startswith(t.mn_home_addr + ":")  # §5.2: MN-Perm
        assert d.rows("mip", "bindings")[0]["encap"] == "udp"
    finally:
        for p in (esp, mn):
            t.mn.stop(p)
        t.ha.stop(ha)
        d.terminate()


def test_mn_moves_mid_transfer_and_keeps_its_sa(mip_topo, tmp_path):
    """(g) Halfway through a TCP transfer the MN changes its care-of address (a new
    address, a new NAT mapping) and re-registers; the binding follows, the transfer
    completes, and the ESP SA is the same one (§5.5)."""
    t = mip_topo
    d, ha, mn, esp, move = setup(t, tmp_path)
    try:
        assert ping(t.mn, t.cn_addr, count=2)
        sa_before = {(r["spi"], r["dir"]) for r in d.rows("esp", "sas")}
        old = d.rows("mip", "bindings")[0]
        t.mn.ip("addr", "add", f"{SECOND_MN_ADDR}/24", "dev", t.mn_if)
        move.write_text(json.dumps({"bind": SECOND_MN_ADDR}))
        result: dict = {}
        size = 4_000_000

        def transfer() -> None:
            result["n"] = tcp_transfer(t.cn, t.mn, t.cn_addr, size=size)

        th = threading.Thread(target=transfer)
        th.start()
        time.sleep(1.0)
        before = stats(d)["data.gateway_to_mn"]
        assert th.is_alive() and before > 50  # the transfer is under way
        mn.send_signal(10)  # SIGUSR1: move and re-register
        th.join(90)
        assert result.get("n") == size // 256 * 256, (result, stats(d))
        new = d.rows("mip", "bindings")
        assert len(new) == 1 and new[0]["care_of"] == SECOND_MN_ADDR
        assert new[0]["tunnel_to"] != old["tunnel_to"]  # a new NAT mapping
        assert {(r["spi"], r["dir"]) for r in d.rows("esp", "sas")} == sa_before
        assert stats(d)["data.gateway_to_mn"] > before + 100  # it went on after the move
        moved = json.loads(mn.stdout.readline())
        assert moved["moved"] == SECOND_MN_ADDR and moved["reply"]["code"] == 0
    finally:
        for p in (esp, mn):
            t.mn.stop(p)
        t.ha.stop(ha)
        d.terminate()


def test_two_box_proxy_and_a_separate_esp_gateway(mip_topo, tmp_path):
    """(h two-box) The proxy alone on MIPP; narsuite --role=esp on CN's host as the VPN
    gateway (VPNGW-Pub = VPNGW-Priv = 10.2.0.3, routing MN-Perm to the proxy, §4.2.1).  The
    MN's IPsec peer talks to the HA's host through it: ping and a TCP transfer."""
    t = mip_topo
    gw_addr = t.cn_addr
    cfg = proxy_config(t, tmp_path)
    text = cfg.read_text().replace("data_path = false", "data_path = true")
    text = text.replace(f'vpn_gateways = ["{t.mipp_external}"]',
                        f'vpn_gateways = ["{gw_addr}"]\nvpn_gateway_next_hop = "{gw_addr}"')
    cfg.write_text(text)
    gw_dir = tmp_path / "gw"
    gw_dir.mkdir()
    gw_cfg = gw_dir / "gw.toml"
    gw_cfg.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{gw_dir}/state"
        runtime_dir = "{gw_dir}/run"
        [metrics]
        enabled = false
        [esp]
        raw_esp = false
        [[esp.peers]]
        name = "mn"
        spi_in = 4097
        spi_out = 8193
        enc = "aes-gcm-16"
        enc_key_in = "{GCM[0]}"
        enc_key_out = "{GCM[1]}"
        policy = "address"
        address = "{t.mn_home_addr}"
        """))
    t.mipp.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])
    t.cn.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
              "net.ipv4.conf.default.rp_filter=0"])
    # §4.2.1: the gateway delivers its IPsec'ed packets for MN-Perm to the proxy.  A policy
    # route, because the esp role routes MN-Perm itself (its inner address) into its TUN.
    t.cn.ip("route", "replace", f"{t.mn_home_addr}/32", "via", t.mipp_internal, "table", "435")
    for sel in (["ipproto", "esp"], ["ipproto", "udp", "sport", "4500"],
                ["ipproto", "udp", "sport", "500"]):
        t.cn.ip("rule", "add", "priority", "950", "to", f"{t.mn_home_addr}/32", *sel,
                "lookup", "435")
    t.ha.ip("route", "replace", f"{t.mn_home_addr}/32", "via", gw_addr)  # the HA host as the CN
    ha, _ = start_ha(t, tmp_path)
    d = NarsuiteDaemon(t.mipp, cfg, roles="mipproxy").start()
    g = NarsuiteDaemon(t.cn, gw_cfg, roles="esp").start()
    mn = t.mn.popen([sys.executable, str(PEER), "mn", "--proxy", t.mipp_external, "--home",
                     t.mn_home_addr, "--spi", str(SPI), "--key", KEY, "--ha-param", t.ha_addr,
                     "--udp-tunnel", "--tun", "--route", f"{gw_addr}/32"],
                    stdout=subprocess.PIPE, stderr=open(tmp_path / "mn.log", "w"), text=True)
    esp = None
    try:
        assert json.loads(mn.stdout.readline())["replies"][0]["code"] == 0
        esp = t.mn.popen([sys.executable, str(ESP_PEER), "--gateway", gw_addr, "--spi-out", "4097",
                          "--spi-in", "8193", "--enc", "aes-gcm-16", "--enc-key-out", GCM[0],
                          "--enc-key-in", GCM[1], "--tun-addr", f"{t.mn_home_addr}/32",
                          "--route", f"{t.ha_addr}/32", "--tun-name", "esptun%d",
                          "--tun-mtu", "1300"],
                         stdout=subprocess.PIPE, stderr=open(tmp_path / "esp.log", "w"), text=True)
        assert "READY" in esp.stdout.readline()
        assert ping(t.mn, t.ha_addr, count=3), (stats(d), g.rows("esp", "stats"))
        assert tcp_transfer(t.ha, t.mn, t.ha_addr) == 300_000 // 256 * 256
        s = stats(d)
        assert s["data.mn_to_gateway"] > 0 and s["data.gateway_to_mn"] > 0
        peers = {r["peer"]: r for r in g.rows("esp", "peers")}
        assert peers["mn"]["remote"].startswith(t.mn_home_addr + ":")
    finally:
        for p in (esp, mn):
            if p is not None:
                t.mn.stop(p)
        t.ha.stop(ha)
        g.terminate()
        d.terminate()


def strongswan_setup(t, tmp: Path, version: int = 1):
    """The one box with the ike role as the MN's gateway (PSK; IKEv1 Main Mode with
    mode-config, or IKEv2 with a configuration payload, handing out the home address from a
    one-address pool), the HA, the MIP peer registered (RFC 3519 UDP tunnelling,
    ``--move-file`` for SIGUSR1) and strongSwan on the MN with its IKE and CHILD SA up
    through the proxy's tunnel."""
    from narsuite.lab.strongswan import Charon, ikev1_client_conf, ikev2_client_conf

    psk = "mobile-vpn-psk"
    cfg = proxy_config(t, tmp)
    text = cfg.read_text().replace("data_path = false", "data_path = true")
    text = text.replace(f'vpn_gateways = ["{t.mipp_external}"]', f'vpn_gateways = ["{VPNGW}"]')
    text = text.replace("[mipproxy]", textwrap.dedent(f"""
        [store.pools.home]
        network = "{t.mn_home_addr}/32"
        [esp]
        raw_esp = false
        [ike]
        [[ike.peers]]
        name = "mn"
        versions = [{version}]
        psk = "{psk}"
        local_id = "gw.example"
        local_ts = ["{t.cn_addr}/32"]
        pool = "home"
        [mipproxy]"""), 1)
    cfg.write_text(text)
    t.mipp.ip("addr", "add", f"{VPNGW}/24", "dev", t.mipp_external_if)
    t.mipp.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
    # two tunnels' overhead (ESP in UDP inside MIP tunnel data) on 1500-byte links: the CN's
    # segments to the MN stay small enough (libipsec's TUN on the MN says 1400 otherwise)
    t.cn.ip("route", "replace", f"{t.mn_home_addr}/32", "via", t.ha_addr, "mtu", "lock", "1300")
    t.ha.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"])
    t.mn.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
    ha, _ = start_ha(t, tmp, "--tunnel")
    d = NarsuiteDaemon(t.mipp, cfg, roles="mipproxy,ike,esp").start()
    move = tmp / "move.json"
    mn = t.mn.popen([sys.executable, str(PEER), "mn", "--proxy", t.mipp_external, "--home",
                     t.mn_home_addr, "--spi", str(SPI), "--key", KEY, "--ha-param", t.ha_addr,
                     "--udp-tunnel", "--tun", "--route", f"{VPNGW}/32", "--move-file", str(move),
                     "--lifetime", "600"],
                    stdout=subprocess.PIPE, stderr=open(tmp / "mn.log", "w"), text=True)
    c = None
    try:
        assert json.loads(mn.stdout.readline())["replies"][0]["code"] == 0
        c = Charon(t.mn, tmp / "charon").start()
        conf = ikev1_client_conf if version == 1 else ikev2_client_conf
        kw = {"mode_config": True} if version == 1 else {}  # IKEv2: vips = 0.0.0.0 by default
        c.load(conf(VPNGW, psk, local_id="mn.example", remote_id="gw.example",
                    remote_ts=f"{t.cn_addr}/32", **kw))
        res = c.initiate(child="net", timeout=30)
        assert res.ok, res.output[-3000:] + c.log_text()[-3000:] + d.log_text()[-3000:]
    except BaseException:
        strongswan_teardown(t, d, ha, mn, c)
        raise
    return d, ha, mn, c, move


def strongswan_teardown(t, d, ha, mn, c) -> None:
    if c is not None:
        c.stop()
    t.mn.stop(mn)
    t.ha.stop(ha)
    d.terminate()


@pytest.mark.parametrize("version", [1, 2], ids=["ikev1", "ikev2"])
def test_strongswan_mn_negotiates_through_the_tunnel_and_gets_its_home_address(
        need_strongswan, mip_topo, tmp_path, version):
    """(f) with a real IPsec client: strongSwan on the MN (PSK; IKEv1 Main Mode with
    mode-config, or IKEv2 with a configuration payload for its virtual IP) reaches the one
    box's ike role through the proxy's tunnel (IKE from MN-Perm), is handed its home address
    as its inner address (§5.2: a one-address pool), and its ESP (user-space libipsec)
    carries ping and a TCP transfer each way between MN and CN (the CN connecting to the
    home address for the second), the CN's packets coming through the HA."""
    t = mip_topo
    d, ha, mn, c, _ = strongswan_setup(t, tmp_path, version)
    try:
        (sa,) = c.list_sas()
        assert sa.version == version, sa
        (child,) = sa.children
        assert child.local_ts == (f"{t.mn_home_addr}/32",), child  # §5.2: the home address
        assert ping(t.mn, t.cn_addr, count=3), (stats(d), c.log_text()[-2000:])
        assert tcp_transfer(t.cn, t.mn, t.cn_addr) == 300_000 // 256 * 256  # CN -> MN
        assert tcp_transfer(t.mn, t.cn, t.mn_home_addr) == 300_000 // 256 * 256  # MN -> CN
        (isa,) = d.rows("ike", "sas")
        assert isa["remote"].startswith(t.mn_home_addr + ":")  # IKE came from MN-Perm
        assert isa["version"] == version and isa["address"] == t.mn_home_addr, isa
        s = stats(d)
        assert s["data.mn_to_gateway"] > 0 and s["data.gateway_to_mn"] > 0 and s["data.ha_to_gateway"] > 0
    finally:
        strongswan_teardown(t, d, ha, mn, c)


def _sa_ids(sa) -> tuple:
    """strongSwan's view of one IKE SA: its endpoints (MN-Perm and VPNGW-Pub), its cookies and
    each CHILD SA's SPIs, the identity a renegotiation, rekey or roam would change."""
    return (sa.uniqueid, sa.local_host, sa.remote_host, sa.spi_i, sa.spi_r,
            tuple((ch.uniqueid, ch.spi_in, ch.spi_out, ch.state) for ch in sa.children))


def gw_ike(d) -> list[tuple]:
    """The gateway's view of its IKE SAs: name, remote (MN-Perm), state, CHILD SA count."""
    return [(r["name"], r["remote"], r["state"], r["children"]) for r in d.rows("ike", "sas")]


@pytest.mark.parametrize("version", [1, 2], ids=["ikev1", "ikev2"])
def test_strongswan_mn_moves_mid_transfer_and_keeps_its_sas(need_strongswan, mip_topo, tmp_path, version):
    """(g) with a real IPsec client: strongSwan on the MN (IKEv1 or IKEv2) has its IKE and
    CHILD SA through the proxy's tunnel; halfway through a TCP transfer from the CN the MN
    takes a new care-of address (and so a new NAT mapping) and re-registers through the
    proxy.  The binding follows, the transfer completes, pings go on, and strongSwan shows
    the same IKE SA (cookies) and CHILD SA (SPIs) before and after: the move is below IPsec
    (§5.5), nothing is renegotiated.  The gateway's side agrees (the same IKE SA, the same
    ESP SAs)."""
    t = mip_topo
    d, ha, mn, c, move = strongswan_setup(t, tmp_path, version)
    try:
        assert ping(t.mn, t.cn_addr, count=2), (stats(d), c.log_text()[-2000:])
        (sa,) = c.list_sas()
        assert sa.version == version, sa
        ids_before = _sa_ids(sa)
        assert len(sa.children) == 1 and sa.children[0].state == "INSTALLED", sa
        gw_ike_before = gw_ike(d)
        gw_esp_before = {(r["spi"], r["dir"]) for r in d.rows("esp", "sas")}
        old = d.rows("mip", "bindings")[0]
        t.mn.ip("addr", "add", f"{SECOND_MN_ADDR}/24", "dev", t.mn_if)
        move.write_text(json.dumps({"bind": SECOND_MN_ADDR}))
        result: dict = {}
        size = 20_000_000  # libipsec here moves a few MB/s: the move lands in the middle
        start = stats(d)["data.gateway_to_mn"]

        def transfer() -> None:
            result["n"] = tcp_transfer(t.cn, t.mn, t.cn_addr, size=size)

        th = threading.Thread(target=transfer)
        th.start()
        deadline = time.monotonic() + 20
        while (before := stats(d)["data.gateway_to_mn"]) < start + 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert th.is_alive() and before >= start + 200, (result, start, before)  # under way
        mn.send_signal(10)  # SIGUSR1: move and re-register
        moved = json.loads(mn.stdout.readline())
        assert moved["moved"] == SECOND_MN_ADDR and moved["reply"]["code"] == 0, moved
        th.join(90)
        assert result.get("n") == size // 256 * 256, (result, stats(d), c.log_text()[-2000:])
        new = d.rows("mip", "bindings")
        assert len(new) == 1 and new[0]["care_of"] == SECOND_MN_ADDR
        assert new[0]["tunnel_to"] != old["tunnel_to"]  # a new NAT mapping
        assert stats(d)["data.gateway_to_mn"] > before + 100  # it went on after the move
        assert ping(t.mn, t.cn_addr, count=3), (stats(d), c.log_text()[-2000:])
        (sa,) = c.list_sas()
        assert _sa_ids(sa) == ids_before, (ids_before, c.list_sas_text())  # no renegotiation
        assert gw_ike(d) == gw_ike_before
        assert {(r["spi"], r["dir"]) for r in d.rows("esp", "sas")} == gw_esp_before
    finally:
        strongswan_teardown(t, d, ha, mn, c)
