"""The IPsec SA database: what the esp and ike roles share in the store.

The records live here, not in either role's package, because they are the
contract between the two: the ike role negotiates and writes them, the esp
role reads them and moves packets.  Neither imports the other.

* ``esp.peer`` — one remote host: where it is (its current, possibly NAT-mapped
  address and port), how its packets travel (encapsulation, mode) and the
  tunnel-mode decapsulation NAT policy (002 §3.1.1) with its inner address.
  No key material: persisted.
* ``esp.sa`` — one security association, inbound or outbound, with its keys.
  Never persisted (the keys stay in memory; after a restart static SAs come
  back from the config and negotiated ones are negotiated again).
* ``esp.napt`` — internal-presence translations (001 Appendix A): which
  remote host and inner address/port stands behind a port of G_i.

The IKE role writes ``esp.peer`` and ``esp.sa`` records exactly as the static
configuration does; the esp role reacts to them through a store subscription.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any

import attrs

from narsuite.store import Index, KindSpec, secret

__all__ = ["conflict", "transport_conflict", "tunnel_conflict", "space_overlap",
           "Peer", "SA", "NaptEntry", "RekeyRequest", "PeerActivity", "PEER", "SA_KIND", "NAPT", "REKEY",
           "ACTIVITY", "KINDS",
           "ENCAPS", "MODES", "POLICIES", "CHECKSUM_POLICIES"]

#: udp: RFC 3948 on port 4500; esp: plain IP protocol 50 (no NAT); udp500: the 004
#: draft's ESP on port 500 behind eight zero bytes.
ENCAPS = ("udp", "esp", "udp500")
MODES = ("tunnel", "transport")
#: 002 §3.1.1: space = inner source must lie in ``allowed``; address = must equal the
#: peer's assigned ``inner`` address (static or from a pool); napt = translated to G_i.
POLICIES = ("space", "address", "napt")
#: 002 §3.1.2 for transport mode: incremental (NAT-OA), recompute, zero (UDP only).
CHECKSUM_POLICIES = ("incremental", "recompute", "zero")


def _aton(addr: str | None) -> bytes | None:
    return None if not addr else socket.inet_aton(addr)


@attrs.frozen
class Peer:
    name: str
    mode: str = "tunnel"
    encap: str = "udp"
    remote_ip: str = ""  # "" until learned from an authenticated packet
    remote_port: int = 4500
    policy: str = "address"
    inner: str = ""  # assigned inner address (policy "address")
    pool: str = ""  # the pool ``inner`` was leased from ("" = static)
    allowed: tuple[str, ...] = ()  # networks (policy "space"; transport: ignored)
    keepalive: bool = False  # send NAT-keepalives to this peer (002 §4)
    # transport mode
    local_ip: str = ""  # our address the peer talks to
    nat_oa_remote: str = ""  # the peer's real (pre-NAT) address, from NAT-OA
    nat_oa_local: str = ""  # our address as the peer saw it, from NAT-OA
    checksum: str = "incremental"
    selector_proto: int = 0  # 0 = any
    selector_port: int = 0  # our port, 0 = any

    @property
    def inner_bytes(self) -> bytes | None:
        return _aton(self.inner)


@attrs.frozen
class SA:
    spi: int
    direction: str  # "in" | "out"
    peer: str
    enc: str
    integ: str | None
    enc_key: bytes = secret(default=b"")
    integ_key: bytes = secret(default=b"")
    esn: bool = False
    replay_window: int = 128
    #: the last outbound sequence number already used: 0 for a new SA; a standby adopting a dead
    #: node's SA jumps ahead by ``[cluster] seq_margin`` (the peer's replay window must see only
    #: new numbers; docs/cluster.md)
    seq_start: int = 0


@attrs.frozen
class NaptEntry:
    proto: int
    port: int  # the port (or ICMP identifier) on G_i
    peer: str
    inner_ip: str
    inner_port: int


# ------------------------------------------------------------------ space networks, indexed

#: the space index files a network under its enclosing blocks at the multiples of this length
_STRIDE = 4
_MASKS = tuple((0xFFFFFFFF << (32 - q)) & 0xFFFFFFFF for q in range(33))


@functools.lru_cache(maxsize=65536)
def _cidr(network: str) -> tuple[int, int]:
    """A network as (first address, prefix length), host bits ignored (``strict=False``).
    "a.b.c.d/n" by hand: every new CHILD SA brings a new network, and ipaddress's parse
    cost more than the whole overlap check."""
    addr, _, length = network.partition("/")
    if length.isdigit() and int(length) <= 32:
        try:
            q = int(length)
            return int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big") & _MASKS[q], q
        except OSError:
            pass
    n = ipaddress.IPv4Network(network, strict=False)  # the rest (a netmask, no length), or ValueError
    return int(n.network_address), n.prefixlen


@functools.lru_cache(maxsize=65536)
def _space(network: str) -> tuple[Any, ...]:
    """The keys the ``space`` index files a network under: its prefix length (which lengths
    are in use), itself as (first address, prefix length, 1), and the blocks at every fourth
    prefix length (/0, /4, ... /32) that contain it (or are it) as (first address, prefix
    length) -- eleven keys for a /32 where every length would take 34 (the cost of a put);
    :func:`space_overlap` pays for the gaps with at most 15 lookups."""
    net, plen = _cidr(network)
    return (plen, (net, plen, 1), *((net & _MASKS[q], q) for q in range(0, plen + 1, _STRIDE)))


def _space_keys(peer: Peer) -> tuple[Any, ...] | None:
    if peer.mode != "tunnel" or peer.policy != "space" or not peer.allowed:
        return None
    try:
        if len(peer.allowed) == 1:
            return _space(peer.allowed[0])
        return tuple({k for n in peer.allowed for k in _space(n)})
    except ValueError:  # not a network: config and the ike role write only valid ones
        return None


PEER = KindSpec(
    name="esp.peer",
    record=Peer,
    key=lambda r: r.name,
    indexes=(
        Index("inner", lambda r: r.inner_bytes if r.mode == "tunnel" and r.inner else None),
        Index("remote_ip", lambda r: r.remote_ip or None, unique=False),
        # the space networks as an index over the address space (002 §5.1, tunnel_conflict)
        Index("space", _space_keys, unique=False, many=True),
    ),
    columns=("name", "mode", "encap", "remote_ip", "remote_port", "policy", "inner", "keepalive"),
    description="ESP remote peers: where they are, how their traffic is carried and translated",
)

SA_KIND = KindSpec(
    name="esp.sa",
    record=SA,
    key=lambda r: (r.direction, r.spi, r.peer),
    indexes=(
        Index("in_spi", lambda r: r.spi if r.direction == "in" else None),
        Index("out_peer", lambda r: r.peer if r.direction == "out" else None),
        Index("peer", lambda r: r.peer, unique=False),
    ),
    persist=False,
    columns=("spi", "direction", "peer", "enc", "integ", "esn", "replay_window"),
    description="ESP security associations (keys in memory only)",
)

NAPT = KindSpec(
    name="esp.napt",
    record=NaptEntry,
    key=lambda r: (r.proto, r.port),
    indexes=(
        Index("inside", lambda r: (r.peer, r.proto, r.inner_ip, r.inner_port)),
        Index("peer", lambda r: r.peer, unique=False),
    ),
    columns=("proto", "port", "peer", "inner_ip", "inner_port"),
    description="internal-presence NAPT: G_i ports and the remote hosts behind them",
)

@attrs.frozen
class RekeyRequest:
    """An outbound SA is near (or at) the end of its sequence numbers: whoever keys
    the peer (the ike role, or an operator with static keys) must replace it."""

    peer: str
    spi: int
    exhausted: bool


REKEY = KindSpec(
    name="esp.rekey",
    record=RekeyRequest,
    key=lambda r: (r.peer, r.spi),
    persist=False,
    columns=("peer", "spi", "exhausted"),
    description="rekey events raised by the data plane (sequence numbers running out)",
)

@attrs.frozen
class PeerActivity:
    """The esp role received authenticated ESP from a peer (at ``last_rx``, its clock's
    seconds): proof of life for whoever keys the peer.  The ike role's DPD counts it as
    traffic (RFC 3706 probes only idle peers), so a tunnel that carries packets is never
    declared dead because its ISAKMP SA heard nothing.  Written at most every few seconds
    per peer, never persisted."""

    peer: str
    last_rx: float


ACTIVITY = KindSpec(
    name="esp.activity",
    record=PeerActivity,
    key=lambda r: r.peer,
    persist=False,
    columns=("peer", "last_rx"),
    description="when the esp role last received authenticated ESP from each peer (liveness for DPD)",
)

KINDS = (PEER, SA_KIND, NAPT, REKEY, ACTIVITY)


# ------------------------------------------------------------------ conflicts (002 §5)
# Who writes a peer (the ike role after Quick Mode, the esp role for static peers, the
# esp role again when an authenticated packet moves a peer) asks these first, so both
# roles refuse the same things.

def transport_conflict(store: Any, peer: Peer, remote_ip: str | None = None) -> Peer | None:
    """002 §5.2: another transport peer behind the same address (``remote_ip``, default
    the peer's) whose selector (protocol, our port) overlaps."""
    remote_ip = peer.remote_ip if remote_ip is None else remote_ip
    if not remote_ip or peer.mode != "transport":
        return None
    for other in store.lookup_all(PEER.name, "remote_ip", remote_ip):
        if other.name == peer.name or other.mode != "transport":
            continue
        proto = not other.selector_proto or not peer.selector_proto or \
            other.selector_proto == peer.selector_proto
        port = not other.selector_port or not peer.selector_port or \
            other.selector_port == peer.selector_port
        if proto and port:
            return other
    return None


def tunnel_conflict(store: Any, peer: Peer) -> Peer | None:
    """002 §5.1: another tunnel peer that would receive traffic for the same inner
    addresses -- the same assigned address (the store's unique index refuses that too),
    or ``space`` networks that overlap (outbound would go to whichever is found first)."""
    if peer.mode != "tunnel":
        return None
    if peer.inner:
        holder = store.lookup(PEER.name, "inner", socket.inet_aton(peer.inner))
        if holder is not None and holder.name != peer.name:
            return holder
    if peer.policy != "space" or not peer.allowed:
        return None
    for network in peer.allowed:
        other = space_overlap(store, network, peer.name)
        if other is not None:
            return other
    return None


def space_overlap(store: Any, network: str, exclude: str = "") -> Peer | None:
    """A tunnel peer (other than ``exclude``) whose space networks overlap ``network``.

    Two CIDR blocks overlap exactly when one contains the other, so the store's ``space``
    index (keys: :func:`_space`) answers without looking at every peer.  A network
    containing ours (length q < p) is one of our enclosing blocks, filed as
    ``(block, q, 1)``.  A network inside ours, or ours, of length q >= p: when q >= r (the
    next multiple of four) it is filed under one of our 2**(r-p) <= 8 sub-blocks of length r;
    when p <= q < r it is one of 2**(q-p) exact blocks (at most 7).  Lengths no network has
    are skipped (they are filed too).  At most 80 dict lookups per network, whatever the
    number of peers; it was a scan over every peer per new peer."""
    index = store.multi_index(PEER.name, "space")
    net, p = _cidr(network)
    r = min(32, (p + _STRIDE - 1) // _STRIDE * _STRIDE)
    step = 1 << (32 - r)
    for k in range(1 << (r - p)):
        hit = _other(index.get((net + k * step, r)), exclude)
        if hit is not None:
            return hit
    for q in range(p, r):
        if q not in index:
            continue
        step = 1 << (32 - q)
        for k in range(1 << (q - p)):
            hit = _other(index.get((net + k * step, q, 1)), exclude)
            if hit is not None:
                return hit
    for q in range(p):
        if q not in index:
            continue  # no network of that length (all /32: no lookups here at all)
        hit = _other(index.get((net & _MASKS[q], q, 1)), exclude)
        if hit is not None:
            return hit
    return None


def _other(bucket: dict[Any, Peer] | None, exclude: str) -> Peer | None:
    if bucket:
        for peer in bucket.values():
            if peer.name != exclude:
                return peer
    return None


def conflict(store: Any, peer: Peer) -> Peer | None:
    """The existing peer that ``peer`` may not sit beside (002 §5.1, §5.2), or None."""
    return tunnel_conflict(store, peer) or transport_conflict(store, peer)
