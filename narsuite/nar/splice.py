"""Zero-copy TCP relay with splice(2): the bulk path of a SOCKS CONNECT/BIND relay.

A relay that reads with ``recv`` and writes with ``send`` copies every byte from the
kernel into a Python ``bytes`` object and back.  ``splice(2)`` moves pages from a
socket into a pipe and from the pipe into the other socket without them ever
reaching user space; Python has it as ``os.splice`` (Linux, Python 3.10+).

:class:`SpliceRelay` takes over the two sockets of an established relay from their
Twisted transports (which stop reading and writing but stay the owners of the
sockets and of the connection's lifecycle):

* one pipe per direction; a readable socket is spliced into its pipe, the pipe into
  the other socket at once;
* what the destination does not take stays in the pipe: the source stops being read
  and the destination is watched for writability until the pipe is empty (the same
  back-pressure as Twisted's producers, with the pipe as the buffer);
* a FIN (splice returns 0) is passed on as ``shutdown(SHUT_WR)`` once the pipe is
  empty (half-close, as the Twisted path does); when both directions have ended, or
  on any error, the relay ends: the sockets go back to nobody and both transports
  are closed through Twisted (``connectionLost`` runs as for any other close).

The caller (the SOCKS protocol) switches a relay over only once it has carried some
bytes (short CONNECTs never pay for the two pipes) and only while both transports
are plain TCP connections with nothing buffered (``fastio._idle``).  Counting and the
idle timer go through the ``on_bytes(up, n)`` callback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import main
from twisted.python.failure import Failure

from narsuite.logs import logger

__all__ = ["AVAILABLE", "SpliceRelay", "PIPE_SIZE"]

log = logger()

AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
#: Bytes a pipe holds (and the most one splice moves): the relay's read size.
PIPE_SIZE = 256 * 1024
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


class _End:
    """One socket of the relay as the reactor sees it (reader and, when blocked, writer)."""

    __slots__ = ("relay", "fd", "transport", "peer", "pipe_r", "pipe_w", "pending", "eof",
                 "reading", "up")

    def __init__(self, relay: SpliceRelay, transport: Any, up: bool) -> None:
        self.relay = relay
        self.transport = transport
        self.fd: int = transport.fileno()
        self.peer: _End = self  # set by the relay
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe (pipe-max-size) only means more splices
        self.pending = 0  # bytes in this end's pipe, read from it, not yet sent to the peer
        self.eof = False
        self.reading = False
        self.up = up  # client -> destination

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.relay._read(self)

    def doWrite(self) -> None:
        self.relay._flush(self.peer)

    def connectionLost(self, reason: Failure) -> None:
        self.relay._end(reason)

    def logPrefix(self) -> str:
        return "SpliceRelay"

    def close_pipe(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.pipe_r = self.pipe_w = -1


class SpliceRelay:
    """Relays between two connected TCP transports with splice(2) (module docstring)."""

    def __init__(self, reactor: Any, client: Any, outbound: Any,
                 on_bytes: Callable[[bool, int], None], done: Callable[[], None]) -> None:
        self.reactor = reactor
        self.on_bytes = on_bytes
        self.done = done
        self.ended = False
        for t in (client, outbound):
            t.stopReading()
            t.stopWriting()
        self.a = _End(self, client, True)
        try:
            self.b = _End(self, outbound, False)
        except OSError:
            self.a.close_pipe()
            raise
        self.a.peer, self.b.peer = self.b, self.a
        for end in (self.a, self.b):
            self._resume(end)

    # ---------------------------------------------------------------- plumbing
    def _pause(self, end: _End) -> None:
        if end.reading:
            end.reading = False
            self.reactor.removeReader(end)

    def _resume(self, end: _End) -> None:
        if not end.reading and not end.eof and not self.ended:
            end.reading = True
            self.reactor.addReader(end)

    # ---------------------------------------------------------------- data
    def _read(self, src: _End) -> None:
        if self.ended:
            return
        try:
            n = os.splice(src.fd, src.pipe_w, PIPE_SIZE - src.pending, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno in _AGAIN or e.errno == errno.EINTR:
                return
            self._end(Failure(main.CONNECTION_LOST))
            return
        if n == 0:  # FIN from src
            src.eof = True
            self._pause(src)
            if not src.pending:
                self._half_close(src)
            return
        src.pending += n
        self.on_bytes(src.up, n)
        self._flush(src)

    def _flush(self, src: _End) -> None:
        """Move what ``src``'s pipe holds into its peer; pause ``src`` if the peer is full."""
        if self.ended:
            return
        dst = src.peer
        while src.pending:
            try:
                m = os.splice(src.pipe_r, dst.fd, src.pending, flags=_FLAGS)
            except BlockingIOError:
                m = -1
            except OSError as e:
                if e.errno in _AGAIN or e.errno == errno.EINTR:
                    m = -1
                else:
                    self._end(Failure(main.CONNECTION_LOST))
                    return
            if m <= 0:  # the destination's send buffer is full: wait for it
                self._pause(src)
                self.reactor.addWriter(dst)
                return
            src.pending -= m
        self.reactor.removeWriter(dst)
        if src.eof:
            self._half_close(src)
        else:
            self._resume(src)

    def _half_close(self, src: _End) -> None:
        """``src`` sent FIN and everything before it has gone: pass the FIN on."""
        try:
            src.peer.transport.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if src.peer.eof and not src.peer.pending:
            self._end(Failure(main.CONNECTION_DONE))

    # ---------------------------------------------------------------- end
    def _end(self, reason: Failure) -> None:
        """Both directions done, an error, or the reactor dropped us: hand the sockets back
        and close both connections through their transports."""
        if self.ended:
            return
        self.ended = True
        for end in (self.a, self.b):
            self.reactor.removeReader(end)
            self.reactor.removeWriter(end)
            end.reading = False
        for end in (self.a, self.b):
            end.close_pipe()
        for end in (self.a, self.b):
            t = end.transport
            if t.connected and not getattr(t, "disconnected", False):
                t.connectionLost(reason)
        self.done()

    def stop(self) -> None:
        """The SOCKS protocol closes the relay (idle timeout, shutdown)."""
        self._end(Failure(main.CONNECTION_DONE))
