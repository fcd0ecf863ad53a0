"""SOCKS5 server: narsuite's nar role against Dante (the anchor), same run, same load.

Run (root, Dante installed: ``apt-get install dante-server``):

    python bench/bench_socks.py [--seconds 4] [--connect-workers 16] [--udp-workers 8] [--streams 1]
                                [--only dante|narsuite] [--server twistd|script] [--workers 1]
                                [--reactor default|epoll|narsuite-epoll] [--rounds 1]
                                [--store memory|sqlite|redis] [--compare-store] [--no-udp-offload]

``--rounds N`` measures both servers N times, in alternating order, and reports each
figure's median and every round's ratios: on this shared 2-core machine Dante's own
figures move by 20-40% between runs minutes apart, so one round's ratio is mostly noise.

Both servers listen on 127.0.0.1 and relay to local targets (bench/socks_load.py):

* CONNECT rate: N client processes each loop {TCP connect, no-auth greeting,
  CONNECT to a TCP echo, send 16 bytes, read them back, close}; connections/s,
  and the server's CPU per connection;
* bulk relay: one CONNECT stream to a sink (upload) and, separately, from a
  source (download); MB/s (10^6 B) and the server's CPU-seconds per GiB relayed;
* UDP ASSOCIATE: N clients each ping-pong 32-byte datagrams through the relay
  to a UDP echo; round trips/s and the server's CPU per round trip.

Server CPU is utime+stime (+ reaped children) summed over the server's process
tree from /proc, sampled at the start and end of each measurement window;
Dante forks helper processes, narsuite is one reactor thread.  Everything,
load generator included, shares the machine's cores: the load generator's
CPU and the machine's idle share are printed too, to show who the bottleneck was.

``--server twistd`` (the default) runs narsuite as the README says an operator does,
``twistd -n narsuite --config FILE --role=nar``, with a config this script writes:
memory store, metrics off, ``[log] level = "warn"``, ``decision_log_level = "debug"``
(neither server logs per session), ``[nar] workers`` from ``--workers`` (default 1, the
config default), and no ``--reactor`` unless ``--reactor`` asks for one: what runs is
what ``twistd narsuite`` installs by itself: narsuite's lean reactor and, with one worker,
the lean CONNECT relay (narsuite/nar/lean.py).  Streams past 256 KiB are relayed with
splice(2) (``[nar] splice``, on by default).

``--store`` is the twistd server's ``[store] backend`` (default memory; sqlite: the file in
its state_dir, the daemon's default; redis: a redis-server this script starts on loopback for the
run, persistence off, killed by PID afterwards, ``[cluster] node_id = "bench"``).
``--compare-store`` measures narsuite on SQLite against narsuite on Redis instead of Dante
against narsuite, in the same alternating rounds (ratios are redis/sqlite): the CONNECT path
(narsuite/nar/lean.py) writes nothing to the store, so this measures what a node on Redis
adds beside it -- the stream reader, writer and heartbeat threads sharing the GIL.  The
per-window table then also gives redis-server's own CPU.

Dante runs from a config this script writes into a temporary directory
(method none, pass from 127.0.0.0/8, no per-session logging), in the
foreground, and is stopped by PID.  narsuite's server runs from a tiny
script running the SocksFactory the nar role runs (no twistd, no other services): memory store, epoll reactor,
decision log level debug and narsuite log level warn (Dante logs nothing
per session either).  ``--workers`` is ``[nar] workers`` (default 0: one
reactor process per CPU; 1: the single-process server): the script then does
what the role does, an SO_REUSEPORT port in its process plus a WorkerPool of
``python -m narsuite.nar.worker`` processes, all counted as the server's CPU.  If narsuite's server cannot be
imported or started its column reads "not available" and Dante is still measured.
``--reactor narsuite-epoll`` runs narsuite's server (and its worker processes)
under narsuite's lean epoll reactor (narsuite/reactor.py) instead of Twisted's.
The script always listens with ``listenTCP``: every connection takes the protocol's
Twisted-transport path, never the role's lean CONNECT relay (use ``--server twistd``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import socks_load as load  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")

DANTE_CONF = """\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
}}
socks pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    command: connect udpassociate
}}
socks pass {{
    from: 0.0.0.0/0 to: 127.0.0.0/8
    command: udpreply
}}
"""

NARSUITE_SERVER = textwrap.dedent("""
    import sys
    if sys.argv[3] == "narsuite-epoll":
        from narsuite import reactor as lean
        lean.install()
    else:
        from twisted.internet import epollreactor
        epollreactor.install()
    from twisted.internet import reactor
    from narsuite import logs, schema
    from narsuite.metrics import Metrics
    from narsuite.nar import records
    from narsuite.nar.config import NarConfig
    from narsuite.nar.server import SocksFactory
    from narsuite.store import Store

    port, workers = int(sys.argv[1]), int(sys.argv[2])
    logs.set_level("warn")
    config = schema.build(NarConfig, {"listen": "127.0.0.1", "port": port, "methods": ["none"],
                                      "rules": [{"action": "pass"}], "decision_log_level": "debug",
                                      "workers": workers}, "nar")
    store = Store()
    for spec in getattr(records, "KINDS", ()):
        try:
            store.register(spec)
        except Exception:
            pass  # already registered
    factory = SocksFactory(config, store, Metrics(), reactor=reactor)
    from narsuite.nar.workers import ReusePortServer, WorkerPool, worker_count
    processes = worker_count(config.workers)
    if processes > 1:  # what NarService does with [nar] workers
        ReusePortServer(reactor, "127.0.0.1", port, factory).startService()
        pool = WorkerPool(config, factory, reactor, processes - 1, log_level="warn")
        pool.startService()
        reactor.addSystemEventTrigger("before", "shutdown", pool.stopService)
    else:
        reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=4096)
    print("READY", flush=True)
    reactor.run()
