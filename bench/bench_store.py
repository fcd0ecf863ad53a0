"""Store benchmark: lookups/s and inserts/s at 100k records, memory per record.

Run: python bench/bench_store.py [--records N]

Anchors measured in the same run: a bare ``dict.get`` on the same keys (the
floor for an indexed lookup in Python) and a bare ``dict`` of the same records
(memory floor); for persistence, raw SQLite ``executemany`` of the same rows
in one transaction (the floor for our group commit).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import attrs
from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from narsuite.store import Index, KindSpec, MemoryBackend, SqliteBackend, Store


@attrs.frozen
class Mapping:
    """Shaped like a NAR mapping: a tuple, a client, an SPI."""

    ident: int
    proto: int
    spi: int
    client: ipaddress.IPv4Address
    remote: ipaddress.IPv4Address
    mode: str


KIND = KindSpec(
    name="bench.mapping",
    record=Mapping,
    key=lambda r: r.ident,
    indexes=(
        Index("spi", lambda r: (r.proto, r.spi)),
        Index("client", lambda r: r.client, unique=False),
    ),
)


def make(n: int) -> list[Mapping]:
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    return [Mapping(i, 50, 1000 + i * 7, ipaddress.IPv4Address(base + (i % 4096)),
                    ipaddress.IPv4Address("192.0.2.1"), "end-to-end") for i in range(n)]


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(n: int) -> list[tuple[str, str, str]]:
    records = make(n)
    rows: list[tuple[str, str, str]] = []

    # --- inserts into the memory store
    def fill() -> Store:
        s = Store(MemoryBackend(), Clock())
        s.register(KIND)
        for r in records:
            s.insert(r, ttl=3600)
        return s

    t = best(fill)
    rows.append(("insert, memory backend (2 indexes, ttl)", f"{n / t:,.0f}/s", f"{t / n * 1e6:.2f} µs"))
    d: dict = {}
    t_anchor = best(lambda: [d.__setitem__((r.proto, r.spi), r) for r in records])
    rows.append(("  anchor: bare dict insert", f"{n / t_anchor:,.0f}/s", f"{t_anchor / n * 1e6:.2f} µs"))

    store = fill()
    keys = [(r.proto, r.spi) for r in records]
    index = store.index("bench.mapping", "spi")
    t = best(lambda: [index.get(k) for k in keys])
    rows.append(("lookup by SPI, store.index().get (packet path)", f"{n / t:,.0f}/s", f"{t / n * 1e9:.0f} ns"))
    t = best(lambda: [store.lookup("bench.mapping", "spi", k) for k in keys])
    rows.append(("lookup by SPI, store.lookup()", f"{n / t:,.0f}/s", f"{t / n * 1e9:.0f} ns"))
    t_anchor = best(lambda: [d.get(k) for k in keys])
    rows.append(("  anchor: bare dict.get", f"{n / t_anchor:,.0f}/s", f"{t_anchor / n * 1e9:.0f} ns"))
    t = best(lambda: [store.touch("bench.mapping", r.ident, 3600) for r in records])
    rows.append(("touch (extend lifetime)", f"{n / t:,.0f}/s", f"{t / n * 1e9:.0f} ns"))

    # --- memory per record
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    recs = make(n)
    mid = tracemalloc.get_traced_memory()[0]
    s = Store(MemoryBackend(), Clock())
    s.register(KIND)
    for r in recs:
        s.insert(r, ttl=3600)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rows.append(("memory per record: the record itself", f"{(mid - before) / n:.0f} B", ""))
    rows.append(("memory per record: store overhead (entry, 2 indexes, expiry heap)",
                 f"{(after - mid) / n:.0f} B", ""))
    del s, recs

    # --- sqlite group commit
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.sqlite"
        s = Store(SqliteBackend(path), Clock())
        s.register(KIND)
        s.open()
        backend = s.backend
        # Not started: queue everything, then measure one group commit of n rows
        # the way the flush thread does it.
        backend._pool = object()  # type: ignore[assignment]  # keep submit from writing through
        t0 = time.perf_counter()
        for r in records:
            s.insert(r, ttl=3600)
        t_queue = time.perf_counter() - t0
        batch, waiters = backend._take()
        t1 = time.perf_counter()
        backend._commit(batch)
        t_commit = time.perf_counter() - t1
        rows.append(("insert, sqlite backend: view + queue (reactor thread)", f"{n / t_queue:,.0f}/s",
                     f"{t_queue / n * 1e6:.2f} µs"))
        rows.append(("insert, sqlite backend: serialise + group commit (writer thread)", f"{n / t_commit:,.0f}/s",
                     f"{t_commit / n * 1e6:.2f} µs"))
        size = os.path.getsize(path) + (os.path.getsize(str(path) + "-wal")
                                        if os.path.exists(str(path) + "-wal") else 0)
        rows.append(("disk per record (db + wal)", f"{size / n:.0f} B", ""))
        backend._db.close()
        t2 = time.perf_counter()
        s2 = Store(SqliteBackend(path), Clock())
        s2.register(KIND)
        loaded = s2.open()
        t_load = time.perf_counter() - t2
        assert loaded == n, loaded
        rows.append(("load at start-up (restart)", f"{n / t_load:,.0f}/s", f"{t_load:.2f} s total"))
        s2.backend._db.close()

        raw = sqlite3.connect(str(Path(tmp) / "raw.sqlite"), isolation_level=None)
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("PRAGMA synchronous=NORMAL")
        raw.execute("CREATE TABLE r (kind TEXT, key TEXT, data TEXT, expires REAL, owner TEXT,"
                    " PRIMARY KEY(kind, key)) WITHOUT ROWID")
        data = [(r.kind, r.key, r.data, r.expires, r.owner) for r in (w.row() for w in batch)]
        t3 = time.perf_counter()
        raw.execute("BEGIN")
        raw.executemany("INSERT OR REPLACE INTO r VALUES (?,?,?,?,?)", data)
        raw.execute("COMMIT")
        t_raw = time.perf_counter() - t3
        rows.append(("  anchor: raw sqlite executemany, same rows", f"{n / t_raw:,.0f}/s",
                     f"{t_raw / n * 1e6:.2f} µs"))
        raw.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    args = ap.parse_args()
    rows = bench(args.records)
    print(f"Store benchmark, {args.records:,} records, Python {sys.version.split()[0]}\n")
    print("| operation | rate | per op |")
    print("|---|---|---|")
    for name, rate, per in rows:
        print(f"| {name} | {rate} | {per} |")


if __name__ == "__main__":
    main()
