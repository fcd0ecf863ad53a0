"""The esp role in the R—NAT—G—H lab against an independent ESP peer (tests/esp_peer.py).

narsuite runs on G as ``twistd -n narsuite --role=esp`` with statically keyed
peers; each remote host R runs the scapy-based peer behind a real nftables NAT.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from labtraffic import ping, tcp_transfer, tshark_ipsec

from narsuite.lab.daemon import NarsuiteDaemon

HERE = Path(__file__).resolve().parent
PEER = HERE / "esp_peer.py"

GCM_KEYS = ("11" * 16 + "aabbccdd", "22" * 16 + "eeff0011")
CBC_KEYS = ("33" * 16, "44" * 16)
SHA1_KEYS = ("55" * 20, "66" * 20)


def peer_toml(name, spi_in, spi_out, enc, keys, integ="none", ikeys=("", ""), **extra) -> str:
    """A [[esp.peers]] table for G: G's inbound keys are the peer's outbound ones."""
    lines = [
        "[[esp.peers]]",
        f'name = "{name}"', f"spi_in = {spi_in}", f"spi_out = {spi_out}",
        f'enc = "{enc}"', f'enc_key_in = "{keys[0]}"', f'enc_key_out = "{keys[1]}"',
        f'integ = "{integ}"', f'integ_key_in = "{ikeys[0]}"', f'integ_key_out = "{ikeys[1]}"',
    ]
    for k, v in extra.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def start_peer(host, tmp: Path, name: str, spi_in_g: int, spi_out_g: int, enc, keys, integ="none",
               ikeys=("", ""), tun_addr=None, routes=("10.1.0.0/24",), keepalive=0.0):
    """The remote end: its outbound SA is G's inbound one."""
    args = [sys.executable, str(PEER), "--gateway", "198.51.100.1", "--spi-out", str(spi_in_g),
            "--spi-in", str(spi_out_g), "--enc", enc, "--enc-key-out", keys[0], "--enc-key-in", keys[1],
            "--integ", integ, "--stats-file", str(tmp / f"{name}.stats.json"),
            "--keepalive", str(keepalive), "--tun-name", "rtun%d"]
    if integ != "none":
        args += ["--integ-key-out", ikeys[0], "--integ-key-in", ikeys[1]]
    if tun_addr:
        args += ["--tun-addr", tun_addr]
    for r in routes:
        args += ["--route", r]
    log = open(tmp / f"{name}.log", "w")
    proc = host.popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    assert "READY" in line, (tmp / f"{name}.log").read_text()
    return proc


def wait_line(proc, marker: str, timeout: float) -> str:
    """Read ``proc``'s output until a line holds ``marker`` (or time runs out); return it all."""
    import selectors

    out = ""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while marker not in out and time.monotonic() < deadline:
        if sel.select(max(0.0, deadline - time.monotonic())):
            line = proc.stdout.readline()
            if not line:
                break
            out += line
    sel.close()
    return out


def peer_stats(proc, path: Path) -> dict:
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise AssertionError(f"no stats at {path}")


def gateway(topo, tmp: Path, peers: str, esp_extra: str = "", pools: bool = True) -> NarsuiteDaemon:
    cfg = tmp / "narsuite.toml"
    cfg.write_text(textwrap.dedent("""
        [daemon]
        state_dir = "state"
        runtime_dir = "run"
        [metrics]
        enabled = false
        """) + ('[store.pools.ra]\nnetwork = "10.8.0.0/24"\nexclude = ["10.8.0.1"]\n' if pools else "")
        + "[esp]\n" + esp_extra + "\n" + peers)
    topo.g.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
    return NarsuiteDaemon(topo.g, cfg, roles="esp").start()


