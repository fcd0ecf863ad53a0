"""A narsuite daemon running inside a lab host, driven the way an operator would.

``twistd -n narsuite`` is started in the host's namespace (the real plugin,
the real config file), waited for on its control socket, queried with the real
``narctl``, and stopped with SIGTERM — or SIGKILL, to test crash recovery.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["NarsuiteDaemon", "TWISTD"]

#: twistd by this interpreter (``python -m twisted`` is ``twist``, another runner).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class NarsuiteDaemon:
    def __init__(self, host: Any, config: Path, roles: str = "", socket: Path | None = None,
                 log: Path | None = None, runner: Path | None = None, reactor: str = "",
                 twistd_args: tuple[str, ...] = ()) -> None:
        self.host = host
        self.config = Path(config)
        self.roles = roles
        self.socket = socket or self.config.parent / "run" / "control.sock"
        self.log = log or self.config.parent / "daemon.log"
        #: A script standing in for twistd (e.g. one that registers a test role first).
        self.runner = runner
        #: twistd's --reactor (e.g. "narsuite-epoll"); "" for Twisted's default.
        self.reactor = reactor
        #: more twistd options (before the plugin name), e.g. ("--logfile", PATH)
        self.twistd_args = tuple(twistd_args)
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        reactor = [f"--reactor={self.reactor}"] if self.reactor else []
        head = [sys.executable, str(self.runner)] if self.runner else \
            [sys.executable, "-c", TWISTD, *reactor, *self.twistd_args, "--pidfile=", "-n", "narsuite"]
        args = ["--config", str(self.config)]
        if self.roles:
            args.append(f"--role={self.roles}")
        return head + args

    def start(self, timeout: float = 20.0) -> NarsuiteDaemon:
        out = open(self.log, "a")
        self.proc = self.host.popen(self.command(), stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            if self.narctl("status", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise AssertionError(f"daemon did not answer on {self.socket}:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def narctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.host.run(["narctl", "--socket", str(self.socket), *args], check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.narctl("--json", *args).stdout)

    def rows(self, *args: str) -> list[dict]:
        return self.json(*args)["rows"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:  # alive()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        assert "Server Shut Down." in self.log_text(), self.log_text()

    def kill9(self) -> None:
        # `ip netns exec` execs the command, so this PID is the daemon itself.
        assert self.proc is not None, "kill9() before start()"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
