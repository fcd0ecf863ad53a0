"""The store's space-network index (narsuite.sadb ``space``/``space_cover``) against a
brute-force reference: whatever sequence of puts, replacements and deletes, asking it
"who overlaps this network" answers as a scan with ipaddress would (002 §5.1)."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from narsuite import sadb
from narsuite.sadb import PEER, Peer
from narsuite.store import Store

# a small address space, so that overlaps (nesting, equality) are common
networks = st.builds(lambda a, b, plen: f"10.{a}.{b}.0/{plen}", st.integers(0, 3), st.integers(0, 255),
                     st.sampled_from((8, 14, 16, 22, 24, 32)))
peers = st.builds(lambda i, nets, policy, mode: Peer(name=f"p{i}", mode=mode, policy=policy,
                                                       allowed=tuple(nets)),
                  st.integers(0, 12), st.lists(networks, max_size=3),
                  st.sampled_from(("space", "space", "address")), st.sampled_from(("tunnel", "tunnel", "transport")))
ops = st.lists(st.tuples(st.sampled_from(("put", "put", "delete")), peers), max_size=40)


def _store() -> Store:
    store = Store(clock=Clock())
    for k in sadb.KINDS:
        store.register(k)
    return store


def _reference(records: list[Peer], network: str, exclude: str) -> list[Peer]:
    mine = ipaddress.IPv4Network(network, strict=False)
    return [p for p in records if p.name != exclude and p.mode == "tunnel" and p.policy == "space"
            and any(ipaddress.IPv4Network(n, strict=False).overlaps(mine) for n in p.allowed)]


@settings(max_examples=300, deadline=None)
@given(ops, st.lists(st.tuples(networks, st.integers(0, 12)), min_size=1, max_size=10))
def test_space_index_matches_brute_force(sequence, queries):
    store = _store()
    for op, peer in sequence:
        if op == "put":
            store.put(peer)
        elif store.get(PEER.name, peer.name) is not None:
            store.delete(PEER.name, peer.name)
    records = list(store.records(PEER.name))
    for network, i in queries:
        want = _reference(records, network, f"p{i}")
        got = sadb.space_overlap(store, network, f"p{i}")
        assert (got is None) == (not want), (network, records)
        assert got is None or got in want
        mine = Peer(name=f"p{i}", mode="tunnel", policy="space", allowed=(network,))
        assert (sadb.tunnel_conflict(store, mine) is None) == (not want)


def test_index_forgets_a_deleted_or_narrowed_peer():
    """A replaced record is filed under its new networks only, a deleted one under none."""
    store = _store()
    store.put(Peer(name="a", policy="space", allowed=("10.1.0.0/16",)))
    assert sadb.space_overlap(store, "10.1.2.0/24").name == "a"
    assert sadb.space_overlap(store, "10.0.0.0/8").name == "a"
    store.put(Peer(name="a", policy="space", allowed=("10.2.0.0/16",)))
    assert sadb.space_overlap(store, "10.1.2.0/24") is None
    assert sadb.space_overlap(store, "10.2.0.0/24").name == "a"
    store.delete(PEER.name, "a")
    assert sadb.space_overlap(store, "10.0.0.0/8") is None
    assert not store.multi_index(PEER.name, "space")


def test_host_bits_are_ignored():
    store = _store()
    store.put(Peer(name="a", policy="space", allowed=("10.1.2.3/24",)))
    assert sadb.space_overlap(store, "10.1.2.200/32").name == "a"
    assert sadb.space_overlap(store, "10.1.3.0/24") is None


def test_cidr_parse_agrees_with_ipaddress():
    for text in ("10.1.2.3/24", "0.0.0.0/0", "255.255.255.255/32", "10.0.0.0/255.255.0.0", "10.9.8.7"):
        n = ipaddress.IPv4Network(text, strict=False)
        assert sadb._cidr(text) == (int(n.network_address), n.prefixlen)
    for bad in ("10.1/33", "10.1.2/8", "x/8", "10.0.0.0/-1"):
        try:
            sadb._cidr(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
