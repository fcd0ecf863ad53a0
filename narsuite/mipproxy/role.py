"""The mipproxy role: a Mobile IPv4 proxy in the DMZ (draft-adrangi-mobileip-vpn-traversal-02)."""

from __future__ import annotations

import time
from typing import Any

from narsuite.control.commands import Command, Table
from narsuite.mipproxy import wire
from narsuite.mipproxy.config import MipProxyConfig, check_running
from narsuite.mipproxy.records import BINDING, KINDS, PENDING, UDP_NEXT_HEADERS
from narsuite.mipproxy.service import MipProxyService
from narsuite.roles import RoleSpec

__all__ = ["ROLE"]


def _service(daemon: Any) -> Any:
    return daemon.namespace["mipproxy"]["service"]


def _remaining(daemon: Any, kind: str, key: Any) -> Any:
    expires = daemon.store.expires(kind, key)
    return None if expires is None else max(0, round(expires - daemon.reactor.seconds(), 1))


def _encap(encapsulation: str, next_header: int) -> str:
    """"udp" carries IP-in-IP (the common case, RFC 3519's default); "udp/gre" and
    "udp/minimal" name the other tunnel data next headers."""
    if encapsulation != "udp" or next_header == 4:
        return encapsulation
    return "udp/" + UDP_NEXT_HEADERS.get(next_header, str(next_header))


def _bindings(daemon: Any) -> Table:
    rows = []
    for key, b, _exp, _owner in daemon.store.items(BINDING.name):
        tunnel = f"{b.src_ip}:{b.src_port}" if b.encapsulation == "udp" else b.src_ip
        rows.append((b.home_address, b.nai or "-", b.care_of_address, b.foreign_agent or "-",
                     b.home_agent, _encap(b.encapsulation, b.udp_next_header), tunnel,
                     b.lifetime, _remaining(daemon, BINDING.name, key),
                     f"{b.identification:#018x}"))
    rows.sort()
    return Table(("home_address", "nai", "care_of", "foreign_agent", "home_agent", "encap",
                  "tunnel_to", "lifetime", "remaining_s", "identification"), tuple(rows),
                 title="mobility bindings (2.6.6)")


def _pending(daemon: Any) -> Table:
    rows = []
    for key, p, _exp, _owner in daemon.store.items(PENDING.name):
        rows.append((p.mn, p.home_agent, p.care_of_address, f"{p.src_ip}:{p.src_port}",
                     p.lifetime, p.relayed_lifetime,
                     _encap("udp" if p.udp_tunnel else p.encapsulation, p.udp_next_header),
                     f"{p.identification:#018x}", _remaining(daemon, PENDING.name, key)))
    rows.sort()
    return Table(("mn", "home_agent", "care_of", "source", "lifetime", "relayed_lifetime",
                  "encap", "identification", "remaining_s"), tuple(rows),
                 title="pending registrations (2.6.5)")


def _stats(daemon: Any) -> Table:
    svc = _service(daemon)
    relay = svc.relay
    rows = sorted(relay.counters.values.items())
    numbers = relay.numbers
    rows += sorted((f"denied.{code}.{wire.reply_code_name(code, numbers)}", n)
                   for code, n in relay.counters.denied.items())
    if svc.datapath is not None:
        rows += sorted((f"data.{k}", v) for k, v in svc.datapath.counters.items())
    rows += sorted((f"udp.public.{k}", v) for k, v in svc.public.stats().items())
    rows += sorted((f"udp.private.{k}", v) for k, v in svc.private.stats().items())
    return Table(("counter", "value"), tuple(rows),
                 title=f"mipproxy counters at {time.strftime('%X')}")


ROLE = RoleSpec(
    name="mipproxy",
    description="Mobile IPv4 proxy: registration relay and tunnels through the VPN gateway "
                "(draft-adrangi-mobileip-vpn-traversal-02)",
    config_class=MipProxyConfig,
    make_service=MipProxyService,
    kinds=KINDS,
    commands=(
        Command("mip bindings", "mobility bindings: home address, care-of, foreign agent, "
                "home agent, tunnel, remaining lifetime", _bindings),
        Command("mip pending", "registrations relayed to a home agent, waiting for its reply",
                _pending),
        Command("mip stats", "relay and data-path counters: drops by reason, denials by code",
                _stats),
    ),
    check_config=check_running,
)
