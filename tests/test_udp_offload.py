"""The UDP ASSOCIATE kernel fast path (narsuite.nar.udpoffload, narsuite.packet.bpf).

The program runs in the real kernel through BPF_PROG_TEST_RUN, fed packets built by scapy
(the independent reference: expected packets are scapy's, checksums scapy's); the controller
is driven with real maps; both run in a namespace of the lab where routes matter.  Root and Linux
6.6+ are needed (tcx); without them these tests fail under NARSUITE_REQUIRE_LAB=1 and skip
otherwise (lab.pytest_plugin.unavailable).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.all import IP, UDP, Ether, Raw
from twisted.internet.task import Clock

from narsuite import schema
from narsuite.lab.pytest_plugin import unavailable
from narsuite.nar import socks
from narsuite.nar import udpoffload as u
from narsuite.nar.config import NarConfig, Rule
from narsuite.nar.server import SocksFactory
from narsuite.packet import bpf
from narsuite.schema import ConfigError
from tests.test_socks_perf import _socks_server_thread, _udp_associate

_WHY = bpf.available() if os.geteuid() == 0 else "not root"


@pytest.fixture(autouse=True)
def _need_bpf():
    if _WHY is not None:
        unavailable(_WHY, "eBPF")

CLIENT = ("10.0.0.2", 40000)
RELAY = ("10.0.0.1", 50000)  # where the client sends
RELAY_T = "10.1.0.1"  # the relay's address towards DST
DEST = ("10.1.0.5", 9999)
MAC = {"src": "02:00:00:00:00:01", "dst": "00:00:00:00:00:00"}  # test runs take lo's (all-zero) MAC for us


def header(ip: str = DEST[0], port: int = DEST[1]) -> bytes:
    return b"\0\0\0\x01" + socket.inet_aton(ip) + port.to_bytes(2, "big")


class InNetns:
    """Runs calls in a thread that has entered a namespace: a program run by the kernel
    (BPF_PROG_TEST_RUN) looks routes up in its caller's namespace."""

    def __init__(self, netns: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, initializer=self._enter, initargs=(netns,))

    @staticmethod
    def _enter(netns: str) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/var/run/netns/{netns}") as f:
            if libc.setns(f.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")

    def __call__(self, fn, *args, **kw):
        return self.pool.submit(fn, *args, **kw).result(10)


class Routed:
    """The program for the fixture's two flows, run in namespace N (the kernel asks N's routes):
    X (the client, 10.0.0.2) on N's eth0 (10.0.0.1), Y (DST, 10.1.0.5) on N's eth1 (10.1.0.1)."""

    def __init__(self, ns: InNetns, fwd, rev, max_summed: int = u.MAX_SUMMED) -> None:
        self.ns = ns
        self.prog = bpf.Program(u.build_program(fwd.fd, rev.fd, 14, max_summed), name="nar_udp_test")

    def run(self, data: bytes, ctx: bytes | None = None):
        """BPF_PROG_TEST_RUN in N: (return code, the packet as the program left it)."""
        return self.ns(self.prog.test_run, data, ctx)

    def close(self) -> None:
        self.prog.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def routed_ns(lab):
    n, x, y = lab.host("n"), lab.host("x"), lab.host("y")
    lab.link(n, x, f"{RELAY[0]}/24", f"{CLIENT[0]}/24", "eth0", "eth0")
    lab.link(n, y, f"{RELAY_T}/24", f"{DEST[0]}/24", "eth1", "eth0")
    ns = InNetns(n.netns)
    yield ns, n
    ns.pool.shutdown()


@pytest.fixture
def prog(routed_ns):
    ns, _ = routed_ns
    to_x, to_y = ns(socket.if_nametoindex, "eth0"), ns(socket.if_nametoindex, "eth1")
    fwd = bpf.HashMap(u.FWD_KEY.size, u.FWD_VALUE.size, 16)
    rev = bpf.HashMap(u.REV_KEY.size, u.REV_VALUE.size, 16)
    p = Routed(ns, fwd, rev)
    fwd.update(u.fwd_key(CLIENT, RELAY, DEST),
               u.FWD_VALUE.pack(0, 0, 0, to_y, 0, socket.inet_aton(RELAY_T), 1500, 0))
    rev.update(u.rev_key(DEST, (RELAY_T, RELAY[1])),
               u.REV_VALUE.pack(0, 0, 0, to_x, 0, socket.inet_aton(CLIENT[0]), 1500, socket.inet_aton(RELAY[0]),
                                CLIENT[1].to_bytes(2, "big"), 0))
    yield p, fwd, rev
    p.close()
    fwd.close()
    rev.close()


def from_client(data: bytes, **ip) -> Ether:
    return Ether(**MAC) / IP(src=CLIENT[0], dst=RELAY[0], **ip) / UDP(sport=CLIENT[1], dport=RELAY[1]) / Raw(data)


def from_dest(data: bytes, **ip) -> Ether:
    return Ether(**MAC) / IP(src=DEST[0], dst=RELAY_T, **ip) / UDP(sport=DEST[1], dport=RELAY[1]) / Raw(data)


def test_forward_strips_the_header_and_readdresses(prog):
    p, fwd, _ = prog
    rc, out = p.run(bytes(from_client(header() + b"hello world", ttl=7, id=77)))
    assert rc == bpf.TC_ACT_REDIRECT
    expected = Ether(**MAC) / IP(src=RELAY_T, dst=DEST[0], ttl=64, id=77) / UDP(sport=RELAY[1], dport=DEST[1]) \
        / Raw(b"hello world")
    assert out == bytes(expected)  # scapy computed both checksums of the expected packet
    packets, nbytes, last = struct.unpack_from("<QQQ", fwd.lookup(u.fwd_key(CLIENT, RELAY, DEST)))
    assert (packets, nbytes) == (1, 11) and last > 0


@pytest.mark.parametrize("size", [0, 1, 2, 3, 1000, 1401])
def test_forward_checksum_for_every_payload_parity(prog, size):
    p, _, _ = prog
    body = os.urandom(size)
    rc, out = p.run(bytes(from_client(header() + body, id=1)))
    assert rc == bpf.TC_ACT_REDIRECT
    got = Ether(out)
    chk = got[UDP].chksum
    del got[UDP].chksum
    assert Ether(bytes(got))[UDP].chksum == chk  # scapy's own sum over the rewritten datagram
    assert bytes(got[UDP].payload) == body


def test_reverse_prepends_the_header_and_readdresses(prog):
    p, _, rev = prog
    rc, out = p.run(bytes(from_dest(b"reply!", ttl=9, id=5)))
    assert rc == bpf.TC_ACT_REDIRECT
    expected = Ether(**MAC) / IP(src=RELAY[0], dst=CLIENT[0], ttl=64, id=5) \
        / UDP(sport=RELAY[1], dport=CLIENT[1]) / Raw(header() + b"reply!")
    assert out == bytes(expected)
    packets, nbytes, _ = struct.unpack_from("<QQQ", rev.lookup(u.rev_key(DEST, (RELAY_T, RELAY[1]))))
    assert (packets, nbytes) == (1, 6)


def _pseudo_sum(pkt: Ether) -> int:
    """What a local sender's kernel leaves in the UDP checksum field of a CHECKSUM_PARTIAL
    datagram: the folded (uncomplemented) sum of the pseudo header."""
    raw = bytes(pkt)
    ip = pkt[IP]
    ph = socket.inet_aton(ip.src) + socket.inet_aton(ip.dst) + b"\0\x11" + raw[14 + 24:14 + 26]
    total = sum(struct.unpack("!6H", ph))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _as_partial(pkt: Ether) -> bytes:
    pkt = Ether(bytes(pkt))
    pkt[UDP].chksum = _pseudo_sum(pkt)
    return bytes(pkt)


def _local(fwd, rev) -> None:
    """Make both test flows local deliveries (the only ones partial checksums may take)."""
    for m, st in ((fwd, u.FWD_VALUE), (rev, u.REV_VALUE)):
        for k, v in m.items():
            f = list(st.unpack(v))
            f[4] = u.FLAG_LOCAL
            m.update(k, st.pack(*f))


@pytest.mark.parametrize("size", [0, 1, 3, 255, 256, 257, 1000, 1433])  # 1433: the most within the MTU of 1500
def test_partial_checksums_delivered_locally_get_full_ones(prog, size):
    """A datagram whose checksum field holds its pseudo-header sum (as a local sender's kernel
    leaves it) is summed in the kernel, in chunks, both ways: the result is scapy's packet."""
    p, fwd, rev = prog
    _local(fwd, rev)
    body = os.urandom(size)
    rc, out = p.run(_as_partial(from_client(header() + body, id=3)))
    assert rc == bpf.TC_ACT_OK
    assert out == bytes(Ether(**MAC) / IP(src=RELAY_T, dst=DEST[0], ttl=64, id=3)
                        / UDP(sport=RELAY[1], dport=DEST[1]) / Raw(body))
    rc, out = p.run(_as_partial(from_dest(body, id=4)))
    assert rc == bpf.TC_ACT_OK
    assert out == bytes(Ether(**MAC) / IP(src=RELAY[0], dst=CLIENT[0], ttl=64, id=4)
                        / UDP(sport=RELAY[1], dport=CLIENT[1]) / Raw(header() + body))


def test_partial_checksums_are_left_to_python_unless_delivered_locally(prog):
    p, fwd, rev = prog
    for pkt in (from_client(header() + b"x" * 100), from_dest(b"y" * 100)):
        data = _as_partial(pkt)
        rc, out = p.run(data)
        assert rc == bpf.TCX_NEXT and out == data
    assert u.FWD_VALUE.unpack(fwd.items()[0][1])[-1] == 1 and u.REV_VALUE.unpack(rev.items()[0][1])[-1] == 1


def test_partial_payload_over_the_summed_limit_is_left_to_python(prog):
    """The limit, with a program built for 512 bytes (test runs cannot carry 16 KiB)."""
    p0, fwd, rev = prog
    _local(fwd, rev)
    with Routed(p0.ns, fwd, rev, max_summed=512) as p:
        assert p.run(_as_partial(from_client(header() + b"z" * 512)))[0] == bpf.TC_ACT_OK
        data = _as_partial(from_client(header() + b"z" * 513))
        assert p.run(data) == (bpf.TCX_NEXT, data)
        data = _as_partial(from_dest(b"z" * 513))
        assert p.run(data) == (bpf.TCX_NEXT, data)


def test_a_datagram_without_checksum_stays_without(prog):
    p, _, _ = prog
    pkt = from_dest(b"no checksum")
    pkt[UDP].chksum = 0
    rc, out = p.run(bytes(pkt))
    assert rc == bpf.TC_ACT_REDIRECT and Ether(out)[UDP].chksum == 0
    assert Ether(out)[Raw].load == header() + b"no checksum"


def _frag(pkt: Ether) -> Ether:
    pkt[IP].flags = "MF"
    return pkt


def _offset(pkt: Ether) -> Ether:
    pkt[IP].frag = 8
    return pkt


FALL_THROUGH = {
    "fragment (MF)": lambda: _frag(from_client(header() + b"x")),
    "fragment (offset)": lambda: _offset(from_dest(b"x")),
    "ATYP 3 (a name)": lambda: from_client(b"\0\0\0\x03\x07example\x00\x35" + b"x"),
    "ATYP 4 (IPv6)": lambda: from_client(b"\0\0\0\x04" + bytes(16) + b"\x00\x35x"),
    "FRAG != 0": lambda: from_client(b"\0\0\x01\x01" + header()[4:] + b"x"),
    "RSV != 0": lambda: from_client(b"\0\x01\0\x01" + header()[4:] + b"x"),
    "IP options": lambda: Ether(**MAC) / IP(src=CLIENT[0], dst=RELAY[0], options=b"\x01\x01\x01\x00")
    / UDP(sport=CLIENT[1], dport=RELAY[1]) / Raw(header() + b"x"),
    "miss (other destination)": lambda: from_client(header("10.1.0.6") + b"x"),
    "miss (other client port)": lambda: Ether(**MAC) / IP(src=CLIENT[0], dst=RELAY[0])
    / UDP(sport=CLIENT[1] + 1, dport=RELAY[1]) / Raw(header() + b"x"),
    "miss (reply from a stranger)": lambda: Ether(**MAC) / IP(src="10.1.0.9", dst=RELAY_T)
    / UDP(sport=DEST[1], dport=RELAY[1]) / Raw(b"x"),
    "short SOCKS header": lambda: from_client(header()[:9]),
    "too big for the client's MTU": lambda: from_dest(b"y" * (1500 - 28 - 9)),
    "not UDP": lambda: Ether(**MAC) / IP(src=CLIENT[0], dst=RELAY[0], proto=6) / Raw(b"\0" * 40),
}


@pytest.mark.parametrize("case", sorted(FALL_THROUGH))
def test_anything_else_falls_through_untouched(prog, case):
    p, fwd, rev = prog
    data = bytes(FALL_THROUGH[case]())
    rc, out = p.run(data)
    assert rc == bpf.TCX_NEXT and out == data
    for m in (fwd, rev):
        assert all(struct.unpack_from("<Q", v)[0] == 0 for _, v in m.items())


def test_gso_falls_through(prog):
    p, _, _ = prog
    data = bytes(from_client(header() + b"x" * 100))
    ctx = bytearray(bpf.SKB_SIZE)
    struct.pack_into("<I", ctx, bpf.SKB["gso_size"], 50)
    struct.pack_into("<I", ctx, bpf.SKB["gso_segs"], 2)
    rc, out = p.run(data, ctx=bytes(ctx))
    assert rc == bpf.TCX_NEXT and out == data


def test_left_to_python_is_counted_per_flow(prog):
    p, _, rev = prog
    p.run(bytes(from_dest(b"y" * (1500 - 28 - 9))))  # over the client's MTU once the header is on
    assert u.REV_VALUE.unpack(rev.lookup(u.rev_key(DEST, (RELAY_T, RELAY[1]))))[-1] == 1


def test_where_the_host_forwards_the_kernel_checks_each_datagrams_route(prog, routed_ns):
    """With forwarding on (bpf_fib_lookup answers only then), a route gone or now picking
    another source sends the flow's datagrams to Python at once, untouched, counted."""
    p, fwd, rev = prog
    _, n = routed_ns
    n.sysctl(**{"net.ipv4.conf.all.forwarding": 1})
    data, reply = bytes(from_client(header() + b"x")), bytes(from_dest(b"y"))
    assert p.run(data)[0] == p.run(reply)[0] == bpf.TC_ACT_REDIRECT
    n.ip("addr", "add", "10.1.0.2/24", "dev", "eth1")
    n.ip("route", "replace", f"{DEST[0]}/32", "dev", "eth1", "src", "10.1.0.2")
    assert p.run(data) == (bpf.TCX_NEXT, data)  # another source now
    n.ip("route", "del", f"{DEST[0]}/32")
    assert p.run(data)[0] == bpf.TC_ACT_REDIRECT  # back
    n.ip("link", "set", "eth1", "down")
    assert p.run(data) == (bpf.TCX_NEXT, data)  # no route through eth1
    n.ip("link", "set", "eth0", "down")
    assert p.run(reply) == (bpf.TCX_NEXT, reply)
    assert u.FWD_VALUE.unpack(fwd.items()[0][1])[-1] == 2 and u.REV_VALUE.unpack(rev.items()[0][1])[-1] == 1


def test_the_largest_reply_within_the_mtu_is_taken(prog):
    p, _, _ = prog
    rc, out = p.run(bytes(from_dest(b"y" * (1500 - 28 - 10))))
    assert rc == bpf.TC_ACT_REDIRECT and len(out) == 14 + 1500


def test_verifier_log_in_the_error():
    a = bpf.Asm()
    a.ldx(4, bpf.R0, bpf.R1, 1000)
    a.exit()
    with pytest.raises(bpf.BpfError) as e:
        bpf.Program(a.assemble())
    assert "invalid bpf_context access" in e.value.log


def test_assembler_refuses_unknown_labels():
    a = bpf.Asm()
    a.ja("nowhere")
    with pytest.raises(ValueError, match="nowhere"):
        a.assemble()


def test_map_iteration_by_batch_and_by_key():
    with bpf.HashMap(4, 8, 10000) as m:
        for i in range(5000):
            m.update(struct.pack("<I", i), struct.pack("<Q", i * 3))
        items = m.items(chunk=512)
        assert sorted(items) == sorted((struct.pack("<I", i), struct.pack("<Q", i * 3)) for i in range(5000))
        m._batch_ok = False
        assert sorted(m.items()) == sorted(items)
        assert m.delete(struct.pack("<I", 1)) and not m.delete(struct.pack("<I", 1))


# ---------------------------------------------------------------- the controller

def _route(table):
    return lambda ip: table.get(ip)


LOCAL = u.RouteInfo(1, True, "127.0.0.1", 65536, 14)


class Owner:
    _last = 0.0


def _controller(max_flows=8, routes=None, now=None):
    counters = dict.fromkeys(["udp_datagrams_out", "udp_datagrams_in", "bytes_up", "bytes_down"], 0)
    clock = Clock()
    ns = now if now is not None else [10**12]
    off = u.UdpOffload(counters, max_flows, clock, route=_route(routes or {"127.0.0.1": LOCAL}),
                       monotonic_ns=lambda: ns[0])
    return off, counters, clock, ns


# ------------------------------------------------- route lookups without pyroute2

def test_route_get_answers_as_pyroute2_and_ip_route_get(routed_ns):
    """narsuite.packet.rtnl's struct-built RTM_GETROUTE, against pyroute2's and ``ip route get``'s
    answers for the same addresses in one namespace: local, lo, on-link, via a gateway, an MTU
    metric, no route (None)."""
    import json

    from pyroute2 import IPRoute, NetlinkError

    from narsuite.packet import rtnl

    ns, n = routed_ns
    n.ip("route", "add", "10.2.0.0/24", "via", "10.1.0.5", "mtu", "1280")
    n.ip("route", "add", "10.3.0.0/24", "via", "10.0.0.2", "src", RELAY[0])
    ours, ipr = ns(rtnl.RouteSocket), ns(IPRoute)
    lo, eth0, eth1 = (ns(socket.if_nametoindex, d) for d in ("lo", "eth0", "eth1"))
    want = {  # address: (type, oif, prefsrc, mtu metric)
        RELAY[0]: (u.RTN_LOCAL, lo, RELAY[0], 0),
        "127.0.0.1": (u.RTN_LOCAL, lo, "127.0.0.1", 0),
        DEST[0]: (1, eth1, RELAY_T, 0),
        "10.2.0.7": (1, eth1, RELAY_T, 1280),
        "10.3.0.9": (1, eth0, RELAY[0], 0),
    }
    try:
        for ip, (rtype, oif, src, mtu) in want.items():
            got = ns(ours.get, ip)
            assert got == rtnl.GotRoute(rtype, oif, src, mtu), ip
            ref = ns(ipr.route, "get", dst=ip)[0]
            metrics = ref.get_attr("RTA_METRICS")
            assert (ref["type"], ref.get_attr("RTA_OIF"), ref.get_attr("RTA_PREFSRC"),
                    (metrics.get_attr("RTAX_MTU") or 0) if metrics is not None else 0) == (rtype, oif, src, mtu)
            (cli,) = json.loads(n.ip("-j", "route", "get", ip).stdout)
            assert (cli["dev"], cli.get("prefsrc")) == (ns(socket.if_indextoname, oif), src), cli
            assert cli.get("metrics", [{}])[0].get("mtu", 0) == mtu and (cli.get("type") == "local") == (
                rtype == u.RTN_LOCAL), cli
        # no default route in the namespace: the kernel says ENETUNREACH, we say None
        assert ns(ours.get, "192.0.2.99") is None
        assert n.ip("route", "get", "192.0.2.99", check=False).returncode != 0
        with pytest.raises(NetlinkError, match="unreachable"):
            ns(ipr.route, "get", dst="192.0.2.99")
        n.ip("route", "add", "prohibit", "10.4.0.0/24")
        assert ns(ours.get, "10.4.0.1") is None
        # kernel_route on top: the interface's MTU and link type, the route's MTU metric under it
        assert ns(u.kernel_route, "10.2.0.7", ours) == u.RouteInfo(eth1, False, RELAY_T, 1280, 14)
        assert ns(u.kernel_route, RELAY[0], ours) == u.RouteInfo(lo, True, RELAY[0], 65536, 14)
        assert ns(u.kernel_route, "192.0.2.99", ours) is None
    finally:
        ns(ours.close)
        ipr.close()


def test_kernel_route_does_not_go_through_pyroute2(monkeypatch):
    """The per-flow lookup is the struct-built request (pyroute2 cost 426 us per address on the
    reactor thread): it works with pyroute2 unimportable."""
    import sys

    monkeypatch.setitem(sys.modules, "pyroute2", None)
    got = u.kernel_route("127.0.0.1")
    assert got is not None and got.local and got.ifindex == socket.if_nametoindex("lo")


def test_parse_route_skips_other_answers_and_reads_errors():
    from narsuite.packet import rtnl

    def msg(kind: int, seq: int, body: bytes) -> bytes:
        return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body

    rtm = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 254, 0, 0, 1, 0)
    oif = struct.pack("=HHI", 8, rtnl.RTA_OIF, 3)
    metrics = struct.pack("=HH", 16, rtnl.RTA_METRICS | 0x8000) + struct.pack("=HHI", 8, rtnl.RTAX_MTU, 1400) + \
        struct.pack("=HHI", 8, 99, 7)
    stale = msg(rtnl.RTM_NEWROUTE, 6, rtm + oif)
    assert rtnl.parse_route(stale + msg(rtnl.RTM_NEWROUTE, 7, rtm + oif + metrics), 7) == \
        rtnl.GotRoute(1, 3, None, 1400)
    assert rtnl.parse_route(msg(rtnl.NLMSG_ERROR, 7, struct.pack("=i", -101)), 7) == 101
    assert rtnl.parse_route(stale, 7) is None and rtnl.parse_route(stale[:20], 6) is None


