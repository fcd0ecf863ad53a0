"""NAR data plane: delivery decisions with fake ports (no root), and the lab test
X -- N -- Y with the data plane running in N."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import attrs
import pytest
from scapy.layers.inet import GRE, ICMP, IP, UDP
from scapy.layers.ipsec import AH, ESP
from scapy.packet import Raw
from twisted.internet import task

from narsuite.nar.config import NarOptions
from narsuite.nar.dataplane import NarDataPlane, check_outbound, deliver_packet, demux_inbound
from narsuite.nar.records import KINDS, NarMapping, NarSession
from narsuite.store import MemoryBackend, Store

NB, NA, XA, YB, CN = "192.0.2.1", "10.0.0.1", "10.0.0.10", "192.0.2.10", "198.51.100.7"
A = socket.inet_aton


def mapping(n, kind, proto, session="s1", **kw):
    return NarMapping(id=f"{session}/{n}", session=session, kind=kind, proto=proto, client=XA,
                      lent=NB, remote=YB, **kw)


MAPPINGS = [
    mapping(1, "ipsec", 50, spi=0x1001),
    mapping(2, "ipsec", 50, spi=0x1002, encap="gre"),
    mapping(3, "ipsec", 50, session="s2", spi=0x1003, translated=True),
    mapping(4, "tunnel", 4, inner="172.16.0.5"),
    mapping(5, "tunnel", 47, session="s2", inner="172.16.0.6", translated=True),
    mapping(6, "icmp", 1, icmp_id=0x4242),
    mapping(7, "icmp", 1, session="s2", icmp_id=0x4343, translated=True),
    mapping(8, "ipsec", 51, spi=0x1004),
]
SESSIONS = [NarSession(id="s1", client=XA, remote=YB, lent=NB),
            NarSession(id="s2", client=XA, remote=YB, lent=NB, translated=True)]

# what Y sends, and which mapping (index in MAPPINGS, or None: dropped) it must match
INBOUND = {
    "esp-e2e": (IP(src=YB, dst=NB) / ESP(spi=0x1001, seq=1, data=b"e2e-ipip"), 0),
    "esp-gre": (IP(src=YB, dst=NB) / ESP(spi=0x1002, seq=1, data=b"e2e-gre"), 1),
    "esp-translated": (IP(src=YB, dst=NB) / ESP(spi=0x1003, seq=1, data=b"translated"), 2),
    "ipip": (IP(src=YB, dst=NB) / IP(src=CN, dst="172.16.0.5") / UDP(sport=1, dport=2)
             / Raw(b"mip"), 3),
    "gre": (IP(src=YB, dst=NB) / GRE(proto=0x0800) / IP(src=CN, dst="172.16.0.6")
            / UDP(sport=3, dport=4) / Raw(b"grein"), 4),
    "icmp-e2e": (IP(src=YB, dst=NB) / ICMP(type=0, id=0x4242, seq=1) / Raw(b"ping-e2e"), 5),
    "icmp-translated": (IP(src=YB, dst=NB) / ICMP(type=0, id=0x4343, seq=1) / Raw(b"pt"), 6),
    "ah": (IP(src=YB, dst=NB) / AH(spi=0x1004, seq=1, icv=b"\0" * 12) / Raw(b"ah"), 7),
    "esp-unmapped": (IP(src=YB, dst=NB) / ESP(spi=0x9999, seq=1, data=b"nobody"), None),
    "icmp-unmapped": (IP(src=YB, dst=NB) / ICMP(type=0, id=0x5555) / Raw(b"n"), None),
    "ipip-unmapped": (IP(src=YB, dst=NB) / IP(src=CN, dst="172.16.0.99") / Raw(b"n"), None),
    "gre-as-ipip": (IP(src=YB, dst=NB) / IP(src=CN, dst="172.16.0.6") / Raw(b"n"), None),
    # an error about a packet N did not send from Nb (quoted source elsewhere): not ours
    "icmp-unreach": (IP(src=YB, dst=NB) / ICMP(type=3, code=1) / IP(src="192.0.2.77", dst=YB)
                     / UDP(sport=1, dport=2), None),
    "icmp-timestamp": (IP(src=YB, dst=NB) / ICMP(type=13) / Raw(b"\0" * 12), None),
    "other-yb": (IP(src="192.0.2.11", dst=NB) / ICMP(type=0, id=0x4242) / Raw(b"n"), None),
}


def make_store():
    clock = task.Clock()
    store = Store(MemoryBackend(), clock)
    for k in KINDS:
        store.register(k)
    for s in SESSIONS:
        store.put(s, owner=s.id)
    for m in MAPPINGS:
        store.put(m, owner=m.session)
    return store


def lookup_in(store):
    return lambda ix, key: store.lookup("nar.mapping", ix, key)


@pytest.mark.parametrize("name", sorted(INBOUND))
def test_demux_inbound(name):
    store = make_store()
    pkt, want = INBOUND[name]
    m, reason = demux_inbound(bytes(pkt), NB, lookup_in(store))
    if want is None:
        assert m is None and reason
    else:
        assert m == MAPPINGS[want] and reason == ""


def test_demux_checks_destination_and_garbage():
    store = make_store()
    pkt = bytes(IP(src=YB, dst="192.0.2.99") / ESP(spi=0x1001, seq=1))
    assert demux_inbound(pkt, NB, lookup_in(store)) == (None, "not-lent")
    assert demux_inbound(b"\x45\x00", NB, lookup_in(store)) == (None, "malformed")
    assert demux_inbound(bytes(IP(src=YB, dst=NB, proto=50)), NB, lookup_in(store)) == (
        None, "malformed")
    routed = bytes(IP(src=YB, dst=NB) / GRE(routing_present=1, proto=0x0800) / IP(dst="172.16.0.6"))
    assert demux_inbound(routed, NB, lookup_in(store)) == (None, "gre-unsupported")


def test_deliver_end_to_end_and_translated():
    pkt = bytes(INBOUND["esp-e2e"][0])
    out = IP(deliver_packet(pkt, MAPPINGS[0], A(NA), A(XA)))
    assert (out.src, out.dst, out.proto) == (NA, XA, 4) and bytes(out.payload) == pkt
    out = IP(deliver_packet(pkt, MAPPINGS[1], A(NA), A(XA)))
    assert (out.src, out.dst, out.proto) == (NA, XA, 47)
    assert out[GRE].proto == 0x0800 and bytes(out[GRE].payload) == pkt
    out = IP(deliver_packet(pkt, MAPPINGS[2], A(NA), A(XA)))
    assert (out.src, out.dst, out.proto) == (YB, XA, 50) and out[ESP].spi == 0x1001
    again = out.copy()
    del again.chksum
    assert IP(bytes(again)).chksum == out.chksum
    gre = bytes(INBOUND["gre"][0])
    out = IP(deliver_packet(gre, MAPPINGS[4], A(NA), A(XA)))  # "Na->Xa | CN->Xb"
    assert (out.src, out.dst, out.proto) == (NA, XA, 47)
    assert bytes(out[GRE].payload) == bytes(IP(gre)[GRE].payload)


def _tunnel(inner, src=XA, dst=NA):
    return bytes(IP(src=src, dst=dst) / inner)


def test_check_outbound():
    store = make_store()
    ms = store.lookup_all("nar.mapping", "client", XA)
    ok = [IP(src=NB, dst=YB) / ESP(spi=0xABCD, seq=1),
          IP(src=NB, dst=YB) / AH(spi=0xABCD, seq=1, icv=b"\0" * 12),
          IP(src=NB, dst=YB) / ICMP(type=8, id=0x4242),
          IP(src=NB, dst=YB) / IP(src="172.16.0.5", dst=CN) / Raw(b"x"),
          IP(src=NB, dst=YB) / GRE(proto=0x0800) / IP(src="172.16.0.6", dst=CN)]
    for inner in ok:
        got, reason = check_outbound(_tunnel(inner), NB, ms)
        assert (got, reason) == (bytes(inner), ""), inner.summary()
    # GRE outer encapsulation from X is accepted too
    got, _ = check_outbound(bytes(IP(src=XA, dst=NA) / GRE(proto=0x0800) / ok[0]), NB, ms)
    assert got == bytes(ok[0])
    bad = {
        "spoofed-source": IP(src=XA, dst=YB) / ESP(spi=1),
        "spoofed": IP(src=NB, dst="192.0.2.11") / ESP(spi=1),  # not the session's Yb
    }
    for reason, inner in bad.items():
        assert check_outbound(_tunnel(inner), NB, ms) == (None, reason)
    for inner in [IP(src=NB, dst=YB) / UDP(sport=500, dport=500),
                  IP(src=NB, dst=YB) / ICMP(type=8, id=0x7777),
                  IP(src=NB, dst=YB) / IP(src="172.16.0.99", dst=CN),  # not the mapped Xb
                  IP(src=NB, dst=YB) / GRE(proto=0x0800) / IP(src="172.16.0.5", dst=CN)]:
        assert check_outbound(_tunnel(inner), NB, ms) == (None, "spoofed"), inner.summary()
    assert check_outbound(_tunnel(ok[0]), NB, []) == (None, "no-client")
    assert check_outbound(b"junk" * 10, NB, ms) == (None, "malformed")


@attrs.define
class FakePort:
    proto: int
    sink: object
    bind_address: str | None = None
    reactor: object = None
    sent: list = attrs.field(factory=list)
    started: bool = False

    def start(self):
        self.started = True

    def stop(self):
        self.started = False

    def send_packet(self, packet):
        self.sent.append(packet)
        return True


def make_plane(store):
    ports = {}

    def factory(proto, sink, bind_address=None, reactor=None):
        ports[proto] = FakePort(proto, sink, bind_address, reactor)
        return ports[proto]

    dp = NarDataPlane(NarOptions(lent_address=NB), store, None, private_address=NA,
                      port_factory=factory)
    dp.start()
    return dp, ports


def test_plane_with_fake_ports():
    store = make_store()
    dp, ports = make_plane(store)
    assert {p: ports[p].bind_address for p in ports} == {1: NB, 50: NB, 51: NB, 4: None, 47: None}
    sent = ports[1].sent
    for name, (pkt, want) in sorted(INBOUND.items()):
        before = len(sent)
        dp.packetReceived(bytes(pkt), pkt.src)
        assert len(sent) == before + (want is not None), name
    assert dp.counters["in_end_to_end"] == 5 and dp.counters["in_translated"] == 3
    assert dp.counters["drop_no_mapping"] == 4  # esp, icmp, ipip unmapped + other Yb
    assert dp.counters["drop_proto_mismatch"] == 1 and dp.counters["drop_icmp_other"] == 1
    assert dp.counters["drop_icmp_error_foreign"] == 1
    # outbound: a matching packet goes out, a spoofed one does not
    good = IP(src=NB, dst=YB) / ESP(spi=0xABCD, seq=1)
    dp.packetReceived(_tunnel(good), XA)
    assert sent[-1] == bytes(good)
    n = len(sent)
    dp.packetReceived(_tunnel(IP(src=NB, dst=YB) / UDP(sport=1, dport=2)), XA)
    dp.packetReceived(_tunnel(good, src="10.0.0.66"), "10.0.0.66")
    dp.packetReceived(_tunnel(good, dst="10.0.0.2"), XA)  # not Na
    assert len(sent) == n
    assert (dp.counters["drop_spoofed"], dp.counters["drop_no_client"],
            dp.counters["drop_not_for_us"]) == (1, 1, 1)
    # mappings of a closed session vanish: its packets are dropped and counted
    store.drop_owner("s1")
    dp.packetReceived(bytes(INBOUND["esp-e2e"][0]), YB)
    assert dp.counters["drop_no_mapping"] == 5
    dp.packetReceived(_tunnel(IP(src=NB, dst=YB) / AH(spi=9, icv=b"\0" * 12)), XA)
    assert dp.counters["drop_spoofed"] == 2  # the AH mapping went with s1
    dp.stop()
    assert not any(p.started for p in ports.values())


# ------------------------------------------------------------------- TCP/UDP mappings

from scapy.layers.inet import TCP  # noqa: E402

from narsuite.nar import nft  # noqa: E402
from narsuite.nar.dataplane import demux_tun, tcpudp_installer  # noqa: E402

E2E = nft.E2E_ADDRESS
TCPUDP = [
    mapping(21, "tcp", 6, port=20001, remote_port=5555),
    mapping(22, "tcp", 6, port=20002),
    mapping(23, "udp", 17, port=20003),
    mapping(24, "udp", 17, session="s2", port=20004, translated=True),
]


def tcpudp_store():
    store = make_store()
    for m in TCPUDP:
        store.put(m, owner=m.session)
    return store


@pytest.mark.parametrize("pkt, want", [
    (IP(src=YB, dst=E2E) / TCP(sport=5555, dport=20001, flags="S"), 0),
    (IP(src=YB, dst=E2E) / TCP(sport=5556, dport=20001, flags="S"), None),  # other Y port
    (IP(src=YB, dst=E2E) / TCP(sport=7, dport=20002, flags="S"), 1),  # any Y port
    (IP(src="192.0.2.11", dst=E2E) / TCP(sport=7, dport=20002), None),  # other Y
    (IP(src="198.51.100.9", dst=E2E) / UDP(sport=9, dport=20003), 2),  # UDP: source ignored
    (IP(src=YB, dst=E2E) / UDP(sport=9, dport=20009), None),
])
def test_demux_tun(pkt, want):
    m, reason = demux_tun(bytes(pkt), NB, A(E2E), lookup_in(tcpudp_store()))
    assert (m, reason) == ((TCPUDP[want], "") if want is not None else (None, "no-mapping"))


def test_demux_tun_drops_what_is_not_ours():
    look = lookup_in(tcpudp_store())
    assert demux_tun(bytes(IP(src=YB, dst=NB) / UDP(dport=20003)), NB, A(E2E), look) == (
        None, "not-lent")
    assert demux_tun(bytes(IP(src=YB, dst=E2E) / ICMP(type=13)), NB, A(E2E), look) == (
        None, "tun-other")
    assert demux_tun(bytes(IP(src=YB, dst=E2E) / ICMP(id=77)), NB, A(E2E), look) == (
        None, "no-mapping")
    frag = bytes(IP(src=YB, dst=E2E, proto=17, frag=100) / Raw(b"x" * 8))
    assert demux_tun(frag, NB, A(E2E), look) == (None, "tun-other")
    assert demux_tun(b"\x45", NB, A(E2E), look) == (None, "malformed")


def test_check_outbound_tcp_udp():
    ms = tcpudp_store().lookup_all("nar.mapping", "client", XA)
    for inner in [IP(src=NB, dst=YB) / TCP(sport=20001, dport=5555, flags="SA"),
                  IP(src=NB, dst=YB) / TCP(sport=20002, dport=40000, flags="A"),
                  IP(src=NB, dst=YB) / UDP(sport=20003, dport=53)]:
        assert check_outbound(_tunnel(inner), NB, ms) == (bytes(inner), ""), inner.summary()
    for inner in [IP(src=NB, dst=YB) / TCP(sport=20001, dport=5556),  # not the mapped Y port
                  IP(src=NB, dst=YB) / TCP(sport=20003, dport=53),  # P is a UDP mapping
                  IP(src=NB, dst=YB) / UDP(sport=20009, dport=53),
                  IP(src=NB, dst="192.0.2.11") / UDP(sport=20003, dport=53)]:
        assert check_outbound(_tunnel(inner), NB, ms) == (None, "spoofed"), inner.summary()


@attrs.define
class FakeNft:
    scripts: list = attrs.field(factory=list)

    def run_sync(self, script):
        self.scripts.append(script)

    def run(self, script):
        from twisted.internet import defer

        self.scripts.append(script)
        return defer.succeed(None)

    def conntrack(self, argv):
        from twisted.internet import defer

        self.scripts.append(argv)
        return defer.succeed(None)


@attrs.define
class FakeTun:
    sink: object
    ifname: str = "narnat9"
    written: list = attrs.field(factory=list)
    started: bool = False

    def start(self):
        self.started = True

    def stop(self):
        self.started = False

    def write(self, packet):
        self.written.append(packet)
        return True


def test_plane_installs_tcp_udp_mappings_and_follows_the_store():
    store = make_store()
    ports = {}

    def factory(proto, sink, bind_address=None, reactor=None):
        ports[proto] = FakePort(proto, sink, bind_address, reactor)
        return ports[proto]

    runner, tuns = FakeNft(), []
    res = nft.PortReservations(NB, lambda proto, port: object())
    dp = NarDataPlane(NarOptions(lent_address=NB), store, None, private_address=NA,
                      port_factory=factory, tcpudp=True, nft_runner=runner,
                      tun_factory=lambda sink: tuns.append(FakeTun(sink)) or tuns[-1],
                      reservations=res)
    dp.start()
    tun = tuns[0]
    assert dp.tcpudp_ready and tun.started and tcpudp_installer(store) is dp
    assert runner.scripts == [nft.table_script("narnat9")]
    for m in TCPUDP:
        assert dp.reserve_port(m.proto, m.port)
        store.put(m, owner=m.session)
        result = []
        dp.install_mapping(m).addBoth(result.append)
        assert result == [None]
    assert runner.scripts[1] == nft.elements_script("add", nft.mapping_elements(TCPUDP[0]))
    assert not dp.reserve_port(6, 20001)  # held for TCPUDP[0]
    # Y's SYN, DNATed into the TUN: Nb is back and it goes to Xa in IP-in-IP
    syn = IP(src=YB, dst=E2E) / TCP(sport=5555, dport=20001, flags="S")
    tun.sink(bytes(syn))
    out = IP(ports[1].sent[-1])
    assert (out.src, out.dst, out.proto) == (NA, XA, 4)
    inner = IP(bytes(out.payload))
    assert (inner.src, inner.dst, inner[TCP].dport) == (YB, NB, 20001)
    del inner.chksum, inner[TCP].chksum
    assert bytes(IP(bytes(inner))) == bytes(out.payload)  # both checksums right
    # X's SYN-ACK from Nb:P, tunnelled to Na: into the TUN with source E2E
    synack = IP(src=NB, dst=YB) / TCP(sport=20001, dport=5555, flags="SA")
    dp.packetReceived(_tunnel(synack), XA)
    w = IP(tun.written[-1])
    assert (w.src, w.dst, w[TCP].sport) == (E2E, YB, 20001)
    assert dp.counters["in_tcp"] == 1 and dp.counters["out_tcpudp"] == 1
    # fragmentation needed about X's segment (Nb:P -> Y), as conntrack hands it to the TUN:
    # Nb replaced by the TUN address outside and in the quote.  X gets it as Y's side sent it.
    quoted = bytes(IP(src=E2E, dst=YB, flags="DF") / TCP(sport=20001, dport=5555, flags="A"))
    err = IP(src="192.0.2.254", dst=E2E) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted
    tun.sink(bytes(err))
    out = IP(ports[1].sent[-1])
    assert (out.src, out.dst, out.proto) == (NA, XA, 4)
    got = IP(bytes(out.payload))
    assert (got.dst, got[ICMP].type, got[ICMP].payload.src, got[ICMP].payload.dst) == (NB, 3, NB, YB)
    want = IP(src="192.0.2.254", dst=NB) / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(
        IP(src=NB, dst=YB, flags="DF") / TCP(sport=20001, dport=5555, flags="A"))
    assert bytes(got) == bytes(want)  # checksums (outer, ICMP, quoted IP and TCP) right
    assert dp.counters["in_icmp_error"] == 1
    # the session goes: its elements are deleted, its ports released
    n = len(runner.scripts)
    store.drop_owner("s1")
    deleted = [x for x in runner.scripts[n:] if isinstance(x, str)]
    assert sorted(deleted) == sorted(nft.elements_script("delete", nft.mapping_elements(m))
                                     for m in TCPUDP[:3])
    flushed = [x for x in runner.scripts[n:] if isinstance(x, list)]  # their flows too
    assert ["-D", "-p", "tcp", "--orig-dst", NB, "--orig-port-dst", "20001"] in flushed
    assert ["-D", "-p", "udp", "--reply-dst", NB, "--reply-port-dst", "20003"] in flushed
    assert len(flushed) == 6
    assert res.held() == {(17, 20004)}
    tun.sink(bytes(syn))
    assert dp.counters["drop_no_mapping"] == 1
    dp.stop()
    assert runner.scripts[-1] == nft.delete_table_script() and not tun.started
    assert res.held() == set() and tcpudp_installer(store) is None


def test_plane_without_nft_keeps_the_rest():
    class NoNft(FakeNft):
        def run_sync(self, script):
            raise nft.NftError("nft not found")

    store = make_store()
    dp = NarDataPlane(NarOptions(lent_address=NB), store, None, private_address=NA,
                      port_factory=lambda proto, sink, **kw: FakePort(proto, sink),
                      tcpudp=True, nft_runner=NoNft(), tun_factory=FakeTun)
    dp.start()
    assert not dp.tcpudp_ready and dp.tun is None and tcpudp_installer(store) is None
    assert dp.counters["tcpudp_start_failed"] == 1 and not dp.reserve_port(6, 20001)
    dp.stop()


def test_fake_ports_never_touch_the_hosts_nftables():
    store = make_store()
    dp = NarDataPlane(NarOptions(lent_address=NB), store, None,
                      port_factory=lambda proto, sink, **kw: FakePort(proto, sink))
    assert dp.tcpudp is False


# ------------------------------------------------------------------------------------ lab

N_SCRIPT = """
import json, sys
from twisted.internet import reactor, stdio
from twisted.protocols.basic import LineReceiver
from narsuite.nar.config import NarOptions
from narsuite.nar.dataplane import NarDataPlane
from narsuite.nar.records import KINDS, NarMapping, NarSession
from narsuite.store import MemoryBackend, Store

