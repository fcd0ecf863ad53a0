"""The common mapping store: indexes, lifetimes, subscribers, allocators, persistence."""

from __future__ import annotations

import enum
import ipaddress
import os
import sqlite3
import subprocess
import sys
import textwrap

import attrs
import pytest
from twisted.internet.task import Clock

from narsuite.store import (
    LEASE,
    Conflict,
    Exhausted,
    Index,
    KindSpec,
    MemoryBackend,
    SqliteBackend,
    Store,
    secret,
)


class Proto(enum.IntEnum):
    ESP = 50
    AH = 51


@attrs.frozen
class Mapping:
    ident: str
    proto: Proto
    spi: int
    client: ipaddress.IPv4Address
    conn: str
    key: bytes = secret(default=b"")
    ports: tuple[int, ...] = ()


MAPPING = KindSpec(
    name="test.mapping",
    record=Mapping,
    key=lambda r: r.ident,
    indexes=(
        Index("spi", lambda r: (r.proto, r.spi)),
        Index("client", lambda r: r.client, unique=False),
    ),
)


def mk(ident: str = "m1", spi: int = 1000, client: str = "10.0.0.2", **kw) -> Mapping:
    return Mapping(ident, Proto.ESP, spi, ipaddress.IPv4Address(client), "c1", **kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> Store:
    s = Store(MemoryBackend(), clock)
    s.register(MAPPING)
    s.open()
    s.start()
    yield s
    s.stop()


def ok(d):
    """The result of an already-fired Deferred (fails the test otherwise)."""
    results, failures = [], []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "Deferred has not fired"
    return results[0]


def err(d, exc):
    failures = []
    d.addErrback(failures.append)
    assert failures, "expected a failure"
    assert failures[0].check(exc), failures[0]
    return failures[0].value


def test_insert_and_lookups(store: Store) -> None:
    rec = ok(store.insert(mk()))
    assert store.get("test.mapping", "m1") is rec
    assert store.lookup("test.mapping", "spi", (Proto.ESP, 1000)) is rec
    assert store.index("test.mapping", "spi").get((Proto.ESP, 1000)) is rec
    ok(store.insert(mk("m2", spi=1001)))
    assert {r.ident for r in store.lookup_all("test.mapping", "client",
                                              ipaddress.IPv4Address("10.0.0.2"))} == {"m1", "m2"}
    assert store.count("test.mapping") == 2


def test_conflicts_on_key_and_unique_index(store: Store) -> None:
    ok(store.insert(mk()))
    e = err(store.insert(mk()), Conflict)
    assert e.index == "key"
    e = err(store.insert(mk("m2", spi=1000)), Conflict)
    assert e.index == "spi" and e.holder.ident == "m1"
    assert store.count("test.mapping") == 1
    assert store.stats["conflicts"] == 2


def test_update_reindexes(store: Store) -> None:
    ok(store.insert(mk()))
    ok(store.update("test.mapping", "m1", spi=2000))
    assert store.lookup("test.mapping", "spi", (Proto.ESP, 1000)) is None
    assert store.lookup("test.mapping", "spi", (Proto.ESP, 2000)).ident == "m1"


def test_expiry_on_the_reactor_clock(store: Store, clock: Clock) -> None:
    ok(store.insert(mk(), ttl=10))
    ok(store.insert(mk("m2", spi=5000), ttl=30))
    clock.advance(9.9)
    assert store.get("test.mapping", "m1") is not None
    clock.advance(0.2)
    assert store.get("test.mapping", "m1") is None
    assert store.lookup("test.mapping", "spi", (Proto.ESP, 1000)) is None
    assert store.get("test.mapping", "m2") is not None
    clock.advance(20)
    assert store.count("test.mapping") == 0
    assert store.stats["expired"] == 2


def test_touch_extends_and_shortens(store: Store, clock: Clock) -> None:
    ok(store.insert(mk(), ttl=10))
    clock.advance(8)
    assert store.touch("test.mapping", "m1", 10)
    clock.advance(8)
    assert store.get("test.mapping", "m1") is not None
    clock.advance(2.5)
    assert store.get("test.mapping", "m1") is None
    ok(store.insert(mk("m3", spi=7000), ttl=100))
    store.touch("test.mapping", "m3", 1)
    clock.advance(1.1)
    assert store.get("test.mapping", "m3") is None


def test_replacing_keeps_the_new_lifetime_without_growing_the_heap(store: Store, clock: Clock) -> None:
    """A put over a record with a later expiry adds no heap entry (the old one comes due and
    re-pushes), yet the record lives exactly its new lifetime; a shorter one is honoured."""
    ok(store.put(mk(), ttl=10))
    heap = len(store._heap)
    for _ in range(100):
        clock.advance(1)
        ok(store.put(mk(), ttl=10))  # a refresh, as a re-registration does
    assert len(store._heap) <= heap + 1
    clock.advance(9.9)
    assert store.get("test.mapping", "m1") is not None
    clock.advance(0.2)
    assert store.get("test.mapping", "m1") is None
    ok(store.put(mk("m4", spi=8000), ttl=100))
    ok(store.put(mk("m4", spi=8000), ttl=2))  # shorter: its own entry
    clock.advance(2.1)
    assert store.get("test.mapping", "m4") is None


def test_subscribers_hear_every_change(store: Store, clock: Clock) -> None:
    seen = []
    unsubscribe = store.subscribe(lambda c: seen.append((c.op, c.key, c.reason)), kinds=["test.mapping"])
    ok(store.insert(mk(), ttl=5))
    ok(store.update("test.mapping", "m1", spi=3))
    clock.advance(6)
    assert seen == [("put", "m1", ""), ("put", "m1", ""), ("delete", "m1", "expired")]
    unsubscribe()
    ok(store.insert(mk()))
    assert len(seen) == 3


def test_failing_subscriber_does_not_break_writes(store: Store) -> None:
    def boom(change):
        raise RuntimeError("subscriber bug")

    store.subscribe(boom)
    ok(store.insert(mk()))
    assert store.get("test.mapping", "m1") is not None


def test_drop_owner_removes_everything_owned(store: Store) -> None:
    ok(store.insert(mk(), owner="conn:1"))
    ok(store.insert(mk("m2", spi=1001), owner="conn:1"))
    ok(store.insert(mk("m3", spi=1002), owner="conn:2"))
    spi = ok(store.allocate_spi("conn:1"))
    assert ok(store.drop_owner("conn:1")) == 3
    assert [r.ident for r in store.records("test.mapping")] == ["m3"]
    assert store.holds("spi", spi) is None


def test_spis_are_random_unique_and_never_reserved(store: Store) -> None:
    spis = {ok(store.allocate_spi(f"o{i}")) for i in range(2000)}
    assert len(spis) == 2000
    assert min(spis) > 255
    assert max(spis) < 2**32
    assert max(spis) > 2**31  # drawn from the whole 32-bit space


def test_reserved_spis_are_held_at_once_and_never_drawn_twice(store: Store) -> None:
    spis = [store.reserve_spi(f"o{i}") for i in range(500)]
    assert len(set(spis)) == 500 and min(spis) > 255
    # held in the index before any write completes: neither allocator draws them again
    assert all(store.holds("spi", v) == f"o{i}" for i, v in enumerate(spis))
    assert not set(spis) & {ok(store.allocate_spi(f"x{i}")) for i in range(500)}
    ok(store.drop_owner("o0"))
    assert store.holds("spi", spis[0]) is None


def test_claim_refuses_taken_values(store: Store) -> None:
    ok(store.claim("icmp-id", 77, "a"))
    e = err(store.claim("icmp-id", 77, "b"), Conflict)
    assert e.holder.holder == "a"
    assert ok(store.allocate_number("icmp-id", 1, 65535, "b", prefer=77)) != 77


def test_number_allocator_fills_range_then_exhausts(store: Store) -> None:
    got = {ok(store.allocate_number("udp-port", 40000, 40099, f"o{i}")) for i in range(100)}
    assert got == set(range(40000, 40100))
    err(store.allocate_number("udp-port", 40000, 40099, "late"), Exhausted)


def test_address_pool_leases_release_on_expiry(store: Store, clock: Clock) -> None:
    store.add_pool("ra", ipaddress.IPv4Network("10.8.0.0/29"), [ipaddress.IPv4Address("10.8.0.1")])
    leased = [ok(store.lease_address("ra", f"peer{i}", ttl=60)) for i in range(5)]
    assert sorted(map(str, leased)) == ["10.8.0.2", "10.8.0.3", "10.8.0.4", "10.8.0.5", "10.8.0.6"]
    # the same owner gets the same address again
    assert ok(store.lease_address("ra", "peer0", ttl=60)) == leased[0]
    err(store.lease_address("ra", "peer5"), Exhausted)
    assert store.pool_usage("ra") == (5, 5)
    clock.advance(61)
    assert store.pool_usage("ra") == (0, 5)
    assert ok(store.lease_address("ra", "peer5")) in leased


def test_backend_failure_rolls_back(clock: Clock) -> None:
    from twisted.internet import defer

    class Refusing(MemoryBackend):
        persistent = True

        def submit(self, rows):
            return defer.fail(Conflict("test.mapping", "spi", 1, "remote node"))

    s = Store(Refusing(), clock)
    s.register(MAPPING)
    err(s.insert(mk()), Conflict)
    assert s.get("test.mapping", "m1") is None
    assert s.lookup("test.mapping", "spi", (Proto.ESP, 1000)) is None


# ------------------------------------------------------------------ sqlite
def _sqlite_store(path, clock=None) -> Store:
    s = Store(SqliteBackend(path), clock or Clock())
    s.register(MAPPING)
    return s


def test_sqlite_roundtrip_keeps_types_but_not_secrets(tmp_path) -> None:
    path = tmp_path / "s.sqlite"
    s = _sqlite_store(path)
    s.open()
    ok(s.insert(mk(key=b"\x01" * 16, ports=(1, 2)), owner="conn:9"))
    ok(s.allocate_spi("conn:9"))
    s.backend._db.close()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    raw = sqlite3.connect(path).execute("SELECT data FROM records WHERE kind='test.mapping'").fetchone()[0]
    assert "key" not in raw  # key material never reaches the disk

    s2 = _sqlite_store(path)
    assert s2.open() == 2
    rec = s2.get("test.mapping", "m1")
    assert rec == mk(ports=(1, 2))  # secret back to its default
    assert rec.proto is Proto.ESP and isinstance(rec.client, ipaddress.IPv4Address)
    assert s2.lookup("test.mapping", "spi", (Proto.ESP, 1000)) is rec
    assert s2.owner_of("test.mapping", "m1") == "conn:9"
    assert ok(s2.drop_owner("conn:9")) == 2


def test_sqlite_does_not_load_expired_records(tmp_path) -> None:
    import time

    path = tmp_path / "s.sqlite"
    clock = Clock()
    clock.advance(time.time())
    s = _sqlite_store(path, clock)
    s.open()
    ok(s.insert(mk(), ttl=0.5))
    ok(s.insert(mk("m2", spi=2), ttl=3600))
    s.backend._db.close()
    clock2 = Clock()
    clock2.advance(time.time() + 1)
    s2 = _sqlite_store(path, clock2)
    assert s2.open() == 1
    assert s2.get("test.mapping", "m2") is not None


def test_sqlite_keeps_records_of_roles_not_running(tmp_path) -> None:
    path = tmp_path / "s.sqlite"
    s = _sqlite_store(path)
    s.open()
    ok(s.insert(mk()))
    s.backend._db.close()
    s2 = Store(SqliteBackend(path), Clock())  # test.mapping not registered this time
    s2.open()
    s2.backend._db.close()
    s3 = _sqlite_store(path)
    assert s3.open() == 1


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, os, ipaddress
    sys.path.insert(0, {tests!r})
    from twisted.internet import reactor
    from narsuite.store import Store, SqliteBackend
    from test_store import MAPPING, mk
    store = Store(SqliteBackend({path!r}, flush_interval=0.01), reactor)
    store.register(MAPPING)
    store.open()
    store.start()
    n = 0
    def write():
        global n
        d = store.insert(mk(f"m{{n}}", spi=10000 + n), ttl=3600)
        i = n
        d.addCallback(lambda _: print(f"durable m{{i}}", flush=True))
        n += 1
        reactor.callLater(0.001, write)
    reactor.callWhenRunning(write)
    reactor.run()
    """
)


def test_sqlite_survives_kill_9(tmp_path) -> None:
    """Every write whose Deferred fired is back after SIGKILL mid-stream."""
    import signal
    import time

    path = tmp_path / "s.sqlite"
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT.format(tests=os.path.dirname(__file__), path=str(path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        deadline = time.monotonic() + 20
        while len(acked) < 200 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("durable "):
                acked.append(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(acked) >= 200
    s = _sqlite_store(path)
    s.open()
    missing = [m for m in acked if s.get("test.mapping", m) is None]
    assert missing == []
    # unique index rebuilt from disk
    assert s.lookup("test.mapping", "spi", (Proto.ESP, 10000)).ident == "m0"


def test_lease_kind_is_registered(store: Store) -> None:
    assert LEASE in store.kinds()


def test_volatile_owners_records_are_dropped_at_load_durable_ones_kept(tmp_path) -> None:
    """A crash leaves leases of owners that lived in memory only (an IKE SA's SPI, a NAR
    session's ICMP id and port): the next load drops them, keeps a user's pool lease."""
    path = tmp_path / "s.sqlite"
    s = _sqlite_store(path)
    s.declare_volatile_owners("nar-", "ike:child:")
    s.add_pool("p", ipaddress.IPv4Network("10.8.0.0/24"))
    s.open()
    spi = ok(s.allocate_spi("nar-0123456789abcdef"))
    port = ok(s.allocate_number("udp-port", 20000, 20010, "nar-0123456789abcdef"))
    ok(s.insert(mk(), owner="ike:child:p:alice:10.8.0.1"))
    addr = ok(s.lease_address("p", "ike:lease:p:user:alice"))
    ok(s.claim("spi", 4242, "esp:peer:static"))
    s.backend._db.close()  # what kill -9 leaves: no release ever ran

    s2 = _sqlite_store(path)
    s2.declare_volatile_owners("nar-", "ike:child:")
    s2.add_pool("p", ipaddress.IPv4Network("10.8.0.0/24"))
    assert s2.open() == 2
    assert s2.holds("spi", spi) is None and s2.holds("udp-port", port) is None
    assert s2.get("test.mapping", "m1") is None
    assert s2.holds("pool:p", addr) == "ike:lease:p:user:alice"
    assert s2.holds("spi", 4242) == "esp:peer:static"
    assert s2.stats["dropped_at_load"] == 3
    s2.backend._db.close()
    # gone from the file too, not only from this process's view
    rows = sqlite3.connect(path).execute("SELECT owner FROM records").fetchall()
    assert sorted(r[0] for r in rows) == ["esp:peer:static", "ike:lease:p:user:alice"]


def test_empty_volatile_prefix_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="empty"):
        store.declare_volatile_owners("")


def test_sqlite_files_are_private_from_creation(tmp_path) -> None:
    """state_dir 0700, database, -wal and -shm 0600 at once, whatever the umask: created
    under umask 077, so no moment exists in which another user could open them."""
    old = os.umask(0o022)
    try:
        state = tmp_path / "state" / "sub"
        b = SqliteBackend(state / "store.sqlite")
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in state.iterdir()}
        assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        assert modes == {"store.sqlite": "0o600", "store.sqlite-wal": "0o600", "store.sqlite-shm": "0o600"}
        assert os.umask(0o022) == 0o022  # the process umask is restored
        b._db.close()
    finally:
        os.umask(old)


def _corrupt_page(path, page: int) -> None:
    data = bytearray(path.read_bytes())
    data[4096 * (page - 1):4096 * page] = bytes(range(256)) * 16
    path.write_bytes(data)


@pytest.mark.parametrize("damage", ["page", "truncated"])
def test_damaged_sqlite_file_gives_one_clear_error(tmp_path, damage) -> None:
    from narsuite.store import StoreBackendError

    path = tmp_path / "s.sqlite"
    s = _sqlite_store(path)
    s.open()
    for i in range(600):
        ok(s.insert(mk(f"m{i}", spi=5000 + i)))
    s.backend._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.backend._db.close()
    assert path.stat().st_size > 8 * 4096
    if damage == "page":
        _corrupt_page(path, 4)
    else:
        path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(StoreBackendError) as e:
        _sqlite_store(path).open()
    msg = str(e.value)
    assert msg.startswith(f"store.path: cannot use {path} as SQLite: database disk image is malformed")
    assert "move it" in msg and "\n" not in msg


def test_reserve_spi_is_refused_while_a_shared_store_is_unreachable(clock: Clock) -> None:
    """An SPI reserved without the shared store could be drawn by another node: reserve_spi
    raises (IKE answers NO-PROPOSAL-CHOSEN) while the backend says it is unavailable."""
    from narsuite.store import StoreBackendError

    backend = MemoryBackend()
    s = Store(backend, clock)
    backend.available = False  # type: ignore[attr-defined]
    assert not s.available
    with pytest.raises(StoreBackendError):
        s.reserve_spi("ike:x")
    backend.available = True  # type: ignore[attr-defined]
    assert s.reserve_spi("ike:x") > 255


def test_key_text_and_dump_fast_paths_write_exactly_what_the_json_encoder_writes() -> None:
    """key_text writes ints, strings and tuples of them directly and dump reuses json's C encoder
    (the Redis backend's writes pass here on the reactor): the text must stay byte for byte what
    the plain encoder writes, or keys stored before would no longer be found."""
    import json as _json

    from narsuite.store.kinds import encode_value, key_text

    reference = _json.JSONEncoder(separators=(",", ":"), sort_keys=True)
    keys = [0, 1, -7, 2**64 + 3, "", "plain", 'quo"te\\', "ünïcode ☃ \x00\n", True, False, None, 1.5,
            (50, 13345), ("spi", 4096), ("ns", "é", -1), (), (1, (2, 3)), (1, b"\x01"), (Proto.ESP, 5),
            b"\x00\xff", ipaddress.ip_address("10.0.0.1"), Proto.ESP, frozenset({1}), [1, "a"]]
    for key in keys:
        assert key_text(key) == reference.encode(encode_value(key)), key

    @attrs.frozen
    class R:
        a: int
        b: str
        c: Proto
        d: bytes
        e: tuple
        f: float | None = None

    spec = KindSpec("t.fast", R, key=lambda r: r.a)
    for rec in (R(1, "x", Proto.ESP, b"\x01\x02", (1, "y")), R(-2, 'é"\\', Proto.AH, b"", (), 2.5)):
        assert spec.dump(rec) == reference.encode({f.name: encode_value(getattr(rec, f.name))
                                                   for f in attrs.fields(R)})
        assert spec.load(spec.dump(rec)) == rec