def test_install_remove_and_sweep_fold_kernel_counters_into_ours():
    off, c, clock, ns = _controller()
    try:
        owner = Owner()
        flow = off.install(owner, ("127.0.0.1", 1000), ("127.0.0.1", 2000), ("127.0.0.1", 3000))
        assert flow is not None and c["udp_offload_flows"] == 1 and 1 in off._links
        v = u.FWD_VALUE.unpack(off.fwd.lookup(flow.fwd))
        assert v[3:7] == (1, u.FLAG_LOCAL, socket.inet_aton("127.0.0.1"), 65536)
        r = u.REV_VALUE.unpack(off.rev.lookup(flow.rev))
        assert r[5] == socket.inet_aton("127.0.0.1") and r[8] == (1000).to_bytes(2, "big")
        # the kernel relayed 3 datagrams out (30 bytes) and 2 in (8 bytes), the last 2 s ago
        off.fwd.update(flow.fwd, u.FWD_VALUE.pack(3, 30, ns[0] - 2 * 10**9, *v[3:-1], 7))
        off.rev.update(flow.rev, u.REV_VALUE.pack(2, 8, ns[0] - 5 * 10**9, *r[3:]))
        clock.advance(100)
        off.sweep()
        assert (c["udp_datagrams_out"], c["udp_offload_datagrams_out"], c["bytes_up"]) == (3, 3, 30)
        assert (c["udp_datagrams_in"], c["udp_offload_datagrams_in"], c["bytes_down"]) == (2, 2, 8)
        assert owner._last == pytest.approx(98.0) and c["udp_offload_left_to_python"] == 7
        off.sweep()  # deltas only: nothing new
        assert c["udp_datagrams_out"] == 3
        off.fwd.update(flow.fwd, u.FWD_VALUE.pack(4, 41, ns[0], *v[3:-1], 7))
        off.remove([flow])  # what the kernel did since the sweep is counted, then gone
        assert (c["udp_datagrams_out"], c["bytes_up"]) == (4, 41)
        assert off.fwd.items() == [] and off.rev.items() == [] and not off.flows
    finally:
        off.stop()
    assert off.fwd.closed and off.rev.closed and not off._links


