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
from typing import TextIO

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
               retransmit: float = 2.0, start_at: float | None = None) -> dict:
    """Keep ``concurrency`` exchanges in flight for ``warmup + seconds``; count completions.

    ``start_at`` (a ``time.monotonic()`` value: the clock is system-wide) lines up the
    windows of all workers with the driver's responder-CPU samples.
    """
    if start_at is not None and (lag := start_at - time.monotonic()) > 0:
        time.sleep(lag)
    sel = selectors.DefaultSelector()
    net = ipaddress.ip_network(client_net)
    stride = net.num_addresses // 16  # workers (up to 16) take disjoint ranges of /32s
    counter = iter(range(1 + (index % 16) * stride, (index % 16 + 1) * stride))

    def next_addr() -> ipaddress.IPv4Address:
        return net.network_address + next(counter)

    phase1 = SUITES[group]
    t0 = time.monotonic()
    late = t0 - start_at if start_at is not None else 0.0
    t_measure, t_end = t0 + warmup, t0 + warmup + seconds
    done_in_window = failures = timeouts = 0
    cpu_measure: float | None = None  # our own CPU at the start of the window
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
        if cpu_measure is None and now >= t_measure:
            cpu_measure = time.process_time()
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
    cpu_window = time.process_time() - (cpu_measure if cpu_measure is not None else 0.0)
    for ex in list(live):
        close(ex)
    latencies.sort()
    return {"completed": done_in_window, "seconds": seconds, "failures": failures, "timeouts": timeouts,
            "latencies": latencies, "cpu": round(cpu_window, 3), "late": round(late, 3)}


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
                    extra_conf=f"  threads = {args.charon_threads}\n"
                               f"  block_threshold = {args.charon_block_threshold}\n").start()
    charon.load(ikev1_gateway_conf(
        "198.51.100.1", args.psk, remote_ts=args.client_net,
        proposals="aes128-sha1-ecp256,aes128-sha1-modp2048", esp_proposals="aes128-sha1"))
    return Responder("198.51.100.1", args.psk, c, [charon.pid], charon.stop,
                     f"strongSwan {_strongswan_version()} charon (kernel-libipsec, threads={args.charon_threads})")


#: ``twistd -n narsuite`` config for the bench: one PSK policy for every client, the same
#: proposals as the strongSwan anchor, ``remote_ts`` covering the clients' /32s, and the
#: half-open limits raised (the defaults, 16 per source, would drop most of the MM1s:
#: every bench client shares one source address).
NARSUITE_CONF = """\
[daemon]
state_dir = "{workdir}/state"
runtime_dir = "{workdir}/run"

[store]
backend = "{store}"
{store_extra}

[log]
level = "{log}"

[metrics]
enabled = false

[esp]

[ike]
half_open_per_source = 100000
half_open_total = 100000

[[ike.peers]]
name = "bench"
psk = "{psk}"
proposals = ["aes128-sha1-ecp256", "aes128-sha1-modp2048"]
esp = ["aes128-sha1"]
local_ts = ["10.1.0.0/24"]
remote_ts = ["{client_net}"]
"""


def setup_narsuite(lab: Lab, args: argparse.Namespace, workdir: Path) -> Responder:
    """Our responder: ``twistd -n narsuite --role=ike,esp`` on G (:class:`NarsuiteDaemon`),
    production defaults (SQLite store, ``[log] level = info``) unless
    ``--narsuite-store`` / ``--narsuite-log`` say otherwise."""
    from narsuite import __version__
    from narsuite.lab.daemon import NarsuiteDaemon

    c, g = _two_hosts(lab)
    home = workdir / "narsuite"
    home.mkdir(parents=True)
    cfg = home / "narsuite.toml"
    store_extra = ""
    redis_server = None
    if args.narsuite_store == "redis":
        # a redis-server on G's own loopback: the shared store's cost, not the network's
        from narsuite.lab.redis import RedisServer

        redis_server = RedisServer(6379, prefix=["ip", "netns", "exec", g.netns]).start()
        store_extra = '[store.redis]\nurl = "redis://127.0.0.1:6379"\n[cluster]\nnode_id = "bench"\n'
    cfg.write_text(NARSUITE_CONF.format(workdir=home, store=args.narsuite_store, log=args.narsuite_log,
                                        psk=args.psk, client_net=args.client_net, store_extra=store_extra))
    daemon = NarsuiteDaemon(g, cfg, roles=args.narsuite_roles).start()
    assert daemon.proc is not None  # `ip netns exec` execs: this PID is twistd itself

    def stop() -> None:
        # a clean stop sends a Delete for every SA (thousands after a run): allow for it,
        # then fall back to SIGKILL (the bench does not test shutdown)
        try:
            daemon.terminate(timeout=60)
        except (AssertionError, subprocess.TimeoutExpired):
            if daemon.alive():
                daemon.kill9()
        if redis_server is not None:
            redis_server.close()

    return Responder("198.51.100.1", args.psk, c, [daemon.proc.pid], stop,
                     f"narsuite {__version__} twistd (roles {args.narsuite_roles}, store {args.narsuite_store}, "
                     f"log {args.narsuite_log})")


