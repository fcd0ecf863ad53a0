"""The common mapping store: the only place roles share state.

Reads are synchronous dict lookups on an in-memory view (the packet path);
writes are validated against that view, applied at once, handed to the
backend, and answered with a Deferred that fires when the backend has made
them durable.  Lifetimes are absolute times on the reactor clock, so tests
drive expiry with ``task.Clock``; one timer, reset to the earliest expiry,
removes records as they lapse.  Subscribers hear about every change.
"""

from __future__ import annotations

import heapq
import ipaddress
import secrets
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from narsuite.logs import logger
from narsuite.store.backends import IStoreBackend, MemoryBackend, Row, StoreBackendError, Write
from narsuite.store.kinds import LEASE, KindSpec, Lease, key_from_text

if TYPE_CHECKING:
    from twisted.internet.task import LoopingCall
    from twisted.python.failure import Failure

__all__ = ["Store", "Change", "Conflict", "UnknownKind", "Exhausted", "AddressPool"]

log = logger()


class Conflict(ValueError):
    """A write would break uniqueness: the key or a unique index value is taken."""

    def __init__(self, kind: str, index: str, value: Any, holder: Any = None) -> None:
        super().__init__(f"{kind}: {index} {value!r} is already taken")
        self.kind, self.index, self.value, self.holder = kind, index, value, holder


class UnknownKind(KeyError):
    pass


class Exhausted(RuntimeError):
    """An allocator has no free value left."""


@attrs.frozen
class Change:
    """What subscribers receive: ``op`` is "put" or "delete"."""

    op: str
    kind: str
    key: Hashable
    record: Any
    old: Any = None
    reason: str = ""  # "expired", "owner-dropped", "released", ""


@attrs.frozen
class _Unregistered:
    """Enough of a KindSpec for a backend to delete a row by its stored kind and key."""

    name: str


class _Entry:
    __slots__ = ("record", "expires", "owner", "node")

    def __init__(self, record: Any, expires: float | None, owner: str | None,
                 node: str | None = None) -> None:
        self.record = record
        self.expires = expires
        self.owner = owner
        #: the node that wrote it (shared backends); None: this process
        self.node = node


@attrs.frozen
class AddressPool:
    name: str
    network: ipaddress.IPv4Network
    exclude: frozenset[ipaddress.IPv4Address] = frozenset()

    @property
    def size(self) -> int:
        return sum(1 for _ in self.network.hosts()) - len(self.exclude)


class _Kind:
    """Runtime state of one kind: primary dict plus one dict per index.

    The indexes are also kept as ``(key function, dict)`` pairs by sort (unique, plain
    non-unique, ``many``): every write walks them, and reading ``Index`` attributes and
    looking the dict up by name per write was a third of a memory-store write."""

    __slots__ = ("spec", "entries", "unique", "multi", "serial", "unique_ix", "multi_ix",
                 "many_ix")

    def __init__(self, spec: KindSpec) -> None:
        self.spec = spec
        self.entries: dict[Hashable, _Entry] = {}
        self.unique: dict[str, dict[Hashable, Any]] = {}
        self.multi: dict[str, dict[Hashable, dict[Hashable, Any]]] = {}
        for ix in spec.indexes:
            (self.unique if ix.unique else self.multi)[ix.name] = {}
        self.unique_ix = tuple((ix.name, ix.key, self.unique[ix.name])
                               for ix in spec.indexes if ix.unique)
        self.multi_ix = tuple((ix.key, self.multi[ix.name])
                              for ix in spec.indexes if not ix.unique and not ix.many)
        self.many_ix = tuple((ix.key, self.multi[ix.name]) for ix in spec.indexes if ix.many)


def _spi_lease_failed(f: Failure, spi: int) -> None:
    """reserve_spi hands the SPI out at once; its lease's write failing is logged here."""
    log.failure("store: recording SPI lease {spi:#x}", f, spi=spi)


