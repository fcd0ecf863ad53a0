"""The state of one ISAKMP SA (phase 1) and of the exchanges running under it.

Mutable on purpose: an IKE SA is a conversation that moves through states,
owned by exactly one engine in one process.  What other parts of the suite
need to see (the SA's summary, the ESP SAs it negotiated) goes to the store;
everything here, key material included, stays in memory.
"""

from __future__ import annotations

from typing import Any

import attrs

from narsuite.ike.config import PeerPolicy
from narsuite.ike.crypto import ISAKMPCrypto, Phase1Keys
from narsuite.ike.isakmp import Identification
from narsuite.ike.natt import Variant
from narsuite.ike.proposals import Phase1Choice, Phase2Choice

__all__ = ["IkeSA", "QuickMode", "Child", "Pending"]


@attrs.define(eq=False)
class QuickMode:
    """A Quick Mode exchange we answered, waiting for HASH(3)."""

    message_id: int
    choice: Phase2Choice
    spi_in: int
    spi_out: int
    ni: bytes
    nr: bytes
    gqm_xy: bytes | None
    remote_ts: tuple[str, int, int]  # (network, protocol, port)
    local_ts: tuple[str, int, int]
    nat_oa_remote: str = ""
    nat_oa_local: str = ""


@attrs.define(eq=False)
class Child:
    """An ESP SA pair this IKE SA installed (the records are in the store)."""

    peer: str  # esp.peer name
    spi_in: int
    spi_out: int
    expires: float
    description: str
    timer: Any = None


@attrs.define(eq=False)
class Pending:
    """A request we sent (XAUTH, pushed mode-config, DPD, Delete) and may resend."""

    message_id: int
    data: bytes
    tries: int = 0
    timer: Any = None
    kind: str = ""


@attrs.define(eq=False)
class IkeSA:
    icky: bytes
    rcky: bytes
    exchange: int
    remote: tuple[str, int]
    local_port: int
    local_ip: str
    created: float
    state: str = "start"  # mm2 / mm4 / am2 / established / deleted
    candidates: list[PeerPolicy] = attrs.field(factory=list)
    policy: PeerPolicy | None = None
    choice: Phase1Choice | None = None
    sai_b: bytes = b""
    dh_private: Any = None
    gxi: bytes = b""
    gxr: bytes = b""
    ni: bytes = b""
    nr: bytes = b""
    gxy: bytes = attrs.field(default=b"", repr=False)
    keys: Phase1Keys | None = attrs.field(default=None, repr=False)
    crypto: ISAKMPCrypto | None = attrs.field(default=None, repr=False)
    variant: Variant | None = None
    nat_peer: bool = False  # the peer is behind a NAT
    nat_local: bool = False  # we are behind a NAT
    peer_dpd: bool = False
    peer_unity: bool = False
    peer_id: Identification | None = None
    peer_id_text: str = ""
    peer_cert_subject: str = ""
    initial_contact: bool = False
    established: float = 0.0
    expires: float = 0.0
    last_rx: float = 0.0
    #: received datagram digest -> the datagrams we answered it with (RFC 2408: answer a
    #: retransmission with the stored reply, never process it again)
    replies: dict[bytes, list[bytes]] = attrs.field(factory=dict, repr=False)
    seen: set[bytes] = attrs.field(factory=set, repr=False)
    used_mids: set[int] = attrs.field(factory=set, repr=False)
    quick: dict[int, QuickMode] = attrs.field(factory=dict, repr=False)
    children: list[Child] = attrs.field(factory=list)
    pending: dict[int, Pending] = attrs.field(factory=dict, repr=False)
    transaction: Any = None  # modecfg.TransactionServer
    xauth_user: str = ""
    xauth_done: bool = False
    delete_scheduled: bool = False
    address: str = ""  # mode-config address
    dpd_seq: int = 0
    dpd_peer_seq: int | None = None
    dpd_sent: float = 0.0
    timer: Any = None  # half-open timeout, then lifetime
    first_key: tuple[bytes, str, int] | None = None

    @property
    def key(self) -> bytes:
        return self.icky + self.rcky

    @property
    def name(self) -> str:
        return self.icky.hex()[:8] + self.rcky.hex()[:8]

    @property
    def natted(self) -> bool:
        return self.nat_peer or self.nat_local

    @property
    def ready_for_quick_mode(self) -> bool:
        if self.state != "established":
            return False
        t = self.transaction
        return t is None or t.state in ("config", "done")
