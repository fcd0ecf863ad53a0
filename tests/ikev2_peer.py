"""A sans-IO IKEv2 initiator (IKE_SA_INIT + IKE_AUTH with PSK and one CHILD SA): the load
generator of ``bench/bench_ikev2.py``, the same for every responder it measures.

It is built from narsuite's IKEv2 codec and key schedule, so it is *not* an independent
check of them: that is what strongSwan does in ``tests/test_ikev2_lab.py``.  It answers
COOKIE and INVALID_KE_PAYLOAD as RFC 7296 says, and with ``force_nat`` sends a NAT
detection hash that cannot match, so both sides float to UDP 4500 as a remote-access
client behind a NAT would.
"""

from __future__ import annotations

import ipaddress
import secrets

import attrs

from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import keys, wire

__all__ = ["Initiator", "Outgoing", "PeerError", "IKE_PORT", "NATT_PORT"]

IKE_PORT, NATT_PORT = 500, 4500
MARKER = b"\0\0\0\0"
PRF = {C.PRF_HMAC_SHA2_256: "sha256", C.PRF_HMAC_SHA1: "sha1"}


class PeerError(Exception):
    """The responder refused (an error notify) or answered something unusable."""


@attrs.frozen
class Outgoing:
    data: bytes
    port: int


class Initiator:
    def __init__(self, psk: bytes, identity: str, group: int, local_ts: str, remote_ts: str,
                 local: tuple[str, int] = ("0.0.0.0", 0), force_nat: bool = True) -> None:
        self.psk = psk
        self.identity = identity.encode()
        self.group = group
        self.local_ts, self.remote_ts = local_ts, remote_ts
        self.local = local
        self.force_nat = force_nat
        self.spi_i = secrets.token_bytes(8)
        self.ni = secrets.token_bytes(32)
        self.cookie: bytes | None = None
        self.port = IKE_PORT
        self.done = False
        self.last: Outgoing | None = None

    def _out(self, data: bytes) -> Outgoing:
        self.last = Outgoing(MARKER + data if self.port == NATT_PORT else data, self.port)
        return self.last

    def start(self) -> Outgoing:
        self.priv, pub = keys.group(self.group).generate()
        sa = wire.SA((wire.Proposal(1, C.PROTO_IKE, b"", (
            wire.Transform(C.TRANS_ENCR, C.ENCR_AES_CBC, 128), wire.Transform(C.TRANS_PRF, C.PRF_HMAC_SHA2_256),
            wire.Transform(C.TRANS_INTEG, C.AUTH_HMAC_SHA2_256_128), wire.Transform(C.TRANS_DH, self.group))),))
        ps: list = [wire.Notify(C.COOKIE, self.cookie)] if self.cookie else []
        src = b"\xff" * 20 if self.force_nat else keys.natd_hash(self.spi_i, bytes(8), *self.local)
        ps += [sa, wire.KE(self.group, pub), wire.Nonce(self.ni), wire.Notify(C.NAT_DETECTION_SOURCE_IP, src),
               wire.Notify(C.NAT_DETECTION_DESTINATION_IP, b"\xee" * 20)]
        self.req1 = wire.build_message(wire.Header(self.spi_i, bytes(8), C.IKE_SA_INIT, C.FLAG_INITIATOR, 0), ps)
        return self._out(self.req1)

    def retransmit(self) -> Outgoing | None:
        return None if self.done else self.last

    def receive(self, data: bytes, port: int) -> Outgoing | None:
        if port == NATT_PORT:
            if data[:4] != MARKER:
                return None
            data = data[4:]
        try:
            hdr = wire.parse_header(data)
        except wire.IKEv2Error:
            return None
        if hdr.spi_i != self.spi_i or not hdr.response:
            return None
        if hdr.exchange == C.IKE_SA_INIT:
            return self._init_response(hdr, data)
        if hdr.exchange == C.IKE_AUTH and hdr.message_id == 1 and hasattr(self, "rx"):
            outer = wire.parse_payloads(hdr.next_payload, data[C.HEADER_LEN:])
            try:
                ps = wire.parse_payloads(outer[-1].first, keys.open_encrypted(data, hdr.length, outer[-1], self.rx))
            except (keys.CryptoError, wire.IKEv2Error, AttributeError) as e:
                raise PeerError(f"IKE_AUTH response: {e}") from None
            errors = [p.type for p in ps if isinstance(p, wire.Notify) and p.error]
            if errors or wire.find(ps, wire.Auth) is None:
                raise PeerError(f"IKE_AUTH refused: {errors}")
            self.done = True
        return None

    def _init_response(self, hdr: wire.Header, data: bytes) -> Outgoing | None:
        if hasattr(self, "rx"):
            return None  # a duplicate
        _h, ps = wire.parse_message(data)
        ns = wire.notifies(ps)
        if C.COOKIE in ns:
            self.cookie = ns[C.COOKIE].data
            return self.start()
        if C.INVALID_KE_PAYLOAD in ns:
            self.group = int.from_bytes(ns[C.INVALID_KE_PAYLOAD].data[:2], "big")
            return self.start()
        errors = [n for n in ns if n < C.ERROR_TYPES_END]
        if errors:
            raise PeerError(f"IKE_SA_INIT refused: {errors}")
        ke, nr = wire.find(ps, wire.KE), wire.find(ps, wire.Nonce)
        if ke is None or nr is None:
            raise PeerError("IKE_SA_INIT response without KE/Nr")
        gir = keys.group(ke.group).shared(self.priv, ke.data)
        self.spi_r, self.nr = hdr.spi_r, nr.data
        seed = keys.skeyseed("sha256", self.ni, self.nr, gir)
        k = keys.derive_ike_keys("sha256", seed, self.ni, self.nr, self.spi_i, self.spi_r, 16, 32)
        self.k = k
        self.tx = keys.SKCipher(C.ENCR_AES_CBC, k.sk_ei, C.AUTH_HMAC_SHA2_256_128, k.sk_ai)
        self.rx = keys.SKCipher(C.ENCR_AES_CBC, k.sk_er, C.AUTH_HMAC_SHA2_256_128, k.sk_ar)
        if C.NAT_DETECTION_SOURCE_IP in ns:
            self.port = NATT_PORT
        idi = wire.IDi(C.ID_FQDN, self.identity)
        octets = keys.signed_octets(self.req1, self.nr, "sha256", k.sk_pi, bytes([idi.id_type, 0, 0, 0]) + idi.data)
        net_l, net_r = ipaddress.IPv4Network(self.local_ts), ipaddress.IPv4Network(self.remote_ts)
        inner = [idi, wire.Auth(C.AUTH_SHARED_KEY, keys.psk_auth("sha256", self.psk, octets)),
                 wire.SA((wire.Proposal(1, C.PROTO_ESP, secrets.token_bytes(4), (
                     wire.Transform(C.TRANS_ENCR, C.ENCR_AES_CBC, 128),
                     wire.Transform(C.TRANS_INTEG, C.AUTH_HMAC_SHA2_256_128),
                     wire.Transform(C.TRANS_ESN, C.ESN_NO))),)),
                 wire.TSi((wire.ts_range(str(net_l)),)), wire.TSr((wire.ts_range(str(net_r)),))]
        msg = keys.seal(wire.Header(self.spi_i, self.spi_r, C.IKE_AUTH, C.FLAG_INITIATOR, 1), inner, self.tx)
        return self._out(msg)