def setup_none(lab: Lab | None, args: argparse.Namespace, workdir: Path) -> Responder:
    """An already running responder at ``--target`` (``--responder-pid`` for its CPU)."""
    if not args.target:
        raise SystemExit("--responder none needs --target")
    return Responder(args.target, args.psk, None, list(args.responder_pid or []), description=f"external {args.target}")


RESPONDERS: dict[str, Callable[..., Responder]] = {"strongswan": setup_strongswan, "narsuite": setup_narsuite,
                                                   "none": setup_none}


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


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (not idle, not iowait) since boot: with the
    responder's and the load generator's own CPU it tells what *other* processes took."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# driver

GROUP_NAMES = {19: "ecp256", 14: "modp2048"}


def _sleep_until(t: float) -> None:
    if (d := t - time.monotonic()) > 0:
        time.sleep(d)


def measure(resp: Responder, args: argparse.Namespace, group: int) -> dict:
    """One measurement: ``--workers`` load processes started together at ``t0``; the
    responder's CPU is sampled exactly at the edges of their measured window."""
    t0 = time.monotonic() + args.start_delay  # time for the workers' interpreters to start
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--target", resp.target, "--psk", resp.psk,
            "--groups", str(group), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
            "--concurrency", str(args.concurrency), "--client-net", args.client_net, "--start-at", repr(t0)]
    procs = []
    for i in range(args.workers):
        cmd = [*argv, "--index", str(i)]
        if resp.client is not None:
            procs.append(resp.client.popen(cmd, stdout=subprocess.PIPE, text=True))
        else:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    _sleep_until(t0 + args.warmup)
    cpu0, busy0, wall0 = _cpu_seconds(resp.pids), _busy_cpu_seconds(), time.monotonic()
    _sleep_until(t0 + args.warmup + args.seconds)
    cpu1, busy1, wall1 = _cpu_seconds(resp.pids), _busy_cpu_seconds(), time.monotonic()
    results = [json.loads(p.communicate(timeout=args.start_delay + args.warmup + args.seconds + 60)[0])
               for p in procs]
    lat = sorted(x for r in results for x in r["latencies"])
    completed = sum(r["completed"] for r in results)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else float("nan")

    cpu = cpu1 - cpu0
    loadgen = sum(r.get("cpu", 0.0) for r in results)
    return {"group": group, "group_name": GROUP_NAMES.get(group, str(group)), "completed": completed,
            "per_second": round(completed / args.seconds, 1),
            "failures": sum(r["failures"] for r in results), "timeouts": sum(r["timeouts"] for r in results),
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
            "responder_cpu": round(cpu / (wall1 - wall0), 2) if resp.pids else None,
            "responder_cpu_ms_per_exchange": round(1000 * cpu / completed, 2) if resp.pids and completed else None,
            "loadgen_cpu": round(loadgen / args.seconds, 2),
            # everything else on the machine (other users, the kernel's softirqs for our traffic)
            "other_cpu": round(max(0.0, (busy1 - busy0) - cpu - loadgen) / (wall1 - wall0), 2),
            "workers_late_s": max((r.get("late", 0.0) for r in results), default=0.0)}


