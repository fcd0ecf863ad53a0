"""The manhole: an interactive Python prompt inside the running daemon, over SSH.

:func:`make_manhole_service` builds a :class:`ManholeService` that listens on
``manhole.listen:manhole.port`` (loopback by default) with a Conch SSH server
whose shell is a :class:`twisted.conch.manhole.ColoredManhole`.

Who may log in (see ``docs/manhole.md``):

* **password**: a user named in ``manhole.users`` with the password whose
  bcrypt or scrypt hash is configured there (make one with ``narctl
  hash-password``).  Checked by :class:`narsuite.passwords.PasswordChecker`,
  the one implementation the roles share: the hash runs in the reactor's
  thread pool, and an unknown user name costs the same hash as a known one.
* **public key**: a key listed in ``manhole.authorized_keys`` (OpenSSH format)
  may log in as any user named in ``manhole.users`` or as ``narsuite``.  The
  file is re-read when it changes; lines with options (``from=...``,
  ``command=...``) are skipped because they could not be honoured, and a file
  writable by group or others is ignored as a whole.

Each session gets its own variables.  The names of the namespace dict given to
:func:`make_manhole_service` (``store``, ``services``, ``config``, ``reactor``
...) are looked up again before every line, so names the daemon adds or
replaces later show up in open sessions, and a session's own assignments never
leak into the daemon's dict or into other sessions.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application import service
from twisted.conch import error as conch_error
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser
from twisted.conch.manhole import ColoredManhole
from twisted.conch.manhole_ssh import ConchFactory, TerminalRealm, TerminalSession
from twisted.conch.ssh import connection, keys, transport, userauth
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.keys import Key
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey, IUsernamePassword, SSHPrivateKey
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import implementer

# hash_password is re-exported: docs/manhole.md names narsuite.manhole.hash_password.
from narsuite.passwords import PasswordChecker, Runner, hash_password
from narsuite.schema import ConfigError

__all__ = [
    "KEY_USER",
    "ManholeService",
    "PasswordCredentialsChecker",
    "AuthorizedKeysFile",
    "AuthorizedKeyChecker",
    "make_manhole_service",
    "hash_password",
    "load_or_create_host_key",
    "fingerprint",
]

log = Logger(namespace="narsuite.manhole")

#: The user name a key from ``authorized_keys`` may always log in as.
KEY_USER = "narsuite"

#: What ``ICredentialsChecker.requestAvatarId`` fires with (``()`` is Cred's ANONYMOUS).
AvatarId = bytes | tuple[()]


# --------------------------------------------------------------------- passwords

@implementer(ICredentialsChecker)
class PasswordCredentialsChecker:
    """Checks user name + password against ``{user: hash}`` for the SSH login.

    A thin Twisted Cred adapter over :class:`narsuite.passwords.PasswordChecker`,
    the one implementation every role uses (bcrypt or scrypt hashes, verified in
    the reactor's thread pool, an unknown user paying a dummy hash of the highest
    configured cost so timing does not tell whether a name exists, repeat logins
    answered from an in-memory HMAC).  ``run`` is passed through for tests.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: Mapping[str, str], reactor: Any = None,
                 run: Runner | None = None) -> None:
        self.checker = PasswordChecker(users, reactor, run)

    def requestAvatarId(self, credentials: IUsernamePassword) -> defer.Deferred[AvatarId]:
        username, password = credentials.username, credentials.password

        def result(ok: bool) -> AvatarId:
            if not ok:
                raise cred_error.UnauthorizedLogin("bad user name or password")
            return username

        return self.checker.check(username, password).addCallback(result)


# ---------------------------------------------------------------- public keys

_KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-")


def _parse_authorized_keys(text: str, source: Path) -> list[keys.Key]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if not fields[0].startswith(_KEY_TYPE_PREFIXES):
            log.warn("{path}:{line}: key options are not supported by the manhole; "
                     "line ignored", path=str(source), line=number)
            continue
        if len(fields) < 2:
            log.warn("{path}:{line}: no key after the key type; line ignored",
                     path=str(source), line=number)
            continue
        try:
            found.append(keys.Key.fromString(f"{fields[0]} {fields[1]}".encode("ascii")))
        except (keys.BadKeyError, ValueError, UnicodeEncodeError) as e:
            log.warn("{path}:{line}: not a usable public key ({error}); line ignored",
                     path=str(source), line=number, error=str(e))
    return found


