"""NAR data plane: deliver packets sent to Nb by the section 2.6 tuples, forward clients'
end-to-end packets after an anti-spoofing check.

Inbound (Y -> Nb), one raw socket per protocol (1, 50, 51 bound to Nb; 4 and 47
unbound, because the same protocols also carry X's outbound tunnel to Na):

========  =====================================================  ============================
proto     tuple (``nar.mapping`` index)                           found in the packet
========  =====================================================  ============================
1 ICMP    ``icmp``   (Nb, Yb, identifier)                         echo request/reply id
50 ESP    ``ipsec``  (50, SPI, Nb)                                first 4 bytes of the payload
51 AH     ``ipsec``  (51, SPI, Nb)                                bytes 4-7 of the AH header
4 IPIP    ``tunnel`` (Yb, inner dst Xb, Nb)                       inner header
47 GRE    ``tunnel`` (Yb, inner dst Xb, Nb)                       inner header (type 0x0800,
                                                                  no routing; key/seq ignored)
========  =====================================================  ============================

Delivery to Xa (section 2.5):

* end-to-end: the whole packet in IP-in-IP (or GRE if the mapping's ``encap`` is
  "gre"), outer header Na -> Xa (figure "Na->Xa | Yb->Nb | CN->Xb");
* translated: ICMP/ESP get destination Xa (incremental checksums); tunnels get
  their outer header replaced by Na -> Xa (figure "Na->Xa | CN->Xb").

TCP and UDP (section 2.6.1; negotiated with BIND / UDP ASSOCIATE after NAR-MODE) never
reach N's own stack: nftables NAT maps in the role's table take them in prerouting
(:mod:`narsuite.nar.nft`).  Translated mappings are DNATed straight to Xa; end-to-end
ones to :data:`~narsuite.nar.nft.E2E_ADDRESS`, routed into a TUN device this service
owns, where :func:`demux_tun` finds the mapping (index ``tcp`` or ``udp``), the
destination becomes Nb again, and delivery is the usual IP-in-IP/GRE to Xa.

Outbound (X -> Na, IP-in-IP or GRE carrying a packet with source Nb): the inner
packet is forwarded only if the outer source is a client with mappings and the
inner packet matches one of them (same Yb and protocol; ICMP the mapped id;
tunnels the mapped inner source Xb; TCP/UDP the mapped source port P, and for TCP
the mapped Y port if one was given).  Anything else is dropped and counted: N
never forwards a packet with the borrowed source Nb that the client could not
have negotiated.  Accepted TCP/UDP packets get source E2E_ADDRESS and are written
into the TUN, so conntrack restores Nb:P (the reply direction of the DNAT, or the
``snat_out`` map for flows X starts).

The delivery decisions are pure functions (:func:`demux_inbound`,
:func:`deliver_packet`, :func:`check_outbound`); :class:`NarDataPlane` only owns
the sockets and the counters.  No scapy, no records parsed per packet: lookups
are ``dict.get`` on the store's indexes.
"""

from __future__ import annotations

import collections
import socket
import struct
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer

from narsuite.logs import logger
from narsuite.nar import nft
from narsuite.nar.records import MAPPING, SESSION
from narsuite.packet import codec
from narsuite.packet.codec import CodecError
from narsuite.packet.rawsock import RawSocketPort

__all__ = ["NarDataPlane", "demux_inbound", "demux_tun", "demux_icmp_error", "deliver_packet",
           "deliver_icmp_error", "check_outbound", "ICMP_ERRORS",
           "tcpudp_installer", "PROTOCOLS"]

log = logger()

PROTOCOLS = (1, 4, 47, 50, 51)

_I = struct.Struct("!I").unpack_from
_H = struct.Struct("!H").unpack_from
_ntoa = socket.inet_ntoa
_aton = socket.inet_aton
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD


def _ntop6(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, raw)

Lookup = Callable[[str, Any], Any]  # (index name, key) -> mapping or None

