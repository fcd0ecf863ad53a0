"""ESP forwarding rate through the gateway, in the R—NAT—G—H lab.

Run (root): python bench/bench_esp_forwarding.py [--seconds 5] [--reactor epoll|narsuite-epoll]

G runs ``twistd narsuite --role=esp``; R1 (behind NAT1) runs a second narsuite
esp instance as its client end, so both ends are our data plane (the scapy
test peer, at ~1.5 ms per packet, would measure scapy).  Measured:

* bulk TCP H -> R1 through the tunnel (Mbit/s), AES-GCM-16-128 and AES-CBC-128/HMAC-SHA1-96;
* small UDP packets R1 -> H (64-byte payload), packets/s delivered to H;
* anchor, same run, same hosts: the same transfers from NAT1's public address to H,
  forwarded by G's kernel without ESP (the ceiling of this topology);

Each ESP figure is through two narsuite instances (encrypt on one, decrypt on the
other) sharing the machine's 2 cores with the traffic generators.
``--reactor narsuite-epoll`` starts both instances with ``twistd --reactor=narsuite-epoll``
(narsuite/reactor.py) instead of Twisted's default reactor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from narsuite.lab import Lab
from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.lab.topologies import remote_access_topology

SUITES = {
    "aes-gcm-16-128": ("aes-gcm-16", "11" * 16 + "aabbccdd", "22" * 16 + "eeff0011", "none", "", ""),
    "aes-cbc-128/hmac-sha1-96": ("aes-cbc", "33" * 16, "44" * 16, "hmac-sha1-96", "55" * 20, "66" * 20),
}

SINK = textwrap.dedent("""
    import socket, sys, time
    kind, seconds = sys.argv[1], float(sys.argv[2])
    if kind == "tcp":
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 5201)); s.listen(1)
        print("LISTEN", flush=True)
        c, _ = s.accept(); n = 0; t0 = None
        while True:
            b = c.recv(262144)
            if not b: break
            if t0 is None: t0 = time.perf_counter()
            n += len(b)
        print(n, time.perf_counter() - t0)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5201))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        print("LISTEN", flush=True)
        s.settimeout(3); n = 0; t0 = t1 = None
        try:
            while True:
                s.recv(2048); n += 1
                t1 = time.perf_counter()
                if t0 is None: t0 = t1
        except socket.timeout:
            pass
        print(n, (t1 or 0) - (t0 or 0))
""")

SOURCE = textwrap.dedent("""
    import socket, sys, time
    kind, dst, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    end = time.perf_counter() + seconds
    if kind == "tcp":
        s = socket.create_connection((dst, 5201)); buf = b"x" * 65536
        while time.perf_counter() < end:
            s.sendall(buf)
        s.close()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); buf = b"y" * 64; n = 0
        while time.perf_counter() < end:
            for _ in range(64):
                try:
                    s.sendto(buf, (dst, 5201)); n += 1
                except OSError:
                    pass
        print(n)
""")


def measure(sink_host, src_host, dst: str, kind: str, seconds: float, tmp: Path) -> tuple[float, float]:
    """(units/s, units): Mbit/s for tcp, packets/s for udp."""
    (tmp / "sink.py").write_text(SINK)
    (tmp / "source.py").write_text(SOURCE)
    import subprocess

    sink = sink_host.popen([sys.executable, str(tmp / "sink.py"), kind, str(seconds)],
                           stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "LISTEN"
    src_host.run([sys.executable, str(tmp / "source.py"), kind, dst, str(seconds)],
                 timeout=seconds + 60)
    n, elapsed = sink.stdout.readline().split()
    sink.wait(30)
    n, elapsed = int(n), float(elapsed) or 1e-9
    if kind == "tcp":
        return n * 8 / elapsed / 1e6, n
    return n / elapsed, n


def esp_config(tmp: Path, name: str, body: str) -> Path:
    d = tmp / name
    d.mkdir()
    cfg = d / "narsuite.toml"
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{d}/state"
        runtime_dir = "{d}/run"
        [store]
        backend = "memory"
        [metrics]
        enabled = false
        """) + body)
    return cfg


