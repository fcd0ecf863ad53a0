"""Hot-path I/O helpers for the SOCKS relay (see docs/bench-socks.md for why).

:func:`write_now` is ``transport.write`` that sends at once when it can.
Twisted's ``write`` always queues: it registers the socket for writing, and
the bytes leave on the next reactor iteration (two ``epoll_ctl`` calls and a
pass through the loop per write).  For a relay that forwards every chunk as
it arrives, that is most of its per-chunk cost.  When the transport is a
plain TCP connection (no TLS) whose write buffer is empty, the bytes are sent
with one non-blocking ``send``; what the kernel does not take is handed to
``transport.write`` as usual, so ordering, buffering, producer flow control
and error handling stay Twisted's.  Any other transport (tests'
``StringTransport``, TLS) just gets ``transport.write``.

:func:`lose_now` is ``transport.loseConnection`` for the same case: with
nothing left to send there is nothing to wait for, so the connection is
closed at once (what Twisted itself does when the write side is already shut)
instead of registering for writability and closing on the next iteration.

:class:`ClosingProducer` puts :func:`lose_now` where Twisted closes a relay's
other side (``stopProducing`` of the registered producer).

:func:`connect_tcp` is ``reactor.connectTCP`` for one attempt to an IP
literal, without the ``Connector``/``Client`` machinery: no address
"resolution" Deferred, no ``callLater(0)`` before the ``connect`` call, no
retry/connector bookkeeping.  The connected socket becomes an ordinary
``tcp.Connection`` transport, so everything after the connect (reads,
writes, producers, close) is Twisted's.  Under the CONNECT load of
bench/socks_load.py this took the server's user CPU per SOCKS connection from
124 to 106 µs (cProfile: 457 to 385 Python calls).  Reactors that are not
Twisted's POSIX reactors (tests' ``MemoryReactor``) get ``reactor.connectTCP``.

:class:`LeanServer` (accepted connections, through :func:`lean_accepts` on the
role's listening port) and :class:`OutgoingConnection` are Twisted's TCP
transports with four system calls fewer per relayed SOCKS connection (30.6 to
26.6 under the CONNECT load, strace): the outbound socket is made non-blocking
(no two ``setblocking`` ioctls), and a socket whose peer's FIN was read or whose
own FIN has gone is closed without ``shutdown(SHUT_RDWR)`` first, which then
changes nothing (:class:`_CloseWithoutShutdown`).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import abstract, error, main, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.posixbase import PosixReactorBase
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["write_now", "lose_now", "close_now", "shutdown_write_now", "is_plain_tcp", "idle_transport",
           "ClosingProducer", "connect_tcp", "LeanConnector", "OutgoingConnection", "LeanServer",
           "lean_accepts"]

_Connection = tcp.Connection
#: A stream socket non-blocking from creation (Linux; elsewhere setblocking after).
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY))


def _idle(transport: Any) -> bool:
    """A plain TCP connection, open, not closing, with nothing buffered to send."""
    return (
        isinstance(transport, _Connection)
        and not transport.TLS
        and transport.connected == 1  # Twisted's flag: 0/1 (True on some classes)
        and not transport.disconnecting
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and not transport._writeDisconnected
    )


def is_plain_tcp(transport: Any) -> bool:
    """A Twisted TCP connection without TLS (its socket can be used directly)."""
    return isinstance(transport, _Connection) and not transport.TLS


#: Public name of :func:`_idle` (the splice relay's precondition).
idle_transport = _idle


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` on ``transport`` now if its buffer is empty, else queue it."""
    if _idle(transport):
        try:
            n = transport.socket.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            n = 0  # let Twisted's own write path meet the error and close properly
        if n >= len(data):
            return
        data = data[n:]
    transport.write(data)


#: One failure for every connection closed here, as Twisted's reactor keeps one per
#: reason (``_disconnectSelectable``'s ``faildict``): building a Failure walks the
#: exception's class hierarchy, a dozen calls per connection.
class _KnownFailure(Failure):
    """A Failure whose ``check`` of exception classes is ``isinstance``.

    ``Failure.check`` compares qualified names: an ``inspect.isclass``, an
    ``issubclass`` and a ``reflect.qual`` string per class asked about.  Twisted's
    ``tcp.Connection.connectionLost`` asks once per closed connection (is it
    ``ConnectionAborted``?).  Same answers: a class matches when the value is an
    instance of it; anything else (a name given as a string) goes to ``Failure.check``.
    """

    def check(self, *errorTypes: Any) -> Any:
        for t in errorTypes:
            if isinstance(t, type):
                if isinstance(self.value, t):
                    return t
            elif super().check(t) is not None:
                return t
        return None


_DONE = _KnownFailure(main.CONNECTION_DONE)


