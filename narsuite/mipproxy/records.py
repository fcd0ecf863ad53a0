"""The mipproxy role's store kinds: pending registrations, mobility bindings, replay state.

No key material lives here: the MN-HA keys stay in the config object in memory
(never persisted, never shown), so every kind can be persisted and shown by
``narctl list``.

* ``mip.pending`` (draft 2.6.5) — a request relayed to an actual HA, waiting
  for its reply; its store TTL is the remaining lifetime of the pending entry.
  Matched by (home address or NAI, low 32 bits of the identification): a home
  agent answering 133 puts its own time in the high 32 bits.
* ``mip.binding`` (draft 2.6.6) — an accepted registration; TTL = the accepted
  lifetime.  The data path finds the MN's care-of address (or the NAT mapping
  for RFC 3519 UDP tunnelling) here by home address.

The last identification accepted per SA (RFC 5944 5.7) is kept in memory by the
relay; after a restart the identifications of the persisted bindings are the
floor, so a replayed request is refused then too.
"""

from __future__ import annotations

import attrs

from narsuite.store import Index, KindSpec

__all__ = ["Pending", "Binding", "PENDING", "BINDING", "KINDS",
           "ENCAPSULATIONS", "UDP_NEXT_HEADERS"]

#: How the proxy tunnels to the MN: IP-in-IP (RFC 2003), GRE (RFC 2784), minimal
#: encapsulation (RFC 2004), or inside UDP 434 (RFC 3519, with one of the three inside:
#: ``udp_next_header``).
ENCAPSULATIONS = ("ipip", "gre", "minimal", "udp")
#: RFC 3519 tunnel data next headers the proxy carries, by name.
UDP_NEXT_HEADERS = {4: "ipip", 47: "gre", 55: "minimal"}


@attrs.frozen
class Pending:
    mn: str  # home address, or "nai:<nai>" when the home address is zero (2.6.3)
    ident_low: int  # low 32 bits of the identification
    identification: int
    home_agent: str  # IP destination of the actual HA
    care_of_address: str  # as in the MN's request
    lifetime: int  # the MN's requested lifetime
    relayed_lifetime: int  # what went to the HA
    spi: int  # the MN's SA
    src_ip: str  # where the MN's request came from (the NAT's address when NATed)
    src_port: int
    home_address: str = "0.0.0.0"
    nai: str = ""
    flags: int = 0
    udp_tunnel: bool = False  # RFC 3519 tunnelling agreed with the MN
    udp_forced: bool = False
    encapsulation: str = "ipip"
    #: RFC 3519 3.1.4: what the MN puts inside the UDP tunnel (4, 47 or 55), and what we send back
    udp_next_header: int = 4
    dynamic_ha: bool = False  # the HA was picked from the pool (2.6.4)
    created: float = 0.0
    #: the foreign agent the request came through (RFC 5944 3.8.2; its source address),
    #: "" for a co-located MN
    foreign_agent: str = ""
    #: UDP tunnelling asked by that FA (its own UDP Tunnel Request, RFC 3519 3.1): the
    #: tunnel ends at the FA, and the UDP Tunnel Reply goes to it after the MN-HA extension
    udp_for_fa: bool = False


@attrs.frozen
class Binding:
    home_address: str
    care_of_address: str
    home_agent: str
    identification: int
    lifetime: int  # the lifetime in force (2.6.2: min of accepted and requested)
    spi: int
    src_ip: str  # where to tunnel to: the CoA, or the NAT's mapped address (UDP)
    src_port: int
    encapsulation: str = "ipip"
    nai: str = ""
    #: with encapsulation "udp": the tunnel data next header both ways (4, 47, 55; RFC 3519)
    udp_next_header: int = 4
    simultaneous: bool = False
    registered: float = 0.0
    #: the foreign agent the MN registered through (its address, where the proxy sends
    #: the MN's replies and tunnels its traffic: RFC 5944 3.8.3, 4.2.3), "" if co-located
    foreign_agent: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.home_address, self.care_of_address)



PENDING = KindSpec(
    name="mip.pending",
    record=Pending,
    key=lambda r: (r.mn, r.ident_low),
    indexes=(Index("home_agent", lambda r: r.home_agent, unique=False),),
    columns=("mn", "home_agent", "care_of_address", "identification", "lifetime", "src_ip",
             "src_port", "udp_tunnel"),
    description="Mobile IP registrations relayed to a home agent, waiting for its reply (2.6.5)",
)

BINDING = KindSpec(
    name="mip.binding",
    record=Binding,
    key=lambda r: (r.home_address, r.care_of_address),
    indexes=(
        Index("home", lambda r: r.home_address, unique=False),
        Index("tunnel_src", lambda r: (r.src_ip, r.src_port), unique=False),
    ),
    columns=("home_address", "care_of_address", "home_agent", "lifetime", "src_ip", "src_port",
             "encapsulation", "nai", "foreign_agent"),
    description="Mobile IP mobility bindings: where each mobile node is (2.6.6)",
)

KINDS = (PENDING, BINDING)
