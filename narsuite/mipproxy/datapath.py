"""The data path (draft §5, §6): MN tunnels to the VPN gateway, and back.

No kernel tunnels exist here, so every encapsulation is done in user space with
the struct codec (narsuite.packet.codec), never scapy.  Four flows:

* **MN → VPN gateway** (§5.3, §6.2.1): IP-in-IP (4), GRE (47) or minimal
  encapsulation (55) to MIPP-Pub on raw sockets, or RFC 3519 tunnel data on UDP
  434 (next header 4, 47 or 55).  The §5.3 checks: a supported encapsulation, the
  inner destination one of ``vpn_gateways``, ESP right after the inner header
  (IKE on UDP 500/4500 too: the MN's SA with the gateway is negotiated through
  the same tunnel, Figure 3.a).  We also require the inner source to be a bound
  home address tunnelled from that binding's care-of address (or NAT mapping):
  otherwise anyone could inject into the VPN gateway through us.  Failing
  packets are dropped silently and counted by reason.  The inner packet is
  written to the role's TUN device: the kernel delivers it to the gateway
  (one-box: a local address; two-box: routed to it).
* **HA → VPN gateway** (§5.4, §6.2.2): IP-in-IP (or GRE/minimal) from a
  configured HA to MIPP-Priv; one header is stripped (a §5.7.1 double
  encapsulation keeps its inner one) and the packet for MN-Perm goes to the VPN
  gateway: to ``vpn_gateway_next_hop`` (two-box, layer 2) or into the TUN
  (one-box: the kernel routes it to the esp role's TUN).
* **VPN gateway → MN**: policy rules (priority 900) send ESP and IKE (UDP from
  500/4500) for a bound home address into our TUN (table ``route_table``); each packet read is
  tunnelled to the binding's care-of address, or to its NAT mapping in RFC 3519
  tunnel data with the next header the MN registered (its UDP Tunnel Request's
  Encapsulation field, RFC 3519 3.1.4).
"""

from __future__ import annotations

import socket
import struct
import subprocess
from typing import Any

from twisted.internet import defer

from narsuite.logs import Aggregator, logger
from narsuite.mipproxy.records import BINDING
from narsuite.packet import codec
from narsuite.packet.policyroute import PolicyRoutes, Rule

__all__ = ["DataPath", "UDP_TUNNEL_HEADER"]

log = logger()

#: RFC 3519 tunnel data header in front of an IP-in-IP payload (type 4, next header 4).
UDP_TUNNEL_HEADER = b"\x04\x04\x00\x00"
#: ... next header 47 and a 4-byte GRE header (no checksum, key or sequence; IPv4 inside).
_GRE_PLAIN_IPV4 = b"\x00\x00\x08\x00"
_UDP_GRE_HEADER = b"\x04\x2f\x00\x00" + _GRE_PLAIN_IPV4
#: ... next header 55: a minimal forwarding header and the payload follow (RFC 2004).
_UDP_MINIMAL_HEADER = b"\x04\x37\x00\x00"
_ESP = codec.PROTO_ESP  # a module global, not an attribute lookup per packet
#: the header restored from one with the S bit (codec.minimal_restore: TTL 64, ID 0, TOS 0)
_RESTORED = struct.Struct("!BBHHHBBH4s4s")
#: a header made from another one (codec.minimal_decapsulate_cached): first byte, TOS,
#: total length, ID + flags + TTL as they were, protocol, checksum, addresses
_MIN_HDR = struct.Struct("!BBH5sBH4s4s")
#: how a home address's packets leave (DataPath._route_for): the UDP kinds first
_OUT_UDP_IPIP, _OUT_UDP_GRE, _OUT_UDP_MINIMAL, _OUT_IPIP, _OUT_GRE, _OUT_MINIMAL = range(6)
_IKE_PORTS = (500, 4500)
#: Before the esp role's rules (1000/1001), which keep ESP and IKE to a peer in the main
#: table: for a bound home address those must come to us first (one-box).
_RULE_PRIORITY = 900


