"""The mipproxy role in the MN — (NAT) — MIPP — {HA, CN} lab, against an independent
mobile node and home agent (tests/mip_peer.py: scapy MobileIP layers and raw extension
bytes, no narsuite import).

narsuite runs on MIPP as ``twistd -n narsuite --role=mipproxy``.  The cases are those of
issue 11: (a) registration through the proxy, the HA seeing the §2.7.1 packet;
(c) every denial code 200-206; (d) a wrong authenticator and a replayed identification;
(e) an unreachable HA, answered 202 from the real ICMP error.  tshark dissects every
registration message captured on both sides of the proxy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.lab.topologies import mip_topology

HERE = Path(__file__).resolve().parent
PEER = HERE / "mip_peer.py"

SPI = 0x1000
KEY = "00112233445566778899aabbccddeeff"
NAI_SPI = 0x1001
NAI_KEY = "ffeeddccbbaa99887766554433221100"
NAI = "alice@example.com"
HA2 = "10.2.0.9"  # allowed as a home agent, nobody there
INTERNAL_MN = "203.0.113.77"  # a second address of the MN, inside internal_networks


def proxy_config(t, tmp: Path, extra: str = "") -> Path:
    keyfile = tmp / "mn.key"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(0o600)
    cfg = tmp / "mipp.toml"
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{tmp}/state"
        runtime_dir = "{tmp}/run"
        [store]
        backend = "memory"
        [metrics]
        enabled = true
        port = 9470
        [mipproxy]
        public_address = "{t.mipp_external}"
        private_address = "{t.mipp_internal}"
        home_agents = ["{t.ha_addr}", "{HA2}"]
        ha_pool = ["{t.ha_addr}"]
        internal_networks = ["{t.home_net}", "{INTERNAL_MN}/32"]
        vpn_gateways = ["{t.mipp_external}"]
        data_path = false
        [[mipproxy.mobile_nodes]]
        spi = {SPI}
        key_file = "{keyfile}"
        home_address = "{t.mn_home_addr}"
        [[mipproxy.mobile_nodes]]
        spi = {NAI_SPI}
        key = "{NAI_KEY}"
        nai = "{NAI}"
        """) + extra)
    return cfg