#: Stands in for twistd so that the daemons run under a chosen reactor.
TWISTD_WITH_REACTOR = textwrap.dedent("""
    import sys
    from twisted.scripts.twistd import run
    sys.argv = ["twistd", "--reactor={reactor}", "--pidfile=", "-n", "narsuite"] + sys.argv[1:]
    run()
""")


def run(seconds: float, reactor: str = "") -> list[tuple[str, str, str]]:
    rows = []
    with Lab() as lab, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        runner = None
        if reactor:
            runner = tmp / "twistd_reactor.py"
            runner.write_text(TWISTD_WITH_REACTOR.format(reactor=reactor))
        t = remote_access_topology(lab)
        for h in (t.g, t.r1):
            h.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])
        # anchor: NAT1's public address -> H, forwarded by G's kernel, no ESP
        t.nat1.route(t.internal_net, t.g_public)
        mbps, _ = measure(t.h, t.nat1, t.h_addr, "tcp", seconds, tmp)
        rows.append(("kernel forwarding, no ESP (anchor)", "TCP bulk", f"{mbps:,.0f} Mbit/s"))
        pps, _ = measure(t.h, t.nat1, t.h_addr, "udp", seconds, tmp)
        rows.append(("kernel forwarding, no ESP (anchor)", "UDP 64 B", f"{pps:,.0f} pkt/s"))
        for label, (enc, k_in, k_out, integ, i_in, i_out) in SUITES.items():
            g_cfg = esp_config(tmp, f"g-{len(rows)}", textwrap.dedent(f"""
                [esp]
                raw_esp = false
                [[esp.peers]]
                name = "r1"
                spi_in = 4097
                spi_out = 8193
                enc = "{enc}"
                enc_key_in = "{k_in}"
                enc_key_out = "{k_out}"
                integ = "{integ}"
                integ_key_in = "{i_in}"
                integ_key_out = "{i_out}"
                address = "10.8.0.2"
                """))
            r_cfg = esp_config(tmp, f"r-{len(rows)}", textwrap.dedent(f"""
                [esp]
                raw_esp = false
                tun_address = "10.8.0.2/32"
                [[esp.peers]]
                name = "g"
                spi_in = 8193
                spi_out = 4097
                enc = "{enc}"
                enc_key_in = "{k_out}"
                enc_key_out = "{k_in}"
                integ = "{integ}"
                integ_key_in = "{i_out}"
                integ_key_out = "{i_in}"
                remote = "{t.g_public}:4500"
                policy = "space"
                allowed = ["{t.internal_net}"]
                """))
            g = NarsuiteDaemon(t.g, g_cfg, roles="esp", runner=runner).start()
            r = NarsuiteDaemon(t.r1, r_cfg, roles="esp", runner=runner).start()
            try:
                t.r1.run(["ping", "-c", "1", "-W", "2", t.h_addr])
                mbps, _ = measure(t.r1, t.h, "10.8.0.2", "tcp", seconds, tmp)
                rows.append((f"narsuite ESP {label}", "TCP bulk H→R1", f"{mbps:,.0f} Mbit/s"))
                pps, _ = measure(t.h, t.r1, t.h_addr, "udp", seconds, tmp)
                rows.append((f"narsuite ESP {label}", "UDP 64 B R1→H", f"{pps:,.0f} pkt/s"))
            finally:
                r.terminate()
                g.terminate()
            time.sleep(0.5)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--reactor", choices=("epoll", "narsuite-epoll"), default="",
                    help="twistd --reactor for both narsuite instances (default: twistd's default)")
    args = ap.parse_args()
    rows = run(args.seconds, args.reactor)
    print(f"ESP forwarding through G, {args.seconds:g} s per figure, "
          f"reactor {args.reactor or 'twistd default'}\n")
    print("| path | traffic | rate |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {' | '.join(r)} |")


if __name__ == "__main__":
    main()
