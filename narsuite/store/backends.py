"""Where the store's records live beyond this process.

The store itself is always an in-memory, fully indexed view: the packet path
reads dicts and never waits on I/O.  A backend only makes that view durable
(or, later, shared): the store hands it every accepted change, and the
Deferred it returns fires once the change is as durable as the backend
promises.  Writes therefore stay off the packet path, and a caller that waits
for its write's Deferred knows the record will survive a crash.

The interface is shaped for a networked backend too: ``submit`` may fail
(a conflict decided elsewhere), in which case the store rolls its view back
and the writer's Deferred fails; ``load`` gives the starting view and a
networked backend can push remote changes into the store with
:meth:`narsuite.store.core.Store.apply_remote`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from narsuite.logs import logger

if TYPE_CHECKING:
    from twisted.internet.task import LoopingCall

__all__ = ["Row", "Write", "IStoreBackend", "MemoryBackend", "SqliteBackend", "StoreBackendError"]


class StoreBackendError(RuntimeError):
    """The backend cannot open or write its storage."""


@attrs.frozen
class Row:
    """One record as a backend stores it: serialised, kind-agnostic."""

    kind: str
    key: str
    data: str | None  # None: deleted
    expires: float | None
    owner: str | None
    #: the node that wrote it (a networked backend's ``[cluster] node_id``); None: this process
    node: str | None = None


@attrs.frozen
class Write:
    """A change handed to a backend, not yet serialised.

    Records are immutable, so turning them into JSON can wait for the
    backend's writer thread: the reactor thread only queues this.
    """

    spec: Any  # narsuite.store.kinds.KindSpec
    key: Any
    record: Any  # None: deleted
    expires: float | None
    #: the record's owner; for a delete, the owner the writer saw (a shared backend deletes
    #: only if the stored record still has it: another node may have re-taken the key)
    owner: str | None
    #: "" (a write; "insert": the key must be new), "expired" (the lifetime lapsed: a backend
    #: with its own expiry skips it),
    #: "touch" (only the lifetime changed: a shared backend must not resurrect a deleted record)
    reason: str = ""
    #: the writer's owner is declared volatile (lives only in its process): reaped with its node
    volatile: bool = False

    @property
    def ident(self) -> tuple[str, Any]:
        return (self.spec.name, self.key)

    def row(self) -> Row:
        from narsuite.store.kinds import key_text

        data = None if self.record is None else self.spec.dump(self.record)
        return Row(self.spec.name, key_text(self.key), data, self.expires,
                   None if self.record is None else self.owner)


class IStoreBackend(Interface):
    persistent: bool

    def load(now: float) -> Iterable[Row]:
        """Every row unexpired at ``now`` (store clock), once at start-up (may block)."""

    def submit(writes: Sequence[Write]) -> defer.Deferred:
        """Make ``writes`` durable; fires when they are (or fails: the store rolls back)."""

    def start(reactor) -> None:
        """Begin background work (flush timers, threads)."""

    def stop() -> defer.Deferred:
        """Flush what is queued and release resources."""

    def stats() -> dict:
        """Numbers for metrics: queued rows, commits, last commit latency..."""


@implementer(IStoreBackend)
class MemoryBackend:
    """Nothing persists: for tests, benchmarks and throw-away instances."""

    persistent = False

    def load(self, now: float) -> Iterable[Row]:
        return ()

    def submit(self, writes: Sequence[Write]) -> defer.Deferred:
        return defer.succeed(None)

    def start(self, reactor) -> None:
        pass

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    def stats(self) -> dict:
        return {}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    expires REAL,
    owner TEXT,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
"""
_SCHEMA_VERSION = "1"


