"""Typing-only interfaces: what narsuite's stream protocols use of their transport.

Twisted types ``Protocol.transport`` as ``ITransport | None``: ``None`` until
``makeConnection``, and ``ITransport`` has neither the producer/consumer methods
nor ``abortConnection`` that a relay needs.  A stream protocol whose methods all
run after ``makeConnection`` (Twisted never sets a stream transport back to
``None``) declares ``transport: IStreamTransport`` (or :class:`ITCPStreamTransport`)
at class level; the interfaces below name exactly the part of Twisted's
``tcp.Connection`` (and ``unix.Server``, a subclass) we rely on.  Nothing
checks them at run time: no transport declares them, none needs to.

(Datagram protocols are different: ``DatagramProtocol.doStop`` does set
``transport`` back to ``None``, so they keep Twisted's type and check.)
"""

from __future__ import annotations

import socket

from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport, ITransport

__all__ = ["IStreamTransport", "ITCPStreamTransport"]


class IStreamTransport(ITransport, IConsumer, IPushProducer):
    """A connected stream socket's transport (TCP or UNIX): a push producer and a consumer."""

    #: The connected socket (``tcp.Connection.socket``).
    socket: socket.socket
    #: How many bytes one ``doRead`` reads at most (``tcp.Connection.bufferSize``).
    bufferSize: int

    def abortConnection() -> None:
        """Close now, dropping anything still buffered to send."""

    def startReading() -> None:
        """Watch the socket for reading again (``abstract.FileDescriptor``)."""

    def stopReading() -> None:
        """Stop watching the socket for reading (``abstract.FileDescriptor``)."""


class ITCPStreamTransport(IStreamTransport, ITCPTransport):
    """A TCP connection's transport: the above with TCP's addresses and options."""
