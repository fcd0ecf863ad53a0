"""The manhole: real SSH logins (OpenSSH client) into a manhole run by a real reactor.

The server runs in a subprocess (``_SERVER``) so the test process never needs
a reactor; the OpenSSH ``ssh`` client logs in over loopback TCP, types a
Python line into the manhole and reads the live values back.  Passwords reach
``ssh`` through ``SSH_ASKPASS`` with ``SSH_ASKPASS_REQUIRE=force`` (OpenSSH >=
8.4), so no ``sshpass`` and no terminal are needed.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest

from narsuite.config import ManholeConfig
from narsuite.lab.pytest_plugin import need_tools
from narsuite.schema import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _openssh_client() -> None:
    need_tools("ssh", "ssh-keygen")  # the OpenSSH client logs in for real


PASSWORD = "correct horse battery staple"
# Computed once per session at a low cost (the server checks any cost).
_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()

# The daemon side: builds the service from a real ManholeConfig with a live
# namespace, adds a name after the service was made and changes the store once
# the reactor runs, then reports where it listens as one JSON line on stdout.
_SERVER = r"""
import json, sys
from pathlib import Path
from types import MappingProxyType
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from narsuite.config import ManholeConfig
from narsuite.manhole import make_manhole_service

args = json.loads(sys.argv[1])
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
cfg = ManholeConfig(
    enabled=True, listen="127.0.0.1", port=0,
    authorized_keys=Path(args["authorized_keys"]) if args["authorized_keys"] else None,
    users=MappingProxyType(args["users"]),
)
store = {"a": 1, "b": 2}
namespace = {"store": store, "reactor": reactor}
svc = make_manhole_service(cfg, Path(args["host_key"]), namespace, reactor=reactor)
namespace["late"] = "added-" + "later"        # after the service was built
reactor.callLater(0, store.__setitem__, "c", 3)  # while the reactor runs

def tick():  # re-binds a name of the namespace dict 20 times a second
    namespace["tick"] = namespace.get("tick", 0) + 1

from twisted.internet.task import LoopingCall
LoopingCall(tick).start(0.05)
svc.startService()
host = svc.port.getHost()
print(json.dumps({"host": host.host, "port": host.port, "fingerprint": svc.fingerprint}),
      flush=True)
reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
reactor.run()
"""

# What the test types: the echo of this line (coloured, with the "+") can
# never match the printed result below.
_COMMAND = b'print("LIVE" + "VALUE", sorted(store), late)\r'
_EXPECTED = b"LIVEVALUE ['a', 'b', 'c'] added-later"


class Server:
    def __init__(self, tmp: Path, *, users: dict[str, str], authorized_keys: Path | None,
                 host_key: Path) -> None:
        self.log_path = tmp / f"server-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        args = {"users": users, "host_key": str(host_key),
                "authorized_keys": str(authorized_keys) if authorized_keys else None}
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _SERVER, json.dumps(args)],
            stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=tmp, start_new_session=True)
        try:
            line = self._readline(timeout=15)
            self.info = json.loads(line)
        except BaseException:
            self.stop()
            raise
        self.port: int = self.info["port"]

    def _readline(self, timeout: float) -> bytes:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                raise AssertionError(f"the manhole server did not start:\n{self.log()}")
        finally:
            sel.close()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the manhole server exited:\n{self.log()}")
        return line

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # by PID: the Popen object of the process we started
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()
        self._log.close()


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)],
                   check=True, timeout=10)
    return path


def ssh(port: int, user: str, *options: str, stdin: bytes = _COMMAND + b"\x04",
        env: dict[str, str] | None = None,
        known_hosts: str = "/dev/null", strict: str = "no") -> subprocess.CompletedProcess:
    cmd = ["ssh", "-F", "/dev/null", "-tt", "-p", str(port),
           "-o", f"StrictHostKeyChecking={strict}", "-o", f"UserKnownHostsFile={known_hosts}",
           "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentityAgent=none",
           "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
           *options, f"{user}@127.0.0.1"]
    # subprocess.run kills its own child (by PID) if the timeout expires.
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=20,
                          env=env if env is not None else dict(os.environ),
                          start_new_session=True)


def interactive_key_login(port: int, user: str, key: Path, lines: list[bytes],
                          gap: float = 0.0, timeout: float = 15.0) -> bytes:
    """Type each line once the previous one was answered (next prompt seen), ``gap``
    seconds apart; return everything the session printed."""
    import selectors

    cmd = ["ssh", "-F", "/dev/null", "-tt", "-p", str(port), "-i", str(key),
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentityAgent=none",
           "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
           "-o", "PreferredAuthentications=publickey", f"{user}@127.0.0.1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    out = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        for number, line in enumerate(lines):
            if number:
                time.sleep(gap)
            proc.stdin.write(line)
            proc.stdin.flush()
            seen = len(out)
            while b"\r\n>>> " not in out[seen:]:  # the line ran, the next prompt is out
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"no answer to {line!r}: {out!r}")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"ssh ended before answering {line!r}: {out!r}")
                out += chunk
        proc.stdin.write(b"\x04")
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
        return out
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()  # by PID: our own ssh process
            proc.wait(5)
        proc.stdout.close()


def key_login(port: int, user: str, key: Path, *options: str, **kw) -> subprocess.CompletedProcess:
    return ssh(port, user, "-i", str(key), "-o", "PreferredAuthentications=publickey",
               "-o", "PasswordAuthentication=no", "-o", "BatchMode=yes", *options, **kw)


def password_login(port: int, user: str, password: str, tmp: Path) -> subprocess.CompletedProcess:
    askpass = tmp / f"askpass-{time.monotonic_ns()}"
    askpass.write_text(f"#!/bin/sh\nprintf '%s\\n' {json.dumps(password)}\n")
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force",
               DISPLAY=os.environ.get("DISPLAY", ":0"))
    return ssh(port, user, "-o", "PreferredAuthentications=password",
               "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1", env=env)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manhole")
    good = keygen(tmp / "id_good")
    bad = keygen(tmp / "id_bad")
    auth = tmp / "authorized_keys"
    auth.write_text("# comment\n" + (tmp / "id_good.pub").read_text())
    auth.chmod(0o600)
    host_key = tmp / "state" / "manhole_host_key"
    server = Server(tmp, users={"alice": _HASH}, authorized_keys=auth, host_key=host_key)
    try:
        yield {"tmp": tmp, "good": good, "bad": bad, "auth": auth, "host_key": host_key,
               "server": server}
    finally:
        server.stop()


def _wait_for_log(server: Server, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = server.log()
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


# ------------------------------------------------------------- SSH end to end

def test_public_key_login_sees_live_namespace(world):
    server = world["server"]
    r = key_login(server.port, "narsuite", world["good"])
    assert _EXPECTED in r.stdout, (r.stdout, r.stderr, server.log())
    assert r.returncode == 0, (r.returncode, r.stderr)
    log = _wait_for_log(server, "manhole login: user narsuite")
    assert "manhole login: user narsuite from 127.0.0.1:" in log
    assert "by publickey key SHA256:" in log


def test_session_sees_names_rebound_while_it_is_open(world):
    # `tick` is re-bound in the daemon's dict every 50 ms; a copy of the
    # namespace taken when the session opened would keep its first value.
    out = interactive_key_login(world["server"].port, "narsuite", world["good"], [
        b'first = tick; print("FIR" + "ST", first)\r',
        b'print("ADV" + "ANCED", tick > first)\r',
    ], gap=0.3)
    assert b"ADVANCED True" in out, out


def test_commands_are_refused_politely(world):
    cmd = ["ssh", "-F", "/dev/null", "-T", "-p", str(world["server"].port),
           "-i", str(world["good"]), "-o", "StrictHostKeyChecking=no",
           "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentityAgent=none",
           "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
           "narsuite@127.0.0.1", "id"]
    r = subprocess.run(cmd, capture_output=True, timeout=20, stdin=subprocess.DEVNULL,
                       start_new_session=True)
    assert r.returncode == 1
    assert b"commands are not supported" in r.stdout


def test_public_key_may_log_in_as_a_configured_user(world):
    r = key_login(world["server"].port, "alice", world["good"])
    assert _EXPECTED in r.stdout, (r.stdout, r.stderr)


def test_password_login_sees_live_namespace(world, tmp_path):
    server = world["server"]
    r = password_login(server.port, "alice", PASSWORD, tmp_path)
    assert _EXPECTED in r.stdout, (r.stdout, r.stderr, server.log())
    assert r.returncode == 0
    log = _wait_for_log(server, "manhole login: user alice")
    assert "manhole login: user alice from 127.0.0.1:" in log
    assert "by password" in log


def test_wrong_password_is_refused_and_logged(world, tmp_path):
    server = world["server"]
    r = password_login(server.port, "alice", PASSWORD + "!", tmp_path)
    assert r.returncode == 255
    assert b"Permission denied" in r.stderr
    assert _EXPECTED not in r.stdout
    log = _wait_for_log(server, "manhole login failed: user alice")
    assert "#warn] manhole login failed: user alice from 127.0.0.1:" in log


def test_unknown_user_with_a_password_is_refused(world, tmp_path):
    r = password_login(world["server"].port, "mallory", PASSWORD, tmp_path)
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    assert _EXPECTED not in r.stdout


def test_unknown_key_is_refused(world):
    server = world["server"]
    r = key_login(server.port, "narsuite", world["bad"])
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    assert _EXPECTED not in r.stdout
    assert "manhole login failed: user narsuite" in _wait_for_log(
        server, "manhole login failed: user narsuite")


def test_authorized_key_is_refused_for_other_user_names(world):
    r = key_login(world["server"].port, "root", world["good"])
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    assert _EXPECTED not in r.stdout


def test_listens_on_127_0_0_1_only(world):
    port = world["server"].port
    assert world["server"].info["host"] == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.recv(64).startswith(b"SSH-2.0-")
    # 127.0.0.2 is loopback too, but the manhole is bound to 127.0.0.1 only.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                listening.append(local.rsplit(":", 1)[0])
    assert listening == ["0100007F"]  # 127.0.0.1, little-endian


def test_host_key_is_private_and_reused_on_restart(world):
    tmp, host_key, server = world["tmp"], world["host_key"], world["server"]
    assert stat.S_IMODE(host_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(host_key.parent.stat().st_mode) == 0o700
    # The fingerprint the service reports is the file's, as OpenSSH computes it.
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(host_key)], capture_output=True,
                         check=True, timeout=10).stdout.decode()
    assert out.split()[1] == server.info["fingerprint"]
    # Pin the key of the first start under an alias...
    known = tmp / "known_hosts"
    alias = ("-o", "HostKeyAlias=narsuite-manhole")
    r = key_login(server.port, "narsuite", world["good"], *alias, known_hosts=str(known),
                  strict="accept-new")
    assert _EXPECTED in r.stdout and known.read_text().strip()
    # ...then a second start with the same path must present the same key.
    again = Server(tmp, users={}, authorized_keys=world["auth"], host_key=host_key)
    try:
        assert again.info["fingerprint"] == server.info["fingerprint"]
        r = key_login(again.port, "narsuite", world["good"], *alias, known_hosts=str(known),
                      strict="yes")
        assert _EXPECTED in r.stdout, r.stderr
    finally:
        again.stop()


# ---------------------------------------------------------------- in process

def test_host_key_generation(tmp_path):
    from narsuite.manhole import fingerprint, load_or_create_host_key

    path = tmp_path / "new" / "dir" / "hk"
    old = os.umask(0)  # even a permissive umask must not widen the modes
    try:
        first = load_or_create_host_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not first.isPublic() and first.sshType() == b"ssh-ed25519"
    assert [p.name for p in path.parent.iterdir()] == ["hk"]  # no temp file left behind
    second = load_or_create_host_key(path)
    assert fingerprint(second) == fingerprint(first)


def test_unusable_host_key_is_a_clear_error(tmp_path):
    from narsuite.manhole import load_or_create_host_key

    path = tmp_path / "hk"
    path.write_text("not a key\n")
    with pytest.raises(ConfigError, match="manhole.host_key"):
        load_or_create_host_key(path)


def test_refuses_without_credentials(tmp_path):
    from narsuite.manhole import make_manhole_service

    with pytest.raises(ConfigError, match="credential"):
        make_manhole_service(ManholeConfig(enabled=True), tmp_path / "hk", {})
    # Keys only, but the file does not exist: nobody could log in.
    cfg = ManholeConfig(enabled=True, port=0, authorized_keys=tmp_path / "missing")
    svc = make_manhole_service(cfg, tmp_path / "hk", {})
    with pytest.raises(ConfigError, match="does not exist"):
        svc.startService()
    assert svc.port is None and not svc.running


def test_hash_password():
    from narsuite.manhole import hash_password

    hashed = hash_password("s3cret")
    assert hashed.startswith("$2b$12$")
    assert bcrypt.checkpw(b"s3cret", hashed.encode())
    assert not bcrypt.checkpw(b"s3cret!", hashed.encode())
    for bad in ("", "x" * 73):
        with pytest.raises(ValueError):
            hash_password(bad)


def _sync_checker(users):
    """The manhole's checker with the slow verification run inline (no thread pool)."""
    from twisted.internet import defer

    from narsuite import manhole

    return manhole.PasswordCredentialsChecker(users, run=lambda f, *a: defer.maybeDeferred(f, *a))