def test_routes_are_looked_up_again_every_30_sweeps_with_or_without_flows():
    asked = []
    off, _, _, _ = _controller()
    off.route = lambda ip: asked.append(ip) or LOCAL
    try:
        flow = off.install(Owner(), ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3))
        off.remove([flow])
        assert asked == ["127.0.0.1"]
        for _ in range(29):
            off.sweep()
        assert off.install(Owner(), ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 4)) and len(asked) == 1
        off.sweep()  # the 30th: the cache goes
        assert off.install(Owner(), ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 5)) and len(asked) == 2
    finally:
        off.stop()


def test_a_route_change_takes_flows_out_and_lets_the_relay_offer_them_again(routed_ns):
    """rtnetlink reports the change; flows whose routes moved (the uplink down, another source
    chosen) leave the kernel at once (Python follows the kernel) and their relays are told."""
    from narsuite.packet import rtnl

    ns, n = routed_ns
    routes = ns(rtnl.RouteSocket)

    def netlink():
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
        s.bind((0, u.RTMGRP_LINK | u.RTMGRP_IPV4_IFADDR | u.RTMGRP_IPV4_ROUTE))
        return s

    off, c, clock, _ = _controller(routes={})
    off.route = lambda ip: ns(u.kernel_route, ip, routes)
    off._link = lambda ifindex, l2: None  # the namespace's interfaces are not this thread's
    off.watch_routes(ns(netlink))
    forgot = []
    try:
        flows = [off.install(Owner(), CLIENT, RELAY, DEST, forget=lambda: forgot.append("y")),
                 off.install(Owner(), CLIENT, RELAY, (RELAY[0][:-1] + "9", 53), forget=lambda: forgot.append("x"))]
        assert all(flows) and flows[0].routes[1].source == RELAY_T and len(off.fwd.items()) == 2
        off._watch.doRead()  # whatever setting up said
        clock.advance(0)
        assert len(off.flows) == 2 and forgot == []  # nothing changed for them
        n.ip("addr", "add", "10.1.0.2/24", "dev", "eth1")
        n.ip("route", "replace", f"{DEST[0]}/32", "dev", "eth1", "src", "10.1.0.2")
        off._watch.doRead()
        clock.advance(0)
        assert forgot == ["y"] and list(off.flows) == [flows[1].fwd] and len(off.rev.items()) == 1
        n.ip("link", "set", "eth0", "down")  # the client side's link
        off._watch.doRead()
        clock.advance(0)
        assert forgot == ["y", "x"] and not off.flows and off.fwd.items() == [] and off.rev.items() == []
    finally:
        off.stop()
        ns(routes.close)


