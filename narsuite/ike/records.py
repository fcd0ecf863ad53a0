"""What the ike role keeps in the store: one summary record per ISAKMP SA, and (for a
cluster's standby) the state that carries an established ISAKMP SA on.

``ike.sa`` is for operators (narctl, Prometheus, the manhole) and for other processes
that want to know who is connected.  ``ike.isakmp`` holds what a standby needs to
continue an established IKEv1 SA after its node died (docs/cluster.md, level 2): the
cookies, SKEYID_d/a/e and the last phase-1 CBC block in ``secret()`` fields;
``ike.v2sa`` the same for an established IKEv2 SA (SPIs, SK_d/a/e/p, message IDs).  Neither
kind is persisted; with ``[cluster] key_file`` the Sealer keeps both in the
shared store only sealed (AES-GCM under the cluster key), and ``narctl cluster adopt``
puts it back into a standby's view, where the engine resumes the SA.
"""

from __future__ import annotations

from typing import Any

import attrs

from narsuite.store import Index, KindSpec, secret

__all__ = ["IkeSaRecord", "IKE_SA", "IsakmpState", "ISAKMP_STATE", "IkeV2State", "IKEV2_STATE", "KINDS"]


@attrs.frozen
class IkeSaRecord:
    name: str
    remote_ip: str
    remote_port: int
    local_port: int
    state: str
    exchange: str
    policy: str
    peer_id: str
    algorithms: str
    natt: str
    nat: str
    xauth_user: str
    address: str
    children: int
    established: float
    expires: float


IKE_SA = KindSpec(
    name="ike.sa",
    record=IkeSaRecord,
    key=lambda r: r.name,
    indexes=(Index("remote_ip", lambda r: r.remote_ip, unique=False),),
    persist=False,
    columns=("name", "remote_ip", "remote_port", "state", "policy", "peer_id", "xauth_user", "address",
             "children"),
    description="IKE (ISAKMP) SAs: peer, state, algorithms, NAT, remote-access user and address",
)



@attrs.frozen
class IsakmpState:
    """An established IKEv1 SA as a standby resumes it (:meth:`IkeEngine.resume`).

    What is not here is not needed to go on: SKEYID itself and g^xy (phase 1 is over),
    the IVs of exchanges in flight (a new exchange's IV is derived from the last phase-1
    CBC block and its message ID, RFC 2409 Appendix B; one in flight is retransmitted by
    the peer and fails, as after any lost message)."""

    cookies: str  # CKY-I | CKY-R in hex: the key
    name: str
    exchange: int
    remote_ip: str
    remote_port: int
    local_ip: str
    local_port: int
    policy: str
    # the phase-1 choice (RFC 2409 §5): what the HASHes and the cipher of every later exchange use
    cipher: str
    key_len: int
    hash: str
    group: int
    auth: int
    lifetime: float
    variant: str  # NAT-T variant name, "" without NAT-T
    nat_peer: bool
    nat_local: bool
    peer_dpd: bool
    peer_unity: bool
    peer_id_type: int
    peer_id_data: bytes
    peer_id_text: str
    peer_cert_subject: str
    xauth_user: str
    xauth_done: bool
    address: str  # mode-config address
    established: float
    expires: float
    #: our last DPD sequence number (a standby continues past it by ``[cluster] seq_margin``)
    dpd_seq: int
    #: message IDs already used, at most 256 of them (a replayed QM1 of these is refused)
    used_mids: tuple[int, ...]
    #: the ESP SA pairs (esp.peer name, SPI in, SPI out, expiry, description): their records
    #: are in the store (sealed esp.sa / esp.peer); Deletes and rekeys name them
    children: tuple[tuple[str, int, int, float, str], ...]
    skeyid_d: bytes = secret(default=b"")
    skeyid_a: bytes = secret(default=b"")
    skeyid_e: bytes = secret(default=b"")
    #: the last phase-1 CBC output block (IV state after MM6/AM3)
    phase1_iv: bytes = secret(default=b"")


ISAKMP_STATE = KindSpec(
    name="ike.isakmp",
    record=IsakmpState,
    key=lambda r: r.cookies,
    persist=False,
    columns=("name", "remote_ip", "remote_port", "policy", "xauth_user", "address"),
    description="established IKEv1 SAs as a standby resumes them (keys in memory; in Redis only sealed)",
)


@attrs.frozen
class IkeV2State:
    """An established IKEv2 SA as a standby resumes it (:mod:`narsuite.ike.v2.resume`).

    What is not here is not needed to go on: SKEYSEED and g^ir (SK_d and the six others are
    what every later exchange uses: SK_e/SK_a protect the messages, SK_d keys new CHILD SAs
    and an IKE SA rekey, SK_p is only for IKE_AUTH), the nonces and IKE_SA_INIT messages
    (only IKE_AUTH signs them), an exchange in flight (the peer retransmits it).  The message
    IDs are those of the last write: the standby resynchronises them with the peer (RFC 6311)
    when the peer announced that it can, or accepts the peer's next request a little ahead."""

    spis: str  # SPIi | SPIr in hex: the key
    name: str
    remote_ip: str
    remote_port: int
    local_ip: str
    local_port: int
    policy: str
    # the IKE SA's transforms (IkeChoice)
    encr: int
    key_bits: int
    integ: int
    prf: int
    dh: int
    we_initiated: bool
    nat_peer: bool
    nat_local: bool
    frag_ok: bool
    mobike: bool
    #: the peer announced IKEV2_MESSAGE_ID_SYNC_SUPPORTED (RFC 6311) and we answered it
    mid_sync: bool
    peer_id_text: str
    peer_id_body: bytes
    peer_cert_subject: str
    eap_user: str
    address: str  # the virtual IP from the pool
    established: float
    expires: float
    #: the next request message ID we expect from the peer / we would send (§2.3)
    peer_mid: int
    my_mid: int
    #: the CHILD SAs: (esp.peer name, SPI in, SPI out, expiry, (enc, key bits, integ, esn, PFS
    #: group, proposal number), TSi text, TSr text, client-side ranges, our ranges, rekey due,
    #: rekeyed); their esp.sa/esp.peer records are in the store (sealed too)
    children: tuple[tuple[Any, ...], ...]
    sk_d: bytes = secret(default=b"")
    sk_ai: bytes = secret(default=b"")
    sk_ar: bytes = secret(default=b"")
    sk_ei: bytes = secret(default=b"")
    sk_er: bytes = secret(default=b"")
    sk_pi: bytes = secret(default=b"")
    sk_pr: bytes = secret(default=b"")


IKEV2_STATE = KindSpec(
    name="ike.v2sa",
    record=IkeV2State,
    key=lambda r: r.spis,
    persist=False,
    columns=("name", "remote_ip", "remote_port", "policy", "eap_user", "address", "peer_mid", "my_mid"),
    description="established IKEv2 SAs as a standby resumes them (keys in memory; in Redis only sealed)",
)

KINDS = (IKE_SA, ISAKMP_STATE, IKEV2_STATE)
