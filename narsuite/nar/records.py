"""What the nar role keeps in the shared store.

* ``nar.session`` — one control connection in NAR mode: who the client X is
  (Xa, from the TCP connection), the remote Y (DST.ADDR of NAR-MODE), the
  address lent (Nb, BND.ADDR of the reply) and the delivery flags granted.
* ``nar.mapping`` — one section 2.6 tuple bound to a session, with one
  unique index per demultiplexing tuple so the data plane finds the client
  of an inbound packet with a single dict lookup.

Both are bound to their control connection (owner = the session id): when
it closes they go.  They are not persisted — a mapping cannot outlive the TCP
connection that holds it, and a restarted daemon has no connections.
"""

from __future__ import annotations

import attrs

from narsuite.store import Index, KindSpec

__all__ = ["NarSession", "NarMapping", "SESSION", "MAPPING", "KINDS", "SESSION_OWNER_PREFIX"]

#: Session ids (the owner of a session's mappings and leases) start with this: sessions are
#: never persisted, so after a crash whatever such an owner held is dropped at load.
SESSION_OWNER_PREFIX = "nar-"


@attrs.frozen
class NarSession:
    id: str
    client: str  # Xa
    remote: str  # Yb (NAR-MODE DST.ADDR)
    lent: str  # Nb (NAR-MODE reply BND.ADDR)
    translated: bool = False
    gre: bool = False
    l2tp: bool = False
    user: str = ""


@attrs.frozen
class NarMapping:
    id: str  # "<session>/<n>"
    session: str
    kind: str  # "icmp" | "ipsec" | "tunnel" | "tcp" | "udp"
    proto: int  # 1, 50, 51, 4, 47, 6, 17
    client: str  # Xa
    lent: str  # Nb
    remote: str  # Yb
    translated: bool = False  # delivery mode of this mapping
    encap: str = "ipip"  # end-to-end delivery: "ipip" or "gre"
    icmp_id: int = 0
    spi: int = 0
    inner: str = ""  # LTUN.ADDR (tunnel): X's home/inner address Xb
    port: int = 0  # tcp/udp: the port on Nb
    remote_port: int = 0  # tcp: Y's port (0: any)


def _tuple(kind: str):
    if kind == "icmp":
        return lambda m: (m.lent, m.remote, m.icmp_id) if m.kind == "icmp" else None
    if kind == "ipsec":
        return lambda m: (m.proto, m.spi, m.lent) if m.kind == "ipsec" else None
    if kind == "tunnel":
        return lambda m: (m.remote, m.inner, m.lent) if m.kind == "tunnel" else None
    if kind == "udp":
        return lambda m: (m.lent, m.port) if m.kind == "udp" else None
    return lambda m: (m.lent, m.port, m.remote, m.remote_port) if m.kind == "tcp" else None


SESSION = KindSpec(
    name="nar.session",
    record=NarSession,
    key=lambda r: r.id,
    indexes=(Index("client", lambda r: r.client, unique=False),),
    persist=False,
    columns=("client", "remote", "lent", "translated", "gre", "user"),
    description="NAR-mode control connections (Xa, Yb, Nb, delivery flags)",
)

MAPPING = KindSpec(
    name="nar.mapping",
    record=NarMapping,
    key=lambda r: r.id,
    indexes=(
        # section 2.6 demultiplexing tuples, one unique index each
        Index("icmp", _tuple("icmp")),  # (Nb, Yb, ICMP id)            2.6.1
        Index("ipsec", _tuple("ipsec")),  # (protocol, SPI, Nb)        2.6.2
        Index("tunnel", _tuple("tunnel")),  # (Yb, inner Xb, Nb)       2.6.3, IP-in-IP and GRE
        Index("udp", _tuple("udp")),  # (Nb, port)                     2.6.1
        Index("tcp", _tuple("tcp")),  # (Nb, port, Yb, Y port)         2.6.1
        Index("session", lambda m: m.session, unique=False),
        Index("client", lambda m: m.client, unique=False),  # anti-spoofing on the way out
        # (Nb, Yb, protocol): whose flow an ICMP error quoting ESP/AH/a tunnel is about
        Index("outflow", lambda m: (m.lent, m.remote, m.proto), unique=False),
    ),
    persist=False,
    columns=("kind", "proto", "client", "lent", "remote", "translated", "encap", "icmp_id", "spi",
             "inner", "port"),
    description="NAR mappings: section 2.6 tuples bound to a NAR-mode control connection",
)

KINDS = (SESSION, MAPPING)
