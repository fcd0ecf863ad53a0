"""The mipproxy data path (draft §5, §6) in the lab, two-box: the proxy on MIPP, a stand-in
VPN gateway on the home segment (tests/mip_peer.py gw: echoes ESP back to the MN's home
address, routed through the proxy), the independent MN and HA of tests/mip_peer.py.

(b) the MN behind an nftables NAT, RFC 3519 UDP tunnelling both ways (next header 4, 47 and
55); IP-in-IP, GRE and minimal encapsulation without a NAT; the §5.3 checks dropping
(silently, counted) what must not pass; the HA's IP-in-IP for the MN forwarded to the
gateway at layer 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_mip_lab import PEER, capture, mn, proxy_config, start_ha, stop_capture

from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.lab.topologies import mip_topology


def two_box_config(t, tmp: Path) -> Path:
    cfg = proxy_config(t, tmp)
    text = cfg.read_text().replace("data_path = false", "data_path = true")
    text = text.replace(f'vpn_gateways = ["{t.mipp_external}"]',
                        f'vpn_gateways = ["{t.cn_addr}"]\nvpn_gateway_next_hop = "{t.cn_addr}"')
    cfg.write_text(text)
    return cfg


def start_gw(t, tmp: Path):
    """The gateway stand-in on CN, with the route §4.2.1/§5.7 ask of a VPN gateway: MN-Perm
    (on-link in the home subnet otherwise) via the proxy."""
    t.cn.ip("route", "replace", f"{t.mn_home_addr}/32", "via", t.mipp_internal)
    log = tmp / "gw.jsonl"
    proc = t.cn.popen([sys.executable, str(PEER), "gw", "--listen", t.cn_addr, "--log", str(log)],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "ready" in proc.stdout.readline()
    return proc, log


def gw_log(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []


def stats(d) -> dict:
    return {r["counter"]: r["value"] for r in d.rows("mip", "stats")}


@pytest.mark.parametrize("nh", [4, 47, 55], ids=["ipip", "gre", "minimal"])
def test_udp_tunnelling_behind_a_nat_both_ways(mip_topo, tmp_path, nh):
    """(b) Registration with a UDP Tunnel Request through the NAT: the reply carries the
    UDP Tunnel Reply (accepted, keepalive interval), the binding holds the NAT's mapping,
    ESP tunnelled in UDP reaches the gateway and the gateway's ESP comes back in UDP --
    in the next header the MN's request named (RFC 3519 3.1.4): IP-in-IP, GRE, or minimal
    encapsulation laid out by the peer by hand (RFC 2004)."""
    t = mip_topo
    ha, _ = start_ha(t, tmp_path)
    gw, glog = start_gw(t, tmp_path)
    d = NarsuiteDaemon(t.mipp, two_box_config(t, tmp_path), roles="mipproxy").start()
    cap, pcap = capture(t.mipp, tmp_path, (t.mipp_external_if, t.mipp_internal_if))
    try:
        out = mn(t, "--ha-param", t.ha_addr, "--udp-tunnel", "--udp-encap", str(nh), "--data", "5",
                 "--expect", "5", "--gateway", t.cn_addr)
        reply = out["replies"][0]
        assert reply["code"] == 0 and reply["auth_ok"], (out, d.log_text())
        e = dict(reply["exts"])
        # UDP Tunnel Reply: sub-type 0, code 0 (accepted), flags 0, keepalive 110
        assert e[44] == "00" + "00" + "0000" + "006e"
        rows = d.rows("mip", "bindings")
        assert rows[0]["encap"] == {4: "udp", 47: "udp/gre", 55: "udp/minimal"}[nh]
        assert rows[0]["tunnel_to"].startswith(t.nat_public + ":")
        assert rows[0]["care_of"] == t.mn_addr
        got = gw_log(glog)
        assert [g["esp_from"] for g in got] == [t.mn_home_addr] * 5, (got, stats(d))
        back = out["data"]["received"]
        assert len(back) == 5
        assert {(b["outer"], b["nh"], b["src"], b["dst"], b["proto"]) for b in back} == {
            ("udp", nh, t.cn_addr, t.mn_home_addr, 50)}
        assert sorted(b["payload"] for b in back) == sorted(g["payload"] for g in got)
        s = stats(d)
        assert s["data.mn_to_gateway"] == 5 and s["data.gateway_to_mn"] == 5
    finally:
        stop_capture(t.mipp, cap)
        d.terminate()
        t.ha.stop(ha)
        t.cn.stop(gw)
    out = t.mipp.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.protocols",
                      "-e", "mip.type", "-e", "mip.nattt.nexthdr", "-e", "_ws.malformed"]).stdout
    assert "malformed" not in out.lower(), out
    lines = [line.split("\t") for line in out.splitlines()]
    assert sum("mip" in f[0] for f in lines) >= 4 + 10
    # every tunnel data message (5 each way, seen on both interfaces' sides of the proxy's
    # external one) read with the next header the MN registered.  tshark 4.0's MIP dissector
    # hands any next header to its IP dissector, so for 47/55 it reports the GRE or minimal
    # header as a "bogus IP version" -- its limitation, not a malformed packet; the peer
    # checked those headers field by field.
    tunnel = [f for f in lines if f[1] == "4"]
    assert len(tunnel) >= 10 and {f[2] for f in tunnel} == {str(nh)}, out


@pytest.fixture
def direct(lab):
    return mip_topology(lab, nat=False)


@pytest.mark.parametrize("flags", ["T", "GT", "MT"])
def test_ip_in_ip_and_gre_tunnels_and_the_5_3_checks(direct, tmp_path, flags):
    """Without a NAT: IP-in-IP (GRE with the G bit, minimal encapsulation with the M bit)
    both ways, tshark reading every tunnel packet without a malformed one; then packets failing
    §5.3 (inner destination not a VPN gateway, not ESP, a home address without a binding)
    and a tunnel from the wrong care-of address are dropped and counted, nothing answered."""
    t = direct
    ha, _ = start_ha(t, tmp_path)
    gw, glog = start_gw(t, tmp_path)
    d = NarsuiteDaemon(t.mipp, two_box_config(t, tmp_path), roles="mipproxy").start()
    cap, pcap = capture(t.mipp, tmp_path, (t.mipp_external_if,))
    try:
        out = mn(t, "--ha-param", t.ha_addr, "--flags", flags, "--data", "3", "--expect", "3",
                 "--gateway", t.cn_addr)
        assert out["replies"][0]["code"] == 0
        back = out["data"]["received"]
        want = "gre" if "G" in flags else "minimal" if "M" in flags else "ipip"
        assert [(b["outer"], b["outer_src"], b["outer_dst"], b["src"], b["dst"]) for b in back] \
            == [(want, t.mipp_external, t.mn_addr, t.cn_addr, t.mn_home_addr)] * 3, (out, stats(d))
        assert len(gw_log(glog)) == 3
        # §5.3: inner destination not a VPN gateway / not ESP / no binding
        bad = textwrap.dedent(f"""
            import socket
            from scapy.layers.inet import IP, UDP
            from scapy.packet import Raw
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
            for inner in (IP(src="{t.mn_home_addr}", dst="{t.ha_addr}", proto=50) / Raw(b"x" * 16),
                          IP(src="{t.mn_home_addr}", dst="{t.cn_addr}") / UDP(sport=9, dport=9) / Raw(b"y"),
                          IP(src="10.2.0.150", dst="{t.cn_addr}", proto=50) / Raw(b"z" * 16)):
                s.sendto(bytes(inner), ("{t.mipp_external}", 0))
            """)
        t.mn.run([sys.executable, "-c", bad])
        time.sleep(0.5)
        s = stats(d)
        assert s["data.drop_inner_dst_not_vpn_gateway"] == 1
        assert s["data.drop_not_esp"] == 1
        assert s["data.drop_no_binding"] == 1
        assert len(gw_log(glog)) == 3
    finally:
        stop_capture(t.mipp, cap)
        d.terminate()
        t.ha.stop(ha)
        t.cn.stop(gw)
    out = t.mipp.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.protocols",
                      "-e", "_ws.malformed", "-e", "_ws.expert.message"]).stdout
    assert "malformed" not in out.lower(), out
    proto = {"T": "ip:ip", "GT": "ip:gre:ip", "MT": "ip"}[flags]
    assert sum(proto in line.split("\t")[0] for line in out.splitlines()) >= 6, out


def test_home_agent_tunnel_reaches_the_gateway_at_layer_2(direct, tmp_path):
    """§5.4: the HA tunnels a CN's packet for MN-Perm to MIPP-Priv; the proxy strips the
    outer header and hands the packet to VPNGW-Priv (the frame goes to the gateway's MAC);
    a double-encapsulated broadcast (§5.7.1) keeps its inner header; a tunnel from a host
    that is not a home agent is dropped."""
    t = direct
    ha, _ = start_ha(t, tmp_path)
    d = NarsuiteDaemon(t.mipp, two_box_config(t, tmp_path), roles="mipproxy").start()
    pcap = tmp_path / "cn.pcap"
    cap = t.cn.popen(["dumpcap", "-q", "-i", t.cn_if, "-f", f"dst host {t.mn_home_addr}", "-w",
                      str(pcap)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cap.stderr.readline()
    time.sleep(0.3)
    try:
        assert mn(t, "--ha-param", t.ha_addr)["replies"][0]["code"] == 0
        inject = textwrap.dedent(f"""
            import socket
            from scapy.layers.inet import IP, UDP
            from scapy.packet import Raw
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
            s.sendto(bytes(IP(src="{t.cn_addr}", dst="{t.mn_home_addr}") / UDP(sport=7, dport=7)
                           / Raw(b"to-mn")), ("{t.mipp_internal}", 0))
            s.sendto(bytes(IP(src="{t.ha_addr}", dst="{t.mn_home_addr}", proto=4)
                           / IP(src="{t.cn_addr}", dst="10.2.0.255") / UDP(sport=7, dport=7)
                           / Raw(b"bcast")), ("{t.mipp_internal}", 0))
            """)
        t.ha.run([sys.executable, "-c", inject])
        forged = textwrap.dedent(f"""
            import socket
            from scapy.layers.inet import IP, UDP
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
            s.sendto(bytes(IP(src="{t.cn_addr}", dst="{t.mn_home_addr}") / UDP()), ("{t.mipp_internal}", 0))
            """)
        t.cn.run([sys.executable, "-c", forged])
        time.sleep(0.7)
        s = stats(d)
        assert s["data.ha_to_gateway"] == 2 and s["data.drop_not_from_home_agent"] == 1, s
    finally:
        stop_capture(t.cn, cap)
        d.terminate()
        t.ha.stop(ha)
    out = t.cn.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "ip.src", "-e", "ip.dst",
                    "-e", "ip.proto", "-e", "eth.dst"]).stdout.splitlines()
    cn_mac = t.cn.run(["cat", f"/sys/class/net/{t.cn_if}/address"]).stdout.strip()
    assert len(out) == 2, out
    plain, bcast = sorted(out, key=lambda line: "," in line)
    assert plain.split("\t")[:3] == [t.cn_addr, t.mn_home_addr, "17"]
    assert bcast.split("\t")[0].startswith(t.ha_addr) and bcast.split("\t")[2].startswith("4")
    assert all(line.split("\t")[3] == cn_mac for line in out)
