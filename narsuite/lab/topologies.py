"""Ready-made lab topologies used by the integration tests.

Each function takes a :class:`~narsuite.lab.netns.Lab`, builds the hosts,
links, switches, routes and NAT rules, and returns a frozen attrs object
holding the hosts and every address (plain IPs, no prefix length; networks
are CIDR strings).  The diagrams are repeated in ``docs/lab.md``.
"""

from __future__ import annotations

import attrs

from .netns import Host, Lab, Segment

__all__ = [
    "MipTopology",
    "NarTopology",
    "RemoteAccessTopology",
    "mip_topology",
    "nar_topology",
    "remote_access_topology",
]


@attrs.frozen
class NarTopology:
    """X -- N -- Y: see :func:`nar_topology`."""

    x: Host
    n: Host
    y: Host
    private_net: str = "10.0.0.0/24"
    public_net: str = "192.0.2.0/24"
    x_addr: str = "10.0.0.10"
    n_private: str = "10.0.0.1"
    n_public: str = "192.0.2.1"
    y_addr: str = "192.0.2.10"
    x_if: str = "eth0"
    n_private_if: str = "lan0"
    n_public_if: str = "wan0"
    y_if: str = "eth0"


def nar_topology(lab: Lab) -> NarTopology:
    """The NAR case: X's address is not routable for Y.

    ::

        private 10.0.0.0/24                    "public" 192.0.2.0/24
        +---------------+          +-------------------+          +----------------+
        | X             |          | N  (forwards)     |          | Y              |
        | eth0          |----------| lan0        wan0  |----------| eth0           |
        | 10.0.0.10     |          | 10.0.0.1  192.0.2.1          | 192.0.2.10     |
        +---------------+          +-------------------+          +----------------+
        default via 10.0.0.1                                       connected route only:
                                                                   no route to 10.0.0.0/24

    N forwards but does not NAT: a packet from X reaches Y with source
    10.0.0.10, and Y cannot answer it (no route).  X and Y both reach N.
    """
    t = NarTopology(x=lab.host("x"), n=lab.host("n", forwarding=True), y=lab.host("y"))
    plen = "/24"
    lab.link(t.x, t.n, t.x_addr + plen, t.n_private + plen, a_if=t.x_if, b_if=t.n_private_if)
    lab.link(t.n, t.y, t.n_public + plen, t.y_addr + plen, a_if=t.n_public_if, b_if=t.y_if)
    t.x.default_route(t.n_private)
    return t



def _string_defaults(cls: type) -> dict[str, str]:
    """The addresses and interface names an attrs topology record defaults to.

    The builders lay out the namespaces from these, so the record and the topology it
    describes cannot disagree.  (Only ``str`` defaults: the rest are not layout.)
    """
    return {f.name: f.default for f in attrs.fields(cls) if isinstance(f.default, str)}

@attrs.frozen
class RemoteAccessTopology:
    """Clients behind two NATs, a gateway and an internal host: see :func:`remote_access_topology`."""

    r1: Host
    r2: Host
    r3: Host
    nat1: Host
    nat2: Host
    g: Host
    h: Host
    lan1: Segment  # NAT1's private segment (R1, R3)
    pub: Segment  # the public segment (NAT1, NAT2, G)
    udp_timeout: int | None = None
    private_net: str = "192.168.1.0/24"
    public_net: str = "198.51.100.0/24"
    internal_net: str = "10.1.0.0/24"
    r1_addr: str = "192.168.1.10"
    r2_addr: str = "192.168.1.10"  # the same as R1, on purpose
    r3_addr: str = "192.168.1.11"
    nat1_private: str = "192.168.1.1"
    nat2_private: str = "192.168.1.1"
    nat1_public: str = "198.51.100.101"
    nat2_public: str = "198.51.100.102"
    g_public: str = "198.51.100.1"
    g_internal: str = "10.1.0.1"
    h_addr: str = "10.1.0.10"
    r_if: str = "eth0"
    nat_private_if: str = "lan0"
    nat_public_if: str = "wan0"
    g_public_if: str = "wan0"
    g_internal_if: str = "lan0"
    h_if: str = "eth0"


