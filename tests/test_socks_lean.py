"""narsuite.nar.lean, the role's default CONNECT relay, against real sockets on narsuite's reactor.

Each test runs the lean port on a fresh NarsuiteEPollReactor in a thread and talks to it
with blocking sockets (the lab tests in test_socks_lab.py drive it with curl, ncat,
nc.openbsd and PySocks): pipelining, back-pressure with and without splice(2), the three
time limits, the rules, hand-over to the Twisted protocol (password auth), max_connections,
a reset, and the coarse timers on their own.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from narsuite import reactor as lean_reactor
from narsuite.nar import socks
from narsuite.nar.auth import hash_password
from narsuite.nar.config import NarConfig, Rule
from narsuite.nar.lean import LeanSocksPort, _Deadlines
from narsuite.nar.server import RELAY_READ_SIZE, SocksFactory
from narsuite.nar.splice import PIPE_SIZE


class Server:
    """The lean port on its own reactor thread."""

    def __init__(self, **cfg) -> None:
        cfg.setdefault("rules", [Rule(action="pass")])
        self.config = NarConfig(listen="127.0.0.1", **cfg)
        self.reactor = lean_reactor.NarsuiteEPollReactor()
        self.factory = SocksFactory(self.config, reactor=self.reactor)
        self.lp = LeanSocksPort(self.reactor, self.factory, "127.0.0.1", 0)
        self.lp.startListening()
        self.port = self.lp.getHost().port
        self.thread = threading.Thread(target=self.reactor.run, kwargs={"installSignalHandlers": False},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.reactor.callFromThread(self.lp.stopListening, True)
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(10)

    def settle(self, seconds: float = 5.0) -> None:
        deadline = time.monotonic() + seconds
        while self.factory.active and time.monotonic() < deadline:
            time.sleep(0.01)

    @property
    def counters(self) -> dict[str, int]:
        return self.factory.counters


@pytest.fixture
def target():
    t = socket.socket()
    t.bind(("127.0.0.1", 0))
    t.listen(8)
    yield t
    t.close()


def _connect_request(port: int) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big")


def _client(server: Server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            break
        out += b
    return out


def _relayed(server: Server, target: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A client through ``server`` to ``target``: greeting, CONNECT, SUCCEEDED; returns the
    client's socket and the target's side of the relayed connection."""
    s = _client(server)
    s.sendall(b"\x05\x01\x00" + _connect_request(target.getsockname()[1]))
    assert _recv_exact(s, 12)[3] == socks.SUCCEEDED
    conn, _ = target.accept()
    return s, conn


def test_pipelined_greeting_request_and_data_in_one_write(target):
    """A client that does not wait for the replies: its early bytes reach the target after the relay starts."""
    srv = Server()
    try:
        s = _client(srv)
        s.sendall(b"\x05\x01\x00" + _connect_request(target.getsockname()[1]) + b"early bytes")
        conn, _ = target.accept()
        conn.settimeout(5)
        assert _recv_exact(conn, 11) == b"early bytes"
        assert _recv_exact(s, 2) == b"\x05\x00" and _recv_exact(s, 10)[1] == socks.SUCCEEDED
        conn.sendall(b"answer")
        assert _recv_exact(s, 6) == b"answer"
        s.shutdown(socket.SHUT_WR)  # half-close: the target sees EOF, the way back stays open
        assert conn.recv(10) == b""
        conn.sendall(b"late")
        assert _recv_exact(s, 4) == b"late"
        conn.close()
        assert s.recv(10) == b""
        s.close()
        srv.settle()
    finally:
        srv.stop()
    c = srv.counters
    assert c["bytes_up"] == 11 and c["bytes_down"] == 10 and srv.factory.active == 0
    assert "lean_handovers" not in c


def _kernel_buffering() -> int:
    """The most the kernel can hold between a client's ``send`` and a target that does not
    read, through the relay: the client's send buffer, the server's receive buffer on the
    client socket, its pipe (splice) and one read, its send buffer towards the target and the
    target's (small, set by the test) receive buffer.  The TCP buffers autotune up to the
    ``tcp_rmem``/``tcp_wmem`` maxima (32 MiB of receive buffer on this machine kind), so a
    fixed amount of data cannot tell a stalled relay from a deep kernel queue."""
    rmem = int(open("/proc/sys/net/ipv4/tcp_rmem").read().split()[2])
    wmem = int(open("/proc/sys/net/ipv4/tcp_wmem").read().split()[2])
    return wmem + rmem + PIPE_SIZE + RELAY_READ_SIZE + wmem + 2 * 64 * 1024