""")


# ---------------------------------------------------------------- CPU accounting

def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime in ticks) of one process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def tree_cpu(root: int) -> float:
    """CPU seconds of root and all its descendants (reaped children counted via cutime/cstime)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                stats[int(name)] = st
    total, todo, seen = 0, [root], set()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total / CLK_TCK


def tree_pids(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def machine_idle() -> tuple[int, int]:
    """(idle+iowait ticks, total ticks) from /proc/stat."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in f]
    return v[3] + v[4], sum(v[:8])


# ---------------------------------------------------------------- servers

def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server by PID, then SIGKILL any of its own descendants still there."""
    pids = tree_pids(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pid in pids[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_dante(tmp: Path) -> tuple[subprocess.Popen, int]:
    danted = shutil.which("danted") or "/usr/sbin/danted"
    if not os.path.exists(danted):
        raise RuntimeError("danted not found (apt-get install dante-server)")
    port = load.free_port()
    conf = tmp / "danted.conf"
    conf.write_text(DANTE_CONF.format(port=port, log=tmp / "danted.log"))
    proc = subprocess.Popen([danted, "-f", str(conf), "-p", str(tmp / "danted.pid"), "-N", "1"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "danted.err", "w"))
    try:
        wait_listening(port, proc)
    except RuntimeError as e:
        stop(proc)
        raise RuntimeError(f"danted: {e}: {(tmp / 'danted.err').read_text()[-400:]}") from None
    return proc, port


# Worker processes (``python -m narsuite.nar.worker``) call epollreactor.install()
# themselves; under --reactor narsuite-epoll this sitecustomize, on the server's
# PYTHONPATH only, makes that install narsuite's reactor instead.
LEAN_SITECUSTOMIZE = textwrap.dedent("""
    import os
    if os.environ.get("NARSUITE_BENCH_REACTOR") == "narsuite-epoll":
        from twisted.internet import epollreactor
        import narsuite.reactor
        epollreactor.install = narsuite.reactor.install
""")


TWISTD_CONFIG = """\
[daemon]
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"
[store]
backend = "{store}"
{store_extra}
[metrics]
enabled = false
[log]
level = "warn"
[nar]
listen = "127.0.0.1"
port = {port}
methods = ["none"]
decision_log_level = "debug"
workers = {workers}
splice = {splice}
udp_offload = "{udp_offload}"
[[nar.rules]]
action = "pass"
"""


def start_twistd(tmp: Path, workers: int = 1, reactor: str = "default", splice: bool = True,
                 store: str = "memory", redis_url: str | None = None,
                 udp_offload: bool = True) -> tuple[subprocess.Popen, int]:
    """The nar role as an operator runs it: ``twistd -n narsuite --config ... --role=nar``
    (``--reactor`` only when asked for; by default ``twistd narsuite`` picks the reactor);
    ``store`` is ``[store] backend``, ``redis_url`` the redis-server of ``store = "redis"``."""
    port = load.free_port()
    run = tmp / f"twistd-{port}"
    run.mkdir()
    conf = run / "narsuite.toml"
    store_extra = ""
    if store == "redis":
        if redis_url is None:
            raise RuntimeError("store redis needs a redis-server (redis_url)")
        store_extra = f'[store.redis]\nurl = "{redis_url}"\n[cluster]\nnode_id = "bench"'
    conf.write_text(TWISTD_CONFIG.format(tmp=run, port=port, workers=workers,
                                         splice="true" if splice else "false",
                                         udp_offload="auto" if udp_offload else "off",
                                         store=store, store_extra=store_extra))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    opts = [] if reactor == "default" else [f"--reactor={reactor}"]
    err = run / "twistd.log"
    proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                             *opts, "-n", "--pidfile=", "narsuite", "--config", str(conf), "--role=nar"],
                            env=env, cwd=run, stdout=open(err, "w"), stderr=subprocess.STDOUT)
    try:
        wait_listening(port, proc, 30)
        if workers != 1:
            time.sleep(2.0)
    except RuntimeError as e:
        stop(proc)
        tail = err.read_text().strip().splitlines()
        raise RuntimeError(f"{e}: {tail[-3:] if tail else ''}") from None
    return proc, port


def start_narsuite(tmp: Path, workers: int = 1, reactor: str = "epoll") -> tuple[subprocess.Popen, int]:
    port = load.free_port()
    script = tmp / "nar_server.py"
    script.write_text(NARSUITE_SERVER)
    path = [str(ROOT)]
    env = dict(os.environ)
    if reactor == "narsuite-epoll":
        site = tmp / "lean-site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(LEAN_SITECUSTOMIZE)
        path.append(str(site))
        env["NARSUITE_BENCH_REACTOR"] = reactor
    env["PYTHONPATH"] = os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")])
    err = tmp / "nar.err"
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(workers), reactor], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"))
    try:
        wait_listening(port, proc, 20)
        if workers != 1:
            time.sleep(2.0)  # the worker processes join the port after the main one
    except RuntimeError as e:
        stop(proc)
        tail = err.read_text().strip().splitlines()
        raise RuntimeError(f"{e}: {tail[-1] if tail else ''}") from None
    return proc, port


