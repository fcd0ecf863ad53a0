"""Packet I/O: TUN devices (narsuite.packet.tun) and raw IPv4 sockets (narsuite.packet.rawsock).

Two kinds of tests:

* unit tests of the TUN data path on ``twisted.pair.testing.MemoryIOSystem`` (no root);
* lab tests (root): two network namespaces made here, joined by a veth pair
  (A ``va`` 10.98.0.1/24 <-> B ``vb`` 10.98.0.2/24).  Code under test runs in an
  *agent* -- this file run as a script with ``ip netns exec`` -- that reports events
  as JSON lines on stdout and takes commands as JSON lines on stdin.  The peers
  (pinger, injector, capturer) use plain sockets, not the code under test.

Lab tests skip when not root (fail instead with ``NARSUITE_REQUIRE_LAB=1``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from narsuite.lab.pytest_plugin import unavailable

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:  # when run as an agent script
    sys.path.insert(0, REPO)

A_ADDR, B_ADDR = "10.98.0.1", "10.98.0.2"
TUN_ADDR = "10.99.0.1"


# ----------------------------------------------------------------------------------------
# Small struct helpers (no scapy needed for the unit tests or the agents)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, ident: int = 1) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, ttl, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + payload


def icmp_echo(ident: int, seq: int, data: bytes, type_: int = 8) -> bytes:
    msg = struct.pack("!BBHHH", type_, 0, 0, ident, seq) + data
    return msg[:2] + struct.pack("!H", _csum(msg)) + msg[4:]


def ipv6_packet() -> bytes:
    # version 6, payload length 8, next header 59 (none), hop limit 1, fe80::1 -> ff02::2
    src = socket.inet_pton(socket.AF_INET6, "fe80::1")
    dst = socket.inet_pton(socket.AF_INET6, "ff02::2")
    return struct.pack("!IHBB", 6 << 28, 8, 59, 1) + src + dst + b"\0" * 8


# ----------------------------------------------------------------------------------------
# Unit tests: TunDevice on MemoryIOSystem


class FakeNetlink:
    """Records the configuration calls a TunDevice makes."""

    def __init__(self, fail_on=None):
        self.calls = []
        self.closed = 0
        self.fail_on = fail_on

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args):
            self.calls.append((name,) + args)
            if name == self.fail_on:
                raise OSError(errno.EEXIST, "boom")
            return True

        return record

    def close(self):
        self.closed += 1


@pytest.fixture
def memtun():
    from twisted.internet.testing import MemoryReactorClock
    from twisted.pair.testing import MemoryIOSystem, Tunnel

    from narsuite.packet.tun import TunDevice

    system = MemoryIOSystem()
    system.registerSpecialDevice(Tunnel._DEVICE_NAME, Tunnel)
    reactor = MemoryReactorClock()
    got = []

    def make(sink=got.append, **kw):
        kw.setdefault("netlink", FakeNetlink())
        # MemoryIOSystem names a device requested[:13] + b"123": use 13 characters.
        dev = TunDevice(b"narunittest01", sink, reactor=reactor, system=system, **kw)
        return dev

    class Env:
        pass

    env = Env()
    env.system, env.reactor, env.got, env.make = system, reactor, got, make
    return env


def _deliver(env, dev, *packets):
    tunnel = env.system.getTunnel(dev.port)
    for p in packets:
        tunnel.addToReadBuffer(p)
    dev.port.doRead()
    return tunnel


def test_tun_opens_tun_no_pi_and_learns_name(memtun):
    from twisted.pair.tuntap import TunnelFlags

    dev = memtun.make()
    dev.start()
    tunnel = memtun.system.getTunnel(dev.port)
    assert tunnel.tunnelMode == (TunnelFlags.IFF_TUN | TunnelFlags.IFF_NO_PI).value
    assert tunnel.requestedName.rstrip(b"\0") == b"narunittest01"
    assert dev.ifname == "narunittest01123"  # the name the (fake) kernel returned
    assert dev.running
    assert memtun.reactor.readers == {dev.port}


def test_tun_delivers_ipv4_and_drops_ipv6_and_runts(memtun):
    dev = memtun.make()
    dev.start()
    p1 = ipv4("10.99.0.1", "10.99.0.2", 1, icmp_echo(1, 1, b"one"))
    p2 = ipv4("10.99.0.1", "10.97.0.5", 17, b"\0" * 12)
    v6 = ipv6_packet()
    _deliver(memtun, dev, p1, v6, b"\x45\x00", p2)
    assert memtun.got == [p1, p2]
    c = dev.counters
    assert (c.rx_packets, c.rx_dropped, c.rx_ipv6) == (4, 2, 1)
    assert c.rx_bytes == len(p1) + len(p2) + len(v6) + 2


def test_tun_sink_as_protocol_object_and_replaceable(memtun):
    class Sink:
        def __init__(self):
            self.packets = []

        def packetReceived(self, packet):
            self.packets.append(packet)

    sink = Sink()
    dev = memtun.make(sink=sink)
    dev.start()
    p = ipv4("10.99.0.1", "10.99.0.2", 1, icmp_echo(1, 1, b"x"))
    _deliver(memtun, dev, p)
    assert sink.packets == [p]
    dev.sink = None
    _deliver(memtun, dev, p)
    assert dev.counters.rx_dropped == 1
    with pytest.raises(TypeError):
        dev.sink = 42


def test_tun_sink_exception_is_counted_and_reading_goes_on(memtun):
    seen = []

    def sink(packet):
        seen.append(packet)
        if len(seen) == 1:
            raise ValueError("bad packet")

    dev = memtun.make(sink=sink)
    dev.start()
    p = ipv4("10.99.0.1", "10.99.0.2", 1, icmp_echo(1, 1, b"x"))
    _deliver(memtun, dev, p, p, p)
    assert len(seen) == 3
    assert dev.counters.rx_sink_errors == 1 and dev.counters.rx_dropped == 1


def test_tun_write_counts_and_never_raises(memtun):
    dev = memtun.make()
    assert dev.write(b"\x45" + b"\0" * 19) is False  # not started
    dev.start()
    tunnel = memtun.system.getTunnel(dev.port)
    p = ipv4("10.99.0.2", "10.99.0.1", 1, icmp_echo(1, 1, b"reply", type_=0))
    assert dev.write(p) is True
    assert list(tunnel.writeBuffer) == [p]
    big = ipv4("10.99.0.2", "10.99.0.1", 17, b"\0" * 2000)  # > the fake's send buffer
    assert dev.write(big) is False
    c = dev.counters
    assert (c.tx_packets, c.tx_bytes, c.tx_dropped) == (1, len(p), 2)
    assert c.as_dict()["tx_errors_by_errno"] == {"ENOBUFS": 1}


def test_tun_configuration_order(memtun):
    nl = FakeNetlink()
    dev = memtun.make(
        netlink=nl, addresses=["10.99.0.1/24"], mtu=1400, routes=["10.97.0.0/24", "10.96.0.7"]
    )
    dev.start()
    n = dev.ifname
    assert nl.calls == [
        ("disable_ipv6", n),  # before the link is up: no link-local, no RS/MLD
        ("set_mtu", n, 1400),
        ("add_address", n, "10.99.0.1", 24),
        ("set_up", n),
        ("add_route", n, "10.97.0.0/24"),
        ("add_route", n, "10.96.0.7/32"),
    ]
    assert dev.ipv6_disabled
    del nl.calls[:]
    dev.add_route("10.95.0.0/16")
    dev.remove_route("10.97.0.0/24")
    dev.set_mtu(1300)
    dev.add_address("10.99.1.1/32")
    assert nl.calls == [
        ("add_route", n, "10.95.0.0/16"),
        ("remove_route", n, "10.97.0.0/24"),
        ("set_mtu", n, 1300),
        ("add_address", n, "10.99.1.1", 32),
    ]
    assert dev.routes == ["10.96.0.7/32", "10.95.0.0/16"]
    with pytest.raises(ValueError):
        dev.add_route("10.95.0.1/16")  # host bits set: a typo, not a network



def test_tun_route_per_peer_costs_the_same_with_many_routes(memtun):
    """The esp role adds a route per peer: the device's bookkeeping must not scan every
    earlier route (it did, a list: 6 % of an IKEv2 exchange's CPU at a few thousand peers)."""
    import time

    class Quiet(FakeNetlink):
        def add_route(self, *a):
            pass

    dev = memtun.make(netlink=Quiet())
    dev.start()

    def cost(first: int, n: int) -> float:
        t = time.process_time()
        for i in range(first, first + n):
            dev.add_route(f"10.{128 + i // 65536}.{i // 256 % 256}.{i % 256}/32")
        return time.process_time() - t

    early = cost(0, 2000)
    cost(2000, 28000)
    late = cost(30000, 2000)  # with 30,000 routes in: a list scan made this ~30x the first
    assert late < 4 * early + 0.05, (early, late)
    assert len(dev.routes) == 32000

def test_tun_no_configure_and_ipv6_kept(memtun):
    nl = FakeNetlink()
    dev = memtun.make(netlink=nl, configure=False, addresses=["10.99.0.1/24"])
    dev.start()
    assert nl.calls == []
    dev2 = memtun.make(netlink=FakeNetlink(), disable_ipv6=False)
    dev2.start()
    assert [c[0] for c in dev2.netlink.calls] == ["set_up"]


def test_tun_failed_configuration_closes_device(memtun):
    nl = FakeNetlink(fail_on="add_address")
    dev = memtun.make(netlink=nl, addresses=["10.99.0.1/24"])
    with pytest.raises(OSError):
        dev.start()
    assert dev.port is None and not dev.running
    memtun.reactor.advance(0)
    assert memtun.system._openFiles == {}


def test_tun_stop_closes_device_and_service_api(memtun):
    from twisted.application.service import MultiService

    parent = MultiService()
    dev = memtun.make()
    dev.setServiceParent(parent)
    parent.startService()
    assert dev.running
    port = dev.port
    fd = port.fileno()
    d = parent.stopService()
    assert not dev.running
    memtun.reactor.advance(0)  # TuntapPort closes on the next reactor turn
    assert d.called
    with pytest.raises(OSError):
        memtun.system.read(fd, 100)  # the descriptor is closed: device gone
    assert dev.netlink.closed == 1
    assert dev.write(b"\x45" + b"\0" * 19) is False
    with pytest.raises(RuntimeError):
        dev.add_route("10.1.0.0/16")


def test_tun_double_start_refused(memtun):
    dev = memtun.make()
    dev.start()
    with pytest.raises(RuntimeError):
        dev.start()


def test_rawsock_argument_checks():
    from narsuite.packet.rawsock import RawSocketPort

    with pytest.raises(ValueError):
        RawSocketPort(255)
    with pytest.raises(TypeError):
        RawSocketPort(47, sink=object())
    port = RawSocketPort(47)
    # not started: counted, not raised
    assert port.send(b"x", "10.98.0.2") is False
    assert port.send_packet(ipv4("10.98.0.1", "10.98.0.2", 47, b"x")) is False
    assert port.counters.tx_errors == 2


# ----------------------------------------------------------------------------------------
# Lab: namespaces, agents


def _lab_unavailable():
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip"):
        return "no iproute2"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


def _run(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr.strip()}")
    return r


class Netns:
    def __init__(self, a, b):
        self.a, self.b = a, b


@pytest.fixture(scope="module")
def netns_pair():
    reason = _lab_unavailable()
    if reason:
        unavailable(reason)
    a, b = f"npio-a-{os.getpid()}", f"npio-b-{os.getpid()}"
    created = []
    try:
        for ns in (a, b):
            _run("ip", "netns", "add", ns)
            created.append(ns)
        # The veth pair is created inside A; its peer goes straight to B (never root ns).
        _run("ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        for ns, dev, addr in ((a, "va", A_ADDR), (b, "vb", B_ADDR)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield Netns(a, b)
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Proc:
    """A helper process in a namespace: JSON events on stdout, JSON commands on stdin."""

    def __init__(self, ns, mode, arg):
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.cmd = ["ip", "netns", "exec", ns, sys.executable, HERE, mode, json.dumps(arg)]
        self.p = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env,
        )
        self.events = []
        self._cond = threading.Condition()
        self._seq = 0
        self.stderr = []
        threading.Thread(target=self._read, args=(self.p.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.p.stderr, False), daemon=True).start()

    def _read(self, stream, is_events):
        for line in stream:
            if is_events:
                try:
                    ev = json.loads(line)
                except ValueError:
                    ev = {"event": "garbage", "line": line.decode(errors="replace")}
                with self._cond:
                    self.events.append(ev)
                    self._cond.notify_all()
            else:
                self.stderr.append(line.decode(errors="replace"))
        if is_events:
            with self._cond:
                self.events.append({"event": "eof"})
                self._cond.notify_all()

    def wait_for(self, pred, timeout=10.0, what="event"):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                    if ev["event"] == "eof":
                        break
                else:
                    left = deadline - time.monotonic()
                    if left > 0:
                        self._cond.wait(left)
                        continue
                raise AssertionError(
                    f"no {what} from {self.cmd[4:]} in {timeout}s; events={self.events[-20:]} "
                    f"stderr={''.join(self.stderr)[-3000:]}"
                )

    def all(self, pred):
        with self._cond:
            return [ev for ev in self.events if pred(ev)]

    def call(self, op, timeout=10.0, **kw):
        self._seq += 1
        seq = self._seq
        kw.update(op=op, seq=seq)
        self.p.stdin.write(json.dumps(kw).encode() + b"\n")
        self.p.stdin.flush()
        return self.wait_for(lambda e: e.get("seq") == seq, timeout, what=f"reply to {op}")

    def ready(self, timeout=15.0):
        return self.wait_for(lambda e: e["event"] == "ready", timeout, what="ready")

    def exit_code(self, timeout=10.0):
        return self.p.wait(timeout=timeout)

    def close(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.close()  # an agent stops its reactor on EOF
            except OSError:
                pass
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.p.kill()  # only the process this test started, by its PID
                self.p.wait(timeout=5)


@pytest.fixture
def spawn(netns_pair):
    procs = []

    def _spawn(ns, mode, arg):
        proc = Proc(ns, mode, arg)
        procs.append(proc)
        return proc

    try:
        yield _spawn
    finally:
        for proc in procs:
            proc.close()


def _ip_json(ns, *args):
    return json.loads(_run("ip", "-n", ns, "-j", *args).stdout or "[]")


def _rx(port):
    return lambda e: e["event"] == "rx" and e.get("port") == port


# ----------------------------------------------------------------------------------------
# Lab tests: TUN


@pytest.fixture(params=["python", "ping"])
def pinger(request, spawn):
    """Start a one-shot ICMP echo in a namespace; the process exits 0 iff a reply came."""
    if request.param == "ping" and not shutil.which("ping"):
        pytest.skip("iputils ping not installed (the python pinger covers the same path)")

    def start(ns, dst):
        if request.param == "ping":
            return subprocess.Popen(
                ["ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "5", dst],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
        return spawn(ns, "ping", {"dst": dst, "timeout": 5}).p

    procs = []

    def _start(ns, dst):
        p = start(ns, dst)
        procs.append(p)
        return p

    try:
        yield _start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)


@pytest.mark.lab
def test_tun_ping_roundtrip(netns_pair, spawn, pinger):
    from scapy.layers.inet import ICMP, IP

    ns = netns_pair.a
    agent = spawn(
        ns, "agent",
        {"tun": {"addresses": [f"{TUN_ADDR}/24"], "mtu": 1400, "routes": ["10.97.0.0/24"]}},
    )
    ready = agent.ready()
    ifname = ready["tun"]
    assert ifname.startswith("nar")

    # The configuration, as iproute2 (not our code) sees it.
    (link,) = _ip_json(ns, "addr", "show", "dev", ifname)
    assert link["mtu"] == 1400 and "UP" in link["flags"]
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]] == [(TUN_ADDR, 24)]
    routes = {r["dst"] for r in _ip_json(ns, "route", "show", "dev", ifname)}
    assert routes == {"10.97.0.0/24", "10.99.0.0/24"}
    v6 = _run("ip", "netns", "exec", ns, "cat", f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
    assert v6.stdout.strip() == "1" and ready["ipv6_disabled"] is True

    for target in ("10.99.0.2", "10.97.0.5"):
        ping = pinger(ns, target)
        ev = agent.wait_for(lambda e, target=target: e["event"] == "rx" and e["dst"] == target, what="echo")
        request = IP(bytes.fromhex(ev["hex"]))
        assert request.src == TUN_ADDR and request.dst == target
        assert request[ICMP].type == 8
        reply = (
            IP(src=target, dst=TUN_ADDR)
            / ICMP(type=0, id=request[ICMP].id, seq=request[ICMP].seq)
            / request[ICMP].payload
        )
        assert agent.call("tun_write", hex=bytes(reply).hex())["ok"] is True
        assert ping.wait(timeout=10) == 0, f"no echo reply for {target}"

    c = agent.call("counters")["tun"]
    assert c["tx_packets"] == 2 and c["tx_dropped"] == 0
    assert c["rx_packets"] >= 2 and c["rx_ipv6"] == 0
    assert c["rx_packets"] - c["rx_dropped"] == len(agent.all(lambda e: e["event"] == "rx"))


@pytest.mark.lab
def test_tun_runtime_routes_bad_write_and_stop(netns_pair, spawn):
    ns = netns_pair.a
    agent = spawn(ns, "agent", {"tun": {"addresses": [f"{TUN_ADDR}/24"]}})
    ifname = agent.ready()["tun"]

    assert agent.call("tun_route", action="add", dst="10.96.0.0/24")["ok"]
    assert "10.96.0.0/24" in {r["dst"] for r in _ip_json(ns, "route", "show", "dev", ifname)}
    assert agent.call("tun_route", action="remove", dst="10.96.0.0/24")["ok"]
    assert "10.96.0.0/24" not in {r["dst"] for r in _ip_json(ns, "route", "show", "dev", ifname)}

    # Not an IP packet (version nibble 0): the kernel refuses it; counted, not raised.
    assert agent.call("tun_write", hex=(b"\0" * 20).hex())["ok"] is False
    c = agent.call("counters")["tun"]
    assert c["tx_dropped"] == 1 and c["tx_errors_by_errno"] == {"EINVAL": 1}

    stopped = agent.call("tun_stop")
    assert stopped["exists"] is False
    assert _run("ip", "-n", ns, "link", "show", ifname, check=False).returncode != 0
    assert agent.call("tun_write", hex=ipv4(TUN_ADDR, "10.99.0.2", 1, b"x").hex())["ok"] is False


@pytest.mark.lab
def test_tun_ipv6_left_on_is_filtered(netns_pair, spawn):
    # With IPv6 on, the kernel writes its own IPv6 packets (MLD/RS) into a TUN that goes
    # up, within ~0.1 s here: they must be counted and never reach the sink.
    ns = netns_pair.a
    agent = spawn(ns, "agent", {"tun": {"addresses": [f"{TUN_ADDR}/24"], "disable_ipv6": False}})
    ifname = agent.ready()["tun"]
    v6 = _run("ip", "netns", "exec", ns, "cat", f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
    assert v6.stdout.strip() == "0"
    deadline = time.monotonic() + 5
    while True:
        c = agent.call("counters")["tun"]
        if c["rx_ipv6"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert c["rx_ipv6"] >= 1 and c["rx_dropped"] == c["rx_ipv6"]
    assert agent.all(lambda e: e["event"] == "rx") == []


# ----------------------------------------------------------------------------------------
# Lab tests: raw sockets


@pytest.mark.lab
def test_raw_ports_receive_per_protocol(netns_pair, spawn):
    from scapy.layers.inet import GRE, ICMP, IP, UDP

    ports = [
        {"id": "icmp", "proto": 1},
        {"id": "ipip", "proto": 4},
        {"id": "gre", "proto": 47},
        {"id": "esp", "proto": 50},
        {"id": "ah", "proto": 51},
        {"id": "gre_va", "proto": 47, "interface": "va", "bind_address": A_ADDR},
        {"id": "gre_lo", "proto": 47, "interface": "lo"},
        {"id": "gre_127", "proto": 47, "bind_address": "127.0.0.1"},
    ]
    agent = spawn(netns_pair.a, "agent", {"raw": ports})
    agent.ready()

    inner = IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=1234, dport=5678) / b"inner"
    sent = {
        "ipip": IP(src=B_ADDR, dst=A_ADDR, proto=4, ttl=17) / inner / b"-ipip",
        "gre": IP(src=B_ADDR, dst=A_ADDR, ttl=18) / GRE() / inner / b"-gre",
        "esp": IP(src=B_ADDR, dst=A_ADDR, proto=50, ttl=19)
        / struct.pack("!II", 0x1234ABCD, 7) / (b"esp-ciphertext" * 10),
        "ah": IP(src=B_ADDR, dst=A_ADDR, proto=51, ttl=20)
        / struct.pack("!BBHII", 4, 4, 0, 0x55AA55AA, 3) / (b"\0" * 12) / inner,
        # last: its echo reply tells the capture in B that everything before was handled
        "icmp": IP(src=B_ADDR, dst=A_ADDR, ttl=21) / ICMP(type=8, id=0x4242, seq=1) / b"icmp-marker",
    }
    capture = spawn(netns_pair.b, "capture", {"proto": 1, "until": b"icmp-marker".hex(), "timeout": 10})
    capture.ready()
    injector = spawn(netns_pair.b, "inject", {"packets": [bytes(p).hex() for p in sent.values()]})
    assert injector.exit_code() == 0, "".join(injector.stderr)

    for port, pkt in sent.items():
        ev = agent.wait_for(_rx(port), what=f"{port} packet")
        got = IP(bytes.fromhex(ev["hex"]))
        assert ev["src"] == B_ADDR
        assert (got.src, got.dst, got.proto, got.ttl) == (B_ADDR, A_ADDR, pkt.proto, pkt.ttl)
        assert bytes(got.payload) == bytes(pkt.payload)
        assert _csum(bytes.fromhex(ev["hex"])[:20]) == 0  # the header as on the wire
    ev = agent.wait_for(_rx("gre_va"), what="gre on bound port")
    assert bytes(IP(bytes.fromhex(ev["hex"])).payload) == bytes(sent["gre"].payload)

    counters = agent.call("counters")["raw"]
    for port in sent:
        assert counters[port]["rx_packets"] == 1, (port, counters[port])
    assert counters["gre_va"]["rx_packets"] == 1
    assert counters["gre_lo"]["rx_packets"] == 0  # SO_BINDTODEVICE lo: not for packets on va
    assert counters["gre_127"]["rx_packets"] == 0  # bound to another local address

    # The kernel answered the echo (ICMP handled in the kernel too) and sent no
    # "protocol unreachable" for 4/47/50/51: the raw sockets claimed those protocols.
    assert capture.exit_code() == 0
    icmp_seen = [IP(bytes.fromhex(e["hex"])) for e in capture.all(lambda e: e["event"] == "rx")]
    assert [(p[ICMP].type, p.src) for p in icmp_seen] == [(0, A_ADDR)]


@pytest.mark.lab
def test_raw_send_kernel_header_and_hdrincl(netns_pair, spawn):
    from scapy.layers.inet import IP

    capture = spawn(netns_pair.b, "capture", {"proto": 253, "count": 4, "timeout": 10})
    capture.ready()
    agent = spawn(netns_pair.a, "agent", {"raw": [{"id": "x", "proto": 253}]})
    agent.ready()

    # 1. kernel-built header
    assert agent.call("send", port="x", dst=B_ADDR, hex=b"kernel-built".hex())["ok"]
    # 2. borrowed source, checksum, ID and total length left to the kernel (all 0)
    borrowed = IP(src="10.98.0.77", dst=B_ADDR, proto=253, ttl=33, id=0, chksum=0, len=0) / b"borrowed"
    assert agent.call("send_packet", port="x", hex=bytes(borrowed).hex())["ok"]
    # 3. source 0: filled in from the route; an explicit ID is kept
    zero_src = IP(src="0.0.0.0", dst=B_ADDR, proto=253, ttl=34, id=0x1234) / b"zero-source"
    assert agent.call("send_packet", port="x", hex=bytes(zero_src).hex())["ok"]
    # 4. any protocol number goes through the same IPPROTO_RAW socket (forwarding as is)
    other = IP(src="10.98.0.78", dst=B_ADDR, proto=253, ttl=35, tos=0x10) / b"as-is"
    assert agent.call("send_packet", port="x", hex=bytes(other).hex())["ok"]

    assert capture.exit_code() == 0, "".join(capture.stderr)
    got = [IP(bytes.fromhex(e["hex"])) for e in capture.all(lambda e: e["event"] == "rx")]
    by_payload = {bytes(p.payload): p for p in got}
    assert set(by_payload) == {b"kernel-built", b"borrowed", b"zero-source", b"as-is"}

    k = by_payload[b"kernel-built"]
    assert (k.src, k.proto) == (A_ADDR, 253)

    b = by_payload[b"borrowed"]
    assert (b.src, b.ttl, b.len) == ("10.98.0.77", 33, 20 + len(b"borrowed"))
    raw_b = bytes(b)
    assert _csum(raw_b[:20]) == 0  # a valid header checksum, filled in by the kernel

    z = by_payload[b"zero-source"]
    assert (z.src, z.id) == (A_ADDR, 0x1234)

    o = by_payload[b"as-is"]
    assert (o.src, o.tos, o.ttl) == ("10.98.0.78", 0x10, 35)

    c = agent.call("counters")["raw"]["x"]
    assert (c["tx_packets"], c["tx_errors"]) == (4, 0)


@pytest.mark.lab
def test_raw_send_errors_are_counted_not_raised(netns_pair, spawn):
    agent = spawn(netns_pair.a, "agent", {"raw": [{"id": "x", "proto": 253}]})
    agent.ready()
    # No route (A has only its /24 and no default route): refused locally, nothing sent.
    assert agent.call("send", port="x", dst="203.0.113.9", hex=b"x".hex())["ok"] is False
    # IP_HDRINCL packets are never fragmented: larger than the veth MTU -> EMSGSIZE.
    big = ipv4(A_ADDR, B_ADDR, 253, b"\0" * 3000)
    assert agent.call("send_packet", port="x", hex=big.hex())["ok"] is False
    # Not IPv4 at all: refused before the kernel.
    assert agent.call("send_packet", port="x", hex=(b"\x60" + b"\0" * 39).hex())["ok"] is False
    c = agent.call("counters")["raw"]["x"]
    assert c["tx_errors"] == 3 and c["tx_packets"] == 0
    assert c["tx_errors_by_errno"] == {"ENETUNREACH": 1, "EMSGSIZE": 1, "EINVAL": 1}
    assert agent.p.poll() is None  # the reactor survived all of it


# ----------------------------------------------------------------------------------------
# Helper processes (this file run as a script inside a namespace)


def _emit(**ev):
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def _agent_main(cfg):
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.protocols.basic import LineReceiver

    from narsuite.packet.rawsock import RawSocketPort
    from narsuite.packet.tun import NetlinkConfigurator, TunDevice

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    state = {"tun": None, "raw": {}}

    def tun_rx(packet):
        _emit(event="rx", port="tun", dst=socket.inet_ntoa(packet[16:20]), hex=packet.hex())

    def raw_rx(port_id):
        def rx(packet, src):
            _emit(event="rx", port=port_id, src=src, hex=packet.hex())

        return rx

    def start():
        ready = {"event": "ready"}
        if cfg.get("tun") is not None:
            t = cfg["tun"]
            dev = TunDevice(
                b"nar%d", tun_rx, addresses=t.get("addresses", ()), mtu=t.get("mtu"),
                routes=t.get("routes", ()), disable_ipv6=t.get("disable_ipv6", True),
            )
            dev.start()
            state["tun"] = dev
            ready.update(tun=dev.ifname, ipv6_disabled=dev.ipv6_disabled)
        for spec in cfg.get("raw", ()):
            port = RawSocketPort(
                spec["proto"], raw_rx(spec["id"]), interface=spec.get("interface"),
                bind_address=spec.get("bind_address"),
            )
            port.start()
            state["raw"][spec["id"]] = port
        _emit(**ready)

    def command(cmd):
        op, reply = cmd["op"], {"event": "result", "seq": cmd["seq"], "op": cmd["op"]}
        if op == "tun_write":
            reply["ok"] = state["tun"].write(bytes.fromhex(cmd["hex"]))
        elif op == "tun_route":
            dev = state["tun"]
            (dev.add_route if cmd["action"] == "add" else dev.remove_route)(cmd["dst"])
            reply["ok"] = True
        elif op == "tun_stop":
            dev = state["tun"]
            name = dev.ifname

            def gone(_):
                nl = NetlinkConfigurator()
                reply["exists"] = nl.link_exists(name)
                nl.close()
                _emit(**reply)

            dev.stop().addCallback(gone)
            return
        elif op == "send":
            reply["ok"] = state["raw"][cmd["port"]].send(bytes.fromhex(cmd["hex"]), cmd["dst"])
        elif op == "send_packet":
            reply["ok"] = state["raw"][cmd["port"]].send_packet(bytes.fromhex(cmd["hex"]))
        elif op == "counters":
            if state["tun"] is not None:
                reply["tun"] = state["tun"].counters.as_dict()
            reply["raw"] = {k: p.counters.as_dict() for k, p in state["raw"].items()}
        else:
            reply["error"] = f"unknown op {op}"
        _emit(**reply)

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            cmd = {}
            try:
                cmd = json.loads(line)
                command(cmd)
            except Exception as e:  # report (as the reply, so the test fails fast), keep running
                _emit(event="error", seq=cmd.get("seq"), error=repr(e))

        def connectionLost(self, reason):
            for port in state["raw"].values():
                port.stop()
            if state["tun"] is not None:
                state["tun"].stop()
            reactor.callLater(0, reactor.stop)

    def boot():
        try:
            start()
        except Exception as e:
            _emit(event="error", error=repr(e))
            reactor.stop()
            return
        stdio.StandardIO(Control())

    reactor.callWhenRunning(boot)
    reactor.run()


def _capture_main(cfg):
    """Plain raw socket capture: prints packets until `count` or a marker; exit 0 if done."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, cfg["proto"])
    deadline = time.monotonic() + cfg.get("timeout", 10)
    until = bytes.fromhex(cfg["until"]) if cfg.get("until") else None
    count = cfg.get("count")
    n = 0
    _emit(event="ready")
    while time.monotonic() < deadline:
        s.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data, addr = s.recvfrom(65535)
        except TimeoutError:
            break
        n += 1
        _emit(event="rx", src=addr[0], hex=data.hex())
        if (until is not None and until in data) or (count is not None and n >= count):
            return 0
    return 1


def _inject_main(cfg):
    """Send complete IPv4 packets with a plain IPPROTO_RAW socket."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for h in cfg["packets"]:
        p = bytes.fromhex(h)
        s.sendto(p, (socket.inet_ntoa(p[16:20]), 0))
    return 0


def _ping_main(cfg):
    """One ICMP echo request; exit 0 iff the matching echo reply arrives."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident, data = os.getpid() & 0xFFFF, b"narsuite-ping-" + os.urandom(8)
    s.sendto(icmp_echo(ident, 1, data), (cfg["dst"], 0))
    deadline = time.monotonic() + cfg.get("timeout", 5)
    while time.monotonic() < deadline:
        s.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            pkt, addr = s.recvfrom(65535)
        except TimeoutError:
            break
        icmp = pkt[(pkt[0] & 0xF) * 4:]
        if addr[0] == cfg["dst"] and icmp[:1] == b"\0" and icmp[4:6] == struct.pack("!H", ident) \
                and icmp[8:] == data and _csum(icmp) == 0:
            return 0
    return 1


if __name__ == "__main__":
    _mode, _cfg = sys.argv[1], json.loads(sys.argv[2])
    _main = {"agent": _agent_main, "capture": _capture_main, "inject": _inject_main,
             "ping": _ping_main}[_mode]
    sys.exit(_main(_cfg) or 0)
