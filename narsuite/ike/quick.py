"""Quick Mode (RFC 2409 §5.5): phase 2 proposals and traffic selectors.

QM1 HASH(1),SA,Ni[,KE][,IDci,IDcr][,NAT-OA] -> QM2; QM3 HASH(3) -> the ESP SAs
go to the store (:mod:`narsuite.ike.children`).  What the peer may claim as its
side of the tunnel is decided here (:meth:`QuickModeResponder.check_selectors`).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from narsuite.ike import constants as C
from narsuite.ike import crypto, ids, isakmp, proposals
from narsuite.ike.common import Drop, nonce
from narsuite.ike.config import network
from narsuite.ike.isakmp import (
    Identification,
    ISAKMPError,
    KeyExchange,
    NatOA,
    Nonce,
    Notification,
    SecurityAssociation,
)
from narsuite.ike.sa import IkeSA, QuickMode
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.ike.engine import IkeEngine

__all__ = ["QuickModeResponder"]

log = logger()


class QuickModeResponder:
    """Quick Mode for one engine (the engine is this part's transport)."""

    def __init__(self, engine: IkeEngine) -> None:
        self.engine = engine

    def received(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
                 digest: bytes) -> None:
        e = self.engine
        assert sa.keys is not None and sa.choice is not None and sa.policy is not None and sa.crypto is not None
        h, a, mid = sa.choice.hash, sa.keys.skeyid_a, header.message_id
        qm = sa.quick.get(mid)
        if qm is not None:
            ni, nr = qm.ni, qm.nr
            e.open_protected(sa, header, data, lambda rest: crypto.qm_hash3(h, a, mid, ni, nr))
            e.remember(sa, digest)
            del sa.quick[mid]
            sa.crypto.ivs.forget(mid)
            e.follow(sa, addr, local_port)
            e.children.install(sa, qm)
            return
        if mid in sa.used_mids:
            raise Drop("duplicate", f"Quick Mode message ID {mid:#x} already used")
        if not sa.ready_for_quick_mode:
            raise Drop("unexpected", "Quick Mode before XAUTH completed")
        if len(sa.quick) >= 16:
            raise Drop("unexpected", "16 Quick Modes of this peer wait for their third message")
        _ct, payloads = e.open_protected(sa, header, data, lambda rest: crypto.qm_hash1(h, a, mid, rest))
        sa.used_mids.add(mid)
        sa.last_rx = e.now()
        e.follow(sa, addr, local_port)
        try:
            self._qm1(sa, mid, payloads, digest)
        except ISAKMPError as err:
            e.count("quick_refused")
            log.warn("ike: {name}: Quick Mode refused: {why}", name=sa.name, why=str(err))
            e.send_informational(sa, [Notification(err.notify, C.PROTO_IPSEC_ESP, err.spi)])
            sa.crypto.ivs.forget(mid)

    def _qm1(self, sa: IkeSA, mid: int, payloads: tuple, digest: bytes) -> None:
        e = self.engine
        assert sa.policy is not None and sa.choice is not None
        policy = sa.policy
        isakmp.require_known(payloads)
        offer = isakmp.find(payloads, SecurityAssociation)
        if offer is None:
            raise ISAKMPError(C.PAYLOAD_MALFORMED, "Quick Mode without SA")
        ni = nonce(payloads)
        ke = isakmp.find(payloads, KeyExchange)
        idents = isakmp.find_all(payloads, Identification)
        if len(idents) not in (0, 2):
            raise ISAKMPError(C.INVALID_ID_INFORMATION, "Quick Mode needs both IDs or none")
        udp_modes = sa.variant.udp_modes if sa.variant is not None and sa.natted else None
        choice = proposals.choose_phase2(offer, policy, udp_modes=udp_modes, pfs_offered=ke is not None)
        try:
            remote_sel = ids.selector(idents[0] if idents else None, sa.remote[0])
            local_sel = ids.selector(idents[1] if idents else None, sa.local_ip)
        except ValueError as err:
            raise ISAKMPError(C.INVALID_ID_INFORMATION, str(err)) from None
        self.check_selectors(sa, remote_sel, local_sel, bool(idents))
        gqm_xy = None
        ke_out = None
        if ke is not None:
            assert choice.pfs_group is not None  # choose_phase2 refuses a KE without a group
            group = crypto.group(choice.pfs_group)
            try:
                private, public = group.generate()
                gqm_xy = group.shared(private, ke.data)
            except crypto.CryptoError as err:
                raise ISAKMPError(C.INVALID_KEY_INFORMATION, str(err)) from None
            ke_out = KeyExchange(public)
        nat_oa = [p for p in payloads if isinstance(p, NatOA)]
        for oa in nat_oa:
            if oa.id_type != C.ID_IPV4_ADDR or len(oa.address) != 4:
                raise ISAKMPError(C.INVALID_ID_INFORMATION, f"NAT-OA of ID type {oa.id_type}: IPv4 addresses only")
        oa_remote = str(ipaddress.IPv4Address(nat_oa[0].address)) if nat_oa else ""
        oa_local = str(ipaddress.IPv4Address(nat_oa[1].address)) if len(nat_oa) > 1 else ""
        nr = crypto.random_nonce(32)
        spi_out = int.from_bytes(choice.proposal.spi, "big")
        try:
            spi_in = e.store.reserve_spi(e.owner(sa))
        except Exception as err:  # the SPI space is (nearly) full
            raise ISAKMPError(C.NO_PROPOSAL_CHOSEN, f"no SPI: {err}") from None
        sa.quick[mid] = QuickMode(mid, choice, spi_in, spi_out, ni, nr, gqm_xy,
                                  (str(remote_sel[0]), remote_sel[1], remote_sel[2]),
                                  (str(local_sel[0]), local_sel[1], local_sel[2]), oa_remote, oa_local)
        # a QM2 never answered by HASH(3) does not stay forever
        e.clock.callLater(e.cfg.half_open_timeout, lambda: sa.quick.pop(mid, None))
        resp = [SecurityAssociation((isakmp.Proposal(choice.proposal.number, C.PROTO_IPSEC_ESP,
                                                     spi_in.to_bytes(4, "big"), choice.proposal.transforms),),
                                    doi=offer.doi, situation=offer.situation),
                Nonce(nr)]
        if ke_out is not None:
            resp.append(ke_out)
        resp += idents
        if not choice.tunnel and choice.udp and sa.variant is not None:
            resp += [NatOA(C.ID_IPV4_ADDR, ipaddress.IPv4Address(sa.remote[0]).packed, sa.variant.natoa_type),
                     NatOA(C.ID_IPV4_ADDR, ipaddress.IPv4Address(sa.local_ip).packed, sa.variant.natoa_type)]
        assert sa.keys is not None
        h, a = sa.choice.hash, sa.keys.skeyid_a
        reply = e.seal(sa, C.EXCH_QUICK, mid, resp, lambda rest: crypto.qm_hash2(h, a, mid, ni, rest))
        e.reply(sa, digest, [reply])

    def check_selectors(self, sa: IkeSA, remote_sel: tuple, local_sel: tuple, explicit: bool) -> None:
        e = self.engine
        assert sa.policy is not None
        policy = sa.policy
        rnet, lnet = remote_sel[0], local_sel[0]
        if not any(lnet.subnet_of(network(n)) for n in policy.local_ts):
            e.count("ts_refused")
            raise ISAKMPError(C.INVALID_ID_INFORMATION,
                              f"local selector {ids.selector_text(local_sel)} is outside local_ts "
                              f"{list(policy.local_ts)}")
        if policy.mode == "transport":
            return
        if policy.pool:
            if not sa.address or rnet != ipaddress.IPv4Network(sa.address + "/32"):
                e.count("ts_refused")
                raise ISAKMPError(C.INVALID_ID_INFORMATION, f"remote selector {ids.selector_text(remote_sel)} is not "
                                  f"the client's mode-config address {sa.address or '(none yet)'}")
            return
        if policy.remote_ts:
            if not any(rnet.subnet_of(network(n)) for n in policy.remote_ts):
                e.count("ts_refused")
                raise ISAKMPError(C.INVALID_ID_INFORMATION, f"remote selector {ids.selector_text(remote_sel)} is "
                                  f"outside remote_ts {list(policy.remote_ts)}")
            return
        if policy.napt:
            return  # 001 Appendix A: whatever the client uses is translated to G_i
        if rnet.prefixlen != 32:
            e.count("ts_refused")
            raise ISAKMPError(C.INVALID_ID_INFORMATION, f"remote selector {ids.selector_text(remote_sel)}: this "
                              "policy allows a single host (set remote_ts for networks)")
        if rnet.network_address == ipaddress.IPv4Address(sa.remote[0]):
            return  # the peer's own address, as we see it
        # Any other address is the client's claim, and it would be routed into the client's
        # tunnel (004 §7: a client MUST NOT steal an address of the protected network).  Only
        # an explicit opt-in lets a client behind a NAT use its private address -- and even
        # then not one inside a local_ts that names what we protect (0.0.0.0/0 names nothing).
        if not policy.trust_client_address:
            e.count("ts_refused")
            raise ISAKMPError(C.INVALID_ID_INFORMATION,
                              f"remote selector {ids.selector_text(remote_sel)} is not the peer's address "
                              f"{sa.remote[0]}; give policy {policy.name!r} a pool, remote_ts, napt or "
                              "trust_client_address")
        if not sa.nat_peer or any(rnet.overlaps(network(n)) for n in policy.local_ts if network(n).prefixlen):
            e.count("ts_refused")
            raise ISAKMPError(C.INVALID_ID_INFORMATION,
                              f"remote selector {ids.selector_text(remote_sel)} is neither the peer's address "
                              f"{sa.remote[0]} nor (behind its NAT) outside local_ts; set remote_ts or a pool")