def remote_access_topology(lab: Lab, udp_timeout: int | None = None) -> RemoteAccessTopology:
    """Remote-access VPN clients behind NATs, with overlapping private addresses.

    ::

         R1 192.168.1.10 --+                                      internal 10.1.0.0/24
           (eth0)          |  switch lan1                        +------------------+
         R3 192.168.1.11 --+-- lan0 192.168.1.1                  | G   (forwards)   |
           (eth0)              NAT1  (masquerade)                | lan0 10.1.0.1 ---+--- H 10.1.0.10
                               wan0 198.51.100.101 --+           |                  |     (eth0)
                                                     |  switch   | wan0             |  default via
                                                     +-- pub ----+ 198.51.100.1     |   10.1.0.1
                                                     |           +------------------+
                               wan0 198.51.100.102 --+        public 198.51.100.0/24
                               NAT2  (masquerade)
         R2 192.168.1.10 ----- lan0 192.168.1.1
           (eth0)

    R1 and R2 have the same private address.  R1/R2/R3 route by default
    via their NAT (192.168.1.1).  NAT1 and NAT2 masquerade on wan0 (UDP
    conntrack timeout ``udp_timeout`` seconds if given) and only know the
    connected networks, so nothing from the private nets reaches 10.1.0.0/24
    except through what G itself does.  G forwards but has no route to
    192.168.1.0/24.  H's default route is via G.
    """
    r1, r2, r3 = lab.host("r1"), lab.host("r2"), lab.host("r3")
    nat1, nat2 = lab.host("nat1"), lab.host("nat2")
    g, h = lab.host("g", forwarding=True), lab.host("h")
    d = _string_defaults(RemoteAccessTopology)
    p = "/24"
    lan1 = lab.switch("lan1", [
        (nat1, d["nat1_private"] + p, d["nat_private_if"]),
        (r1, d["r1_addr"] + p, d["r_if"]),
        (r3, d["r3_addr"] + p, d["r_if"]),
    ])
    lab.link(nat2, r2, d["nat2_private"] + p, d["r2_addr"] + p,
             a_if=d["nat_private_if"], b_if=d["r_if"])
    pub = lab.switch("pub", [
        (g, d["g_public"] + p, d["g_public_if"]),
        (nat1, d["nat1_public"] + p, d["nat_public_if"]),
        (nat2, d["nat2_public"] + p, d["nat_public_if"]),
    ])
    lab.link(g, h, d["g_internal"] + p, d["h_addr"] + p,
             a_if=d["g_internal_if"], b_if=d["h_if"])
    for nat in (nat1, nat2):
        nat.masquerade(d["nat_public_if"], udp_timeout=udp_timeout)
    r1.default_route(d["nat1_private"])
    r3.default_route(d["nat1_private"])
    r2.default_route(d["nat2_private"])
    h.default_route(d["g_internal"])
    return RemoteAccessTopology(r1=r1, r2=r2, r3=r3, nat1=nat1, nat2=nat2, g=g, h=h,
                                lan1=lan1, pub=pub, udp_timeout=udp_timeout)


@attrs.frozen
class MipTopology:
    """Mobile node, optional NAT, Mobile IP proxy, home agent and correspondent: see :func:`mip_topology`."""

    mn: Host
    nat: Host | None
    mipp: Host
    ha: Host
    cn: Host
    home: Segment  # MIPP's internal segment (HA, CN)
    foreign_net: str | None = "192.168.10.0/24"
    external_net: str = "203.0.113.0/24"
    home_net: str = "10.2.0.0/24"
    mn_addr: str = "192.168.10.10"  # 203.0.113.10 without NAT
    nat_private: str | None = "192.168.10.1"
    nat_public: str | None = "203.0.113.2"
    mipp_external: str = "203.0.113.1"
    mipp_internal: str = "10.2.0.1"
    ha_addr: str = "10.2.0.2"
    cn_addr: str = "10.2.0.3"
    mn_home_addr: str = "10.2.0.100"  # not configured anywhere: the MN's home address
    mn_if: str = "eth0"
    nat_private_if: str | None = "lan0"
    nat_public_if: str | None = "wan0"
    mipp_external_if: str = "ext0"
    mipp_internal_if: str = "int0"
    ha_if: str = "eth0"
    cn_if: str = "eth0"

    @property
    def mn_public(self) -> str:
        """The source address MIPP sees for the MN (the NAT's, or the MN's own)."""
        if self.nat is None:
            return self.mn_addr
        assert self.nat_public is not None  # mip_topology sets it whenever there is a NAT
        return self.nat_public


