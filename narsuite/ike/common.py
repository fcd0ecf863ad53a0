"""Small pieces every part of the IKE responder uses (:mod:`narsuite.ike.engine` and its
exchange modules): the drop signal, the lifetime grace, payload bodies, nonces."""

from __future__ import annotations

from typing import Any

from narsuite.ike import constants as C
from narsuite.ike import isakmp
from narsuite.ike.isakmp import ISAKMPError, Nonce

__all__ = ["Drop", "grace", "body", "nonce", "ESP_KEY_BYTES", "INTEG_KEY_BYTES"]

#: KEYMAT bytes per ESP cipher (GCM: key + 4-byte salt, RFC 4106 §8.1)
ESP_KEY_BYTES = {("aes-gcm-16", 128): 20, ("aes-gcm-16", 256): 36, ("aes-cbc", 128): 16, ("aes-cbc", 256): 32}
INTEG_KEY_BYTES = {None: 0, "hmac-sha1-96": 20, "hmac-sha256-128": 32}


class Drop(Exception):
    """Drop the message: counted under ``reason``, logged with ``detail``, nothing sent."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def grace(lifetime: float) -> float:
    """How long past the negotiated lifetime we keep an SA.  The initiator rekeys or
    re-authenticates *at* the lifetime it proposed (strongSwan proposes its rekey time);
    deleting at that very second would race its new SA.  The initiator is the one that
    rekeys in IKEv1, so the responder waits a little longer."""
    return min(max(30.0, lifetime * 0.1), 600.0)


def body(p: Any) -> bytes:
    """A payload's body (no generic header): what HASH_I/SAi_b/IDii_b cover."""
    return isakmp.build_payloads([p])[4:]


def nonce(payloads: tuple[Any, ...]) -> bytes:
    """The message's nonce, 8..256 bytes (RFC 2409 §5), else PAYLOAD-MALFORMED."""
    n = isakmp.find(payloads, Nonce)
    if n is None or not 8 <= len(n.data) <= 256:
        raise ISAKMPError(C.PAYLOAD_MALFORMED, "nonce missing or not 8..256 bytes")
    return n.data