spec = json.loads(sys.argv[1])
store = Store(MemoryBackend(), reactor)
for k in KINDS:
    store.register(k)
for s in spec["sessions"]:
    store.put(NarSession(**s), owner=s["id"])
for m in spec["mappings"]:
    store.put(NarMapping(**m), owner=m["session"])
dp = NarDataPlane(NarOptions(lent_address=spec["nb"]), store, reactor,
                  private_address=spec["na"])
dp.start()

class Control(LineReceiver):
    delimiter = b"\\n"
    def connectionMade(self):
        self.sendLine(b"ready")
    def lineReceived(self, line):
        words = line.decode().split()
        if words[0] == "drop":
            store.drop_owner(words[1])
        self.sendLine(json.dumps(dp.counters_dict()).encode())
    def connectionLost(self, reason):
        dp.stop()
        reactor.stop()

stdio.StandardIO(Control())
reactor.run()
"""

CAPTURE = """
import json, select, socket, sys
socks = [socket.socket(socket.AF_INET, socket.SOCK_RAW, int(p)) for p in sys.argv[1].split(",")]
print("ready", flush=True)
out = []
while True:
    r, _, _ = select.select(socks + [sys.stdin], [], [], 5)
    if not r:
        continue
    if sys.stdin in r:
        break
    for s in r:
        if s is not sys.stdin:
            out.append([s.proto, s.recv(65535).hex()])
