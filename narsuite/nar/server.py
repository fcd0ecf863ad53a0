"""The SOCKS5 server (RFC 1928, RFC 1929) of the nar role, and its NAR hook.

:class:`SocksProtocol` frames bytes and walks the stages (method selection,
sub-negotiation, one request); :class:`SocksFactory` holds what decides
(methods, the password checker, the rules, the resolver, the counters).
The codec is :mod:`narsuite.nar.socks`, auth :mod:`narsuite.nar.auth`,
rules :mod:`narsuite.nar.rules`.

Commands: CONNECT (IPv4, IPv6, domain names resolved off the reactor thread,
each resolved address checked against the rules, tried in order), BIND
(two replies; only the address named in DST.ADDR may connect, unless it is
all zeros), UDP ASSOCIATE (a relay bound to the address the client reached
us on; only the client's address, and port if given, may use it; FRAG != 0
is dropped; ends with the TCP connection or after ``udp_idle_timeout``).
Relays use producer/consumer flow control in both directions.

The NAR handler interface
=========================

A request whose CMD equals ``config.nar.mode_command`` (NAR-MODE) is handed
to ``nar_handler`` (written by the NAR code, passed to :class:`SocksFactory`)
after the method negotiation/auth and a rules check with command ``"nar"``
(destination: DST.ADDR, resolved if it is a name).  When NAR is disabled or
there is no handler the reply is 0x07 "command not supported".

The handler has three methods:

``nar_mode(conn, request) -> bytes | Deferred[bytes]``
    ``request`` is the parsed :class:`narsuite.nar.socks.Request` (``flags``
    holds the RSV/FLAG byte).  Returns the complete SOCKS reply to send
    (e.g. ``socks.encode_reply(0, Nb, 0, flags)``).  If its REP is not 0 the
    server closes the connection after sending it.  If it raises or the
    Deferred fails, the client gets 0x01 and the connection closes.
``nar_data(conn, data: bytes) -> None``
    Every byte the client sends after the NAR-MODE request (including bytes
    that arrived before ``nar_mode`` returned) is passed here, in order.
``nar_closed(conn) -> None``
    The connection is gone (called once, if ``nar_mode`` was called).

``conn`` is a :class:`NarConnection`: ``session_id`` (unique str),
``client`` (client IP, str), ``client_port``, ``user`` ("" without auth),
``write(bytes)``, ``close()``, ``pause()``/``resume()``.  In NAR mode the
connection gets TCP keepalive and the optional session idle limit (``[nar.nar]``);
otherwise the handler owns the session's lifetime.  Exceptions raised by the handler are
logged and never reach the reactor.
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error, udp
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IResolutionReceiver
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol, ServerFactory, connectionDone
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from narsuite import logs
from narsuite.logs import LEVELS, Aggregator, logger
from narsuite.nar import socks
from narsuite.nar.auth import PasswordChecker, check_hash_format
from narsuite.nar.config import NarConfig
from narsuite.nar.fastio import (
    ClosingProducer,
    LeanServer,
    close_now,
    connect_tcp,
    idle_transport,
    is_plain_tcp,
    lose_now,
    shutdown_write_now,
    write_now,
)
from narsuite.nar.records import SESSION_OWNER_PREFIX
from narsuite.nar.rules import RuleSet
from narsuite.nar.splice import AVAILABLE as SPLICE_AVAILABLE
from narsuite.nar.splice import SpliceRelay
from narsuite.nar.udpoffload import COUNTERS as OFFLOAD_COUNTERS
from narsuite.nar.udpoffload import DEFERRED, UdpOffload
from narsuite.packet.routing import default_route_source, source_address
from narsuite.schema import ConfigError
from narsuite.transports import ITCPStreamTransport

__all__ = ["SocksFactory", "SocksProtocol", "NarConnection", "connect_error_code", "METHOD_CODES"]

log = logger()

METHOD_CODES = {"none": socks.METHOD_NONE, "password": socks.METHOD_PASSWORD}
#: Bytes a client may send ahead of our reply (pipelining) before we stop reading.
MAX_EARLY = 64 * 1024
#: recv() size for the two sockets of a TCP relay.
RELAY_READ_SIZE = 256 * 1024
#: A relay that has carried this many bytes goes over to splice(2) (narsuite.nar.splice):
#: streams pay for the pipes, short request/response connections never do.
SPLICE_AFTER = 256 * 1024

Resolver = Callable[[str, int], "defer.Deferred[list[str]]"]


class _Refuse(Exception):
    """Internal: end the request with this reply code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def connect_error_code(failure: Failure | BaseException) -> int:
    """RFC 1928 reply code for a failed outbound connection or resolution."""
    e = failure.value if isinstance(failure, Failure) else failure
    if isinstance(e, _Refuse):
        return e.code
    if isinstance(e, error.ConnectionRefusedError):
        return socks.CONNECTION_REFUSED
    if isinstance(e, (error.TimeoutError, error.TCPTimedOutError, defer.CancelledError,
                      defer.TimeoutError, error.ConnectingCancelledError)):
        return socks.TTL_EXPIRED
    if isinstance(e, error.DNSLookupError):
        return socks.HOST_UNREACHABLE
    if isinstance(e, error.ConnectError):
        code = {errno.ENETUNREACH: socks.NETWORK_UNREACHABLE, errno.ENETDOWN: socks.NETWORK_UNREACHABLE,
                errno.EAFNOSUPPORT: socks.NETWORK_UNREACHABLE,
                errno.EADDRNOTAVAIL: socks.NETWORK_UNREACHABLE,
                errno.EHOSTUNREACH: socks.HOST_UNREACHABLE, errno.EHOSTDOWN: socks.HOST_UNREACHABLE,
                errno.ECONNREFUSED: socks.CONNECTION_REFUSED, errno.ETIMEDOUT: socks.TTL_EXPIRED,
                errno.EACCES: socks.NOT_ALLOWED, errno.EPERM: socks.NOT_ALLOWED}
        return code.get(e.osError, socks.GENERAL_FAILURE)
    return socks.GENERAL_FAILURE


def resolve_with(reactor: Any) -> Resolver:
    """Resolve names with ``reactor.nameResolver`` (getaddrinfo in a thread): IPv4 and IPv6."""

    def resolve(name: str, port: int) -> defer.Deferred[list[str]]:
        d: defer.Deferred[list[str]] = defer.Deferred()
        found: list[str] = []

        @implementer(IResolutionReceiver)
        class Receiver:
            def resolutionBegan(self, resolution: Any) -> None:
                pass

            def addressResolved(self, address: Any) -> None:
                if address.host not in found:
                    found.append(address.host)

            def resolutionComplete(self) -> None:
                if found:
                    d.callback(found)
                else:
                    d.errback(error.DNSLookupError(name))

        reactor.nameResolver.resolveHostName(Receiver(), name, port)
        return d

    return resolve


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _version(host: str) -> int:
    """6 for an IPv6 address, else 4 (a name or anything unparsable counts as IPv4)."""
    ip = _ip(host)
    return ip.version if ip is not None else 4


def _same_ip(a: str, b: str) -> bool:
    x, y = _ip(a), _ip(b)
    if x is None or y is None:
        return a == b
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped:
        y = y.ipv4_mapped
    return x == y


