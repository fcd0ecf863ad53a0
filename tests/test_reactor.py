"""narsuite.reactor: the opt-in lean epoll reactor (``twistd --reactor=narsuite-epoll``)."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from twisted.application.reactors import getReactorTypes
from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import globalLogPublisher

from narsuite import reactor as lean

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import socks_load  # noqa: E402


def test_twistd_knows_the_reactor_by_its_name() -> None:
    found = {r.shortName: r for r in getReactorTypes()}
    assert lean.NAME in found
    assert found[lean.NAME].moduleName == "narsuite.reactor"
    assert issubclass(lean.NarsuiteEPollReactor, EPollReactor)
    out = subprocess.run(["twistd", "--help-reactors"], capture_output=True, text=True, timeout=60)
    assert lean.NAME in out.stdout


def _failure(event: dict):
    """The failure an event carries: log_failure (twisted.logger) or failure (legacy log.err)."""
    return event.get("log_failure") or event.get("failure")


class _Boom(protocol.Protocol):
    lost: list = []

    def dataReceived(self, data: bytes) -> None:
        raise ZeroDivisionError("boom in dataReceived")

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


@pytest.mark.parametrize("cls", [EPollReactor, lean.NarsuiteEPollReactor], ids=["stock", "lean"])
def test_exception_in_dataReceived_is_logged_and_closes_the_connection(cls) -> None:
    """The same outcome under Twisted's epoll reactor and ours: one logged failure, the connection closed."""
    r = cls()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    _Boom.lost = []
    try:
        f = protocol.Factory.forProtocol(_Boom)
        port = r.listenTCP(0, f, interface="127.0.0.1").getHost().port
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        closed: list[bytes] = []

        def poke() -> None:
            c.sendall(b"hello")

        def check() -> None:
            c.settimeout(0.01)
            try:
                closed.append(c.recv(10))  # b"" once the server closed
            except (BlockingIOError, TimeoutError):
                r.callLater(0.02, check)
                return
            except ConnectionResetError:
                closed.append(b"")
            r.callLater(0.05, r.stop)

        r.callLater(0.05, poke)
        r.callLater(0.1, check)
        r.callLater(10, r.stop)  # bound the test
        r.run(installSignalHandlers=False)
        c.close()
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [f for f in map(_failure, events) if f is not None and f.check(ZeroDivisionError)]
    assert len(failures) == 1
    assert closed == [b""]
    assert len(_Boom.lost) == 1 and _Boom.lost[0].check(ZeroDivisionError)


def test_error_escaping_the_dispatch_is_logged_and_the_loop_goes_on() -> None:
    """A failure in connectionLost (after a failing dataReceived) is logged; other connections still work."""

    class BadLoss(_Boom):
        def connectionLost(self, reason) -> None:
            raise KeyError("boom in connectionLost")

    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    r = lean.NarsuiteEPollReactor()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    got: list[bytes] = []
    try:
        bad = r.listenTCP(0, protocol.Factory.forProtocol(BadLoss), interface="127.0.0.1").getHost().port
        good = r.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1").getHost().port
        c1 = socket.create_connection(("127.0.0.1", bad), timeout=5)
        c2 = socket.create_connection(("127.0.0.1", good), timeout=5)

        def first() -> None:
            c1.sendall(b"x")
            r.callLater(0.2, second)

        def second() -> None:
            c2.sendall(b"still alive")
            r.callLater(0.2, read)

        def read() -> None:
            c2.settimeout(0.5)
            got.append(c2.recv(100))
            r.stop()

        r.callLater(0.05, first)
        r.callLater(10, r.stop)
        r.run(installSignalHandlers=False)
        c1.close()
        c2.close()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert got == [b"still alive"]
    kinds = [f.type for f in map(_failure, events) if f is not None]
    assert ZeroDivisionError in kinds and KeyError in kinds


SERVER = textwrap.dedent("""
    import sys
    from narsuite import reactor as lean
    lean.install()
    from twisted.internet import protocol, reactor
    from narsuite import logs, schema
    from narsuite.metrics import Metrics
    from narsuite.nar.config import NarConfig
    from narsuite.nar.server import SocksFactory

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    class UdpEcho(protocol.DatagramProtocol):
        def datagramReceived(self, data, addr):
            self.transport.write(data, addr)

    logs.set_level("warn")
    config = schema.build(NarConfig, {"listen": "127.0.0.1", "port": 1080, "methods": ["none"],
                                      "rules": [{"action": "pass"}], "workers": 1}, "nar")
    socks = reactor.listenTCP(0, SocksFactory(config, None, Metrics(), reactor=reactor),
                              interface="127.0.0.1")
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    uecho = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1")
    print(type(reactor).__module__, type(reactor).__name__, socks.getHost().port,
          echo.getHost().port, uecho.getHost().port, flush=True)
    reactor.run()
""")


