"""The shared store: several nodes, one Redis (with replicas and Sentinels).

Every node keeps the full in-memory view the packet path reads (:class:`~narsuite.store.core.Store`);
this backend makes it shared:

* **Writes** go to Redis in one Lua script per batch (:data:`WRITE_LUA`), which checks and takes the
  primary key (``insert``) and every unique index value of the record atomically, across all nodes.
  A value another node holds fails the write with the store's own :class:`Conflict`; the store rolls
  its view back.  The script appends the change to a stream in the same step.
* **Changes of other nodes** arrive through that stream (``XREAD BLOCK`` in a reader thread) and are
  applied to the view with :meth:`Store.apply_remote`, in the order Redis made them.  Each node reads
  from the last entry it applied; after a reconnect it checks that entry is still there (a trimmed
  stream, a failed-over primary that never had it) and otherwise reloads everything and diffs.
* **Lifetimes** are Redis expiries (``PEXPIREAT`` on the record and its index keys), so a lapsed value
  is free for every node at the same moment; each node's own timer removes the record from its view.
* **Availability**: while Redis is unreachable, writes fail at once with :class:`StoreUnavailable` (the
  roles answer with their protocol's refusal); reads go on from the view; the reader reconnects,
  resyncs and the node takes writes again by itself.

The write connection is a protocol on the reactor thread (:class:`_RespWriter`: the reactor sends
each batch itself, no hand-over to a thread and back); the stream reader and the control thread
(heartbeats, reaping, finding the primary) are redis-py threads, each with its own connection.
Measured against txredisapi and against a redis-py writer thread: docs/store.md, "Choosing the client".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from narsuite.logs import logger
from narsuite.store.backends import IStoreBackend, Row, StoreBackendError, Write
from narsuite.store.kinds import key_from_text, key_text

__all__ = ["RedisBackend", "StoreUnavailable", "NotReplicated", "make_redis_client", "WRITE_LUA"]

log = logger()


class StoreUnavailable(StoreBackendError):
    """Redis cannot be reached: the write was not made (refuse what needed it)."""


class NotReplicated(StoreBackendError):
    """The primary has the write but fewer replicas than ``replicas_ack`` confirmed it in time.

    ``applied`` tells the store to keep the change in its view: every node sees it.
    """

    applied = True


#: One call applies a batch of writes; each one is atomic and checked on its own.
#: ARGV: prefix, node, maxlen, and the batch as one JSON array (Redis's cjson decodes it: one
#: argument for redis-py to pack instead of ten per write), each write an array of strings:
#: op, kind, key, ... (see RedisBackend._encode).
#: Record hash fields: k kind, y key, d data, e expires (store clock, text), w owner, n node,
#: x "1" if the owner is volatile, u unique-index keys (newline separated), v stream id.
WRITE_LUA = r"""
local pfx, node, maxlen = ARGV[1], ARGV[2], ARGV[3]
local stream = pfx .. 'log'
local out = {}
local batch = cjson.decode(ARGV[4])
local function drop_indexes(rk)
  local old = redis.call('HGET', rk, 'u')
  if old and old ~= '' then
    for uk in string.gmatch(old, '[^\n]+') do
      if redis.call('GET', pfx .. 'u:' .. uk) == rk then redis.call('DEL', pfx .. 'u:' .. uk) end
    end
  end
  local oldn = redis.call('HGET', rk, 'n')
  if oldn and redis.call('HGET', rk, 'x') == '1' then redis.call('SREM', pfx .. 'eph:' .. oldn, rk) end
end
local function expire(key, ms)
  if ms ~= '' then redis.call('PEXPIREAT', key, ms) else redis.call('PERSIST', key) end
