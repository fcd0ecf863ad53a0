"""The `ike` role: an IKEv1 responder (RFC 2409) with NAT-T, XAUTH, mode-config and DPD."""
