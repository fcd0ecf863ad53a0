"""A sans-IO IKEv2 initiator (IKE_SA_INIT + IKE_AUTH with PSK and one CHILD SA): the load
generator of ``bench/bench_ikev2.py``, the same for every responder it measures.

It is built from narsuite's IKEv2 codec and key schedule, so it is *not* an independent
check of them: that is what strongSwan does in ``tests/test_ikev2_lab.py``.  It answers
COOKIE and INVALID_KE_PAYLOAD as RFC 7296 says, and with ``force_nat`` sends a NAT
detection hash that cannot match, so both sides float to UDP 4500 as a remote-access
client behind a NAT would.

Once established it answers the responder's own requests (:meth:`Initiator.request`): a
CREATE_CHILD_SA rekeying a CHILD SA (new SPI, nonce, KE of the asked group; the keys kept
in ``child_keys`` for the test to compare with the store), INFORMATIONAL Deletes (answered
with its own SPIs of those pairs) and liveness checks; and can start its own CHILD SA rekey
(:meth:`Initiator.rekey_child`) to collide with the responder's (RFC 7296 §2.8.1).
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
        #: our inbound SPI of each CHILD SA -> the responder's inbound SPI of it
        self.children: dict[bytes, bytes] = {}
        #: our inbound SPI -> KEYMAT (enc i->r, integ i->r, enc r->i, integ r->i) and who initiated
        self.child_keys: dict[bytes, tuple[tuple[bytes, bytes, bytes, bytes], str]] = {}
        #: the responder's requests (exchange, payloads) and its answers to ours, in order
        self.requests: list[tuple[int, tuple]] = []
        self.answers: list[tuple[int, tuple]] = []
        self.mid = 2  # our next request's message ID (after IKE_AUTH)
        #: answer the responder's CREATE_CHILD_SA with this error notify instead (tests)
        self.refuse_child: int | None = None
        #: the PFS group our config wants in CHILD SA rekeys (None: any offered; 0: none,
        #: the first proposal without a DH transform is chosen); another KE gets INVALID_KE_PAYLOAD
        self.child_pfs: int | None = None
        self.nonce = lambda: secrets.token_bytes(32)

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
        if hdr.spi_i != self.spi_i:
            return None
        if not hdr.response:
            return self.request(hdr, data)
        if self.done and hdr.exchange in (C.CREATE_CHILD_SA, C.INFORMATIONAL):
            self.answers.append((hdr.exchange, self._open(hdr, data)))
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
            sa = wire.find(ps, wire.SA)
            if sa is not None:
                self.children[self.child_spi] = sa.proposals[0].spi
                self.child_ts = (wire.find(ps, wire.TSi), wire.find(ps, wire.TSr))
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
        self.child_spi = secrets.token_bytes(4)
        inner = [idi, wire.Auth(C.AUTH_SHARED_KEY, keys.psk_auth("sha256", self.psk, octets)),
                 wire.SA((wire.Proposal(1, C.PROTO_ESP, self.child_spi, (
                     wire.Transform(C.TRANS_ENCR, C.ENCR_AES_CBC, 128),
                     wire.Transform(C.TRANS_INTEG, C.AUTH_HMAC_SHA2_256_128),
                     wire.Transform(C.TRANS_ESN, C.ESN_NO))),)),
                 wire.TSi((wire.ts_range(str(net_l)),)), wire.TSr((wire.ts_range(str(net_r)),))]
        msg = keys.seal(wire.Header(self.spi_i, self.spi_r, C.IKE_AUTH, C.FLAG_INITIATOR, 1), inner, self.tx)
        return self._out(msg)

    # ------------------------------------------------------------------ once established
    def _open(self, hdr: wire.Header, data: bytes) -> tuple:
        outer = wire.parse_payloads(hdr.next_payload, data[C.HEADER_LEN:])
        try:
            return wire.parse_payloads(outer[-1].first, keys.open_encrypted(data, hdr.length, outer[-1], self.rx))
        except (keys.CryptoError, wire.IKEv2Error, AttributeError) as e:
            raise PeerError(f"cannot open: {e}") from None

    def _send(self, exchange: int, payloads: list, mid: int, response: bool) -> Outgoing:
        flags = C.FLAG_INITIATOR | (C.FLAG_RESPONSE if response else 0)
        data = keys.seal(wire.Header(self.spi_i, self.spi_r, exchange, flags, mid), payloads, self.tx)
        return Outgoing(MARKER + data if self.port == NATT_PORT else data, self.port)

    def request(self, hdr: wire.Header, data: bytes) -> Outgoing | None:
        """The responder's request: answered (a retransmission too: nothing is kept, the
        answer is made again -- enough for a test peer)."""
        if not self.done:
            return None
        ps = self._open(hdr, data)
        self.requests.append((hdr.exchange, ps))
        out: list = []
        if hdr.exchange == C.CREATE_CHILD_SA:
            out = self._answer_child(ps)
        elif hdr.exchange == C.INFORMATIONAL:
            back = []
            for p in ps:
                if isinstance(p, wire.Delete) and p.protocol == C.PROTO_ESP:
                    for spi in p.spis:  # the responder's inbound SPI: ours of that pair goes
                        mine = next((m for m, theirs in self.children.items() if theirs == spi), None)
                        if mine is not None:
                            del self.children[mine]
                            back.append(mine)
            if back:
                out = [wire.Delete(C.PROTO_ESP, tuple(back))]
        return self._send(hdr.exchange, out, hdr.message_id, response=True)

    def _answer_child(self, ps: tuple) -> list:
        if self.refuse_child is not None:
            return [wire.Notify(self.refuse_child)]
        ns = wire.notifies(ps)
        sa, ni, ke = wire.find(ps, wire.SA), wire.find(ps, wire.Nonce), wire.find(ps, wire.KE)

        def group(p: wire.Proposal) -> int:
            return next((t.id for t in p.transforms if t.type == C.TRANS_DH), 0)
        if self.child_pfs is None:
            prop = sa.proposals[0]
        else:
            prop = next((p for p in sa.proposals if group(p) == self.child_pfs), None)
            if prop is None:
                return [wire.Notify(C.NO_PROPOSAL_CHOSEN)]
            if self.child_pfs and (ke is None or ke.group != self.child_pfs):  # §1.3: it offered ours
                return [wire.Notify(C.INVALID_KE_PAYLOAD, self.child_pfs.to_bytes(2, "big"))]
        out_ke: list = []
        gir = None
        if ke is not None and group(prop):
            priv, pub = keys.group(ke.group).generate()
            gir = keys.group(ke.group).shared(priv, ke.data)
            out_ke = [wire.KE(ke.group, pub)]
        mine, nr = secrets.token_bytes(4), self.nonce()
        enc_len, integ_len = self._lengths(prop)
        self.child_keys[mine] = (keys.child_keymat("sha256", self.k.sk_d, ni.data, nr, enc_len, integ_len, gir),
                                 "responder")
        self.children[mine] = prop.spi
        self.rekeyed = ns.get(C.REKEY_SA)
        self.last_child_nonces = (ni.data, nr)
        return [wire.SA((wire.Proposal(prop.number, C.PROTO_ESP, mine, prop.transforms),)), wire.Nonce(nr),
                *out_ke, wire.find(ps, wire.TSi), wire.find(ps, wire.TSr)]

    @staticmethod
    def _lengths(prop: wire.Proposal) -> tuple[int, int]:
        enc = next(t for t in prop.transforms if t.type == C.TRANS_ENCR)
        integ = next((t for t in prop.transforms if t.type == C.TRANS_INTEG), None)
        gcm = enc.id == C.ENCR_AES_GCM_16
        return (enc.key_length or 128) // 8 + (4 if gcm else 0), 0 if integ is None else {C.AUTH_HMAC_SHA2_256_128: 32,
                                                                          C.AUTH_HMAC_SHA1_96: 20}[integ.id]

    def rekey_child(self, spi: bytes | None = None) -> Outgoing:
        """Our own CREATE_CHILD_SA rekeying our inbound ``spi`` (default: the first CHILD SA),
        AES-CBC-128/HMAC-SHA2-256 as in IKE_AUTH, no PFS."""
        spi = spi or self.child_spi
        self.my_rekey = (secrets.token_bytes(4), self.nonce())
        tsi, tsr = self.child_ts
        ps = [wire.Notify(C.REKEY_SA, b"", C.PROTO_ESP, spi),
              wire.SA((wire.Proposal(1, C.PROTO_ESP, self.my_rekey[0], (
                  wire.Transform(C.TRANS_ENCR, C.ENCR_AES_CBC, 128),
                  wire.Transform(C.TRANS_INTEG, C.AUTH_HMAC_SHA2_256_128),
                  wire.Transform(C.TRANS_ESN, C.ESN_NO))),)),
              wire.Nonce(self.my_rekey[1]), tsi, tsr]
        mid, self.mid = self.mid, self.mid + 1
        return self._send(C.CREATE_CHILD_SA, ps, mid, response=False)