def start_ha(t, tmp: Path, *args: str):
    log = tmp / "ha.jsonl"
    proc = t.ha.popen([sys.executable, str(PEER), "ha", "--listen", t.ha_addr,
                       "--sa", f"{SPI}:{KEY}", "--sa", f"{NAI_SPI}:{NAI_KEY}", "--log", str(log),
                       *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "ready" in line, line + proc.stdout.read()
    return proc, log


def mn(t, *args: str, spi: int = SPI, key: str = KEY, home: str | None = None) -> dict:
    out = t.mn.run([sys.executable, str(PEER), "mn", "--proxy", t.mipp_external,
                    "--home", home if home is not None else t.mn_home_addr,
                    "--spi", str(spi), "--key", key, *args], timeout=30)
    return json.loads(out.stdout)


def ha_requests(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def exts(reply: dict) -> dict[int, str]:
    return {t: body for t, body in reply["exts"]}


@pytest.fixture
def direct(lab):
    """MN with a co-located care-of address on the external net, no NAT."""
    return mip_topology(lab, nat=False)


def capture(host, tmp: Path, ifaces: tuple[str, ...]):
    pcap = tmp / "mip.pcap"
    # a filter before the first -i applies to every interface
    argv = ["dumpcap", "-q", "-f", "udp port 434 or icmp or ip proto 4 or ip proto 47 "
            "or ip proto 55 or ip proto 50", "-w", str(pcap)]
    for i in ifaces:
        argv += ["-i", i]
    proc = host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # dumpcap says "Capturing on ..." once every interface is open
    deadline = time.monotonic() + 10
    seen = ""
    while time.monotonic() < deadline and seen.count("Capturing on") < 1:
        seen += proc.stderr.readline()
    time.sleep(0.3)
    return proc, pcap


def stop_capture(host, proc) -> None:
    """Stop dumpcap once what it has seen is on disk.  libpcap hands packets over a block at a
    time (a block is delivered when full or when its timeout, up to a second, expires), and
    a dumpcap stopped right after the last packet loses the block in flight: under load
    that was the last exchanges of a test, and a frame count came out short."""
    time.sleep(1.2)
    host.stop(proc)


def tshark_check(host, pcap: Path) -> list[str]:
    """Every Mobile IP message dissected; none malformed.  Returns the frames' protocols."""
    out = host.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.protocols",
                    "-e", "mip.type", "-e", "_ws.malformed", "-e", "_ws.expert.message"]).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "nothing captured"
    assert not any("malformed" in line.lower() for line in lines), out
    return lines


def test_registration_relayed_as_draft_271_and_reply_relayed(direct, tmp_path):
    """(a) A co-located-CoA MN registers through the proxy; the HA sees exactly the
    §2.7.1 packet (IP-S MIPP-Priv, HA field = HA, CoA = MIPP-Priv, same home address and
    identification, bits per §2.2.1, extensions copied but the MN-proxy ones, MN-HA auth
    with the MN's SA), and the MN gets the HA's reply with HA field = MIPP-Pub (§2.3.1)."""
    t = direct
    ha, log = start_ha(t, tmp_path)
    cap, pcap = capture(t.mipp, tmp_path, (t.mipp_external_if, t.mipp_internal_if))
    d = NarsuiteDaemon(t.mipp, proxy_config(t, tmp_path), roles="mipproxy").start()
    try:
        skippable = "a0 03 616263".replace(" ", "")  # type 160, skippable: relayed
        out = mn(t, "--ha-param", t.ha_addr, "--flags", "SBDMTr", "--lifetime", "1000",
                 "--raw-ext", skippable, "--after-auth", "2106" + "00000000" + "0000")
        reply = out["replies"][0]
        assert reply is not None, d.log_text()
        assert reply["code"] == 1, reply  # accepted; S unsupported by the proxy (2.6.2)
        assert reply["auth_ok"], reply
        assert reply["ha"] == t.mipp_external and reply["home"] == t.mn_home_addr
        assert reply["id"] == out["identification"] and reply["lifetime"] == 600
        e = exts(reply)
        assert e[127] == "0000" + "0a020002"  # HA Parameter: the actual HA (2.6.1)
        reqs = [r for r in ha_requests(log) if r.get("type") == 1]
        assert len(reqs) == 1
        r = reqs[0]
        assert r["src"] == [t.mipp_internal, 434]
        assert r["home"] == t.mn_home_addr and r["ha"] == t.ha_addr
        assert r["coa"] == t.mipp_internal and r["id"] == out["identification"]
        assert r["lifetime"] == 1000  # <= the MN's; the proxy's cap is 1800
        # S never, B only when supported (off here), D set since B is not, M kept, T set,
        # reserved bits sent as zero
        assert r["flags"] == 0x20 | 0x10 | 0x02, hex(r["flags"])
        assert r["auth_ok"] and r["spi"] == SPI
        # the skippable extension copied; no HA Parameter, nothing after the MN's auth
        assert [x[0] for x in r["exts"]] == [160, 32]
        assert r["exts"][0][1] == "616263"
        rows = d.rows("mip", "bindings")
        assert len(rows) == 1 and rows[0]["care_of"] == t.mn_addr, rows
        assert rows[0]["home_agent"] == t.ha_addr and rows[0]["lifetime"] == 600
        assert d.rows("mip", "pending") == []
        # deregistration: lifetime 0 retires the binding
        out = mn(t, "--ha-param", t.ha_addr, "--lifetime", "0")
        assert out["replies"][0]["code"] == 0
        assert d.rows("mip", "bindings") == []
        stats = {r["counter"]: r["value"] for r in d.rows("mip", "stats")}
        assert stats["requests_relayed"] == 2 and stats["replies_relayed"] == 2
        metrics = t.mipp.run(["curl", "-sf", "http://127.0.0.1:9470/metrics"]).stdout
        assert 'narsuite_mipproxy_events_total{event="requests_relayed"} 2.0' in metrics
    finally:
        d.terminate()
        stop_capture(t.mipp, cap)
        t.ha.stop(ha)
    lines = tshark_check(t.mipp, pcap)
    assert sum("mip" in line.split("\t")[0] for line in lines) == 8, lines


def test_every_denial_code_200_to_206(direct, tmp_path):
    """(c) 200 no HA Parameter; 201 dynamic HA without NAI; 202 HA unreachable (ICMP);
    203/204/205 the HA's reply lacks the NAI / home address / HA address; 206 internal."""
    t = direct
    d = NarsuiteDaemon(t.mipp, proxy_config(t, tmp_path), roles="mipproxy").start()
    procs = []
    cap, pcap = capture(t.mipp, tmp_path, (t.mipp_external_if, t.mipp_internal_if))
    try:
        code = lambda out: out["replies"][0]["code"]  # noqa: E731
        out = mn(t)  # no HA Parameter extension
        assert code(out) == 200 and out["replies"][0]["auth_ok"]
        out = mn(t, "--ha-param", "0.0.0.0")  # dynamic, no NAI
        assert code(out) == 201
        out = mn(t, "--ha-param", t.ha_addr)  # no HA running yet: port unreachable
        assert code(out) == 202, out
        assert exts(out["replies"][0])[127] == "0000" + "0a020002"
        # an MN on an internal network (its CoA = its source address) is told to register
        # with its HA directly (2.6.1)
        t.mn.ip("addr", "add", f"{INTERNAL_MN}/24", "dev", t.mn_if)
        out = mn(t, "--ha-param", t.ha_addr, "--bind", INTERNAL_MN)
        assert code(out) == 206
        # behind a NAT (CoA differs from the source), the source address decides
        out = mn(t, "--ha-param", t.ha_addr, "--bind", INTERNAL_MN, "--coa", "192.168.1.5")
        assert code(out) == 206
        # 206 carries the HA to use, also a dynamically picked one
        out = mn(t, "--ha-param", "0.0.0.0", "--nai", NAI, "--bind", INTERNAL_MN,
                 spi=NAI_SPI, key=NAI_KEY, home="0.0.0.0")
        assert code(out) == 206 and exts(out["replies"][0])[127] == "0000" + "0a020002"
        # replies without NAI / home address / HA address
        for args, want in ((("--omit-nai", "--assign-home", "10.2.0.101"), 203),
                           (("--reply-home", "0.0.0.0"), 204),
                           (("--assign-home", "10.2.0.101", "--reply-ha", "0.0.0.0"), 205)):
            ha, log = start_ha(t, tmp_path, *args)
            try:
                out = mn(t, "--ha-param", "0.0.0.0", "--nai", NAI, spi=NAI_SPI, key=NAI_KEY,
                         home="0.0.0.0")
                assert code(out) == want, (args, out)
                assert out["replies"][0]["auth_ok"]
            finally:
                t.ha.stop(ha)
        # and an accepted dynamic registration: the HA assigned the home address
        ha, log = start_ha(t, tmp_path, "--assign-home", "10.2.0.101")
        try:
            out = mn(t, "--ha-param", "0.0.0.0", "--nai", NAI, spi=NAI_SPI, key=NAI_KEY,
                     home="0.0.0.0")
            r = out["replies"][0]
            assert code(out) == 0 and r["home"] == "10.2.0.101"
            assert exts(r)[131] == NAI.encode().hex() and exts(r)[127] == "0000" + "0a020002"
            rows = d.rows("mip", "bindings")
            assert [(x["home_address"], x["nai"]) for x in rows] == [("10.2.0.101", NAI)]
        finally:
            t.ha.stop(ha)
        stats = {r["counter"]: r["value"] for r in d.rows("mip", "stats")}
        for c in range(200, 207):
            assert any(k.startswith(f"denied.{c}.") for k in stats), (c, stats)
    finally:
        stop_capture(t.mipp, cap)
        d.terminate()
        for p in procs:
            t.ha.stop(p)
    tshark_check(t.mipp, pcap)


def test_wrong_authenticator_and_replayed_identification_refused(direct, tmp_path):
    """(d) 131 for a wrong authenticator, a missing one and an unknown SPI, nothing reaching
    the HA; 133 for a replayed identification and for a stale timestamp, carrying the
    proxy's time in the high 32 bits and the request's low 32 bits."""
    t = direct
    ha, log = start_ha(t, tmp_path)
    d = NarsuiteDaemon(t.mipp, proxy_config(t, tmp_path), roles="mipproxy").start()
    try:
        out = mn(t, "--ha-param", t.ha_addr, "--bad-auth")
        assert out["replies"][0]["code"] == 131
        out = mn(t, "--ha-param", t.ha_addr, "--no-auth")
        assert out["replies"][0]["code"] == 131
        out = mn(t, "--ha-param", t.ha_addr, spi=0x9999)
        assert out["replies"][0]["code"] == 131
        assert not [r for r in ha_requests(log) if r.get("type") == 1]
        # a replay of an accepted request, byte for byte
        out = mn(t, "--ha-param", t.ha_addr, "--replay")
        first, second = out["replies"]
        assert first["code"] == 0 and second["code"] == 133, out
        assert second["auth_ok"]
        assert second["id"] & 0xFFFFFFFF == out["identification"] & 0xFFFFFFFF
        assert abs((second["id"] >> 32) - (int(time.time()) + 2208988800)) < 5
        assert len([r for r in ha_requests(log) if r.get("type") == 1]) == 1
        # a timestamp a minute off
        out = mn(t, "--ha-param", t.ha_addr, "--clock-offset", "-60")
        assert out["replies"][0]["code"] == 133
        stats = {r["counter"]: r["value"] for r in d.rows("mip", "stats")}
        assert stats["auth_failed"] == 3 and stats["replay_refused"] == 2
        assert stats["denied.131.ha-mn-failed-auth"] == 3
    finally:
        d.terminate()
        t.ha.stop(ha)


def test_unreachable_home_agent_gives_202_from_a_real_icmp_error(direct, tmp_path):
    """(e) The HA host is up but nothing listens on 434: its kernel answers port
    unreachable, the proxy turns that into 202 for the MN and forgets the pending entry."""
    t = direct
    d = NarsuiteDaemon(t.mipp, proxy_config(t, tmp_path), roles="mipproxy").start()
    cap, pcap = capture(t.mipp, tmp_path, (t.mipp_internal_if,))
    try:
        t0 = time.monotonic()
        out = mn(t, "--ha-param", t.ha_addr)
        assert out["replies"][0]["code"] == 202, out
        assert time.monotonic() - t0 < 2.5  # from the ICMP error, not a timeout
        assert d.rows("mip", "pending") == []
        stats = {r["counter"]: r["value"] for r in d.rows("mip", "stats")}
        assert stats["icmp_errors"] == 1
    finally:
        stop_capture(t.mipp, cap)
        d.terminate()
    icmp = t.mipp.run(["tshark", "-r", str(pcap), "-Y", "icmp.type == 3 && icmp.code == 3",
                       "-T", "fields", "-e", "ip.src"]).stdout.split()
    assert [line.split(",")[0] for line in icmp] == [t.ha_addr]  # outer source: the HA


def test_location_by_receiving_interface(direct, tmp_path):
    """§2.6.1 #2: with location_detection = "interface", a request reaching MIPP-Pub through
    the internal interface (an MN at home, on the CN's segment) gets 206 with its HA, while the
    same MN outside is relayed, though no internal_networks entry covers either address."""
    t = direct
    ha, _ = start_ha(t, tmp_path)
    cfg = proxy_config(t, tmp_path)
    text = cfg.read_text().replace(f'internal_networks = ["{t.home_net}", "{INTERNAL_MN}/32"]',
                                   'location_detection = "interface"\n'
                                   f'internal_interfaces = ["{t.mipp_internal_if}"]')
    cfg.write_text(text)
    d = NarsuiteDaemon(t.mipp, cfg, roles="mipproxy").start()
    try:
        out = json.loads(t.cn.run([sys.executable, str(PEER), "mn", "--proxy", t.mipp_external,
                                   "--home", t.mn_home_addr, "--spi", str(SPI), "--key", KEY,
                                   "--ha-param", t.ha_addr], timeout=30).stdout)
        assert out["replies"][0]["code"] == 206
        assert exts(out["replies"][0])[127] == "0000" + "0a020002"
        assert mn(t, "--ha-param", t.ha_addr)["replies"][0]["code"] == 0
    finally:
        d.terminate()
        t.ha.stop(ha)
