"""Choosing from a peer's offer: phase 1 (ISAKMP SA) and phase 2 (ESP) proposals.

Pure functions.  The responder takes the *initiator's* order (RFC 2408 §4.2: the
initiator lists in preference order) and the first transform our policy
accepts wins; the reply carries that transform unchanged (strongSwan compares
it with what it offered).  A mismatch is NO-PROPOSAL-CHOSEN with a reason the
operator can act on ("peer offered: aes128-sha1-modp1024 ...").
"""

from __future__ import annotations

import attrs

from narsuite.ike import constants as C
from narsuite.ike import crypto
from narsuite.ike.config import PeerPolicy, parse_esp, parse_phase1
from narsuite.ike.isakmp import Attribute, ISAKMPError, Proposal, SecurityAssociation, Transform

__all__ = ["Phase1Choice", "Phase2Choice", "choose_phase1", "choose_phase2", "describe_phase1",
           "phase1_offer", "esp_offer"]

_CIPHER_ATTR = {"aes-cbc": C.ENC_AES_CBC, "3des-cbc": C.ENC_3DES_CBC}
_HASH_ATTR = {v: k for k, v in crypto.HASH_BY_ATTRIBUTE.items()}
_XAUTH_AUTH = {C.AUTH_XAUTH_INIT_PSK: C.AUTH_PSK, C.AUTH_XAUTH_INIT_RSA: C.AUTH_RSA_SIG}
_AUTH_NAMES = {C.AUTH_PSK: "psk", C.AUTH_RSA_SIG: "rsa", C.AUTH_XAUTH_INIT_PSK: "xauth-psk",
               C.AUTH_XAUTH_INIT_RSA: "xauth-rsa"}
_GROUP_NAMES = {2: "modp1024", 5: "modp1536", 14: "modp2048", 15: "modp3072", 16: "modp4096",
                19: "ecp256", 20: "ecp384", 21: "ecp521"}


@attrs.frozen
class Phase1Choice:
    cipher: str  # crypto.CIPHERS name
    key_len: int  # bytes
    hash: str
    group: int
    auth: int  # the method as offered (XAUTH variants kept)
    lifetime: float  # seconds, capped by policy
    transform: Transform  # echoed in our SA payload

    @property
    def base_auth(self) -> int:
        """PSK or RSA-SIG: what phase 1 itself does (XAUTH comes after)."""
        return _XAUTH_AUTH.get(self.auth, self.auth)

    @property
    def xauth(self) -> bool:
        return self.auth in _XAUTH_AUTH

    def describe(self) -> str:
        enc = "3des" if self.cipher == "3des-cbc" else f"aes{self.key_len * 8}"
        return f"{enc}-{self.hash}-{_GROUP_NAMES.get(self.group, self.group)}/{_AUTH_NAMES.get(self.auth, self.auth)}"


def _life(t: Transform, type_attr: int, dur_attr: int) -> float | None:
    """Seconds from LIFE_TYPE/LIFE_DURATION pairs (kilobyte lifetimes are ignored: we
    enforce seconds and the esp role's sequence-number limits)."""
    life = None
    kind = None
    for a in t.attributes:
        if a.type == type_attr:
            kind = a.int_value
        elif a.type == dur_attr and kind == C.LIFE_SECONDS:
            life = float(a.int_value)
    return life


def describe_phase1(t: Transform) -> str:
    """A transform as the operator writes proposals, for "peer offered ..." messages."""
    def v(attr: int) -> int | None:
        a = t.get(attr)
        return a.int_value if a is not None else None
    enc = {C.ENC_AES_CBC: f"aes{v(C.P1_KEY_LENGTH) or 128}", C.ENC_3DES_CBC: "3des"}.get(v(C.P1_ENCRYPTION) or 0,
                                                                                         f"enc{v(C.P1_ENCRYPTION)}")
    h = crypto.HASH_BY_ATTRIBUTE.get(v(C.P1_HASH) or 0, f"hash{v(C.P1_HASH)}")
    g = _GROUP_NAMES.get(v(C.P1_GROUP_DESC) or 0, f"group{v(C.P1_GROUP_DESC)}")
    a = _AUTH_NAMES.get(v(C.P1_AUTH_METHOD) or 0, f"auth{v(C.P1_AUTH_METHOD)}")
    return f"{enc}-{h}-{g}/{a}"


