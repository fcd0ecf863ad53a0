"""The esp role's service: ports, TUN device, timers, static SAs.

It owns lifecycles only; every decision is the engine's.  Port 4500 is the
process's shared UDP socket (the ike role claims the non-ESP-marked part of
it); raw ESP (protocol 50) and the 004 draft's ESP on UDP 500 are optional.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from narsuite import sadb
from narsuite.esp.config import EspConfig, PeerConfig, hexbytes
from narsuite.esp.engine import EspEngine
from narsuite.esp.records import PEER, SA, SA_KIND, Peer, RekeyRequest
from narsuite.logs import logger
from narsuite.packet.markers import NON_IKE_MARKER, is_draft_esp, is_esp_or_keepalive
from narsuite.packet.policyroute import MAIN_TABLE, PolicyRoutes, Rule

if TYPE_CHECKING:
    from narsuite.packet.rawsock import RawSocketPort
    from narsuite.packet.tun import TunDevice
    from narsuite.packet.udp import SharedUDPPort

__all__ = ["EspService"]

log = logger()

_IPPROTO_ESP = 50


class EspService(service.Service):
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.cfg: EspConfig = ctx.role_config
        self.store = ctx.store
        self.clock = ctx.reactor
        cfg = self.cfg
        self.engine = EspEngine(
            ctx.store, ctx.reactor, napt_address=cfg.napt_address,
            napt_ports=(cfg.napt_ports[0], cfg.napt_ports[1]), napt_timeout=cfg.napt_timeout,
            keepalive_interval=cfg.keepalive_interval, keepalive_linger=cfg.keepalive_linger,
            metrics=ctx.metrics,
        )
        self.engine.on_rekey = self._rekey_needed
        ctx.namespace.update(service=self, engine=self.engine)
        self.udp = ctx.udp_port(cfg.port, cfg.listen)
        self.udp.zero_checksum = True
        self.udp.add_handler("esp", is_esp_or_keepalive, self.engine.esp_received)
        self.draft: SharedUDPPort | None = None
        if cfg.draft_port:
            self.draft = ctx.udp_port(cfg.draft_port, cfg.listen)
            self.draft.add_handler("esp-draft", is_draft_esp, self._draft_received, min_length=9)
        self.raw: RawSocketPort | None = None
        self.tun: TunDevice | None = None
        self._keepalive = LoopingCall(self.engine.keepalive_tick)
        self._keepalive.clock = ctx.reactor
        self._routes: set[str] = set()
        self._transport_routes: dict[str, list[Rule]] = {}
        self.policy_routes = PolicyRoutes(ctx.reactor)
        self._unsubscribe = None
        send_udp = lambda data, ip, port: self.udp.write(data, (ip, port))  # noqa: E731
        self.engine.senders = {"udp": send_udp, "keepalive": send_udp}
        draft = self.draft
        if draft is not None:
            self.engine.senders["udp500"] = lambda data, ip, port: draft.write(
                NON_IKE_MARKER + data, (ip, port))

    # -------------------------------------------------------------- framing
    def _draft_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.engine.esp_received(data[8:], addr, "udp500")

    def _raw_received(self, packet: bytes, src: str) -> None:
        hl = (packet[0] & 0x0F) << 2
        self.engine.esp_received(packet[hl:], (src, 0), "esp")

    # ------------------------------------------------------------ lifecycle
    def startService(self) -> None:
        super().startService()
        from narsuite.packet.tun import TunDevice

        cfg = self.cfg
        self.tun = tun = TunDevice(cfg.tun_name.encode(), self.engine.packet_from_tun,
                                   addresses=[cfg.tun_address] if cfg.tun_address else [],
                                   mtu=cfg.mtu, routes=[], reactor=self.clock)
        tun.start()
        self.engine.tun_write = tun.write
        if cfg.raw_esp:
            from narsuite.packet.rawsock import IPPROTO_ESP, RawSocketPort

            self.raw = raw = RawSocketPort(IPPROTO_ESP, self._raw_received,
                                           bind_address=cfg.listen or None, reactor=self.clock)
            raw.start()
            self.engine.senders["esp"] = lambda data, ip, port: raw.send(data, ip)
        if cfg.napt_address:
            self._route(f"{cfg.napt_address}/32")
        self._unsubscribe = self.store.subscribe(self._peer_changed, kinds=[PEER.name, SA_KIND.name])
        for peer in self.store.records(PEER.name):
            self._route_peer(peer)
        d = defer.gatherResults([self._install_static(p) for p in cfg.peers], consumeErrors=True)
        d.addErrback(lambda f: log.failure("esp: installing static peers failed", f))
        self._keepalive.start(min(1.0, cfg.keepalive_interval / 4), now=False)
        log.info("esp: UDP {port}, raw ESP {raw}, draft port {draft}, TUN {tun}, {n} static peers",
                 port=cfg.port, raw=cfg.raw_esp, draft=cfg.draft_port or "off",
                 tun=tun.ifname, n=len(cfg.peers))

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._keepalive.running:
            self._keepalive.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.engine.close()
        waits: list[defer.Deferred[Any]] = [self._unroute_transport()]
        if self.raw is not None:
            waits.append(defer.maybeDeferred(self.raw.stop))
        if self.tun is not None:
            waits.append(defer.maybeDeferred(self.tun.stop))
        return defer.gatherResults(waits)

    # --------------------------------------------------------- static peers
    @defer.inlineCallbacks
    def _install_static(self, pc: PeerConfig):
        owner = f"esp:peer:{pc.name}"
        existing = self.store.get(PEER.name, pc.name)
        inner = pc.address
        if pc.mode == "tunnel" and pc.policy == "address" and pc.pool:
            prefer = ipaddress.IPv4Address(pc.address) if pc.address else None
            ttl = self.cfg.lease_time or None
            leased = yield self.store.lease_address(pc.pool, owner, ttl=ttl, prefer=prefer)
            if pc.address and str(leased) != pc.address:
                raise ValueError(f"esp.peers {pc.name}: {pc.address} is not free in pool {pc.pool}")
            inner = str(leased)
        remote_ip = pc.remote_ip or (existing.remote_ip if existing else "")
        remote_port = pc.remote_port(self.cfg.port) if pc.remote else (
            existing.remote_port if existing else self.cfg.port)
        keepalive = pc.keepalive == "on" or (pc.keepalive == "auto" and pc.behind_nat)
        peer = Peer(
            name=pc.name, mode=pc.mode, encap=pc.encap, remote_ip=remote_ip, remote_port=remote_port,
            policy=pc.policy, inner=inner if pc.mode == "tunnel" else "", pool=pc.pool,
            allowed=tuple(str(n) for n in pc.allowed), keepalive=keepalive,
            local_ip=pc.local_address, nat_oa_remote=pc.nat_oa_remote, nat_oa_local=pc.nat_oa_local,
            checksum=pc.checksum, selector_proto=pc.selector_proto, selector_port=pc.selector_port,
        )
        self._check_conflict(peer)
        yield self.store.put(peer, owner=f"esp:static:{pc.name}")
        integ = None if pc.integ == "none" else pc.integ
        window = self.cfg.replay_window
        for direction, spi in (("in", pc.spi_in), ("out", pc.spi_out)):
            sa = SA(spi=spi, direction=direction, peer=pc.name, enc=pc.enc, integ=integ,
                    enc_key=hexbytes(getattr(pc, f"enc_key_{direction}")),
                    integ_key=hexbytes(getattr(pc, f"integ_key_{direction}")),
                    esn=pc.esn, replay_window=window)
            if direction == "in" and self.store.holds("spi", spi) != owner:
                # (after a restart the lease is still ours on disk; esp.sa never is)
                yield self.store.claim("spi", spi, owner)
            yield self.store.put(sa, owner=owner)

    def _check_conflict(self, peer: Peer) -> None:
        """002 §5: a static peer may not sit beside a peer already in the store (one the
        ike role negotiated, another node's, a persisted one) that would take its traffic."""
        other = sadb.conflict(self.store, peer)
        if other is None:
            return
        if peer.mode == "transport":
            self.engine.counters.inc("transport_conflict")
            raise ValueError(
                f"esp: transport peer {peer.name!r} refused: its traffic selector overlaps "
                f"{other.name!r}, behind the same NAT address {peer.remote_ip} (002 §5.2)")
        self.engine.counters.inc("tunnel_conflict")
        raise ValueError(
            f"esp: tunnel peer {peer.name!r} refused: its inner addresses overlap those of "
            f"{other.name!r} (002 §5.1)")

    # ------------------------------------------------------------- routing
    def _route(self, network: str) -> None:
        if network in self._routes or self.tun is None:
            return
        self._routes.add(network)
        try:
            self.tun.add_route(network)
        except Exception:
            log.failure("esp: route {net} via {tun}", net=network, tun=self.tun.ifname)

    def _transport_rules(self, peer: Peer, nets: list[str] | None = None) -> list[Rule]:
        """Policy routing that sends our traffic for a transport peer into the TUN.

        The peer's selector (protocol, our port) to its address goes to a table
        whose default route is the TUN; our own UDP-encapsulated ESP and IKE to
        the same address stay in the main table (checked first).
        """
        to = f"{peer.remote_ip}/32"
        keep = [Rule(1000, to, MAIN_TABLE, socket.IPPROTO_UDP, port) for port in sorted({self.cfg.port, 500})]
        keep.append(Rule(1000, to, MAIN_TABLE, _IPPROTO_ESP))
        table = self.cfg.transport_table
        if nets is not None:
            return [*keep, *(Rule(1001, str(ipaddress.IPv4Network(n, strict=False)), table) for n in nets)]
        sport = peer.selector_port if peer.selector_proto in (6, 17) else 0
        return [*keep, Rule(1001, to, table, peer.selector_proto, sport)]

    def _route_transport(self, peer: Peer, nets: list[str] | None = None) -> None:
        """Install the peer's rules through pyroute2 in a worker thread (this runs in a
        store callback); the peer's previous rules go first."""
        tun = self.tun
        if not peer.remote_ip or tun is None or tun.ifname is None:  # the TUN is not up yet
            return
        old = self._transport_routes.get(peer.name)
        rules = self._transport_rules(peer, nets)
        if old == rules:
            return
        default = None if self._transport_routes else (self.cfg.transport_table, tun.ifname)
        self._transport_routes[peer.name] = rules
        self.policy_routes.change(remove=old or [], add=rules, default_route=default)

    def _unroute_transport(self) -> defer.Deferred:
        rules = [r for rs in self._transport_routes.values() for r in rs]
        self._transport_routes.clear()
        return self.policy_routes.change(remove=rules)

    def _route_peer(self, peer: Peer) -> None:
        if peer.mode == "transport":
            self._route_transport(peer)
            return
        if peer.mode != "tunnel":
            return
        nets = self._tunnel_networks(peer)
        if peer.remote_ip and any(ipaddress.IPv4Address(peer.remote_ip) in ipaddress.IPv4Network(n)
                                  for n in nets):
            # a tunnel that covers the peer's own address (a host without NAT protecting
            # itself): policy routing keeps our ESP and IKE to it out of the TUN that
            # carries everything else for it
            self._route_transport(peer, nets)
            return
        for net in nets:
            self._route(net)

    def _tunnel_networks(self, peer: Peer) -> list[str]:
        """What the TUN carries towards a tunnel peer: its pool (which covers its inner
        address), else its inner address and, with policy space, its allowed networks."""
        if peer.pool:
            pool = self.store.pools().get(peer.pool)
            if pool is not None:
                return [str(pool.network)]
        nets = []
        if peer.inner:
            nets.append(f"{peer.inner}/32")
        if peer.policy == "space":
            nets += [str(ipaddress.IPv4Network(n, strict=False)) for n in peer.allowed]
        return nets

    def _peer_changed(self, change: Any) -> None:
        if change.kind == PEER.name and change.op == "put":
            self._route_peer(change.record)
        elif change.kind == SA_KIND.name and change.op == "delete":
            peer = change.record.peer
            if not self.store.lookup_all(SA_KIND.name, "peer", peer):
                # The peer's last SA went: its pool address, NAPT state and SPI
                # leases go back (001 Appendix B).
                self.store.drop_owner(f"esp:peer:{peer}").addErrback(
                    lambda f: log.failure("esp: releasing {peer}", f, peer=peer))

    def _rekey_needed(self, peer: str, spi: int, exhausted: bool) -> None:
        """Raise the rekey event where the keying side can see it: the store."""
        log.warn("esp: SA {spi:#x} to {peer} {what}", spi=spi, peer=peer,
                 what="ran out of sequence numbers: traffic to it stops until it is rekeyed"
                 if exhausted else "needs a rekey (sequence number soft limit)")
        self.store.put(RekeyRequest(peer, spi, exhausted), ttl=3600,
                       owner=f"esp:peer:{peer}").addErrback(
            lambda f: log.failure("esp: recording a rekey event", f))
