"""The mipproxy role's service: sockets, raw ports, TUN, routes, lifecycles.

It owns lifecycles only; the registration decisions are the
:class:`~narsuite.mipproxy.registration.RegistrationRelay`'s and the tunnel
decisions the :class:`~narsuite.mipproxy.datapath.DataPath`'s.

Sockets: UDP 434 twice, through the process's shared UDP ports — bound to
MIPP-Pub (requests from MNs, replies to them, RFC 3519 tunnel data) and to
MIPP-Priv (requests to the HAs, their replies) — so every message leaves from
the address the draft's packet flows (2.7) name.  A raw ICMP socket on MIPP-Priv
sees the HAs' unreachables (2.6.7).
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer

from narsuite.logs import logger
from narsuite.mipproxy import wire
from narsuite.mipproxy.config import MipProxyConfig
from narsuite.mipproxy.records import BINDING, PENDING
from narsuite.mipproxy.registration import RegistrationRelay

__all__ = ["MipProxyService", "is_request", "is_reply", "is_tunnel_data"]

log = logger()


def is_request(data: bytes) -> bool:
    return data[:1] == b"\x01"


def is_reply(data: bytes) -> bool:
    return data[:1] == b"\x03"


def is_tunnel_data(data: bytes) -> bool:
    return data[:1] == b"\x04"


class MipProxyService(service.Service):
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.cfg: MipProxyConfig = ctx.role_config
        self.store = ctx.store
        self.clock = ctx.reactor
        cfg = self.cfg
        self.public = ctx.udp_port(cfg.port, cfg.public_address)
        self.private = ctx.udp_port(cfg.port, cfg.private_address)
        # the relay's answers leave at the end of the reactor turn, together (write_soon: a
        # burst wakes the peer once, not once per datagram); the data path sends at once
        self.relay = RegistrationRelay(
            cfg, ctx.store, ctx.reactor, metrics=ctx.metrics,
            send_public=self.public.write_soon, send_private=self.private.write_soon)
        self.public.add_handler("mip-request", is_request, self.relay.request_received)
        self.private.add_handler("mip-reply", is_reply, self.relay.reply_received)
        self.datapath: Any = None
        if cfg.data_path:
            from narsuite.mipproxy.datapath import DataPath

            self.datapath = DataPath(cfg, ctx.store, ctx.reactor, metrics=ctx.metrics,
                                     send_udp=self.public.write)
            self.public.add_handler("mip-tunnel", is_tunnel_data, self.datapath.udp_received)
            self.relay.before_reply = self.datapath.routed
        self.icmp: Any = None
        self._unsubscribe: Any = None
        ctx.namespace.update(service=self, relay=self.relay, datapath=self.datapath)

    def startService(self) -> None:
        super().startService()
        from narsuite.packet.rawsock import IPPROTO_ICMP, RawSocketPort

        cfg = self.cfg
        self.icmp = RawSocketPort(IPPROTO_ICMP, lambda packet, src: self.relay.icmp_received(packet),
                                  bind_address=cfg.private_address, reactor=self.clock)
        self.icmp.start()
        self._unsubscribe = self.store.subscribe(self._store_changed,
                                                 kinds=[PENDING.name, BINDING.name])
        if self.datapath is not None:
            self.datapath.start()
        log.info("mipproxy: MIPP-Pub {pub}:{port}, MIPP-Priv {priv}:{port}, {n} mobile node SAs, "
                 "home agents {has}, data path {dp}", pub=cfg.public_address, port=cfg.port,
                 priv=cfg.private_address, n=len(cfg.mobile_nodes),
                 has=", ".join(sorted(cfg.allowed_home_agents())), dp="on" if cfg.data_path else "off")

    def _store_changed(self, change: Any) -> None:
        self.relay.store_changed(change)
        if self.datapath is not None:
            self.datapath.store_changed(change)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.relay.stop()
        waits = []
        if self.icmp is not None:
            waits.append(defer.maybeDeferred(self.icmp.stop))
        if self.datapath is not None:
            waits.append(defer.maybeDeferred(self.datapath.stop))
        return defer.gatherResults(waits)


def describe_code(code: int, numbers: wire.DraftNumbers) -> str:
    return wire.reply_code_name(code, numbers)
