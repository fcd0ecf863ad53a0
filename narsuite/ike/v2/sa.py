"""The state of one IKEv2 SA and its CHILD SAs (in memory; key material never leaves it).

Mutable on purpose, as IKEv1's :mod:`narsuite.ike.sa`: an IKE SA is a conversation owned
by one engine.  What others need (its summary, the ESP SAs) goes to the store.
"""

from __future__ import annotations

from typing import Any

import attrs

from narsuite.ike.config import PeerPolicy
from narsuite.ike.v2.keys import IkeKeys, SKCipher
from narsuite.ike.v2.proposals import EspChoice, IkeChoice

__all__ = ["IkeSAv2", "ChildV2", "Request"]


@attrs.define(eq=False)
class ChildV2:
    """An ESP SA pair (records in the store under ``peer``)."""

    peer: str  # esp.peer name
    spi_in: int
    spi_out: int
    expires: float
    choice: EspChoice
    tsi: str
    tsr: str
    timer: Any = None
    rekeyed: bool = False  # a newer pair replaced it; the peer's Delete is due
    #: the narrowed selectors (client side, our side) as integer ranges: what our rekey asks for
    remote: list[tuple[int, int]] = attrs.field(factory=list, repr=False)
    local: list[tuple[int, int]] = attrs.field(factory=list, repr=False)
    #: the nonces of the exchange that made it (§2.8.1 compares them in a rekey collision)
    nonces: tuple[bytes, bytes] = attrs.field(default=(b"", b""), repr=False)
    rekey_timer: Any = None  # our soft lifetime (ike/v2/rekey.py)
    rekey_at: float = 0.0  # when it fires (the clock's seconds)
    #: our CREATE_CHILD_SA rekeying it is outstanding (its state: rekey.Pending)
    rekeying: Any = None
    #: the client rekeyed it while ours was outstanding: the child that made (§2.8.1)
    collided: ChildV2 | None = None
    deleting: bool = False  # our Delete for it is on its way
    #: we answered the client's rekey: the new outbound SA and the time its record ends, kept
    #: back until the replaced pair goes (the client installs its inbound SA when our answer
    #: reaches it, and the answer may be lost until the client resends its request)
    pending_out: tuple[Any, float] | None = attrs.field(default=None, repr=False)
    #: the pair that replaced this one; its kept-back outbound SA is written when this one goes
    successor: ChildV2 | None = attrs.field(default=None, repr=False)

    @property
    def description(self) -> str:
        return self.choice.describe()


@attrs.define(eq=False)
class Request:
    """A request we sent (liveness, Delete, ...), resent until answered (window 1)."""

    message_id: int
    datagrams: list[bytes]
    kind: str
    tries: int = 0
    timer: Any = None
    on_answer: Any = None  # called with (sa, payloads) when the peer answers


@attrs.define(eq=False)
class IkeSAv2:
    spi_i: bytes
    spi_r: bytes
    remote: tuple[str, int]
    local_port: int
    local_ip: str
    created: float
    state: str = "init"  # init (IKE_SA_INIT answered) / auth (EAP running) / established / deleted
    candidates: list[PeerPolicy] = attrs.field(factory=list)
    policy: PeerPolicy | None = None
    choice: IkeChoice | None = None
    keys: IkeKeys | None = attrs.field(default=None, repr=False)
    #: protects what the peer sends (i->r when the peer initiated the SA) / what we send
    rx: SKCipher | None = attrs.field(default=None, repr=False)
    tx: SKCipher | None = attrs.field(default=None, repr=False)
    ni: bytes = attrs.field(default=b"", repr=False)
    nr: bytes = attrs.field(default=b"", repr=False)
    init_request: bytes = attrs.field(default=b"", repr=False)
    init_response: bytes = attrs.field(default=b"", repr=False)
    #: we are the original initiator (after a rekey the peer started, still False)
    we_initiated: bool = False
    nat_peer: bool = False
    nat_local: bool = False
    frag_ok: bool = False  # the peer announced IKEV2_FRAGMENTATION_SUPPORTED
    peer_hashes: list[str] = attrs.field(factory=list)  # its SIGNATURE_HASH_ALGORITHMS (RFC 7427)
    peer_cert_subject: str = ""
    mobike: bool = False
    peer_id_text: str = ""
    peer_id_body: bytes = b""
    eap_user: str = ""
    msk: bytes = attrs.field(default=b"", repr=False)
    our_id_body: bytes = b""
    eap: Any = None  # the EAP server conversation while state == "auth"
    auth_request: Any = None  # the first IKE_AUTH's payloads, kept through EAP
    address: str = ""  # the virtual IP from the pool
    established: float = 0.0
    expires: float = 0.0
    last_rx: float = 0.0
    #: the next request message ID we expect from the peer, and our answer to the last one
    peer_mid: int = 0
    last_response: list[bytes] = attrs.field(factory=list, repr=False)
    busy: bool = False  # a request is being processed (store write, password check)
    my_mid: int = 0
    outstanding: Request | None = None
    queue: list[Any] = attrs.field(factory=list, repr=False)
    fragments: dict[int, bytes] = attrs.field(factory=dict, repr=False)
    fragments_total: int = 0
    children: list[ChildV2] = attrs.field(factory=list)
    timer: Any = None  # half-open timeout, then lifetime
    half_open_key: tuple[bytes, str, int] | None = None
    deleted_by: str = ""
    #: the peer announced RFC 6311 message ID sync and we answered it (a standby can resync)
    mid_sync: bool = False
    #: carried on from a dead node's sealed state (:mod:`.resume`): "sync" while our RFC 6311
    #: sync is outstanding (the peer's requests are dropped), "window" until the peer's first
    #: request (accepted a little ahead of the sealed ID), "" otherwise
    resync: str = ""
    #: when its ``ike.v2sa`` state was last written, and the write waiting for the interval
    state_written: float = 0.0
    state_timer: Any = attrs.field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spi_i.hex()[:8] + self.spi_r.hex()[:8]

    @property
    def natted(self) -> bool:
        return self.nat_peer or self.nat_local

    @property
    def flags(self) -> int:
        """Our messages' I flag (§3.1): set only if we were the original initiator."""
        return 0x08 if self.we_initiated else 0
