"""The registration relay: surrogate home agent towards MNs, surrogate MN towards actual HAs.

draft-adrangi-mobileip-vpn-traversal-02 §2, RFC 5944, RFC 3024 (T bit), RFC 2794
(NAI), RFC 3519 (UDP tunnelling).  The protocol side (service) hands in datagrams
and ICMP errors; this controller decides and answers through two send callables,
one per socket: ``send_public`` sends from MIPP-Pub (to MNs), ``send_private``
from MIPP-Priv (to home agents).

A request from an MN, in order (§2.1: authentication before any processing):

1. the fixed part is read, so that a denial can be addressed;
2. MN-HA authentication (HMAC-MD5, the SA found by SPI, constant-time compare):
   131 if missing or wrong; then, for a request a foreign agent relayed (its source
   is a configured FA, or it carries FA extensions after the MN-HA one), the FA-HA
   authentication (RFC 5944 3.8.2): 132 if that FA has an SA here and the
   authenticator is missing or wrong, or if it has none and ``require_fa_sa``;
3. the whole message is decoded (134 for a broken extension chain or an unknown
   non-skippable extension, as an HA answers);
4. the SA must belong to this MN (home address / NAI), else 131; home address 0
   without an NAI is dropped silently (§2.6.3);
5. identification replay protection (RFC 5944 §5.7, timestamps): 133 carrying our
   time in the high 32 bits;
6. validity checks as an HA (136 wrong HA field, 138 no T bit, 139 M and G) and the
   draft's own (§2.2.4, §2.5.3, §2.6.1, §2.6.4: 200, 201, 206);
7. the new request (§2.2.1-2.2.3) goes to the actual HA; a pending entry is stored.

Only *authenticated* extensions (those before the MN-HA authentication extension)
are read or relayed: an extension appended after it could come from anyone, and the
FA's own (MN-FA, FA-HA) stop at the proxy, whose leg to the HA is that of a
co-located MN.  The one exception is read, not relayed: the UDP Tunnel Request an FA
with an FA-HA SA here adds after the MN-HA extension (RFC 3519 3.1), which its FA-HA
authenticator covers; the binding then tunnels to that FA in UDP and records it.
A request relayed by an FA is answered to the FA's address and port (RFC 5944
3.8.3) with an FA-HA authenticator when that FA has an SA; its source differing from
its care-of address is then the FA, not a NAT (2.6.1, RFC 3519), unless the FA asks
for UDP tunnelling itself.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from narsuite import logs
from narsuite.logs import Aggregator, logger
from narsuite.mipproxy import wire
from narsuite.mipproxy.config import MipProxyConfig
from narsuite.mipproxy.records import BINDING, PENDING, UDP_NEXT_HEADERS, Binding, Pending
from narsuite.packet import codec

__all__ = ["RegistrationRelay", "Counters", "NTP_EPOCH_OFFSET", "ntp_seconds"]

log = logger()

#: Seconds from 1900-01-01 (NTP era 0, RFC 5944 §5.7 timestamps) to the Unix epoch.
NTP_EPOCH_OFFSET = 2208988800

_LOW32 = 0xFFFFFFFF
_Q = struct.Struct("!Q")
_ntoa = socket.inet_ntoa
_aton = socket.inet_aton
_ZERO = "0.0.0.0"
_DEBUG = LogLevel.debug
_U32 = struct.Struct("!I")

_REQ = struct.Struct("!BBH4s4s4sQ")
_REP = struct.Struct("!BBH4s4sQ")
_ZERO_B = bytes(4)
_PENDING = PENDING.name
_BINDING = BINDING.name
_authenticator = wire.compute_authenticator
#: authenticated reply extensions the proxy does not pass on to the MN: its own HA
#: Parameter and UDP Tunnel Reply go instead (the authentication ones decode as None)
_NOT_RELAYED = (wire.HAParameterExtension, wire.UDPTunnelReply, type(None))

Send = Callable[[bytes, tuple[str, int]], Any]


class _Request(NamedTuple):
    """The fixed part of a Registration Request as the relay reads it (addresses the
    relay copies stay bytes)."""

    flags: int
    lifetime: int
    home_address: str
    home: bytes
    home_agent: bytes
    care_of_address: str
    identification: int


class _Reply(NamedTuple):
    """The fixed part of a Registration Reply, as ``struct`` unpacks it."""

    type: int
    code: int
    lifetime: int
    home: bytes
    home_agent: bytes
    identification: int


def ntp_seconds(unix: float) -> int:
    return (int(unix) + NTP_EPOCH_OFFSET) & _LOW32


class Counters:
    """Named counters mirrored into Prometheus (``narsuite_mipproxy_events_total{event=}``
    and ``narsuite_mipproxy_denied_total{code=}``)."""

    NAMES = (
        "requests_rx", "requests_relayed", "replies_rx", "replies_relayed", "denied",
        "deregistrations", "bindings_created", "bindings_retired", "pending_expired",
        "icmp_errors", "store_errors", "send_failed", "store_unavailable",
        # drops, by reason (silently: nothing is answered)
        "drop_short", "drop_zero_home_no_nai", "drop_undecodable", "drop_unexpected_reply",
        "drop_reply_wrong_source", "drop_reply_auth_failed", "drop_reply_malformed",
        "drop_not_registration",
        # refusals counted by cause in addition to their code
        "auth_failed", "replay_refused", "fa_auth_failed", "fa_relayed",
    )

    def __init__(self, metrics: Any = None) -> None:
        self.values = dict.fromkeys(self.NAMES, 0)
        self.denied: dict[int, int] = {}
        if metrics is not None:
            metrics.watch_counters("mipproxy", "events", "Mobile IP proxy events", "event",
                                   lambda: self.values)
            metrics.watch_counters("mipproxy", "denied",
                                   "Registration replies denied by the proxy, by code", "code",
                                   lambda: {str(k): v for k, v in self.denied.items()})

    def inc(self, name: str, n: int = 1) -> None:
        self.values[name] += n


@attrs.frozen
class _SA:
    spi: int
    key: bytes = attrs.field(repr=False)
    home_address: str
    nai: bytes
    ha_spi: int
    #: Type, Length, SPI of the MN-HA extension towards the MN and towards the HA
    mn_auth_header: bytes = attrs.field(init=False, repr=False)
    ha_auth_header: bytes = attrs.field(init=False, repr=False)
    #: the key with its HMAC state prepared (what every authenticator here is computed with)
    auth_key: wire.AuthKey = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "mn_auth_header", wire.auth_header(wire.EXT_MN_HA_AUTH, self.spi))
        object.__setattr__(self, "ha_auth_header",
                           wire.auth_header(wire.EXT_MN_HA_AUTH, self.ha_spi))
        object.__setattr__(self, "auth_key", wire.AuthKey(self.key))

    def key_for_ha(self, spi: int) -> wire.AuthKey | None:
        """The key of a reply's MN-HA extension: the HA knows this SA by ``ha_spi``."""
        return self.auth_key if spi == self.ha_spi else None


