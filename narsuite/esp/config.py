"""The ``[esp]`` config section and its statically keyed peers (``[[esp.peers]]``)."""

from __future__ import annotations

import ipaddress
import re

import attrs

from narsuite.esp.records import CHECKSUM_POLICIES, ENCAPS, MODES, POLICIES
from narsuite.schema import ConfigError, in_range, ip_address, one_of, setting

__all__ = ["EspConfig", "PeerConfig", "ENCRYPTIONS", "INTEGRITIES"]

ENCRYPTIONS = ("aes-gcm-16", "aes-cbc", "null")
INTEGRITIES = ("hmac-sha1-96", "hmac-sha256-128", "none")
_HEX = re.compile(r"^(0x)?[0-9a-fA-F]*$")


def _hex(key: str, value: str) -> None:
    if not _HEX.match(value.replace(":", "")):
        raise ConfigError(key, "expected hexadecimal key material, e.g. \"0x0123...\"")


def hexbytes(value: str) -> bytes:
    v = value.replace(":", "")
    return bytes.fromhex(v[2:] if v.startswith("0x") else v)


@attrs.frozen
class PeerConfig:
    """A manually keyed peer: one inbound and one outbound SA."""

    name: str = setting(doc="Unique peer name (narctl, logs, store).")
    spi_in: int = setting(doc="SPI of the inbound SA (ours); 256..2**32-1.",
                          check=in_range(256, 2**32 - 1))
    spi_out: int = setting(doc="SPI of the outbound SA (the peer's).", check=in_range(256, 2**32 - 1))
    enc: str = setting(check=one_of(*ENCRYPTIONS))
    enc_key_in: str = setting(check=_hex, doc="hex; aes-gcm-16 keys end with the 4-byte salt")
    enc_key_out: str = setting(check=_hex)
    integ: str = setting("none", check=one_of(*INTEGRITIES))
    integ_key_in: str = setting("", check=_hex)
    integ_key_out: str = setting("", check=_hex)
    esn: bool = setting(False)
    mode: str = setting("tunnel", check=one_of(*MODES))
    encap: str = setting("udp", check=one_of(*ENCAPS))
    remote: str = setting("", doc="\"ip\" or \"ip:port\"; learned from authenticated packets when empty.")
    policy: str = setting("address", check=one_of(*POLICIES))
    address: str = setting("", check=ip_address(4), doc="Inner address of the peer (policy address).")
    pool: str = setting("", doc="Lease the inner address from this [store.pools] pool.")
    allowed: tuple[ipaddress.IPv4Network, ...] = setting((), doc="Inner source space (policy space).")
    keepalive: str = setting("auto", check=one_of("auto", "on", "off"))
    behind_nat: bool = setting(False, doc="This side is behind a NAT (as IKE would detect).")
    local_address: str = setting("", check=ip_address(4), doc="Transport mode: our address for the peer.")
    nat_oa_remote: str = setting("", check=ip_address(4))
    nat_oa_local: str = setting("", check=ip_address(4))
    checksum: str = setting("incremental", check=one_of(*CHECKSUM_POLICIES))
    selector_proto: int = setting(0, check=in_range(0, 255))
    selector_port: int = setting(0, check=in_range(0, 65535))

    def __validate__(self, key: str) -> None:
        from narsuite.esp import transform

        integ = None if self.integ == "none" else self.integ
        for direction in ("in", "out"):
            enc_key = hexbytes(getattr(self, f"enc_key_{direction}"))
            integ_key = hexbytes(getattr(self, f"integ_key_{direction}"))
            try:
                transform.OutboundSA(256, self.enc, enc_key, integ, integ_key)
            except ValueError as e:
                raise ConfigError(f"{key}.enc_key_{direction}", str(e)) from None
        if self.mode == "tunnel":
            if self.policy == "address" and not (self.address or self.pool):
                raise ConfigError(f"{key}.policy", "policy \"address\" needs address and/or pool")
            if self.policy == "space" and not self.allowed:
                raise ConfigError(f"{key}.allowed", "policy \"space\" needs the allowed networks")
        elif not self.local_address:
            raise ConfigError(f"{key}.local_address", "transport mode needs our local address")
        if self.remote:
            ip, _, port = self.remote.partition(":")
            ip_address(4)(f"{key}.remote", ip)
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError(f"{key}.remote", f"bad port in {self.remote!r}")

    @property
    def remote_ip(self) -> str:
        return self.remote.partition(":")[0]

    def remote_port(self, default: int) -> int:
        port = self.remote.partition(":")[2]
        return int(port) if port else default


