"""The nar role end to end in the X—N—Y lab: twistd on N, narsuite-nar-client on X,
real traffic from Y built with scapy, checked on X with raw sockets."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bcrypt
import pytest

from narsuite.lab.daemon import NarsuiteDaemon

PASSWORD = "nar secret"
ESP_KEY = "11" * 16 + "aabbccdd"  # AES-GCM-128 + salt, Y -> X


def start_n(t, tmp: Path, extra: str = "", backend: str = "memory") -> NarsuiteDaemon:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    cfg = tmp / "narsuite.toml"
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "state"
        runtime_dir = "run"
        [store]
        backend = "{backend}"
        [metrics]
        enabled = false
        [nar]
        listen = "{t.n_private}"
        methods = ["password"]
        [nar.users]
        alice = "{hashed}"
        [[nar.rules]]
        action = "pass"
        clients = ["{t.private_net}"]
        [nar.nar]
        enabled = true
        lent_address = "{t.n_public}"
        """) + extra)
    return NarsuiteDaemon(t.n, cfg, roles="nar").start()


class Client:
    """narsuite-nar-client on X, holding its mappings until stopped."""

    def __init__(self, t, *args: str) -> None:
        self.host = t.x
        self.proc = t.x.popen(["narsuite-nar-client", "--server", t.n_private, "--remote", t.y_addr,
                               "--user", "alice", "--password", PASSWORD, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        self.result = json.loads(line)
        assert "error" not in self.result, self.result

    def stop(self) -> None:
        self.host.stop(self.proc)


LISTENER = textwrap.dedent("""
    import json, select, socket, sys, time
    protos = [int(p) for p in sys.argv[1].split(",")]
    deadline = time.time() + float(sys.argv[2])
    socks = [socket.socket(socket.AF_INET, socket.SOCK_RAW, p) for p in protos]
    print("READY", flush=True)
    while time.time() < deadline:
        r, _, _ = select.select(socks, [], [], max(0, deadline - time.time()))
        for s in r:
            data, addr = s.recvfrom(65535)
            print(json.dumps({"proto": data[9], "src": socket.inet_ntoa(data[12:16]),
                              "dst": socket.inet_ntoa(data[16:20]), "hex": data.hex()}), flush=True)
""")


def listen(host, tmp: Path, protos: str, seconds: float):
    script = tmp / "listener.py"
    script.write_text(LISTENER)
    proc = host.popen([sys.executable, str(script), protos, str(seconds)], stdout=subprocess.PIPE,
                      text=True)
    assert proc.stdout.readline().strip() == "READY"
    return proc


def collected(proc) -> list[dict]:
    out, _ = proc.communicate(timeout=30)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def y_send(t, tmp: Path, code: str) -> None:
    """Run scapy on Y; ``code`` builds ``packets`` (a list of scapy IP packets) to send raw."""
    script = tmp / "y_send.py"
    script.write_text("import socket\nfrom scapy.all import *\n"
                      "from scapy.layers.ipsec import SecurityAssociation, ESP\n" + code + textwrap.dedent("""
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for p in packets:
            s.sendto(bytes(p), (p[IP].dst, 0))
        """))
    t.y.run([sys.executable, str(script)], timeout=60)


def esp_from_y(t, spi: int, marker: str) -> str:
    return textwrap.dedent(f"""
        sa = SecurityAssociation(ESP, spi={spi}, crypt_algo="AES-GCM", crypt_key=bytes.fromhex("{ESP_KEY}"),
                                 tunnel_header=IP(src="{t.y_addr}", dst="{t.n_public}"))
        packets = [sa.encrypt(IP(src="172.16.0.1", dst="172.16.0.2") / UDP(dport=9) / b"{marker}")]
        """)


def decrypt_at_x(hex_packet: str, spi: int) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP, SecurityAssociation

    pkt = IP(bytes.fromhex(hex_packet))
    sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(ESP_KEY),
                             tunnel_header=IP(src=pkt.src, dst=pkt.dst))
    return bytes(sa.decrypt(pkt)[UDP].payload)


def test_curl_through_the_role_and_narctl(nar_topo, tmp_path):
    t = nar_topo
    n = start_n(t, tmp_path)
    web = t.y.popen([sys.executable, "-m", "http.server", "8080", "--bind", t.y_addr,
                     "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp_path / "hello.txt").write_text("hello from Y\n")
    t.y.wait_port(8080)
    out = t.x.run(["curl", "-sS", "-m", "10", "--socks5-hostname", f"{t.n_private}:1080",
                   "--proxy-user", f"alice:{PASSWORD}", f"http://{t.y_addr}:8080/hello.txt"])
    assert out.stdout == "hello from Y\n"
    bad = t.x.run(["curl", "-sS", "-m", "10", "--socks5-hostname", f"{t.n_private}:1080",
                   "--proxy-user", "alice:wrong", f"http://{t.y_addr}:8080/hello.txt"], check=False)
    assert bad.returncode != 0
    stats = {r["counter"]: r["value"] for r in n.rows("nar", "stats")}
    assert stats["socks.reply_succeeded"] == 1 and stats["socks.auth_failures"] == 1
    t.y.stop(web)
    n.terminate()


@pytest.mark.parametrize("translated", [False, True])
def test_nar_ipsec_two_clients_distinct_spis(nar_topo, tmp_path, translated):
    """Y sends ESP to Nb with each negotiated SPI; X receives and decrypts both."""
    t = nar_topo
    n = start_n(t, tmp_path)
    flags = ["--translated"] if translated else ["--tun"]
    c1 = Client(t, "--ipsec", "esp", *flags)
    c2 = Client(t, "--ipsec", "esp", *(["--translated"] if translated else []))
    spi1, spi2 = c1.result["ipsec"][0]["spi"], c2.result["ipsec"][0]["spi"]
    assert spi1 != spi2 and min(spi1, spi2) > 255
    assert c1.result["translated"] is translated and c1.result["lent"] == t.n_public
    mappings = n.rows("nar", "mappings")
    assert len(mappings) == 2 and all(m["client"] == t.x_addr for m in mappings)
    lst = listen(t.x, tmp_path, "50", 4)
    y_send(t, tmp_path, esp_from_y(t, spi1, "one") + "p1 = packets\n" + esp_from_y(t, spi2, "two")
           + "packets = p1 + packets\n")
    got = [p for p in collected(lst) if p["proto"] == 50]
    by_spi = {int(p["hex"][40:48], 16): p for p in got}
    assert set(by_spi) >= {spi1} | ({spi2} if translated else set())
    # end-to-end: the ESP packet comes out of X's TUN as Y sent it (Yb -> Nb);
    # translated: N rewrote the destination to Xa
    want_dst = t.x_addr if translated else t.n_public
    assert by_spi[spi1]["src"] == t.y_addr and by_spi[spi1]["dst"] == want_dst
    assert decrypt_at_x(by_spi[spi1]["hex"], spi1) == b"one"
    if translated:
        assert decrypt_at_x(by_spi[spi2]["hex"], spi2) == b"two"
    c1.stop()
    c2.stop()
    n.terminate()


PINGER = textwrap.dedent("""
    import socket, struct, sys, time
    from scapy.layers.inet import ICMP
    src, dst, ident = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.bind((src, 0)); s.settimeout(3)
    s.sendto(bytes(ICMP(type=8, id=ident, seq=1) / b"nar-ping"), (dst, 0))
    end = time.time() + 3
    while time.time() < end:
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            break
        icmp = data[(data[0] & 15) * 4:]
        if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
            print("REPLY", addr[0], socket.inet_ntoa(data[16:20])); break
""")


def test_icmp_mapping_ping_from_the_borrowed_address(nar_topo, tmp_path):
    t = nar_topo
    n = start_n(t, tmp_path)
    c = Client(t, "--icmp", "4242", "--tun")
    assert c.result["icmp"] == [4242]
    (tmp_path / "pinger.py").write_text(PINGER)
    out = t.x.run([sys.executable, str(tmp_path / "pinger.py"), t.n_public, t.y_addr, "4242"])
    assert f"REPLY {t.y_addr} {t.n_public}" in out.stdout
    stats = {r["counter"]: r["value"] for r in n.rows("nar", "stats")}
    assert stats["dataplane.out_forwarded"] >= 1 and stats["dataplane.in_end_to_end"] >= 1
    c.stop()
    n.terminate()


@pytest.mark.parametrize("translated", [False, True])
def test_tunnels_from_a_home_agent(nar_topo, tmp_path, translated):
    """Y sends IP-in-IP (Yb->Nb | CN->Xb) and GRE; X gets the inner packet in both modes."""
    t = nar_topo
    n = start_n(t, tmp_path)
    c = Client(t, "--tunnel", "10.2.0.100:4", "--tunnel", "10.2.0.101:47",
               *(["--translated"] if translated else ["--tun"]))
    assert c.result["tunnel"] == ["10.2.0.100", "10.2.0.101"]
    lst = listen(t.x, tmp_path, "4,47", 4)
    y_send(t, tmp_path, textwrap.dedent(f"""
        inner1 = IP(src="198.18.0.1", dst="10.2.0.100") / UDP(sport=5, dport=6) / b"via-ipip"
        inner2 = IP(src="198.18.0.1", dst="10.2.0.101") / UDP(sport=5, dport=6) / b"via-gre"
        packets = [IP(src="{t.y_addr}", dst="{t.n_public}", proto=4) / inner1,
                   IP(src="{t.y_addr}", dst="{t.n_public}") / GRE(proto=0x0800) / inner2]
        """))
    got = collected(lst)
    from scapy.layers.inet import IP, UDP

    def inner_of(p):
        pkt = IP(bytes.fromhex(p["hex"]))
        if p["proto"] == 47:
            return IP(bytes(pkt.payload)[4:])
        return IP(bytes(pkt.payload))

    seen: dict[bytes, set] = {}
    for p in got:
        try:
            inner = inner_of(p)
        except Exception:
            continue
        if inner.haslayer(UDP) and inner[UDP].dport == 6:
            seen.setdefault(bytes(inner[UDP].payload), set()).add((p["src"], p["dst"], inner.dst))
    if translated:  # draft figure: Na->Xa | CN->Xb
        assert (t.n_private, t.x_addr, "10.2.0.100") in seen[b"via-ipip"]
        assert (t.n_private, t.x_addr, "10.2.0.101") in seen[b"via-gre"]
    else:  # end-to-end: X's TUN hands over the tunnel packet as Y sent it
        assert (t.y_addr, t.n_public, "10.2.0.100") in seen[b"via-ipip"], seen
        assert (t.y_addr, t.n_public, "10.2.0.101") in seen[b"via-gre"], seen
    c.stop()
    n.terminate()


def test_mappings_vanish_with_the_control_connection(nar_topo, tmp_path):
    t = nar_topo
    n = start_n(t, tmp_path)
    c = Client(t, "--ipsec", "esp", "--icmp", "0")
    spi = c.result["ipsec"][0]["spi"]
    assert len(n.rows("nar", "mappings")) == 2 and len(n.rows("nar", "sessions")) == 1
    c.stop()
    deadline = time.monotonic() + 1.0
    while n.rows("nar", "mappings") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert n.rows("nar", "mappings") == [] and n.rows("nar", "sessions") == []
    y_send(t, tmp_path, esp_from_y(t, spi, "late"))
    time.sleep(0.3)
    stats = {r["counter"]: r["value"] for r in n.rows("nar", "stats")}
    assert stats["dataplane.drop_no_mapping"] >= 1
    assert n.alive()
    n.terminate()


def test_tshark_reads_the_socks_exchange_and_deliveries(nar_topo, tmp_path):
    t = nar_topo
    n = start_n(t, tmp_path)
    lan = tmp_path / "lan.pcap"
    cap = t.n.popen(["dumpcap", "-q", "-i", "lan0", "-f", "tcp port 1080 or ip proto 4 or ip proto 47",
                     "-w", str(lan)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    c = Client(t, "--ipsec", "esp", "--tunnel", "10.2.0.100:4", "--tun")
    spi = c.result["ipsec"][0]["spi"]
    y_send(t, tmp_path, esp_from_y(t, spi, "wire") + textwrap.dedent(f"""
        packets.append(IP(src="{t.y_addr}", dst="{t.n_public}", proto=4)
                       / IP(src="198.18.0.1", dst="10.2.0.100") / UDP(sport=5, dport=6) / b"x")
        """))
    time.sleep(0.5)
    c.stop()
    time.sleep(0.5)
    t.n.stop(cap)
    fields = ["frame.protocols", "socks.command", "_ws.malformed", "_ws.expert.message"]
    out = t.n.run(["tshark", "-r", str(lan), "-T", "fields", *sum((["-e", f] for f in fields), [])]).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    protocols = [line.split("\t")[0] for line in lines]
    assert any(p.endswith(":socks") for p in protocols), out  # the SOCKS5 negotiation
    assert any(p.endswith("ip:ip:esp") for p in protocols), out  # ESP delivered in IP-in-IP
    assert any(p.endswith("ip:ip:ip:udp:data") for p in protocols), out  # the home agent's tunnel
    assert not [line for line in lines if "malformed" in line.lower()], out
    n.terminate()


def _wait_until(pred, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def test_a_vanished_client_loses_its_session_by_tcp_keepalive(nar_topo, tmp_path):
    """Issue 12: a client gone without a FIN kept its session and mappings until N stopped.
    X's packets to N are dropped (cable pulled): keepalive (1 s + 2 x 1 s) ends it."""
    t = nar_topo
    n = start_n(t, tmp_path, "keepalive_idle = 1\nkeepalive_interval = 1\nkeepalive_count = 2\n")
    c = Client(t, "--ipsec", "esp", "--icmp", "0")
    assert len(n.rows("nar", "mappings")) == 2
    t.x.run(["nft", "-f", "-"], input=textwrap.dedent(f"""
        table ip pulled {{
          chain out {{ type filter hook output priority 0; policy accept; ip daddr {t.n_private} drop; }}
        }}"""))
    assert _wait_until(lambda: not n.rows("nar", "sessions"), 12), n.rows("nar", "sessions")
    assert n.rows("nar", "mappings") == []
    t.x.run(["nft", "delete", "table", "ip", "pulled"])
    c.stop()
    n.terminate()


def test_session_idle_limit(nar_topo, tmp_path):
    t = nar_topo
    n = start_n(t, tmp_path, "session_idle_timeout = 2\n")
    c = Client(t, "--icmp", "0")
    assert len(n.rows("nar", "sessions")) == 1
    time.sleep(1.0)
    assert len(n.rows("nar", "sessions")) == 1  # not before the limit
    assert _wait_until(lambda: not n.rows("nar", "sessions"), 6)
    assert n.rows("nar", "mappings") == []
    c.proc.wait(timeout=5)  # the client saw its control connection close
    n.terminate()


@pytest.mark.parametrize("policy, ask", [("allow", ["--gre"]), ("impose", [])])
def test_client_tunnels_in_gre_when_gre_is_granted(nar_topo, tmp_path, policy, ask):
    """Issue 12: narsuite-nar-client always sent IP-in-IP; 3.1: the client MUST conform to
    the granted (or imposed) GRE.  N's own raw sockets see what X sends to Na."""
    t = nar_topo
    n = start_n(t, tmp_path, f'gre = "{policy}"\n')
    c = Client(t, "--icmp", "4242", "--tun", *ask)
    assert c.result["gre"] is True
    lst = listen(t.n, tmp_path, "4,47", 4)
    (tmp_path / "pinger.py").write_text(PINGER)
    out = t.x.run([sys.executable, str(tmp_path / "pinger.py"), t.n_public, t.y_addr, "4242"])
    assert f"REPLY {t.y_addr} {t.n_public}" in out.stdout
    from_x = [p for p in collected(lst) if p["src"] == t.x_addr and p["dst"] == t.n_private]
    assert from_x and {p["proto"] for p in from_x} == {47}, from_x
    c.stop()
    n.terminate()


# ------------------------------------------------- translated both ways, echo, ICMP errors

PING_ALL = textwrap.dedent("""
    import socket, struct, sys, time
    from scapy.layers.inet import ICMP
    src, dst, ident = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.bind((src, 0)); s.settimeout(0.2)
    s.sendto(bytes(ICMP(type=8, id=ident, seq=7) / b"nar-ping-all"), (dst, 0))
    end = time.time() + 2
    while time.time() < end:
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            continue
        icmp = data[(data[0] & 15) * 4:]
        if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
            print("REPLY", addr[0], flush=True)
""")


def send_from(host, tmp: Path, code: str) -> None:
    """scapy on ``host``: ``code`` builds ``packets``, sent raw."""
    script = tmp / f"send_{host.name}.py"
    script.write_text("import socket\nfrom scapy.all import *\n" + code + textwrap.dedent("""
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for p in packets:
            s.sendto(bytes(p), (p[IP].dst, 0))
        """))
    host.run([sys.executable, str(script)], timeout=60)


def _installed(n, count: int) -> None:
    """Wait until the data plane has put ``count`` mappings' elements into nftables."""
    def stats():
        return {r["counter"]: r["value"] for r in n.rows("nar", "stats")}
    assert _wait_until(lambda: stats().get("dataplane.nft_installed", 0) >= count, 5), stats()


def _pings(host, tmp: Path, src: str, dst: str, ident: int) -> list[str]:
    (tmp / "ping_all.py").write_text(PING_ALL)
    out = host.run([sys.executable, str(tmp / "ping_all.py"), src, dst, str(ident)], timeout=20)
    return [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("REPLY")]


def test_translated_icmp_both_ways_and_n_never_answers_a_mapped_id(nar_topo, tmp_path):
    """Issue 12: Y's ping to Nb got a reply from N itself and one from Xa ("DIFFERENT
    ADDRESS"); X's ping to Y got none.  Now X alone answers, from Nb, and X's own ping
    leaves from Nb and is answered."""
    t = nar_topo
    n = start_n(t, tmp_path)
    c = Client(t, "--translated", "--icmp", "4242")
    assert c.result["translated"] is True and c.result["icmp"] == [4242]
    _installed(n, 1)
    at_x = listen(t.x, tmp_path, "1", 3)
    assert _pings(t.y, tmp_path, t.y_addr, t.n_public, 4242) == [t.n_public]  # one, from Nb
    requests = [p for p in collected(at_x) if p["hex"][40:42] == "08"]
    assert [(p["src"], p["dst"]) for p in requests] == [(t.y_addr, t.x_addr)]  # X answered it
    at_y = listen(t.y, tmp_path, "1", 3)
    assert _pings(t.x, tmp_path, t.x_addr, t.y_addr, 4242) == [t.y_addr]
    seen = [(p["src"], p["hex"][40:42]) for p in collected(at_y)]
    assert (t.n_public, "08") in seen and not any(src == t.x_addr for src, _ in seen), seen
    # an unmapped identifier is still N's own
    assert _pings(t.y, tmp_path, t.y_addr, t.n_public, 999) == [t.n_public]
    c.stop()
    n.terminate()


def test_end_to_end_echo_request_for_a_mapped_id_is_answered_by_x_alone(nar_topo, tmp_path):
    t = nar_topo
    n = start_n(t, tmp_path)
    c = Client(t, "--icmp", "4242", "--tun")
    _installed(n, 1)
    assert _pings(t.y, tmp_path, t.y_addr, t.n_public, 4242) == [t.n_public]  # no duplicate
    stats = {r["counter"]: r["value"] for r in n.rows("nar", "stats")}
    assert stats["dataplane.in_icmp"] >= 1 and stats["dataplane.out_forwarded"] >= 1, stats
    c.stop()
    n.terminate()


def test_translated_esp_and_tunnels_leave_from_nb(nar_topo, tmp_path):
    t = nar_topo
    n = start_n(t, tmp_path)
    c = Client(t, "--translated", "--ipsec", "esp", "--tunnel", "10.2.0.100:4",
               "--tunnel", "10.2.0.101:47")
    _installed(n, 3)
    at_y = listen(t.y, tmp_path, "50,4,47", 3)
    send_from(t.x, tmp_path, textwrap.dedent(f"""
        packets = [IP(src="{t.x_addr}", dst="{t.y_addr}") / ESP(spi=0x51515151, seq=1, data=b"esp-out"),
                   IP(src="{t.x_addr}", dst="{t.y_addr}", proto=4) / IP(src="10.2.0.100", dst="198.18.0.1")
                   / UDP(sport=5, dport=6) / b"ipip-out",
                   IP(src="{t.x_addr}", dst="{t.y_addr}") / GRE(proto=0x0800)
                   / IP(src="10.2.0.101", dst="198.18.0.1") / UDP(sport=5, dport=6) / b"gre-out"]
        """))
    got = {p["proto"]: p for p in collected(at_y)}
    assert set(got) == {50, 4, 47}, got
    assert all(p["src"] == t.n_public and p["dst"] == t.y_addr for p in got.values()), got
    from scapy.layers.inet import IP

    for p in got.values():  # the rewritten header's checksum is right (scapy recomputes it)
        pkt = IP(bytes.fromhex(p["hex"]))
        want = pkt.chksum
        del pkt.chksum
        assert IP(bytes(pkt)).chksum == want
    c.stop()
    n.terminate()


def test_icmp_errors_for_clients_flows_are_delivered(nar_topo, tmp_path):
    """Fragmentation needed about a translated ESP flow reaches X as a NAT would send it
    (to Xa, quoting Xa); destination unreachable about an end-to-end ping reaches X's TUN."""
    t = nar_topo
    n = start_n(t, tmp_path)
    c1 = Client(t, "--translated", "--ipsec", "esp")
    c2 = Client(t, "--icmp", "4343", "--tun")
    _installed(n, 2)
    at_x = listen(t.x, tmp_path, "1", 3)
    send_from(t.y, tmp_path, textwrap.dedent(f"""
        esp = IP(src="{t.n_public}", dst="{t.y_addr}", flags="DF", len=1500) / ESP(spi=0x9999, seq=3)
        echo = IP(src="{t.n_public}", dst="{t.y_addr}") / ICMP(type=8, id=4343, seq=1) / (b"x" * 8)
        packets = [IP(src="{t.y_addr}", dst="{t.n_public}") / ICMP(type=3, code=4, nexthopmtu=1400)
                   / bytes(esp)[:28],
                   IP(src="{t.y_addr}", dst="{t.n_public}") / ICMP(type=3, code=1) / bytes(echo)[:28]]
        """))
    from scapy.layers.inet import ICMP, IP

    errors = []
    for p in collected(at_x):
        pkt = IP(bytes.fromhex(p["hex"]))
        if pkt.haslayer(ICMP) and pkt[ICMP].type == 3:
            errors.append((pkt.dst, pkt[ICMP].code, pkt[ICMP].payload.src))
    assert (t.x_addr, 4, t.x_addr) in errors, errors  # translated: to Xa, quoting Xa
    assert (t.n_public, 1, t.n_public) in errors, errors  # end-to-end: through the TUN, as sent
    stats = {r["counter"]: r["value"] for r in n.rows("nar", "stats")}
    assert stats["dataplane.in_icmp_error"] == 2, stats
    c1.stop()
    c2.stop()
    n.terminate()


PIPELINER = textwrap.dedent("""
    import socket, struct, sys
    server, yb, user, password, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    s = socket.create_connection((server, 1080), timeout=20)
    u, p = user.encode(), password.encode()
    cmds = b"\\x01\\x02\\x32\\x00\\x00\\x00\\x00" * n            # n x IPSEC-ASSOCIATE ESP, one write
    s.sendall(b"\\x05\\x01\\x02" + b"\\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p
              + b"\\x05\\x80\\x00\\x01" + socket.inet_aton(yb) + b"\\x00\\x00" + cmds)
    want = 2 + 2 + 10 + 7 * n
    got = b""
    while len(got) < want:
        b = s.recv(65536)
        if not b:
            break
        got += b
    replies = got[14:]
    codes = [replies[i + 1] for i in range(0, len(replies) - 6, 7)]
    print(len(got) == want, got[:4].hex(), got[5], codes.count(0), codes.count(1), len(codes))
""")


def test_pipelined_commands_against_the_daemon(nar_topo, tmp_path):
    """Issue 12: 3,000 pipelined commands in one write got 01 01 and a close.  A raw client
    against twistd: every command answered, in order, the session still open."""
    t = nar_topo
    n = start_n(t, tmp_path)
    (tmp_path / "pipeliner.py").write_text(PIPELINER)
    out = t.x.run([sys.executable, str(tmp_path / "pipeliner.py"), t.n_private, t.y_addr, "alice",
                   PASSWORD, "3000"], timeout=60).stdout.split()
    # all bytes, greeting/auth ok, NAR-MODE granted, 64 mappings (the per-session limit), the rest 0x01
    assert out == ["True", "05020100", "0", "64", "2936", "3000"], out
    n.terminate()