@pytest.mark.parametrize("splice", [False, True])
def test_back_pressure_holds_the_sender_and_loses_nothing(target, splice):
    """A target that does not read: the server stops reading the client (it holds at most one
    read) and stops polling it, the client's sendall stalls with no more in flight than the
    kernel's buffers hold; once the target reads, every byte arrives in order."""
    srv = Server(splice=splice)
    bound = _kernel_buffering()
    data = os.urandom(bound + 8 * 1024 * 1024)
    try:
        s, conn = _relayed(srv, target)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sent = [0]

        def send():
            view = memoryview(data)
            while view:
                n = s.send(view[:65536])
                sent[0] += n
                view = view[n:]
            s.shutdown(socket.SHUT_WR)

        s.settimeout(30)
        sender = threading.Thread(target=send)
        sender.start()
        # the buffers fill (autotuning grows them as they do), then nothing moves
        deadline, last = time.monotonic() + 10, -1
        while sent[0] != last and time.monotonic() < deadline:
            last = sent[0]
            time.sleep(0.3)
        cpu0 = time.process_time()
        time.sleep(1.0)
        stalled_cpu = time.process_time() - cpu0
        held = sent[0]
        assert held == last and sender.is_alive(), (held, last)  # stalled
        assert held <= bound, (held, bound)  # the server does not buffer without bound
        # ... and waits meanwhile: the stalled sockets are not polled in a busy loop
        assert stalled_cpu < 0.3, stalled_cpu
        conn.settimeout(30)
        got = hashlib.sha256()
        total = 0
        while True:
            b = conn.recv(1 << 20)
            if not b:
                break
            got.update(b)
            total += len(b)
        sender.join(30)
        assert total == len(data) and got.digest() == hashlib.sha256(data).digest()
        conn.close()
        assert s.recv(10) == b""
        s.close()
        srv.settle()
    finally:
        srv.stop()
    assert srv.counters["bytes_up"] == len(data)
    assert srv.counters.get("relays_spliced", 0) == (1 if splice else 0)
    assert srv.factory.active == 0


def test_negotiation_timeout(target):
    srv = Server(negotiation_timeout=0.2)
    try:
        s = _client(srv)
        t0 = time.monotonic()
        assert s.recv(10) == b""  # closed, nothing said
        assert 0.15 < time.monotonic() - t0 < 2.0
        s.close()
        srv.settle()
    finally:
        srv.stop()
    assert srv.counters["timeouts_negotiation"] == 1 and srv.factory.active == 0