class AuthorizedKeysFile:
    """The keys of an OpenSSH ``authorized_keys`` file, for the users in ``usernames``.

    The file is read again whenever its size or modification time changes; a
    missing file means no keys, a file writable by group or others is refused.
    """

    def __init__(self, path: Path, usernames: Iterable[str]) -> None:
        self.path = Path(path)
        self._usernames = {name.encode("utf-8") for name in usernames}
        self._stamp: tuple[int, int, int] | None = None
        self._keys: list[Key] = []

    def keys(self) -> list[Key]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            log.error("cannot read {path}: {error}", path=str(self.path), error=e.strerror)
            return []
        else:
            stamp = (st.st_mtime_ns, st.st_size, st.st_mode)
        if stamp == self._stamp:
            return self._keys
        self._stamp, self._keys = stamp, []
        if stamp is None:
            log.warn("{path} does not exist: no key can log in", path=str(self.path))
        elif st.st_mode & 0o022:
            log.error("{path} is writable by group or others; ignoring all its keys "
                      "(chmod go-w it)", path=str(self.path))
        else:
            try:
                text = self.path.read_text("utf-8", errors="replace")
            except OSError as e:
                log.error("cannot read {path}: {error}", path=str(self.path), error=e.strerror)
                self._stamp = None
            else:
                self._keys = _parse_authorized_keys(text, self.path)
        return self._keys

    def getAuthorizedKeys(self, username: bytes) -> list[Key]:
        if username not in self._usernames:
            return []
        return self.keys()


@implementer(ICredentialsChecker)
class AuthorizedKeyChecker:
    """Public-key checker that answers a signature-less probe only for authorized keys.

    (Conch's own ``SSHPublicKeyChecker`` answers "this key would do" to every
    probe, before looking the key up; the client then signs in vain.)
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, keydb: AuthorizedKeysFile) -> None:
        self._keydb = keydb

    # ISSHPrivateKey names its attributes (username, blob, signature...) only in its
    # docstring; Conch's userauth always passes the SSHPrivateKey class that has them.
    def requestAvatarId(self, credentials: SSHPrivateKey) -> defer.Deferred[AvatarId]:
        return defer.execute(self._check, credentials)

    def _check(self, credentials: SSHPrivateKey) -> AvatarId:
        try:
            offered = keys.Key.fromString(credentials.blob)
        except (keys.BadKeyError, ValueError):
            raise cred_error.UnauthorizedLogin("unusable key") from None
        if not any(key == offered for key in self._keydb.getAuthorizedKeys(credentials.username)):
            raise cred_error.UnauthorizedLogin("key not authorized")
        if not credentials.signature:
            raise conch_error.ValidPublicKey()
        try:
            good = offered.verify(credentials.signature, credentials.sigData)
        except Exception:  # any malformed signature is just a failed login
            good = False
        if not good:
            raise cred_error.UnauthorizedLogin("bad signature")
        return credentials.username


# ------------------------------------------------------------------ host key

def fingerprint(key: keys.Key) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    return "SHA256:" + key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("=")


def load_or_create_host_key(path: Path) -> keys.Key:
    """Load the SSH host key at ``path``; create an Ed25519 one (mode 0600) if absent.

    A missing parent directory is created with mode 0700.  Creation is atomic:
    a concurrent or interrupted start never leaves a half-written key behind.
    """
    path = Path(path)
    if not path.exists():
        _write_new_key(path)
    try:
        key = keys.Key.fromFile(str(path))
    except keys.EncryptedKeyError:
        raise ConfigError("manhole.host_key",
                          f"{path} is passphrase-protected; the manhole needs an unencrypted key") from None
    except (keys.BadKeyError, ValueError) as e:
        raise ConfigError("manhole.host_key", f"{path} is not a usable SSH private key: {e}") from None
    except OSError as e:
        raise ConfigError("manhole.host_key", f"cannot read {path}: {e.strerror}") from None
    if key.isPublic():
        raise ConfigError("manhole.host_key", f"{path} holds a public key, not a private key")
    if path.stat().st_mode & 0o077:
        log.warn("host key {path} is readable by group or others (chmod 600 it)", path=str(path))
    return key


def _write_new_key(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("manhole.host_key", f"cannot create {path.parent}: {e.strerror}") from None
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process just wrote
        except FileExistsError:
            return
    except OSError as e:
        raise ConfigError("manhole.host_key", f"cannot write {path}: {e.strerror}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    key = keys.Key.fromString(pem)
    log.info("generated manhole host key {path} ({fingerprint})",
             path=str(path), fingerprint=fingerprint(key))


# --------------------------------------------------------------- SSH plumbing

def _printable(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text if text.isprintable() else repr(text)


class _UserAuthServer(userauth.SSHUserAuthServer):
    """Logs every password/public-key attempt with user and source address."""

    loginTimeout = 120  # like OpenSSH's LoginGraceTime (Conch's default: 10 hours)
    attemptsBeforeDisconnect = 6  # like OpenSSH's MaxAuthTries

    def _server(self) -> _ServerTransport:
        # Conch sets .transport before the service starts; _Factory makes only these.
        assert isinstance(self.transport, _ServerTransport)
        return self.transport

    def serviceStarted(self) -> None:
        self.clock = self._server().factory.reactor
        super().serviceStarted()

    def _peer(self) -> str:
        return self._server().peer()

    def tryAuth(self, kind: bytes, user: bytes, data: bytes) -> defer.Deferred:
        d = super().tryAuth(kind, user, data)
        if kind in (b"password", b"publickey"):
            d.addCallbacks(self._logSuccess, self._logFailure,
                           callbackArgs=(kind, user, data), errbackArgs=(kind, user))
        return d

    def _logSuccess(self, result: Any, kind: bytes, user: bytes, data: bytes) -> Any:
        detail = ""
        if kind == b"publickey":
            try:
                detail = " key " + fingerprint(keys.Key.fromString(getNS(data[1:], 2)[1]))
            except Exception:
                pass
        self._server().manhole_user = _printable(user)
        log.info("manhole login: user {user} from {peer} by {method}{detail}",
                 user=_printable(user), peer=self._peer(), method=kind.decode(), detail=detail)
        return result

    def _logFailure(self, reason: failure.Failure, kind: bytes, user: bytes) -> failure.Failure:
        if not reason.check(conch_error.IgnoreAuthentication):  # a key probe answered PK_OK
            log.warn("manhole login failed: user {user} from {peer} by {method}",
                     user=_printable(user), peer=self._peer(), method=kind.decode())
        return reason


class _ServerTransport(transport.SSHServerTransport):
    factory: _Factory  # only _Factory builds these
    manhole_user: str | None = None  # set once logged in

    def peer(self) -> str:
        """The client's ``host:port``, for the logs."""
        assert self.transport is not None  # set by makeConnection, before any of our calls
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: failure.Failure | None = None) -> None:
        self.factory.connections.discard(self)
        if self.manhole_user is not None:
            log.info("manhole logout: user {user} from {peer}", user=self.manhole_user,
                     peer=self.peer())
        super().connectionLost(reason)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # A client's ordinary goodbye is no error (Conch logs every one as such).
        if reasonCode == transport.DISCONNECT_BY_APPLICATION:
            self._log.debug("client disconnected: {description}", description=description)
        else:
            super().receiveError(reasonCode, description)