def _login(checker, user: bytes, password: bytes):
    from twisted.cred.credentials import UsernamePassword

    got = []
    checker.requestAvatarId(UsernamePassword(user, password)).addBoth(got.append)
    assert len(got) == 1
    return got[0]


def test_password_checker_costs_a_hash_for_unknown_users(monkeypatch):
    from twisted.cred.error import UnauthorizedLogin

    from narsuite import passwords

    checker = _sync_checker({"alice": _HASH})
    assert _login(checker, b"alice", PASSWORD.encode()) == b"alice"
    assert _login(checker, b"alice", b"wrong").check(UnauthorizedLogin)
    calls = []
    real = passwords.bcrypt.checkpw
    monkeypatch.setattr(passwords.bcrypt, "checkpw", lambda p, h: calls.append(h) or real(p, h))
    assert _login(checker, b"mallory", PASSWORD.encode()).check(UnauthorizedLogin)
    assert len(calls) == 1 and calls[0].startswith(b"$2b$04$")  # same cost as alice's
    # bcrypt's 72-byte limit: refused without calling bcrypt, no error.
    assert _login(checker, b"alice", b"x" * 100).check(UnauthorizedLogin)
    assert len(calls) == 1
    # Even if the dummy hash matched, an unknown user stays unknown.
    monkeypatch.setattr(passwords.bcrypt, "checkpw", lambda p, h: True)
    assert _login(checker, b"mallory", b"anything").check(UnauthorizedLogin)


