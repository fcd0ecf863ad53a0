"""Tests of the network lab itself (narsuite.lab): topologies, NAT, teardown.

Run with the lab plugin loaded (tests/conftest.py, or ``-p narsuite.lab.pytest_plugin``).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from narsuite.lab import (
    CommandError,
    Lab,
    LabError,
    cli,
    lab_namespaces,
    mip_topology,
    netns,
    parse_netns_name,
    pytest_plugin,
    remote_access_topology,
    sweep_stale,
)

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
PY = [sys.executable, "-S", "-c"]
NEG = 0.3  # ping timeout where no answer is expected (veth RTTs are microseconds)

# UDP helpers run inside namespaces -------------------------------------------------

# Print "ip:port" of every datagram received (flushed) and echo it back to the sender.
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(2048)
    seen = '%s:%d' % addr
    print(seen, flush=True)
    try:
        s.sendto(seen.encode(), addr)
    except OSError:
        pass
"""

# Send one datagram from a fixed port and print the answer (exit 1 on timeout).
ASK = """
import socket, sys
dst, dport, sport, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', sport))
s.settimeout(timeout)
s.sendto(sys.argv[5].encode() if len(sys.argv) > 5 else b'hi', (dst, dport))
try:
    print(s.recvfrom(2048)[0].decode())
except (socket.timeout, ConnectionRefusedError) as e:
    print('NO ANSWER', e); sys.exit(1)
"""

# Bind a port, send one datagram, then print "data from ip:port" for everything received.
PUNCH = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', int(sys.argv[3])))
s.sendto(b'punch', (sys.argv[1], int(sys.argv[2])))
while True:
    data, addr = s.recvfrom(2048)
    print('%s from %s:%d' % ((data.decode(),) + addr), flush=True)
"""


def read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """One line of proc's stdout (binary pipe), or None if none came within timeout."""
    fd = proc.stdout.fileno()
    buf = getattr(proc, "_lab_buf", b"")
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            proc._lab_buf = buf
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            proc._lab_buf = buf
            return None
        buf += chunk
    line, buf = buf.split(b"\n", 1)
    proc._lab_buf = buf
    return line.decode()


def ask(host, dst, dport, sport, timeout=2.0, payload="hi"):
    proc = host.run(PY + [ASK, dst, str(dport), str(sport), str(timeout), payload],
                    check=False, timeout=timeout + 10)
    return proc.stdout.strip() if proc.returncode == 0 else None


def echo_server(host, port):
    proc = host.popen(PY + [ECHO, str(port)], stdout=subprocess.PIPE)
    host.wait_port(port, "udp", timeout=5)
    return proc


def conntrack_udp(host, orig_src):
    """(timeout, line) of each UDP conntrack entry whose original source is orig_src."""
    out = host.run(["conntrack", "-L", "-p", "udp", "--orig-src", orig_src]).stdout
    return [(int(line.split()[2]), line) for line in out.splitlines() if line.startswith("udp")]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def existing_netns() -> set[str]:
    return set(os.listdir(netns.NETNS_DIR)) if os.path.isdir(netns.NETNS_DIR) else set()


