"""The esp data plane's controller: SAs in, packets through.

Protocols frame bytes and call in here; this module decides.  Its state is a
cache of the store: crypto contexts per SA (built when an ``esp.sa`` record
appears, dropped when it goes), a receive view per peer (dropped whenever its
``esp.peer`` record changes) and per-peer timing for keepalives.  The routing
facts — which peer owns which inner address, which G_i port stands for which
remote host — are read from the store's indexes on every packet.

Inbound (UDP 4500, raw ESP, UDP 500 behind the 004 marker):
  SPI -> InboundSA.decapsulate (replay, ICV, padding) -> peer address learnt
  from the authenticated packet -> tunnel: decapsulation NAT procedure
  (002 §3.1.1: space / address / napt) -> TUN;  transport: IP header rebuilt,
  checksum policy (002 §3.1.2) -> TUN (the local stack).
Outbound (TUN):
  inner destination -> peer (assigned address, G_i NAPT state, allowed space,
  transport peer address) -> OutboundSA.encapsulate -> the peer's current
  address and port, in its encapsulation.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.python.failure import Failure

from narsuite import sadb
from narsuite.esp import transform
from narsuite.esp.records import NAPT, PEER, SA_KIND, NaptEntry, Peer, PeerActivity
from narsuite.logs import logger
from narsuite.packet import codec
from narsuite.packet.markers import KEEPALIVE
from narsuite.store import Change, Store

__all__ = ["EspEngine"]

log = logger()

#: how often (seconds) at most a peer's ESP activity is written to the store
ACTIVITY_EVERY = 5.0



@attrs.define
class _PeerState:
    """Per-peer timing, in this process only."""

    last_tx: float = 0.0
    last_rx: float = 0.0
    sas: int = 0
    gone_at: float | None = None  # when its last SA went (keepalive linger)
    keepalives_sent: int = 0
    keepalives_rx: int = 0
    reported_rx: float = 0.0  # the last_rx last written to the store (esp.activity)


class _RxView:
    """What the receive path needs of one peer, derived once from its store record.

    The per-packet path reads these slots instead of the attrs record (a store
    lookup, properties, string compares per packet).  The engine drops a view
    whenever the peer's record changes, so it is never staler than the store.
    """

    __slots__ = ("peer", "addr", "encap", "tunnel", "policy", "inner", "allowed", "state")

    def __init__(self, peer: Peer, state: _PeerState) -> None:
        self.peer = peer
        self.addr = (peer.remote_ip, peer.remote_port)
        self.encap = peer.encap
        self.tunnel = peer.mode == "tunnel"
        self.policy = peer.policy
        self.inner = peer.inner_bytes
        self.allowed = tuple(_net(n) for n in peer.allowed)
        self.state = state


class Counters:
    """Named counters mirrored into Prometheus (``narsuite_esp_<name>_total``)."""

    NAMES = (
        "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "keepalives_rx", "keepalives_tx",
        "unknown_spi", "truncated", "replayed", "auth_failed", "bad_padding", "bad_inner",
        "policy_drop", "no_route", "napt_exhausted", "send_failed", "rekey_needed",
        "seq_exhausted", "transport_conflict", "tunnel_conflict", "bad_next_header",
    )

    def __init__(self, metrics: Any = None) -> None:
        self.values = dict.fromkeys(self.NAMES, 0)
        if metrics is not None:
            metrics.watch_counters("esp", "events", "ESP data-plane events", "event",
                                   lambda: self.values)

    def inc(self, name: str, n: int = 1) -> None:
        self.values[name] += n


def _activity_failed(f: Failure, peer: str) -> None:
    log.failure("esp: recording the activity of {peer}", f, peer=peer)


class EspEngine:
    """Decides what happens to every ESP and every inner packet."""

    def __init__(self, store: Store, clock: Any, *, napt_address: str = "",
                 napt_ports: tuple[int, int] = (20000, 59999), napt_timeout: float = 300.0,
                 keepalive_interval: float = 20.0, keepalive_linger: float = 300.0,
                 metrics: Any = None) -> None:
        self.store = store
        self.clock = clock
        self.counters = Counters(metrics)
        self.napt_ip = socket.inet_aton(napt_address) if napt_address else None
        self.napt_ports = napt_ports
        self.napt_timeout = napt_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_linger = keepalive_linger
        self._inbound: dict[int, tuple[transform.InboundSA, str]] = {}
        self._outbound: dict[str, transform.OutboundSA] = {}
        self._state: dict[str, _PeerState] = {}
        self._rx: dict[str, _RxView] = {}  # peer name -> receive view (dropped on any change)
        self._rekey_signalled: set[int] = set()
        self._exhausted_signalled: set[int] = set()
        self._peers_by_inner = store.index(PEER.name, "inner")
        self._napt = store.index(NAPT.name, "inside")
        # Output paths, set by the service: TUN writer and the senders per encapsulation.
        self.tun_write: Callable[[bytes], bool] = lambda packet: False
        self.senders: dict[str, Callable[[bytes, str, int], bool]] = {}
        self.on_rekey: Callable[[str, int, bool], None] = lambda peer, spi, exhausted: None
        self._unsubscribe = store.subscribe(self._changed, kinds=[SA_KIND.name, PEER.name])
        for sa in store.records(SA_KIND.name):
            self._install(sa)

    def close(self) -> None:
        self._unsubscribe()

    # ----------------------------------------------------------------- SAs
    def _changed(self, change: Change) -> None:
        if change.kind == PEER.name:
            self._rx.pop(change.record.name, None)
            return
        if change.kind == SA_KIND.name:
            if change.op == "delete":
                self._uninstall(change.record)
            else:
                if change.old is not None:
                    self._uninstall(change.old)
                self._install(change.record)

    def _install(self, sa: Any) -> None:
        integ = sa.integ or None
        state = self.peer_state(sa.peer)
        if sa.direction == "in":
            self._inbound[sa.spi] = (
                transform.InboundSA(sa.spi, sa.enc, sa.enc_key, integ, sa.integ_key, esn=sa.esn,
                                    replay_window=sa.replay_window),
                sa.peer,
            )
        else:
            self._outbound[sa.peer] = transform.OutboundSA(sa.spi, sa.enc, sa.enc_key, integ,
                                                           sa.integ_key, esn=sa.esn, initial_seq=sa.seq_start)
        state.sas += 1
        state.gone_at = None
        if not state.last_tx:
            state.last_tx = self.clock.seconds()  # M counts from the SA's birth

    def _uninstall(self, sa: Any) -> None:
        if sa.direction == "in":
            self._inbound.pop(sa.spi, None)
        else:
            current = self._outbound.get(sa.peer)
            if current is not None and current.spi == sa.spi:
                del self._outbound[sa.peer]
        state = self._state.get(sa.peer)
        if state is not None:
            state.sas = max(0, state.sas - 1)
            if state.sas == 0:
                state.gone_at = self.clock.seconds()

    def inbound_sa(self, spi: int) -> transform.InboundSA | None:
        entry = self._inbound.get(spi)
        return None if entry is None else entry[0]

    def outbound_sa(self, peer: str) -> transform.OutboundSA | None:
        return self._outbound.get(peer)

    def peer_state(self, peer: str) -> _PeerState:
        state = self._state.get(peer)  # no new object per packet: only the first time
        if state is None:
            state = self._state[peer] = _PeerState()
        return state

    # -------------------------------------------------------------- inbound
    def keepalive_received(self, addr: tuple[str, int]) -> None:
        self.counters.inc("keepalives_rx")
        for peer in self.store.lookup_all(PEER.name, "remote_ip", addr[0]):
            if peer.remote_port == addr[1]:
                self.peer_state(peer.name).keepalives_rx += 1

    def esp_received(self, data: bytes, addr: tuple[str, int], encap: str = "udp") -> None:
        """One ESP packet (starting at the SPI) from ``addr`` over ``encap``.

        On UDP 4500 the one-byte NAT-keepalive arrives here too (it is shorter than any
        ESP header).  This is the per-packet path: one dict lookup for the SA, the
        transform, one for the peer's receive view, then the inner checks and the TUN.
        """
        values = self.counters.values
        if len(data) < 8:
            if data == KEEPALIVE and encap == "udp":
                self.keepalive_received(addr)
            else:
                values["truncated"] += 1
            return
        entry = self._inbound.get(int.from_bytes(data[:4], "big"))
        if entry is None:
            values["unknown_spi"] += 1
            return
        sa, peer_name = entry
        try:
            next_header, payload = sa.decapsulate(data)
        except transform.ESPError as e:
            values[_DROP_REASON.get(type(e), "truncated")] += 1
            return
        values["rx_packets"] += 1
        values["rx_bytes"] += len(data)
        view = self._rx.get(peer_name)
        if view is None:
            view = self._rx_view(peer_name)
            if view is None:
                values["no_route"] += 1
                return
        view.state.last_rx = self.clock.seconds()
        if addr != view.addr or encap != view.encap:
            # Only authenticated packets move a peer (RFC 3947 §7, 002 §4): the NAT
            # rebound its mapping, or the peer floated to another encapsulation.
            peer = view.peer
            if peer.mode == "transport" and addr[0] != peer.remote_ip and \
                    self.transport_conflict(peer, addr[0]) is not None:
                values["transport_conflict"] += 1
                return
            view = self._rx[peer_name] = _RxView(self._learn(peer, addr, encap), view.state)
        if next_header == 4:
            if not view.tunnel:
                values["bad_next_header"] += 1
                return
            self._tunnel_in(view, payload)
        elif next_header == 59:  # dummy packet (RFC 4303 §2.6): drop silently
            return
        elif not view.tunnel and next_header in (1, 6, 17):
            self._transport_in(view.peer, next_header, payload)
        else:
            values["bad_next_header"] += 1

    def _rx_view(self, peer_name: str) -> _RxView | None:
        peer = self.store.get(PEER.name, peer_name)
        if peer is None:
            return None
        view = self._rx[peer_name] = _RxView(peer, self.peer_state(peer_name))
        return view

    def transport_conflict(self, peer: Peer, remote_ip: str) -> Peer | None:
        """002 §5.2: another transport peer behind the same address whose selector overlaps."""
        return sadb.transport_conflict(self.store, peer, remote_ip)

    def _learn(self, peer: Peer, addr: tuple[str, int], encap: str) -> Peer:
        new = attrs.evolve(peer, remote_ip=addr[0], remote_port=addr[1], encap=encap)
        self._rx.pop(peer.name, None)
        log.info("esp: peer {peer} now at {ip}:{port} ({encap})", peer=peer.name, ip=addr[0],
                 port=addr[1], encap=encap)
        self.store.update(PEER.name, peer.name, remote_ip=addr[0], remote_port=addr[1],
                          encap=encap).addErrback(
            lambda f: log.failure("esp: recording the address of {peer}", f, peer=peer.name))
        return new

    def _tunnel_in(self, view: _RxView, inner: bytes) -> None:
        values = self.counters.values
        # Structure only: the policy below reads the source address.  The header checksum
        # is not summed here — the kernel checks it on the TUN's input and drops (and
        # counts, IpInHdrErrors) a bad one; the packet was authenticated by the SA anyway.
        if len(inner) < 20 or inner[0] & 0xF0 != 0x40 or inner[0] & 0x0F < 5:
            values["bad_inner"] += 1
            return
        policy = view.policy
        if policy == "address":
            if inner[12:16] != view.inner:
                values["policy_drop"] += 1
                return
        elif policy == "space":
            if not _in_parsed(int.from_bytes(inner[12:16], "big"), view.allowed):
                values["policy_drop"] += 1
                return
        else:  # napt: 001 Appendix A, internal presence behind G_i
            translated = self._napt_out(view.peer, inner)
            if translated is None:
                return
            inner = translated
        self.tun_write(inner)

    def _napt_out(self, peer: Peer, inner: bytes) -> bytes | None:
        """Translate a remote host's inner packet to G_i and a port of ours."""
        c = self.counters
        napt_ip = self.napt_ip
        if napt_ip is None:  # a napt peer from the store (config refuses only static ones) and no G_i
            c.inc("policy_drop")
            return None
        proto = inner[9]
        hl = (inner[0] & 0x0F) << 2
        try:
            if proto in (6, 17):
                sport = struct.unpack_from("!H", inner, hl)[0]
            elif proto == 1 and len(inner) >= hl + 8 and inner[hl] == 8:
                sport = struct.unpack_from("!H", inner, hl + 4)[0]
            else:
                c.inc("policy_drop")
                return None
        except struct.error:
            c.inc("bad_inner")
            return None
        src_ip = socket.inet_ntoa(inner[12:16])
        entry = self._napt.get((peer.name, proto, src_ip, sport))
        if entry is None:
            port = self._napt_allocate(proto)
            if port is None:
                c.inc("napt_exhausted")
                return None
            entry = NaptEntry(proto, port, peer.name, src_ip, sport)
            self.store.insert(entry, ttl=self.napt_timeout, owner=f"esp:peer:{peer.name}").addErrback(
                lambda f: log.failure("esp: NAPT entry", f))
        else:
            self.store.touch(NAPT.name, (proto, entry.port), self.napt_timeout)
        try:
            return codec.napt_rewrite(inner, napt_ip, entry.port, source=True)
        except codec.CodecError:
            c.inc("bad_inner")
            return None

    def _napt_allocate(self, proto: int) -> int | None:
        """A free G_i port (or ICMP identifier), random within the configured range."""
        low, high = self.napt_ports
        span = high - low + 1
        start = secrets.randbelow(span)
        for i in range(span):
            port = low + (start + i) % span
            if self.store.get(NAPT.name, (proto, port)) is None:
                return port
        return None

    def _transport_in(self, peer: Peer, proto: int, segment: bytes) -> None:
        """Rebuild the IP header around a transport-mode payload for the local stack."""
        src = socket.inet_aton(peer.remote_ip)
        dst = socket.inet_aton(peer.local_ip)
        fixed = _fix_transport_checksum(peer, proto, segment, src, dst)
        if fixed is None:
            self.counters.inc("bad_inner")
            return
        packet = codec.build_ipv4(src=src, dst=dst, protocol=proto, ttl=64, payload=fixed)
        self.tun_write(packet)

    # ------------------------------------------------------------- outbound
    def packet_from_tun(self, packet: bytes) -> None:
        """A packet the kernel routed into the TUN device: find its SA, encrypt, send."""
        c = self.counters
        if len(packet) < 20:
            c.inc("bad_inner")
            return
        dst = packet[16:20]
        peer = self._peers_by_inner.get(dst)
        if peer is None:
            if self.napt_ip is not None and dst == self.napt_ip:
                packet, peer = self._napt_in(packet)
            else:
                peer = self._by_space_or_transport(packet, dst)
            if peer is None:
                c.inc("no_route")
                return
        if peer.mode == "transport":
            hl = (packet[0] & 0x0F) << 2
            self.send_esp(peer, packet[hl:], packet[9])
        else:
            self.send_esp(peer, packet, 4)

    def _napt_in(self, packet: bytes) -> tuple[bytes, Peer | None]:
        proto = packet[9]
        hl = (packet[0] & 0x0F) << 2
        try:
            if proto in (6, 17):
                port = struct.unpack_from("!H", packet, hl + 2)[0]
            elif proto == 1 and len(packet) >= hl + 8 and packet[hl] == 0:
                port = struct.unpack_from("!H", packet, hl + 4)[0]
            else:
                return packet, None
        except struct.error:
            return packet, None
        entry = self.store.get(NAPT.name, (proto, port))
        if entry is None:
            return packet, None
        peer = self.store.get(PEER.name, entry.peer)
        if peer is None:
            return packet, None
        self.store.touch(NAPT.name, (proto, port), self.napt_timeout)
        try:
            return codec.napt_rewrite(packet, socket.inet_aton(entry.inner_ip), entry.inner_port,
                                      source=False), peer
        except codec.CodecError:
            return packet, None

    def _by_space_or_transport(self, packet: bytes, dst: bytes) -> Peer | None:
        dst_ip = socket.inet_ntoa(dst)
        for peer in self.store.lookup_all(PEER.name, "remote_ip", dst_ip):
            if peer.mode == "transport" and _selector_matches(peer, packet):
                return peer
        for peer in self.store.records(PEER.name):
            if peer.mode == "tunnel" and peer.policy == "space" and _in_networks(dst, peer.allowed):
                return peer
        return None

    def send_esp(self, peer: Peer, payload: bytes, next_header: int) -> bool:
        c = self.counters
        sa = self._outbound.get(peer.name)
        if sa is None or not peer.remote_ip:
            c.inc("no_route")
            return False
        try:
            esp = sa.encapsulate(payload, next_header)
        except transform.SequenceExhausted:
            c.inc("seq_exhausted")
            if sa.spi not in self._exhausted_signalled:
                self._exhausted_signalled.add(sa.spi)
                self.on_rekey(peer.name, sa.spi, True)
            return False
        if sa.needs_rekey and sa.spi not in self._rekey_signalled:
            self._rekey_signalled.add(sa.spi)
            c.inc("rekey_needed")
            self.on_rekey(peer.name, sa.spi, False)
        sender = self.senders.get(peer.encap)
        if sender is None or not sender(esp, peer.remote_ip, peer.remote_port):
            c.inc("send_failed")
            return False
        c.inc("tx_packets")
        c.inc("tx_bytes", len(esp))
        self.peer_state(peer.name).last_tx = self.clock.seconds()
        return True

    # ------------------------------------------------------------- keepalive
    def report_activity(self) -> None:
        """Tell the store which peers sent authenticated ESP lately (``esp.activity``): the
        ike role counts it as liveness for DPD.  At most every ``ACTIVITY_EVERY`` seconds per
        peer, so the packet path only stamps a float."""
        for name, state in list(self._state.items()):
            if state.last_rx and state.last_rx - state.reported_rx >= ACTIVITY_EVERY and state.sas:
                state.reported_rx = state.last_rx
                self.store.put(PeerActivity(name, state.last_rx), owner=f"esp:peer:{name}").addErrback(
                    _activity_failed, name)

    def keepalive_tick(self) -> None:
        """Send 0xFF to peers that need keepalives and heard nothing from us for M seconds.

        002 §4: while SAs exist, and for N minutes after; never used for liveness.
        Authenticated ESP is, and is reported here too (:meth:`report_activity`).
        """
        now = self.clock.seconds()
        self.report_activity()
        send = self.senders.get("keepalive")
        if send is None:
            return
        for peer in self.store.records(PEER.name):
            if not peer.keepalive or peer.encap != "udp" or not peer.remote_ip:
                continue
            state = self.peer_state(peer.name)
            if state.sas == 0 and (state.gone_at is None or now - state.gone_at > self.keepalive_linger):
                continue
            if now - state.last_tx >= self.keepalive_interval:
                if send(KEEPALIVE, peer.remote_ip, peer.remote_port):
                    state.last_tx = now
                    state.keepalives_sent += 1
                    self.counters.inc("keepalives_tx")


