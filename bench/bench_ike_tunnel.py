"""Data rate through an IKEv1 remote-access tunnel: narsuite gateway vs strongSwan gateway.

Run (root):
    python bench/bench_ike_tunnel.py [--seconds 5] [--repeats 3] [--json results.json]
    python bench/bench_ike_tunnel.py --quick          # 2 s per transfer, one repeat

Lab: ``remote_access_topology`` (R1 -- NAT1 -- G -- H).  R1 runs a stock strongSwan charon
(kernel-libipsec: ESP in user space over a TUN device, the kernel here has no ESP) as the
IKEv1 client (Main Mode PSK, ``ikev1_client_conf``); the tunnel is R1 192.168.1.10/32 ===
10.1.0.0/24, UDP-encapsulated (NAT1 is in the path).  The gateway on G is, in turn:

* ``narsuite``: ``twistd narsuite --role=esp,ike`` (IKE responder + ESP data plane over TUN);
* ``strongswan``: charon with kernel-libipsec (``ikev1_gateway_conf``) -- the anchor.

Each with ESP AES-CBC-128/HMAC-SHA-256-128 (``aes128-sha256``) and AES-GCM-16-128
(``aes128gcm16``): the client proposes only that one transform, the gateway is configured
with only that one, and the negotiated CHILD SA is checked.  Measured through the tunnel,
R1 -> H:

* TCP bulk, one stream (a Python sender on R1, a receiver on H): Mbit/s at H;
* UDP 64-byte payload flood (a Python sender on R1): packets/s received at H, and the share
  of the ESP packets the client's charon sent (its CHILD SA counter) that reached H -- what
  the gateway delivered of its input (the flood itself loses most packets at R1's TUN queue,
  before the client encrypts them; what the gateway loses, it loses at its full UDP 4500
  socket buffer, G's ``RcvbufErrors``, also recorded).  The sender runs under ``nice -n 19`` (``--udp-nice``):
  on 2 cores a flood at normal priority takes a whole core away from the tunnel it measures;
  ``--udp-nice 0`` does what bench_esp_forwarding.py does;
* CPU seconds used by the gateway process (utime+stime of all its threads, from
  /proc/<pid>/stat) during each transfer, and for context the client charon's on R1.

The receiver on H runs under ``SCHED_BATCH`` (``--sink-sched``, default ``batch``): with the
default policy, the receiver, asleep between packets, is woken by nearly every packet the
gateway forwards and the scheduler lets it preempt the gateway on the shared core (tens of
thousands of involuntary context switches per second of the gateway process, measured): the
measuring device then steals the CPU of what it measures, which cannot happen with H on its
own machine.  A single-threaded gateway (narsuite) suffers this more than a multi-threaded one
(charon); ``--sink-sched other`` gives the old behaviour for comparison.

Anchor in the same run: the same transfers R1 -> H without a tunnel (a route to 10.1.0.0/24
added on NAT1 for that measurement only, so NAT1 masquerades and G's kernel forwards).

The machine has 2 cores shared by the sender, the receiver, the client's charon, the gateway
and whatever else runs: each figure is the median of ``--repeats`` rounds; rounds are
interleaved (every configuration once per round) so that a burst of foreign load does not
hit one configuration only.  Everything is torn down on failure too: the Lab context
manager kills every process it started; charons and daemons are also stopped explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from narsuite.lab import Lab, remote_access_topology
from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.lab.strongswan import (
    Charon,
    ikev1_client_conf,
    ikev1_gateway_conf,
    strongswan_unavailable_reason,
)

PSK = "lab-psk-0123456789"
PORT = 5201

#: label -> (swanctl/narsuite ESP proposal, expected CHILD SA encr, expected integ)
SUITES: dict[str, tuple[str, str, str]] = {
    "aes-cbc-128/hmac-sha256-128": ("aes128-sha256", "AES_CBC-128", "HMAC_SHA2_256_128"),
    "aes-gcm-16-128": ("aes128gcm16", "AES_GCM_16-128", ""),
}
GATEWAYS = ("narsuite", "strongswan")

#: Quieter than the lab default (no per-message ike/cfg detail): nothing is logged per packet
#: at these levels, but keep the log small anyway.
CHARON_LOG_LEVELS = {"default": 1, "ike": 1, "cfg": 1, "enc": 0, "net": 0, "knl": 1}

SINK = textwrap.dedent("""
    import socket, sys, time
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "tcp":
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(1)
        print("LISTEN", flush=True)
        s.settimeout(30)
        c, _ = s.accept(); c.settimeout(30); n = 0; t0 = t1 = None
        while True:
            b = c.recv(262144)
            if not b: break
            t1 = time.perf_counter()
            if t0 is None: t0 = t1
            n += len(b)
        print(n, (t1 or 0) - (t0 or 0), flush=True)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("0.0.0.0", port))
        print("LISTEN", flush=True)
        s.settimeout(15); n = 0; t0 = t1 = None
        try:
            while True:
                s.recv(2048); n += 1
                t1 = time.perf_counter()
                if t0 is None: t0 = t1; s.settimeout(2)
        except socket.timeout:
            pass
        print(n, (t1 or 0) - (t0 or 0), flush=True)
