"""State a standby needs, sealed under the cluster key: AES-256-GCM, the key never in the store.

Kinds whose records carry key material (``esp.sa``: ``persist=False``, keys in ``secret()`` fields)
never reach a backend in the clear.  For a cluster, :class:`Sealer` keeps a *sealed twin* of each
such record in the shared store: the whole record (secret fields included) as tagged JSON, encrypted
with AES-256-GCM under the cluster key (``[cluster] key_file``), with the twin's kind and key as
associated data, so a blob cannot be replayed under another record's name.  Whoever reads Redis
without the key file sees the twin's name, its node and ciphertext; a standby holding the same key
file can open it (:meth:`Sealer.open`).

The twins are owned by ``cluster:sealed:<node>`` (a durable owner: they must outlive their node,
since a standby adopts them after it died) and follow their record: put when it is put, deleted when
it is deleted; they expire when their record would (``max_age`` for a record without a lifetime).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from narsuite.logs import logger
from narsuite.store.kinds import Index, KindSpec, decode_value, encode_value, key_text

__all__ = ["ClusterKey", "SealError", "Sealed", "SEALED", "Sealer"]

log = logger()

_VERSION = b"\x01"


class SealError(ValueError):
    """A sealed blob cannot be opened: another key, tampered with, or not ours."""


class ClusterKey:
    """The cluster's AES-256-GCM key, read from a file that only its owner can read."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a cluster key is 32 bytes (AES-256)")
        self._aead = AESGCM(key)
        #: names the key in every blob (a standby with another key says so instead of "bad tag")
        self.key_id = hashlib.sha256(b"narsuite cluster key id" + key).digest()[:4]

    @classmethod
    def from_file(cls, path: Path) -> ClusterKey:
        """32 raw bytes, or 64 hex digits (with an optional newline): ``head -c 32 /dev/urandom``."""
        data = Path(path).read_bytes()
        text = data.strip()
        if len(text) == 64:
            try:
                return cls(bytes.fromhex(text.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                pass
        if len(data) == 32:
            return cls(data)
        raise ValueError(f"cluster.key_file: {path} holds {len(data)} bytes; expected 32 random bytes "
                         f"or 64 hex digits (head -c 32 /dev/urandom > {path}; chmod 600 {path})")

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(12)  # random 96-bit nonces: far below the 2^32 messages bound per key
        return _VERSION + self.key_id + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 1 + 4 + 12 + 16 or blob[:1] != _VERSION:
            raise SealError("not a sealed blob of this version")
        if blob[1:5] != self.key_id:
            raise SealError("sealed under another cluster key (check cluster.key_file on both nodes)")
        try:
            return self._aead.decrypt(blob[5:17], blob[17:], aad)
        except InvalidTag:
            raise SealError("the sealed blob fails authentication (tampered with, or another record's)") from None


@attrs.frozen
class Sealed:
    """The sealed twin of one record of ``kind`` with primary key text ``key``."""

    kind: str
    key: str
    node: str
    blob: bytes


SEALED = KindSpec(
    name="cluster.sealed",
    record=Sealed,
    # one twin per node: a standby that touches a record it heard of (a peer's activity) keeps
    # its own twin and must not overwrite the one of the node that owns it
    key=lambda r: (r.node, r.kind, r.key),
    indexes=(Index("node", lambda r: r.node, unique=False),),
    columns=("kind", "key", "node"),
    description="records a standby needs (SAs with their keys), sealed with AES-256-GCM under the cluster key",
)


def _aad(node: str, kind: str, key: str) -> bytes:
    return f"narsuite sealed {node} {kind} {key}".encode()


def dump_all(spec: KindSpec, record: Any) -> bytes:
    """Every field, the secret ones too: for sealing only, never for a backend directly."""
    return json.dumps({f.name: encode_value(getattr(record, f.name)) for f in attrs.fields(spec.record)},
                      separators=(",", ":"), sort_keys=True).encode()


def load_all(spec: KindSpec, data: bytes) -> Any:
    import enum
    import typing

    fields = json.loads(data)
    hints = typing.get_type_hints(spec.record)
    values = {}
    for f in attrs.fields(spec.record):
        if f.name in fields:
            v = decode_value(fields[f.name])
            hint = hints.get(f.name)
            if isinstance(hint, type) and issubclass(hint, enum.Enum) and not isinstance(v, hint):
                v = hint(v)
            values[f.name] = v
    return spec.record(**values)


class Sealer:
    """Keeps sealed twins of ``kinds`` in the store (module docstring)."""

    def __init__(self, store: Any, key: ClusterKey, node_id: str, kinds: Iterable[str],
                 max_age: float = 86400.0) -> None:
        self.store, self.key, self.node_id = store, key, node_id
        #: lifetime of a twin whose record has none (a dead node's twins must not stay forever)
        self.max_age = max_age
        self.kinds = frozenset(kinds)
        self.owner = f"cluster:sealed:{node_id}"
        self.stats = {"sealed": 0, "unsealed": 0, "failed": 0}
        store.register(SEALED)
        self._unsubscribe = store.subscribe(self._changed, kinds=self.kinds)

    def close(self) -> None:
        self._unsubscribe()

    def _changed(self, change: Any) -> None:
        if change.reason == "remote":
            return
        spec = self.store.kind(change.kind)
        ktext = key_text(change.key)
        if change.op == "put":
            blob = self.key.seal(dump_all(spec, change.record), _aad(self.node_id, spec.name, ktext))
            expires = self.store.expires(spec.name, change.key)
            now = self.store.clock.seconds()
            ttl = self.max_age if expires is None else max(0.001, expires - now)
            d = self.store.put(Sealed(spec.name, ktext, self.node_id, blob), owner=self.owner, ttl=ttl)
            self.stats["sealed"] += 1
        else:
            d = self.store.delete(SEALED.name, (self.node_id, spec.name, ktext))

        def failed(f: Any) -> None:
            self.stats["failed"] += 1
            log.warn("cluster: keeping the sealed copy of {kind} {key} failed: {e}", kind=change.kind,
                     key=ktext, e=f.getErrorMessage())

        d.addErrback(failed)

    def open(self, sealed: Sealed) -> Any:
        """The record a sealed twin holds (SealError if it is not ours to open)."""
        spec = self.store.kind(sealed.kind)
        record = load_all(spec, self.key.open(sealed.blob, _aad(sealed.node, sealed.kind, sealed.key)))
        self.stats["unsealed"] += 1
        return record

    def adopt(self, node: str | None = None, seq_margin: int = 1 << 24) -> dict[str, int]:
        """Carry on what another node sealed (``node``, or every node but this one).

        The twins' records go into this node's view under the owner ``cluster:adopted:<node>``
        with the lifetime their twins had left: peers first (the esp role routes their inner
        addresses), then SAs, an outbound SA's sequence number ``seq_margin`` ahead of where the
        twin was sealed (the dead node sent an unknown number of packets since), an inbound
        SA's SPI leased again to the adopter (the dead node's lease is reaped), then ISAKMP
        SAs (``ike.isakmp``, ``ike.v2sa``: the ike role resumes them when it sees them put), an
        IKEv1 SA's DPD sequence ``seq_margin`` ahead too (an IKEv2 SA's message IDs are
        resynchronised with its peer by the ike role).  Putting them
        seals them again as this node's twins; the adopted twins are deleted (adopted once).
        Returns counts by kind (and ``failed``).
        """
        from narsuite.store.kinds import LEASE, Lease

        twins = [t for t in self.store.records(SEALED.name)
                 if t.node != self.node_id and (node is None or t.node == node)]
        twins.sort(key=lambda t: (t.kind != "esp.peer", t.kind, t.key))
        now = self.store.clock.seconds()
        done: dict[str, int] = {}

        def failed(f: Any, what: str) -> None:
            self.stats["failed"] += 1
            log.warn("cluster: adopting {what} failed: {e}", what=what, e=f.getErrorMessage())

        for t in twins:
            try:
                record = self.open(t)
            except SealError as e:
                self.stats["failed"] += 1
                done["failed"] = done.get("failed", 0) + 1
                log.warn("cluster: cannot adopt {kind} {key} of {node}: {e}", kind=t.kind, key=t.key,
                         node=t.node, e=str(e))
                continue
            if getattr(record, "direction", None) == "out" and hasattr(record, "seq_start"):
                record = attrs.evolve(record, seq_start=record.seq_start + seq_margin)
            if getattr(record, "dpd_seq", 0):
                # an ISAKMP SA's DPD (RFC 3706) sequence: 32 bits, never 0, past what was sent
                record = attrs.evolve(record, dpd_seq=(record.dpd_seq + seq_margin - 1) % 0xFFFFFFFF + 1)
            expires = self.store.expires(SEALED.name, (t.node, t.kind, t.key))
            ttl = None if expires is None else max(0.001, expires - now)
            owner = f"cluster:adopted:{t.node}"
            self.store.put(record, kind=t.kind, owner=owner, ttl=ttl).addErrback(failed, f"{t.kind} {t.key}")
            # consumed: adopting twice (keepalived flapping) must not restart the sequence numbers
            self.store.delete(SEALED.name, (t.node, t.kind, t.key)).addErrback(failed, f"the twin of {t.key}")
            if getattr(record, "direction", None) == "in" and hasattr(record, "spi"):
                self.store.put(Lease("spi", record.spi, owner), kind=LEASE.name, owner=owner, ttl=ttl).addErrback(
                    failed, f"the SPI lease {record.spi:#x}")
            done[t.kind] = done.get(t.kind, 0) + 1
        log.info("cluster: adopted {done} from {node}", done=done, node=node or "the other nodes")
        return done

    def sealed_of(self, node: str) -> list[Sealed]:
        """The sealed twins a node left (a standby adopts these after the node died)."""
        return self.store.lookup_all(SEALED.name, "node", node)

    def key_of(self, sealed: Sealed) -> Hashable:
        from narsuite.store.kinds import key_from_text

        return key_from_text(sealed.key)