#: Counter for each way decapsulation refuses a packet (anything else: "truncated").
_DROP_REASON = {
    transform.Replayed: "replayed",
    transform.AuthenticationFailed: "auth_failed",
    transform.BadPadding: "bad_padding",
    transform.BadNextHeader: "bad_next_header",
}


def _in_networks(addr: bytes, networks: tuple[str, ...]) -> bool:
    return _in_parsed(int.from_bytes(addr, "big"), map(_net, networks))


def _in_parsed(addr: int, networks: Iterable[tuple[int, int]]) -> bool:
    """Is ``addr`` in one of the (network, mask) pairs (``_net``'s form)?"""
    return any(addr & mask == network for network, mask in networks)


_NETS: dict[str, tuple[int, int]] = {}


def _net(text: str) -> tuple[int, int]:
    n = _NETS.get(text)
    if n is None:
        net = ipaddress.IPv4Network(text, strict=False)
        n = _NETS[text] = (int(net.network_address), int(net.netmask))
    return n


def _selector_matches(peer: Peer, packet: bytes) -> bool:
    if peer.selector_proto and packet[9] != peer.selector_proto:
        return False
    if peer.selector_port and packet[9] in (6, 17):
        hl = (packet[0] & 0x0F) << 2
        if len(packet) < hl + 2 or struct.unpack_from("!H", packet, hl)[0] != peer.selector_port:
            return False
    return True


def _fix_transport_checksum(peer: Peer, proto: int, segment: bytes, src: bytes,
                            dst: bytes) -> bytes | None:
    """002 §3.1.2: make a NATed transport segment's checksum right for its new addresses."""
    if proto not in (6, 17):
        return segment
    at = 16 if proto == 6 else 6
    if len(segment) < at + 2:
        return None
    old = struct.unpack_from("!H", segment, at)[0]
    if proto == 17 and old == 0:
        return segment
    policy = peer.checksum
    if policy == "zero" and proto == 17:
        return segment[:6] + b"\x00\x00" + segment[8:]
    if policy == "incremental" and peer.nat_oa_remote:
        c = codec.checksum_update32(old, socket.inet_aton(peer.nat_oa_remote), src)
        c = codec.checksum_update32(c, socket.inet_aton(peer.nat_oa_local or peer.local_ip), dst)
    else:
        zeroed = segment[:at] + b"\x00\x00" + segment[at + 2:]
        c = codec.transport_checksum(src, dst, proto, zeroed)
    if proto == 17 and c == 0:
        c = 0xFFFF
    return segment[:at] + struct.pack("!H", c) + segment[at + 2:]