@pytest.mark.parametrize("suite", ["aes-gcm-16", "aes-cbc/hmac-sha1-96"])
def test_two_clients_same_private_address_pool_mode(ra_topo, tmp_path, suite):
    """R1 and R2 share 192.168.1.10 behind different NATs; pool addresses keep them apart."""
    t = ra_topo
    if suite == "aes-gcm-16":
        enc, keys, integ, ikeys = "aes-gcm-16", GCM_KEYS, "none", ("", "")
    else:
        enc, keys, integ, ikeys = "aes-cbc", CBC_KEYS, "hmac-sha1-96", SHA1_KEYS
    peers = (peer_toml("r1", 0x1001, 0x2001, enc, keys, integ, ikeys, pool="ra", address="10.8.0.2")
             + peer_toml("r2", 0x1002, 0x2002, enc, keys, integ, ikeys, pool="ra", address="10.8.0.3"))
    g = gateway(t, tmp_path, peers)
    p1 = start_peer(t.r1, tmp_path, "r1", 0x1001, 0x2001, enc, keys, integ, ikeys, tun_addr="10.8.0.2/32")
    start_peer(t.r2, tmp_path, "r2", 0x1002, 0x2002, enc, keys, integ, ikeys, tun_addr="10.8.0.3/32")
    assert ping(t.r1, t.h_addr) and ping(t.r2, t.h_addr)
    assert tcp_transfer(t.h, t.r1, t.h_addr) == 300_000 // 256 * 256
    # H reaches each remote host by its own pool address
    assert ping(t.h, "10.8.0.2") and ping(t.h, "10.8.0.3")
    peers_seen = {r["peer"]: r for r in g.rows("esp", "peers")}
    assert peers_seen["r1"]["remote"].startswith(t.nat1_public + ":")
    assert peers_seen["r2"]["remote"].startswith(t.nat2_public + ":")
    sas = g.rows("esp", "sas")
    assert {(r["peer"], r["dir"]) for r in sas} == {("r1", "in"), ("r1", "out"), ("r2", "in"), ("r2", "out")}
    assert all(r["packets"] > 0 for r in sas)
    detail = g.json("esp", "sa", "0x1001")["fields"]
    assert detail["direction"] == "in" and detail["packets"] > 0 and detail["replay.top"] > 0
    assert detail["replay.window"] == 128 and detail["auth_failed"] == 0
    leases = {r["key"] for r in g.rows("list", "store.lease")}
    assert {"pool:ra/10.8.0.2", "pool:ra/10.8.0.3"} <= leases
    s1 = peer_stats(p1, tmp_path / "r1.stats.json")
    assert s1["esp_rx"] > 0 and s1.get("decrypt_fail", 0) == 0
    g.terminate()


def test_two_clients_same_private_address_napt_mode(ra_topo, tmp_path):
    """Both hosts keep 192.168.1.10 as inner source; G translates them to G_i (001 App. A)."""
    t = ra_topo
    enc, keys = "aes-gcm-16", GCM_KEYS
    peers = (peer_toml("r1", 0x1001, 0x2001, enc, keys, policy="napt")
             + peer_toml("r2", 0x1002, 0x2002, enc, keys, policy="napt"))
    g = gateway(t, tmp_path, peers, esp_extra='napt_address = "10.9.0.1"\n')
    start_peer(t.r1, tmp_path, "r1", 0x1001, 0x2001, enc, keys)
    start_peer(t.r2, tmp_path, "r2", 0x1002, 0x2002, enc, keys)
    assert ping(t.r1, t.h_addr) and ping(t.r2, t.h_addr)
    assert tcp_transfer(t.h, t.r2, t.h_addr) == 300_000 // 256 * 256
    napt = g.rows("list", "esp.napt")
    assert {r["peer"] for r in napt} == {"r1", "r2"}
    assert all(r["inner_ip"] == "192.168.1.10" for r in napt)
    g.terminate()


