"""IPv4 routes over rtnetlink without pyroute2: the netlink requests made per peer or per flow.

The esp role routes each new tunnel peer's inner address into its TUN, one route per
IKE negotiation.  Through pyroute2 that request cost about 0.28 ms of CPU (its message
classes, and an asyncio loop run per call), a sixth of an IKEv2 exchange's responder CPU;
the same RTM_NEWROUTE built with ``struct`` and answered on a plain netlink socket costs
a few microseconds plus the kernel's own work.  Everything else (links, addresses, rules)
stays with pyroute2: it happens at start-up, not per peer.

The nar role's UDP offload asks the kernel's route to each new flow's ends (what
``ip route get ADDR`` asks): through pyroute2 that cost 426 us per address, on the reactor
thread; :func:`route_get_request` / :func:`parse_route` and :meth:`RouteSocket.get` do it
on the same plain socket (see bench/bench_route_get.py for the figures).

:func:`route_request` and :func:`parse_ack` are pure codecs; :class:`RouteSocket` sends a
request and waits for its acknowledgement (the kernel handles a route change inside the
``send`` call, so the answer is already queued when ``recv`` runs).  A refused request
raises :class:`NetlinkError`, an ``OSError`` whose ``code`` is the errno, as pyroute2's
does (``ENODEV`` tells a caller its cached interface index is stale).
"""

from __future__ import annotations

import errno as _errno
import os
import socket
import struct

import attrs

__all__ = ["NetlinkError", "RouteSocket", "route_request", "parse_ack", "RTM_NEWROUTE", "RTM_DELROUTE",
           "RTM_GETROUTE", "GotRoute", "route_get_request", "parse_route"]

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_F_LOOKUP_TABLE = 0x1000
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
RTA_DST = 1
RTA_OIF = 4
RTA_PREFSRC = 7
RTA_METRICS = 8
RTAX_MTU = 2

_NLMSGHDR = struct.Struct("=IHHII")   # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTA_DST4 = struct.Struct("=HH4s")    # rtattr len 8, RTA_DST, the address
_RTA_U32 = struct.Struct("=HHI")      # rtattr len 8, type, a u32
_RTA = struct.Struct("=HH")           # rtattr: length (header included), type


#: what RTM_GETROUTE answers for an address without a route
_NO_ROUTE = frozenset((_errno.ENETUNREACH, _errno.EHOSTUNREACH, _errno.EACCES, _errno.EINVAL))


class NetlinkError(OSError):
    """The kernel refused a netlink request; ``code`` is the errno (pyroute2's attribute name)."""

    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}" if what else os.strerror(code))
        self.code = code


