"""The daemon: one MultiService holding the store, the operator interfaces and the roles.

Construction is split into small ``create_*`` steps over the validated
config so each is testable alone.  The store is opened (its records loaded)
while the service is built, before the reactor runs and before any port is
bound, so a broken store file stops ``twistd`` early with a clear message.
Children start in this order and stop in reverse: store, control, metrics,
manhole, then the roles (data planes first) — so roles find their records
loaded at start and the store is flushed after the last role has stopped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from narsuite import __version__
from narsuite.config import Config
from narsuite.control.commands import CommandRegistry, platform_commands
from narsuite.logs import JsonFileLog, logger, set_level, twistd_observer
from narsuite.metrics import Metrics, make_metrics_service
from narsuite.packet.udp import SharedUDPPort, UDPPorts
from narsuite.roles import RoleSpec
from narsuite.store import Store, make_store

__all__ = ["NarsuiteService", "RoleContext", "StoreService"]

log = logger()


@attrs.define
class RoleContext:
    """Everything a role's service factory may use; roles meet only in ``store``."""

    name: str
    config: Config
    role_config: Any
    store: Store
    metrics: Metrics
    reactor: Any
    #: Objects the role wants visible in the manhole (``manhole.<role>``).
    namespace: dict
    #: The process's shared UDP ports (one socket per port, handlers by predicate).
    udp: UDPPorts

    def udp_port(self, port: int, interface: str = "") -> SharedUDPPort:
        """The shared socket for ``port``; roles add handlers for what they claim."""
        return self.udp.get(port, interface)

    def sealed(self, kind: str) -> bool:
        """Whether this node keeps sealed twins of ``kind`` for a standby (a role need not
        write state that only a standby reads when nobody seals it)."""
        return sealing(self.config) and kind in self.config.cluster.sealed_kinds


def sealing(config: Config) -> bool:
    """A shared store and ``[cluster] key_file``: the node seals what a standby needs."""
    return config.cluster.key_file is not None and config.store.backend == "redis"


class StoreService(service.Service):
    """Starts the store's timers and backend; flushes it on stop."""

    name = "store"

    def __init__(self, store: Store) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.store.stop()


class _LogService(service.Service):
    name = "log"

    def __init__(self, json_log: JsonFileLog | None) -> None:
        self.json_log = json_log

    def startService(self) -> None:
        super().startService()
        if self.json_log is not None:
            self.json_log.start()

    def stopService(self) -> None:
        super().stopService()
        if self.json_log is not None:
            self.json_log.stop()


