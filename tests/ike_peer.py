#!/usr/bin/env python3
"""A minimal, independent IKEv1 *initiator* for tests and benchmarks (no Twisted).

Why it exists: the ``ike`` role is a responder; to test it (and to load it) we need an
initiator we control byte by byte, that reports the keys it derived, and that is cheap
enough to run by the hundred.  strongSwan can initiate too, but it hides its keys and costs
a daemon per client.  This peer shares the *codec and crypto* with the product
(``narsuite.ike.isakmp`` / ``narsuite.ike.crypto``, themselves checked against RFC test
vectors, scapy and Wireshark) but none of the exchange logic; it is proved against a real
strongSwan responder in ``tests/test_ike_peer.py`` before anything else relies on it.

What it does (RFC 2409, RFC 3947):

* Main Mode with a pre-shared key: SA (one proposal, one transform), NAT-T vendor IDs
  (RFC 3947 + draft-02\\n), KE/Ni/NAT-D, then ID/HASH_I encrypted; NAT detected from the
  responder's NAT-D -> float to UDP 4500 with the non-ESP marker (``force_nat`` pretends a
  NAT, like kernel-libipsec's fake NAT-D, so the bench floats on a flat link too).
* Quick Mode: ESP tunnel (UDP-encapsulated mode 3 when NATed, else 1), AES-CBC with
  HMAC-SHA1-96 / HMAC-SHA2-256-128, or AES-GCM-16; optional PFS (KE in QM).
* Phase 1: AES-CBC-128/192/256 with SHA1/SHA2-256/384/512, groups 2/5/14/15/16/19/20/21.
* Result: cookies, NAT state, ports, and both ESP SAs (SPI, keys) as this side derived them.

Design: :class:`Initiator` is sans-IO (``start()`` / ``receive(data, port)`` /
``retransmit()`` return :class:`Outgoing` datagrams), so ``bench/bench_ike.py`` can drive
hundreds in one ``select`` loop; :func:`negotiate` is the blocking driver with two plain UDP
sockets.  Not implemented: Aggressive Mode, XAUTH/mode-config, certificates, rekeying,
DPD, deleting SAs (the responder keeps them until it times them out).

CLI: ``python3 tests/ike_peer.py --target 198.51.100.1 --psk secret [--group 19 ...]``
prints the result as JSON (keys hex), exit status 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import select
import socket
import struct
import sys
import time

import attrs

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from narsuite.ike import constants as C
from narsuite.ike import crypto as X
from narsuite.ike import isakmp as M

NON_ESP_MARKER = b"\x00\x00\x00\x00"
IKE_PORT, NATT_PORT = 500, 4500

#: phase-1 hash name -> IKE attribute value
_HASH_ATTR = {"md5": C.HASH_MD5, "sha1": C.HASH_SHA1, "sha256": C.HASH_SHA2_256,
              "sha384": C.HASH_SHA2_384, "sha512": C.HASH_SHA2_512}
#: ESP integrity -> (phase-2 auth algorithm attribute, key bytes)
_INTEG = {"hmac-sha1-96": (C.AUTH_ALG_HMAC_SHA1, 20), "hmac-sha256-128": (C.AUTH_ALG_HMAC_SHA2_256, 32)}
#: ESP cipher -> transform ID
_ESP = {"aes-cbc": C.ESP_AES_CBC, "aes-gcm-16": C.ESP_AES_GCM_16}


class PeerError(Exception):
    """The exchange failed: a notify from the responder, a bad HASH, no answer, ..."""


@attrs.frozen
class Phase1:
    """The one phase-1 transform we offer."""

    cipher: str = "aes-cbc"
    key_bits: int = 128
    hash: str = "sha1"
    group: int = 14
    lifetime: int = 28800

    def __attrs_post_init__(self) -> None:
        X.group(self.group)  # ValueError for an unsupported group
        if self.hash not in _HASH_ATTR or self.cipher != "aes-cbc" or self.key_bits not in (128, 192, 256):
            raise ValueError(f"unsupported phase 1 {self}")


@attrs.frozen
class Phase2:
    """The one ESP transform we offer, and the traffic selectors."""

    enc: str = "aes-cbc"
    key_bits: int = 128
    integ: str | None = "hmac-sha1-96"  # None for aes-gcm-16
    pfs_group: int | None = None
    lifetime: int = 3600
    local_ts: str | None = None  # None: our own (inner) address as ID_IPV4_ADDR
    remote_ts: str = "10.1.0.0/24"

    def __attrs_post_init__(self) -> None:
        if self.enc not in _ESP or self.key_bits not in (128, 192, 256):
            raise ValueError(f"unsupported ESP cipher {self.enc}-{self.key_bits}")
        if (self.enc == "aes-gcm-16") != (self.integ is None) or (self.integ and self.integ not in _INTEG):
            raise ValueError(f"unsupported ESP integrity {self.integ!r} with {self.enc}")
        if self.pfs_group is not None:
            X.group(self.pfs_group)

    @property
    def key_lengths(self) -> tuple[int, int]:
        """(encryption key incl. GCM salt, integrity key) in bytes."""
        enc = self.key_bits // 8 + (4 if self.enc == "aes-gcm-16" else 0)
        return enc, (_INTEG[self.integ][1] if self.integ else 0)


@attrs.frozen
class PeerConfig:
    psk: bytes
    identity: str = "peer.example"  # ID_FQDN, or ID_IPV4_ADDR if it parses as an address
    phase1: Phase1 = Phase1()
    phase2: Phase2 = Phase2()
    natt: bool = True  # send the NAT-T vendor IDs and NAT-D
    force_nat: bool = False  # send a NAT-D for ourselves that cannot match: always float


@attrs.frozen
class EspSA:
    """One direction's ESP SA: ``spi`` is the receiver's choice, keys cut enc || integ."""

    spi: int
    enc: str
    enc_key: bytes = attrs.field(repr=False)
    integ: str | None
    integ_key: bytes = attrs.field(repr=False)

    def as_json(self) -> dict:
        return {"spi": f"{self.spi:08x}", "enc": self.enc, "enc_key": self.enc_key.hex(),
                "integ": self.integ, "integ_key": self.integ_key.hex()}


@attrs.frozen
class Result:
    icookie: bytes
    rcookie: bytes
    nat_local: bool  # we are behind a NAT (responder saw another address/port)
    nat_remote: bool
    floated: bool  # phase 1 finished on 4500
    encap_mode: int
    outbound: EspSA  # initiator -> responder (SPI chosen by the responder)
    inbound: EspSA  # responder -> initiator (our SPI)
    local_ts: str
    remote_ts: str
    elapsed: float = 0.0

    def as_json(self) -> dict:
        return {"icookie": self.icookie.hex(), "rcookie": self.rcookie.hex(), "nat_local": self.nat_local,
                "nat_remote": self.nat_remote, "floated": self.floated, "encap_mode": self.encap_mode,
                "outbound": self.outbound.as_json(), "inbound": self.inbound.as_json(),
                "local_ts": self.local_ts, "remote_ts": self.remote_ts, "elapsed": round(self.elapsed, 6)}


@attrs.frozen
class Outgoing:
    """A datagram to send: ``data`` already carries the non-ESP marker when ``port`` is 4500."""

    data: bytes
    port: int


def _body(payload: M.Payload) -> bytes:
    """A payload's body (after the 4-byte generic header): what RFC 2409 hashes as ``*_b``."""
    return M.build_payloads([payload])[4:]