def test_full_map_keeps_flows_in_python_and_counts():
    off, c, _, _ = _controller(max_flows=2)
    try:
        for port in (3000, 3001):
            assert off.install(Owner(), ("127.0.0.1", 1000), ("127.0.0.1", 2000), ("127.0.0.1", port))
        assert off.install(Owner(), ("127.0.0.1", 1000), ("127.0.0.1", 2000), ("127.0.0.1", 3002)) is None
        assert c["udp_offload_full"] == 1 and c["udp_offload_flows"] == 2
    finally:
        off.stop()


def test_unroutable_or_unsupported_stays_in_python():
    tun = u.RouteInfo(9, False, "10.9.0.1", 1400, None)
    off, c, _, _ = _controller(routes={"127.0.0.1": LOCAL, "10.9.0.2": tun})
    try:
        assert off.install(Owner(), ("127.0.0.1", 1), ("127.0.0.1", 2), ("10.9.0.2", 3)) is None
        assert off.install(Owner(), ("127.0.0.1", 1), ("127.0.0.1", 2), ("192.0.2.99", 3)) is None
        assert off.install(Owner(), ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 2)) is None  # itself
        assert c["udp_offload_flows"] == 0 and c["udp_offload_errors"] == 0
    finally:
        off.stop()


def test_one_end_local_the_other_not_stays_in_python():
    """The rewritten datagram would enter from eth0 with one of our addresses as its source:
    a martian.  (Until aa6ba5f only 127.0.0.0/8 was refused: N's public address was lost.)"""
    eth = u.RouteInfo(5, False, "10.0.0.1", 1500, 14)
    public = u.RouteInfo(1, True, "192.0.2.2", 65536, 14)  # N's own address: through lo
    off, c, _, _ = _controller(routes={"10.0.0.2": eth, "192.0.2.2": public, "127.0.0.1": LOCAL})
    try:
        assert off.install(Owner(), ("10.0.0.2", 1), ("10.0.0.1", 2), ("192.0.2.2", 3)) is None
        assert off.install(Owner(), ("10.0.0.2", 1), ("10.0.0.1", 2), ("127.0.0.1", 3)) is None
        assert off.install(Owner(), ("192.0.2.2", 1), ("10.0.0.1", 2), ("10.0.0.2", 3)) is None
        assert off.install(Owner(), ("127.0.0.1", 1), ("127.0.0.1", 2), ("192.0.2.2", 3)) is not None
        assert c["udp_offload_flows"] == 1
    finally:
        off.stop()