class DataPath:
    NAMES = (
        "mn_to_gateway", "ha_to_gateway", "gateway_to_mn", "bytes_mn_to_gateway",
        "bytes_gateway_to_mn", "keepalives",
        # drops (draft §5.3: silently; counted here)
        "drop_bad_encapsulation", "drop_unsupported_encapsulation",
        "drop_inner_dst_not_vpn_gateway", "drop_not_esp", "drop_no_binding",
        "drop_wrong_tunnel_source", "drop_not_from_home_agent", "drop_tun_not_ipsec",
        "drop_send_failed", "other_destination",
    )

    def __init__(self, cfg: Any, store: Any, clock: Any, *, metrics: Any = None,
                 send_udp: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.send_udp = send_udp
        self.pub = socket.inet_aton(cfg.public_address) if cfg.public_address else b""
        self.priv = socket.inet_aton(cfg.private_address) if cfg.private_address else b""
        self.gateways = frozenset(socket.inet_aton(g) for g in cfg.vpn_gateways)
        self.home_agents = frozenset(socket.inet_aton(h) for h in cfg.allowed_home_agents())
        self.next_hop: str | None = cfg.vpn_gateway_next_hop or None
        self.counters = dict.fromkeys(self.NAMES, 0)
        if metrics is not None:
            metrics.watch_counters("mipproxy", "data", "Mobile IP proxy data-path events",
                                   "event", lambda: self.counters)
        self.tun: Any = None
        self.tun_write: Any = None
        self.send_raw: Any = None
        self._raw: list[Any] = []
        self._rules: dict[str, list[Rule]] = {}
        #: ``ip rule`` changes, made with pyroute2 in a worker thread one after another:
        #: they follow bindings from a store callback, on the reactor thread.
        self._policy: PolicyRoutes | None = None
        self._installing: dict[str, defer.Deferred] = {}  # home -> its rules' change, until done
        #: home address (4 bytes) -> its bindings: one dict lookup per packet instead of a
        #: store index walk and an address conversion.  Filled on use (only for addresses
        #: that have bindings, so junk cannot grow it), emptied on every binding change.
        self._by_home: dict[bytes, tuple[Any, ...]] = {}
        #: home address (4 bytes) -> how its packets leave (_route_for), emptied likewise
        self._out: dict[bytes, tuple[int, Any, Any]] = {}
        #: care-of address -> its IP-in-IP header, constant words summed once (per packet:
        #: one pack and a checksum fold, where building and summing a header was a third of
        #: the step); emptied on every binding change
        self._ipip: dict[str, codec.TunnelHeader] = {}
        #: the same for plain GRE (protocol 47) and minimal encapsulation (protocol 55, its
        #: forwarding headers and checksum changes per inner source/destination inside)
        self._gre: dict[str, codec.TunnelHeader] = {}
        self._mintun: dict[str, codec.MinimalTunnel] = {}
        #: protocol 55 from MNs: restored headers' checksum changes by outer addresses and
        #: forwarding header (bounded by the codec)
        self._unminimal_raw: dict[bytes, tuple[int, int, bytes, bytes, int]] = {}
        #: RFC 3519 next header 55: restored headers' sums by forwarding header (bounded by
        #: the codec; its hits read inline), and the tunnel data header + forwarding header
        #: per inner source/destination with the inner protocol it was made for (bounded)
        self._unminimal: dict[bytes, tuple[int, int, bytes, bytes]] = {}
        self._udp_minimal: dict[bytes, tuple[int, bytes]] = {}
        self._droplog = Aggregator(log, "mipproxy data path: dropped", clock=clock)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        from narsuite.packet.rawsock import RawSocketPort
        from narsuite.packet.tun import TunDevice

        cfg = self.cfg
        self.tun = TunDevice(cfg.tun_name.encode(), self.from_tun, mtu=cfg.mtu,
                             reactor=self.clock)
        self.tun.start()
        self.tun_write = self.tun.write
        for proto in (codec.PROTO_IPIP, codec.PROTO_GRE, codec.PROTO_MINIMAL):
            port = RawSocketPort(proto, self.raw_received, reactor=self.clock)
            port.start()
            self._raw.append(port)
        self.send_raw = self._raw[0].send_packet
        self._run(["sysctl", "-qw", f"net.ipv4.conf.{self.tun.ifname}.rp_filter=0"])
        route = ["ip", "route", "replace", "default", "dev", self.tun.ifname, "table",
                 str(cfg.route_table)]
        # one-box: what the local gateway sends an MN leaves from VPNGW-Pub (the TUN has no
        # address of its own for the kernel to pick)
        if self.next_hop is None and cfg.vpn_gateways:
            if not self._run([*route, "src", cfg.vpn_gateways[0]], quiet=True):
                self._run(route)
        else:
            self._run(route)
        self._policy = PolicyRoutes(reactor=self.clock)
        for b in self.store.records(BINDING.name):
            self._route_home(b.home_address)

    def stop(self) -> Any:
        self._droplog.stop()
        rules = [r for home in list(self._rules) for r in self._rules.pop(home)]
        done = self._policy.change(remove=rules) if self._policy is not None and rules else defer.succeed(None)

        def rest(_: object) -> Any:
            self._run(["ip", "route", "flush", "table", str(self.cfg.route_table)])
            for port in self._raw:
                port.stop()
            self._raw = []
            if self.tun is not None:
                d = self.tun.stop()
                self.tun = None
                return d
            return None

        return done.addCallback(rest)

    def _run(self, cmd: list[str], quiet: bool = False) -> bool:
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode and not quiet:
            log.error("mipproxy: {cmd} failed: {err}", cmd=" ".join(cmd), err=out.stderr.strip())
        return out.returncode == 0

    # ------------------------------------------------------------------ routing
    def _route_home(self, home: str) -> None:
        """The gateway's ESP and IKE for ``home`` go into our TUN (table route_table)."""
        if home in self._rules or self.tun is None or self._policy is None:
            return
        to, table = f"{home}/32", self.cfg.route_table
        rules = [Rule(_RULE_PRIORITY, to, table, socket.IPPROTO_ESP)]
        rules += [Rule(_RULE_PRIORITY, to, table, socket.IPPROTO_UDP, p) for p in _IKE_PORTS]
        self._rules[home] = rules
        done = self._policy.change(add=rules)
        self._installing[home] = done

        def installed(result: object) -> object:
            if self._installing.get(home) is done:
                del self._installing[home]
            return result

        done.addBoth(installed)

    def routed(self, home: str) -> defer.Deferred:
        """Fires once ``home``'s policy rules are installed (at once when nothing is pending)."""
        done = self._installing.get(home)
        if done is None:
            return defer.succeed(None)
        ready: defer.Deferred = defer.Deferred()

        def fire(result: object) -> object:
            ready.callback(None)
            return result

        done.addBoth(fire)
        return ready

    def _unroute_home(self, home: str) -> None:
        rules = self._rules.pop(home, [])
        if rules and self._policy is not None:
            self._policy.change(remove=rules)

    def _bindings(self, home: bytes) -> tuple[Any, ...]:
        found = self._by_home.get(home)
        if found is None:
            found = tuple(self.store.lookup_all(BINDING.name, "home", socket.inet_ntoa(home)))
            if found:
                self._by_home[home] = found
        return found

    def store_changed(self, change: Any) -> None:
        if change.kind != BINDING.name:
            return
        home = change.record.home_address
        self._by_home.pop(socket.inet_aton(home), None)
        self._out.clear()  # a care-of address's tunnel header may be another home's too
        self._ipip.clear()
        self._gre.clear()
        self._mintun.clear()
        if change.op == "put":
            self._route_home(home)
        elif not self.store.lookup_all(BINDING.name, "home", home):
            # Decided a turn later: a move deletes the old binding before it puts the new one,
            # and the rules must not be taken down and built again under the MN's traffic.
            self.clock.callLater(0, self._unroute_if_unbound, home)

    def _unroute_if_unbound(self, home: str) -> None:
        if not self.store.lookup_all(BINDING.name, "home", home):
            self._unroute_home(home)

    # ------------------------------------------------------------- per packet
    def _drop(self, reason: str, detail: str) -> None:
        self.counters["drop_" + reason] += 1
        self._droplog.event(reason, "mipproxy data path: dropped ({reason}): {detail}",
                            detail=detail)

    def raw_received(self, packet: bytes, src: str) -> None:
        """IP-in-IP, GRE or minimal encapsulation addressed to this host."""
        dst = packet[16:20]
        if dst == self.pub:
            proto = packet[9]
            if proto == codec.PROTO_IPIP or proto == codec.PROTO_GRE:
                # The common cases inline: codec.ipip_decapsulate's checks of the outer
                # header (IPv4, IHL, total length, not a fragment); _from_mn checks the inner
                # one.  GRE with a checksum, key or sequence goes through the codec.
                hl = (packet[0] & 0x0F) << 2
                tl = (packet[2] << 8) | packet[3]
                if packet[0] >> 4 != 4 or hl < 20 or tl < hl or tl > len(packet) \
                        or (packet[6] & 0x3F) | packet[7]:
                    self._drop("bad_encapsulation", f"from {src}: bad outer header or a fragment")
                    return
                if proto == codec.PROTO_IPIP:
                    self._from_mn(packet[hl:tl], src, None)
                    return
                if packet[hl:hl + 4] == _GRE_PLAIN_IPV4:
                    self._from_mn(packet[hl + 4:tl], src, None)
                    return
            elif proto == codec.PROTO_MINIMAL and len(packet) >= 32 and packet[0] == 0x45:
                # codec.minimal_decapsulate_cached's hit inline (no options, a forwarding
                # header already checked, for this outer source): the header checksum
                # updated by the change remembered for it (RFC 1624), the §5.3 checks of an
                # ESP packet for a gateway read from the remembered header
                tl = (packet[2] << 8) | packet[3]
                mlen = 12 if packet[21] & 0x80 else 8
                hit = self._unminimal_raw.get(packet[12:20 + mlen])
                if hit is not None and 20 + mlen <= tl <= len(packet) \
                        and not (packet[6] & 0x3F) | packet[7]:
                    delta, iproto, isrc, idst, _m = hit
                    inner = _MIN_HDR.pack(0x45, packet[1], tl - mlen, packet[4:9], iproto,
                                          (((packet[10] << 8) | packet[11]) - delta) % 0xFFFF,
                                          isrc, idst) \
                        + packet[20 + mlen:tl]
                    if iproto == codec.PROTO_ESP and idst in self.gateways:
                        self._to_gateway(inner, isrc, src, None)
                    else:
                        self._from_mn(inner, src, None)
                    return
            try:
                if proto == codec.PROTO_MINIMAL:
                    inner = codec.minimal_decapsulate_cached(packet, self._unminimal_raw)
                else:
                    _proto, _key, inner = codec.decapsulate(packet)
            except codec.CodecError as e:
                self._drop("bad_encapsulation", f"from {src}: {e}")
                return
            self._from_mn(inner, src, None)
        elif dst == self.priv:
            self._from_ha(packet, src)
        else:
            self.counters["other_destination"] += 1  # another role's tunnel

    def udp_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """RFC 3519 tunnel data (type 4) on MIPP-Pub:434."""
        nh = data[1] if len(data) > 1 else -1
        try:
            if nh == codec.PROTO_IPIP:
                inner = data[4:]
                codec.peek_ipv4(inner)
            elif nh == codec.PROTO_GRE:
                if data[4:8] == _GRE_PLAIN_IPV4:  # no checksum, key or sequence: nothing to check
                    inner = data[8:]
                else:
                    gre, inner = codec.parse_gre(data[4:])
                    if gre.protocol != codec.ETH_P_IP:
                        raise codec.CodecError("GRE payload is not IPv4")
                codec.peek_ipv4(inner)
            elif nh == codec.PROTO_MINIMAL:
                # the UDP datagram's IP header stands for the outer one (its TTL and ID are
                # not handed to us: the restored packet gets 64 and 0)
                hit = self._unminimal.get(data[4:16])
                if hit is not None:
                    # codec.minimal_restore_cached's hit inline (a header with the S bit,
                    # already checked): the restored header's constant words are summed
                    base, proto, isrc, idst = hit
                    tl = len(data) + 4  # 20 + len(data) - 4 - 12: a UDP payload is < 64 KiB
                    c = (base + tl) % 0xFFFF
                    inner = _RESTORED.pack(0x45, 0, tl, 0, 0, 64, proto, (c or 0xFFFF) ^ 0xFFFF,
                                           isrc, idst) + data[16:]
                    if proto == codec.PROTO_ESP and idst in self.gateways:
                        # _from_mn's checks passed by the header just built
                        self._to_gateway(inner, isrc, addr[0], addr)
                        return
                else:
                    inner = codec.minimal_restore_cached(memoryview(data)[4:], addr[0], self.pub,
                                                         self._unminimal)
            else:
                self._drop("unsupported_encapsulation", f"tunnel data next header {nh} from {addr[0]}")
                return
        except codec.CodecError as e:
            self._drop("bad_encapsulation", f"tunnel data from {addr[0]}: {e}")
            return
        self._from_mn(inner, addr[0], addr)

    def _from_mn(self, inner: bytes, outer_src: str, udp: tuple[str, int] | None) -> None:
        try:
            hl, proto, isrc, idst = codec.peek_ipv4(inner)
        except codec.CodecError as e:
            self._drop("bad_encapsulation", f"inner packet from {outer_src}: {e}")
            return
        if idst not in self.gateways:
            if idst == self.pub and proto == codec.PROTO_ICMP:
                self.counters["keepalives"] += 1  # a NAT keepalive through the tunnel
                return
            self._drop("inner_dst_not_vpn_gateway",
                       f"{socket.inet_ntoa(isrc)} -> {socket.inet_ntoa(idst)} from {outer_src}")
            return
        if proto != codec.PROTO_ESP:
            ike = False
            if proto == codec.PROTO_UDP:
                try:
                    ike = codec.peek_ports(inner)[1] in _IKE_PORTS
                except codec.CodecError:
                    ike = False
            if not ike:
                self._drop("not_esp", f"protocol {proto} from {outer_src}")
                return
        self._to_gateway(inner, isrc, outer_src, udp)

    def _to_gateway(self, inner: bytes, isrc: bytes, outer_src: str,
                    udp: tuple[str, int] | None) -> None:
        """The §5.3-checked inner packet to the gateway if ``isrc`` is bound to where it
        came from."""
        bindings = self._by_home.get(isrc) or self._bindings(isrc)
        for b in bindings:
            if udp is not None:
                if b.encapsulation == "udp" and (b.src_ip, b.src_port) == udp:
                    break
            elif b.src_ip == outer_src and b.encapsulation != "udp":
                break
        else:
            home = socket.inet_ntoa(isrc)
            if bindings:
                self._drop("wrong_tunnel_source", f"{home} tunnelled from {outer_src}")
            else:
                self._drop("no_binding", f"{home} tunnelled from {outer_src}")
            return
        c = self.counters
        c["mn_to_gateway"] += 1
        c["bytes_mn_to_gateway"] += len(inner)
        if self.tun_write(inner) is False:
            c["drop_send_failed"] += 1

    def _from_ha(self, packet: bytes, src: str) -> None:
        if packet[12:16] not in self.home_agents:
            self._drop("not_from_home_agent", f"tunnel to MIPP-Priv from {src}")
            return
        try:
            _proto, _key, inner = codec.decapsulate(packet)
            codec.peek_ipv4(inner)
        except codec.CodecError as e:
            self._drop("bad_encapsulation", f"from home agent {src}: {e}")
            return
        if not self._bindings(inner[16:20]):
            self._drop("no_binding", f"home agent {src} tunnelled a packet for "
                                     f"{socket.inet_ntoa(inner[16:20])}")
            return
        self.counters["ha_to_gateway"] += 1
        if self.next_hop is not None:
            ok = self.send_raw(inner, self.next_hop)
        else:
            ok = self.tun_write(inner)
        if ok is False:
            self.counters["drop_send_failed"] += 1

    def from_tun(self, packet: bytes) -> None:
        """The VPN gateway's ESP (or IKE) for a bound MN: tunnel it to where the MN is."""
        # codec.peek_ipv4's checks inline (a call was a fifth of the step)
        n = len(packet)
        if n >= 20 and packet[0] == 0x45:  # the usual header, no options
            hl = 20
        else:
            b0 = packet[0] if n >= 20 else 0
            hl = (b0 & 0x0F) << 2
            if b0 >> 4 != 4 or hl < 20 or hl > n:
                self._drop("tun_not_ipsec", "not IPv4")
                return
        proto = packet[9]
        dst = packet[16:20]
        if proto != _ESP:
            ok = False
            if proto == codec.PROTO_UDP:
                try:
                    ok = codec.peek_ports(packet)[0] in _IKE_PORTS
                except codec.CodecError:
                    ok = False
            if not ok:
                self._drop("tun_not_ipsec", f"protocol {proto} for {socket.inet_ntoa(dst)}")
                return
        route = self._out.get(dst)
        if route is None:
            bindings = self._bindings(dst)
            if not bindings:
                self._drop("no_binding", f"gateway packet for {socket.inet_ntoa(dst)}")
                return
            route = self._out[dst] = self._route_for(bindings)
        kind, tunnel, addr = route
        try:
            if kind == _OUT_MINIMAL:
                # MinimalTunnel.encapsulate's hit inline for a header without options
                # (checked above): the forwarding header and the checksum's change
                # remembered per inner source/destination/protocol (RFC 1624); a total
                # length over 0xFFFF fails the pack (struct.error)
                mhit = addr.get(packet[12:20])  # addr: the tunnel's cache (_route_for)
                if mhit is not None and mhit[0] == proto and hl == 20 \
                        and not (packet[6] & 0x3F) | packet[7]:
                    _p, _mh, delta, mlen, tail, pack = mhit
                    out = pack(0x45, packet[1], ((packet[2] << 8) | packet[3]) + mlen,
                               packet[4:9], 55, (((packet[10] << 8) | packet[11]) - delta) % 0xFFFF,
                               tail) + packet[20:]
                else:
                    out = tunnel.encapsulate(packet)
            elif kind == _OUT_IPIP:
                out = tunnel.ipip(packet)
            elif kind == _OUT_UDP_IPIP:
                out = UDP_TUNNEL_HEADER + packet
            elif kind == _OUT_GRE:
                out = tunnel.gre(packet)
            elif kind == _OUT_UDP_GRE:
                out = _UDP_GRE_HEADER + packet
            else:
                # RFC 3519 next header 55: the tunnel data header + forwarding header per
                # inner source/destination; per packet codec.minimal_forwarding's checks
                # (fragment, total length) and one copy
                fhit = self._udp_minimal.get(packet[12:20])
                end = (packet[2] << 8) | packet[3]
                if fhit is not None and fhit[0] == proto and not (packet[6] & 0x3F) | packet[7] \
                        and hl <= end <= n:
                    out = fhit[1] + packet[hl:end]
                else:
                    fwd = codec.minimal_forwarding(packet, self.pub)
                    if len(self._udp_minimal) >= codec.MINIMAL_CACHE_SIZE:
                        self._udp_minimal.clear()
                    head = _UDP_MINIMAL_HEADER + fwd[:12 if fwd[1] & 0x80 else 8]
                    self._udp_minimal[packet[12:20]] = (proto, head)
                    out = _UDP_MINIMAL_HEADER + fwd
        except (codec.CodecError, struct.error) as e:
            self._drop("bad_encapsulation", f"for {socket.inet_ntoa(dst)}: {e}")
            return
        ok = self.send_udp(out, addr) if kind <= _OUT_UDP_MINIMAL else self.send_raw(out)
        c = self.counters
        if ok is False:
            c["drop_send_failed"] += 1
            return
        c["gateway_to_mn"] += 1
        c["bytes_gateway_to_mn"] += len(packet)

    def _route_for(self, bindings: tuple[Any, ...]) -> tuple[int, Any, Any]:
        """How packets for a home address leave: (kind, tunnel header, UDP address or the
        minimal tunnel's cache) of its newest binding, kept in ``_out`` until its bindings
        change (per packet one lookup instead of choosing the binding and comparing
        encapsulation names)."""
        b = bindings[0] if len(bindings) == 1 else max(bindings, key=lambda x: x.registered)
        if b.encapsulation == "udp":
            nh = b.udp_next_header
            kind = _OUT_UDP_IPIP if nh == codec.PROTO_IPIP else \
                _OUT_UDP_GRE if nh == codec.PROTO_GRE else _OUT_UDP_MINIMAL
            return kind, None, (b.src_ip, b.src_port)
        coa = socket.inet_aton(b.src_ip)
        if b.encapsulation == "ipip":
            tunnel = self._ipip.get(b.src_ip)
            if tunnel is None:
                tunnel = self._ipip[b.src_ip] = codec.TunnelHeader(self.pub, coa)
            return _OUT_IPIP, tunnel, None
        if b.encapsulation == "gre":
            tunnel = self._gre.get(b.src_ip)
            if tunnel is None:
                tunnel = self._gre[b.src_ip] = codec.TunnelHeader(self.pub, coa,
                                                                  protocol=codec.PROTO_GRE)
            return _OUT_GRE, tunnel, None
        mt = self._mintun.get(b.src_ip)
        if mt is None:
            mt = self._mintun[b.src_ip] = codec.MinimalTunnel(self.pub, coa)
        return _OUT_MINIMAL, mt, mt.cache