@pytest.mark.parametrize("keepalive", [True, False])
def test_keepalives_keep_the_nat_mapping(lab, tmp_path, keepalive):
    """With a 3 s UDP timeout at the NAT, H reaches R after 6 s idle only thanks to keepalives."""
    from narsuite.lab.topologies import remote_access_topology

    t = remote_access_topology(lab, udp_timeout=3)
    enc, keys = "aes-gcm-16", GCM_KEYS
    peers = peer_toml("r1", 0x1001, 0x2001, enc, keys, pool="ra", address="10.8.0.2",
                      keepalive="on" if keepalive else "off")
    g = gateway(t, tmp_path, peers, esp_extra="keepalive_interval = 1.0\n")
    start_peer(t.r1, tmp_path, "r1", 0x1001, 0x2001, enc, keys, tun_addr="10.8.0.2/32")
    assert ping(t.r1, t.h_addr, count=1)
    time.sleep(6)
    reached = ping(t.h, "10.8.0.2", count=2)
    rows = {r["peer"]: r for r in g.rows("esp", "peers")}
    if keepalive:
        assert reached
        assert rows["r1"]["ka_sent"] >= 4
    else:
        assert not reached
        assert rows["r1"]["ka_sent"] == 0
    g.terminate()


def test_bad_packets_are_counted_and_dropped(ra_topo, tmp_path):
    t = ra_topo
    enc, keys = "aes-gcm-16", GCM_KEYS
    g = gateway(t, tmp_path, peer_toml("r1", 0x1001, 0x2001, enc, keys, pool="ra", address="10.8.0.2"))
    # R3 sends (from behind NAT1) garbage, an unknown SPI, a truncated packet, a forged
    # packet for the real SPI, and one real packet twice (a replay).
    script = textwrap.dedent(f"""
        import socket
        from scapy.layers.inet import IP, ICMP
        from scapy.layers.ipsec import SecurityAssociation, ESP
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 4500))
        g = ("198.51.100.1", 4500)
        s.sendto(b"\\xff", g)                                   # keepalive
        s.sendto(b"\\x00\\x00\\x00\\x00ike", g)                   # non-ESP marker: not ESP's
        s.sendto(b"\\x00\\x00\\x99\\x99" + bytes(40), g)          # unknown SPI
        s.sendto(b"\\x00\\x00\\x10\\x01\\x00", g)                  # truncated
        s.sendto(b"\\x00\\x00\\x10\\x01\\x00\\x00\\x00\\x05" + bytes(56), g)  # forged, real SPI
        sa = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM",
                                 crypt_key=bytes.fromhex("{keys[0]}"),
                                 tunnel_header=IP(src="192.168.1.11", dst="198.51.100.1"))
        pkt = sa.encrypt(IP(src="10.8.0.2", dst="10.1.0.10") / ICMP(), seq_num=7)
        esp = bytes(pkt[ESP])
        s.sendto(esp, g); s.sendto(esp, g)                       # replay
        """)
    t.r3.run([sys.executable, "-c", script])
    time.sleep(0.5)
    stats = {r["counter"]: r["value"] for r in g.rows("esp", "stats")}
    assert stats["keepalives_rx"] == 1
    assert stats["unknown_spi"] == 1
    assert stats["truncated"] == 1
    assert stats["auth_failed"] == 1
    assert stats["replayed"] == 1
    assert stats["rx_packets"] == 1
    assert stats["udp.unclaimed"] == 1  # the IKE-marked datagram: no ike role here
    assert g.alive()
    # only the authenticated packet taught G where r1 is (NAT1's public side)
    (row,) = g.rows("esp", "peers")
    assert row["remote"].startswith(t.nat1_public + ":")
    g.terminate()