class _Factory(ConchFactory):
    protocol = _ServerTransport
    noisy = False  # ManholeService logs where it listens

    def __init__(self, portal: Portal, host_key: keys.Key, reactor: Any) -> None:
        super().__init__(portal)
        self.reactor = reactor
        # ConchFactory annotates both as dict[bytes, bytes], but SSHFactory and the
        # transport use Key objects (getPublicKeys/getPrivateKeys return Keys).
        # (Key.public() is unannotated, so only the second one is flagged.)
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.privateKeys = {host_key.sshType(): host_key}  # type: ignore[dict-item]
        self.primes = None  # fixed DH groups and curve25519/ECDH only
        self.services = {b"ssh-userauth": _UserAuthServer,
                         b"ssh-connection": connection.SSHConnection}
        self.connections: set[_ServerTransport] = set()


class _SessionManhole(ColoredManhole):
    """A manhole with its own variables over the daemon's live namespace."""

    # Twisted's Manhole starts it as None; ours is the session's dict from __init__ on.
    namespace: dict[str, Any]

    def __init__(self, shared: dict[str, Any]) -> None:
        super().__init__()
        self._shared = shared
        self._seen: dict[str, Any] = {}
        self.namespace = {}
        self._sync()

    def _sync(self) -> None:
        ns, seen = self.namespace, self._seen
        for name, value in list(self._shared.items()):
            # Take the daemon's value unless this session re-bound the name itself.
            if name not in ns or (name in seen and ns[name] is seen[name]):
                ns[name] = value
            seen[name] = value

    def lineReceived(self, line: Any) -> None:
        self._sync()
        super().lineReceived(line)


class _Session(TerminalSession):
    width, height = 80, 24  # when the client asked for no pty or gave no size
    _terminal: Any = None

    def getPty(self, term: bytes, windowSize: tuple[int, ...], attrs: Any) -> None:
        rows, cols = windowSize[:2]
        self.height, self.width = rows or 24, cols or 80

    @staticmethod
    def _closeWithStatus(proto: Any, status: int) -> Callable[[], None]:
        closed = False
        lose = proto.loseConnection

        def close() -> None:  # report an exit status to the client, then close
            nonlocal closed
            if not closed:
                closed = True
                try:
                    proto.session.conn.sendRequest(proto.session, b"exit-status",
                                                   struct.pack(">L", status))
                except Exception:
                    pass
                lose()

        return close

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        # `ssh host command`: say why not and exit 1 (Conch's own refusal logs a
        # critical traceback and leaves the client guessing).
        def refuse() -> None:
            proto.write(b"narsuite manhole: commands are not supported; "
                        b"log in interactively (ssh -t)\r\n")
            self._closeWithStatus(proto, 1)()

        log.warn("manhole: refused to run a command ({command!r})",
                 command=cmd.decode("utf-8", "replace")[:200])
        proto.session.conn.transport.factory.reactor.callLater(0, refuse)

    def openShell(self, proto: Any) -> None:
        proto.loseConnection = self._closeWithStatus(proto, 0)  # ^D: a clean exit
        self._terminal = self.transportFactory(
            proto, self.chainedProtocolFactory(), IConchUser(self.original),
            self.width, self.height)

    def windowChanged(self, newWindowSize: tuple[int, ...]) -> None:
        rows, cols = newWindowSize[:2]
        self.height, self.width = rows or self.height, cols or self.width
        if self._terminal is not None:
            self._terminal.chainedProtocol.terminalProtocol.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        # End of the client's input (e.g. stdin of `ssh -tt` was a pipe): end the session.
        if self._terminal is not None:
            self._terminal.proto.loseConnection()


