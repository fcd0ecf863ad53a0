"""IKEv2 responder load: completed IKE_SA_INIT + IKE_AUTH exchanges per second (PSK, one
CHILD SA each), narsuite against strongSwan 5.9 from the same initiator in one run.

Run (root):
    python bench/bench_ikev2.py --compare --repeat 3 [--groups 19,14] [--seconds 10]

The load generator is ``tests/ikev2_peer.py``'s sans-IO :class:`Initiator`, many at a time in
one epoll loop per worker: each exchange has its own UDP sockets (distinct source ports),
floats to 4500 (``force_nat``: remote-access clients are NATed) and asks for its own ``/32``
inside ``--client-net``.  ``--concurrency`` exchanges are always in flight per worker.  The
lab, the responders' CPU accounting and the summary are ``bench/bench_ike.py``'s: a two-host
lab (client C 198.51.100.2 -- responder G 198.51.100.1), a fresh lab per measurement (SAs
accumulate), responders interleaved per repeat, medians.  Both responders get their
anti-clogging thresholds raised: every bench client shares one source address.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import bench_ike as B  # noqa: E402
import ikev2_peer as P  # noqa: E402

from narsuite.lab import Lab  # noqa: E402

GROUP_NAMES = {19: "ecp256", 14: "modp2048", 31: "curve25519"}
# bench_ike.measure starts its workers as ``python <bench_ike's __file__> --worker``: point it
# at this script, whose --worker runs the IKEv2 initiators (the rest of measure is shared)
B.__file__ = str(Path(__file__).resolve())


def run_worker(target: str, psk: bytes, group: int, seconds: float, warmup: float, concurrency: int,
               client_net: str, index: int, timeout: float = 10.0, retransmit: float = 2.0,
               start_at: float | None = None) -> dict:
    if start_at is not None and (lag := start_at - time.monotonic()) > 0:
        time.sleep(lag)
    sel = selectors.DefaultSelector()
    net = ipaddress.ip_network(client_net)
    stride = net.num_addresses // 16
    counter = iter(range(1 + (index % 16) * stride, (index % 16 + 1) * stride))
    t0 = time.monotonic()
    t_measure, t_end = t0 + warmup, t0 + warmup + seconds
    done = failures = timeouts = 0
    cpu_measure: float | None = None
    latencies: list[float] = []
    live: dict[P.Initiator, list] = {}  # initiator -> [socks by port, started, last_sent]

    def close(ini: P.Initiator) -> None:
        for s in live.pop(ini)[0].values():
            sel.unregister(s)
            s.close()

    def send(ini: P.Initiator, out: P.Outgoing) -> None:
        state = live[ini]
        s = state[0].get(out.port)
        if s is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 0))
            s.connect((target, out.port))
            s.setblocking(False)
            state[0][out.port] = s
            sel.register(s, selectors.EVENT_READ, (ini, out.port))
        try:
            s.send(out.data)
        except OSError:
            pass
        state[2] = time.monotonic()

    def start() -> None:
        addr = net.network_address + next(counter)
        ini = P.Initiator(psk, f"bench{index}.example", group, f"{addr}/32", "10.1.0.0/24")
        live[ini] = [{}, time.monotonic(), time.monotonic()]
        send(ini, ini.start())

    for _ in range(concurrency):
        start()
    last_sweep = time.monotonic()
    while (now := time.monotonic()) < t_end:
        if cpu_measure is None and now >= t_measure:
            cpu_measure = time.process_time()
        for key, _ in sel.select(timeout=0.1):
            ini, port = key.data
            if ini not in live:
                continue
            try:
                reply = ini.receive(key.fileobj.recv(65535), port)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            except P.PeerError:
                failures += 1
                close(ini)
                start()
                continue
            if reply is not None:
                send(ini, reply)
            if ini.done:
                finished = time.monotonic()
                if finished >= t_measure:
                    done += 1
                    latencies.append(finished - live[ini][1])
                close(ini)
                if finished < t_end:
                    start()
        now = time.monotonic()
        if now - last_sweep >= 0.2:
            last_sweep = now
            for ini, (_s, started, last_sent) in list(live.items()):
                if now - started >= timeout:
                    timeouts += 1
                    close(ini)
                    start()
                elif now - last_sent >= retransmit and (out := ini.retransmit()) is not None:
                    send(ini, out)
    cpu_window = time.process_time() - (cpu_measure or 0.0)
    for ini in list(live):
        close(ini)
    latencies.sort()
    return {"completed": done, "seconds": seconds, "failures": failures, "timeouts": timeouts,
            "latencies": latencies, "cpu": round(cpu_window, 3), "late": 0.0}


STRONGSWAN_CONF = """\
connections {{
  rw {{
    version = 2
    proposals = aes128-sha256-ecp256,aes128-sha256-modp2048,aes128-sha256-curve25519
    local_addrs = 198.51.100.1
    local {{
      auth = psk
      id = gw.example
    }}
    remote {{
      auth = psk
    }}
    children {{
      net {{
        local_ts = 10.1.0.0/24
        remote_ts = {client_net}
        esp_proposals = aes128-sha256
      }}
    }}
  }}
}}
secrets {{
  ike-1 {{
    secret = "{psk}"
  }}
}}
"""


def setup_strongswan(lab: Lab, args: argparse.Namespace, workdir: Path) -> B.Responder:
    """charon on G (kernel-libipsec, IKEv2 PSK, logging off, cookies and blocking per source
    raised): the anchor."""
    from narsuite.lab.strongswan import Charon

    c, g = B._two_hosts(lab)
    # kernel-libipsec routes each CHILD SA's remote selector with a source address inside the
    # local selector; without one on G the route fails and IKEv2 refuses the CHILD SA
    # (TS_UNACCEPTABLE).  In the remote-access lab G has 10.1.0.1 on its inside interface.
    g.run(["ip", "addr", "add", "10.1.0.1/24", "dev", "lo"])
    charon = Charon(g, workdir / "g", log_levels={"default": -1, "ike": 0, "cfg": -1, "knl": -1, "enc": -1,
                                                  "net": -1},
                    extra_conf=f"  threads = {args.charon_threads}\n"
                               f"  block_threshold = {args.charon_block_threshold}\n"
                               f"  cookie_threshold = {args.charon_block_threshold}\n").start()
    charon.load(STRONGSWAN_CONF.format(client_net=args.client_net, psk=args.psk))
    return B.Responder("198.51.100.1", args.psk, c, [charon.pid], charon.stop,
                       f"strongSwan {B._strongswan_version()} charon (kernel-libipsec, threads={args.charon_threads})")


NARSUITE_CONF = """\
[daemon]
state_dir = "{workdir}/state"
runtime_dir = "{workdir}/run"