#: The running data plane of each store that can install TCP/UDP mappings (the
#: NarHandler finds it here: both are built by the role around the same store).
_INSTALLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: The running data plane of each store (for :func:`last_activity`).
_PLANES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def last_activity(store: Any, session: str, client: str) -> float:
    """When the data plane of ``store`` last carried a packet for ``session`` (delivered
    to its client) or from ``client`` (forwarded), in reactor seconds; 0.0 if never."""
    try:
        plane = _PLANES.get(store)
    except TypeError:
        return 0.0
    if plane is None:
        return 0.0
    return max(plane.activity.get(session, 0.0), plane.client_activity.get(client, 0.0))


def tcpudp_installer(store: Any) -> Any:
    """The data plane installing TCP/UDP mappings for ``store``, or None."""
    try:
        return _INSTALLERS.get(store)
    except TypeError:
        return None


def demux_tun(packet: bytes, nb: str, e2e: bytes, lookup: Lookup) -> tuple[Any, str]:
    """(mapping, "") for a TCP/UDP packet read from the end-to-end TUN, or (None, reason).

    The prerouting DNAT changed only the destination (Nb -> ``e2e``); source and
    ports are Y's, so the 2.6.1 tuple is intact: TCP (Nb, P, Yb, Y port), then
    (Nb, P, Yb, 0) for "any Y port"; UDP (Nb, P).  Reasons: ``malformed``,
    ``not-lent`` (not to ``e2e``), ``tun-other`` (not TCP/UDP, or a non-first
    fragment), ``no-mapping``."""
    try:
        _hl, proto, src, dst = codec.peek_ipv4(packet)
    except CodecError:
        return None, "malformed"
    if dst != e2e:
        return None, "not-lent"
    if proto == 1:
        hl = (packet[0] & 0x0F) << 2
        if len(packet) < hl + 8:
            return None, "malformed"
        if packet[hl] == 8:  # Y's echo request, DNATed by the icmp_in map (end-to-end)
            m = lookup("icmp", (nb, _ntoa(src), _H(packet, hl + 4)[0]))
            return (m, "") if m is not None else (None, "no-mapping")
        if packet[hl] in ICMP_ERRORS:
            # An error about a flow conntrack translates (its quoted source is e2e now)
            return demux_icmp_error(packet, nb, lookup, quoted_src=e2e)
        return None, "tun-other"
    if proto != 6 and proto != 17:
        return None, "tun-other"
    try:
        sport, dport = codec.peek_ports(packet)
    except CodecError:
        return None, "tun-other"
    if proto == 6:
        yb = _ntoa(src)
        m = lookup("tcp", (nb, dport, yb, sport)) or lookup("tcp", (nb, dport, yb, 0))
    else:
        m = lookup("udp", (nb, dport))
    if m is None:
        return None, "no-mapping"
    return m, ""


#: ICMP types that quote the packet they are about: destination unreachable (with
#: fragmentation needed, for path MTU discovery), source quench, time exceeded,
#: parameter problem.
ICMP_ERRORS = frozenset((3, 4, 11, 12))


