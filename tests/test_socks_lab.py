"""The SOCKS5 server in the lab: X (10.0.0.10) -- N (SOCKS server) -- Y (192.0.2.10).

Y has no route back to X, so everything X gets from Y went through the server in N.
Independent clients: curl (CONNECT, RFC 1929 auth, --socks5-hostname) and PySocks (UDP ASSOCIATE).
The server runs from a tiny script that builds a SocksFactory from a [nar] table (via
narsuite.schema.build); the role will replace it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from narsuite.lab.pytest_plugin import need_module
from narsuite.nar.auth import hash_password

SERVER_SCRIPT = textwrap.dedent("""
    import json, sys
    lean = sys.argv[2] == "lean"
    if lean:  # what the role runs by default: narsuite's reactor and narsuite.nar.lean's port
        import narsuite.reactor
        narsuite.reactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from narsuite.nar.config import NarConfig
    from narsuite.nar.lean import LeanSocksPort
    from narsuite.nar.server import SocksFactory
    from narsuite.schema import build

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    config = build(NarConfig, json.load(open(sys.argv[1])), "nar")
    factory = SocksFactory(config, None, None, reactor)
    if lean:
        LeanSocksPort(reactor, factory, config.listen, config.port).startListening()
    else:  # Twisted's transports (the role with several workers, or another reactor)
        reactor.listenTCP(config.port, factory, interface=config.listen)
    reactor.run()
""")

UDP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    while True:
        data, addr = s.recvfrom(65535)
        s.sendto(b"echo:" + data + b" from " + addr[0].encode(), addr)
""")

UDP_CLIENT = textwrap.dedent("""
    import socket, sys, socks
    s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    user = sys.argv[5] if len(sys.argv) > 5 else None
    pw = sys.argv[6] if len(sys.argv) > 6 else None
    s.set_proxy(socks.SOCKS5, sys.argv[1], int(sys.argv[2]), username=user, password=pw)
    s.settimeout(5)
    for i in range(3):
        s.sendto(b"ping%d" % i, (sys.argv[3], int(sys.argv[4])))
        data, addr = s.recvfrom(65535)
        print(data.decode(), addr[0], addr[1])
""")


class SocksInN:
    def __init__(self, topo, tmp: Path, path: str = "lean") -> None:
        self.t = topo
        self.tmp = tmp
        self.path = path  # "lean": narsuite.nar.lean's CONNECT relay; "twisted": the protocol's
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "socks.log"

    def start(self, **nar) -> None:
        table = {"listen": "0.0.0.0", "port": 1080, "rules": [{"action": "pass"}], **nar}
        (self.tmp / "nar.json").write_text(json.dumps(table))
        (self.tmp / "server.py").write_text(SERVER_SCRIPT)
        self.proc = self.t.n.popen([sys.executable, str(self.tmp / "server.py"), str(self.tmp / "nar.json"),
                                    self.path],
                                   stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                   cwd=str(Path(__file__).resolve().parent.parent))
        try:
            self.t.n.wait_port(1080)
        except TimeoutError:
            raise AssertionError("SOCKS server did not start:\n" + self.log_text()) from None

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def curl(self, url: str, *args: str) -> subprocess.CompletedProcess:
        return self.t.x.run(["curl", "-sS", "--max-time", "10", *args, url], check=False, timeout=20)


