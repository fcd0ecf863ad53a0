"""One narsuite store node for the shared-store tests: a real process with its own reactor.

Runs a :class:`Store` on the ``redis`` backend (the same config path as the daemon) and takes
JSON commands on stdin, one per line; answers ``{"id": ..., ...}`` lines on stdout, and
``{"event": "change", ...}`` lines for watched kinds.  Two or more of these are "the nodes".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import attrs
from twisted.internet import defer, reactor, stdio
from twisted.protocols.basic import LineReceiver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from narsuite.config import loads
from narsuite.store import Conflict, Exhausted, Index, KindSpec, make_store


@attrs.frozen
class Rec:
    name: str
    spi: int
    note: str = ""


REC = KindSpec("t.rec", Rec, key=lambda r: r.name, indexes=(Index("spi", lambda r: r.spi or None),))


_transport: list = []


def out(obj: dict) -> None:
    # StandardIO makes stdout non-blocking: write through its transport, which buffers.
    line = (json.dumps(obj) + "\n").encode()
    if _transport:
        _transport[0].write(line)
    else:
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


class Node(LineReceiver):
    delimiter = b"\n"

    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        self.store = store
        self.watching: set[str] = set()
        store.subscribe(self.changed)

    def changed(self, ch) -> None:  # type: ignore[no-untyped-def]
        if ch.kind in self.watching:
            out({"event": "change", "op": ch.op, "kind": ch.kind, "key": str(ch.key), "reason": ch.reason,
                 "t": time.time()})

    def lineReceived(self, line: bytes) -> None:
        cmd = json.loads(line)
        d = defer.maybeDeferred(getattr(self, "do_" + cmd["op"]), **cmd.get("args", {}))
        d.addCallbacks(lambda r: out({"id": cmd["id"], "ok": True, "result": r}),
                       lambda f: out({"id": cmd["id"], "ok": False,
                                      "error": f"{f.type.__name__}: {f.getErrorMessage()}"}))

    def connectionLost(self, reason: object = None) -> None:
        if reactor.running:
            reactor.stop()

    def do_watch(self, kind: str) -> None:
        self.watching.add(kind)

    def do_insert(self, name: str, spi: int, ttl: float | None = None, owner: str | None = None,
                  note: str = "") -> defer.Deferred:
        t0 = time.time()
        return self.store.insert(Rec(name, spi, note), ttl=ttl, owner=owner).addCallback(
            lambda _: {"t0": t0, "t1": time.time()})

    def do_put(self, name: str, spi: int, note: str = "", ttl: float | None = None) -> defer.Deferred:
        return self.store.put(Rec(name, spi, note), ttl=ttl).addCallback(lambda _: None)

    def do_delete(self, name: str) -> defer.Deferred:
        return self.store.delete(REC.name, name)

    def do_touch(self, name: str, ttl: float) -> bool:
        return self.store.touch(REC.name, name, ttl)

    def do_get(self, name: str) -> dict | None:
        r = self.store.get(REC.name, name)
        if r is None:
            return None
        return {"spi": r.spi, "note": r.note, "expires": self.store.expires(REC.name, name)}

    def do_view(self, kind: str = "t.rec") -> list:
        if kind == "lease":
            return sorted(f"{r.namespace}|{r.value}|{r.holder}" for r in self.store.records("store.lease"))
        return sorted(f"{r.name}|{r.spi}|{r.note}" for r in self.store.records(kind))

    def do_stats(self) -> dict:
        return {"store": self.store.stats, "backend": self.store.backend.stats()}

    def do_drop_owner(self, owner: str) -> defer.Deferred:
        return self.store.drop_owner(owner)

    def do_claim(self, ns: str, value: int, owner: str, ttl: float | None = None) -> defer.Deferred:
        return self.store.claim(ns, value, owner, ttl).addCallback(lambda lease: lease.value)

    @defer.inlineCallbacks
    def do_race(self, ns: str, low: int, high: int, concurrency: int = 32, pool: str = ""):  # type: ignore[no-untyped-def]
        """Allocate from [low, high] (or the address pool) until it is exhausted; count lost races."""
        got: list = []
        lost = [0]
        failed: list[str] = []
        done = [False]
        seq = [0]

        @defer.inlineCallbacks
        def worker():  # type: ignore[no-untyped-def]
            while not done[0]:
                seq[0] += 1
                owner = f"race:{self.store.node_id}:{seq[0]}"
                try:
                    if pool:
                        v = yield self.store.lease_address(pool, owner)
                        got.append(str(v))
                    else:
                        v = yield self.store.allocate_number(ns, low, high, owner)
                        got.append(v)
                except Conflict:
                    lost[0] += 1
                    if lost[0] % 50 == 0:
                        yield _sleep(0.005)  # let the winner's change arrive
                except Exhausted:
                    done[0] = True
                except Exception as e:
                    failed.append(f"{type(e).__name__}: {e}")
                    done[0] = True

        t0 = time.time()
        yield defer.gatherResults([worker() for _ in range(concurrency)])
        return {"values": got, "lost": lost[0], "failed": failed[:5], "seconds": time.time() - t0}

    @defer.inlineCallbacks
    def do_load(self, n: int, prefix: str, concurrency: int = 64, deadline: float = 60.0):  # type: ignore[no-untyped-def]
        """Insert n records; a name whose write failed because Redis was away is tried again.

        Returns the names whose write was acknowledged, and counts of the failures by type.
        """
        from narsuite.store.redis import NotReplicated, StoreUnavailable

        acked: list[str] = []
        failed: dict[str, int] = {}
        it = iter(range(n))
        end = time.monotonic() + deadline

        @defer.inlineCallbacks
        def worker():  # type: ignore[no-untyped-def]
            for i in it:
                name = f"{prefix}{i}"
                while time.monotonic() < end:
                    try:
                        yield self.store.insert(Rec(name, 0))
                        acked.append(name)
                        break
                    except StoreUnavailable:
                        failed["unavailable"] = failed.get("unavailable", 0) + 1
                        yield _sleep(0.02)
                    except (NotReplicated, Conflict) as e:
                        failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1
                        break  # in the primary, or in doubt: not acknowledged
                    except Exception as e:
                        failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1
                        yield _sleep(0.02)

        yield defer.gatherResults([worker() for _ in range(concurrency)])
        return {"acked": acked, "failed": failed}


def _sleep(s: float) -> defer.Deferred:
    from twisted.internet.task import deferLater

    return deferLater(reactor, s, lambda: None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="TOML text of [store] / [cluster]")
    a = ap.parse_args()
    config = loads(Path(a.config).read_text())
    store = make_store(config, reactor)
    store.register(REC)
    store.declare_volatile_owners("eph:")
    store.open()
    store.start()
    node = Node(store)
    stdio.StandardIO(node)
    _transport.append(node.transport)
    out({"event": "ready", "node": config.cluster.node_id})

    def shutdown() -> defer.Deferred:
        return store.stop()

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()


if __name__ == "__main__":
    main()