def demux_icmp_error(packet: bytes, nb: str, lookup: Lookup,
                     quoted_src: bytes | None = None) -> tuple[Any, str]:
    """(mapping, "") for an ICMP error about a packet a client sent from Nb, or (None, reason).

    The quoted header says which flow: its source must be Nb (``quoted_src`` instead when
    conntrack has already rewritten it), its destination is the flow's Yb, and the tuple
    is the flow's own, read from the sender's side: ICMP (Nb, Yb, id of the quoted echo
    request); TCP (Nb, source port, Yb, destination port) or (Nb, port, Yb, 0); UDP (Nb,
    source port); tunnels (Yb, quoted inner source Xb, Nb).  ESP and AH quote the SPI of
    Y's inbound SA, which N does not know: the error goes to the client if exactly one
    client has an ESP (AH) mapping towards that Yb (index ``outflow``), else it is dropped
    as ``icmp-error-ambiguous``.  Reasons: ``malformed``, ``icmp-error-foreign`` (not
    about a packet from Nb), ``no-mapping``, ``icmp-error-ambiguous``."""
    hl = (packet[0] & 0x0F) << 2
    q = hl + 8
    if len(packet) < q + 20 or packet[q] >> 4 != 4:
        return None, "malformed"
    qhl = (packet[q] & 0x0F) << 2
    if qhl < 20 or packet[q + 12:q + 16] != (quoted_src or _aton(nb)):
        return None, "icmp-error-foreign"
    qproto = packet[q + 9]
    yb = _ntoa(packet[q + 16:q + 20])
    body = q + qhl
    have = len(packet) - body
    m = None
    if qproto == 1:
        if have < 8 or packet[body] != 8:
            return None, "icmp-error-foreign"
        m = lookup("icmp", (nb, yb, _H(packet, body + 4)[0]))
    elif qproto == 6 or qproto == 17:
        if have < 4:
            return None, "malformed"
        sport, dport = _H(packet, body)[0], _H(packet, body + 2)[0]
        if qproto == 6:
            m = lookup("tcp", (nb, sport, yb, dport)) or lookup("tcp", (nb, sport, yb, 0))
        else:
            m = lookup("udp", (nb, sport))
    elif qproto == 4 or qproto == 47:
        inner = body + (4 if qproto == 47 else 0)
        if len(packet) >= inner + 16 and packet[inner] >> 4 == 4:
            m = lookup("tunnel", (yb, _ntoa(packet[inner + 12:inner + 16]), nb))
        if m is None:
            m, reason = _only_client(lookup, nb, yb, qproto)
            if m is None:
                return None, reason
    elif qproto == 50 or qproto == 51:
        m, reason = _only_client(lookup, nb, yb, qproto)
        if m is None:
            return None, reason
    if m is None:
        return None, "no-mapping"
    return m, ""


def _only_client(lookup: Lookup, nb: str, yb: str, proto: int) -> tuple[Any, str]:
    ms = lookup("outflow", (nb, yb, proto)) or ()
    if not ms:
        return None, "no-mapping"
    if len({m.client for m in ms}) != 1:
        return None, "icmp-error-ambiguous"
    return ms[0], ""


def deliver_icmp_error(packet: bytes, mapping: Any, na: bytes, xa: bytes,
                       nb: bytes) -> bytes:
    """The ICMP error N sends to Xa about one of its flows: end-to-end, as Y's side sent it
    (about a packet from Nb), tunnelled like the flow; translated, with the outer
    destination and the quoted source Xa, as a NAT would (the flow left X from Xa)."""
    if not mapping.translated:
        if packet[16:20] != nb:
            packet = codec.rewrite_icmp_error(packet, outer_dst=nb, inner_src=nb)
        if mapping.encap == "gre":
            return codec.gre_encapsulate(packet, na, xa)
        return codec.ipip_encapsulate(packet, na, xa)
    return codec.rewrite_icmp_error(packet, outer_dst=xa, inner_src=xa)


