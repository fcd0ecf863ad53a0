"""The SOCKS5 CONNECT relay without Twisted's TCP transports: the nar role's hot path.

Why: after two passes on the Twisted path (docs/bench-socks.md, "Third pass"), what
a short CONNECT still cost was mostly Twisted's TCP transport life cycle, twice per
SOCKS connection: ``tcp.Port.doRead`` and an address object, a ``tcp.Connection``
built, four reader/writer registrations, producers registered both ways,
``connectionLost`` with producers, readers and writers taken apart again — ≈340
Python calls and ≈85 µs of user CPU per connection.  Here one :class:`_Conn` object
per client connection drives both sockets itself, registered directly with the
lean reactor's epoll (:meth:`narsuite.reactor.NarsuiteEPollReactor.add_fd`): a
handler per socket gets the event mask, and the connection walks its stages as
a small state machine.

What it handles itself, the common case only:

* method selection when the factory picks "no authentication";
* a CONNECT to an IPv4 or IPv6 literal: the rules (the factory's decision cache,
  logged exactly as on the Twisted path), one non-blocking ``connect``, the reply
  with BND.ADDR/BND.PORT, then the relay: ``recv``/``send`` with back-pressure
  (a direction whose destination does not take everything keeps the rest, stops
  reading its source and waits for writability), a FIN passed on as
  ``shutdown(SHUT_WR)`` once what precedes it has gone, both sockets closed when
  both directions have ended, and the relay handed to splice(2)
  (:class:`narsuite.nar.splice.SpliceRelay`) once it has carried ``SPLICE_AFTER``
  bytes;
* the negotiation, connect and idle limits (:class:`_Deadlines`), counters and
  aggregated events under the same names as the Twisted path.

Everything else is handed over, with the bytes already read, to the Twisted
protocol (:class:`narsuite.nar.server.SocksProtocol`) on an ordinary transport
(:meth:`_Conn._hand_over`): password authentication, an unacceptable method,
BIND, UDP ASSOCIATE, NAR-MODE, a domain name to resolve, an unknown command and
malformed input (the protocol answers and counts it as it always has).  A
hand-over happens before anything is sent for that stage, so the protocol
resumes exactly where this one stopped.

The sockets are blocking descriptors used with ``MSG_DONTWAIT`` (no ``ioctl`` per
accepted socket); the outbound one is created ``SOCK_NONBLOCK``.  A socket the
relay neither reads nor writes is taken out of epoll (a level-triggered hang-up
would otherwise be reported again on every loop pass).
"""

from __future__ import annotations

import errno
import heapq
import os
import select
import socket
from typing import Any

from twisted.application import service
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python.failure import Failure

from narsuite.logs import logger
from narsuite.nar import socks
from narsuite.nar.fastio import LeanServer
from narsuite.nar.server import (
    MAX_EARLY,
    RELAY_READ_SIZE,
    SPLICE_AFTER,
    SocksFactory,
    SocksProtocol,
    connect_error_code,
)
from narsuite.nar.splice import AVAILABLE as SPLICE_AVAILABLE
from narsuite.nar.splice import SpliceRelay

__all__ = ["LeanSocksPort", "LeanSocksServer", "supported"]

log = logger()

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP
_DONTWAIT = socket.MSG_DONTWAIT
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY))
#: accept() errors that mean "no connection for now" or "out of descriptors/memory":
#: the listening socket stays readable, so the next loop pass tries again.
_ACCEPT_LATER = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNABORTED,
                           errno.EPROTO, errno.EPERM, errno.ENOBUFS, errno.ENOMEM, errno.EMFILE,
                           errno.ENFILE))
_NEGOTIATE_READ = 4096
#: ATYP of an address literal -> the length of a request carrying it.
_LITERALS = {socks.ATYP_IPV4: 10, socks.ATYP_IPV6: 22}

# Stages of a connection.
METHODS, REQUEST, CONNECTING, RELAY, SPLICE, DONE = range(6)


def supported(reactor: Any) -> bool:
    """The reactor lets code register raw descriptors (narsuite's lean epoll reactor)."""
    return hasattr(reactor, "add_fd") and hasattr(reactor, "forget_fd")


