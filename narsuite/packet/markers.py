"""What tells IKE from ESP on the two UDP ports they share, defined once for both roles.

* Port 4500 (RFC 3948 §2.2): IKE messages carry a four-byte zero *non-ESP marker*
  (an ESP SPI is never zero); a single 0xFF byte is a NAT-keepalive (§2.3);
  everything else is ESP.
* Port 500 with the 004 draft ("ESPThruNAT", §2.1): ESP travels behind an
  eight-byte zero *non-IKE marker* (an IKE initiator cookie is never zero);
  everything else is IKE.

The ike role claims IKE, the esp role claims ESP, on the process's shared UDP port
(:mod:`narsuite.packet.udp`); both import the predicates from here so the two sides
of each split can never disagree.
"""

from __future__ import annotations

__all__ = ["NON_ESP_MARKER", "NON_IKE_MARKER", "KEEPALIVE", "ZERO_COOKIE", "is_ike_on_500", "is_ike_on_4500",
           "is_esp_or_keepalive", "is_draft_esp"]

#: RFC 3948 §2.2: in front of IKE on port 4500
NON_ESP_MARKER = b"\x00\x00\x00\x00"
#: 004 draft §2.1: in front of ESP on port 500 (ESPThruNAT)
NON_IKE_MARKER = b"\x00" * 8
#: RFC 3948 §2.3: the NAT-keepalive datagram
KEEPALIVE = b"\xff"
#: an ISAKMP responder cookie not chosen yet (RFC 2408 §3.1); also why the non-IKE marker works
ZERO_COOKIE = b"\x00" * 8

#: smallest IKE message: the 28-byte ISAKMP header
_IKE_HEADER = 28


def is_ike_on_500(data: bytes) -> bool:
    """Port 500: IKE unless it is the 004 draft's ESP (eight zero bytes, then ESP)."""
    return len(data) >= _IKE_HEADER and data[:8] != NON_IKE_MARKER


def is_ike_on_4500(data: bytes) -> bool:
    """Port 4500: IKE is what follows the non-ESP marker."""
    return len(data) >= 4 + _IKE_HEADER and data[:4] == NON_ESP_MARKER


def is_esp_or_keepalive(data: bytes) -> bool:
    """What the esp role claims on 4500: everything but the non-ESP marker (IKE)."""
    return data[:4] != NON_ESP_MARKER or len(data) < 4


def is_draft_esp(data: bytes) -> bool:
    """004 draft on port 500: ESP sits behind eight zero bytes (IKE's cookie is non-zero)."""
    return len(data) > 8 and data[:8] == NON_IKE_MARKER
