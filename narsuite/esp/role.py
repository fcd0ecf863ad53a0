"""The esp role: ESP-in-UDP endpoint on 4500 and the remote-access data path."""

from __future__ import annotations

import time
from typing import Any

from narsuite.control.commands import Command, CommandError, Record, Table
from narsuite.esp import transform
from narsuite.esp.config import EspConfig
from narsuite.esp.records import KINDS, PEER, SA_KIND
from narsuite.esp.service import EspService
from narsuite.roles import RoleSpec

__all__ = ["ROLE"]


def _service(daemon: Any) -> EspService:
    return daemon.namespace["esp"]["service"]


def _sas(daemon: Any) -> Table:
    svc = _service(daemon)
    rows = []
    for sa in daemon.store.records(SA_KIND.name):
        peer = daemon.store.get(PEER.name, sa.peer)
        remote = f"{peer.remote_ip}:{peer.remote_port}" if peer and peer.remote_ip else "-"
        if sa.direction == "in":
            ictx = svc.engine.inbound_sa(sa.spi)
            stats = ictx.counters() if ictx is not None else {}
            replay = ictx.replay_state() if ictx is not None else {}
            top = replay.get("top", "-")
        else:
            octx = svc.engine.outbound_sa(sa.peer)
            if octx is not None and octx.spi == sa.spi:  # the current outbound SA
                stats = {"packets": octx.packets, "bytes": octx.bytes}
                top = octx.seq
            else:
                stats, top = {}, "-"
        errors = sum(v for k, v in stats.items() if k not in ("packets", "bytes"))
        rows.append((f"{sa.spi:#010x}", sa.direction, sa.peer, transform.describe(sa.enc, sa.integ, sa.enc_key),
                     peer.encap if peer else "-", remote, stats.get("packets", 0),
                     stats.get("bytes", 0), errors, top))
    rows.sort(key=lambda r: (r[2], r[1]))
    return Table(("spi", "dir", "peer", "transform", "encap", "remote", "packets", "bytes",
                  "errors", "seq/top"), tuple(rows), title="esp SAs")


def _sa(daemon: Any, spi: str) -> Record:
    """One SA in full: transform, endpoints, every counter, the replay window."""
    svc = _service(daemon)
    try:
        number = int(spi, 0)
    except ValueError:
        raise CommandError(f"SPI {spi!r} is not a number (e.g. 0x1001 or 4097)") from None
    found = [sa for sa in daemon.store.records(SA_KIND.name) if sa.spi == number]
    if not found:
        raise CommandError(f"no SA with SPI {number:#x}; see `narctl esp sas`")
    sa = found[0]
    peer = daemon.store.get(PEER.name, sa.peer)
    fields: list[tuple[str, Any]] = [
        ("spi", f"{sa.spi:#010x}"), ("direction", sa.direction), ("peer", sa.peer),
        ("transform", transform.describe(sa.enc, sa.integ, sa.enc_key)), ("esn", sa.esn),
        ("mode", peer.mode if peer else "-"), ("encap", peer.encap if peer else "-"),
        ("remote", f"{peer.remote_ip}:{peer.remote_port}" if peer and peer.remote_ip else "-"),
    ]
    if sa.direction == "in":
        ictx = svc.engine.inbound_sa(sa.spi)
        if ictx is not None:
            fields += list(ictx.counters().items())
            fields += [(f"replay.{k}", v) for k, v in ictx.replay_state().items()]
    else:
        octx = svc.engine.outbound_sa(sa.peer)
        if octx is not None and octx.spi == sa.spi:
            fields += [("packets", octx.packets), ("bytes", octx.bytes), ("seq", octx.seq),
                       ("needs_rekey", octx.needs_rekey)]
    return Record(tuple(fields), title=f"esp SA {sa.spi:#x}")


def _peers(daemon: Any) -> Table:
    svc = _service(daemon)
    now = daemon.reactor.seconds()
    rows = []
    for p in daemon.store.records(PEER.name):
        st = svc.engine.peer_state(p.name)
        rows.append((p.name, p.mode, p.encap, f"{p.remote_ip}:{p.remote_port}" if p.remote_ip else "-",
                     p.policy, p.inner or ",".join(p.allowed) or "-", "on" if p.keepalive else "off",
                     st.keepalives_sent, st.keepalives_rx, st.sas,
                     round(now - st.last_rx, 1) if st.last_rx else None))
    return Table(("peer", "mode", "encap", "remote", "policy", "inner", "keepalive", "ka_sent",
                  "ka_rx", "sas", "idle_rx_s"), tuple(sorted(rows)), title="esp peers")


def _stats(daemon: Any) -> Table:
    svc = _service(daemon)
    rows = sorted(svc.engine.counters.values.items())
    rows += sorted((f"udp.{k}", v) for k, v in svc.udp.stats().items())
    if svc.tun is not None:
        rows += sorted((f"tun.{k}", v) for k, v in svc.tun.counters.as_dict().items()
                       if not isinstance(v, dict))
    return Table(("counter", "value"), tuple(rows), title=f"esp counters at {time.strftime('%X')}")


ROLE = RoleSpec(
    name="esp",
    description="ESP-in-UDP endpoint on port 4500 and the remote-access data path (RFC 3948)",
    config_class=EspConfig,
    make_service=EspService,
    kinds=KINDS,
    commands=(
        Command("esp sas", "security associations with peers, endpoints, counters, replay state", _sas),
        Command("esp sa", "one SA in full: counters and the replay window", _sa, args=("spi",)),
        Command("esp peers", "remote peers: NAT-mapped endpoint, policy, inner address, keepalives",
                _peers),
        Command("esp stats", "data-plane counters (drops by reason, keepalives, TUN)", _stats),
    ),
)