@implementer(IStoreBackend)
class SqliteBackend:
    """The embedded default: one SQLite file in WAL mode, written by group commit.

    Changes queue in memory; every ``flush_interval`` one worker thread writes
    the whole queue in one transaction, then fires the Deferreds of every write
    in it.  With ``synchronous=normal`` in WAL mode a committed transaction
    survives the process being killed (kill -9); ``full`` also survives a power
    loss at the price of an fsync per commit.
    """

    persistent = True
    log = logger()

    def __init__(self, path: Path, flush_interval: float = 0.02, synchronous: str = "normal") -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.synchronous = synchronous
        # Latest write per (kind, key): a record changed twice between two
        # commits is written once.
        self._queue: dict[tuple[str, Any], Write] = {}
        self._waiters: list[defer.Deferred] = []
        self._pool: ThreadPool | None = None
        self._reactor: Any = None
        self._call: LoopingCall | None = None
        self._flushing = False
        self._stopping = False
        self._stats = {"commits": 0, "rows_written": 0, "last_commit_seconds": 0.0, "queued": 0}
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        """Open (or create) the file, private from its first byte.

        The directory and the database with its -wal and -shm files are created under
        umask 077: they hold lease owners and peer addresses, and a chmod after the
        fact leaves a window (SQLite gives -wal and -shm the database file's mode, so
        they are private too).  A file that fails SQLite's ``quick_check`` (a corrupted
        page) or cannot be read at all (a truncated file) stops the start with one
        :class:`StoreBackendError` that names the file and the fix.
        """
        old_umask = os.umask(0o077)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            problems = [str(r[0]).replace("\n", " ") for r in db.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                db.close()
                raise sqlite3.DatabaseError("database disk image is malformed (quick_check: "
                                            + "; ".join(problems) + ")")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise StoreBackendError(
                    f"{self.path}: store schema version {row[0]}, this narsuite reads "
                    f"{_SCHEMA_VERSION}; move the file away to start empty"
                )
        except sqlite3.Error as e:
            raise self._unusable(e) from None
        finally:
            os.umask(old_umask)
        self._warn_if_open()
        return db

    def _unusable(self, e: Exception) -> StoreBackendError:
        return StoreBackendError(
            f"store.path: cannot use {self.path} as SQLite: {e}; restore it from a backup, or move it "
            f"(with any -wal and -shm files beside it) away to start with an empty store")

    def _warn_if_open(self) -> None:
        """Files made by an older narsuite (or by hand) may be open to other users: say so."""
        for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            try:
                mode = p.stat().st_mode & 0o777
            except OSError:
                continue
            if mode & 0o077:
                self.log.warn("store: {path} is open to other users (mode {mode:o}); chmod 600 it",
                              path=str(p), mode=mode)

    def load(self, now: float) -> Iterable[Row]:
        # Expired rows are dropped here rather than loaded and expired again.  Every row is
        # read before any is yielded, so a page that breaks only mid-read is reported the
        # way quick_check's findings are.
        try:
            self._db.execute("DELETE FROM records WHERE expires IS NOT NULL AND expires <= ?", (now,))
            rows = self._db.execute("SELECT kind, key, data, expires, owner FROM records").fetchall()
        except sqlite3.Error as e:
            raise self._unusable(e) from None
        for kind, key, data, expires, owner in rows:
            yield Row(kind, key, data, expires, owner)

    def start(self, reactor) -> None:
        from twisted.internet.task import LoopingCall

        self._reactor = reactor
        self._pool = pool = ThreadPool(1, 1, name="narsuite-store")
        pool.start()
        self._call = call = LoopingCall(self._flush)
        call.clock = reactor
        call.start(self.flush_interval, now=False)

    def submit(self, writes: Sequence[Write]) -> defer.Deferred:
        queue = self._queue
        for w in writes:
            queue.pop(w.ident, None)  # keep commit order = order of the last change
            queue[w.ident] = w
        self._stats["queued"] = len(queue)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        if self._pool is None:
            # Not started (tests, tools): write through synchronously.
            self._write(self._take())
        return d

    def _take(self) -> tuple[list[Write], list[defer.Deferred]]:
        writes, waiters = list(self._queue.values()), self._waiters
        self._queue, self._waiters = {}, []
        self._stats["queued"] = 0
        return writes, waiters

    def _write(self, batch: tuple[list[Write], list[defer.Deferred]]) -> None:
        rows, waiters = batch
        try:
            self._commit(rows)
        except sqlite3.Error as e:
            err = StoreBackendError(f"writing {self.path}: {e}")
            for w in waiters:
                w.errback(err)
            return
        for w in waiters:
            w.callback(None)

    def _commit(self, writes: list[Write]) -> float:
        """One transaction for the whole batch (runs in the writer thread)."""
        started = time.perf_counter()
        rows = [w.row() for w in writes]
        db = self._db
        db.execute("BEGIN")
        try:
            for row in rows:
                if row.data is None:
                    db.execute("DELETE FROM records WHERE kind=? AND key=?", (row.kind, row.key))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)",
                        (row.kind, row.key, row.data, row.expires, row.owner),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        elapsed = time.perf_counter() - started
        self._stats["commits"] += 1
        self._stats["rows_written"] += len(rows)
        self._stats["last_commit_seconds"] = elapsed
        return elapsed

    def _flush(self) -> defer.Deferred | None:
        if self._flushing or not self._queue:
            return None
        self._flushing = True
        rows, waiters = self._take()
        from twisted.internet.threads import deferToThreadPool

        # Started: only start's LoopingCall and stop (after start) flush; before start,
        # submit writes through synchronously and leaves nothing queued.
        assert self._pool is not None
        d = deferToThreadPool(self._reactor, self._pool, self._commit, rows)

        def done(result: object) -> None:
            self._flushing = False
            for w in waiters:
                w.callback(None)

        def failed(f) -> None:
            self._flushing = False
            self.log.failure("store: writing {path} failed", f, path=str(self.path))
            err = StoreBackendError(f"writing {self.path}: {f.getErrorMessage()}")
            for w in waiters:
                w.errback(err)

        d.addCallbacks(done, failed)
        return d

    @defer.inlineCallbacks
    def stop(self):
        if self._call is not None and self._call.running:
            self._call.stop()
        while self._flushing:
            yield _sleep(self._reactor, 0.005)
        if self._queue:
            yield self._flush()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        self._db.close()

    def stats(self) -> dict:
        return dict(self._stats)


def _sleep(reactor, seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
