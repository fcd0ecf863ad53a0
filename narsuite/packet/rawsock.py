"""Raw IPv4 sockets per IP protocol, as Twisted readers.

Twisted has no ``SOCK_RAW`` transport.  :class:`RawSocketPort` wraps
``socket(AF_INET, SOCK_RAW, proto)`` in a small ``IReadDescriptor`` registered
with ``reactor.addReader``.  (``reactor.adoptDatagramPort`` also works on such a
socket, but its UDP port semantics -- ``(host, port)`` addresses, connected mode,
``ECONNREFUSED`` handling, one socket for everything -- fit badly, and it gives no
way to send with ``IP_HDRINCL`` or to count errors; this class is short and says
exactly what it does.)

Receiving: the kernel hands a raw socket a copy of every IPv4 packet of its
protocol addressed to this host (after reassembly), **IPv4 header included**.
Each one goes to the sink as ``packetReceived(packet, src)`` where ``src`` is the
dotted-quad source address (``packet[12:16]`` is the same as 4 bytes).  One wakeup
reads up to ``max_batch`` packets, stopping early on ``EAGAIN``.

Sending, two ways:

* :meth:`RawSocketPort.send` ``(payload, dst)``: the kernel builds the IPv4 header
  (protocol = the port's, source = routed or bound address) and fragments if needed.
  For ICMP the payload is the ICMP message *with* its checksum.
* :meth:`RawSocketPort.send_packet` ``(packet)``: a complete IPv4 packet, sent on a
  second socket, ``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)``, which implies
  ``IP_HDRINCL`` and never receives.  Use it to send with a borrowed source
  address or to forward a decapsulated packet as is (any protocol number).  Linux
  always fills in the header checksum and the total length, and fills the source
  address and the IP ID only when they are zero; the packet is never fragmented
  (``EMSGSIZE`` when it exceeds the route's MTU).

Send errors (``EHOSTUNREACH``, ``ENETUNREACH``, ``EMSGSIZE``, ``ENOBUFS``/``EAGAIN``
when the socket buffer is full, ...) are counted per errno and logged
(rate-limited), never raised: a datagram that cannot be sent is dropped, as IP
would.

A raw socket sees packets of its protocol whatever else handles them: the kernel
still answers ICMP echo requests seen by an ICMP raw socket, and two raw sockets
for protocol 50 each get every ESP packet.  For protocols the kernel does not
implement (ESP, IP-in-IP, GRE on our hosts) an open raw socket also keeps the
kernel from answering "protocol unreachable".
"""

from __future__ import annotations

import errno as _errno
import os
import socket
import struct
from collections.abc import Callable
from socket import socket as _Socket  # the class: RawSocketPort.socket hides the module
from typing import Protocol, Union, runtime_checkable

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.python import failure
from zope.interface import implementer

from narsuite.logs import logger
from narsuite.packet.common import RateLimitedLog, as_callback, errno_names

__all__ = [
    "IPPROTO_ICMP",
    "IPPROTO_IPIP",
    "IPPROTO_GRE",
    "IPPROTO_ESP",
    "IPPROTO_AH",
    "IRawPacketSink",
    "RawCounters",
    "RawSocketPort",
]

log = logger()

IPPROTO_ICMP = 1
IPPROTO_IPIP = 4
IPPROTO_GRE = 47
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_RAW = 255

# Not exported by the socket module on every Python version.
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_ADDR_AT = struct.Struct("!16x4s").unpack_from

_AGAIN = (_errno.EAGAIN, _errno.EWOULDBLOCK, _errno.EINTR)


@runtime_checkable
class IRawPacketSink(Protocol):
    """Receives raw IPv4 packets (header included) and their source address."""

    def packetReceived(self, packet: bytes, addr: str) -> None:  # pragma: no cover
        ...


RawCallback = Callable[[bytes, str], None]
RawSinkLike = Union[IRawPacketSink, RawCallback]