# ---------------------------------------------------------------- measurements

def measure(server_pid: int, fn, n: int, proxy, target, seconds: float, tg: load.Targets,
            store_pid: int | None = None) -> dict:
    """Runs n workers of fn for `seconds`, sampling the server's CPU (and the redis-server's,
    ``store_pid``, when there is one) at the window's edges."""
    warm = 0.5
    t_start = time.monotonic() + 0.3 + warm
    t_end = t_start + seconds
    procs, q = load.run_workers(fn, n, proxy, target, t_start, t_end)
    time.sleep(max(0.0, t_start - time.monotonic()))
    cpu0, idle0 = tree_cpu(server_pid), machine_idle()
    store0 = tree_cpu(store_pid) if store_pid else 0.0
    targets0 = sum(tree_cpu(pid) for pid in tg.pids())
    time.sleep(max(0.0, t_end - time.monotonic()))
    cpu1, idle1 = tree_cpu(server_pid), machine_idle()
    store1 = tree_cpu(store_pid) if store_pid else 0.0
    targets1 = sum(tree_cpu(pid) for pid in tg.pids())
    r = load.collect(procs, q, 30)
    r["server_cpu"] = cpu1 - cpu0
    r["targets_cpu"] = targets1 - targets0
    r["store_cpu"] = store1 - store0 if store_pid else None
    r["seconds"] = seconds
    r["idle"] = (idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1])
    return r