def run_one(name: str, args: argparse.Namespace, group: int) -> dict:
    """A fresh lab and responder for one (responder, group) measurement: SAs accumulate, so
    nothing measured before may slow what comes after."""
    with tempfile.TemporaryDirectory(prefix="bench_ike_") as tmp:
        lab = Lab() if name != "none" else None
        try:
            resp = RESPONDERS[name](lab, args, Path(tmp))
            try:
                row = measure(resp, args, group)
            finally:
                resp.stop()
        finally:
            if lab is not None:
                lab.close()
    row["responder"] = name
    row["description"] = resp.description
    return row


def _median(values: list) -> float | None:
    vals = sorted(v for v in values if v is not None and v == v)  # drop None and NaN
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else round((vals[mid - 1] + vals[mid]) / 2, 3)


def summarize(runs: list[dict]) -> list[dict]:
    """Medians over the repeats, per (group, responder), in the order first measured."""
    keys: list[tuple[int, str]] = []
    for r in runs:
        if (r["group"], r["responder"]) not in keys:
            keys.append((r["group"], r["responder"]))
    out = []
    for group, name in keys:
        rs = [r for r in runs if (r["group"], r["responder"]) == (group, name)]
        out.append({
            "group": group, "group_name": GROUP_NAMES.get(group, str(group)), "responder": name,
            "description": rs[0]["description"], "repeats": len(rs),
            "per_second": _median([r["per_second"] for r in rs]),
            "per_second_all": [r["per_second"] for r in rs],
            "latency_ms": {q: _median([r["latency_ms"][q] for r in rs]) for q in ("p50", "p90", "p99")},
            "responder_cpu": _median([r["responder_cpu"] for r in rs]),
            "responder_cpu_ms_per_exchange": _median([r["responder_cpu_ms_per_exchange"] for r in rs]),
            "loadgen_cpu": _median([r["loadgen_cpu"] for r in rs]),
            "other_cpu": _median([r["other_cpu"] for r in rs]),
            "failures": sum(r["failures"] for r in rs), "timeouts": sum(r["timeouts"] for r in rs),
        })
    return out


def _fmt(v: object, width: int) -> str:
    return f"{'-' if v is None else v:>{width}}"


