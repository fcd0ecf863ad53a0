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
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["write_now"]

_Connection = tcp.Connection


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` on ``transport`` now if its buffer is empty, else queue it."""
    if (
        isinstance(transport, _Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and not transport._writeDisconnected
    ):
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
