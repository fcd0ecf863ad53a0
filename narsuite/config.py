"""The narsuite configuration: TOML in, immutable validated attrs objects out.

The platform owns ``[daemon]``, ``[store]``, ``[control]``, ``[metrics]``,
``[manhole]`` and ``[log]``; each implemented role adds one section named
after itself with the schema it registers (see :mod:`narsuite.roles`).
Loading happens in ``twistd``'s option parsing, so a bad file stops the
process with a non-zero status before any port is bound.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs

from narsuite.schema import ConfigError, build, in_range, ip_address, one_of, setting

__all__ = [
    "Config",
    "ConfigError",
    "DaemonConfig",
    "StoreConfig",
    "PoolConfig",
    "ControlConfig",
    "MetricsConfig",
    "ManholeConfig",
    "LogConfig",
    "RedisConfig",
    "ClusterConfig",
    "load",
    "loads",
    "DEFAULT_CONFIG",
]

#: The commented embedded default. In a checkout narsuite/narsuite.toml is a
#: symlink to etc/narsuite.toml; a built wheel carries the file itself.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "narsuite.toml"




@attrs.frozen
class DaemonConfig:
    state_dir: Path = setting(Path("/var/lib/narsuite"), doc="Persistent state (store, host keys).")
    runtime_dir: Path = setting(Path("/run/narsuite"), doc="Sockets and other runtime files.")
    reactor: str = setting("narsuite-epoll", check=one_of("narsuite-epoll", "twisted"),
                           doc="narsuite-epoll: narsuite's lean epoll reactor (narsuite/reactor.py), "
                               "installed by `twistd narsuite` unless twistd's --reactor chose one; "
                               "twisted: Twisted's default reactor.")


@attrs.frozen
class PoolConfig:
    """An address pool the store leases addresses from (ESP Appendix B, mode-config)."""

    network: ipaddress.IPv4Network = setting(doc="Addresses to lease, e.g. \"10.8.0.0/24\".")
    exclude: tuple[ipaddress.IPv4Address, ...] = setting(
        (), doc="Addresses never leased (gateway, DNS...). Network and broadcast are always excluded."
    )

    def __validate__(self, key: str) -> None:
        for addr in self.exclude:
            if addr not in self.network:
                raise ConfigError(f"{key}.exclude", f"{addr} is not inside {self.network}")


def _secret_file(key: str, value: Path | None) -> None:
    """A file holding a secret must exist and be readable by its owner only."""
    if value is None:
        return
    try:
        mode = value.stat().st_mode & 0o777
    except OSError as e:
        raise ConfigError(key, f"cannot read {value}: {e.strerror}; create it (mode 600)") from None
    if mode & 0o077:
        raise ConfigError(key, f"{value} is readable by other users (mode {mode:o}); chmod 600 it")


def _host_port(key: str, value: tuple[str, ...]) -> None:
    for item in value:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(key, f"got {item!r}; expected \"host:port\" such as \"192.0.2.10:26379\"")


@attrs.frozen
class RedisConfig:
    """Where the shared store lives when ``store.backend = "redis"`` (docs/store.md, docs/cluster.md)."""

    url: str = setting(
        "", doc="redis://[user@]host:port/db or rediss:// (TLS); a password in the URL is refused: "
                "use password_file. Empty: use sentinels + service.")
    sentinels: tuple[str, ...] = setting(
        (), doc="Sentinels as \"host:port\"; the primary is asked from them by service name.",
        check=_host_port)
    service: str = setting("narsuite", doc="The Sentinel service (master) name.")
    username: str = setting("", doc="ACL user (empty: the default user).")
    password_file: Path | None = setting(
        None, doc="File holding the Redis password (mode 600; never logged).", check=_secret_file)
    sentinel_password_file: Path | None = setting(
        None, doc="File holding the Sentinels' password, if they require one.", check=_secret_file)
    tls: bool = setting(False, doc="TLS to Redis (and Sentinels); rediss:// URLs imply it.")
    tls_ca_file: Path | None = setting(None, doc="CA bundle that signs the servers' certificates.")
    tls_cert_file: Path | None = setting(None, doc="Client certificate (Redis tls-auth-clients).")
    tls_key_file: Path | None = setting(None, doc="Client key (mode 600).", check=_secret_file)
    prefix: str = setting("narsuite:", doc="Prefix of every key this cluster uses (one Redis, several clusters).")
    replicas_ack: int = setting(
        0, check=in_range(0, 16),
        doc="A write's Deferred fires once this many replicas have it (WAIT); 0: when the primary has it.")
    ack_timeout: float = setting(1.0, check=in_range(0.01, 60.0),
                                 doc="Seconds to wait for replicas_ack before the write is reported unreplicated.")
    connect_timeout: float = setting(1.0, check=in_range(0.01, 60.0),
                                     doc="Seconds for a connection (and a command) before Redis counts as unreachable.")
    stream_maxlen: int = setting(
        1_000_000, check=in_range(1000, 10**9),
        doc="Changes kept in the change stream; a node away for longer reloads everything.")

    def __validate__(self, key: str) -> None:
        if self.url and self.sentinels:
            raise ConfigError(f"{key}.sentinels", "set either url or sentinels, not both")
        if self.url:
            from urllib.parse import urlsplit

            u = urlsplit(self.url)
            if u.scheme not in ("redis", "rediss", "unix"):
                raise ConfigError(f"{key}.url", f"got scheme {u.scheme!r}; expected redis://, rediss:// or unix://")
            if u.password:
                raise ConfigError(f"{key}.url", "holds a password; put it in password_file (mode 600) instead")


@attrs.frozen
class ClusterConfig:
    """This node's identity among the nodes sharing one store (docs/cluster.md)."""

    node_id: str = setting("", doc="This node's unique name (required with store.backend = \"redis\").")
    heartbeat_interval: float = setting(1.0, check=in_range(0.05, 60.0), doc="Seconds between heartbeats.")
    heartbeat_timeout: float = setting(
        3.0, check=in_range(0.15, 600.0),
        doc="A node silent this long is dead: the others reap its connections' records.")
    key_file: Path | None = setting(
        None, check=_secret_file,
        doc="32-byte cluster key (AES-256-GCM) sealing what a standby needs; never stored in Redis.")
    sealed_kinds: tuple[str, ...] = setting(
        ("esp.sa", "esp.peer", "ike.isakmp", "ike.v2sa"),
        doc="Kinds kept in the shared store sealed under key_file (what a standby adopts: ESP SAs with their "
            "keys, ESP peers, established IKEv1 and IKEv2 SAs with theirs).")
    seq_margin: int = setting(
        1 << 24, check=in_range(1, 2**31),
        doc="An adopted outbound SA continues this many sequence numbers past its sealed state.")

    def __validate__(self, key: str) -> None:
        if self.node_id and not all(c.isalnum() or c in "-_." for c in self.node_id):
            raise ConfigError(f"{key}.node_id", f"got {self.node_id!r}; use letters, digits, '-', '_', '.'")
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(f"{key}.heartbeat_timeout",
                              f"{self.heartbeat_timeout} is less than twice heartbeat_interval "
                              f"({self.heartbeat_interval}): one late heartbeat would kill the node")