def wait_gone(names, timeout=5.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = set(names) & existing_netns()
        if not left:
            return left
        time.sleep(0.05)
    return set(names) & existing_netns()


# (a) NAR: X -- N -- Y ----------------------------------------------------------------

def test_nar_reachability(nar_topo):
    t = nar_topo
    assert t.x.ping(t.n_private)
    assert t.x.ping(t.n_public)  # N's own address: N answers X on the connected route
    assert t.y.ping(t.n_public)
    assert not t.y.ping(t.n_private, NEG)  # Y has no route to the private net
    assert not t.y.ping(t.x_addr, NEG)  # X's address is not routable for Y
    assert not t.x.ping(t.y_addr, NEG)  # the request arrives, the answer has no way back
    assert "unreachable" in t.y.ip("route", "get", t.x_addr, check=False).stderr.lower()
    assert t.x.addr(t.x_if) == t.x_addr and t.n.addr(t.n_public_if) == t.n_public


def test_nar_packets_arrive_unnatted_and_cannot_be_answered(nar_topo):
    t = nar_topo
    server = echo_server(t.y, 5000)
    assert ask(t.x, t.y_addr, 5000, 5001, timeout=0.5) is None  # no answer comes back...
    assert read_line(server, 2) == f"{t.x_addr}:5001"  # ...but Y saw X's private address


# (b) remote access: R1/R3 -- NAT1, R2 -- NAT2, G -- H ---------------------------------

def test_remote_access_reachability(ra_topo):
    t = ra_topo
    assert t.r1.addr("eth0") == t.r2.addr("eth0") == "192.168.1.10"
    for r in (t.r1, t.r2, t.r3):
        assert r.ping(t.g_public)  # through the NAT
        assert not r.ping(t.h_addr)  # the NATs know no route to the internal net
        assert not r.ping(t.g_internal)
    assert t.r1.ping(t.r3_addr) and t.r3.ping(t.nat1_private)
    assert t.r2.ping(t.nat2_private)
    assert t.nat1.ping(t.g_public) and t.nat2.ping(t.nat1_public)
    assert t.h.ping(t.g_internal) and t.h.ping(t.g_public)
    # G has no route to the private nets: H (default via G) and G itself cannot reach R
    assert "unreachable" in t.g.ip("route", "get", t.r1_addr, check=False).stderr.lower()
    assert not t.g.ping(t.r1_addr, NEG)
    assert not t.h.ping(t.r1_addr, NEG)
    assert not t.h.ping(t.nat1_public, NEG)  # NAT1 cannot answer 10.1.0.0/24


def test_remote_access_nat_rewrites_sources(ra_topo):
    t = ra_topo
    server = echo_server(t.g, 4500)
    seen1 = ask(t.r1, t.g_public, 4500, 4500)
    seen2 = ask(t.r2, t.g_public, 4500, 4500)
    seen3 = ask(t.r3, t.g_public, 4500, 4500)
    assert seen1 and seen2 and seen3  # the answers came back through the NATs
    ip1, port1 = seen1.split(":")
    ip2, _ = seen2.split(":")
    ip3, port3 = seen3.split(":")
    assert ip1 == t.nat1_public and ip3 == t.nat1_public
    assert ip2 == t.nat2_public  # same private address as R1, a different public one
    assert port1 != port3  # two clients behind NAT1 with the same source port
    assert [read_line(server, 2) for _ in range(3)] == [seen1, seen2, seen3]
    # the default UDP conntrack timeouts apply (30 s unreplied / 120 s stream)
    entries = conntrack_udp(t.nat1, t.r1_addr)
    assert entries and all(timeout > 10 for timeout, _ in entries)
    assert any(f"dst={t.nat1_public}" in line for _, line in entries)


def test_remote_access_udp_timeout(lab):
    t = remote_access_topology(lab, udp_timeout=2)
    assert t.udp_timeout == 2
    out = t.nat1.run(["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout",
                      "net.netfilter.nf_conntrack_udp_timeout_stream"]).stdout.split()
    assert out == ["2", "2"]
    g_server = t.g.popen(PY + [ECHO, "4500"], stdout=subprocess.PIPE)
    t.g.wait_port(4500, "udp")
    r1 = t.r1.popen(PY + [PUNCH, t.g_public, "4500", "4600"], stdout=subprocess.PIPE)
    mapped = read_line(g_server, 3)
    assert mapped and mapped.startswith(t.nat1_public + ":")
    port = mapped.split(":")[1]
    assert read_line(r1, 3) == f"{mapped} from {t.g_public}:4500"  # the echo came back
    # the mapping is open: G reaches R1 through it
    ask(t.g, t.nat1_public, port, 4500, timeout=0.1, payload="one")
    assert read_line(r1, 2) == f"one from {t.g_public}:4500"
    entries = conntrack_udp(t.nat1, t.r1_addr)
    assert entries and all(0 <= timeout <= 2 for timeout, _ in entries), entries
    last_packet = time.monotonic()
    deadline = last_packet + 8
    while conntrack_udp(t.nat1, t.r1_addr) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not conntrack_udp(t.nat1, t.r1_addr), "mapping did not expire"
    assert time.monotonic() - last_packet < 5
    # expired: the same packet no longer reaches R1
    ask(t.g, t.nat1_public, port, 4500, timeout=0.1, payload="two")
    assert read_line(r1, 1) is None


# (c) Mobile IP: MN -- NAT -- MIPP -- {HA, CN} -------------------------------------------

def test_mip_reachability_and_nat(mip_topo):
    t = mip_topo
    assert t.nat is not None and t.mn_public == t.nat_public
    assert t.mn.ping(t.nat_private) and t.mn.ping(t.mipp_external)
    assert not t.mn.ping(t.ha_addr, NEG) and not t.mn.ping(t.mipp_internal, NEG)
    assert t.ha.ping(t.cn_addr) and t.cn.ping(t.mipp_internal) and t.ha.ping(t.mipp_external)
    assert not t.ha.ping(t.mn_addr, NEG) and not t.mipp.ping(t.mn_addr, NEG)
    assert not t.ha.ping(t.nat_public, NEG)  # the NAT has no route to the home net
    server = echo_server(t.mipp, 434)
    seen = ask(t.mn, t.mipp_external, 434, 434)
    assert seen and seen.split(":")[0] == t.nat_public
    assert read_line(server, 2) == seen


def test_mip_without_nat(lab):
    t = mip_topology(lab, nat=False)
    assert t.nat is None and t.nat_public is None and t.mn_public == t.mn_addr == "203.0.113.10"
    assert not any(h.startswith("nat") for h in lab.hosts)
    assert t.mn.ping(t.mipp_external)
    assert not t.mn.ping(t.ha_addr, NEG)
    server = echo_server(t.mipp, 434)
    assert ask(t.mn, t.mipp_external, 434, 434) == f"{t.mn_addr}:434"
    assert read_line(server, 2) == f"{t.mn_addr}:434"


# library details --------------------------------------------------------------------

def test_names_links_switch_and_helpers(lab):
    a, b, c = lab.host("a"), lab.host("b", forwarding=True), lab.host("c")
    for h in (a, b, c):
        info = parse_netns_name(h.netns)
        assert info == (os.getpid(), lab.tag, h.name)
    assert a.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
    assert b.run("sysctl -n net.ipv4.ip_forward").stdout.strip() == "1"
    link = lab.link(a, b, mtu=1400)
    assert (link.a_if, link.b_if, link.a_ip, link.b_ip) == ("eth0", "eth0", "10.0.0.1", "10.0.0.2")
    assert '"mtu":1400' in a.ip("-j", "link", "show", "eth0").stdout
    seg = lab.switch("sw", [(b, "10.5.0.1/24"), (c, "10.5.0.3/24", "uplink")])
    assert seg.ifname(b) == "eth1" and seg.ifname("c") == "uplink" and seg.ip(c) == "10.5.0.3"
    assert "master br0" in seg.host.ip("link", "show", seg.port(c).port).stdout
    a.default_route(link.b_ip)
    c.route("10.0.0.0/24", "10.5.0.1")
    assert a.ping("10.5.0.3") and c.ping("10.0.0.1")
    with pytest.raises(ValueError):
        lab.link(a, c, a_if="an-interface-name-too-long")
    with pytest.raises(ValueError):
        lab.host("a")
    with pytest.raises(CommandError) as err:
        a.run("echo to-stdout; echo to-stderr >&2; exit 3")
    assert err.value.returncode == 3
    assert "to-stdout" in str(err.value) and "to-stderr" in str(err.value)
    assert a.netns in str(err.value)
    assert a.run(["cat"], input="fed in").stdout == "fed in"
    with pytest.raises(TimeoutError):
        a.wait_port(9, "tcp", timeout=0.1)
    srv = a.popen(PY + ["import socket,time; s=socket.socket(); s.bind(('',8080)); "
                        "s.listen(); time.sleep(60)"])
    a.wait_port(8080)
    assert srv.pid in a.pids
    assert a.stop(srv) is not None and srv.pid not in a.pids
    a.nft("table inet filter {\n chain input {\n  type filter hook input priority 0;\n"
          "  icmp type echo-request drop\n }\n}\n")
    assert not b.ping(link.a_ip, NEG)


def test_teardown_after_exception_kills_processes():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            h = lab.host("h")
            lab.link(h, lab.host("k"))
            # a process group with a child: the whole group goes
            proc = h.popen("sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
            child = int(read_line(proc, 5))
            names = lab.namespaces
            assert set(names) <= existing_netns()
            raise RuntimeError("boom")
    assert lab.closed
    assert not set(names) & existing_netns()
    assert proc.returncode is not None and not alive(child)
    with pytest.raises(LabError):
        lab.host("again")
    lab.close()  # idempotent


def test_close_kills_untracked_processes_in_namespaces():
    lab = Lab()
    h = lab.host("h")
    # started with run() and detached: not tracked, but living in the namespace
    h.run("setsid sleep 60 >/dev/null 2>&1 < /dev/null & echo $!")
    pids = netns._pids_in_netns([h.netns])[h.netns]
    assert pids
    lab.close()
    deadline = time.monotonic() + 3
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    assert h.netns not in existing_netns()


CHILD = """
import json, os, sys, time
from narsuite.lab import Lab
lab = Lab(prefix=sys.argv[2])
a, b = lab.host('a'), lab.host('b')
lab.link(a, b)
sleeper = a.popen(['sleep', '300'])
# `ip netns exec` enters the namespace a moment after popen returns: wait for it, or
# a sweep racing that moment would miss the sleeper (which then enters a deleted one)
want = os.stat('/run/netns/' + a.netns).st_ino
deadline = time.monotonic() + 10
while os.stat(f'/proc/{sleeper.pid}/ns/net').st_ino != want and time.monotonic() < deadline:
    time.sleep(0.005)
print(json.dumps({'names': lab.namespaces, 'sleeper': sleeper.pid}), flush=True)
if sys.argv[1] == 'exit':
    sys.exit(0)  # no close(): atexit must tear down
time.sleep(60)
"""


def private_prefix() -> str:
    """A namespace prefix of our own, so that concurrent test runs (whose Lab()
    sweeps the default prefix) cannot sweep what this test wants to see swept."""
    return "t" + "".join(random.choice(string.ascii_lowercase) for _ in range(7))


def _default_sigint():
    # A shell's background job inherits SIGINT ignored, and Python then keeps it
    # ignored (and so does the lab): give the child the usual SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def child_lab():
    """Start a child Python that builds a lab (own prefix); cleaned up whatever happens."""
    started = []

    def start(mode: str):
        prefix = private_prefix()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, prefix], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_default_sigint)
        started.append((proc, prefix))
        line = read_line(proc, 15)
        if line is None:
            proc.kill()
            pytest.fail("lab child did not start: " + proc.communicate()[1].decode())
        info = json.loads(line)
        assert set(info["names"]) <= existing_netns()
        return proc, prefix, info

    yield start
    for proc, prefix in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        sweep_stale(prefix)