def print_summary(summary: list[dict], args: argparse.Namespace, out: TextIO = sys.stdout,
                  exchange: str = "MM+QM", suite: str = "aes128-sha1") -> None:
    """The summary table; ``exchange`` names what one completed unit is (bench_ikev2: INIT+AUTH)."""
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    say(f"\n{exchange} per second, PSK, {suite}; medians of {args.repeat} run(s) of {args.seconds:g} s "
          f"(+{args.warmup:g} s warm-up), {args.workers}x{args.concurrency} in flight, {os.cpu_count()} CPUs "
          f"shared by load generator and responder")
    head = (f"{'group':<9} {'responder':<11} {exchange + '/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
            f"{'resp CPU':>8} {'CPU ms/ex':>9} {'gen CPU':>7} {'other':>5} {'fail':>5} {'tmo':>4}  runs ({exchange}/s)")
    say(head)
    say("-" * len(head))
    for s in summary:
        lat = s["latency_ms"]
        say(f"{s['group_name']:<9} {s['responder']:<11} {_fmt(s['per_second'], 8)} {_fmt(lat['p50'], 7)} "
              f"{_fmt(lat['p90'], 7)} {_fmt(lat['p99'], 7)} {_fmt(s['responder_cpu'], 8)} "
              f"{_fmt(s['responder_cpu_ms_per_exchange'], 9)} {_fmt(s['loadgen_cpu'], 7)} {_fmt(s['other_cpu'], 5)} "
              f"{s['failures']:>5} "
              f"{s['timeouts']:>4}  {s['per_second_all']}")
    names = list(dict.fromkeys(s["responder"] for s in summary))
    if len(names) == 2:
        a, b = names
        for group in dict.fromkeys(s["group"] for s in summary):
            x = next(s for s in summary if s["group"] == group and s["responder"] == a)
            y = next(s for s in summary if s["group"] == group and s["responder"] == b)
            rate = round(x["per_second"] / y["per_second"], 2) if x["per_second"] and y["per_second"] else None
            cpu = (round(x["responder_cpu_ms_per_exchange"] / y["responder_cpu_ms_per_exchange"], 2)
                   if x["responder_cpu_ms_per_exchange"] and y["responder_cpu_ms_per_exchange"] else None)
            say(f"{GROUP_NAMES.get(group, group):<9} {a}/{b}: throughput x{rate}, responder CPU per exchange x{cpu}")
    for d in dict.fromkeys(s["description"] for s in summary):
        say(f"  {d}")
    say("  resp CPU / gen CPU / other: cores busy with the responder, the load generator, and anything else "
          f"(other users, softirqs); CPU ms/ex: responder CPU per completed {exchange}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--responder", default="strongswan",
                    help=f"comma-separated, measured one after the other: {', '.join(sorted(RESPONDERS))}")
    ap.add_argument("--compare", action="store_true",
                    help="shorthand for --responder narsuite,strongswan (side by side, same lab and load)")
    ap.add_argument("--repeat", type=int, default=1, help="measure every (group, responder) this often; "
                                                          "the summary shows medians")
    ap.add_argument("--target", help="responder address (with --responder none, or for --worker)")
    ap.add_argument("--responder-pid", type=int, action="append", help="PID(s) whose CPU to report (none)")
    ap.add_argument("--psk", default="bench-psk-0123456789")
    ap.add_argument("--groups", default="19,14", help="DH groups to measure, in order")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--start-delay", type=float, default=1.5, help="seconds for the workers to start up")
    ap.add_argument("--concurrency", type=int, default=32, help="exchanges in flight per worker")
    ap.add_argument("--workers", type=int, default=1, help="load generator processes")
    ap.add_argument("--client-net", default="10.128.0.0/9", help="inner addresses the clients ask for")
    ap.add_argument("--charon-threads", type=int, default=16)
    ap.add_argument("--charon-block-threshold", type=int, default=100000,
                    help="charon's half-open IKE SAs per source IP (its default 5 drops most bench MM1s: "
                         "all clients share one address)")
    ap.add_argument("--narsuite-roles", default="ike,esp")
    ap.add_argument("--narsuite-store", default="sqlite", choices=("sqlite", "memory", "redis"))
    ap.add_argument("--narsuite-log", default="info", choices=("debug", "info", "warn", "error"))
    ap.add_argument("--json", action="store_true", help="print {settings, runs, summary} as JSON at the end")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    groups = [int(g) for g in args.groups.split(",")]

    if args.worker:
        res = run_worker(args.target, args.psk.encode(), groups[0], args.seconds, args.warmup, args.concurrency,
                         args.client_net, args.index, start_at=args.start_at)
        print(json.dumps(res))
        return 0

    names = ["narsuite", "strongswan"] if args.compare else [n.strip() for n in args.responder.split(",")]
    for n in names:
        if n not in RESPONDERS:
            ap.error(f"unknown responder {n!r}; expected one of {', '.join(sorted(RESPONDERS))}")

    out = sys.stderr if args.json else sys.stdout  # with --json the human-readable text goes to stderr
    runs = []
    # interleaved (repeat > group > responder): a drift of the machine during the run hits
    # every responder alike
    for rep in range(args.repeat):
        for group in groups:
            for name in names:
                row = run_one(name, args, group)
                row["repeat"] = rep
                runs.append(row)
                print(f"[{rep + 1}/{args.repeat}] {row['description']}: group {group} ({row['group_name']}): "
                      f"{row['per_second']} MM+QM/s ({row['completed']} in {args.seconds:g} s, "
                      f"{args.workers}x{args.concurrency} in flight), latency p50/p90/p99 "
                      f"{row['latency_ms']['p50']}/{row['latency_ms']['p90']}/{row['latency_ms']['p99']} ms, "
                      f"failures {row['failures']}, timeouts {row['timeouts']}, responder CPU "
                      f"{row['responder_cpu']} ({row['responder_cpu_ms_per_exchange']} ms/exchange), "
                      f"load generator CPU {row['loadgen_cpu']}, other CPU {row['other_cpu']}", file=out, flush=True)
    summary = summarize(runs)
    if args.json:
        settings = {k: getattr(args, k) for k in ("seconds", "warmup", "concurrency", "workers", "repeat",
                                                  "client_net", "charon_threads", "narsuite_roles",
                                                  "narsuite_store", "narsuite_log")}
        settings.update(responders=names, groups=groups, cpus=os.cpu_count())
        print(json.dumps({"settings": settings, "runs": runs, "summary": summary}, indent=2))
    print_summary(summary, args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