def lose_now(transport: Any) -> None:
    """Close ``transport`` now if nothing is buffered to send, else ``loseConnection()``.

    The protocol's ``connectionLost`` runs before this returns (with
    ``ConnectionDone``), as it does in Twisted's own ``loseConnection`` once
    the write side is shut; callers must not rely on the transport afterwards.
    A transport whose write side is already shut (half-close) is closed at once too.
    """
    if _nothing_queued(transport):
        transport.connectionLost(_DONE)  # stops reading and writing itself
        return
    if getattr(transport, "connected", True):
        transport.loseConnection()


def _nothing_queued(transport: Any) -> bool:
    """A plain TCP connection, open, not closing, with nothing buffered to send (its write
    side may already be shut)."""
    return (
        isinstance(transport, _Connection)
        and not transport.TLS
        and transport.connected == 1  # Twisted's flag: 0/1 (True on some classes)
        and not transport.disconnecting
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def shutdown_write_now(transport: Any) -> None:
    """Send FIN on ``transport`` now if nothing is buffered, else ``loseWriteConnection()``.

    What Twisted does one loop pass later (register for writing, find the buffer empty,
    ``shutdown(SHUT_WR)``, ``writeConnectionLost``), without the pass and its two
    ``epoll_ctl`` calls: a relay passes a FIN on per connection."""
    if _idle(transport):
        transport._writeDisconnected = True
        transport._closeWriteConnection()
        return
    transport.loseWriteConnection()


#: Kept for callers that say what they mean: :func:`lose_now` also closes half-closed ones.
close_now = lose_now


@implementer(IPushProducer)
class ClosingProducer:
    """A transport as the streaming producer of the other side of a relay.

    Pause and resume pass through (flow control as Twisted's).  When the other
    side's connection is lost, Twisted calls its producer's ``stopProducing``,
    which on a transport is ``loseConnection``: it waits one reactor turn to
    close even when nothing is left to send.  Here it is :func:`lose_now`.
    """

    __slots__ = ("transport",)

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        lose_now(self.transport)


class _CloseWithoutShutdown:
    """``close()`` without ``shutdown(SHUT_RDWR)`` first once the shutdown would change nothing.

    Twisted's ``_closeSocket`` calls ``shutdown(SHUT_RDWR)`` before ``close()`` (its own
    comment: "isn't really necessary" with close-on-exec sockets).  Once the peer's FIN
    has been read (nothing can be left unread) or our own FIN has gone (``SHUT_WR``
    done; ``SHUT_RD`` does nothing to a TCP socket on Linux), ``close()`` alone sends
    exactly what the pair would: a FIN, or nothing more.  That is how every relayed
    connection ends, so it saves a system call per socket, and on the client side a
    raised-and-caught ``ENOTCONN`` (the client has usually gone first).  Before either,
    Twisted's order stands: with unread bytes, the peer still sees the FIN before the RST.
    """

    _writeDisconnected: bool
    _eof_read = False
    _shutdown_wanted = True  # what Twisted code may set (it never does on a connection)

    @property
    def _shouldShutdown(self) -> bool:  # read by tcp._SocketCloser._closeSocket
        return self._shutdown_wanted and not (self._eof_read or self._writeDisconnected)

    @_shouldShutdown.setter
    def _shouldShutdown(self, value: bool) -> None:
        self._shutdown_wanted = value

    def readConnectionLost(self, reason: Failure) -> None:
        self._eof_read = True
        super().readConnectionLost(reason)  # type: ignore[misc]


class OutgoingConnection(_CloseWithoutShutdown, tcp.Connection):
    """The transport of a connection made by :class:`LeanConnector`: a plain ``tcp.Connection``.

    Two system calls fewer per connection than Twisted's: the socket is created
    non-blocking (no ``setblocking`` ioctl here), and it is closed without a
    ``shutdown(SHUT_RDWR)`` first when that changes nothing (:class:`_CloseWithoutShutdown`).
    """

    def __init__(self, skt: socket.socket, protocol: Any, reactor: Any, peer: tuple[str, int],
                 address: type = IPv4Address) -> None:
        # tcp.Connection.__init__ without its setblocking(False): LeanConnector made
        # the socket with SOCK_NONBLOCK.
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        self.socket = skt
        self.fileno = skt.fileno
        self.protocol = protocol
        self._peer = peer
        self._address = address  # IPv4Address or IPv6Address, the family's
        self.connected = 1

    def logPrefix(self) -> str:
        """Twisted's ``"<protocol>,client"``, made when asked for (a log line), not per connection."""
        return f"{self._getLogPrefix(self.protocol)},client"

    def getHost(self) -> IPv4Address | IPv6Address:
        return self._address("TCP", *self.socket.getsockname()[:2])

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self._address("TCP", *self._peer)


class LeanServer(_CloseWithoutShutdown, tcp.Server):
    """An accepted connection: Twisted's ``tcp.Server`` without per-connection work nobody reads.

    * Closed without ``shutdown(SHUT_RDWR)`` first when that changes nothing
      (:class:`_CloseWithoutShutdown`).  The socket is close-on-exec and this
      process's alone (a worker closes its copy of a handed-over one itself:
      narsuite.nar.worker), so ``close()`` sends the FIN.
    * ``logPrefix()`` and ``repr()`` are formatted when asked for (a log line), not
      stored for every connection.
    """

    def __init__(self, sock: socket.socket, protocol: Any, client: tuple[Any, ...], server: Any,
                 sessionno: int, reactor: Any) -> None:
        # tcp.Server.__init__ without the two strings (logstr, repstr) it formats.
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

    def logPrefix(self) -> str:
        return f"{self._getLogPrefix(self.protocol)},{self.sessionno},{self.hostname}"

    def __repr__(self) -> str:
        port = self.server._realPortNumber if self.server is not None else "?"
        return f"<{self.protocol.__class__.__name__} #{self.sessionno} on {port}>"


def lean_accepts(port: Any) -> Any:
    """Have a listening ``tcp.Port`` make :class:`LeanServer` transports; returns ``port``.

    Anything else (a test's fake port, another reactor's) is left as it is."""
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = LeanServer
    return port


class LeanConnector:
    """One non-blocking ``connect`` to an IP literal, reported to a ``ClientFactory``.

    On success the factory's ``buildProtocol(peer)`` protocol is connected to
    an :class:`OutgoingConnection`; on failure ``clientConnectionFailed(self,
    Failure(ConnectError subclass))`` is called, one reactor turn later at the
    earliest, with the same exception types ``connectTCP`` gives (so error
    mapping stays the caller's).  :meth:`stopConnecting` abandons the attempt
    silently: the caller that stops it has already decided what to answer.
    There is no timeout: the caller bounds the attempt (the SOCKS connect
    phase has its own timer).
    """

    def __init__(self, reactor: Any, host: str, port: int, factory: Any) -> None:
        self.reactor = reactor
        self.factory = factory
        self.peer = (host, port)
        self.state = "connecting"  # connecting, connected, failed, stopped
        v6 = ":" in host
        self._address = IPv6Address if v6 else IPv4Address
        # Non-blocking from creation (Python then keeps timeout 0 without an ioctl).
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, _STREAM_NONBLOCK)
        if not _STREAM_NONBLOCK & ~socket.SOCK_STREAM:
            s.setblocking(False)
        self.socket: socket.socket | None = s
        self.fileno = s.fileno
        try:
            err = s.connect_ex(self.peer)
        except OSError as e:  # e.g. a malformed literal: answered like any connect error
            err = e.errno or errno.EINVAL
        if err == 0 or err == errno.EISCONN or err in _IN_PROGRESS:
            reactor.addWriter(self)  # writable once connected or failed; SO_ERROR tells which
        else:
            reactor.callLater(0, self._failed, err)

    # IWriteDescriptor -------------------------------------------------------

    def doWrite(self) -> None:
        s = self.socket
        if self.state != "connecting" or s is None:
            return
        self.reactor.removeWriter(self)
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(err)
            return
        self.state = "connected"
        self.socket = None
        protocol = self.factory.buildProtocol(self._address("TCP", *self.peer))
        if protocol is None:
            s.close()
            return
        transport = OutgoingConnection(s, protocol, self.reactor, self.peer, self._address)
        transport.startReading()
        protocol.makeConnection(transport)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw an error or hang-up on the socket (a refused or unreachable
        attempt is reported this way, not as writable): SO_ERROR says which."""
        if self.state != "connecting" or self.socket is None:
            return
        try:
            err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            err = e.errno or 0
        self._failed(err or errno.ECONNABORTED)

    def logPrefix(self) -> str:
        return "LeanConnector"

    # ------------------------------------------------------------------------

    def _failed(self, err: int) -> None:
        if self.state != "connecting":
            return
        self.state = "failed"
        self._close()
        self.factory.clientConnectionFailed(self, Failure(error.getConnectError((err, os.strerror(err)))))

    def _close(self) -> None:
        s, self.socket = self.socket, None
        if s is not None:
            self.reactor.removeWriter(self)
            s.close()

    def stopConnecting(self) -> None:
        """Abandon the attempt (no callback follows); a no-op once it has connected or failed."""
        if self.state == "connecting":
            self.state = "stopped"
            self._close()


def connect_tcp(reactor: Any, host: str, port: int, factory: Any) -> Any:
    """``reactor.connectTCP(host, port, factory, timeout=None)``, lean on Twisted's POSIX reactors.

    ``host`` must be an IP literal (the caller resolved it).  Returns the
    connector (``stopConnecting()`` abandons the attempt).
    """
    if isinstance(reactor, PosixReactorBase):
        return LeanConnector(reactor, host, port, factory)
    return reactor.connectTCP(host, port, factory, timeout=None)
