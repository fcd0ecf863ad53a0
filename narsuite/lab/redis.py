"""Real Redis servers and Sentinels for tests and benchmarks, started and stopped by their owner.

Debian's ``redis-server`` and ``redis-sentinel`` run as child processes of the test on loopback
(or inside a lab namespace through ``Host.popen``-style wrappers), each in its own private
directory, with persistence off unless asked.  They are killed by PID, never by name: several
engineers' test runs share the machine, and the kernel kills them if their owner dies
without stopping them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RedisServer", "RedisSentinel", "free_port", "redis_unavailable_reason"]


def redis_unavailable_reason() -> str | None:
    """Why Redis tests cannot run here (None: they can)."""
    for exe in ("redis-server", "redis-sentinel"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (scripts/setup.sh installs it)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ping(host: str, port: int, password: str | None = None, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if password is not None:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


#: A server outlives its owner only by mistake: a test run killed by a timeout or ``kill -9``
#: cannot run its teardown, and a server left on the host's loopback (no namespace for the
#: lab's sweep to find) would keep its port and CPU until someone notices.  util-linux's
#: ``setpriv`` (scripts/setup.sh installs it) sets the kernel's parent-death signal and execs
#: the server in the same process, so the kernel kills it when its owner dies.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


class _Process:
    exe = "redis-server"

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", directory: Path | None = None,
                 extra: Sequence[str] = (), prefix: Sequence[str] = ()) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix=f"narsuite-{self.exe}-"))
        self.extra = list(extra)
        #: a command prefix, e.g. ("ip", "netns", "exec", NAME) to run inside a lab namespace
        self.prefix = list(prefix)
        self.proc: subprocess.Popen | None = None
        self.password: str | None = None

    def args(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> _Process:
        log = open(self.dir / "log", "ab")
        self.proc = subprocess.Popen(self.prefix + _DIE_WITH_PARENT + self.args(), cwd=self.dir, stdout=log,
                                     stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.exe} on {self.port} exited: {self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"{self.exe} on {self.port} did not answer in {timeout}s: {self.log_tail()}")

    #: redis-cli options for TLS ([] without TLS) and an ACL user (None: the default user)
    cli_tls: list[str] = []
    username: str | None = None

    def _cli_base(self) -> list[str]:
        cmd = self.prefix + ["redis-cli", "-h", self.host, "-p", str(self.port), *self.cli_tls]
        if self.username is not None:
            cmd += ["--user", self.username]
        if self.password is not None:
            cmd += ["--no-auth-warning", "-a", self.password]
        return cmd

    def ready(self) -> bool:
        if self.prefix or self.cli_tls or self.username:  # ask with redis-cli (namespace, TLS, ACL)
            out = subprocess.run(self._cli_base() + ["ping"], capture_output=True, text=True, timeout=5)
            return out.stdout.strip() == "PONG"
        return _ping(self.host, self.port, self.password)

    def cli(self, *args: str) -> str:
        """``redis-cli`` against this server (from its namespace when it has one)."""
        cmd = self._cli_base()
        return subprocess.run(cmd + list(args), capture_output=True, timeout=10, check=True).stdout.decode(
            errors="replace")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.dir / "log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill (by default ``kill -9``) this process, by its PID."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def close(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> _Process:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer(_Process):
    """One redis-server: ``replicaof`` makes it a replica; ``password`` sets ``requirepass``."""

    exe = "redis-server"

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", *, replicaof: str | None = None,
                 password: str | None = None, appendonly: bool = False, acl_user: tuple[str, str] | None = None,
                 tls: tuple[str, str, str] | None = None, **kw) -> None:
        """``acl_user`` (name, password): the only user (default off); ``tls`` (cert, key, CA) files:
        TLS only, clients must present a certificate of that CA."""
        super().__init__(port, host, **kw)
        self.replicaof = replicaof
        self.password = password
        self.appendonly = appendonly
        self.acl_user = acl_user
        self.tls = tls
        if acl_user is not None:
            self.username, self.password = acl_user
        if tls is not None:
            cert, key, ca = tls
            self.cli_tls = ["--tls", "--cert", cert, "--key", key, "--cacert", ca]

    def args(self) -> list[str]:
        a = ["redis-server", "--bind", self.host, "--port", str(self.port), "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes" if self.appendonly else "no",
             "--protected-mode", "no", "--daemonize", "no", "--logfile", "",
             "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if self.password is not None and self.acl_user is None:
            a += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replicaof:
            host, port = self.replicaof.rsplit(":", 1)
            a += ["--replicaof", host, port]
        if self.acl_user is not None:
            user, pw = self.acl_user
            a += ["--user", user, "on", f">{pw}", "~*", "&*", "+@all", "--user", "default", "off"]
        if self.tls is not None:
            cert, key, ca = self.tls
            a[a.index("--port") + 1] = "0"
            a += ["--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                  "--tls-ca-cert-file", ca, "--tls-auth-clients", "yes"]
        return a + self.extra


class RedisSentinel(_Process):
    """One redis-sentinel watching ``primary`` as ``service`` (quorum ``quorum``)."""

    exe = "redis-sentinel"

    def __init__(self, primary: str, service: str = "narsuite", quorum: int = 2, port: int | None = None,
                 host: str = "127.0.0.1", *, down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 auth_pass: str | None = None, **kw) -> None:
        super().__init__(port, host, **kw)
        self.primary, self.service, self.quorum = primary, service, quorum
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.auth_pass = auth_pass

    def args(self) -> list[str]:
        host, port = self.primary.rsplit(":", 1)
        conf = self.dir / "sentinel.conf"
        lines = [
            f"bind {self.host}", f"port {self.port}", f"dir {self.dir}", "daemonize no", "logfile \"\"",
            "protected-mode no",
            f"sentinel monitor {self.service} {host} {port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.service} 1",
        ]
        if self.auth_pass is not None:
            lines.append(f"sentinel auth-pass {self.service} {self.auth_pass}")
        conf.write_text("\n".join(lines) + "\n")
        return ["redis-sentinel", str(conf)] + self.extra
