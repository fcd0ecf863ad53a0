"""Where the IKEv2 responder's CPU goes: IKE_SA_INIT + IKE_AUTH through :class:`IkeV2Engine`,
in-process, no network.

Run:
    python bench/profile_ikev2.py [--group 19|14|31] [-n 2000] [--concurrency 32]
                                  [--store sqlite|memory] [--log info|warn] [--no-esp]
                                  [--no-profile] [--top 30] [--dump prof.out]

What runs is ``bench/profile_ike.py``'s setup with the config ``bench/bench_ikev2.py`` gives
the daemon (:data:`bench_ikev2.NARSUITE_CONF`): the real config loader, the store (SQLite
backend, group commit run in this thread where the daemon runs it in a worker thread), the
ESP engine subscribed to it, Twisted logging formatted into /dev/null.  ``tests/ikev2_peer.py``
initiators (floating to 4500, each asking for its own /32) talk to it through a FIFO of
datagrams.  Only the responder's work is timed or profiled.

What it leaves out, measured apart: the kernel's ``sendto`` (three datagrams per exchange)
and the esp service's route into its TUN per new peer (``packet/rtnl.py``, about 35 us).
``--no-profile`` gives the responder's CPU per exchange without cProfile's overhead: a
number that does not move with the load other users put on the machine, unlike the lab
bench's rate.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import ikev2_peer as P  # noqa: E402
import profile_ike as PI  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402

from narsuite import logs  # noqa: E402
from narsuite.ike.v2.engine import IkeV2Engine  # noqa: E402

RESPONDER = "198.51.100.1"
STEPS = ("IKE_SA_INIT", "IKE_AUTH")
UNIT = "INIT+AUTH"


def run(args: argparse.Namespace) -> None:
    from bench_ikev2 import NARSUITE_CONF

    workdir = Path(tempfile.mkdtemp(prefix="profile_ikev2_"))
    devnull = open(os.devnull, "w")
    globalLogBeginner.beginLoggingTo([logs.text_observer(devnull)], redirectStandardIO=False,
                                     discardBuffer=True)
    logs.set_level(args.log)
    ike_cfg, clock, store, backend, _esp, flush_interval = PI.build(args, workdir, NARSUITE_CONF)

    queue: deque = deque()
    by_addr: dict[tuple[str, int], list] = {}

    def send(data: bytes, addr: tuple[str, int], local_port: int) -> None:
        if local_port == ike_cfg.natt_port:
            data = P.MARKER + data
        queue.append(("i", by_addr[addr], data, local_port))

    engine = IkeV2Engine(ike_cfg, store, clock, send=send, local_address=lambda ip: RESPONDER)
    # the standby state (ike.v2sa) is written only where a cluster seals it, as the ike service decides
    engine.keep_state = args.sealed_state
    base_inner = int.from_bytes(bytes([10, 128, 0, 0]), "big")
    prof = cProfile.Profile()
    if args.no_profile:
        prof.enable = prof.disable = lambda: None  # type: ignore[method-assign]
    step_cpu: dict[str, float] = defaultdict(float)
    commit_cpu = 0.0
    commits = started = completed = 0

    def start() -> None:
        nonlocal started
        k = started
        started += 1
        ip = f"198.51.{100 + k // 30000}.2"
        a500, a4500 = (ip, 1024 + 2 * (k % 30000)), (ip, 1025 + 2 * (k % 30000))
        inner = base_inner + 1 + k
        ts = f"{inner >> 24}.{inner >> 16 & 255}.{inner >> 8 & 255}.{inner & 255}/32"
        ini = P.Initiator(args.psk.encode(), "bench0.example", args.group, ts, "10.1.0.0/24")
        ex = [ini, a500, a4500, 0]
        by_addr[a500] = by_addr[a4500] = ex
        to_responder(ex, ini.start())

    def to_responder(ex: list, out: P.Outgoing) -> None:
        if out.port == ike_cfg.natt_port:
            queue.append(("r", ex, out.data[4:], out.port, ex[2]))  # the service strips the marker
        else:
            queue.append(("r", ex, out.data, out.port, ex[1]))

    def commit() -> None:
        nonlocal commit_cpu, commits
        if args.store != "sqlite" or not backend._queue:
            return
        t = time.process_time()
        prof.enable()
        backend._write(backend._take())
        prof.disable()
        commit_cpu += time.process_time() - t
        commits += 1

    for _ in range(min(args.concurrency, args.n)):
        start()
    last_commit = time.perf_counter()
    t_begin = time.perf_counter()
    while completed < args.n or queue:
        if not queue:
            if args.store == "sqlite" and backend._queue:
                commit()
                last_commit = time.perf_counter()
                continue
            raise SystemExit(f"stalled after {completed} exchanges; engine counters "
                             f"{ {k: v for k, v in engine.counters.items() if v} }")
        item = queue.popleft()
        if item[0] == "r":
            _, ex, data, port, addr = item
            step = STEPS[min(ex[3], len(STEPS) - 1)]
            ex[3] += 1
            t = time.process_time()
            prof.enable()
            engine.received(data, addr, port)
            prof.disable()
            step_cpu[step] += time.process_time() - t
        else:
            _, ex, data, port = item
            out = ex[0].receive(data, port)
            if out is not None:
                to_responder(ex, out)
            if ex[0].done:
                completed += 1
                if started < args.n:
                    start()
        if time.perf_counter() - last_commit >= flush_interval:
            commit()
            last_commit = time.perf_counter()
    commit()
    wall = time.perf_counter() - t_begin
    n = completed
    if engine.counters["child_installed"] != n:
        raise SystemExit(f"only {engine.counters['child_installed']} of {n} children installed: "
                         f"{ {k: v for k, v in engine.counters.items() if v} }")
    responder = sum(step_cpu.values()) + commit_cpu
    name = {19: "ecp256", 14: "modp2048", 31: "curve25519"}.get(args.group, str(args.group))
    print(f"narsuite IKEv2 responder in-process: {n} {UNIT}, group {args.group} ({name}), {args.concurrency} "
          f"in flight, store {args.store}, log {args.log}, esp engine {'off' if args.no_esp else 'on'}, "
          f"ike.v2sa state {'on' if args.sealed_state else 'off'}, "
          f"Python {sys.version.split()[0]}")
    print(f"  wall {wall:.2f} s; responder CPU {1000 * responder / n:.3f} ms per {UNIT} "
          f"(= {n / responder:.0f} {UNIT}/s on one core, profiler {'off' if args.no_profile else 'on'})")
    print(f"  responder by message (ms per {UNIT}): " + ", ".join(
        f"{s} {1000 * step_cpu[s] / n:.3f}" for s in STEPS) +
        (f", store commits {1000 * commit_cpu / n:.3f} ({commits} commits)" if args.store == "sqlite" else ""))
    if not args.no_profile:
        st = pstats.Stats(prof)
        PI.report_categories(st, n, UNIT)
        PI.report_top(st, n, args.top, UNIT)
        if args.dump:
            st.dump_stats(args.dump)
            print(f"\npstats written to {args.dump}")
    if args.group != 31:
        PI.report_floor(args.group)
    devnull.close()


def main(argv: list[str] | None = None) -> int:
    ap = PI.parser(__doc__.split("\n\n")[0], UNIT, 2000, (19, 14, 31))
    ap.add_argument("--sealed-state", action="store_true",
                    help="write each SA's ike.v2sa state, as a cluster node that seals it does")
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