def test_a_failing_map_update_is_counted_and_never_raises():
    off, c, _, _ = _controller()
    try:
        off.rev.close()
        off.rev.fd = 10**6  # a descriptor that is not there: every map call fails
        assert off.install(Owner(), ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)) is None
        assert c["udp_offload_errors"] == 1 and off.fwd.items() == []
        off.rev.fd = -1
    finally:
        off.stop()


def test_config_keys_are_validated():
    assert NarConfig().udp_offload == "auto" and NarConfig().udp_offload_max_flows == 65536
    with pytest.raises(ConfigError, match="nar.udp_offload.*'auto', 'off'"):
        schema.build(NarConfig, {"udp_offload": "on"}, "nar")
    with pytest.raises(ConfigError, match="nar.udp_offload_max_flows"):
        schema.build(NarConfig, {"udp_offload_max_flows": 0}, "nar")


def test_auto_without_bpf_says_why_once_and_relays_in_python(monkeypatch):
    """An architecture whose bpf(2) number we do not know stands for every "cannot" (EPERM,
    ENOSYS, an old kernel's EINVAL): one log line with the reason, then the Python path."""
    from twisted.logger import formatEvent, globalLogPublisher

    seen: list[str] = []

    def watch(event):
        if event.get("log_namespace") == "narsuite.nar.udpoffload":
            seen.append(formatEvent(event))

    monkeypatch.setattr(bpf.platform, "machine", lambda: "sparc64")
    globalLogPublisher.addObserver(watch)
    try:
        f = SocksFactory(NarConfig(), reactor=Clock())
        assert f.udp_offload() is None and f.udp_offload() is None
    finally:
        globalLogPublisher.removeObserver(watch)
    assert len(seen) == 1 and "kernel offload unavailable" in seen[0] and "sparc64" in seen[0], seen


def test_off_means_no_program():
    f = SocksFactory(NarConfig(udp_offload="off"), reactor=Clock())
    assert f.udp_offload() is None and f._offload is None


@contextlib.contextmanager
def _live_association(path: str) -> Iterator[tuple[Any, Any, socket.socket, Any, socket.socket,
                                                  socket.socket, bytes]]:
    """A SOCKS server on its own reactor thread (``path``: "twisted" or "lean") with one UDP
    association from a client socket on lo to a UDP echo socket there:
    (reactor, factory, control connection, relay address, client, echo, the echo's header)."""
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(5)
    r, f, port, t = _socks_server_thread(NarConfig(listen="127.0.0.1", methods=["none"],
                                                   rules=[Rule(action="pass")]), path)
    try:
        ctrl, relay = _udp_associate(port)
        cl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        cl.bind(("127.0.0.1", 0))
        cl.settimeout(5)
        yield r, f, ctrl, relay, cl, echo, socks.encode_udp("127.0.0.1", echo.getsockname()[1], b"")
    finally:
        r.callFromThread(r.stop)
        t.join(10)
        echo.close()