@implementer(IPushProducer)  # of the connection's own writes: see pauseProducing below
class NarConnection:
    """The handle a NAR handler gets for one NAR-MODE connection."""

    def __init__(self, proto: SocksProtocol) -> None:
        # "nar-" marks the owner of the session's leases as volatile (NarSession is never
        # persisted): the store drops what a crashed process left (RoleSpec.volatile_owners)
        self.session_id = SESSION_OWNER_PREFIX + secrets.token_hex(8)
        self.client = proto.client
        self.client_port = proto.client_port
        self.user = proto.user
        self._proto = proto

        self._paused: set[str] = set()  # why reading is paused: "input" (handler), "output"

    def write(self, data: bytes) -> None:
        if self._proto.transport is not None and not self._proto.closed:
            self._proto.transport.write(data)

    def pause(self, why: str = "input") -> None:
        """Stop reading the connection (the handler has enough pending input)."""
        if not self._paused and self._proto.transport is not None and not self._proto.closed:
            self._proto.transport.pauseProducing()
        self._paused.add(why)

    def resume(self, why: str = "input") -> None:
        """Read again once no reason to pause is left."""
        self._paused.discard(why)
        if not self._paused and self._proto.transport is not None and not self._proto.closed:
            self._proto.transport.resumeProducing()

    # IPushProducer of the connection's own writes: replies the client does not read
    # stop us reading its commands (Twisted pauses us when its write buffer is full).
    def pauseProducing(self) -> None:
        self.pause("output")

    def resumeProducing(self) -> None:
        self.resume("output")

    def stopProducing(self) -> None:
        pass

    def close(self) -> None:
        if self._proto.transport is not None:
            self._proto.transport.loseConnection()

    def __repr__(self) -> str:
        return f"<NarConnection {self.session_id} {self.client}:{self.client_port} user={self.user!r}>"


# ------------------------------------------------------------------ the far side

@implementer(IHalfCloseableProtocol)
class _Outbound(Protocol):
    """The connection to the destination (CONNECT) or from the peer (BIND).

    Half-closeable: the peer's FIN is passed on to the client (see
    :meth:`SocksProtocol.readConnectionLost`)."""

    transport: ITCPStreamTransport  # see narsuite.transports

    def __init__(self, socks_proto: SocksProtocol, bind: bool = False) -> None:
        self.socks = socks_proto
        self.bind = bind

    def connectionMade(self) -> None:
        if self.bind:
            self.socks._bind_peer_connected(self)
        else:
            self.socks._connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.socks._from_outbound(data)

    def readConnectionLost(self) -> None:
        self.socks._outbound_eof(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.socks._outbound_lost(self)


class _OutboundFactory(ClientFactory):
    """One CONNECT attempt.  A plain ``connectTCP`` with this factory rather than an
    endpoint: no Deferred chain and no factory start/stop log per connection (the
    CONNECT path is the server's hot path, see docs/bench-socks.md)."""

    noisy = False

    def __init__(self, socks_proto: SocksProtocol) -> None:
        self.socks = socks_proto

    def buildProtocol(self, addr: Any) -> _Outbound:
        return _Outbound(self.socks)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.socks._connect_failed(self, reason)


class _Decisions:
    """``RuleSet.check`` with a bounded cache of decisions that would not be logged.

    Every decision is still logged exactly as :meth:`RuleSet.check` logs it:
    the cache answers only while the decision's log level is filtered out (a
    busy server at the usual ``[log] level``); otherwise the rule set is asked
    again and logs.  Rules are fixed for the life of a factory, so a cached
    answer cannot go stale.
    """

    MAX = 8192

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self.cache: dict[tuple[Any, ...], tuple[bool, Any]] = {}
        self.namespace = getattr(rules.log, "namespace", "")
        self.predicate = getattr(logs, "_predicate", None)

    def _quiet(self, level: Any) -> bool:
        p = self.predicate
        return p is not None and level < p.logLevelForNamespace(self.namespace)

    def check(self, client: str, user: str, command: str, dest: str | None, port: int | None,
              name: str | None = None) -> bool:
        key = (client, user, command, dest, port, name)
        hit = self.cache.get(key)
        if hit is not None and self._quiet(hit[1]):
            return hit[0]
        d = self.rules.check(client, user, command, dest, port, name)
        level = LEVELS[d.rule.log if d.rule is not None and d.rule.log else self.rules.default_level]
        if len(self.cache) >= self.MAX:
            self.cache.clear()
        self.cache[key] = (d.allowed, level)
        return d.allowed


class _BindFactory(ServerFactory):
    def __init__(self, socks_proto: SocksProtocol, expected: list[str] | None) -> None:
        self.socks = socks_proto
        self.expected = expected  # None: anyone (DST.ADDR all zeros)
        self.used = False

    def buildProtocol(self, addr: Any) -> _Outbound | None:
        if self.used or self.socks.closed:
            return None
        if self.expected is not None and not any(_same_ip(addr.host, e) for e in self.expected):
            self.socks.factory.count("bind_unexpected_peer")
            self.socks.factory.events.event(
                "bind_unexpected_peer", "socks bind: refused {peer} (expected {expected}) for {client}",
                     peer=addr.host, expected=self.expected, client=self.socks.client)
            return None
        self.used = True
        return _Outbound(self.socks, bind=True)


#: recvfrom() errors a relay socket ignores: nothing queued, a signal, or the ICMP
#: "port unreachable" of an earlier datagram (an unconnected socket has no one to tell).
_UDP_READ_IGNORE = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED))
#: The largest UDP payload (a relay must not truncate; Twisted's listenUDP default is 8192).
MAX_UDP = 65535


class _RelayPort(udp.Port):
    """A UDP ASSOCIATE relay socket: one datagram per readiness event, straight to the relay.

    Twisted's ``doRead`` loops until ``maxThroughput`` bytes or ``EAGAIN``: it
    ends every event with a ``recvfrom`` that fails (a syscall and a Python
    exception), and an association rarely has a second datagram queued.  When
    it has, the kernel reports the socket ready again (epoll is
    level-triggered).  Everything else (binding, writing, closing) is
    Twisted's ``udp.Port``.
    """

    def doRead(self) -> None:
        try:
            data, addr = self.socket.recvfrom(self.maxPacketSize)
        except OSError as e:
            if e.errno in _UDP_READ_IGNORE:
                return
            raise
        if self.addressFamily == socket.AF_INET6:
            addr = addr[:2]  # as Twisted: (host, port) without flow info and scope id
        try:
            self.protocol.datagramReceived(data, addr)
        except BaseException:
            log.failure("socks udp relay: unhandled error from datagramReceived")


def _listen_relay(reactor: Any, relay: _UdpRelay, interface: str) -> Any:
    """``listenUDP(0, relay, interface, MAX_UDP)`` with a :class:`_RelayPort` on Twisted's POSIX reactors."""
    if isinstance(reactor, PosixReactorBase):
        port = _RelayPort(0, relay, interface, MAX_UDP, reactor)
        port.startListening()
        return port
    return reactor.listenUDP(0, relay, interface=interface, maxPacketSize=MAX_UDP)