@attrs.frozen
class _FASA:
    address: str
    spi: int
    key: bytes = attrs.field(repr=False)


class _KernelRoutes:
    """``ip route get``'s output interface, cached (a netlink round trip costs ~1 ms; the
    cache is bounded and its entries live a minute)."""

    def __init__(self, size: int = 4096, ttl: float = 60.0) -> None:
        self._ipr: Any = None
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._size = size
        self._ttl = ttl

    def device(self, address: str) -> str | None:
        now = time.monotonic()
        hit = self._cache.get(address)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        name = None
        try:
            if self._ipr is None:
                from pyroute2 import IPRoute

                self._ipr = IPRoute()
            routes = self._ipr.route("get", dst=address)
            index = routes[0].get_attr("RTA_OIF") if routes else None
            if index is not None:
                name = self._ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
        except Exception:
            log.failure("mipproxy: route lookup for {address}", address=address)
        if len(self._cache) >= self._size:
            self._cache.clear()
        self._cache[address] = (now, name)
        return name


class RegistrationRelay:
    """Decides on every registration message and ICMP error the proxy sees."""

    def __init__(self, cfg: MipProxyConfig, store: Any, clock: Any, *, send_public: Send,
                 send_private: Send, metrics: Any = None,
                 wallclock: Callable[[], float] = time.time,
                 route_device: Callable[[str], str | None] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.send_public = send_public
        self.send_private = send_private
        self.wallclock = wallclock
        self.counters = Counters(metrics)
        self.numbers = cfg.numbers.draft_numbers()
        self._sas: dict[int, _SA] = {}
        for mn in cfg.mobile_nodes:
            self._sas[mn.spi] = _SA(mn.spi, mn.secret(), mn.home_address, mn.nai.encode(),
                                    mn.ha_spi or mn.spi)
        self._allowed_has = cfg.allowed_home_agents()
        #: FA address -> its FA-HA SA (RFC 5944 3.5.4); empty: no lookup per request
        self._fas: dict[str, _FASA] = {
            fa.address: _FASA(fa.address, fa.spi, fa.secret()) for fa in cfg.foreign_agents}
        #: (network, netmask) as integers: every request is located (2.6.1), and an
        #: ``ipaddress`` object per request cost more than the rest of the check
        self._internal = tuple((int(net.network_address), int(net.netmask)) for net in (
            ipaddress.IPv4Network(n, strict=False) for n in cfg.internal_networks))
        self._internal_ifs = frozenset(cfg.internal_interfaces)
        self._route_device = route_device or _KernelRoutes().device
        #: Bad input and denials are logged through aggregators: an attacker sending
        #: unauthenticated requests gets its 131s counted, not one log line each.
        self._droplog = Aggregator(log, "mipproxy: dropped", clock=clock)
        #: Set by the service when the data path runs: a Deferred that fires once the data
        #: path can carry a home address's traffic (its policy rules are in).  An accepting
        #: reply waits for it, so the MN's first packets never meet a half-built path.
        self.before_reply: Callable[[str], defer.Deferred] | None = None
        self._denylog = Aggregator(log, "mipproxy: denied", clock=clock)
        #: SPI -> the last identification accepted (RFC 5944 5.7); after a restart the
        #: identifications of the persisted bindings are the floor.
        self._last_ident: dict[int, int] = {}
        #: home agent -> its HA Parameter extension's bytes (configured HAs only: bounded)
        self._hap: dict[str, bytes] = {}
        #: the UDP Tunnel Reply extension's bytes, by its F bit (RFC 3519 3.2)
        self._udp_tunnel_reply = {forced: wire.encode_extension(wire.UDPTunnelReply(
            wire.UDP_TUNNEL_ACCEPTED, cfg.udp_keepalive, forced)) for forced in (False, True)}
        self._timestamps = cfg.replay == "timestamp"
        self._pub = socket.inet_aton(cfg.public_address) if cfg.public_address else bytes(4)
        #: what a request's home agent field must be (None: no MIPP-Pub, nothing matches)
        self._pub_field = self._pub if cfg.public_address else None
        self._priv = socket.inet_aton(cfg.private_address) if cfg.private_address else bytes(4)
        self._ha_bytes: dict[str, bytes] = {}  # configured HAs only: bounded

    # ------------------------------------------------------------------ helpers
    def _aton(self, ha: str) -> bytes:
        """A home agent's address as bytes (HAs come from the config: the cache is bounded)."""
        b = self._ha_bytes.get(ha)
        if b is None:
            b = self._ha_bytes[ha] = socket.inet_aton(ha)
        return b

    def _key_for_mn(self, spi: int) -> wire.AuthKey | None:
        sa = self._sas.get(spi)
        return None if sa is None else sa.auth_key

    def _drop(self, reason: str, detail: str) -> None:
        self.counters.inc("drop_" + reason)
        self._droplog.event(reason, "mipproxy: dropped ({reason}): {detail}", detail=detail)

    def stop(self) -> None:
        self._droplog.stop()
        self._denylog.stop()

    def _stored(self, d: defer.Deferred, what: str) -> None:
        # (not paused: its result is no Deferred; no isinstance of Deferred, an ABC check)
        if d.called and not d.paused and not isinstance(d.result, Failure):
            # Already durable (a memory store answers at once): it can no longer fail, and
            # an errback on a fired Deferred costs a callback run per write, three per
            # registration.
            return

        def failed(f: Failure) -> None:
            self.counters.inc("store_errors")
            log.failure("mipproxy: store write ({what}) failed", f, what=what)

        d.addErrback(failed)

    def _send(self, send: Send, data: bytes, addr: tuple[str, int]) -> None:
        if send(data, addr) is False:
            self.counters.inc("send_failed")

    def is_internal(self, address: str) -> bool:
        ip = _U32.unpack(socket.inet_aton(address))[0]
        for net, mask in self._internal:
            if ip & mask == net:
                return True
        return False

    def located_inside(self, where: str, src: str) -> bool:
        """2.6.1: #1 by address (the CoA, or the source when NATed, in internal_networks);
        #2 by interface: the one the route back to the source leaves through, which is the
        receiving interface when routing is symmetric -- what #2 presupposes ("the network
        design can guarantee" internal traffic arrives inside)."""
        if self.cfg.location_detection == "interface":
            return self._route_device(src) in self._internal_ifs
        return self.is_internal(where)

    def _with_fa_ha(self, data: bytes, dst: str) -> bytes:
        """A reply to a foreign agent with an FA-HA SA carries its FA-HA authenticator
        after the MN-HA one (RFC 5944 3.5.4, 3.8.3.1); any other reply goes as it is."""
        fa = self._fas.get(dst)
        return data if fa is None else wire.add_auth(data, wire.EXT_FA_HA_AUTH, fa.spi, fa.key)

    def _deny(self, code: int, home_address: str, identification: int, addr: tuple[str, int],
              sa: _SA | None, *, home_agent: str | None = None, nai: bytes | None = None,
              reason: str = "") -> None:
        """A Registration Reply from the proxy itself (a denial, or 206)."""
        exts: list[wire.Extension] = []
        if nai:
            exts.append(wire.NAIExtension(nai))
        if home_agent is not None:
            exts.append(wire.HAParameterExtension(home_agent))
        reply = wire.RegistrationReply(code, 0, home_address, self.cfg.public_address,
                                       identification, tuple(exts))
        data = wire.encode_reply(reply, self.numbers)
        if sa is not None:
            data = wire.add_mn_ha_auth(data, sa.spi, sa.key)
        if self._fas:
            data = self._with_fa_ha(data, addr[0])
        self.counters.inc("denied")
        self.counters.denied[code] = self.counters.denied.get(code, 0) + 1
        name = wire.reply_code_name(code, self.numbers)
        self._denylog.event(f"{code} {name}", "mipproxy: registration of {home} from {src} "
                            "denied: {reason}{why}", home=home_address,
                            src=f"{addr[0]}:{addr[1]}", why=f" ({reason})" if reason else "")
        self._send(self.send_public, data, addr)

    # ----------------------------------------------------------------- requests
    def request_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """A datagram of type 1 on MIPP-Pub:434.

        One walk over the message: the extension chain is split once, the MN-HA
        authenticator is checked on that chain, then its entries are decoded (records for
        what the relay reads, none for the authentication extensions), and the relayed
        request copies the extensions it passes on as they came."""
        cv = self.counters.values
        cv["requests_rx"] += 1
        if len(data) < wire.REQUEST_LEN:
            self._drop("short", f"request of {len(data)} bytes from {addr[0]}")
            return
        # 1. what a denial is addressed with: home address and identification
        _t, rflags, lifetime, home_b, ha_b, coa_b, identification = _REQ.unpack_from(data)
        home_address = _ntoa(home_b)
        # 2. authentication first (§2.1)
        chain = wire.split_extensions(data, wire.REQUEST_LEN)
        if isinstance(chain, str):
            self._deny(wire.REG_HA_POORLY_FORMED_REQUEST, home_address, identification, addr,
                       None, reason=chain)
            return
        spi, ok, auth_at = wire.find_auth(data, chain, wire.EXT_MN_HA_AUTH, self._key_for_mn)
        sa = self._sas.get(spi) if spi is not None else None
        if not ok or sa is None:
            cv["auth_failed"] += 1
            self._deny(wire.REG_HA_MN_FAILED_AUTH, home_address, identification, addr, sa,
                       reason="no MN-HA authentication extension" if spi is None
                       else f"MN-HA authentication failed (SPI {spi})")
            return
        # 2b. the foreign agent that relayed it, if one did (RFC 5944 3.8.2)
        fa = self._fas.get(addr[0]) if self._fas else None
        if fa is not None and not self._fa_ok(data, fa, home_address, identification, addr, sa):
            return
        # 3. the whole message (134 for what an HA cannot process, as decode_request says)
        try:
            exts = wire.decode_extensions(chain, self.numbers, wire.REG_HA_POORLY_FORMED_REQUEST,
                                          auth_records=False)
        except wire.MIPError as e:
            self._deny(wire.REG_HA_POORLY_FORMED_REQUEST, home_address, identification, addr,
                       sa, reason=e.reason)
            return
        coa = _ntoa(coa_b)
        via_fa = fa is not None
        if not via_fa and auth_at + 1 < len(chain):
            # extensions after the MN-HA one mark a request relayed by a foreign agent we
            # share no SA with: its FA-HA extension (34), or an MN-FA one (33) in a request
            # that does not come from its CoA (an MN talking to us directly has no use for
            # MN-FA; from its CoA it is a co-located MN that added one anyway)
            fa_types = (wire.EXT_FA_HA_AUTH,) if addr[0] == coa else (
                wire.EXT_FA_HA_AUTH, wire.EXT_MN_FA_AUTH)
            if any(t in fa_types for t, _off, _body in chain[auth_at + 1:]):
                if self.cfg.require_fa_sa:
                    cv["fa_auth_failed"] += 1
                    self._deny(wire.REG_HA_FA_FAILED_AUTH, home_address, identification, addr,
                               sa, reason=f"foreign agent {addr[0]} has no FA-HA SA "
                                          "(mipproxy.foreign_agents; require_fa_sa = true)")
                    return
                via_fa = True
        # one pass over the authenticated extensions (those before MN-HA): the NAI, the two
        # the proxy consumes, and the rest relayed as the MN sent them (2.2.1); the
        # authentication extensions (None here) stop at the proxy
        nai: bytes | None = None
        hap: wire.HAParameterExtension | None = None
        utr: wire.UDPTunnelRequest | None = None
        relayed: list[bytes] = []
        for n in range(auth_at):
            ext = exts[n]
            if ext is None:
                continue
            if type(ext) is wire.HAParameterExtension:
                hap = hap or ext
                continue
            if type(ext) is wire.UDPTunnelRequest:
                utr = utr or ext
                continue
            if type(ext) is wire.NAIExtension and nai is None:
                nai = ext.nai
            relayed.append(wire.raw_extension(data, chain[n]))
        # 4. the SA belongs to this MN
        if home_address == _ZERO:
            if nai is None:
                self._drop("zero_home_no_nai", f"from {addr[0]}: home address 0 and no NAI")
                return
        elif sa.home_address and home_address != sa.home_address:
            cv["auth_failed"] += 1
            self._deny(wire.REG_HA_MN_FAILED_AUTH, home_address, identification, addr,
                       sa, nai=nai, reason=f"SPI {spi} is not the SA of {home_address}")
            return
        if sa.nai and nai is not None and nai != sa.nai:
            cv["auth_failed"] += 1
            self._deny(wire.REG_HA_MN_FAILED_AUTH, home_address, identification, addr,
                       sa, nai=nai, reason=f"SPI {spi} is not the SA of that NAI")
            return
        if not sa.home_address and nai is None:
            self._deny(wire.REG_HA_MN_FAILED_AUTH, home_address, identification, addr,
                       sa, reason=f"SPI {spi} is an NAI SA; the request has no NAI")
            return
        # 5. replay protection
        if self._timestamps and not self._identification_ok(sa, identification):
            cv["replay_refused"] += 1
            ours = (ntp_seconds(self.wallclock()) << 32) | (identification & _LOW32)
            self._deny(wire.REG_HA_IDENTIFICATION_MISMATCH, home_address, ours, addr, sa,
                       nai=nai, reason="identification is not a fresh timestamp")
            return
        self._last_ident[sa.spi] = identification
        fa_utr: wire.UDPTunnelRequest | None = None
        if via_fa:
            cv["fa_relayed"] += 1
            if fa is not None:
                # RFC 3519 3.1: an FA that wants UDP tunnelling (it sits behind a NAT, or
                # forces it) adds its UDP Tunnel Request after the MN-HA extension, under
                # its FA-HA authenticator: honoured only from an FA whose SA checked out
                fa_utr = next((e for e in exts[auth_at + 1:]
                               if type(e) is wire.UDPTunnelRequest), None)
        self._relay_request(_Request(rflags, lifetime, home_address, home_b, ha_b, coa,
                                     identification), hap, fa_utr or utr, relayed, nai, sa,
                            addr, fa=addr[0] if via_fa else "", utr_by_fa=fa_utr is not None)

    def _fa_ok(self, data: bytes, fa: _FASA, home_address: str, identification: int,
               addr: tuple[str, int], sa: _SA) -> bool:
        """RFC 5944 3.8.2: a home agent sharing an SA with the FA checks its FA-HA
        authenticator after the MN-HA one, and answers a missing or wrong one 132."""
        try:
            spi, ok = wire.verify_fa_ha_auth(data, lambda s: fa.key if s == fa.spi else None)
        except wire.MIPError as e:
            self._deny(wire.REG_HA_POORLY_FORMED_REQUEST, home_address, identification, addr,
                       sa, reason=e.reason)
            return False
        if not ok:
            self.counters.inc("fa_auth_failed")
            self._deny(wire.REG_HA_FA_FAILED_AUTH, home_address, identification, addr, sa,
                       reason="no FA-HA authentication extension after the MN-HA one"
                       if spi is None else f"FA-HA authentication failed (SPI {spi})")
            return False
        return True

    def _identification_ok(self, sa: _SA, identification: int) -> bool:
        """RFC 5944 §5.7 timestamps: close to our clock, and newer than the last accepted."""
        stamp = identification >> 32
        now = ntp_seconds(self.wallclock())
        # modular difference: NTP seconds wrap in 2036
        diff = (stamp - now + (1 << 31)) % (1 << 32) - (1 << 31)
        if abs(diff) > self.cfg.replay_tolerance:
            return False
        last = self._last_ident.get(sa.spi)
        if last is None:
            last = max((b.identification for b in self.store.records(BINDING.name)
                        if b.spi == sa.spi), default=None)
        return last is None or identification > last

    def _relay_request(self, req: _Request, hap: wire.HAParameterExtension | None,
                       utr: wire.UDPTunnelRequest | None, relayed: list[bytes],
                       nai: bytes | None, sa: _SA, addr: tuple[str, int], fa: str = "",
                       utr_by_fa: bool = False) -> None:
        """Steps 6 and 7 for an authenticated request; ``relayed``: the extensions passed
        on to the HA, as bytes; ``fa``: the foreign agent it came through ("" if none);
        ``utr_by_fa``: ``utr`` is the FA's own (RFC 3519 3.1), not the MN's."""
        cfg = self.cfg
        deny = lambda code, why, **kw: self._deny(  # noqa: E731
            code, req.home_address, req.identification, addr, sa, nai=nai, reason=why, **kw)
        # 6. validity checks, as an HA (RFC 5944 §3.8.2, RFC 3024 §4.2)
        if req.home_agent != self._pub_field:
            deny(wire.REG_HA_UNKNOWN_HA_ADDRESS,
                 f"home agent field {_ntoa(req.home_agent)} is not MIPP-Pub")
            return
        rflags = req.flags
        if not rflags & wire.FLAG_T:
            deny(wire.REG_HA_REVERSE_TUNNEL_MANDATORY, "T bit not set (2.2.4)")
            return
        if rflags & wire.FLAG_M and rflags & wire.FLAG_G:
            deny(wire.REG_HA_ENCAPSULATION_UNAVAILABLE, "both M and G set")
            return
        if req.lifetime and req.care_of_address == _ZERO:
            deny(wire.REG_HA_POORLY_FORMED_REQUEST, "care-of address 0.0.0.0")
            return
        if hap is None:
            deny(self.numbers.missing_ha_parameter, "no HA Parameter extension (2.5.3)")
            return
        dynamic = hap.home_agent == _ZERO
        if dynamic:
            if nai is None or not cfg.ha_pool:
                deny(self.numbers.nonzero_ha_required,
                     "dynamic HA assignment needs an NAI" if nai is None
                     else "no HA pool for dynamic assignment")
                return
            ha = cfg.ha_pool[zlib.crc32(nai) % len(cfg.ha_pool)]
        else:
            ha = hap.home_agent
            if ha not in self._allowed_has:
                deny(wire.REG_HA_UNKNOWN_HA_ADDRESS, f"home agent {ha} is not configured")
                return
        # location detection (2.6.1): the CoA, or the source address when NATed; a request
        # a foreign agent relayed comes from the FA, not a NAT: located by its CoA (FA-COA)
        natted = addr[0] != req.care_of_address and not fa
        # an FA asking for UDP tunnelling is taken at its word as RFC 3519 4.1 has an HA
        # detect a NAT: its source (where its requests come from, a NAT's mapping if it sits
        # behind one) differs from its care-of address, or it forces the tunnel
        fa_natted = utr_by_fa and addr[0] != req.care_of_address
        where = addr[0] if natted else req.care_of_address
        if self.located_inside(where, addr[0]):
            deny(self.numbers.assigned_home_agent, f"{where} is internal: register with {ha}",
                 home_agent=ha)
            return
        udp = utr is not None and cfg.udp_tunnelling and (natted or fa_natted or utr.force)
        if udp and utr is not None and utr.encapsulation not in UDP_NEXT_HEADERS:
            # RFC 3519 3.1.4: the Encapsulation field is what the MN sends in the tunnel and
            # what it is sent; one we cannot carry is refused with RFC 3519's own code
            deny(wire.REG_HA_UDP_ENCAPSULATION_UNAVAILABLE,
                 f"UDP tunnel encapsulation {utr.encapsulation} (we carry 4, 47, 55)")
            return
        store = self.store
        if store.count(_PENDING) >= cfg.max_pending:
            deny(wire.REG_HA_INSUFFICIENT_RESOURCES, "pending registration list full",
                 home_agent=ha)
            return
        if not store.available:
            # store.backend = "redis" and Redis away: the registration could not be recorded
            # for the other nodes; existing bindings keep forwarding.
            self.counters.inc("store_unavailable")
            deny(wire.REG_HA_INSUFFICIENT_RESOURCES, "the shared store is unreachable", home_agent=ha)
            return
        # 7. the new request (2.2.1 - 2.2.3)
        lifetime = min(req.lifetime, cfg.max_lifetime)
        home = req.home_address
        now = self.clock.seconds()
        if rflags & wire.FLAG_S and cfg.simultaneous_bindings and home != _ZERO and lifetime:
            for b in store.lookup_all(_BINDING, "home", home):
                expires = store.expires(_BINDING, b.key)
                if expires is not None:
                    lifetime = max(lifetime, min(int(expires - now), cfg.max_lifetime))
        flags = rflags & (wire.FLAG_M | wire.FLAG_G)
        if rflags & wire.FLAG_B and cfg.broadcast:
            flags |= wire.FLAG_B
        else:
            flags |= wire.FLAG_D  # co-located CoA (MIPP-Priv); never with B (2.2.1)
        flags |= wire.FLAG_T
        # the relayed request from the fields: home address and identification as the MN sent
        # them, CoA = MIPP-Priv (2.2.1 - 2.2.3), the MN's extensions as it sent them, then
        # MN-HA under the SPI the HA knows
        covered = b"".join((_REQ.pack(wire.MSG_REGISTRATION_REQUEST, flags, lifetime, req.home,
                                      self._aton(ha), self._priv, req.identification),
                            *relayed, sa.ha_auth_header))
        out = covered + _authenticator(sa.auth_key, covered)
        nai_text = nai.decode("utf-8", "backslashreplace") if nai else ""
        if home != _ZERO:
            mn = home
        else:
            mn = "nai:" + nai_text
        udp_forced = bool(udp and utr is not None and utr.force)
        pending = Pending(
            mn=mn, ident_low=req.identification & _LOW32, identification=req.identification,
            home_agent=ha, care_of_address=req.care_of_address, lifetime=req.lifetime,
            relayed_lifetime=lifetime, spi=sa.spi, src_ip=addr[0], src_port=addr[1],
            home_address=home, nai=nai_text, flags=rflags, udp_tunnel=bool(udp),
            udp_forced=udp_forced,
            encapsulation="gre" if rflags & wire.FLAG_G else "minimal" if rflags & wire.FLAG_M
            else "ipip",
            udp_next_header=utr.encapsulation if udp and utr is not None else 4,
            dynamic_ha=dynamic, created=now, foreign_agent=fa,
            udp_for_fa=bool(udp and utr_by_fa))
        # no owner: pending entries go by their reply or their timeout, never by an owner
        self._stored(store.put(pending, ttl=cfg.pending_timeout), "pending registration")
        self.counters.values["requests_relayed"] += 1
        self._send(self.send_private, out, (ha, cfg.port))

    # ------------------------------------------------------------------ replies
    def _find_pending(self, home: str, identification: int, exts: list[wire.Extension | None],
                      src: str) -> Pending | None:
        low = identification & _LOW32
        get = self.store.get
        p = get(_PENDING, (home, low))
        if p is not None:
            return p
        for e in exts:
            if type(e) is wire.NAIExtension:
                p = get(_PENDING, ("nai:" + e.nai.decode("utf-8", "backslashreplace"), low))
                if p is not None:
                    return p
        # an HA that left out the NAI (203) or the home address (204): the one pending
        # entry for this HA and identification
        cands = [p for p in self.store.lookup_all(_PENDING, "home_agent", src)
                 if p.ident_low == low]
        return cands[0] if len(cands) == 1 else None

    def reply_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """A datagram of type 3 on MIPP-Priv:434, from an actual home agent.

        As for requests, one walk: the chain is split once, checked whole (what
        ``decode_reply`` refuses is dropped), the pending entry found, the MN-HA
        authenticator checked on the same chain."""
        cv = self.counters.values
        cv["replies_rx"] += 1
        if len(data) < wire.REPLY_LEN or data[0] != wire.MSG_REGISTRATION_REPLY:
            self._drop("reply_malformed", f"from {addr[0]}: not a registration reply of "
                                          f"{wire.REPLY_LEN} bytes or more")
            return
        chain = wire.split_extensions(data, wire.REPLY_LEN)
        try:
            if isinstance(chain, str):
                raise wire.MIPError(chain)
            exts = wire.decode_extensions(chain, self.numbers, auth_records=False)
        except wire.MIPError as e:
            self._drop("reply_malformed", f"from {addr[0]}: {e.reason}")
            return
        rep = _Reply(*_REP.unpack_from(data))
        home = _ntoa(rep.home)
        pending = self._find_pending(home, rep.identification, exts, addr[0])
        if pending is None:
            self._drop("unexpected_reply", f"from {addr[0]} for {home}")
            return
        if addr[0] != pending.home_agent:
            self._drop("reply_wrong_source", f"reply for {pending.mn} from {addr[0]}, "
                                             f"not {pending.home_agent}")
            return
        sa = self._sas.get(pending.spi)
        if sa is None:  # the SA went away with a config reload
            self._drop("reply_auth_failed", f"no SA {pending.spi}")
            return
        spi, ok, auth_at = wire.find_auth(data, chain, wire.EXT_MN_HA_AUTH, sa.key_for_ha)
        if not ok:
            self._drop("reply_auth_failed", f"reply for {pending.mn} from {addr[0]} (SPI {spi})")
            return
        self._relay_reply(data, rep, home, chain, exts, auth_at, pending, sa)

    def _relay_reply(self, data: bytes, rep: _Reply, home: str,
                     chain: list[tuple[int, int, bytes]], exts: list[wire.Extension | None],
                     auth_at: int, pending: Pending, sa: _SA) -> None:
        cfg = self.cfg
        n = self.numbers
        code = rep.code
        lifetime = rep.lifetime
        # the authenticated extensions (before MN-HA) are relayed as the HA sent them, but
        # for the HA Parameter and UDP Tunnel Reply ones, which are the proxy's own to send
        # (its HA Parameter names the actual HA, 2.5.3), and the authentication ones
        relayed: list[bytes] = [_REP.pack(wire.MSG_REGISTRATION_REPLY, 0, 0, rep.home,
                                          self._pub, rep.identification)]
        has_nai = False
        for i in range(auth_at):
            cls = type(exts[i])
            if cls is wire.NAIExtension:
                has_nai = True
            elif cls in _NOT_RELAYED:
                continue
            relayed.append(wire.raw_extension(data, chain[i]))
        if code < 64:
            if pending.nai and not has_nai:
                code = n.missing_nai
            elif rep.home == _ZERO_B:
                code = n.missing_home_address
            elif rep.home_agent == _ZERO_B:
                code = n.missing_home_agent
            elif code == wire.REG_ACCEPTED and pending.flags & wire.FLAG_S and \
                    not cfg.simultaneous_bindings:
                code = wire.REG_ACCEPTED_NO_SIMULTANEOUS
        if code < 64 and lifetime and not self._bind(home, rep.identification, lifetime,
                                                     pending):
            code = wire.REG_HA_INSUFFICIENT_RESOURCES
        if code < 64 and not lifetime:
            self._retire(home if home != _ZERO else pending.home_address, pending)
        hap = self._hap.get(pending.home_agent)
        if hap is None:  # one encoding per home agent, not one per reply
            hap = self._hap[pending.home_agent] = wire.encode_extension(
                wire.HAParameterExtension(pending.home_agent), n)
        relayed.append(hap)
        if pending.udp_tunnel and not pending.udp_for_fa:
            relayed.append(self._udp_tunnel_reply[pending.udp_forced])
        relayed.append(sa.mn_auth_header)
        relayed[0] = _REP.pack(wire.MSG_REGISTRATION_REPLY, code, lifetime, rep.home, self._pub,
                               rep.identification)
        covered = b"".join(relayed)
        out = covered + _authenticator(sa.auth_key, covered)
        if pending.udp_for_fa:
            # the answer to the FA's own request goes where it was: after the MN-HA
            # extension, for the FA, under its FA-HA authenticator (RFC 3519 3.2)
            out += self._udp_tunnel_reply[pending.udp_forced]
        if self._fas:
            out = self._with_fa_ha(out, pending.src_ip)
        self._stored(self.store.delete(_PENDING, (pending.mn, pending.ident_low)), "pending")
        cv = self.counters.values
        if code != rep.code and code >= 64:
            cv["denied"] += 1
            self.counters.denied[code] = self.counters.denied.get(code, 0) + 1
        cv["replies_relayed"] += 1
        if logs.enabled(_DEBUG):  # an event per registration costs more than the test
            log.debug("mipproxy: {home} via {coa}: home agent {ha} answered {code}, relayed "
                      "{out} lifetime {life}", home=home,
                      coa=pending.care_of_address, ha=pending.home_agent, code=rep.code,
                      out=code, life=lifetime)
        dst = (pending.src_ip, pending.src_port)
        if code < 64 and lifetime and self.before_reply is not None:
            self.before_reply(home).addCallback(
                lambda _: self._send(self.send_public, out, dst))
        else:
            self._send(self.send_public, out, dst)

    def _bind(self, home: str, identification: int, accepted: int, pending: Pending) -> bool:
        """Record the binding (2.6.6) before the reply goes out; False: cannot serve the MN.
        ``accepted``: the lifetime the HA granted."""
        store = self.store
        key = (home, pending.care_of_address)
        existing = store.get(_BINDING, key)
        if existing is None and store.count(_BINDING) >= self.cfg.max_bindings:
            return False
        simultaneous = bool(pending.flags & wire.FLAG_S) and self.cfg.simultaneous_bindings
        if simultaneous:
            # 2.6.2: the lesser of the accepted and the requested lifetime
            lifetime = min(accepted, pending.lifetime)
        else:
            lifetime = min(accepted, pending.relayed_lifetime or accepted)
            for old in store.lookup_all(_BINDING, "home", home):
                if old.key != key:
                    self._stored(store.delete(_BINDING, old.key), "binding")
                    self.counters.values["bindings_retired"] += 1
        udp = pending.udp_tunnel
        binding = Binding(
            home_address=home, care_of_address=pending.care_of_address,
            home_agent=pending.home_agent, identification=identification, lifetime=lifetime,
            spi=pending.spi, src_ip=pending.src_ip if udp else pending.care_of_address,
            src_port=pending.src_port if udp else 0,
            encapsulation="udp" if udp else pending.encapsulation, nai=pending.nai,
            udp_next_header=pending.udp_next_header, simultaneous=simultaneous,
            registered=self.clock.seconds(), foreign_agent=pending.foreign_agent,
        )
        try:
            d = store.put(binding, ttl=lifetime, owner=f"mip:{home}")
        except Exception:
            log.failure("mipproxy: binding for {home}", home=home)
            return False
        self._stored(d, "binding")
        if existing is None:
            self.counters.values["bindings_created"] += 1
        return True

    def _retire(self, home: str, pending: Pending) -> None:
        """A lifetime-0 reply: the bindings of this MN go (RFC 5944 §3.6.1.2 semantics)."""
        self.counters.inc("deregistrations")
        for b in self.store.lookup_all(BINDING.name, "home", home):
            if b.simultaneous and pending.care_of_address not in (b.care_of_address, home):
                continue
            self._stored(self.store.delete(BINDING.name, b.key), "binding")
            self.counters.inc("bindings_retired")

    # --------------------------------------------------------------------- ICMP
    def icmp_received(self, packet: bytes) -> None:
        """An ICMP message for this host (raw socket): destination unreachables about a
        request we relayed become replies to the MN (2.6.7)."""
        try:
            hl = (packet[0] & 0x0F) << 2
            icmp, body = codec.parse_icmp(packet[hl:])
            if icmp.type != codec.ICMP_DEST_UNREACH:
                return
            inner, quoted = codec.parse_icmp_error(body)
        except (codec.CodecError, IndexError):
            return
        if inner.protocol != codec.PROTO_UDP or len(quoted) < 8:
            return
        sport, dport = struct.unpack_from("!HH", quoted)
        if sport != self.cfg.port or dport != self.cfg.port:
            return
        ha = codec.addr_to_str(inner.dst)
        payload = quoted[8:]
        low = None
        if len(payload) >= wire.REQUEST_LEN and payload[0] == wire.MSG_REGISTRATION_REQUEST:
            low = struct.unpack_from("!Q", payload, 16)[0] & _LOW32
        hit = [p for p in self.store.lookup_all(PENDING.name, "home_agent", ha)
               if low is None or p.ident_low == low]
        if not hit:
            return
        self.counters.inc("icmp_errors")
        code = self._icmp_code(icmp.code)
        for p in hit:
            sa = self._sas.get(p.spi)
            self._stored(self.store.delete(PENDING.name, (p.mn, p.ident_low)), "pending")
            self._deny(code, p.home_address, p.identification, (p.src_ip, p.src_port), sa,
                       home_agent=ha, nai=p.nai.encode() if p.nai else None,
                       reason=f"ICMP unreachable code {icmp.code} from {ha}")

    def _icmp_code(self, icmp_code: int) -> int:
        if self.cfg.icmp_codes == "draft":
            return self.numbers.ha_unreachable
        return {0: wire.REG_FA_HOME_NETWORK_UNREACHABLE, 1: wire.REG_FA_HA_HOST_UNREACHABLE,
                3: wire.REG_FA_HA_PORT_UNREACHABLE}.get(icmp_code, wire.REG_FA_HA_UNREACHABLE)

    # ------------------------------------------------------------- store events
    def store_changed(self, change: Any) -> None:
        if change.kind == PENDING.name and change.op == "delete" and change.reason == "expired":
            self.counters.inc("pending_expired")
        elif change.kind == BINDING.name and change.op == "delete" and change.reason == "expired":
            self.counters.inc("bindings_retired")
