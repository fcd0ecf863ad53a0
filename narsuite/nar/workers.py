"""Several SOCKS reactor processes on one port (``[nar] workers``).

One Python reactor uses one core; Dante forks.  With ``workers = N`` (> 1)
the nar role's main process and N - 1 worker processes
(``python -m narsuite.nar.worker``) each listen on the SOCKS port with
``SO_REUSEPORT``: the kernel spreads new connections over the processes.
Workers run plain SOCKS (CONNECT, BIND, UDP ASSOCIATE) with the same
``NarConfig`` (same methods, users, rules), sent to them as JSON on stdin.
They do not open the store and bind nothing else.

NAR-MODE needs the main process (the shared store, the raw-socket data
plane).  A worker that parses a NAR-MODE request hands the connection over on
its control channel, a UNIX socket to the main process: the socket itself
(``SCM_RIGHTS``), the bytes it read but did not act on (the request and
anything after it), any reply bytes still unsent, and the authenticated user.
The main process adopts the socket (``adoptStreamConnection``) into a
:class:`SocksProtocol` of its own factory that starts at the request stage,
so the session continues exactly as if it had been accepted there: the rules
check for ``nar``, the NAR handler, the counters.

The same channel carries each worker's counters once a second (JSON lines);
:meth:`SocksFactory.totals` adds them to the main process's, so ``narctl nar
stats`` and Prometheus show totals.  Workers that die are restarted with a
backoff (0.5 s doubling to 30 s, reset after 10 s of life); they stop with the
role (SIGTERM, SIGKILL after 5 s) and exit by themselves when the channel to
the main process closes.  Only processes this service spawned may use the
channel (``SO_PEERCRED`` pid check; the socket lives in a 0700 directory).

Wire format of the channel: one JSON object per line, worker to main:
``{"type": "hello", "pid": P}``, ``{"type": "counters", "pid": P, "counters": {...}}``,
``{"type": "handoff", "id": I, "family": 2|10, "user": U, "data": b64, "out": b64}``
(the descriptor travels with the first byte of that line); main to worker:
``{"type": "ack", "id": I}`` (the worker then closes its copy of the socket).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections import deque
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IFileDescriptorReceiver, IProcessTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from narsuite.logs import logger
from narsuite.nar.config import NarConfig
from narsuite.nar.fastio import lean_accepts
from narsuite.nar.server import SocksFactory, SocksProtocol
from narsuite.transports import IStreamTransport

__all__ = ["WorkerPool", "ReusePortServer", "reuseport_socket", "config_to_json", "worker_count",
           "ChannelCodec", "MAX_LINE"]

log = logger()

#: Longest control line accepted (a handoff carries at most MAX_EARLY bytes, base64).
MAX_LINE = 1 << 20
COUNTERS_INTERVAL = 1.0
BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER = 0.5, 30.0, 10.0
STOP_GRACE = 5.0


def worker_count(configured: int) -> int:
    """Processes on the port, the main one included (0: one per CPU)."""
    if configured == 0:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1))
    return configured


def reuseport_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening, non-blocking TCP socket with SO_REUSEADDR and SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def config_to_json(value: Any) -> Any:
    """A validated config (attrs records, tuples, mappings) as plain JSON values."""
    import attrs

    if attrs.has(type(value)):
        return {f.name: config_to_json(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, (tuple, list)):
        return [config_to_json(v) for v in value]
    if hasattr(value, "items"):
        return {str(k): config_to_json(v) for k, v in value.items()}
    return value


class ChannelCodec:
    """JSON lines, bounded."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.buf += data
        out: list[dict[str, Any]] = []
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                if len(self.buf) > MAX_LINE:
                    raise ValueError("control line too long")
                return out
            line, self.buf = self.buf[:i], self.buf[i + 1:]
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("control message is not an object")
            out.append(msg)

    @staticmethod
    def encode(msg: dict[str, Any]) -> bytes:
        return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class ReusePortServer(service.Service):
    """The main process's listening port for the SOCKS factory, with SO_REUSEPORT."""

    def __init__(self, reactor: Any, host: str, port: int, factory: Any) -> None:
        self.reactor, self.host, self.portnum, self.factory = reactor, host, port, factory
        self.port: Any = None

    def startService(self) -> None:
        s = reuseport_socket(self.host, self.portnum)
        try:
            self.port = lean_accepts(self.reactor.adoptStreamPort(s.fileno(), s.family, self.factory))
        finally:
            s.close()  # the reactor holds its own descriptor
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


