"""CREATE_CHILD_SA (RFC 7296 §1.3): a new CHILD SA, a CHILD SA rekey (N(REKEY_SA)), and
an IKE SA rekey (an SA payload of protocol IKE, §1.3.2 and §2.18).

PFS: a KE in the request must be of the group the chosen ESP proposal names (else
INVALID_KE_PAYLOAD with ours); the policy's ``pfs`` ("required", "never", "optional")
and ``pfs_groups`` decide what is acceptable, as for IKEv1's Quick Mode.

A rekeyed CHILD SA keeps its esp.peer name: the new outbound SA replaces the old one at
once, the old inbound one stays until the peer's Delete (§2.8).  A rekeyed IKE SA takes
the CHILD SAs with it; the old one answers the peer's Delete and goes.
"""

from __future__ import annotations

import secrets
import struct
from typing import TYPE_CHECKING, Any

from narsuite.ike.config import parse_esp
from narsuite.ike.crypto import CryptoError
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire
from narsuite.ike.v2.proposals import choose_esp, choose_ike
from narsuite.ike.v2.sa import IkeSAv2
from narsuite.ike.v2.sa_init import allowed_proposals
from narsuite.ike.v2.wire import IKEv2Error
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.ike.v2.engine import IkeV2Engine

__all__ = ["CreateChild"]

log = logger()


class CreateChild:
    def __init__(self, engine: IkeV2Engine) -> None:
        self.engine = engine

    def received(self, sa: IkeSAv2, header: wire.Header, payloads: tuple[Any, ...], addr: tuple[str, int],
                 local_port: int) -> list[Any]:
        sa_p = wire.find(payloads, wire.SA)
        nonce = wire.find(payloads, wire.Nonce)
        if sa_p is None or nonce is None or not 16 <= len(nonce.data) <= 256:
            raise IKEv2Error(C.INVALID_SYNTAX, "CREATE_CHILD_SA without SA or a 16..256-byte nonce")
        if sa_p.proposals[0].protocol == C.PROTO_IKE:
            return self.rekey_ike(sa, sa_p, nonce.data, wire.find(payloads, wire.KE))
        return self.child(sa, sa_p, nonce.data, payloads)

    def _dh(self, group_number: int, ke: wire.KE | None) -> tuple[bytes, wire.KE]:
        if ke is None or ke.group != group_number:
            self.engine.count("invalid_ke_sent")
            raise IKEv2Error(C.INVALID_KE_PAYLOAD, f"KE of group {ke.group if ke else 'none'}, we chose {group_number}",
                             struct.pack("!H", group_number))
        group = keys.group(group_number)
        private, public = group.generate()
        try:
            gir = group.shared(private, ke.data)
        except CryptoError as err:
            raise IKEv2Error(C.INVALID_SYNTAX, str(err)) from None
        return gir, wire.KE(group_number, public)

    def child(self, sa: IkeSAv2, sa_p: wire.SA, ni: bytes, payloads: tuple[Any, ...]) -> list[Any]:
        e = self.engine
        assert sa.policy is not None
        p = sa.policy
        ns = wire.notifies(payloads)
        replaces = None
        rekey = ns.get(C.REKEY_SA)
        if rekey is not None:
            replaces = e.children.by_out(sa, int.from_bytes(rekey.spi, "big")) if len(rekey.spi) == 4 else None
            if replaces is None:
                raise IKEv2Error(C.CHILD_SA_NOT_FOUND, f"REKEY_SA for unknown SPI {rekey.spi.hex()}",)
            if replaces.deleting or replaces.rekeyed:
                # §2.25: we are closing it (our own rekey replaced it): the client's would be redundant
                raise IKEv2Error(C.TEMPORARY_FAILURE, f"REKEY_SA for {rekey.spi.hex()}, which is being deleted")
        groups = () if p.pfs == "never" else tuple(p.pfs_groups) + (31,)
        choice = choose_esp(sa_p, tuple(parse_esp(x) for x in p.esp), pfs_groups=groups)
        if choice is None or (p.pfs == "required" and not choice.dh):
            e.count("no_proposal")
            raise IKEv2Error(C.NO_PROPOSAL_CHOSEN, "no acceptable ESP proposal")
        ke = wire.find(payloads, wire.KE)
        gir = None
        out_ke: list[Any] = []
        if choice.dh:
            gir, ke_out = self._dh(choice.dh, ke)
            out_ke = [ke_out]
        nr = secrets.token_bytes(32)
        made = e.children.install(sa, choice, ni, nr, gir, payloads, replaces=replaces)
        if replaces is not None and replaces.rekeying is not None:
            # our own rekey of it is on its way: a collision, settled by the nonces when its
            # answer comes (rekey.py, §2.8.1)
            replaces.collided = sa.children[-1]
        return [made[0], wire.Nonce(nr), *out_ke, *made[1:]]

    def rekey_ike(self, sa: IkeSAv2, sa_p: wire.SA, ni: bytes, ke: wire.KE | None) -> list[Any]:
        """§2.18: a new IKE SA with new SPIs and keys from SK_d; the children move to it."""
        e = self.engine
        assert sa.policy is not None and sa.keys is not None and sa.choice is not None
        got = choose_ike(sa_p, allowed_proposals((sa.policy,)))
        if got is None:
            e.count("no_proposal")
            raise IKEv2Error(C.NO_PROPOSAL_CHOSEN, "no acceptable IKE proposal for the rekey")
        choice, number = got
        peer_spi = next(pr.spi for pr in sa_p.proposals if pr.number == number)
        if len(peer_spi) != 8:
            raise IKEv2Error(C.INVALID_SYNTAX, "IKE SA rekey without an 8-byte SPI")
        gir, ke_out = self._dh(choice.dh, ke)
        nr = secrets.token_bytes(32)
        spi_r = e.new_spi()
        # SKEYSEED with the old SA's PRF and SK_d, the new keys with the new PRF (§2.18)
        seed = keys.rekey_skeyseed(sa.choice.prf_name, sa.keys.sk_d, gir, ni, nr)
        k = keys.derive_ike_keys(choice.prf_name, seed, ni, nr, peer_spi, spi_r, choice.enc_key_len,
                                 choice.integ_key_len)
        new = IkeSAv2(peer_spi, spi_r, sa.remote, sa.local_port, sa.local_ip, e.now(), candidates=[sa.policy],
                      policy=sa.policy, choice=choice, keys=k, ni=ni, nr=nr)
        new.rx = keys.SKCipher(choice.encr, k.sk_ei, choice.integ, k.sk_ai)
        new.tx = keys.SKCipher(choice.encr, k.sk_er, choice.integ, k.sk_ar)
        # (RFC 6311 support too: strongSwan's rekeyed SA inherits the extensions it had)
        for attr in ("nat_peer", "nat_local", "frag_ok", "mobike", "mid_sync", "peer_id_text", "peer_id_body",
                     "eap_user", "address"):
            setattr(new, attr, getattr(sa, attr))
        new.last_rx = e.now()
        e.sas[spi_r] = new
        e.established(new, publish=False)  # transfer() writes its record
        e.children.transfer(sa, new)
        e.count("ike_rekeyed")
        log.info("ikev2: {old} rekeyed to {new} ({alg})", old=sa.name, new=new.name, alg=choice.describe())
        return [wire.SA((choice.proposal(number, spi_r),)), wire.Nonce(nr), ke_out]
