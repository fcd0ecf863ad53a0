"""Password hashes at rest and their verification off the reactor thread, for every role.

Shared by the nar role (SOCKS5 username/password, RFC 1929) and the ike role (XAUTH,
draft-beaulieu-ike-xauth-02): both check a (user, password) pair a client sends against a
configured ``user -> hash`` table, and both must do it without capping the connection rate
or blocking the reactor.  It lives outside either role so neither imports the other;
:mod:`narsuite.nar.auth` re-exports it under its old name.

Hashes at rest are strong and slow (bcrypt ``$2b$``, or scrypt in the format
below), so a leaked config does not give the passwords away.  A slow hash on
every login would cap a server at a few logins per second per core, and block
the reactor if it ran there.  So:

* the strong hash is verified in a thread (``deferToThreadPool``), never in
  the reactor thread, once per (user, password);
* a success is remembered in memory as ``HMAC-SHA256(K, user \\0 password)``
  with ``K`` a random key made at start (``secrets``), compared with
  :func:`hmac.compare_digest`.  A repeat login costs one HMAC (~1 µs).  The
  key never leaves the process, so the cache is useless to anyone who reads
  memory dumps without also having ``K``... and is gone at restart;
* failures are never cached (each one pays the full hash: guessing stays
  slow); an unknown user pays a dummy verification, so timing does not say
  whether a name exists;
* concurrent checks of the same (user, password) share one verification.

Hash formats, chosen by prefix:

* ``$2b$<cost>$...`` (also ``$2a$``, ``$2y$``): bcrypt.  Passwords longer than
  72 bytes are refused (bcrypt would silently ignore the rest).
* ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt, base64>$<hash, base64>``: scrypt
  (RFC 7914) via ``cryptography``; unpadded standard base64; 32-byte hash.
* ``$nt$<32 hex digits>``: the NT hash, MD4(UTF-16LE(password)) -- the only form
  EAP-MSCHAPv2 (RFC 2759, what Windows, macOS and iOS IKEv2 clients use) can check a
  password against, as FreeRADIUS's NT-Password.  Unsalted and fast: it is
  password-equivalent for MSCHAPv2, so keep it for the users who need that method.
  MD4 comes from pycryptodome (cryptography has none).

Passwords are 1 to 255 bytes: the most RFC 1929 can carry, and far beyond what anyone types
into an XAUTH prompt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import bcrypt
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from narsuite.logs import logger

__all__ = ["hash_password", "verify_password", "check_hash_format", "nt_hash", "PasswordChecker",
           "BCRYPT_COST", "SCRYPT_LN"]

log = logger()

BCRYPT_COST = 12
SCRYPT_LN = 15  # N = 32768, r = 8, p = 1: 32 MiB, ~100 ms
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_MAX = 72


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str | bytes, scheme: str = "bcrypt", *, cost: int | None = None) -> str:
    """Hash ``password`` for a users table (``[nar.users]``, XAUTH users): scheme ``bcrypt``
    (default) or ``scrypt``.

    ``cost`` is the bcrypt cost (default 12) or scrypt's log2 N (default 15).
    """
    raw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
    if not 1 <= len(raw) <= 255:
        raise ValueError("passwords are 1 to 255 bytes (the RFC 1929 limit)")
    if scheme == "bcrypt":
        if len(raw) > _BCRYPT_MAX:
            raise ValueError(f"bcrypt takes at most {_BCRYPT_MAX} bytes; use scheme scrypt")
        if b"\0" in raw:
            raise ValueError("bcrypt cannot hash a password containing NUL; use scheme scrypt")
        return bcrypt.hashpw(raw, bcrypt.gensalt(cost or BCRYPT_COST)).decode("ascii")
    if scheme == "scrypt":
        ln = cost or SCRYPT_LN
        salt = secrets.token_bytes(16)
        key = Scrypt(salt=salt, length=32, n=2 ** ln, r=8, p=1).derive(raw)
        return f"$scrypt$ln={ln},r=8,p=1${_b64(salt)}${_b64(key)}"
    if scheme == "nt":
        return "$nt$" + _md4(raw.decode("utf-8").encode("utf-16-le")).hex()
    raise ValueError(f"unknown scheme {scheme!r}; expected bcrypt, scrypt or nt")


def _md4(data: bytes) -> bytes:
    from Crypto.Hash import MD4

    return MD4.new(data).digest()


def nt_hash(hashed: str) -> bytes | None:
    """The 16-byte NT hash of a ``$nt$`` entry, None for any other format."""
    if not hashed.startswith("$nt$"):
        return None
    try:
        h = bytes.fromhex(hashed[4:])
    except ValueError:
        return None
    return h if len(h) == 16 else None


def _parse_scrypt(hashed: str) -> tuple[int, int, int, bytes, bytes]:
    parts = hashed.split("$")
    # "", "scrypt", "ln=..,r=..,p=..", salt, hash
    if len(parts) != 5 or parts[1] != "scrypt":
        raise ValueError("expected $scrypt$ln=<n>,r=<r>,p=<p>$<salt>$<hash>")
    params = dict(item.split("=", 1) for item in parts[2].split(","))
    ln, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
    if not (1 <= ln <= 30 and 1 <= r <= 64 and 1 <= p <= 64):
        raise ValueError("scrypt parameters out of range")
    return ln, r, p, _unb64(parts[3]), _unb64(parts[4])


def check_hash_format(hashed: str, allow_nt: bool = False) -> None:
    """Raise ValueError (with the fix) unless ``hashed`` is a bcrypt or scrypt hash we can verify;
    ``allow_nt``: an NT hash too (only ``[ike.users]``, where EAP-MSCHAPv2 needs it: elsewhere
    an unsalted MD4 would only weaken the table)."""
    if hashed.startswith(_BCRYPT_PREFIXES):
        parts = hashed.split("$")
        if len(parts) != 4 or not parts[2].isdigit() or len(parts[3]) != 53:
            raise ValueError("malformed bcrypt hash; make one with narsuite.passwords.hash_password")
        return
    if hashed.startswith("$scrypt$"):
        try:
            _parse_scrypt(hashed)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"malformed scrypt hash ({exc})") from None
        return
    if hashed.startswith("$nt$") and allow_nt:
        if nt_hash(hashed) is None:
            raise ValueError("malformed NT hash: expected $nt$ and 32 hex digits (narctl hash-password --nt)")
        return
    if allow_nt:
        raise ValueError("expected a bcrypt ($2b$...), scrypt ($scrypt$...) or NT ($nt$...) hash; make one with "
                         "narctl hash-password (--nt for an NT hash)")
    raise ValueError("expected a bcrypt ($2b$...), scrypt ($scrypt$...) hash (NT hashes only in [ike.users]); "
                     "make one with narctl hash-password")


def verify_password(hashed: str, password: bytes) -> bool:
    """The slow, blocking verification.  Never call it in the reactor thread."""
    try:
        if hashed.startswith(_BCRYPT_PREFIXES):
            if len(password) > _BCRYPT_MAX or b"\0" in password:
                return False
            return bcrypt.checkpw(password, hashed.encode("ascii"))
        if hashed.startswith("$scrypt$"):
            ln, r, p, salt, key = _parse_scrypt(hashed)
            got = Scrypt(salt=salt, length=len(key), n=2 ** ln, r=r, p=p).derive(password)
            return hmac.compare_digest(got, key)
        nt = nt_hash(hashed)
        if nt is not None:
            return hmac.compare_digest(_md4(password.decode("utf-8").encode("utf-16-le")), nt)
    except (ValueError, KeyError, UnicodeDecodeError):
        return False
    return False


Runner = Callable[..., "defer.Deferred[Any]"]


class PasswordChecker:
    """Checks (user, password) against ``users`` (name -> hash); see the module docstring.

    ``run(f, *args)`` runs the slow verification and returns a Deferred; the
    default is ``deferToThreadPool(reactor, reactor.getThreadPool(), ...)``.
    """

    def __init__(self, users: Mapping[str, str], reactor: Any = None, run: Runner | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.users = dict(users)
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, bytes] = {}  # user -> HMAC of a verified (user, password)
        self._pending: dict[bytes, list[defer.Deferred[bool]]] = {}
        self.stats = {"verifications": 0, "cache_hits": 0, "failures": 0}
        if run is None:
            def run(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
                return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        self._run = run
        dummy_cost = max((int(h.split("$")[2]) for h in self.users.values()
                          if h.startswith(_BCRYPT_PREFIXES) and h.split("$")[2].isdigit()),
                         default=BCRYPT_COST)
        self._dummy: str | None = None  # a bcrypt hash of a random password, made once in the thread
        self._dummy_cost = dummy_cost

    def _mac(self, user: bytes, password: bytes) -> bytes:
        return hmac.new(self._key, user + b"\0" + password, hashlib.sha256).digest()

    def _verify(self, user: bytes, password: bytes) -> bool:
        try:
            hashed = self.users.get(user.decode("utf-8"))
        except UnicodeDecodeError:
            hashed = None
        if hashed is None:
            if self._dummy is None:  # the highest configured cost, so timing tells nothing
                self._dummy = bcrypt.hashpw(secrets.token_bytes(16).hex().encode(),
                                            bcrypt.gensalt(self._dummy_cost)).decode()
            verify_password(self._dummy, password[:_BCRYPT_MAX].replace(b"\0", b"_"))
            return False
        return verify_password(hashed, password)

    def check(self, user: bytes, password: bytes) -> defer.Deferred[bool]:
        """A Deferred firing True or False; never fails."""
        mac = self._mac(user, password)
        cached = self._cache.get(user)
        if cached is not None and hmac.compare_digest(cached, mac):
            self.stats["cache_hits"] += 1
            return defer.succeed(True)
        waiters = self._pending.get(mac)
        d: defer.Deferred[bool] = defer.Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        self._pending[mac] = [d]
        self.stats["verifications"] += 1

        def done(ok: Any) -> None:
            ok = ok is True
            if ok:
                self._cache[user] = mac
            else:
                self.stats["failures"] += 1
            for w in self._pending.pop(mac, []):
                w.callback(ok)

        def failed(f: Any) -> None:
            log.failure("password verification raised", f)
            done(False)

        try:
            self._run(self._verify, user, password).addCallbacks(done, failed)
        except Exception:
            log.failure("could not start password verification")
            done(False)
        return d