@pytest.mark.parametrize("path", ["twisted", "lean"])
@pytest.mark.parametrize("size", [5, 999, 4000])
def test_association_offloads_both_ways_and_removes_its_flows_when_it_ends(size, path):
    """A real association on a real reactor over lo (Twisted's and narsuite's): the first
    datagrams pass Python and the 4th of them, either way (the second reply), installs the
    flow; the rest are relayed by the kernel both ways
    (counted as offloaded, totals exact); closing the TCP connection removes the entries before
    the socket closes."""
    with _live_association(path) as (r, f, ctrl, relay, cl, echo, hdr):
        for i in range(5):
            ping, pong = b"%d" % i + os.urandom(size - 1), b"%d" % i + os.urandom(size - 1)
            cl.sendto(hdr + ping, relay)
            got, src = echo.recvfrom(65535)
            assert got == ping and src == relay
            echo.sendto(pong, src)
            assert cl.recvfrom(65535) == (hdr + pong, relay)
        off = f.udp_offload()
        assert off is not None and len(off.flows) == 1
        ctrl.close()
        for _ in range(100):
            if not off.flows:
                break
            threading.Event().wait(0.05)
        assert not off.flows and off.fwd.items() == [] and off.rev.items() == []
    c = f.counters
    assert c["udp_offload_flows"] == 1
    assert c["udp_datagrams_in"] == 5 and c["bytes_down"] == 5 * size
    # two round trips passed Python, the kernel relayed the other three (loopback
    # datagrams carry partial checksums: the client's are summed in the kernel, and the
    # echo's socket received them, so its kernel verified those sums)
    assert c["udp_offload_datagrams_in"] == 3 and c["udp_offload_datagrams_out"] == 3
    assert c["udp_datagrams_out"] == 5 and c["bytes_up"] == 5 * size


def test_a_flow_taken_out_by_a_route_change_is_installed_again_by_its_next_datagram():
    """What revalidate does to a flow (out of the kernel, its relay told): the next datagram goes
    through the relay's general path again, which installs the flow anew."""
    with _live_association("twisted") as (r, f, ctrl, relay, cl, echo, hdr):

        def round_trip(i: int) -> None:
            cl.sendto(hdr + b"ping%d" % i, relay)
            got, src = echo.recvfrom(100)
            assert got == b"ping%d" % i
            echo.sendto(b"pong%d" % i, src)
            assert cl.recvfrom(100)[0] == hdr + b"pong%d" % i

        round_trip(0)
        round_trip(1)  # its 4th datagram (the second reply) installs it
        off = f.udp_offload()
        assert off is not None and len(off.flows) == 1
        flow = next(iter(off.flows.values()))
        done = threading.Event()

        def take_out():
            off.remove([flow])
            flow.forget()
            done.set()

        r.callFromThread(take_out)
        assert done.wait(5) and not off.flows
        for i in range(2, 5):
            round_trip(i)
        assert len(off.flows) == 1 and f.counters["udp_offload_flows"] == 2
        ctrl.close()


# ------------------------------------------- only flows, at a bounded rate (over fakes)