""")

SOURCE = textwrap.dedent("""
    import socket, sys, time
    kind, dst, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    end = time.perf_counter() + seconds
    if kind == "tcp":
        s = socket.create_connection((dst, port), timeout=30); buf = b"x" * 65536
        while time.perf_counter() < end:
            s.sendall(buf)
        s.close()
        print(0)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); buf = b"y" * 64; n = 0
        while time.perf_counter() < end:
            for _ in range(64):
                try:
                    s.sendto(buf, (dst, port)); n += 1
                except OSError:
                    pass
        print(n)
""")

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """utime+stime of process ``pid`` (all its threads), seconds; 0.0 when unknown."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _client_packets_out(client: Charon | None) -> int | None:
    if client is None:
        return None
    for sa in client.list_sas():
        for child in sa.children:
            return child.packets_out
    return None


def udp_rcvbuf_errors(host) -> int:
    """UDP datagrams ``host``'s kernel dropped because a socket's receive buffer was full."""
    lines = [ln.split() for ln in host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Udp:")]
    return int(dict(zip(lines[0][1:], lines[1][1:]))["RcvbufErrors"])


#: ``--sink-sched``: the receiver's scheduling policy (see the module docstring)
SINK_SCHED = {"batch": ["chrt", "--batch", "0"], "other": []}


@dataclasses.dataclass(frozen=True)
class Knobs:
    """How the traffic is run (the same for every gateway in a run)."""

    nice: int = 0  # the UDP flood sender's nice value
    sink_sched: str = "batch"  # the receiver's scheduling policy, a key of SINK_SCHED
    reactor: str = ""  # twistd --reactor for the narsuite gateway ("" = Twisted's default)


def transfer(sink_host, src_host, dst: str, kind: str, seconds: float, tmp: Path,
             pids: dict[str, int | None], client: Charon | None = None,
             knobs: Knobs = Knobs(), gw_host=None) -> dict:
    """One transfer ``src_host`` -> ``dst`` (on ``sink_host``); CPU of ``pids`` during it."""
    sink = sink_host.popen([*SINK_SCHED[knobs.sink_sched], sys.executable, str(tmp / "sink.py"), kind,
                            str(PORT)], stdout=subprocess.PIPE, text=True)
    try:
        line = sink.stdout.readline().strip()
        if line != "LISTEN":
            raise RuntimeError(f"sink did not start: {line!r}")
        esp0 = _client_packets_out(client)
        drop0 = udp_rcvbuf_errors(gw_host) if gw_host is not None and kind == "udp" else None
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        wall0 = time.perf_counter()
        src = [sys.executable, str(tmp / "source.py"), kind, dst, str(PORT), str(seconds)]
        if knobs.nice and kind == "udp":
            src = ["nice", "-n", str(knobs.nice), *src]
        out = src_host.run(src, timeout=seconds + 60)
        n, elapsed = sink.stdout.readline().split()
        wall = time.perf_counter() - wall0
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
        esp1 = _client_packets_out(client)
        if drop0 is not None:
            drops = udp_rcvbuf_errors(gw_host) - drop0
        sink.wait(30)
    finally:
        if sink.poll() is None:
            sink_host.stop(sink)
    n, elapsed = int(n), float(elapsed) or 1e-9
    r = {"kind": kind, "units": n, "elapsed": elapsed, "wall": wall,
         "cpu": {k: round(v, 3) for k, v in cpu.items()}}
    if esp0 is not None and esp1 is not None:
        r["client_esp_packets_out"] = esp1 - esp0
    if drop0 is not None:
        # ESP packets G's kernel dropped at the gateway's full UDP 4500 socket buffer
        r["gw_udp_rcvbuf_errors"] = drops
    if kind == "tcp":
        r["rate"] = n * 8 / elapsed / 1e6  # Mbit/s
    else:
        r["rate"] = n / elapsed  # packets/s
        r["sent"] = int(out.stdout.split()[-1])
    return r


# ---------------------------------------------------------------------------
# the gateways


def narsuite_gateway(t, workdir: Path, esp: str, reactor: str = "") -> NarsuiteDaemon:
    workdir.mkdir(parents=True)
    cfg = workdir / "narsuite.toml"
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{workdir}/state"
        runtime_dir = "{workdir}/run"
        [store]
        backend = "memory"
        [metrics]
        enabled = false
        [esp]
        [ike]
        [[ike.peers]]
        name = "rw"
        psk = "{PSK}"
        local_id = "gw.example"
        local_ts = ["{t.internal_net}"]
        esp = ["{esp}"]
        """))
    return NarsuiteDaemon(t.g, cfg, roles="ike,esp", reactor=reactor).start()


def strongswan_gateway(t, workdir: Path, esp: str) -> Charon:
    gw = Charon(t.g, workdir, log_levels=CHARON_LOG_LEVELS).start()
    gw.load(ikev1_gateway_conf(t.g_public, PSK, local_ts=t.internal_net, remote_ts=t.private_net,
                               esp_proposals=esp))
    return gw


def _stop_gateway(gw) -> None:
    if isinstance(gw, NarsuiteDaemon):
        if gw.alive():
            try:
                gw.terminate()
            except Exception as exc:
                print(f"warning: narsuite gateway did not stop cleanly: {exc!s:.300}", file=sys.stderr)
                if gw.alive():
                    gw.kill9()
    else:
        gw.stop()


def tunnel_round(t, tmp: Path, gateway: str, suite: str, seconds: float, tag: str,
                 knobs: Knobs) -> dict:
    """Bring up (gateway, suite), run one TCP and one UDP transfer, tear down."""
    esp, want_encr, want_integ = SUITES[suite]
    wd = tmp / tag
    gw = client = None
    try:
        if gateway == "narsuite":
            gw = narsuite_gateway(t, wd / "g", esp, knobs.reactor)
            gw_pid = gw.proc.pid  # `ip netns exec` execs: this is twistd itself
        else:
            gw = strongswan_gateway(t, wd / "g", esp)
            gw_pid = gw.pid  # ip netns exec -> unshare -> sh -c "exec charon": charon itself
        client = Charon(t.r1, wd / "r1", log_levels=CHARON_LOG_LEVELS).start()
        client.load(ikev1_client_conf(t.g_public, PSK, local_id="r1.example",
                                      remote_ts=t.internal_net, esp_proposals=esp))
        res = client.initiate(child="net", timeout=20)
        if not res.ok:
            raise RuntimeError(f"{gateway}/{suite}: tunnel did not come up\n{res.output[-3000:]}")
        (sa,) = client.list_sas()
        (child,) = sa.children
        if (child.encr, child.integ) != (want_encr, want_integ):
            raise RuntimeError(f"{gateway}/{suite}: negotiated {child.encr}/{child.integ}")
        if not t.r1.ping(t.h_addr, timeout=3):
            raise RuntimeError(f"{gateway}/{suite}: no ping R1 -> H through the tunnel")
        pids = {"gateway": gw_pid, "client": client.pid}
        comm = Path(f"/proc/{gw_pid}/comm").read_text().strip()
        tcp = transfer(t.h, t.r1, t.h_addr, "tcp", seconds, tmp, pids, client, knobs)
        udp = transfer(t.h, t.r1, t.h_addr, "udp", seconds, tmp, pids, client, knobs, gw_host=t.g)
        (sa,) = client.list_sas()
        (child,) = sa.children
        return {"gateway": gateway, "suite": suite, "esp_proposal": esp, "gateway_comm": comm,
                "child_sa": f"{child.encr}/{child.integ or '-'}", "encap": child.encap,
                "client_packets_out": child.packets_out, "tcp": tcp, "udp": udp}
    finally:
        if client is not None:
            client.stop()
        if gw is not None:
            _stop_gateway(gw)


def anchor_round(t, tmp: Path, seconds: float, knobs: Knobs) -> dict:
    """R1 -> H without a tunnel: NAT1 masquerades, G's kernel forwards."""
    t.nat1.route(t.internal_net, t.g_public)
    try:
        tcp = transfer(t.h, t.r1, t.h_addr, "tcp", seconds, tmp, {}, knobs=knobs)
        udp = transfer(t.h, t.r1, t.h_addr, "udp", seconds, tmp, {}, knobs=knobs)
    finally:
        t.nat1.ip("route", "del", t.internal_net, check=False)
    return {"gateway": "kernel", "suite": "none", "tcp": tcp, "udp": udp}


# ---------------------------------------------------------------------------


def run(seconds: float, repeats: int, gateways: tuple[str, ...], suites: tuple[str, ...],
        anchor: bool = True, knobs: Knobs = Knobs()) -> list[dict]:
    samples: list[dict] = []
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="bench_ike_tunnel.") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "sink.py").write_text(SINK)
        (tmp / "source.py").write_text(SOURCE)
        t = remote_access_topology(lab)
        for h in (t.g, t.r1, t.h):
            h.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
        for rnd in range(repeats):
            if anchor:
                s = anchor_round(t, tmp, seconds, knobs)
                s["round"] = rnd
                samples.append(s)
                _progress(s)
            for gateway in gateways:
                for suite in suites:
                    tag = f"r{rnd}-{gateway}-{SUITES[suite][0]}"
                    for attempt in (1, 2):  # one retry: a negotiation can time out on a busy box
                        try:
                            s = tunnel_round(t, tmp, gateway, suite, seconds, f"{tag}-{attempt}", knobs)
                            break
                        except Exception as exc:
                            if attempt == 2:
                                raise
                            print(f"  round {rnd} {gateway} {suite}: {exc!s:.2000}\n  retrying once",
                                  file=sys.stderr, flush=True)
                            time.sleep(1)
                    s["attempts"] = attempt
                    s["round"] = rnd
                    samples.append(s)
                    _progress(s)
                    time.sleep(0.5)
    return samples