def _id_payload(value: str, protocol: int = 0, port: int = 0) -> M.Identification:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return M.Identification(C.ID_FQDN, value.encode(), protocol, port)
    if "/" not in value or net.prefixlen == 32:
        return M.Identification(C.ID_IPV4_ADDR, net.network_address.packed, protocol, port)
    return M.Identification(C.ID_IPV4_ADDR_SUBNET, net.network_address.packed + net.netmask.packed, protocol, port)


class Initiator:
    """One Main Mode + Quick Mode exchange, sans-IO.

    ``local`` is our (address, port) as our socket sees it (for NAT-D), ``remote`` the
    responder's address.  Feed every datagram received on either port to :meth:`receive`;
    send what it returns.  ``done`` / ``result`` when finished; :class:`PeerError` on failure.
    """

    def __init__(self, config: PeerConfig, local: tuple[str, int], remote: str) -> None:
        self.config = config
        self.local = local
        self.remote = remote
        self.icookie = X.random_cookie()
        self.rcookie = bytes(8)
        self.port = IKE_PORT
        self.done = False
        self.result: Result | None = None
        self.state = "init"
        self._last: Outgoing | None = None
        self._started = 0.0
        p1 = config.phase1
        self._hash = p1.hash
        self._group = X.group(p1.group)

    # -- helpers ---------------------------------------------------------------------

    def _send(self, message: bytes) -> Outgoing:
        out = Outgoing(NON_ESP_MARKER + message if self.port == NATT_PORT else message, self.port)
        self._last = out
        return out

    def _header(self, exchange: int, mid: int = 0, flags: int = 0) -> M.Header:
        return M.Header(self.icookie, self.rcookie, exchange=exchange, flags=flags, message_id=mid)

    def _encrypted(self, exchange: int, mid: int, payloads: list[M.Payload]) -> bytes:
        ct = self._crypto.encrypt(mid, M.build_payloads(payloads))
        hdr = M.Header(self.icookie, self.rcookie, exchange=exchange, flags=C.FLAG_ENCRYPTION, message_id=mid,
                       next_payload=payloads[0].payload_type)
        return M.build_message(hdr, ciphertext=ct)

    def _decrypt(self, msg: M.Message) -> tuple[bytes, tuple[M.Payload, ...]]:
        plain = self._crypto.decrypt(msg.header.message_id, msg.ciphertext)
        chain, _pad = X.payload_chain(plain, msg.header.next_payload)
        return chain, M.parse_payloads(msg.header.next_payload, chain)

    @staticmethod
    def _raise_notifies(payloads) -> None:
        for n in M.find_all(payloads, M.Notification):
            if n.notify_type < 8192:  # error types (RFC 2408 3.14.1)
                raise PeerError(f"responder sent {C.NOTIFY_NAMES.get(n.notify_type, n.notify_type)}")

    # -- the exchange ---------------------------------------------------------------------

    def start(self) -> Outgoing:
        """Main Mode message 1: SA + vendor IDs."""
        self._started = time.perf_counter()
        p1 = self.config.phase1
        attrs_ = [
            M.Attribute(C.P1_ENCRYPTION, C.ENC_AES_CBC), M.Attribute(C.P1_KEY_LENGTH, p1.key_bits),
            M.Attribute(C.P1_HASH, _HASH_ATTR[p1.hash]), M.Attribute(C.P1_AUTH_METHOD, C.AUTH_PSK),
            M.Attribute(C.P1_GROUP_DESC, p1.group), M.Attribute(C.P1_LIFE_TYPE, C.LIFE_SECONDS),
            M.Attribute.of(C.P1_LIFE_DURATION, p1.lifetime),
        ]
        self._sa_i = M.SecurityAssociation([M.Proposal(1, C.PROTO_ISAKMP, b"", [M.Transform(1, C.KEY_IKE, attrs_)])])
        payloads: list[M.Payload] = [self._sa_i]
        if self.config.natt:
            payloads += [M.VendorID(C.VID_NATT_RFC3947), M.VendorID(C.VID_NATT_DRAFT_02N)]
        self.state = "mm2"
        return self._send(M.build_message(self._header(C.EXCH_MAIN), payloads))

    def retransmit(self) -> Outgoing | None:
        """The last message again (the responder may have lost it, or its answer was lost)."""
        return self._last

    def receive(self, data: bytes, port: int) -> Outgoing | None:
        """Handle one datagram from the responder; returns the next message, if any.

        Datagrams that do not belong to this exchange's current step (retransmissions,
        informational chatter) are ignored and return None.
        """
        if port == NATT_PORT:
            if not data.startswith(NON_ESP_MARKER):
                return None  # ESP or keepalive
            data = data[4:]
        try:
            msg = M.parse_message(data)
        except M.ISAKMPError:
            return None
        h = msg.header
        if h.icookie != self.icookie:
            return None
        if h.exchange == C.EXCH_INFORMATIONAL:
            self._informational(msg)
            return None
        handler = getattr(self, f"_on_{self.state}", None)
        if handler is None:
            return None
        return handler(msg)

    def _informational(self, msg: M.Message) -> None:
        if not msg.header.encrypted:
            self._raise_notifies(msg.payloads)
            return
        if getattr(self, "_crypto", None) is None:
            return
        try:
            _chain, payloads = self._decrypt(msg)
        except (X.CryptoError, M.ISAKMPError):
            return
        self._raise_notifies(payloads)

    def _on_mm2(self, msg: M.Message) -> Outgoing | None:
        if msg.header.exchange != C.EXCH_MAIN or msg.header.encrypted:
            return None
        sa = M.find(msg.payloads, M.SecurityAssociation)
        if sa is None or msg.header.rcookie == bytes(8):
            return None  # not a responder's answer (e.g. our own MM1 reflected)
        chosen = sa.proposals[0].transforms if sa.proposals else ()
        offered = self._sa_i.proposals[0].transforms[0]
        if len(chosen) != 1 or {a.type: a.int_value for a in chosen[0].attributes} != {
                a.type: a.int_value for a in offered.attributes}:
            raise PeerError(f"responder chose a transform we did not offer: {chosen}")
        self.rcookie = msg.header.rcookie
        vids = {v.data for v in M.find_all(msg.payloads, M.VendorID)}
        self._peer_natt = self.config.natt and (C.VID_NATT_RFC3947 in vids)
        self._natd_type = C.PT_NAT_D
        if not self._peer_natt and self.config.natt and C.NATT_VENDOR_IDS.keys() & vids:
            self._peer_natt, self._natd_type = True, C.PT_NAT_D_DRAFT
        self._priv, self._gxi = self._group.generate()
        self._ni = X.random_nonce(32)
        payloads: list[M.Payload] = [M.KeyExchange(self._gxi), M.Nonce(self._ni)]
        if self._peer_natt:
            h = self._hash
            local_ip, local_port = self.local
            own = X.natd_hash(h, self.icookie, self.rcookie, local_ip, local_port)
            if self.config.force_nat:
                own = X.digest(h, b"force-nat" + own)
            payloads += [M.NatD(X.natd_hash(h, self.icookie, self.rcookie, self.remote, IKE_PORT), self._natd_type),
                         M.NatD(own, self._natd_type)]
        self.state = "mm4"
        return self._send(M.build_message(self._header(C.EXCH_MAIN), payloads))

    def _on_mm4(self, msg: M.Message) -> Outgoing | None:
        if msg.header.exchange != C.EXCH_MAIN or msg.header.encrypted:
            return None
        ke, nr = M.find(msg.payloads, M.KeyExchange), M.find(msg.payloads, M.Nonce)
        if ke is None or nr is None:
            return None
        h = self._hash
        self._gxr = ke.data
        try:
            gxy = self._group.shared(self._priv, ke.data)
        except X.CryptoError as exc:
            raise PeerError(f"bad responder KE: {exc}") from exc
        self._nr = nr.data
        skeyid = X.skeyid_psk(h, self.config.psk, self._ni, self._nr)
        self._keys = X.derive_phase1(h, skeyid, gxy, self.icookie, self.rcookie)
        self._crypto = X.ISAKMPCrypto("aes-cbc", self._keys.encryption_key(self.config.phase1.key_bits // 8),
                                      h, self._gxi, self._gxr)
        # NAT detection (RFC 3947 3.2): their first NAT-D is us as they see us, the rest them.
        natds = [n.hash for n in msg.payloads if isinstance(n, M.NatD)]
        self.nat_local = self.nat_remote = False
        if self._peer_natt and len(natds) >= 2:
            local_ip, local_port = self.local
            mine = X.natd_hash(h, self.icookie, self.rcookie, local_ip, local_port)
            theirs = X.natd_hash(h, self.icookie, self.rcookie, self.remote, IKE_PORT)
            self.nat_local = natds[0] != mine or self.config.force_nat
            self.nat_remote = theirs not in natds[1:]
        if self.nat_local or self.nat_remote:
            self.port = NATT_PORT
        self._id_i = _id_payload(self.config.identity)
        hash_i = X.hash_i(h, skeyid, self._gxi, self._gxr, self.icookie, self.rcookie,
                          _body(self._sa_i), _body(self._id_i))
        self._skeyid = skeyid
        self.state = "mm6"
        return self._send(self._encrypted(C.EXCH_MAIN, 0, [self._id_i, M.Hash(hash_i)]))

    def _on_mm6(self, msg: M.Message) -> Outgoing | None:
        if msg.header.exchange != C.EXCH_MAIN or not msg.header.encrypted:
            return None
        try:
            _chain, payloads = self._decrypt(msg)
        except (X.CryptoError, M.ISAKMPError):
            return None  # a retransmitted MM4 or junk
        self._raise_notifies(payloads)
        id_r, hash_r = M.find(payloads, M.Identification), M.find(payloads, M.Hash)
        if id_r is None or hash_r is None:
            raise PeerError("Main Mode 6 without ID or HASH")
        expected = X.hash_r(self._hash, self._skeyid, self._gxi, self._gxr, self.icookie, self.rcookie,
                            _body(self._sa_i), _body(id_r))
        if not X.constant_time_equal(expected, hash_r.data):
            raise PeerError("HASH_R does not verify (wrong PSK?)")
        self._crypto.accept(0, msg.ciphertext)
        self.phase1_elapsed = time.perf_counter() - self._started
        return self._quick_mode_1()

    def _quick_mode_1(self) -> Outgoing:
        return self.quick_mode()

    def quick_mode(self, mid: int | None = None, extra: tuple[M.Payload, ...] = (),
                   encap: int | None = None) -> Outgoing:
        """Quick Mode message 1.  Tests choose the message ID, the encapsulation mode
        (default: what NAT-T negotiated) and payloads to add after the IDs."""
        p2 = self.config.phase2
        self._mid = mid or (secrets.randbits(32) or 1)
        self._spi_i = secrets.randbits(32) | 0x100  # SPIs 0..255 are reserved
        if encap is not None:
            self._encap = encap
        elif self.port != NATT_PORT:
            self._encap = C.ENCAP_TUNNEL
        else:  # RFC 3947 mode 3; the drafts (NAT-D payload 130) number it 61443
            self._encap = C.ENCAP_UDP_TUNNEL if self._natd_type == C.PT_NAT_D else C.ENCAP_UDP_TUNNEL_DRAFT
        attrs_ = [M.Attribute(C.P2_SA_LIFE_TYPE, C.LIFE_SECONDS), M.Attribute.of(C.P2_SA_LIFE_DURATION, p2.lifetime),
                  M.Attribute(C.P2_ENCAP_MODE, self._encap)]
        if p2.integ:
            attrs_.append(M.Attribute(C.P2_AUTH_ALG, _INTEG[p2.integ][0]))
        attrs_.append(M.Attribute(C.P2_KEY_LENGTH, p2.key_bits))
        if p2.pfs_group:
            attrs_.append(M.Attribute(C.P2_GROUP_DESC, p2.pfs_group))
        sa = M.SecurityAssociation([M.Proposal(1, C.PROTO_IPSEC_ESP, self._spi_i.to_bytes(4, "big"),
                                               [M.Transform(1, _ESP[p2.enc], attrs_)])])
        self._qni = X.random_nonce(32)
        rest: list[M.Payload] = [sa, M.Nonce(self._qni)]
        if p2.pfs_group:
            self._qgroup = X.group(p2.pfs_group)
            self._qpriv, qke = self._qgroup.generate()
            rest.append(M.KeyExchange(qke))
        self._local_ts = p2.local_ts or f"{self.local[0]}/32"
        rest += [_id_payload(self._local_ts), _id_payload(p2.remote_ts), *extra]
        h1 = X.qm_hash1(self._hash, self._keys.skeyid_a, self._mid, M.build_payloads(rest))
        self.state = "qm2"
        return self._send(self._encrypted(C.EXCH_QUICK, self._mid, [M.Hash(h1), *rest]))

    def _on_qm2(self, msg: M.Message) -> Outgoing | None:
        h = msg.header
        if h.exchange != C.EXCH_QUICK or h.message_id != self._mid or not h.encrypted:
            return None
        try:
            chain, payloads = self._decrypt(msg)
        except (X.CryptoError, M.ISAKMPError):
            return None
        if not payloads or not isinstance(payloads[0], M.Hash):
            raise PeerError("Quick Mode 2 does not start with HASH")
        rest = chain[4 + len(payloads[0].data):]
        expected = X.qm_hash2(self._hash, self._keys.skeyid_a, self._mid, self._qni, rest)
        if not X.constant_time_equal(expected, payloads[0].data):
            raise PeerError("Quick Mode HASH(2) does not verify")
        self._crypto.accept(self._mid, msg.ciphertext)
        self._raise_notifies(payloads)
        sa, nr = M.find(payloads, M.SecurityAssociation), M.find(payloads, M.Nonce)
        if sa is None or nr is None or not sa.proposals or len(sa.proposals[0].spi) != 4:
            raise PeerError("Quick Mode 2 without a usable SA or nonce")
        spi_r = int.from_bytes(sa.proposals[0].spi, "big")
        p2 = self.config.phase2
        gqm = None
        if p2.pfs_group:
            ke = M.find(payloads, M.KeyExchange)
            if ke is None:
                raise PeerError("PFS offered but Quick Mode 2 has no KE")
            gqm = self._qgroup.shared(self._qpriv, ke.data)
        enc_len, integ_len = p2.key_lengths
        enc_name = f"{p2.enc}-{p2.key_bits}"
        ko = X.esp_keys(self._hash, self._keys.skeyid_d, spi_r, self._qni, nr.data, enc_len, integ_len, gqm)
        ki = X.esp_keys(self._hash, self._keys.skeyid_d, self._spi_i, self._qni, nr.data, enc_len, integ_len, gqm)
        h3 = X.qm_hash3(self._hash, self._keys.skeyid_a, self._mid, self._qni, nr.data)
        out = self._send(self._encrypted(C.EXCH_QUICK, self._mid, [M.Hash(h3)]))
        self.result = Result(
            icookie=self.icookie, rcookie=self.rcookie, nat_local=self.nat_local, nat_remote=self.nat_remote,
            floated=self.port == NATT_PORT, encap_mode=self._encap,
            outbound=EspSA(spi_r, enc_name, ko[0], p2.integ, ko[1]),
            inbound=EspSA(self._spi_i, enc_name, ki[0], p2.integ, ki[1]),
            local_ts=self._local_ts, remote_ts=p2.remote_ts, elapsed=time.perf_counter() - self._started)
        self.done = True
        self.state = "done"
        return out


# ---------------------------------------------------------------------------
# blocking driver


def _udp(local_ip: str, local_port: int, remote: str, remote_port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((local_ip, local_port))
    s.connect((remote, remote_port))
    s.setblocking(False)
    return s


def negotiate(config: PeerConfig, remote: str, *, local_ip: str = "0.0.0.0", local_port: int = 0,
              natt_port: int = 0, timeout: float = 10.0, retransmit: float = 1.0) -> Result:
    """Run Main Mode + Quick Mode against ``remote`` (UDP 500, floating to 4500); blocking.

    ``local_port``/``natt_port`` 0 pick ephemeral ports (a NAT or strongSwan do not care
    which source port floats).  Raises :class:`PeerError` on failure or after ``timeout``.
    """
    result, socks = negotiate_keep(config, remote, local_ip=local_ip, local_port=local_port,
                                   natt_port=natt_port, timeout=timeout, retransmit=retransmit)
    for s in socks.values():
        s.close()
    return result


def negotiate_keep(config: PeerConfig, remote: str, *, local_ip: str = "0.0.0.0", local_port: int = 0,
                   natt_port: int = 0, timeout: float = 10.0,
                   retransmit: float = 1.0) -> tuple[Result, dict[int, socket.socket]]:
    """:func:`negotiate`, but the sockets (by remote port) stay open for ESP traffic."""
    s500 = _udp(local_ip, local_port, remote, IKE_PORT)
    socks = {IKE_PORT: s500}
    ok = False
    try:
        ini = Initiator(config, s500.getsockname(), remote)
        out = ini.start()
        deadline = time.monotonic() + timeout
        next_rtx = time.monotonic() + retransmit
        while True:
            if out is not None:
                if out.port not in socks:
                    socks[out.port] = _udp(local_ip, natt_port, remote, out.port)
                socks[out.port].send(out.data)
                next_rtx = time.monotonic() + retransmit
                out = None
            if ini.done:
                ok = True
                return ini.result, socks
            now = time.monotonic()
            if now >= deadline:
                raise PeerError(f"no answer from {remote} in state {ini.state} after {timeout} s")
            ready, _, _ = select.select(list(socks.values()), [], [], max(0.0, min(deadline, next_rtx) - now))
            if not ready and time.monotonic() >= next_rtx:
                out = ini.retransmit()
                continue
            for port, s in list(socks.items()):
                if s in ready:
                    try:
                        data = s.recv(65535)
                    except (BlockingIOError, ConnectionRefusedError):
                        continue
                    reply = ini.receive(data, port)
                    if reply is not None:
                        out = reply
    finally:
        if not ok:
            for s in socks.values():
                s.close()


# ---------------------------------------------------------------------------
# one ESP round trip with the derived keys: proof that they are the responder's keys


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _icmp_echo(src: str, dst: str, ident: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ike-peer-esp-ping"
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + icmp


def esp_seal(sa: EspSA, seq: int, inner: bytes, next_header: int = 4) -> bytes:
    """ESP (RFC 4303) for an inner packet: AES-CBC + HMAC (RFC 3602/2404) or AES-GCM (RFC 4106)."""
    from cryptography.hazmat.primitives import hashes, hmac
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    head = struct.pack("!II", sa.spi, seq)
    block = 4 if sa.enc.startswith("aes-gcm") else 16
    padlen = (-(len(inner) + 2)) % block
    plain = inner + bytes(range(1, padlen + 1)) + bytes([padlen, next_header])
    if sa.enc.startswith("aes-gcm"):
        iv = os.urandom(8)
        ct = AESGCM(sa.enc_key[:-4]).encrypt(sa.enc_key[-4:] + iv, plain, head)
        return head + iv + ct
    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(sa.enc_key), modes.CBC(iv)).encryptor()
    body = head + iv + enc.update(plain) + enc.finalize()
    algo, icv_len = (hashes.SHA1(), 12) if sa.integ == "hmac-sha1-96" else (hashes.SHA256(), 16)
    mac = hmac.HMAC(sa.integ_key, algo)
    mac.update(body)
    return body + mac.finalize()[:icv_len]


def esp_open(sa: EspSA, packet: bytes) -> bytes:
    """The inner packet of an ESP packet for ``sa``; :class:`PeerError` if it does not verify."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes, hmac
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    spi = struct.unpack_from("!I", packet)[0]
    if spi != sa.spi:
        raise PeerError(f"ESP SPI {spi:08x}, expected {sa.spi:08x}")
    if sa.enc.startswith("aes-gcm"):
        iv = packet[8:16]
        try:
            plain = AESGCM(sa.enc_key[:-4]).decrypt(sa.enc_key[-4:] + iv, packet[16:], packet[:8])
        except InvalidTag as exc:
            raise PeerError("ESP ICV does not verify") from exc
    else:
        algo, icv_len = (hashes.SHA1(), 12) if sa.integ == "hmac-sha1-96" else (hashes.SHA256(), 16)
        mac = hmac.HMAC(sa.integ_key, algo)
        mac.update(packet[:-icv_len])
        if not X.constant_time_equal(mac.finalize()[:icv_len], packet[-icv_len:]):
            raise PeerError("ESP ICV does not verify")
        dec = Cipher(algorithms.AES(sa.enc_key), modes.CBC(packet[8:24])).decryptor()
        plain = dec.update(packet[24:-icv_len]) + dec.finalize()
    padlen = plain[-2]
    return plain[: len(plain) - 2 - padlen]


def esp_ping(result: Result, sock: socket.socket, src: str, dst: str, timeout: float = 3.0,
             resend: float = 0.25) -> bool:
    """ICMP echoes to ``dst`` through the tunnel (ESP in UDP on ``sock``); True on a reply.

    The request is sealed with ``result.outbound``, the reply must open with
    ``result.inbound``: both keys and both SPIs are checked against the responder's.  The
    echo is re-sent every ``resend`` s (new sequence number) because the responder installs
    its SAs only after Quick Mode 3 arrived: a packet sent right after QM3 can beat it.
    """
    ident = secrets.randbits(16)
    deadline = time.monotonic() + timeout
    seq = 0
    next_send = 0.0
    while (now := time.monotonic()) < deadline:
        if now >= next_send:
            seq += 1
            sock.send(esp_seal(result.outbound, seq, _icmp_echo(src, dst, ident)))
            next_send = now + resend
        ready, _, _ = select.select([sock], [], [], max(0.0, min(deadline, next_send) - now))
        if not ready:
            continue
        data = sock.recv(65535)
        if len(data) < 8 or data.startswith(NON_ESP_MARKER) or data == b"\xff":
            continue
        inner = esp_open(result.inbound, data)
        ihl = (inner[0] & 15) * 4
        if inner[9] == 1 and inner[ihl] == 0 and struct.unpack_from("!H", inner, ihl + 4)[0] == ident:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="responder address")
    ap.add_argument("--psk", required=True)
    ap.add_argument("--id", default="peer.example", help="our identity (FQDN or IPv4 address)")
    ap.add_argument("--local-ip", default="0.0.0.0")
    ap.add_argument("--local-port", type=int, default=0)
    ap.add_argument("--cipher-bits", type=int, default=128, choices=(128, 192, 256))
    ap.add_argument("--hash", default="sha1", choices=sorted(_HASH_ATTR))
    ap.add_argument("--group", type=int, default=14)
    ap.add_argument("--esp", default="aes-cbc", choices=sorted(_ESP))
    ap.add_argument("--esp-bits", type=int, default=128, choices=(128, 192, 256))
    ap.add_argument("--integ", default="hmac-sha1-96", help="ESP integrity, 'none' for GCM")
    ap.add_argument("--pfs", type=int, default=None, help="PFS group for Quick Mode")
    ap.add_argument("--local-ts", default=None)
    ap.add_argument("--remote-ts", default="10.1.0.0/24")
    ap.add_argument("--force-nat", action="store_true")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--ping", metavar="ADDR", help="after QM, one ESP-in-UDP ICMP echo to ADDR (needs NAT-T)")
    args = ap.parse_args(argv)
    integ = None if args.integ == "none" else args.integ
    config = PeerConfig(
        psk=args.psk.encode(), identity=args.id, force_nat=args.force_nat,
        phase1=Phase1(key_bits=args.cipher_bits, hash=args.hash, group=args.group),
        phase2=Phase2(enc=args.esp, key_bits=args.esp_bits, integ=integ, pfs_group=args.pfs,
                      local_ts=args.local_ts, remote_ts=args.remote_ts))
    try:
        result, socks = negotiate_keep(config, args.target, local_ip=args.local_ip, local_port=args.local_port,
                                       timeout=args.timeout)
    except PeerError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 1
    out = {"ok": True, **result.as_json()}
    try:
        if args.ping:
            if NATT_PORT not in socks:
                out.update(ok=False, error="--ping needs ESP in UDP (no NAT detected; try --force-nat)")
            else:
                src = result.local_ts.split("/")[0]
                try:
                    out["ping"] = esp_ping(result, socks[NATT_PORT], src, args.ping)
                except PeerError as exc:
                    out.update(ping=False, ping_error=str(exc))
                out["ok"] = out["ping"]
    finally:
        for s in socks.values():
            s.close()
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
