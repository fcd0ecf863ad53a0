"""Libreswan 4.10's ``pluto`` in a lab namespace: a second independent IKE implementation.

Why: strongSwan is the lab's reference peer; Libreswan is the other one people run, and
its IKEv2 code shares nothing with strongSwan's.  It conflicts with strongSwan in apt, so
``scripts/setup.sh`` extracts its .deb into ``/opt/libreswan`` (``NARSUITE_LIBRESWAN``
overrides) and pluto runs from there, every path of it under ``workdir``: its config
(``ipsec.conf``, ``ipsec.secrets``), its NSS database, its control socket and its log.

The kernel here has no ESP (platform-facts.md): pluto completes IKE_SA_INIT and IKE_AUTH
and then fails to install the CHILD SA's kernel state, which is expected -- the lab checks
the IKE exchanges with it, not traffic.  Process lifetime as for :class:`Charon`: ``Host.popen``
(own process group, killed at lab teardown), :meth:`Pluto.stop` by PID.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from .netns import Host, LabError

__all__ = ["LIBRESWAN_ROOT", "Pluto", "libreswan_unavailable_reason"]

LIBRESWAN_ROOT = Path(os.environ.get("NARSUITE_LIBRESWAN", "/opt/libreswan"))


def _bin(root: Path, name: str) -> Path:
    return root / "usr" / "libexec" / "ipsec" / name


def libreswan_unavailable_reason(root: Path = LIBRESWAN_ROOT) -> str | None:
    """Why pluto cannot run here (None if it can)."""
    pluto = _bin(root, "pluto")
    if not pluto.exists():
        return f"Libreswan not extracted at {root} (scripts/setup.sh: apt-get download libreswan; dpkg-deb -x)"
    if not shutil.which("certutil"):
        return "certutil missing (apt-get install libnss3-tools): pluto needs an NSS database"
    out = subprocess.run(["ldd", str(pluto)], capture_output=True, text=True).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        return (f"pluto needs {', '.join(missing)} "
                "(scripts/setup.sh installs the lib* packages of the libreswan .deb's Depends)")
    return None


class Pluto:
    """One pluto in ``host``'s namespace, its files under ``workdir``."""

    def __init__(self, host: Host, workdir: str | os.PathLike, root: Path = LIBRESWAN_ROOT) -> None:
        self.host = host
        self.workdir = Path(workdir).resolve()
        self.root = root
        self.rundir = self.workdir / "run"
        self.nssdir = self.workdir / "nss"
        self.conf = self.workdir / "ipsec.conf"
        self.secrets = self.workdir / "ipsec.secrets"
        self.log_path = self.workdir / "pluto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def ctl(self) -> Path:
        return self.rundir / "pluto.ctl"

    def start(self, conf: str, secrets: str, timeout: float = 15.0) -> Pluto:
        for d in (self.workdir, self.rundir, self.nssdir):
            d.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(conf)
        if not (self.nssdir / "cert9.db").exists():  # pluto needs an NSS database; NSS's certutil makes it
            subprocess.run(["certutil", "-N", "-d", f"sql:{self.nssdir}", "--empty-password"], check=True,
                           capture_output=True)
        fd = os.open(self.secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets)
        argv = [str(_bin(self.root, "pluto")), "--nofork", "--stderrlog", "--config", str(self.conf),
                "--secretsfile", str(self.secrets), "--nssdir", str(self.nssdir), "--rundir", str(self.rundir),
                "--ipsecdir", str(self.workdir), "--dumpdir", str(self.rundir), "--logfile", str(self.log_path)]
        # pluto execs its helpers (addconn, _updown) from the compiled-in /usr/libexec/ipsec: in a
        # private mount namespace the extracted tree is bound there, the host's stays untouched
        script = f"mount --bind {shlex.quote(str(self.root / 'usr' / 'libexec'))} /usr/libexec && exec " + \
            " ".join(map(shlex.quote, argv))
        with open(self.log_path, "ab") as log:
            self.proc = self.host.popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ctl.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LabError(f"pluto on {self.host.name} did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def whack(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.host.run([str(_bin(self.root, "whack")), "--ctlsocket", str(self.ctl), *args], check=False,
                             timeout=timeout)

    def add(self, conn: str) -> subprocess.CompletedProcess:
        """Load ``conn`` from the config (``ipsec add``)."""
        return self.host.run([str(_bin(self.root, "addconn")), "--config", str(self.conf), "--ctlsocket",
                              str(self.ctl), conn], check=False, timeout=30)

    def initiate(self, conn: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """``whack --initiate``: returns when pluto has an answer (or gives up).  ``--listen``
        first: pluto's control socket exists before it has found its interfaces, and an
        initiate before that is refused ("need --listen before --initiate")."""
        self.whack("--listen", timeout=timeout)
        return self.whack("--name", conn, "--initiate", timeout=timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and (self.proc.poll() is None or self.proc in self.host._procs):
            self.host.stop(self.proc)