[store]
backend = "{store}"

[log]
level = "{log}"

[metrics]
enabled = false

[esp]

[ike]
half_open_per_source = 100000
half_open_total = 100000
ikev2_cookie_threshold = 100000

[[ike.peers]]
name = "bench"
versions = [2]
psk = "{psk}"
local_id = "gw.example"
ikev2_proposals = ["aes128-sha256-ecp256-modp2048-curve25519"]
esp = ["aes128-sha256"]
local_ts = ["10.1.0.0/24"]
remote_ts = ["{client_net}"]
"""


def setup_narsuite(lab: Lab, args: argparse.Namespace, workdir: Path) -> B.Responder:
    """``twistd -n narsuite --role=ike,esp`` on G, SQLite store, log level info."""
    from narsuite import __version__
    from narsuite.lab.daemon import NarsuiteDaemon

    c, g = B._two_hosts(lab)
    home = workdir / "narsuite"
    home.mkdir(parents=True)
    cfg = home / "narsuite.toml"
    cfg.write_text(NARSUITE_CONF.format(workdir=home, store=args.narsuite_store, log=args.narsuite_log,
                                        psk=args.psk, client_net=args.client_net))
    daemon = NarsuiteDaemon(g, cfg, roles="ike,esp").start()
    assert daemon.proc is not None

    def stop() -> None:
        try:
            daemon.terminate(timeout=60)
        except (AssertionError, subprocess.TimeoutExpired):
            if daemon.alive():
                daemon.kill9()

    return B.Responder("198.51.100.1", args.psk, c, [daemon.proc.pid], stop,
                       f"narsuite {__version__} twistd (roles ike,esp, store {args.narsuite_store}, "
                       f"log {args.narsuite_log})")


RESPONDERS = {"narsuite": setup_narsuite, "strongswan": setup_strongswan}


def run_one(name: str, args: argparse.Namespace, group: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_ikev2_") as tmp:
        lab = Lab()
        try:
            resp = RESPONDERS[name](lab, args, Path(tmp))
            try:
                row = B.measure(resp, args, group)
            finally:
                resp.stop()
        finally:
            lab.close()
    row["responder"] = name
    row["description"] = resp.description
    row["group_name"] = GROUP_NAMES.get(group, str(group))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--responder", default="narsuite,strongswan")
    ap.add_argument("--compare", action="store_true", help="narsuite and strongSwan, interleaved")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--target")
    ap.add_argument("--psk", default="bench-psk-0123456789")
    ap.add_argument("--groups", default="19,14")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--start-delay", type=float, default=1.5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--client-net", default="10.128.0.0/9")
    ap.add_argument("--charon-threads", type=int, default=16)
    ap.add_argument("--charon-block-threshold", type=int, default=100000)
    ap.add_argument("--narsuite-store", default="sqlite", choices=("sqlite", "memory"))
    ap.add_argument("--narsuite-log", default="info", choices=("debug", "info", "warn", "error"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    groups = [int(g) for g in args.groups.split(",")]
    if args.worker:
        print(json.dumps(run_worker(args.target, args.psk.encode(), groups[0], args.seconds, args.warmup,
                                    args.concurrency, args.client_net, args.index, start_at=args.start_at)))
        return 0
    B.GROUP_NAMES.update(GROUP_NAMES)
    names = ["narsuite", "strongswan"] if args.compare else [n.strip() for n in args.responder.split(",")]
    out = sys.stderr if args.json else sys.stdout
    runs = []
    for rep in range(args.repeat):
        for group in groups:
            for name in names:
                row = run_one(name, args, group)
                row["repeat"] = rep
                runs.append(row)
                print(f"[{rep + 1}/{args.repeat}] {row['description']}: {row['group_name']}: {row['per_second']} "
                      f"INIT+AUTH/s, p50/p90/p99 {row['latency_ms']['p50']}/{row['latency_ms']['p90']}/"
                      f"{row['latency_ms']['p99']} ms, failures {row['failures']}, timeouts {row['timeouts']}, "
                      f"responder CPU {row['responder_cpu']} ({row['responder_cpu_ms_per_exchange']} ms/exchange), "
                      f"loadgen {row['loadgen_cpu']}, other {row['other_cpu']}", file=out, flush=True)
    summary = B.summarize(runs)
    if args.json:
        print(json.dumps({"settings": vars(args) | {"cpus": os.cpu_count()}, "runs": runs, "summary": summary},
                         indent=2, default=str))
    B.print_summary(summary, args, out, exchange="INIT+AUTH", suite="aes128-sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
