"""The ``[nar]`` section: the SOCKS5 server, its users and rules, and NAR."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from types import MappingProxyType

import attrs

from narsuite.schema import ConfigError, in_range, ip_address, one_of, setting

__all__ = ["NarConfig", "Rule", "NarOptions", "COMMANDS"]

#: Rule "commands": the three SOCKS commands and NAR-MODE.
COMMANDS = ("connect", "bind", "udp", "nar")


def _ports(key: str, value: tuple[str, ...]) -> None:
    for item in value:
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or not 0 <= int(lo) <= int(hi or lo) <= 65535:
            raise ConfigError(key, f"got {item!r}; expected a port or a range like \"1024-65535\"")


def _networks(key: str, value: tuple[str, ...]) -> None:
    for item in value:
        if item == "any":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(key, f"got {item!r}; expected a network like \"10.0.0.0/8\" or any") from None


@attrs.frozen
class Rule:
    """One access rule; the first rule that matches decides, and no match means block."""

    action: str = setting(check=one_of("pass", "block"))
    clients: tuple[str, ...] = setting(("any",), check=_networks, doc="Client networks.")
    users: tuple[str, ...] = setting((), doc="User names (empty: anyone, authenticated or not).")
    commands: tuple[str, ...] = setting(COMMANDS, doc="connect, bind, udp, nar.")
    to: tuple[str, ...] = setting(("any",), check=_networks, doc="Destination networks.")
    ports: tuple[str, ...] = setting((), check=_ports, doc="Destination ports or ranges (empty: any).")
    log: str = setting("", check=one_of("", "debug", "info", "warn", "error"),
                       doc="Log level for decisions of this rule (default: [nar] decision_log_level).")

    def __validate__(self, key: str) -> None:
        for c in self.commands:
            if c not in COMMANDS:
                raise ConfigError(f"{key}.commands", f"got {c!r}; expected some of {', '.join(COMMANDS)}")


@attrs.frozen
class NarOptions:
    """Negotiated Address Reuse (section 3 of the draft). The draft leaves the command
    codes "TBD": ours are below, configurable, documented in docs/roles/nar.md."""

    enabled: bool = setting(True, doc="Answer NAR-MODE; when false it is \"command not supported\".")
    lent_address: str = setting("", check=ip_address(4), doc="Nb (IPv4), the address lent to clients.")
    public_interface: str = setting("", doc="Interface carrying Nb (for the raw sockets).")
    mode_command: int = setting(0x80, check=in_range(0x04, 0xFF), doc="SOCKS CMD of NAR-MODE.")
    icmp_command: int = setting(0x01, check=in_range(0, 0xFF), doc="NAR CMD of ICMP-ASSOCIATE.")
    ipsec_command: int = setting(0x02, check=in_range(0, 0xFF), doc="NAR CMD of IPSEC-ASSOCIATE.")
    tunnel_command: int = setting(0x03, check=in_range(0, 0xFF), doc="NAR CMD of TUNNEL-ASSOCIATE.")
    translated: str = setting("allow", check=one_of("allow", "refuse", "impose"),
                              doc="Translated delivery: grant on request, never, or always.")
    gre: str = setting("allow", check=one_of("allow", "refuse", "impose"),
                       doc="GRE instead of IP-in-IP for end-to-end delivery.")
    l2tp: str = setting("refuse", check=one_of("refuse"), doc="L2TP delivery is not supported.")
    icmp_ids: tuple[int, ...] = setting((1, 65535), doc="Range the server assigns ICMP identifiers from.")
    max_mappings_per_session: int = setting(64, check=in_range(1, 65536))
    keepalive_idle: float = setting(60.0, check=in_range(1, 86400),
                                    doc="TCP keepalive on NAR control connections: seconds of "
                                        "silence before the first probe.")
    keepalive_interval: float = setting(10.0, check=in_range(1, 3600),
                                        doc="Seconds between keepalive probes.")
    keepalive_count: int = setting(5, check=in_range(1, 127),
                                   doc="Unanswered probes after which the client is dead: the "
                                       "connection closes and its mappings go.")
    session_idle_timeout: float = setting(0.0, check=in_range(0, 86400 * 30),
                                          doc="Close a NAR session after this many seconds without "
                                              "a byte on its control connection or a packet of its "
                                              "mappings through N's data plane (0: no limit).")

    def __validate__(self, key: str) -> None:
        codes = {self.icmp_command, self.ipsec_command, self.tunnel_command}
        if len(codes) != 3:
            raise ConfigError(f"{key}.icmp_command", "the three NAR command codes must differ")
        if self.mode_command in (1, 2, 3):
            raise ConfigError(f"{key}.mode_command", "1-3 are CONNECT, BIND and UDP ASSOCIATE")
        if self.enabled and not self.lent_address:
            raise ConfigError(f"{key}.lent_address", "NAR is enabled: set Nb, the address lent to clients")


@attrs.frozen
class NarConfig:
    listen: str = setting("0.0.0.0", check=ip_address())
    port: int = setting(1080, check=in_range(1, 65535))
    external: str = setting("", check=ip_address(),
                            doc="The address peers reach N on, answered to a BIND whose DST.ADDR "
                                "is 0.0.0.0. Empty: the address of N's default route; without "
                                "one, [nar.nar] lent_address if NAR is on, else the client-facing "
                                "address.")
    methods: tuple[str, ...] = setting(("none",), doc="none and/or password, in order of preference.")
    users: Mapping[str, str] = setting(factory=lambda: MappingProxyType({}),
                                       doc="user = password hash (see docs/roles/nar.md).")
    rules: tuple[Rule, ...] = setting((), doc="First match wins; no match: block.")
    decision_log_level: str = setting("info", check=one_of("debug", "info", "warn", "error"))
    negotiation_timeout: float = setting(10.0, check=in_range(0.1, 3600))
    connect_timeout: float = setting(30.0, check=in_range(0.1, 3600))
    idle_timeout: float = setting(300.0, check=in_range(1, 86400))
    udp_idle_timeout: float = setting(120.0, check=in_range(1, 86400))
    splice: bool = setting(True, doc="Relay a TCP stream with splice(2) (no copy through "
                                     "user space) once it has carried 256 KiB (Linux).")
    udp_offload: str = setting("auto", check=one_of("auto", "off"),
                               doc="UDP ASSOCIATE: after the 4th datagram (either way) of an (association, "
                                   "IPv4 destination) flow, relay the rest in the kernel (a tc program; "
                                   "Linux 6.6+, root). auto: when the kernel can, else Python (one "
                                   "log line says why); off: always Python (the host firewall then "
                                   "sees every datagram).")
    udp_offload_max_flows: int = setting(65536, check=in_range(1, 1 << 22),
                                         doc="Offloaded flows per process; more stay in Python "
                                             "(counted as udp_offload_full).")
    udp_offload_rate: int = setting(2000, check=in_range(1, 10**6),
                                    doc="Flows offloaded per second per process at most (each costs "
                                        "two route lookups and two map updates on the reactor); "
                                        "more stay in Python for now and are offered again after "
                                        "their next few datagrams (counted as udp_offload_deferred).")
    max_connections: int = setting(10000, check=in_range(1, 10**6))
    workers: int = setting(1, check=in_range(0, 256),
                           doc="SOCKS reactor processes on the port (SO_REUSEPORT), the main one "
                               "included: 1 = the main process only, 0 = one per CPU.")
    nar: NarOptions = setting(factory=lambda: NarOptions(enabled=False))

    def __validate__(self, key: str) -> None:
        for m in self.methods:
            if m not in ("none", "password"):
                raise ConfigError(f"{key}.methods", f"got {m!r}; expected none and/or password")
        if not self.methods:
            raise ConfigError(f"{key}.methods", "at least one method: none or password")
        if "password" in self.methods and not self.users:
            raise ConfigError(f"{key}.users", "method password needs users (or use methods = [\"none\"])")
