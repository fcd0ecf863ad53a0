"""The nar role: a SOCKS5 server on TCP 1080 that also lends Nb (NAR)."""

from __future__ import annotations

from typing import Any

from twisted.application import internet, service

from narsuite.control.commands import Command, Table
from narsuite.nar import lean
from narsuite.nar.config import NarConfig
from narsuite.nar.fastio import lean_accepts
from narsuite.nar.records import KINDS, MAPPING, SESSION, SESSION_OWNER_PREFIX
from narsuite.nar.server import SocksFactory
from narsuite.nar.workers import ReusePortServer, WorkerPool, worker_count
from narsuite.roles import RoleSpec

__all__ = ["ROLE", "NarService"]


class SocksTCPServer(internet.TCPServer):
    """``internet.TCPServer`` whose port makes lean transports (narsuite.nar.fastio.LeanServer)."""

    def _getPort(self) -> Any:
        return lean_accepts(super()._getPort())


class NarService(service.MultiService):
    """Owns the SOCKS listening port and, with NAR enabled, the raw-socket data plane."""

    def __init__(self, ctx: Any) -> None:
        super().__init__()
        cfg: NarConfig = ctx.role_config
        self.handler = None
        self.dataplane = None
        if cfg.nar.enabled:
            from narsuite.nar.dataplane import NarDataPlane
            from narsuite.nar.session import NarHandler

            self.handler = NarHandler(cfg.nar, ctx.store, ctx.reactor)
            self.dataplane = NarDataPlane(cfg.nar, ctx.store, ctx.reactor)
            self.dataplane.setName("dataplane")
            self.dataplane.setServiceParent(self)
            ctx.metrics.watch_counters("nar", "nar_events", "NAR negotiation events", "event",
                                       lambda: dict(self.handler.counters))
            ctx.metrics.watch_counters("nar", "dataplane_events", "NAR data-plane events", "event",
                                       self.dataplane.counters_dict)
        self.factory = SocksFactory(cfg, ctx.store, ctx.metrics, ctx.reactor, nar_handler=self.handler)
        if self.handler is not None:
            self.handler.rules = self.factory.rules
        self.workers: WorkerPool | None = None
        processes = worker_count(cfg.workers)
        if processes > 1:
            # Several reactor processes on the port (narsuite/nar/workers.py): ours and N-1 workers.
            port: service.Service = ReusePortServer(ctx.reactor, cfg.listen, cfg.port, self.factory)
        elif lean.supported(ctx.reactor):
            # narsuite's lean reactor (twistd narsuite's default): CONNECTs relayed without
            # Twisted's TCP transports, everything else handed to the protocol (narsuite.nar.lean).
            port = lean.LeanSocksServer(ctx.reactor, cfg.listen, cfg.port, self.factory)
        else:
            port = SocksTCPServer(cfg.port, self.factory, interface=cfg.listen)
        port.setName("socks")
        port.setServiceParent(self)
        if processes > 1:
            self.workers = WorkerPool(cfg, self.factory, ctx.reactor, processes - 1,
                                      log_level=ctx.config.log.level)
            self.workers.setServiceParent(self)  # after the port: the workers join a bound port
        ctx.namespace.update(service=self, factory=self.factory, handler=self.handler,
                             dataplane=self.dataplane, workers=self.workers)

    def stopService(self) -> Any:
        d = super().stopService()
        self.factory.stop_offload()  # detach the UDP fast path's programs with the service
        if self.handler is not None:
            self.handler.events.stop()  # log what the last interval held
        return d


def _svc(daemon: Any) -> NarService:
    return daemon.namespace["nar"]["service"]


def _sessions(daemon: Any) -> Table:
    rows = []
    for s in daemon.store.records(SESSION.name):
        n = len(daemon.store.lookup_all(MAPPING.name, "session", s.id))
        flags = "+".join(f for f, on in (("translated", s.translated), ("gre", s.gre)) if on) or "ipip"
        rows.append((s.id, s.client, s.remote, s.lent, flags, s.user or "-", n))
    return Table(("session", "client", "remote", "lent", "delivery", "user", "mappings"),
                 tuple(sorted(rows)), title="nar sessions")


def _mappings(daemon: Any) -> Table:
    rows = []
    for m in daemon.store.records(MAPPING.name):
        if m.kind == "icmp":
            what = f"id {m.icmp_id}"
        elif m.kind == "ipsec":
            what = f"{'esp' if m.proto == 50 else 'ah'} spi {m.spi:#010x}"
        elif m.kind == "tunnel":
            what = f"{'ipip' if m.proto == 4 else 'gre'} inner {m.inner}"
        else:
            what = f"port {m.port}" + (f" from port {m.remote_port}" if m.remote_port else "")
        mode = "translated" if m.translated else f"end-to-end/{m.encap}"
        rows.append((m.id, m.kind, what, m.client, m.remote, m.lent, mode))
    return Table(("mapping", "kind", "tuple", "client", "remote", "lent", "delivery"),
                 tuple(sorted(rows)), title="nar mappings")


def _stats(daemon: Any) -> Table:
    svc = _svc(daemon)
    rows = [(f"socks.{k}", v) for k, v in sorted(svc.factory.totals().items()) if v]
    rows += [(f"udp_offload.{k}", v) for k, v in svc.factory.offload_state().items()]
    if svc.workers is not None:
        w = svc.workers
        rows += [("workers.processes", 1 + len(w.procs)), ("workers.restarts", w.restarts),
                 ("workers.nar_handoffs", w.handoffs)]
        rows += [(f"workers.pid.{pid}.connections", c.get("connections", 0))
                 for pid, c in sorted(w.per_process().items())]
    if svc.handler is not None:
        rows += [(f"nar.{k}", v) for k, v in sorted(svc.handler.counters.items())]
    if svc.dataplane is not None:
        rows += [(f"dataplane.{k}", v) for k, v in sorted(svc.dataplane.counters_dict().items())]
    return Table(("counter", "value"), tuple(rows), title="nar counters")


ROLE = RoleSpec(
    name="nar",
    description="SOCKS5 server and Negotiated Address Reuse (draft-montenegro-aatn-nar-01)",
    config_class=NarConfig,
    make_service=NarService,
    kinds=KINDS,
    volatile_owners=(SESSION_OWNER_PREFIX,),
    commands=(
        Command("nar sessions", "NAR-mode control connections: client, remote, address lent, delivery",
                _sessions),
        Command("nar mappings", "live NAR mappings (section 2.6 tuples) and their delivery", _mappings),
        Command("nar stats", "SOCKS, NAR and data-plane counters", _stats),
    ),
)