class _UdpRelay(DatagramProtocol):
    """One UDP ASSOCIATE: client datagrams (with the SOCKS header) out, replies wrapped back.

    ``datagramReceived`` is the per-datagram path and is written flat: the reply
    direction and the client's IPv4, FRAG-0 datagrams to an allowed destination are
    handled in it with dict lookups only (each Python call costs on this path as much
    as the relay's own work); anything else goes to the general methods below.
    """

    MAX_CACHE = 4096
    #: entries ``_evict`` looks at (second chances) before it forgets the oldest left anyway:
    #: a client keeping all MAX_CACHE destinations busy would otherwise make each new
    #: destination cost a walk of the whole cache (a kernel lookup per offloaded flow) on the
    #: reactor every other client shares
    EVICT_SCAN = 64
    #: The datagram of an (association, IPv4 destination) flow, counted both ways through this
    #: relay, on which the flow is offered to the kernel fast path: a query and its answer (DNS)
    #: or a reply that never comes stays here and never costs a route lookup or a map entry.
    OFFLOAD_AFTER = 4

    def __init__(self, socks_proto: SocksProtocol, client_ip: str, client_port: int) -> None:
        self.socks = socks_proto
        self.f = socks_proto.factory
        self.client_ip = client_ip
        self.client_port = client_port  # 0: learnt from the first datagram
        # destinations the client sent to -> the SOCKS UDP header for their replies
        self.peers: dict[tuple[str, int], bytes] = {}
        self.client_ips: dict[str, bool] = {}  # source address -> is the client's (cache)
        self.decisions: dict[tuple[str, int], bool] = {}
        self.names: dict[str, str] = {}
        self.resolving: dict[str, list[tuple[int, bytes]]] = {}
        self._seconds = socks_proto.factory.reactor.seconds
        self._sendto: Any = None  # the port's socket.sendto (a real port), else transport.write
        self._client_src: tuple[str, int] | None = None  # the client's source, once learnt
        self._client_dest: tuple[str, int] | None = None  # where replies go (its TCP address)
        # raw DST.ADDR+DST.PORT (IPv4) -> destination, for destinations sent to and allowed
        self._allowed_v4: dict[bytes, tuple[str, int]] = {}
        # IPv4 destinations handed to the kernel fast path (narsuite.nar.udpoffload): the
        # flow, or None when it was tried and stays in Python
        self._offloaded: dict[tuple[str, int], Any] = {}
        # IPv4 destinations that may be offloaded, not yet: datagrams seen both ways (oldest
        # first; at most MAX_CACHE, the least recently seen forgotten first)
        self._counting: dict[tuple[str, int], int] = {}
        # offloaded destinations -> the kernel's datagram count when _evict last looked
        self._marks: dict[tuple[str, int], int] = {}

    def stopProtocol(self) -> None:
        self.end_offload()

    def end_offload(self) -> None:
        """Take this association's flows out of the kernel: called before its socket closes
        (a port reused by a later association must never match stale entries)."""
        flows = [f for f in self._offloaded.values() if f is not None]
        self._offloaded.clear()
        self._counting.clear()
        self._marks.clear()
        if flows:
            off = self.f.udp_offload()
            if off is not None:
                off.remove(flows)

    def _forget_offload(self, dest: tuple[str, int]) -> None:
        """A route change took ``dest``'s flow out of the kernel: its next datagram goes through
        ``_out`` again (not the shortcut of ``datagramReceived``), which offers it anew (it was a
        flow already: it does not count up to OFFLOAD_AFTER again)."""
        self._offloaded.pop(dest, None)
        self._marks.pop(dest, None)
        self._allowed_v4.pop(socket.inet_aton(dest[0]) + dest[1].to_bytes(2, "big"), None)
        self._count(dest, self.OFFLOAD_AFTER - 1)

    def _count(self, dest: tuple[str, int], n: int) -> None:
        """Remember ``n`` datagrams of ``dest``'s flow (moved to the newest end), forgetting
        the least recently seen flow when MAX_CACHE are counted (a spray of one-shot
        destinations only ever costs this dict)."""
        counting = self._counting
        if len(counting) >= self.MAX_CACHE and dest not in counting:
            del counting[next(iter(counting))]
        counting[dest] = n

    def _seen(self, dest: tuple[str, int]) -> None:
        """One more datagram of a counted flow passed (either way): its OFFLOAD_AFTER-th offers
        it to the kernel.  Offered, it leaves the count (offloaded, or settled in Python: the
        client's datagrams then take ``datagramReceived``'s shortcut); deferred by the
        kernel's install rate, it counts again from 0 and is offered again later."""
        n = self._counting.pop(dest, 0) + 1
        if n < self.OFFLOAD_AFTER:
            self._count(dest, n)
            return
        self._offload(dest)
        if dest in self._offloaded:
            if len(self._allowed_v4) < self.MAX_CACHE:
                self._allowed_v4[socket.inet_aton(dest[0]) + dest[1].to_bytes(2, "big")] = dest
        else:
            self._count(dest, 0)

    def _offload(self, dest: tuple[str, int]) -> None:
        """``dest``'s flow is a flow (OFFLOAD_AFTER datagrams went through): let the kernel
        relay the rest of it, both ways (when it can; else the flow stays here).  Deferred
        (over the process's install rate): ``dest`` is left out of ``_offloaded``."""
        self._offloaded[dest] = None
        try:
            off = self.f.udp_offload()
            if off is None or self._client_src is None or getattr(self.transport, "socket", None) is None:
                return
            here = self.socks.transport.getHost().host
            if ":" in here or ":" in self._client_src[0]:
                return
            rport = self.transport.getHost().port  # type: ignore[union-attr]  # checked above
            flow = off.install(self.socks, self._client_src, (here, rport), dest,
                               lambda: self._forget_offload(dest))
            if flow is DEFERRED:
                del self._offloaded[dest]
            else:
                self._offloaded[dest] = flow
        except Exception:
            self.f.count("udp_offload_errors")
            log.failure("socks udp: offloading a flow failed")

    def startProtocol(self) -> None:
        sock = getattr(self.transport, "socket", None)
        # A real port: sendto() directly (Twisted's write() re-validates the address
        # with three isIPAddress() calls per datagram; the kernel checks it anyway).
        # Called once the port attached us (or by _send after _out checked the transport).
        assert self.transport is not None
        self._sendto = sock.sendto if sock is not None else self.transport.write

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            self.socks._last = self._seconds()
            if addr == self._client_src:
                # From the client (its source, once learnt).  Fast path: FRAG 0 to an
                # IPv4 destination it sent to before and the rules allow, found by the
                # raw DST.ADDR/DST.PORT bytes in one lookup.
                if len(data) >= 10 and data[2] == 0 and data[3] == 1:
                    dest = self._allowed_v4.get(data[4:10])
                    if dest is not None and not self.socks.closed:
                        counters = self.f.counters
                        counters["udp_datagrams_out"] += 1
                        counters["bytes_up"] += len(data) - 10
                        self._send(data[10:], dest)
                        return
                self._from_client(data)
                return
            header = self.peers.get(addr)
            if header is not None and self._client_dest is not None:
                # A reply from a destination the client sent to: wrapped back.
                counters = self.f.counters
                counters["udp_datagrams_in"] += 1
                counters["bytes_down"] += len(data)
                if self._counting and addr in self._counting:
                    self._seen(addr)  # before the send: the client's answer finds the flow installed
                self._send(header + data, self._client_dest)
                return
            self._other(data, addr)
        except Exception:
            self.f.count("errors")
            log.failure("socks udp relay: unexpected error")

    def _other(self, data: bytes, addr: Any) -> None:
        """A datagram from neither the learnt client source nor a known peer (or before
        the client's port is known): the client's first datagram, or one to drop."""
        ip = addr[0]
        is_client = self.client_ips.get(ip)
        if is_client is None:
            is_client = _same_ip(ip, self.client_ip)
            if len(self.client_ips) < 64:
                self.client_ips[ip] = is_client
        if is_client and self.client_port in (0, addr[1]):
            self.client_port = addr[1]
            self._client_src = (ip, addr[1])
            self._client_dest = (self.client_ip, self.client_port)
            self._from_client(data)
            return
        if self.peers.get((ip, addr[1])) is not None and not self.client_port:
            return  # a reply before the client ever sent from its port: nowhere to send it
        self.f.counters["udp_dropped"] += 1

    def _from_client(self, data: bytes) -> None:
        # Fast path: FRAG 0, IPv4 destination (what the codec would parse, without ipaddress).
        if len(data) >= 10 and data[3] == socks.ATYP_IPV4 and data[2] == 0:
            self._out(socket.inet_ntoa(data[4:8]), int.from_bytes(data[8:10], "big"), data[10:], None)
            return
        try:
            dg = socks.parse_udp(data)
        except socks.SocksError as e:
            self.f.count("udp_malformed")
            log.debug("socks udp: malformed datagram from {client}: {reason}", client=self.client_ip,
                      reason=e.reason)
            return
        if dg.frag != 0:
            self.f.count("udp_fragments_dropped")
            return
        if dg.atyp == socks.ATYP_DOMAIN:
            ip = self.names.get(dg.host)
            if ip is None:
                self._resolve(dg.host, dg.port, dg.data)
                return
            self._out(ip, dg.port, dg.data, dg.host)
        else:
            self._out(dg.host, dg.port, dg.data, None)

    def _resolve(self, name: str, port: int, data: bytes) -> None:
        waiting = self.resolving.get(name)
        if waiting is not None:
            if len(waiting) < 16:
                waiting.append((port, data))
            return
        self.resolving[name] = [(port, data)]

        def done(addrs: list[str]) -> None:
            ip = next((a for a in addrs if (v := _ip(a)) is not None and v.version == self._family()),
                      addrs[0])
            if len(self.names) > self.MAX_CACHE:
                self.names.clear()
            self.names[name] = ip
            for p, d in self.resolving.pop(name, []):
                self._out(ip, p, d, name)

        def failed(f: Failure) -> None:
            self.resolving.pop(name, None)
            self.f.count("udp_dropped")
            log.debug("socks udp: cannot resolve {name}: {e}", name=name, e=f.value)

        self.f.resolve(name, port).addCallbacks(done, failed)

    def _family(self) -> int:
        ip = _ip(self.socks.transport.getHost().host) if self.socks.transport else None
        return ip.version if ip is not None else 4

    def _out(self, ip: str, port: int, data: bytes, name: str | None) -> None:
        if self.socks.closed or self.transport is None:
            return
        key = (ip, port)
        allowed = self.decisions.get(key)
        if allowed is None:
            allowed = self.f.decide.check(self.socks.client, self.socks.user, "udp", ip, port, name)
            if len(self.decisions) > self.MAX_CACHE:
                self.decisions.clear()
                self._allowed_v4.clear()
            self.decisions[key] = allowed
            if not allowed:
                self.f.count("rule_blocks")
        if not allowed:
            self.f.count("udp_dropped")
            return
        peers = self.peers
        again = key in peers
        if again:
            peers[key] = peers.pop(key)  # the newest end: recently sent to
        else:
            if len(peers) >= self.MAX_CACHE:
                self._evict()
            peers[key] = socks.encode_udp(ip, port, b"")
        # a flow the kernel may take: counted here (not given the shortcut) until it is offered
        counting = (key not in self._offloaded and ":" not in ip and self._client_src is not None
                    and len(self._offloaded) < self.MAX_CACHE and self.f.may_offload())
        # the shortcut from the second datagram on (so a one-shot destination never has it, and
        # having it tells _evict the destination was sent to again: see there)
        if again and ":" not in ip and not counting and len(self._allowed_v4) < self.MAX_CACHE:
            self._allowed_v4[socket.inet_aton(ip) + port.to_bytes(2, "big")] = key
        counters = self.f.counters
        counters["udp_datagrams_out"] += 1
        counters["bytes_up"] += len(data)
        if counting:
            self._seen(key)  # before the send: the destination's answer finds the flow installed
        self._send(data, key)

    def _evict(self) -> None:
        """Make room in ``peers`` (full: MAX_CACHE destinations) for a new destination by
        forgetting the least recently used one, and everything kept about it (its rule
        decision, fast-path entry, count, kernel flow), so a client talking to more peers than
        that over one association keeps getting their answers.

        ``peers`` is ordered by the last datagram the client sent through ``_out``; the
        per-datagram shortcuts (``_allowed_v4`` hits, replies) do not reorder it, which keeps them
        as cheap as they were.  So an entry's use there is seen the way the CLOCK algorithm sees a
        reference bit: a destination gets the shortcut on its second datagram (``_out``), and an
        oldest entry that has it gets a second chance -- it loses the shortcut and goes to the
        newest end; if the client sends to it again, that datagram takes ``_out`` (one slow-path
        datagram per cycle of the cache), which moves it to the newest end and gives the shortcut
        back; if not, it is evicted when it is oldest again (approximate LRU: an idle entry that
        had the shortcut lives at most two cycles).  An oldest entry whose flow is in the kernel (the
        relay sees none of its datagrams) is asked of the kernel: if its counters moved since
        the last look it stays (newest end), else it is taken out of the kernel, then evicted.
        Entries that take ``_out`` for every datagram (counted flows, IPv6, names) are already
        in LRU order.  At most EVICT_SCAN entries get a second chance per eviction; then the
        oldest left is forgotten even if it was in use (more busy destinations than the cache
        holds: some of their answers are lost until the client sends to them again)."""
        peers = self.peers
        allowed = self._allowed_v4
        offloaded = self._offloaded
        marks = self._marks
        for _ in range(min(len(peers), self.EVICT_SCAN)):
            dest = next(iter(peers))
            flow = offloaded.get(dest)
            if flow is not None:
                off = self.f.udp_offload()
                seen = off.activity(flow) if off is not None else None
                if seen is not None and marks.get(dest) != seen:
                    marks[dest] = seen
                    peers[dest] = peers.pop(dest)
                    continue
            elif ":" not in dest[0]:
                raw = socket.inet_aton(dest[0]) + dest[1].to_bytes(2, "big")
                if allowed.pop(raw, None) is not None:
                    peers[dest] = peers.pop(dest)
                    continue
            break
        self._forget(next(iter(peers)))

    def _forget(self, dest: tuple[str, int]) -> None:
        """Forget ``dest`` (its flow taken out of the kernel first): its replies are dropped from
        now on, its next datagram from the client is a new destination's."""
        self.f.counters["udp_peers_evicted"] += 1
        del self.peers[dest]
        self.decisions.pop(dest, None)
        self._counting.pop(dest, None)
        self._marks.pop(dest, None)
        flow = self._offloaded.pop(dest, None)
        if ":" not in dest[0]:
            self._allowed_v4.pop(socket.inet_aton(dest[0]) + dest[1].to_bytes(2, "big"), None)
        if flow is not None:
            off = self.f.udp_offload()
            if off is not None:
                off.remove([flow])

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._sendto is None:  # a transport attached without makeConnection (tests)
            self.startProtocol()
        try:
            self._sendto(data, addr)
        except Exception as e:  # wrong family, EMSGSIZE, ...: drop, count, go on
            self.f.count("udp_dropped")
            log.debug("socks udp: cannot send to {addr}: {e}", addr=addr, e=e)


