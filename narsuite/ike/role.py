"""The ike role: IKEv1 responder with NAT traversal, XAUTH and mode-config."""

from __future__ import annotations

import time
from typing import Any

from narsuite.control.commands import Command, CommandError, Record, Table
from narsuite.ike.config import IkeConfig
from narsuite.ike.records import IKE_SA
from narsuite.ike.records import KINDS as IKE_KINDS
from narsuite.ike.service import IkeService
from narsuite.roles import RoleSpec
from narsuite.sadb import KINDS as SADB_KINDS

__all__ = ["ROLE"]


def _engine(daemon: Any) -> Any:
    return daemon.namespace["ike"]["engine"]


def _sas(daemon: Any) -> Table:
    now = time.time()
    rows = []
    for r in daemon.store.records(IKE_SA.name):
        age = f"{now - r.established:.0f}s" if r.established else "-"
        rows.append((r.name, f"{r.remote_ip}:{r.remote_port}", r.state, r.policy, r.peer_id, r.xauth_user or "-",
                     r.address or "-", r.algorithms, r.natt or "-", r.nat or "-", r.children, age))
    rows.sort()
    return Table(("name", "remote", "state", "policy", "peer id", "user", "address", "algorithms", "nat-t",
                  "nat", "children", "age"), tuple(rows), title="IKE SAs")


def _sa(daemon: Any, name: str) -> Record:
    engine = _engine(daemon)
    for sa in engine.sas.values():
        if sa.name.startswith(name):
            fields: list[tuple[str, Any]] = [
                ("name", sa.name), ("cookies", f"{sa.icky.hex()} {sa.rcky.hex()}"), ("state", sa.state),
                ("remote", f"{sa.remote[0]}:{sa.remote[1]}"), ("local", f"{sa.local_ip}:{sa.local_port}"),
                ("policy", sa.policy.name if sa.policy else "-"), ("peer id", sa.peer_id_text or "-"),
                ("certificate", sa.peer_cert_subject or "-"),
                ("algorithms", sa.choice.describe() if sa.choice else "-"),
                ("nat-t", sa.variant.name if sa.variant else "-"), ("peer behind NAT", sa.nat_peer),
                ("we are behind NAT", sa.nat_local), ("dpd", sa.peer_dpd), ("xauth user", sa.xauth_user or "-"),
                ("address", sa.address or "-"), ("expires in", f"{sa.expires - engine._now():.0f}s"),
            ]
            for c in sa.children:
                fields.append((f"child {c.peer}", f"{c.description} in {c.spi_in:#010x} out {c.spi_out:#010x}"))
            return Record(tuple(fields), title=f"IKE SA {sa.name}")
    raise CommandError(f"no IKE SA {name!r}; see `narctl ike sas`")


def _delete(daemon: Any, name: str) -> Record:
    if not _engine(daemon).delete(name):
        raise CommandError(f"no IKE SA {name!r}; see `narctl ike sas`")
    return Record((("deleted", name),), title="ike delete")


def _stats(daemon: Any) -> Table:
    counters = _engine(daemon).counters
    rows = tuple((k, v) for k, v in sorted(counters.items()) if v)
    return Table(("counter", "value"), rows, title=f"ike counters at {time.strftime('%X')}")


ROLE = RoleSpec(
    name="ike",
    description="IKEv1 responder: NAT traversal, XAUTH, mode-config, DPD (RFC 2409, 3947, 3706)",
    config_class=IkeConfig,
    make_service=IkeService,
    kinds=(*SADB_KINDS, *IKE_KINDS),
    # ESP children's keys and IKE SAs live in memory only; mode-config leases
    # ("ike:lease:...") are durable: a client gets its address back after a restart
    volatile_owners=("ike:sa:", "ike:child:"),
    commands=(
        Command("ike sas", "ISAKMP SAs: peer, identity, user, address, algorithms, NAT", _sas),
        Command("ike sa", "one ISAKMP SA in full, with its ESP children", _sa, args=("name",)),
        Command("ike delete", "delete an ISAKMP SA and its children (Delete payloads sent)", _delete,
                args=("name",)),
        Command("ike stats", "responder counters (drops by reason, exchanges, DPD, XAUTH)", _stats),
    ),
)
