"""Tests of tests/esp_peer.py, the independent ESP-in-UDP peer, against itself.

The peer will be the oracle for narsuite's ``esp`` role, so it must be shown to
work without narsuite: two instances talk to each other, one on R1 behind NAT1
and one on G acting as the gateway (``--learn-peer``), in the lab's
remote-access topology.  The unit tests at the top check the peer's wire format
against the RFCs with the ``cryptography`` library directly (not through scapy).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PEER = Path(__file__).resolve().with_name("esp_peer.py")
_spec = importlib.util.spec_from_file_location("esp_peer_under_test", PEER)
esp_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(esp_peer)

# suite name -> (--enc, enc key bytes, --integ, integ key bytes)
SUITES = {
    "aes-gcm-16": ("aes-gcm-16", 16 + 4, "none", 0),
    "aes-cbc+hmac-sha1-96": ("aes-cbc", 16, "hmac-sha1-96", 20),
    "aes-cbc+hmac-sha256-128": ("aes-cbc", 32, "hmac-sha256-128", 32),
    "null+hmac-sha256-128": ("null", 0, "hmac-sha256-128", 32),
}
MARKER = b"NARSUITE-ESP-PLAINTEXT-MARKER"
R_INNER = "10.8.0.2"  # R1's address inside the tunnel
G_INNER = "10.8.0.1"  # the gateway-side TUN's own address


# ----------------------------------------------------------------- helpers


class Keys:
    """Static keys for both directions; ``args(side)`` mirrors them for R and G."""

    def __init__(self, suite: str):
        self.suite = suite
        self.enc, enc_len, self.integ, integ_len = SUITES[suite]
        self.spi_r2g = 0x10000000 | int.from_bytes(os.urandom(3), "big")
        self.spi_g2r = 0x20000000 | int.from_bytes(os.urandom(3), "big")
        self.enc_r2g, self.enc_g2r = os.urandom(enc_len), os.urandom(enc_len)
        self.integ_r2g, self.integ_g2r = os.urandom(integ_len), os.urandom(integ_len)

    def args(self, side: str) -> list[str]:
        out, inn = ("r2g", "g2r") if side == "r" else ("g2r", "r2g")
        a = ["--spi-out", hex(getattr(self, f"spi_{out}")),
             "--spi-in", hex(getattr(self, f"spi_{inn}")), "--enc", self.enc, "--integ", self.integ]
        if self.enc != "null":
            a += ["--enc-key-out", getattr(self, f"enc_{out}").hex(),
                  "--enc-key-in", getattr(self, f"enc_{inn}").hex()]
        if self.integ != "none":
            a += ["--integ-key-out", getattr(self, f"integ_{out}").hex(),
                  "--integ-key-in", getattr(self, f"integ_{inn}").hex()]
        return a


class PeerProc:
    """One esp_peer.py process in a lab host, with its stdout lines and stats file."""

    def __init__(self, host, tmp_path: Path, name: str, args: list[str]):
        self.host, self.name = host, name
        self.stats_path = tmp_path / f"{name}.stats.json"
        self.stderr_path = tmp_path / f"{name}.stderr"
        self.argv = [sys.executable, str(PEER), *args, "--stats-file", str(self.stats_path), "-v"]
        with open(self.stderr_path, "wb") as err:
            self.proc = host.popen(self.argv, stdout=subprocess.PIPE, stderr=err)
        self.lines: list[str] = []
        self._buf = b""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_line(self, prefix: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no {prefix!r} line in {timeout} s; "
                                     f"stdout {self.lines}, stderr:\n{self.stderr()}")
            fd = self.proc.stdout.fileno()
            if select.select([fd], [], [], min(left, 0.2))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise AssertionError(f"{self.name} exited ({self.proc.wait()}) before "
                                         f"{prefix!r}; stderr:\n{self.stderr()}")
                self._buf += chunk
                *done, self._buf = self._buf.split(b"\n")
                self.lines += [d.decode(errors="replace") for d in done]

    def wait_ready(self) -> None:
        self.wait_line("READY")

    def _read_stats(self) -> dict:
        try:
            return json.loads(self.stats_path.read_text())
        except FileNotFoundError:
            return {"writes": 0}

    def stats(self, timeout: float = 5.0) -> dict:
        """Ask the running peer for its counters (SIGUSR1) and return them."""
        before = self._read_stats()["writes"]
        assert self.proc.poll() is None, f"{self.name} died:\n{self.stderr()}"
        os.kill(self.proc.pid, signal.SIGUSR1)  # `ip netns exec` execs: this is python's PID
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self._read_stats()
            if doc["writes"] > before:
                return doc
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no stats after SIGUSR1; stderr:\n{self.stderr()}")

    def stop(self) -> dict:
        """SIGTERM; the peer writes its final counters on the way out."""
        rc = self.host.stop(self.proc)
        assert rc == 0, f"{self.name} exited with {rc}; stderr:\n{self.stderr()}"
        return self._read_stats()


def start_tunnel(t, tmp_path: Path, keys: Keys, r_extra=(), g_keys: Keys | None = None):
    """esp_peer on G (gateway side, learns R1's NATed address) and on R1; both READY."""
    g = PeerProc(t.g, tmp_path, "g", [
        "--learn-peer", "--mode", "tunnel", *(g_keys or keys).args("g"),
        "--tun-name", "espg0", "--tun-addr", f"{G_INNER}/32", "--route", f"{R_INNER}/32"])
    r = PeerProc(t.r1, tmp_path, "r1", [
        "--gateway", t.g_public, "--mode", "tunnel", *keys.args("r"),
        "--tun-name", "espr0", "--tun-addr", f"{R_INNER}/32", "--route", t.internal_net,
        *r_extra])
    g.wait_ready()
    r.wait_ready()
    t.g.enable_forwarding()  # the topology already does; the test depends on it
    return r, g


def first_ping(host, dst: str, tries: int = 3) -> bool:
    """The first echo also has to wait for ARP on three segments: allow a retry."""
    return any(host.ping(dst, timeout=2.0) for _ in range(tries))


CAPTURE = r"""
import os, select, signal, socket, struct, sys, time
out, ifaces = sys.argv[1], sys.argv[2:]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
files = {}
for name in ifaces:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind((name, 0))
    f = open(os.path.join(out, name + ".pcap"), "wb")
    f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
    files[s] = f
print("READY", flush=True)
while not stop:
    for s in select.select(list(files), [], [], 0.1)[0]:
        data = s.recv(262144)
        t = time.time()
        files[s].write(struct.pack("<IIII", int(t), int(t % 1 * 1e6), len(data), len(data)) + data)
for f in files.values():
    f.close()
"""

SERVER = r"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
c, peer = s.accept()
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(65536)
    if not d:
        break
    h.update(d)
    n += len(d)
c.sendall(("%d %s" % (n, h.hexdigest())).encode())
c.close()
print(peer[0], n, h.hexdigest(), flush=True)
"""

CLIENT = r"""
import socket, sys
data = b"".join(b"%s-%06d|" % (sys.argv[3].encode(), i) for i in range(int(sys.argv[4])))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = c.recv(4096)
    if not d:
        break
    reply += d
print(reply.decode())
"""


def transfer_payload(records: int) -> bytes:
    return b"".join(b"%s-%06d|" % (MARKER, i) for i in range(records))


def udp4500(pkts, src=None, dst=None):
    """UDP payloads of the captured frames from/to port 4500, as (ip, udp, payload)."""
    from scapy.layers.inet import IP, UDP

    out = []
    for p in pkts:
        if IP in p and UDP in p and 4500 in (p[UDP].sport, p[UDP].dport):
            if (src is None or p[IP].src == src) and (dst is None or p[IP].dst == dst):
                out.append((p[IP], p[UDP], bytes(p[UDP].payload)))
    return out


# ----------------------------------------------------------------- unit tests (no lab)


def _inner_packet() -> bytes:
    from scapy.layers.inet import ICMP, IP

    return bytes(IP(src=R_INNER, dst="10.1.0.10") / ICMP(id=7, seq=1) / (MARKER * 3))


def _tunnel_sa(keys: Keys, direction: str, outbound: bool):
    from scapy.layers.inet import IP, UDP

    return esp_peer.make_sa(
        getattr(keys, f"spi_{direction}"), keys.enc, getattr(keys, f"enc_{direction}"),
        keys.integ, getattr(keys, f"integ_{direction}"),
        tunnel_header=IP(src="192.168.1.10", dst="198.51.100.1") if outbound else IP(),
        nat_t_header=UDP(sport=4500, dport=4500) if outbound else None)


def _check_trailer(plain: bytes, inner: bytes, block: int) -> None:
    """RFC 4303 section 2.4: payload, padding 1, 2, 3..., pad length, next header 4."""
    padlen, nh = plain[-2], plain[-1]
    assert nh == 4
    assert plain[:len(inner)] == inner
    assert plain[len(inner):-2] == bytes(range(1, padlen + 1))
    assert len(plain) % block == 0


def test_gcm_wire_format_is_rfc4106():
    keys = Keys("aes-gcm-16")
    inner = _inner_packet()
    sa = _tunnel_sa(keys, "r2g", outbound=True)
    esp1 = esp_peer.encapsulate(sa, inner)
    esp2 = esp_peer.encapsulate(sa, inner)
    for seq, esp in ((1, esp1), (2, esp2)):
        assert struct.unpack("!II", esp[:8]) == (keys.spi_r2g, seq)
        key, salt, iv = keys.enc_r2g[:16], keys.enc_r2g[16:], esp[8:16]
        plain = AESGCM(key).decrypt(salt + iv, esp[16:], esp[:8])  # tag: last 16 bytes
        _check_trailer(plain, inner, 4)
    assert esp1[8:16] != esp2[8:16], "IVs must not repeat"


@pytest.mark.parametrize("suite", ["aes-cbc+hmac-sha1-96", "aes-cbc+hmac-sha256-128"])
def test_cbc_hmac_wire_format_is_rfc4303(suite):
    keys = Keys(suite)
    icv_len, digest = {"hmac-sha1-96": (12, "sha1"), "hmac-sha256-128": (16, "sha256")}[keys.integ]
    inner = _inner_packet()
    esp = esp_peer.encapsulate(_tunnel_sa(keys, "r2g", outbound=True), inner)
    body, icv = esp[:-icv_len], esp[-icv_len:]
    assert hmac.new(keys.integ_r2g, body, digest).digest()[:icv_len] == icv
    assert struct.unpack("!II", esp[:8]) == (keys.spi_r2g, 1)
    iv, ct = body[8:24], body[24:]
    dec = Cipher(algorithms.AES(keys.enc_r2g), modes.CBC(iv)).decryptor()
    _check_trailer(dec.update(ct) + dec.finalize(), inner, 16)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_decapsulate_roundtrip_and_tamper(suite):
    from scapy.layers.ipsec import IPSecIntegrityError

    keys = Keys(suite)
    inner = _inner_packet()
    esp = esp_peer.encapsulate(_tunnel_sa(keys, "r2g", outbound=True), inner)
    sa_in = _tunnel_sa(keys, "r2g", outbound=False)
    nh, payload = esp_peer.decapsulate(sa_in, esp, ("198.51.100.101", 4500), ("198.51.100.1", 4500))
    assert (nh, payload) == (4, inner)
    bad = bytearray(esp)
    bad[30] ^= 1
    with pytest.raises(IPSecIntegrityError):
        esp_peer.decapsulate(sa_in, bytes(bad), ("198.51.100.101", 4500), ("198.51.100.1", 4500))


def test_classify():
    assert esp_peer.classify(b"\xff") == "keepalive"
    assert esp_peer.classify(b"\0\0\0\0" + b"ike") == "non-esp"
    assert esp_peer.classify(b"\x01\x02\x03") == "short"
    assert esp_peer.classify(b"\xff\xff") == "short"
    assert esp_peer.classify(bytes(range(1, 40))) == "esp"


def test_replay_window():
    w = esp_peer.ReplayWindow(64)
    assert not w.check(0)
    for seq in (1, 3, 2, 70):
        assert w.check(seq)
        w.update(seq)
    assert not w.check(3) and not w.check(70)   # replays
    assert not w.check(6)                       # 70 - 6 = 64: left of the window
    assert w.check(7) and w.check(69)           # inside the window, unseen
    assert esp_peer.ReplayWindow(0).check(0)    # disabled


@pytest.mark.parametrize("argv, message", [
    (["--spi-out", "0x100", "--spi-in", "0x200", "--enc-key-out", "00" * 20,
      "--enc-key-in", "00" * 20], "--gateway is required"),
    (["--gateway", "1.2.3.4", "--spi-out", "0x100", "--spi-in", "0x200",
      "--enc-key-out", "00" * 16, "--enc-key-in", "00" * 20], "4-byte salt"),
    (["--gateway", "1.2.3.4", "--spi-out", "5", "--spi-in", "0x200",
      "--enc-key-out", "00" * 20, "--enc-key-in", "00" * 20], "reserved"),
    (["--gateway", "1.2.3.4", "--spi-out", "0x100", "--spi-in", "0x200", "--enc", "aes-cbc",
      "--enc-key-out", "00" * 16, "--enc-key-in", "00" * 16, "--integ", "hmac-sha1-96",
      "--integ-key-out", "11" * 20], "--integ-key-in"),
    (["--gateway", "1.2.3.4", "--spi-out", "0x100", "--spi-in", "0x200", "--enc", "null",
      "--integ", "none"], "not both NULL"),
    (["--gateway", "1.2.3.4", "--spi-out", "0x100", "--spi-in", "0x200",
      "--enc-key-out", "zz", "--enc-key-in", "00" * 20], "not hex"),
])
def test_config_errors_name_the_option(argv, message):
    args = esp_peer.build_parser().parse_args(argv)
    with pytest.raises(esp_peer.ConfigError, match=message):
        esp_peer.check_config(args)


def test_peer_counts_replays_and_answers_echo_in_process():
    """Peer.on_datagram end to end, without a lab: replay drop, bad ICV, echo reply."""
    from scapy.layers.inet import UDP

    keys = Keys("aes-cbc+hmac-sha1-96")
    args = esp_peer.build_parser().parse_args(
        ["--learn-peer", "--mode", "transport", *keys.args("g"), "--transport-udp-echo", "7",
         "--tunnel-src", "127.0.0.1"])
    esp_peer.check_config(args)
    peer = esp_peer.Peer(args)
    remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # loopback only
    remote.bind(("127.0.0.1", 0))
    remote.settimeout(2)
    peer.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.sock.bind(("127.0.0.1", 0))
    try:
        sa_r = esp_peer.make_sa(keys.spi_r2g, keys.enc, keys.enc_r2g, keys.integ, keys.integ_r2g,
                                nat_t_header=UDP(sport=4500, dport=4500))
        esp = esp_peer.encapsulate(sa_r, esp_peer.udp_ip_packet("127.0.0.1", "127.0.0.1",
                                                                 5555, 7, b"ping?"))
        addr = remote.getsockname()
        peer.on_datagram(esp, addr)
        peer.on_datagram(esp, addr)  # replayed
        bad = bytearray(esp_peer.encapsulate(sa_r, esp_peer.udp_ip_packet(
            "127.0.0.1", "127.0.0.1", 5555, 7, b"x")))
        bad[-1] ^= 0x80
        peer.on_datagram(bytes(bad), addr)
        s = peer.stats
        assert (s["esp_rx"], s["replay_drops"], s["decrypt_failures"]) == (1, 1, 1)
        assert peer.peer == addr and s["peer_changes"] == 1
        answer, _ = remote.recvfrom(2048)
        sa_g = esp_peer.make_sa(keys.spi_g2r, keys.enc, keys.enc_g2r, keys.integ, keys.integ_g2r)
        nh, seg = esp_peer.decapsulate(sa_g, answer, ("127.0.0.1", 4500), addr)
        assert nh == 17 and struct.unpack("!HH", seg[:4]) == (7, 5555) and seg[8:] == b"ping?"
    finally:
        peer.sock.close()
        remote.close()


# ----------------------------------------------------------------- lab tests


@pytest.mark.parametrize("suite", ["aes-gcm-16", "aes-cbc+hmac-sha1-96", "aes-cbc+hmac-sha256-128"])
def test_tunnel_ping_through_nat(ra_topo, tmp_path, suite):
    """R1 -> H pings through the tunnel; NAT1 has to rewrite R1's source port 4500.

    R3 (behind the same NAT) takes NAT1's public port 4500 first, so R1's flow gets
    another public port and G can only answer if it learnt the mapping.
    """
    t = ra_topo
    r, g = start_tunnel(t, tmp_path, Keys(suite))
    t.r3.run([sys.executable, "-c",
              "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
              "s.bind(('0.0.0.0', 4500));"
              f"s.sendto(bytes(4) + b'r3 holds 4500', ('{t.g_public}', 4500))"])
    assert first_ping(t.r1, t.h_addr), f"no echo reply through the tunnel\n{g.stderr()}"
    for _ in range(3):
        assert t.r1.ping(t.h_addr, timeout=2.0)
    rs, gs = r.stats(), g.stats()
    peer_ip, peer_port = gs["peer"].split(":")
    assert peer_ip == t.nat1_public and peer_port != "4500", "G must answer R1's NAT mapping"
    assert gs["non_esp_marker_rx"] == 1  # R3's datagram: it did arrive from port 4500 first
    assert rs["peer"] == f"{t.g_public}:4500"
    for s in (rs, gs):
        assert s["esp_rx"] >= 4 and s["esp_tx"] >= 4, s
        assert s["tun_tx"] >= 4, s
        assert s["decrypt_failures"] == s["spi_unknown"] == s["replay_drops"] == 0, s
    assert gs["peer_changes"] == 1


@pytest.mark.parametrize("suite", ["aes-gcm-16", "null+hmac-sha256-128"])
def test_tcp_transfer_and_wire_capture(ra_topo, tmp_path, suite):
    """200 KB R1 -> H over TCP; on G's public side only ESP-in-UDP with the right SPIs.

    With NULL encryption the marker must be visible on the wire: that shows the
    plaintext check would catch a peer that does not encrypt.
    """
    from scapy.utils import rdpcap

    t = ra_topo
    keys = Keys(suite)
    cap_dir = tmp_path / "cap"
    cap_dir.mkdir()
    cap = t.g.popen([sys.executable, "-c", CAPTURE, str(cap_dir), t.g_public_if, t.g_internal_if],
                    stdout=subprocess.PIPE)
    r, g = start_tunnel(t, tmp_path, keys)
    assert cap.stdout.readline().strip() == b"READY"
    assert first_ping(t.r1, t.h_addr), g.stderr()

    server = t.h.popen([sys.executable, "-c", SERVER, t.h_addr, "5001"], stdout=subprocess.PIPE)
    t.h.wait_port(5001)
    records = -(-200_000 // (len(MARKER) + 8))  # records of len(MARKER) + 8 bytes
    expected = transfer_payload(records)
    started = time.monotonic()
    client = t.r1.run([sys.executable, "-c", CLIENT, t.h_addr, "5001", MARKER.decode(),
                       str(records)], timeout=40)
    elapsed = time.monotonic() - started
    assert client.stdout.split() == [str(len(expected)), hashlib.sha256(expected).hexdigest()]
    server_out = server.communicate(timeout=10)[0].decode().split()
    assert server_out[0] == R_INNER, "H must see R1's inner address, not a NATed one"
    assert len(expected) >= 200_000
    print(f"{suite}: {len(expected)} bytes R1->H in {elapsed:.2f} s")

    t.g.stop(cap)
    rs, gs = r.stats(), g.stats()
    wan = rdpcap(str(cap_dir / f"{t.g_public_if}.pcap"))
    lan = rdpcap(str(cap_dir / f"{t.g_internal_if}.pcap"))
    to_g = udp4500(wan, src=t.nat1_public, dst=t.g_public)
    from_g = udp4500(wan, src=t.g_public, dst=t.nat1_public)
    esp_to_g = [pl for _, _, pl in to_g if pl != b"\xff"]
    esp_from_g = [pl for _, _, pl in from_g]
    assert len(esp_to_g) >= 100 and len(esp_from_g) >= 50, (len(esp_to_g), len(esp_from_g))
    assert {pl[:4] for pl in esp_to_g} == {struct.pack("!I", keys.spi_r2g)}
    assert {pl[:4] for pl in esp_from_g} == {struct.pack("!I", keys.spi_g2r)}
    assert all(u.dport == 4500 for _, u, _ in to_g) and all(u.sport == 4500 for _, u, _ in from_g)
    seqs = [struct.unpack("!I", pl[4:8])[0] for pl in esp_to_g]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert gs["esp_rx"] >= len(esp_to_g) * 0.9 and rs["esp_tx"] >= len(esp_to_g)
    # nothing else from R1's side crosses the public segment (no TCP or ICMP in clear)
    from scapy.layers.inet import IP

    others = [p for p in wan if IP in p and t.nat1_public in (p[IP].src, p[IP].dst)
              and not udp4500([p])]
    assert others == [], others[:3]

    wire = b"".join(bytes(p) for p in wan)
    assert MARKER in b"".join(bytes(p) for p in lan), "capture on lan0 saw no plaintext at all"
    if keys.enc == "null":
        assert MARKER in wire
    else:
        assert MARKER not in wire, "plaintext on the public segment"
        # decrypt what was on the wire with `cryptography` alone (RFC 4106), not scapy
        aes = AESGCM(keys.enc_r2g[:16])
        found = 0
        for pl in esp_to_g:
            plain = aes.decrypt(keys.enc_r2g[16:] + pl[8:16], pl[16:], pl[:8])
            inner = plain[:-2 - plain[-2]]
            assert plain[-1] == 4 and inner[12:20] == socket.inet_aton(R_INNER) + \
                socket.inet_aton(t.h_addr)
            found += MARKER in inner
        assert found >= 50


def test_keepalives_and_non_esp_are_counted_not_learnt(ra_topo, tmp_path):
    t = ra_topo
    r, g = start_tunnel(t, tmp_path, Keys("aes-gcm-16"), r_extra=["--keepalive", "0.5"])
    # an IKE-looking datagram (non-ESP marker) and an unknown SPI, from other ports of R1
    t.r1.run([sys.executable, "-c",
              "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
              f"s.sendto(bytes(4) + b'ike' * 10, ('{t.g_public}', 4500));"
              f"s.sendto(bytes.fromhex('deadbeef00000001') + bytes(40), ('{t.g_public}', 4500))"])
    deadline = time.monotonic() + 6
    while True:
        gs = g.stats()
        if gs["keepalives_rx"] >= 3 and gs["non_esp_marker_rx"] and gs["spi_unknown"]:
            break
        assert time.monotonic() < deadline, gs
        time.sleep(0.3)
    assert (gs["non_esp_marker_rx"], gs["spi_unknown"]) == (1, 1)
    assert gs["esp_rx"] == gs["decrypt_failures"] == 0
    assert gs["peer"] is None, "keepalives are not authenticated: they must not teach G a peer"
    rs = r.stop()
    assert rs["keepalives_tx"] >= gs["keepalives_rx"]


def test_wrong_key_is_rejected_and_not_learnt(ra_topo, tmp_path):
    t = ra_topo
    keys = Keys("aes-cbc+hmac-sha1-96")
    wrong = Keys("aes-cbc+hmac-sha1-96")
    wrong.spi_r2g, wrong.spi_g2r = keys.spi_r2g, keys.spi_g2r
    wrong.enc_r2g = keys.enc_r2g  # same cipher key, different integrity key
    r, g = start_tunnel(t, tmp_path, keys, g_keys=wrong)
    assert not t.r1.ping(t.h_addr, timeout=1.5)
    gs = g.stats()
    assert gs["decrypt_failures"] >= 1 and gs["esp_rx"] == gs["tun_tx"] == 0, gs
    assert gs["peer"] is None
    assert r.stats()["esp_tx"] >= 1


def test_transport_mode_udp_echo(ra_topo, tmp_path):
    t = ra_topo
    keys = Keys("aes-cbc+hmac-sha256-128")
    g = PeerProc(t.g, tmp_path, "g", ["--learn-peer", "--mode", "transport", *keys.args("g"),
                                      "--transport-udp-echo", "7777"])
    g.wait_ready()
    text = "hello-through-esp-transport"
    r = PeerProc(t.r1, tmp_path, "r1", [
        "--gateway", t.g_public, "--mode", "transport", *keys.args("r"),
        "--transport-send", f"{t.g_public}:7777:{text}", "--transport-interval", "0.5"])
    r.wait_ready()
    assert r.wait_line("ECHO-REPLY", timeout=6) == f"ECHO-REPLY 7777 {text}"
    gs, rs = g.stats(), r.stats()
    assert gs["echo_replies_sent"] >= 1 and gs["peer"].split(":")[0] == t.nat1_public
    assert rs["echo_replies_rx"] >= 1 and rs["decrypt_failures"] == gs["decrypt_failures"] == 0
    assert gs["tun"] is None and rs["tun"] is None
