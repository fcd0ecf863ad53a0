"""IKEv2 proposals (RFC 7296 §2.7, §3.3): what the policy allows, what we choose.

Operators write IKE proposals as strongSwan does: ``aes256-sha256-modp2048`` (the hash is
both integrity and PRF), ``aes128gcm16-prfsha256-ecp256`` (AEAD: a PRF, no integrity),
``aes256-sha384-curve25519``.  ESP proposals are the policy's ``esp`` list, shared with
IKEv1 (``aes128gcm16``, ``aes256-sha256``): the transforms the esp role has.

The responder picks, for the first of the peer's proposals any configured proposal can
satisfy, the peer's first acceptable transform of each type (§2.7: one of each).  The KE
group decides nothing here: the engine answers INVALID_KE_PAYLOAD when the chosen group
is not the one the peer sent a KE for (§1.2).
"""

from __future__ import annotations

import attrs

from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys
from narsuite.ike.v2.wire import SA, Proposal, Transform

__all__ = ["IkeProposal", "IkeChoice", "EspChoice", "parse_ike", "choose_ike", "choose_esp", "esp_allowed",
           "DEFAULT_IKE_PROPOSALS", "GROUP_NAMES"]

_ENCR = {"aes128": (C.ENCR_AES_CBC, 128), "aes192": (C.ENCR_AES_CBC, 192), "aes256": (C.ENCR_AES_CBC, 256),
         "aes128gcm16": (C.ENCR_AES_GCM_16, 128), "aes256gcm16": (C.ENCR_AES_GCM_16, 256),
         "aes128gcm": (C.ENCR_AES_GCM_16, 128), "aes256gcm": (C.ENCR_AES_GCM_16, 256)}
_HASH = {"sha1": (C.AUTH_HMAC_SHA1_96, C.PRF_HMAC_SHA1), "sha256": (C.AUTH_HMAC_SHA2_256_128, C.PRF_HMAC_SHA2_256),
         "sha384": (C.AUTH_HMAC_SHA2_384_192, C.PRF_HMAC_SHA2_384),
         "sha512": (C.AUTH_HMAC_SHA2_512_256, C.PRF_HMAC_SHA2_512)}
GROUP_NAMES = {"modp2048": 14, "modp3072": 15, "modp4096": 16, "ecp256": 19, "ecp384": 20, "ecp521": 21,
               "curve25519": 31, "x25519": 31, "modp1024": 2, "modp1536": 5}

_NAMES = {
    C.TRANS_ENCR: {C.ENCR_AES_CBC: "AES_CBC", C.ENCR_AES_GCM_16: "AES_GCM_16"},
    C.TRANS_INTEG: {C.AUTH_HMAC_SHA1_96: "HMAC_SHA1_96", C.AUTH_HMAC_SHA2_256_128: "HMAC_SHA2_256_128",
                    C.AUTH_HMAC_SHA2_384_192: "HMAC_SHA2_384_192", C.AUTH_HMAC_SHA2_512_256: "HMAC_SHA2_512_256"},
    C.TRANS_PRF: {C.PRF_HMAC_SHA1: "PRF_HMAC_SHA1", C.PRF_HMAC_SHA2_256: "PRF_HMAC_SHA2_256",
                  C.PRF_HMAC_SHA2_384: "PRF_HMAC_SHA2_384", C.PRF_HMAC_SHA2_512: "PRF_HMAC_SHA2_512"},
}
_GROUP_TEXT = {14: "MODP_2048", 15: "MODP_3072", 16: "MODP_4096", 19: "ECP_256", 20: "ECP_384", 21: "ECP_521",
               31: "CURVE_25519", 2: "MODP_1024", 5: "MODP_1536"}

#: strongSwan's IKEv2 defaults are about as broad; modp1024/1536 only when listed
DEFAULT_IKE_PROPOSALS: tuple[str, ...] = (
    "aes128-aes256-sha256-sha384-sha512-sha1-curve25519-ecp256-ecp384-ecp521-modp2048-modp3072-modp4096",
    "aes128gcm16-aes256gcm16-prfsha256-prfsha384-prfsha512-prfsha1-curve25519-ecp256-ecp384-ecp521-modp2048"
    "-modp3072-modp4096",
)


@attrs.frozen
class IkeProposal:
    """One configured IKE proposal: acceptable transforms of each type, best first."""

    encr: tuple[tuple[int, int], ...]  # (ENCR ID, key bits)
    integ: tuple[int, ...]
    prf: tuple[int, ...]
    dh: tuple[int, ...]

    @property
    def aead(self) -> bool:
        return all(e == C.ENCR_AES_GCM_16 for e, _ in self.encr)


