"""Registrations relayed per second by the mipproxy role, with latency, against an anchor.

    python bench/bench_mip.py [--seconds 5] [--window 64] [--rounds 3]

A real ``twistd -n narsuite --role=mipproxy`` (data path off, memory store) listens on loopback
addresses: MIPP-Pub 127.0.1.1, MIPP-Priv 127.0.1.2.  This process is both the mobile node and
the home agent, with plain sockets: the MN keeps ``--window`` authenticated Registration Requests
(HMAC-MD5, increasing NTP identifications) in flight; the HA authenticates each relayed request's
MN-HA extension, answers it accepted with its own authenticator; the proxy authenticates that
reply, records the binding and relays it to the MN, which checks its authenticator.  One
registration = MN -> proxy -> HA -> proxy -> MN.  Latency is per registration, send to reply.

The anchor, in the same run and the same shape, is a bare Twisted UDP relay (one process, the
same two sockets, the datagram forwarded untouched both ways): what moving the four datagrams
through a Python reactor costs before any Mobile IP work.  CPU seconds of the relaying process
per registration come from /proc (with its system share apart); "MN+HA CPU" is this process's
own per registration (the load generator: it pays for being woken, so the relay's way of sending
shows there too).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUB, PRIV, HA, MN = "127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"
HOME = "10.2.0.100"
SPI = 4096
KEY = bytes(range(16))
NTP = 2208988800
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
A = socket.inet_aton

ANCHOR = textwrap.dedent("""
    import socket
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol
    PUB, PRIV, HA = {pub!r}, {priv!r}, {ha!r}
    last = {{}}
    class Pub(DatagramProtocol):
        def datagramReceived(self, data, addr):
            last[data[16:24]] = addr
            priv.transport.write(data, (HA, 434))
    class Priv(DatagramProtocol):
        def datagramReceived(self, data, addr):
            a = last.pop(data[12:20], None)
            if a: pub.transport.write(data, a)
    pub, priv = Pub(), Priv()
    reactor.listenUDP(434, pub, interface=PUB)
    reactor.listenUDP(434, priv, interface=PRIV)
    print("ready", flush=True)
    reactor.run()
""")


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def wait_bound(address: str, port: int, limit: float) -> None:
    """Until a UDP socket is bound to ``address:port`` (read from /proc/net/udp: trying to bind
    it ourselves could take it from the daemon), at most ``limit`` seconds."""
    want = f"{socket.inet_aton(address)[::-1].hex().upper()}:{port:04X}"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open("/proc/net/udp") as f:
            if any(line.split()[1] == want for line in f.readlines()[1:]):
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing bound {address}:{port} within {limit:g} s")


def auth(msg: bytes) -> bytes:
    covered = msg + bytes([32, 20]) + struct.pack("!I", SPI)
    return covered + hmac.new(KEY, covered, hashlib.md5).digest()


def verify(msg: bytes, start: int) -> bool:
    off = start
    while off + 2 <= len(msg):
        t, n = msg[off], msg[off + 1]
        if t == 32:
            mac = hmac.new(KEY, msg[: off + 6], hashlib.md5).digest()
            return hmac.compare_digest(mac, msg[off + 6: off + 22])
        off += 2 + n
    return False


HA_PARAM = bytes([127, 6, 0, 0]) + A(HA)


def request(ident: int, lifetime: int = 600) -> bytes:
    hdr = struct.pack("!BBH4s4s4sQ", 1, 0x02, lifetime, A(HOME), A(PUB), A(MN), ident)
    return auth(hdr + HA_PARAM)


#: identifications keep growing across runs in the same second (the proxy refuses replays)
_counter = [0]


def load(seconds: float, window: int, check: bool) -> dict:
    """Drive MN and HA for ``seconds``; return rate and latency percentiles."""
    mn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mn.bind((MN, 0))
    mn.connect((PUB, 434))
    ha = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ha.bind((HA, 434))
    for s in (mn, ha):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
    base = (int(time.time()) + NTP) << 32
    counter = _counter[0]
    sent: dict[int, float] = {}
    lat: list[float] = []
    bad = 0

    def send_one() -> None:
        nonlocal counter
        counter += 1
        ident = base + counter
        sent[ident & 0xFFFFFFFF] = time.perf_counter()
        mn.send(request(ident))

    t_end = time.perf_counter() + seconds
    for _ in range(window):
        send_one()
    last_progress = time.perf_counter()
    while True:
        now = time.perf_counter()
        if now >= t_end:
            break
        if now - last_progress > 2.0:  # lost datagrams: refill the window
            sent.clear()
            for _ in range(window):
                send_one()
            last_progress = now
        r, _, _ = select.select([mn, ha], [], [], 0.2)
        if ha in r:
            while True:
                try:
                    data, addr = ha.recvfrom(2048)
                except BlockingIOError:
                    break
                if check and not verify(data, 24):
                    bad += 1
                    continue
                ident = struct.unpack_from("!Q", data, 16)[0]
                life = struct.unpack_from("!H", data, 2)[0]
                rep = struct.pack("!BBH4s4sQ", 3, 0, life, data[4:8], A(HA), ident)
                ha.sendto(auth(rep), addr)
        if mn in r:
            while True:
                try:
                    data = mn.recv(2048)
                except BlockingIOError:
                    break
                t0 = sent.pop(struct.unpack_from("!Q", data, 12)[0] & 0xFFFFFFFF, None)
                if t0 is None:
                    continue
                if check and (data[1] != 0 or not verify(data, 20)):
                    bad += 1
                lat.append(time.perf_counter() - t0)
                last_progress = time.perf_counter()
                send_one()
    _counter[0] = counter
    mn.close()
    ha.close()
    lat.sort()
    n = len(lat)
    return {"done": n, "rate": n / seconds, "bad": bad,
            "p50_ms": 1000 * lat[n // 2] if n else None,
            "p99_ms": 1000 * lat[min(n - 1, int(n * 0.99))] if n else None}


#: the relay's configuration, shared with bench/profile_mip.py (the same relay in one process)
MIPPROXY_TOML = f"""
[mipproxy]
public_address = "{PUB}"
private_address = "{PRIV}"
home_agents = ["{HA}"]
data_path = false
max_pending = 100000
[[mipproxy.mobile_nodes]]
spi = {SPI}
key = "{KEY.hex()}"
home_address = "{HOME}"
"""


def run_daemon(tmp: Path) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "bench.toml"
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{tmp}/state"
        runtime_dir = "{tmp}/run"
        [store]
        backend = "memory"
        [metrics]
        enabled = false
        [control]
        enabled = false
        [log]
        level = "warn"
        """) + MIPPROXY_TOML)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", TWISTD, "--pidfile=", "-n", "narsuite",
                             "--config", str(cfg), "--role=mipproxy"], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def run_anchor() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", ANCHOR.format(pub=PUB, priv=PRIV, ha=HA)],
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