class NarsuiteService(service.MultiService):
    """One narsuite process: platform services plus the requested roles."""

    def __init__(self, config: Config, roles: Sequence[RoleSpec] = (), reactor: Any = None,
                 store: Store | None = None, twistd_options: Any = None) -> None:
        super().__init__()
        #: twistd's own options (``--logfile``, ``-n``, ``--syslog``) when twistd runs us
        self.twistd_options = twistd_options
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.config = config
        self.reactor = reactor
        self.roles = list(roles)
        self.role_names = [r.name for r in self.roles]
        self.started_at: float | None = None
        set_level(config.log.level)
        self.metrics = Metrics()
        self.control_requests = self.metrics.counter(
            "control", "requests", "Control commands answered", ["command"])
        self.store = store if store is not None else make_store(config, reactor)
        for spec in self.roles:
            for kind in spec.kinds:
                self.store.register(kind)
            self.store.declare_volatile_owners(*spec.volatile_owners)
        self.sealer = self._create_sealer(config)
        info = getattr(self.store.backend, "node_info", None)
        if info is not None:  # a shared store: what `narctl cluster` shows of this node
            info["roles"] = list(self.role_names)
        self.loaded = self.store.open()
        self.metrics.watch_store(self.store)
        self.commands = CommandRegistry()
        for command in platform_commands():
            self.commands.add(command)
        for spec in self.roles:
            for command in spec.commands:
                self.commands.add(command)
        #: What the manhole shows; roles add themselves under their names.
        self.namespace: dict[str, Any] = {
            "config": config, "store": self.store, "daemon": self, "reactor": reactor,
            "metrics": self.metrics,
        }
        self._create_children()

    def _create_sealer(self, config: Config) -> Any:
        """With a shared store and ``[cluster] key_file``: sealed twins of the kinds a standby needs."""
        cc = config.cluster
        if not sealing(config) or cc.key_file is None:
            return None
        from narsuite.config import ConfigError
        from narsuite.store.sealed import ClusterKey, Sealer

        try:
            key = ClusterKey.from_file(cc.key_file)
        except (OSError, ValueError) as e:
            raise ConfigError("cluster.key_file", str(e).removeprefix("cluster.key_file: ")) from None
        known = {k.name for k in self.store.kinds()}
        return Sealer(self.store, key, cc.node_id, [k for k in cc.sealed_kinds if k in known])

    def _create_children(self) -> None:
        cfg = self.config
        json_log = JsonFileLog(cfg.log.json_file, cfg.log.max_bytes, cfg.log.max_files) \
            if cfg.log.json_file else None
        _LogService(json_log).setServiceParent(self)
        StoreService(self.store).setServiceParent(self)
        if cfg.control.enabled:
            from narsuite.control.server import make_control_service

            make_control_service(self, cfg.control_socket).setServiceParent(self)
        if cfg.metrics.enabled:
            make_metrics_service(self.metrics, cfg.metrics.listen, cfg.metrics.port).setServiceParent(self)
        if cfg.manhole.enabled:
            from narsuite.manhole import make_manhole_service

            manhole = make_manhole_service(cfg.manhole, cfg.manhole_host_key, self.namespace,
                                           reactor=self.reactor)
            manhole.setName("manhole")
            manhole.setServiceParent(self)
        self.udp = UDPPorts(self.reactor)
        self.udp.setServiceParent(self)
        self.metrics.watch_udp(self.udp.stats)
        roles = service.MultiService()
        roles.setName("roles")
        roles.setServiceParent(self)
        self.namespace["services"] = self
        for spec in self.roles:
            ns: dict[str, Any] = {}
            self.namespace[spec.name] = ns
            ctx = RoleContext(spec.name, cfg, cfg.role(spec.name), self.store, self.metrics,
                              self.reactor, ns, self.udp)
            svc = spec.make_service(ctx)
            svc.setName(spec.name)
            svc.setServiceParent(roles)

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd the parent is the Application: cap twistd's log file there.

        twistd takes its log observer from the application's ``ILogObserver`` component
        when it has one (its documented hook); ours writes where twistd would have
        written but rotates at ``[log] max_bytes`` and keeps ``[log] max_files`` files.
        An explicit ``twistd --logger`` still wins.
        """
        super().setServiceParent(parent)
        opts = self.twistd_options
        if opts is None or opts.get("logger") or not isinstance(parent, Componentized):
            return
        if parent.getComponent(ILogObserver, None) is None:
            observer = twistd_observer(opts, self.config.log.max_bytes, self.config.log.max_files)
            if observer is not None:
                parent.setComponent(ILogObserver, observer)

    def startService(self) -> None:
        self.started_at = time.time()
        super().startService()
        log.info("narsuite {version} starting: roles {roles}; store {backend} with {n} records",
                 version=__version__, roles=", ".join(self.role_names) or "(none)",
                 backend=self.config.store.backend, n=self.loaded)

    def endpoints(self) -> dict[str, str]:
        """Where the operator interfaces listen (real ports, also when 0 was asked)."""
        out = {}
        for name in ("control", "metrics", "manhole"):
            try:
                svc = self.getServiceNamed(name)
            except KeyError:
                continue
            port = getattr(svc, "_port", None) or getattr(svc, "port", None)
            addr = getattr(port, "getHost", lambda: None)()
            if addr is None:
                continue
            if hasattr(addr, "port"):
                out[name] = f"{addr.host}:{addr.port}"
            else:
                name_ = getattr(addr, "name", addr)
                out[name] = name_.decode() if isinstance(name_, bytes) else str(name_)
        return out