@attrs.define
class RawCounters:
    """Counters of one raw port.

    ``rx_packets``/``rx_bytes`` count packets read (IP header included);
    ``rx_dropped`` those not delivered (no sink, or the sink raised:
    ``rx_sink_errors``); ``rx_errors`` failed reads other than EAGAIN.
    ``tx_*`` count datagrams the kernel accepted (``send`` counts payload bytes,
    ``send_packet`` whole packets); ``tx_errors`` failed or refused sends, by errno
    in ``tx_errors_by_errno``.
    """

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    rx_sink_errors: int = 0
    rx_errors: int = 0
    rx_batches: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    tx_errors_by_errno: dict = attrs.field(factory=dict)

    def as_dict(self) -> dict:
        d = attrs.asdict(self)
        d["tx_errors_by_errno"] = errno_names(self.tx_errors_by_errno)
        return d


def _dst_str(dst: str | bytes) -> str:
    if isinstance(dst, (bytes, bytearray)):
        return socket.inet_ntoa(bytes(dst))
    return dst


@implementer(IReadDescriptor)
class RawSocketPort(service.Service):
    """A raw IPv4 socket for one IP protocol, read from the reactor.

    :param proto: IP protocol number (1 ICMP, 4 IP-in-IP, 47 GRE, 50 ESP, 51 AH...).
    :param sink: :class:`IRawPacketSink` or callable ``(packet, src)``; may be set
        later (:attr:`sink`).  None: packets are read and counted as dropped.
    :param bind_address: receive only packets addressed to this local address
        (and use it as the source of :meth:`send`).
    :param interface: ``SO_BINDTODEVICE``: receive only packets that arrived on
        this interface, and send through it (both sockets).
    :param max_batch: packets read per reactor wakeup at most.
    :param rcvbuf: receive buffer size in bytes (``SO_RCVBUFFORCE`` when allowed,
        else ``SO_RCVBUF``, capped by ``net.core.rmem_max``).
    :param reactor: default: the global reactor.
    """

    def __init__(
        self,
        proto: int,
        sink: RawSinkLike | None = None,
        *,
        bind_address: str | None = None,
        interface: str | None = None,
        max_batch: int = 64,
        max_packet_size: int = 65535,
        rcvbuf: int | None = None,
        reactor=None,
    ) -> None:
        if not 0 < proto < 255:
            raise ValueError(f"IP protocol must be 1..254, not {proto}")
        self.proto = proto
        self._sink = sink
        self._callback = as_callback(sink)
        self.bind_address = bind_address
        self.interface = interface
        self.max_batch = max_batch
        self.max_packet_size = max_packet_size
        self.rcvbuf = rcvbuf
        self._reactor = reactor
        self._sock: socket.socket | None = None
        self._hdrincl: socket.socket | None = None
        self._buf = bytearray(max_packet_size)
        self._view = memoryview(self._buf)
        self.counters = RawCounters()
        self._errlog = RateLimitedLog(f"raw socket (protocol {proto}) send failed")

    # -- properties --------------------------------------------------------------

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def sink(self) -> RawSinkLike | None:
        return self._sink

    @sink.setter
    def sink(self, sink: RawSinkLike | None) -> None:
        self._callback = as_callback(sink)
        self._sink = sink

    @property
    def socket(self) -> socket.socket | None:
        """The receiving/``send`` socket, for extra socket options (TTL, TOS...)."""
        return self._sock

    # -- life cycle ----------------------------------------------------------------

    def _bind_device(self, sock: _Socket) -> None:
        if self.interface:
            sock.setsockopt(
                socket.SOL_SOCKET, SO_BINDTODEVICE, self.interface.encode() + b"\0"
            )

    def start(self) -> None:
        """Open the socket(s) and start reading.  Raises OSError (e.g. EPERM)."""
        if self._sock is not None:
            raise RuntimeError(f"raw port for protocol {self.proto} already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, self.proto)
        try:
            sock.setblocking(False)
            self._bind_device(sock)
            if self.rcvbuf:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            if self.bind_address:
                sock.bind((self.bind_address, 0))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.reactor.addReader(self)
        self.running = 1  # Service's flag, also set when used as a plain object

    def stop(self) -> defer.Deferred:
        """Stop reading and close the sockets (synchronously; returns a fired Deferred)."""
        self.running = 0
        if self._sock is not None:
            self.reactor.removeReader(self)
            self._sock.close()
            self._sock = None
        if self._hdrincl is not None:
            self._hdrincl.close()
            self._hdrincl = None
        return defer.succeed(None)

    startListening = start
    stopListening = stop

    def startService(self) -> None:
        self.start()
        service.Service.startService(self)

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        return self.stop()

    # -- IReadDescriptor -------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        return f"RawSocketPort(proto={self.proto})"

    def connectionLost(self, reason: failure.Failure) -> None:
        # Called by the reactor if the descriptor breaks or at reactor shutdown.
        self.stop()

    def doRead(self) -> None:
        sock = self._sock
        if sock is None:
            return
        recv_into = sock.recvfrom_into
        view = self._view
        callback = self._callback
        c = self.counters
        c.rx_batches += 1
        for _ in range(self.max_batch):
            try:
                n, addr = recv_into(self._buf)
            except OSError as e:
                if e.errno not in _AGAIN:
                    c.rx_errors += 1
                    log.warn(
                        "raw socket (protocol {proto}) read failed: {err}",
                        proto=self.proto,
                        err=os.strerror(e.errno or 0),
                    )
                return
            packet = bytes(view[:n])
            c.rx_packets += 1
            c.rx_bytes += n
            if callback is None:
                c.rx_dropped += 1
                continue
            try:
                callback(packet, addr[0])
            except Exception:
                c.rx_dropped += 1
                c.rx_sink_errors += 1
                log.failure("raw socket (protocol {proto}): sink raised", proto=self.proto)
            if self._sock is not sock:  # the sink stopped us
                return

    # -- sending ------------------------------------------------------------------------

    def _failed(self, err: int, detail: str) -> bool:
        c = self.counters
        c.tx_errors += 1
        by = c.tx_errors_by_errno
        by[err] = by.get(err, 0) + 1
        self._errlog(err, f"{detail}: {os.strerror(err)}")
        return False

    def send(self, payload: bytes, dst: str | bytes) -> bool:
        """Send *payload* to *dst* in an IPv4 packet the kernel builds.

        True if the kernel accepted it; on failure False (counted, logged).
        """
        sock = self._sock
        if sock is None:
            return self._failed(_errno.EBADF, "port not started")
        try:
            sock.sendto(payload, (_dst_str(dst), 0))
        except OSError as e:
            return self._failed(e.errno or _errno.EIO, f"send to {_dst_str(dst)}")
        c = self.counters
        c.tx_packets += 1
        c.tx_bytes += len(payload)
        return True

    def _hdrincl_socket(self) -> _Socket:
        sock = self._hdrincl
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_RAW)
            try:
                sock.setblocking(False)
                self._bind_device(sock)
            except BaseException:
                sock.close()
                raise
            self._hdrincl = sock
        return sock

    def send_packet(self, packet: bytes, next_hop: str | None = None) -> bool:
        """Send a complete IPv4 packet as is (``IP_HDRINCL``).

        The route is looked up for *next_hop* if given, else for the packet's
        destination address.  The kernel fills in the header checksum and the
        total length, and the source address and IP ID when they are zero.
        True if the kernel accepted it; on failure False (counted, logged).
        """
        if self._sock is None:
            return self._failed(_errno.EBADF, "port not started")
        if len(packet) < 20 or packet[0] >> 4 != 4 or (packet[0] & 0xF) < 5:
            return self._failed(_errno.EINVAL, "send_packet: not an IPv4 packet")
        if next_hop is None:
            next_hop = socket.inet_ntoa(_ADDR_AT(packet)[0])
        try:
            self._hdrincl_socket().sendto(packet, (next_hop, 0))
        except OSError as e:
            return self._failed(e.errno or _errno.EIO, f"send_packet via {next_hop}")
        c = self.counters
        c.tx_packets += 1
        c.tx_bytes += len(packet)
        return True

    def __repr__(self) -> str:
        state = "running" if self._sock is not None else "stopped"
        return f"<RawSocketPort proto={self.proto} {state}>"
