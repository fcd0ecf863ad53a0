"""EAP in IKE_AUTH (RFC 7296 §2.16): the server side of EAP-Identity and EAP-MSCHAPv2.

EAP-MSCHAPv2 (RFC 2759 in EAP, draft-kamath-pppext-eap-mschapv2) is what Windows, macOS and
iOS IKEv2 clients use by default.  The password check needs the user's NT hash, so an
``[ike.users]`` entry must be ``$nt$...`` (``narctl hash-password --nt``) for a user to log
in this way.  MD4 and DES come from pycryptodome (cryptography has neither); nothing
here is hand-written cryptography, only the RFC's compositions of them.

The MSK (RFC 3079 §3.4, as strongSwan and Windows derive it): MasterReceiveKey |
MasterSendKey of the server... padded to 64 bytes with zeros; it keys both AUTH payloads
after EAP succeeds.

:class:`MschapV2Server` is a pure state machine: EAP bytes in, EAP bytes out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable

import attrs
from cryptography.hazmat.primitives.serialization import Encoding

from narsuite.ike.v2 import constants as C

__all__ = ["EapError", "parse", "build", "challenge_hash", "nt_response", "authenticator_response", "msk",
           "MschapV2Server", "Outcome"]

OP_CHALLENGE, OP_RESPONSE, OP_SUCCESS, OP_FAILURE = 1, 2, 3, 4
_MAGIC1 = b"Magic server to client signing constant"
_MAGIC2 = b"Pad to make it do more than one iteration"
_MPPE_MAGIC1 = b"This is the MPPE Master Key"
_MPPE_MAGIC2 = b"On the client side, this is the send key; on the server side, it is the receive key."
_MPPE_MAGIC3 = b"On the client side, this is the receive key; on the server side, it is the send key."


class EapError(ValueError):
    """A malformed or unexpected EAP message from the peer."""


def parse(data: bytes) -> tuple[int, int, int, bytes]:
    """(code, identifier, type, type data); type 0 for Success/Failure."""
    if len(data) < 4:
        raise EapError("EAP message shorter than its header")
    code, ident, length = struct.unpack_from("!BBH", data)
    if length != len(data):
        raise EapError("EAP length disagrees with the payload")
    if code in (C.EAP_REQUEST, C.EAP_RESPONSE):
        if length < 5:
            raise EapError("EAP request/response without a type")
        return code, ident, data[4], bytes(data[5:])
    return code, ident, 0, b""


def build(code: int, ident: int, eap_type: int = 0, data: bytes = b"") -> bytes:
    if code in (C.EAP_SUCCESS, C.EAP_FAILURE):
        return struct.pack("!BBH", code, ident, 4)
    return struct.pack("!BBHB", code, ident, 5 + len(data), eap_type) + data


def _md4(data: bytes) -> bytes:
    from Crypto.Hash import MD4

    return MD4.new(data).digest()


def _des_key(k7: bytes) -> bytes:
    """56 key bits into the 8 bytes DES takes (parity bits left zero: DES ignores them)."""
    n = int.from_bytes(k7, "big")
    return bytes(((n >> (56 - 7 * (i + 1))) & 0x7F) << 1 for i in range(8))


def challenge_hash(peer_challenge: bytes, auth_challenge: bytes, username: bytes) -> bytes:
    """RFC 2759 §8.2."""
    return hashlib.sha1(peer_challenge + auth_challenge + username).digest()[:8]


def nt_response(nt_hash: bytes, challenge: bytes) -> bytes:
    """ChallengeResponse (RFC 2759 §8.5): the 8-byte challenge DES-encrypted under three
    7-byte pieces of the zero-padded NT hash."""
    from Crypto.Cipher import DES

    z = nt_hash + b"\0" * 5
    return b"".join(DES.new(_des_key(z[i:i + 7]), DES.MODE_ECB).encrypt(challenge) for i in (0, 7, 14))


def authenticator_response(nt_hash: bytes, response: bytes, challenge: bytes) -> bytes:
    """"S=<40 hex digits>" (RFC 2759 §8.7)."""
    digest = hashlib.sha1(_md4(nt_hash) + response + _MAGIC1).digest()
    digest = hashlib.sha1(digest + challenge + _MAGIC2).digest()
    return b"S=" + digest.hex().upper().encode()


def msk(nt_hash: bytes, response: bytes) -> bytes:
    """The EAP-MSCHAPv2 MSK: the server's MasterReceiveKey | MasterSendKey (RFC 3079
    §3.4, GetAsymmetricStartKey with 16-byte keys), zero-padded to 64 bytes."""
    master = hashlib.sha1(_md4(nt_hash) + response + _MPPE_MAGIC1).digest()[:16]

    def start_key(magic: bytes) -> bytes:
        return hashlib.sha1(master + b"\0" * 40 + magic + b"\xf2" * 40).digest()[:16]
    return start_key(_MPPE_MAGIC2) + start_key(_MPPE_MAGIC3) + b"\0" * 32


@attrs.define
class Outcome:
    """What one EAP message led to: the EAP message to send, and once it is over, success
    (with the user and the MSK) or failure."""

    reply: bytes
    done: bool = False
    success: bool = False
    user: str = ""
    msk: bytes = attrs.field(default=b"", repr=False)
    reason: str = ""


class MschapV2Server:
    """EAP-Identity, then EAP-MSCHAPv2 (one try), against ``lookup(user) -> NT hash or None``."""

    def __init__(self, lookup: Callable[[str], bytes | None], server_name: bytes = b"narsuite") -> None:
        self.lookup = lookup
        self.server_name = server_name
        self.ident = secrets.randbelow(256)
        self.state = "identity"
        self.identity = ""
        self._challenge = b""
        self._msk = b""
        self._user = ""

    def _next(self) -> int:
        self.ident = (self.ident + 1) % 256
        return self.ident

    def start(self) -> bytes:
        return build(C.EAP_REQUEST, self._next(), C.EAP_IDENTITY)

    def _fail(self, why: str) -> Outcome:
        self.state = "failed"
        return Outcome(build(C.EAP_FAILURE, self.ident), done=True, success=False, reason=why)

    def received(self, data: bytes) -> Outcome:
        code, ident, etype, body = parse(data)
        if code != C.EAP_RESPONSE or ident != self.ident:
            raise EapError(f"EAP code {code} id {ident}, expected a response to {self.ident}")
        if self.state == "identity":
            if etype != C.EAP_IDENTITY:
                raise EapError(f"EAP type {etype} where the identity was expected")
            self.identity = body.decode("utf-8", "replace")
            self._challenge = secrets.token_bytes(16)
            self.state = "challenge"
            ms = struct.pack("!BBHB", OP_CHALLENGE, self._next(), 5 + 16 + len(self.server_name), 16)
            return Outcome(build(C.EAP_REQUEST, self.ident, C.EAP_MSCHAPV2,
                                 ms + self._challenge + self.server_name))
        if etype == C.EAP_NAK:
            return self._fail("the peer refused EAP-MSCHAPv2 (NAK)")
        if etype != C.EAP_MSCHAPV2 or not body:
            raise EapError(f"EAP type {etype} where MSCHAPv2 was expected")
        op = body[0]
        if self.state == "challenge" and op == OP_RESPONSE:
            if len(body) < 5 + 49 or body[4] != 49:
                raise EapError("MSCHAPv2 response of the wrong size")
            value = body[5:54]
            peer_challenge, response = value[:16], value[24:48]
            name = body[54:]
            user = name.decode("utf-8", "replace").split("\\")[-1]  # DOMAIN\\user from Windows
            nt = self.lookup(user)
            # the challenge hash covers the user name without a domain (RFC 2759 §8.2)
            name = user.encode()
            expected = nt_response(nt, challenge_hash(peer_challenge, self._challenge, name)) if nt else b"\0" * 24
            if nt is None or not hmac.compare_digest(expected, response):
                return self._fail(f"MSCHAPv2: {'no NT hash for' if nt is None else 'wrong password of'} {user!r}")
            self._user = user
            self._msk = msk(nt, response)
            self.state = "success_sent"
            message = authenticator_response(nt, response, challenge_hash(peer_challenge, self._challenge, name))
            message += b" M=Welcome"
            ms = struct.pack("!BBH", OP_SUCCESS, body[1], 4 + len(message))
            return Outcome(build(C.EAP_REQUEST, self._next(), C.EAP_MSCHAPV2, ms + message))
        if self.state == "success_sent" and op == OP_SUCCESS:
            self.state = "done"
            return Outcome(build(C.EAP_SUCCESS, self.ident), done=True, success=True, user=self._user,
                           msk=self._msk)
        raise EapError(f"MSCHAPv2 op {op} in state {self.state}")


# ------------------------------------------------------------------------------------- EAP-TLS
TLS_L, TLS_M, TLS_S = 0x80, 0x40, 0x20
#: TLS bytes per EAP-Request: an IKE message with it stays under 1280 bytes
TLS_FRAGMENT = 1000
#: the most TLS handshake bytes we take from a client (its certificate chain and messages)
TLS_MAX_IN = 64 * 1024


class EapTlsServer:
    """EAP-Identity, then EAP-TLS (RFC 5216) with TLS 1.2 over memory BIOs (pyOpenSSL):
    the client's certificate must chain to ``trust`` (OpenSSL checks it during the
    handshake, :meth:`narsuite.ike.certs.Trust.verify` once more after it, as for IKE
    certificates) and name the EAP identity; the MSK is the TLS exporter's "client EAP
    encryption" output (RFC 5216 §2.3), 64 bytes."""

    def __init__(self, credentials: object, trust: object, id_check: Callable[[object, str], bool]) -> None:
        from OpenSSL import SSL, crypto

        self.trust = trust
        self.id_check = id_check
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)  # RFC 5216 key derivation (TLS 1.3 is RFC 9190)
        cert = credentials.certificate  # type: ignore[attr-defined]
        ctx.use_certificate(crypto.X509.from_cryptography(cert))
        for extra in credentials.intermediates:  # type: ignore[attr-defined]
            ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(credentials.key))  # type: ignore[attr-defined]
        store = ctx.get_cert_store()
        assert store is not None
        for ca in trust.cas:  # type: ignore[attr-defined]
            store.add_cert(crypto.X509.from_cryptography(ca))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: bool(a[-1]))
        self._ssl = SSL
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_accept_state()
        self.ident = secrets.randbelow(256)
        self.state = "identity"
        self.identity = ""
        self._in = b""
        self._in_total = 0
        self._out = b""
        self._finished = False

    def _next(self) -> int:
        self.ident = (self.ident + 1) % 256
        return self.ident

    def start(self) -> bytes:
        return build(C.EAP_REQUEST, self._next(), C.EAP_IDENTITY)

    def _fail(self, why: str) -> Outcome:
        self.state = "failed"
        return Outcome(build(C.EAP_FAILURE, self.ident), done=True, success=False, reason=why)

    def _request(self, flags: int, data: bytes = b"") -> Outcome:
        return Outcome(build(C.EAP_REQUEST, self._next(), C.EAP_TLS, bytes([flags]) + data))

    def _send_fragment(self) -> Outcome:
        first = not getattr(self, "_sending", False)
        self._sending = True
        chunk, self._out = self._out[:TLS_FRAGMENT], self._out[TLS_FRAGMENT:]
        flags = TLS_M if self._out else 0
        if first and self._out:
            flags |= TLS_L
            chunk = struct.pack("!I", len(chunk) + len(self._out)) + chunk
        if not self._out:
            self._sending = False
        return self._request(flags, chunk)

    def received(self, data: bytes) -> Outcome:
        code, ident, etype, body = parse(data)
        if code != C.EAP_RESPONSE or ident != self.ident:
            raise EapError(f"EAP code {code} id {ident}, expected a response to {self.ident}")
        if self.state == "identity":
            if etype != C.EAP_IDENTITY:
                raise EapError(f"EAP type {etype} where the identity was expected")
            self.identity = body.decode("utf-8", "replace")
            self.state = "tls"
            return self._request(TLS_S)
        if etype == C.EAP_NAK:
            return self._fail("the peer refused EAP-TLS (NAK)")
        if etype != C.EAP_TLS or not body:
            raise EapError(f"EAP type {etype} where EAP-TLS was expected")
        flags, payload = body[0], body[1:]
        if flags & TLS_L:
            if len(payload) < 4:
                raise EapError("EAP-TLS length flag without a length")
            self._in_total = struct.unpack("!I", payload[:4])[0]
            payload = payload[4:]
        self._in += payload
        if len(self._in) > TLS_MAX_IN:
            return self._fail("EAP-TLS: the client's handshake is too large")
        if flags & TLS_M:
            return self._request(0)  # acknowledge the fragment (RFC 5216 §2.1.5)
        if self._out:
            if self._in:
                raise EapError("EAP-TLS data while we are still sending fragments")
            return self._send_fragment()
        if not self._in:
            if self._finished:  # the client acknowledged our last flight
                return self._success()
            raise EapError("empty EAP-TLS response out of place")
        record, self._in = self._in, b""
        try:
            self.conn.bio_write(record)
            try:
                self.conn.do_handshake()
                self._finished = True
            except self._ssl.WantReadError:
                pass
        except self._ssl.Error as err:
            return self._fail(f"TLS handshake: {err}")
        out = b""
        while True:
            try:
                out += self.conn.bio_read(65536)
            except self._ssl.WantReadError:
                break
        if not out:
            return self._success() if self._finished else self._fail("TLS produced nothing to send")
        self._out = out
        return self._send_fragment()

    def _success(self) -> Outcome:
        first = self.conn.get_peer_certificate(as_cryptography=True)
        if first is None:
            return self._fail("EAP-TLS: the client sent no certificate")
        # a server's view of the chain leaves the client's own certificate out
        rest = [c for c in (self.conn.get_peer_cert_chain(as_cryptography=True) or []) if c != first]
        try:
            leaf = self.trust.verify([c.public_bytes(Encoding.DER) for c in [first, *rest]])  # type: ignore[attr-defined]
        except ValueError as err:
            return self._fail(f"EAP-TLS client certificate: {err}")
        if not self.id_check(leaf, self.identity):
            return self._fail(f"EAP identity {self.identity!r} is not in the client's certificate")
        self.state = "done"
        msk_bytes = self.conn.export_keying_material(b"client EAP encryption", 128)[:64]
        return Outcome(build(C.EAP_SUCCESS, self.ident), done=True, success=True, user=self.identity, msk=msk_bytes)