print(json.dumps(out), flush=True)
"""

SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for h in sys.argv[1:]:
    pkt = bytes.fromhex(h)
    s.sendto(pkt, (socket.inet_ntoa(pkt[16:20]), 0))
    time.sleep(0.02)
"""

SEND_TUNNEL = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)  # kernel builds the outer header
for h in sys.argv[2:]:
    s.sendto(bytes.fromhex(h), (sys.argv[1], 0))
    time.sleep(0.02)
"""


def _readline(proc, what, timeout=15):
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError(f"{what}: no output within {timeout}s")
    line = proc.stdout.readline()
    assert line, f"{what} exited: {proc.poll()}"
    return line.strip()


def _capture(host, protos):
    proc = host.popen([sys.executable, "-c", CAPTURE, protos], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)
    assert _readline(proc, "capture") == "ready"
    return proc


def _finish(host, proc):
    out, _ = proc.communicate("stop\n", timeout=15)
    return [(p, bytes.fromhex(h)) for p, h in json.loads(out)]


def _checksum_ok(pkt):
    again = pkt.copy()
    del again.chksum
    return IP(bytes(again)).chksum == pkt.chksum


def test_lab_data_plane(nar_topo, tmp_path):
    t = nar_topo
    assert (t.x_addr, t.n_private, t.n_public, t.y_addr) == (XA, NA, NB, YB)
    spec = {"nb": NB, "na": NA, "sessions": [attrs.asdict(s) for s in SESSIONS],
            "mappings": [attrs.asdict(m) for m in MAPPINGS]}
    n = t.n.popen([sys.executable, "-c", N_SCRIPT, json.dumps(spec)], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, text=True)
    try:
        assert _readline(n, "data plane") == "ready"
        cap_x = _capture(t.x, "1,4,47,50")
        cap_y = _capture(t.y, "50,51")
        sent = {name: bytes(pkt) for name, (pkt, _) in INBOUND.items()}
        t.y.run([sys.executable, "-c", SEND, *[p.hex() for p in sent.values()]])
        # X -> N: one packet its mappings allow, and spoofing attempts
        good = bytes(IP(src=NB, dst=YB, id=7) / ESP(spi=0xABCD, seq=9, data=b"from-x"))
        spoofed = [bytes(IP(src=NB, dst=YB) / UDP(sport=1, dport=2) / Raw(b"spoof")),
                   bytes(IP(src=XA, dst=YB) / ESP(spi=0xABCD, seq=10, data=b"spoof")),
                   bytes(IP(src=NB, dst="192.0.2.11") / ESP(spi=1, data=b"spoof"))]
        t.x.run([sys.executable, "-c", SEND_TUNNEL, NA, good.hex(), *[s.hex() for s in spoofed]])
        time.sleep(0.5)
        got_x = _finish(t.x, cap_x)
        got_y = _finish(t.y, cap_y)
        n.stdin.write("stats\n")
        n.stdin.flush()
        stats = json.loads(_readline(n, "stats"))
        # close session s1: its mappings vanish, its packets are dropped from now on
        n.stdin.write("drop s1\n")
        n.stdin.flush()
        _readline(n, "drop")
        t.y.run([sys.executable, "-c", SEND, sent["esp-e2e"].hex()])
        time.sleep(0.3)
        n.stdin.write("stats\n")
        n.stdin.flush()
        after = json.loads(_readline(n, "stats"))
    finally:
        n.stdin.close()
        try:
            n.wait(timeout=10)
        except subprocess.TimeoutExpired:
            t.n.stop(n)

    # ---- what X received
    by = {}
    for proto, raw in got_x:
        pkt = IP(raw)
        assert _checksum_ok(pkt), pkt.summary()
        by.setdefault(proto, []).append(pkt)
    ipip = by.get(4, [])
    assert all((p.src, p.dst) == (NA, XA) for p in ipip)
    # end-to-end IP-in-IP: the original packet, unmodified, inside Na->Xa
    inner = {bytes(p.payload) for p in ipip}
    for name in ("esp-e2e", "ipip", "icmp-e2e", "ah"):
        assert sent[name] in inner, name
    assert len(ipip) == 4
    gre = by.get(47, [])
    assert len(gre) == 2 and all((p.src, p.dst) == (NA, XA) for p in gre)
    gre_inner = {bytes(p[GRE].payload) for p in gre}
    assert sent["esp-gre"] in gre_inner  # end-to-end GRE: Na->Xa | Yb->Nb | ESP
    assert bytes(IP(sent["gre"])[GRE].payload) in gre_inner  # translated: Na->Xa | CN->Xb
    esp = [p for p in by.get(50, [])]
    assert len(esp) == 1
    assert (esp[0].src, esp[0].dst, esp[0][ESP].spi, esp[0][ESP].data) == (
        YB, XA, 0x1003, b"translated")
    icmp = [p for p in by.get(1, []) if p.haslayer(ICMP) and p[ICMP].id == 0x4343]
    assert len(icmp) == 1 and (icmp[0].src, icmp[0].dst) == (YB, XA)
    assert not any(p[ICMP].id in (0x4242, 0x5555) for p in by.get(1, []) if p.haslayer(ICMP))

    # ---- what Y received: only the packet X's mappings allow
    assert [(p, IP(raw).src, bytes(IP(raw).payload)) for p, raw in got_y] == [
        (50, NB, bytes(IP(good).payload))]

    # ---- what N counted
    assert stats["in_end_to_end"] == 5 and stats["in_translated"] == 3, stats
    assert stats["drop_no_mapping"] == 4, stats  # unmapped SPI, ICMP id, inner Xb, other Yb
    assert stats["drop_proto_mismatch"] == 1 and stats["drop_icmp_other"] == 1, stats
    assert stats["out_forwarded"] == 1, stats
    assert stats["drop_spoofed"] == 2 and stats["drop_spoofed_source"] == 1, stats
    assert stats.get("tx_errors", 0) == 0, stats
    assert after["drop_no_mapping"] == 5 and after["in_end_to_end"] == 5, after


# --------------------------------------------------------- ICMP errors (issue 12)

from narsuite.nar.dataplane import deliver_icmp_error, demux_icmp_error  # noqa: E402


def _err(quoted, src="198.51.100.1", dst=NB, type=3, code=4):
    return bytes(IP(src=src, dst=dst) / ICMP(type=type, code=code, nexthopmtu=1280) / quoted)


def test_icmp_errors_find_the_flow_they_quote():
    """Errors about clients' flows (fragmentation needed, unreachables, time exceeded) used to
    be dropped as icmp-other; the quoted header names the flow."""
    store = make_store()
    for m in TCPUDP:
        store.insert(m, kind="nar.mapping", owner=m.session)
    look = lambda ix, key: (store.lookup_all("nar.mapping", ix, key) if ix == "outflow"  # noqa: E731
                            else store.lookup("nar.mapping", ix, key))
    cases = {
        "echo": (IP(src=NB, dst=YB) / ICMP(type=8, id=0x4242), "s1/6"),
        "tcp": (bytes(IP(src=NB, dst=YB) / TCP(sport=20001, dport=5555))[:28], "s1/21"),
        "tcp-any": (bytes(IP(src=NB, dst=YB) / TCP(sport=20002, dport=80))[:28], "s1/22"),
        "udp": (IP(src=NB, dst=YB) / UDP(sport=20003, dport=53), "s1/23"),
        "ipip-inner": (IP(src=NB, dst=YB, proto=4) / IP(src="172.16.0.5", dst=CN), "s1/4"),
        "gre-inner": (IP(src=NB, dst=YB) / GRE(proto=0x0800) / IP(src="172.16.0.6", dst=CN), "s2/5"),
    }
    for name, (quoted, want) in cases.items():
        m, reason = demux_icmp_error(_err(bytes(quoted)), NB, look)
        assert (m.id if m else reason) == want, name
    # ESP/AH quote Y's SPI: only a single client towards Yb makes the error deliverable
    m, reason = demux_icmp_error(_err(bytes(IP(src=NB, dst=YB) / ESP(spi=0x77))), NB, look)
    assert m is not None and m.kind == "ipsec" and m.client == XA
    other = attrs.evolve(mapping(30, "ipsec", 50, session="s3", spi=0x2000), client="10.0.0.11")
    store.insert(other, kind="nar.mapping", owner="s3")
    assert demux_icmp_error(_err(bytes(IP(src=NB, dst=YB) / ESP(spi=0x77))), NB, look) == (
        None, "icmp-error-ambiguous")
    assert demux_icmp_error(_err(bytes(IP(src=CN, dst=YB) / UDP(sport=20003))), NB, look) == (
        None, "icmp-error-foreign")
    assert demux_icmp_error(_err(bytes(IP(src=NB, dst=YB) / UDP(sport=9))), NB, look) == (
        None, "no-mapping")


def test_icmp_error_delivery_end_to_end_and_translated():
    quoted = bytes(IP(src=NB, dst=YB) / ESP(spi=0x77, seq=1, data=b"x" * 16))
    err = _err(quoted)
    e2e = mapping(1, "ipsec", 50, spi=1)
    out = IP(deliver_icmp_error(err, e2e, A(NA), A(XA), A(NB)))
    assert (out.src, out.dst, out.proto) == (NA, XA, 4) and bytes(out.payload) == err
    tr = mapping(2, "ipsec", 50, spi=2, translated=True)
    got = IP(deliver_icmp_error(err, tr, A(NA), A(XA), A(NB)))
    # as a NAT: outer destination and quoted source Xa, checksums right (scapy recomputes them)
    assert (got.src, got.dst, got[ICMP].type, got[ICMP].nexthopmtu) == ("198.51.100.1", XA, 3, 1280)
    inner = got[ICMP].payload
    assert (inner.src, inner.dst) == (XA, YB)
    want = IP(src="198.51.100.1", dst=XA) / ICMP(type=3, code=4, nexthopmtu=1280) / bytes(
        IP(src=XA, dst=YB) / ESP(spi=0x77, seq=1, data=b"x" * 16))
    assert bytes(got) == bytes(want)


def test_gre_with_an_ipv6_inner_packet_finds_its_tunnel():
    from scapy.layers.inet6 import IPv6

    store = make_store()
    m6 = mapping(40, "tunnel", 47, inner="2001:db8::5")
    store.insert(m6, kind="nar.mapping", owner="s1")
    pkt = IP(src=YB, dst=NB) / GRE(proto=0x86DD) / IPv6(src="2001:db8::99", dst="2001:db8::5") / UDP()
    assert demux_inbound(bytes(pkt), NB, lookup_in(store)) == (m6, "")
    out = IP(src=NB, dst=YB) / GRE(proto=0x86DD) / IPv6(src="2001:db8::5", dst="2001:db8::99") / UDP()
    assert check_outbound(_tunnel(out), NB, [m6])[1] == ""
    spoofed = IP(src=NB, dst=YB) / GRE(proto=0x86DD) / IPv6(src="2001:db8::6", dst="2001:db8::99")
    assert check_outbound(_tunnel(spoofed), NB, [m6])[1] == "spoofed"