def run_server(name: str, proc: subprocess.Popen, port: int, tg: load.Targets, args,
               store_pid: int | None = None) -> dict:
    proxy = ("127.0.0.1", port)
    out = {}
    print(f"[{name}] CONNECT rate, {args.connect_workers} workers, {args.seconds}s ...", file=sys.stderr)
    out["connect"] = measure(proc.pid, load.connect_worker, args.connect_workers, proxy,
                             ("127.0.0.1", tg.echo), args.seconds, tg, store_pid)
    print(f"[{name}] bulk upload ...", file=sys.stderr)
    out["upload"] = measure(proc.pid, load.upload_worker, args.streams, proxy,
                            ("127.0.0.1", tg.sink), args.bulk_seconds, tg, store_pid)
    print(f"[{name}] bulk download ...", file=sys.stderr)
    out["download"] = measure(proc.pid, load.download_worker, args.streams, proxy,
                              ("127.0.0.1", tg.source), args.bulk_seconds, tg, store_pid)
    print(f"[{name}] UDP ASSOCIATE round trips, {args.udp_workers} workers ...", file=sys.stderr)
    out["udp"] = measure(proc.pid, load.udp_worker, args.udp_workers, proxy,
                         ("127.0.0.1", tg.udp_echo), args.bulk_seconds, tg, store_pid)
    for k, r in out.items():
        if r["errors"]:
            print(f"[{name}] {k}: {r['errors']} errors, last: {r['last_error']}", file=sys.stderr)
    return out


def figures(res: dict) -> dict[str, float]:
    c, up, down, u = res["connect"], res["upload"], res["download"], res["udp"]
    gib = 1 << 30
    return {
        "conn_rate": c["ops"] / c["seconds"],
        "conn_cpu_us": c["server_cpu"] / c["ops"] * 1e6 if c["ops"] else float("nan"),
        "up_mbs": up["bytes"] / up["seconds"] / 1e6,
        "up_cpu_gib": up["server_cpu"] / (up["bytes"] / gib) if up["bytes"] else float("nan"),
        "down_mbs": down["bytes"] / down["seconds"] / 1e6,
        "down_cpu_gib": down["server_cpu"] / (down["bytes"] / gib) if down["bytes"] else float("nan"),
        "udp_rate": u["ops"] / u["seconds"],
        "udp_cpu_us": u["server_cpu"] / u["ops"] * 1e6 if u["ops"] else float("nan"),
        # Everything the load ran, per round trip: the kernel fast path relays in the softirq
        # of the process that sent the datagram, so its cost shows in the clients' and the
        # echo's system time, not the server's.  This figure is the fair one to compare then.
        "udp_all_cpu_us": (u["server_cpu"] + u["cpu"] + u["targets_cpu"]) / u["ops"] * 1e6
        if u["ops"] else float("nan"),
    }


ROWS = [
    ("conn_rate", "CONNECT rate, conn/s ({cw} workers)", "{:,.0f}", "higher"),
    ("conn_cpu_us", "server CPU per connection, µs", "{:,.0f}", "lower"),
    ("up_mbs", "bulk relay upload (client→target), MB/s ({st} stream)", "{:,.0f}", "higher"),
    ("up_cpu_gib", "server CPU per GiB, upload, CPU-s", "{:.2f}", "lower"),
    ("down_mbs", "bulk relay download (target→client), MB/s ({st} stream)", "{:,.0f}", "higher"),
    ("down_cpu_gib", "server CPU per GiB, download, CPU-s", "{:.2f}", "lower"),
    ("udp_rate", "UDP ASSOCIATE round trips/s ({uw} workers, 32 B)", "{:,.0f}", "higher"),
    ("udp_cpu_us", "server CPU per UDP round trip, µs", "{:,.1f}", "lower"),
    ("udp_all_cpu_us", "CPU per UDP round trip, server + clients + echo, µs", "{:,.1f}", "lower"),
]


#: (name, column label) of the anchor and of the server compared with it
PAIR = (("dante", "Dante"), ("narsuite", "narsuite"))
STORE_PAIR = (("sqlite", "narsuite on SQLite"), ("redis", "narsuite on Redis"))


