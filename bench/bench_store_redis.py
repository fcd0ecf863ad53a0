"""Shared-store benchmark: writes/s and write latency through the redis backend, in one run with
its anchors: the SQLite backend (the one-machine default) and raw redis-py pipelined SETs of the
same rows (the floor for any client of this Redis), plus the packet path's lookup on each.

Run: python bench/bench_store_redis.py [--writes N] [--inflight C[,C...]] [--sqlite-writes N]

A real redis-server is started on loopback for the run (persistence off) and killed after it.
Latency is from ``store.insert`` to its Deferred firing (what a role waits for).  CPU per write
(this process, and per thread: the reactor, which writes, and the stream reader; and the
redis-server) is printed too: on a shared machine it moves far less than writes/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor

from narsuite.lab.redis import RedisServer
from narsuite.store import Index, KindSpec, SqliteBackend, Store
from narsuite.store.redis import RedisBackend


@attrs.frozen
class Mapping:
    ident: int
    proto: int
    spi: int
    client: str
    session: str


KIND = KindSpec("bench.mapping", Mapping, key=lambda r: r.ident,
                indexes=(Index("spi", lambda r: (r.proto, r.spi)),))


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(tid: int) -> float:
    """User + system CPU of one thread of this process so far."""
    return cpu_seconds(f"self/task/{tid}")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


@defer.inlineCallbacks
def run_store(store: Store, n: int, inflight: int, base: int):  # type: ignore[no-untyped-def]
    lat: list[float] = []
    it = iter(range(base, base + n))

    @defer.inlineCallbacks
    def worker():  # type: ignore[no-untyped-def]
        for i in it:
            t0 = time.perf_counter()
            yield store.insert(Mapping(i, 50, 1000 + i, f"10.0.{i % 250}.{i % 200}", f"nar-{i % 97}"),
                               owner=f"nar-{i % 97}")
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    yield defer.gatherResults([worker() for _ in range(inflight)])
    elapsed = time.perf_counter() - t0
    return n / elapsed, pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000


def lookup_ns(store: Store, n: int) -> float:
    ix = store.index(KIND.name, "spi")
    keys = [(50, 1000 + i) for i in range(n)]
    t0 = time.perf_counter()
    for k in keys:
        ix.get(k)
    return (time.perf_counter() - t0) / n * 1e9


def raw_pipelined(srv: RedisServer, n: int) -> float:
    import redis

    r = redis.Redis(host=srv.host, port=srv.port)
    rows = [json.dumps({"ident": i, "proto": 50, "spi": 1000 + i}) for i in range(n)]
    out = [0.0]

    def go() -> None:
        t0 = time.perf_counter()
        for b in range(0, n, 1000):
            p = r.pipeline(transaction=False)
            for i in range(b, min(n, b + 1000)):
                p.set(f"raw:{i}", rows[i])
            p.execute()
        out[0] = n / (time.perf_counter() - t0)

    t = threading.Thread(target=go)
    t.start()
    t.join()
    return out[0]


@defer.inlineCallbacks
def main(args):  # type: ignore[no-untyped-def]
    levels = [int(x) for x in str(args.inflight).split(",")]
    results: dict = {}
    with RedisServer() as srv:
        import redis

        backend = RedisBackend(lambda name: redis.Redis(host=srv.host, port=srv.port, decode_responses=True,
                                                        client_name=name),
                               "bench1", prefix="b:", pipeline=args.pipeline,
                               read_pause=args.read_pause)
        st = Store(backend, reactor, node_id="bench1")
        st.register(KIND)
        st.open()
        st.start()
        yield run_store(st, 2000, levels[0], 10**8)  # warm-up
        if args.preload:
            # a daemon's view after start-up (loaded records), then optionally frozen out of
            # the garbage collector's reach, as a daemon would after start-up
            yield run_store(st, args.preload, 64, 2 * 10**8)
        if args.gc_freeze:
            import gc

            gc.collect()
            gc.freeze()
        base = 0
        tids = {"reactor": threading.get_native_id(), "reader": backend._reader.native_id}
        for c in levels:
            c0, r0 = cpu_seconds(), cpu_seconds(srv.pid or "self")
            t0 = {k: thread_cpu(t) for k, t in tids.items()}
            results[("redis", c)] = yield run_store(st, args.writes, c, base)
            results[("redis cpu", c)] = ((cpu_seconds() - c0) / args.writes * 1e6,
                                         (cpu_seconds(srv.pid or "self") - r0) / args.writes * 1e6)
            results[("threads", c)] = ", ".join(f"{k} {(thread_cpu(t) - t0[k]) / args.writes * 1e6:.1f}"
                                                for k, t in tids.items())
            base += args.writes
        results["redis lookup ns"] = lookup_ns(st, min(args.writes, 100_000))
        yield st.stop()
        if not args.no_anchor:
            results["raw redis-py pipelined SET"] = raw_pipelined(srv, args.writes)
    if args.sqlite_writes:
        with tempfile.TemporaryDirectory() as d:
            st = Store(SqliteBackend(Path(d) / "s.sqlite"), reactor)
            st.register(KIND)
            st.open()
            st.start()
            base = 0
            for c in levels:
                results[("sqlite", c)] = yield run_store(st, args.sqlite_writes, c, base)
                base += args.sqlite_writes
            results["sqlite lookup ns"] = lookup_ns(st, min(args.sqlite_writes, 100_000))
            yield st.stop()
    print(f"writes={args.writes} (sqlite {args.sqlite_writes}) load={os.getloadavg()[0]:.1f}")
    for c in levels:
        for name in ("redis", "sqlite"):
            if (name, c) not in results:
                continue
            w, p50, p99 = results[(name, c)]
            extra = ""
            if name == "redis":
                extra = "   CPU per write: process {:.1f} us, redis-server {:.1f} us".format(
                    *results[("redis cpu", c)]) + f" (threads, us: {results[('threads', c)]})"
            print(f"inflight {c:3d} {name + ' backend':15s} {w:8.0f} writes/s   p50 {p50:6.2f} ms   "
                  f"p99 {p99:6.2f} ms{extra}")
    if "raw redis-py pipelined SET" in results:
        print(f"{'raw redis-py pipelined SET':28s} {results['raw redis-py pipelined SET']:10.0f} writes/s (anchor)")
    print(f"lookup index.get: redis view {results['redis lookup ns']:.0f} ns"
          + (f", sqlite view {results['sqlite lookup ns']:.0f} ns" if "sqlite lookup ns" in results else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=50_000)
    ap.add_argument("--inflight", default="64",
                    help="writes in flight; a comma list (8,16,32,64) runs each level in turn on one node")
    ap.add_argument("--sqlite-writes", type=int, default=5000,
                    help="writes per level for the SQLite anchor (0: none; it does ~400/s at 8 in flight)")
    ap.add_argument("--no-anchor", action="store_true", help="leave out the raw pipelined-SET anchor")
    ap.add_argument("--switchinterval", type=float, default=None,
                    help="sys.setswitchinterval (the GIL hand-over between reactor and client threads)")
    ap.add_argument("--pipeline", type=int, default=2,
                    help="batches on the reactor's write connection at once")
    ap.add_argument("--preload", type=int, default=0, help="records written before the measured levels")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the warm-up (and preload)")
    ap.add_argument("--read-pause", type=float, default=0.005,
                    help="the stream reader's pause after a read that emptied the stream (seconds)")
    ap.add_argument("--gc-threshold", default=None,
                    help="gc.set_threshold(a,b,c) for the run, e.g. 10000,10,10 (CPython's default: 700,10,10)")
    a = ap.parse_args()
    if a.gc_threshold:
        import gc

        gc.set_threshold(*(int(x) for x in a.gc_threshold.split(",")))
    if a.switchinterval:
        sys.setswitchinterval(a.switchinterval)
    d = main(a)
    d.addErrback(lambda f: f.printTraceback())
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
