"""``[nar] workers``: several SOCKS reactor processes on one port (narsuite/nar/workers.py).

The real twistd plugin runs the nar role with ``workers = 2`` on 127.0.0.1 (no
root needed: the raw-socket data plane is replaced by a stub in the runner
script, everything else is the role as shipped).  The test talks SOCKS with
blocking sockets and reads the daemon through its control socket (narctl's
``request``) and its Prometheus endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from narsuite.control.narctl import request
from narsuite.nar import socks, wire
from narsuite.nar.auth import hash_password
from narsuite.nar.config import NarConfig
from narsuite.nar.workers import ChannelCodec, config_to_json, worker_count
from narsuite.schema import ConfigError, build

ROOT = Path(__file__).resolve().parent.parent
YB = "192.0.2.10"

RUNNER = textwrap.dedent("""
    import sys
    from twisted.application import service
    import narsuite.nar.dataplane as dataplane

    class StubDataPlane(service.Service):
        # The raw sockets and nftables need root and a lab; the SOCKS side does not.
        def __init__(self, *args, **kwargs):
            pass

        def counters_dict(self):
            return {}

    dataplane.NarDataPlane = StubDataPlane
    from twisted.scripts.twistd import run
    sys.argv = ["twistd", "-n", "--pidfile=", "narsuite"] + sys.argv[1:]
    run()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


class Echo:
    """A threaded TCP echo on 127.0.0.1 (the CONNECT target)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    @staticmethod
    def _one(c: socket.socket) -> None:
        with c:
            while data := c.recv(65536):
                c.sendall(data)


def socks_connect_echo(port: int, echo: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(socks.encode_method_request([socks.METHOD_NONE]))
        assert _recv_exact(s, 2) == b"\x05\x00"
        s.sendall(socks.encode_request(socks.CMD_CONNECT, "127.0.0.1", echo))
        reply = _recv_exact(s, 10)
        assert reply[1] == 0, reply
        s.sendall(b"ping through a worker?")
        assert _recv_exact(s, 22) == b"ping through a worker?"


def nar_session(port: int, user: str, password: str, pipelined: bool) -> tuple[socket.socket, int]:
    """NAR-MODE towards YB plus one ICMP-ASSOCIATE; returns the open socket and the ICMP id."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    greet = socks.encode_method_request([socks.METHOD_PASSWORD])
    auth = socks.encode_password_request(user.encode(), password.encode())
    nar = socks.encode_request(0x80, YB, 0)
    icmp = wire.encode_icmp(1, 0)
    if pipelined:  # everything at once: the worker has unsent replies when it hands over
        s.sendall(greet + auth + nar + icmp)
        assert _recv_exact(s, 2) == b"\x05\x02"
        assert _recv_exact(s, 2) == b"\x01\x00"
    else:
        s.sendall(greet)
        assert _recv_exact(s, 2) == b"\x05\x02"
        s.sendall(auth)
        assert _recv_exact(s, 2) == b"\x01\x00"
        s.sendall(nar)
    reply = _recv_exact(s, 10)
    assert reply[1] == 0, reply
    if not pipelined:
        s.sendall(icmp)
    buf = b""
    while True:
        parsed = wire.parse_reply(buf, "icmp")
        if parsed is not None:
            break
        buf += s.recv(64)
    msg, _ = parsed
    assert msg.code == 0, msg
    return s, msg.icmp_id


class Daemon:
    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp = tmp
        self.port = port
        self.hash = hash_password("secret", "scrypt", cost=10)
        conf = tmp / "narsuite.toml"
        conf.write_text(textwrap.dedent(f"""
            [daemon]
            state_dir = "{tmp}/state"
            runtime_dir = "{tmp}/run"
            [metrics]
            port = 0
            [log]
            level = "warn"
            [nar]
            listen = "127.0.0.1"
            port = {port}
            workers = 2
            methods = ["none", "password"]
            negotiation_timeout = 20.0
            [nar.users]
            alice = "{self.hash}"
            [[nar.rules]]
            action = "pass"
            [nar.nar]
            enabled = true
            lent_address = "192.0.2.1"
            """))
        (tmp / "runner.py").write_text(RUNNER)
        self.sock = tmp / "run" / "control.sock"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(tmp / "daemon.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(tmp / "runner.py"), "--config", str(conf),
                                      "--role", "nar"], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=tmp, env=env)

    def output(self) -> str:
        return (self.tmp / "daemon.log").read_text()

    def ask(self, *argv: str) -> dict:
        answer = request(str(self.sock), list(argv))
        assert answer.get("ok"), answer
        return answer["result"]

    def stats(self) -> dict[str, int]:
        return {r["counter"]: r["value"] for r in self.ask("nar", "stats")["rows"]}

    def pids(self) -> dict[int, int]:
        """pid -> connections served, from `narctl nar stats`."""
        return {int(k.split(".")[2]): v for k, v in self.stats().items()
                if k.startswith("workers.pid.")}

    def wait(self, what, timeout: float = 20.0, every: float = 0.1):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                last = what()
                if last:
                    return last
            except (OSError, ConnectionError, KeyError, ValueError):
                pass
            time.sleep(every)
        raise AssertionError(f"timed out waiting; last {last!r}\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture
def daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, _free_port())
    try:
        d.wait(lambda: d.stats().get("workers.processes") == 2 and len(d.pids()) == 2)
        yield d
    finally:
        kids = _children(d.proc.pid)
        d.stop()
        # the role stops its workers with it
        for pid in kids:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                st = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
                if ") Z " in st:
                    break
                time.sleep(0.05)
            assert not Path(f"/proc/{pid}").exists() or ") Z " in Path(f"/proc/{pid}/stat").read_text(), \
                f"worker {pid} outlived the daemon"