def demux_inbound(packet: bytes, nb: str, lookup: Lookup) -> tuple[Any, str]:
    """(mapping, "") for a packet addressed to Nb, or (None, reason) to drop it.

    Reasons: ``malformed``, ``not-lent`` (destination is not Nb), ``icmp-other``
    (not an echo request/reply), ``gre-unsupported`` (routing, version, payload
    type), ``no-mapping``, ``proto-mismatch`` (tunnel tuple negotiated for the
    other tunnel protocol), ``protocol`` (not one of ours).
    """
    try:
        hl, proto, src, dst = codec.peek_ipv4(packet)
    except CodecError:
        return None, "malformed"
    if _ntoa(dst) != nb:
        return None, "not-lent"
    n = len(packet)
    if proto == 50:
        if n < hl + 8:
            return None, "malformed"
        m = lookup("ipsec", (50, _I(packet, hl)[0], nb))
    elif proto == 51:
        if n < hl + 12:
            return None, "malformed"
        m = lookup("ipsec", (51, _I(packet, hl + 4)[0], nb))
    elif proto == 1:
        if n < hl + 8:
            return None, "malformed"
        if packet[hl] in ICMP_ERRORS:
            return demux_icmp_error(packet, nb, lookup)
        if packet[hl] not in (0, 8):
            return None, "icmp-other"
        m = lookup("icmp", (nb, _ntoa(src), _H(packet, hl + 4)[0]))
    elif proto == 4:
        if n < hl + 20 or packet[hl] >> 4 != 4:
            return None, "malformed"
        m = lookup("tunnel", (_ntoa(src), _ntoa(packet[hl + 16 : hl + 20]), nb))
    elif proto == 47:
        try:
            ptype, _key, _seq, inner = codec.gre_decapsulate(packet)
        except CodecError:
            return None, "gre-unsupported"
        if ptype == _ETH_P_IP and len(inner) >= 20:
            m = lookup("tunnel", (_ntoa(src), _ntoa(inner[16:20]), nb))
        elif ptype == _ETH_P_IPV6 and len(inner) >= 40:  # TUNNEL-ASSOCIATE with an IPv6 Xb
            m = lookup("tunnel", (_ntoa(src), _ntop6(inner[24:40]), nb))
        else:
            return None, "gre-unsupported"
    else:
        return None, "protocol"
    if m is None:
        return None, "no-mapping"
    if m.kind == "tunnel" and m.proto != proto:
        return None, "proto-mismatch"
    return m, ""


def deliver_packet(packet: bytes, mapping: Any, na: bytes, xa: bytes) -> bytes:
    """The packet N sends to Xa for ``mapping`` (addresses as 4-byte values)."""
    if not mapping.translated:
        if mapping.encap == "gre":
            return codec.gre_encapsulate(packet, na, xa)
        return codec.ipip_encapsulate(packet, na, xa)
    if mapping.kind == "tunnel":
        # Translated tunnel: the outer header becomes Na -> Xa, the inner packet is untouched.
        return codec.rewrite_ipv4_dst(codec.rewrite_ipv4_src(packet, na), xa)
    return codec.rewrite_ipv4_dst(packet, xa)


def _innermost_src(inner: bytes, hl: int, proto: int) -> bytes | None:
    try:
        if proto == 4:
            return codec.ipip_decapsulate(inner)[12:16]
        ptype, _k, _s, payload = codec.gre_decapsulate(inner)
        if ptype == _ETH_P_IPV6 and len(payload) >= 40:
            return payload[8:24]
        if ptype != _ETH_P_IP or len(payload) < 20:
            return None
        return payload[12:16]
    except CodecError:
        return None