def _allowed_auth(policy: PeerPolicy) -> set[int]:
    if policy.auth == "psk":
        return {C.AUTH_XAUTH_INIT_PSK} if policy.xauth else {C.AUTH_PSK}
    return {C.AUTH_XAUTH_INIT_RSA} if policy.xauth else {C.AUTH_RSA_SIG}


def phase1_transform_ok(t: Transform, policy: PeerPolicy) -> Phase1Choice | None:
    """The choice if ``t`` is acceptable to ``policy``, else None."""
    if t.transform_id != C.KEY_IKE:
        return None
    attrs_by_type: dict[int, int] = {}
    for a in t.attributes:
        attrs_by_type.setdefault(a.type, a.int_value)
    enc = attrs_by_type.get(C.P1_ENCRYPTION)
    cipher = crypto.CIPHER_BY_ATTRIBUTE.get(enc or 0)
    hash_name = crypto.HASH_BY_ATTRIBUTE.get(attrs_by_type.get(C.P1_HASH, 0))
    group = attrs_by_type.get(C.P1_GROUP_DESC)
    auth = attrs_by_type.get(C.P1_AUTH_METHOD)
    if cipher is None or hash_name is None or group is None or auth is None:
        return None
    if C.P1_PRF in attrs_by_type or C.P1_GROUP_PRIME in attrs_by_type:
        return None  # a negotiated PRF or a private group: nobody we know sends them
    key_len = attrs_by_type.get(C.P1_KEY_LENGTH)
    if cipher == "aes-cbc":
        if key_len is None:
            key_len = 128  # RFC 3602 for IKE: the default when absent
        if key_len not in (128, 192, 256):
            return None
        key_bytes = key_len // 8
    else:
        if key_len not in (None, 192):
            return None
        key_bytes = 24
    if auth not in _allowed_auth(policy):
        return None
    for text in policy.proposals:
        p_cipher, p_len, p_hash, p_group = parse_phase1(text)
        if (p_cipher, p_len, p_hash, p_group) == (cipher, key_bytes, hash_name, group):
            break
    else:
        return None
    life = _life(t, C.P1_LIFE_TYPE, C.P1_LIFE_DURATION)
    lifetime = min(life, policy.ike_lifetime) if life else policy.ike_lifetime
    return Phase1Choice(cipher, key_bytes, hash_name, group, auth, lifetime, t)


def choose_phase1(sa: SecurityAssociation, policies: list[PeerPolicy]) -> tuple[Phase1Choice, list[PeerPolicy]]:
    """The first acceptable transform (initiator's order) and the policies that accept it.

    Several policies may accept the same transform (Main Mode: the peer's identity is not
    known yet); the exchange narrows them down when the ID arrives.
    """
    if sa.doi != C.DOI_IPSEC:
        raise ISAKMPError(C.DOI_NOT_SUPPORTED, f"DOI {sa.doi}")
    if sa.situation != C.SIT_IDENTITY_ONLY:
        raise ISAKMPError(C.SITUATION_NOT_SUPPORTED, f"situation {sa.situation:#x}")
    if len(sa.proposals) != 1 or sa.proposals[0].protocol != C.PROTO_ISAKMP:
        raise ISAKMPError(C.BAD_PROPOSAL_SYNTAX, "phase 1 needs exactly one ISAKMP proposal")
    offered = []
    for t in sa.proposals[0].transforms:
        offered.append(describe_phase1(t))
        matches = [(c, p) for p in policies if (c := phase1_transform_ok(t, p)) is not None]
        if matches:
            return matches[0][0], [p for _, p in matches]
    raise ISAKMPError(C.NO_PROPOSAL_CHOSEN, "peer offered " + ", ".join(offered or ["nothing"]))


def phase1_response(sa: SecurityAssociation, choice: Phase1Choice) -> SecurityAssociation:
    p = sa.proposals[0]
    return SecurityAssociation(
        proposals=(Proposal(p.number, p.protocol, p.spi, (choice.transform,)),),
        doi=sa.doi, situation=sa.situation)