@pytest.fixture
def names_in_n(nar_topo):
    """A hosts file for N only: `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts."""
    d = Path("/etc/netns") / nar_topo.n.netns
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts").write_text(f"127.0.0.1 localhost\n{nar_topo.y_addr} ybox.lab ybox\n")
    yield "ybox.lab"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def y_http(nar_topo, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_text("hello from Y\n")
    nar_topo.y.popen([sys.executable, "-m", "http.server", "8000", "--bind", nar_topo.y_addr,
                      "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nar_topo.y.wait_port(8000)
    return f"{nar_topo.y_addr}:8000"


@pytest.fixture(params=["lean", "twisted"])
def server(nar_topo, tmp_path, request):
    """The server in N, on each CONNECT path: the role's default (lean) and Twisted's."""
    s = SocksInN(nar_topo, tmp_path, request.param)
    yield s
    if s.proc is not None:
        nar_topo.n.stop(s.proc)


def test_y_is_unreachable_from_x_without_the_proxy(nar_topo, y_http, server):
    server.start()
    r = server.curl(f"http://{y_http}/hello.txt", "--max-time", "2")
    assert r.returncode != 0  # Y cannot answer 10.0.0.10: the lab really needs the proxy


def test_curl_connect_by_ip_and_by_hostname(nar_topo, y_http, server, names_in_n):
    server.start()
    r = server.curl(f"http://{y_http}/hello.txt", "--socks5", f"{nar_topo.n_private}:1080")
    assert r.returncode == 0 and r.stdout == "hello from Y\n", r.stderr + server.log_text()
    # the name exists only in N's hosts file: X cannot resolve it, the server must
    assert nar_topo.x.run(["getent", "hosts", names_in_n], check=False).returncode != 0
    r = server.curl(f"http://{names_in_n}:8000/hello.txt", "--socks5-hostname", f"{nar_topo.n_private}:1080")
    assert r.returncode == 0 and r.stdout == "hello from Y\n", r.stderr + server.log_text()
    assert f"to={names_in_n}={nar_topo.y_addr}:8000" in server.log_text()
    r = server.curl("http://no-such-name.lab:8000/", "--socks5-hostname", f"{nar_topo.n_private}:1080")
    assert r.returncode == 97 and "(4)" in r.stderr, r.stderr  # curl shows REP: 0x04 host unreachable


def test_large_transfer_is_intact(nar_topo, y_http, server, tmp_path):
    """32 MiB through the relay (flow control both ways): every byte arrives, in order."""
    blob = os.urandom(1 << 20) * 32
    (tmp_path / "www" / "big.bin").write_bytes(blob)
    server.start()
    r = nar_topo.x.run(f"curl -sS --max-time 60 --socks5 {nar_topo.n_private}:1080 "
                       f"http://{y_http}/big.bin | sha256sum", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.sha256(blob).hexdigest()


def test_curl_username_password(nar_topo, y_http, server):
    server.start(methods=["password"], users={"alice": hash_password("s3cret", cost=4)})
    proxy = f"{nar_topo.n_private}:1080"
    r = server.curl(f"http://{y_http}/hello.txt", "--socks5", proxy, "--proxy-user", "alice:s3cret")
    assert r.returncode == 0 and r.stdout == "hello from Y\n", r.stderr + server.log_text()
    r = server.curl(f"http://{y_http}/hello.txt", "--socks5", proxy, "--proxy-user", "alice:wrong")
    assert r.returncode != 0 and r.stdout == "", r.stderr
    assert "authentication failed for user 'alice'" in server.log_text()
    r = server.curl(f"http://{y_http}/hello.txt", "--socks5", proxy)  # no credentials offered
    assert r.returncode != 0 and r.stdout == ""


def test_rule_blocks_port_and_decision_is_logged(nar_topo, y_http, server):
    server.start(rules=[{"action": "block", "to": [f"{nar_topo.y_addr}/32"], "ports": ["8000"],
                         "log": "warn"},
                        {"action": "pass"}])
    r = server.curl(f"http://{y_http}/hello.txt", "--socks5", f"{nar_topo.n_private}:1080")
    assert r.returncode == 97 and "(2)" in r.stderr, r.stderr  # REP 0x02: not allowed by ruleset
    for _ in range(20):
        if "socks block" in server.log_text():
            break
        time.sleep(0.1)
    line = next(ln for ln in server.log_text().splitlines() if "socks block" in ln)
    assert "[narsuite.nar.rules#warn]" in line, line
    assert f"client={nar_topo.x_addr}" in line and "command=connect" in line
    assert f"to={nar_topo.y_addr}:8000" in line and "rule=0" in line


def test_udp_associate_with_pysocks(nar_topo, server, tmp_path):
    need_module("socks")  # PySocks, the independent UDP ASSOCIATE client (test extra)
    (tmp_path / "echo.py").write_text(UDP_ECHO)
    (tmp_path / "client.py").write_text(UDP_CLIENT)
    nar_topo.y.popen([sys.executable, str(tmp_path / "echo.py"), nar_topo.y_addr, "7777"])
    nar_topo.y.wait_port(7777, proto="udp")
    server.start(methods=["password"], users={"alice": hash_password("s3cret", cost=4)})
    r = nar_topo.x.run([sys.executable, str(tmp_path / "client.py"), nar_topo.n_private, "1080",
                        nar_topo.y_addr, "7777", "alice", "s3cret"], check=False, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr + server.log_text()
    lines = r.stdout.splitlines()
    # Y saw the datagrams coming from N's public address; X got them back through the relay,
    # labelled with Y's address and port (the SOCKS UDP header, unwrapped by PySocks).
    assert lines == [f"echo:ping{i} from {nar_topo.n_public} {nar_topo.y_addr} 7777" for i in range(3)]


# A server that answers only after the client's FIN: it reads to EOF, then sends the
# SHA-256 of what it got and closes.  Every "send a request, shut down writing, read the
# answer" client needs the relay to pass the FIN on and keep the other direction open.
EOF_SERVER = textwrap.dedent("""
    import hashlib, socket, sys
    ls = socket.create_server((sys.argv[1], int(sys.argv[2])))
    while True:
        c, _ = ls.accept()
        got = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            got += b
        c.sendall(b"sha256=" + hashlib.sha256(got).hexdigest().encode() + b"\\n")
        c.close()
""")


@pytest.mark.parametrize("client, repeat", [("ncat", 1000), ("nc-openbsd", 1000),
                                            ("ncat", 100_000)])  # 1.8 MB: through splice(2)
def test_half_close_is_passed_on(nar_topo, server, tmp_path, client, repeat):
    """Issue 12: the client's FIN used to tear down both directions, so no answer came."""
    tool = {"ncat": "ncat", "nc-openbsd": "nc.openbsd"}[client]
    from narsuite.lab.pytest_plugin import need_tools

    need_tools(tool)
    (tmp_path / "eof.py").write_text(EOF_SERVER)
    nar_topo.y.popen([sys.executable, str(tmp_path / "eof.py"), nar_topo.y_addr, "7070"])
    nar_topo.y.wait_port(7070)
    server.start()
    payload = b"GET / HTTP/1.0\r\n\r\n" * repeat
    (tmp_path / "req").write_bytes(payload)
    proxy = f"{nar_topo.n_private}:1080"
    if client == "ncat":
        cmd = f"ncat --proxy {proxy} --proxy-type socks5 {nar_topo.y_addr} 7070 < {tmp_path / 'req'}"
    else:  # -N: shutdown(SHUT_WR) after EOF on stdin
        cmd = f"nc.openbsd -N -X 5 -x {proxy} {nar_topo.y_addr} 7070 < {tmp_path / 'req'}"
    r = nar_topo.x.run(f"timeout 20 {cmd}", check=False, timeout=30)
    assert r.stdout.strip() == "sha256=" + hashlib.sha256(payload).hexdigest(), (
        r.stdout + r.stderr + server.log_text())
    assert r.returncode == 0, r.stderr


BIND_CLIENT = textwrap.dedent("""
    import socket, struct, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.sendall(b"\\x05\\x01\\x00")
    assert s.recv(2) == b"\\x05\\x00"
    s.sendall(b"\\x05\\x02\\x00\\x01" + socket.inet_aton("0.0.0.0") + struct.pack("!H", 0))
    r = s.recv(10)
    print(socket.inet_ntoa(r[4:8]), struct.unpack("!H", r[8:10])[0], flush=True)
    r = s.recv(10)  # second reply: the peer
    assert r[1] == 0, r
    s.sendall(b"to-peer")
    print(s.recv(100).decode(), flush=True)
""")


@pytest.mark.parametrize("how", ["default-route", "external"])
def test_bind_all_zeros_answers_the_address_the_peer_reaches(nar_topo, server, tmp_path, how):
    """Issue 12: BIND with DST.ADDR 0.0.0.0 answered the client-facing address (10.0.0.1),
    which Y cannot reach."""
    t = nar_topo
    if how == "default-route":
        t.n.run(["ip", "route", "add", "default", "via", t.y_addr])
        server.start()
    else:  # N has no default route: the operator says where peers reach it
        server.start(external=t.n_public)
    (tmp_path / "bind.py").write_text(BIND_CLIENT)
    proc = t.x.popen([sys.executable, str(tmp_path / "bind.py"), t.n_private, "1080"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline().split()
    assert first and first[0] == t.n_public, (first, server.log_text())
    peer = t.y.run([sys.executable, "-c", textwrap.dedent(f"""
        import socket
        c = socket.create_connection(("{first[0]}", {first[1]}), timeout=5)
        print(c.recv(100).decode()); c.sendall(b"to-client"); c.close()
    """)], check=False, timeout=20)
    assert peer.stdout.strip() == "to-peer", peer.stdout + peer.stderr
    assert proc.stdout.readline().strip() == "to-client"
    proc.wait(timeout=10)
