"""An MN registering through a foreign agent, in the lab (RFC 5944 3.7-3.8, RFC 3024).

MN — FA — MIPP — {HA, CN}: ``mip_topology(foreign_agent=True)`` puts a foreign agent where
the NAT was.  The FA is the independent peer's (tests/mip_peer.py fa: scapy headers, its own
HMAC, raw and packet sockets, no narsuite import): it relays the MN's request from an address
that is not its care-of address, with its FA-HA authenticator; it checks the proxy's FA-HA
authenticator on the reply; it decapsulates the proxy's IP-in-IP to its care-of address for
the MN and reverse-tunnels what the MN sends from its home address.  The MN's data reaches
the stand-in VPN gateway on CN and the gateway's answer comes back through the proxy and the
FA.  tshark reads every message on the proxy's external side without a malformed one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_mip_data import gw_log, start_gw, stats, two_box_config
from test_mip_lab import KEY, PEER, SPI, capture, start_ha, stop_capture, tshark_check

from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.lab.topologies import mip_topology

FA_SPI = 0x2000
FA_KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
FA_SOURCE = "203.0.113.20"  # where the FA relays from; its care-of address is t.nat_public


@pytest.fixture
def fa_topo(lab):
    t = mip_topology(lab, foreign_agent=True)
    t.nat.ip("addr", "add", FA_SOURCE + "/24", "dev", t.nat_public_if)
    t.mn.ip("addr", "add", t.mn_home_addr + "/32", "dev", "lo")
    return t


def fa_config(t, tmp: Path, *, sa: bool = True) -> Path:
    cfg = two_box_config(t, tmp)
    if sa:
        key = tmp / "fa.key"
        key.write_text(FA_KEY + "\n")
        key.chmod(0o600)
        cfg.write_text(cfg.read_text() + f'\n[[mipproxy.foreign_agents]]\naddress = "{FA_SOURCE}"\n'
                                         f'spi = {FA_SPI}\nkey_file = "{key}"\n')
    return cfg


def start_fa(t, tmp: Path, *args: str):
    log = tmp / "fa.jsonl"
    proc = t.nat.popen([sys.executable, str(PEER), "fa", "--mn-side", t.nat_private,
                        "--mn-if", t.nat_private_if, "--source", FA_SOURCE, "--coa", t.nat_public,
                        "--spi", str(FA_SPI), "--key", FA_KEY, "--log", str(log), *args],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "ready" in line, line + proc.stdout.read()
    return proc, log


def fa_log(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []


def mn_via_fa(t, *args: str) -> dict:
    """The MN's request sent to the FA: HA field MIPP-Pub, care-of address the FA's."""
    return json.loads(t.mn.run([sys.executable, str(PEER), "mn", "--proxy", t.nat_private,
                                "--ha-field", t.mipp_external, "--coa", t.nat_public,
                                "--home", t.mn_home_addr, "--spi", str(SPI), "--key", KEY,
                                "--ha-param", t.ha_addr, *args], timeout=30).stdout)


def check_esp_both_ways(t, out: dict, glog: Path, d: NarsuiteDaemon) -> dict:
    """Five ESP packets each way between the MN and the CN's gateway went through the proxy:
    the gateway saw them from the MN's home address, the MN got back what the gateway sent.
    Returns the proxy's counters."""
    got = gw_log(glog)
    assert [g["esp_from"] for g in got] == [t.mn_home_addr] * 5, (got, stats(d))
    back = out["data"]["received"]
    assert len(back) == 5 and {(b["src"], b["dst"], b["proto"]) for b in back} == {
        (t.cn_addr, t.mn_home_addr, 50)}, back
    assert sorted(b["payload"] for b in back) == sorted(g["payload"] for g in got)
    s = stats(d)
    assert s["data.mn_to_gateway"] == 5 and s["data.gateway_to_mn"] == 5, s
    return s


def stop_peers(t, d: NarsuiteDaemon, cap, fa, ha, gw) -> None:  # type: ignore[no-untyped-def]
    """Teardown of a test's capture, daemon and peers (whatever the test's outcome)."""
    stop_capture(t.mipp, cap)
    d.terminate()
    t.nat.stop(fa)
    t.ha.stop(ha)
    t.cn.stop(gw)


