"""IKEv1 responder load: completed Main Mode + Quick Mode exchanges per second (PSK).

Run (root):
    python bench/bench_ike.py [--responder strongswan] [--groups 19,14] [--seconds 10]
                              [--concurrency 64] [--workers 2]
    python bench/bench_ike.py --target 198.51.100.1 --psk secret   # a responder already running

The load generator is ``tests/ike_peer.py``'s sans-IO :class:`Initiator`, many at a time in
one epoll loop per worker process: each exchange has its own UDP sockets (ephemeral source
ports, so the responder sees distinct peers), floats to 4500 (``force_nat``: remote-access
clients are NATed, and kernel-libipsec's charon assumes NAT anyway) and asks for its own
``/32`` inside ``--client-net`` so no two CHILD SAs share traffic selectors.  A new exchange
starts as soon as one finishes: ``--concurrency`` exchanges are always in flight per worker.

Responders (``RESPONDERS``): ``strongswan`` builds a two-host lab (client C 198.51.100.2 --
responder G 198.51.100.1) and runs charon on G (the anchor);  ``none`` with ``--target``
loads an existing responder from the current namespace.  To add our own responder, write a
``setup_<name>(lab, args, workdir) -> Responder`` that starts it on ``lab.hosts["g"]`` and
register it in ``RESPONDERS``.

Reported per DH group: completed exchanges/s over the measured window (after ``--warmup``),
latency percentiles of a whole MM+QM, failures and timeouts, and the responder's CPU
(seconds of CPU per second of wall time, from /proc) -- on a 2-core machine the clients
compete with the responder for CPU, so compare responders in the same run.  SAs are never
deleted: the responder accumulates them (strongSwan keeps them until their lifetime ends).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import ike_peer as P  # noqa: E402

from narsuite.lab import Lab  # noqa: E402
from narsuite.lab.netns import Host  # noqa: E402

SUITES = {
    19: P.Phase1(cipher="aes-cbc", key_bits=128, hash="sha1", group=19),
    14: P.Phase1(cipher="aes-cbc", key_bits=128, hash="sha1", group=14),
}


# ---------------------------------------------------------------------------
# the load generator (one worker process)


class _Exchange:
    __slots__ = ("ini", "socks", "started", "last_sent", "tries")

    def __init__(self, ini: P.Initiator, sock: socket.socket) -> None:
        self.ini = ini
        self.socks = {P.IKE_PORT: sock}
        self.started = self.last_sent = time.monotonic()
        self.tries = 0


def run_worker(target: str, psk: bytes, group: int, seconds: float, warmup: float, concurrency: int,
               client_net: str, index: int, local_ip: str = "0.0.0.0", timeout: float = 10.0,
               retransmit: float = 2.0) -> dict:
    """Keep ``concurrency`` exchanges in flight for ``warmup + seconds``; count completions."""
    sel = selectors.DefaultSelector()
    net = ipaddress.ip_network(client_net)
    stride = net.num_addresses // 16  # workers (up to 16) take disjoint ranges of /32s
    counter = iter(range(1 + (index % 16) * stride, (index % 16 + 1) * stride))

    def next_addr() -> ipaddress.IPv4Address:
        return net.network_address + next(counter)

    phase1 = SUITES[group]
    t0 = time.monotonic()
    t_measure, t_end = t0 + warmup, t0 + warmup + seconds
    done_in_window = failures = timeouts = 0
    latencies: list[float] = []
    live: set[_Exchange] = set()

    def close(ex: _Exchange) -> None:
        live.discard(ex)
        for s in ex.socks.values():
            sel.unregister(s)
            s.close()

    def send(ex: _Exchange, out: P.Outgoing) -> None:
        s = ex.socks.get(out.port)
        if s is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((local_ip, 0))
            s.connect((target, out.port))
            s.setblocking(False)
            ex.socks[out.port] = s
            sel.register(s, selectors.EVENT_READ, (ex, out.port))
        try:
            s.send(out.data)
        except OSError:
            pass  # dropped like a lost datagram: retransmission covers it
        ex.last_sent = time.monotonic()

    def start() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((local_ip, 0))
        s.connect((target, P.IKE_PORT))
        s.setblocking(False)
        cfg = P.PeerConfig(psk=psk, identity=f"bench{index}.example", phase1=phase1, force_nat=True,
                           phase2=P.Phase2(local_ts=f"{next_addr()}/32", remote_ts="10.1.0.0/24"))
        ex = _Exchange(P.Initiator(cfg, s.getsockname(), target), s)
        sel.register(s, selectors.EVENT_READ, (ex, P.IKE_PORT))
        live.add(ex)
        send(ex, ex.ini.start())

    for _ in range(concurrency):
        start()
    last_sweep = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        for key, _ in sel.select(timeout=0.1):
            ex, port = key.data
            if ex not in live:
                continue
            try:
                data = key.fileobj.recv(65535)
                reply = ex.ini.receive(data, port)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            except P.PeerError:
                failures += 1
                close(ex)
                start()
                continue
            if reply is not None:
                send(ex, reply)
            if ex.ini.done:
                finished = time.monotonic()
                if finished >= t_measure:
                    done_in_window += 1
                    latencies.append(finished - ex.started)
                close(ex)
                if finished < t_end:
                    start()
        now = time.monotonic()
        if now - last_sweep >= 0.2:  # retransmissions and timeouts
            last_sweep = now
            for ex in list(live):
                if now - ex.started >= timeout:
                    timeouts += 1
                    close(ex)
                    start()
                elif now - ex.last_sent >= retransmit and (out := ex.ini.retransmit()) is not None:
                    ex.tries += 1
                    send(ex, out)
    for ex in list(live):
        close(ex)
    latencies.sort()
    return {"completed": done_in_window, "seconds": seconds, "failures": failures, "timeouts": timeouts,
            "latencies": latencies}


# ---------------------------------------------------------------------------
# responders


@attrs.define
class Responder:
    """A responder under test: where to send, whose CPU to watch, how to stop it."""

    target: str
    psk: str
    client: Host | None  # the namespace the load runs in (None: here)
    pids: list[int] = attrs.Factory(list)
    stop: Callable[[], None] = lambda: None
    description: str = ""


def _two_hosts(lab: Lab) -> tuple[Host, Host]:
    c, g = lab.host("c"), lab.host("g", forwarding=True)
    lab.link(c, g, "198.51.100.2/24", "198.51.100.1/24", a_if="eth0", b_if="wan0")
    return c, g


def setup_strongswan(lab: Lab, args: argparse.Namespace, workdir: Path) -> Responder:
    """charon on G (kernel-libipsec, IKEv1 PSK, logging off): the anchor."""
    from narsuite.lab.strongswan import Charon, ikev1_gateway_conf

    c, g = _two_hosts(lab)
    charon = Charon(g, workdir / "g", log_levels={"default": -1, "ike": 0, "cfg": -1, "knl": -1, "enc": -1,
                                                  "net": -1},
                    extra_conf=f"  threads = {args.charon_threads}\n").start()
    charon.load(ikev1_gateway_conf(
        "198.51.100.1", args.psk, remote_ts=args.client_net,
        proposals="aes128-sha1-ecp256,aes128-sha1-modp2048", esp_proposals="aes128-sha1"))
    return Responder("198.51.100.1", args.psk, c, [charon.pid], charon.stop,
                     f"strongSwan {_strongswan_version()} charon (kernel-libipsec, threads={args.charon_threads})")


def setup_none(lab: Lab | None, args: argparse.Namespace, workdir: Path) -> Responder:
    """An already running responder at ``--target`` (``--responder-pid`` for its CPU)."""
    if not args.target:
        raise SystemExit("--responder none needs --target")
    return Responder(args.target, args.psk, None, list(args.responder_pid or []), description=f"external {args.target}")


RESPONDERS: dict[str, Callable[..., Responder]] = {"strongswan": setup_strongswan, "none": setup_none}


def _strongswan_version() -> str:
    out = subprocess.run(["/usr/lib/ipsec/charon", "--version"], capture_output=True, text=True).stdout
    return out.strip().split()[-1] if out.strip() else "?"


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# driver


def measure(resp: Responder, args: argparse.Namespace, group: int) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--target", resp.target, "--psk", resp.psk,
            "--groups", str(group), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
            "--concurrency", str(args.concurrency), "--client-net", args.client_net]
    procs = []
    for i in range(args.workers):
        cmd = [*argv, "--index", str(i)]
        if resp.client is not None:
            procs.append(resp.client.popen(cmd, stdout=subprocess.PIPE, text=True))
        else:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    time.sleep(args.warmup)
    cpu0, wall0 = _cpu_seconds(resp.pids), time.monotonic()
    results = [json.loads(p.communicate(timeout=args.warmup + args.seconds + 60)[0]) for p in procs]
    cpu1, wall1 = _cpu_seconds(resp.pids), time.monotonic()
    lat = sorted(x for r in results for x in r["latencies"])
    completed = sum(r["completed"] for r in results)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else float("nan")

    return {"group": group, "completed": completed, "per_second": round(completed / args.seconds, 1),
            "failures": sum(r["failures"] for r in results), "timeouts": sum(r["timeouts"] for r in results),
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
            "responder_cpu": round((cpu1 - cpu0) / (wall1 - wall0), 2) if resp.pids else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--responder", default="strongswan", choices=sorted(RESPONDERS))
    ap.add_argument("--target", help="responder address (with --responder none, or for --worker)")
    ap.add_argument("--responder-pid", type=int, action="append", help="PID(s) whose CPU to report (none)")
    ap.add_argument("--psk", default="bench-psk-0123456789")
    ap.add_argument("--groups", default="19,14", help="DH groups to measure, in order")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=32, help="exchanges in flight per worker")
    ap.add_argument("--workers", type=int, default=1, help="load generator processes")
    ap.add_argument("--client-net", default="10.128.0.0/9", help="inner addresses the clients ask for")
    ap.add_argument("--charon-threads", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    groups = [int(g) for g in args.groups.split(",")]

    if args.worker:
        res = run_worker(args.target, args.psk.encode(), groups[0], args.seconds, args.warmup, args.concurrency,
                         args.client_net, args.index)
        print(json.dumps(res))
        return 0

    rows = []
    for group in groups:
        # a fresh responder per group: SAs accumulate, and the first group must not slow the second
        with tempfile.TemporaryDirectory(prefix="bench_ike_") as tmp:
            lab = Lab() if args.responder != "none" else None
            try:
                resp = RESPONDERS[args.responder](lab, args, Path(tmp))
                try:
                    row = measure(resp, args, group)
                finally:
                    resp.stop()
            finally:
                if lab is not None:
                    lab.close()
        row["responder"] = resp.description
        rows.append(row)
        if not args.json:
            print(f"{resp.description}: group {group} ({'ecp256' if group == 19 else 'modp2048'}): "
                  f"{row['per_second']} MM+QM/s ({row['completed']} in {args.seconds:g} s, "
                  f"{args.workers}x{args.concurrency} in flight), latency p50/p90/p99 "
                  f"{row['latency_ms']['p50']}/{row['latency_ms']['p90']}/{row['latency_ms']['p99']} ms, "
                  f"failures {row['failures']}, timeouts {row['timeouts']}, responder CPU {row['responder_cpu']}",
                  flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
