"""The ike role's service: ports, timers, credentials.  Every decision is the engine's.

Port 500 is shared with the esp role's optional 004-draft ESP (eight zero bytes in
front; an IKE cookie is never zero) and port 4500 with ESP-in-UDP (IKE carries the
four-byte non-ESP marker there, RFC 3948 §2.2).
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from narsuite.ike.config import IkeConfig
from narsuite.ike.engine import IkeEngine
from narsuite.logs import logger
from narsuite.packet.markers import NON_ESP_MARKER, is_ike_on_500, is_ike_on_4500

__all__ = ["IkeService"]

log = logger()

class IkeService(service.Service):
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.cfg: IkeConfig = ctx.role_config
        cfg = self.cfg
        credentials = trust = None
        if cfg.certificate is not None and cfg.private_key is not None:
            from narsuite.ike import certs

            credentials = certs.Credentials.load(cfg.certificate, cfg.private_key)
            trust = certs.Trust.load(cfg.cacerts)
        checker = None
        if cfg.users:
            from narsuite.passwords import PasswordChecker

            checker = PasswordChecker(cfg.users, reactor=ctx.reactor)
        self.checker = checker
        self.engine = IkeEngine(
            cfg, ctx.store, ctx.reactor, send=self._send, credentials=credentials, trust=trust,
            check_password=(lambda u, p: checker.check(u.encode(), p)) if checker else None,
            metrics=ctx.metrics)
        # IKEv2 (RFC 7296) shares the ports, the config and the credentials; the header's
        # major version (byte 17, where both versions keep it) decides who gets a message
        from narsuite.ike.v2.engine import IkeV2Engine

        self.engine2 = IkeV2Engine(
            cfg, ctx.store, ctx.reactor, send=self._send, credentials=credentials, trust=trust,
            check_password=(lambda u, p: checker.check(u.encode(), p)) if checker else None,
            metrics=ctx.metrics)
        # the SAs' standby state (``ike.isakmp``, ``ike.v2sa``) only where a cluster seals it: a record and
        # a timer per exchange cost ~7 % of an INIT+AUTH (docs/benchmarks.md)
        self.engine.keep_state = ctx.sealed("ike.isakmp")
        self.engine2.keep_state = ctx.sealed("ike.v2sa")
        ctx.namespace.update(service=self, engine=self.engine, engine2=self.engine2)
        self.udp500 = ctx.udp_port(cfg.port, cfg.listen)
        self.udp500.add_handler("ike", is_ike_on_500, self._on_500, min_length=28)
        self.udp4500 = ctx.udp_port(cfg.natt_port, cfg.listen)
        self.udp4500.add_handler("ike", is_ike_on_4500, self._on_4500, min_length=32)
        for i, p in enumerate(cfg.peers):
            if p.pool and p.pool not in ctx.store.pools():
                from narsuite.schema import ConfigError

                raise ConfigError(f"ike.peers[{i}].pool", f"no [store.pools.{p.pool}] section; add one or fix the name")
        self._dpd = LoopingCall(self._dpd_tick)
        self._dpd.clock = ctx.reactor

    def _on_500(self, data: bytes, addr: tuple[str, int]) -> None:
        (self.engine2 if data[17] >> 4 == 2 else self.engine).received(data, addr, self.cfg.port)

    def _on_4500(self, data: bytes, addr: tuple[str, int]) -> None:
        (self.engine2 if data[21] >> 4 == 2 else self.engine).received(data[4:], addr, self.cfg.natt_port)

    def _dpd_tick(self) -> None:
        self.engine.dpd_tick()
        self.engine2.dpd_tick()

    def _send(self, data: bytes, addr: tuple[str, int], local_port: int) -> None:
        if local_port == self.cfg.natt_port:
            self.udp4500.write(NON_ESP_MARKER + data, addr)
        else:
            self.udp500.write(data, addr)

    def startService(self) -> None:
        super().startService()
        if "espthrunat" in self.engine.natt_variants and not any(
                r.name == "esp-draft" for r in self.udp500.routes):
            # the 004 draft's ESP travels on UDP 500 behind eight zero bytes: without an esp
            # role listening there ([esp] draft_port = 500), negotiating it strands the traffic
            self.engine.natt_variants = tuple(v for v in self.engine.natt_variants if v != "espthrunat")
            log.info("ike: not offering the 004 draft (ESPThruNAT): no esp role with draft_port = {port}",
                     port=self.cfg.port)
        if self.cfg.dpd_delay:
            self._dpd.start(min(5.0, self.cfg.dpd_delay / 3), now=False)
        log.info("ike: responder on UDP {port} and {natt}, {n} peer policies, NAT-T {variants}",
                 port=self.cfg.port, natt=self.cfg.natt_port, n=len(self.cfg.peers),
                 variants=", ".join(self.cfg.natt))

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        if self._dpd.running:
            self._dpd.stop()
        self.engine.close()
        self.engine2.close()
        return None