# ------------------------------------------------------------------ main process side

class _Adopted(SocksProtocol):
    """A connection a worker handed over, resumed at the request stage."""

    handed_user = ""
    handed_data = b""
    handed_out = b""

    connection_counter = "nar_handoffs_in"

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.handed_out:
            self.transport.write(self.handed_out)
        self.user = self.handed_user
        self.state = "request"
        self.dataReceived(self.handed_data)


class _AdoptFactory(protocol.Factory[SocksProtocol]):
    noisy = False

    def __init__(self, socks: SocksFactory, user: str, data: bytes, out: bytes) -> None:
        self.socks, self.user, self.data, self.out = socks, user, data, out

    def buildProtocol(self, addr: Any) -> SocksProtocol | None:
        f = self.socks
        if f.active >= f.config.max_connections:
            f.count("connections_refused_max")
            return None
        p = _Adopted()
        p.factory = f
        p.handed_user, p.handed_data, p.handed_out = self.user, self.data, self.out
        return p


@implementer(IFileDescriptorReceiver)
class _MainChannel(protocol.Protocol):
    """The main process's end of one worker's control channel."""

    transport: IStreamTransport  # a UNIX connection; see narsuite.transports

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.codec = ChannelCodec()
        self.fds: deque[int] = deque()
        self.pid = 0

    def connectionMade(self) -> None:
        try:
            cred = self.transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", cred)
        except (OSError, AttributeError):
            pid, uid = 0, -1
        if pid not in self.pool.procs or uid != os.getuid():
            log.warn("nar workers: refused a control connection from pid {pid} uid {uid}",
                     pid=pid, uid=uid)
            self.transport.abortConnection()
            return
        self.pid = pid
        self.pool.channels[pid] = self

    def fileDescriptorReceived(self, fd: int) -> None:
        if not self.pid or len(self.fds) > 64:
            os.close(fd)
            return
        self.fds.append(fd)

    def dataReceived(self, data: bytes) -> None:
        if not self.pid:
            return
        try:
            for msg in self.codec.feed(data):
                self._message(msg)
        except Exception:
            self.pool.socks.count("errors")
            log.failure("nar workers: bad control message from pid {pid}", pid=self.pid)
            self.transport.abortConnection()

    def _message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "counters":
            counters = msg.get("counters")
            if isinstance(counters, dict):
                self.pool.worker_counters[self.pid] = {str(k): int(v) for k, v in counters.items()}
        elif kind == "handoff":
            fd = self.fds.popleft() if self.fds else -1
            try:
                if fd < 0:
                    raise ValueError("handoff without a descriptor")
                self.pool.adopt(fd, msg)
            finally:
                if fd >= 0:
                    os.close(fd)
                self.transport.write(ChannelCodec.encode({"type": "ack", "id": msg.get("id")}))
        elif kind == "hello":
            log.info("nar workers: worker pid {pid} ready", pid=self.pid)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        while self.fds:
            os.close(self.fds.popleft())
        if self.pid and self.pool.channels.get(self.pid) is self:
            del self.pool.channels[self.pid]


class _ChannelFactory(protocol.Factory):
    noisy = False

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: Any) -> _MainChannel:
        return _MainChannel(self.pool)


class _WorkerProcess(protocol.ProcessProtocol):
    transport: IProcessTransport  # spawnProcess sets it before connectionMade, never unsets it
    def __init__(self, pool: WorkerPool, slot: int, spec: bytes) -> None:
        self.pool, self.slot, self.spec = pool, slot, spec
        self.started = time.monotonic()
        self.pid = 0

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.write(self.spec)
        self.transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:
        self.pool._ended(self, reason)