# --------------------------------------------------------------------------------------------- phase 2

_ESP_ENC = {C.ESP_AES_CBC: "aes-cbc", C.ESP_AES_GCM_16: "aes-gcm-16"}
_ESP_AUTH = {C.AUTH_ALG_HMAC_SHA1: "hmac-sha1-96", C.AUTH_ALG_HMAC_SHA2_256: "hmac-sha256-128"}


@attrs.frozen
class Phase2Choice:
    enc: str
    key_bits: int
    integ: str | None
    encap_mode: int  # as offered: 1/2, 3/4, 61443/61444 or the 004 values
    tunnel: bool
    udp: bool
    pfs_group: int | None
    esn: bool
    lifetime: float
    proposal: Proposal  # the chosen proposal with only the chosen transform (SPI replaced later)

    def describe(self) -> str:
        enc = f"aes{self.key_bits}gcm16" if self.enc == "aes-gcm-16" else f"aes{self.key_bits}"
        integ = {"hmac-sha1-96": "-sha1", "hmac-sha256-128": "-sha256", None: ""}[self.integ]
        pfs = f"-{_GROUP_NAMES.get(self.pfs_group, self.pfs_group)}" if self.pfs_group else ""
        return f"{enc}{integ}{pfs} {'tunnel' if self.tunnel else 'transport'}{'/udp' if self.udp else ''}"


def _describe_esp(t: Transform) -> str:
    enc = _ESP_ENC.get(t.transform_id, f"esp{t.transform_id}")
    kl = t.get(C.P2_KEY_LENGTH)
    au = t.get(C.P2_AUTH_ALG)
    integ = _ESP_AUTH.get(au.int_value, f"auth{au.int_value}") if au else "-"
    mode = t.get(C.P2_ENCAP_MODE)
    return f"{enc}{kl.int_value if kl else ''}/{integ}/mode {mode.int_value if mode else '?'}"


def choose_phase2(sa: SecurityAssociation, policy: PeerPolicy, *, udp_modes: tuple[int, int] | None,
                  pfs_offered: bool) -> Phase2Choice:
    """The first acceptable ESP transform.

    ``udp_modes`` is (UDP-tunnel, UDP-transport) of the NAT-T variant in use when a NAT was
    detected, else None (then only the plain modes 1/2 are right).  A proposal bundling AH
    or IPComp with ESP is skipped: the esp role does ESP alone.
    """
    if sa.doi != C.DOI_IPSEC:
        raise ISAKMPError(C.DOI_NOT_SUPPORTED, f"DOI {sa.doi}")
    allowed = {parse_esp(t) for t in policy.esp}
    want_tunnel = policy.mode == "tunnel"
    numbers: dict[int, list[Proposal]] = {}
    for p in sa.proposals:
        numbers.setdefault(p.number, []).append(p)
    offered = []
    for group_ in numbers.values():
        if len(group_) != 1 or group_[0].protocol != C.PROTO_IPSEC_ESP:
            offered.append("+".join({2: "AH", 3: "ESP", 4: "IPComp"}.get(p.protocol, str(p.protocol)) for p in group_))
            continue
        prop = group_[0]
        if len(prop.spi) != 4:
            raise ISAKMPError(C.INVALID_SPI, f"ESP SPI of {len(prop.spi)} bytes")
        if int.from_bytes(prop.spi, "big") < 256:
            # RFC 4303 §2.1: 1-255 are reserved by IANA, 0 is local use only; an SA under
            # such an SPI would carry nothing (the esp role refuses it), so say so now
            raise ISAKMPError(C.INVALID_SPI, f"ESP SPI {int.from_bytes(prop.spi, 'big')} is reserved (0-255)",
                              spi=bytes(prop.spi))
        for t in prop.transforms:
            offered.append(_describe_esp(t))
            enc = _ESP_ENC.get(t.transform_id)
            if enc is None:
                continue
            vals: dict[int, int] = {}
            for a in t.attributes:
                vals.setdefault(a.type, a.int_value)
            bits = vals.get(C.P2_KEY_LENGTH, 128)
            integ = _ESP_AUTH.get(vals[C.P2_AUTH_ALG]) if C.P2_AUTH_ALG in vals else None
            if C.P2_AUTH_ALG in vals and integ is None:
                continue
            if enc == "aes-gcm-16" and integ is not None:
                continue
            if (enc, bits, integ) not in allowed:
                continue
            mode = vals.get(C.P2_ENCAP_MODE, C.ENCAP_TUNNEL)
            if udp_modes is None:
                if mode not in (C.ENCAP_TUNNEL, C.ENCAP_TRANSPORT):
                    continue
                tunnel, udp = mode == C.ENCAP_TUNNEL, False
            else:
                if mode not in udp_modes:
                    continue
                tunnel, udp = mode == udp_modes[0], True
            if tunnel != want_tunnel:
                continue
            group = vals.get(C.P2_GROUP_DESC)
            if group is not None and group not in policy.pfs_groups:
                continue
            if (group is not None) != pfs_offered:
                raise ISAKMPError(C.PAYLOAD_MALFORMED, "PFS group without a KE payload (or the reverse)")
            if policy.pfs == "required" and group is None or policy.pfs == "never" and group is not None:
                continue
            esn = vals.get(C.P2_ESN, 0) == 1
            life = _life(t, C.P2_SA_LIFE_TYPE, C.P2_SA_LIFE_DURATION)
            lifetime = min(life, policy.esp_lifetime) if life else policy.esp_lifetime
            chosen = Proposal(prop.number, prop.protocol, prop.spi, (t,))
            return Phase2Choice(enc, bits, integ, mode, tunnel, udp, group, esn, lifetime, chosen)
    raise ISAKMPError(C.NO_PROPOSAL_CHOSEN, "peer offered " + ", ".join(offered or ["nothing"]))