def test_sigkilled_creator_is_swept(child_lab):
    proc, prefix, info = child_lab("sleep")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    names = set(info["names"])
    assert names <= existing_netns(), "nobody tore them down"
    assert alive(info["sleeper"]), "the child's server survived it"
    assert not set(sweep_stale()) & names, "the default prefix: not ours"
    removed = sweep_stale(prefix)
    assert names <= set(removed), (names, removed)
    assert not names & existing_netns()
    deadline = time.monotonic() + 10
    while alive(info["sleeper"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(info["sleeper"]), _proc_status(info["sleeper"])


def _proc_status(pid: int) -> str:
    """What /proc says of a process (for a failure message)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read()[:400] + f"netns {os.readlink(f'/proc/{pid}/ns/net')}"
    except OSError as exc:
        return str(exc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_tears_down(child_lab, sig):
    proc, _, info = child_lab("sleep")
    os.kill(proc.pid, sig)
    rc = proc.wait(15)
    assert rc == -sig  # the default action of the signal still happens
    assert not wait_gone(info["names"], 1)
    assert not alive(info["sleeper"])


def test_atexit_tears_down(child_lab):
    proc, _, info = child_lab("exit")
    assert proc.wait(15) == 0
    assert not wait_gone(info["names"], 1)
    assert not alive(info["sleeper"])


def test_sweep_spares_live_creators(lab):
    h = lab.host("live")
    dead = subprocess.Popen(["true"])
    dead.wait()
    prefix = private_prefix()
    orphan = f"{prefix}{dead.pid}x0000-orphan"
    mine = f"{prefix}{os.getpid()}x0000-mine"  # alive creator (this process)
    for name in (orphan, mine):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert sweep_stale(prefix) == [orphan]
        assert mine in existing_netns()
        assert h.netns not in sweep_stale() and h.netns in existing_netns()
        assert orphan not in existing_netns()
    finally:
        for name in (orphan, mine):
            if name in existing_netns():
                subprocess.run(["ip", "netns", "delete", name])
    assert parse_netns_name("nsl12x00ab-h-1") == (12, "00ab", "h-1")
    assert parse_netns_name("unrelated") is None
    assert parse_netns_name("nsl12x0g0b-h") is None


def test_cli_list_and_sweep(lab, capsys):
    h = lab.host("clihost")
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith(h.netns) and "alive" in line for line in out.splitlines())
    assert cli.main(["sweep"]) == 0
    assert h.netns in existing_netns()
    assert h.netns in lab_namespaces()


def test_unavailable_reason_when_not_root(monkeypatch):
    assert netns.lab_unavailable_reason() is None  # we are root here
    monkeypatch.setattr(netns, "_UNAVAILABLE", [])
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "root" in netns.lab_unavailable_reason()


def test_fixture_skips_or_fails_when_unavailable(monkeypatch):
    monkeypatch.delenv(pytest_plugin.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not root"):
        pytest_plugin._unavailable("not root")
    monkeypatch.setenv(pytest_plugin.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="not root"):
        pytest_plugin._unavailable("not root")


def test_five_host_topology_is_fast():
    start = time.perf_counter()
    with Lab() as lab:
        hosts = [lab.host(f"h{i}") for i in range(5)]
        for i in range(4):
            lab.link(hosts[i], hosts[i + 1], f"10.9.{i}.1/24", f"10.9.{i}.2/24")
        built = time.perf_counter() - start
    total = time.perf_counter() - start
    print(f"5-host chain: built in {built * 1000:.0f} ms, with teardown {total * 1000:.0f} ms")
    assert built < 2.0
