"""UDP ports that several roles in one process share.

Port 4500 carries ESP (the esp role) and IKE behind the non-ESP marker (the
ike role); port 500 carries IKE and, in the 004 draft's scheme, ESP behind
eight zero bytes.  There must be one socket per port, so the daemon owns the
socket and roles register *handlers*, each with a predicate on the datagram's
first bytes — the way Tahoe's protocol switch sniffs a connection.  The first
handler whose predicate matches gets the datagram; nothing matching is
counted (``short`` when it is shorter than anything a handler takes,
``unclaimed`` otherwise) and dropped.  The port's counters are the daemon's,
not a role's: ``narctl udp`` and ``narsuite_udp_datagrams_total`` show them.
Roles never see each other: each only knows the wire format it claims.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet.protocol import DatagramProtocol

from narsuite.logs import logger

__all__ = ["SharedUDPPort", "UDPPorts", "Handler"]

log = logger()

SO_NO_CHECK = getattr(socket, "SO_NO_CHECK", 11)
_pton = socket.inet_pton
_AF_INET = socket.AF_INET

Address = tuple[str, int]
Handler = Callable[[bytes, Address], None]
Predicate = Callable[[bytes], bool]


@attrs.define
class _Route:
    name: str
    predicate: Predicate
    handler: Handler
    packets: int = 0
    #: the shortest datagram this handler takes (for the port's ``short`` counter)
    min_length: int = 0


#: receive buffer asked for on every shared UDP port
RCVBUF = 4 * 1024 * 1024


class _Protocol(DatagramProtocol):
    def __init__(self, port: SharedUDPPort) -> None:
        self.shared = port
        # Bound straight to the port's dispatch: one Python frame fewer per datagram
        # (mypy refuses any assignment over a method; this one is on purpose).
        self.datagramReceived = port.dispatch  # type: ignore[method-assign]


class SharedUDPPort(service.Service):
    """One UDP socket, many claimants."""

    def __init__(self, port: int, interface: str = "", reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _r

            reactor = _r
        self.reactor = reactor
        self.port_number = port
        self.interface = interface
        self.routes: list[_Route] = []
        self.unclaimed = 0
        self.short = 0
        self.handler_errors = 0
        self.port = None
        #: the listening socket when it is a real AF_INET one (write's fast path)
        self._sock: socket.socket | None = None
        self._shortest = 0
        #: datagrams write_soon() holds until the reactor turn's reads are done
        self._soon: list[tuple[bytes, Address]] = []
        #: write_soon() datagrams the socket refused when they were sent
        self.deferred_send_failed = 0
        self._protocol = _Protocol(self)
        #: Send with a zero UDP checksum (Linux SO_NO_CHECK): RFC 3948 §2.1 says ESP-in-UDP
        #: and NAT-keepalives SHOULD carry 0; receivers must not depend on it either way.
        self.zero_checksum = False

    def add_handler(self, name: str, predicate: Predicate, handler: Handler, min_length: int = 0) -> None:
        """Give ``handler`` every datagram for which ``predicate(data)`` is true.

        ``min_length``: the shortest datagram the handler takes (its predicate says no
        to anything shorter); unclaimed datagrams shorter than every handler's are
        counted as ``short``.
        """
        if any(r.name == name for r in self.routes):
            raise ValueError(f"UDP port {self.port_number}: handler {name!r} registered twice")
        self.routes.append(_Route(name, predicate, handler, min_length=min_length))
        self._shortest = min(r.min_length for r in self.routes)

    def dispatch(self, datagram: bytes, addr: Address) -> None:
        for route in self.routes:
            if route.predicate(datagram):
                route.packets += 1
                try:
                    route.handler(datagram, addr)
                except Exception:
                    # A handler bug must not take the port (and the other roles) down.
                    self.handler_errors += 1
                    log.failure("UDP {port}: handler {name} failed", port=self.port_number,
                                name=route.name)
                return
        if len(datagram) < self._shortest:
            self.short += 1
        else:
            self.unclaimed += 1

    def write(self, data: bytes, addr: Address) -> bool:
        """Send one datagram; errors are the caller's to count (False), never raised.

        An IPv4 literal goes straight to the socket: Twisted's ``Port.write`` tests the
        address with ``isIPAddress`` (Python, three calls per datagram) before the same
        ``sendto``, which was a tenth of a relayed Mobile IP registration's CPU.  Anything
        else (a name, IPv6) takes Twisted's path, so a name is refused, never resolved."""
        sock = self._sock
        if sock is not None:
            try:
                _pton(_AF_INET, addr[0])
            except (OSError, TypeError, ValueError):
                sock = None
        if sock is None:
            port: Any = self.port
            if port is None:
                return False
            try:
                port.write(data, addr)
            except OSError:
                return False
            return True
        while True:
            try:
                sock.sendto(data, addr)
                return True
            except InterruptedError:
                continue  # EINTR: again, as Twisted does
            except ConnectionRefusedError:
                # an earlier datagram's ICMP unreachable, reported on this one (Linux): this
                # datagram left; Twisted's write ignores it the same way
                return True
            except OSError:
                return False

    def write_soon(self, data: bytes, addr: Address) -> bool:
        """:meth:`write`, once this reactor turn has handled every socket that was ready:
        datagrams answered in one turn leave together, in order, after it.

        Why: on loopback (and to a peer that sleeps between bursts) every ``sendto`` that
        finds its receiver asleep pays the receiver's wake-up in the sender's system time;
        a burst wakes it once.  A Mobile IP registration relay answering its reads one by
        one spent more CPU on wake-ups than on the registrations (docs/benchmarks.md:
        25-45 % less CPU per registration for the proxy and its peer with this).  The delay
        is the rest of the turn's reads, bounded by the reactor's own read limits.  Always
        True (queued): a datagram the socket refuses then is counted in
        ``deferred_send_failed`` (``stats()``), not reported to the caller."""
        soon = self._soon
        soon.append((data, addr))
        if len(soon) == 1:
            self.reactor.callLater(0, self._flush_soon)
        return True

    def _flush_soon(self) -> None:
        soon, self._soon = self._soon, []
        write = self.write
        for data, addr in soon:
            try:
                ok = write(data, addr)
            except Exception:  # an address Twisted refuses: counted, the rest still leave
                ok = False
            if not ok:
                self.deferred_send_failed += 1

    def _listen(self) -> None:
        self.port = self.reactor.listenUDP(self.port_number, self._protocol, interface=self.interface)
        sock = getattr(self.port, "socket", None)
        self._sock = sock if getattr(sock, "family", None) == socket.AF_INET else None
        if self.zero_checksum and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        if sock is not None:
            # A data-plane port (ESP on 4500) takes bursts faster than one reactor turn
            # drains them: the default 208 KiB overflowed in the tunnel benchmark.  FORCE
            # (root) passes net.core.rmem_max; without the privilege the plain option is
            # capped by it, which is still the best we may have.
            for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
                    break
                except OSError:
                    continue

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def stopService(self):
        super().stopService()
        if self._soon:
            self._flush_soon()  # what this turn answered still leaves
        if self.port is not None:
            d = self.port.stopListening()
            self.port = None
            self._sock = None
            return d
        return None

    def stats(self) -> dict:
        out = {f"{r.name}_packets": r.packets for r in self.routes}
        out.update(short=self.short, unclaimed=self.unclaimed, handler_errors=self.handler_errors,
                   deferred_send_failed=self.deferred_send_failed)
        return out


class UDPPorts(service.MultiService):
    """The daemon's shared UDP ports, started before the roles that use them."""

    def __init__(self, reactor=None) -> None:
        super().__init__()
        self.reactor = reactor
        self.setName("udp")
        self._ports: dict[tuple[str, int], SharedUDPPort] = {}

    def get(self, port: int, interface: str = "") -> SharedUDPPort:
        key = (interface, port)
        shared = self._ports.get(key)
        if shared is None:
            shared = SharedUDPPort(port, interface, self.reactor)
            shared.setName(f"udp:{interface or '*'}:{port}")
            shared.setServiceParent(self)
            self._ports[key] = shared
        return shared

    def ports(self) -> list[SharedUDPPort]:
        return list(self._ports.values())

    def stats(self) -> dict[str, dict[str, int]]:
        """Every port's counters, by ``interface:port`` (``*`` for all interfaces)."""
        return {f"{iface or '*'}:{port}": p.stats() for (iface, port), p in sorted(self._ports.items())}