def test_registration_and_data_through_a_foreign_agent(fa_topo, tmp_path):
    t = fa_topo
    ha, ha_log = start_ha(t, tmp_path)
    gw, glog = start_gw(t, tmp_path)
    fa, flog = start_fa(t, tmp_path)
    d = NarsuiteDaemon(t.mipp, fa_config(t, tmp_path), roles="mipproxy").start()
    cap, pcap = capture(t.mipp, tmp_path, (t.mipp_external_if,))
    try:
        out = mn_via_fa(t, "--udp-tunnel", "--via-fa", "--data", "5", "--expect", "5",
                        "--gateway", t.cn_addr)
        reply = out["replies"][0]
        assert reply["code"] == 0 and reply["auth_ok"], (out, fa_log(flog), d.log_text())
        events = fa_log(flog)
        answered = [e for e in events if "reply" in e]
        assert answered and answered[0]["fa_ha_ok"] and answered[0]["src"] == t.mipp_external
        # the FA's extensions stop at the proxy: the HA sees only the MN-HA authentication
        relayed = json.loads(ha_log.read_text().splitlines()[0])
        assert [e[0] for e in relayed["exts"]] == [32], relayed
        rows = d.rows("mip", "bindings")
        # the FA relayed from another address than its CoA: not a NAT, no UDP tunnel; the
        # binding names the FA it came through
        assert rows[0]["care_of"] == t.nat_public and rows[0]["encap"] == "ipip", rows
        assert rows[0]["foreign_agent"] == FA_SOURCE, rows
        s = check_esp_both_ways(t, out, glog, d)
        assert s["fa_relayed"] == 1, s
        # a request the FA signs with a wrong key: 132, answered to the FA, nothing to the HA
        t.nat.stop(fa)
        fa, _ = start_fa(t, tmp_path, "--corrupt")
        out = mn_via_fa(t)
        assert out["replies"][0]["code"] == 132 and out["replies"][0]["auth_ok"], out
        assert stats(d)["fa_auth_failed"] == 1
        assert len(ha_log.read_text().splitlines()) == 1
    finally:
        stop_peers(t, d, cap, fa, ha, gw)
    lines = tshark_check(t.mipp, pcap)
    assert sum("mip" in line for line in lines) >= 4, lines
    assert sum(line.split("\t")[0].startswith("eth:ethertype:ip:ip") for line in lines) >= 10, lines


@pytest.mark.parametrize("flags,proto,encap", [("TG", 47, "gre"), ("TM", 55, "minimal")])
def test_gre_and_minimal_encapsulation_through_a_foreign_agent(fa_topo, tmp_path, flags, proto,
                                                               encap):
    """The MN asks for GRE (G) or minimal encapsulation (M) in its request; the FA relays it
    and tunnels both ways with what the MN asked (the peer decapsulates by the protocol
    the proxy used, so IP-in-IP from the proxy would be counted under 4 and fail the
    check); the proxy tunnels to the FA's care-of address with it and takes the FA's
    reverse tunnel in it.  ESP from the MN's home address reaches the gateway and comes
    back, five packets each way."""
    t = fa_topo
    ha, _ha_log = start_ha(t, tmp_path)
    gw, glog = start_gw(t, tmp_path)
    fa, flog = start_fa(t, tmp_path)
    d = NarsuiteDaemon(t.mipp, fa_config(t, tmp_path), roles="mipproxy").start()
    cap, pcap = capture(t.mipp, tmp_path, (t.mipp_external_if,))
    try:
        out = mn_via_fa(t, "--flags", flags, "--via-fa", "--data", "5", "--expect", "5",
                        "--gateway", t.cn_addr)
        reply = out["replies"][0]
        assert reply["code"] == 0 and reply["auth_ok"], (out, fa_log(flog), d.log_text())
        rows = d.rows("mip", "bindings")
        assert len(rows) == 1, rows
        assert rows[0]["encap"] == encap and rows[0]["care_of"] == t.nat_public, rows
        assert rows[0]["foreign_agent"] == FA_SOURCE and rows[0]["tunnel_to"] == t.nat_public
        check_esp_both_ways(t, out, glog, d)
    finally:
        stop_peers(t, d, cap, fa, ha, gw)
    counts = [e for e in fa_log(flog) if "delivered_to_mn" in e][-1]
    assert counts["delivered_to_mn"] == 5 and counts.get(f"delivered_proto_{proto}") == 5, counts
    assert counts["tunnelled_to_ha"] == 5, counts
    tshark_check(t.mipp, pcap)
    # on the proxy's external side: the five packets each way in the MN's encapsulation,
    # between the FA's care-of address and MIPP-Pub
    tunnelled = t.mipp.run(["tshark", "-r", str(pcap), "-Y", f"ip.proto == {proto}", "-T",
                            "fields", "-E", "occurrence=f", "-e", "ip.src", "-e", "ip.dst"]).stdout.split("\n")
    pairs = [tuple(x.split("\t")) for x in tunnelled if x.strip()]
    assert sorted(set(pairs)) == sorted({(t.nat_public, t.mipp_external),
                                         (t.mipp_external, t.nat_public)}), pairs
    assert len(pairs) == 10, pairs