class WorkerPool(service.Service):
    """Spawns, watches, restarts and stops the worker processes; adopts their handoffs."""

    name = "workers"

    def __init__(self, config: NarConfig, socks: SocksFactory, reactor: Any, count: int,
                 log_level: str = "info") -> None:
        self.config = config
        self.socks = socks
        self.reactor = reactor
        self.count = count  # worker processes (the main process not included)
        self.log_level = log_level
        self.procs: dict[int, _WorkerProcess] = {}
        self.channels: dict[int, _MainChannel] = {}
        self.worker_counters: dict[int, dict[str, int]] = {}
        self.retired: dict[str, int] = {}  # last counters of workers that ended
        self.restarts = 0
        self.handoffs = 0
        self._fails = [0] * count
        self._timers: dict[int, Any] = {}
        self._dir = ""
        self.path = ""
        self._listener: Any = None
        self._stopping: defer.Deferred[None] | None = None
        socks.remote_counters = self.remote_counters

    # ---------------------------------------------------------------- lifecycle

    def startService(self) -> None:
        self._stopping = None
        self._dir = tempfile.mkdtemp(prefix="narsuite-nar-workers-")
        self.path = os.path.join(self._dir, "control.sock")
        self._listener = self.reactor.listenUNIX(self.path, _ChannelFactory(self), mode=0o600)
        super().startService()
        for slot in range(self.count):
            self._spawn(slot)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        for t in self._timers.values():
            if t.active():
                t.cancel()
        self._timers.clear()
        d: defer.Deferred[None] = defer.Deferred()
        self._stopping = d
        procs = list(self.procs.values())
        for p in procs:
            self._signal(p, "TERM")
        if procs:
            def kill_all() -> None:
                for p in list(self.procs.values()):
                    self._signal(p, "KILL")

            kill = self.reactor.callLater(STOP_GRACE, kill_all)
            d.addBoth(lambda r: (kill.cancel() if kill.active() else None, r)[1])
        else:
            d.callback(None)

        def cleanup(r: Any) -> Any:
            listener, self._listener = self._listener, None
            done = listener.stopListening() if listener is not None else None
            shutil.rmtree(self._dir, ignore_errors=True)
            return done

        return d.addCallback(cleanup)

    def _signal(self, p: _WorkerProcess, sig: str) -> None:
        try:
            p.transport.signalProcess(sig)
        except (error.ProcessExitedAlready, OSError):
            pass

    def _spawn(self, slot: int) -> None:
        self._timers.pop(slot, None)
        spec = json.dumps({"config": config_to_json(self.config), "control": self.path,
                           "log_level": self.log_level, "slot": slot,
                           # workers run the reactor this process runs (e.g. narsuite-epoll)
                           "lean_reactor": type(self.reactor).__module__ == "narsuite.reactor"}).encode()
        proc = _WorkerProcess(self, slot, spec)
        env = dict(os.environ)
        # The worker imports narsuite the way this process did.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(
            os.path.dirname(os.path.abspath(__file__)))), env.get("PYTHONPATH", "")] if p)
        self.reactor.spawnProcess(proc, sys.executable, [sys.executable, "-m", "narsuite.nar.worker"],
                                  env=env, childFDs={0: "w", 1: 1, 2: 2})
        self.procs[proc.pid] = proc
        log.info("nar workers: started worker {slot} pid {pid}", slot=slot, pid=proc.pid)

    def _ended(self, proc: _WorkerProcess, reason: Failure) -> None:
        self.procs.pop(proc.pid, None)
        last = self.worker_counters.pop(proc.pid, None)
        if last:
            for k, v in last.items():
                self.retired[k] = self.retired.get(k, 0) + v
        if self._stopping is not None:
            if not self.procs and not self._stopping.called:
                self._stopping.callback(None)
            return
        if not self.running:
            return
        lived = time.monotonic() - proc.started
        fails = 0 if lived >= STABLE_AFTER else self._fails[proc.slot] + 1
        self._fails[proc.slot] = fails
        delay = 0.0 if fails == 0 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (fails - 1))
        self.restarts += 1
        log.warn("nar workers: worker {slot} pid {pid} ended ({why}); restarting in {delay:.1f}s",
                 slot=proc.slot, pid=proc.pid, why=reason.value, delay=delay)
        self._timers[proc.slot] = self.reactor.callLater(delay, self._spawn, proc.slot)

    # ---------------------------------------------------------------- data

    def remote_counters(self) -> list[dict[str, int]]:
        return [self.retired, *self.worker_counters.values()]

    def per_process(self) -> dict[int, dict[str, int]]:
        """Counters by pid: this process and every live worker (their last report)."""
        out = {os.getpid(): dict(self.socks.counters)}
        out.update(self.worker_counters)
        return out

    def adopt(self, fd: int, msg: dict[str, Any]) -> None:
        """Continue a worker's NAR-MODE connection here, as if we had accepted it."""
        self.handoffs += 1
        family = socket.AF_INET6 if msg.get("family") == socket.AF_INET6 else socket.AF_INET
        os.set_blocking(fd, False)
        factory = _AdoptFactory(self.socks, str(msg.get("user", "")),
                                base64.b64decode(msg.get("data", "")), base64.b64decode(msg.get("out", "")))
        self.reactor.adoptStreamConnection(fd, family, factory)