end
for _, w in ipairs(batch) do
  local op, kind, key = w[1], w[2], w[3]
  local rk = pfx .. 'r:' .. kind .. ':' .. key
  if op == 'I' or op == 'P' then
    local data, e, ms, owner, vol = w[4], w[5], w[6], w[7], w[8]
    local uks = {}
    for j = 9, #w do uks[#uks + 1] = w[j] end
    local nuk = #uks
    local exists = redis.call('EXISTS', rk) == 1
    local res = nil
    if op == 'I' and exists then res = {'C', 'key', redis.call('HGET', rk, 'w') or ''} end
    if not res then
      for j = 1, nuk do
        local h = redis.call('GET', pfx .. 'u:' .. uks[j])
        if h and h ~= rk then res = {'C', uks[j], h}; break end
      end
    end
    if res then
      out[#out + 1] = res
    else
      if exists then
        drop_indexes(rk)
        redis.call('DEL', rk)
      end
      local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'o', 'P', 'k', kind, 'y', key,
                            'd', data, 'e', e, 'w', owner, 'n', node)
      redis.call('HSET', rk, 'k', kind, 'y', key, 'd', data, 'e', e, 'w', owner, 'n', node, 'x', vol,
                 'u', table.concat(uks, '\n'), 'v', id)
      -- (a new hash and a plain SET carry no expiry: only a lifetime needs a call)
      if ms ~= '' then redis.call('PEXPIREAT', rk, ms) end
      for j = 1, nuk do
        local uk = pfx .. 'u:' .. uks[j]
        if ms ~= '' then redis.call('SET', uk, rk, 'PXAT', ms) else redis.call('SET', uk, rk) end
      end
      if vol == '1' then redis.call('SADD', pfx .. 'eph:' .. node, rk) end
      out[#out + 1] = {'OK', id}
    end
  elseif op == 'D' then
    local owner = w[4]
    if redis.call('EXISTS', rk) == 1 and (redis.call('HGET', rk, 'w') or '') == owner then
      drop_indexes(rk)
      redis.call('DEL', rk)
      local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'o', 'D', 'k', kind, 'y', key, 'n', node)
      out[#out + 1] = {'OK', id}
    else
      out[#out + 1] = {'N'}
    end
  elseif op == 'T' then
    local e, ms, owner = w[4], w[5], w[6]
    if redis.call('EXISTS', rk) == 1 and (redis.call('HGET', rk, 'w') or '') == owner then
      redis.call('HSET', rk, 'e', e)
      expire(rk, ms)
      local old = redis.call('HGET', rk, 'u')
      if old and old ~= '' then
        for uk in string.gmatch(old, '[^\n]+') do expire(pfx .. 'u:' .. uk, ms) end
      end
      local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'o', 'T', 'k', kind, 'y', key,
                            'e', e, 'n', node)
      out[#out + 1] = {'OK', id}
    else
      out[#out + 1] = {'G'}
    end
  else
    return redis.error_reply('narsuite: unknown store op ' .. tostring(op))
  end
end
return out
"""

#: Reap what a dead node's volatile owners held (at most ARGV[4] records per call), unless its
#: heartbeat is back.  ARGV: prefix, dead node, maxlen, count.  Returns {reaped, left} or -1.
REAP_LUA = r"""
local pfx, dead, maxlen, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('EXISTS', pfx .. 'node:' .. dead) == 1 then return -1 end
local set = pfx .. 'eph:' .. dead
local n = 0
for _, rk in ipairs(redis.call('SPOP', set, count)) do
  if redis.call('HGET', rk, 'n') == dead and redis.call('HGET', rk, 'x') == '1' then
    local kind, key = redis.call('HGET', rk, 'k'), redis.call('HGET', rk, 'y')
    local old = redis.call('HGET', rk, 'u')
    if old and old ~= '' then
      for uk in string.gmatch(old, '[^\n]+') do
        if redis.call('GET', pfx .. 'u:' .. uk) == rk then redis.call('DEL', pfx .. 'u:' .. uk) end
      end
    end
    redis.call('DEL', rk)
    redis.call('XADD', pfx .. 'log', 'MAXLEN', '~', maxlen, '*', 'o', 'R', 'k', kind, 'y', key, 'n', dead)
    n = n + 1
  end
end
local left = redis.call('SCARD', set)
if left == 0 then redis.call('SREM', pfx .. 'nodes', dead) end
return {n, left}
"""


def _sid(text: str) -> tuple[int, int]:
    """A stream id as a comparable pair ("1700000000000-3" -> (1700000000000, 3))."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _read_secret(path: Any) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip("\r\n")


def make_redis_client(cfg: Any) -> Callable[[str], Any]:
    """A factory of redis-py clients for ``[store.redis]`` (URL or Sentinels, ACL user, TLS).

    Secrets are read from their files here and live only inside the client objects; nothing
    that describes the connection for logs includes them (see :func:`describe`).  The factory
    takes the client's name (``CLIENT LIST`` shows which node and thread a connection is).
    redis-py's own retries are off: a write retried after Redis ran it would look like a
    conflict with itself; the backend reconnects and resyncs by itself.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    password = _read_secret(cfg.password_file)
    kw: dict[str, Any] = {
        "socket_timeout": cfg.connect_timeout + 1.0, "socket_connect_timeout": cfg.connect_timeout,
        "health_check_interval": 0, "decode_responses": True, "retry": Retry(NoBackoff(), 0),
    }
    if cfg.username:
        kw["username"] = cfg.username
    if password is not None:
        kw["password"] = password
    tls = cfg.tls or cfg.url.startswith("rediss://")
    if tls:
        kw["ssl"] = True
        kw["ssl_cert_reqs"] = "required"
        if cfg.tls_ca_file is not None:
            kw["ssl_ca_certs"] = str(cfg.tls_ca_file)
        if cfg.tls_cert_file is not None:
            kw["ssl_certfile"] = str(cfg.tls_cert_file)
        if cfg.tls_key_file is not None:
            kw["ssl_keyfile"] = str(cfg.tls_key_file)
    if cfg.url:
        url = cfg.url

        def from_url(name: str) -> Any:
            if url.startswith("rediss://"):
                kw.pop("ssl", None)
            return redis.Redis.from_url(url, client_name=name, **kw)

        return from_url
    sentinels = [(h, int(p)) for h, _, p in (s.rpartition(":") for s in cfg.sentinels)]
    skw: dict[str, Any] = {"socket_timeout": cfg.connect_timeout, "socket_connect_timeout": cfg.connect_timeout,
                           "decode_responses": True}
    spw = _read_secret(cfg.sentinel_password_file)
    if spw is not None:
        skw["password"] = spw
    if tls:
        skw.update({k: v for k, v in kw.items() if k.startswith("ssl")})

    def from_sentinels(name: str) -> Any:
        s = Sentinel(sentinels, sentinel_kwargs=skw, **kw)
        return s.master_for(cfg.service, client_name=name, **kw)

    return from_sentinels


def describe(cfg: Any) -> str:
    """Where the store is, for logs and ``narctl cluster``: never a secret."""
    auth = f"user {cfg.username}" if cfg.username else ("password" if cfg.password_file else "no auth")
    where = cfg.url if cfg.url else f"sentinels {','.join(cfg.sentinels)} service {cfg.service}"
    return f"redis {where} ({auth}{', TLS' if cfg.tls or cfg.url.startswith('rediss://') else ''})"


#: stream entries per XREAD at most
_READ_COUNT = 1000

_Batch = list[tuple[Sequence[Write], defer.Deferred]]

#: a batch's JSON (plain json.dumps with options would build an encoder per call)
_BATCH_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _resp(*args: str | bytes) -> bytes:
    """A command as RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _RespWriter(protocol.Protocol):
    """The write connection on the reactor thread: frames RESP replies, nothing more.

    Commands are written by the backend; every reply (hiredis parses them, in C) goes to
    ``backend._reply`` in order, and a lost connection to ``backend._writer_lost``."""

    def __init__(self, backend: RedisBackend) -> None:
        import hiredis

        self.backend = backend
        self.reader = hiredis.Reader(encoding="utf-8")
        #: while logging in: (replies expected, replies so far, their Deferred)
        self._setup: tuple[int, list, defer.Deferred] | None = None

    def expect(self, n: int) -> defer.Deferred:
        """The next ``n`` replies, together (the login's), before the backend takes over."""
        d: defer.Deferred = defer.Deferred(self._cancel_setup)
        self._setup = (n, [], d)
        return d

    def _cancel_setup(self, d: defer.Deferred) -> None:
        self._setup = None  # (the Deferred fails as cancelled; connectionLost must not fire it)
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        self.reader.feed(data)
        if self._setup is not None:
            n, got, d = self._setup
            while len(got) < n:
                r = self.reader.gets()
                if r is False:
                    return
                got.append(r)
            self._setup = None
            d.callback(got)
            return
        if self.backend._wproto is not self:
            return  # a connection the backend gave up on (aborted, its batches already failed)
        self.backend._replies(self.reader)

    def connectionLost(self, reason: Any = None) -> None:
        if self._setup is not None:
            d = self._setup[2]
            self._setup = None
            d.errback(reason)
            return
        self.backend._writer_lost(self, reason)

    def send(self, data: bytes) -> None:
        t: Any = self.transport
        t.write(data)

    def abort(self) -> None:
        """Drop the connection now (what was sent on it is in doubt)."""
        t: Any = self.transport
        t.abortConnection()

    def close(self) -> None:
        t: Any = self.transport
        t.loseConnection()


@implementer(IStoreBackend)
class RedisBackend:
    """The ``redis`` store backend (module docstring; docs/store.md)."""

    persistent = True

    def __init__(self, connect: Callable[[str], Any], node_id: str, *, prefix: str = "narsuite:",
                 replicas_ack: int = 0, ack_timeout: float = 1.0, stream_maxlen: int = 1_000_000,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 3.0,
                 where: str = "redis", max_batch: int = 2000, read_pause: float = 0.005,
                 pipeline: int = 2, io_timeout: float = 3.0) -> None:
        self.connect = connect
        self.node_id = node_id
        self.prefix = prefix
        self.replicas_ack = replicas_ack
        self.ack_timeout = ack_timeout
        self.maxlen = stream_maxlen
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.where = where
        self.max_batch = max_batch
        #: after a read that emptied the stream, the reader waits this long before the next one
        #: (see _read_loop)
        self.read_pause = read_pause
        self.stream = prefix + "log"
        #: batches sent on the reactor's write connection before the first is answered
        self.pipeline = pipeline
        #: a batch unanswered this long (plus ack_timeout with replicas_ack) drops the connection
        self.io_timeout = io_timeout
        self._wproto: _RespWriter | None = None
        self._wconnecting = False
        self._pending: _Batch = []
        self._pending_n = 0
        self._flush_call: Any = None
        self._replying = False
        self._timeout_call: Any = None
        #: batches sent on the write connection, oldest first:
        #: [batch, key texts, perf_counter at encoding, the script's reply, WAIT's, reactor time sent]
        self._sent: deque[list] = deque()
        self._evalsha_head = b""
        #: what ``narctl cluster`` shows of this node (the daemon fills in its roles)
        self.node_info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
        self.store: Any = None
        self._reactor: Any = None
        self._connected = False
        self._stopping = False
        #: a write found Redis unreachable: the reader checks and says when it is back
        self._recheck = False
        self._reader: threading.Thread | None = None
        self._control: ThreadPool | None = None
        self._beat_loop: Any = None
        self._writer_done: defer.Deferred | None = None
        # Reactor-side bookkeeping that keeps "no update lost, none applied twice" (see _apply).
        self._last_id = "0-0"  # the reader's position (reader thread)
        self._applied_id = "0-0"  # the last stream entry applied to the view (reactor)
        self._inflight: dict[tuple[str, Hashable], int] = {}
        self._clobbered: dict[tuple[str, Hashable], str] = {}
        #: (kind, key text) -> the stream id of our own latest write to it not yet read back,
        #: oldest first (dropped once the reader has passed it)
        self._own_floor: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._snapshot: dict[tuple[str, str], str] = {}
        self._snapshot_end = "0-0"
        self.nodes: dict[str, dict[str, Any]] = {}
        self.leader: str | None = None
        self.last_error = ""
        self._stats: dict[str, Any] = {
            "batches": 0, "writes": 0, "conflicts": 0, "refused_unavailable": 0, "not_replicated": 0,
            "remote_applied": 0, "remote_skipped": 0, "resyncs": 0, "reaped": 0, "disconnects": 0,
            "last_batch_seconds": 0.0, "queued": 0,
        }
        self._reap_script: Any = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def available(self) -> bool:
        """Redis answered the last time we asked (new allocations are refused while False)."""
        return self._connected

    def bind(self, store: Any) -> None:
        self.store = store

    def _client(self, role: str) -> Any:
        c = self.connect(f"narsuite:{self.node_id}:{role}")
        self._reap_script = self._reap_script or c.register_script(REAP_LUA)
        return c

    def load(self, now: float) -> Iterable[Row]:
        """The whole shared view, and the stream position it is consistent with (blocks: start-up)."""
        try:
            c = self._client("load")
            self._heartbeat_sync(c)
            rows, start, end = self._snapshot_rows(c)
            c.close()
        except Exception as e:  # redis errors, DNS, TLS
            raise StoreBackendError(f"store.redis: cannot load the shared store from {self.where}: "
                                    f"{type(e).__name__}: {e}; check that Redis runs and [store.redis]") from None
        self._last_id = self._applied_id = start
        self._snapshot = {(r.kind, r.key): v for r, v in rows}
        self._snapshot_end = end
        self._connected = True
        return [r for r, _v in rows]

    def _snapshot_rows(self, c: Any) -> tuple[list[tuple[Row, str]], str, str]:
        """Every record with its version, between two stream positions (reader thread or load).

        Entries after ``start`` are replayed afterwards; those a record's version already
        contains are skipped (:meth:`_apply`), so nothing is applied twice.
        """
        start = self._stream_last(c)
        rows: list[tuple[Row, str]] = []
        keys: list[str] = []
        for k in c.scan_iter(match=self.prefix + "r:*", count=1000):
            keys.append(k)
        for i in range(0, len(keys), 500):
            p = c.pipeline(transaction=False)
            for k in keys[i:i + 500]:
                p.hgetall(k)
            for h in p.execute():
                if not h or "d" not in h:
                    continue  # expired or deleted between SCAN and HGETALL
                rows.append((Row(h["k"], h["y"], h["d"], float(h["e"]) if h.get("e") else None,
                                 h.get("w") or None, h.get("n") or None), h.get("v", "0-0")))
        end = self._stream_last(c)
        return rows, start, end

    def _stream_last(self, c: Any) -> str:
        last = c.xrevrange(self.stream, count=1)
        return last[0][0] if last else "0-0"

    def start(self, reactor: Any) -> None:
        from twisted.internet.task import LoopingCall

        self._reactor = reactor
        self._stopping = False
        log.info("store: node {node} shares {where} (prefix {prefix!r}, replicas_ack {n})", node=self.node_id,
                 where=self.where, prefix=self.prefix, n=self.replicas_ack)
        self._writer_done = defer.Deferred()
        self._reader = threading.Thread(target=self._read_loop, name="narsuite-redis-reader", daemon=True)
        self._reader.start()
        self._control = ThreadPool(1, 1, name="narsuite-redis-control")
        self._control.start()
        if self._pending:  # (Store.open's own clean-up, submitted before start)
            self._flush()
        self._beat_loop = LoopingCall(self._heartbeat)
        self._beat_loop.clock = reactor
        self._beat_loop.start(self.heartbeat_interval, now=True)

    def stop(self) -> defer.Deferred:
        self._stopping = True
        if self._beat_loop is not None and self._beat_loop.running:
            self._beat_loop.stop()
        d = self._writer_done
        if d is None:
            return defer.succeed(None)
        self._writer_idle()

        def goodbye(_: object) -> defer.Deferred:
            pool = self._control
            self._control = None
            if pool is None:
                return defer.succeed(None)
            # A clean stop ends the heartbeat at once: the others reap what is left now.
            g = deferToThreadPool(self._reactor, pool, self._goodbye)
            g.addErrback(lambda f: log.warn("store: redis: could not sign off: {e}", e=f.getErrorMessage()))
            g.addBoth(lambda _: pool.stop())
            return g

        return d.addCallback(goodbye)

    def stats(self) -> dict:
        out = dict(self._stats)
        out["available"] = int(self._connected)
        out["inflight"] = sum(self._inflight.values())
        return out

    # ----------------------------------------------------------------- writes
    def submit(self, writes: Sequence[Write]) -> defer.Deferred:
        writes = [w for w in writes if w.reason != "expired"]  # Redis expires them itself
        if not writes:
            return defer.succeed(None)
        if not self._connected or self._stopping and self._writer_done is None:
            self._stats["refused_unavailable"] += 1
            return defer.fail(StoreUnavailable(f"the shared store ({self.where}) is unreachable: "
                                               f"{self.last_error or 'not connected'}"))
        for w in writes:
            ident = (w.spec.name, w.key)
            self._inflight[ident] = self._inflight.get(ident, 0) + 1
        d: defer.Deferred = defer.Deferred()
        self._stats["queued"] += 1
        self._pending.append((writes, d))
        self._pending_n += len(writes)
        if (self._flush_call is None and not self._replying and self._reactor is not None
                and len(self._sent) < self.pipeline):
            # the rest of this reactor turn's writes go in the same batch
            self._flush_call = self._reactor.callLater(0, self._flush)
        return d

    @staticmethod
    def _encode(w: Write, key: str) -> list[str]:
        """One write as the script reads it (``key`` is the key's text)."""
        kind = w.spec.name
        if w.record is None:
            return ["D", kind, key, w.owner or ""]
        e = "" if w.expires is None else repr(w.expires)
        ms = "" if w.expires is None else str(int(w.expires * 1000))
        if w.reason == "touch":
            return ["T", kind, key, e, ms, w.owner or ""]
        out = ["I" if w.reason == "insert" else "P", kind, key, w.spec.dump(w.record), e, ms,
               w.owner or "", "1" if w.volatile else "0"]
        for ix in w.spec.indexes:
            if ix.unique:
                v = ix.key(w.record)
                if v is not None:
                    out.append(f"{kind}:{ix.name}:{key_text(v)}")
        return out

    # ------------------------------------------------- the write connection on the reactor
    # The reactor thread writes the batches itself: no hand-over to a writer thread and back,
    # no GIL contention between the two (measured against a redis-py writer thread, which this
    # replaced: docs/store.md, "Choosing the client").
    # One connection keeps Redis's order of our writes; up to ``pipeline`` batches are on it
    # at once, so Redis runs one while the reactor answers the other's callers.

    def _writer_target(self) -> tuple[Any, dict[str, Any], bool, bool]:
        """Where the primary is and how to log in, as redis-py sees it (control thread: asking
        the Sentinels blocks).  Returns (address, redis-py's connection settings, Sentinel?, TLS?)."""
        import redis

        c = self._client("writer")
        try:
            pool = c.connection_pool
            kw = dict(pool.connection_kwargs)
            sentinel = hasattr(pool, "get_master_address")
            if sentinel:
                addr: Any = tuple(pool.get_master_address())
            elif kw.get("path"):
                addr = kw["path"]
            else:
                addr = (kw.get("host") or "localhost", int(kw.get("port") or 6379))
            tls = issubclass(pool.connection_class, redis.connection.SSLConnection)
        finally:
            c.close()
        return addr, kw, sentinel, tls

    def _writer_endpoint(self, addr: Any, kw: dict[str, Any], tls: bool) -> Any:
        """A Twisted endpoint to the primary: TCP (or a Unix socket), with TLS as redis-py
        would do it (the CA file, the client certificate, the server's name checked)."""
        from twisted.internet import endpoints

        if isinstance(addr, str):
            return endpoints.UNIXClientEndpoint(self._reactor, addr, timeout=self.io_timeout)
        ep = endpoints.HostnameEndpoint(self._reactor, addr[0], addr[1], timeout=self.io_timeout)
        if not tls:
            return ep
        from twisted.internet import ssl as tssl

        ca = kw.get("ssl_ca_certs")
        if ca:
            pems = open(ca, "rb").read().split(b"-----END CERTIFICATE-----")
            trust: Any = tssl.trustRootFromCertificates(
                [tssl.Certificate.loadPEM(p + b"-----END CERTIFICATE-----") for p in pems if b"-----BEGIN" in p])
        else:
            trust = tssl.platformTrust()
        client = None
        if kw.get("ssl_certfile"):
            cert = open(kw["ssl_certfile"], "rb").read()
            key = open(kw.get("ssl_keyfile") or kw["ssl_certfile"], "rb").read()
            client = tssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
        return endpoints.wrapClientTLS(tssl.optionsForClientTLS(addr[0], trustRoot=trust,
                                                                clientCertificate=client), ep)

    @defer.inlineCallbacks
    def _open_writer(self) -> Any:
        """Connect the reactor's write connection and log in (AUTH with the ACL user, client name,
        database; on a Sentinel-found primary check that it still is one), load the script."""
        import hiredis
        import redis

        pool = self._control
        assert pool is not None  # (started)
        addr, kw, sentinel, tls = yield deferToThreadPool(self._reactor, pool, self._writer_target)
        proto = _RespWriter(self)
        yield self._writer_endpoint(addr, kw, tls).connect(protocol.Factory.forProtocol(lambda: proto))
        cmds: list[tuple[str, ...]] = []
        if kw.get("password") is not None:
            cmds.append(("AUTH", kw["username"], kw["password"]) if kw.get("username") else ("AUTH", kw["password"]))
        if kw.get("client_name"):
            cmds.append(("CLIENT", "SETNAME", kw["client_name"]))
        if int(kw.get("db") or 0):
            cmds.append(("SELECT", str(kw["db"])))
        if sentinel:
            cmds.append(("ROLE",))
        cmds.append(("SCRIPT", "LOAD", WRITE_LUA))
        d = proto.expect(len(cmds))
        proto.send(b"".join(_resp(*c) for c in cmds))
        replies = yield d
        for r in replies:
            if isinstance(r, hiredis.ReplyError):
                proto.abort()
                raise redis.ConnectionError(str(r))  # (Redis's errors never repeat a password)
        if sentinel and replies[-2][0] != "master":
            proto.abort()
            raise redis.ConnectionError(f"{addr[0]}:{addr[1]} is no longer the primary ({replies[-2][0]})")
        return proto, replies[-1]

    def _writer_connect(self) -> None:
        if self._wconnecting or self._control is None:
            return
        self._wconnecting = True
        d = self._open_writer()
        d.addTimeout(self.io_timeout + 1.0, self._reactor)

        def connected(res: tuple[_RespWriter, str]) -> None:
            proto, sha = res
            self._wconnecting = False
            if self._stopping and not self._pending:
                proto.close()
                self._writer_idle()
                return
            self._wproto = proto
            self._evalsha_head = (_resp("EVALSHA", sha, "0", self.prefix, self.node_id, str(self.maxlen))
                                  .replace(b"*6\r\n", b"*7\r\n", 1))
            self._flush()

        def failed(f: Any) -> None:
            self._wconnecting = False
            batch, self._pending, self._pending_n = self._pending, [], 0
            e = f.value
            if isinstance(e, (defer.TimeoutError, defer.CancelledError)):
                import redis

                e = redis.TimeoutError(f"no answer within {self.io_timeout + 1.0:.1f}s while connecting")
            self._batch_failed(batch, e)
            self._writer_idle()

        d.addCallback(connected)
        d.addErrback(failed)

    def _flush(self) -> None:
        """Send what is pending, in batches of up to max_batch writes (reactor)."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._pending:
            return
        proto = self._wproto
        if proto is None:
            self._writer_connect()
            return
        sent = self._sent
        while self._pending and len(sent) < self.pipeline:
            if self._pending_n <= self.max_batch:
                batch, self._pending, self._pending_n = self._pending, [], 0
            else:  # (a burst: cut it once, not item by item from the front of the list)
                k = n = 0
                pending = self._pending
                while k < len(pending) and n < self.max_batch:
                    n += len(pending[k][0])
                    k += 1
                batch, self._pending = pending[:k], pending[k:]
                self._pending_n -= n
            started = time.perf_counter()
            try:
                texts = [key_text(w.key) for writes, _d in batch for w in writes]
                rows = [self._encode(w, t) for w, t in zip((w for ws, _d in batch for w in ws), texts)]
                arg = _BATCH_ENCODER.encode(rows).encode()
            except Exception as e:
                self._batch_failed(batch, e)
                continue
            data = self._evalsha_head + b"$%d\r\n%s\r\n" % (len(arg), arg)
            if self.replicas_ack:
                data += _resp("WAIT", str(self.replicas_ack), str(max(1, int(self.ack_timeout * 1000))))
            sent.append([batch, texts, started, None, 2 if self.replicas_ack else 1, self._reactor.seconds()])
            proto.send(data)
        if self._timeout_call is None and sent:
            self._timeout_call = self._reactor.callLater(self._io_deadline(), self._check_timeout)

    def _io_deadline(self) -> float:
        return self.io_timeout + (self.ack_timeout if self.replicas_ack else 0.0)

    def _check_timeout(self) -> None:
        self._timeout_call = None
        if not self._sent or self._wproto is None:
            return
        late = self._reactor.seconds() - self._sent[0][5]
        if late >= self._io_deadline():
            # Redis stopped answering (a hung server, a path that drops everything): give up on
            # this connection; its batches are in doubt (docs/store.md, "Redis unreachable").
            self._wproto.abort()
            return
        self._timeout_call = self._reactor.callLater(self._io_deadline() - late, self._check_timeout)

    def _reply(self, r: Any) -> None:
        """One reply on the write connection, in the order of the commands (reactor)."""
        import hiredis

        entry = self._sent[0]
        if isinstance(r, hiredis.ReplyError):
            import redis

            # NOSCRIPT (a Redis that lost its script cache without dropping us) and READONLY
            # (a demoted primary) mean this connection is done: the next one loads the script
            # on the new primary.
            msg = str(r)
            if msg.startswith(("NOSCRIPT", "READONLY")):
                if self._wproto is not None:
                    self._wproto.abort()
                err: Exception = redis.ConnectionError(msg)
            else:
                err = redis.ResponseError(msg)
            if entry[3] is None:
                entry[3] = err
        elif entry[3] is None:
            entry[3] = r
        else:
            entry[4] = r  # WAIT's count
        if entry[4] == 2:
            entry[4] = -1  # the script's reply came; WAIT's comes next
            return
        self._sent.popleft()
        res = entry[3]
        if isinstance(res, Exception):
            self._batch_failed(entry[0], res)
            return
        acked = entry[4] if self.replicas_ack else None
        self._batch_done(entry[0], res, acked, time.perf_counter() - entry[2], entry[1])

    def _replies(self, reader: Any) -> None:
        """Every complete reply that arrived; then send what their callers wrote meanwhile."""
        self._replying = True
        try:
            while True:
                r = reader.gets()
                if r is False:
                    break
                self._reply(r)
        finally:
            self._replying = False
        if self._pending:
            self._flush()
        elif not self._sent:
            self._writer_idle()

    def _writer_lost(self, proto: _RespWriter, reason: Any) -> None:
        import redis

        if proto is not self._wproto:
            return
        self._wproto = None
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None
        sent, self._sent = self._sent, deque()
        err = redis.ConnectionError(f"the write connection was lost: {reason.getErrorMessage() if reason else ''}")
        for entry in sent:
            # In doubt: Redis may have run it (docs/store.md, "Redis unreachable").
            self._batch_failed(entry[0], entry[3] if isinstance(entry[3], Exception) else err)
        if self._pending and not self._stopping:
            self._writer_connect()
        else:
            self._writer_idle()

    def _writer_idle(self) -> None:
        """At stop: once nothing is pending or unanswered, close and say the writer is done."""
        if not self._stopping or self._pending or self._sent or self._wconnecting:
            return
        if self._wproto is not None:
            proto, self._wproto = self._wproto, None
            proto.close()
        done, self._writer_done = self._writer_done, None
        if done is not None:
            done.callback(None)

    def _batch_failed(self, batch: _Batch, e: Exception) -> None:
        import redis

        if isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError)) or "READONLY" in str(e):
            self._set_connected(False, f"{type(e).__name__}: {e}")
            # Only the reader declares Redis reachable again (after checking its position);
            # its own connection may be fine (Redis was back before this batch failed on an old
            # socket, or only the writer's path broke): ask it to check now, or the node would
            # refuse writes for good.
            self._recheck = True
            err: Exception = StoreUnavailable(f"the shared store ({self.where}) is unreachable: {e}")
        else:
            log.error("store: redis: a write batch failed: {e}", e=f"{type(e).__name__}: {e}")
            err = StoreBackendError(f"{self.where}: {type(e).__name__}: {e}")
        for writes, d in batch:
            self._done_inflight(writes)
            d.errback(err)

    def _done_inflight(self, writes: Sequence[Write]) -> None:
        for w in writes:
            ident = (w.spec.name, w.key)
            n = self._inflight.get(ident, 0) - 1
            if n <= 0:
                self._inflight.pop(ident, None)
                self._clobbered.pop(ident, None)
            else:
                self._inflight[ident] = n

    def _batch_done(self, batch: _Batch, res: list, acked: int | None, elapsed: float,
                    texts: Sequence[str]) -> None:
        from narsuite.store.core import Conflict

        self._stats["batches"] += 1
        self._stats["last_batch_seconds"] = elapsed
        self._set_connected(True)
        results = iter(res)
        ktexts = iter(texts)
        short = acked is not None and acked < self.replicas_ack
        applied = _sid(self._applied_id)
        own_floor = self._own_floor
        for writes, d in batch:
            failure: Exception | None = None
            for w in writes:
                r = next(results)
                ktext = next(ktexts)
                self._stats["writes"] += 1
                ident = (w.spec.name, w.key)
                if r[0] == "C":
                    self._stats["conflicts"] += 1
                    if r[1] == "key":
                        failure = Conflict(w.spec.name, "key", w.key, r[2] or None)
                    else:
                        _kind, ix, value = r[1].split(":", 2)
                        failure = Conflict(w.spec.name, ix, key_from_text(value), r[2])
                elif r[0] == "OK":
                    wid = r[1]
                    clobbered = self._clobbered.get(ident)
                    if clobbered is not None and _sid(clobbered) < _sid(wid):
                        # Another node's older change overwrote ours in the view while ours
                        # was on its way; Redis ordered ours last: the view shows ours again.
                        self.store.restore_local(w.spec.name, w.key, w.record, w.expires, w.owner)
                    if _sid(wid) > applied:
                        fk = (w.spec.name, ktext)
                        prev = own_floor.get(fk)
                        if prev is None or _sid(prev) < _sid(wid):
                            own_floor[fk] = wid
                            own_floor.move_to_end(fk)
                elif r[0] == "G" and w.reason == "touch":
                    # Deleted (or expired) in the shared store while we touched it: so here too.
                    self.store.apply_remote(Row(w.spec.name, key_text(w.key), None, None, None))
            self._done_inflight(writes)
            if failure is not None:
                d.errback(failure)
            elif short:
                self._stats["not_replicated"] += 1
                d.errback(NotReplicated(f"{acked} of {self.replicas_ack} replicas confirmed the write "
                                        f"within {self.ack_timeout}s (store.redis.replicas_ack)"))
            else:
                d.callback(None)

    def _set_connected(self, up: bool, why: str = "") -> None:
        if up == self._connected:
            return
        self._connected = up
        if up:
            log.info("store: the shared store ({where}) is reachable again; new allocations resume",
                     where=self.where)
            self.last_error = ""
        else:
            self._stats["disconnects"] += 1
            self.last_error = why
            log.warn("store: the shared store ({where}) is unreachable ({why}); forwarding goes on from "
                     "the local view, new allocations are refused until it is back", where=self.where, why=why)

    # ---------------------------------------------------------------- reader
    def _read_loop(self) -> None:
        c = None
        check = False
        while not self._stopping:
            try:
                if c is None:
                    c = self._client("reader")
                    # entries as Redis sends them ([id, [field, value, ...]]): our own are
                    # passed over here without building a dict each
                    c.set_response_callback("XREAD", lambda r, **_kw: r)
                if self._recheck:
                    self._recheck = False
                    check = True
                if check:
                    self._check_position(c)
                    check = False
                    self._reactor.callFromThread(self._set_connected, True)
                # Each read first checks that our last entry is still there: a trimmed stream or a
                # failed-over primary that never had it means a gap (redis-py may reconnect under
                # us without an error, so a reconnect is not the only sign).
                last = self._last_id
                p = c.pipeline(transaction=False)
                if last != "0-0":
                    p.xrange(self.stream, last, last)
                p.xread({self.stream: last}, count=_READ_COUNT, block=500)
                res = p.execute()
                if last != "0-0" and not res[0]:
                    self._check_position(c)
                    continue
                resp = res[-1]
            except Exception as e:
                if self._stopping:
                    break
                if c is not None:
                    try:
                        c.close()
                    except Exception:
                        pass
                c = None
                check = True
                self._reactor.callFromThread(self._set_connected, False, f"{type(e).__name__}: {e}")
                time.sleep(0.2)
                continue
            if resp:
                # RESP2: [[stream, entries]]; RESP3 (from_url may pick it): {stream: entries}
                entries = next(iter(resp.values())) if isinstance(resp, dict) else resp[0][1]
                last = self._last_id = entries[-1][0]
                # every entry ends with its node; ours (but for reaping) are in the view already
                node = self.node_id
                others = [e for e in entries if e[1][-1] != node or e[1][1] == "R"]
                self._reactor.callFromThread(self._apply, others, last)
                if len(entries) < _READ_COUNT and self.read_pause:
                    # Under load the stream grows by a batch at a time: reading at once would
                    # take each batch alone (a wake-up, a read and a reactor hand-over per batch,
                    # 11 us of this thread per write at 8 in flight); a short pause lets several
                    # batches come in one read (3 us).  Other nodes' changes reach the view up
                    # to read_pause later; an idle stream still blocks in XREAD.
                    time.sleep(self.read_pause)
        if c is not None:
            c.close()

    def _check_position(self, c: Any) -> None:
        """After a reconnect: is our last entry still in the stream?  If not, reload everything."""
        if self._last_id != "0-0" and c.xrange(self.stream, self._last_id, self._last_id):
            return
        if self._last_id == "0-0" and not c.exists(self.stream):
            return
        rows, start, end = self._snapshot_rows(c)
        self._last_id = start
        done = threading.Event()

        def resync() -> None:
            try:
                self._resync(rows, start, end)
            finally:
                done.set()

        self._reactor.callFromThread(resync)
        done.wait(30)

    def _resync(self, rows: list[tuple[Row, str]], start: str, end: str) -> None:
        """Make the view equal to a snapshot (the stream had a gap for us); keep writes in flight."""
        st = self.store
        self._stats["resyncs"] += 1
        self._own_floor.clear()
        self._applied_id = start
        self._snapshot = {(r.kind, r.key): v for r, v in rows}
        self._snapshot_end = end
        seen: set[tuple[str, Hashable]] = set()
        changed = 0
        for row, _v in rows:
            try:
                spec = st.kind(row.kind)
            except KeyError:
                continue
            key = key_from_text(row.key)
            seen.add((row.kind, key))
            cur = st.get(row.kind, key)
            if cur is not None and spec.dump(cur) == row.data and st.owner_of(row.kind, key) == row.owner:
                st.apply_remote_expiry(row.kind, key, row.expires)
                continue
            st.apply_remote(row)
            changed += 1
        for spec in st.kinds():
            if not spec.persist:
                continue
            for key, _rec, _exp, _owner in list(st.items(spec.name)):
                if (spec.name, key) not in seen and (spec.name, key) not in self._inflight:
                    st.apply_remote(Row(spec.name, key_text(key), None, None, None))
                    changed += 1
        log.info("store: resynchronised with the shared store ({where}): {n} records, {c} changed",
                 where=self.where, n=len(rows), c=changed)

    def _apply(self, entries: list, last: str | None = None) -> None:
        """Apply other nodes' changes, in Redis's order, each exactly once.

        ``entries`` are [id, [field, value, ...]] of the stream up to ``last``, our own
        writes left out by the reader (except reaping): once they are passed, the floors
        our writes set are dropped."""
        st = self.store
        for eid, raw in entries:
            self._applied_id = eid
            f: Any = dict(zip(raw[::2], raw[1::2]))
            op, kind, keyt, node = f.get("o"), f.get("k"), f.get("y"), f.get("n")
            if self._snapshot:
                v = self._snapshot.get((kind, keyt))
                if _sid(eid) >= _sid(self._snapshot_end):
                    self._snapshot = {}
                if v is not None and _sid(eid) <= _sid(v):
                    self._stats["remote_skipped"] += 1
                    continue  # the loaded snapshot already holds this change
            fk = (kind, keyt)
            if node == self.node_id and op != "R":
                # our own write: in the view since we made it (no key to parse)
                floor = self._own_floor.get(fk)
                if floor is not None and _sid(eid) >= _sid(floor):
                    del self._own_floor[fk]
                continue
            floor = self._own_floor.get(fk)
            if floor is not None and _sid(eid) < _sid(floor):
                self._stats["remote_skipped"] += 1
                continue  # older than our own later write to the same key
            try:
                key = key_from_text(keyt)
            except ValueError:
                continue
            ident = (kind, key)
            if self._inflight.get(ident):
                self._clobbered[ident] = eid
            self._stats["remote_applied"] += 1
            try:
                if op == "P":
                    st.apply_remote(Row(kind, keyt, f["d"], float(f["e"]) if f.get("e") else None,
                                        f.get("w") or None, node or None))
                elif op == "T":
                    st.apply_remote_expiry(kind, key, float(f["e"]) if f.get("e") else None)
                elif op in ("D", "R"):
                    st.apply_remote(Row(kind, keyt, None, None, None))
            except Exception:
                log.failure("store: applying a change from {node} failed ({kind} {key})", node=node,
                            kind=kind, key=keyt)
        if last is not None:
            self._applied_id = last
            passed = _sid(last)
            if self._snapshot and passed >= _sid(self._snapshot_end):
                self._snapshot = {}
            floors = self._own_floor
            while floors:
                fk, wid = next(iter(floors.items()))
                if _sid(wid) > passed:
                    break
                floors.popitem(last=False)

    # ------------------------------------------------------ nodes and reaping
    def _heartbeat_sync(self, c: Any) -> None:
        info = dict(self.node_info, node=self.node_id, seen=time.time())
        ms = int(self.heartbeat_timeout * 1000)
        p = c.pipeline(transaction=False)
        p.set(self.prefix + "node:" + self.node_id, json.dumps(info), px=ms)
        p.sadd(self.prefix + "nodes", self.node_id)
        # The leader: whoever holds the lock; its holder renews it with every beat.
        p.set(self.prefix + "leader", self.node_id, px=ms, nx=True)
        p.get(self.prefix + "leader")
        r = p.execute()
        if r[3] == self.node_id:
            c.pexpire(self.prefix + "leader", ms)

    def _beat_and_reap(self) -> tuple[dict[str, dict[str, Any]], str | None, list[tuple[str, int]]]:
        c = getattr(self, "_control_client", None)
        if c is None:
            c = self._control_client = self._client("control")
        try:
            self._heartbeat_sync(c)
            names = sorted(c.smembers(self.prefix + "nodes"))
            infos = c.mget([self.prefix + "node:" + n for n in names]) if names else []
            leader = c.get(self.prefix + "leader")
            nodes: dict[str, dict[str, Any]] = {}
            reaped: list[tuple[str, int]] = []
            for name, raw in zip(names, infos):
                if raw is not None:
                    nodes[name] = json.loads(raw)
                    continue
                total = 0
                while True:
                    r = self._reap_script(args=[self.prefix, name, str(self.maxlen), "500"], client=c)
                    if r == -1:
                        break
                    total += int(r[0])
                    if int(r[1]) == 0:
                        break
                reaped.append((name, total))
            return nodes, leader, reaped
        except Exception:
            self._control_client = None
            c.close()
            raise

    def _heartbeat(self) -> defer.Deferred | None:
        if self._control is None:
            return None
        d = deferToThreadPool(self._reactor, self._control, self._beat_and_reap)

        def done(result: tuple) -> None:
            nodes, leader, reaped = result
            self.nodes, self.leader = nodes, leader
            for name, n in reaped:
                self._stats["reaped"] += n
                log.info("store: node {name} stopped heartbeating; reaped {n} records of its connections "
                         "(durable ones such as users' pool addresses stay)", name=name, n=n)

        def failed(f: Any) -> None:
            self._set_connected(False, f.getErrorMessage())

        d.addCallbacks(done, failed)
        return None  # the LoopingCall must not wait for Redis

    def _goodbye(self) -> None:
        c = getattr(self, "_control_client", None) or self._client("control")
        p = c.pipeline(transaction=False)
        p.delete(self.prefix + "node:" + self.node_id)
        p.execute()
        if c.get(self.prefix + "leader") == self.node_id:
            c.delete(self.prefix + "leader")
        c.close()
        self._control_client = None