def mip_topology(lab: Lab, nat: bool = True, foreign_agent: bool = False) -> MipTopology:
    """Mobile IP through a NAT to a Mobile IP proxy guarding a home network.

    With ``nat=True``::

        foreign 192.168.10.0/24        external 203.0.113.0/24          home 10.2.0.0/24
        +---------------+   +-----------------+   +------------------+        switch home
        | MN            |   | NAT (masquerade)|   | MIPP (forwards)  |   +-- HA 10.2.0.2 (eth0)
        | eth0          |---| lan0       wan0 |---| ext0        int0 |---+
        | 192.168.10.10 |   | 192.168.10.1    |   | 203.0.113.1      |   +-- CN 10.2.0.3 (eth0)
        +---------------+   |     203.0.113.2 |   |         10.2.0.1 |     default via 10.2.0.1
        default via         +-----------------+   +------------------+
        192.168.10.1

    With ``nat=False`` there is no NAT host: MN's eth0 (203.0.113.10/24) is
    linked straight to MIPP's ext0, and ``nat``, ``nat_*`` and
    ``foreign_net`` are None.  MN has only its connected route then.

    Neither the NAT nor the MN knows a route to 10.2.0.0/24: the MN
    reaches the home network only through what the MIPP itself does.
    ``mn_home_addr`` (10.2.0.100) is the MN's home address for the tests;
    no interface carries it.

    With ``foreign_agent=True`` (and ``nat``) the host between the foreign
    network and the external one is a foreign agent instead of a NAT: the
    same addresses and links, no masquerade and no forwarding (the FA, a user
    space program, relays and tunnels itself; its care-of address is
    ``nat_public``).
    """
    p = "/24"
    d = _string_defaults(MipTopology)
    mn = lab.host("mn")
    mipp = lab.host("mipp", forwarding=True)
    ha, cn = lab.host("ha"), lab.host("cn")
    nat_host: Host | None = None
    direct_addr = "203.0.113.10"  # the MN's address when it is linked to MIPP directly
    if nat:
        nat_host = lab.host("fa" if foreign_agent else "nat")
        lab.link(mn, nat_host, d["mn_addr"] + p, d["nat_private"] + p,
                 a_if=d["mn_if"], b_if=d["nat_private_if"])
        lab.link(nat_host, mipp, d["nat_public"] + p, d["mipp_external"] + p,
                 a_if=d["nat_public_if"], b_if=d["mipp_external_if"])
        if not foreign_agent:
            nat_host.masquerade(d["nat_public_if"])
        mn.default_route(d["nat_private"])
    else:
        lab.link(mn, mipp, direct_addr + p, d["mipp_external"] + p,
                 a_if=d["mn_if"], b_if=d["mipp_external_if"])
    home = lab.switch("home", [
        (mipp, d["mipp_internal"] + p, d["mipp_internal_if"]),
        (ha, d["ha_addr"] + p, d["ha_if"]),
        (cn, d["cn_addr"] + p, d["cn_if"]),
    ])
    ha.default_route(d["mipp_internal"])
    cn.default_route(d["mipp_internal"])
    if nat_host is not None:
        return MipTopology(mn=mn, nat=nat_host, mipp=mipp, ha=ha, cn=cn, home=home)
    return MipTopology(mn=mn, nat=None, mipp=mipp, ha=ha, cn=cn, home=home, mn_addr=direct_addr,
                       foreign_net=None, nat_private=None, nat_public=None, nat_private_if=None,
                       nat_public_if=None)