# ------------------------------------------------------------------ the client side

@implementer(IHalfCloseableProtocol)
class SocksProtocol(Protocol):
    """One client connection: frames the SOCKS5 messages, then relays or hands over.

    Half-close (RFC 1928 relays bytes, and "send a request, shut down writing, read
    the answer" clients such as ``ncat``/``nc -N`` depend on it): a FIN from either
    side of a relay is passed on as a FIN to the other (``loseWriteConnection``, after
    what is queued), and the relay closes when both directions have ended.  A FIN
    while a CONNECT/BIND is under way is kept and passed on once the relay starts;
    in any other state it ends the connection.
    """

    factory: SocksFactory
    transport: ITCPStreamTransport  # see narsuite.transports

    def __init__(self) -> None:
        self.state = "methods"
        self.buf = bytearray()
        self.closed = False
        self.client = ""
        self.client_port = 0
        self.user = ""
        self.request: socks.Request | None = None
        self.outbound: _Outbound | None = None
        self._timer: Any = None
        self._what: str | None = None  # the timed phase
        self._deadline = 0.0
        self._pending: defer.Deferred[Any] | None = None
        self._listening: Any = None  # BIND's listening port or UDP ASSOCIATE's port
        self._udp: _UdpRelay | None = None
        self._last = 0.0
        self._idle_limit = 0.0
        self.nar_conn: NarConnection | None = None
        self._paused = False
        self._addrs: list[str] = []  # CONNECT: allowed addresses not tried yet
        self._attempting: _OutboundFactory | None = None
        self._connector: Any = None
        self._eof_up = False  # the client sent FIN
        self._eof_down = False  # the destination / BIND peer sent FIN
        self._relayed = 0  # bytes relayed by the Twisted path (see _start_splice)
        self._splice_ok = False
        self._splice: SpliceRelay | None = None

    # ---------------------------------------------------------------- plumbing

    @property
    def reactor(self) -> Any:
        return self.factory.reactor

    def _set_timer(self, seconds: float | None, what: str) -> None:
        """Enter a timed phase (``what``: negotiation, connect, idle) or none.

        One timer per connection: a later deadline only moves a time, an
        earlier one resets the timer; when it fires early it re-arms for what
        is left (activity in the idle phase only stamps ``_last``)."""
        if seconds is None:
            self._what = None
            return
        self._what = what
        self._deadline = self.reactor.seconds() + seconds
        t = self._timer
        if t is not None and t.active():
            if t.getTime() > self._deadline:
                t.reset(seconds)
        else:
            self._timer = self.reactor.callLater(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        what = self._what
        if self.closed or what is None:
            return
        if what == "idle" and self.nar_conn is not None:
            # NAR session: packets of its mappings through the data plane count as activity
            seen = getattr(self.factory.nar_handler, "last_activity", None)
            if seen is not None:
                self._last = max(self._last, seen(self.nar_conn) or 0.0)
        deadline = self._last + self._idle_limit if what == "idle" else self._deadline
        left = deadline - self.reactor.seconds()
        if left > 0:
            self._timer = self.reactor.callLater(left, self._timed_out)
            return
        self.factory.count(f"timeouts_{what}")
        self.factory.events.event(f"timeout_{what}", "socks {what} timeout: client={client} state={state}", what=what,
                 client=self.client, state=self.state)
        if what == "connect" and self.state in ("pending", "bindwait"):
            if self._pending is not None:
                d, self._pending = self._pending, None
                d.cancel()
            self._stop_connecting()
            self._reply(socks.TTL_EXPIRED)
            return
        self._abort()

    def _touch(self) -> None:
        self._last = self.reactor.seconds()

    def _start_idle(self, seconds: float) -> None:
        self._idle_limit = seconds
        self._touch()
        self._set_timer(seconds, "idle")

    def _abort(self) -> None:
        if self._splice is not None:
            self._splice.stop()  # closes both connections through their transports
            return
        if self.transport is not None:
            self.transport.loseConnection()

    def _reply(self, code: int, host: str = "0.0.0.0", port: int = 0, flags: int = 0) -> None:
        """Send a request reply; any failure code closes the connection (section 6)."""
        if self.closed:
            return
        self.factory.count("reply_" + socks.reply_name(code))
        try:
            data = socks.encode_reply(code, host, port, flags)
        except ValueError:
            data = socks.encode_reply(code)
        write_now(self.transport, data)
        if code != socks.SUCCEEDED:
            self.state = "done"
            self.transport.loseConnection()

    # ---------------------------------------------------------------- events

    #: Counter for a new connection (a connection handed over by a worker counts elsewhere).
    connection_counter = "connections"

    def connectionMade(self) -> None:
        f = self.factory
        f.active += 1
        f.count(self.connection_counter)
        t = self.transport
        if type(t) is LeanServer:  # the peer's (host, port) as accepted, without an address object
            self.client, self.client_port = t.client[0], t.client[1]
        else:
            peer = t.getPeer()
            self.client = getattr(peer, "host", "") or ""
            self.client_port = getattr(peer, "port", 0) or 0
        self._set_timer(f.config.negotiation_timeout, "negotiation")

    def dataReceived(self, data: bytes) -> None:
        st = self.state
        if st == "relay":
            out = self.outbound
            if out is not None and out.transport is not None:
                self.factory.counters["bytes_up"] += len(data)
                self._last = self.reactor.seconds()
                write_now(out.transport, data)
                self._relayed += len(data)
                if self._relayed > SPLICE_AFTER and self._splice_ok:
                    self._start_splice()
            return
        if st == "nar":
            self._last = self.reactor.seconds()
            self._to_nar(data)
            return
        if st in ("done", "udp"):
            if st == "udp":
                self.factory.count("udp_tcp_data_ignored")
            return
        self.buf += data
        try:
            self._process()
        except socks.SocksError as e:
            self._malformed(e)
        except Exception:
            self.factory.count("errors")
            log.failure("socks: unexpected error from {client}", client=self.client)
            self.state = "done"
            self._abort()

    def _malformed(self, e: socks.SocksError) -> None:
        f = self.factory
        f.count("malformed")
        f.events.event("malformed", "socks: malformed {state} from {client}: {why}", state=self.state,
                       client=self.client, why=e.reason)
        state, self.state = self.state, "done"
        if state == "auth":
            self.transport.write(socks.encode_password_reply(False))
            self.transport.loseConnection()
        elif state == "request":
            self.state = "request"
            self._reply(e.code)
        else:  # method selection: no SOCKS5 answer possible
            self.transport.loseConnection()

    def _process(self) -> None:
        while self.buf and not self.closed:
            if self.state == "methods":
                r = socks.parse_method_request(self.buf)
                if r is None:
                    return
                msg, n = r
                del self.buf[:n]
                method = self.factory.select_method(msg.methods)
                write_now(self.transport, socks.encode_method_reply(method))
                if method == socks.METHOD_NO_ACCEPTABLE:
                    self.factory.count("no_acceptable_method")
                    self.factory.events.event(
                        "no_acceptable_method", "socks: no acceptable method from {client} (offered {offered})",
                             client=self.client, offered=list(msg.methods))
                    self.state = "done"
                    self.transport.loseConnection()
                    return
                self.state = "auth" if method == socks.METHOD_PASSWORD else "request"
            elif self.state == "auth":
                r2 = socks.parse_password_request(self.buf)
                if r2 is None:
                    return
                cred, n = r2
                del self.buf[:n]
                self.state = "authwait"
                self.factory.checker.check(cred.username, cred.password).addCallback(
                    self._auth_done, cred.username)
            elif self.state == "request":
                r3 = socks.parse_request(self.buf)
                if r3 is None:
                    return
                req, n = r3
                if req.cmd == self.factory.config.nar.mode_command and self.factory.handoff is not None:
                    # A worker process: NAR-MODE belongs to the main process (narsuite.nar.workers).
                    self.state = "handoff"
                    self.factory.handoff(self)
                    return
                del self.buf[:n]
                self.state = "pending"
                self._set_timer(None, "")
                self._request(req)
            else:  # pending, authwait, bindwait: keep early bytes, bounded
                if len(self.buf) > MAX_EARLY and not self._paused:
                    self._paused = True
                    self.transport.pauseProducing()
                return

    def _auth_done(self, ok: bool, username: bytes) -> None:
        if self.closed:
            return
        name = username.decode("utf-8", "replace")
        if not ok:
            self.factory.count("auth_failures")
            self.factory.events.event(
                "auth_failed", "socks: authentication failed for user {user!r} from {client}", user=name,
                     client=self.client)
            self.state = "done"
            self.transport.write(socks.encode_password_reply(False))
            self.transport.loseConnection()
            return
        self.user = name
        self.transport.write(socks.encode_password_reply(True))
        self.state = "request"
        try:
            self._process()
        except socks.SocksError as e:
            self._malformed(e)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return
        self.closed = True
        self.factory.active -= 1
        self._what = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._pending is not None:
            d, self._pending = self._pending, None
            d.cancel()
        self._stop_connecting()
        if self._udp is not None:
            self._udp.end_offload()  # before the socket closes
        if self._listening is not None:
            port, self._listening = self._listening, None
            port.stopListening()
        if self.outbound is not None and self.outbound.transport is not None:
            lose_now(self.outbound.transport)
        if self.nar_conn is not None:
            try:
                self.factory.nar_handler.nar_closed(self.nar_conn)
            except Exception:
                self.factory.count("errors")
                log.failure("nar handler: nar_closed raised")

    # ---------------------------------------------------------------- requests

    def _request(self, req: socks.Request) -> None:
        self.request = req
        cfg = self.factory.config
        if req.cmd == cfg.nar.mode_command:
            self._nar(req)
        elif req.cmd == socks.CMD_CONNECT:
            self._connect(req)
        elif req.cmd == socks.CMD_BIND:
            self._bind(req)
        elif req.cmd == socks.CMD_UDP_ASSOCIATE:
            self._udp_associate(req)
        else:
            self.factory.events.event(
                "command_not_supported", "socks: command {cmd:#04x} not supported (client {client})", cmd=req.cmd,
                     client=self.client)
            self._reply(socks.COMMAND_NOT_SUPPORTED)

    def _allowed(self, command: str, req: socks.Request) -> defer.Deferred[list[str]]:
        """Resolve DST.ADDR if needed; return the addresses the rules pass (or fail with _Refuse)."""
        f = self.factory
        if req.is_domain:
            d = f.resolve(req.host, req.port)
        else:
            d = defer.succeed([req.host])

        def check(addrs: list[str]) -> list[str]:
            ok = [a for a in addrs if f.decide.check(self.client, self.user, command, a, req.port,
                                                     req.host if req.is_domain else None)]
            if not ok:
                f.count("rule_blocks")
                raise _Refuse(socks.NOT_ALLOWED, "blocked by the rules")
            return ok

        return d.addCallback(check)

    def _fail(self, failure: Failure, what: str) -> None:
        if self.closed:
            return
        if self._pending is None and failure.check(defer.CancelledError, error.ConnectingCancelledError):
            return  # we cancelled it (timeout): the reply is already sent
        self._pending = None
        code = connect_error_code(failure)
        if code == socks.GENERAL_FAILURE and not failure.check(_Refuse, error.ConnectError):
            log.failure("socks {what}: unexpected failure", failure, what=what)
        else:
            self.factory.request_failed(what, self.request.host if self.request else "?",
                                        self.request.port if self.request else 0, self.client, code,
                                        failure.value)
        self._reply(code)

    # CONNECT

    def _connect(self, req: socks.Request) -> None:
        self._set_timer(self.factory.config.connect_timeout, "connect")
        if req.is_domain:
            d = self.factory.resolve(req.host, req.port)
            d.addCallbacks(self._connect_to, self._fail, callbackArgs=(req,), errbackArgs=("connect",))
            self._pending = d
        else:  # an IP literal: no Deferred, no resolver
            self._connect_to([req.host], req)

    def _connect_to(self, addrs: list[str], req: socks.Request) -> None:
        """Check every address with the rules, then try the allowed ones in order."""
        self._pending = None
        if self.closed:
            return
        f = self.factory
        name = req.host if req.is_domain else None
        ok = [a for a in addrs if f.decide.check(self.client, self.user, "connect", a, req.port, name)]
        if not ok:
            f.count("rule_blocks")
            self._fail(Failure(_Refuse(socks.NOT_ALLOWED, "blocked by the rules")), "connect")
            return
        self._addrs = ok
        self._attempt(req.port)

    def _attempt(self, port: int) -> None:
        host = self._addrs.pop(0)
        self._attempting = _OutboundFactory(self)
        # No per-attempt timeout (a DelayedCall set and cancelled per connection): the
        # connect phase's timer, armed in _connect for connect_timeout, bounds every
        # attempt and stops the connector when it fires.  connect_tcp is connectTCP
        # without Twisted's Connector/Client machinery (narsuite.nar.fastio).
        self._connector = connect_tcp(self.reactor, host, port, self._attempting)

    def _connect_failed(self, attempt: _OutboundFactory, reason: Failure) -> None:
        if attempt is not self._attempting or self.closed:
            return  # abandoned (timeout, client gone)
        self._attempting = self._connector = None
        if self._addrs and self.request is not None:
            self._attempt(self.request.port)
            return
        self._fail(reason, "connect")

    def _stop_connecting(self) -> None:
        connector, self._connector, self._attempting = self._connector, None, None
        if connector is not None:
            try:
                connector.stopConnecting()
            except Exception:  # already connected or failed
                pass

    def _connected(self, out: _Outbound) -> None:
        self._attempting = self._connector = None
        if self.closed:
            out.transport.loseConnection()
            return
        self._start_relay(out)
        sock = getattr(out.transport, "socket", None)
        if sock is not None:  # BND.ADDR/PORT straight from the socket, no address object
            host, port = sock.getsockname()[:2]
        else:
            local = out.transport.getHost()
            host, port = local.host, local.port
        self._reply(socks.SUCCEEDED, host, port)
        self._flush_early()

    def _start_relay(self, out: _Outbound) -> None:
        self.outbound = out
        self.state = "relay"
        # Flow control: each side produces for the other; a full write buffer pauses the reader.
        # ClosingProducer: when one side goes, the other closes at once if nothing is queued.
        self.transport.registerProducer(ClosingProducer(out.transport), True)
        out.transport.registerProducer(ClosingProducer(self.transport), True)
        # Bigger reads (Twisted's default is 64 KiB): fewer trips through the loop per byte
        # relayed.  Only the read size: the write buffer limit and flow control are unchanged.
        for tr in (self.transport, out.transport):
            if isinstance(getattr(tr, "bufferSize", None), int):
                tr.bufferSize = RELAY_READ_SIZE
        self._start_idle(self.factory.config.idle_timeout)
        self._splice_ok = SPLICE_AVAILABLE and self.factory.config.splice

    def _flush_early(self) -> None:
        # Resume first: feeding the early bytes may pause the transport again (a NAR
        # handler's back-pressure), and that pause must stand.
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            self.dataReceived(data)
        if self._eof_up and self.state == "relay":  # the FIN came while connecting
            self._eof_up = False
            self.readConnectionLost()

    def _from_outbound(self, data: bytes) -> None:
        if self.closed:
            return
        self.factory.counters["bytes_down"] += len(data)
        self._last = self.reactor.seconds()
        write_now(self.transport, data)
        self._relayed += len(data)
        if self._relayed > SPLICE_AFTER and self._splice_ok:
            self._start_splice()

    def _start_splice(self) -> None:
        """Hand a relay that has carried SPLICE_AFTER bytes to splice(2) (narsuite.nar.splice):
        no copy through Python for the bulk of a stream.  Only between two plain TCP
        transports with nothing queued and no FIN seen; otherwise later, or never."""
        out = self.outbound
        if (out is None or self._eof_up or self._eof_down or self.state != "relay"
                or not (idle_transport(self.transport) and idle_transport(out.transport))):
            if out is None or not (is_plain_tcp(self.transport) and is_plain_tcp(out.transport)):
                self._splice_ok = False
            return
        self._splice_ok = False
        counters = self.factory.counters
        seconds = self.reactor.seconds

        def moved(up: bool, n: int) -> None:
            counters["bytes_up" if up else "bytes_down"] += n
            self._last = seconds()

        try:
            self._splice = SpliceRelay(self.reactor, self.transport, out.transport, moved,
                                       self._splice_ended)
        except OSError as e:  # no pipes left (EMFILE): the Twisted path goes on
            log.debug("socks: splice relay not started for {client}: {e}", client=self.client, e=e)
            self.transport.startReading()
            out.transport.startReading()
            return
        self.factory.count("relays_spliced")

    def _splice_ended(self) -> None:
        self._splice = None

    def readConnectionLost(self) -> None:
        """The client sent FIN (IHalfCloseableProtocol)."""
        if self.closed:
            return
        self._eof_up = True
        if self.state == "relay":
            if self._eof_down:  # both directions ended: no need to pass the FIN first
                self._end_relay()
                return
            out = self.outbound
            if out is not None and out.transport is not None:
                shutdown_write_now(out.transport)
        elif self.state not in ("pending", "bindwait"):
            # Nothing under way that the FIN could be passed on to: the client is done.
            self.state = "done"
            self._abort()

    def writeConnectionLost(self) -> None:
        pass

    def _outbound_eof(self, out: _Outbound) -> None:
        """The destination (or BIND peer) sent FIN: pass it on to the client."""
        if out is not self.outbound or self.closed:
            return
        self._eof_down = True
        if self._eof_up:
            self._end_relay()
            return
        shutdown_write_now(self.transport)

    def _end_relay(self) -> None:
        """Both directions ended: close both connections once what is queued is sent."""
        self.state = "done"
        out = self.outbound
        if out is not None and out.transport is not None:
            close_now(out.transport)
        close_now(self.transport)

    def _outbound_lost(self, out: _Outbound) -> None:
        if out is self.outbound and not self.closed:
            self.state = "done"
            lose_now(self.transport)

    # BIND

    def _bind(self, req: socks.Request) -> None:
        self._set_timer(self.factory.config.connect_timeout, "connect")
        ip = _ip(req.host)
        if ip is not None and ip.is_unspecified:
            if not self.factory.decide.check(self.client, self.user, "bind", None, None):
                self.factory.count("rule_blocks")
                self._reply(socks.NOT_ALLOWED)
                return
            d = defer.succeed(None).addCallback(self._bind_listen)
        else:
            d = self._allowed("bind", req).addCallback(self._bind_listen)
        d.addErrback(self._fail, "bind")
        self._pending = d

    def _bind_listen(self, expected: list[str] | None) -> None:
        self._pending = None
        if self.closed:
            return
        here = self.transport.getHost().host
        toward = expected[0] if expected else here
        v6 = _version(toward) == 6
        port = self.reactor.listenTCP(0, _BindFactory(self, expected), interface="::" if v6 else "0.0.0.0")
        self._listening = port
        self.state = "bindwait"
        self._set_timer(self.factory.config.connect_timeout, "connect")
        addr = source_address(toward, here) if expected else self.factory.external_address(here)
        self._reply(socks.SUCCEEDED, addr, port.getHost().port)

    def _bind_peer_connected(self, out: _Outbound) -> None:
        if self.closed:
            out.transport.loseConnection()
            return
        if self._listening is not None:
            port, self._listening = self._listening, None
            port.stopListening()
        self._set_timer(None, "")
        peer = out.transport.getPeer()
        self._start_relay(out)
        self._reply(socks.SUCCEEDED, peer.host, peer.port)
        self._flush_early()

    # UDP ASSOCIATE

    def _udp_associate(self, req: socks.Request) -> None:
        f = self.factory
        if not f.rules.may_pass(self.client, self.user, "udp"):
            f.count("rule_blocks")
            self._reply(socks.NOT_ALLOWED)
            return
        here = self.transport.getHost().host
        # The client's UDP source: its TCP address; DST.PORT when given (DST.ADDR may be a
        # private address behind a NAT, so only the TCP peer address is trusted).
        relay = _UdpRelay(self, self.client, req.port)
        # Bound to the wildcard address: the kernel then picks the source per destination
        # (towards Y the public address, not the client-facing one); BND.ADDR is where the
        # client reached us.
        wildcard = "::" if _version(here) == 6 else "0.0.0.0"
        try:
            port = _listen_relay(self.reactor, relay, wildcard)
        except Exception as e:
            log.info("socks udp: cannot listen on {here}: {e}", here=here, e=e)
            self._reply(socks.GENERAL_FAILURE)
            return
        self._listening = port
        self._udp = relay
        self.state = "udp"
        self._start_idle(f.config.udp_idle_timeout)
        self._reply(socks.SUCCEEDED, here, port.getHost().port)
        self.buf.clear()

    # NAR-MODE

    def _nar(self, req: socks.Request) -> None:
        f = self.factory
        if not f.config.nar.enabled or f.nar_handler is None:
            f.events.event("nar_disabled", "socks: NAR-MODE from {client} but NAR is disabled",
                           client=self.client)
            self._reply(socks.COMMAND_NOT_SUPPORTED)
            return
        self._set_timer(f.config.connect_timeout, "connect")  # bounds resolution and nar_mode
        d = self._allowed("nar", req)

        def start(_: Any) -> Any:
            self._pending = None
            if self.closed:
                return None
            self.nar_conn = NarConnection(self)
            self.state = "narwait"
            f.count("nar_sessions")
            return defer.maybeDeferred(f.nar_handler.nar_mode, self.nar_conn, req).addCallbacks(
                self._nar_started, self._nar_failed)

        d.addCallback(start)
        d.addErrback(self._fail, "nar")
        self._pending = d

    def _nar_started(self, reply: bytes) -> None:
        if self.closed:
            return
        if not isinstance(reply, (bytes, bytearray)) or len(reply) < 2:
            raise TypeError(f"nar_mode returned {reply!r}; expected the reply bytes")
        self._set_timer(None, "")
        code = reply[1]
        self.factory.count("reply_" + socks.reply_name(code))
        self.transport.write(bytes(reply))
        if code != socks.SUCCEEDED:
            self.state = "done"
            self.transport.loseConnection()
            return
        self.state = "nar"
        if self.nar_conn is not None:
            self.transport.registerProducer(self.nar_conn, True)
        self._nar_liveness()
        self._flush_early()

    def _nar_liveness(self) -> None:
        """A NAR session lives as long as its control connection, so a client that
        vanishes without a FIN (killed, cable pulled, NAT state lost) must be noticed:
        TCP keepalive with ``[nar.nar] keepalive_*`` (and TCP_USER_TIMEOUT, for replies
        it never acknowledges), plus the optional ``session_idle_timeout``."""
        opts = self.factory.config.nar
        sock = getattr(self.transport, "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(opts.keepalive_idle)))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL,
                                max(1, int(opts.keepalive_interval)))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, opts.keepalive_count)
                dead = opts.keepalive_idle + opts.keepalive_interval * opts.keepalive_count
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead * 1000))
            except OSError as e:
                log.warn("nar: cannot enable TCP keepalive for {client}: {e}", client=self.client, e=e)
        if opts.session_idle_timeout > 0:
            self._start_idle(opts.session_idle_timeout)

    def _nar_failed(self, failure: Failure) -> None:
        self.factory.count("errors")
        log.failure("nar handler: nar_mode failed", failure)
        if not self.closed:
            self.state = "pending"
            self._reply(socks.GENERAL_FAILURE)

    def _to_nar(self, data: bytes) -> None:
        try:
            self.factory.nar_handler.nar_data(self.nar_conn, data)
        except Exception:
            self.factory.count("errors")
            log.failure("nar handler: nar_data raised")