@attrs.frozen
class StoreConfig:
    backend: str = setting(
        "sqlite", doc="memory (nothing survives a restart), sqlite (persisted, one machine) or "
                      "redis (shared by several nodes, [store.redis]).",
        check=one_of("memory", "sqlite", "redis"),
    )
    path: Path | None = setting(None, doc="SQLite file; default <state_dir>/store.sqlite.")
    flush_interval: float = setting(
        0.02, doc="Seconds between group commits of queued writes.", check=in_range(0.001, 10.0)
    )
    synchronous: str = setting(
        "normal",
        doc="normal: survives a process crash (kill -9); full: also a power loss, slower.",
        check=one_of("normal", "full"),
    )
    pools: Mapping[str, PoolConfig] = setting(factory=lambda: MappingProxyType({}))
    redis: RedisConfig = setting(factory=RedisConfig, doc="The shared store (backend = \"redis\").")

    def __validate__(self, key: str) -> None:
        if self.backend == "redis" and not self.redis.url and not self.redis.sentinels:
            raise ConfigError(f"{key}.redis.url", "backend is \"redis\": set url (redis://host:port) "
                                                  "or sentinels + service in [store.redis]")


@attrs.frozen
class ControlConfig:
    enabled: bool = setting(True)
    socket: Path | None = setting(None, doc="UNIX socket; default <runtime_dir>/control.sock.")


@attrs.frozen
class MetricsConfig:
    enabled: bool = setting(True)
    listen: str = setting("127.0.0.1", check=ip_address())
    port: int = setting(9470, check=in_range(0, 65535))