def parse_ike(text: str) -> IkeProposal:
    """strongSwan proposal syntax -> :class:`IkeProposal`; ``ValueError`` naming the token."""
    encr: list[tuple[int, int]] = []
    integ: list[int] = []
    prf: list[int] = []
    dh: list[int] = []
    for tok in text.lower().split("-"):
        if tok in _ENCR:
            encr.append(_ENCR[tok])
        elif tok in _HASH:
            integ.append(_HASH[tok][0])
            prf.append(_HASH[tok][1])
        elif tok.startswith("prf") and tok[3:] in _HASH:
            prf.append(_HASH[tok[3:]][1])
        elif tok in GROUP_NAMES:
            dh.append(GROUP_NAMES[tok])
        else:
            raise ValueError(f"got {text!r}: {tok!r} is not an IKEv2 algorithm (aes128|aes256[gcm16], "
                             f"sha1|sha256|sha384|sha512, prfsha256.., {'|'.join(GROUP_NAMES)})")
    if not encr or not prf or not dh:
        raise ValueError(f"got {text!r}: a proposal needs a cipher, a hash or prf, and a DH group")
    gcm = {e for e, _ in encr} == {C.ENCR_AES_GCM_16}
    if not gcm and any(e == C.ENCR_AES_GCM_16 for e, _ in encr):
        raise ValueError(f"got {text!r}: do not mix GCM and CBC ciphers in one proposal")
    if gcm:
        integ = []
    elif not integ:
        raise ValueError(f"got {text!r}: a CBC cipher needs an integrity algorithm (sha256, ...)")
    return IkeProposal(tuple(dict.fromkeys(encr)), tuple(dict.fromkeys(integ)), tuple(dict.fromkeys(prf)),
                       tuple(dict.fromkeys(dh)))


@attrs.frozen
class IkeChoice:
    """The transforms of an IKE SA."""

    encr: int
    key_bits: int
    integ: int  # 0 with AEAD
    prf: int
    dh: int

    @property
    def prf_name(self) -> str:
        return keys.PRFS[self.prf]

    @property
    def enc_key_len(self) -> int:
        return self.key_bits // 8 + (4 if self.encr == C.ENCR_AES_GCM_16 else 0)

    @property
    def integ_key_len(self) -> int:
        return keys.INTEGS[self.integ][1] if self.integ else 0

    def proposal(self, number: int, spi: bytes = b"") -> Proposal:
        ts = [Transform(C.TRANS_ENCR, self.encr, self.key_bits), Transform(C.TRANS_PRF, self.prf)]
        if self.integ:
            ts.append(Transform(C.TRANS_INTEG, self.integ))
        ts.append(Transform(C.TRANS_DH, self.dh))
        return Proposal(number, C.PROTO_IKE, spi, tuple(ts))

    def describe(self) -> str:
        parts = [f"{_NAMES[C.TRANS_ENCR][self.encr]}-{self.key_bits}"]
        if self.integ:
            parts.append(_NAMES[C.TRANS_INTEG][self.integ])
        parts += [_NAMES[C.TRANS_PRF][self.prf], _GROUP_TEXT.get(self.dh, str(self.dh))]
        return "/".join(parts)


def _acceptable(p: Proposal) -> bool:
    return not any(t.other for t in p.transforms)


def choose_ike(sa: SA, allowed: tuple[IkeProposal, ...]) -> tuple[IkeChoice, int] | None:
    """(our choice, the peer's proposal number), or None: NO_PROPOSAL_CHOSEN."""
    for p in sa.proposals:
        if p.protocol != C.PROTO_IKE or not _acceptable(p) or p.spi not in (b"",) and len(p.spi) != 8:
            continue
        for mine in allowed:
            encr = next(((t.id, t.key_length) for t in p.of_type(C.TRANS_ENCR)
                         if t.key_length is not None and (t.id, t.key_length) in mine.encr), None)
            prf = next((t.id for t in p.of_type(C.TRANS_PRF) if t.id in mine.prf), None)
            dh = next((t.id for t in p.of_type(C.TRANS_DH) if t.id in mine.dh), None)
            if encr is None or prf is None or dh is None:
                continue
            if encr[0] == C.ENCR_AES_GCM_16:
                peer_integ = p.of_type(C.TRANS_INTEG)
                if any(t.id != C.AUTH_NONE for t in peer_integ) and not any(t.id == C.AUTH_NONE for t in peer_integ):
                    continue
                integ = 0
            else:
                found = next((t.id for t in p.of_type(C.TRANS_INTEG) if t.id in mine.integ), None)
                if found is None:
                    continue
                integ = found
            return IkeChoice(encr[0], encr[1] or 0, integ, prf, dh), p.number
    return None