class Store:
    """Typed records, O(1) indexes, lifetimes, subscribers and allocators."""

    def __init__(self, backend: IStoreBackend | None = None, clock: IReactorTime | None = None,
                 touch_flush_interval: float = 1.0, node_id: str | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = IReactorTime(reactor)
        self.clock: IReactorTime = clock
        self.backend = backend or MemoryBackend()
        #: this process's name in a cluster (``[cluster] node_id``): written with every record,
        #: so the survivors know what a dead node's connections held
        self.node_id = node_id
        self._kinds: dict[str, _Kind] = {}
        self._by_type: dict[type, str] = {}
        self._owners: dict[str, set[tuple[str, Hashable]]] = {}
        self._heap: list[tuple[float, int, str, Hashable]] = []
        self._seq = 0
        self._timer: IDelayedCall | None = None
        self._subscribers: list[tuple[Callable[[Change], None], frozenset[str] | None]] = []
        #: kind -> the subscribers that hear of it, built on first use and dropped on every
        #: (un)subscribe: a write to a kind nobody watches builds no Change at all
        self._listeners: dict[str, tuple[Callable[[Change], None], ...]] = {}
        self._pools: dict[str, AddressPool] = {}
        self._pool_cursor: dict[str, int] = {}
        self._touched: dict[tuple[str, Hashable], float] = {}
        self._touch_flush_interval = touch_flush_interval
        self._touch_loop: LoopingCall | None = None
        self._running = False
        self.stats = {"inserts": 0, "deletes": 0, "expired": 0, "conflicts": 0, "rollbacks": 0,
                      "dropped_at_load": 0}
        self._volatile_owners: set[str] = set()
        self.register(LEASE)

    # ------------------------------------------------------------------ kinds
    def register(self, spec: KindSpec) -> None:
        existing = self._kinds.get(spec.name)
        if existing is not None:
            if existing.spec is not spec:
                raise ValueError(f"record kind {spec.name!r} is registered twice")
            return
        self._kinds[spec.name] = _Kind(spec)
        # A record class shared by two kinds must be written with kind=...
        self._by_type[spec.record] = spec.name if spec.record not in self._by_type else ""

    def kinds(self) -> list[KindSpec]:
        return [k.spec for k in self._kinds.values()]

    def kind(self, name: str) -> KindSpec:
        return self._kind(name).spec

    def _kind(self, name: str) -> _Kind:
        try:
            return self._kinds[name]
        except KeyError:
            raise UnknownKind(name) from None

    def add_pool(self, name: str, network: ipaddress.IPv4Network,
                 exclude: Iterable[ipaddress.IPv4Address] = ()) -> AddressPool:
        pool = AddressPool(name, network, frozenset(exclude))
        self._pools[name] = pool
        self._pool_cursor[name] = 0
        return pool

    def pools(self) -> dict[str, AddressPool]:
        return dict(self._pools)

    def declare_volatile_owners(self, *prefixes: str) -> None:
        """Owners whose names start with one of ``prefixes`` live only in this process.

        An IKE SA, an ESP child whose keys are never written, a NAR control connection:
        when the process dies they are gone, so whatever they held on disk (an SPI
        lease, ICMP identifier and port claims, a peer record) can never be released
        by them.  :meth:`open` drops such rows instead of holding them forever.  Roles
        declare their prefixes (``RoleSpec.volatile_owners``) before the store opens;
        durable owners (a user's pool address, a static peer) must not match one.
        """
        for p in prefixes:
            if not p:
                raise ValueError("a volatile owner prefix must not be empty (it would match every owner)")
            self._volatile_owners.add(p)

    def owner_is_volatile(self, owner: str | None) -> bool:
        return owner is not None and owner.startswith(tuple(self._volatile_owners))

    # -------------------------------------------------------------- lifecycle
    def open(self) -> int:
        """Load what the backend holds (before the reactor runs). Returns the count.

        Rows of kinds nobody registered are kept on disk untouched: a role
        that is not running this time must find its records next time.  Rows
        whose owner is volatile (:meth:`declare_volatile_owners`) are left over
        from a process that died without releasing them (kill -9, power loss):
        they are deleted, whatever their kind, and counted in
        ``stats["dropped_at_load"]``.
        """
        now = self.clock.seconds()
        n = 0
        stale: list[Write | None] = []
        stale_owners: set[str] = set()
        for row in self.backend.load(now):
            if row.data is not None and self.owner_is_volatile(row.owner) \
                    and row.node in (None, self.node_id):
                # (a live node's volatile rows in a shared store are its own business;
                # a dead node's are reaped when its heartbeat lapses)
                assert row.owner is not None
                stale.append(Write(_Unregistered(row.kind), key_from_text(row.key), None, None, row.owner))
                stale_owners.add(row.owner)
                continue
            k = self._kinds.get(row.kind)
            if k is None or row.data is None:
                continue
            if row.expires is not None and row.expires <= now:
                continue
            record = k.spec.load(row.data)
            self._apply_put(k, key_from_text(row.key), record, row.expires, row.owner, notify=False,
                            node=row.node)
            n += 1
        if stale:
            self.stats["dropped_at_load"] += len(stale)
            log.info("store: dropped {n} records of {owners} owners that died with the last process "
                     "(their SPIs, ports and identifiers are free again)", n=len(stale), owners=len(stale_owners))
            self._submit(stale).addErrback(
                lambda f: log.failure("store: deleting records of dead owners failed", f))
        return n

    def start(self) -> None:
        from twisted.internet.task import LoopingCall

        self._running = True
        bind = getattr(self.backend, "bind", None)
        if bind is not None:
            # A shared backend feeds changes decided elsewhere back (apply_remote).
            bind(self)
        self.backend.start(self.clock)
        self._touch_loop = loop = LoopingCall(self._flush_touched)
        loop.clock = self.clock
        loop.start(self._touch_flush_interval, now=False)
        self._schedule()

    def stop(self) -> defer.Deferred:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._touch_loop is not None and self._touch_loop.running:
            self._touch_loop.stop()
        self._flush_touched()
        return self.backend.stop()

    # ------------------------------------------------------------------ reads
    @property
    def available(self) -> bool:
        """False while a shared backend cannot take writes (Redis unreachable).

        Reads go on from the view; whoever is about to hand out something new (an SPI, a
        registration) asks this first and refuses with its protocol's own error.
        """
        return bool(getattr(self.backend, "available", True))

    def get(self, kind: str, key: Hashable) -> Any:
        e = self._kind(kind).entries.get(key)
        return None if e is None else e.record

    def lookup(self, kind: str, index: str, value: Hashable) -> Any:
        """The record whose unique ``index`` equals ``value``, or None."""
        return self._kind(kind).unique[index].get(value)

    def lookup_all(self, kind: str, index: str, value: Hashable) -> list[Any]:
        return list(self._kind(kind).multi[index].get(value, {}).values())

    def multi_index(self, kind: str, index: str) -> Mapping[Hashable, Mapping[Hashable, Any]]:
        """The live dict behind a non-unique index (value -> {key: record}), for lookups
        many at a time (:func:`narsuite.sadb.space_overlap`).  Read-only: the store's own."""
        return self._kind(kind).multi[index]

    def index(self, kind: str, index: str) -> Mapping[Hashable, Any]:
        """The live dict behind a unique index, for the packet path's ``.get``.

        Treat it as read-only: it is the store's own.
        """
        return self._kind(kind).unique[index]

    def records(self, kind: str) -> Iterator[Any]:
        return (e.record for e in list(self._kind(kind).entries.values()))

    def items(self, kind: str) -> Iterator[tuple[Hashable, Any, float | None, str | None]]:
        for key, e in list(self._kind(kind).entries.items()):
            yield key, e.record, e.expires, e.owner

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return sum(len(k.entries) for k in self._kinds.values())
        return len(self._kind(kind).entries)

    def expires(self, kind: str, key: Hashable) -> float | None:
        e = self._kind(kind).entries.get(key)
        return None if e is None else e.expires

    def owner_of(self, kind: str, key: Hashable) -> str | None:
        e = self._kind(kind).entries.get(key)
        return None if e is None else e.owner

    def node_of(self, kind: str, key: Hashable) -> str | None:
        """The node that wrote the record (shared backends), None if this process or unknown."""
        e = self._kind(kind).entries.get(key)
        return None if e is None else e.node

    def owned_by(self, owner: str) -> list[tuple[str, Any]]:
        return [(kind, self._kinds[kind].entries[key].record)
                for kind, key in sorted(self._owners.get(owner, ()), key=repr)]

    # ----------------------------------------------------------------- writes
    def insert(self, record: Any, *, kind: str | None = None, ttl: float | None = None,
               owner: str | None = None) -> defer.Deferred:
        """Add a new record; fails with :class:`Conflict` if its key or a unique value is taken."""
        return self._put(record, kind, ttl, owner, replace=False)

    def put(self, record: Any, *, kind: str | None = None, ttl: float | None = None,
            owner: str | None = None) -> defer.Deferred:
        """Insert or replace by primary key (unique indexes still must not clash)."""
        return self._put(record, kind, ttl, owner, replace=True)

    def update(self, kind: str, key: Hashable, **changes: Any) -> defer.Deferred:
        """Replace fields of an existing record, keeping its lifetime and owner."""
        k = self._kind(kind)
        e = k.entries.get(key)
        if e is None:
            return defer.fail(KeyError(f"{kind}: no record {key!r}"))
        new = attrs.evolve(e.record, **changes)
        if k.spec.key(new) != key:
            return defer.fail(ValueError(f"{kind}: update may not change the primary key"))
        return self._put(new, kind, None, e.owner, replace=True, keep_expiry=True)

    def delete(self, kind: str, key: Hashable) -> defer.Deferred:
        """Remove a record; fires with True if it existed."""
        k = self._kind(kind)
        e = k.entries.get(key)
        if e is None:
            return defer.succeed(False)
        owner = e.owner
        self._apply_delete(k, key, reason="")
        row = self._row(k, key, None, owner)
        if row is None:  # nothing for the backend to make durable (memory, or not persisted)
            return defer.succeed(True)
        return self.backend.submit([row]).addCallback(lambda _: True)

    def touch(self, kind: str, key: Hashable, ttl: float) -> bool:
        """Extend a record's lifetime to now+ttl. Cheap: for the packet path.

        The new expiry reaches the backend with the next batch of touches,
        not with the packet.
        """
        k = self._kinds[kind]
        e = k.entries.get(key)
        if e is None:
            return False
        new = self.clock.seconds() + ttl
        shorter = e.expires is None or new < e.expires
        e.expires = new
        if shorter:
            self._push(new, kind, key)
        if k.spec.persist:
            self._touched[(kind, key)] = new
        return True

    def drop_owner(self, owner: str, reason: str = "owner-dropped") -> defer.Deferred:
        """Delete every record of ``owner`` in every kind (a closed connection, a dead peer)."""
        rows = []
        for kind, key in list(self._owners.get(owner, ())):
            k = self._kinds[kind]
            self._apply_delete(k, key, reason=reason)
            rows.append(self._row(k, key, None, owner))
        n = len(rows)
        return self._submit(rows).addCallback(lambda _: n)

    # -------------------------------------------------------------- allocators
    def claim(self, namespace: str, value: Any, owner: str, ttl: float | None = None) -> defer.Deferred:
        """Take a specific value in a store-wide namespace; Conflict if someone holds it."""
        return self.insert(Lease(namespace, value, owner), ttl=ttl, owner=owner)

    def release(self, namespace: str, value: Any) -> defer.Deferred:
        return self.delete(LEASE.name, (namespace, value))

    def holds(self, namespace: str, value: Any) -> str | None:
        rec = self.get(LEASE.name, (namespace, value))
        return None if rec is None else rec.holder

    def allocate_spi(self, owner: str, ttl: float | None = None, namespace: str = "spi") -> defer.Deferred:
        """A fresh SPI from the CSPRNG: never 0, never 1-255 (reserved by IANA), unique store-wide."""
        leases = self._kinds[LEASE.name].entries
        for _ in range(64):
            spi = secrets.randbits(32)
            if spi > 255 and (namespace, spi) not in leases:
                return self.claim(namespace, spi, owner, ttl).addCallback(lambda lease: lease.value)
        return defer.fail(Exhausted(f"{namespace}: no free SPI after 64 random draws"))

    def reserve_spi(self, owner: str, ttl: float | None = None, namespace: str = "spi") -> int:
        """``allocate_spi`` without waiting for the write to be durable: the SPI now.

        For SPIs of SAs that are never persisted (negotiated keys live in memory only): a
        lease lost in a crash names an SA that is gone too, and a Quick Mode answer need
        not wait for the next group commit.  The lease is in the in-memory index at once,
        so no one else draws the same value.
        """
        if not self.available:
            # Unrecorded, the SPI could be drawn by another node sharing the store.
            raise StoreBackendError("the shared store is unreachable: no SPI can be reserved")
        leases = self._kinds[LEASE.name].entries
        for _ in range(64):
            spi = secrets.randbits(32)
            if spi > 255 and (namespace, spi) not in leases:
                self.claim(namespace, spi, owner, ttl).addErrback(_spi_lease_failed, spi)
                return spi
        raise Exhausted(f"{namespace}: no free SPI after 64 random draws")

    def allocate_number(self, namespace: str, low: int, high: int, owner: str,
                        ttl: float | None = None, prefer: int | None = None) -> defer.Deferred:
        """A number in [low, high] free in ``namespace`` (ports, ICMP identifiers).

        ``prefer`` is honoured when free (a client's proposal); otherwise the
        value is random (unpredictable ports), with a linear scan as the
        fallback when the range is nearly full.
        """
        leases = self._kinds[LEASE.name].entries
        if prefer is not None and low <= prefer <= high and (namespace, prefer) not in leases:
            return self.claim(namespace, prefer, owner, ttl).addCallback(lambda lease: lease.value)
        span = high - low + 1
        for _ in range(16):
            v = low + secrets.randbelow(span)
            if (namespace, v) not in leases:
                return self.claim(namespace, v, owner, ttl).addCallback(lambda lease: lease.value)
        start = secrets.randbelow(span)
        for i in range(span):
            v = low + (start + i) % span
            if (namespace, v) not in leases:
                return self.claim(namespace, v, owner, ttl).addCallback(lambda lease: lease.value)
        return defer.fail(Exhausted(f"{namespace}: all of {low}-{high} are taken"))

    def lease_address(self, pool: str, owner: str, ttl: float | None = None,
                      prefer: ipaddress.IPv4Address | None = None) -> defer.Deferred:
        """An address from ``pool`` for ``owner``; the same one if it already holds one.

        The lease goes back to the pool when it expires or its owner is dropped.
        """
        try:
            p = self._pools[pool]
        except KeyError:
            return defer.fail(KeyError(f"no address pool named {pool!r}"))
        namespace = f"pool:{pool}"
        k = self._kinds[LEASE.name]
        for kind, key in self._owners.get(owner, ()):
            if kind == LEASE.name and isinstance(key, tuple) and key[0] == namespace:
                if ttl is not None:
                    self.touch(LEASE.name, key, ttl)
                return defer.succeed(key[1])
        leases = k.entries
        if prefer is not None and prefer in p.network and prefer not in p.exclude \
                and (namespace, prefer) not in leases and prefer not in (p.network.network_address,
                                                                         p.network.broadcast_address):
            return self.claim(namespace, prefer, owner, ttl).addCallback(lambda lease: lease.value)
        first = int(p.network.network_address) + 1
        count = p.network.num_addresses - 2 if p.network.prefixlen < 31 else p.network.num_addresses
        if p.network.prefixlen >= 31:
            first = int(p.network.network_address)
        cursor = self._pool_cursor[pool]
        for i in range(count):
            off = (cursor + i) % count
            addr = ipaddress.IPv4Address(first + off)
            if addr in p.exclude or (namespace, addr) in leases:
                continue
            self._pool_cursor[pool] = (off + 1) % count
            return self.claim(namespace, addr, owner, ttl).addCallback(lambda lease: lease.value)
        return defer.fail(Exhausted(f"address pool {pool!r} ({p.network}) has no free address"))

    def pool_usage(self, pool: str) -> tuple[int, int]:
        """(leased, size) of a pool."""
        p = self._pools[pool]
        ns = f"pool:{pool}"
        used = sum(1 for key in self._kinds[LEASE.name].entries if isinstance(key, tuple) and key[0] == ns)
        return used, p.size

    # ------------------------------------------------------------ subscribers
    def subscribe(self, callback: Callable[[Change], None],
                  kinds: Iterable[str] | None = None) -> Callable[[], None]:
        """Call ``callback(change)`` after every change (of ``kinds``). Returns an unsubscribe."""
        entry = (callback, frozenset(kinds) if kinds is not None else None)
        self._subscribers.append(entry)
        self._listeners = {}

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)
                self._listeners = {}

        return unsubscribe

    def _listeners_of(self, kind: str) -> tuple[Callable[[Change], None], ...]:
        found = self._listeners.get(kind)
        if found is None:
            found = self._listeners[kind] = tuple(
                callback for callback, kinds in self._subscribers if kinds is None or kind in kinds)
        return found

    def _notify(self, change: Change) -> None:
        for callback in self._listeners_of(change.kind):
            try:
                callback(change)
            except Exception:
                log.failure("store subscriber {cb!r} failed on {op} {kind}", cb=callback,
                            op=change.op, kind=change.kind)

    # ---------------------------------------------------------------- remote
    def apply_remote(self, row: Row) -> None:
        """Apply a change decided elsewhere (a networked backend's replication feed)."""
        k = self._kinds.get(row.kind)
        if k is None:
            return
        key = key_from_text(row.key)
        if row.data is None:
            if key in k.entries:
                self._apply_delete(k, key, reason="remote")
        else:
            self._apply_put(k, key, k.spec.load(row.data), row.expires, row.owner, notify=True,
                            node=row.node)

    def apply_remote_expiry(self, kind: str, key: Hashable, expires: float | None) -> None:
        """A lifetime changed elsewhere (another node's ``touch``): no subscriber cares."""
        k = self._kinds.get(kind)
        e = None if k is None else k.entries.get(key)
        if e is None:
            return
        e.expires = expires
        if expires is not None:
            self._push(expires, kind, key)

    def restore_local(self, kind: str, key: Hashable, record: Any, expires: float | None,
                      owner: str | None) -> None:
        """Put back this node's own write (``record`` None: its delete) after an older change
        from another node overwrote it in the view while the write was on its way; the shared
        backend ordered ours last."""
        k = self._kinds.get(kind)
        if k is None:
            return
        if record is None:
            if key in k.entries:
                self._apply_delete(k, key, reason="remote")
        else:
            self._apply_put(k, key, record, expires, owner, notify=True, node=self.node_id)

    # -------------------------------------------------------------- internals
    def _put(self, record: Any, kind: str | None, ttl: float | None, owner: str | None,
             replace: bool, keep_expiry: bool = False) -> defer.Deferred:
        k = self._kind(kind or self._kind_of(record))
        spec = k.spec
        if not isinstance(record, spec.record):
            return defer.fail(TypeError(f"{spec.name} holds {spec.record.__name__}, not "
                                        f"{type(record).__name__}"))
        key = spec.key(record)
        old = k.entries.get(key)
        if old is not None and not replace:
            self.stats["conflicts"] += 1
            return defer.fail(Conflict(spec.name, "key", key, old.record))
        for name, index_key, unique in k.unique_ix:
            value = index_key(record)
            if value is None:
                continue
            holder = unique.get(value)
            if holder is not None and spec.key(holder) != key:
                self.stats["conflicts"] += 1
                return defer.fail(Conflict(spec.name, name, value, holder))
        if keep_expiry and old is not None:
            expires = old.expires
        else:
            expires = None if ttl is None else self.clock.seconds() + ttl
        self.stats["inserts"] += 1
        if not spec.persist or not self.backend.persistent:
            # Nothing for the backend (memory, or a kind that is not persisted): the view is
            # all there is, nothing can be refused, nothing rolled back -- and a registration
            # or an SA pays no callback chain for it.
            self._apply_put(k, key, record, expires, owner, notify=True, node=self.node_id)
            return defer.succeed(record)
        previous = None if old is None else (old.record, old.expires, old.owner, old.node)
        self._apply_put(k, key, record, expires, owner, notify=True, node=self.node_id)
        row = self._row(k, key, record, reason="" if replace else "insert")
        assert row is not None  # persistent kind and backend: _row has a write for it
        d = self.backend.submit([row])

        def rollback(f):
            # The backend refused (a networked conflict, a disk error): undo
            # the local change so the view matches what is durable.
            if getattr(f.value, "applied", False):
                # The shared store has it (only the replicas' acknowledgement is missing):
                # the view keeps what every other node sees too.
                return f
            self.stats["rollbacks"] += 1
            cur = k.entries.get(key)
            if cur is not None and cur.record is record:
                self._apply_delete(k, key, reason="rollback")
                if previous is not None:
                    self._apply_put(k, key, previous[0], previous[1], previous[2], notify=True,
                                    node=previous[3])
            return f

        d.addCallbacks(lambda _: record, rollback)
        return d

    def _kind_of(self, record: Any) -> str:
        name = self._by_type.get(type(record))
        if not name:
            raise UnknownKind(f"{type(record).__name__} (pass kind=...)")
        return name

    def _apply_put(self, k: _Kind, key: Hashable, record: Any, expires: float | None,
                   owner: str | None, notify: bool, node: str | None = None) -> None:
        entries = k.entries
        old = entries.get(key)
        if old is not None:
            self._unindex(k, key, old)
        entries[key] = _Entry(record, expires, owner, node)
        spec = k.spec
        for _name, index_key, unique in k.unique_ix:
            value = index_key(record)
            if value is not None:
                unique[value] = record
        for index_key, multi in k.multi_ix:
            value = index_key(record)
            if value is not None:
                bucket = multi.get(value)
                if bucket is None:
                    multi[value] = {key: record}
                else:
                    bucket[key] = record
        for index_key, multi in k.many_ix:
            values = index_key(record)
            if values is not None:
                for v in values:
                    multi.setdefault(v, {})[key] = record
        if owner is not None:
            self._owners.setdefault(owner, set()).add((spec.name, key))
        if expires is not None and (old is None or old.expires is None or expires < old.expires):
            # A replacement that lives longer needs no heap entry of its own: the old one
            # comes due first and re-pushes the later time (as for touch).  A binding
            # refreshed thousands of times a second would otherwise grow the heap by one
            # entry per refresh, each kept for a whole lifetime.
            self._push(expires, spec.name, key)
        if notify and self._listeners_of(spec.name):
            self._notify(Change("put", spec.name, key, record, None if old is None else old.record))

    def _unindex(self, k: _Kind, key: Hashable, e: _Entry) -> None:
        record = e.record
        for _name, index_key, unique in k.unique_ix:
            value = index_key(record)
            if value is not None and unique.get(value) is record:
                del unique[value]
        for index_key, multi in k.multi_ix:
            value = index_key(record)
            if value is None:
                continue
            bucket = multi.get(value)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del multi[value]
        for index_key, multi in k.many_ix:
            values = index_key(record)
            if values is None:
                continue
            for v in values:
                bucket = multi.get(v)
                if bucket is not None:
                    bucket.pop(key, None)
                    if not bucket:
                        del multi[v]
        if e.owner is not None:
            owned = self._owners.get(e.owner)
            if owned is not None:
                owned.discard((k.spec.name, key))
                if not owned:
                    del self._owners[e.owner]

    def _apply_delete(self, k: _Kind, key: Hashable, reason: str) -> None:
        e = k.entries.pop(key)
        self._unindex(k, key, e)
        name = k.spec.name
        if self._touched:
            self._touched.pop((name, key), None)
        self.stats["deletes"] += 1
        if self._listeners_of(name):
            self._notify(Change("delete", name, key, e.record, e.record, reason))

    def _row(self, k: _Kind, key: Hashable, record: Any, old_owner: str | None = None,
             reason: str = "") -> Write | None:
        """The backend's view of a change; a delete names the owner it removed."""
        if not k.spec.persist or not self.backend.persistent:
            return None
        e = k.entries.get(key)
        if record is None or e is None:
            return Write(k.spec, key, None, None, old_owner, reason)
        return Write(k.spec, key, record, e.expires, e.owner, reason, self.owner_is_volatile(e.owner))

    def _submit(self, rows: list[Write | None]) -> defer.Deferred:
        real = [r for r in rows if r is not None]
        if not real:
            return defer.succeed(None)
        return self.backend.submit(real)

    def _flush_touched(self) -> None:
        if not self._touched:
            return
        rows = []
        for (kind, key), _expires in self._touched.items():
            k = self._kinds[kind]
            e = k.entries.get(key)
            if e is not None:
                rows.append(self._row(k, key, e.record, reason="touch"))
        self._touched.clear()
        d = self._submit(rows)
        d.addErrback(lambda f: log.failure("store: persisting lifetimes failed", f))

    # ---------------------------------------------------------------- expiry
    def _push(self, when: float, kind: str, key: Hashable) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, key))
        if self._running and (self._timer is None or not self._timer.active()
                              or when < self._timer.getTime()):
            self._schedule()

    def _schedule(self) -> None:
        if not self._running:
            return
        if not self._heap:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        when = self._heap[0][0]
        delay = max(0.0, when - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        heap = self._heap
        rows = []
        while heap and heap[0][0] <= now:
            _when, _seq, kind, key = heapq.heappop(heap)
            k = self._kinds[kind]
            e = k.entries.get(key)
            if e is None or e.expires is None:
                continue
            if e.expires > now:
                # Touched since this heap entry was pushed: it lives on, and
                # its own (later) heap entry exists or is pushed here.
                self._push(e.expires, kind, key)
                continue
            self._apply_delete(k, key, reason="expired")
            self.stats["expired"] += 1
            rows.append(self._row(k, key, None, e.owner, reason="expired"))
        if rows:
            self._submit(rows).addErrback(lambda f: log.failure("store: persisting expiry failed", f))
        self._schedule()