class SocksFactory(ServerFactory[SocksProtocol]):
    """Decides for every :class:`SocksProtocol`: methods, auth, rules, resolution, counters.

    ``resolver(name, port) -> Deferred[list[str]]`` and ``checker`` (a
    :class:`PasswordChecker`) may be given for tests; by default names are
    resolved with the reactor's name resolver (a thread) and passwords are
    verified in the reactor's thread pool.
    """

    protocol = SocksProtocol

    def __init__(self, config: NarConfig, store: Any = None, metrics: Any = None, reactor: Any = None,
                 nar_handler: Any = None, *, resolver: Resolver | None = None,
                 checker: PasswordChecker | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.config = config
        self.store = store
        self.reactor = reactor
        self.nar_handler = nar_handler
        for name, hashed in config.users.items():
            try:
                check_hash_format(hashed)
            except ValueError as e:
                raise ConfigError(f"nar.users.{name}", str(e)) from None
        self.methods = tuple(METHOD_CODES[m] for m in config.methods)
        self.checker = checker or PasswordChecker(config.users, reactor)
        self.rules = RuleSet(config.rules, config.decision_log_level)
        self.decide = _Decisions(self.rules)
        self.resolve: Resolver = resolver or resolve_with(reactor)
        self.active = 0
        #: In a worker process: ``handoff(proto)`` passes a NAR-MODE connection (its
        #: socket, the unparsed request in ``proto.buf``, ``proto.user``) to the main process.
        self.handoff: Callable[[SocksProtocol], None] | None = None
        #: In the main process with workers: the workers' counters, to add to ours.
        self.remote_counters: Callable[[], list[dict[str, int]]] | None = None
        #: Client-caused events (malformed input, failed auth, timeouts, refused requests):
        #: the first few of each reason per interval in full, then counts only, so a flood
        #: of bad connections cannot fill the disk (narsuite.logs.Aggregator).
        self.events = Aggregator(log, "socks events", reactor, interval=10.0, first=5)
        self.warnings = Aggregator(log, "socks warnings", reactor, interval=10.0, first=5,
                                   level=LogLevel.warn)
        self.counters: dict[str, int] = dict.fromkeys(
            ["connections", "connections_refused_max", "bytes_up", "bytes_down", "udp_datagrams_out",
             "udp_datagrams_in", "udp_fragments_dropped", "udp_dropped", "udp_malformed",
             "auth_failures", "rule_blocks", "malformed", "no_acceptable_method",
             "timeouts_negotiation", "timeouts_connect", "timeouts_idle", "bind_unexpected_peer",
             "nar_sessions", "udp_peers_evicted", "errors", *OFFLOAD_COUNTERS], 0)
        self._offload: UdpOffload | None | bool = False  # False: not made yet (see udp_offload)
        for code in socks.REPLY_NAMES:
            self.counters["reply_" + socks.reply_name(code)] = 0
        if metrics is not None:
            metrics.watch_counters("nar", "events", "SOCKS5 server events", "event", self.totals)

    def stopFactory(self) -> None:
        self.events.stop()
        self.warnings.stop()
        self.stop_offload()

    def may_offload(self) -> bool:
        """Whether flows are worth counting for the UDP fast path: not "off", not found
        unavailable or stopped (made or not: making it waits for a flow's OFFLOAD_AFTER-th
        datagram)."""
        return self._offload is not None and self.config.udp_offload != "off"

    def udp_offload(self) -> UdpOffload | None:
        """The UDP ASSOCIATE kernel fast path of this process, made on first use (the first
        flow to offload), or None ("off", or the kernel cannot: one log line then)."""
        if self._offload is False:
            cfg = self.config
            self._offload = UdpOffload.create(cfg.udp_offload, self.counters, cfg.udp_offload_max_flows,
                                              self.reactor, installs_per_second=cfg.udp_offload_rate)
        return self._offload if isinstance(self._offload, UdpOffload) else None

    def offload_state(self) -> dict[str, int]:
        """The kernel fast path's current state (:meth:`UdpOffload.state`), {} when it was not made."""
        return self._offload.state() if isinstance(self._offload, UdpOffload) else {}

    def stop_offload(self) -> None:
        off, self._offload = self._offload, None  # stopped: not made again
        if isinstance(off, UdpOffload):
            off.stop()

    def totals(self) -> dict[str, int]:
        """Our counters plus the worker processes' (the same dict when there are none)."""
        remote = self.remote_counters() if self.remote_counters is not None else ()
        if not remote:
            return self.counters
        out = dict(self.counters)
        for c in remote:
            for k, v in c.items():
                out[k] = out.get(k, 0) + v
        return out

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def request_failed(self, what: str, dest: str, port: int, client: str, code: int, why: Any) -> None:
        """A request refused or failed with reply ``code``: an aggregated event, one reason
        per command and code (both CONNECT paths, narsuite.nar.lean's and the protocol's)."""
        self.events.event(f"{what}_{socks.reply_name(code)}", "socks {what} {dest}:{port} for {client}: {code} ({e})",
                          what=what, dest=dest, port=port, client=client, code=socks.reply_name(code), e=why)

    def external_address(self, here: str) -> str:
        """BND.ADDR of a BIND with DST.ADDR 0.0.0.0: the address an unnamed peer reaches us
        on (RFC 1928: the client tells the peer this address).  ``here`` (the address the
        client reached us on) is the last resort only: on a NAR/SOCKS box the two sides
        are usually mutually unroutable."""
        cfg = self.config
        if cfg.external:
            return cfg.external
        if ":" not in here:
            src = default_route_source()
            if src:
                return src
            if cfg.nar.enabled and cfg.nar.lent_address:
                return cfg.nar.lent_address
        return here

    def select_method(self, offered: tuple[int, ...]) -> int:
        """Our first configured method the client offers, else 0xFF."""
        for m in self.methods:
            if m in offered:
                return m
        return socks.METHOD_NO_ACCEPTABLE

    def buildProtocol(self, addr: Any) -> SocksProtocol | None:
        if self.active >= self.config.max_connections:
            self.count("connections_refused_max")
            self.warnings.event("max_connections", "socks: {n} connections open (max_connections); refusing {addr}",
                     n=self.active, addr=getattr(addr, "host", addr))
            return None
        return super().buildProtocol(addr)