def measure(start, seconds: float, window: int, check: bool) -> dict:
    proc = start()
    try:
        wait_bound(PUB, 434, 30.0)  # the daemon binds (seconds on a loaded machine)
        time.sleep(0.5)  # and settles; one warm-up second below
        load(1.0, window, check)
        u0, s0 = cpu_split(proc.pid)
        me0 = os.times()
        res = load(seconds, window, check)
        u1, s1 = cpu_split(proc.pid)
        me1 = os.times()
        n = max(1, res["done"])
        res["cpu_us_per_reg"] = 1e6 * (u1 - u0 + s1 - s0) / n
        res["sys_us_per_reg"] = 1e6 * (s1 - s0) / n
        # this process (MN and HA): its wake-ups show here, not in the relay's figure
        res["loadgen_us_per_reg"] = 1e6 * (me1.user - me0.user + me1.system - me0.system) / n
        return res
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.rounds):
            ours = measure(lambda i=i: run_daemon(Path(d) / f"r{i}"), args.seconds, args.window, True)
            anchor = measure(run_anchor, args.seconds, args.window, False)
            rows.append((ours, anchor))
    print("| round | mipproxy reg/s | p50 ms | p99 ms | CPU µs/reg | of it sys | MN+HA CPU µs/reg "
          "| bad | bare relay reg/s | p50 ms | p99 ms | CPU µs/reg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (o, a) in enumerate(rows, 1):
        print(f"| {i} | {o['rate']:,.0f} | {o['p50_ms']:.2f} | {o['p99_ms']:.2f} | "
              f"{o['cpu_us_per_reg']:.0f} | {o['sys_us_per_reg']:.0f} | "
              f"{o['loadgen_us_per_reg']:.0f} | {o['bad']} | {a['rate']:,.0f} | "
              f"{a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['cpu_us_per_reg']:.0f} |")
    med = lambda key, j: statistics.median(r[j][key] for r in rows)  # noqa: E731
    print(f"\nmedian: mipproxy {med('rate', 0):,.0f} reg/s p50 {med('p50_ms', 0):.2f} ms "
          f"p99 {med('p99_ms', 0):.2f} ms, {med('cpu_us_per_reg', 0):.0f} µs CPU/reg; bare relay "
          f"{med('rate', 1):,.0f} reg/s, {med('cpu_us_per_reg', 1):.0f} µs CPU/reg")


if __name__ == "__main__":
    main()
