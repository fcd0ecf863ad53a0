"""NAT traversal variants: RFC 3947, the nat-t-ike drafts 02/02\\n/03, and the 004 draft.

They differ in four things that travel together, so each variant is one record:
the vendor ID that announces it, the NAT-D / NAT-OA payload numbers, the UDP
encapsulation-mode values in Quick Mode, and where ESP goes (port 4500 behind
the non-ESP marker for IKE, or the 004 draft's UDP 500 with eight zero bytes in
front of ESP and IKE left alone).  The 004 draft's NAT Discovery hash is also
its own: ``MD5(initiator IP | port | responder IP | port)`` with no cookies.
"""

from __future__ import annotations

import hashlib
import ipaddress

import attrs

from narsuite.ike import constants as C
from narsuite.ike import crypto

__all__ = ["Variant", "VARIANTS", "choose_variant", "natd_hashes", "espthrunat_hash"]


@attrs.frozen
class Variant:
    name: str
    vid: bytes
    natd_type: int
    natoa_type: int
    udp_modes: tuple[int, int]  # (UDP-tunnel, UDP-transport)
    floats: bool  # IKE moves to 4500 behind the non-ESP marker once a NAT is seen
    encap: str  # the esp role's encapsulation name when a NAT is present


VARIANTS: dict[str, Variant] = {
    "rfc3947": Variant("rfc3947", C.VID_NATT_RFC3947, C.PT_NAT_D, C.PT_NAT_OA,
                       (C.ENCAP_UDP_TUNNEL, C.ENCAP_UDP_TRANSPORT), True, "udp"),
    "draft-03": Variant("draft-03", C.VID_NATT_DRAFT_03, C.PT_NAT_D_DRAFT, C.PT_NAT_OA_DRAFT,
                        (C.ENCAP_UDP_TUNNEL_DRAFT, C.ENCAP_UDP_TRANSPORT_DRAFT), True, "udp"),
    "draft-02n": Variant("draft-02n", C.VID_NATT_DRAFT_02N, C.PT_NAT_D_DRAFT, C.PT_NAT_OA_DRAFT,
                         (C.ENCAP_UDP_TUNNEL_DRAFT, C.ENCAP_UDP_TRANSPORT_DRAFT), True, "udp"),
    "draft-02": Variant("draft-02", C.VID_NATT_DRAFT_02, C.PT_NAT_D_DRAFT, C.PT_NAT_OA_DRAFT,
                        (C.ENCAP_UDP_TUNNEL_DRAFT, C.ENCAP_UDP_TRANSPORT_DRAFT), True, "udp"),
    "espthrunat": Variant("espthrunat", C.VID_ESPTHRUNAT, C.PT_NAT_D_DRAFT, C.PT_NAT_OA_DRAFT,
                          (C.ENCAP_UDP_TUNNEL_00, C.ENCAP_UDP_TRANSPORT_00), False, "udp500"),
}


def choose_variant(vids: list[bytes], enabled: tuple[str, ...],
                   espthrunat_modes: tuple[int, int] = (C.ENCAP_UDP_TUNNEL_00, C.ENCAP_UDP_TRANSPORT_00),
                   ) -> Variant | None:
    """The best variant both sides speak: our order (``enabled``, best first) decides."""
    offered = set(vids)
    for name in enabled:
        v = VARIANTS[name]
        if v.vid in offered:
            if name == "espthrunat" and espthrunat_modes != v.udp_modes:
                v = attrs.evolve(v, udp_modes=espthrunat_modes)
            return v
    return None


def natd_hashes(hash_name: str, icky: bytes, rcky: bytes, remote: tuple[str, int],
                local: tuple[str, int]) -> tuple[bytes, bytes]:
    """What a side sends (RFC 3947 §3.2): first the hash of the remote end as it addresses
    it, then its own local address/port."""
    return (crypto.natd_hash(hash_name, icky, rcky, remote[0], remote[1]),
            crypto.natd_hash(hash_name, icky, rcky, local[0], local[1]))


def espthrunat_hash(initiator: tuple[str, int], responder: tuple[str, int]) -> bytes:
    """004 draft §4.1: MD5(initiator IP | initiator port | responder IP | responder port),
    port 0 hashed as 500."""
    def part(ip: str, port: int) -> bytes:
        return ipaddress.ip_address(ip).packed + (port or 500).to_bytes(2, "big")
    return hashlib.md5(part(*initiator) + part(*responder), usedforsecurity=False).digest()
