"""TUN devices for the roles' data planes.

A :class:`TunDevice` is a layer-3 TUN interface opened through Twisted's
:class:`twisted.pair.tuntap.TuntapPort` (``IFF_TUN | IFF_NO_PI``: every read and write
is one whole IP packet, no 4-byte packet-information prefix) and configured over
rtnetlink with pyroute2, in the network namespace the process runs in.

Packets the kernel routes into the device are handed to a *sink*: either an object
with ``packetReceived(packet: bytes)`` (:class:`IPacketSink`) or a plain callable
taking the packet.  :meth:`TunDevice.write` injects a packet into the kernel as if
it had arrived on the interface.

IPv4 only, enforced twice:

* by default ``net.ipv6.conf.<dev>.disable_ipv6`` is set to 1 *before* the link is
  brought up, so the kernel neither assigns a link-local address nor sends router
  solicitations or MLD reports into the device;
* whatever is not IPv4 anyway (version nibble != 4, shorter than 20 bytes) is
  dropped before the sink and counted (``rx_ipv6`` / ``rx_dropped``).

The device is not persistent: it disappears, together with its addresses and
routes, when the port is stopped (its file descriptor closed) or the process dies.

Usable as a Twisted service (``startService``/``stopService``) or as a plain object
(``start()``/``stop()``)::

    dev = TunDevice(b"nar%d", sink, addresses=["10.99.0.1/24"], mtu=1400,
                    routes=["10.97.0.0/24"])
    dev.start()                  # device exists, is up and routed from here on
    dev.write(ip_packet)
    d = dev.stop()               # Deferred; the device is gone when it fires
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
from collections.abc import Callable, Iterable
from typing import Protocol, Union, runtime_checkable

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.pair import tuntap
from twisted.pair.raw import IRawPacketProtocol
from twisted.pair.tuntap import TuntapPort
from zope.interface import implementer

from narsuite.logs import logger
from narsuite.packet.common import RateLimitedLog, as_callback, errno_names
from narsuite.packet.rtnl import RouteSocket

__all__ = [
    "IPacketSink",
    "PacketCallback",
    "TunCounters",
    "NetlinkConfigurator",
    "TunDevice",
    "as_packet_callback",
]

log = logger()

#: Largest IPv4 packet; reads use a buffer this big so a raised MTU never truncates.
MAX_IP_PACKET = 65535


@runtime_checkable
class IPacketSink(Protocol):
    """Receives whole IPv4 packets (header included) read from a TUN device."""

    def packetReceived(self, packet: bytes) -> None:  # pragma: no cover - protocol
        ...


PacketCallback = Callable[[bytes], None]
SinkLike = Union[IPacketSink, PacketCallback]


def as_packet_callback(sink: SinkLike | None) -> PacketCallback | None:
    """Return the callable to invoke per packet for *sink* (object or callable)."""
    return as_callback(sink)


@attrs.define
class TunCounters:
    """Packet counters of one TUN device.

    ``rx_*`` count everything read from the device (kernel -> user space);
    ``rx_dropped`` is the part of it that did not reach the sink: not IPv4
    (``rx_ipv6`` counts the IPv6 subset), shorter than an IPv4 header, no sink set,
    or the sink raised (``rx_sink_errors``).  ``tx_*`` count packets accepted by
    the kernel on :meth:`TunDevice.write`; ``tx_dropped`` the writes that failed
    (device not running or an OS error, by errno in ``tx_errors_by_errno``).
    """

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    rx_ipv6: int = 0
    rx_sink_errors: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    tx_errors_by_errno: dict = attrs.field(factory=dict)

    def as_dict(self) -> dict:
        d = attrs.asdict(self)
        d["tx_errors_by_errno"] = errno_names(self.tx_errors_by_errno)
        return d


def _network(prefix: str) -> str:
    """Validate an IPv4 prefix ("10.97.0.0/24"; a bare address means /32)."""
    return str(ipaddress.IPv4Network(prefix, strict=True))


class NetlinkConfigurator:
    """Link configuration over rtnetlink (pyroute2 ``IPRoute``), current namespace.

    One netlink socket, opened on first use and kept until :meth:`close`.  Calls are
    synchronous and take well under a millisecond each, so they are made from the
    reactor thread at start-up and on reconfiguration.  A route is added per new peer
    (the esp role, on every IKE negotiation), so the name -> index lookup -- a link
    dump, as costly as the route change itself (about 0.3 ms each here) -- is cached;
    a device removed and created again under the same name gets a new index, which
    the kernel's ENODEV reveals: the cache entry is dropped and the call made again.
    Routes themselves go through :class:`~narsuite.packet.rtnl.RouteSocket` (a request
    built with ``struct``): through pyroute2 each cost about 0.28 ms of CPU.
    """

    def __init__(self) -> None:
        self._ipr = None
        self._routes = RouteSocket()
        self._indexes: dict[str, int] = {}

    @property
    def ipr(self):
        if self._ipr is None:
            from pyroute2 import IPRoute  # imported lazily: unit tests do not need it

            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        self._routes.close()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def index(self, name: str) -> int:
        cached = self._indexes.get(name)
        if cached is not None:
            return cached
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise LookupError(f"no link named {name!r} in this network namespace")
        self._indexes[name] = found[0]
        return found[0]

    def _on_link(self, name: str, call: Callable[[int], object]) -> None:
        """``call(index of name)``, once more with a fresh index if the cached one is stale."""
        try:
            call(self.index(name))
        except Exception as e:
            if getattr(e, "code", None) != errno.ENODEV or self._indexes.pop(name, None) is None:
                raise
            call(self.index(name))

    def link_exists(self, name: str) -> bool:
        return bool(self.ipr.link_lookup(ifname=name))

    def disable_ipv6(self, name: str) -> bool:
        """Set ``net.ipv6.conf.<name>.disable_ipv6=1``; False if IPv6 is absent."""
        path = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
        try:
            with open(path, "w") as f:
                f.write("1")
        except FileNotFoundError:
            return False
        return True

    def set_mtu(self, name: str, mtu: int) -> None:
        self._on_link(name, lambda index: self.ipr.link("set", index=index, mtu=int(mtu)))

    def set_up(self, name: str) -> None:
        self._on_link(name, lambda index: self.ipr.link("set", index=index, state="up"))

    def add_address(self, name: str, address: str, prefixlen: int) -> None:
        self._on_link(name, lambda index: self.ipr.addr("add", index=index, address=address, prefixlen=prefixlen))

    def remove_address(self, name: str, address: str, prefixlen: int) -> None:
        self._on_link(name, lambda index: self.ipr.addr("del", index=index, address=address, prefixlen=prefixlen))

    def add_route(self, name: str, dst: str) -> None:
        # "replace": routing a prefix into this device wins over a stale route.
        self._on_link(name, lambda index: self._routes.replace(dst, index))

    def remove_route(self, name: str, dst: str) -> None:
        self._on_link(name, lambda index: self._routes.delete(dst, index))


@implementer(IRawPacketProtocol)
class _TunProtocol(AbstractDatagramProtocol):
    """The protocol TuntapPort talks to; forwards every read to the device."""

    def __init__(self, device: TunDevice) -> None:
        self._received = device._packetFromKernel

    def addProto(self, num, proto):  # pragma: no cover - IRawPacketProtocol API
        raise NotImplementedError("TunDevice delivers whole packets to one sink")

    def datagramReceived(self, data, partial=0, dest=None, source=None, protocol=None):
        self._received(data)


class TunDevice(service.Service):
    """A TUN interface carrying IPv4 packets between the kernel and a sink.

    :param name: requested device name as bytes; a ``%d`` lets the kernel pick
        the first free number (``b"nar%d"`` -> ``nar0``).  The actual name is
        :attr:`ifname` (str) once started.  (Not ``name``: that attribute
        belongs to ``twisted.application.service.Service``.)
    :param sink: :class:`IPacketSink` or callable; may be set later (:attr:`sink`).
    :param addresses: IPv4 interface addresses with prefix, e.g. ``"10.99.0.1/24"``.
    :param mtu: device MTU (kernel default 1500 when None).
    :param routes: IPv4 prefixes routed into the device (``"10.97.0.0/24"``).
    :param disable_ipv6: set the device's ``disable_ipv6`` sysctl before bringing
        it up (the version-nibble filter applies in any case).
    :param configure: False to only open the device (no netlink at all).
    :param netlink: a :class:`NetlinkConfigurator` (or a test double).
    :param reactor: reactor for the port (default: the global one).
    :param system: I/O system for :class:`TuntapPort` (tests pass
        ``twisted.pair.testing.MemoryIOSystem``).
    """

    def __init__(
        self,
        name: bytes = b"nar%d",
        sink: SinkLike | None = None,
        *,
        addresses: Iterable[str] = (),
        mtu: int | None = None,
        routes: Iterable[str] = (),
        disable_ipv6: bool = True,
        configure: bool = True,
        netlink: NetlinkConfigurator | None = None,
        max_packet_size: int = MAX_IP_PACKET,
        reactor=None,
        system=None,
    ) -> None:
        if isinstance(name, str):
            name = name.encode("ascii")
        self.requested_name: bytes = name
        self._callback = as_packet_callback(sink)
        self._sink = sink
        self.addresses = [ipaddress.IPv4Interface(a) for a in addresses]
        self.mtu = mtu
        # a dict, not a list: a route per peer made membership tests O(peers) each
        self._routes: dict[str, None] = dict.fromkeys(_network(r) for r in routes)
        self.disable_ipv6 = disable_ipv6
        self.configure = configure
        self.netlink = netlink
        self.max_packet_size = max_packet_size
        self._reactor = reactor
        self._system = system
        self._port: TuntapPort | None = None
        self._write: Callable[[bytes], object] | None = None  # the per-packet writer
        self.ifname: str | None = None
        self.ipv6_disabled = False
        self.counters = TunCounters()
        self._errlog = RateLimitedLog("TUN write failed")

    # -- sink ------------------------------------------------------------------

    @property
    def sink(self) -> SinkLike | None:
        return self._sink

    @sink.setter
    def sink(self, sink: SinkLike | None) -> None:
        self._callback = as_packet_callback(sink)
        self._sink = sink

    # -- life cycle ------------------------------------------------------------

    @property
    def port(self) -> TuntapPort | None:
        return self._port

    def start(self) -> None:
        """Open the device, then configure it (IPv6 off, MTU, addresses, up, routes).

        Raises ``twisted.internet.error.CannotListenError`` if the device cannot be
        opened (no /dev/net/tun, no CAP_NET_ADMIN), or the netlink error if the
        configuration fails (the device is then closed again).
        """
        if self._port is not None:
            raise RuntimeError(f"TUN device {self.ifname} already started")
        kwargs = {"maxPacketSize": self.max_packet_size}
        if self._reactor is not None:
            kwargs["reactor"] = self._reactor
        if self._system is not None:
            kwargs["system"] = self._system
        port = TuntapPort(self.requested_name, _TunProtocol(self), **kwargs)
        port.startListening()
        self._port = port
        # The packet path writes to the descriptor itself: TuntapPort.write adds two
        # Python frames per packet (and its own EINTR retry, which os.write already
        # does, PEP 475).  A test's MemoryIOSystem keeps going through the port.
        real = getattr(tuntap, "_RealSystem", None)
        if real is not None and type(port._system) is real:
            self._write = functools.partial(os.write, port._fileno)
        else:
            self._write = port.write
        self.ifname = ifname = port.interface.decode("ascii")
        if self.configure:
            self._configure(port, ifname)
        # ``running`` is Service's "started" flag; set here too for plain-object use.
        self.running = 1

    def _configure(self, port: TuntapPort, ifname: str) -> None:
        if self.netlink is None:
            self.netlink = NetlinkConfigurator()
        nl = self.netlink
        try:
            if self.disable_ipv6:
                self.ipv6_disabled = nl.disable_ipv6(ifname)
            if self.mtu is not None:
                nl.set_mtu(ifname, self.mtu)
            for iface in self.addresses:
                nl.add_address(ifname, str(iface.ip), iface.network.prefixlen)
            nl.set_up(ifname)
            for dst in self.routes:
                nl.add_route(ifname, dst)
        except BaseException:
            self._port = self._write = None
            nl.close()
            port.stopListening()
            raise

    def stop(self) -> defer.Deferred:
        """Close the device; the Deferred fires once it (and its routes) are gone."""
        port, self._port = self._port, None
        self._write = None
        self.running = 0
        if self.netlink is not None:
            self.netlink.close()
        if port is None:
            return defer.succeed(None)
        return port.stopListening()

    def startService(self) -> None:
        self.start()
        service.Service.startService(self)

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        return self.stop()

    # -- configuration while running ---------------------------------------------

    def _nl(self) -> tuple[NetlinkConfigurator, str]:
        """The netlink configurator and the device's name; refuses before start."""
        if self.ifname is None or self._port is None:
            raise RuntimeError("TUN device not started")
        if self.netlink is None:
            self.netlink = NetlinkConfigurator()
        return self.netlink, self.ifname

    def add_address(self, address: str) -> None:
        iface = ipaddress.IPv4Interface(address)
        nl, ifname = self._nl()
        nl.add_address(ifname, str(iface.ip), iface.network.prefixlen)
        self.addresses.append(iface)

    def remove_address(self, address: str) -> None:
        iface = ipaddress.IPv4Interface(address)
        nl, ifname = self._nl()
        nl.remove_address(ifname, str(iface.ip), iface.network.prefixlen)
        if iface in self.addresses:
            self.addresses.remove(iface)

    def set_mtu(self, mtu: int) -> None:
        nl, ifname = self._nl()
        nl.set_mtu(ifname, mtu)
        self.mtu = mtu

    @property
    def routes(self) -> list[str]:
        """The prefixes routed into the device, in the order they were added."""
        return list(self._routes)

    def add_route(self, dst: str) -> None:
        """Route the IPv4 prefix *dst* into this device (replacing any route to it)."""
        dst = _network(dst)
        nl, ifname = self._nl()
        nl.add_route(ifname, dst)
        self._routes[dst] = None

    def remove_route(self, dst: str) -> None:
        dst = _network(dst)
        nl, ifname = self._nl()
        nl.remove_route(ifname, dst)
        self._routes.pop(dst, None)

    # -- data path -------------------------------------------------------------

    def _packetFromKernel(self, packet: bytes) -> None:
        c = self.counters
        c.rx_packets += 1
        c.rx_bytes += len(packet)
        if len(packet) < 20 or packet[0] >> 4 != 4:
            c.rx_dropped += 1
            if packet and packet[0] >> 4 == 6:
                c.rx_ipv6 += 1
            return
        callback = self._callback
        if callback is None:
            c.rx_dropped += 1
            return
        try:
            callback(packet)
        except Exception:
            c.rx_dropped += 1
            c.rx_sink_errors += 1
            log.failure("TUN {name}: packet sink raised", name=self.ifname)

    def write(self, packet: bytes) -> bool:
        """Inject one IP packet into the kernel; True if the kernel accepted it.

        Never raises: failures (device not running, EINVAL for a packet that is
        not IP, ENOBUFS/EAGAIN when the kernel queue is full, EIO while the link
        is down...) are counted in :attr:`counters` and logged (rate-limited).
        """
        c = self.counters
        write = self._write
        if write is None:
            c.tx_dropped += 1
            return False
        try:
            write(packet)
        except OSError as e:
            c.tx_dropped += 1
            by = c.tx_errors_by_errno
            by[e.errno] = by.get(e.errno, 0) + 1
            self._errlog(e.errno, f"{self.ifname}: {os.strerror(e.errno or 0)}")
            return False
        c.tx_packets += 1
        c.tx_bytes += len(packet)
        return True

    def __repr__(self) -> str:
        state = "running" if self._port is not None else "stopped"
        return f"<TunDevice {self.ifname or self.requested_name!r} {state}>"
