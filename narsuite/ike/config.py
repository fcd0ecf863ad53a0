"""The ``[ike]`` config section: responder settings, peers (``[[ike.peers]]``), XAUTH users.

A *peer* entry is a policy, not a single host: it says who may connect (remote
address range, IKE identity), how they authenticate (PSK or RSA certificate,
optionally XAUTH), what they may negotiate (proposals, traffic selectors) and
what they get (pool address, DNS, protected subnets).  One entry with
``remote = "0.0.0.0/0"`` and a group PSK serves any number of road warriors.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import attrs

from narsuite.ike.v2.proposals import DEFAULT_IKE_PROPOSALS, parse_ike
from narsuite.schema import Check, ConfigError, in_range, ip_address, one_of, setting

__all__ = ["IkeConfig", "PeerPolicy", "PHASE1_ENCRYPTIONS", "PHASE1_HASHES", "GROUPS",
           "ESP_ENCRYPTIONS", "ESP_INTEGRITIES", "AUTH_METHODS"]

#: phase 1 ciphers as "name-bits"
PHASE1_ENCRYPTIONS = ("aes128", "aes192", "aes256", "3des")
PHASE1_HASHES = ("md5", "sha1", "sha256", "sha384", "sha512")
GROUPS = (2, 5, 14, 15, 16, 19, 20, 21)
ESP_ENCRYPTIONS = ("aes128gcm16", "aes256gcm16", "aes128", "aes256")
ESP_INTEGRITIES = ("sha1", "sha256")
AUTH_METHODS = ("psk", "rsa", "pubkey", "eap-mschapv2", "eap-tls")


#: strongSwan's IKEv1 defaults are as broad; the weak ones (3DES, modp1024/1536) are opt-in
DEFAULT_PROPOSALS = tuple(f"{e}-{h}-{g}" for e in ("aes128", "aes256", "aes192")
                          for h in ("sha256", "sha1", "sha384", "sha512")
                          for g in ("modp2048", "ecp256", "modp3072", "ecp384", "modp4096", "ecp521"))


@functools.lru_cache(maxsize=1024)
def network(text: str) -> ipaddress.IPv4Network:
    """A config network string, parsed once (the engine asks on every first message)."""
    return ipaddress.IPv4Network(text, strict=False)


def _networks(key: str, value: tuple[str, ...]) -> None:
    for i, n in enumerate(value):
        try:
            ipaddress.IPv4Network(n, strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{i}]", f"got {n!r}; expected an IPv4 network like \"10.1.0.0/24\"") from None


def _subset(allowed: tuple, name: str) -> Check:
    def check(key: str, value: tuple) -> None:
        for i, v in enumerate(value):
            if v not in allowed:
                raise ConfigError(f"{key}[{i}]", f"got {v!r}; expected one of {', '.join(map(repr, allowed))}")
        if not value:
            raise ConfigError(key, f"expected at least one {name}")
    return check


@attrs.frozen
class PeerPolicy:
    """One ``[[ike.peers]]`` entry."""

    name: str = setting(doc="Unique name (logs, narctl, store).")
    remote: tuple[str, ...] = setting(("0.0.0.0/0",), check=_networks,
                                      doc="Networks the peer's (NAT-mapped) address may come from.")
    id: str = setting("%any", doc="The peer's IKE identity: an address, FQDN, user@FQDN, a DN "
                                  "(\"C=.., O=.., CN=..\") or %any.")
    local_id: str = setting("", doc="Our identity: address (default), FQDN, or \"%cert\" (our certificate's DN).")
    versions: tuple[int, ...] = setting((1,), check=_subset((1, 2), "IKE version"),
                                        doc="IKE versions this policy answers: [1], [2] or [1, 2] "
                                            "(IKEv2 is opt-in: an upgrade does not open a new protocol).")
    auth: str = setting("psk", check=one_of(*AUTH_METHODS))
    psk: str = setting("", doc="Pre-shared key (auth psk).  Prefer psk_file.")
    psk_file: Path | None = setting(None, doc="File holding the pre-shared key (first line); read again "
                                                "when it changes.")
    xauth: bool = setting(False, doc="Require XAUTH (username/password from [ike.users]) after phase 1.")
    aggressive: bool = setting(True, doc="Accept Aggressive Mode for this peer "
                                         "(PSK: exposes a hash to offline guessing).")
    mode: str = setting("tunnel", check=one_of("tunnel", "transport"))
    local_ts: tuple[str, ...] = setting(("0.0.0.0/0",), check=_networks,
                                        doc="Our protected networks; a proposed local selector must lie inside.")
    remote_ts: tuple[str, ...] = setting((), check=_networks,
                                         doc="Networks the peer may put behind the tunnel (empty: only "
                                             "its pool address, or its own address without a pool).")
    pool: str = setting("", doc="[store.pools] pool for mode-config addresses.")
    napt: bool = setting(False, doc="Internal presence by NAPT (001 Appendix A): the client's inner "
                                    "source, whatever it is, is translated to the esp role's napt_address "
                                    "(G_i), so any selector of the client's own is safe.  Needs [esp] "
                                    "napt_address.")
    trust_client_address: bool = setting(
        False, doc="Let a client behind a NAT use a single address of its own choosing (outside a "
                   "non-default local_ts) as its inner address.  Off (the default, 004 §7): without a "
                   "pool, remote_ts or napt a client may claim only the address we see it at.")
    dns: tuple[str, ...] = setting((), doc="INTERNAL_IP4_DNS servers handed out with mode-config.")
    split_include: tuple[str, ...] = setting((), check=_networks,
                                             doc="Protected subnets announced with mode-config (split include).")
    modecfg_push: bool = setting(False, doc="Push the configuration (CFG_SET) instead of waiting for a pull.")
    proposals: tuple[str, ...] = setting(
        DEFAULT_PROPOSALS,
        doc="Phase 1: enc-hash-group, e.g. aes256-sha256-modp2048 (groups modpN or ecpN; also "
            "\"aes128-sha1-14\").  Default: AES-128/192/256 with SHA-1/SHA-2 and the groups of "
            "2048 bits or more (3DES, modp1024 and modp1536 only when listed).")
    ikev2_proposals: tuple[str, ...] = setting(
        DEFAULT_IKE_PROPOSALS,
        doc="IKEv2 SA proposals in strongSwan's syntax: aes256-sha256-modp2048, "
            "aes128gcm16-prfsha256-ecp256, aes256-sha384-curve25519 (several algorithms of a kind "
            "in one proposal are alternatives).")
    esp: tuple[str, ...] = setting(
        ("aes128gcm16", "aes256gcm16", "aes128-sha1", "aes256-sha256", "aes128-sha256", "aes256-sha1"),
        doc="Phase 2 ESP transforms: aes128gcm16, aes256gcm16, aesN-sha1, aesN-sha256.")
    pfs: str = setting("optional", check=one_of("optional", "required", "never"),
                       doc="Quick Mode PFS: accept both, insist on a KE, or refuse one.")
    pfs_groups: tuple[int, ...] = setting((14, 15, 16, 19, 20, 21), check=_subset(GROUPS, "group"),
                                          doc="Quick Mode DH groups accepted (2 and 5 only when listed).")
    ike_lifetime: float = setting(28800.0, check=in_range(60, 86400 * 7), doc="Upper bound, seconds.")
    esp_lifetime: float = setting(3600.0, check=in_range(30, 86400 * 2), doc="Upper bound, seconds.")
    rekey: bool = setting(True, doc="IKEv2: rekey a CHILD SA ourselves (CREATE_CHILD_SA with REKEY_SA) when "
                                    "esp_lifetime less the jitter has passed and the client has not; it "
                                    "expires at esp_lifetime plus grace.  False: the client's to do, as "
                                    "in IKEv1.")
    rekey_jitter: float = setting(0.1, check=in_range(0, 0.5),
                                  doc="IKEv2: our rekey happens at the lifetime times (1 - a random fraction "
                                      "up to this), so that many SAs made together are not rekeyed "
                                      "together (strongSwan's rand_time).")

    def __validate__(self, key: str) -> None:
        if self.auth == "psk" and not (self.psk or self.psk_file):
            raise ConfigError(f"{key}.psk", "auth psk needs psk or psk_file")
        if self.auth != "psk" and (self.psk or self.psk_file):
            raise ConfigError(f"{key}.psk", f"auth {self.auth} takes no pre-shared key; remove psk")
        if self.auth in ("pubkey", "eap-mschapv2", "eap-tls") and 1 in self.versions:
            raise ConfigError(f"{key}.versions", f"auth {self.auth} is IKEv2 only: set versions = [2] (IKEv1 "
                                                 "certificates are auth \"rsa\", passwords are XAUTH)")
        if self.psk_file is not None and not self.psk_file.is_file():
            raise ConfigError(f"{key}.psk_file", f"{self.psk_file} is not a readable file")
        for i, p in enumerate(self.proposals):
            try:
                parse_phase1(p)
            except ValueError as e:
                raise ConfigError(f"{key}.proposals[{i}]", str(e)) from None
        for i, p in enumerate(self.ikev2_proposals):
            try:
                parse_ike(p)
            except ValueError as e:
                raise ConfigError(f"{key}.ikev2_proposals[{i}]", str(e)) from None
        for i, p in enumerate(self.esp):
            try:
                parse_esp(p)
            except ValueError as e:
                raise ConfigError(f"{key}.esp[{i}]", str(e)) from None
        for i, d in enumerate(self.dns):
            ip_address(4)(f"{key}.dns[{i}]", d)
        if self.mode == "transport" and self.pool:
            raise ConfigError(f"{key}.pool", "transport mode gets no inner address: remove pool")
        if self.mode == "transport" and self.napt:
            raise ConfigError(f"{key}.napt", "transport mode has no inner packets to translate: remove napt")
        if self.napt and self.pool:
            raise ConfigError(f"{key}.napt", "a pool address and NAPT to G_i exclude each other: "
                                             "remove napt or pool")

    @property
    def secret(self) -> bytes:
        if self.psk_file is not None:
            return read_psk_file(self.psk_file)
        return self.psk.encode()

    def allows_remote(self, ip: str) -> bool:
        addr = ipaddress.IPv4Address(ip)
        return any(addr in network(n) for n in self.remote)


#: path -> ((mtime_ns, size, inode), key): a PSK file is read when it changed, not per message
_psk_cache: dict[Path, tuple[tuple[int, int, int], bytes]] = {}


def read_psk_file(path: Path) -> bytes:
    """The pre-shared key in ``path`` (its first line), read again only when the file
    changed (modification time, size or inode: an editor's rename counts).

    Every MM5 and AM1 needs the key; reading the file each time put a disk read on the
    reactor per message.  A ``stat`` per use keeps an operator's key change effective at
    once without a reload."""
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _psk_cache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    lines = path.read_text().splitlines()
    key = lines[0].strip().encode() if lines else b""
    if len(_psk_cache) > 1024:
        _psk_cache.clear()
    _psk_cache[path] = (stamp, key)
    return key


_ENC = {"aes128": ("aes-cbc", 16), "aes192": ("aes-cbc", 24), "aes256": ("aes-cbc", 32), "3des": ("3des-cbc", 24)}
_GROUP_NAMES = {"modp1024": 2, "modp1536": 5, "modp2048": 14, "modp3072": 15, "modp4096": 16,
                "ecp256": 19, "ecp384": 20, "ecp521": 21}


def parse_phase1(text: str) -> tuple[str, int, str, int]:
    """"aes256-sha256-modp2048" -> ("aes-cbc", 32, "sha256", 14)."""
    parts = text.lower().split("-")
    if len(parts) != 3:
        raise ValueError(f"got {text!r}; expected enc-hash-group such as \"aes256-sha256-modp2048\"")
    enc, hash_, grp = parts
    if enc not in _ENC:
        raise ValueError(f"got {text!r}: cipher {enc!r} is not one of {', '.join(_ENC)}")
    if hash_ not in PHASE1_HASHES:
        raise ValueError(f"got {text!r}: hash {hash_!r} is not one of {', '.join(PHASE1_HASHES)}")
    number = _GROUP_NAMES.get(grp) or (int(grp) if grp.isdigit() else 0)
    if number not in GROUPS:
        raise ValueError(f"got {text!r}: group {grp!r} is not one of {', '.join(_GROUP_NAMES)}")
    cipher, keylen = _ENC[enc]
    return cipher, keylen, hash_, number


def parse_esp(text: str) -> tuple[str, int, str | None]:
    """"aes128gcm16" -> ("aes-gcm-16", 128, None); "aes256-sha256" -> ("aes-cbc", 256, "hmac-sha256-128")."""
    t = text.lower()
    if t in ("aes128gcm16", "aes256gcm16"):
        return "aes-gcm-16", int(t[3:6]), None
    enc, _, integ = t.partition("-")
    if enc not in ("aes128", "aes256") or integ not in ESP_INTEGRITIES:
        raise ValueError(f"got {text!r}; expected aes128gcm16, aes256gcm16 or aes128|aes256-sha1|sha256")
    return "aes-cbc", int(enc[3:]), {"sha1": "hmac-sha1-96", "sha256": "hmac-sha256-128"}[integ]


@attrs.frozen
class IkeConfig:
    port: int = setting(500, check=in_range(1, 65535), doc="IKE (RFC 2409).")
    natt_port: int = setting(4500, check=in_range(1, 65535),
                             doc="NAT-T (RFC 3947): shared with the esp role (non-ESP marker).")
    listen: str = setting("", check=ip_address(4), doc="Address to bind; all when empty.")
    address: str = setting("", check=ip_address(4),
                           doc="Our public address for NAT-D and IDs (default: the route's source to each peer).")
    natt: tuple[str, ...] = setting(("rfc3947", "draft-03", "draft-02n", "draft-02", "espthrunat"),
                                    check=_subset(("rfc3947", "draft-03", "draft-02n", "draft-02", "espthrunat"),
                                                  "NAT-T variant"),
                                    doc="NAT-T variants we answer, best first.")
    espthrunat_modes: tuple[int, ...] = setting((61440, 61441),
                                                doc="004 draft encapsulation values [UDP-tunnel, UDP-transport]; "
                                                    "61440 is used by another vendor for something else.")
    dpd_delay: float = setting(30.0, check=in_range(0, 86400), doc="Probe a peer idle this long (0: never).")
    dpd_timeout: float = setting(120.0, check=in_range(1, 86400), doc="Declare it dead after this long.")
    retransmit: tuple[float, ...] = setting((4.0, 8.0, 16.0),
                                            doc="Our own requests (XAUTH, pushed mode-config) resent after these.")
    half_open_per_source: int = setting(16, check=in_range(1, 100000),
                                        doc="Phase 1 exchanges in progress per source address.")
    half_open_total: int = setting(2048, check=in_range(1, 1000000),
                                   doc="Phase 1 exchanges in progress in all.")
    half_open_timeout: float = setting(30.0, check=in_range(1, 3600))
    half_open_aggressive: int = setting(
        256, check=in_range(1, 1000000),
        doc="Aggressive Mode exchanges in progress in all (AM1 costs a DH at once; Main Mode has its own budget).")
    cookie_slot: float = setting(
        30.0, check=in_range(1, 3600),
        doc="Seconds per responder-cookie secret; a Main Mode cookie is good for one to two slots.")
    first_messages_max: int = setting(
        16384, check=in_range(16, 10_000_000),
        doc="Main Mode first messages remembered (their SA payload) until MM3; oldest pushed out first.")
    unauthenticated_notify_rate: float = setting(
        10.0, check=in_range(0, 100000),
        doc="Unprotected error notifications per second to sources not yet authenticated (0: none).")
    unauthenticated_notify_burst: float = setting(20.0, check=in_range(0, 100000))
    ikev2_mobike_check: bool = setting(
        False, doc="IKEv2 MOBIKE (RFC 4555 §3.5): check that a client's new address answers (an INFORMATIONAL "
                   "with COOKIE2) before its CHILD SAs move there.")
    ikev2_cookie_threshold: int = setting(
        64, check=in_range(0, 1000000),
        doc="IKEv2 (RFC 7296 §2.6): with this many IKE_SA_INIT exchanges half open, a new one must "
            "first return our COOKIE (0: always).")
    ikev2_dh_reuse: float = setting(
        1.0, check=in_range(0, 10),
        doc="IKEv2 (RFC 7296 §2.12): seconds our IKE_SA_INIT Diffie-Hellman value serves new exchanges "
            "before a fresh one replaces it and it is forgotten (0: a fresh value for every exchange).")
    certificate: Path | None = setting(None, doc="Our certificate (PEM, may hold the chain).")
    private_key: Path | None = setting(None, doc="Our private key (PEM).")
    cacerts: tuple[Path, ...] = setting((), doc="CA certificates (PEM files or directories) peers must chain to.")
    xauth_retries: int = setting(2, check=in_range(0, 10))
    users: Mapping[str, str] = setting(factory=lambda: MappingProxyType({}),
                                       doc="XAUTH users: name = bcrypt or scrypt hash (narctl hash-password).")
    peers: tuple[PeerPolicy, ...] = setting(())

    def __validate__(self, key: str) -> None:
        names = set()
        for i, p in enumerate(self.peers):
            if p.name in names:
                raise ConfigError(f"{key}.peers[{i}].name", f"peer {p.name!r} is defined twice")
            names.add(p.name)
            if p.auth in ("rsa", "pubkey", "eap-tls") and not (self.certificate and self.private_key and self.cacerts):
                raise ConfigError(f"{key}.certificate",
                                  f"peer {p.name!r} uses auth {p.auth}: set certificate, private_key and cacerts")
            if p.auth == "eap-mschapv2" and not (self.certificate and self.private_key):
                raise ConfigError(f"{key}.certificate", f"peer {p.name!r} uses auth eap-mschapv2: the gateway "
                                  "authenticates with its certificate; set certificate and private_key")
            if p.auth == "eap-mschapv2" and not self.users:
                raise ConfigError(f"{key}.users", f"peer {p.name!r} uses auth eap-mschapv2: add users")
            if p.xauth and not self.users:
                raise ConfigError(f"{key}.users", f"peer {p.name!r} requires XAUTH: add users")
        if len(self.espthrunat_modes) != 2:
            raise ConfigError(f"{key}.espthrunat_modes", "expected [UDP-tunnel, UDP-transport]")
        for i, r in enumerate(self.retransmit):
            if r <= 0:
                raise ConfigError(f"{key}.retransmit[{i}]", "expected a positive number of seconds")
        if self.users:
            from narsuite.passwords import check_hash_format
            for name, hashed in self.users.items():
                try:
                    check_hash_format(hashed, allow_nt=True)  # NT hashes: EAP-MSCHAPv2 (IKEv2)
                except ValueError as e:
                    raise ConfigError(f"{key}.users.{name}", str(e)) from None