@pytest.mark.parametrize("nh", [4, 47, 55])
def test_udp_tunnelling_asked_by_the_foreign_agent(fa_topo, tmp_path, nh):
    """RFC 3519 through a foreign agent: the FA adds its own UDP Tunnel Request (next
    header 4, 47 or 55) after the MN-HA extension, under its FA-HA authenticator, and
    relays from an address that is not its care-of address (what a NAT in front of it
    would show).  The proxy answers with a UDP Tunnel Reply for the FA (after the MN-HA
    extension: the MN's part carries none) and tunnels the MN's traffic inside UDP 434
    to where the FA's requests come from; the FA's tunnel data comes back the same way.
    The peer delivers only UDP tunnel data with its own next header (raw IP-in-IP from
    the proxy would not count)."""
    t = fa_topo
    ha, _ha_log = start_ha(t, tmp_path)
    gw, glog = start_gw(t, tmp_path)
    fa, flog = start_fa(t, tmp_path, "--udp-tunnel", "--udp-encap", str(nh))
    d = NarsuiteDaemon(t.mipp, fa_config(t, tmp_path), roles="mipproxy").start()
    cap, pcap = capture(t.mipp, tmp_path, (t.mipp_external_if,))
    try:
        out = mn_via_fa(t, "--via-fa", "--data", "5", "--expect", "5", "--gateway", t.cn_addr)
        reply = out["replies"][0]
        assert reply["code"] == 0 and reply["auth_ok"], (out, fa_log(flog), d.log_text())
        assert 44 not in [e[0] for e in reply["exts"]], reply
        fa_reply = [e for e in fa_log(flog) if "reply" in e][0]
        assert fa_reply["fa_ha_ok"] and fa_reply["udp_tunnel_reply"] == {
            "code": 0, "keepalive": 110, "forced": False}, fa_reply
        rows = d.rows("mip", "bindings")
        assert len(rows) == 1, rows
        want = "udp" if nh == 4 else "udp/" + {47: "gre", 55: "minimal"}[nh]
        assert rows[0]["encap"] == want and rows[0]["tunnel_to"] == f"{FA_SOURCE}:434", rows
        assert rows[0]["foreign_agent"] == FA_SOURCE and rows[0]["care_of"] == t.nat_public
        check_esp_both_ways(t, out, glog, d)
    finally:
        stop_peers(t, d, cap, fa, ha, gw)
    counts = [e for e in fa_log(flog) if "delivered_to_mn" in e][-1]
    assert counts.get(f"delivered_udp_{nh}") == 5 and counts["tunnelled_to_ha"] == 5, counts
    lines = tshark_check(t.mipp, pcap)
    # tshark reads RFC 3519 tunnel data as Mobile IP (type 4), none malformed
    assert sum(line.split("\t")[1:2] == ["4"] for line in lines) >= 10, lines
