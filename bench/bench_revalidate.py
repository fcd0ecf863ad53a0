"""The UDP offload's route revalidation at a full flow table: the longest reactor stall.

After any rtnetlink change (link, address, route) ``UdpOffload`` checks every installed flow's
two routes.  The anchor is what it did until 2026-12 (``one_go`` below, the code of then: every
flow in one reactor turn, routes cached per address in the 4096-entry ``_routes`` that is
cleared when full); against it the pass in bounded slices of today.  Measured in one lab
namespace (N, with X and Y on veth links), real maps of ``udp_offload_max_flows`` (65,536)
entries, real route lookups (``kernel_route``: RTM_GETROUTE plus the MTU/link-type ioctls), no
program attached (the check does not touch it).  Two changes: "nothing moved" (a route added
elsewhere: every flow is checked, none leaves) and "a quarter moved" (a more specific route
with another source for a quarter of the destinations: those flows leave the kernel, their
relays are told).  A turn is one call the pass schedules (``callLater(0)``): between two, a
real reactor serves its sockets; the longest turn is the longest the relay is deaf.

Run (root): python bench/bench_revalidate.py [--flows 65536] [--addresses 16384] [--clients 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from twisted.internet.task import Clock


class Turns(Clock):
    """Runs the calls due one reactor iteration at a time and times each."""

    def turn(self) -> float:
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        t = time.perf_counter()
        for c in due:
            self.calls.remove(c)
            c.called = True
            c.func(*c.args, **c.kw)
        return time.perf_counter() - t


def one_go(off: Any) -> None:
    """The anchor: revalidate() as it was until 2026-12 (narsuite/nar/udpoffload.py at 8dfe22a)."""
    off._routes.clear()
    gone = [f for f in off.flows.values() if (off._route(f.client[0]), off._route(f.dest[0])) != f.routes]
    if gone:
        off.remove(gone)
        for flow in gone:
            if flow.forget is not None:
                flow.forget()


def inside(args: argparse.Namespace) -> dict[str, Any]:
    from narsuite.nar import udpoffload as u

    def sh(*cmd: str) -> None:
        subprocess.run(["ip", *cmd], check=True)

    out: dict[str, Any] = {}
    for variant in ("one_go", "slices"):
        for change in ("nothing moved", "a quarter moved"):
            clock = Turns()
            forgot = [0]
            counters = dict.fromkeys(("udp_datagrams_out", "udp_datagrams_in", "bytes_up", "bytes_down"), 0)
            off = u.UdpOffload(counters, args.flows, clock, installs_per_second=1e9)
            off._link = lambda ifindex, l2: None  # type: ignore[method-assign]
            dests = [(f"10.1.{i % args.addresses // 250}.{i % args.addresses % 250 + 2}",
                      1024 + i // args.addresses) for i in range(args.flows)]
            for i, d in enumerate(dests):
                client = (f"10.0.0.{i % args.clients + 2}", 40000)
                flow = off.install(object(), client, ("10.0.0.1", 50000), (d[0], d[1] % 65536),
                                   forget=lambda f=forgot: f.__setitem__(0, f[0] + 1))
                assert flow is not None and flow != u.DEFERRED, (client, d)
            assert len(off.flows) == args.flows, len(off.flows)
            if change == "nothing moved":
                sh("route", "add", "192.0.2.0/24", "dev", "eth1")
            else:  # about a quarter of the destination addresses (10.1.0-15.x of 10.1.0-65.x)
                sh("route", "add", "10.1.0.0/20", "dev", "eth1", "src", "10.1.255.1")
            t0 = time.perf_counter()
            if variant == "one_go":
                turns = [clock.turn()] if clock.callLater(0, one_go, off) else []
            else:
                off.revalidate()
                turns = []
                while off._pass or clock.getDelayedCalls():
                    turns.append(clock.turn())
            total = time.perf_counter() - t0
            out[f"{variant} / {change}"] = {
                "longest_turn_ms": max(turns) * 1e3, "median_turn_ms": statistics.median(turns) * 1e3,
                "turns": len(turns), "pass_ms": total * 1e3, "taken_out": forgot[0], "left": len(off.flows)}
            off.stop()
            if change == "nothing moved":
                sh("route", "del", "192.0.2.0/24", "dev", "eth1")
            else:
                sh("route", "del", "10.1.0.0/20", "dev", "eth1", "src", "10.1.255.1")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=65536)
    ap.add_argument("--addresses", type=int, default=16384, help="distinct destination addresses")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside:
        print(json.dumps(inside(args)))
        return
    from narsuite.lab import Lab

    with Lab() as lab:
        n, x, y = lab.host("n"), lab.host("x"), lab.host("y")
        lab.link(n, x, "10.0.0.1/24", "10.0.0.2/24", "eth0", "eth0")
        lab.link(n, y, "10.1.0.1/16", "10.1.0.2/16", "eth1", "eth0")
        n.ip("addr", "add", "10.1.255.1/16", "dev", "eth1")
        got = n.run([sys.executable, __file__, "--inside", "--flows", str(args.flows), "--addresses",
                     str(args.addresses), "--clients", str(args.clients)], timeout=600)
        res = json.loads(got.stdout)
    print(f"revalidation at {args.flows} flows ({args.addresses} destination addresses, "
          f"{args.clients} clients):")
    for name, r in res.items():
        print(f"  {name:28s} longest turn {r['longest_turn_ms']:8.1f} ms, median {r['median_turn_ms']:6.2f} ms, "
              f"{r['turns']:4d} turns, pass {r['pass_ms']:7.1f} ms, taken out {r['taken_out']}, left {r['left']}")


if __name__ == "__main__":
    main()
