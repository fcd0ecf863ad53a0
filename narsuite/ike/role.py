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


def _engine2(daemon: Any) -> Any:
    return daemon.namespace["ike"].get("engine2")


def _sas(daemon: Any) -> Table:
    now = time.time()
    rows = []
    for r in daemon.store.records(IKE_SA.name):
        age = f"{now - r.established:.0f}s" if r.established else "-"
        version = 2 if r.exchange == "ikev2" else 1
        rows.append((r.name, version, f"{r.remote_ip}:{r.remote_port}", r.state, r.policy, r.peer_id,
                     r.xauth_user or "-", r.address or "-", r.algorithms, r.natt or "-", r.nat or "-", r.children, age))
    rows.sort()
    return Table(("name", "version", "remote", "state", "policy", "peer id", "user", "address", "algorithms", "nat-t",
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
    engine2 = _engine2(daemon)
    for sa2 in engine2.sas.values() if engine2 is not None else ():
        if sa2.name.startswith(name):
            fields = [
                ("name", sa2.name), ("version", 2), ("SPIs", f"{sa2.spi_i.hex()} {sa2.spi_r.hex()}"),
                ("state", sa2.state), ("remote", f"{sa2.remote[0]}:{sa2.remote[1]}"),
                ("local", f"{sa2.local_ip}:{sa2.local_port}"), ("policy", sa2.policy.name if sa2.policy else "-"),
                ("peer id", sa2.peer_id_text or "-"), ("eap user", sa2.eap_user or "-"),
                ("algorithms", sa2.choice.describe() if sa2.choice else "-"), ("peer behind NAT", sa2.nat_peer),
                ("we are behind NAT", sa2.nat_local), ("mobike", sa2.mobike), ("address", sa2.address or "-"),
                ("expires in", f"{sa2.expires - engine2.now():.0f}s" if sa2.expires else "-"),
            ]
            for c in sa2.children:
                fields.append((f"child {c.peer}", f"{c.description} {c.tsi} <-> {c.tsr} in {c.spi_in:#010x} "
                                                  f"out {c.spi_out:#010x}"))
            return Record(tuple(fields), title=f"IKEv2 SA {sa2.name}")
    raise CommandError(f"no IKE SA {name!r}; see `narctl ike sas`")


def _delete(daemon: Any, name: str) -> Record:
    engine2 = _engine2(daemon)
    if not _engine(daemon).delete(name) and not (engine2 is not None and engine2.delete(name)):
        raise CommandError(f"no IKE SA {name!r}; see `narctl ike sas`")
    return Record((("deleted", name),), title="ike delete")


def _stats(daemon: Any) -> Table:
    counters = _engine(daemon).counters
    rows = tuple((k, v) for k, v in sorted(counters.items()) if v)
    engine2 = _engine2(daemon)
    if engine2 is not None:  # IKEv2's counters, prefixed: some names mean other things there
        rows += tuple((f"v2 {k}", v) for k, v in sorted(engine2.counters.items()) if v)
    return Table(("counter", "value"), rows, title=f"ike counters at {time.strftime('%X')}")


ROLE = RoleSpec(
    name="ike",
    description="IKEv1 and IKEv2 responder: NAT traversal, XAUTH/EAP, mode-config/CP, DPD/liveness "
                "(RFC 2409, 3947, 3706, 7296)",
    config_class=IkeConfig,
    make_service=IkeService,
    kinds=(*SADB_KINDS, *IKE_KINDS),
    # ESP children's keys and IKE SAs live in memory only; mode-config leases
    # ("ike:lease:...") are durable: a client gets its address back after a restart
    volatile_owners=("ike:sa:", "ike:child:"),
    commands=(
        Command("ike sas", "IKE SAs of both versions: peer, identity, user, address, algorithms, NAT", _sas),
        Command("ike sa", "one ISAKMP SA in full, with its ESP children", _sa, args=("name",)),
        Command("ike delete", "delete an ISAKMP SA and its children (Delete payloads sent)", _delete,
                args=("name",)),
        Command("ike stats", "responder counters (drops by reason, exchanges, DPD, XAUTH)", _stats),
    ),
)