def route_request(msg_type: int, seq: int, dst: str, oif: int) -> bytes:
    """An RTM_NEWROUTE (create or replace) or RTM_DELROUTE for the IPv4 prefix ``dst``
    ("10.1.0.0/24") through interface ``oif``, main table, ``proto static``, scope global
    -- what ``ip route replace DST dev IF`` and pyroute2's ``route("replace", ...)`` send."""
    address, _, plen = dst.partition("/")
    prefixlen = int(plen) if plen else 32
    if not 0 <= prefixlen <= 32:
        raise ValueError(f"bad IPv4 prefix length in {dst!r}")
    flags = NLM_F_REQUEST | NLM_F_ACK
    if msg_type == RTM_NEWROUTE:
        flags |= NLM_F_CREATE | NLM_F_REPLACE
    body = (_RTMSG.pack(socket.AF_INET, prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE,
                        RTN_UNICAST, 0)
            + _RTA_DST4.pack(8, RTA_DST, socket.inet_aton(address)) + _RTA_U32.pack(8, RTA_OIF, oif))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def parse_ack(data: bytes, seq: int) -> int | None:
    """The errno (0: success) of the acknowledgement for ``seq`` among the netlink messages
    in ``data``; None when they hold no acknowledgement for it."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size:
            break
        if msg_type == NLMSG_ERROR and msg_seq == seq and length >= _NLMSGHDR.size + 4:
            (error,) = struct.unpack_from("=i", data, pos + _NLMSGHDR.size)
            return -error
        pos += (length + 3) & ~3
    return None


@attrs.frozen
class GotRoute:
    """The kernel's answer to RTM_GETROUTE for one IPv4 address (``ip route get``): the route
    type (RTN_UNICAST 1, RTN_LOCAL 2, ...), the output interface, the source address it picks
    (None when the route names none) and the route's MTU metric (0: none; the interface's
    MTU then applies)."""

    type: int
    oif: int | None
    prefsrc: str | None
    mtu: int


def route_get_request(seq: int, dst: str) -> bytes:
    """An RTM_GETROUTE for the IPv4 address ``dst`` as ``ip route get DST`` sends it: an output
    route lookup (no input interface) with RTM_F_LOOKUP_TABLE (the answer's table is the one
    the lookup used)."""
    body = (_RTMSG.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, RTM_F_LOOKUP_TABLE)
            + _RTA_DST4.pack(8, RTA_DST, socket.inet_aton(dst)))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def _attrs(data: bytes, pos: int, end: int) -> dict[int, bytes]:
    """The rtattrs between ``pos`` and ``end`` by type (the nested flag bits cleared)."""
    found: dict[int, bytes] = {}
    while pos + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, pos)
        if length < _RTA.size or pos + length > end:
            break
        found[kind & 0x3FFF] = data[pos + _RTA.size:pos + length]
        pos += (length + 3) & ~3
    return found


def parse_route(data: bytes, seq: int) -> GotRoute | None | int:
    """The answer for ``seq`` among the netlink messages in ``data``: a :class:`GotRoute`, or
    the errno of a refusal (ENETUNREACH: no route), or None when ``data`` holds no answer
    for it."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            break
        if msg_seq == seq:
            if msg_type == NLMSG_ERROR and length >= _NLMSGHDR.size + 4:
                (error,) = struct.unpack_from("=i", data, pos + _NLMSGHDR.size)
                return -error
            if msg_type == RTM_NEWROUTE and length >= _NLMSGHDR.size + _RTMSG.size:
                start = pos + _NLMSGHDR.size
                family, *_, rtype, _rflags = _RTMSG.unpack_from(data, start)
                found = _attrs(data, start + _RTMSG.size, pos + length)
                oif = found.get(RTA_OIF)
                src = found.get(RTA_PREFSRC)
                mtu = 0
                metrics = found.get(RTA_METRICS)
                if metrics is not None:
                    m = _attrs(metrics, 0, len(metrics)).get(RTAX_MTU)
                    if m is not None and len(m) >= 4:
                        (mtu,) = struct.unpack_from("=I", m)
                return GotRoute(rtype,
                                struct.unpack_from("=I", oif)[0] if oif is not None and len(oif) >= 4 else None,
                                socket.inet_ntoa(src) if src is not None and len(src) == 4 else None, mtu)
        pos += (length + 3) & ~3
    return None


class RouteSocket:
    """One NETLINK_ROUTE socket for route requests, opened on first use; synchronous."""

    def __init__(self, timeout: float = 2.0) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self.timeout = timeout

    def _socket(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
            s.bind((0, 0))
            s.settimeout(self.timeout)
            self._sock = s
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, msg_type: int, dst: str, oif: int) -> None:
        """Send one route request and wait for its acknowledgement; NetlinkError if refused."""
        s = self._socket()
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        s.send(route_request(msg_type, seq, dst, oif))
        while True:
            try:
                data = s.recv(65536)
            except TimeoutError:
                raise NetlinkError(_errno.ETIMEDOUT, f"route {dst}: no acknowledgement") from None
            code = parse_ack(data, seq)
            if code is not None:
                if code:
                    raise NetlinkError(code, f"route {dst}")
                return

    def get(self, dst: str) -> GotRoute | None:
        """The kernel's route to the IPv4 address ``dst`` (``ip route get``); None when it has
        none (unreachable, prohibited, no default route).  Other refusals raise NetlinkError."""
        s = self._socket()
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        s.send(route_get_request(seq, dst))
        while True:
            try:
                data = s.recv(65536)
            except TimeoutError:
                raise NetlinkError(_errno.ETIMEDOUT, f"route get {dst}: no answer") from None
            got = parse_route(data, seq)
            if got is None:
                continue  # an answer to an earlier request that timed out
            if isinstance(got, int):
                if got == 0:
                    continue  # an acknowledgement (not asked for): the answer follows
                if got in _NO_ROUTE:
                    return None
                raise NetlinkError(got, f"route get {dst}")
            return got

    def replace(self, dst: str, oif: int) -> None:
        self.request(RTM_NEWROUTE, dst, oif)

    def delete(self, dst: str, oif: int) -> None:
        self.request(RTM_DELROUTE, dst, oif)
