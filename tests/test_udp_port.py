"""Shared UDP ports: one socket, handlers chosen by predicate, failures contained."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactor

from narsuite.packet.udp import SharedUDPPort, UDPPorts


def test_first_matching_handler_gets_the_datagram() -> None:
    port = SharedUDPPort(4500, reactor=MemoryReactor())
    got: list[tuple[str, bytes]] = []
    port.add_handler("keepalive-and-esp", lambda d: d[:4] != b"\0\0\0\0",
                     lambda d, a: got.append(("esp", d)))
    port.add_handler("ike", lambda d: d[:4] == b"\0\0\0\0", lambda d, a: got.append(("ike", d)))
    port.dispatch(b"\xff", ("192.0.2.1", 4500))
    port.dispatch(b"\0\0\0\0ike", ("192.0.2.1", 4500))
    port.dispatch(b"\x01\x02\x03\x04esp", ("192.0.2.1", 4500))
    assert got == [("esp", b"\xff"), ("ike", b"\0\0\0\0ike"), ("esp", b"\x01\x02\x03\x04esp")]
    assert port.stats() == {"keepalive-and-esp_packets": 2, "ike_packets": 1,
                            "short": 0, "unclaimed": 0, "handler_errors": 0,
                            "deferred_send_failed": 0}


def test_unclaimed_and_failing_handlers_are_counted_not_raised() -> None:
    port = SharedUDPPort(500, reactor=MemoryReactor())

    def boom(data, addr):
        raise RuntimeError("handler bug")

    port.add_handler("x", lambda d: d.startswith(b"x"), boom)
    port.dispatch(b"x1", ("127.0.0.1", 1))
    port.dispatch(b"y1", ("127.0.0.1", 1))
    assert port.handler_errors == 1 and port.unclaimed == 1


def test_short_datagrams_are_counted_apart_from_unclaimed() -> None:
    """Port 500: IKE takes 28 bytes and more, the 004 draft's ESP 9 and more; anything
    shorter than both is `short`, a long one nobody claims is `unclaimed`."""
    port = SharedUDPPort(500, reactor=MemoryReactor())
    port.add_handler("ike", lambda d: len(d) >= 28 and d[:8] != bytes(8), lambda d, a: None, min_length=28)
    port.add_handler("esp-draft", lambda d: len(d) > 8 and d[:8] == bytes(8), lambda d, a: None, min_length=9)
    for data in (b"\xff", b"12345678", b"x" * 20, bytes(8) + b"esp", b"i" * 28):
        port.dispatch(data, ("192.0.2.1", 500))
    assert port.stats() == {"ike_packets": 1, "esp-draft_packets": 1, "short": 2, "unclaimed": 1,
                            "handler_errors": 0, "deferred_send_failed": 0}


class _UDPReactor:
    """Records listenUDP calls (MemoryReactor has no UDP)."""

    def __init__(self) -> None:
        self.udpPorts: list[tuple[int, object, str]] = []
        self.sent: list[tuple[bytes, tuple]] = []

    def listenUDP(self, port, protocol, interface=""):
        self.udpPorts.append((port, protocol, interface))
        reactor = self

        class _Port:
            def write(self, data, addr):
                reactor.sent.append((data, addr))

            def stopListening(self):
                return None

        return _Port()


def test_ports_are_shared_per_interface_and_number() -> None:
    reactor = _UDPReactor()
    ports = UDPPorts(reactor)
    assert ports.get(4500) is ports.get(4500)
    assert ports.get(4500) is not ports.get(500)
    ports.startService()
    assert sorted(p[0] for p in reactor.udpPorts) == [500, 4500]
    assert ports.get(4500).write(b"\xff", ("192.0.2.1", 4500)) is True
    assert reactor.sent == [(b"\xff", ("192.0.2.1", 4500))]
    ports.stopService()
    assert ports.get(4500).write(b"\xff", ("192.0.2.1", 4500)) is False


def test_a_real_port_gets_a_large_receive_buffer() -> None:
    """ESP bursts overflowed the default 208 KiB buffer in the tunnel benchmark."""
    import os
    import socket

    from twisted.internet import reactor

    from narsuite.packet import udp

    port = SharedUDPPort(0, "127.0.0.1", reactor=reactor)
    port.startService()
    try:
        got = port.port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        with open("/proc/sys/net/core/rmem_max") as f:
            rmem_max = int(f.read())
        # Linux reports twice what was set; without root the plain option is capped
        want = udp.RCVBUF if os.geteuid() == 0 else min(udp.RCVBUF, rmem_max)
        assert got >= want
    finally:
        port.stopService()


def test_a_real_port_sends_to_ipv4_literals_itself_and_leaves_the_rest_to_twisted() -> None:
    """write()'s fast path: an IPv4 literal goes to the socket directly (no Twisted address
    checks); a name is refused by Twisted's write, never resolved; refusals are False."""
    import socket

    import pytest
    from twisted.internet import error, reactor

    port = SharedUDPPort(0, "127.0.0.1", reactor=reactor)
    port.startService()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    try:
        calls: list[tuple] = []
        twisted_write = port.port.write
        port.port.write = lambda d, a: calls.append(a) or twisted_write(d, a)  # type: ignore[method-assign]
        assert port.write(b"fast", rx.getsockname()) is True
        assert rx.recvfrom(100) == (b"fast", port.port.socket.getsockname())
        assert calls == []  # not through Twisted
        with pytest.raises(error.InvalidAddressError):
            port.write(b"name", ("localhost", rx.getsockname()[1]))
        assert calls == [("localhost", rx.getsockname()[1])]
        assert port.write(b"x" * 70000, rx.getsockname()) is False  # EMSGSIZE: counted, not raised
    finally:
        rx.close()
        port.stopService()
    assert port.write(b"late", ("127.0.0.1", 9)) is False


def test_write_soon_sends_after_the_turn_in_order_and_counts_refusals() -> None:
    """write_soon() holds datagrams until the reactor runs its next timed calls (after the
    turn's reads), then sends them in order; one the socket refuses is counted and the
    rest still leave; nothing queued is lost at stop."""
    import socket

    from twisted.internet import reactor
    from twisted.internet.task import Clock

    port = SharedUDPPort(0, "127.0.0.1", reactor=reactor)
    port.startService()
    clock = Clock()
    port.reactor = clock  # the queue's timer on a clock this test turns
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    try:
        assert port.write_soon(b"one", rx.getsockname()) is True
        assert port.write_soon(b"x" * 70000, rx.getsockname()) is True  # EMSGSIZE later
        assert port.write_soon(b"two", rx.getsockname()) is True
        assert len(clock.getDelayedCalls()) == 1  # one flush per turn, not per datagram
        try:
            rx.recv(100)
            raise AssertionError("sent before the turn ended")
        except BlockingIOError:
            pass
        clock.advance(0)
        rx.settimeout(2)
        assert [rx.recv(100), rx.recv(100)] == [b"one", b"two"]
        assert port.deferred_send_failed == 1
        port.write_soon(b"at stop", rx.getsockname())
    finally:
        port.stopService()
    assert rx.recv(100) == b"at stop"
    rx.close()