@attrs.frozen
class ManholeConfig:
    enabled: bool = setting(False)
    listen: str = setting("127.0.0.1", check=ip_address())
    port: int = setting(2222, check=in_range(0, 65535))
    host_key: Path | None = setting(
        None, doc="SSH host key (PEM/OpenSSH); generated at <state_dir>/manhole_host_key if absent."
    )
    authorized_keys: Path | None = setting(None, doc="OpenSSH authorized_keys file.")
    users: Mapping[str, str] = setting(
        factory=lambda: MappingProxyType({}),
        doc="user = bcrypt ($2b$...) or scrypt hash, e.g. from `narctl hash-password`.",
    )

    def __validate__(self, key: str) -> None:
        if self.users:
            from narsuite.passwords import check_hash_format  # bcrypt and cryptography: only when used
        for user, hashed in self.users.items():
            if hashed.startswith("$nt$"):
                # An admin shell gets no unsalted MD4 (that format exists for EAP-MSCHAPv2).
                raise ConfigError(f"{key}.users.{user}", "NT hashes are not accepted for the manhole: "
                                  "use bcrypt or scrypt (`narctl hash-password`)")
            try:
                check_hash_format(hashed)  # the same hashes as nar's and XAUTH's users
            except ValueError as e:
                raise ConfigError(f"{key}.users.{user}", str(e)) from None
        if self.enabled and not self.users and self.authorized_keys is None:
            raise ConfigError(
                f"{key}.enabled",
                "the manhole is enabled but nobody can log in; set manhole.users "
                "and/or manhole.authorized_keys",
            )


@attrs.frozen
class LogConfig:
    level: str = setting("info", check=one_of("debug", "info", "warn", "error", "critical"))
    json_file: Path | None = setting(None, doc="Also write JSON lines (one event per line) here.")
    max_bytes: int = setting(
        10_000_000, check=in_range(10_000, 10**12),
        doc="Log files (twistd's and json_file) rotate at this size in bytes.")
    max_files: int = setting(
        5, check=in_range(1, 1000),
        doc="Rotated log files kept (older ones are deleted): disk use is at most (max_files + 1) * max_bytes.")


@attrs.frozen
class Config:
    """The whole validated configuration of one narsuite process."""

    daemon: DaemonConfig = setting(factory=DaemonConfig)
    store: StoreConfig = setting(factory=StoreConfig)
    control: ControlConfig = setting(factory=ControlConfig)
    metrics: MetricsConfig = setting(factory=MetricsConfig)
    manhole: ManholeConfig = setting(factory=ManholeConfig)
    log: LogConfig = setting(factory=LogConfig)
    cluster: ClusterConfig = setting(factory=ClusterConfig)
    #: Role sections, already built by the schema each role registered.
    roles: Mapping[str, Any] = setting(factory=lambda: MappingProxyType({}))
    source: Path | None = setting(None)

    @property
    def store_path(self) -> Path:
        return self.store.path or self.daemon.state_dir / "store.sqlite"

    @property
    def control_socket(self) -> Path:
        return self.control.socket or self.daemon.runtime_dir / "control.sock"

    @property
    def manhole_host_key(self) -> Path:
        return self.manhole.host_key or self.daemon.state_dir / "manhole_host_key"

    def role(self, name: str) -> Any:
        return self.roles[name]


_PLATFORM = {
    "daemon": DaemonConfig,
    "store": StoreConfig,
    "control": ControlConfig,
    "metrics": MetricsConfig,
    "manhole": ManholeConfig,
    "log": LogConfig,
    "cluster": ClusterConfig,
}


def loads(text: str, *, base: Path | None = None, source: Path | None = None,
          registry: Any = None) -> Config:
    """Parse and validate config text; see :func:`load`."""
    from narsuite import roles as _roles

    registry = registry or _roles.default_registry()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        where = source or "<config>"
        raise ConfigError(str(where), f"not valid TOML: {e}") from None
    sections: dict[str, Any] = {}
    role_sections: dict[str, Any] = {}
    for name, table in doc.items():
        if name in _PLATFORM:
            sections[name] = build(_PLATFORM[name], table, name, base)
        elif name in registry.known():
            spec = registry.get(name)
            if spec is None:
                # A section for a role this build does not implement yet is kept
                # out of the way rather than rejected, so a file prepared for a
                # newer narsuite still loads; asking to *run* the role fails.
                continue
            role_sections[name] = build(spec.config_class, table, name, base)
        else:
            known = ", ".join(sorted(set(_PLATFORM) | set(registry.known())))
            raise ConfigError(name, f"unknown section [{name}]; the sections are: {known}")
    for name in registry.implemented():
        if name not in role_sections:
            role_sections[name] = build(registry.get(name).config_class, {}, name, base)
    config = Config(roles=MappingProxyType(role_sections), source=source, **sections)
    if config.store.backend == "redis" and not config.cluster.node_id:
        raise ConfigError("cluster.node_id", "store.backend is \"redis\": every node sharing the store needs "
                                             "its own node_id (e.g. the host name)")
    return config


def load(path: str | Path | None = None, *, registry: Any = None) -> Config:
    """Load the config file at ``path`` (the embedded default when None)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read the config file: {e.strerror}") from None
    return loads(text, base=path.resolve().parent, source=path, registry=registry)
