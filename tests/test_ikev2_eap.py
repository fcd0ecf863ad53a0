"""EAP-MSCHAPv2 (RFC 2759) for IKEv2: the RFC's own test vectors, the NT-hash users entry,
and the server conversation driven by a client built from the RFC formulas."""

from __future__ import annotations

import struct

import pytest

from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import eap
from narsuite.passwords import check_hash_format, hash_password, nt_hash, verify_password

# RFC 2759 §9.2
USER = b"User"
PASSWORD = "clientPass"
AUTH_CHALLENGE = bytes.fromhex("5B5D7C7D7B3F2F3E3C2C602132262628")
PEER_CHALLENGE = bytes.fromhex("21402324255E262A28295F2B3A337C7E")
NT_HASH = bytes.fromhex("44EBBA8D5312B8D611474411F56989AE")
CHALLENGE = bytes.fromhex("D02E4386BCE91226")
NT_RESPONSE = bytes.fromhex("82309ECD8D708B5EA08FAA3981CD83544233114A3D85D6DF")


def test_rfc2759_vectors():
    h = hash_password(PASSWORD, "nt")
    assert nt_hash(h) == NT_HASH
    assert eap.challenge_hash(PEER_CHALLENGE, AUTH_CHALLENGE, USER) == CHALLENGE
    assert eap.nt_response(NT_HASH, CHALLENGE) == NT_RESPONSE
    assert eap.authenticator_response(NT_HASH, NT_RESPONSE, CHALLENGE) == b"S=407A5589115FD0D6209F510FE9C04566932CDA56"


def test_rfc3079_master_key_vector():
    # RFC 3079 §3.5.3 (same password and NT-Response as RFC 2759 §9.2): MasterKey and the
    # 128-bit send key; our MSK starts with the server's receive key, then its send key
    assert eap.msk(NT_HASH, NT_RESPONSE)[16:32] == bytes.fromhex("8B7CDC149B993A1BA118CB153F56DCCB")
    assert len(eap.msk(NT_HASH, NT_RESPONSE)) == 64


def test_nt_hash_entries_check_passwords_and_are_validated():
    h = hash_password(PASSWORD, "nt")
    check_hash_format(h, allow_nt=True)
    assert verify_password(h, PASSWORD.encode()) and not verify_password(h, b"clientpass")
    with pytest.raises(ValueError, match="NT hash"):
        check_hash_format("$nt$1234", allow_nt=True)
    # elsewhere (manhole, SOCKS users) an unsalted MD4 is refused at load
    with pytest.raises(ValueError, match="bcrypt"):
        check_hash_format(h)


def _client_response(server: eap.MschapV2Server, challenge_msg: bytes, user: bytes, nt: bytes) -> bytes:
    _code, ident, etype, body = eap.parse(challenge_msg)
    assert etype == C.EAP_MSCHAPV2 and body[0] == eap.OP_CHALLENGE
    auth_challenge = body[5:21]
    peer = b"\x11" * 16
    resp = eap.nt_response(nt, eap.challenge_hash(peer, auth_challenge, user))
    value = peer + b"\0" * 8 + resp + b"\0"
    ms = struct.pack("!BBHB", eap.OP_RESPONSE, body[1], 5 + 49 + len(user), 49) + value + user
    return eap.build(C.EAP_RESPONSE, ident, C.EAP_MSCHAPV2, ms)


def test_server_conversation_success_and_wrong_password():
    users = {"alice": NT_HASH}
    s = eap.MschapV2Server(users.get)
    first = s.start()
    _c, ident, etype, _b = eap.parse(first)
    assert etype == C.EAP_IDENTITY
    out = s.received(eap.build(C.EAP_RESPONSE, ident, C.EAP_IDENTITY, b"alice"))
    out = s.received(_client_response(s, out.reply, b"alice", NT_HASH))
    code, ident, _t, body = eap.parse(out.reply)
    assert body[0] == eap.OP_SUCCESS and body[4:6] == b"S="
    done = s.received(eap.build(C.EAP_RESPONSE, ident, C.EAP_MSCHAPV2, bytes([eap.OP_SUCCESS])))
    assert done.done and done.success and done.user == "alice" and len(done.msk) == 64
    assert eap.parse(done.reply)[0] == C.EAP_SUCCESS

    s = eap.MschapV2Server(users.get)
    _c, ident, _t, _b = eap.parse(s.start())
    out = s.received(eap.build(C.EAP_RESPONSE, ident, C.EAP_IDENTITY, b"alice"))
    bad = s.received(_client_response(s, out.reply, b"alice", bytes(16)))
    assert bad.done and not bad.success and eap.parse(bad.reply)[0] == C.EAP_FAILURE
    assert "wrong password" in bad.reason