@implementer(IRealm)  # TerminalRealm is one (it has requestAvatar) but does not declare it
class _Realm(TerminalRealm):
    sessionFactory = _Session

    def __init__(self, namespace: dict[str, Any]) -> None:
        super().__init__()
        # Twisted types this as the ServerProtocol class; TerminalSession only calls it,
        # so any callable that returns a ServerProtocol does.
        def chained() -> insults.ServerProtocol:
            return insults.ServerProtocol(_SessionManhole, namespace)

        self.chainedProtocolFactory = chained  # type: ignore[assignment]


# ------------------------------------------------------------------- service

class ManholeService(service.Service):
    """Listens for manhole SSH sessions while running.

    After :meth:`startService`: ``port`` is the listening port
    (``port.getHost().port`` is the real port number when configured as 0),
    ``host_key`` the :class:`~twisted.conch.ssh.keys.Key` and
    ``fingerprint`` its ``SHA256:...`` fingerprint.
    """

    name = "manhole"

    def __init__(self, cfg: Any, host_key_path: Path, namespace: dict[str, Any],
                 reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        if not cfg.users and cfg.authorized_keys is None:
            raise ConfigError("manhole.enabled",
                              "the manhole has no credential source; set manhole.users "
                              "and/or manhole.authorized_keys")
        self.cfg = cfg
        self.host_key_path = Path(host_key_path)
        self.namespace = namespace
        self._reactor = reactor
        self.port: Any = None
        self.host_key: keys.Key | None = None
        self.fingerprint: str | None = None
        self.factory: _Factory | None = None
        checkers: list[ICredentialsChecker] = []
        self.authorized_keys: AuthorizedKeysFile | None = None
        if cfg.users:
            checkers.append(PasswordCredentialsChecker(cfg.users, reactor))
        if cfg.authorized_keys is not None:
            self.authorized_keys = AuthorizedKeysFile(cfg.authorized_keys,
                                                      [*cfg.users, KEY_USER])
            checkers.append(AuthorizedKeyChecker(self.authorized_keys))
        self.portal = Portal(_Realm(namespace), checkers)

    def startService(self) -> None:
        if self.authorized_keys is not None and not self.authorized_keys.path.exists():
            if not self.cfg.users:
                raise ConfigError("manhole.authorized_keys",
                                  f"{self.authorized_keys.path} does not exist and "
                                  "manhole.users is empty: nobody could log in")
        self.host_key = load_or_create_host_key(self.host_key_path)
        self.fingerprint = fingerprint(self.host_key)
        self.factory = _Factory(self.portal, self.host_key, self._reactor)
        self.port = self._reactor.listenTCP(self.cfg.port, self.factory,
                                            interface=self.cfg.listen)
        super().startService()
        host = self.port.getHost()
        methods = (["password"] if self.cfg.users else []) + (
            ["publickey"] if self.authorized_keys is not None else [])
        log.info("manhole listening on {host}:{port} ({methods}), host key {fingerprint}",
                 host=host.host, port=host.port, methods="+".join(methods),
                 fingerprint=self.fingerprint)

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        port, self.port = self.port, None
        if self.factory is not None:
            for conn in list(self.factory.connections):
                if conn.transport is not None:  # in the set only between connectionMade and -Lost
                    conn.transport.loseConnection()
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None


def make_manhole_service(cfg: Any, host_key_path: Path, namespace: dict[str, Any],
                         reactor: Any = None) -> ManholeService:
    """The manhole service for ``cfg`` (a :class:`narsuite.config.ManholeConfig`).

    ``host_key_path`` is usually ``Config.manhole_host_key``; ``namespace`` is
    kept by reference (names added later are visible in sessions).  Raises
    :class:`~narsuite.schema.ConfigError` when nobody could log in.
    """
    return ManholeService(cfg, host_key_path, namespace, reactor)