def test_password_checker_is_the_shared_one_and_takes_scrypt():
    """The manhole checks passwords with narsuite.passwords (as nar and XAUTH do), so the
    hashes those roles take, scrypt included, log in here too."""
    from narsuite import passwords

    hashed = passwords.hash_password("wonderland", "scrypt", cost=4)
    checker = _sync_checker({"alice": hashed})
    assert isinstance(checker.checker, passwords.PasswordChecker)
    assert _login(checker, b"alice", b"wonderland") == b"alice"
    assert _login(checker, b"alice", b"wonderland") == b"alice"
    assert checker.checker.stats == {"verifications": 1, "cache_hits": 1, "failures": 0}


def test_authorized_keys_file(tmp_path):
    from narsuite.manhole import AuthorizedKeysFile

    one = (keygen(tmp_path / "one").with_suffix(".pub")).read_text()
    two = (keygen(tmp_path / "two").with_suffix(".pub")).read_text()
    path = tmp_path / "authorized_keys"
    path.write_text(f"# c\n\n{one}from=\"10.0.0.1\" {two}garbage line\n")
    path.chmod(0o600)
    db = AuthorizedKeysFile(path, ["alice", "narsuite"])
    got = db.getAuthorizedKeys(b"narsuite")
    assert [k.toString("openssh").decode() for k in got] == [" ".join(one.split()[:2])]
    assert db.getAuthorizedKeys(b"root") == []
    path.chmod(0o666)  # writable by others: refused as a whole
    assert db.getAuthorizedKeys(b"alice") == []


def test_public_key_checker_verifies_the_signature(tmp_path):
    from twisted.conch.error import ValidPublicKey
    from twisted.conch.ssh.keys import Key
    from twisted.cred.credentials import SSHPrivateKey
    from twisted.cred.error import UnauthorizedLogin

    from narsuite.manhole import AuthorizedKeyChecker, AuthorizedKeysFile

    good = Key.fromFile(str(keygen(tmp_path / "good")))
    other = Key.fromFile(str(keygen(tmp_path / "other")))
    path = tmp_path / "authorized_keys"
    path.write_text(good.public().toString("openssh").decode() + "\n")
    path.chmod(0o600)
    checker = AuthorizedKeyChecker(AuthorizedKeysFile(path, ["narsuite"]))

    def outcome(user, key, data, signature):
        results = []
        checker.requestAvatarId(SSHPrivateKey(user, key.sshType(), key.public().blob(), data,
                                              signature)).addBoth(results.append)
        (result,) = results  # no reactor needed: the checker answers synchronously
        return result if isinstance(result, bytes) else result.type

    data = b"session id and request"
    assert outcome(b"narsuite", good, data, good.sign(data)) == b"narsuite"
    assert outcome(b"narsuite", good, None, None) is ValidPublicKey      # probe: "would do"
    assert outcome(b"narsuite", other, None, None) is UnauthorizedLogin  # probe: unknown key
    assert outcome(b"narsuite", good, data, other.sign(data)) is UnauthorizedLogin
    assert outcome(b"narsuite", good, data, good.sign(b"something else")) is UnauthorizedLogin
    assert outcome(b"narsuite", good, data, b"garbage") is UnauthorizedLogin
    assert outcome(b"root", good, data, good.sign(data)) is UnauthorizedLogin


def test_session_namespace_is_live_and_private():
    from narsuite.manhole import _SessionManhole

    store = {"a": 1}
    shared = {"store": store}
    session = _SessionManhole(shared)
    assert session.namespace["store"] is store
    shared["late"] = 42
    session.namespace["mine"] = 1        # as if the operator typed `mine = 1`
    session._sync()
    assert session.namespace["late"] == 42
    assert "mine" not in shared
    session.namespace["store"] = "rebound"
    shared["store"] = {"b": 2}
    session._sync()
    assert session.namespace["store"] == "rebound"  # the session's own binding wins