# ----------------------------------------------------------------------- offers (for tests and tools)

def phase1_offer(proposals: list[str], auth: int = C.AUTH_PSK, lifetime: int = 28800) -> SecurityAssociation:
    """An initiator's phase-1 SA from operator-style strings (used by tests and the bench)."""
    transforms = []
    for n, text in enumerate(proposals, 1):
        cipher, key_len, hash_name, group = parse_phase1(text)
        attributes = [Attribute(C.P1_ENCRYPTION, _CIPHER_ATTR[cipher])]
        if cipher == "aes-cbc":
            attributes.append(Attribute(C.P1_KEY_LENGTH, key_len * 8))
        attributes += [Attribute(C.P1_HASH, _HASH_ATTR[hash_name]), Attribute(C.P1_AUTH_METHOD, auth),
                       Attribute(C.P1_GROUP_DESC, group), Attribute(C.P1_LIFE_TYPE, C.LIFE_SECONDS),
                       Attribute.of(C.P1_LIFE_DURATION, lifetime)]
        transforms.append(Transform(n, C.KEY_IKE, tuple(attributes)))
    return SecurityAssociation((Proposal(1, C.PROTO_ISAKMP, b"", tuple(transforms)),))


def esp_offer(spi: bytes, esp: list[str], mode: int = C.ENCAP_TUNNEL, pfs_group: int | None = None,
              lifetime: int = 3600) -> SecurityAssociation:
    """An initiator's Quick Mode SA from operator-style strings."""
    transforms = []
    for n, text in enumerate(esp, 1):
        enc, bits, integ = parse_esp(text)
        attributes = [Attribute(C.P2_SA_LIFE_TYPE, C.LIFE_SECONDS), Attribute.of(C.P2_SA_LIFE_DURATION, lifetime),
                      Attribute(C.P2_ENCAP_MODE, mode), Attribute(C.P2_KEY_LENGTH, bits)]
        if integ is not None:
            attributes.append(Attribute(C.P2_AUTH_ALG, {v: k for k, v in _ESP_AUTH.items()}[integ]))
        if pfs_group:
            attributes.append(Attribute(C.P2_GROUP_DESC, pfs_group))
        tid = C.ESP_AES_GCM_16 if enc == "aes-gcm-16" else C.ESP_AES_CBC
        transforms.append(Transform(n, tid, tuple(attributes)))
    return SecurityAssociation((Proposal(1, C.PROTO_IPSEC_ESP, spi, tuple(transforms)),))