@attrs.frozen
class EspConfig:
    port: int = setting(4500, check=in_range(1, 65535), doc="UDP-encapsulated ESP (RFC 3948).")
    listen: str = setting("", check=ip_address(4), doc="Address to bind; all when empty.")
    raw_esp: bool = setting(True, doc="Also IP protocol 50, for peers not behind a NAT.")
    draft_port: int = setting(0, check=in_range(0, 65535),
                              doc="500 enables the 004 draft's ESP on UDP 500 behind 8 zero bytes.")
    tun_name: str = setting("esp%d")
    tun_address: str = setting("", doc="Address/prefix on the TUN device (optional).")
    mtu: int = setting(1400, check=in_range(576, 9000))
    replay_window: int = setting(128, check=in_range(0, 4096))
    keepalive_interval: float = setting(20.0, check=in_range(0.1, 3600),
                                        doc="M: seconds without traffic before a keepalive.")
    keepalive_linger: float = setting(300.0, check=in_range(0, 86400),
                                      doc="N: keep sending this long after the last SA went.")
    napt_address: str = setting("", check=ip_address(4), doc="G_i for policy napt (routed to the TUN).")
    napt_ports: tuple[int, ...] = setting((20000, 59999))
    napt_timeout: float = setting(300.0, check=in_range(1, 86400))
    lease_time: float = setting(0.0, check=in_range(0, 10**7),
                                doc="Pool lease lifetime for static peers (0: as long as the peer).")
    transport_table: int = setting(4500, check=in_range(1, 2**31 - 1),
                                   doc="Routing table for transport-mode peers' traffic (to the TUN).")
    peers: tuple[PeerConfig, ...] = setting(())

    def __validate__(self, key: str) -> None:
        if self.replay_window % 32:
            raise ConfigError(f"{key}.replay_window", "expected a multiple of 32 (0 disables)")
        if len(self.napt_ports) != 2 or not 1 <= self.napt_ports[0] <= self.napt_ports[1] <= 65535:
            raise ConfigError(f"{key}.napt_ports", "expected [low, high] within 1..65535")
        names = set()
        spis = set()
        inner: dict[str, str] = {}  # static inner address -> peer
        spaces: list[tuple[str, ipaddress.IPv4Network]] = []
        for i, peer in enumerate(self.peers):
            if peer.mode == "tunnel":
                # 002 §5.1: two tunnel peers may not receive traffic for the same inner
                # addresses (the esp role refuses the same thing from IKE at run time)
                if peer.address and peer.address in inner:
                    raise ConfigError(f"{key}.peers[{i}].address",
                                      f"{peer.address} is already peer {inner[peer.address]!r}'s "
                                      "inner address (002 §5.1); give each peer its own")
                if peer.address:
                    inner[peer.address] = peer.name
                if peer.policy == "space":
                    for net in peer.allowed:
                        clash = next((o for o, n in spaces if n.overlaps(net)), None)
                        if clash is not None:
                            raise ConfigError(f"{key}.peers[{i}].allowed",
                                              f"{net} overlaps the allowed networks of peer {clash!r} "
                                              "(002 §5.1); make the spaces disjoint")
                    spaces += [(peer.name, n) for n in peer.allowed]
            if peer.name in names:
                raise ConfigError(f"{key}.peers[{i}].name", f"peer {peer.name!r} is defined twice")
            names.add(peer.name)
            if peer.spi_in in spis:
                raise ConfigError(f"{key}.peers[{i}].spi_in", f"SPI {peer.spi_in} is used twice")
            spis.add(peer.spi_in)
            if peer.policy == "napt" and peer.mode == "tunnel" and not self.napt_address:
                raise ConfigError(f"{key}.napt_address", f"peer {peer.name!r} uses policy napt: set G_i")