def test_socks_connect_udp_and_tcp_echo_under_the_lean_reactor(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline().split()
        assert line[:2] == ["narsuite.reactor", "NarsuiteEPollReactor"], proc.stderr.read()
        socks_port, echo_port, udp_port = (int(x) for x in line[2:])
        proxy = ("127.0.0.1", socks_port)

        # plain TCP echo, served by the lean reactor
        with socket.create_connection(("127.0.0.1", echo_port), timeout=5) as c:
            for i in range(20):
                c.sendall(b"ping %d" % i)
                assert c.recv(100) == b"ping %d" % i

        # SOCKS CONNECT through narsuite's server to that echo, several times
        for i in range(10):
            s = socks_load.socks_connect(proxy, ("127.0.0.1", echo_port))
            s.sendall(b"x" * 16 + bytes([i]))
            assert socks_load._recv_exact(s, 17) == b"x" * 16 + bytes([i])
            s.close()

        # UDP ASSOCIATE: datagrams through the relay to the UDP echo and back
        ctrl, u, relay = socks_load.udp_associate(proxy)
        u.settimeout(2)
        header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", udp_port)
        for i in range(20):
            body = struct.pack("!Q", i) + b"u" * 24
            u.sendto(header + body, relay)
            data, _ = u.recvfrom(2048)
            assert data == header + body
        u.close()
        ctrl.close()
        time.sleep(0.1)
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "Traceback" not in err, err


@pytest.mark.parametrize("args, daemon, want", [
    (["--reactor=narsuite-epoll"], "", "narsuite.reactor.NarsuiteEPollReactor"),
    # issue 12: what `twistd -n narsuite` runs by default is what the benchmarks measure
    ([], "", "narsuite.reactor.NarsuiteEPollReactor"),
    ([], 'reactor = "twisted"', "twisted.internet.epollreactor.EPollReactor"),
    (["--reactor=poll"], "", "twisted.internet.pollreactor.PollReactor"),  # twistd's choice wins
], ids=["opt-in", "default", "config-twisted", "twistd-option"])
def test_twistd_runs_narsuite_under_the_lean_reactor(tmp_path: Path, args, daemon, want) -> None:
    f = tmp_path / "narsuite.toml"
    f.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{tmp_path}/state"
        runtime_dir = "{tmp_path}/run"
        {daemon}
        [store]
        backend = "memory"
        [metrics]
        enabled = false
        """))
    sock = tmp_path / "run" / "control.sock"
    proc = subprocess.Popen(["twistd", *args, "-n", "--pidfile=", "narsuite",
                             "--config", str(f)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        out = subprocess.run(["narctl", "--socket", str(sock), "status"], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"reactor class: {want}" in output, output
    assert "Server Shut Down." in output


def test_raw_descriptors_get_their_event_masks_and_a_failing_handler_is_logged() -> None:
    """add_fd: a handler per descriptor gets the epoll mask (readable, then writable after
    modify_fd); an exception in one handler is logged and the loop goes on; remove_fd stops
    the events; forget_fd before close leaves nothing registered; selectables still work."""
    import select

    r = lean.NarsuiteEPollReactor()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    a.setblocking(False)
    seen: list[int] = []
    boom: list[int] = []

    def on_a(mask: int) -> None:
        seen.append(mask)
        if len(seen) == 1:
            assert mask == select.EPOLLIN
            a.recv(10)
            r.modify_fd(a.fileno(), select.EPOLLOUT)
        else:
            assert mask & select.EPOLLOUT
            r.remove_fd(a.fileno())
            r.callLater(0.1, r.stop)

    def on_c(mask: int) -> None:
        boom.append(mask)
        r.forget_fd(c.fileno())
        c.close()
        raise RuntimeError("raw handler bug")

    try:
        r.add_fd(a.fileno(), on_a, select.EPOLLIN)
        r.add_fd(c.fileno(), on_c, select.EPOLLIN)
        b.sendall(b"x")
        d.sendall(b"y")
        r.callLater(10, r.stop)
        r.run(installSignalHandlers=False)
    finally:
        globalLogPublisher.removeObserver(events.append)
        for s in (a, b, d):
            s.close()
    assert len(seen) == 2 and len(boom) == 1  # no event after remove_fd / forget_fd + close
    assert not r._raw
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1 and "raw handler bug" in str(failures[0]["log_failure"].value)