def median_figures(rounds: list[dict[str, dict | str]], pair=PAIR) -> dict[str, dict | str]:
    """Per server, the median of each figure over the rounds it completed."""
    out: dict[str, dict | str] = {}
    for name, _ in pair:
        done = [figures(r[name]) for r in rounds if isinstance(r.get(name), dict)]
        if done:
            out[name] = {k: statistics.median(f[k] for f in done) for k in done[0]}
        else:
            out[name] = next((r[name] for r in rounds if name in r), None)
    return out


def figure_table(figs: dict[str, dict | str], args, pair=PAIR) -> str:
    """The anchor (Dante) against the other server (narsuite), one row per figure
    (``figs``: per server, figures() or why not)."""
    (a, a_label), (b, b_label) = pair
    d, n = figs.get(a), figs.get(b)
    lines = [f"| figure | {a_label} | {b_label} | ratio ({b}/{a}) |", "|---|---:|---:|---:|"]
    for key, label, fmt, better in ROWS:
        label = label.format(cw=args.connect_workers, st=args.streams, uw=args.udp_workers)
        dv = fmt.format(d[key]) if isinstance(d, dict) else (d or "not run")
        nv = fmt.format(n[key]) if isinstance(n, dict) else (n or "not run")
        ratio = "–"
        if isinstance(d, dict) and isinstance(n, dict) and d[key]:
            ratio = f"{n[key] / d[key]:.2f}× ({better} is better)"
        lines.append(f"| {label} | {dv} | {nv} | {ratio} |")
    return "\n".join(lines)