def _relay(rate: float = 2000, max_flows: int = 16384):
    """An association of tests/test_socks's fake server with a real controller (real maps) whose
    route function counts its calls; no program is attached anywhere."""
    from tests.test_socks import make, open_conn

    f, reactor = make()
    p, tr = open_conn(f)
    p.dataReceived(b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    udp = reactor.udp[-1]
    udp.socket = object()  # "a real port" for _offload (sends still go to udp.sent)
    asked: list[str] = []
    eth = u.RouteInfo(socket.if_nametoindex("lo"), False, "10.0.0.1", 1500, 14)
    off = u.UdpOffload(f.counters, max_flows, reactor, route=lambda ip: asked.append(ip) or eth,
                       installs_per_second=rate)
    off._link = lambda ifindex, l2: None
    f._offload = off
    return f, reactor, udp.proto, udp, off, asked


CL = ("10.0.0.10", 5555)  # tests/test_socks's client


def test_a_one_shot_datagram_and_a_query_with_its_answer_never_reach_the_kernel():
    f, _, relay, udp, off, asked = _relay()
    try:
        relay.datagramReceived(socks.encode_udp("192.0.2.10", 53, b"query"), CL)
        relay.datagramReceived(b"answer", ("192.0.2.10", 53))
        relay.datagramReceived(socks.encode_udp("192.0.2.11", 53, b"no answer"), CL)
        assert udp.sent[-1] == (b"no answer", ("192.0.2.11", 53))
        assert udp.sent[-2] == (socks.encode_udp("192.0.2.10", 53, b"answer"), CL)
        assert asked == [] and off._routes == {} and off.fwd.items() == [] and off.rev.items() == []
        assert not off.flows and f.counters["udp_offload_flows"] == 0
    finally:
        off.stop()


def test_the_4th_datagram_either_way_installs_the_flow():
    f, _, relay, udp, off, asked = _relay()
    dest = ("192.0.2.10", 7)
    try:
        relay.datagramReceived(socks.encode_udp(*dest, b"1"), CL)
        relay.datagramReceived(b"2", dest)
        relay.datagramReceived(socks.encode_udp(*dest, b"3"), CL)
        assert not off.flows and asked == []
        relay.datagramReceived(b"4", dest)  # a reply counts
        assert len(off.flows) == 1 and len(off.fwd.items()) == 1 and len(off.rev.items()) == 1
        assert sorted(asked) == ["10.0.0.10", "192.0.2.10"] and f.counters["udp_offload_flows"] == 1
        # installed: the client's next datagrams take the relay's shortcut, nothing counted again
        relay.datagramReceived(socks.encode_udp(*dest, b"5"), CL)
        assert udp.sent[-1] == (b"5", dest) and not relay._counting and len(asked) == 2
        # four datagrams from the client alone install as well
        other = ("192.0.2.11", 8)
        for i in range(4):
            relay.datagramReceived(socks.encode_udp(*other, b"%d" % i), CL)
        assert len(off.flows) == 2 and f.counters["udp_datagrams_out"] == 3 + 4
    finally:
        off.stop()


def test_a_spray_of_10000_destinations_costs_no_route_lookup_and_bounded_state():
    """A client sending one datagram each to 10,000 addresses (a DHT, a scan): each costs _out a
    few dict operations -- no route lookup, no map update, the counting state at MAX_CACHE.
    Then 4 datagrams to each of 10,000: at most the install rate's burst go to the kernel (two
    route lookups each), the rest are deferred and counted; time per datagram is printed, the
    assertions are on the calls."""
    import time

    f, _, relay, udp, off, asked = _relay(rate=2000)
    dests = [(f"10.{i // 250}.{i % 250}.1", 9) for i in range(10_000)]
    try:
        t = time.perf_counter()
        for d in dests:
            relay.datagramReceived(socks.encode_udp(*d, b"x"), CL)
        one = (time.perf_counter() - t) / len(dests) * 1e6
        assert len(udp.sent) == 10_000 and asked == [] and off.fwd.items() == [] and not off.flows
        assert len(relay._counting) <= relay.MAX_CACHE and f.counters["udp_offload_deferred"] == 0
        assert f.counters["udp_peers_evicted"] == 10_000 - relay.MAX_CACHE
        t = time.perf_counter()
        for d in dests:  # the one-shot datagrams were long forgotten (LRU): 4 anew
            for _ in range(4):
                relay.datagramReceived(socks.encode_udp(*d, b"x"), CL)
        four = (time.perf_counter() - t) / len(dests) / 4 * 1e6
        print(f"spray: {one:.1f} us per one-shot datagram, {four:.1f} us per datagram of 4-datagram flows")
        # the bucket bounds what is installed; the rest is offered once and deferred
        assert f.counters["udp_offload_flows"] == 2000
        # idle flows were taken out of the kernel as the relay forgot their destinations
        held = {fl.fwd for fl in relay._offloaded.values() if fl is not None}
        assert set(off.flows) == held and len(off.fwd.items()) == len(held) < 2000
        assert len(asked) == 2000 + 1  # each destination once, the client once (cached)
        assert f.counters["udp_offload_deferred"] == 10_000 - 2000
        assert len(relay._counting) <= relay.MAX_CACHE and len(relay._offloaded) <= relay.MAX_CACHE
        assert len(relay.peers) == relay.MAX_CACHE
    finally:
        off.stop()


def test_over_the_install_rate_a_flow_waits_in_python_and_is_offered_again():
    f, reactor, relay, udp, off, asked = _relay(rate=1)
    a, b = ("192.0.2.10", 7), ("192.0.2.11", 7)
    try:
        for _ in range(4):
            relay.datagramReceived(socks.encode_udp(*a, b"x"), CL)
            relay.datagramReceived(socks.encode_udp(*b, b"y"), CL)
        assert len(off.flows) == 1 and f.counters["udp_offload_deferred"] == 1
        assert udp.sent[-1] == (b"y", b) and relay._counting == {b: 0}  # still relayed, counted anew
        reactor.advance(1)
        for _ in range(3):
            relay.datagramReceived(socks.encode_udp(*b, b"y"), CL)
        assert len(off.flows) == 1
        relay.datagramReceived(socks.encode_udp(*b, b"y"), CL)  # 4 more: offered again, installed
        assert len(off.flows) == 2 and f.counters["udp_offload_deferred"] == 1
        assert f.counters["udp_datagrams_out"] == 12
    finally:
        off.stop()


def test_udp_offload_rate_is_validated_and_reaches_the_controller():
    assert NarConfig().udp_offload_rate == 2000
    with pytest.raises(ConfigError, match="nar.udp_offload_rate"):
        schema.build(NarConfig, {"udp_offload_rate": 0}, "nar")
    f = SocksFactory(NarConfig(udp_offload_rate=7), reactor=Clock())
    off = f.udp_offload()
    try:
        assert off is not None and off.installs.rate == 7 and "udp_offload_deferred" in f.counters
    finally:
        f.stop_offload()


def test_deferred_installs_are_shown_by_narctl_nar_stats():
    from types import SimpleNamespace

    from narsuite.nar.role import _stats

    f, _, relay, _, off, _ = _relay(rate=1)
    try:
        for dest in (("192.0.2.10", 7), ("192.0.2.11", 7)):
            for _ in range(4):
                relay.datagramReceived(socks.encode_udp(*dest, b"x"), CL)
        svc = SimpleNamespace(factory=f, workers=None, handler=None, dataplane=None)
        rows = dict(_stats(SimpleNamespace(namespace={"nar": {"service": svc}})).rows)
        assert rows["socks.udp_offload_deferred"] == 1 and rows["socks.udp_offload_flows"] == 1
    finally:
        off.stop()


def test_the_relay_forgets_an_idle_offloaded_destination_only_after_taking_it_out_of_the_kernel():
    """Past MAX_CACHE destinations the relay forgets the least recently used one.  A destination
    whose flow is in the kernel is not seen by the relay: it asks the kernel's counters; a flow
    the kernel still relays stays (in the kernel and in the relay), an idle one is removed from
    the maps before the relay forgets it (no entry left that the relay no longer knows of)."""
    f, _, relay, udp, off, _ = _relay()
    relay.MAX_CACHE = 8
    busy, idle = ("192.0.2.10", 7), ("192.0.2.11", 7)
    try:
        for dest in (busy, idle):
            for _ in range(4):
                relay.datagramReceived(socks.encode_udp(*dest, b"x"), CL)
        assert len(off.flows) == 2
        fk = relay._offloaded[busy].fwd

        def kernel_relays_one():  # what the program does per datagram: the packet count moves
            v = list(u.FWD_VALUE.unpack(off.fwd.lookup(fk)))
            v[0] += 1
            off.fwd.update(fk, u.FWD_VALUE.pack(*v))

        for i in range(30):
            kernel_relays_one()
            relay.datagramReceived(socks.encode_udp(f"198.51.100.{i}", 53, b"q"), CL)
        assert busy in relay.peers and idle not in relay.peers and len(relay.peers) == 8
        assert list(off.flows) == [fk] and [k for k, _ in off.fwd.items()] == [fk]
        assert len(off.rev.items()) == 1 and idle not in relay._offloaded and idle not in relay.decisions
        assert f.counters["udp_peers_evicted"] == 2 + 30 - 8
        assert 0 < f.counters["udp_offload_datagrams_out"] < 30  # folded when the relay asked
        off.sweep()
        assert f.counters["udp_offload_datagrams_out"] == 30  # and nothing counted twice
        n = len(udp.sent)
        relay.datagramReceived(b"late", idle)
        assert len(udp.sent) == n and f.counters["udp_dropped"] == 1
    finally:
        off.stop()


class Turns(Clock):
    """A Clock whose :meth:`turn` runs only the calls due when it starts, as one reactor
    iteration does (``Clock.advance`` also runs the ``callLater(0)`` calls they make)."""

    def turn(self) -> None:
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        for c in due:
            self.calls.remove(c)
            c.called = True
            c.func(*c.args, **c.kw)


def _revalidating(n: int):
    """A controller with ``n`` installed flows (fake routes from ``table``, LOCAL otherwise),
    a reactor whose turns the test runs, 100 flows per turn."""
    table: dict[str, u.RouteInfo] = {}
    asked: list[str] = []
    off, _, clock, _ = _controller(max_flows=2048)
    off.route = lambda ip: asked.append(ip) or table.get(ip, LOCAL)
    off._link = lambda ifindex, l2: None
    off.reactor = clock = Turns()
    off.revalidate_batch, off.revalidate_seconds = 100, 60.0  # the batch bounds each turn here
    client = ("127.0.0.1", 1000)
    dests = [(f"127.1.{i // 250}.{i % 250 + 1}", 53) for i in range(n)]
    forgot: list[int] = []
    flows = [off.install(Owner(), client, ("127.0.0.1", 2000), d, forget=lambda i=i: forgot.append(i))
             for i, d in enumerate(dests)]
    assert all(flows) and len(off.flows) == n
    asked.clear()
    return off, clock, table, asked, dests, flows, forgot


MOVED = u.RouteInfo(1, True, "127.0.0.9", 65536, 14)


def test_revalidation_is_spread_over_reactor_turns_and_a_change_during_a_pass_is_caught():
    """After a route change the installed flows are checked a bounded batch per reactor turn (not
    all in one: at 65,536 flows that held the reactor about a second), each address asked of the
    kernel once per pass.  A change reported during a pass: the flows not checked yet are
    checked against fresh routes, those already checked get a second pass -- a flow whose route
    moved after it was checked (and one not checked yet) is still taken out, its relay told."""
    off, clock, table, asked, dests, flows, forgot = _revalidating(1000)
    try:
        off._changed()  # rtnetlink said something changed: nothing did for these flows
        clock.turn()
        assert len(asked) == 1 + 100 and len(clock.getDelayedCalls()) == 1  # this turn's batch; the next
        for _ in range(3):
            clock.turn()
        assert len(asked) == 1 + 400 and len(off.flows) == 1000
        # mid-pass: the route of a flow already checked moves, and of one not checked yet
        table[dests[10][0]] = table[dests[700][0]] = MOVED
        off._changed()
        asked.clear()
        turns = 0
        while off._pass:
            clock.turn()
            turns += 1
            if turns == 6:  # the rest of the first pass, with fresh routes
                assert forgot == [700] and sorted(set(asked)) == sorted({"127.0.0.1", *(d[0] for d in dests[400:])})
        assert turns == 6 + 10  # then a second pass over the 999 left
        assert sorted(forgot) == [10, 700] and len(off.flows) == 998
        assert flows[10].fwd not in off.flows and flows[700].fwd not in off.flows
        assert len(off.fwd.items()) == len(off.rev.items()) == 998
        # each pass asked each address once: the second one every address but 700's
        assert len(asked) == (1 + 600) + (1 + 999)
    finally:
        off.stop()


def test_routes_changing_all_the_time_do_not_starve_the_flows_at_the_end_of_a_pass():
    """A flapping uplink or a router's churn: rtnetlink reports a change every reactor turn.
    The pass goes on from where it is (restarting from the first flow would never reach the
    last ones), so a flow at the end whose route moved is taken out within two passes."""
    off, clock, table, asked, dests, flows, forgot = _revalidating(1000)
    try:
        table[dests[999][0]] = MOVED
        off._changed()
        turns = 0
        while not forgot and turns < 20:
            clock.turn()
            turns += 1
            off._changed()  # another change, every turn
        assert forgot == [999] and turns <= 10, turns
        assert flows[999].fwd not in off.flows and len(off.flows) == 999
    finally:
        off.stop()


def test_rtm_dellink_names_the_deleted_interface(routed_ns):
    """The kernel's own RTM_DELLINK (a veth deleted in a lab namespace) is found among the other
    messages of the datagrams it sends; nothing else reads as a deletion."""
    ns, n = routed_ns

    def netlink():
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
        s.bind((0, u.RTMGRP_LINK | u.RTMGRP_IPV4_IFADDR | u.RTMGRP_IPV4_ROUTE))
        return s

    s = ns(netlink)
    try:
        eth1 = ns(socket.if_nametoindex, "eth1")
        got: list[tuple[list[int], bool]] = []
        watch = u._RouteWatch(s, lambda deleted, lost: got.append((deleted, lost)))
        n.ip("addr", "add", "10.9.0.1/24", "dev", "eth0")  # a change, not a deletion
        watch.doRead()
        assert got == [([], False)]
        n.ip("link", "del", "eth1")
        watch.doRead()
        assert got[1] == ([eth1], False)
    finally:
        s.close()
    assert u.deleted_links(b"") == [] and u.deleted_links(b"\x08\x00\x00\x00\x11\x00") == []


def test_a_deleted_interface_drops_its_link_and_takes_out_the_flows_through_it():
    """link_gone(ifindex): the link on it is closed and leaves the table (a new interface gets a
    fresh one), the flows arriving or leaving through it leave the kernel at once, their relays
    told; flows elsewhere stay."""
    a = u.RouteInfo(7, False, "10.0.0.1", 1500, 14)
    b = u.RouteInfo(8, False, "10.1.0.1", 1500, 14)
    off, c, _, _ = _controller(routes={"10.0.0.2": a, "10.1.0.5": b, "10.0.0.3": a, "10.0.0.4": a})

    class Link:
        closed = False

        def close(self):
            self.closed = True

    made: dict[int, Link] = {}
    off._link = lambda ifindex, l2: off._links.setdefault(ifindex, made.setdefault(ifindex, Link()))
    forgot: list[str] = []
    try:
        via_b = off.install(Owner(), ("10.0.0.2", 1), ("10.0.0.1", 2), ("10.1.0.5", 3), lambda: forgot.append("b"))
        only_a = off.install(Owner(), ("10.0.0.2", 1), ("10.0.0.1", 2), ("10.0.0.3", 3), lambda: forgot.append("a"))
        assert via_b and only_a and sorted(off._links) == [7, 8]
        assert off.state() == {"installed": 2, "links": 2, "link.7": 1, "link.8": 1}
        off._changed([8])
        assert made[8].closed and not made[7].closed and sorted(off._links) == [7]
        assert forgot == ["b"] and list(off.flows) == [only_a.fwd] and len(off.fwd.items()) == 1
        assert c["udp_offload_links_gone"] == 1 and off.state() == {"installed": 1, "links": 1, "link.7": 1}
        off._changed([8])  # reported twice: nothing more
        assert c["udp_offload_links_gone"] == 1 and forgot == ["b"]
    finally:
        off.stop()
