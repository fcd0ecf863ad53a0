"""Sealed state for a standby: AES-256-GCM under the cluster key; key material never in the clear
in what a backend (Redis) receives."""

from __future__ import annotations

import enum
import os

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from narsuite.store import Index, KindSpec, MemoryBackend, Store, secret
from narsuite.store.sealed import SEALED, ClusterKey, Sealer, SealError


class Dir(enum.Enum):
    IN = "in"
    OUT = "out"


@attrs.frozen
class Sa:
    spi: int
    direction: Dir
    peer: str
    enc_key: bytes = secret(default=b"")
    auth_key: bytes = secret(default=b"")


SA = KindSpec("t.sa", Sa, key=lambda r: (r.direction, r.spi), indexes=(Index("spi", lambda r: r.spi),),
              persist=False)


class Capture(MemoryBackend):
    """A persistent backend that keeps every row it is handed (what Redis would receive)."""

    persistent = True

    def __init__(self) -> None:
        self.rows: list = []

    def submit(self, writes):  # type: ignore[no-untyped-def]
        self.rows += [w.row() for w in writes]
        return defer.succeed(None)


def test_seal_open_and_every_way_to_fail() -> None:
    k = ClusterKey(os.urandom(32))
    blob = k.seal(b"keys", b"aad")
    assert b"keys" not in blob and k.open(blob, b"aad") == b"keys"
    assert k.seal(b"keys", b"aad") != blob  # a fresh nonce each time
    with pytest.raises(SealError, match="another cluster key"):
        ClusterKey(os.urandom(32)).open(blob, b"aad")
    with pytest.raises(SealError, match="authentication"):
        k.open(blob, b"another record")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SealError, match="authentication"):
        k.open(tampered, b"aad")
    with pytest.raises(SealError):
        k.open(b"\x02" + blob[1:], b"aad")


def test_key_file_raw_or_hex_and_a_wrong_one_names_the_key(tmp_path) -> None:
    raw = os.urandom(32)
    (tmp_path / "raw").write_bytes(raw)
    (tmp_path / "hex").write_text(raw.hex() + "\n")
    a, b = ClusterKey.from_file(tmp_path / "raw"), ClusterKey.from_file(tmp_path / "hex")
    assert b.open(a.seal(b"x", b""), b"") == b"x"
    (tmp_path / "short").write_bytes(b"0123456789")
    with pytest.raises(ValueError, match="cluster.key_file: .* holds 10 bytes; expected 32"):
        ClusterKey.from_file(tmp_path / "short")


def test_sealer_keeps_twins_no_key_material_reaches_the_backend_and_a_standby_opens_them() -> None:
    backend = Capture()
    st = Store(backend, Clock(), node_id="gw1")
    st.register(SA)
    key = ClusterKey(os.urandom(32))
    sealer = Sealer(st, key, "gw1", [SA.name])
    st.open()
    enc, auth = os.urandom(16), os.urandom(20)
    rec = Sa(0x1234_5678, Dir.IN, "198.51.100.101", enc, auth)
    st.put(rec, owner="ike:child:x")
    (twin,) = st.records(SEALED.name)
    assert (twin.kind, twin.node) == ("t.sa", "gw1")
    everything = repr(backend.rows).encode()
    for secret_bytes in (enc, auth):
        for form in (secret_bytes, secret_bytes.hex().encode(), __import__("base64").b64encode(secret_bytes)):
            assert form not in everything
    assert [r.kind for r in backend.rows] == ["cluster.sealed"]  # the SA itself never goes
    # a standby with the same key file opens the twin into the whole record, keys included
    standby = Store(MemoryBackend(), Clock(), node_id="gw2")
    standby.register(SA)
    opener = Sealer(standby, key, "gw2", [SA.name])
    assert opener.open(twin) == rec and opener.sealed_of("gw1") == [] and sealer.sealed_of("gw1") == [twin]
    with pytest.raises(SealError):
        Sealer(standby, ClusterKey(os.urandom(32)), "gw3", [SA.name]).open(twin)
    # the twin follows its record: deleted with it (drop_owner, expiry, delete)
    st.drop_owner("ike:child:x")
    assert st.count(SEALED.name) == 0 and backend.rows[-1].kind == "cluster.sealed" and backend.rows[-1].data is None


@attrs.frozen
class OutSa:
    spi: int
    direction: str
    peer: str
    enc_key: bytes = secret(default=b"")
    seq_start: int = 0


OUT = KindSpec("t.osa", OutSa, key=lambda r: (r.direction, r.spi), persist=False)


def test_adopt_puts_the_dead_nodes_records_moves_sequence_numbers_and_releases_nothing_twice() -> None:
    """What `narctl cluster adopt` does on the standby: the other node's twins become records of
    this node (owner cluster:adopted:<node>), outbound ones seq_margin ahead, inbound SPIs leased to
    the adopter; its own twins and twins it cannot open are left alone (counted)."""

    key = ClusterKey(os.urandom(32))
    shared = Capture()  # both "nodes" see one store here: the view is what matters
    clock = Clock()
    clock.advance(1000)
    st = Store(shared, clock, node_id="gw1")
    st.register(OUT)
    active = Sealer(st, key, "gw1", [OUT.name])
    st.open()
    st.put(OutSa(0x1111, "in", "alice", b"k" * 16), owner="ike:child:a", ttl=600)
    st.put(OutSa(0x2222, "out", "alice", b"o" * 16, seq_start=5), owner="ike:child:a", ttl=600)
    twins = list(st.records(SEALED.name))
    assert len(twins) == 2
    # the active dies: its view is gone; the standby shares the twins
    standby = Store(MemoryBackend(), clock, node_id="gw2")
    standby.register(OUT)
    sb = Sealer(standby, key, "gw2", [OUT.name])
    standby.open()
    for t in twins:  # as the shared store hands them over: with their lifetimes
        standby.put(t, owner="cluster:sealed:gw1",
                    ttl=st.expires(SEALED.name, (t.node, t.kind, t.key)) - clock.seconds())
    bogus = twins[0].__class__("t.osa", '"x"', "gw9", b"\x01" + b"\x00" * 40)
    standby.put(bogus, owner="cluster:sealed:gw9")
    clock.advance(100)
    done = sb.adopt(seq_margin=1 << 20)
    assert done == {"t.osa": 2, "failed": 1}
    out = standby.get(OUT.name, ("out", 0x2222))
    assert out.seq_start == 5 + (1 << 20) and out.enc_key == b"o" * 16
    assert standby.owner_of(OUT.name, ("in", 0x1111)) == "cluster:adopted:gw1"
    assert standby.expires(OUT.name, ("in", 0x1111)) - clock.seconds() == pytest.approx(500)  # what was left
    assert standby.holds("spi", 0x1111) == "cluster:adopted:gw1"
    # adopted records are sealed again, as the standby's own twins
    assert {t.node for t in standby.records(SEALED.name)} == {"gw2", "gw9"}  # gw1's consumed
    assert sb.adopt() == {"failed": 1}  # adopted once: a second adopt does not restart the numbers
    assert standby.get(OUT.name, ("out", 0x2222)).seq_start == 5 + (1 << 20)
    active.close()
