"""etc/cluster-node1.toml and etc/cluster-node2.toml: they load (secrets' paths pointed at real
private files) and differ only in the node's identity; the secret files' checks fail closed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from narsuite.config import ConfigError, loads

ROOT = Path(__file__).resolve().parent.parent


def load_example(n: int, tmp_path: Path, mode: int = 0o600):  # type: ignore[no-untyped-def]
    for name in ("redis.pass", "cluster.key"):
        p = tmp_path / name
        p.write_bytes(os.urandom(32) if name == "cluster.key" else b"s3cret\n")
        p.chmod(mode)
    text = (ROOT / "etc" / f"cluster-node{n}.toml").read_text().replace("/etc/narsuite/", f"{tmp_path}/")
    return loads(text)


def test_cluster_examples_load_and_differ_only_in_node_id(tmp_path) -> None:
    c1, c2 = load_example(1, tmp_path), load_example(2, tmp_path)
    assert (c1.cluster.node_id, c2.cluster.node_id) == ("gw1", "gw2")
    assert c1.store == c2.store and c1.store.backend == "redis" and c1.store.redis.replicas_ack == 1
    assert c1.cluster.key_file == c2.cluster.key_file
    assert c1.cluster.sealed_kinds == ("esp.sa", "esp.peer", "ike.isakmp",
                                                                                          "ike.v2sa")


def test_secret_files_open_to_others_are_refused_naming_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"(cluster.key_file|store.redis.password_file): .* is readable "
                                          r"by other users \(mode 644\); chmod 600"):
        load_example(1, tmp_path, mode=0o644)


@pytest.mark.parametrize("engine,kind", [("engine", "ike.isakmp"), ("engine2", "ike.v2sa")])
def test_the_ike_standby_state_is_written_only_where_a_cluster_seals_it(tmp_path, engine, kind) -> None:
    """The ike service writes each SA's standby state (IKEv1 ``ike.isakmp``, IKEv2 ``ike.v2sa``:
    a record per change, and for IKEv2 a timer per exchange) only on a node that keeps sealed
    twins of it: a cluster node with the key file and the kind in ``sealed_kinds``; not on a
    single node, nor where an operator left the kind out."""
    import attrs
    from twisted.internet.task import Clock

    from narsuite.ike.service import IkeService
    from narsuite.metrics import Metrics
    from narsuite.packet.udp import UDPPorts
    from narsuite.service import RoleContext
    from narsuite.store import MemoryBackend, Store

    def keeps_state(cfg) -> bool:  # type: ignore[no-untyped-def]
        clock = Clock()
        ctx = RoleContext("ike", cfg, cfg.role("ike"), Store(MemoryBackend(), clock), Metrics(), clock, {},
                          UDPPorts(clock))
        return getattr(IkeService(ctx), engine).keep_state

    cluster = load_example(1, tmp_path)
    assert keeps_state(cluster)
    assert not keeps_state(attrs.evolve(cluster, cluster=attrs.evolve(cluster.cluster, sealed_kinds=("esp.sa",))))
    others = tuple(k for k in cluster.cluster.sealed_kinds if k != kind)
    assert not keeps_state(attrs.evolve(cluster, cluster=attrs.evolve(cluster.cluster, sealed_kinds=others)))
    assert not keeps_state(attrs.evolve(cluster, cluster=attrs.evolve(cluster.cluster, key_file=None)))
    assert not keeps_state(loads("[ike]\n"))