def check_outbound(packet: bytes, nb: str, mappings: Sequence[Any]) -> tuple[bytes | None, str]:
    """(inner packet, "") to forward for a tunnel packet from a client, or (None, reason).

    ``mappings`` are the client's (index ``client`` on the outer source).
    Reasons: ``malformed``, ``no-client`` (the outer source has no mapping),
    ``spoofed-source`` (inner source is not Nb), ``spoofed`` (no mapping matches).
    """
    try:
        _outer, _key, inner = codec.decapsulate(packet)
        hl, proto, src, dst = codec.peek_ipv4(inner)
    except CodecError:
        return None, "malformed"
    if not mappings:
        return None, "no-client"
    if _ntoa(src) != nb:
        return None, "spoofed-source"
    remote = _ntoa(dst)
    icmp_id = -1
    if proto == 1 and len(inner) >= hl + 8 and inner[hl] in (0, 8):
        icmp_id = _H(inner, hl + 4)[0]
    ports: tuple[int, int] | None = None
    if proto == 6 or proto == 17:
        try:
            ports = codec.peek_ports(inner)
        except CodecError:
            ports = None
    inner_src = None
    for m in mappings:
        if m.remote != remote or m.lent != nb:
            continue
        kind = m.kind
        if kind == "ipsec":
            if m.proto == proto:
                return inner, ""
        elif kind == "icmp":
            if proto == 1 and m.icmp_id == icmp_id:
                return inner, ""
        elif kind == "tunnel" and m.proto == proto:
            if inner_src is None:
                inner_src = _innermost_src(inner, hl, proto) or b""
            if inner_src and (_ntoa(inner_src) if len(inner_src) == 4
                              else _ntop6(inner_src)) == m.inner:
                return inner, ""
        elif (kind == "tcp" or kind == "udp") and m.proto == proto and ports is not None:
            # Source port P; TCP also the Y port, if the mapping names one.
            if ports[0] == m.port and (kind == "udp" or not m.remote_port
                                       or ports[1] == m.remote_port):
                return inner, ""
    return None, "spoofed"