@attrs.frozen
class EspChoice:
    """The transforms of a CHILD SA, in the esp role's names (:mod:`narsuite.sadb`)."""

    enc: str  # "aes-cbc" | "aes-gcm-16"
    key_bits: int
    integ: str | None  # "hmac-sha1-96" | "hmac-sha256-128" | None
    esn: bool
    dh: int  # PFS group in CREATE_CHILD_SA, 0 without
    peer_spi: bytes
    number: int

    @property
    def enc_len(self) -> int:
        return self.key_bits // 8 + (4 if self.enc == "aes-gcm-16" else 0)

    @property
    def integ_len(self) -> int:
        return {None: 0, "hmac-sha1-96": 20, "hmac-sha256-128": 32}[self.integ]

    def proposal(self, spi: bytes) -> Proposal:
        ts = [Transform(C.TRANS_ENCR, _ESP_ENCR[self.enc], self.key_bits)]
        if self.integ:
            ts.append(Transform(C.TRANS_INTEG, _ESP_INTEG[self.integ]))
        if self.dh:
            ts.append(Transform(C.TRANS_DH, self.dh))
        ts.append(Transform(C.TRANS_ESN, C.ESN_YES if self.esn else C.ESN_NO))
        return Proposal(self.number, C.PROTO_ESP, spi, tuple(ts))

    def describe(self) -> str:
        s = f"{self.enc}-{self.key_bits}" + (f"/{self.integ}" if self.integ else "")
        return s + (f"/pfs{self.dh}" if self.dh else "")


_ESP_ENCR = {"aes-cbc": C.ENCR_AES_CBC, "aes-gcm-16": C.ENCR_AES_GCM_16}
_ESP_INTEG = {"hmac-sha1-96": C.AUTH_HMAC_SHA1_96, "hmac-sha256-128": C.AUTH_HMAC_SHA2_256_128}


def esp_allowed(esp: tuple[tuple[str, int, str | None], ...]) -> set[tuple[int, int, int]]:
    """The policy's ESP list (``config.parse_esp`` results) as (ENCR, bits, INTEG) IDs."""
    return {(_ESP_ENCR[e], bits, _ESP_INTEG[i] if i else 0) for e, bits, i in esp}


def choose_esp(sa: SA, esp: tuple[tuple[str, int, str | None], ...], *, pfs_groups: tuple[int, ...] | None,
               esn_ok: bool = True) -> EspChoice | None:
    """The peer's first ESP proposal the policy allows.  ``pfs_groups`` None: in IKE_AUTH,
    where a DH transform is ignored (§1.2); else the KE group of CREATE_CHILD_SA must be
    one of them when the proposal has one."""
    ok = esp_allowed(esp)
    by_id = {v: k for k, v in _ESP_ENCR.items()}
    integ_by_id = {v: k for k, v in _ESP_INTEG.items()}
    for p in sa.proposals:
        if p.protocol != C.PROTO_ESP or len(p.spi) != 4 or not _acceptable(p):
            continue
        esns = [t.id for t in p.of_type(C.TRANS_ESN)] or [C.ESN_NO]
        esn = C.ESN_NO if C.ESN_NO in esns else (C.ESN_YES if esn_ok and C.ESN_YES in esns else None)
        if esn is None:
            continue
        dh = 0
        if pfs_groups is not None:
            groups = [t.id for t in p.of_type(C.TRANS_DH) if t.id]
            if groups:
                dh = next((g for g in groups if g in pfs_groups), -1)
                if dh < 0:
                    continue
        integs = [t.id for t in p.of_type(C.TRANS_INTEG)] or [0]
        for t in p.of_type(C.TRANS_ENCR):
            if t.key_length is None:
                continue
            for i in integs:
                i2 = 0 if t.id == C.ENCR_AES_GCM_16 else i
                if (t.id, t.key_length, i2) in ok:
                    return EspChoice(by_id[t.id], t.key_length, integ_by_id.get(i2), esn == C.ESN_YES, dh, p.spi,
                                     p.number)
    return None