class _Deadlines:
    """Coarse timers for many connections: one ``DelayedCall`` per ``GRAIN``, not per connection.

    A connection's deadline goes into a bucket of ``GRAIN`` seconds (a set); moving it
    (negotiation → connect → idle) is a set add and discard, and only the earliest
    bucket has a reactor timer.  When a bucket is due, each connection in it is asked
    (:meth:`_Conn.expired`): it times out, or puts itself into a later bucket (an
    idle relay that saw traffic since).  Limits fire up to ``GRAIN`` late.
    """

    GRAIN = 0.1

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.buckets: dict[int, set[_Conn]] = {}
        self.keys: list[int] = []  # heap of the buckets' keys
        self.call: Any = None
        self.armed = 0  # the key the timer is set for

    def put(self, conn: _Conn, when: float) -> int:
        """File ``conn`` under ``when``; returns the bucket key (for :meth:`drop`)."""
        key = int(when / self.GRAIN) + 1
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = set()
            heapq.heappush(self.keys, key)
            if self.call is None or key < self.armed:
                self._arm(key)
        b.add(conn)
        return key

    def drop(self, conn: _Conn, key: int) -> None:
        b = self.buckets.get(key)
        if b is not None:
            b.discard(conn)

    def _arm(self, key: int) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.armed = key
        self.call = self.reactor.callLater(max(0.0, key * self.GRAIN - self.reactor.seconds()), self._fire)

    def _fire(self) -> None:
        self.call = None
        now = self.reactor.seconds()
        due = int(now / self.GRAIN)
        keys = self.keys
        while keys and keys[0] <= due:
            key = heapq.heappop(keys)
            for conn in self.buckets.pop(key, ()):
                try:
                    conn.expired(now)
                except Exception:
                    log.failure("socks: error while timing out a connection")
        while keys and keys[0] not in self.buckets:
            heapq.heappop(keys)
        if keys:
            self._arm(keys[0])

    def stop(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


class _HandedOver(SocksProtocol):
    """The Twisted protocol resuming a connection :class:`_Conn` started (``handed_*``)."""

    #: Counted here as a hand-over; the connection itself was counted when accepted.
    connection_counter = "lean_handovers"
    handed_state = "methods"
    handed_data = b""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.state = self.handed_state
        if self.handed_data:
            self.dataReceived(self.handed_data)


class _SpliceSide:
    """One socket of a relay handed to :class:`SpliceRelay`, as the transport it expects."""

    __slots__ = ("socket", "connected", "disconnected")

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.connected = True
        self.disconnected = False

    def fileno(self) -> int:
        return self.socket.fileno()

    def stopReading(self) -> None:
        pass

    def stopWriting(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.connected = False
        self.disconnected = True


class _Conn:
    """One client connection: frames the negotiation, then relays (module docstring).

    Deciding is the factory's (:class:`SocksFactory`: methods, rules, counters,
    events); this object only moves bytes and walks the stages.  ``up`` is
    client → destination, ``down`` the other way; ``up_buf``/``down_buf`` hold what
    the destination of that direction has not taken yet.
    """

    __slots__ = ("port", "f", "reactor", "sock", "fd", "addr", "client", "stage", "buf",
                 "out", "ofd", "cmask", "omask", "up_buf", "down_buf", "eof_up", "eof_down",
                 "last", "dkey", "deadline", "what", "relayed", "splice", "host", "dport")

    def __init__(self, port: LeanSocksPort, sock: socket.socket, addr: tuple[Any, ...]) -> None:
        self.port = port
        f = self.f = port.factory
        reactor = self.reactor = port.reactor
        self.sock = sock
        fd = self.fd = sock.fileno()
        reactor.add_fd(fd, self.on_client, _IN)  # first: if epoll refuses it, nothing to undo
        self.addr = addr
        self.client: str = addr[0]
        self.stage = METHODS
        self.buf = b""
        self.out: socket.socket | None = None
        self.ofd = -1
        self.cmask = _IN
        self.omask = 0
        self.up_buf = self.down_buf = b""
        self.eof_up = self.eof_down = False  # FIN read from the client / the destination
        self.relayed = 0
        self.splice: SpliceRelay | None = None
        self.host = ""
        self.dport = 0
        f.active += 1
        f.counters["connections"] += 1
        now = self.last = reactor.seconds()
        self.what = "negotiation"
        self.deadline = now + f.config.negotiation_timeout
        self.dkey = port.deadlines.put(self, self.deadline)

    # ---------------------------------------------------------------- epoll plumbing

    def _set_cmask(self, mask: int) -> None:
        old, self.cmask = self.cmask, mask
        if old == mask:
            return
        r = self.reactor
        if not mask:
            r.remove_fd(self.fd)
        elif not old:
            r.add_fd(self.fd, self.on_client, mask)
        else:
            r.modify_fd(self.fd, mask)

    def _set_omask(self, mask: int) -> None:
        old, self.omask = self.omask, mask
        if old == mask:
            return
        r = self.reactor
        if not mask:
            r.remove_fd(self.ofd)
        elif not old:
            r.add_fd(self.ofd, self.on_out, mask)
        else:
            r.modify_fd(self.ofd, mask)

    def _masks(self) -> None:
        """Wait for what the relay can use: read a side whose direction has nothing
        pending and no FIN yet; write a side that has bytes pending for it."""
        self._set_cmask((0 if self.eof_up or self.up_buf else _IN) | (_OUT if self.down_buf else 0))
        self._set_omask((0 if self.eof_down or self.down_buf else _IN) | (_OUT if self.up_buf else 0))

    # ---------------------------------------------------------------- events

    def on_client(self, ev: int) -> None:
        """An event on the client's socket."""
        try:
            if self.stage == RELAY:
                if ev & (_OUT | _ERR) and self.down_buf:
                    self._flush(False)
                if ev & (_IN | _ERR) and self.stage == RELAY and not (self.eof_up or self.up_buf):
                    self._relay(True)
                return
            if self.stage == DONE:
                return
            try:
                data = self.sock.recv(_NEGOTIATE_READ, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self._close()
                return
            if not data:
                if self.stage == CONNECTING:
                    # A FIN while connecting (ncat -N style): passed on once the relay starts.
                    self.eof_up = True
                    self._set_cmask(0)
                    return
                self._close()  # the client gave up before its request was complete
                return
            self.buf += data
            if self.stage == CONNECTING:
                if len(self.buf) > MAX_EARLY:
                    self._set_cmask(0)  # early bytes enough: the client waits for the relay
                return
            self._negotiate()
        except Exception:
            self._failed()

    def on_out(self, ev: int) -> None:
        """An event on the destination's socket."""
        try:
            st = self.stage
            if st == RELAY:
                if ev & (_OUT | _ERR) and self.up_buf:
                    self._flush(True)
                if ev & (_IN | _ERR) and self.stage == RELAY and not (self.eof_down or self.down_buf):
                    self._relay(False)
            elif st == CONNECTING:
                self._connect_done(ev)
        except Exception:
            self._failed()

    def _failed(self) -> None:
        """A bug met on this connection: logged and counted, the connection closed; the
        reactor and every other connection go on."""
        self.f.count("errors")
        log.failure("socks: unexpected error from {client}", client=self.client)
        self._close()

    # ---------------------------------------------------------------- negotiation (framing)

    def _negotiate(self) -> None:
        buf = self.buf
        f = self.f
        if self.stage == METHODS:
            # VER NMETHODS METHODS: only "no authentication" is ours; anything else
            # (password, no acceptable method, a wrong version) is the protocol's.
            if len(buf) < 2 or len(buf) < 2 + buf[1]:
                if buf[0] != socks.VERSION:
                    self._hand_over("methods")
                return
            end = 2 + buf[1]
            if buf[0] != socks.VERSION or f.select_method(tuple(buf[2:end])) != socks.METHOD_NONE:
                self._hand_over("methods")
                return
            if not self._send_client(b"\x05\x00"):
                return
            self.stage = REQUEST
            buf = self.buf = buf[end:]
            if not buf:
                return
        # REQUEST: VER CMD RSV ATYP DST.ADDR DST.PORT.  A CONNECT to an address literal
        # is ours; names, other commands and malformed requests are the protocol's.
        if buf[0] != socks.VERSION or (len(buf) >= 4 and (buf[1] != socks.CMD_CONNECT or buf[3] not in _LITERALS)):
            self._hand_over("request")
            return
        end = _LITERALS.get(buf[3], 0) if len(buf) >= 4 else 0
        if not end or len(buf) < end:
            return  # the rest of the request is still on its way
        if end == 10:
            host = socket.inet_ntoa(buf[4:8])
        else:
            host = socket.inet_ntop(socket.AF_INET6, buf[4:20])
        self.host = host
        self.dport = int.from_bytes(buf[end - 2:end], "big")
        self.buf = buf[end:]
        self._connect()

    def _hand_over(self, state: str) -> None:
        """Give the connection, with the bytes read and not yet answered, to the Twisted
        protocol, which resumes at ``state`` (module docstring)."""
        self.stage = DONE
        self.port.deadlines.drop(self, self.dkey)
        self._set_cmask(0)
        f = self.f
        f.active -= 1  # the protocol counts itself in
        p = _HandedOver()
        p.factory = f
        p.handed_state, p.handed_data = state, bytes(self.buf)
        self.buf = b""
        self.port.conns.discard(self)
        self.port.handovers += 1
        transport = LeanServer(self.sock, p, self.addr, None, self.port.handovers, self.reactor)
        p.makeConnection(transport)

    # ---------------------------------------------------------------- CONNECT (asking the factory)

    def _connect(self) -> None:
        f = self.f
        host, port = self.host, self.dport
        self.stage = CONNECTING
        self._deadline("connect", f.config.connect_timeout)
        if not f.decide.check(self.client, "", "connect", host, port, None):
            f.count("rule_blocks")
            self._refuse(socks.NOT_ALLOWED, "blocked by the rules")
            return
        v6 = ":" in host
        try:
            out = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, _STREAM_NONBLOCK)
        except OSError as e:  # EMFILE and the like: a general failure, as Twisted's connect
            self._refuse(connect_error_code(error.getConnectError((e.errno or 0, os.strerror(e.errno or 0)))),
                         e)
            return
        self.out = out
        self.ofd = out.fileno()
        try:
            err = out.connect_ex((host, port))
        except OSError as e:  # a malformed literal: answered like any connect error
            err = e.errno or errno.EINVAL
        if err and err not in _IN_PROGRESS and err != errno.EISCONN:
            self._connect_failed(err)
            return
        self._set_omask(_OUT)

    def _connect_done(self, ev: int) -> None:
        """Writable: connected; an error or hang-up: the attempt failed (SO_ERROR says why)."""
        out = self.out
        assert out is not None
        if ev & _ERR:
            try:
                err = out.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as e:
                err = e.errno or 0
            self._connect_failed(err or errno.ECONNABORTED)
            return
        if not ev & _OUT:
            return
        try:
            host, port = out.getsockname()[:2]
        except OSError as e:
            self._connect_failed(e.errno or errno.ENOTCONN)
            return
        f = self.f
        f.counters["reply_succeeded"] += 1
        self.stage = RELAY
        self._deadline("idle", f.config.idle_timeout)
        if not self._send_client(socks.encode_reply(socks.SUCCEEDED, host, port)):
            return
        early, self.buf = self.buf, b""
        if early:
            self._forward(True, early)  # what the client sent ahead of the reply
        if self.eof_up and self.stage == RELAY:
            self._eof(True)  # and its FIN, if it came while connecting
        if self.stage == RELAY:
            self._masks()  # the destination read from now on; the client again if paused

    def _connect_failed(self, err: int) -> None:
        reason = error.getConnectError((err, os.strerror(err)))
        self._refuse(connect_error_code(reason), reason)

    def _refuse(self, code: int, why: Any) -> None:
        """Answer the request with a failure ``code`` and close (RFC 1928 section 6)."""
        f = self.f
        f.request_failed("connect", self.host, self.dport, self.client, code, why)
        f.count("reply_" + socks.reply_name(code))
        self._send_client(socks.encode_reply(code))
        self._close()

    def _send_client(self, data: bytes) -> bool:
        """A negotiation reply, sent at once: the client waits for it and nothing else
        was sent before it, so the kernel takes it whole.  Should it not (the client
        stopped reading a relay's reply?), the rest waits for the relay's writer; before
        the relay, the connection closes.  False if the connection was closed."""
        try:
            n = self.sock.send(data, _DONTWAIT)
        except BlockingIOError:
            n = 0
        except OSError:
            self._close()
            return False
        if n < len(data):
            if self.stage != RELAY:
                self._close()
                return False
            self.down_buf += data[n:]
        return True

    # ---------------------------------------------------------------- relay

    def _relay(self, up: bool) -> None:
        """Readable: move what arrived to the other side."""
        src = self.sock if up else self.out
        assert src is not None
        try:
            data = src.recv(RELAY_READ_SIZE, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self._close()  # a reset: both sides go, as on the Twisted path
            return
        if data:
            self._forward(up, data)
        else:
            self._eof(up)

    def _forward(self, up: bool, data: bytes) -> None:
        n = len(data)
        self.f.counters["bytes_up" if up else "bytes_down"] += n
        self.relayed += n
        self.last = self.reactor.seconds()
        dst = self.out if up else self.sock
        assert dst is not None
        try:
            sent = dst.send(data, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close()
            return
        if sent < n:  # back-pressure: keep the rest, stop reading the source, wait for the destination
            if up:
                self.up_buf = data[sent:]
            else:
                self.down_buf = data[sent:]
            self._masks()
            return
        if self.relayed > SPLICE_AFTER and self.port.splice:
            self._start_splice()

    def _flush(self, up: bool) -> None:
        """Writable: send what was pending for that side; then read its source again."""
        dst = self.out if up else self.sock
        data = self.up_buf if up else self.down_buf
        assert dst is not None
        try:
            sent = dst.send(data, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self._close()
            return
        rest = data[sent:]
        if up:
            self.up_buf = rest
        else:
            self.down_buf = rest
        if rest:
            return
        if (self.eof_up if up else self.eof_down):
            self._pass_fin(up)
            if self.stage != RELAY:
                return
        self._masks()

    def _eof(self, up: bool) -> None:
        """A FIN from one side: pass it on once what precedes it has gone."""
        if up:
            self.eof_up = True
        else:
            self.eof_down = True
        if not (self.up_buf if up else self.down_buf):
            self._pass_fin(up)
            if self.stage != RELAY:
                return
        self._masks()

    def _pass_fin(self, up: bool) -> None:
        if self.eof_up and self.eof_down and not (self.up_buf or self.down_buf):
            self._close()  # both directions ended: close() sends what a FIN would
            return
        dst = self.out if up else self.sock
        assert dst is not None
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer has gone: its own events say so

    def _start_splice(self) -> None:
        """Past SPLICE_AFTER bytes, with nothing pending and no FIN: splice(2) takes over."""
        if self.up_buf or self.down_buf or self.eof_up or self.eof_down or self.out is None:
            return
        self._set_cmask(0)
        self._set_omask(0)
        self.sock.setblocking(False)  # splice(2) on a socket blocks unless the socket does not
        a, b = _SpliceSide(self.sock), _SpliceSide(self.out)
        counters = self.f.counters
        seconds = self.reactor.seconds

        def moved(up: bool, n: int) -> None:
            counters["bytes_up" if up else "bytes_down"] += n
            self.last = seconds()

        try:
            self.splice = SpliceRelay(self.reactor, a, b, moved, self._close)
        except OSError as e:  # no pipes left (EMFILE): recv/send goes on
            log.debug("socks: splice relay not started for {client}: {e}", client=self.client, e=e)
            self.relayed = -(1 << 62)  # not again for this connection
            self._masks()
            return
        self.stage = SPLICE
        self.f.count("relays_spliced")

    # ---------------------------------------------------------------- limits and the end

    def _deadline(self, what: str, seconds: float) -> None:
        d = self.port.deadlines
        d.drop(self, self.dkey)
        self.what = what
        self.last = now = self.reactor.seconds()
        self.deadline = now + seconds
        self.dkey = d.put(self, self.deadline)

    def expired(self, now: float) -> None:
        """Our bucket is due (:class:`_Deadlines`): time out, or wait for the rest."""
        if self.stage == DONE:
            return
        what = self.what
        deadline = self.last + self.f.config.idle_timeout if what == "idle" else self.deadline
        if deadline > now:
            self.dkey = self.port.deadlines.put(self, deadline)
            return
        f = self.f
        f.count(f"timeouts_{what}")
        f.events.event(f"timeout_{what}", "socks {what} timeout: client={client} state={state}",
                       what=what, client=self.client,
                       state={METHODS: "methods", REQUEST: "request", CONNECTING: "pending"}.get(
                           self.stage, "relay"))
        if self.stage == CONNECTING:
            f.count("reply_" + socks.reply_name(socks.TTL_EXPIRED))
            self._send_client(socks.encode_reply(socks.TTL_EXPIRED))
        self._close()

    def _close(self) -> None:
        """Close both sockets (at once: nothing is sent after what is already sent)."""
        if self.stage == DONE:
            return
        spliced = self.stage == SPLICE
        self.stage = DONE
        self.f.active -= 1
        self.port.deadlines.drop(self, self.dkey)
        r = self.reactor
        splice, self.splice = self.splice, None
        if splice is not None and not splice.ended:
            splice.stop()  # calls _close again (stage DONE: returns), the sockets are ours to close
        if self.cmask and not spliced:
            r.forget_fd(self.fd)
        self.sock.close()
        out = self.out
        if out is not None:
            if self.omask and not spliced:
                r.forget_fd(self.ofd)
            out.close()
        self.port.conns.discard(self)

    def abort(self) -> None:
        """The service is stopping: close without waiting."""
        self._close()


class LeanSocksPort:
    """The SOCKS listening socket, registered raw with the reactor; a :class:`_Conn` per accept."""

    #: accept() calls per readiness event at most (the listening socket stays readable).
    ACCEPTS = 64

    def __init__(self, reactor: Any, factory: SocksFactory, host: str, port: int,
                 backlog: int = socket.SOMAXCONN) -> None:
        self.reactor = reactor
        self.factory = factory
        self.host, self.portnum, self.backlog = host, port, backlog
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock: socket.socket | None = None
        self.deadlines = _Deadlines(reactor)
        self.conns: set[_Conn] = set()  # open ones, for stopListening(close=True)
        self.handovers = 0
        self.splice = SPLICE_AVAILABLE and factory.config.splice

    def startListening(self) -> None:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.host, self.portnum))
            s.listen(self.backlog)
            s.setblocking(False)
        except OSError as e:
            s.close()
            raise error.CannotListenError(self.host, self.portnum, e) from None
        self.sock = s
        self.reactor.add_fd(s.fileno(), self._accept, _IN)

    def _accept(self, ev: int) -> None:
        s = self.sock
        if s is None:
            return
        f = self.factory
        conns = self.conns
        for _ in range(self.ACCEPTS):
            try:
                fd, addr = s._accept()  # type: ignore[attr-defined]  # the fd, no socket object yet
            except OSError as e:
                if e.errno not in _ACCEPT_LATER:
                    log.failure("socks: accept failed", Failure())
                elif e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    f.warnings.event("accept_" + errno.errorcode.get(e.errno or 0, "error"),
                                     "socks: cannot accept a connection: {e}", e=e)
                return
            if f.active >= f.config.max_connections:
                os.close(fd)
                f.count("connections_refused_max")
                f.warnings.event("max_connections",
                                 "socks: {n} connections open (max_connections); refusing {addr}",
                                 n=f.active, addr=addr[0])
                continue
            try:
                # A socket object for the descriptor: Python checks it with getsockname().
                sock = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
            except OSError:
                os.close(fd)
                continue
            try:
                conns.add(_Conn(self, sock, addr))
            except Exception:  # a bug, or epoll refusing the descriptor: this connection only
                f.count("errors")
                log.failure("socks: cannot start a connection from {addr}", addr=addr[0])
                sock.close()

    def getHost(self) -> IPv4Address | IPv6Address:
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        return (IPv6Address if self.family == socket.AF_INET6 else IPv4Address)("TCP", host, port)

    def stopListening(self, close: bool = False) -> None:
        """Stop accepting; with ``close``, close the connections still open too."""
        s, self.sock = self.sock, None
        if s is not None:
            self.reactor.remove_fd(s.fileno())
            s.close()
        if close:
            for c in list(self.conns):
                c.abort()
        self.deadlines.stop()


class LeanSocksServer(service.Service):
    """The nar role's SOCKS port on the lean path: binds in ``privilegedStartService``
    (port 1080 before privileges are dropped), as ``internet.TCPServer`` does."""

    def __init__(self, reactor: Any, host: str, port: int, factory: SocksFactory) -> None:
        self.reactor, self.host, self.portnum, self.factory = reactor, host, port, factory
        self.port: LeanSocksPort | None = None

    def privilegedStartService(self) -> None:
        if self.port is None:
            self.port = LeanSocksPort(self.reactor, self.factory, self.host, self.portnum)
            self.port.startListening()
            self.factory.doStart()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            port.stopListening(close=True)
            self.factory.doStop()
        return None