class NarDataPlane(service.Service):
    """Raw sockets for 1/4/47/50/51, the TCP/UDP mappings' nftables table and TUN, and
    the delivery decisions above.

    :param options: ``NarOptions``; ``lent_address`` is Nb.
    :param store: the shared store (``nar.mapping`` and ``nar.session`` are read only).
    :param reactor: for the raw ports.
    :param private_address: Na, N's address on X's side, the outer source of what is
        delivered to X and the only destination accepted for X's tunnel.  None: the
        source the routing table picks toward each Xa (looked up once per client),
        and any local address but Nb is accepted as the tunnel destination.
    :param port_factory: ``RawSocketPort`` or a test double with the same signature.
    :param tcpudp: install TCP/UDP mappings (nftables table, TUN, port reservations).
        None (default): only with the real ``RawSocketPort`` -- a data plane built on
        fake ports (unit tests) never touches the host's nftables.  If it cannot start
        (no ``nft``, no TUN) the error is logged and BIND/UDP ASSOCIATE in NAR mode are
        answered "command not supported".
    :param nft_runner, tun_factory, reservations: test doubles (defaults:
        :class:`~narsuite.nar.nft.NftRunner`, a :class:`~narsuite.packet.tun.TunDevice`,
        :class:`~narsuite.nar.nft.PortReservations` on Nb).
    """

    name = "nar-dataplane"

    def __init__(self, options, store, reactor=None, *,
                 private_address: str | None = None,
                 port_factory: Callable[..., Any] = RawSocketPort,
                 tcpudp: bool | None = None,
                 nft_runner: Any = None,
                 tun_factory: Callable[[Callable[[bytes], None]], Any] | None = None,
                 reservations: Any = None,
                 e2e_address: str = nft.E2E_ADDRESS) -> None:
        self.options = options
        self.store = store
        self.reactor = reactor
        self.nb = options.lent_address
        self.nb_b = socket.inet_aton(self.nb)
        self.na = private_address
        self.na_b = socket.inet_aton(private_address) if private_address else None
        self._port_factory = port_factory
        self.ports: dict[int, Any] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self._source_cache: dict[str, bytes] = {}
        for kind in (SESSION, MAPPING):
            store.register(kind)
        self._index = {name: store.index(MAPPING.name, name)
                       for name in ("icmp", "ipsec", "tunnel", "tcp", "udp")}
        # TCP/UDP mappings
        self.tcpudp = (port_factory is RawSocketPort) if tcpudp is None else tcpudp
        self.e2e_address = e2e_address
        self.e2e_b = socket.inet_aton(e2e_address)
        self.nft = nft_runner
        self._tun_factory = tun_factory
        self.reservations = reservations
        self.tun: Any = None
        self.tcpudp_ready = False
        self._installed: dict[str, list[tuple[str, str, str]]] = {}
        self._refs: collections.Counter[tuple[str, str]] = collections.Counter()
        self._unsubscribe: Callable[[], None] | None = None
        #: session id -> when a packet was last delivered for it; client -> last forwarded
        #: (the session idle limit, [nar.nar] session_idle_timeout, reads them)
        self.activity: dict[str, float] = {}
        self.client_activity: dict[str, float] = {}
        self._now: Callable[[], float] = reactor.seconds if reactor is not None else time.time

    # -------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for proto in PROTOCOLS:
            bind = None if proto in (4, 47) else self.nb
            port = self._port_factory(proto, self.packetReceived, bind_address=bind,
                                      reactor=self.reactor)
            port.start()
            self.ports[proto] = port
        if self.tcpudp:
            self._start_tcpudp()
        _PLANES[self.store] = self
        self.running = 1
        log.info("nar data plane: Nb {nb}, Na {na}, raw sockets for {protos}, TCP/UDP mappings "
                 "{tcpudp}", nb=self.nb, na=self.na or "(routed)", protos=sorted(self.ports),
                 tcpudp=f"via table ip {nft.TABLE}, TUN {self.tun.ifname}" if self.tcpudp_ready
                 else "off")

    def _start_tcpudp(self) -> None:
        if self.nft is None:
            self.nft = nft.NftRunner(self.reactor)
        if self.reservations is None:
            self.reservations = nft.PortReservations(self.nb)
        try:
            if self._tun_factory is not None:
                self.tun = self._tun_factory(self._from_tun)
            else:
                from narsuite.packet.tun import TunDevice

                self.tun = TunDevice(b"narnat%d", self._from_tun, mtu=nft.TUN_MTU,
                                     routes=[f"{self.e2e_address}/32"], reactor=self.reactor)
            self.tun.start()
            self.nft.run_sync(nft.table_script(self.tun.ifname))
        except Exception as e:  # no nft, no /dev/net/tun, no CAP_NET_ADMIN
            log.error("nar data plane: TCP/UDP mappings disabled: {e}", e=e)
            self.counters["tcpudp_start_failed"] += 1
            if self.tun is not None:
                self.tun.stop()
                self.tun = None
            return
        self._unsubscribe = self.store.subscribe(self._mapping_changed, kinds=(MAPPING.name,))
        _INSTALLERS[self.store] = self
        self.tcpudp_ready = True

    def stop(self) -> None:
        self.running = 0
        for port in self.ports.values():
            port.stop()
        self.ports.clear()
        if _PLANES.get(self.store) is self:
            del _PLANES[self.store]
        if self.tcpudp_ready:
            self.tcpudp_ready = False
            if _INSTALLERS.get(self.store) is self:
                del _INSTALLERS[self.store]
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            try:
                self.nft.run_sync(nft.delete_table_script())
            except Exception as e:
                log.error("nar data plane: cannot delete table ip {t}: {e}", t=nft.TABLE, e=e)
            self._installed.clear()
            self._refs.clear()
            self.reservations.release_all()
            if self.tun is not None:
                self.tun.stop()
                self.tun = None

    def startService(self) -> None:
        self.start()
        service.Service.startService(self)

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.stop()

    # ------------------------------------------------------- TCP/UDP mapping installer
    def reserve_port(self, proto: int, port: int) -> bool:
        """Hold Nb:P of ``proto`` (6/17) for a mapping; False if N or a mapping uses it."""
        return self.tcpudp_ready and self.reservations.reserve(proto, port)

    def release_port(self, proto: int, port: int) -> None:
        if self.reservations is not None:
            self.reservations.release(proto, port)

    def install_mapping(self, m: Any) -> defer.Deferred:
        """Add the nftables elements of a mapping; fires once they are in the kernel.

        TCP/UDP mappings are installed by the NarHandler before it answers; ICMP, ESP and
        tunnel mappings as the store reports them (:meth:`_mapping_changed`).  Removal
        follows the store: the mapping's delete (close, drop_owner) removes them.
        Elements shared by several mappings (``xlate_out``: one client, one Yb, one
        protocol) are reference-counted: added by the first, deleted with the last."""
        if not self.tcpudp_ready:
            return defer.fail(nft.NftError("TCP/UDP mappings are not available"))
        if m.id in self._installed:
            return defer.succeed(None)
        elements = nft.mapping_elements(m, self.e2e_address)
        self._installed[m.id] = elements
        fresh = []
        for e in elements:
            key = (e[0], e[1])
            if not self._refs[key]:
                fresh.append(e)
            self._refs[key] += 1
        if not fresh:
            return defer.succeed(None)

        def added(_: object) -> None:
            self.counters["tcpudp_installed" if m.kind in ("tcp", "udp") else "nft_installed"] += 1

        def failed(f):
            if self._installed.get(m.id) is elements:
                del self._installed[m.id]
                self._unref(elements)
            return f

        return self.nft.run(nft.elements_script("add", fresh)).addCallbacks(added, failed)

    def _unref(self, elements: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """Drop one reference to each element; those no mapping holds any more."""
        gone = []
        for e in elements:
            key = (e[0], e[1])
            self._refs[key] -= 1
            if self._refs[key] <= 0:
                del self._refs[key]
                gone.append(e)
        return gone

    def _remove_elements(self, m: Any, elements: list[tuple[str, str, str]]) -> defer.Deferred:
        """Delete the mapping's map elements (those no other mapping holds), then the
        conntrack entries of its flows."""
        mid = m.id

        def failed(f):
            self.counters["tcpudp_remove_errors"] += 1
            log.error("nar: cannot remove the nftables elements of {id}: {e}", id=mid,
                      e=f.getErrorMessage())

        def done(_: object) -> None:
            self.counters["tcpudp_removed" if m.kind in ("tcp", "udp") else "nft_removed"] += 1

        def flows_failed(f):
            self.counters["conntrack_errors"] += 1
            log.error("nar: cannot delete the conntrack entries of {id}: {e}", id=mid,
                      e=f.getErrorMessage())

        gone = self._unref(elements)
        d = (self.nft.run(nft.elements_script("delete", gone)).addCallbacks(done, failed)
             if gone else defer.succeed(None))
        for argv in nft.conntrack_commands(m):
            self.nft.conntrack(argv).addErrback(flows_failed)
        return d

    def _mapping_changed(self, change: Any) -> None:
        m = change.record
        if m is None:
            return
        if change.op != "delete":
            if m.kind not in ("tcp", "udp") and self.tcpudp_ready and m.id not in self._installed:
                def failed(f):
                    self.counters["install_errors"] += 1
                    log.error("nar: cannot install the nftables elements of {id}: {e}", id=m.id,
                              e=f.getErrorMessage())
                self.install_mapping(m).addErrback(failed)
            return
        if m.kind in ("tcp", "udp"):
            self.release_port(m.proto, m.port)
        elements = self._installed.pop(m.id, None)
        if elements is not None and self.tcpudp_ready:
            self._remove_elements(m, elements)

    # ----------------------------------------------------------------------- packets
    def _lookup(self, index: str, key: Any) -> Any:
        if index == "outflow":
            return self.store.lookup_all(MAPPING.name, "outflow", key)
        return self._index[index].get(key)

    def packetReceived(self, packet: bytes, src: str) -> None:
        c = self.counters
        c["rx"] += 1
        try:
            _hl, proto, _s, dst = codec.peek_ipv4(packet)
        except CodecError:
            c["drop_malformed"] += 1
            return
        if dst == self.nb_b:
            self._inbound(packet)
        elif proto in (4, 47) and (self.na_b is None or dst == self.na_b):
            self._outbound(packet, src)
        else:
            c["drop_not_for_us"] += 1

    def _inbound(self, packet: bytes) -> None:
        c = self.counters
        m, reason = demux_inbound(packet, self.nb, self._lookup)
        if m is None:
            c["drop_" + reason.replace("-", "_")] += 1
            return
        self._deliver(packet, m)

    def _deliver(self, packet: bytes, m: Any) -> None:
        c = self.counters
        try:
            xa = socket.inet_aton(m.client)
            hl = (packet[0] & 0x0F) << 2
            if packet[9] == 1 and len(packet) > hl and packet[hl] in ICMP_ERRORS:
                out = deliver_icmp_error(packet, m, self._source_for(m.client), xa, self.nb_b)
                c["in_icmp_error"] += 1
            else:
                out = deliver_packet(packet, m, self._source_for(m.client), xa)
        except (CodecError, OSError) as e:
            c["drop_undeliverable"] += 1
            log.debug("nar: cannot deliver for {id}: {e}", id=m.id, e=e)
            return
        if self._send(out):
            c["in_translated" if m.translated else "in_end_to_end"] += 1
            c[f"in_{m.kind}"] += 1
            self._seen(self.activity, m.session)

    def _from_tun(self, packet: bytes) -> None:
        """Y's TCP/UDP packet DNATed to the TUN address: Nb back in, then to X."""
        c = self.counters
        c["rx_tun"] += 1
        m, reason = demux_tun(packet, self.nb, self.e2e_b, self._lookup)
        if m is None:
            c["drop_" + reason.replace("-", "_")] += 1
            return
        try:
            hl = (packet[0] & 0x0F) << 2
            if packet[9] == 1 and packet[hl] in ICMP_ERRORS:
                # conntrack put the TUN address where Nb was, outside and in the quote
                packet = codec.rewrite_icmp_error(packet, outer_dst=self.nb_b, inner_src=self.nb_b)
            else:
                packet = codec.rewrite_ipv4_dst(packet, self.nb_b)
        except CodecError:
            c["drop_malformed"] += 1
            return
        self._deliver(packet, m)

    def _outbound(self, packet: bytes, src: str) -> None:
        c = self.counters
        inner, reason = check_outbound(packet, self.nb,
                                       self.store.lookup_all(MAPPING.name, "client", src))
        if inner is None:
            c["drop_" + reason.replace("-", "_")] += 1
            if reason.startswith("spoofed"):
                log.debug("nar: dropped a {reason} packet from {src}", reason=reason, src=src)
            return
        self._seen(self.client_activity, src)
        if inner[9] == 6 or inner[9] == 17:
            # Through the TUN, so that conntrack puts Nb:P back (see the module docstring).
            if self.tun is None or not self.tun.write(codec.rewrite_ipv4_src(inner, self.e2e_b)):
                c["tx_errors"] += 1
                return
            c["out_forwarded"] += 1
            c["out_tcpudp"] += 1
            return
        if self._send(inner):
            c["out_forwarded"] += 1

    def _seen(self, table: dict[str, float], key: str) -> None:
        if len(table) > 65536 and key not in table:
            table.clear()  # bounded; a cleared entry only makes a session look idle sooner
        table[key] = self._now()

    def _send(self, packet: bytes) -> bool:
        port = self.ports.get(1) or next(iter(self.ports.values()), None)
        if port is None or not port.send_packet(packet):
            self.counters["tx_errors"] += 1
            return False
        self.counters["tx"] += 1
        return True

    def _source_for(self, xa: str) -> bytes:
        if self.na_b is not None:
            return self.na_b
        na = self._source_cache.get(xa)
        if na is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.connect((xa, 9))  # no packet is sent: this asks the routing table
                na = socket.inet_aton(s.getsockname()[0])
            finally:
                s.close()
            self._source_cache[xa] = na
        return na

    def counters_dict(self) -> dict[str, int]:
        return dict(self.counters)
