"""The ``[mipproxy]`` config section: addresses, home agents, mobile nodes' SAs, draft numbers.

Every implemented role's section is built even when the role is not asked for
(an empty table), so the fields have defaults; what the role cannot run
without (MIPP-Pub, MIPP-Priv, at least one mobile node, a home agent it may
relay to) is checked by :func:`check_running` when ``--role=mipproxy`` is
given, before anything binds a port.  The defaults fail closed: no mobile node
configured means every registration is refused (131), no home agent allowed
means every request is refused (136).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import attrs

from narsuite.config import _secret_file
from narsuite.mipproxy import wire
from narsuite.schema import ConfigError, in_range, ip_address, one_of, setting

__all__ = ["ForeignAgentConfig", "MipProxyConfig", "MobileNodeConfig", "NumbersConfig", "check_running", "hexbytes"]

_HEX = re.compile(r"^(0x)?[0-9a-fA-F]*$")


def hexbytes(value: str) -> bytes:
    v = value.replace(":", "").strip()
    return bytes.fromhex(v[2:] if v.startswith("0x") else v)


def _hex(key: str, value: str) -> None:
    if not _HEX.match(value.replace(":", "").strip()) or len(value.replace(":", "").strip()
                                                             .removeprefix("0x")) % 2:
        raise ConfigError(key, "expected hexadecimal key material with an even number of "
                               "digits, e.g. \"0x00112233445566778899aabbccddeeff\"")


def _read_key_file(key: str, path: Path) -> str:
    """The hex key text in ``path``, checked: private (mode 600), readable, hexadecimal;
    errors name ``key``."""
    _secret_file(key, path)
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    _hex(key, text)
    return text


@attrs.frozen
class MobileNodeConfig:
    """One mobile node's MN-HA security association (draft 2.1: the MN and the proxy share
    it, and the proxy uses it again towards the actual home agent)."""

    spi: int = setting(doc="SPI of the MN-HA SA (256..2**32-1).", check=in_range(256, 2**32 - 1))
    key: str = attrs.field(default="", repr=False, metadata={
        "doc": "HMAC-MD5 key, hex. Prefer key_file: the key then never sits in this file.",
        "check": _hex})
    key_file: Path | None = setting(None, doc="File holding the key (hex, one line).")
    home_address: str = setting("", check=ip_address(4),
                                doc="The MN's home address; empty: any (NAI-identified MN).")
    nai: str = setting("", doc="The MN's NAI (user@realm), for dynamic home addresses.")
    ha_spi: int = setting(0, check=in_range(0, 2**32 - 1),
                          doc="SPI the HA knows this SA by; 0: the same as spi.")

    def __validate__(self, key: str) -> None:
        if bool(self.key) == (self.key_file is not None):
            raise ConfigError(f"{key}.key", "set exactly one of key (hex) and key_file")
        if self.key_file is not None:
            _read_key_file(f"{key}.key_file", self.key_file)
        if not self.secret():
            raise ConfigError(f"{key}.key", "the key is empty")
        if self.ha_spi and self.ha_spi <= wire.RESERVED_SPI_MAX:
            raise ConfigError(f"{key}.ha_spi", "SPIs 0..255 are reserved (RFC 5944 3.5.1)")

    def secret(self) -> bytes:
        """The key bytes (read from key_file each time the config is built; kept in memory only)."""
        if self.key_file is not None:
            return hexbytes(self.key_file.read_text().strip())
        return hexbytes(self.key)


@attrs.frozen
class ForeignAgentConfig:
    """A foreign agent's FA-HA mobility security association (RFC 5944 3.5.4): the proxy,
    as the MNs' home agent, checks the FA-HA authenticator of every request that FA relays
    (132 otherwise, RFC 5944 3.8.2) and adds one to every reply it sends the FA.  The key
    lives only in ``key_file`` (mode 600) and in memory."""

    address: str = setting("", check=ip_address(4),
                           doc="The FA's address: the source of the requests it relays.")
    spi: int = setting(0, check=in_range(0, 2**32 - 1), doc="SPI of the FA-HA SA (256..2**32-1).")
    key_file: Path | None = setting(None, doc="File holding the HMAC-MD5 key (hex, one line, mode 600).")

    def __validate__(self, key: str) -> None:
        if not self.address:
            raise ConfigError(f"{key}.address", "set the foreign agent's address")
        if self.spi <= wire.RESERVED_SPI_MAX:
            raise ConfigError(f"{key}.spi", f"got {self.spi}; SPIs 0..255 are reserved "
                                            "(RFC 5944 3.5.1): use the SPI the FA is configured with")
        if self.key_file is None:
            raise ConfigError(f"{key}.key_file", "set the file holding the FA-HA key (hex, mode 600)")
        text = _read_key_file(f"{key}.key_file", self.key_file)
        if not text:
            raise ConfigError(f"{key}.key_file", f"{self.key_file} holds no key")

    def secret(self) -> bytes:
        """The key bytes (read from key_file when the relay is built; kept in memory only)."""
        assert self.key_file is not None
        return hexbytes(self.key_file.read_text().strip())


@attrs.frozen
class NumbersConfig:
    """draft-adrangi-mobileip-vpn-traversal-02 numbers IANA never assigned (docs/mip-wire.md)."""

    ha_parameter_type: int = setting(127, check=in_range(0, 255))
    ha_parameter_subtype: int = setting(0, check=in_range(0, 255))
    missing_ha_parameter: int = setting(200, check=in_range(0, 255))
    nonzero_ha_required: int = setting(201, check=in_range(0, 255))
    ha_unreachable: int = setting(202, check=in_range(0, 255))
    missing_nai: int = setting(203, check=in_range(0, 255))
    missing_home_address: int = setting(204, check=in_range(0, 255))
    missing_home_agent: int = setting(205, check=in_range(0, 255))
    assigned_home_agent: int = setting(206, check=in_range(0, 255))

    def __validate__(self, key: str) -> None:
        try:
            self.draft_numbers()
        except ValueError as e:
            field = "ha_parameter_type" if "ha_parameter_type" in str(e) else "missing_ha_parameter"
            raise ConfigError(f"{key}.{field}", str(e)) from None

    def draft_numbers(self) -> wire.DraftNumbers:
        return wire.DraftNumbers(**attrs.asdict(self))


def _networks(key: str, value: tuple) -> None:
    for i, n in enumerate(value):
        try:
            ipaddress.IPv4Network(n, strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{i}]", f"got {n!r}; expected an IPv4 network like "
                                             "\"10.0.0.0/8\"") from None


def _addresses(key: str, value: tuple) -> None:
    for i, a in enumerate(value):
        try:
            ipaddress.IPv4Address(a)
        except ValueError:
            raise ConfigError(f"{key}[{i}]", f"got {a!r}; expected an IPv4 address") from None


@attrs.frozen
class MipProxyConfig:
    public_address: str = setting("", check=ip_address(4),
                                  doc="MIPP-Pub: where MNs register (UDP 434) and tunnel to.")
    private_address: str = setting("", check=ip_address(4),
                                   doc="MIPP-Priv: the surrogate MN's address, the HAs' care-of address.")
    port: int = setting(wire.MIP_PORT, check=in_range(1, 65535))
    home_agents: tuple[str, ...] = setting((), check=_addresses,
                                           doc="Home agents requests may be relayed to (fail closed: none).")
    ha_pool: tuple[str, ...] = setting((), check=_addresses,
                                       doc="Home agents for dynamic assignment (HA Parameter 0.0.0.0 + NAI).")
    internal_networks: tuple[str, ...] = setting(
        (), check=_networks,
        doc="Location detection (2.6.1): a care-of (or NATed source) address here is internal: 206.")
    location_detection: str = setting(
        "address", check=one_of("address", "interface"),
        doc="2.6.1: address (#1, internal_networks) or interface (#2, internal_interfaces).")
    internal_interfaces: tuple[str, ...] = setting(
        (), doc="2.6.1 #2: a request whose source is routed out of one of these came from inside.")
    vpn_gateways: tuple[str, ...] = setting(
        (), check=_addresses, doc="5.3: inner destinations accepted from MN tunnels (VPNGW-Pub).")
    vpn_gateway_next_hop: str = setting(
        "", check=ip_address(4),
        doc="Two-box: VPNGW-Priv, where decapsulated packets for MNs go. Empty: one-box (local).")
    max_lifetime: int = setting(1800, check=in_range(1, 65534),
                                doc="Longest lifetime relayed to an HA (never longer than the MN's).")
    pending_timeout: float = setting(7.0, check=in_range(0.1, 600),
                                     doc="Seconds a relayed request waits for the HA's reply.")
    max_pending: int = setting(4096, check=in_range(1, 10**7),
                               doc="Pending registrations at most; beyond: 130 insufficient resources.")
    max_bindings: int = setting(65536, check=in_range(1, 10**7))
    replay: str = setting("timestamp", check=one_of("timestamp", "none"),
                          doc="Identification check (RFC 5944 5.7); none leaves it to the HA.")
    replay_tolerance: float = setting(7.0, check=in_range(0.1, 3600),
                                      doc="Seconds a timestamp may differ from our clock.")
    simultaneous_bindings: bool = setting(False, doc="2.6.2; off: an S request is accepted with code 1.")
    broadcast: bool = setting(False, doc="2.2.1: relay the B bit (HA double-encapsulates).")
    icmp_codes: str = setting("draft", check=one_of("draft", "rfc5944"),
                              doc="2.6.7: draft = 202 for every ICMP error; rfc5944 = 80/81/82/88.")
    udp_tunnelling: bool = setting(True, doc="RFC 3519 UDP tunnelling for MNs behind NATs.")
    udp_keepalive: int = setting(110, check=in_range(1, 65535),
                                 doc="RFC 3519 keepalive interval told to the MN (seconds).")
    tun_name: str = setting("mip%d")
    mtu: int = setting(1400, check=in_range(576, 9000))
    route_table: int = setting(434, check=in_range(1, 2**31 - 1),
                               doc="Policy table that sends the gateway's ESP for MNs to the proxy.")
    data_path: bool = setting(True, doc="Tunnel data (raw 4/47/55, UDP 434 type 4, TUN, routes).")
    mobile_nodes: tuple[MobileNodeConfig, ...] = setting(())
    foreign_agents: tuple[ForeignAgentConfig, ...] = setting(
        (), doc="FA-HA SAs (RFC 5944 3.5.4), one per foreign agent that relays requests.")
    require_fa_sa: bool = setting(
        True, doc="Refuse (132) a request relayed by a foreign agent that has no FA-HA SA "
                  "here; false: accept it on the MN-HA authentication alone.")
    numbers: NumbersConfig = setting(factory=NumbersConfig)

    def __validate__(self, key: str) -> None:
        spis: set[int] = set()
        homes: set[str] = set()
        for i, mn in enumerate(self.mobile_nodes):
            if mn.spi in spis:
                raise ConfigError(f"{key}.mobile_nodes[{i}].spi", f"SPI {mn.spi} is used twice")
            spis.add(mn.spi)
            if mn.home_address:
                if mn.home_address in homes:
                    raise ConfigError(f"{key}.mobile_nodes[{i}].home_address",
                                      f"{mn.home_address} belongs to two mobile nodes")
                homes.add(mn.home_address)
            elif not mn.nai:
                raise ConfigError(f"{key}.mobile_nodes[{i}].home_address",
                                  "set the MN's home_address or its nai (or both)")
        fas: set[str] = set()
        for i, fa in enumerate(self.foreign_agents):
            if fa.address in fas:
                raise ConfigError(f"{key}.foreign_agents[{i}].address",
                                  f"{fa.address} has two FA-HA SAs; keep one")
            fas.add(fa.address)
        for ha in self.ha_pool:
            if ha == "0.0.0.0":
                raise ConfigError(f"{key}.ha_pool", "0.0.0.0 is not a home agent")
        if self.location_detection == "interface" and not self.internal_interfaces:
            raise ConfigError(f"{key}.internal_interfaces", "location_detection = \"interface\" "
                                                            "needs the internal interfaces' names")

    def allowed_home_agents(self) -> frozenset[str]:
        return frozenset(self.home_agents) | frozenset(self.ha_pool)


def check_running(cfg: Any) -> None:
    """What ``--role=mipproxy`` needs beyond a well-formed section (ConfigError names the key)."""
    if not cfg.public_address:
        raise ConfigError("mipproxy.public_address",
                          "the mipproxy role needs MIPP-Pub, the address MNs register with")
    if not cfg.private_address:
        raise ConfigError("mipproxy.private_address",
                          "the mipproxy role needs MIPP-Priv, its address on the home agents' side")
    if cfg.public_address == cfg.private_address:
        raise ConfigError("mipproxy.private_address", "MIPP-Priv must differ from MIPP-Pub")
    if not cfg.mobile_nodes:
        raise ConfigError("mipproxy.mobile_nodes",
                          "no mobile node SA is configured: add [[mipproxy.mobile_nodes]] "
                          "with spi and key_file")
    if not cfg.allowed_home_agents():
        raise ConfigError("mipproxy.home_agents",
                          "no home agent is configured: list the HAs requests may be relayed to")
