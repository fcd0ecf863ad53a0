"""What the ike role shows in the store: one summary record per ISAKMP SA.

Key material never leaves the engine; this record is for operators (narctl,
Prometheus, the manhole) and for other processes that want to know who is
connected.  Not persisted: after a restart peers negotiate again.
"""

from __future__ import annotations

import attrs

from narsuite.store import Index, KindSpec

__all__ = ["IkeSaRecord", "IKE_SA", "KINDS"]


@attrs.frozen
class IkeSaRecord:
    name: str
    remote_ip: str
    remote_port: int
    local_port: int
    state: str
    exchange: str
    policy: str
    peer_id: str
    algorithms: str
    natt: str
    nat: str
    xauth_user: str
    address: str
    children: int
    established: float
    expires: float


IKE_SA = KindSpec(
    name="ike.sa",
    record=IkeSaRecord,
    key=lambda r: r.name,
    indexes=(Index("remote_ip", lambda r: r.remote_ip, unique=False),),
    persist=False,
    columns=("name", "remote_ip", "remote_port", "state", "policy", "peer_id", "xauth_user", "address",
             "children"),
    description="IKE (ISAKMP) SAs: peer, state, algorithms, NAT, remote-access user and address",
)

KINDS = (IKE_SA,)