def table(results: dict[str, dict | str], args, pair=PAIR) -> str:
    """One round: the figure table, then who used the CPU in each window."""
    figs = {k: figures(v) if isinstance(v, dict) else v for k, v in results.items()}
    lines = [figure_table(figs, args, pair),
             "", "Load generator and machine during each window (who was the bottleneck):", "",
             "| server | figure | server CPU (cores) | clients CPU (cores) | targets CPU (cores) "
             "| redis-server CPU (cores) | machine idle | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in results.items():
        if not isinstance(v, dict):
            continue
        for k, r in v.items():
            s = r["seconds"]
            store = "–" if r.get("store_cpu") is None else f"{r['store_cpu'] / s:.2f}"
            lines.append(f"| {name} | {k} | {r['server_cpu'] / s:.2f} | {r['cpu'] / s:.2f} | "
                         f"{r['targets_cpu'] / s:.2f} | {store} | {r['idle']:.0%} | {r['errors']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="CONNECT-rate window")
    ap.add_argument("--bulk-seconds", type=float, default=3.0, help="bulk and UDP windows")
    ap.add_argument("--connect-workers", type=int, default=16)
    ap.add_argument("--udp-workers", type=int, default=8)
    ap.add_argument("--streams", type=int, default=1, help="parallel bulk streams")
    ap.add_argument("--only", choices=("dante", "narsuite", "sqlite", "redis"))
    ap.add_argument("--workers", type=int, default=1,
                    help="narsuite's [nar] workers: reactor processes on the port (0: one per CPU, "
                         "1: the single-process server, the default of [nar] workers)")
    ap.add_argument("--server", choices=("twistd", "script"), default="twistd",
                    help="twistd: `twistd -n narsuite --role=nar` as an operator runs it (default); "
                         "script: the SocksFactory alone in a small script")
    ap.add_argument("--reactor", choices=("default", "epoll", "narsuite-epoll"), default="default",
                    help="narsuite's reactor (workers included): default is what `twistd narsuite` "
                         "installs (narsuite-epoll; the script then uses narsuite-epoll too), epoll "
                         "Twisted's epoll reactor, narsuite-epoll the lean one")
    ap.add_argument("--no-splice", action="store_true",
                    help="[nar] splice = false: relay streams through Python (twistd server only)")
    ap.add_argument("--no-udp-offload", action="store_true",
                    help="[nar] udp_offload = \"off\": relay UDP ASSOCIATE through Python (twistd server only)")
    ap.add_argument("--store", choices=("memory", "sqlite", "redis"), default="memory",
                    help="the twistd server's [store] backend (redis: a redis-server the bench "
                         "starts on loopback)")
    ap.add_argument("--compare-store", action="store_true",
                    help="narsuite on SQLite against narsuite on Redis (twistd), instead of Dante "
                         "against narsuite")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds, each measuring both servers, in alternating order (Dante first "
                         "in odd rounds); the table gives each figure's median over the rounds")
    args = ap.parse_args()
    if args.server == "script" and (args.store != "memory" or args.compare_store):
        ap.error("--store and --compare-store need --server twistd (the script runs a memory store)")

    redis_server = None
    if args.compare_store or args.store == "redis":
        from narsuite.lab.redis import RedisServer, redis_unavailable_reason

        why = redis_unavailable_reason()
        if why:
            ap.error(f"--store redis: {why}")
        redis_server = RedisServer().start()  # loopback, persistence off; closed (by PID) below
    redis_url = None if redis_server is None else f"redis://{redis_server.host}:{redis_server.port}"
    store_pid = None if redis_server is None else redis_server.pid

    def start_store(store: str):  # type: ignore[no-untyped-def]
        def start(t: Path) -> tuple[subprocess.Popen, int]:
            return start_twistd(t, args.workers, args.reactor, not args.no_splice, store, redis_url,
                                not args.no_udp_offload)
        return start

    if args.server == "twistd":
        start_ours = start_store(args.store)
    else:
        def start_ours(t: Path) -> tuple[subprocess.Popen, int]:
            return start_narsuite(t, args.workers,
                                  "narsuite-epoll" if args.reactor == "default" else args.reactor)
    pair = STORE_PAIR if args.compare_store else PAIR
    if args.compare_store:
        servers = [("sqlite", start_store("sqlite")), ("redis", start_store("redis"))]
    else:
        servers = [("dante", start_dante), ("narsuite", start_ours)]
    rounds: list[dict[str, dict | str]] = []
    tg = load.Targets()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-socks-") as tmpdir:
            tmp = Path(tmpdir)
            for i in range(args.rounds):
                results: dict[str, dict | str] = {}
                rounds.append(results)
                # Alternate the order: a slow spell of the shared machine then does not
                # always fall on the same server's windows.
                for name, start in (servers if i % 2 == 0 else servers[::-1]):
                    if args.only and args.only != name:
                        continue
                    try:
                        proc, port = start(tmp)
                    except Exception as e:  # missing server: report and go on
                        print(f"[{name}] not available: {e}", file=sys.stderr)
                        results[name] = "not available"
                        continue
                    on_redis = name == "redis" or (name == "narsuite" and args.store == "redis")
                    try:
                        results[name] = run_server(name, proc, port, tg, args,
                                                   store_pid if on_redis else None)
                    except Exception as e:
                        print(f"[{name}] failed: {e!r}", file=sys.stderr)
                        results[name] = "failed"
                    finally:
                        stop(proc)
                    time.sleep(1.0)  # let TIME_WAIT and helper exits settle between servers
    finally:
        tg.close()
        if redis_server is not None:
            redis_server.close()
    load1, load5, _ = os.getloadavg()
    what = "--compare-store" if args.compare_store else f"--store {args.store}"
    print(f"\n## SOCKS5 — `python bench/bench_socks.py --server {args.server} --workers {args.workers} "
          f"--reactor {args.reactor} {what} --rounds {args.rounds}` — "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average at the end {load1:.2f} (1 min), "
          f"{load5:.2f} (5 min)\n")
    if args.rounds == 1:
        print(table(rounds[0], args, pair))
        return
    (a, _), (b, _) = pair
    print(f"Medians over {args.rounds} rounds:\n")
    print(figure_table(median_figures(rounds, pair), args, pair))
    print(f"\nEach round ({b}/{a}):\n")
    print("| round | " + " | ".join(k for k, *_ in ROWS) + " |")
    print("|---|" + "---:|" * len(ROWS))
    for i, r in enumerate(rounds, 1):
        d, n = r.get(a), r.get(b)
        if isinstance(d, dict) and isinstance(n, dict):
            fd, fn = figures(d), figures(n)
            print(f"| {i} | " + " | ".join(f"{fn[k] / fd[k]:.2f}×" if fd[k] else "–" for k, *_ in ROWS) + " |")
    for i, r in enumerate(rounds, 1):
        print(f"\nRound {i}:\n")
        print(table(r, args, pair))


if __name__ == "__main__":
    main()