def test_connect_timeout_answers_ttl_expired():
    """A destination that never answers the SYN (a listener whose accept queue is full)."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    srv = Server(connect_timeout=0.3)
    try:
        for _ in range(4):  # fill the accept queue; further SYNs are dropped
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(full.getsockname())
            fillers.append(f)
        time.sleep(0.2)
        s = _client(srv)
        s.sendall(b"\x05\x01\x00" + _connect_request(full.getsockname()[1]))
        assert _recv_exact(s, 2) == b"\x05\x00"
        t0 = time.monotonic()
        rep = _recv_exact(s, 10)
        assert rep[1] == socks.TTL_EXPIRED, rep
        assert 0.25 < time.monotonic() - t0 < 3.0
        assert s.recv(10) == b""
        s.close()
        srv.settle()
    finally:
        srv.stop()
        for f in fillers:
            f.close()
        full.close()
    c = srv.counters
    assert c["timeouts_connect"] == 1 and c["reply_ttl_expired"] == 1 and srv.factory.active == 0


def test_idle_timeout_closes_a_silent_relay_but_not_a_busy_one(target):
    srv = Server(idle_timeout=1.0)
    try:
        quiet, qc = _relayed(srv, target)
        busy, bc = _relayed(srv, target)
        bc.settimeout(5)
        for _ in range(8):  # 1.6 s of traffic every 0.2 s: never idle for a second
            busy.sendall(b"x")
            assert bc.recv(10) == b"x"
            time.sleep(0.2)
        qc.settimeout(2)
        assert qc.recv(10) == b""  # the silent one went after ~1 s
        busy.sendall(b"y")
        assert bc.recv(10) == b"y"  # the busy one is still there
        for x in (quiet, qc, busy, bc):
            x.close()
        srv.settle()
    finally:
        srv.stop()
    assert srv.counters["timeouts_idle"] == 1


def test_rules_refuse_with_not_allowed(target):
    srv = Server(rules=[Rule(action="pass", ports=("1",))])
    try:
        s = _client(srv)
        s.sendall(b"\x05\x01\x00" + _connect_request(target.getsockname()[1]))
        assert _recv_exact(s, 2) == b"\x05\x00"
        assert _recv_exact(s, 10)[1] == socks.NOT_ALLOWED
        assert s.recv(10) == b""
        s.close()
        srv.settle()
    finally:
        srv.stop()
    c = srv.counters
    assert c["rule_blocks"] == 1 and c["reply_not_allowed"] == 1 and srv.factory.active == 0


def test_refused_destination_answers_connection_refused():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()[1]
    closed.close()
    srv = Server()
    try:
        s = _client(srv)
        s.sendall(b"\x05\x01\x00" + _connect_request(dead))
        assert _recv_exact(s, 12)[3] == socks.CONNECTION_REFUSED
        assert s.recv(10) == b""
        s.close()
        srv.settle()
    finally:
        srv.stop()
    assert srv.counters["reply_connection_refused"] == 1 and srv.factory.active == 0


def test_password_auth_is_handed_over_with_the_greeting(target):
    """The greeting is not answered here but by the protocol, which then authenticates and relays."""
    srv = Server(methods=["password"], users={"alice": hash_password("secret")})
    try:
        s = _client(srv)
        s.sendall(b"\x05\x01\x02")
        assert _recv_exact(s, 2) == b"\x05\x02"
        s.sendall(socks.encode_password_request(b"alice", b"secret"))
        assert _recv_exact(s, 2) == b"\x01\x00"
        s.sendall(_connect_request(target.getsockname()[1]))
        assert _recv_exact(s, 10)[1] == socks.SUCCEEDED
        conn, _ = target.accept()
        s.sendall(b"hi")
        conn.settimeout(5)
        assert conn.recv(10) == b"hi"
        conn.close()
        assert s.recv(10) == b""
        s.close()
        srv.settle()
    finally:
        srv.stop()
    c = srv.counters
    assert c["lean_handovers"] == 1 and c["connections"] == 1 and srv.factory.active == 0


def test_max_connections_refuses_at_accept(target):
    srv = Server(max_connections=1)
    try:
        first = _client(srv)
        first.sendall(b"\x05\x01\x00")
        assert _recv_exact(first, 2) == b"\x05\x00"
        second = _client(srv)
        assert second.recv(10) == b""  # accepted and closed at once
        second.close()
        first.close()
        srv.settle()
    finally:
        srv.stop()
    assert srv.counters["connections_refused_max"] == 1 and srv.counters["connections"] == 1


def test_a_reset_from_the_target_closes_the_client(target):
    srv = Server()
    try:
        s, conn = _relayed(srv, target)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST
        s.settimeout(5)
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        s.close()
        srv.settle()
    finally:
        srv.stop()
    assert srv.factory.active == 0


def test_a_bug_on_one_connection_closes_it_and_only_it(target, monkeypatch):
    """An exception in the lean path is logged and counted, its connection closed, and the
    server goes on serving (it must not reach the reactor or leave the connection open)."""
    from narsuite.nar import lean

    real = lean._Conn._connect
    calls = []

    def buggy(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(self)

    monkeypatch.setattr(lean._Conn, "_connect", buggy)
    srv = Server()
    seen = []
    observer = lambda e: seen.append(e) if "log_failure" in e else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        s = _client(srv)
        s.sendall(b"\x05\x01\x00" + _connect_request(target.getsockname()[1]))
        assert _recv_exact(s, 2) == b"\x05\x00" and s.recv(10) == b""  # closed, nothing more
        s.close()
        s = _client(srv)  # the next one is served
        s.sendall(b"\x05\x01\x00" + _connect_request(target.getsockname()[1]))
        assert _recv_exact(s, 12)[3] == socks.SUCCEEDED
        target.accept()[0].close()
        assert s.recv(10) == b""
        s.close()
        srv.settle()
    finally:
        globalLogPublisher.removeObserver(observer)
        srv.stop()
    assert srv.counters["errors"] == 1 and srv.factory.active == 0
    assert len(seen) == 1 and "injected" in str(seen[0]["log_failure"].value)


def test_deadlines_fire_once_due_and_follow_a_moved_deadline():
    clock = Clock()
    d = _Deadlines(clock)
    fired: list[tuple[str, float]] = []

    class Conn:
        def __init__(self, name: str, when: float) -> None:
            self.name, self.when = name, when

        def expired(self, now: float) -> None:
            if self.when > now:  # moved later meanwhile: file again
                d.put(self, self.when)
                return
            fired.append((self.name, now))

    a, b, c = Conn("a", 1.0), Conn("b", 0.5), Conn("c", 2.0)
    ka = d.put(a, a.when)
    d.put(b, b.when)
    kc = d.put(c, c.when)
    clock.advance(0.45)
    assert fired == []
    clock.advance(0.2)  # b due at 0.5 (+ at most one grain)
    assert [n for n, _ in fired] == ["b"]
    a.when = 1.7  # a's deadline moved: it is asked at 1.0 and files itself again
    d.drop(c, kc)  # c went away
    clock.advance(0.5)
    assert [n for n, _ in fired] == ["b"]
    clock.advance(0.7)
    assert [n for n, _ in fired] == ["b", "a"] and 1.7 <= fired[-1][1] <= 1.7 + 2 * d.GRAIN
    clock.advance(5)
    assert [n for n, _ in fired] == ["b", "a"] and not clock.getDelayedCalls()
    assert ka  # keys are opaque but non-zero



# ---------------------------------------------------------------- fuzz, over real sockets

def _well_formed(out: bytes) -> None:
    """What the server wrote is a method reply, then (optionally) one request reply; a refusal
    ends it (the connection is closed after it: the caller read up to EOF)."""
    if not out:
        return
    assert out[0] == 5 and len(out) >= 2, out
    method, rest = out[1], out[2:]
    if method == socks.METHOD_NO_ACCEPTABLE:
        assert not rest, out
        return
    if rest:
        r = socks.parse_reply(rest)
        assert r is not None and r[0].rep in socks.REPLY_NAMES, out


@pytest.fixture(scope="module")
def fuzz_server():
    """One lean server for every example: a live target that answers and closes, names resolved
    to 127.0.0.1, short limits so that nothing an example leaves behind outlives it for long."""
    from twisted.internet import defer

    live = socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen(64)

    def serve():
        while True:
            try:
                c, _ = live.accept()
            except OSError:
                return
            c.sendall(b"hello")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    srv = Server(negotiation_timeout=0.5, connect_timeout=0.5, idle_timeout=1.0)
    srv.factory.resolve = lambda name, port: defer.succeed(["127.0.0.1"])
    srv.failures = []  # type: ignore[attr-defined]
    observer = lambda e: srv.failures.append(e) if "log_failure" in e else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    yield srv, live.getsockname()[1]
    globalLogPublisher.removeObserver(observer)
    srv.stop()
    live.close()


def _exchange(port: int, chunks: list[bytes]) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        try:
            for c in chunks:
                s.sendall(c)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server already refused and closed (a reset, with bytes it never read)
        out = b""
        while True:
            try:
                b = s.recv(4096)
            except ConnectionResetError:
                break
            if not b:
                break
            out += b
        return out
    finally:
        s.close()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_fuzz_random_bytes_after_the_version(fuzz_server, chunks):
    """Never an unhandled error, only well-formed answers, nothing left open."""
    srv, _ = fuzz_server
    out = _exchange(srv.port, [b"\x05" + chunks[0]] + chunks[1:] if chunks else [b"\x05"])
    _well_formed(out)
    srv.settle(3.0)
    assert srv.factory.active == 0 and srv.counters["errors"] == 0
    assert not srv.failures, srv.failures[:1]  # nothing escaped to the reactor's log


def _streams(live: int) -> list[bytes]:
    p = live.to_bytes(2, "big")
    return [
        b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + p + b"data",
        b"\x05\x02\x00\x02" + b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "::1") + b"\x00\x01",
        b"\x05\x01\x00" + b"\x05\x01\x00\x03\x07example" + p,
        b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
        b"\x05\x01\x00" + b"\x05\x09\x00\x01\x7f\x00\x00\x01" + p,
    ]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 4), st.lists(st.integers(0, 40), max_size=5), st.binary(max_size=4),
       st.integers(0, 40))
def test_fuzz_splits_of_valid_streams(fuzz_server, which, cuts, garbage, at):
    """Valid requests (CONNECT v4 with data, v6, by name, UDP ASSOCIATE, an unknown command),
    split anywhere and sometimes with garbage inserted: well-formed answers, nothing left open;
    an intact stream always gets its method reply and a request reply."""
    srv, live = fuzz_server
    stream = _streams(live)[which]
    at = min(at, len(stream))
    stream = stream[:at] + garbage + stream[at:] if garbage else stream
    cuts = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    out = _exchange(srv.port, [c for c in chunks if c])
    _well_formed(out)
    if not garbage:
        assert out[:2] == b"\x05\x00" and len(out) >= 12, out
    srv.settle(3.0)
    assert srv.factory.active == 0 and srv.counters["errors"] == 0
    assert not srv.failures, srv.failures[:1]  # nothing escaped to the reactor's log