def _progress(s: dict) -> None:
    tcp, udp = s["tcp"], s["udp"]
    cpu = lambda r: f" gw {r['cpu']['gateway']:.2f} cpu-s" if "gateway" in r["cpu"] else ""  # noqa: E731
    print(f"  round {s['round']} {s['gateway']:10} {s['suite']:28} "
          f"TCP {tcp['rate']:7.0f} Mbit/s{cpu(tcp)} | "
          f"UDP {udp['rate']:7.0f} pkt/s ({udp['units']}/{udp['sent']}){cpu(udp)}",
          file=sys.stderr, flush=True)


def summarize(samples: list[dict]) -> list[dict]:
    """Median per (gateway, suite) over the rounds (each figure's median taken on its own)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in samples:
        groups.setdefault((s["gateway"], s["suite"]), []).append(s)
    med = statistics.median
    rows = []
    for (gateway, suite), ss in groups.items():
        row = {"gateway": gateway, "suite": suite, "n": len(ss),
               "tcp_mbps": med([s["tcp"]["rate"] for s in ss]),
               "tcp_mbps_all": [round(s["tcp"]["rate"], 1) for s in ss],
               "udp_pps": med([s["udp"]["rate"] for s in ss]),
               "udp_pps_all": [round(s["udp"]["rate"]) for s in ss],
               # received at H / sent by the flood (most of the loss is at R1's TUN queue)
               "udp_received_of_sent": med([s["udp"]["units"] / max(1, s["udp"]["sent"]) for s in ss])}
        if gateway != "kernel":
            row["child_sa"] = ss[0]["child_sa"]
            # received at H / ESP packets the client sent: what the gateway delivered of its input
            row["udp_gw_delivered"] = med([s["udp"]["units"] / max(1, s["udp"].get("client_esp_packets_out") or 1)
                                           for s in ss])
            row["udp_client_esp_out"] = med([s["udp"].get("client_esp_packets_out") or 0 for s in ss])
            row["udp_gw_rcvbuf_errors"] = med([s["udp"].get("gw_udp_rcvbuf_errors", 0) for s in ss])
            for kind in ("tcp", "udp"):
                for who in ("gateway", "client"):
                    row[f"{kind}_cpu_{who}"] = med([s[kind]["cpu"][who] for s in ss])
                    # cores busy while data flowed (CPU-s / seconds between first and last arrival at H)
                    row[f"{kind}_cpu_{who}_load"] = med([s[kind]["cpu"][who] / s[kind]["elapsed"] for s in ss])
            # gateway CPU per unit: seconds per GB (TCP), microseconds per packet delivered (UDP)
            row["tcp_gw_cpu_s_per_gb"] = med([s["tcp"]["cpu"]["gateway"] / max(1e-9, s["tcp"]["units"] / 1e9)
                                              for s in ss])
            row["udp_gw_cpu_us_per_pkt"] = med([s["udp"]["cpu"]["gateway"] / max(1, s["udp"]["units"]) * 1e6
                                                for s in ss])
        rows.append(row)
    return rows


def print_table(rows: list[dict], seconds: float, repeats: int, knobs: Knobs) -> None:
    print(f"\nIKEv1 remote-access tunnel R1 -> H, strongSwan (kernel-libipsec) client on R1; "
          f"{seconds:g} s per transfer, median of {repeats} round(s); UDP sender nice {knobs.nice}; "
          f"receiver {knobs.sink_sched}; narsuite reactor {knobs.reactor or 'default'}\n")
    print("| gateway on G | ESP | TCP Mbit/s | gw CPU-s | gw load | gw CPU-s/GB "
          "| UDP 64 B pkt/s at H | gw delivered | gw CPU-s | gw load | gw µs/pkt | client load TCP / UDP |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["gateway"] == "kernel":
            print(f"| no tunnel, kernel forwarding (anchor) | – | {r['tcp_mbps']:,.0f} | – | – | – "
                  f"| {r['udp_pps']:,.0f} | – | – | – | – | – |")
            continue
        print(f"| {r['gateway']} | {r['suite']} | {r['tcp_mbps']:,.0f} "
              f"| {r['tcp_cpu_gateway']:.2f} | {r['tcp_cpu_gateway_load']:.2f} | {r['tcp_gw_cpu_s_per_gb']:.1f} "
              f"| {r['udp_pps']:,.0f} | {r['udp_gw_delivered']:.0%} "
              f"| {r['udp_cpu_gateway']:.2f} | {r['udp_cpu_gateway_load']:.2f} | {r['udp_gw_cpu_us_per_pkt']:.1f} "
              f"| {r['tcp_cpu_client_load']:.2f} / {r['udp_cpu_client_load']:.2f} |")
    print("\nevery round (TCP Mbit/s; UDP pkt/s):")
    for r in rows:
        print(f"  {r['gateway']:10} {r['suite']:28} TCP {r['tcp_mbps_all']}  UDP {r['udp_pps_all']}")
    print("\ngw CPU-s: utime+stime of the gateway process over the transfer (UDP: including the "
          "receiver's 2 s idle wait at the end);\nload: CPU-s / seconds between the first and the last "
          "arrival at H (1.0 = one core);\ngw delivered: packets received at H / ESP packets the "
          "client's charon sent during the flood.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, help="per transfer (default 5, --quick 2)")
    ap.add_argument("--repeats", type=int, help="rounds; medians are reported (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="short run: 2 s transfers, one round")
    ap.add_argument("--gateway", action="append", choices=GATEWAYS, help="only this gateway (repeatable)")
    ap.add_argument("--suite", action="append", choices=tuple(SUITES), help="only this ESP suite (repeatable)")
    ap.add_argument("--no-anchor", action="store_true", help="skip the no-tunnel kernel forwarding anchor")
    ap.add_argument("--udp-nice", type=int, default=19, metavar="N",
                    help="run the UDP flood sender under nice -n N (default 19: the flood "
                         "takes what the tunnel leaves; 0 as in bench_esp_forwarding.py)")
    ap.add_argument("--reactor", default="", metavar="NAME",
                    help="twistd --reactor for the narsuite gateway (e.g. narsuite-epoll; default Twisted's)")
    ap.add_argument("--sink-sched", choices=tuple(SINK_SCHED), default="batch",
                    help="the receiver's scheduling policy on H (default batch: see the module docstring)")
    ap.add_argument("--json", metavar="PATH", help="write medians and every sample to PATH")
    args = ap.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    repeats = args.repeats or (1 if args.quick else 3)
    reason = strongswan_unavailable_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    gateways = tuple(args.gateway or GATEWAYS)
    suites = tuple(args.suite or SUITES)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load_start = os.getloadavg()
    knobs = Knobs(nice=args.udp_nice, sink_sched=args.sink_sched, reactor=args.reactor)
    samples = run(seconds, repeats, gateways, suites, anchor=not args.no_anchor, knobs=knobs)
    rows = summarize(samples)
    print_table(rows, seconds, repeats, knobs)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "bench_ike_tunnel", "started": started, "seconds": seconds, "repeats": repeats,
            "knobs": dataclasses.asdict(knobs),
            "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                     "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
            "results": rows, "samples": samples}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
