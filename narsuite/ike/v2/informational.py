"""INFORMATIONAL (RFC 7296 §1.4): liveness checks both ways, Delete, notifications; and
the answers to our own requests (any exchange: window 1, matched by message ID).

Liveness (§2.4): an SA silent for ``[ike] dpd_delay`` gets an empty INFORMATIONAL
request from us; unanswered through the ``retransmit`` schedule, the peer is dead and
the SA goes.  The peer's empty requests are answered empty.
"""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING, Any

from narsuite.ike.common import Drop
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire
from narsuite.ike.v2.sa import IkeSAv2
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.ike.v2.engine import IkeV2Engine

__all__ = ["Informational"]

log = logger()


class Informational:
    def __init__(self, engine: IkeV2Engine) -> None:
        self.engine = engine

    def received(self, sa: IkeSAv2, header: wire.Header, payloads: tuple[Any, ...], addr: tuple[str, int],
                 local_port: int) -> list[Any] | None:
        e = self.engine
        out: list[Any] = []
        delete_ike = False
        spis_back: list[bytes] = []
        for p in payloads:
            if isinstance(p, wire.Delete):
                e.count("delete_rx")
                if p.protocol == C.PROTO_IKE:
                    delete_ike = True
                elif p.protocol == C.PROTO_ESP:
                    for spi in p.spis:
                        child = e.children.by_out(sa, int.from_bytes(spi, "big"))
                        if child is None:
                            continue  # §1.4.1: already gone (both sides deleted at once)
                        spis_back.append(child.spi_in.to_bytes(4, "big"))
                        e.children.remove(sa, child)
                        log.info("ikev2: {name}: peer deleted CHILD SA in {spi:#010x}", name=sa.name,
                                 spi=child.spi_in)
            elif isinstance(p, wire.Notify):
                if p.error:
                    e.count("error_notify_rx")
                    log.info("ikev2: {name}: peer notified error {t}", name=sa.name, t=p.type)
                elif p.type == C.UPDATE_SA_ADDRESSES and sa.mobike:
                    out += self.update_addresses(sa, payloads, addr, local_port)
        if spis_back:
            out.append(wire.Delete(C.PROTO_ESP, tuple(spis_back)))
        if delete_ike:
            # answer (empty), then the SA and its children are gone (§1.4.1)
            e.respond(sa, header, [], addr, local_port)
            log.info("ikev2: {name}: peer deleted the IKE SA", name=sa.name)
            e.delete_ike(sa, notify_peer=False, reason="deleted by the peer")
            return None
        return out

    def update_addresses(self, sa: IkeSAv2, payloads: tuple[Any, ...], addr: tuple[str, int],
                         local_port: int) -> list[Any]:
        """RFC 4555 §3.5: the IKE SA and its CHILD SAs move to where this (authenticated)
        request came from, NAT detection is run again with the SA's SPIs, and the answer
        carries our NAT_DETECTION_* (and the peer's COOKIE2, §3.6)."""
        e = self.engine
        sources = [p for p in payloads if isinstance(p, wire.Notify) and p.type == C.NAT_DETECTION_SOURCE_IP]
        ns = wire.notifies(payloads)
        dest = ns.get(C.NAT_DETECTION_DESTINATION_IP)
        out: list[Any] = []
        if sources or dest:
            seen = keys.natd_hash(sa.spi_i, sa.spi_r, addr[0], addr[1])
            sa.nat_peer = not any(hmac.compare_digest(s.data, seen) for s in sources)
            ours = keys.natd_hash(sa.spi_i, sa.spi_r, sa.local_ip, local_port)
            sa.nat_local = dest is not None and not hmac.compare_digest(dest.data, ours)
            out += [wire.Notify(C.NAT_DETECTION_SOURCE_IP, keys.natd_hash(sa.spi_i, sa.spi_r, sa.local_ip,
                                                                          local_port)),
                    wire.Notify(C.NAT_DETECTION_DESTINATION_IP, keys.natd_hash(sa.spi_i, sa.spi_r, addr[0],
                                                                               addr[1]))]
        cookie2 = ns.get(C.COOKIE2)
        if cookie2 is not None:
            out.append(cookie2)
        e.count("mobike_update")
        log.info("ikev2: {name}: UPDATE_SA_ADDRESSES from {addr}{nat}", name=sa.name, addr=f"{addr[0]}:{addr[1]}",
                 nat=" (behind NAT)" if sa.nat_peer else "")
        if not e.cfg.ikev2_mobike_check:
            e.move(sa, addr, local_port)
            return out
        # return routability (§3.5): the IKE SA answers the new address now; the CHILD SAs
        # follow once an INFORMATIONAL with our COOKIE2 came back from it
        sa.remote, sa.local_port = addr, local_port
        cookie = secrets.token_bytes(16)

        def checked(sa2: IkeSAv2, answer: tuple[Any, ...]) -> None:
            echoed = wire.notifies(answer).get(C.COOKIE2)
            if echoed is None or not hmac.compare_digest(echoed.data, cookie):
                e.count("mobike_check_failed")
                log.warn("ikev2: {name}: return routability check of {addr} failed", name=sa2.name,
                         addr=f"{addr[0]}:{addr[1]}")
                return
            if sa2.remote != addr:
                return  # it moved again meanwhile: that update's own check decides
            e.count("mobike_checked")
            e.move(sa2, addr, local_port)
        e.send_request(sa, C.INFORMATIONAL, [wire.Notify(C.COOKIE2, cookie)], "return routability", checked)
        return out

    # ------------------------------------------------------------------ answers to our requests
    def response(self, sa: IkeSAv2, header: wire.Header, data: bytes, addr: tuple[str, int], local_port: int) -> None:
        e = self.engine
        req = sa.outstanding
        if req is None or header.message_id != req.message_id:
            raise Drop("unexpected", f"response {header.message_id} to no request of ours")
        payloads = e.open(sa, header, data)
        if payloads is None:
            return
        sa.last_rx = e.now()
        if req.kind == "liveness":
            e.count("liveness_answered")
        e.answered(sa, payloads)

    # ------------------------------------------------------------------ liveness
    def tick(self) -> None:
        e = self.engine
        delay = e.cfg.dpd_delay
        if not delay:
            return
        now = e.now()
        for sa in list(e.sas.values()):
            if sa.state == "established" and sa.outstanding is None and now - sa.last_rx >= delay:
                e.count("liveness_sent")
                e.send_request(sa, C.INFORMATIONAL, [], "liveness")