@pytest.mark.parametrize("checksum", ["incremental", "recompute"])
def test_transport_mode_through_the_nat(ra_topo, tmp_path, checksum):
    """R1 talks UDP to a service on G itself in transport mode; G fixes the checksum the NAT
    broke (NAT-OA, 002 §3.1.2) so G's own stack accepts it, and answers through ESP."""
    t = ra_topo
    enc, keys = "aes-gcm-16", GCM_KEYS
    peers = peer_toml("r1", 0x1001, 0x2001, enc, keys, mode="transport",
                      local_address=t.g_public, nat_oa_remote=t.r1_addr, checksum=checksum,
                      selector_proto=17, selector_port=7777)
    g = gateway(t, tmp_path, peers)
    echo = t.g.popen([sys.executable, "-c", textwrap.dedent("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 7777))
        while True:
            data, addr = s.recvfrom(2048); s.sendto(b"echo:" + data, addr)
        """)])
    t.g.wait_port(7777, proto="udp")
    args = [sys.executable, str(PEER), "--gateway", t.g_public, "--mode", "transport",
            "--spi-out", str(0x1001), "--spi-in", str(0x2001), "--enc", enc,
            "--enc-key-out", keys[0], "--enc-key-in", keys[1],
            "--transport-send", f"{t.g_public}:7777:hello", "--transport-count", "3",
            "--transport-interval", "0.3"]
    peer = t.r1.popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = wait_line(peer, "ECHO-REPLY", timeout=15)
    t.r1.stop(peer)
    assert "echo:hello" in seen, seen + g.log_text()
    stats = {r["counter"]: r["value"] for r in g.rows("esp", "stats")}
    assert stats["rx_packets"] >= 1 and stats["tx_packets"] >= 1
    t.g.stop(echo)
    g.terminate()
    # policy routing for the transport peer is removed with the role
    assert "lookup 4500" not in t.g.run(["ip", "rule"]).stdout


def test_second_transport_client_behind_the_same_nat_is_refused(ra_topo, tmp_path):
    t = ra_topo
    enc, keys = "aes-gcm-16", GCM_KEYS
    common = dict(mode="transport", local_address=t.g_public, remote=f"{t.nat1_public}:4500",
                  selector_proto=17, selector_port=7777)
    peers = (peer_toml("r1", 0x1001, 0x2001, enc, keys, **common)
             + peer_toml("r3", 0x1003, 0x2003, enc, keys, **dict(common, remote=f"{t.nat1_public}:4501")))
    g = gateway(t, tmp_path, peers)
    deadline = time.monotonic() + 5
    while "refused" not in g.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "transport peer 'r3' refused: its traffic selector overlaps 'r1'" in g.log_text()
    assert [r["peer"] for r in g.rows("esp", "peers")] == ["r1"]
    stats = {r["counter"]: r["value"] for r in g.rows("esp", "stats")}
    assert stats["transport_conflict"] == 1
    g.terminate()


RAW_CLIENT = textwrap.dedent("""
    import socket, sys, select
    from scapy.layers.inet import IP, ICMP, UDP
    from scapy.layers.ipsec import SecurityAssociation, ESP
    mode = sys.argv[1]
    key_out, key_in = bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
    me, g = "198.51.100.101", "198.51.100.1"
    out_sa = SecurityAssociation(ESP, spi=0x1009, crypt_algo="AES-GCM", crypt_key=key_out,
                                 tunnel_header=IP(src=me, dst=g))
    in_sa = SecurityAssociation(ESP, spi=0x2009, crypt_algo="AES-GCM", crypt_key=key_in,
                                tunnel_header=IP(src=g, dst=me))
    inner = IP(src="10.8.0.9", dst="10.1.0.10") / ICMP(id=4242, seq=1) / b"raw-or-draft"
    esp = bytes(out_sa.encrypt(inner)[ESP])
    if mode == "esp":
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
        s.sendto(esp, (g, 0))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 500))
        s.sendto(b"\\x00" * 8 + esp, (g, 500))
    while select.select([s], [], [], 5)[0]:
        data, addr = s.recvfrom(65535)
        if mode == "esp":
            data = data[(data[0] & 15) * 4:]
        else:
            assert data[:8] == b"\\x00" * 8, data[:8]
            data = data[8:]
        reply = in_sa.decrypt(IP(src=g, dst=me, proto=50) / ESP(data))
        if reply.haslayer(ICMP) and reply[ICMP].type == 0 and reply[ICMP].id == 4242:
            print("REPLY", reply[IP].src, reply[IP].dst)
            break
    """)


@pytest.mark.parametrize("encap", ["esp", "udp500"])
def test_raw_esp_and_draft_port_500(ra_topo, tmp_path, encap):
    """A peer not behind a NAT uses plain ESP (protocol 50); the 004 draft's peers use UDP 500
    behind eight zero bytes.  NAT1's public side stands in for such a peer."""
    t = ra_topo
    enc, keys = "aes-gcm-16", GCM_KEYS
    remote = t.nat1_public if encap == "esp" else f"{t.nat1_public}:500"
    peers = peer_toml("pub", 0x1009, 0x2009, enc, keys, encap=encap, remote=remote,
                      address="10.8.0.9")
    g = gateway(t, tmp_path, peers, esp_extra="draft_port = 500\n" if encap == "udp500" else "",
                pools=False)
    (tmp_path / "client.py").write_text(RAW_CLIENT)
    out = t.nat1.run([sys.executable, str(tmp_path / "client.py"), encap, keys[0], keys[1]],
                     timeout=30, check=False)
    assert "REPLY 10.1.0.10 10.8.0.9" in out.stdout, out.stdout + out.stderr + g.log_text()
    (row,) = g.rows("esp", "peers")
    assert row["encap"] == encap
    g.terminate()


ISAKMP_HEADER = (b"\x11" * 8 + b"\x00" * 8 + b"\x01\x10\x02\x00" + b"\x00\x00\x00\x00"
                 + b"\x00\x00\x00\x1c")  # cookies, no next payload, v1.0, MM, length 28


def test_tshark_reads_our_wire_without_malformed_packets(ra_topo, tmp_path):
    """ESP-in-UDP both ways, G's NAT-keepalives and a non-ESP-marked IKE datagram,
    captured on G's public side and dissected by tshark."""
    t = ra_topo
    enc, keys = "aes-gcm-16", GCM_KEYS
    peers = peer_toml("r1", 0x1001, 0x2001, enc, keys, pool="ra", address="10.8.0.2", keepalive="on")
    g = gateway(t, tmp_path, peers, esp_extra="keepalive_interval = 0.5\n")
    pcap = tmp_path / "wan.pcap"
    cap = t.g.popen(["dumpcap", "-q", "-i", "wan0", "-f", "udp port 4500", "-w", str(pcap)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    start_peer(t.r1, tmp_path, "r1", 0x1001, 0x2001, enc, keys, tun_addr="10.8.0.2/32")
    assert ping(t.r1, t.h_addr, count=2)
    t.r3.run([sys.executable, "-c",
              "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              f"s.sendto(b'\\x00\\x00\\x00\\x00' + {ISAKMP_HEADER!r}, ('198.51.100.1', 4500))"])
    time.sleep(1.5)  # keepalives flow (interval 0.5 s, after the last packet to r1)
    t.g.stop(cap)
    out = tshark_ipsec(t.g, pcap, "frame.protocols", "esp.spi", "_ws.malformed", "_ws.expert.message")
    # what G sends (ESP and keepalives) carries a zero UDP checksum (RFC 3948 §2.1)
    sums = t.g.run(["tshark", "-r", str(pcap), "-Y", f"ip.src == {t.g_public}", "-T", "fields",
                    "-e", "udp.checksum"]).stdout.split()
    assert sums and set(sums) == {"0x0000"}, sums
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "nothing captured"
    assert not any("malformed" in line.lower() for line in lines), out
    protocols = [line.split("\t")[0] for line in lines]
    assert any(p.endswith("udp:udpencap:esp") for p in protocols), out
    assert any(p.endswith("udp:udpencap") for p in protocols), out  # NAT-keepalive
    assert any("isakmp" in p for p in protocols), out
    spis = {line.split("\t")[1] for line in lines if "esp" in line.split("\t")[0]}
    assert {"0x00001001", "0x00002001"} <= spis, spis
    g.terminate()