def test_workers_serve_connect_and_counters_aggregate(daemon: Daemon) -> None:
    echo = Echo()
    n = 60
    for _ in range(n):
        socks_connect_echo(daemon.port, echo.port)
    main = daemon.proc.pid
    # every process's share reaches the main process; the total is exact
    per = daemon.wait(lambda: (p := daemon.pids()) and sum(p.values()) == n and p)
    assert main in per and len(per) == 2
    assert all(v > 0 for v in per.values()), f"one process served everything: {per}"
    (worker,) = set(per) - {main}
    assert worker in _children(main)
    stats = daemon.stats()
    assert stats["socks.connections"] == n and stats["socks.reply_succeeded"] == n
    status = daemon.ask("status")["fields"]
    mport = int(status["metrics"].rsplit(":", 1)[1])
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    assert f'narsuite_nar_events_total{{event="connections"}} {float(n)}' in body


def test_nar_mode_in_a_worker_is_completed_by_the_main_process(daemon: Daemon) -> None:
    conns = []
    try:
        for i in range(16):
            conns.append(nar_session(daemon.port, "alice", "secret", pipelined=bool(i % 2)))
        # the kernel spread them: some arrived in the worker and were handed over
        stats = daemon.wait(lambda: (s := daemon.stats()).get("socks.nar_handoffs_out", 0) > 0 and s)
        assert stats["workers.nar_handoffs"] == stats["socks.nar_handoffs_in"] \
            == stats["socks.nar_handoffs_out"] > 0
        assert stats["socks.nar_sessions"] == 16 and stats["socks.reply_succeeded"] == 16
        # every session lives in the main process's store, with its user and its mapping
        sessions = daemon.ask("nar", "sessions")["rows"]
        assert len(sessions) == 16 and {r["user"] for r in sessions} == {"alice"}
        mappings = daemon.ask("nar", "mappings")["rows"]
        assert len(mappings) == 16 and {m["kind"] for m in mappings} == {"icmp"}
        ids = sorted(int(m["tuple"].split()[1]) for m in mappings)
        assert ids == sorted(i for _, i in conns)
    finally:
        for s, _ in conns:
            s.close()
    daemon.wait(lambda: not daemon.ask("nar", "mappings")["rows"] and not daemon.ask("nar", "sessions")["rows"])


def test_a_killed_worker_is_restarted_and_its_counts_kept(daemon: Daemon) -> None:
    echo = Echo()
    main = daemon.proc.pid
    for _ in range(20):
        socks_connect_echo(daemon.port, echo.port)
    daemon.wait(lambda: daemon.stats()["socks.connections"] == 20)
    (old,) = set(daemon.pids()) - {main}
    os.kill(old, signal.SIGKILL)
    new = daemon.wait(lambda: (p := set(daemon.pids()) - {main, old}) and p)
    (new_pid,) = new
    assert new_pid in _children(main)
    stats = daemon.stats()
    assert stats["workers.restarts"] == 1 and stats["workers.processes"] == 2
    assert stats["socks.connections"] == 20  # the dead worker's last report is kept
    for _ in range(40):
        socks_connect_echo(daemon.port, echo.port)
    per = daemon.wait(lambda: (p := daemon.pids()) and daemon.stats()["socks.connections"] == 60 and p)
    assert per[new_pid] > 0, per


# ------------------------------------------------------------------ units

def test_workers_key_validated_and_cpu_count() -> None:
    assert build(NarConfig, {}, "nar").workers == 1
    assert build(NarConfig, {"workers": 0}, "nar").workers == 0
    with pytest.raises(ConfigError, match="nar.workers"):
        build(NarConfig, {"workers": -1}, "nar")
    assert worker_count(0) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


def test_config_round_trips_through_json() -> None:
    cfg = build(NarConfig, {"methods": ["password"], "users": {"bob": hash_password("pw", "scrypt", cost=10)},
                            "rules": [{"action": "pass", "clients": ["10.0.0.0/8"], "ports": ["80"]}],
                            "workers": 2, "nar": {"enabled": True, "lent_address": "192.0.2.1"}}, "nar")
    again = build(NarConfig, json.loads(json.dumps(config_to_json(cfg))), "nar")
    assert again == cfg


def test_channel_codec_frames_and_bounds() -> None:
    c = ChannelCodec()
    line = ChannelCodec.encode({"type": "hello", "pid": 7})
    assert c.feed(line[:5]) == [] and c.feed(line[5:] + line) == [{"type": "hello", "pid": 7}] * 2
    with pytest.raises(ValueError):
        ChannelCodec().feed(b"x" * (2 << 20))
    with pytest.raises(ValueError):
        ChannelCodec().feed(b"[1]\n")
